//! `strata rollback`: undoes the last finished run (or some of its tables) on the target
//! side, so that it can be run again from the start. The source is never touched.
//!
//! Each operational table the run created is dropped; one that was there before (Strata loads
//! only into empty tables, so every row in it is the run's) is emptied. The run's quarantined
//! rows and checkpoints are deleted, its archive manifests withdrawn (their files go with
//! `strata archive gc`), what the control database recorded of its archive forgotten, and its
//! destruction records kept but made void (the source still holds every row they name). Who
//! rolled back, when and why is recorded first; every step can be done again, and the run's
//! status (`rolling_back`, then `rolled_back`) changes last, so a rollback cut short (kill -9)
//! is finished by running it again.
//!
//! Rolling back some tables leaves the run unfinished (`running`) with those tables forgotten:
//! `strata migrate` resumes it and copies them again (in a new snapshot, as a resumed run
//! copies its unfinished tables), `strata migrate --abandon` undoes the rest.

use super::target::{ensure_bookkeeping_tables, forget_table};
use super::Migration;
use crate::config::MigrationConfig;
use crate::db::{quote, Db};
use crate::error::{IngestError, Result};
use strata_control::Control;

/// Drops `slot` on the source; what went wrong, when it could not.
async fn drop_followed_slot(
    config: &MigrationConfig,
    slot: &str,
) -> std::result::Result<(), String> {
    let url = config
        .resolve_url(&config.source.url)
        .map_err(|e| e.to_string())?;
    let source = Db::connect(&url, true).await.map_err(|e| e.to_string())?;
    let dropped = crate::sync::stream::drop_slot(&source, slot).await;
    source.close().await;
    dropped.map(|_| ()).map_err(|e| e.to_string())
}

/// What a rollback did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RollbackReport {
    /// The run rolled back.
    pub run_id: String,
    /// The tables rolled back; None for the whole run.
    pub tables: Option<Vec<String>>,
    /// Operational tables dropped (the run created them).
    pub dropped: Vec<String>,
    /// Operational tables emptied (they were there before the run).
    pub emptied: Vec<String>,
    /// Archive manifests withdrawn.
    pub manifests_withdrawn: u64,
    /// The run's replication slot: dropped (Ok), or left on the source, with why (Err).
    pub slot: Option<std::result::Result<String, String>>,
}

impl Migration {
    /// Rolls back the last finished run, or only `tables` of it when some are named (or
    /// finishes a rollback cut short), recording `by` and `reason`. None when there is nothing
    /// to roll back.
    pub async fn rollback(
        config: &MigrationConfig,
        by: &str,
        reason: &str,
        tables: &[String],
        after_cutover: bool,
    ) -> Result<Option<RollbackReport>> {
        if by.trim().is_empty() || reason.trim().len() < 10 {
            return Err(IngestError::Run(
                "a rollback names who makes it (--by) and why (--reason, 10 characters or more)"
                    .into(),
            ));
        }
        // Not while a run goes on in another process.
        let _running = crate::RunLock::take(&config.base_dir)?;
        let control = Control::open(&config.control_url()?).await?;
        let Some(run) = control.latest_run().await? else {
            return Ok(None);
        };
        match run.status.as_str() {
            "done" | "rolling_back" => {}
            "running" => {
                return Err(IngestError::Run(format!(
                    "run {} has not finished: `strata migrate` finishes it (and copies again the tables rolled back), `strata migrate --abandon` rolls back a run that has not finished",
                    run.run_id
                )))
            }
            _ => return Ok(None),
        }
        // After cutover the new system writes to the operational database: undoing the run
        // throws that away. Only when asked, with the reason recorded.
        if let Some(cutover) = control.cutover_of(&run.run_id).await? {
            if !after_cutover {
                return Err(IngestError::Run(format!(
                    "run {} was cut over at {} by {}: the new system may have written to the operational database since, and a rollback would lose it. `--after-cutover` (with --reason) rolls back anyway",
                    run.run_id, cutover.attempted_at, cutover.by
                )));
            }
        }
        let store = strata_archive::open_store(&config.archive.location(&config.base_dir)?)?;
        let run_tables = control.run_tables(&run.run_id).await?;
        // A rollback cut short is finished as it was asked.
        let scope = match control.unfinished_rollback(&run.run_id).await? {
            Some(recorded) if tables.is_empty() || recorded.as_deref() == Some(tables) => recorded,
            Some(recorded) => {
                return Err(IngestError::Run(format!(
                    "the rollback of {} of run {} was cut short: run `strata rollback` again without --table to finish it first",
                    recorded.map_or_else(|| "every table".to_string(), |t| t.join(", ")),
                    run.run_id
                )))
            }
            None if tables.is_empty() => None,
            None => {
                if let Some(t) = tables.iter().find(|t| !run_tables.contains(t)) {
                    return Err(IngestError::Run(format!(
                        "table {t} is not one of run {}'s tables ({})",
                        run.run_id,
                        run_tables.join(", ")
                    )));
                }
                Some(tables.to_vec())
            }
        };
        let tables = scope.clone().unwrap_or(run_tables);
        // A compaction since the run holds its rows in files of its own: withdrawing the run's
        // manifests would leave them there.
        for table in &tables {
            if strata_archive::compacted_since(store.as_ref(), table, &run.run_id).await? {
                return Err(IngestError::Run(format!(
                    "table {table}: the archive was compacted since run {}; its records are in the compacted files now and a rollback cannot take them out",
                    run.run_id
                )));
            }
        }
        control
            .start_rollback(&run.run_id, scope.as_deref(), by, reason)
            .await?;
        let target = Db::connect(&config.resolve_url(&config.operational.url)?, false).await?;
        ensure_bookkeeping_tables(&target).await?;
        let created = control.created_tables(&run.run_id).await?;
        let existing = target.table_names().await?;
        let mut report = RollbackReport {
            run_id: run.run_id.clone(),
            tables: scope.clone(),
            ..Default::default()
        };
        for table in &tables {
            let exists = existing.contains(table);
            forget_table(&target, &run.run_id, table, exists).await?;
            if created.contains(table) {
                target
                    .execute(&format!("DROP TABLE IF EXISTS {}", quote(table)))
                    .await?;
                report.dropped.push(table.clone());
            } else if exists {
                report.emptied.push(table.clone());
            }
            report.manifests_withdrawn +=
                strata_archive::withdraw_manifests(store.as_ref(), table, &run.run_id).await?;
        }
        target.close().await;
        control
            .finish_rollback(&run.run_id, scope.as_deref())
            .await?;
        // A whole run rolled back is no longer followed: its slot would keep the source's WAL.
        if scope.is_none() {
            if let Some(sync) = control.sync_of(&run.run_id).await? {
                if sync.dropped_at.is_none() {
                    report.slot = Some(
                        drop_followed_slot(config, &sync.slot)
                            .await
                            .map(|()| sync.slot.clone()),
                    );
                    if matches!(report.slot, Some(Ok(_))) {
                        control.record_slot_dropped(&run.run_id).await?;
                    }
                }
            }
        }
        tracing::info!(run_id = %run.run_id, "run rolled back");
        Ok(Some(report))
    }
}
