//! The audit log: one entry per API request, appended to a keyed hash chain.
//!
//! Every entry carries the HMAC-SHA256 (under the audit key, which is not stored in the
//! database) of its own fields and of the previous entry's hash, and entries are numbered
//! without gaps. [`AuditLog::verify`] walks the chain: an edited entry no longer matches its
//! hash, a deleted one leaves a gap in the numbers and breaks the next entry's link, an inserted
//! one cannot carry a valid hash without the key. A one-row head table holds the newest entry's
//! number and hash, so entries removed from the end are noticed too, unless the head was rewound
//! with them; export the head from time to time ([`AuditLog::head`]) to rule that out.
//!
//! Appends are group-committed: requests queue their entries and one writer appends whatever is
//! queued in a single transaction, then answers each request. A request is served only once its
//! entry is durable; if the log cannot be written, the caller fails closed.
//!
//! No PHI: entries name patients by key only; what was returned is described by counts and
//! object ids.

use crate::control::Control;
use crate::db::{Col, ControlDb};
use crate::error::{ControlError, Result};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_audit (
    seq BIGINT PRIMARY KEY,
    at TEXT NOT NULL,
    user_id TEXT NOT NULL,
    roles TEXT NOT NULL,
    purpose TEXT,
    patient TEXT,
    action TEXT NOT NULL,
    status BIGINT NOT NULL,
    outcome TEXT NOT NULL,
    break_glass TEXT,
    detail TEXT NOT NULL,
    client TEXT,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS strata_audit_patient ON strata_audit (patient, seq);
CREATE TABLE IF NOT EXISTS strata_audit_head (
    id BIGINT PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO strata_audit_head (id, seq, hash)
    VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000')
    ON CONFLICT (id) DO NOTHING;
";

/// The hash the first entry links to.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Entries appended in one transaction at most.
const MAX_BATCH: usize = 512;
/// Entries read per query when verifying or listing.
const PAGE: i64 = 5000;

/// The secret that keys the chain's hashes (at least 32 bytes). Kept outside the database, so
/// that whoever can write the table cannot forge a valid chain.
#[derive(Clone)]
pub struct AuditKey(Arc<Vec<u8>>);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(..)")
    }
}

impl AuditKey {
    /// A key from 64 or more hex digits.
    pub fn from_hex(hex_text: &str) -> Result<Self> {
        let bytes = hex::decode(hex_text.trim()).map_err(|_| {
            ControlError::Invalid("the audit key must be hex (64 digits or more)".into())
        })?;
        if bytes.len() < 32 {
            return Err(ControlError::Invalid(
                "the audit key must be at least 32 bytes (64 hex digits)".into(),
            ));
        }
        Ok(AuditKey(Arc::new(bytes)))
    }

    fn mac(&self, canonical: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(canonical.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// What happened to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Served.
    Allowed,
    /// Refused: no valid token, a role or scope that does not allow it, a rate limit.
    Denied,
    /// Failed: not found, bad request, integrity or internal error.
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Outcome {
        match s {
            "allowed" => Outcome::Allowed,
            "denied" => Outcome::Denied,
            _ => Outcome::Failed,
        }
    }
}

/// One request, as the API describes it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// The caller (the token's subject), or `-` when there was no valid token.
    pub user: String,
    /// The caller's roles, comma-separated.
    pub roles: String,
    /// The stated purpose of use.
    pub purpose: Option<String>,
    /// The patient key the request was about.
    pub patient: Option<String>,
    /// Method and route, e.g. `GET /v1/patients/{patient}/history`.
    pub action: String,
    /// The HTTP status returned.
    pub status: u16,
    /// Allowed, denied or failed.
    pub outcome: Outcome,
    /// The reason given to break the glass (a clinician reading outside their scope).
    pub break_glass: Option<String>,
    /// What was returned or asked: counts, object ids, filters (JSON; never row values; null
    /// when the request named nothing).
    #[schema(value_type = Option<Object>)]
    pub detail: serde_json::Value,
    /// The client's address.
    pub client: Option<String>,
}

/// An entry as stored.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditRecord {
    /// Its number: 1, 2, 3, ... without gaps.
    pub seq: i64,
    /// When it was appended (RFC 3339, UTC).
    pub at: String,
    /// The entry.
    #[serde(flatten)]
    pub entry: AuditEntry,
    /// The previous entry's hash.
    pub prev_hash: String,
    /// This entry's hash.
    pub hash: String,
}

