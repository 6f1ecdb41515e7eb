//! The patient search of health information management staff (records managers): by the
//! EHR's id (an MRN), by name and by birth date, in the cross-reference's table
//! (`[api.viewer.cross_reference]`) of the operational database. Clinicians open charts from
//! the EHR's launch or by key, with their grounds checked: the search's demographics are not
//! theirs to browse. A search is a form of the session (its CSRF token), so its criteria
//! never stand in an address, a browser's history or a proxy's log; it is audited with the
//! criteria given (by name, never their values: a name or a birth date is PHI) and the keys
//! found, under the patient's key when one was found.

use super::cross_reference::quoted;
use super::pages::{render, require, Frame, PageError};
use super::session::Session;
use crate::audit::{noted, AuditNote};
use crate::auth::Role;
use crate::error::ApiError;
use crate::state::AppState;
use askama::Template;
use axum::extract::{Extension, Form, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

/// Patients a search lists at most.
const LIMIT: i64 = 50;

/// Form of `POST /ui/search` (none: `GET /ui/search`, the empty form).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchQuery {
    #[serde(default)]
    csrf: String,
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
    /// Why no search can be made, if so.
    unavailable: Option<&'static str>,
}

/// `GET /ui/search`: the search form, and what it finds.
/// `GET /ui/search`: the search form.
pub(crate) async fn form(
    state: State<AppState>,
    session: Extension<Session>,
) -> Result<Response, PageError> {
    search(state, session, SearchQuery::default()).await
}

/// `POST /ui/search`: what the criteria find.
pub(crate) async fn find(
    state: State<AppState>,
    session: Extension<Session>,
    Form(q): Form<SearchQuery>,
) -> Result<Response, PageError> {
    session.check_csrf(&q.csrf)?;
    search(state, session, q).await
}

/// LIKE's wildcards in `text` taken literally (with `ESCAPE '\'`).
fn literal(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

async fn search(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    q: SearchQuery,
) -> Result<Response, PageError> {
    require(&session, &[Role::RecordsManager])?;
    let (mrn, name, birth) = (
        q.mrn.trim(),
        q.name.trim().to_lowercase(),
        q.birth_date.trim(),
    );
    if !birth.is_empty() && chrono::NaiveDate::parse_from_str(birth, "%Y-%m-%d").is_err() {
        return Err(ApiError::BadRequest("birth date must be a date, YYYY-MM-DD".into()).into());
    }
    let searched = !(mrn.is_empty() && name.is_empty() && birth.is_empty());
    // Enough to find someone, not to list everyone: an MRN, or two letters of a name.
    if searched && mrn.is_empty() && name.chars().filter(|c| c.is_alphanumeric()).count() < 2 {
        return Err(ApiError::BadRequest(
            "give an MRN, or at least two letters of the name (with the birth date if you have it)"
                .into(),
        )
        .into());
    }
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
            binds.push(format!("%{}%", literal(&name)));
            conditions.push(format!(
                "LOWER({name_expr}) LIKE ${} ESCAPE '\\'",
                binds.len()
            ));
        }
        if !birth.is_empty() {
            binds.push(format!("{}%", literal(birth)));
            conditions.push(format!("{birth_expr} LIKE ${} ESCAPE '\\'", binds.len()));
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
    let keys: Vec<String> = found.iter().map(|f| f.key.clone()).collect();
    let detail = json!({ "view": "patient search", "criteria": given, "found": keys });
    let page = render(
        StatusCode::OK,
        &SearchPage {
            frame: Frame::of(&session, "Patient search", "/ui/search"),
            query: q,
            searched,
            found,
            unavailable,
        },
    );
    let mut response = noted(
        page,
        AuditNote {
            access: None,
            detail,
        },
    );
    // Findable in the log by the patient's key.
    if let [one] = keys.as_slice() {
        response
            .extensions_mut()
            .insert(crate::audit::AuditedPatient(one.clone()));
    }
    Ok(response)
}
