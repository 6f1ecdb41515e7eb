//! The router: routes grouped by audience, the roles each group admits, the layers, and the
//! extractors handlers share.
//!
//! Layers, outermost first: trace, metrics, audit (every `/v1` request is recorded before its
//! response leaves), authentication, per-user rate limit, timeout (inside authentication, so
//! that a request with a valid token that times out is audited under its user), and for the
//! routes of each audience, its roles. Handlers are thin: they read
//! through the archive reader or the control database and note for the audit log what they
//! returned; for patient data they check the caller's grounds ([`crate::access`]) first.
//!
//! Each audience's routes are in a file of their own: [`clinical`], [`records`], [`auditor`],
//! [`operations`]; researchers' exports in [`crate::exports`], FHIR Bulk Data in
//! [`crate::bulk`], the SMART token endpoint in [`crate::smart`].

mod auditor;
mod clinical;
mod extract;
mod openapi;
mod operations;
mod records;

pub(crate) use auditor::is_disclosure;
pub(crate) use clinical::{history_of, serve_document};
pub(crate) use extract::{ApiJson, ApiQuery, BodyShape, QueryShape};
pub use openapi::{ApiDoc, ErrorBody};
pub(crate) use openapi::{PurposeOfUse, Refusals};
pub(crate) use records::{decide_destruction_list, hold_scope, release_active_hold};

use crate::access::patient_access;
use crate::audit::{noted, record, AuditNote};
use crate::auth::{require_token, Principal, Role};
use crate::error::ApiError;
use crate::exports::routes as export_routes;
use crate::limits::limit;
use crate::metrics::track;
use crate::state::AppState;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Router};
use serde_json::json;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// Who reaches the clinician's routes (whose grounds for each patient are checked then).
const CLINICAL: &[Role] = &[Role::Clinician];
/// Who reaches the records manager's routes.
const RECORDS: &[Role] = &[Role::RecordsManager, Role::Admin];
/// Who reaches researchers' exports.
const RESEARCH: &[Role] = &[Role::Researcher];
/// Who reaches cohorts (a records manager lists patients; a researcher only criteria).
const GROUPS: &[Role] = &[Role::Researcher, Role::RecordsManager, Role::Admin];
/// Who reaches the auditor's routes.
const AUDIT: &[Role] = &[Role::Auditor, Role::Admin];
/// Who reads the evidence of a migration: records managers and auditors.
const EVIDENCE: &[Role] = &[Role::RecordsManager, Role::Auditor, Role::Admin];

/// A route layer: only a caller with one of `roles` goes on (403 otherwise, audited as
/// denied by the audit layer outside). Runs after authentication put the caller in the
/// request, before the handler reads its body or query.
async fn require_role(
    State(roles): State<&'static [Role]>,
    Extension(principal): Extension<Principal>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    principal.require(roles)?;
    Ok(next.run(request).await)
}

/// `routes`, reached only by callers with one of `roles`.
fn only(roles: &'static [Role], routes: Router<AppState>) -> Router<AppState> {
    routes.route_layer(middleware::from_fn_with_state(roles, require_role))
}

pub(crate) fn bad(what: &str) -> ApiError {
    ApiError::BadRequest(what.to_string())
}

pub(crate) fn day(
    text: &Option<String>,
    name: &str,
) -> Result<Option<chrono::NaiveDate>, ApiError> {
    text.as_deref()
        .map(|t| {
            chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d")
                .map_err(|_| bad(&format!("{name} must be a date, YYYY-MM-DD")))
        })
        .transpose()
}

