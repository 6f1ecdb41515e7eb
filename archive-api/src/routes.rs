//! The router: routes, the auth layer, and the server.

use crate::auth::{require_token, Auth, Principal, Role};
use crate::config::ApiConfig;
use crate::error::ApiError;
use crate::history::{find_document, patient_history, HistoryRecord};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{middleware, Extension, Json, Router};
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use strata_archive::ArchiveReader;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The archive, read-only.
    pub archive: ArchiveReader,
    /// Token verification.
    pub auth: Auth,
}

#[derive(Serialize)]
struct History {
    patient: String,
    records: Vec<HistoryRecord>,
}

const CLINICAL: &[Role] = &[Role::Clinician, Role::Admin];

async fn history(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(patient): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(CLINICAL)?;
    let records = patient_history(&state.archive, &patient).await?;
    tracing::info!(user = %principal.user, patient = %patient, records = records.len(), "history read");
    Ok(Json(
        serde_json::to_value(History { patient, records })
            .map_err(|e| ApiError::Internal(e.to_string()))?,
    ))
}

/// Parses a single `bytes=` range against a length: Ok(None) for no header, Err for an
/// unsatisfiable or multi-part range.
fn parse_range(
    header: Option<&axum::http::HeaderValue>,
    length: u64,
) -> Result<Option<std::ops::Range<u64>>, ()> {
    let Some(value) = header else { return Ok(None) };
    let spec = value
        .to_str()
        .map_err(|_| ())?
        .strip_prefix("bytes=")
        .ok_or(())?;
    if spec.contains(',') {
        return Err(());
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let range = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            length.saturating_sub(n)..length
        }
        (start, "") => start.parse::<u64>().map_err(|_| ())?..length,
        (start, end) => {
            start.parse::<u64>().map_err(|_| ())?
                ..end
                    .parse::<u64>()
                    .map_err(|_| ())?
                    .saturating_add(1)
                    .min(length)
        }
    };
    if range.start >= range.end || range.start >= length {
        return Err(());
    }
    Ok(Some(range))
}

async fn document(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((patient, document)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    principal.require(CLINICAL)?;
    let reference = find_document(&state.archive, &patient, &document)
        .await?
        .ok_or(ApiError::NotFound)?;
    let range = match parse_range(headers.get(header::RANGE), reference.length) {
        Ok(r) => r,
        Err(()) => {
            return Ok((
                axum::http::StatusCode::RANGE_NOT_SATISFIABLE,
                [(
                    header::CONTENT_RANGE,
                    format!("bytes */{}", reference.length),
                )],
            )
                .into_response())
        }
    };
    tracing::info!(user = %principal.user, patient = %patient, document = %reference.object, "document read");
    let mut response = match &range {
        Some(r) => {
            let bytes = state
                .archive
                .blobs()
                .get_range(&reference, r.clone())
                .await?;
            let mut resp =
                (axum::http::StatusCode::PARTIAL_CONTENT, Body::from(bytes)).into_response();
            let content_range = format!("bytes {}-{}/{}", r.start, r.end - 1, reference.length);
            resp.headers_mut()
                .insert(header::CONTENT_RANGE, content_range.parse().expect("ascii"));
            resp
        }
        None => Body::from(state.archive.blobs().get(&reference).await?).into_response(),
    };
    let len = range.map_or(reference.length, |r| r.end - r.start);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        reference
            .content_type
            .parse()
            .unwrap_or(header::HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, len.into());
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

async fn healthz() -> &'static str {
    "ok"
}

/// The API's routes with their layers.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/patients/{patient}/history", get(history))
        .route("/v1/patients/{patient}/documents/{document}", get(document))
        .route_layer(middleware::from_fn_with_state(
            state.auth.clone(),
            require_token,
        ))
        .with_state(state);
    Router::new()
        .route("/healthz", get(healthz))
        .merge(v1)
        .fallback(|| async { ApiError::NotFound })
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(30),
        ))
        .layer(TraceLayer::new_for_http())
}

/// Serves until `shutdown` resolves. Plain HTTP is refused unless configured and on loopback.
pub async fn serve(
    config: &ApiConfig,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<SocketAddr, std::io::Error> {
    let addr: SocketAddr = config.listen.parse().map_err(|_| {
        std::io::Error::other(format!(
            "[api] listen: {:?} is not an address:port",
            config.listen
        ))
    })?;
    if !config.plain_http {
        return Err(std::io::Error::other("[api]: TLS serving is not available in this version; set plain_http = true with a loopback listen address for development"));
    }
    if !addr.ip().is_loopback() {
        return Err(std::io::Error::other(
            "[api]: plain HTTP is allowed only on a loopback address",
        ));
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "server stopped");
        }
    });
    Ok(bound)
}
