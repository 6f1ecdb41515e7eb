//! `strata archive ...`: verify, compact, gc, retain, sync-catalog and rotate-key.
//!
//! Each command opens the archive and the control database named by a config, once, through
//! its [`Context`]. `verify` holds
//! the archive against the control database as well as against its own manifests: what the
//! runs recorded must still be there.

use crate::context::Context;
use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum ArchiveCommand {
    /// Check the whole archive: every file and BLOB against its manifest (sizes, digests,
    /// decryption, row counts), and the manifests against what the runs recorded in the control
    /// database (no manifest, run or row missing). Exits non-zero when anything does not match.
    Verify {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
    },
    /// Rewrite a table's archived files into large files sorted by patient, under one manifest
    /// that supersedes the old ones: a record archived again by a later run keeps only that
    /// run's copies; identical rows of one run all stay. Deletes nothing.
    Compact {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// The table (by default, every table with more than one manifest).
        #[arg(long)]
        table: Option<String>,
    },
    /// Delete files and manifests superseded by a compaction at least --grace-hours ago, and
    /// files no manifest names (left by an interrupted attempt) written that long ago, unless a
    /// run is in progress. Do not run it with a short grace while a compaction is writing.
    Gc {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// How long superseded files stay readable for readers that opened the old catalog.
        #[arg(long, default_value_t = 168)]
        grace_hours: i64,
    },
    /// After the control database was lost or restored from an older backup: rebuild its
    /// mirror of the archive catalog from the archive's manifests, and record in its ledger the
    /// manifests it lacks. Manifests the ledger records and the archive lacks stay an error.
    SyncCatalog {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Remove from the ledger the manifests the archive lacks (each is printed with its
        /// rows): an operator accepting that they are lost, e.g. after restoring the archive
        /// from an older backup.
        #[arg(long)]
        forget_missing: bool,
    },
    /// Retention inside the archive: carry out the destruction lists a records manager
    /// approved (each rewrite certified and signed with the [verify] key), then file the
    /// archived records past retention at --as-of (holds respected) as a new list, which a
    /// records manager other than --by approves with `strata destruction approve`.
    Retain {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
        /// Who requests the new list.
        #[arg(long)]
        by: String,
        /// The day retention is reckoned from (default: today).
        #[arg(long)]
        as_of: Option<chrono::NaiveDate>,
        /// Accept an --as-of later than today (records would be listed before their retention
        /// ends: for rehearsals on copies of the data, never on the archive of record).
        #[arg(long)]
        allow_future_as_of: bool,
    },
    /// Re-wrap every data key with the config's current KEK (`kek_id`), keeping the old one in
    /// `previous_keks` until this has finished. Data objects are not rewritten.
    RotateKey {
        #[arg(long, default_value = "strata.toml")]
        config: PathBuf,
    },
}

/// Runs one `strata archive` command.
pub async fn run(command: ArchiveCommand) -> Result<()> {
    match command {
        ArchiveCommand::Verify { config } => verify(&Context::load(&config)?).await,
        ArchiveCommand::Compact { config, table } => compact(&Context::load(&config)?, table).await,
        ArchiveCommand::Gc {
            config,
            grace_hours,
        } => {
            let ctx = Context::load(&config)?;
            let _turn = maintenance_turn(&ctx).await?;
            let (store, keys) = ctx.archive_store()?.clone();
            let control = ctx.control().await?;
            // A running range writes its files before its manifest: they are not orphans.
            let running = control.running_runs().await?;
            if let Some(run) = running.iter().next() {
                println!("run {run} is in progress: files no manifest names are kept");
            }
            // Change sync may reuse an existing BLOB object for new content while it follows:
            // unreferenced BLOBs are swept only once no run is followed.
            let following = match control.latest_run().await? {
                Some(run) => control
                    .sync_of(&run.run_id)
                    .await?
                    .is_some_and(|s| s.dropped_at.is_none()),
                None => false,
            };
            if following {
                println!("change sync follows the last run: BLOBs no record refers to are kept");
            }
            let deleted = strata_archive::gc_sweeping(
                store,
                keys,
                chrono::Duration::hours(grace_hours),
                running.is_empty(),
                running.is_empty() && !following,
            )
            .await?;
            println!(
                "deleted {} objects (superseded, or left by an interrupted attempt)",
                deleted.len()
            );
            let config = &ctx.config.migration;
            for request in strata_ingest::certify_keys_destroyed(config, control, &deleted).await? {
                println!("{request}: the replaced files and their data keys are destroyed; its certificate says so (signed again)");
            }
            Ok(())
        }
        ArchiveCommand::SyncCatalog {
            config,
            forget_missing,
        } => sync_catalog(&Context::load(&config)?, forget_missing).await,
        ArchiveCommand::Retain {
            config,
            by,
            as_of,
            allow_future_as_of,
        } => {
            let today = chrono::Utc::now().date_naive();
            if as_of.is_some_and(|d| d > today) && !allow_future_as_of {
                anyhow::bail!(
                    "--as-of {} is later than today: records would be listed before their retention ends (--allow-future-as-of, for a rehearsal on a copy)",
                    as_of.unwrap_or(today)
                );
            }
            retain(&Context::load(&config)?, &by, as_of).await
        }
        ArchiveCommand::RotateKey { config } => {
            let ctx = Context::load(&config)?;
            let (store, keys) = ctx.archive_store()?;
            let r = strata_archive::rotate_keys(store.clone(), keys).await?;
            let archive = ctx.archive().await?;
            ctx.control()
                .await?
                .rebuild_catalog(archive.catalog())
                .await?;
            println!(
                "every data key is now wrapped by KEK {}: the archive key, {} Parquet key objects and {} manifests rewritten; no data object was rewritten (BLOB keys derive from the archive key)",
                r.kek_id, r.parquet_keys, r.manifests
            );
            Ok(())
        }
    }
}

async fn verify(ctx: &Context) -> Result<()> {
    let archive = ctx.archive().await?;
    let catalog = ctx
        .control()
        .await?
        .check_catalog(archive.catalog())
        .await?;
    let report = archive.verify().await?;
    println!(
        "checked {} files ({} rows) and {} BLOBs ({} bytes)",
        report.files, report.rows, report.blobs, report.blob_bytes
    );
    for (table, a) in &catalog.tables {
        println!(
            "{table}: the runs archived {} rows; the archive holds {} ({} superseded copies left out by compaction, {} destroyed past retention)",
            a.recorded, a.held, a.superseded, a.destroyed
        );
    }
    let mut warnings = catalog.warnings.clone();
    if !report.unpublished.is_empty() {
        warnings.push(format!(
            "{} object(s) no manifest refers to (left by an interrupted attempt), e.g. {}",
            report.unpublished.len(),
            report.unpublished[0]
        ));
    }
    for w in &warnings {
        println!("warning: {w}");
    }
    for e in &catalog.errors {
        eprintln!("missing: {e}");
    }
    for (object, detail) in &report.problems {
        eprintln!("integrity error in {object}: {detail}");
    }
    let errors = catalog.errors.len() + report.problems.len();
    if errors == 0 {
        println!(
            "archive verified: no problems ({} warning(s))",
            warnings.len()
        );
        Ok(())
    } else {
        anyhow::bail!(
            "{errors} problem(s): {} missing, {} integrity",
            catalog.errors.len(),
            report.problems.len()
        )
    }
}

/// Takes the maintenance lock (tier, compaction, retention and gc read and rewrite what the
/// others write: one at a time), then settles what an interrupted tier pass left (a manifest
/// whose batch never committed must not be merged or kept).
async fn maintenance_turn(ctx: &Context) -> Result<strata_ingest::MaintenanceLock> {
    let config = &ctx.config.migration;
    let turn = strata_ingest::MaintenanceLock::take(config).await?;
    let withdrawn = strata_ingest::settle_tier_batches(config, ctx.control().await?).await?;
    if withdrawn > 0 {
        println!("{withdrawn} batch(es) of an interrupted tier pass withdrawn from the archive (their rows had stayed operational)");
    }
    Ok(turn)
}

async fn compact(ctx: &Context, table: Option<String>) -> Result<()> {
    let _turn = maintenance_turn(ctx).await?;
    let control = ctx.control().await?;
    // A run's rows must not be merged with the copies they supersede before the run ends: a
    // compaction would make its first ranges one run and its last ranges another.
    if let Some(run) = control.running_runs().await?.into_iter().next() {
        anyhow::bail!(
            "run {run} is in progress: compact after it has finished (or `strata migrate --abandon` it)"
        );
    }
    let (store, keys) = ctx.archive_store()?;
    let archive = ctx.archive().await?;
    let tables: Vec<String> = match table {
        Some(t) => vec![t],
        None => archive
            .catalog()
            .tables
            .iter()
            .filter(|(_, m)| m.len() > 1)
            .map(|(t, _)| t.clone())
            .collect(),
    };
    for t in tables {
        let r = strata_archive::compact_table(store.clone(), keys.clone(), &t, Default::default())
            .await?;
        println!(
            "{t}: {} manifests, {} files, {} rows -> 1 manifest, {} files, {} rows ({} superseded copies left out)",
            r.manifests,
            r.files_before,
            r.rows_before,
            r.files_after,
            r.rows_after,
            r.rows_before - r.rows_after
        );
    }
    let archive = ctx.archive().await?;
    control.rebuild_catalog(archive.catalog()).await?;
    Ok(())
}

async fn sync_catalog(ctx: &Context, forget_missing: bool) -> Result<()> {
    let archive = ctx.archive().await?;
    let (files, added, missing) = ctx
        .control()
        .await?
        .sync_catalog(archive.catalog(), forget_missing)
        .await?;
    println!("catalog mirror rebuilt from the archive's manifests: {files} files");
    println!("ledger: {added} manifest(s) recorded from the archive");
    for e in &missing {
        let what = if forget_missing {
            "forgotten"
        } else {
            "missing"
        };
        eprintln!(
            "{what}: table {}: manifest {} of run {} ({} rows archived)",
            e.table, e.manifest, e.run_id, e.rows
        );
    }
    if !missing.is_empty() && !forget_missing {
        anyhow::bail!(
            "the ledger records {} manifest(s) the archive lacks: restore them, or accept the loss with --forget-missing",
            missing.len()
        );
    }
    Ok(())
}

async fn retain(ctx: &Context, by: &str, as_of: Option<chrono::NaiveDate>) -> Result<()> {
    let _turn = maintenance_turn(ctx).await?;
    let control = ctx.control().await?;
    let config = &ctx.config.migration;
    for c in strata_ingest::carry_out_retention(config, control).await? {
        let rows: u64 = c.tables.iter().map(|t| t.rows).sum();
        println!(
            "{}: {rows} archived record(s) destroyed in {} table(s), approved by {}, {} kept by legal holds; certificate signed (`strata destruction list` shows it); the replaced files and their data keys go with `strata archive gc` after its grace period",
            c.request_id,
            c.tables.len(),
            c.approved_by,
            c.kept_by_holds
        );
    }
    let as_of = as_of.unwrap_or_else(|| chrono::Utc::now().date_naive());
    match strata_ingest::file_retention_list(config, control, as_of, by).await? {
        Some(filed) => {
            let rows: u64 = filed.tables.values().sum();
            println!(
                "{}: {rows} archived record(s) past retention at {as_of} filed for approval ({}); a records manager other than {by} approves it: strata destruction approve {} --by WHO --note WHY",
                filed.request_id,
                filed
                    .tables
                    .iter()
                    .map(|(t, n)| format!("{t}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                filed.request_id
            );
        }
        None => println!(
            "no archived record is past retention at {as_of} (or each is on a list already)"
        ),
    }
    Ok(())
}
