//! FHIR Bulk Data Access (v2.0): `$export` of de-identified archived data as FHIR R4 NDJSON.
//!
//! `GET /fhir/$export` (the system), `/fhir/Patient/$export` (every patient) and
//! `/fhir/Group/{id}/$export` (a cohort of `/v1/groups`), with `_type`, `_since`, `_typeFilter`
//! (`code=` for Observation and Condition, and every mapped type with a code column) and
//! `_outputFormat`. The asynchronous pattern as the specification gives it: `202 Accepted` with
//! `Content-Location`; polling answers `202` with `X-Progress` and `Retry-After` while the job
//! runs, then `200` with the completion manifest (`transactionTime`, `request`,
//! `requiresAccessToken`, `output[]` of `type`, `url`, `count`); `DELETE` cancels (polling then
//! answers `404`); files are NDJSON, one resource type each, fetched with the access token.
//! Errors are `OperationOutcome`s.
//!
//! Callers: researchers with a user token (the `safe_harbor` profile unless they name another
//! with the Strata parameter `profile`), and system clients with a token from Strata's own
//! token endpoint (SMART Backend Services, [`crate::smart`]) whose registration fixes the
//! profile and study, within their `system/...` scopes. One running export per caller.

use crate::audit::{noted, AuditNote};
use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::exports::routes::exporter;
use crate::exports::{CodeToken, FhirSpec, Format, JobSpec};
use crate::smart::{base_url, client_id, may_read};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};

/// FHIR's JSON media type.
pub(crate) const FHIR_JSON: &str = "application/fhir+json";
/// Seconds a client is asked to wait between polls.
const RETRY_AFTER_SECS: u32 = 2;

/// An `OperationOutcome` answer.
fn outcome(status: StatusCode, code: &str, text: &str) -> Response {
    let severity = if status.is_success() {
        "information"
    } else {
        "error"
    };
    (
        status,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        Json(json!({
            "resourceType": "OperationOutcome",
            "issue": [{ "severity": severity, "code": code, "diagnostics": text }],
        })),
    )
        .into_response()
}

/// Who reaches FHIR Bulk Data exports.
const BULK_ROLES: &[Role] = &[Role::Researcher, Role::System];

/// The route layer of every Bulk Data route: only researchers and system clients go on, and a
/// refusal is an `OperationOutcome`, as every answer of these routes is.
pub(crate) async fn require_bulk_role(
    Extension(principal): Extension<Principal>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match principal.require(BULK_ROLES) {
        Ok(()) => next.run(request).await,
        Err(e) => error_outcome(e),
    }
}

/// An API error as an `OperationOutcome` (same status, same client-safe text).
fn error_outcome(e: ApiError) -> Response {
    if let ApiError::Internal(detail) = &e {
        tracing::error!(%detail, "internal error");
    }
    let code = match e.status() {
        StatusCode::UNAUTHORIZED => "login",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::TOO_MANY_REQUESTS => "throttled",
        s if s.is_client_error() => "invalid",
        _ => "exception",
    };
    outcome(e.status(), code, &e.to_string())
}

/// The resource types an export can hold: `Patient`, and the types of the `[api.fhir]` mapping
/// but `DocumentReference` (documents and notes never leave in an export).
fn exportable(state: &AppState) -> BTreeSet<String> {
    state
        .fhir
        .values()
        .map(|t| t.resource.clone())
        .filter(|t| t != "DocumentReference")
        .chain(std::iter::once("Patient".to_string()))
        .collect()
}

/// Parses `Type?code=system|code,...` into the type and its code tokens.
fn type_filter(text: &str) -> Result<(String, Vec<CodeToken>), String> {
    let (kind, query) = text
        .split_once('?')
        .ok_or_else(|| format!("_typeFilter {text:?}: expected Type?code=system|code"))?;
    let mut tokens = Vec::new();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if name != "code" {
            return Err(format!(
                "_typeFilter {kind}: only the code parameter is supported, not {name}"
            ));
        }
        for token in value.split(',').filter(|t| !t.is_empty()) {
            tokens.push(match token.split_once('|') {
                Some((system, code)) => CodeToken {
                    system: (!system.is_empty()).then(|| system.to_string()),
                    code: code.to_string(),
                },
                None => CodeToken {
                    system: None,
                    code: token.to_string(),
                },
            });
        }
    }
    if tokens.is_empty() {
        return Err(format!("_typeFilter {kind}: name at least one code"));
    }
    Ok((kind.to_string(), tokens))
}

