//! `/v1/exports` (a researcher's Parquet exports) and `/v1/groups` (cohorts), as handlers.

use crate::auth::{Principal, Role};
use crate::error::ApiError;
use crate::exports::cohort::{Cohort, TableRows};
use crate::exports::{ExportRequest, Exporter};
use crate::routes::{reply, ApiJson, BodyShape, ErrorBody, Refusals};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use chrono::Datelike;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeSet;
use strata_deidentify::Class;

pub(crate) fn exporter(state: &AppState) -> Result<&Exporter, ApiError> {
    state.exporter.as_ref().ok_or_else(|| {
        ApiError::BadRequest("exports are not configured on this server ([api.exports])".into())
    })
}

/// The answer to a job started.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Started {
    export_id: String,
    status: String,
    href: String,
}

#[utoipa::path(post, path = "/v1/exports", tag = "researcher", request_body = ExportRequest,
    responses((status = 202, description = "The export job: its id and status", body = Started),
        (status = 400, description = "Unknown profile, table or date; a column the profile does not let out; a limited data set without a data use agreement", body = ErrorBody), Refusals))]
pub(crate) async fn start_export(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(request): ApiJson<ExportRequest>,
) -> Result<Response, ApiError> {
    let exporter = exporter(&state)?.clone();
    let spec = request.job(principal.role_names())?;
    exporter.check(&spec, &principal.user, &state).await?;
    let detail = json!({ "profile": spec.profile, "tables": spec.tables, "study": spec.study,
        "data_use_agreement": spec.data_use_agreement, "group": spec.group });
    let id = exporter.start(&state, &principal.user, spec).await?;
    let mut detail = detail;
    detail["export"] = json!(id);
    Ok(reply(
        (
            StatusCode::ACCEPTED,
            Json(Started {
                href: format!("/v1/exports/{id}"),
                export_id: id,
                status: "running".into(),
            }),
        ),
        detail,
    ))
}

/// The caller's own export (another's is not found).
pub(crate) async fn own_export(
    state: &AppState,
    principal: &Principal,
    id: &str,
) -> Result<strata_control::ExportRecord, ApiError> {
    state
        .control
        .export(id)
        .await?
        .filter(|e| e.requested_by == principal.user)
        .ok_or(ApiError::NotFound)
}

#[utoipa::path(get, path = "/v1/exports/{export}", tag = "researcher",
    params(("export" = String, Path, description = "The export's id")),
    responses((status = 200, description = "Status (running, done, failed, cancelled, expired), progress, and when done the manifest (files, rows, SHA-256, columns and their classes) and when its files expire", body = strata_control::ExportRecord),
        (status = 404, description = "No such export of the caller's", body = ErrorBody), Refusals))]
pub(crate) async fn export_status(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let record = own_export(&state, &principal, &id).await?;
    let detail = json!({ "export": id, "status": record.status });
    Ok(reply(Json(record), detail))
}

#[utoipa::path(get, path = "/v1/exports/{export}/files/{file}", tag = "researcher",
    params(("export" = String, Path, description = "The export's id"),
        ("file" = String, Path, description = "A file named in the manifest, or manifest.json")),
    responses((status = 200, description = "The file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "No such file of a finished export of the caller's (or it expired)", body = ErrorBody), Refusals))]
pub(crate) async fn export_file(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let record = own_export(&state, &principal, &id).await?;
    let expired = crate::exports::expired(&record, chrono::Utc::now());
    if record.status != "done" || record.kind != "parquet" || expired {
        return Err(ApiError::NotFound);
    }
    let stream = exporter(&state)?.file(&id, &file).await?;
    let detail = json!({ "export": id, "file": file });
    let content_type = if file.ends_with(".json") {
        "application/json"
    } else {
        "application/vnd.apache.parquet"
    };
    Ok(reply(
        (
            [(header::CONTENT_TYPE, content_type)],
            Body::from_stream(stream),
        ),
        detail,
    ))
}

/// Which archived records put a patient in a cohort.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Criteria {
    /// The archived table.
    table: String,
    /// Per column, the codes a record must hold one of.
    #[serde(default)]
    codes: std::collections::BTreeMap<String, Vec<String>>,
    /// Records dated on or after this day (YYYY-MM-DD).
    #[serde(default)]
    from: Option<String>,
    /// Records dated on or before this day.
    #[serde(default)]
    to: Option<String>,
}

/// Body of `POST /v1/groups`: `patients` (records managers) or `criteria` (also researchers,
/// who never see patient keys).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewGroup {
    name: String,
    #[serde(default)]
    patients: Option<Vec<String>>,
    #[serde(default)]
    criteria: Option<Criteria>,
}

/// A cohort as listed: never its patients' keys.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct GroupSummary {
    group_id: String,
    name: String,
    created_by: String,
    created_at: String,
    #[schema(value_type = Object)]
    criteria: serde_json::Value,
    size: usize,
}

impl From<strata_control::GroupRecord> for GroupSummary {
    fn from(g: strata_control::GroupRecord) -> Self {
        GroupSummary {
            group_id: g.group_id,
            name: g.name,
            created_by: g.created_by,
            created_at: g.created_at,
            criteria: g.criteria,
            size: g.size,
        }
    }
}

