//! `strata hold`: legal holds, placed, released and listed in the control database.

use crate::context::Context;
use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;
use strata_cutoff_policies::HoldScope;

#[derive(Subcommand)]
pub enum HoldCommand {
    /// Place a hold on a patient, a table, or the rows of a table whose column equals a value.
    Place {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        #[arg(long, conflicts_with_all = ["table", "column", "value"])]
        patient: Option<String>,
        #[arg(long, required_unless_present = "patient")]
        table: Option<String>,
        #[arg(long, requires = "value")]
        column: Option<String>,
        #[arg(long, requires = "column")]
        value: Option<String>,
        /// Who places it.
        #[arg(long)]
        by: String,
        /// Why (a case or matter reference).
        #[arg(long)]
        reason: String,
    },
    /// Release a hold.
    Release {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        hold_id: String,
        #[arg(long)]
        by: String,
        #[arg(long)]
        reason: String,
    },
    /// List holds, placed and released.
    List {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
    },
}

/// Runs one `strata hold` command.
pub async fn run(command: HoldCommand) -> Result<()> {
    match command {
        HoldCommand::Place {
            config,
            patient,
            table,
            column,
            value,
            by,
            reason,
        } => {
            let scope = match (patient, table, column, value) {
                (Some(p), _, _, _) => HoldScope::Patient(p),
                (None, Some(t), Some(c), Some(v)) => HoldScope::Filter {
                    table: t,
                    column: c,
                    value: v,
                },
                (None, Some(t), _, _) => HoldScope::Table(t),
                _ => anyhow::bail!(
                    "name a --patient, a --table, or a --table with --column and --value"
                ),
            };
            let ctx = Context::load(&config)?;
            let id = ctx
                .control()
                .await?
                .place_hold(&scope, &reason, &by)
                .await?;
            println!("{id}");
        }
        HoldCommand::Release {
            config,
            hold_id,
            by,
            reason,
        } => {
            let ctx = Context::load(&config)?;
            ctx.control()
                .await?
                .release_hold(&hold_id, &reason, &by)
                .await?;
            println!("released {hold_id}");
        }
        HoldCommand::List { config } => {
            let ctx = Context::load(&config)?;
            let holds = ctx.control().await?.holds().await?;
            println!("{}", serde_json::to_string_pretty(&holds)?);
        }
    }
    Ok(())
}
