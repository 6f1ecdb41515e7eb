//! Runs and per-table progress (so a stopped run resumes), policy versions, plans, legal
//! holds and destruction records.
//!
//! The control database is separate from the operational one (SQLite beside the config in the
//! demo, PostgreSQL in production) so that it survives the operational database being rebuilt,
//! and so that later stages (change sync, cutover, reconciliation) record their state beside
//! the bulk copy's.

use crate::db::{Col, ControlDb};
use crate::error::{ControlError, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use strata_cutoff_policies::HoldScope;

const TABLE_RUNNING: &str = "running";
const TABLE_DONE: &str = "done";

/// Where a table stands within a run. `P` is the range plan's type, `R` the report's (the
/// control database stores them as JSON; their types are the caller's).
#[derive(Debug, Clone, PartialEq)]
pub enum TableState<P, R> {
    /// Being copied by this range plan (a resumed run copies the ranges without a checkpoint).
    Running {
        /// The table's range plan.
        plan: P,
    },
    /// Copied.
    Done {
        /// The table's report.
        report: R,
    },
}

/// A plan as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPlan<R> {
    /// Its id.
    pub plan_id: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
    /// Its report.
    pub report: R,
}

/// Reads stored JSON of `what`.
fn parse<T: DeserializeOwned>(json: &str, what: &str) -> Result<T> {
    serde_json::from_str(json)
        .map_err(|e| ControlError::Invalid(format!("control database: {what}: {e}")))
}

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
    value_checksum TEXT,
    void_reason TEXT,
    policy_version TEXT NOT NULL,
    policy_hash TEXT NOT NULL,
    destroyed_at TEXT NOT NULL,
    PRIMARY KEY (run_id, table_name)
);
";

/// A legal hold as recorded: what it covers, who placed it and why, and its release if any.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct HoldRecord {
    /// The hold's id.
    pub hold_id: String,
    /// What it covers: `{"patient": key}`, `{"table": name}`, or `{"filter": {"table",
    /// "column", "value"}}`.
    #[schema(value_type = Object)]
    pub scope: HoldScope,
    /// Why it was placed.
    pub reason: String,
    /// Who placed it.
    pub placed_by: String,
    /// When (RFC 3339).
    pub placed_at: String,
    /// Who released it, when and why.
    #[schema(value_type = Option<Vec<String>>, min_items = 3, max_items = 3)]
    pub released: Option<(String, String, String)>,
}

/// What a destruction record says: no PHI, only counts, key range and a checksum.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
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
    /// The sum modulo 2^256 of the SHA-256 of every destroyed row's key (of its values, for
    /// keyless tables), as `sum256:` and 64 hex digits: order-independent, so it can be
    /// recomputed from the source to prove what was destroyed, and two identical rows count
    /// twice. Records of earlier versions hold a bare hex XOR of the digests instead.
    pub key_checksum: String,
    /// The sum modulo 2^256 of the canonical digests of every destroyed row's values (as
    /// `strata verify` computes them from any side), as `sum256:` and 64 hex digits: proves
    /// which values were destroyed, not only which keys. None for records of versions before
    /// it (their rows compare by count and key checksum only).
    pub value_checksum: Option<String>,
    /// The policy version that destroyed them.
    pub policy_version: String,
    /// Its hash.
    pub policy_hash: String,
    /// Set when the run was rolled back: the record stands void (nothing it names is
    /// destroyed, the source keeps every row).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub void: Option<String>,
}

/// A stored policy version.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct PolicyVersion {
    /// SHA-256 of the policy text.
    pub policy_hash: String,
    /// The version the policy names.
    pub version: String,
    /// Who stored it.
    pub author: String,
    /// When (RFC 3339).
    pub stored_at: String,
    /// The policy file's text.
    pub policy_text: String,
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
    pub(crate) db: ControlDb,
}

