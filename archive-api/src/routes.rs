//! The router: routes, their roles, the layers, and the server.
//!
//! Layers, outermost first: trace, metrics, audit (every `/v1` request is recorded before its
//! response leaves), authentication, per-user rate limit, timeout (inside authentication, so
//! that a request with a valid token that times out is audited under its user). Handlers are thin: they
//! check the caller's role (and for patient data, the grounds: [`crate::access`]), read through
//! the archive reader or the control database, and note for the audit log what they returned.

use crate::access::patient_access;
use crate::audit::{noted, record, AuditNote};
use crate::auth::{require_token, Auth, Principal, Role};
use crate::config::ApiConfig;
use crate::error::ApiError;
use crate::exports::routes as export_routes;
use crate::exports::ExportRequest;
use crate::history::{
    find_document, patient_history, select_page, Cursor, HistoryQuery, HistoryRecord,
};
use crate::limits::{limit, RateLimiter};
use crate::metrics::{track, Metrics};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{middleware, Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::Path as FsPath;
use std::time::Duration;
use strata_archive::ArchiveReader;
use strata_control::{AuditKey, AuditLog, AuditQuery, Control, Outcome};
use strata_cutoff_policies::HoldScope;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The archive, read-only, its catalog kept up to date (`[api] catalog_refresh_secs`).
    pub archive: std::sync::Arc<strata_archive::LiveArchive>,
    /// Token verification.
    pub auth: Auth,
    /// Strata's control database: holds, policies, reports.
    pub control: Control,
    /// The audit log.
    pub audit: AuditLog,
    /// Per-user rate limits.
    pub limiter: RateLimiter,
    /// Per-address rate of requests that name no one (no valid token).
    pub anonymous: RateLimiter,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// FHIR resource types of tables.
    pub fhir: std::sync::Arc<std::collections::BTreeMap<String, crate::config::FhirTable>>,
    /// Researchers' exports, when `[api.exports]` is configured.
    pub exporter: Option<crate::exports::Exporter>,
    /// The token endpoint for system clients, when `[api.smart]` is configured.
    pub smart: Option<crate::smart::Smart>,
    /// `[api] public_url`.
    pub public_url: Option<String>,
    /// Whether the server speaks plain HTTP (for URLs made from a request's host).
    pub plain_http: bool,
    /// The operational database's URL (read for `Patient` resources when the patients table
    /// stays operational), if known.
    pub operational: Option<String>,
    /// Time a request has, body included, to its response's head (`[api.limits]`).
    pub request_timeout: Duration,
    /// Patient reads of the archive at once (`[api.limits] archive_reads`): a read holds the
    /// pages it decrypts and decodes, so this bounds the memory reads hold whatever the number
    /// of users; the others wait their turn (asynchronously, holding nothing).
    pub archive_reads: std::sync::Arc<tokio::sync::Semaphore>,
    /// Patients' histories read lately (`[api.limits] history_cache_mib`).
    pub histories: crate::history::HistoryCache,
}

