//! Destruction as records managers do it, in two steps: a pass (`strata archive retain`,
//! `strata tier`) first files the list of records it would destroy as a pending request; a
//! records manager other than the one who requested it approves (or rejects) it; only then
//! does a pass destroy, and it records the certificate it signed. Approval is by list: what a
//! pass destroys is at most what was approved (a record held since is kept).

use crate::control::{now, Control};
use crate::db::{Col, Param};
use crate::error::{ControlError, Result};
use serde::{Deserialize, Serialize};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_destruction_requests (
    request_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    policy_hash TEXT NOT NULL,
    summary TEXT NOT NULL,
    status TEXT NOT NULL,
    decided_by TEXT,
    decided_at TEXT,
    decision_note TEXT,
    certificate TEXT
);
";

/// Where a request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    /// Filed, waiting for a records manager's decision: nothing is destroyed.
    Pending,
    /// Approved by a records manager other than the requester: the next pass destroys it.
    Approved,
    /// Rejected: nothing of it is destroyed.
    Rejected,
    /// Destroyed; its certificate is recorded.
    Done,
}

impl RequestStatus {
    fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "pending",
            RequestStatus::Approved => "approved",
            RequestStatus::Rejected => "rejected",
            RequestStatus::Done => "done",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "approved" => RequestStatus::Approved,
            "rejected" => RequestStatus::Rejected,
            "done" => RequestStatus::Done,
            _ => RequestStatus::Pending,
        }
    }
}

/// A pending (or decided) destruction list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DestructionRequest {
    /// Its id.
    pub request_id: String,
    /// What pass filed it: `retain` (archived records) or `tier` (operational ones).
    pub kind: String,
    /// Who requested it.
    pub requested_by: String,
    /// When (RFC 3339).
    pub requested_at: String,
    /// The policy version and hash that found the records past retention.
    pub policy_version: String,
    /// Its hash.
    pub policy_hash: String,
    /// The list as JSON, in the pass's own form (per table: counts, key ranges, checksums,
    /// the records' keys): what is approved.
    pub summary: serde_json::Value,
    /// Where it stands.
    pub status: RequestStatus,
    /// Who approved or rejected it, when, and their note.
    pub decision: Option<(String, String, String)>,
    /// The signed certificate of what was destroyed, once done (JSON).
    pub certificate: Option<serde_json::Value>,
}

impl Control {
    /// Files a destruction list for approval; returns its id.
    pub async fn request_destruction(
        &self,
        kind: &str,
        requested_by: &str,
        policy: (&str, &str),
        summary: &serde_json::Value,
    ) -> Result<String> {
        if requested_by.trim().is_empty() {
            return Err(ControlError::Invalid(
                "a destruction request names who requests it".into(),
            ));
        }
        let id = format!(
            "destroy-{}-{:08x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
            rand::random::<u32>()
        );
        let sql = format!(
            "INSERT INTO strata_destruction_requests (request_id, kind, requested_by, requested_at, policy_version, policy_hash, summary, status) VALUES ({})",
            self.db.ps(8)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    (&id).into(),
                    kind.into(),
                    requested_by.into(),
                    now().into(),
                    policy.0.into(),
                    policy.1.into(),
                    summary.to_string().into(),
                    RequestStatus::Pending.as_str().into(),
                ],
            )
            .await?;
        Ok(id)
    }

    /// A records manager's decision on a pending request: approved or rejected, by `by`, who
    /// must not be the requester (four eyes).
    pub async fn decide_destruction(
        &self,
        request_id: &str,
        by: &str,
        approve: bool,
        note: &str,
    ) -> Result<DestructionRequest> {
        let request = self
            .destruction_request(request_id)
            .await?
            .ok_or_else(|| ControlError::Invalid(format!("no destruction request {request_id}")))?;
        if by.trim().is_empty() {
            return Err(ControlError::Invalid(
                "a decision names the records manager who makes it".into(),
            ));
        }
        if same_person(by, &request.requested_by) {
            return Err(ControlError::Invalid(format!(
                "{by} requested {request_id}: another records manager must decide it (four eyes)"
            )));
        }
        if request.status != RequestStatus::Pending {
            return Err(ControlError::Invalid(format!(
                "{request_id} is {}, not pending",
                request.status.as_str()
            )));
        }
        let status = if approve {
            RequestStatus::Approved
        } else {
            RequestStatus::Rejected
        };
        let sql = format!(
            "UPDATE strata_destruction_requests SET status = {}, decided_by = {}, decided_at = {}, decision_note = {} WHERE request_id = {} AND status = 'pending'",
            self.db.p(1),
            self.db.p(2),
            self.db.p(3),
            self.db.p(4),
            self.db.p(5)
        );
        let n = self
            .db
            .execute_with(
                &sql,
                &[
                    status.as_str().into(),
                    by.into(),
                    now().into(),
                    note.into(),
                    request_id.into(),
                ],
            )
            .await?;
        if n == 0 {
            return Err(ControlError::Invalid(format!(
                "{request_id} was decided meanwhile"
            )));
        }
        self.destruction_request(request_id)
            .await?
            .ok_or_else(|| ControlError::Invalid(format!("no destruction request {request_id}")))
    }

    /// Records that an approved request was carried out, with its certificate.
    pub async fn complete_destruction(
        &self,
        request_id: &str,
        certificate: &serde_json::Value,
    ) -> Result<()> {
        let sql = format!(
            "UPDATE strata_destruction_requests SET status = 'done', certificate = {} WHERE request_id = {} AND status IN ('approved', 'done')",
            self.db.p(1),
            self.db.p(2)
        );
        let n = self
            .db
            .execute_with(&sql, &[certificate.to_string().into(), request_id.into()])
            .await?;
        if n == 0 {
            return Err(ControlError::Invalid(format!(
                "{request_id} is not approved: nothing may be destroyed"
            )));
        }
        Ok(())
    }

    /// One request.
    pub async fn destruction_request(
        &self,
        request_id: &str,
    ) -> Result<Option<DestructionRequest>> {
        let sql = format!("{SELECT} WHERE request_id = {}", self.db.p(1));
        Ok(self
            .db
            .fetch(&sql, &[Param::from(request_id)], &[Col::Text; 12])
            .await?
            .into_iter()
            .next()
            .map(request_of))
    }

    /// Every request, newest first.
    pub async fn destruction_requests(&self) -> Result<Vec<DestructionRequest>> {
        let sql = format!("{SELECT} ORDER BY requested_at DESC, request_id DESC");
        Ok(self
            .db
            .fetch(&sql, &[], &[Col::Text; 12])
            .await?
            .into_iter()
            .map(request_of)
            .collect())
    }
}