pub(crate) fn now() -> String {
    chrono::Utc::now().to_rfc3339()
}

impl Control {
    /// Opens (and creates) the control database: `postgres://...` or `sqlite://path`.
    pub async fn open(url: &str) -> Result<Self> {
        let db = ControlDb::connect(url).await?;
        db.execute(SCHEMA).await?;
        db.execute(crate::archive_catalog::SCHEMA).await?;
        db.execute(crate::audit::SCHEMA).await?;
        db.execute(crate::rollback::SCHEMA).await?;
        db.execute(crate::verification::SCHEMA).await?;
        db.execute(crate::sync::SCHEMA).await?;
        db.execute(crate::sync::CUTOVER_SCHEMA).await?;
        db.execute(crate::sessions::SCHEMA).await?;
        db.execute(crate::reviews::SCHEMA).await?;
        db.execute(crate::destructions::SCHEMA).await?;
        let control = Control { db };
        control.open_exports().await?;
        // Columns older versions lack.
        let have = control.db.columns_of("strata_destructions").await?;
        for column in ["value_checksum", "void_reason"] {
            if !have.iter().any(|c| c == column) {
                control
                    .db
                    .execute(&format!(
                        "ALTER TABLE strata_destructions ADD COLUMN {column} TEXT"
                    ))
                    .await?;
            }
        }
        Ok(control)
    }

    /// The most recent run.
    pub async fn latest_run(&self) -> Result<Option<RunRecord>> {
        let rows = self
            .db
            .fetch(
                "SELECT run_id, status, policy_version, policy_hash, as_of FROM strata_runs ORDER BY started_at DESC, run_id DESC LIMIT 1",
                &[],
                &[Col::Text; 5],
            )
            .await?;
        Ok(rows.into_iter().next().map(|r| RunRecord {
            run_id: r[0].text(),
            status: r[1].text(),
            policy_version: r[2].text(),
            policy_hash: r[3].text(),
            as_of: r[4].text(),
        }))
    }