impl AppState {
    /// The state for `config`: opens the audit log (its key from the config) on `control`;
    /// exports follow `classification` (the archived columns' classes).
    pub fn new(
        archive: ArchiveReader,
        control: Control,
        config: &ApiConfig,
        base: &FsPath,
        classification: strata_deidentify::Classification,
    ) -> Result<Self, String> {
        let smart = config
            .smart
            .as_ref()
            .map(|s| crate::smart::Smart::from_config(s, base))
            .transpose()?;
        if smart.is_some() && config.public_url.is_none() {
            // Assertions are addressed to the token endpoint: its address is the server's, not
            // what a request's Host header says.
            return Err("[api] public_url is needed with [api.smart]: the address clients reach the token endpoint at".into());
        }
        let mut auth = Auth::from_config(&config.auth, base)?;
        if let Some(smart) = &smart {
            auth = auth.with_system_tokens(smart.clone());
        }
        let key = audit_key(config, base)?;
        crate::fhir::check(&config.fhir)?;
        let exporter = config
            .exports
            .as_ref()
            .map(|e| crate::exports::Exporter::from_config(e, base, classification))
            .transpose()?;
        if let (Some(smart), Some(exporter)) = (&config.smart, &exporter) {
            for (id, c) in &smart.clients {
                if c.study.as_ref().is_some_and(|s| !exporter.has_study(s)) {
                    return Err(format!(
                        "[api.smart.clients.{id}] study: configure it in [api.exports.studies]"
                    ));
                }
            }
        }
        Ok(AppState {
            exporter,
            smart,
            public_url: config.public_url.clone(),
            plain_http: config.plain_http,
            operational: None,
            fhir: std::sync::Arc::new(config.fhir.clone()),
            archive: std::sync::Arc::new(strata_archive::LiveArchive::new(archive)),
            auth,
            audit: AuditLog::open(&control, key),
            control,
            limiter: RateLimiter::new(&config.limits),
            anonymous: RateLimiter::per_minute(
                config.limits.anonymous_requests_per_minute,
                config.limits.anonymous_burst,
            ),
            metrics: Metrics::default(),
            request_timeout: Duration::from_secs(config.limits.request_timeout_secs.max(1)),
            archive_reads: std::sync::Arc::new(tokio::sync::Semaphore::new(
                config.limits.archive_reads(),
            )),
            histories: crate::history::HistoryCache::new(config.limits.history_cache_mib << 20),
        })
    }
}

impl AppState {
    /// Reads the patients table of the operational database at `url` too (for FHIR `Patient`
    /// resources when the patients table stays operational).
    pub fn with_operational_database(mut self, url: String) -> Self {
        self.operational = Some(url);
        self
    }
}

/// The audit log's key, from `[api.audit]` (`base` resolves a relative key file).
pub fn audit_key(config: &ApiConfig, base: &FsPath) -> Result<AuditKey, String> {
    let hex = match (&config.audit.key_file, &config.audit.key_env) {
        (Some(file), None) => std::fs::read_to_string(base.join(file))
            .map_err(|e| format!("[api.audit]: cannot read {file}: {e}"))?,
        (None, Some(var)) => std::env::var(var)
            .map_err(|_| format!("[api.audit]: environment variable {var} is not set"))?,
        _ => return Err("[api.audit]: set exactly one of key_file and key_env".into()),
    };
    AuditKey::from_hex(&hex).map_err(|e| format!("[api.audit]: {e}"))
}

/// A page of a patient's history.
#[derive(Serialize, utoipa::ToSchema)]
struct History {
    patient: String,
    /// Records matching the filters, over all pages.
    total: usize,
    records: Vec<HistoryRecord>,
    /// The cursor of the next page, if there is one.
    next: Option<String>,
}

const RECORDS: &[Role] = &[Role::RecordsManager, Role::Admin];
const AUDIT: &[Role] = &[Role::Auditor, Role::Admin];

/// Query of `GET /v1/patients/{patient}/history`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct HistoryParams {
    /// Records dated on or after this day (YYYY-MM-DD).
    #[param(format = Date)]
    from: Option<String>,
    /// Records dated on or before this day.
    #[param(format = Date)]
    to: Option<String>,
    /// Tables, comma-separated.
    table: Option<String>,
    /// FHIR resource types, comma-separated (the tables mapped to them).
    #[serde(rename = "type")]
    resource_type: Option<String>,
    /// Records per page: 1 to 1,000; 100 by default.
    limit: Option<usize>,
    /// The `next` of the previous page.
    cursor: Option<String>,
    /// `json` (default) or `fhir`.
    format: Option<String>,
}

fn bad(what: &str) -> ApiError {
    ApiError::BadRequest(what.to_string())
}

fn day(text: &Option<String>, name: &str) -> Result<Option<chrono::NaiveDate>, ApiError> {
    text.as_deref()
        .map(|t| {
            chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d")
                .map_err(|_| bad(&format!("{name} must be a date, YYYY-MM-DD")))
        })
        .transpose()
}

fn list(text: &Option<String>) -> Vec<String> {
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

/// The query string of `uri` with `cursor` replaced.
fn with_cursor(uri: &axum::http::Uri, cursor: Option<&str>) -> String {
    let mut pairs: Vec<String> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("cursor="))
        .map(str::to_string)
        .collect();
    if let Some(c) = cursor {
        pairs.push(format!("cursor={c}"));
    }
    if pairs.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), pairs.join("&"))
    }
}