/// Which export a kick-off asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Level {
    System,
    Patient,
    Group,
}

/// `GET /fhir/$export`.
#[utoipa::path(get, path = "/fhir/$export", tag = "bulk data",
    params(("_type" = Option<String>, Query, description = "Resource types, comma-separated (by default every type the caller may read)"),
        ("_since" = Option<String>, Query, description = "Only resources of records archived at or after this instant"),
        ("_typeFilter" = Option<String>, Query, description = "Type?code=system|code[,system|code]: only resources holding one of the codes"),
        ("_outputFormat" = Option<String>, Query, description = "application/fhir+ndjson (the only one)"),
        ("Prefer" = String, Header, description = "respond-async (required); handling=lenient ignores what is not supported"),
        ("Accept" = Option<String>, Header, description = "application/fhir+json")),
    responses((status = 202, description = "Started: poll the Content-Location", headers(("Content-Location" = String, description = "The status URL"))),
        (status = 400, description = "An unsupported parameter or type, no Prefer: respond-async (an OperationOutcome)", body = Object),
        (status = 403, description = "Not a researcher or system client, or outside the client's scopes", body = Object),
        (status = 404, description = "No such group", body = Object),
        (status = 429, description = "An export of the caller's is running", body = Object)))]
pub(crate) async fn export_system(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    kickoff(&state, &principal, Level::System, None, &uri, &headers)
        .await
        .unwrap_or_else(error_outcome)
}

/// `GET /fhir/Patient/$export`.
#[utoipa::path(get, path = "/fhir/Patient/$export", tag = "bulk data",
    params(("_type" = Option<String>, Query, description = "Resource types, comma-separated (by default every type the caller may read)"),
        ("_since" = Option<String>, Query, description = "Only resources of records archived at or after this instant"),
        ("_typeFilter" = Option<String>, Query, description = "Type?code=system|code[,system|code]: only resources holding one of the codes"),
        ("_outputFormat" = Option<String>, Query, description = "application/fhir+ndjson (the only one)"),
        ("Prefer" = String, Header, description = "respond-async (required); handling=lenient ignores what is not supported"),
        ("Accept" = Option<String>, Header, description = "application/fhir+json")),
    responses((status = 202, description = "Started: poll the Content-Location", headers(("Content-Location" = String, description = "The status URL"))),
        (status = 400, description = "An unsupported parameter or type, no Prefer: respond-async (an OperationOutcome)", body = Object),
        (status = 403, description = "Not a researcher or system client, or outside the client's scopes", body = Object),
        (status = 404, description = "No such group", body = Object),
        (status = 429, description = "An export of the caller's is running", body = Object)))]
pub(crate) async fn export_patients(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    kickoff(&state, &principal, Level::Patient, None, &uri, &headers)
        .await
        .unwrap_or_else(error_outcome)
}

/// `GET /fhir/Group/{group}/$export`.
#[utoipa::path(get, path = "/fhir/Group/{group}/$export", tag = "bulk data",
    params(("group" = String, Path, description = "A cohort of /v1/groups"),
        ("_type" = Option<String>, Query, description = "Resource types, comma-separated (by default every type the caller may read)"),
        ("_since" = Option<String>, Query, description = "Only resources of records archived at or after this instant"),
        ("_typeFilter" = Option<String>, Query, description = "Type?code=system|code[,system|code]: only resources holding one of the codes"),
        ("_outputFormat" = Option<String>, Query, description = "application/fhir+ndjson (the only one)"),
        ("Prefer" = String, Header, description = "respond-async (required); handling=lenient ignores what is not supported"),
        ("Accept" = Option<String>, Header, description = "application/fhir+json")),
    responses((status = 202, description = "Started: poll the Content-Location", headers(("Content-Location" = String, description = "The status URL"))),
        (status = 400, description = "An unsupported parameter or type, no Prefer: respond-async (an OperationOutcome)", body = Object),
        (status = 403, description = "Not a researcher or system client, or outside the client's scopes", body = Object),
        (status = 404, description = "No such group", body = Object),
        (status = 429, description = "An export of the caller's is running", body = Object)))]
pub(crate) async fn export_group(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(group): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    kickoff(
        &state,
        &principal,
        Level::Group,
        Some(group),
        &uri,
        &headers,
    )
    .await
    .unwrap_or_else(error_outcome)
}