/// Whether two names of users are the same person's (names compared trimmed and without case:
/// `Alice` cannot approve what `alice ` requested).
pub fn same_person(a: &str, b: &str) -> bool {
    a.trim().to_lowercase() == b.trim().to_lowercase()
}

const SELECT: &str = "SELECT request_id, kind, requested_by, requested_at, policy_version, policy_hash, summary, status, decided_by, decided_at, decision_note, certificate FROM strata_destruction_requests";

fn request_of(r: Vec<crate::db::Cell>) -> DestructionRequest {
    let json = |s: String| serde_json::from_str(&s).unwrap_or(serde_json::Value::Null);
    DestructionRequest {
        request_id: r[0].text(),
        kind: r[1].text(),
        requested_by: r[2].text(),
        requested_at: r[3].text(),
        policy_version: r[4].text(),
        policy_hash: r[5].text(),
        summary: json(r[6].text()),
        status: RequestStatus::parse(&r[7].text()),
        decision: r[9].opt_text().map(|at| (r[8].text(), at, r[10].text())),
        certificate: r[11].opt_text().map(json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps, four eyes: the requester cannot approve; another records manager can, once;
    /// only an approved request can be completed.
    #[tokio::test]
    async fn a_destruction_needs_another_records_managers_approval() {
        let dir = tempfile::tempdir().unwrap();
        let control = Control::open(&format!("sqlite://{}", dir.path().join("c.db").display()))
            .await
            .unwrap();
        let summary = serde_json::json!({"tables": {"visits": {"rows": 3}}});
        let id = control
            .request_destruction("retain", "rm-alice", ("7", "abc"), &summary)
            .await
            .unwrap();
        let pending = control.destruction_request(&id).await.unwrap().unwrap();
        assert_eq!(pending.status, RequestStatus::Pending);
        assert_eq!(pending.summary, summary);
        let cert = serde_json::json!({"signed": true});
        assert!(control.complete_destruction(&id, &cert).await.is_err());
        let err = control
            .decide_destruction(&id, " RM-Alice", true, "mine")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("four eyes"), "{err}");
        let approved = control
            .decide_destruction(&id, "rm-bob", true, "checked the list")
            .await
            .unwrap();
        assert_eq!(approved.status, RequestStatus::Approved);
        assert_eq!(approved.decision.as_ref().unwrap().0, "rm-bob");
        assert!(control
            .decide_destruction(&id, "rm-carol", false, "too late")
            .await
            .is_err());
        control.complete_destruction(&id, &cert).await.unwrap();
        let done = control.destruction_requests().await.unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, RequestStatus::Done);
        assert_eq!(done[0].certificate, Some(cert));
        // A rejected list is never destroyed.
        let other = control
            .request_destruction("tier", "rm-alice", ("7", "abc"), &summary)
            .await
            .unwrap();
        control
            .decide_destruction(&other, "rm-bob", false, "hold pending")
            .await
            .unwrap();
        assert!(control
            .complete_destruction(&other, &serde_json::json!({}))
            .await
            .is_err());
    }
}