#[utoipa::path(get, path = "/v1/patients/{patient}/history", tag = "clinician",
    params(("patient" = String, Path, description = "The patient key"), HistoryParams, ("X-Purpose-Of-Use" = PurposeOfUse, Header, description = "Purpose of use (HL7 PurposeOfUse)"), ("X-Break-Glass-Reason" = Option<String>, Header, min_length = 10, max_length = 500, description = "Reason to read a patient outside the caller's care (10+ characters); the read is flagged for review"),
        ("Accept" = Option<String>, Header, description = "application/fhir+json for a FHIR R4 Bundle")),
    responses(
        (status = 200, description = "The history, newest first (JSON), or a FHIR R4 searchset Bundle",
            content((History = "application/json"), (Object = "application/fhir+json"))),
        (status = 400, description = "Bad query, missing purpose of use, or a reason too short", body = ErrorBody),
        Refusals))]
async fn history(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(patient): Path<String>,
    params: Result<Query<HistoryParams>, axum::extract::rejection::QueryRejection>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let access = patient_access(&principal, &headers, &patient)?;
    let Query(p) = params.map_err(|_| {
        bad("unknown or malformed query parameter: from, to, table, type, limit, cursor, format")
    })?;
    let fhir = match p.format.as_deref() {
        Some("fhir") => true,
        Some("json") => false,
        Some(_) => return Err(bad("format is json or fhir")),
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("application/fhir+json")),
    };
    let mut tables = list(&p.table);
    let types = list(&p.resource_type);
    if !types.is_empty() || fhir {
        // FHIR answers hold mapped tables only; a type filter names tables through the mapping.
        let mapped: Vec<String> = state
            .fhir
            .iter()
            .filter(|(_, t)| types.is_empty() || types.contains(&t.resource))
            .map(|(table, _)| table.clone())
            .collect();
        tables = if tables.is_empty() {
            mapped
        } else {
            tables.into_iter().filter(|t| mapped.contains(t)).collect()
        };
        if tables.is_empty() {
            // Nothing can match; keep the filter non-empty so that nothing does.
            tables.push(String::new());
        }
    }
    let query = HistoryQuery {
        from: day(&p.from, "from")?,
        to: day(&p.to, "to")?,
        tables,
        limit: p.limit.unwrap_or(100).clamp(1, 1000),
        after: p
            .cursor
            .as_deref()
            .map(|c| Cursor::decode(c).ok_or_else(|| bad("cursor is not one this API gave")))
            .transpose()?,
    };
    let all = match state.histories.get(&patient, state.archive.generation()) {
        Some(all) => all,
        None => {
            let _reading = state.archive_reads.acquire().await;
            let (all, generation) = patient_history(&state.archive, &patient).await?;
            let all = std::sync::Arc::new(all);
            state.histories.put(&patient, generation, all.clone());
            all
        }
    };
    let (records, total, next) = select_page(&all, &query);
    let mut per_table = std::collections::BTreeMap::<&str, u64>::new();
    for r in &records {
        *per_table.entry(r.table.as_str()).or_default() += 1;
    }
    let detail = json!({
        "records": records.len(),
        "tables": per_table,
        "format": if fhir { "fhir" } else { "json" },
    });
    let next = next.map(|c| c.encode());
    let body = if fhir {
        let mut links = vec![("self", with_cursor(&uri, p.cursor.as_deref()))];
        if let Some(n) = &next {
            links.push(("next", with_cursor(&uri, Some(n))));
        }
        let bundle = crate::fhir::bundle(&patient, &records, total, &links, &state.fhir);
        (
            [(header::CONTENT_TYPE, "application/fhir+json")],
            Json(bundle),
        )
            .into_response()
    } else {
        Json(History {
            patient,
            total,
            records,
            next,
        })
        .into_response()
    };
    Ok(noted(
        body,
        AuditNote {
            access: Some(access),
            detail,
        },
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

#[utoipa::path(get, path = "/v1/patients/{patient}/documents/{document}", tag = "clinician",
    params(("patient" = String, Path, description = "The patient key"), ("document" = String, Path, description = "The document id from the history"),
        ("X-Purpose-Of-Use" = PurposeOfUse, Header, description = "Purpose of use (HL7 PurposeOfUse)"), ("X-Break-Glass-Reason" = Option<String>, Header, min_length = 10, max_length = 500, description = "Reason to read a patient outside the caller's care (10+ characters); the read is flagged for review"), ("Range" = Option<String>, Header, description = "One range: bytes=a-b, bytes=a- or bytes=-n")),
    responses(
        (status = 200, description = "The document, streamed and verified", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "Missing purpose of use, or a reason too short", body = ErrorBody),
        (status = 404, description = "No such document for this patient", body = ErrorBody),
        (status = 416, description = "Range not satisfiable"),
        Refusals))]
