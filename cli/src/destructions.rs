//! `strata destruction`: the destruction lists retention and tiering passes file, listed and
//! decided (approved or rejected) by a records manager other than the one who requested them.

use crate::context::Context;
use anyhow::Result;
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum DestructionCommand {
    /// List destruction requests, newest first (JSON): pending ones wait for a decision.
    List {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
    },
    /// Approve a pending destruction list: the next pass destroys it. The approver must not
    /// be its requester (four eyes).
    Approve {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        request_id: String,
        /// The records manager who approves it.
        #[arg(long)]
        by: String,
        /// Why (for the certificate).
        #[arg(long)]
        note: String,
    },
    /// Reject a pending destruction list: nothing of it is destroyed.
    Reject {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        request_id: String,
        /// The records manager who rejects it.
        #[arg(long)]
        by: String,
        /// Why.
        #[arg(long)]
        note: String,
    },
}

/// Runs one `strata destruction` command.
pub async fn run(command: DestructionCommand) -> Result<()> {
    match command {
        DestructionCommand::List { config } => {
            let ctx = Context::load(&config)?;
            let requests = ctx.control().await?.destruction_requests().await?;
            println!("{}", serde_json::to_string_pretty(&requests)?);
        }
        DestructionCommand::Approve {
            config,
            request_id,
            by,
            note,
        } => decide(&config, &request_id, &by, true, &note).await?,
        DestructionCommand::Reject {
            config,
            request_id,
            by,
            note,
        } => decide(&config, &request_id, &by, false, &note).await?,
    }
    Ok(())
}

async fn decide(config: &Path, request: &str, by: &str, approve: bool, note: &str) -> Result<()> {
    anyhow::ensure!(!note.trim().is_empty(), "a decision needs a --note");
    let ctx = Context::load(config)?;
    let decided = ctx
        .control()
        .await?
        .decide_destruction(request, by, approve, note.trim())
        .await?;
    println!(
        "{request} {} by {by}{}",
        if approve { "approved" } else { "rejected" },
        if approve {
            ": the next pass destroys it"
        } else {
            ": nothing of it is destroyed"
        }
    );
    debug_assert_eq!(decided.request_id, request);
    Ok(())
}
