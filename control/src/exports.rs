//! Researchers' export jobs, cohorts (groups of patients) and the client assertions already
//! used: what `strata serve` needs to run exports that survive its restart.
//!
//! A job is `running` until it ends `done` (with its manifest and the time its files expire),
//! `failed` (with the reason, never row values), `cancelled` or, once its files are deleted,
//! `expired`. The server running a job beats its heartbeat; a job `running` whose heartbeat
//! stopped was interrupted (its server stopped): the first server to claim it runs it again
//! (its `attempts` counting up) or marks it failed — one claim wins, whatever the replicas.

use crate::control::{now, Control};
use crate::db::{Col, Param};
use crate::error::Result;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_exports (
    export_id TEXT PRIMARY KEY,
    requested_by TEXT NOT NULL,
    profile TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    manifest TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS strata_groups (
    group_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at TEXT NOT NULL,
    criteria TEXT NOT NULL,
    members TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS strata_client_assertions (
    client_id TEXT NOT NULL,
    jti TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (client_id, jti)
);
";

/// Columns added to `strata_exports` after it was first created (added when missing).
const EXPORT_COLUMNS: [(&str, &str); 5] = [
    ("kind", "TEXT"),
    ("progress", "TEXT"),
    ("expires_at", "TEXT"),
    ("attempts", "BIGINT"),
    ("heartbeat_at", "TEXT"),
];

/// A heartbeat's time: fixed width, so that times compare as text.
pub(crate) fn beat_time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

const EXPORT_FIELDS: &str = "export_id, requested_by, profile, request, status, created_at, finished_at, manifest, error, kind, progress, expires_at, CAST(COALESCE(attempts, 1) AS BIGINT)";

/// A researcher's export job as recorded.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct ExportRecord {
    /// Its id.
    pub export_id: String,
    /// Who asked for it (token subject, or the system client's id).
    pub requested_by: String,
    /// The export profile it follows.
    pub profile: String,
    /// The request (JSON).
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
    /// `running`, `done`, `failed`, `cancelled` or `expired`.
    pub status: String,
    /// When it was asked for (RFC 3339).
    pub created_at: String,
    /// When it ended.
    pub finished_at: Option<String>,
    /// Its manifest when done (JSON: files, rows, SHA-256).
    #[schema(value_type = Option<Object>)]
    pub manifest: Option<serde_json::Value>,
    /// Why it failed (no row values).
    pub error: Option<String>,
    /// `parquet` (a `/v1/exports` job) or `fhir` (a FHIR Bulk Data `$export`).
    pub kind: String,
    /// How far it got, while running (e.g. "3 of 7 tables").
    pub progress: Option<String>,
    /// When its files are deleted (RFC 3339), once done.
    pub expires_at: Option<String>,
    /// How many times it was started (a restart of the server runs a running job again).
    pub attempts: i64,
}

/// A cohort: a stored list of patients, for `Group/{id}/$export`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GroupRecord {
    /// Its id.
    pub group_id: String,
    /// Its name.
    pub name: String,
    /// Who created it.
    pub created_by: String,
    /// When (RFC 3339).
    pub created_at: String,
    /// How it was made (JSON: the patients listed, or the criteria a request gave).
    pub criteria: serde_json::Value,
    /// The patient keys (never shown to researchers).
    #[serde(skip)]
    pub members: Vec<String>,
    /// How many patients.
    pub size: usize,
}

fn json(t: Option<String>) -> Option<serde_json::Value> {
    t.and_then(|t| serde_json::from_str(&t).ok())
}

impl Control {
    /// Creates the export, group and assertion tables, and adds columns older versions lack.
    pub(crate) async fn open_exports(&self) -> Result<()> {
        self.db.execute(SCHEMA).await?;
        let have = self.db.columns_of("strata_exports").await?;
        for (column, kind) in EXPORT_COLUMNS {
            if !have.iter().any(|c| c == column) {
                self.db
                    .execute(&format!(
                        "ALTER TABLE strata_exports ADD COLUMN {column} {kind}"
                    ))
                    .await?;
            }
        }
        Ok(())
    }

