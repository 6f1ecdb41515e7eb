//! The clinician's routes: a patient's archived history and documents. Each read checks the
//! caller's grounds for this patient ([`crate::access`]: role, purpose of use, scope,
//! break-the-glass) and notes them for the audit log.

use super::{bad, day, list, ApiQuery, ErrorBody, PurposeOfUse, QueryShape, Refusals};
use crate::access::patient_access;
use crate::audit::{noted, AuditNote};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::history::{
    find_document, patient_history, select_page, Cursor, HistoryQuery, HistoryRecord,
};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use strata_control::Outcome;

/// A page of a patient's history.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct History {
    patient: String,
    /// Records matching the filters, over all pages.
    total: usize,
    records: Vec<HistoryRecord>,
    /// The cursor of the next page, if there is one.
    next: Option<String>,
}

impl QueryShape for HistoryParams {
    const PARAMETERS: &'static str = "from, to, table, type, limit, cursor, format";
}

/// Query of `GET /v1/patients/{patient}/history`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct HistoryParams {
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

/// The tables a FHIR answer (or a `type` filter) reads: the mapped ones, of the requested
/// types, among the requested tables. A request that names a table without a mapping or a type
/// no table maps to, or a FHIR answer when nothing is mapped, is refused, naming what is
/// missing: an empty Bundle would say the patient has no such records.
fn fhir_tables(
    mappings: &std::collections::BTreeMap<String, crate::config::FhirTable>,
    tables: Vec<String>,
    types: &[String],
    fhir: bool,
) -> Result<Vec<String>, ApiError> {
    let unmapped: Vec<&str> = tables
        .iter()
        .filter(|t| !mappings.contains_key(*t))
        .map(String::as_str)
        .collect();
    if !unmapped.is_empty() {
        return Err(bad(&format!(
            "no FHIR mapping for table {} ([api.fhir] in strata.toml): ask for format=json",
            unmapped.join(", ")
        )));
    }
    let unknown: Vec<&str> = types
        .iter()
        .filter(|ty| !mappings.values().any(|m| &m.resource == *ty))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(bad(&format!(
            "no table is mapped to FHIR type {}",
            unknown.join(", ")
        )));
    }
    if fhir && mappings.is_empty() {
        return Err(bad(
            "no table has a FHIR mapping ([api.fhir] in strata.toml): ask for format=json",
        ));
    }
    let mut chosen: Vec<String> = mappings
        .iter()
        .filter(|(table, m)| {
            (types.is_empty() || types.contains(&m.resource))
                && (tables.is_empty() || tables.contains(table))
        })
        .map(|(table, _)| table.clone())
        .collect();
    if chosen.is_empty() {
        // The tables asked for are mapped to other types: nothing matches (an empty filter
        // would mean every table).
        chosen.push(String::new());
    }
    Ok(chosen)
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
        (status = 400, description = "Bad query (a table without a FHIR mapping or a type no table maps to, for a FHIR answer), missing purpose of use, or a reason too short", body = ErrorBody),
        Refusals))]
pub(super) async fn history(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(patient): Path<String>,
    query: Result<ApiQuery<HistoryParams>, ApiError>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // The caller's grounds for this patient come first: a refusal is a refusal, whatever the
    // query says.
    let access = patient_access(&principal, &headers, &patient)?;
    let ApiQuery(p) = query?;
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
        tables = fhir_tables(&state.fhir, tables, &types, fhir)?;
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
    let all = history_of(&state, &patient).await?;
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
        // Whole-chart requests say what the Bundle leaves out (on their first page).
        let mut unmapped = std::collections::BTreeMap::<&str, u64>::new();
        if p.table.is_none() && p.resource_type.is_none() && p.cursor.is_none() {
            for r in all.iter().filter(|r| !state.fhir.contains_key(&r.table)) {
                *unmapped.entry(r.table.as_str()).or_default() += 1;
            }
        }
        let bundle = crate::fhir::bundle(&patient, &records, total, &links, &state.fhir, &unmapped);
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

/// The whole archived history of `patient` (history order), from the cache when the catalog
/// has not changed since it was read.
pub(crate) async fn history_of(
    state: &AppState,
    patient: &str,
) -> Result<std::sync::Arc<Vec<HistoryRecord>>, ApiError> {
    if let Some(all) = state.histories.get(patient, state.archive.generation()) {
        return Ok(all);
    }
    let _reading = state.archive_reads.acquire().await;
    let (all, generation) = patient_history(&state.archive, patient).await?;
    let all = std::sync::Arc::new(all);
    state.histories.put(patient, generation, all.clone());
    Ok(all)
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
pub(super) async fn document(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((patient, document)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let access = patient_access(&principal, &headers, &patient)?;
    serve_document(
        &state,
        &principal,
        access,
        (&patient, &document),
        &headers,
        "GET /v1/patients/{patient}/documents/{document}",
    )
    .await
}

/// Streams `document` of `patient` to `principal`, who may read it on the grounds of `access`
/// (one range when `headers` ask for it), noted for the audit log; a failure mid-stream is
/// audited as `action`.
pub(crate) async fn serve_document(
    state: &AppState,
    principal: &Principal,
    access: crate::access::PatientAccess,
    (patient, document): (&str, &str),
    headers: &HeaderMap,
    action: &str,
) -> Result<Response, ApiError> {
    let reference = {
        let _reading = state.archive_reads.acquire().await;
        find_document(&state.archive, patient, document).await?
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
        patient: Some(patient.to_string()),
        action: action.into(),
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
