//! Change sync and cutover: `strata sync` (with `prepare` and `stop`) and `strata cutover`.

use crate::context::Context;
use crate::watch;
use anyhow::{Context as _, Result};
use clap::Subcommand;
use std::path::PathBuf;
use strata_ingest::Migration;

/// `strata sync`'s subcommands.
#[derive(Subcommand)]
pub enum SyncCommand {
    /// Print the SQL the source's owner runs before `strata migrate --follow` (a publication of
    /// the migrated tables, REPLICA IDENTITY FULL for tables without a primary key) and check
    /// what is in place; exit status 1 while something is missing.
    Prepare {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
    },
    /// Stop following: drop the replication slot (the source stops keeping WAL for it).
    Stop {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Drop the slot (required: a dropped slot cannot be followed again).
        #[arg(long, required = true)]
        drop_slot: bool,
    },
}

/// `strata sync`: follows until stopped (Ctrl-C), or until caught up. Changes are routed as
/// the followed run routed its rows: under its `as_of` (and its policy, which must not have
/// changed).
pub async fn sync(ctx: &Context, catch_up: bool, metrics: Option<String>) -> Result<()> {
    let migration = followed(ctx).await?;
    let _metrics = match &metrics {
        Some(addr) => Some(watch::serve_metrics(addr, migration.progress()).await?),
        None => None,
    };
    run_sync(&migration, catch_up).await
}

pub(crate) async fn run_sync(migration: &Migration, catch_up: bool) -> Result<()> {
    use strata_ingest::SyncUntil;
    let until = if catch_up {
        SyncUntil::CaughtUp
    } else {
        SyncUntil::Stopped
    };
    let sync = migration.sync(until);
    tokio::pin!(sync);
    let report = tokio::select! {
        r = &mut sync => r?,
        _ = tokio::signal::ctrl_c() => {
            // Sync commits what it applied and tells the slot; a second Ctrl-C does not wait
            // (what was not committed is applied again next time).
            migration.progress().sync.request_stop();
            eprintln!("stopping sync (Ctrl-C again to stop at once) ...");
            let stopped = tokio::select! {
                r = &mut sync => Some(r?),
                _ = tokio::signal::ctrl_c() => None,
            };
            eprintln!("sync stopped: every change applied so far is kept; `strata sync` goes on from there");
            match stopped {
                Some(report) => report,
                None => return Ok(()),
            }
        }
    };
    println!(
        "run {}: {} source transaction(s) applied up to {} ({} row(s) upserted, {} deleted, {} for the archive, {} quarantined; {} change(s) the copy had already seen)",
        report.run_id,
        report.transactions,
        report.applied_lsn,
        report.upserted,
        report.deleted,
        report.archive_changes,
        report.quarantined,
        report.skipped_changes
    );
    let a = &report.archive;
    if a.entries > 0 {
        println!(
            "archive: {} record(s) archived, {} tombstone(s), {} destroyed past retention, {} moved back to the operational tier, {} quarantined, in {} manifest(s)",
            a.archived, a.tombstones, a.destroyed, a.reinstated, a.quarantined, a.manifests
        );
    }
    for table in &a.truncated {
        println!(
            "archive: table {table} was truncated at the source: its archived records are deleted"
        );
    }
    for (table, key) in &a.held {
        println!("archive: kept under legal hold although the source deleted it: table {table}, record {key}");
    }
    Ok(())
}

/// `strata sync prepare`.
pub async fn sync_prepare(ctx: &Context) -> Result<()> {
    let migration = crate::migration::prepare(ctx).await?;
    let p = migration.sync_prepare().await?;
    println!("-- As the owner of the migrated tables, once, before `strata migrate --follow`:");
    for statement in &p.sql {
        println!("{statement}");
    }
    if p.problems.is_empty() {
        println!("-- In place: the source is ready for change sync.");
        return Ok(());
    }
    for problem in &p.problems {
        eprintln!("not ready: {problem}");
    }
    std::process::exit(1);
}

/// `strata sync stop --drop-slot`.
pub async fn sync_stop(ctx: &Context) -> Result<()> {
    let migration = crate::migration::prepare(ctx).await?;
    match migration.drop_slot().await? {
        Some(slot) => println!(
            "replication slot {slot} dropped; the owner may now drop the publication ({})",
            ctx.config.migration.sync.publication
        ),
        None => println!("no followed run: no slot to drop"),
    }
    Ok(())
}

