//! The auditor's routes: the hash-chained audit log, its verification, and a patient's
//! accounting of disclosures. Only auditors and administrators reach them (a route layer).

use super::{reply, ApiQuery, ErrorBody, QueryShape, Refusals};
use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use strata_control::{AuditProblem, AuditQuery, AuditRecord, Outcome};

impl QueryShape for AuditParams {
    const PARAMETERS: &'static str =
        "after, limit, user, patient, outcome, since, until, break_glass";
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct AuditParams {
    /// The cursor: entries after this number.
    after: Option<i64>,
    limit: Option<i64>,
    user: Option<String>,
    patient: Option<String>,
    /// allowed, denied or failed.
    #[param(value_type = Option<String>)]
    outcome: Option<Outcome>,
    since: Option<String>,
    until: Option<String>,
    /// Only reads that broke the glass (the review list).
    #[serde(default)]
    break_glass: bool,
}

/// A page of the audit log.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AuditPage {
    /// Oldest first.
    entries: Vec<AuditRecord>,
    /// The `after` of the next page, when this one is full.
    next: Option<i64>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "auditor", params(AuditParams),
    responses((status = 200, description = "Entries oldest first, with the cursor of the next page", body = AuditPage),
        (status = 400, description = "Bad query", body = ErrorBody), Refusals))]
pub(super) async fn audit_list(
    State(state): State<AppState>,
    ApiQuery(p): ApiQuery<AuditParams>,
) -> Result<Response, ApiError> {
    let limit = p.limit.unwrap_or(100).clamp(1, 1000);
    let q = AuditQuery {
        after_seq: p.after,
        limit: Some(limit),
        user: p.user,
        patient: p.patient,
        outcome: p.outcome,
        since: p.since,
        until: p.until,
        break_glass_only: p.break_glass,
    };
    let entries = state.audit.list(&q).await?;
    let next = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    let detail = json!({ "entries": entries.len() });
    Ok(reply(Json(AuditPage { entries, next }), detail))
}

/// What a walk of the hash chain found.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AuditVerification {
    /// Whether the chain is intact.
    ok: bool,
    /// Entries checked.
    entries: u64,
    /// The newest entry's number as the head records it.
    head: i64,
    /// Every break, oldest first.
    problems: Vec<AuditProblem>,
}

#[utoipa::path(get, path = "/v1/audit/verify", tag = "auditor",
    responses((status = 200, description = "Whether the hash chain is intact, and every break with its entry", body = AuditVerification), Refusals))]
pub(super) async fn audit_verify(State(state): State<AppState>) -> Result<Response, ApiError> {
    let report = state.audit.verify().await?;
    let detail = json!({ "entries": report.entries, "problems": report.problems.len() });
    Ok(reply(
        Json(AuditVerification {
            ok: report.ok(),
            entries: report.entries,
            head: report.head_seq,
            problems: report.problems,
        }),
        detail,
    ))
}

impl QueryShape for DisclosureParams {
    const PARAMETERS: &'static str = "after, limit, since, until";
}

/// Query of the accounting of disclosures.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct DisclosureParams {
    after: Option<i64>,
    limit: Option<i64>,
    since: Option<String>,
    until: Option<String>,
}

/// A patient's accounting of disclosures (a page of it).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Disclosures {
    patient: String,
    /// Oldest first.
    disclosures: Vec<Disclosure>,
    /// The `after` of the next page, when this one is full.
    next: Option<i64>,
}

/// One served read of the patient's data.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Disclosure {
    /// When (RFC 3339, UTC).
    at: String,
    /// Who.
    user: String,
    /// Their roles, comma-separated.
    roles: String,
    /// The purpose of use they stated.
    purpose: Option<String>,
    /// Method and route.
    action: String,
    /// What was returned (counts, object ids; never row values).
    #[schema(value_type = Option<Object>)]
    detail: serde_json::Value,
    /// The reason given to break the glass, if it was broken.
    break_glass: Option<String>,
    /// The audit entry's number.
    audit_entry: i64,
}

/// Whether an audited entry served the patient's data: the API's reads and the viewer's (a
/// chart, a document, a print) that answered with data — not the accounting itself, the
/// break-the-glass form, a redirect to choose a purpose, or the print form (no records).
pub(crate) fn is_disclosure(entry: &strata_control::AuditEntry) -> bool {
    let action = entry.action.as_str();
    // A document read in ranges (a PDF viewer's) is one disclosure: its first range counts.
    let first_range = entry.detail["range"][0].as_u64() == Some(0);
    let served = entry.status == 200 || (entry.status == 206 && first_range);
    let api = action.contains("/v1/patients/{patient}/") && !action.ends_with("/disclosures");
    let viewer = action.starts_with("GET /ui/patients/{patient}")
        || action == "POST /ui/patients/{patient}/print";
    // A viewer page that showed no records (a form) disclosed nothing; a document always does.
    let nothing = entry
        .detail
        .get("records")
        .and_then(|r| r.as_u64())
        .unwrap_or(0)
        == 0
        && !action.contains("/documents/");
    served && (api || viewer) && !(viewer && nothing)
}

/// The accounting of disclosures: every read of the patient's data that was served — when,
/// by whom, for what purpose, what, and whether the glass was broken.
#[utoipa::path(get, path = "/v1/patients/{patient}/disclosures", tag = "auditor", params(("patient" = String, Path, description = "The patient key"), DisclosureParams),
    responses((status = 200, description = "Accounting of disclosures: every served read of the patient's data", body = Disclosures),
        (status = 400, description = "Bad query", body = ErrorBody), Refusals))]
pub(super) async fn disclosures(
    State(state): State<AppState>,
    Path(patient): Path<String>,
    ApiQuery(p): ApiQuery<DisclosureParams>,
) -> Result<Response, ApiError> {
    let limit = p.limit.unwrap_or(100).clamp(1, 1000);
    let entries = state
        .audit
        .list(&AuditQuery {
            after_seq: p.after,
            limit: Some(limit),
            patient: Some(patient.clone()),
            outcome: Some(Outcome::Allowed),
            since: p.since,
            until: p.until,
            ..Default::default()
        })
        .await?;
    let next = (entries.len() as i64 == limit)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    let disclosures: Vec<Disclosure> = entries
        .into_iter()
        .filter(|e| is_disclosure(&e.entry))
        .map(|e| Disclosure {
            at: e.at,
            user: e.entry.user,
            roles: e.entry.roles,
            purpose: e.entry.purpose,
            action: e.entry.action,
            detail: e.entry.detail,
            break_glass: e.entry.break_glass,
            audit_entry: e.seq,
        })
        .collect();
    let detail = json!({ "disclosures": disclosures.len() });
    Ok(reply(
        Json(Disclosures {
            patient,
            disclosures,
            next,
        }),
        detail,
    ))
}