async fn kickoff(
    state: &AppState,
    principal: &Principal,
    level: Level,
    group: Option<String>,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let exporter = exporter(state)?.clone();
    let prefer = headers
        .get("prefer")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if !prefer.contains("respond-async") {
        return Err(ApiError::BadRequest(
            "a Bulk Data kick-off needs the header Prefer: respond-async".into(),
        ));
    }
    let lenient = prefer.contains("handling=lenient");
    if let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        if !(accept.contains(FHIR_JSON) || accept.contains("*/*")) {
            return Err(ApiError::BadRequest(format!("Accept must be {FHIR_JSON}")));
        }
    }
    let client = client_id(principal);
    let registration = client.and_then(|c| state.smart.as_ref()?.client(c).cloned());
    if client.is_some() && registration.is_none() {
        return Err(ApiError::Forbidden);
    }
    let known = exportable(state);
    let mut asked: Vec<String> = Vec::new();
    let mut since = None;
    let mut filters: BTreeMap<String, Vec<CodeToken>> = BTreeMap::new();
    let (mut profile, mut study, mut agreement) = (None, None, None);
    for (name, value) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match name.as_ref() {
            "_outputFormat"
                if !matches!(
                    value.as_ref(),
                    "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                ) =>
            {
                return Err(ApiError::BadRequest(format!(
                    "_outputFormat {value:?}: only application/fhir+ndjson is supported"
                )));
            }
            "_outputFormat" => {}
            "_type" => {
                for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if known.contains(t) {
                        asked.push(t.to_string());
                    } else if !lenient {
                        return Err(ApiError::BadRequest(format!(
                            "_type {t:?}: this server exports {}",
                            known.iter().cloned().collect::<Vec<_>>().join(", ")
                        )));
                    }
                }
            }
            "_since" => {
                let t = chrono::DateTime::parse_from_rfc3339(&value).map_err(|_| {
                    ApiError::BadRequest(
                        "_since must be a FHIR instant (2026-01-31T00:00:00Z)".into(),
                    )
                })?;
                since = Some(t.with_timezone(&chrono::Utc).to_rfc3339());
            }
            "_typeFilter" => {
                // Filters are comma-separated, and so are a filter's codes when a client does
                // not encode them: a part without `?` continues the filter before it.
                let mut parts: Vec<String> = Vec::new();
                for p in value.split(',') {
                    match parts.last_mut() {
                        Some(last) if !p.contains('?') => {
                            last.push(',');
                            last.push_str(p);
                        }
                        _ => parts.push(p.to_string()),
                    }
                }
                for part in parts {
                    let (kind, tokens) = type_filter(&part).map_err(ApiError::BadRequest)?;
                    filters.entry(kind).or_default().extend(tokens);
                }
            }
            "profile" | "study" | "data_use_agreement" if client.is_some() => {
                return Err(ApiError::BadRequest(format!(
                    "{name}: a system client's exports follow its registration"
                )))
            }
            "profile" => profile = Some(value.to_string()),
            "study" => study = Some(value.to_string()),
            "data_use_agreement" => agreement = Some(value.to_string()),
            other if !lenient => {
                return Err(ApiError::BadRequest(format!(
                    "parameter {other} is not supported (_outputFormat, _type, _since, _typeFilter)"
                )))
            }
            _ => {}
        }
    }
    // What the caller may read.
    let mut types: Vec<String> = if asked.is_empty() {
        known.iter().cloned().collect()
    } else {
        asked.clone()
    };
    types.sort();
    types.dedup();
    if client.is_some() {
        if let Some(t) = asked.iter().find(|t| !may_read(&principal.scopes, t)) {
            return Err(ApiError::Scope(format!(
                "the token's scopes do not cover {t} (ask for system/{t}.read)"
            )));
        }
        // Without `_type`, the export holds what the scopes cover.
        types.retain(|t| may_read(&principal.scopes, t));
        if types.is_empty() {
            return Err(ApiError::Scope(
                "the token's scopes cover no resource type this server exports".into(),
            ));
        }
    }
    for kind in filters.keys() {
        if !types.contains(kind) {
            return Err(ApiError::BadRequest(format!(
                "_typeFilter {kind}: the type is not exported by this request"
            )));
        }
    }
    let (profile, study, agreement) = match &registration {
        Some(r) => (
            r.profile.clone(),
            r.study.clone(),
            r.data_use_agreement.clone(),
        ),
        None => (
            profile.unwrap_or_else(|| strata_deidentify::SAFE_HARBOR.into()),
            study,
            agreement,
        ),
    };
    // The tables of the types, and `_typeFilter` as code lists on their code columns.
    let mut tables = Vec::new();
    let mut codes: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for (table, mapping) in state.fhir.iter() {
        if !types.contains(&mapping.resource) || mapping.resource == "DocumentReference" {
            continue;
        }
        if !state.archive.view().catalog().tables.contains_key(table) {
            continue;
        }
        if let Some(tokens) = filters.get(&mapping.resource) {
            let Some(column) = &mapping.code else {
                return Err(ApiError::BadRequest(format!(
                    "_typeFilter {}: table {table} has no code column in [api.fhir.{table}]",
                    mapping.resource
                )));
            };
            let wanted: Vec<String> = tokens
                .iter()
                .filter(|t| t.system.is_none() || t.system == mapping.system)
                .map(|t| t.code.clone())
                .collect();
            codes
                .entry(table.clone())
                .or_default()
                .insert(column.clone(), wanted);
        }
        tables.push(table.clone());
    }
    let transaction_time = chrono::Utc::now().to_rfc3339();
    let base = base_url(state, headers, uri);
    let spec = JobSpec {
        format: Format::Fhir,
        profile,
        study: study
            .as_deref()
            .map(|s| crate::exports::spec::reference(s, "study"))
            .transpose()?,
        data_use_agreement: agreement
            .as_deref()
            .map(|s| crate::exports::spec::reference(s, "data_use_agreement"))
            .transpose()?,
        tables,
        columns: BTreeMap::new(),
        from: None,
        to: None,
        codes,
        group: group.clone(),
        fhir: Some(FhirSpec {
            types: types.clone(),
            since,
            code_filters: filters,
            request: format!("{base}{}", uri.path_and_query().map_or("/", |p| p.as_str())),
            transaction_time,
            patient_level: level != Level::System,
        }),
        roles: principal.role_names(),
    };
    if let Some(g) = &group {
        if state.control.groups(Some(g)).await?.is_empty() {
            return Err(ApiError::NotFound);
        }
    }
    exporter.check(&spec, &principal.user, state).await?;
    let running = state
        .control
        .exports_with_status("running")
        .await?
        .into_iter()
        .any(|e| e.requested_by == principal.user && e.kind == "fhir");
    if running {
        let mut r = outcome(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "an export of yours is running: wait for it, or cancel it with DELETE on its status URL",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
        return Ok(r);
    }
    let detail = json!({ "level": format!("{level:?}"), "types": types, "profile": spec.profile,
        "study": spec.study, "data_use_agreement": spec.data_use_agreement, "group": group });
    let id = exporter.start(state, &principal.user, spec).await?;
    let mut detail = detail;
    detail["export"] = json!(id);
    let mut response = outcome(
        StatusCode::ACCEPTED,
        "informational",
        "export started; poll the Content-Location",
    );
    response.headers_mut().insert(
        header::CONTENT_LOCATION,
        format!("{base}/fhir/bulkstatus/{id}")
            .parse()
            .map_err(|_| ApiError::Internal("a status URL is not a header value".into()))?,
    );
    Ok(noted(
        response,
        AuditNote {
            access: None,
            detail,
        },
    ))
}

