//! What the control database keeps of rollbacks: the operational tables a run created (so
//! that rolling it back drops them, and only empties a table that was there before), who
//! rolled a run (or some of its tables) back, when and why, and its destruction records made
//! void.

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
    run_id TEXT NOT NULL,
    tables TEXT NOT NULL,
    rolled_back_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    PRIMARY KEY (run_id, tables, started_at)
);
";

/// What `strata_rollbacks.tables` holds for a rollback of the whole run (else the tables,
/// comma-separated).
const WHOLE_RUN: &str = "*";

fn tables_of(text: &str) -> Option<Vec<String>> {
    (text != WHOLE_RUN).then(|| text.split(',').map(str::to_string).collect())
}

/// A rollback as recorded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RollbackRecord {
    /// The run rolled back.
    pub run_id: String,
    /// The tables rolled back; None for the whole run.
    pub tables: Option<Vec<String>>,
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
        self.put_run_table_row("strata_created_tables", run_id, table, &[], &[])
            .await
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

    /// The tables of `run_id`'s rollback that was cut short (None inside for the whole run),
    /// if one was: running rollback again finishes that one.
    pub async fn unfinished_rollback(&self, run_id: &str) -> Result<Option<Option<Vec<String>>>> {
        let sql = format!(
            "SELECT tables FROM strata_rollbacks WHERE run_id = {} AND finished_at IS NULL",
            self.db.p(1)
        );
        let rows = self.db.fetch(&sql, &[run_id.into()], &[Col::Text]).await?;
        Ok(rows.into_iter().next().map(|r| tables_of(&r[0].text())))
    }

    /// Starts rolling back `tables` of `run_id` (None: the whole run), recording who and why;
    /// the run's status becomes `rolling_back`. A rollback cut short is finished, not started
    /// again ([`Control::unfinished_rollback`]).
    pub async fn start_rollback(
        &self,
        run_id: &str,
        tables: Option<&[String]>,
        by: &str,
        reason: &str,
    ) -> Result<()> {
        if self.unfinished_rollback(run_id).await?.is_none() {
            let sql = format!(
                "INSERT INTO strata_rollbacks (run_id, tables, rolled_back_by, reason, started_at) VALUES ({})",
                self.db.ps(5)
            );
            let tables = tables.map_or_else(|| WHOLE_RUN.to_string(), |t| t.join(","));
            self.db
                .execute_with(
                    &sql,
                    &[
                        run_id.into(),
                        tables.into(),
                        by.into(),
                        reason.into(),
                        now().into(),
                    ],
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

    /// Ends rolling back `tables` of `run_id` (None: the whole run), after their operational
    /// tables and manifests: what they archived is forgotten (ledger and catalog mirror), their
    /// destruction records are made void (kept, marked with the rollback). A whole run becomes
    /// `rolled_back`; a run with some tables rolled back is unfinished again (`running`, its
    /// rolled-back tables forgotten): `strata migrate` copies them again, `--abandon` undoes
    /// the rest. The status changes last.
    pub async fn finish_rollback(&self, run_id: &str, tables: Option<&[String]>) -> Result<()> {
        let void = format!("rolled back at {}", now());
        match tables {
            None => {
                self.forget_run_records(run_id, &["strata_archive_ledger", "strata_archive_files"])
                    .await?;
                let sql = format!(
                    "UPDATE strata_destructions SET void_reason = {} WHERE run_id = {} AND void_reason IS NULL",
                    self.db.p(1),
                    self.db.p(2)
                );
                self.db
                    .execute_with(&sql, &[void.into(), run_id.into()])
                    .await?;
            }
            Some(tables) => {
                for table in tables {
                    self.forget_table_records(
                        run_id,
                        table,
                        &[
                            "strata_archive_ledger",
                            "strata_archive_files",
                            "strata_table_runs",
                        ],
                    )
                    .await?;
                    let sql = format!(
                        "UPDATE strata_destructions SET void_reason = {} WHERE run_id = {} AND table_name = {} AND void_reason IS NULL",
                        self.db.p(1),
                        self.db.p(2),
                        self.db.p(3)
                    );
                    self.db
                        .execute_with(&sql, &[(&void).into(), run_id.into(), table.into()])
                        .await?;
                }
            }
        }
        let whole = tables.map_or_else(|| WHOLE_RUN.to_string(), |t| t.join(","));
        let sql = format!(
            "UPDATE strata_rollbacks SET finished_at = {} WHERE run_id = {} AND tables = {} AND finished_at IS NULL",
            self.db.p(1),
            self.db.p(2),
            self.db.p(3)
        );
        self.db
            .execute_with(&sql, &[now().into(), run_id.into(), whole.into()])
            .await?;
        let sql = match tables {
            None => format!(
                "UPDATE strata_runs SET status = 'rolled_back', finished_at = {} WHERE run_id = {}",
                self.db.p(1),
                self.db.p(2)
            ),
            Some(_) => format!(
                "UPDATE strata_runs SET status = 'running', finished_at = {} WHERE run_id = {}",
                self.db.p(1),
                self.db.p(2)
            ),
        };
        self.db
            .execute_with(&sql, &[now().into(), run_id.into()])
            .await
            .map(|_| ())
    }

    /// Deletes what `tables` (control tables with a `table_name`) record of `table` in
    /// `run_id` (rows of the run, and of its writers: the archive's writer ids extend it).
    async fn forget_table_records(&self, run_id: &str, table: &str, tables: &[&str]) -> Result<()> {
        let writers = format!("{run_id}-r%");
        for t in tables {
            let sql = format!(
                "DELETE FROM {t} WHERE (run_id = {} OR run_id LIKE {}) AND table_name = {}",
                self.db.p(1),
                self.db.p(2),
                self.db.p(3)
            );
            self.db
                .execute_with(&sql, &[run_id.into(), (&writers).into(), table.into()])
                .await?;
        }
        Ok(())
    }

    /// Every rollback, newest first.
    pub async fn rollbacks(&self) -> Result<Vec<RollbackRecord>> {
        let rows = self
            .db
            .fetch(
                "SELECT run_id, tables, rolled_back_by, reason, started_at, finished_at FROM strata_rollbacks ORDER BY started_at DESC",
                &[],
                &[Col::Text; 6],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| RollbackRecord {
                run_id: r[0].text(),
                tables: tables_of(&r[1].text()),
                by: r[2].text(),
                reason: r[3].text(),
                started_at: r[4].text(),
                finished_at: r[5].opt_text(),
            })
            .collect())
    }
}