/// The patients with an archived record matching `criteria`.
async fn patients_matching(
    state: &AppState,
    c: &Criteria,
    records_manager: bool,
) -> Result<Vec<String>, ApiError> {
    let request = ExportRequest {
        profile: String::new(),
        tables: vec![c.table.clone()],
        columns: Default::default(),
        from: c.from.clone(),
        to: c.to.clone(),
        codes: [(c.table.clone(), c.codes.clone())].into(),
        study: None,
        data_use_agreement: None,
        group: None,
    };
    let spec = request.job(String::new())?;
    let whole = spec.from.is_none_or(|d| (d.month(), d.day()) == (1, 1))
        && spec.to.is_none_or(|d| (d.month(), d.day()) == (12, 31));
    if !whole && !records_manager {
        return Err(ApiError::BadRequest(
            "a researcher's cohort is bounded by whole years: from YYYY-01-01, to YYYY-12-31"
                .into(),
        ));
    }
    let archive = state.archive.view();
    let Some(manifests) = archive.catalog().tables.get(&c.table) else {
        return Err(ApiError::BadRequest(format!(
            "no archived table {:?}",
            c.table
        )));
    };
    let mut schemas = Vec::new();
    for f in manifests.iter().flat_map(|m| &m.files) {
        schemas.push(archive.file_schema(f).await?);
    }
    let merged = strata_deidentify::merge_schemas(&schemas).map_err(ApiError::Internal)?;
    // Patients are chosen by codes and categories only: choosing them by an identifier would
    // tell whose records the cohort holds.
    let classes = state
        .exporter
        .as_ref()
        .map(|e| e.classification().table(&c.table))
        .unwrap_or_default();
    for column in c.codes.keys() {
        let Ok(field) = merged.field_with_name(column) else {
            return Err(ApiError::BadRequest(format!(
                "table {} has no column {column:?}",
                c.table
            )));
        };
        let class = classes.class_of(column, field.data_type()).map(|c| c.class);
        if !matches!(class, Some(Class::Code | Class::Category)) {
            return Err(ApiError::BadRequest(format!(
                "a cohort's criteria name columns of class code or category: {column:?} of {} is not one",
                c.table
            )));
        }
    }
    // Only the rows matter here: a plan that exports nothing, over the merged schema.
    let plan = strata_deidentify::TablePlan::new(
        &c.table,
        merged,
        &Default::default(),
        &strata_deidentify::ProfileConfig::default()
            .build("membership")
            .expect("an empty profile builds"),
        None,
    )
    .map_err(ApiError::Internal)?;
    let cohort = Cohort::new(&spec, &c.table, None, None);
    let mut rows = TableRows::new(&archive, &c.table, None);
    rows.project(cohort.columns().map(str::to_string));
    let mut patients = BTreeSet::new();
    while let Some(batch) = rows
        .next(&plan, &cohort)
        .await
        .map_err(ApiError::Internal)?
    {
        let archived = strata_archive::ArchivedBatch::new(&batch, &[]);
        let keys = archived
            .patients()
            .ok_or_else(|| ApiError::Internal("no patient column".into()))?;
        patients.extend(keys.filter(|p| !p.is_empty()).map(str::to_string));
    }
    Ok(patients.into_iter().collect())
}

#[utoipa::path(post, path = "/v1/groups", tag = "researcher", request_body = NewGroup,
    responses((status = 201, description = "The cohort: its id, name and size", body = GroupSummary),
        (status = 400, description = "Neither or both of patients and criteria; patients listed by a researcher; an unknown table or column", body = ErrorBody), Refusals))]
pub(crate) async fn create_group(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(g): ApiJson<NewGroup>,
) -> Result<Response, ApiError> {
    let name = crate::exports::spec::reference(&g.name, "name")?;
    let records_manager = principal
        .roles
        .iter()
        .any(|r| matches!(r, Role::RecordsManager | Role::Admin));
    let (members, criteria) = match (g.patients, g.criteria) {
        (Some(_), _) if !records_manager => {
            return Err(ApiError::BadRequest(
                "researchers make cohorts from criteria; only records managers list patients"
                    .into(),
            ))
        }
        (Some(p), None) => {
            let n = p.len();
            (p, json!({ "patients_listed": n }))
        }
        (None, Some(c)) => (
            patients_matching(&state, &c, records_manager).await?,
            json!(c),
        ),
        _ => {
            return Err(ApiError::BadRequest(
                "give either patients or criteria".into(),
            ))
        }
    };
    let id = state
        .control
        .create_group(&name, &principal.user, &criteria, &members)
        .await?;
    let group: GroupSummary = state
        .control
        .groups(Some(&id))
        .await?
        .pop()
        .ok_or_else(|| ApiError::Internal("group not stored".into()))?
        .into();
    let detail = json!({ "group": id, "size": group.size });
    Ok(reply((StatusCode::CREATED, Json(group)), detail))
}

/// The cohorts.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Groups {
    groups: Vec<GroupSummary>,
}

#[utoipa::path(get, path = "/v1/groups", tag = "researcher",
    responses((status = 200, description = "Every cohort: id, name, who made it and how, size (never the patients)", body = Groups), Refusals))]
pub(crate) async fn list_groups(State(state): State<AppState>) -> Result<Response, ApiError> {
    let groups: Vec<GroupSummary> = state
        .control
        .groups(None)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    let detail = json!({ "groups": groups.len() });
    Ok(reply(Json(Groups { groups }), detail))
}

impl BodyShape for NewGroup {
    const SHAPE: &'static str =
        "{\"name\", \"patients\": [...] | \"criteria\": {\"table\", \"codes\", \"from\", \"to\"}}";
}

impl BodyShape for ExportRequest {
    const SHAPE: &'static str = "{\"profile\", \"tables\" [, \"columns\", \"from\", \"to\", \"codes\", \"study\", \"data_use_agreement\", \"group\"]}";
}
