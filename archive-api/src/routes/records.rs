//! The records manager's routes: policy versions, the latest plan, run and destruction
//! reports, and legal holds. Only records managers and administrators reach them (a route
//! layer).

use super::{reply, ApiJson, BodyShape, ErrorBody, Refusals};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use strata_control::{DestructionRecord, HoldRecord, PolicyVersion};
use strata_cutoff_policies::HoldScope;

/// Every stored policy version.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct PolicyVersions {
    /// Newest first.
    versions: Vec<PolicyVersion>,
}

#[utoipa::path(get, path = "/v1/policies", tag = "records manager",
    responses((status = 200, description = "Every stored policy version, newest first", body = PolicyVersions), Refusals))]
pub(super) async fn policies(State(state): State<AppState>) -> Result<Response, ApiError> {
    let versions = state.control.policy_versions().await?;
    let detail = json!({ "versions": versions.len() });
    Ok(reply(Json(PolicyVersions { versions }), detail))
}

/// The latest plan.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Plan {
    plan_id: String,
    /// When it was made (RFC 3339).
    created_at: String,
    /// Rows, bytes and patients per table per tier, as `strata plan --json` prints it.
    #[schema(value_type = Object)]
    report: serde_json::Value,
}

#[utoipa::path(get, path = "/v1/plan", tag = "records manager",
    responses((status = 200, description = "The latest plan: rows per table per tier", body = Plan),
        (status = 404, description = "No plan yet", body = ErrorBody), Refusals))]
pub(super) async fn plan(State(state): State<AppState>) -> Result<Response, ApiError> {
    let plan = state
        .control
        .latest_plan::<serde_json::Value>()
        .await?
        .ok_or(ApiError::NotFound)?;
    let detail = json!({ "plan": plan.plan_id });
    Ok(reply(
        Json(Plan {
            plan_id: plan.plan_id,
            created_at: plan.created_at,
            report: plan.report,
        }),
        detail,
    ))
}

#[utoipa::path(get, path = "/v1/reports/last-run", tag = "records manager",
    responses((status = 200, description = "The last finished run's report", body = Object),
        (status = 404, description = "No finished run yet", body = ErrorBody), Refusals))]
pub(super) async fn last_run_report(State(state): State<AppState>) -> Result<Response, ApiError> {
    let (run_id, report) = state
        .control
        .last_finished_run_report::<serde_json::Value>()
        .await?
        .ok_or(ApiError::NotFound)?;
    let detail = json!({ "run": run_id });
    Ok(reply(Json(report), detail))
}

/// Every destruction record, and the certificates of destruction lists carried out.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Destructions {
    destructions: Vec<Destruction>,
    /// The signed certificates (JSON, as `strata_ingest::DestructionCertificate`), newest
    /// first: check them against the configured public key.
    #[schema(value_type = Vec<Object>)]
    certificates: Vec<serde_json::Value>,
}

/// One table's rows destroyed by one run.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Destruction {
    record: DestructionRecord,
    /// When it was recorded (RFC 3339).
    destroyed_at: String,
}

#[utoipa::path(get, path = "/v1/reports/destructions", tag = "records manager",
    responses((status = 200, description = "Destruction records (counts, key ranges, checksums) and the signed certificates of destruction lists carried out", body = Destructions), Refusals))]
pub(super) async fn destruction_report(
    State(state): State<AppState>,
) -> Result<Response, ApiError> {
    let destructions: Vec<Destruction> = state
        .control
        .destructions()
        .await?
        .into_iter()
        .map(|(record, destroyed_at)| Destruction {
            record,
            destroyed_at,
        })
        .collect();
    let certificates: Vec<serde_json::Value> = state
        .control
        .destruction_requests()
        .await?
        .into_iter()
        .filter_map(|r| r.certificate)
        .collect();
    let detail = json!({ "records": destructions.len(), "certificates": certificates.len() });
    Ok(reply(
        Json(Destructions {
            destructions,
            certificates,
        }),
        detail,
    ))
}