/// The fields an entry's hash covers, in a fixed order, as JSON text: the values as stored
/// (verification hashes the stored text, so that an edit the types would hide, an unknown
/// outcome or an out-of-range status, still breaks the hash).
#[allow(clippy::too_many_arguments)]
fn canonical(
    seq: i64,
    at: &str,
    e: &AuditEntry,
    status: i64,
    outcome: &str,
    detail: &str,
    prev_hash: &str,
) -> String {
    serde_json::json!([
        seq,
        at,
        e.user,
        e.roles,
        e.purpose,
        e.patient,
        e.action,
        status,
        outcome,
        e.break_glass,
        detail,
        e.client,
        prev_hash
    ])
    .to_string()
}

/// A break in the chain, naming the entry.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditProblem {
    /// The entry concerned.
    pub seq: i64,
    /// What is wrong with it.
    pub problem: String,
}

/// What [`AuditLog::verify`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditVerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// The newest entry's number as the head records it.
    pub head_seq: i64,
    /// Every break found, oldest first; empty when the log is intact.
    pub problems: Vec<AuditProblem>,
}

impl AuditVerifyReport {
    /// Whether the log is intact.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Which entries to list.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only entries after this number (the cursor of the previous page).
    pub after_seq: Option<i64>,
    /// At most this many (capped at 1,000).
    pub limit: Option<i64>,
    /// Only this user's.
    pub user: Option<String>,
    /// Only about this patient.
    pub patient: Option<String>,
    /// Only with this outcome.
    pub outcome: Option<Outcome>,
    /// Only from this time on (RFC 3339 or YYYY-MM-DD).
    pub since: Option<String>,
    /// Only before this time.
    pub until: Option<String>,
    /// Only reads that broke the glass (the review list).
    pub break_glass_only: bool,
}

struct Pending {
    entry: AuditEntry,
    done: oneshot::Sender<Result<i64>>,
}

/// The audit log: appends (group-committed), lists and verifies.
#[derive(Clone)]
pub struct AuditLog {
    db: ControlDb,
    key: AuditKey,
    queue: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

/// Appends `batch` in one transaction after the head (locked on PostgreSQL, so that several
/// API replicas append to one chain). Returns the numbers given.
macro_rules! append_in_transaction {
    ($begin:expr, $lock:expr, $db:expr, $key:expr, $batch:expr) => {{
        let mut tx = $begin;
        let head: (i64, String) = sqlx::query_as(sqlx::AssertSqlSafe($lock))
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| ControlError::sql("audit head", e))?;
        let (mut seq, mut prev) = head;
        let insert = format!(
            "INSERT INTO strata_audit (seq, at, user_id, roles, purpose, patient, action, status, outcome, break_glass, detail, client, prev_hash, hash) VALUES ({})",
            $db.ps(14)
        );
        let mut seqs = Vec::with_capacity($batch.len());
        for e in $batch {
            seq += 1;
            let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let detail = e.detail.to_string();
            let hash = $key.mac(&canonical(
                seq,
                &at,
                e,
                i64::from(e.status),
                e.outcome.as_str(),
                &detail,
                &prev,
            ));
            sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
                .bind(seq)
                .bind(at)
                .bind(e.user.clone())
                .bind(e.roles.clone())
                .bind(e.purpose.clone())
                .bind(e.patient.clone())
                .bind(e.action.clone())
                .bind(e.status as i64)
                .bind(e.outcome.as_str())
                .bind(e.break_glass.clone())
                .bind(detail)
                .bind(e.client.clone())
                .bind(prev.clone())
                .bind(hash.clone())
                .execute(&mut *tx)
                .await
                .map_err(|e| ControlError::sql("audit append", e))?;
            seqs.push(seq);
            prev = hash;
        }
        let update = format!(
            "UPDATE strata_audit_head SET seq = {}, hash = {} WHERE id = 1",
            $db.p(1),
            $db.p(2)
        );
        sqlx::query(sqlx::AssertSqlSafe(update))
            .bind(seq)
            .bind(prev)
            .execute(&mut *tx)
            .await
            .map_err(|e| ControlError::sql("audit head", e))?;
        tx.commit()
            .await
            .map_err(|e| ControlError::sql("audit commit", e))?;
        Ok::<_, ControlError>(seqs)
    }};
}

