//! `strata rollback`: undoes the last finished run on the target side, so that it can be run
//! again from the start. The source is never touched.
//!
//! Each operational table the run created is dropped; one that was there before (Strata loads
//! only into empty tables, so every row in it is the run's) is emptied. The run's quarantined
//! rows and checkpoints are deleted, its archive manifests withdrawn (their files go with
//! `strata archive gc`), what the control database recorded of its archive forgotten, and its
//! destruction records kept but made void (the source still holds every row they name). Who
//! rolled back, when and why is recorded first; every step can be done again, and the run's
//! status (`rolling_back`, then `rolled_back`) changes last, so a rollback cut short (kill -9)
//! is finished by running it again.

use super::target::{ensure_bookkeeping_tables, forget_table};
use super::Migration;
use crate::config::MigrationConfig;
use crate::db::{quote, Db};
use crate::error::{IngestError, Result};
use strata_control::Control;

/// What a rollback did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RollbackReport {
    /// The run rolled back.
    pub run_id: String,
    /// Operational tables dropped (the run created them).
    pub dropped: Vec<String>,
    /// Operational tables emptied (they were there before the run).
    pub emptied: Vec<String>,
    /// Archive manifests withdrawn.
    pub manifests_withdrawn: u64,
}

impl Migration {
    /// Rolls back the last finished run (or finishes rolling it back), recording `by` and
    /// `reason`. None when there is nothing to roll back.
    pub async fn rollback(
        config: &MigrationConfig,
        by: &str,
        reason: &str,
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
                    "run {} is in progress: `strata migrate --abandon` rolls back a run that has not finished",
                    run.run_id
                )))
            }
            _ => return Ok(None),
        }
        let store = strata_archive::open_store(&config.archive.location(&config.base_dir)?)?;
        let tables = control.run_tables(&run.run_id).await?;
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
        control.start_rollback(&run.run_id, by, reason).await?;
        let target = Db::connect(&config.resolve_url(&config.operational.url)?, false).await?;
        ensure_bookkeeping_tables(&target).await?;
        let created = control.created_tables(&run.run_id).await?;
        let existing = target.table_names().await?;
        let mut report = RollbackReport {
            run_id: run.run_id.clone(),
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
        control.finish_rollback(&run.run_id).await?;
        tracing::info!(run_id = %run.run_id, "run rolled back");
        Ok(Some(report))
    }
}