/// The caller's own FHIR export job (anything else is not found).
async fn own_job(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<strata_control::ExportRecord, ApiError> {
    let record = crate::exports::routes::own_export(state, principal, id).await?;
    if record.kind != "fhir" {
        return Err(ApiError::NotFound);
    }
    Ok(record)
}

/// `GET /fhir/bulkstatus/{job}`: 202 while running, the manifest when done.
#[utoipa::path(get, path = "/fhir/bulkstatus/{export}", tag = "bulk data",
    params(("export" = String, Path, description = "The export's id")),
    responses((status = 200, description = "The completion manifest: transactionTime, request, requiresAccessToken, output[] (type, url, count)", body = Object),
        (status = 202, description = "Running", headers(("X-Progress" = String, description = "How far it got"), ("Retry-After" = u32, description = "Seconds to wait"))),
        (status = 404, description = "No such export of the caller's (or it was cancelled, or expired)", body = Object),
        (status = 500, description = "The export failed: why (an OperationOutcome)", body = Object)))]
pub(crate) async fn status(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let record = match own_job(&state, &principal, &id).await {
        Ok(r) => r,
        Err(e) => return error_outcome(e),
    };
    let detail = json!({ "export": id, "status": record.status });
    let response = match record.status.as_str() {
        "running" => {
            let progress = record.progress.clone().unwrap_or_else(|| "started".into());
            (
                StatusCode::ACCEPTED,
                [
                    ("x-progress", progress),
                    ("retry-after", RETRY_AFTER_SECS.to_string()),
                ],
            )
                .into_response()
        }
        "done" => {
            let base = base_url(&state, &headers, &uri);
            let manifest = record.manifest.unwrap_or_default();
            let fhir = record.request.get("fhir").cloned().unwrap_or_default();
            let output: Vec<_> = manifest["files"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|f| {
                    json!({
                        "type": f["type"],
                        "url": format!("{base}/fhir/bulkfiles/{id}/{}", f["file"].as_str().unwrap_or_default()),
                        "count": f["count"],
                    })
                })
                .collect();
            let body = json!({
                "transactionTime": fhir["transaction_time"],
                "request": fhir["request"],
                "requiresAccessToken": true,
                "output": output,
                "deleted": [],
                "error": [],
                "extension": {
                    "https://strata.dev/fhir/export-profile": manifest["profile"],
                    "https://strata.dev/fhir/study": manifest["study"],
                },
            });
            let mut r = Json(body).into_response();
            if let Some(expires) = record
                .expires_at
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            {
                if let Ok(v) = expires.to_rfc2822().parse() {
                    r.headers_mut().insert(header::EXPIRES, v);
                }
            }
            r
        }
        "failed" => outcome(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            record.error.as_deref().unwrap_or("the export failed"),
        ),
        _ => error_outcome(ApiError::NotFound),
    };
    noted(
        response,
        AuditNote {
            access: None,
            detail,
        },
    )
}