    /// Records a new export job (status `running`, first attempt); returns its id.
    pub async fn start_export(
        &self,
        requested_by: &str,
        kind: &str,
        profile: &str,
        request: &serde_json::Value,
    ) -> Result<String> {
        let id = format!(
            "export-{}-{:016x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            rand::random::<u64>()
        );
        let sql = format!(
            "INSERT INTO strata_exports (export_id, requested_by, profile, request, status, created_at, kind, attempts, heartbeat_at) VALUES ({})",
            self.db.ps(9)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    (&id).into(),
                    requested_by.into(),
                    profile.into(),
                    request.to_string().into(),
                    "running".into(),
                    now().into(),
                    kind.into(),
                    Param::Int(1),
                    beat_time(chrono::Utc::now()).into(),
                ],
            )
            .await?;
        Ok(id)
    }

    /// Beats a running job's heartbeat; returns its status (a job cancelled meanwhile stops).
    pub async fn beat_export(&self, export_id: &str) -> Result<Option<String>> {
        let sql = format!(
            "UPDATE strata_exports SET heartbeat_at = {} WHERE export_id = {} AND status = 'running'",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(
                &sql,
                &[beat_time(chrono::Utc::now()).into(), export_id.into()],
            )
            .await?;
        Ok(self.export(export_id).await?.map(|e| e.status))
    }

    /// Claims a running job whose heartbeat is older than `stale_before` (its server stopped):
    /// beats it and counts one more attempt. True for the one caller whose claim wins.
    pub async fn claim_export(
        &self,
        export_id: &str,
        stale_before: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool> {
        let sql = format!(
            "UPDATE strata_exports SET heartbeat_at = {}, attempts = COALESCE(attempts, 1) + 1, progress = NULL \
             WHERE export_id = {} AND status = 'running' AND (heartbeat_at IS NULL OR heartbeat_at < {})",
            self.db.p(1),
            self.db.p(2),
            self.db.p(3)
        );
        let n = self
            .db
            .execute_with(
                &sql,
                &[
                    beat_time(chrono::Utc::now()).into(),
                    export_id.into(),
                    beat_time(stale_before).into(),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// Ends a running export job: `done` with its manifest and the time its files expire, or
    /// `failed` with the reason. A job no longer running (cancelled meanwhile) is left as it
    /// is; returns whether the job was ended here.
    pub async fn finish_export(
        &self,
        export_id: &str,
        outcome: std::result::Result<(&serde_json::Value, &str), &str>,
    ) -> Result<bool> {
        let sql = format!(
            "UPDATE strata_exports SET status = {}, finished_at = {}, manifest = {}, error = {}, expires_at = {}, progress = NULL WHERE export_id = {} AND status = 'running'",
            self.db.p(1),
            self.db.p(2),
            self.db.p(3),
            self.db.p(4),
            self.db.p(5),
            self.db.p(6)
        );
        let (status, manifest, error, expires) = match outcome {
            Ok((m, expires)) => (
                "done",
                Param::Text(m.to_string()),
                Param::NullText,
                Param::Text(expires.into()),
            ),
            Err(e) => (
                "failed",
                Param::NullText,
                Param::Text(e.into()),
                Param::NullText,
            ),
        };
        let changed = self
            .db
            .execute_with(
                &sql,
                &[
                    status.into(),
                    now().into(),
                    manifest,
                    error,
                    expires,
                    export_id.into(),
                ],
            )
            .await?;
        Ok(changed == 1)
    }

    /// Notes how far a running job got.
    pub async fn export_progress(&self, export_id: &str, progress: &str) -> Result<()> {
        let sql = format!(
            "UPDATE strata_exports SET progress = {} WHERE export_id = {} AND status = 'running'",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&sql, &[progress.into(), export_id.into()])
            .await
            .map(|_| ())
    }

    /// Cancels a job that has not ended (its files are deleted by whoever runs it); returns
    /// whether it was running.
    pub async fn cancel_export(&self, export_id: &str) -> Result<bool> {
        self.set_export_status(export_id, "running", "cancelled")
            .await
    }

    /// Marks a finished job's files deleted.
    pub async fn expire_export(&self, export_id: &str) -> Result<bool> {
        self.set_export_status(export_id, "done", "expired").await
    }

    async fn set_export_status(&self, export_id: &str, from: &str, to: &str) -> Result<bool> {
        let sql = format!(
            "UPDATE strata_exports SET status = {}, finished_at = {} WHERE export_id = {} AND status = {}",
            self.db.p(1),
            self.db.p(2),
            self.db.p(3),
            self.db.p(4)
        );
        let n = self
            .db
            .execute_with(
                &sql,
                &[to.into(), now().into(), export_id.into(), from.into()],
            )
            .await?;
        Ok(n == 1)
    }

    /// An export job by id.
    pub async fn export(&self, export_id: &str) -> Result<Option<ExportRecord>> {
        let sql = format!(
            "SELECT {EXPORT_FIELDS} FROM strata_exports WHERE export_id = {}",
            self.db.p(1)
        );
        Ok(self.exports_where(&sql, &[export_id.into()]).await?.pop())
    }

    /// Jobs in `status` (oldest first).
    pub async fn exports_with_status(&self, status: &str) -> Result<Vec<ExportRecord>> {
        let sql = format!(
            "SELECT {EXPORT_FIELDS} FROM strata_exports WHERE status = {} ORDER BY created_at, export_id",
            self.db.p(1)
        );
        self.exports_where(&sql, &[status.into()]).await
    }

    async fn exports_where(&self, sql: &str, params: &[Param]) -> Result<Vec<ExportRecord>> {
        let mut cols = [Col::Text; 13];
        cols[12] = Col::Int;
        let rows = self.db.fetch(sql, params, &cols).await?;
        Ok(rows
            .into_iter()
            .map(|r| ExportRecord {
                export_id: r[0].text(),
                requested_by: r[1].text(),
                profile: r[2].text(),
                request: json(r[3].opt_text()).unwrap_or(serde_json::Value::Null),
                status: r[4].text(),
                created_at: r[5].text(),
                finished_at: r[6].opt_text(),
                manifest: json(r[7].opt_text()),
                error: r[8].opt_text(),
                kind: r[9].opt_text().unwrap_or_else(|| "parquet".into()),
                progress: r[10].opt_text(),
                expires_at: r[11].opt_text(),
                attempts: r[12].int().unwrap_or(1),
            })
            .collect())
    }

    /// Stores a cohort; returns its id.
    pub async fn create_group(
        &self,
        name: &str,
        created_by: &str,
        criteria: &serde_json::Value,
        members: &[String],
    ) -> Result<String> {
        let id = format!("group-{:016x}", rand::random::<u64>());
        let sql = format!(
            "INSERT INTO strata_groups (group_id, name, created_by, created_at, criteria, members) VALUES ({})",
            self.db.ps(6)
        );
        let members = serde_json::to_string(members).expect("strings serialize");
        self.db
            .execute_with(
                &sql,
                &[
                    (&id).into(),
                    name.into(),
                    created_by.into(),
                    now().into(),
                    criteria.to_string().into(),
                    members.into(),
                ],
            )
            .await?;
        Ok(id)
    }

    /// Every cohort, newest first (`id`: only that one).
    pub async fn groups(&self, id: Option<&str>) -> Result<Vec<GroupRecord>> {
        let (filter, params) = match id {
            Some(id) => (
                format!("WHERE group_id = {}", self.db.p(1)),
                vec![id.into()],
            ),
            None => (String::new(), vec![]),
        };
        let sql = format!(
            "SELECT group_id, name, created_by, created_at, criteria, members FROM strata_groups {filter} ORDER BY created_at DESC, group_id"
        );
        let rows = self.db.fetch(&sql, &params, &[Col::Text; 6]).await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let members: Vec<String> = json(r[5].opt_text())
                    .and_then(|v| serde_json::from_value(v).ok())
                    .unwrap_or_default();
                GroupRecord {
                    group_id: r[0].text(),
                    name: r[1].text(),
                    created_by: r[2].text(),
                    created_at: r[3].text(),
                    criteria: json(r[4].opt_text()).unwrap_or(serde_json::Value::Null),
                    size: members.len(),
                    members,
                }
            })
            .collect())
    }

    /// Remembers a client assertion's `jti` until `expires_at` (seconds since the epoch);
    /// false when the client used it before (a replay). Forgets assertions that expired.
    pub async fn remember_assertion(
        &self,
        client_id: &str,
        jti: &str,
        expires_at: i64,
    ) -> Result<bool> {
        let now = chrono::Utc::now().timestamp();
        let forget = format!(
            "DELETE FROM strata_client_assertions WHERE expires_at < {}",
            self.db.p(1)
        );
        self.db
            .execute_with(&forget, &[Param::Int(now - 600)])
            .await?;
        let sql = format!(
            "INSERT INTO strata_client_assertions (client_id, jti, expires_at) VALUES ({}) ON CONFLICT DO NOTHING",
            self.db.ps(3)
        );
        let n = self
            .db
            .execute_with(
                &sql,
                &[client_id.into(), jti.into(), Param::Int(expires_at)],
            )
            .await?;
        Ok(n == 1)
    }
}
