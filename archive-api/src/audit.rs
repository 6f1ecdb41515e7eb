//! The audit layer: every `/v1` request, allowed or not, is appended to the control database's
//! hash-chained audit log before its response leaves (fail closed: when the log cannot be
//! written, the client gets 503 instead of the data).
//!
//! Every request that carries a valid token leaves an entry, also when it times out (the
//! timeout runs inside authentication), is refused, or its client goes away. An entry holds
//! who (token subject and roles), the stated purpose of use, the patient key
//! from the path, the route (its template, never the raw path), the status and outcome, the
//! reason when the glass was broken, and what handlers noted of what they returned (counts and
//! object ids: never row values).

use crate::access::{stated_purpose, PatientAccess};
use crate::auth::{bearer_token, Principal, NO_USER};
use crate::error::ApiError;
use crate::metrics::Rejection;
use crate::server::ClientAddress;
use crate::state::AppState;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::FutureExt;
use std::net::SocketAddr;
use strata_control::{AuditEntry, Outcome};

/// What a handler notes for the audit log, put in its response's extensions.
#[derive(Debug, Clone, Default)]
pub struct AuditNote {
    /// The grounds of a patient read.
    pub access: Option<PatientAccess>,
    /// What was returned or asked: counts, object ids, filters.
    pub detail: serde_json::Value,
}

/// The patient a response is about when its route names none (a page whose patient is in its
/// query): the audit layer records the entry under this key.
#[derive(Debug, Clone)]
pub struct AuditedPatient(pub String);

/// Adds `note` to a response for the audit layer.
pub fn noted(response: impl IntoResponse, note: AuditNote) -> Response {
    let mut response = response.into_response();
    response.extensions_mut().insert(note);
    response
}

/// Routes not audited: probes, metrics, the API's and the token endpoint's descriptions and
/// the viewer's stylesheet and script, which carry no data and no caller.
fn unaudited(path: &str) -> bool {
    matches!(
        path,
        "/healthz"
            | "/readyz"
            | "/metrics"
            | "/openapi.json"
            | "/.well-known/smart-configuration"
            | "/fhir/.well-known/smart-configuration"
            | "/ui/assets/{file}"
    )
}

/// The audit middleware. The request is served and recorded in a task of its own: a client
/// that goes away mid-request does not cancel its entry.
pub async fn record(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("(no route)", |m| m.as_str())
        .to_string();
    if unaudited(&route) {
        return next.run(request).await;
    }
    match tokio::spawn(serve_and_record(state, route, request, next)).await {
        Ok(response) => response,
        Err(e) => {
            // A handler panicked (its message may hold anything: not logged).
            tracing::error!(panicked = e.is_panic(), "a request's task ended abnormally");
            ApiError::Internal("request task ended".into()).into_response()
        }
    }
}

async fn serve_and_record(
    state: AppState,
    route: String,
    request: Request,
    next: Next,
) -> Response {
    let action = format!("{} {route}", request.method());
    let (mut parts, body) = request.into_parts();
    let patient = RawPathParams::from_request_parts(&mut parts, &state)
        .await
        .ok()
        .and_then(|p| {
            p.iter()
                .find(|(name, _)| *name == "patient")
                .map(|(_, v)| v.chars().take(200).collect::<String>())
        });
    let request = Request::from_parts(parts, body);
    let purpose = stated_purpose(request.headers());
    let client = request
        .extensions()
        .get::<ClientAddress>()
        .map(|c| c.0)
        .or_else(|| {
            request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip())
        })
        .map(|ip| ip.to_string());
    // A route outside authentication (an unknown path, a wrong method) still names the user
    // whose valid token the request carried.
    let bearer = bearer_token(request.headers()).map(str::to_string);
    // A handler that panics still leaves its entry (a 500; the panic's message may hold
    // anything and is not logged).
    let response = match std::panic::AssertUnwindSafe(next.run(request))
        .catch_unwind()
        .await
    {
        Ok(response) => response,
        Err(_) => {
            tracing::error!(route = %route, "a handler panicked");
            ApiError::Internal("handler panicked".into()).into_response()
        }
    };
    let principal = response
        .extensions()
        .get::<Principal>()
        .cloned()
        .or_else(|| bearer.and_then(|t| state.auth.verify(&t).ok()));
    // Requests that name no one are audited up to their address's rate; past it they get 429
    // and are counted, not audited: an anonymous flood must not grow the log.
    if let (None, Some(address)) = (&principal, &client) {
        if let Err(wait) = state.anonymous.take(address) {
            state.metrics.rejected(Rejection::AnonymousOverRate);
            return ApiError::TooManyRequests(wait).into_response();
        }
    }
    let patient = patient.or_else(|| {
        response
            .extensions()
            .get::<AuditedPatient>()
            .map(|p| p.0.chars().take(200).collect())
    });
    let note = response.extensions().get::<AuditNote>();
    let status = response.status();
    let outcome = if status.is_success() || status.is_redirection() {
        Outcome::Allowed
    } else if matches!(status.as_u16(), 401 | 403 | 429) {
        Outcome::Denied
    } else {
        Outcome::Failed
    };
    let break_glass = note
        .and_then(|n| n.access.as_ref())
        .and_then(|a| a.break_glass.clone());
    let entry = AuditEntry {
        user: principal
            .as_ref()
            .map_or(NO_USER.into(), |p| p.user.clone()),
        roles: principal
            .as_ref()
            .map_or(String::new(), Principal::role_names),
        purpose: note
            .and_then(|n| n.access.as_ref())
            .map(|a| a.purpose.clone())
            .or(purpose),
        patient,
        action,
        status: status.as_u16(),
        outcome,
        break_glass,
        detail: note.map_or(serde_json::Value::Null, |n| n.detail.clone()),
        client,
    };
    let flagged = entry.break_glass.is_some();
    match state.audit.append(entry).await {
        Ok(_) => {
            state.metrics.audited(flagged);
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "request not served: the audit log is unavailable");
            state.metrics.audit_failed();
            ApiError::Unavailable.into_response()
        }
    }
}