async fn append_batch(db: &ControlDb, key: &AuditKey, batch: &[&AuditEntry]) -> Result<Vec<i64>> {
    match db {
        ControlDb::Postgres(pool) => append_in_transaction!(
            pool.begin()
                .await
                .map_err(|e| ControlError::sql("audit begin", e))?,
            "SELECT seq, hash FROM strata_audit_head WHERE id = 1 FOR UPDATE",
            db,
            key,
            batch
        ),
        ControlDb::Sqlite(pool) => append_in_transaction!(
            pool.begin_with("BEGIN IMMEDIATE")
                .await
                .map_err(|e| ControlError::sql("audit begin", e))?,
            "SELECT seq, hash FROM strata_audit_head WHERE id = 1",
            db,
            key,
            batch
        ),
    }
}

/// The writer: takes what is queued, appends it in one transaction, answers each request.
async fn write_queued(db: ControlDb, key: AuditKey, mut queue: mpsc::Receiver<Pending>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let entries: Vec<&AuditEntry> = batch.iter().map(|p| &p.entry).collect();
        match append_batch(&db, &key, &entries).await {
            Ok(seqs) => {
                for (p, seq) in batch.into_iter().zip(seqs) {
                    let _ = p.done.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, entries = batch.len(), "audit append failed");
                for p in batch {
                    let _ = p.done.send(Err(ControlError::AuditUnavailable(
                        "the entry could not be written".into(),
                    )));
                }
            }
        }
    }
}

fn record(r: &[crate::db::Cell]) -> AuditRecord {
    AuditRecord {
        seq: r[0].int().unwrap_or(0),
        at: r[1].text(),
        entry: AuditEntry {
            user: r[2].text(),
            roles: r[3].text(),
            purpose: r[4].opt_text(),
            patient: r[5].opt_text(),
            action: r[6].text(),
            status: r[7].int().unwrap_or(0) as u16,
            outcome: Outcome::parse(&r[8].text()),
            break_glass: r[9].opt_text(),
            detail: serde_json::from_str(&r[10].text()).unwrap_or(serde_json::Value::Null),
            client: r[11].opt_text(),
        },
        prev_hash: r[12].text(),
        hash: r[13].text(),
    }
}

const COLUMNS: &str =
    "seq, at, user_id, roles, purpose, patient, action, status, outcome, break_glass, detail, client, prev_hash, hash";
/// Every column is text but `seq` and `status`.
const COLUMN_TYPES: [Col; 14] = {
    let mut types = [Col::Text; 14];
    types[0] = Col::Int;
    types[7] = Col::Int;
    types
};

