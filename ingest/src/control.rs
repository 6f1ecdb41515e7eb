//! Strata's control database: runs and per-table progress, so a stopped run resumes.
//!
//! It is a separate database (SQLite beside the config in the demo, PostgreSQL in production)
//! so that it survives the operational database being rebuilt, and so later stages (change
//! sync, cutover, reconciliation) can record their state beside the bulk copy's.

use crate::db::Db;
use crate::error::Result;
use crate::value::{ColumnType, Value};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_runs (
    run_id TEXT PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    policy_hash TEXT NOT NULL,
    as_of TEXT NOT NULL,
    report TEXT
);
CREATE TABLE IF NOT EXISTS strata_table_runs (
    run_id TEXT NOT NULL,
    table_name TEXT NOT NULL,
    status TEXT NOT NULL,
    report TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (run_id, table_name)
);
";

/// A run as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    /// Its id.
    pub run_id: String,
    /// `running` or `done`.
    pub status: String,
    /// The policy version it uses.
    pub policy_version: String,
    /// The policy text's hash.
    pub policy_hash: String,
    /// The `as_of` date it uses (YYYY-MM-DD).
    pub as_of: String,
}

/// The control database.
#[derive(Debug, Clone)]
pub struct Control {
    db: Db,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

impl Control {
    /// Opens (and creates) the control database.
    pub async fn open(url: &str) -> Result<Self> {
        let db = Db::connect(url, false).await?;
        db.execute(SCHEMA).await?;
        Ok(Control { db })
    }

    fn p(&self, n: usize) -> String {
        self.db.placeholder(n)
    }

    /// The most recent run.
    pub async fn latest_run(&self) -> Result<Option<RunRecord>> {
        let rows = self
            .db
            .fetch_all(
                "SELECT run_id, status, policy_version, policy_hash, as_of FROM strata_runs ORDER BY started_at DESC, run_id DESC LIMIT 1".into(),
                vec![ColumnType::Text; 5],
            )
            .await?;
        Ok(rows.into_iter().next().map(|r| {
            let t: Vec<String> = r
                .iter()
                .map(|v| v.as_key_text().unwrap_or_default())
                .collect();
            RunRecord {
                run_id: t[0].clone(),
                status: t[1].clone(),
                policy_version: t[2].clone(),
                policy_hash: t[3].clone(),
                as_of: t[4].clone(),
            }
        }))
    }

    /// Records a new run.
    pub async fn start_run(&self, run: &RunRecord) -> Result<()> {
        let sql = format!(
            "INSERT INTO strata_runs (run_id, started_at, status, policy_version, policy_hash, as_of) VALUES ({}, {}, {}, {}, {}, {})",
            self.p(1), self.p(2), self.p(3), self.p(4), self.p(5), self.p(6)
        );
        let v = |s: &str| Value::Text(s.to_string());
        self.db
            .execute_with(
                &sql,
                &[
                    v(&run.run_id),
                    v(&now()),
                    v(&run.status),
                    v(&run.policy_version),
                    v(&run.policy_hash),
                    v(&run.as_of),
                ],
            )
            .await
            .map(|_| ())
    }

    /// Marks a run done with its report.
    pub async fn finish_run(&self, run_id: &str, report: &str) -> Result<()> {
        let sql = format!(
            "UPDATE strata_runs SET status = 'done', finished_at = {}, report = {} WHERE run_id = {}",
            self.p(1), self.p(2), self.p(3)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    Value::Text(now()),
                    Value::Text(report.into()),
                    Value::Text(run_id.into()),
                ],
            )
            .await
            .map(|_| ())
    }

    /// A table's status and report within a run.
    pub async fn table_status(
        &self,
        run_id: &str,
        table: &str,
    ) -> Result<Option<(String, Option<String>)>> {
        let sql = format!(
            "SELECT status, report FROM strata_table_runs WHERE run_id = '{}' AND table_name = '{}'",
            run_id.replace('\'', "''"),
            table.replace('\'', "''")
        );
        let rows = self
            .db
            .fetch_all(sql, vec![ColumnType::Text, ColumnType::Text])
            .await?;
        Ok(rows
            .into_iter()
            .next()
            .map(|r| (r[0].as_key_text().unwrap_or_default(), r[1].as_key_text())))
    }

    /// Sets a table's status (and report) within a run.
    pub async fn set_table_status(
        &self,
        run_id: &str,
        table: &str,
        status: &str,
        report: Option<&str>,
    ) -> Result<()> {
        let del = format!(
            "DELETE FROM strata_table_runs WHERE run_id = {} AND table_name = {}",
            self.p(1),
            self.p(2)
        );
        self.db
            .execute_with(
                &del,
                &[Value::Text(run_id.into()), Value::Text(table.into())],
            )
            .await?;
        let ins = format!(
            "INSERT INTO strata_table_runs (run_id, table_name, status, report, updated_at) VALUES ({}, {}, {}, {}, {})",
            self.p(1), self.p(2), self.p(3), self.p(4), self.p(5)
        );
        let report = report.map(|r| Value::Text(r.into())).unwrap_or(Value::Null);
        self.db
            .execute_with(
                &ins,
                &[
                    Value::Text(run_id.into()),
                    Value::Text(table.into()),
                    Value::Text(status.into()),
                    report,
                    Value::Text(now()),
                ],
            )
            .await
            .map(|_| ())
    }

    /// Closes the connection.
    pub async fn close(&self) {
        self.db.close().await
    }
}
