//! Strata's control database: runs and per-table progress, so a stopped run resumes.
//!
//! It is a separate database (SQLite beside the config in the demo, PostgreSQL in production)
//! so that it survives the operational database being rebuilt, and so later stages (change
//! sync, cutover, reconciliation) can record their state beside the bulk copy's.

use crate::db::Db;
use crate::error::Result;
use crate::value::{ColumnType, Value};
use strata_cutoff_policies::HoldScope;

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
CREATE TABLE IF NOT EXISTS strata_policy_versions (
    policy_hash TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    author TEXT NOT NULL,
    stored_at TEXT NOT NULL,
    policy_text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS strata_plans (
    plan_id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    policy_hash TEXT NOT NULL,
    report TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS strata_holds (
    hold_id TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    patient TEXT,
    table_name TEXT,
    column_name TEXT,
    value TEXT,
    reason TEXT NOT NULL,
    placed_by TEXT NOT NULL,
    placed_at TEXT NOT NULL,
    released_by TEXT,
    released_at TEXT,
    release_reason TEXT
);
CREATE TABLE IF NOT EXISTS strata_archive_files (
    table_name TEXT NOT NULL,
    run_id TEXT NOT NULL,
    path TEXT PRIMARY KEY,
    rows_in_file BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    min_patient TEXT NOT NULL,
    max_patient TEXT NOT NULL,
    kek_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS strata_archive_files_patients ON strata_archive_files (table_name, min_patient, max_patient);
CREATE TABLE IF NOT EXISTS strata_run_snapshots (
    run_id TEXT NOT NULL,
    wal_lsn TEXT NOT NULL,
    taken_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS strata_destructions (
    run_id TEXT NOT NULL,
    table_name TEXT NOT NULL,
    rows_destroyed BIGINT NOT NULL,
    key_min TEXT,
    key_max TEXT,
    key_checksum TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    policy_hash TEXT NOT NULL,
    destroyed_at TEXT NOT NULL,
    PRIMARY KEY (run_id, table_name)
);
";

/// A legal hold as recorded: what it covers, who placed it and why, and its release if any.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HoldRecord {
    /// The hold's id.
    pub hold_id: String,
    /// What it covers.
    pub scope: HoldScope,
    /// Why it was placed.
    pub reason: String,
    /// Who placed it.
    pub placed_by: String,
    /// When (RFC 3339).
    pub placed_at: String,
    /// Who released it, when and why.
    pub released: Option<(String, String, String)>,
}

/// What a destruction record says: no PHI, only counts, key range and a checksum.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DestructionRecord {
    /// The run that destroyed the rows.
    pub run_id: String,
    /// The table.
    pub table: String,
    /// How many rows.
    pub rows: u64,
    /// Smallest primary key (text order), for keyed tables.
    pub key_min: Option<String>,
    /// Largest primary key.
    pub key_max: Option<String>,
    /// XOR of the SHA-256 of every destroyed row's key (of its values, for keyless tables), hex:
    /// order-independent, so it can be recomputed from the source to prove what was destroyed.
    pub key_checksum: String,
    /// The policy version that destroyed them.
    pub policy_version: String,
    /// Its hash.
    pub policy_hash: String,
}

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

    /// Stores a policy version (once per distinct text).
    pub async fn store_policy_version(
        &self,
        hash: &str,
        version: &str,
        author: &str,
        text: &str,
    ) -> Result<()> {
        let exists = self
            .db
            .fetch_all(
                format!(
                    "SELECT 1 FROM strata_policy_versions WHERE policy_hash = '{}'",
                    hash.replace('\'', "''")
                ),
                vec![ColumnType::Int],
            )
            .await?;
        if !exists.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO strata_policy_versions (policy_hash, version, author, stored_at, policy_text) VALUES ({}, {}, {}, {}, {})",
            self.p(1), self.p(2), self.p(3), self.p(4), self.p(5)
        );
        let t = |s: &str| Value::Text(s.to_string());
        self.db
            .execute_with(&sql, &[t(hash), t(version), t(author), t(&now()), t(text)])
            .await
            .map(|_| ())
    }

    /// Saves a plan's report; returns the previous plan's, if any.
    pub async fn save_plan(&self, policy_hash: &str, report: &str) -> Result<Option<String>> {
        let previous = self
            .db
            .fetch_all(
                "SELECT report FROM strata_plans ORDER BY created_at DESC, plan_id DESC LIMIT 1"
                    .into(),
                vec![ColumnType::Text],
            )
            .await?
            .into_iter()
            .next()
            .and_then(|r| r[0].as_key_text());
        let sql = format!(
            "INSERT INTO strata_plans (plan_id, created_at, policy_hash, report) VALUES ({}, {}, {}, {})",
            self.p(1), self.p(2), self.p(3), self.p(4)
        );
        let id = format!(
            "plan-{}-{:04x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
            rand::random::<u16>()
        );
        let t = |s: &str| Value::Text(s.to_string());
        self.db
            .execute_with(&sql, &[t(&id), t(&now()), t(policy_hash), t(report)])
            .await?;
        Ok(previous)
    }

    /// Places a legal hold; returns its id.
    pub async fn place_hold(&self, scope: &HoldScope, reason: &str, by: &str) -> Result<String> {
        if reason.trim().is_empty() || by.trim().is_empty() {
            return Err(crate::IngestError::Run(
                "a legal hold needs who places it and why".into(),
            ));
        }
        let id = format!(
            "hold-{}-{:04x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            rand::random::<u16>()
        );
        let (kind, patient, table, column, value) = match scope {
            HoldScope::Patient(p) => ("patient", Some(p), None, None, None),
            HoldScope::Table(t) => ("table", None, Some(t), None, None),
            HoldScope::Filter {
                table,
                column,
                value,
            } => ("filter", None, Some(table), Some(column), Some(value)),
        };
        let opt = |v: Option<&String>| v.map(|s| Value::Text(s.clone())).unwrap_or(Value::Null);
        let sql = format!(
            "INSERT INTO strata_holds (hold_id, scope, patient, table_name, column_name, value, reason, placed_by, placed_at) VALUES ({}, {}, {}, {}, {}, {}, {}, {}, {})",
            self.p(1), self.p(2), self.p(3), self.p(4), self.p(5), self.p(6), self.p(7), self.p(8), self.p(9)
        );
        let t = |s: &str| Value::Text(s.to_string());
        self.db
            .execute_with(
                &sql,
                &[
                    t(&id),
                    t(kind),
                    opt(patient),
                    opt(table),
                    opt(column),
                    opt(value),
                    t(reason),
                    t(by),
                    t(&now()),
                ],
            )
            .await?;
        Ok(id)
    }

    /// Releases a hold, recording who and why.
    pub async fn release_hold(&self, hold_id: &str, reason: &str, by: &str) -> Result<()> {
        if reason.trim().is_empty() || by.trim().is_empty() {
            return Err(crate::IngestError::Run(
                "releasing a legal hold needs who releases it and why".into(),
            ));
        }
        let sql = format!(
            "UPDATE strata_holds SET released_by = {}, released_at = {}, release_reason = {} WHERE hold_id = {} AND released_at IS NULL",
            self.p(1), self.p(2), self.p(3), self.p(4)
        );
        let t = |s: &str| Value::Text(s.to_string());
        let n = self
            .db
            .execute_with(&sql, &[t(by), t(&now()), t(reason), t(hold_id)])
            .await?;
        if n == 0 {
            return Err(crate::IngestError::Run(format!(
                "no active legal hold {hold_id}"
            )));
        }
        Ok(())
    }

    /// Every hold, placed and released, oldest first.
    pub async fn holds(&self) -> Result<Vec<HoldRecord>> {
        let rows = self
            .db
            .fetch_all(
                "SELECT hold_id, scope, patient, table_name, column_name, value, reason, placed_by, placed_at, released_by, released_at, release_reason FROM strata_holds ORDER BY placed_at, hold_id".into(),
                vec![ColumnType::Text; 12],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let t: Vec<Option<String>> = r.iter().map(|v| v.as_key_text()).collect();
                let s = |i: usize| t[i].clone().unwrap_or_default();
                let scope = match s(1).as_str() {
                    "patient" => HoldScope::Patient(s(2)),
                    "table" => HoldScope::Table(s(3)),
                    _ => HoldScope::Filter {
                        table: s(3),
                        column: s(4),
                        value: s(5),
                    },
                };
                HoldRecord {
                    hold_id: s(0),
                    scope,
                    reason: s(6),
                    placed_by: s(7),
                    placed_at: s(8),
                    released: t[10].as_ref().map(|at| (s(9), at.clone(), s(11))),
                }
            })
            .collect())
    }

    /// Records destroyed rows (replacing an earlier record of the same run and table).
    pub async fn record_destruction(&self, d: &DestructionRecord) -> Result<()> {
        let del = format!(
            "DELETE FROM strata_destructions WHERE run_id = {} AND table_name = {}",
            self.p(1),
            self.p(2)
        );
        self.db
            .execute_with(
                &del,
                &[Value::Text(d.run_id.clone()), Value::Text(d.table.clone())],
            )
            .await?;
        let sql = format!(
            "INSERT INTO strata_destructions (run_id, table_name, rows_destroyed, key_min, key_max, key_checksum, policy_version, policy_hash, destroyed_at) VALUES ({}, {}, {}, {}, {}, {}, {}, {}, {})",
            self.p(1), self.p(2), self.p(3), self.p(4), self.p(5), self.p(6), self.p(7), self.p(8), self.p(9)
        );
        let t = |s: &str| Value::Text(s.to_string());
        let opt = |v: &Option<String>| {
            v.as_ref()
                .map(|s| Value::Text(s.clone()))
                .unwrap_or(Value::Null)
        };
        self.db
            .execute_with(
                &sql,
                &[
                    t(&d.run_id),
                    t(&d.table),
                    Value::Int(d.rows as i64),
                    opt(&d.key_min),
                    opt(&d.key_max),
                    t(&d.key_checksum),
                    t(&d.policy_version),
                    t(&d.policy_hash),
                    t(&now()),
                ],
            )
            .await
            .map(|_| ())
    }

    /// Records the source snapshot a run (or a resumption of it) copies from. Change sync starts
    /// at the run's earliest WAL position.
    pub async fn record_snapshot(&self, run_id: &str, wal_lsn: &str) -> Result<()> {
        let sql = format!(
            "INSERT INTO strata_run_snapshots (run_id, wal_lsn, taken_at) VALUES ({}, {}, {})",
            self.p(1),
            self.p(2),
            self.p(3)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    Value::Text(run_id.into()),
                    Value::Text(wal_lsn.into()),
                    Value::Text(chrono::Utc::now().to_rfc3339()),
                ],
            )
            .await
            .map(|_| ())
    }

    /// The WAL positions of a run's snapshots, oldest first.
    pub async fn run_snapshots(&self, run_id: &str) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT wal_lsn FROM strata_run_snapshots WHERE run_id = '{}' ORDER BY taken_at",
            run_id.replace('\'', "''")
        );
        Ok(self
            .db
            .fetch_all(sql, vec![ColumnType::Text])
            .await?
            .into_iter()
            .filter_map(|r| r.into_iter().next().and_then(Value::into_key_text))
            .collect())
    }

    /// Mirrors the manifests of a table written by one run's ranges (writer ids `{run}-r...`),
    /// replacing what was mirrored for them before.
    pub async fn mirror_table_manifests(
        &self,
        table: &str,
        run_id: &str,
        manifests: &[strata_archive::TableManifest],
    ) -> Result<()> {
        let del = format!(
            "DELETE FROM strata_archive_files WHERE table_name = {} AND run_id LIKE {}",
            self.p(1),
            self.p(2)
        );
        self.db
            .execute_with(
                &del,
                &[
                    Value::Text(table.into()),
                    Value::Text(format!("{}-%", run_id.replace(['%', '_'], ""))),
                ],
            )
            .await?;
        for m in manifests {
            self.mirror_manifest(m).await?;
        }
        Ok(())
    }

    /// Mirrors a published manifest into the control database's catalog (`strata_archive_files`),
    /// replacing the rows of the same table and run. The archive's own manifests stay the source
    /// of truth: the mirror can be rebuilt from them ([`Control::rebuild_catalog`]).
    pub async fn mirror_manifest(&self, m: &strata_archive::TableManifest) -> Result<()> {
        let del = format!(
            "DELETE FROM strata_archive_files WHERE table_name = {} AND run_id = {}",
            self.p(1),
            self.p(2)
        );
        self.db
            .execute_with(
                &del,
                &[Value::Text(m.table.clone()), Value::Text(m.run_id.clone())],
            )
            .await?;
        let sql = format!(
            "INSERT INTO strata_archive_files (table_name, run_id, path, rows_in_file, bytes, sha256, min_patient, max_patient, kek_id) VALUES ({}, {}, {}, {}, {}, {}, {}, {}, {})",
            self.p(1), self.p(2), self.p(3), self.p(4), self.p(5), self.p(6), self.p(7), self.p(8), self.p(9)
        );
        let t = |s: &str| Value::Text(s.to_string());
        for f in &m.files {
            self.db
                .execute_with(
                    &sql,
                    &[
                        t(&m.table),
                        t(&m.run_id),
                        t(&f.path),
                        Value::Int(f.rows as i64),
                        Value::Int(f.bytes as i64),
                        t(&f.sha256),
                        t(&f.min_patient),
                        t(&f.max_patient),
                        t(&f.kek_id),
                    ],
                )
                .await?;
        }
        Ok(())
    }

    /// Rebuilds the catalog mirror from the archive's manifests (after the control database
    /// was lost or restored from an older backup). Returns the files mirrored.
    pub async fn rebuild_catalog(&self, catalog: &strata_archive::Catalog) -> Result<u64> {
        self.db.execute("DELETE FROM strata_archive_files").await?;
        let mut files = 0;
        for m in catalog.tables.values().flatten() {
            self.mirror_manifest(m).await?;
            files += m.files.len() as u64;
        }
        Ok(files)
    }

    /// Files in the catalog mirror per table.
    pub async fn mirrored_files(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        self.per_table("SELECT table_name, CAST(COUNT(*) AS BIGINT) FROM strata_archive_files GROUP BY table_name").await
    }

    /// Rows destroyed per table over all runs.
    pub async fn destroyed_rows(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        self.per_table("SELECT table_name, CAST(SUM(rows_destroyed) AS BIGINT) FROM strata_destructions GROUP BY table_name").await
    }

    /// Runs a `SELECT table_name, <bigint>` query into a map.
    async fn per_table(&self, sql: &str) -> Result<std::collections::BTreeMap<String, u64>> {
        let rows = self
            .db
            .fetch_all(sql.into(), vec![ColumnType::Text, ColumnType::Int])
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| match (r[0].as_key_text(), &r[1]) {
                (Some(table), Value::Int(n)) => Some((table, *n as u64)),
                _ => None,
            })
            .collect())
    }

    /// Closes the connection.
    pub async fn close(&self) {
        self.db.close().await
    }
}