impl AuditLog {
    /// The audit log of `control`, keyed by `key`. Starts the writer task (on the current
    /// tokio runtime).
    pub fn open(control: &Control, key: AuditKey) -> Self {
        let (queue, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(write_queued(control.db.clone(), key.clone(), rx));
        AuditLog {
            db: control.db.clone(),
            key,
            queue,
        }
    }

    /// Appends an entry and waits until it is durable; returns its number. An error means the
    /// request it describes must not be served.
    pub async fn append(&self, entry: AuditEntry) -> Result<i64> {
        let (done, answer) = oneshot::channel();
        self.queue
            .send(Pending { entry, done })
            .await
            .map_err(|_| ControlError::AuditUnavailable("the audit writer stopped".into()))?;
        answer
            .await
            .map_err(|_| ControlError::AuditUnavailable("the audit writer stopped".into()))?
    }

    /// The head: the newest entry's number and hash.
    pub async fn head(&self) -> Result<(i64, String)> {
        let rows = self
            .db
            .fetch(
                "SELECT seq, hash FROM strata_audit_head WHERE id = 1",
                &[],
                &[Col::Int, Col::Text],
            )
            .await?;
        Ok(rows
            .first()
            .map(|r| (r[0].int().unwrap_or(0), r[1].text()))
            .unwrap_or((0, GENESIS.to_string())))
    }

    /// Entries matching `q`, oldest first.
    pub async fn list(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let mut conditions = vec![format!("seq > {}", self.db.p(1))];
        let mut params = vec![q.after_seq.unwrap_or(0).into()];
        let mut add = |column: &str, op: &str, value: Option<String>| {
            if let Some(v) = value {
                params.push(v.into());
                conditions.push(format!("{column} {op} {}", self.db.p(params.len())));
            }
        };
        add("user_id", "=", q.user.clone());
        add("patient", "=", q.patient.clone());
        add("outcome", "=", q.outcome.map(|o| o.as_str().to_string()));
        add("at", ">=", q.since.clone());
        add("at", "<", q.until.clone());
        if q.break_glass_only {
            conditions.push("break_glass IS NOT NULL".into());
        }
        let limit = q.limit.unwrap_or(100).clamp(1, 1000);
        let sql = format!(
            "SELECT {COLUMNS} FROM strata_audit WHERE {} ORDER BY seq LIMIT {limit}",
            conditions.join(" AND ")
        );
        let rows = self.db.fetch(&sql, &params, &COLUMN_TYPES).await?;
        Ok(rows.iter().map(|r| record(r)).collect())
    }

    /// Walks the whole chain and reports every break, naming the entry.
    pub async fn verify(&self) -> Result<AuditVerifyReport> {
        let (head_seq, head_hash) = self.head().await?;
        let mut problems = Vec::new();
        let mut entries = 0u64;
        let mut expected_seq = 1i64;
        let mut prev_hash = GENESIS.to_string();
        let sql = format!(
            "SELECT {COLUMNS} FROM strata_audit WHERE seq >= {} ORDER BY seq LIMIT {PAGE}",
            self.db.p(1)
        );
        loop {
            let rows = self
                .db
                .fetch(&sql, &[expected_seq.into()], &COLUMN_TYPES)
                .await?;
            if rows.is_empty() {
                break;
            }
            for r in &rows {
                let rec = record(r);
                entries += 1;
                if rec.seq != expected_seq {
                    let missing = if rec.seq == expected_seq + 1 {
                        format!("entry {expected_seq} is missing")
                    } else {
                        format!("entries {expected_seq} to {} are missing", rec.seq - 1)
                    };
                    problems.push(AuditProblem {
                        seq: expected_seq,
                        problem: format!("{missing} (deleted)"),
                    });
                }
                let own = self.key.mac(&canonical(
                    rec.seq,
                    &rec.at,
                    &rec.entry,
                    r[7].int().unwrap_or(-1),
                    &r[8].text(),
                    &r[10].text(),
                    &rec.prev_hash,
                ));
                if own != rec.hash {
                    problems.push(AuditProblem {
                        seq: rec.seq,
                        problem: "its content does not match its hash (edited, or inserted without the key)".into(),
                    });
                } else if rec.prev_hash != prev_hash && rec.seq == expected_seq {
                    problems.push(AuditProblem {
                        seq: rec.seq,
                        problem: format!(
                            "it does not link to entry {} (an entry before it was replaced)",
                            rec.seq - 1
                        ),
                    });
                }
                prev_hash = rec.hash.clone();
                expected_seq = rec.seq + 1;
            }
        }
        let last = expected_seq - 1;
        if last != head_seq || (last > 0 && prev_hash != head_hash) {
            problems.push(AuditProblem {
                seq: head_seq.max(last),
                problem: format!(
                    "the log ends at entry {last} but its head records entry {head_seq} (entries deleted from the end, or the head edited)"
                ),
            });
        }
        Ok(AuditVerifyReport {
            entries,
            head_seq,
            problems,
        })
    }
}