async fn document(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((patient, document)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let access = patient_access(&principal, &headers, &patient)?;
    let reference = {
        let _reading = state.archive_reads.acquire().await;
        find_document(&state.archive, &patient, &document).await?
    }
    .ok_or(ApiError::NotFound)?;
    let range = match parse_range(headers.get(header::RANGE), reference.length) {
        Ok(r) => r,
        Err(()) => {
            return Ok(noted(
                (
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(
                        header::CONTENT_RANGE,
                        format!("bytes */{}", reference.length),
                    )],
                ),
                AuditNote {
                    access: Some(access),
                    detail: json!({ "object": reference.object }),
                },
            ))
        }
    };
    // Streamed a few segments at a time, each authenticated before it is sent. If the object
    // fails mid-way, the transfer is cut short (the client sees fewer bytes than
    // Content-Length) and a second audit entry records the failure.
    let wanted = range.clone().unwrap_or(0..reference.length);
    let stream = state
        .archive
        .view()
        .blobs()
        .stream_range(&reference, wanted)
        .await?;
    let (audit, metrics) = (state.audit.clone(), state.metrics.clone());
    let failure = strata_control::AuditEntry {
        user: principal.user.clone(),
        roles: principal.role_names(),
        purpose: Some(access.purpose.clone()),
        patient: Some(patient.clone()),
        action: "GET /v1/patients/{patient}/documents/{document}".into(),
        status: 500,
        outcome: Outcome::Failed,
        break_glass: access.break_glass.clone(),
        detail: json!({ "object": reference.object, "integrity": "stream stopped" }),
        client: None,
    };
    let stream = futures::StreamExt::map(stream, move |piece| {
        piece.map_err(|e| {
            tracing::error!(error = %e, "document stream stopped: integrity");
            let (audit, entry) = (audit.clone(), failure.clone());
            metrics.stream_stopped();
            tokio::spawn(async move {
                if let Err(e) = audit.append(entry).await {
                    tracing::error!(error = %e, "audit entry of a stopped stream not written");
                }
            });
            std::io::Error::other("archived data failed its integrity check")
        })
    });
    let mut response = match &range {
        Some(r) => {
            let mut resp = (StatusCode::PARTIAL_CONTENT, Body::from_stream(stream)).into_response();
            let content_range = format!("bytes {}-{}/{}", r.start, r.end - 1, reference.length);
            resp.headers_mut()
                .insert(header::CONTENT_RANGE, content_range.parse().expect("ascii"));
            resp
        }
        None => Body::from_stream(stream).into_response(),
    };
    let len = range.as_ref().map_or(reference.length, |r| r.end - r.start);
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
    let detail = match &range {
        Some(r) => json!({ "object": reference.object, "bytes": len, "range": [r.start, r.end] }),
        None => json!({ "object": reference.object, "bytes": len }),
    };
    Ok(noted(
        response,
        AuditNote {
            access: Some(access),
            detail,
        },
    ))
}

/// Query of `GET /v1/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditParams {
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

/// A page of entries with the cursor of the next.
fn page<T: Serialize>(entries: Vec<T>, next: Option<i64>) -> serde_json::Value {
    json!({ "entries": entries, "next": next })
}