/// `DELETE /fhir/bulkstatus/{job}`: cancels a running export, or deletes a finished one's files.
#[utoipa::path(delete, path = "/fhir/bulkstatus/{export}", tag = "bulk data",
    params(("export" = String, Path, description = "The export's id")),
    responses((status = 202, description = "Cancelled (or its files deleted)", body = Object),
        (status = 404, description = "No such running or finished export of the caller's", body = Object)))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let record = own_job(&state, &principal, &id).await?;
        let exporter = exporter(&state)?;
        let done = match record.status.as_str() {
            "running" => {
                let cancelled = state.control.cancel_export(&id).await?;
                exporter.cancel(&id);
                cancelled
            }
            "done" => exporter.expire_now(&state, &id).await?,
            _ => false,
        };
        if !done {
            return Err(ApiError::NotFound);
        }
        Ok(noted(
            outcome(StatusCode::ACCEPTED, "informational", "cancelled"),
            AuditNote {
                access: None,
                detail: json!({ "export": id, "was": record.status }),
            },
        ))
    }
    .await;
    result.unwrap_or_else(error_outcome)
}

/// `GET /fhir/bulkfiles/{job}/{file}`: an NDJSON file of a finished export of the caller's.
#[utoipa::path(get, path = "/fhir/bulkfiles/{export}/{file}", tag = "bulk data",
    params(("export" = String, Path, description = "The export's id"), ("file" = String, Path, description = "A file of its manifest")),
    responses((status = 200, description = "FHIR resources, one per line", content_type = "application/fhir+ndjson", body = String),
        (status = 404, description = "No such file of a finished export of the caller's", body = Object)))]
pub(crate) async fn file(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((id, file)): Path<(String, String)>,
) -> Response {
    let result = async {
        let record = own_job(&state, &principal, &id).await?;
        let expired = crate::exports::expired(&record, chrono::Utc::now());
        if record.status != "done" || expired || !file.ends_with(".ndjson") {
            return Err(ApiError::NotFound);
        }
        let stream = exporter(&state)?.file(&id, &file).await?;
        Ok(noted(
            (
                [(header::CONTENT_TYPE, "application/fhir+ndjson")],
                Body::from_stream(stream),
            ),
            AuditNote {
                access: None,
                detail: json!({ "export": id, "file": file }),
            },
        ))
    }
    .await;
    result.unwrap_or_else(error_outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_filters_give_their_code_tokens() {
        let (kind, tokens) =
            type_filter("Observation?code=http%3A%2F%2Floinc.org%7C2345-7,718-7").unwrap();
        assert_eq!(kind, "Observation");
        assert_eq!(
            tokens,
            [
                CodeToken {
                    system: Some("http://loinc.org".into()),
                    code: "2345-7".into()
                },
                CodeToken {
                    system: None,
                    code: "718-7".into()
                }
            ]
        );
        assert!(type_filter("Observation?status=final")
            .unwrap_err()
            .contains("only the code"));
        assert!(type_filter("Observation").is_err());
    }
}