/// Every destruction list filed by a retention or tiering pass, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct DestructionRequests {
    /// Each with its status (`pending`, `approved`, `rejected`, `done`), its summary (per
    /// table: counts, key ranges, checksums), the decision and, once done, the signed
    /// certificate.
    #[schema(value_type = Vec<Object>)]
    requests: Vec<strata_control::DestructionRequest>,
}

#[utoipa::path(get, path = "/v1/destructions", tag = "records manager",
    responses((status = 200, description = "Destruction lists, newest first: a pending one waits for a records manager other than its requester", body = DestructionRequests), Refusals))]
pub(super) async fn destruction_requests(
    State(state): State<AppState>,
) -> Result<Response, ApiError> {
    let requests = state.control.destruction_requests().await?;
    let detail = json!({ "requests": requests.len() });
    Ok(reply(Json(DestructionRequests { requests }), detail))
}

/// Body of `POST /v1/destructions/{request}/decision`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DestructionDecision {
    /// True to approve the list (the next pass destroys it), false to reject it.
    approve: bool,
    /// Why (required).
    note: String,
}

impl BodyShape for DestructionDecision {
    const SHAPE: &'static str = "{\"approve\": true | false, \"note\"}";
}

#[utoipa::path(post, path = "/v1/destructions/{request}/decision", tag = "records manager",
    params(("request" = String, Path, description = "The destruction request's id")),
    request_body = DestructionDecision,
    responses((status = 200, description = "Decided: the request as it stands now", body = Object),
        (status = 400, description = "Bad body, or the request is not pending", body = ErrorBody),
        (status = 403, description = "The requester cannot decide their own list (four eyes)", body = ErrorBody),
        (status = 404, description = "No such request", body = ErrorBody), Refusals))]
pub(super) async fn decide_destruction(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(request): Path<String>,
    ApiJson(d): ApiJson<DestructionDecision>,
) -> Result<Response, ApiError> {
    let decided =
        decide_destruction_list(&state, &request, &principal.user, d.approve, &d.note).await?;
    let detail = json!({ "request": request, "approve": d.approve });
    Ok(reply(Json(decided), detail))
}

/// A records manager's decision (`user`) on the pending destruction list `request`, with a
/// note: 404 when there is no such request, 403 from its requester (four eyes), 400 when it
/// is no longer pending or the note is blank.
pub(crate) async fn decide_destruction_list(
    state: &AppState,
    request: &str,
    user: &str,
    approve: bool,
    note: &str,
) -> Result<strata_control::DestructionRequest, ApiError> {
    if note.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "a decision on a destruction list needs a note".into(),
        ));
    }
    let filed = state
        .control
        .destruction_request(request)
        .await?
        .ok_or(ApiError::NotFound)?;
    if strata_control::same_person(&filed.requested_by, user) {
        return Err(ApiError::Scope(
            "you requested this destruction list: another records manager must decide it (four eyes)"
                .into(),
        ));
    }
    if filed.status != strata_control::RequestStatus::Pending {
        return Err(ApiError::BadRequest(
            "this destruction list is no longer pending".into(),
        ));
    }
    Ok(state
        .control
        .decide_destruction(request, user, approve, note.trim())
        .await?)
}

/// Every verification of a run kept by `strata verify`, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Verifications {
    verifications: Vec<strata_control::VerificationRecord>,
}

#[utoipa::path(get, path = "/v1/reports/verifications", tag = "records manager",
    responses((status = 200, description = "Verification reports (`strata verify`), newest first, signed when a signing key is configured", body = Verifications), Refusals))]
pub(super) async fn verification_reports(
    State(state): State<AppState>,
) -> Result<Response, ApiError> {
    let verifications = state.control.verifications().await?;
    let detail = json!({ "records": verifications.len() });
    Ok(reply(Json(Verifications { verifications }), detail))
}

/// Every legal hold.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Holds {
    holds: Vec<HoldRecord>,
}

#[utoipa::path(get, path = "/v1/holds", tag = "records manager",
    responses((status = 200, description = "Every legal hold, placed and released", body = Holds), Refusals))]
pub(super) async fn holds(State(state): State<AppState>) -> Result<Response, ApiError> {
    let holds = state.control.holds().await?;
    let detail = json!({ "holds": holds.len() });
    Ok(reply(Json(Holds { holds }), detail))
}

