//! What the control database keeps of rollbacks: the operational tables a run created (so
//! that rolling it back drops them, and only empties a table that was there before), who
//! rolled a run back, when and why, and its destruction records made void.

use crate::control::{now, Control};
use crate::db::Col;
use crate::error::Result;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_created_tables (
    run_id TEXT NOT NULL,
    table_name TEXT NOT NULL,
    PRIMARY KEY (run_id, table_name)
);
CREATE TABLE IF NOT EXISTS strata_rollbacks (
    run_id TEXT NOT NULL PRIMARY KEY,
    rolled_back_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT
);
";

/// A rollback as recorded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RollbackRecord {
    /// The run rolled back.
    pub run_id: String,
    /// Who.
    pub by: String,
    /// Why.
    pub reason: String,
    /// When it started and ended (RFC 3339); no end while it is cut short.
    pub started_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
}

impl Control {
    /// Records that `run_id` is about to create operational table `table` (before it does:
    /// a table recorded but never created is dropped by nobody; one created but not recorded
    /// would be emptied, not dropped, by a rollback).
    pub async fn record_created_table(&self, run_id: &str, table: &str) -> Result<()> {
        let sql = format!(
            "DELETE FROM strata_created_tables WHERE run_id = {} AND table_name = {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&sql, &[run_id.into(), table.into()])
            .await?;
        let sql = format!(
            "INSERT INTO strata_created_tables (run_id, table_name) VALUES ({})",
            self.db.ps(2)
        );
        self.db
            .execute_with(&sql, &[run_id.into(), table.into()])
            .await
            .map(|_| ())
    }

    /// The operational tables `run_id` created.
    pub async fn created_tables(&self, run_id: &str) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT table_name FROM strata_created_tables WHERE run_id = {} ORDER BY table_name",
            self.db.p(1)
        );
        let rows = self.db.fetch(&sql, &[run_id.into()], &[Col::Text]).await?;
        Ok(rows.into_iter().map(|r| r[0].text()).collect())
    }

    /// Starts rolling `run_id` back (status `rolling_back`), recording who and why; a rollback
    /// cut short keeps its first record.
    pub async fn start_rollback(&self, run_id: &str, by: &str, reason: &str) -> Result<()> {
        let have = self
            .db
            .fetch(
                &format!(
                    "SELECT run_id FROM strata_rollbacks WHERE run_id = {}",
                    self.db.p(1)
                ),
                &[run_id.into()],
                &[Col::Text],
            )
            .await?;
        if have.is_empty() {
            let sql = format!(
                "INSERT INTO strata_rollbacks (run_id, rolled_back_by, reason, started_at) VALUES ({})",
                self.db.ps(4)
            );
            self.db
                .execute_with(
                    &sql,
                    &[run_id.into(), by.into(), reason.into(), now().into()],
                )
                .await?;
        }
        let sql = format!(
            "UPDATE strata_runs SET status = 'rolling_back' WHERE run_id = {}",
            self.db.p(1)
        );
        self.db
            .execute_with(&sql, &[run_id.into()])
            .await
            .map(|_| ())
    }

    /// Ends rolling `run_id` back, after its tables: what it archived is forgotten (ledger and
    /// catalog mirror), its destruction records are made void (kept, marked with the
    /// rollback), and the run is `rolled_back`. The status changes last.
    pub async fn finish_rollback(&self, run_id: &str) -> Result<()> {
        self.forget_run_records(run_id, &["strata_archive_ledger", "strata_archive_files"])
            .await?;
        let void = format!("rolled back at {}", now());
        let sql = format!(
            "UPDATE strata_destructions SET void_reason = {} WHERE run_id = {} AND void_reason IS NULL",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&sql, &[void.into(), run_id.into()])
            .await?;
        let sql = format!(
            "UPDATE strata_rollbacks SET finished_at = {} WHERE run_id = {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&sql, &[now().into(), run_id.into()])
            .await?;
        let sql = format!(
            "UPDATE strata_runs SET status = 'rolled_back', finished_at = {} WHERE run_id = {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&sql, &[now().into(), run_id.into()])
            .await
            .map(|_| ())
    }

    /// Every rollback, newest first.
    pub async fn rollbacks(&self) -> Result<Vec<RollbackRecord>> {
        let rows = self
            .db
            .fetch(
                "SELECT run_id, rolled_back_by, reason, started_at, finished_at FROM strata_rollbacks ORDER BY started_at DESC",
                &[],
                &[Col::Text; 5],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| RollbackRecord {
                run_id: r[0].text(),
                by: r[1].text(),
                reason: r[2].text(),
                started_at: r[3].text(),
                finished_at: r[4].opt_text(),
            })
            .collect())
    }
}