#[utoipa::path(get, path = "/v1/audit", tag = "auditor", params(AuditParams),
    responses((status = 200, description = "Entries oldest first, with the cursor of the next page", body = Object),
        (status = 400, description = "Bad query", body = ErrorBody), Refusals))]
async fn audit_list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Query(p): Query<AuditParams>,
) -> Result<Response, ApiError> {
    principal.require(AUDIT)?;
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
    Ok(reply(Json(page(entries, next)), detail))
}

#[utoipa::path(get, path = "/v1/audit/verify", tag = "auditor",
    responses((status = 200, description = "Whether the hash chain is intact, and every break with its entry", body = Object), Refusals))]
async fn audit_verify(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    principal.require(AUDIT)?;
    let report = state.audit.verify().await?;
    let detail = json!({ "entries": report.entries, "problems": report.problems.len() });
    Ok(reply(
        Json(json!({
            "ok": report.ok(),
            "entries": report.entries,
            "head": report.head_seq,
            "problems": report.problems,
        })),
        detail,
    ))
}

/// Query of the accounting of disclosures.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DisclosureParams {
    after: Option<i64>,
    limit: Option<i64>,
    since: Option<String>,
    until: Option<String>,
}

/// The accounting of disclosures: every read of the patient's data that was served — when,
/// by whom, for what purpose, what, and whether the glass was broken.
#[utoipa::path(get, path = "/v1/patients/{patient}/disclosures", tag = "auditor", params(("patient" = String, Path, description = "The patient key"), DisclosureParams),
    responses((status = 200, description = "Accounting of disclosures: every served read of the patient's data", body = Object),
        (status = 400, description = "Bad query", body = ErrorBody), Refusals))]
async fn disclosures(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(patient): Path<String>,
    Query(p): Query<DisclosureParams>,
) -> Result<Response, ApiError> {
    principal.require(AUDIT)?;
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
    let disclosures: Vec<_> = entries
        .iter()
        .filter(|e| {
            e.entry.action.contains("/v1/patients/{patient}/")
                && !e.entry.action.ends_with("/disclosures")
        })
        .map(|e| {
            json!({
                "at": e.at,
                "user": e.entry.user,
                "roles": e.entry.roles,
                "purpose": e.entry.purpose,
                "action": e.entry.action,
                "detail": e.entry.detail,
                "break_glass": e.entry.break_glass,
                "audit_entry": e.seq,
            })
        })
        .collect();
    let detail = json!({ "disclosures": disclosures.len() });
    Ok(reply(
        Json(json!({ "patient": patient, "disclosures": disclosures, "next": next })),
        detail,
    ))
}

#[utoipa::path(get, path = "/v1/policies", tag = "records manager",
    responses((status = 200, description = "Every stored policy version, newest first", body = Object), Refusals))]
async fn policies(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    principal.require(RECORDS)?;
    let versions = state.control.policy_versions().await?;
    let detail = json!({ "versions": versions.len() });
    Ok(reply(Json(json!({ "versions": versions })), detail))
}

#[utoipa::path(get, path = "/v1/plan", tag = "records manager",
    responses((status = 200, description = "The latest plan: rows per table per tier", body = Object),
        (status = 404, description = "No plan yet", body = ErrorBody), Refusals))]
async fn plan(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    principal.require(RECORDS)?;
    let (plan_id, created_at, report) = state
        .control
        .latest_plan()
        .await?
        .ok_or(ApiError::NotFound)?;
    let report: serde_json::Value = serde_json::from_str(&report)
        .map_err(|e| ApiError::Internal(format!("stored plan: {e}")))?;
    let detail = json!({ "plan": plan_id });
    Ok(reply(
        Json(json!({ "plan_id": plan_id, "created_at": created_at, "report": report })),
        detail,
    ))
}

#[utoipa::path(get, path = "/v1/reports/last-run", tag = "records manager",
    responses((status = 200, description = "The last finished run's report", body = Object),
        (status = 404, description = "No finished run yet", body = ErrorBody), Refusals))]
