//! The patient search of HIM staff and clinicians: by the EHR's id (an MRN), by name and by
//! birth date, in the cross-reference's table (`[api.viewer.cross_reference]`) of the
//! operational database. Every search is audited: which criteria were given and the keys of
//! the patients found — never the criteria's values (a name or a birth date is PHI).

use super::cross_reference::quoted;
use super::pages::{render, Frame, PageError};
use super::session::Session;
use crate::audit::{noted, AuditNote};
use crate::auth::Role;
use crate::error::ApiError;
use crate::state::AppState;
use askama::Template;
use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

/// Patients a search lists at most.
const LIMIT: i64 = 50;

/// Query of `GET /ui/search`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchQuery {
    #[serde(default)]
    mrn: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    birth_date: String,
}

/// A patient found.
pub(crate) struct Found {
    key: String,
    ehr_id: String,
    name: String,
    birth_date: String,
}

#[derive(Template)]
#[template(path = "search.html")]
struct SearchPage {
    frame: Frame,
    query: SearchQuery,
    searched: bool,
    found: Vec<Found>,
    clinician: bool,
    /// Why no search can be made, if so.
    unavailable: Option<&'static str>,
}

/// `GET /ui/search`: the search form, and what it finds.
pub(crate) async fn search(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Query(q): Query<SearchQuery>,
) -> Result<Response, PageError> {
    let roles = &session.data.roles;
    if !roles
        .iter()
        .any(|r| matches!(r, Role::Clinician | Role::RecordsManager))
    {
        return Err(ApiError::Forbidden.into());
    }
    let (mrn, name, birth) = (
        q.mrn.trim(),
        q.name.trim().to_lowercase(),
        q.birth_date.trim(),
    );
    if !birth.is_empty() && chrono::NaiveDate::parse_from_str(birth, "%Y-%m-%d").is_err() {
        return Err(ApiError::BadRequest("birth date must be a date, YYYY-MM-DD".into()).into());
    }
    let searched = !(mrn.is_empty() && name.is_empty() && birth.is_empty());
    let xref = state.viewer.cross_reference.as_ref();
    let unavailable = match (xref, &state.operational) {
        (Some(x), Some(_)) if x.key_column.is_some() => None,
        _ => Some("The patient search needs [api.viewer.cross_reference] with key_column, and the operational database."),
    };
    let mut found = Vec::new();
    if let (true, None, Some(x), Some(url)) = (searched, unavailable, xref, &state.operational) {
        let key = x.key_column.as_deref().unwrap_or("");
        let name_expr = if x.name_columns.is_empty() {
            "''".to_string()
        } else {
            x.name_columns
                .iter()
                .map(|c| format!("COALESCE(CAST({} AS TEXT), '')", quoted(c)))
                .collect::<Vec<_>>()
                .join(" || ' ' || ")
        };
        let birth_expr = x
            .birth_date_column
            .as_deref()
            .map_or("''".to_string(), |c| format!("CAST({} AS TEXT)", quoted(c)));
        let mut conditions = Vec::new();
        let mut binds: Vec<String> = Vec::new();
        if !mrn.is_empty() {
            binds.push(mrn.to_string());
            conditions.push(format!(
                "CAST({} AS TEXT) = ${}",
                quoted(&x.column),
                binds.len()
            ));
        }
        if !name.is_empty() {
            binds.push(format!("%{name}%"));
            conditions.push(format!("LOWER({name_expr}) LIKE ${}", binds.len()));
        }
        if !birth.is_empty() {
            binds.push(format!("{birth}%"));
            conditions.push(format!("{birth_expr} LIKE ${}", binds.len()));
        }
        let sql = format!(
            "SELECT CAST({} AS TEXT), CAST({} AS TEXT), {name_expr}, {birth_expr} FROM {} WHERE {} ORDER BY 1 LIMIT {LIMIT}",
            quoted(key),
            quoted(&x.column),
            quoted(&x.table),
            conditions.join(" AND ")
        );
        for row in super::cross_reference::operational_rows(url, &sql, &binds).await? {
            let mut row = row.into_iter();
            let mut next = || row.next().flatten().unwrap_or_default();
            found.push(Found {
                key: next(),
                ehr_id: next(),
                name: next(),
                birth_date: next().chars().take(10).collect(),
            });
        }
    }
    let given: Vec<&str> = [
        ("mrn", mrn.is_empty()),
        ("name", name.is_empty()),
        ("birth_date", birth.is_empty()),
    ]
    .into_iter()
    .filter(|(_, empty)| !empty)
    .map(|(k, _)| k)
    .collect();
    let keys: Vec<&str> = found.iter().map(|f| f.key.as_str()).collect();
    let detail = json!({ "view": "patient search", "criteria": given, "found": keys });
    let page = render(
        StatusCode::OK,
        &SearchPage {
            frame: Frame::of(&session, "Patient search", "/ui/search"),
            clinician: roles.contains(&Role::Clinician),
            query: q,
            searched,
            found,
            unavailable,
        },
    );
    Ok(noted(
        page,
        AuditNote {
            access: None,
            detail,
        },
    ))
}