pub(crate) fn list(text: &Option<String>) -> Vec<String> {
    text.as_deref()
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A response with what to note for the audit log (requests that read no patient data).
pub(crate) fn reply(body: impl IntoResponse, detail: serde_json::Value) -> Response {
    noted(
        body,
        AuditNote {
            access: None,
            detail,
        },
    )
}

/// The API's routes with their layers.
pub fn router(state: AppState) -> Router {
    let clinical = only(
        CLINICAL,
        Router::new()
            .route("/v1/patients/{patient}/history", get(clinical::history))
            .route(
                "/v1/patients/{patient}/documents/{document}",
                get(clinical::document),
            ),
    );
    let auditor = only(
        AUDIT,
        Router::new()
            .route(
                "/v1/patients/{patient}/disclosures",
                get(auditor::disclosures),
            )
            .route("/v1/audit", get(auditor::audit_list))
            .route("/v1/audit/verify", get(auditor::audit_verify)),
    );
    let records = only(
        RECORDS,
        Router::new()
            .route("/v1/policies", get(records::policies))
            .route("/v1/plan", get(records::plan))
            .route("/v1/holds", get(records::holds).post(records::place_hold))
            .route("/v1/holds/{hold}", delete(records::release_hold))
            .route("/v1/reports/last-run", get(records::last_run_report))
            .route("/v1/reports/destructions", get(records::destruction_report))
            .route("/v1/destructions", get(records::destruction_requests))
            .route(
                "/v1/destructions/{request}/decision",
                axum::routing::post(records::decide_destruction),
            ),
    );
    let evidence = only(
        EVIDENCE,
        Router::new().route(
            "/v1/reports/verifications",
            get(records::verification_reports),
        ),
    );
    let exports = only(
        RESEARCH,
        Router::new()
            .route(
                "/v1/exports",
                axum::routing::post(export_routes::start_export),
            )
            .route("/v1/exports/{export}", get(export_routes::export_status))
            .route(
                "/v1/exports/{export}/files/{file}",
                get(export_routes::export_file),
            ),
    );
    let groups = only(
        GROUPS,
        Router::new().route(
            "/v1/groups",
            get(export_routes::list_groups).post(export_routes::create_group),
        ),
    );
    // Bulk Data answers in FHIR: its own role layer refuses with an OperationOutcome.
    let bulk = Router::new()
        .route("/fhir/$export", get(crate::bulk::export_system))
        .route("/fhir/Patient/$export", get(crate::bulk::export_patients))
        .route(
            "/fhir/Group/{group}/$export",
            get(crate::bulk::export_group),
        )
        .route(
            "/fhir/bulkstatus/{export}",
            get(crate::bulk::status).delete(crate::bulk::cancel),
        )
        .route("/fhir/bulkfiles/{export}/{file}", get(crate::bulk::file))
        .route_layer(middleware::from_fn(crate::bulk::require_bulk_role));
    let v1 = clinical
        .merge(auditor)
        .merge(records)
        .merge(evidence)
        .merge(exports)
        .merge(groups)
        .merge(bulk);
    with_layers(state, v1)
}

/// The same server path as [`router`] (TLS, HTTP, token check, rate limit, audit) around one
/// route, `GET /v1/patients/{patient}/history`, that checks the caller's grounds as the real
/// one does and answers `body` without reading the archive: the ceiling a benchmark measures
/// Strata's histories against (`strata serve --benchmark-ceiling BYTES`).
pub fn ceiling_router(state: AppState, body: bytes::Bytes) -> Router {
    let answer = move |Extension(principal): Extension<Principal>,
                       Path(patient): Path<String>,
                       headers: HeaderMap| {
        let body = body.clone();
        async move {
            let access = patient_access(&principal, &headers, &patient)?;
            let note = AuditNote {
                access: Some(access),
                detail: json!({ "records": 0, "ceiling": true }),
            };
            Ok::<_, ApiError>(noted(
                ([(header::CONTENT_TYPE, "application/json")], body),
                note,
            ))
        }
    };
    let v1 = Router::new().route("/v1/patients/{patient}/history", get(answer));
    with_layers(state, v1)
}

/// `v1` (the routes that need a token) and the public routes, with the layers every request
/// goes through.
fn with_layers(state: AppState, v1: Router<AppState>) -> Router {
    let timeout =
        TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, state.request_timeout);
    let limiter = state.limiter.clone();
    let inner = move |routes: Router<AppState>| {
        routes
            .route_layer(timeout)
            .route_layer(middleware::from_fn_with_state(limiter.clone(), limit))
    };
    let viewer = crate::viewer::routes(&state, &inner);
    let v1 = inner(v1).route_layer(middleware::from_fn_with_state(
        state.auth.clone(),
        require_token,
    ));
    Router::new()
        .route("/healthz", get(operations::healthz))
        .route("/readyz", get(operations::readyz))
        .route("/metrics", get(operations::metrics))
        .route("/openapi.json", get(operations::openapi_json))
        .route(
            "/.well-known/smart-configuration",
            get(crate::smart::configuration),
        )
        .route(
            "/fhir/.well-known/smart-configuration",
            get(crate::smart::configuration),
        )
        .route("/auth/token", axum::routing::post(crate::smart::token))
        .route_layer(timeout)
        .merge(v1)
        .merge(viewer)
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .layer(middleware::from_fn_with_state(state.metrics.clone(), track))
        .with_state(state)
        .layer(TraceLayer::new_for_http())
}
