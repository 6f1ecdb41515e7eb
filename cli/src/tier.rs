//! `strata tier` and `strata plan --tier`: the operational database after go-live (see
//! `strata_ingest::TierPass`).

use crate::context::Context;
use anyhow::Result;
use std::path::PathBuf;
use strata_ingest::{MaintenanceLock, TierPass, TierReport};

/// What `strata tier` was asked.
pub struct TierOptions {
    /// Who requests the destruction of what the pass finds past retention.
    pub by: String,
    /// The day the policy reckons from (default: today).
    pub as_of: Option<chrono::NaiveDate>,
    /// Accept an `as_of` later than today.
    pub allow_future_as_of: bool,
    /// Also write the report as JSON here.
    pub report: Option<PathBuf>,
    /// Print JSON.
    pub json: bool,
}

/// The day a pass reckons from: `as_of`, or today; a later day only when allowed.
fn as_of(as_of: Option<chrono::NaiveDate>, allow_future: bool) -> Result<chrono::NaiveDate> {
    let today = chrono::Utc::now().date_naive();
    let day = as_of.unwrap_or(today);
    if day > today && !allow_future {
        anyhow::bail!(
            "--as-of {day} is later than today: records would move or be listed before their time (--allow-future-as-of, for a rehearsal on a copy)"
        );
    }
    Ok(day)
}

async fn prepare(ctx: &Context, day: chrono::NaiveDate) -> Result<TierPass> {
    let control = ctx.control().await?.clone();
    Ok(TierPass::prepare(ctx.config.migration.clone(), control, day).await?)
}

/// `strata tier`.
pub async fn tier(ctx: &Context, options: TierOptions) -> Result<()> {
    let day = as_of(options.as_of, options.allow_future_as_of)?;
    let _turn = MaintenanceLock::take(&ctx.config.migration).await?;
    let pass = prepare(ctx, day).await?;
    let report = pass.run(false, &options.by).await?;
    if let Some(path) = &options.report {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    print_report(&report, options.json)
}

/// `strata plan --tier`: what a pass would do, nothing moved.
pub async fn preview(
    ctx: &Context,
    as_of_day: Option<chrono::NaiveDate>,
    allow_future: bool,
    json: bool,
) -> Result<()> {
    let day = as_of(as_of_day, allow_future)?;
    let pass = prepare(ctx, day).await?;
    let report = pass.run(true, "preview").await?;
    print_report(&report, json)
}

fn print_report(report: &TierReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let head = if report.preview {
        "tier preview"
    } else {
        "tier pass"
    };
    println!(
        "{head} {} under policy {} (as of {}){}",
        report.pass_id,
        report.policy_version,
        report.as_of,
        if report.preview {
            ": nothing is moved"
        } else {
            ""
        }
    );
    if report.withdrawn > 0 {
        println!(
            "{} batch(es) of an interrupted pass withdrawn from the archive (their rows had stayed operational)",
            report.withdrawn
        );
    }
    let moved = if report.preview {
        "would move"
    } else {
        "moved"
    };
    for t in &report.tables {
        let name = if t.relation == t.table {
            t.table.clone()
        } else {
            format!("{} (archived as {})", t.relation, t.table)
        };
        if let Some(why) = &t.skipped {
            println!("  {name}: not touched: {why}");
            continue;
        }
        println!(
            "  {name}: {} read, {} stay, {} {moved} to the archive, {} past retention listed, {} awaiting approval, {} destroyed",
            t.rows_read, t.stay, t.archived, t.past_retention_listed, t.awaiting_approval, t.destroyed
        );
        if t.changed_meanwhile > 0 {
            println!(
                "    {} changed by the application while the pass ran: left for the next pass",
                t.changed_meanwhile
            );
        }
        for (by, n) in &t.kept_referenced {
            println!("    {n} kept: still referenced by {by}");
        }
        if t.kept_since_listed > 0 {
            println!(
                "    {} on an approved list kept: no longer past retention (a hold or activity since)",
                t.kept_since_listed
            );
        }
        if t.unreadable > 0 {
            println!(
                "    {} left in place: values not readable as their column's type, e.g. {}",
                t.unreadable,
                t.unreadable_examples.join("; ")
            );
        }
    }
    if let Some(filed) = &report.filed {
        let rows: u64 = filed.tables.values().sum();
        if report.preview {
            println!("{rows} operational record(s) past retention would be filed for approval");
        } else {
            println!(
                "{}: {rows} operational record(s) past retention filed for approval; a records manager other than the requester approves it: strata destruction approve {} --by WHO --note WHY",
                filed.request_id, filed.request_id
            );
        }
    }
    for c in &report.certificates {
        let rows: u64 = c.tables.iter().map(|t| t.rows).sum();
        println!(
            "{}: {rows} operational record(s) destroyed, approved by {}; certificate signed (`strata destruction list` shows it)",
            c.request_id, c.approved_by
        );
    }
    Ok(())
}