/// A hold placed.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct PlacedHold {
    hold_id: String,
    /// What it covers (as in [`HoldRecord`]).
    #[schema(value_type = Object)]
    scope: HoldScope,
}

/// A hold released.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ReleasedHold {
    /// The hold's id.
    released: String,
}

/// Body of `POST /v1/holds`: one of `patient`, `table`, or `table` + `column` + `value`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewHold {
    patient: Option<String>,
    table: Option<String>,
    column: Option<String>,
    value: Option<String>,
    reason: String,
}

fn nonblank(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

/// What a new hold covers: a patient, a table, or a table's rows with a column's value.
pub(crate) fn hold_scope(
    patient: Option<String>,
    table: Option<String>,
    column: Option<String>,
    value: Option<String>,
) -> Result<HoldScope, ApiError> {
    match (nonblank(patient), nonblank(table), nonblank(column), value) {
        (Some(p), None, None, None) => Ok(HoldScope::Patient(p)),
        (None, Some(t), None, None) => Ok(HoldScope::Table(t)),
        (None, Some(table), Some(column), Some(value)) => Ok(HoldScope::Filter {
            table,
            column,
            value,
        }),
        _ => Err(ApiError::BadRequest(
            "name a patient, a table, or a table with a column and a value".into(),
        )),
    }
}

#[utoipa::path(post, path = "/v1/holds", tag = "records manager", request_body = NewHold,
    responses((status = 201, description = "The hold's id and scope", body = PlacedHold),
        (status = 400, description = "Bad body", body = ErrorBody), Refusals))]
pub(super) async fn place_hold(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(h): ApiJson<NewHold>,
) -> Result<Response, ApiError> {
    let scope = hold_scope(h.patient, h.table, h.column, h.value)?;
    if h.reason.trim().is_empty() {
        return Err(ApiError::BadRequest("a legal hold needs a reason".into()));
    }
    let patient = match &scope {
        HoldScope::Patient(p) => Some(p.clone()),
        _ => None,
    };
    let id = state
        .control
        .place_hold(&scope, &h.reason, &principal.user)
        .await?;
    let detail = json!({ "hold": id, "patient": patient });
    Ok(reply(
        (StatusCode::CREATED, Json(PlacedHold { hold_id: id, scope })),
        detail,
    ))
}

impl BodyShape for NewHold {
    const SHAPE: &'static str = "{\"patient\" | \"table\" [, \"column\", \"value\"], \"reason\"}";
}

/// Body of `DELETE /v1/holds/{hold}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Release {
    reason: String,
}

#[utoipa::path(delete, path = "/v1/holds/{hold}", tag = "records manager",
    params(("hold" = String, Path, description = "The hold's id")), request_body = Release,
    responses((status = 200, description = "Released", body = ReleasedHold),
        (status = 400, description = "Bad body", body = ErrorBody),
        (status = 404, description = "No active hold with this id", body = ErrorBody), Refusals))]
pub(super) async fn release_hold(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(hold): Path<String>,
    ApiJson(r): ApiJson<Release>,
) -> Result<Response, ApiError> {
    release_active_hold(&state, &hold, &r.reason, &principal.user).await?;
    let detail = json!({ "hold": hold });
    Ok(reply(Json(ReleasedHold { released: hold }), detail))
}

/// Releases the active hold `hold` for `reason` (not blank), by `user`: 404 when no active
/// hold has that id.
pub(crate) async fn release_active_hold(
    state: &AppState,
    hold: &str,
    reason: &str,
    user: &str,
) -> Result<(), ApiError> {
    if reason.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "releasing a legal hold needs a reason".into(),
        ));
    }
    let active = state
        .control
        .holds()
        .await?
        .into_iter()
        .any(|h| h.hold_id == hold && h.released.is_none());
    if !active {
        return Err(ApiError::NotFound);
    }
    state
        .control
        .release_hold(hold, reason.trim(), user)
        .await?;
    Ok(())
}

impl BodyShape for Release {
    const SHAPE: &'static str = "{\"reason\"}";
}