async fn last_run_report(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    principal.require(RECORDS)?;
    let (run_id, report) = state
        .control
        .last_finished_run_report()
        .await?
        .ok_or(ApiError::NotFound)?;
    let report: serde_json::Value = serde_json::from_str(&report)
        .map_err(|e| ApiError::Internal(format!("stored report: {e}")))?;
    let detail = json!({ "run": run_id });
    Ok(reply(Json(report), detail))
}

#[utoipa::path(get, path = "/v1/reports/destructions", tag = "records manager",
    responses((status = 200, description = "Destruction records: counts, key ranges, checksums", body = Object), Refusals))]
async fn destruction_report(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    principal.require(RECORDS)?;
    let records: Vec<_> = state
        .control
        .destructions()
        .await?
        .into_iter()
        .map(|(d, at)| json!({ "record": d, "destroyed_at": at }))
        .collect();
    let detail = json!({ "records": records.len() });
    Ok(reply(Json(json!({ "destructions": records })), detail))
}

#[utoipa::path(get, path = "/v1/holds", tag = "records manager",
    responses((status = 200, description = "Every legal hold, placed and released", body = Object), Refusals))]
async fn holds(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Response, ApiError> {
    principal.require(RECORDS)?;
    let holds = state.control.holds().await?;
    let detail = json!({ "holds": holds.len() });
    Ok(reply(Json(json!({ "holds": holds })), detail))
}

/// Body of `POST /v1/holds`: one of `patient`, `table`, or `table` + `column` + `value`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewHold {
    patient: Option<String>,
    table: Option<String>,
    column: Option<String>,
    value: Option<String>,
    reason: String,
}

fn nonblank(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

#[utoipa::path(post, path = "/v1/holds", tag = "records manager", request_body = NewHold,
    responses((status = 201, description = "The hold's id and scope", body = Object),
        (status = 400, description = "Bad body", body = ErrorBody), Refusals))]
async fn place_hold(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<NewHold>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    principal.require(RECORDS)?;
    let Json(h) = body.map_err(|_| {
        ApiError::BadRequest("the body must be JSON: {\"patient\" | \"table\" [, \"column\", \"value\"], \"reason\"}".into())
    })?;
    let scope = match (
        nonblank(h.patient),
        nonblank(h.table),
        nonblank(h.column),
        h.value,
    ) {
        (Some(p), None, None, None) => HoldScope::Patient(p),
        (None, Some(t), None, None) => HoldScope::Table(t),
        (None, Some(table), Some(column), Some(value)) => HoldScope::Filter {
            table,
            column,
            value,
        },
        _ => {
            return Err(ApiError::BadRequest(
                "name a patient, a table, or a table with a column and a value".into(),
            ))
        }
    };
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
        (
            StatusCode::CREATED,
            Json(json!({ "hold_id": id, "scope": scope })),
        ),
        detail,
    ))
}

/// Body of `DELETE /v1/holds/{hold}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Release {
    reason: String,
}

#[utoipa::path(delete, path = "/v1/holds/{hold}", tag = "records manager",
    params(("hold" = String, Path, description = "The hold's id")), request_body = Release,
    responses((status = 200, description = "Released", body = Object),
        (status = 400, description = "Bad body", body = ErrorBody),
        (status = 404, description = "No active hold with this id", body = ErrorBody), Refusals))]