    /// Records a new run.
    pub async fn start_run(&self, run: &RunRecord) -> Result<()> {
        let sql = format!(
            "INSERT INTO strata_runs (run_id, started_at, status, policy_version, policy_hash, as_of) VALUES ({})",
            self.db.ps(6)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    (&run.run_id).into(),
                    now().into(),
                    (&run.status).into(),
                    (&run.policy_version).into(),
                    (&run.policy_hash).into(),
                    (&run.as_of).into(),
                ],
            )
            .await
            .map(|_| ())
    }

    /// Marks a run done with its report.
    pub async fn finish_run(&self, run_id: &str, report: &impl Serialize) -> Result<()> {
        let report = serde_json::to_string(report)
            .map_err(|e| ControlError::Invalid(format!("run {run_id}: report: {e}")))?;
        let sql = format!(
            "UPDATE strata_runs SET status = 'done', finished_at = {}, report = {} WHERE run_id = {}",
            self.db.p(1),
            self.db.p(2),
            self.db.p(3)
        );
        self.db
            .execute_with(&sql, &[now().into(), report.as_str().into(), run_id.into()])
            .await
            .map(|_| ())
    }

    /// The tables a run recorded a status for (those it started loading).
    pub async fn run_tables(&self, run_id: &str) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT table_name FROM strata_table_runs WHERE run_id = {} ORDER BY table_name",
            self.db.p(1)
        );
        let rows = self.db.fetch(&sql, &[run_id.into()], &[Col::Text]).await?;
        Ok(rows.into_iter().map(|r| r[0].text()).collect())
    }

    /// Marks a run `abandoned` after forgetting what it recorded: its tables' statuses, what
    /// it archived (ledger and catalog mirror) and its destructions. Its tables must have been
    /// rolled back first (the operational rows and archive manifests are not this database's).
    /// The status changes last, so an abandon cut short can be run again.
    pub async fn abandon_run(&self, run_id: &str) -> Result<()> {
        self.forget_run_records(
            run_id,
            &[
                "strata_archive_ledger",
                "strata_archive_files",
                "strata_destructions",
                "strata_table_runs",
            ],
        )
        .await?;
        let sql = format!(
            "UPDATE strata_runs SET status = 'abandoned', finished_at = {} WHERE run_id = {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&sql, &[now().into(), run_id.into()])
            .await
            .map(|_| ())
    }

    /// Records (or replaces, in one statement) the row of `run_id` and `table_name` in
    /// control table `into`, whose primary key they are, with `columns` set to `values`.
    pub(crate) async fn put_run_table_row(
        &self,
        into: &str,
        run_id: &str,
        table_name: &str,
        columns: &[&str],
        values: &[&str],
    ) -> Result<()> {
        let set: Vec<String> = columns
            .iter()
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        let on_conflict = if set.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", set.join(", "))
        };
        let sql = format!(
            "INSERT INTO {into} (run_id, table_name{}) VALUES ({}) ON CONFLICT (run_id, table_name) {on_conflict}",
            columns.iter().map(|c| format!(", {c}")).collect::<String>(),
            self.db.ps(2 + columns.len())
        );
        let mut params: Vec<crate::db::Param> = vec![run_id.into(), table_name.into()];
        params.extend(values.iter().map(|v| (*v).into()));
        self.db.execute_with(&sql, &params).await.map(|_| ())
    }

    /// Deletes what `tables` record of `run_id` (rows of the run, and of its writers: the
    /// archive's records name a run's writers, `{run}-r{range}-{id}`, as well as the run).
    pub(crate) async fn forget_run_records(&self, run_id: &str, tables: &[&str]) -> Result<()> {
        let writers = format!("{run_id}-r%");
        for table in tables {
            let sql = format!(
                "DELETE FROM {table} WHERE run_id = {} OR run_id LIKE {}",
                self.db.p(1),
                self.db.p(2)
            );
            self.db
                .execute_with(&sql, &[run_id.into(), (&writers).into()])
                .await?;
        }
        Ok(())
    }

    /// The report (JSON) of the most recent finished run, with its id.
    pub async fn last_finished_run_report<R: DeserializeOwned>(
        &self,
    ) -> Result<Option<(String, R)>> {
        let rows = self
            .db
            .fetch(
                "SELECT run_id, report FROM strata_runs WHERE status = 'done' AND report IS NOT NULL ORDER BY finished_at DESC, run_id DESC LIMIT 1",
                &[],
                &[Col::Text; 2],
            )
            .await?;
        rows.into_iter()
            .next()
            .map(|r| Ok((r[0].text(), parse(&r[1].text(), "the last run's report")?)))
            .transpose()
    }

    /// Where a table stands within a run: None when the run has not started it (or recorded no
    /// plan to resume by). `P` is the range plan's type, `R` the report's.
    pub async fn table_state<P: DeserializeOwned, R: DeserializeOwned>(
        &self,
        run_id: &str,
        table: &str,
    ) -> Result<Option<TableState<P, R>>> {
        let sql = format!(
            "SELECT status, report FROM strata_table_runs WHERE run_id = {} AND table_name = {}",
            self.db.p(1),
            self.db.p(2)
        );
        let rows = self
            .db
            .fetch(&sql, &[run_id.into(), table.into()], &[Col::Text; 2])
            .await?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        let bad = |what: &str| {
            ControlError::Invalid(format!(
                "control database: table {table} of run {run_id}: {what}"
            ))
        };
        let json = row[1].opt_text();
        match (row[0].text().as_str(), json) {
            (TABLE_RUNNING, None) => Ok(None),
            (TABLE_RUNNING, Some(plan)) => Ok(Some(TableState::Running {
                plan: serde_json::from_str(&plan).map_err(|e| bad(&format!("range plan: {e}")))?,
            })),
            (TABLE_DONE, Some(report)) => Ok(Some(TableState::Done {
                report: serde_json::from_str(&report).map_err(|e| bad(&format!("report: {e}")))?,
            })),
            (status, _) => Err(bad(&format!("status {status:?}"))),
        }
    }

    /// Records where a table stands within a run, in one statement (the state it replaces and
    /// the new one are never both or neither recorded).
    pub async fn set_table_state<P: Serialize, R: Serialize>(
        &self,
        run_id: &str,
        table: &str,
        state: &TableState<P, R>,
    ) -> Result<()> {
        let (status, json) = match state {
            TableState::Running { plan } => (TABLE_RUNNING, serde_json::to_string(plan)),
            TableState::Done { report } => (TABLE_DONE, serde_json::to_string(report)),
        };
        let json = json.map_err(|e| ControlError::Invalid(format!("table {table}: {e}")))?;
        let sql = format!(
            "INSERT INTO strata_table_runs (run_id, table_name, status, report, updated_at) VALUES ({}) \
             ON CONFLICT (run_id, table_name) DO UPDATE SET status = excluded.status, report = excluded.report, updated_at = excluded.updated_at",
            self.db.ps(5)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    run_id.into(),
                    table.into(),
                    status.into(),
                    json.into(),
                    now().into(),
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
        let sql = format!(
            "SELECT policy_hash FROM strata_policy_versions WHERE policy_hash = {}",
            self.db.p(1)
        );
        if !self
            .db
            .fetch(&sql, &[hash.into()], &[Col::Text])
            .await?
            .is_empty()
        {
            return Ok(());
        }
        let sql = format!(
            "INSERT INTO strata_policy_versions (policy_hash, version, author, stored_at, policy_text) VALUES ({})",
            self.db.ps(5)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    hash.into(),
                    version.into(),
                    author.into(),
                    now().into(),
                    text.into(),
                ],
            )
            .await
            .map(|_| ())
    }

    /// Every stored policy version, newest first.
    pub async fn policy_versions(&self) -> Result<Vec<PolicyVersion>> {
        let rows = self
            .db
            .fetch(
                "SELECT policy_hash, version, author, stored_at, policy_text FROM strata_policy_versions ORDER BY stored_at DESC, policy_hash",
                &[],
                &[Col::Text; 5],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| PolicyVersion {
                policy_hash: r[0].text(),
                version: r[1].text(),
                author: r[2].text(),
                stored_at: r[3].text(),
                policy_text: r[4].text(),
            })
            .collect())
    }

    /// Saves a plan's report; returns the previous plan's, if any.
    pub async fn save_plan<R: Serialize + DeserializeOwned>(
        &self,
        policy_hash: &str,
        report: &R,
    ) -> Result<Option<R>> {
        // A previous plan this version cannot read (an older report format) is not compared;
        // a database that does not answer is an error.
        let previous = match self.latest_plan::<R>().await {
            Ok(plan) => plan.map(|p| p.report),
            Err(ControlError::Invalid(_)) => None,
            Err(e) => return Err(e),
        };
        let report = serde_json::to_string(report)
            .map_err(|e| ControlError::Invalid(format!("plan: {e}")))?;
        let sql = format!(
            "INSERT INTO strata_plans (plan_id, created_at, policy_hash, report) VALUES ({})",
            self.db.ps(4)
        );
        let id = format!(
            "plan-{}-{:04x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ"),
            rand::random::<u16>()
        );
        self.db
            .execute_with(
                &sql,
                &[
                    id.into(),
                    now().into(),
                    policy_hash.into(),
                    report.as_str().into(),
                ],
            )
            .await?;
        Ok(previous)
    }

    /// The `n` most recent plans, newest first (those this version cannot read left out).
    pub async fn recent_plans<R: DeserializeOwned>(&self, n: i64) -> Result<Vec<StoredPlan<R>>> {
        let sql = format!(
            "SELECT plan_id, created_at, report FROM strata_plans ORDER BY created_at DESC, plan_id DESC LIMIT {}",
            n.max(0)
        );
        let rows = self.db.fetch(&sql, &[], &[Col::Text; 3]).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                Some(StoredPlan {
                    plan_id: r[0].text(),
                    created_at: r[1].text(),
                    report: parse(&r[2].text(), "a plan").ok()?,
                })
            })
            .collect())
    }

    /// The most recent plan.
    pub async fn latest_plan<R: DeserializeOwned>(&self) -> Result<Option<StoredPlan<R>>> {
        let rows = self
            .db
            .fetch(
                "SELECT plan_id, created_at, report FROM strata_plans ORDER BY created_at DESC, plan_id DESC LIMIT 1",
                &[],
                &[Col::Text; 3],
            )
            .await?;
        rows.into_iter()
            .next()
            .map(|r| {
                Ok(StoredPlan {
                    plan_id: r[0].text(),
                    created_at: r[1].text(),
                    report: parse(&r[2].text(), "the latest plan")?,
                })
            })
            .transpose()
    }

    /// Places a legal hold; returns its id.
    pub async fn place_hold(&self, scope: &HoldScope, reason: &str, by: &str) -> Result<String> {
        if reason.trim().is_empty() || by.trim().is_empty() {
            return Err(ControlError::Invalid(
                "a legal hold needs who places it and why".into(),
            ));
        }
        // 64 random bits: holds placed in the same second (by a script, or through the API)
        // must not collide.
        let id = format!(
            "hold-{}-{:016x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            rand::random::<u64>()
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
        let sql = format!(
            "INSERT INTO strata_holds (hold_id, scope, patient, table_name, column_name, value, reason, placed_by, placed_at) VALUES ({})",
            self.db.ps(9)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    (&id).into(),
                    kind.into(),
                    patient.into(),
                    table.into(),
                    column.into(),
                    value.into(),
                    reason.into(),
                    by.into(),
                    now().into(),
                ],
            )
            .await?;
        Ok(id)
    }

    /// Releases a hold, recording who and why.
    pub async fn release_hold(&self, hold_id: &str, reason: &str, by: &str) -> Result<()> {
        if reason.trim().is_empty() || by.trim().is_empty() {
            return Err(ControlError::Invalid(
                "releasing a legal hold needs who releases it and why".into(),
            ));
        }
        let sql = format!(
            "UPDATE strata_holds SET released_by = {}, released_at = {}, release_reason = {} WHERE hold_id = {} AND released_at IS NULL",
            self.db.p(1),
            self.db.p(2),
            self.db.p(3),
            self.db.p(4)
        );
        let n = self
            .db
            .execute_with(
                &sql,
                &[by.into(), now().into(), reason.into(), hold_id.into()],
            )
            .await?;
        if n == 0 {
            return Err(ControlError::Invalid(format!(
                "no active legal hold {hold_id}"
            )));
        }
        Ok(())
    }

    /// Every hold, placed and released, oldest first.
    pub async fn holds(&self) -> Result<Vec<HoldRecord>> {
        let rows = self
            .db
            .fetch(
                "SELECT hold_id, scope, patient, table_name, column_name, value, reason, placed_by, placed_at, released_by, released_at, release_reason FROM strata_holds ORDER BY placed_at, hold_id",
                &[],
                &[Col::Text; 12],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let s = |i: usize| r[i].text();
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
                    released: r[10].opt_text().map(|at| (s(9), at, s(11))),
                }
            })
            .collect())
    }

    /// Records destroyed rows (replacing an earlier record of the same run and table).
    pub async fn record_destruction(&self, d: &DestructionRecord) -> Result<()> {
        let del = format!(
            "DELETE FROM strata_destructions WHERE run_id = {} AND table_name = {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&del, &[(&d.run_id).into(), (&d.table).into()])
            .await?;
        let sql = format!(
            "INSERT INTO strata_destructions (run_id, table_name, rows_destroyed, key_min, key_max, key_checksum, value_checksum, policy_version, policy_hash, destroyed_at) VALUES ({})",
            self.db.ps(10)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    (&d.run_id).into(),
                    (&d.table).into(),
                    (d.rows as i64).into(),
                    d.key_min.as_ref().into(),
                    d.key_max.as_ref().into(),
                    (&d.key_checksum).into(),
                    d.value_checksum.as_ref().into(),
                    (&d.policy_version).into(),
                    (&d.policy_hash).into(),
                    now().into(),
                ],
            )
            .await
            .map(|_| ())
    }

    /// Every destruction record, oldest first, with when it was made.
    pub async fn destructions(&self) -> Result<Vec<(DestructionRecord, String)>> {
        let rows = self
            .db
            .fetch(
                "SELECT run_id, table_name, rows_destroyed, key_min, key_max, key_checksum, policy_version, policy_hash, destroyed_at, value_checksum, void_reason FROM strata_destructions ORDER BY destroyed_at, run_id, table_name",
                &[],
                &{
                    let mut types = [Col::Text; 11];
                    types[2] = Col::Int;
                    types
                },
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    DestructionRecord {
                        run_id: r[0].text(),
                        table: r[1].text(),
                        rows: r[2].int().unwrap_or(0) as u64,
                        key_min: r[3].opt_text(),
                        key_max: r[4].opt_text(),
                        key_checksum: r[5].text(),
                        value_checksum: r[9].opt_text(),
                        void: r[10].opt_text(),
                        policy_version: r[6].text(),
                        policy_hash: r[7].text(),
                    },
                    r[8].text(),
                )
            })
            .collect())
    }

    /// Records the source snapshot a run (or a resumption of it) copies from. Change sync starts
    /// at the run's earliest WAL position.
    pub async fn record_snapshot(&self, run_id: &str, wal_lsn: &str) -> Result<()> {
        let sql = format!(
            "INSERT INTO strata_run_snapshots (run_id, wal_lsn, taken_at) VALUES ({})",
            self.db.ps(3)
        );
        self.db
            .execute_with(&sql, &[run_id.into(), wal_lsn.into(), now().into()])
            .await
            .map(|_| ())
    }

    /// The WAL positions of a run's snapshots, oldest first.
    pub async fn run_snapshots(&self, run_id: &str) -> Result<Vec<String>> {
        let sql = format!(
            "SELECT wal_lsn FROM strata_run_snapshots WHERE run_id = {} ORDER BY taken_at",
            self.db.p(1)
        );
        Ok(self
            .db
            .fetch(&sql, &[run_id.into()], &[Col::Text])
            .await?
            .into_iter()
            .filter_map(|r| r[0].opt_text())
            .collect())
    }

    /// Rows destroyed per table over all runs.
    pub async fn destroyed_rows(&self) -> Result<BTreeMap<String, u64>> {
        self.per_table("SELECT table_name, CAST(SUM(rows_destroyed) AS BIGINT) FROM strata_destructions WHERE void_reason IS NULL GROUP BY table_name").await
    }

    /// Runs a `SELECT table_name, <bigint>` query into a map.
    pub(crate) async fn per_table(&self, sql: &str) -> Result<BTreeMap<String, u64>> {
        let rows = self.db.fetch(sql, &[], &[Col::Text, Col::Int]).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| Some((r[0].opt_text()?, r[1].int()? as u64)))
            .collect())
    }

    /// Whether the database answers (for readiness checks).
    pub async fn ping(&self) -> Result<()> {
        self.db
            .fetch("SELECT 1", &[], &[Col::Int])
            .await
            .map(|_| ())
    }

    /// Closes the connection.
    pub async fn close(&self) {
        self.db.close().await
    }
}