/// The followed run's migration, prepared as it was copied (its `as_of`).
async fn followed(ctx: &Context) -> Result<Migration> {
    let control = ctx.control().await?.clone();
    let as_of = match control.latest_run().await? {
        Some(run) => run
            .as_of
            .parse()
            .with_context(|| format!("run {}: as_of {:?}", run.run_id, run.as_of))?,
        None => crate::today(),
    };
    Ok(Migration::prepare_with(ctx.config.migration.clone(), control, as_of).await?)
}

/// `strata cutover`: catches up and checks the source quiet, proves the run, sets sequences;
/// records the attempt; on "go" drops the slot. Exits 1 on "no-go", leaving sync as it was.
pub async fn cutover(
    ctx: &Context,
    by: &str,
    quiet_seconds: u64,
    report_file: Option<PathBuf>,
    json: bool,
) -> Result<()> {
    let started = chrono::Utc::now();
    let control = ctx.control().await?.clone();
    let Some(run) = control.latest_run().await? else {
        anyhow::bail!("no run to cut over: `strata migrate --follow` makes one");
    };
    if let Some(done) = control.cutover_of(&run.run_id).await? {
        anyhow::bail!(
            "run {} was cut over at {} by {}",
            run.run_id,
            done.attempted_at,
            done.by
        );
    }
    let migration = followed(ctx).await?;
    let (first, quiet) = migration
        .catch_up_quietly(std::time::Duration::from_secs(quiet_seconds))
        .await?;
    let mut report = strata_ingest::CutoverReport {
        run_id: run.run_id.clone(),
        started: started.to_rfc3339(),
        transactions_applied: first.transactions + quiet.transactions,
        transactions_while_quiet: quiet.transactions,
        applied_lsn: quiet.applied_lsn.clone(),
        ..Default::default()
    };
    if quiet.transactions > 0 {
        let source = ctx
            .config
            .migration
            .resolve_url(&ctx.config.migration.source.url)?;
        report.reasons.push(format!(
            "the source is not quiet: {} transaction(s) on migrated tables committed in {quiet_seconds} s. Stop the legacy applications, or have the owner make the database read-only: {}",
            quiet.transactions,
            strata_ingest::read_only_statements(&source).join(" ")
        ));
    }
    let verified = prove(ctx).await?;
    report.verified = verified.proven();
    report.tables = strata_ingest::CutoverReport::counts_from(&verified);
    if !report.verified {
        let tables: Vec<&str> = verified
            .tables
            .iter()
            .filter(|t| !t.mismatches.is_empty())
            .map(|t| t.table.as_str())
            .collect();
        report.reasons.push(format!(
            "strata verify found mismatches in {} (`strata verify` lists the records)",
            tables.join(", ")
        ));
    }
    // Nothing may have come since: what the slot still holds when it is dropped is lost.
    let after = migration.sync(strata_ingest::SyncUntil::CaughtUp).await?;
    report.transactions_applied += after.transactions;
    report.applied_lsn = after.applied_lsn.clone();
    if after.transactions > 0 {
        report.reasons.push(format!(
            "the source wrote while verify ran: {} transaction(s) applied after it; stop the legacy applications and cut over again",
            after.transactions
        ));
    }
    let go = report.reasons.is_empty();
    if go {
        report.sequences = migration.set_sequences().await?;
        report.next_steps = vec![
            "point the new EHR at the operational database and the archive viewer at `strata serve`".into(),
            "keep the legacy system read-only until the fallback window ends".into(),
        ];
    } else {
        report.next_steps =
            vec!["sync goes on as it was: fix what is listed, then `strata cutover` again".into()];
    }
    report.decision = if go { "go" } else { "no-go" }.into();
    let finished = chrono::Utc::now();
    report.finished = finished.to_rfc3339();
    report.seconds = (finished - started).num_milliseconds() as f64 / 1000.0;
    control
        .record_cutover(&run.run_id, by, go, &serde_json::to_string(&report)?)
        .await?;
    if go {
        migration.drop_slot().await?;
    }
    if let Some(path) = report_file {
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    if !go {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(1);
    }
    Ok(())
}

/// Proves the run as `strata verify` does (BLOBs re-read).
async fn prove(ctx: &Context) -> Result<strata_ingest::VerifyReport> {
    crate::migration::prove(ctx, true, false).await
}