async fn release_hold(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(hold): Path<String>,
    body: Result<Json<Release>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    principal.require(RECORDS)?;
    let Json(r) =
        body.map_err(|_| ApiError::BadRequest("the body must be JSON: {\"reason\"}".into()))?;
    if r.reason.trim().is_empty() {
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
        .release_hold(&hold, &r.reason, &principal.user)
        .await?;
    let detail = json!({ "hold": hold });
    Ok(reply(Json(json!({ "released": hold })), detail))
}

#[utoipa::path(get, path = "/healthz", tag = "operations", security(()),
    responses((status = 200, description = "The process answers", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the control database answers (the archive's catalog was read at start and is
/// re-read as it changes).
#[utoipa::path(get, path = "/readyz", tag = "operations", security(()),
    responses((status = 200, description = "Ready", body = String), (status = 503, description = "The control database does not answer", body = String)))]
async fn readyz(State(state): State<AppState>) -> Response {
    match state.control.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: control database");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "control database unavailable",
            )
                .into_response()
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations", security(()),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Purposes of use accepted for reading a patient (HL7 v3 PurposeOfUse; see
/// [`crate::access::PURPOSES`]). For the OpenAPI document only.
#[derive(utoipa::ToSchema)]
#[allow(clippy::upper_case_acronyms, dead_code)]
enum PurposeOfUse {
    TREAT,
    ETREAT,
    CAREMGT,
    COC,
    HPAYMT,
    HOPERAT,
    PATRQT,
    LEGAL,
    PUBHLTH,
    RECORDMGT,
}

/// The refusals every `/v1` operation may answer with (for the OpenAPI document).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub(crate) enum Refusals {
    /// No valid bearer token.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// The role or the scope does not allow it.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// The caller's rate limit is spent (see Retry-After).
    #[response(status = 429)]
    TooManyRequests(ErrorBody),
    /// The audit log cannot record the request, so it is not served.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// An error as clients see it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong (never paths, keys, SQL or internal detail).
    pub error: String,
}

/// Adds the bearer-token scheme.
struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("JWT")
                        .build(),
                ),
            );
    }
}

/// The API's OpenAPI document (served at `/openapi.json`, kept in `docs/openapi.json`).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Strata archive API", version = "1",
        description = "Read-only access to the encrypted archive: patient history and documents for clinicians, policies, holds and reports for records managers, the audit log for auditors, de-identified exports for researchers (Parquet, and FHIR Bulk Data with SMART Backend Services for system clients). Every /v1 and /fhir request is authenticated, authorized and audited."),
    paths(history, document, disclosures, audit_list, audit_verify, policies, plan, holds,
        place_hold, release_hold, last_run_report, destruction_report, export_routes::start_export,
        export_routes::export_status, export_routes::export_file, export_routes::create_group,
        export_routes::list_groups, crate::bulk::export_system, crate::bulk::export_patients,
        crate::bulk::export_group, crate::bulk::status, crate::bulk::cancel, crate::bulk::file,
        crate::smart::configuration, crate::smart::token, healthz, readyz, metrics,
        openapi_json),
    components(schemas(ErrorBody, PurposeOfUse, ExportRequest, History, HistoryRecord, crate::history::DocumentLink, NewHold, Release)),
    modifiers(&BearerScheme),
    security(("bearer" = []))
)]
pub struct ApiDoc;

#[utoipa::path(get, path = "/openapi.json", tag = "operations", security(()),
    responses((status = 200, description = "This document", body = Object)))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// The API's routes with their layers.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/patients/{patient}/history", get(history))
        .route("/v1/patients/{patient}/documents/{document}", get(document))
        .route("/v1/patients/{patient}/disclosures", get(disclosures))
        .route("/v1/audit", get(audit_list))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/policies", get(policies))
        .route("/v1/plan", get(plan))
        .route("/v1/holds", get(holds).post(place_hold))
        .route("/v1/holds/{hold}", delete(release_hold))
        .route(
            "/v1/exports",
            axum::routing::post(export_routes::start_export),
        )
        .route("/v1/exports/{export}", get(export_routes::export_status))
        .route(
            "/v1/exports/{export}/files/{file}",
            get(export_routes::export_file),
        )
        .route(
            "/v1/groups",
            get(export_routes::list_groups).post(export_routes::create_group),
        )
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
        .route("/v1/reports/last-run", get(last_run_report))
        .route("/v1/reports/destructions", get(destruction_report));
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
    let v1 = v1
        .route_layer(timeout)
        .route_layer(middleware::from_fn_with_state(state.limiter.clone(), limit))
        .route_layer(middleware::from_fn_with_state(
            state.auth.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
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
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .layer(middleware::from_fn_with_state(state.metrics.clone(), track))
        .with_state(state)
        .layer(TraceLayer::new_for_http())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_purposes_are_the_accepted_ones() {
        let doc = serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi()).unwrap();
        let listed: Vec<&str> = doc["components"]["schemas"]["PurposeOfUse"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(listed, crate::access::PURPOSES);
    }
}
