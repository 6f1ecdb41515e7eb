//! The clinician's pages: the purpose of use chosen once per session, a patient's archived
//! chart, the break-the-glass form, documents, and the print view (a release-of-information
//! copy, audited as a disclosure with its recipient and reason).
//!
//! Each read checks the session user's grounds for the patient as the API does
//! ([`crate::access::grounds`]): the session's purpose, and a reason the user gave to break the
//! glass for this patient in this session.

use super::pages::{render, require, Frame, PageError};
use super::sections::{chart_view, shown_inline, ChartView, Filters};
use super::session::{local_path, Session};
use crate::access::{cleaned_reason, grounds, PatientAccess, MIN_BREAK_GLASS_REASON, PURPOSES};
use crate::audit::{noted, AuditNote};
use crate::auth::Role;
use crate::error::ApiError;
use crate::routes::{history_of, serve_document};
use crate::state::AppState;
use askama::Template;
use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use serde_json::json;

/// Purposes of use as people read them.
fn purpose_label(code: &str) -> &'static str {
    match code {
        "TREAT" => "Treatment",
        "ETREAT" => "Emergency treatment",
        "CAREMGT" => "Care management",
        "COC" => "Coordination of care",
        "HPAYMT" => "Payment",
        "HOPERAT" => "Health care operations",
        "PATRQT" => "Request of the patient",
        "LEGAL" => "Legal",
        "PUBHLTH" => "Public health",
        "RECORDMGT" => "Records management",
        _ => "Other",
    }
}

/// A purpose offered.
struct PurposeChoice {
    code: &'static str,
    label: &'static str,
}

#[derive(Template)]
#[template(path = "purpose.html")]
struct PurposePage {
    frame: Frame,
    next: String,
    purposes: Vec<PurposeChoice>,
}

/// Query naming where to go next.
#[derive(Debug, Deserialize)]
pub(crate) struct Next {
    #[serde(default)]
    next: Option<String>,
}

/// Fails with a page saying so unless the session's user is a clinician.
fn clinician(session: &Session) -> Result<(), PageError> {
    require(session, &[Role::Clinician])
}

/// `GET /ui/purpose`: choose the session's purpose of use.
pub(crate) async fn purpose_page(
    Extension(session): Extension<Session>,
    Query(q): Query<Next>,
) -> Result<Response, PageError> {
    clinician(&session)?;
    Ok(render(
        StatusCode::OK,
        &PurposePage {
            frame: Frame::of(&session, "Purpose of use", "/ui/purpose"),
            next: local_path(q.next.as_deref().unwrap_or("/ui/")),
            purposes: PURPOSES
                .iter()
                .map(|code| PurposeChoice {
                    code,
                    label: purpose_label(code),
                })
                .collect(),
        },
    ))
}

/// Form of `POST /ui/purpose`.
#[derive(Debug, Deserialize)]
pub(crate) struct PurposeForm {
    csrf: String,
    purpose: String,
    #[serde(default)]
    next: String,
}

/// `POST /ui/purpose`: keeps the purpose for the session.
pub(crate) async fn choose_purpose(
    State(state): State<AppState>,
    Extension(mut session): Extension<Session>,
    Form(form): Form<PurposeForm>,
) -> Result<Response, PageError> {
    session.check_csrf(&form.csrf)?;
    clinician(&session)?;
    let purpose = PURPOSES
        .iter()
        .find(|p| p.eq_ignore_ascii_case(&form.purpose))
        .ok_or_else(|| ApiError::BadRequest("choose one of the purposes listed".into()))?;
    session.data.purpose = Some(purpose.to_string());
    session.save(&state).await?;
    Ok(noted(
        Redirect::to(&local_path(&form.next)),
        AuditNote {
            access: None,
            detail: json!({ "purpose_of_use": purpose }),
        },
    ))
}

/// Query of `GET /ui/open`.
#[derive(Debug, Deserialize)]
pub(crate) struct Open {
    patient: String,
}

/// `GET /ui/open?patient=`: the chart of the patient whose key was typed.
pub(crate) async fn open(Query(q): Query<Open>) -> Response {
    let key =
        percent_encoding::utf8_percent_encode(q.patient.trim(), percent_encoding::NON_ALPHANUMERIC);
    Redirect::to(&format!("/ui/patients/{key}")).into_response()
}

#[derive(Template)]
#[template(path = "break_glass.html")]
struct BreakGlassPage {
    frame: Frame,
    patient: String,
    min_chars: usize,
    error: Option<String>,
}

/// What a read of `patient` in this session rests on; an early page instead when there is
/// no purpose yet (a redirect to choose one) or the patient is outside the user's care (the
/// break-the-glass form, 403 and audited as denied).
fn grounds_or_page(
    session: &Session,
    patient: &str,
    back: &str,
) -> Result<Result<PatientAccess, Response>, PageError> {
    clinician(session)?;
    let Some(purpose) = session.data.purpose.as_deref() else {
        let to = format!(
            "/ui/purpose?next={}",
            percent_encoding::utf8_percent_encode(back, percent_encoding::NON_ALPHANUMERIC)
        );
        return Ok(Err(Redirect::to(&to).into_response()));
    };
    let reason = session.data.break_glass.get(patient).cloned();
    match grounds(&session.principal(), Some(purpose), reason, patient) {
        Ok(access) => Ok(Ok(access)),
        Err(ApiError::OutsideScope) => Ok(Err(render(
            StatusCode::FORBIDDEN,
            &BreakGlassPage {
                frame: Frame::of(session, "Not in your care", ""),
                patient: patient.to_string(),
                min_chars: MIN_BREAK_GLASS_REASON,
                error: None,
            },
        ))),
        Err(e) => Err(e.into()),
    }
}

#[derive(Template)]
#[template(path = "chart.html")]
struct ChartPage {
    frame: Frame,
    view: ChartView,
}

/// What the audit log notes of a chart shown: how many records, of how many archived.
fn shown_detail(view: &ChartView) -> serde_json::Value {
    json!({ "records": view.shown, "of": view.total, "view": "chart" })
}

/// Fails unless `from` and `to` are empty or dates (YYYY-MM-DD).
fn dates(from: &str, to: &str) -> Result<(), PageError> {
    for (day, name) in [(from, "from"), (to, "to")] {
        if !day.is_empty() && chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").is_err() {
            return Err(ApiError::BadRequest(format!("{name} must be a date, YYYY-MM-DD")).into());
        }
    }
    Ok(())
}

/// `GET /ui/patients/{patient}`: the patient's archived chart, filtered.
pub(crate) async fn chart(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(patient): Path<String>,
    Query(filters): Query<Filters>,
    uri: axum::http::Uri,
) -> Result<Response, PageError> {
    let back = uri.path_and_query().map_or("/ui/", |p| p.as_str());
    let access = match grounds_or_page(&session, &patient, back)? {
        Ok(access) => access,
        Err(page) => return Ok(page),
    };
    dates(&filters.from, &filters.to)?;
    let records = history_of(&state, &patient).await?;
    let view = chart_view(
        &patient,
        &records,
        &state.fhir,
        filters,
        access.break_glass.clone(),
    );
    let detail = shown_detail(&view);
    let title = format!("Patient {patient}");
    let page = render(
        StatusCode::OK,
        &ChartPage {
            frame: Frame::of(&session, &title, ""),
            view,
        },
    );
    Ok(noted(
        page,
        AuditNote {
            access: Some(access),
            detail,
        },
    ))
}

/// Form of `POST /ui/patients/{patient}/break-glass`.
#[derive(Debug, Deserialize)]
pub(crate) struct BreakGlassForm {
    csrf: String,
    reason: String,
}

/// `POST /ui/patients/{patient}/break-glass`: keeps the reason for this patient in the
/// session (every read of the chart then carries it, flagged), and opens the chart.
pub(crate) async fn break_glass(
    State(state): State<AppState>,
    Extension(mut session): Extension<Session>,
    Path(patient): Path<String>,
    Form(form): Form<BreakGlassForm>,
) -> Result<Response, PageError> {
    session.check_csrf(&form.csrf)?;
    clinician(&session)?;
    let reason = cleaned_reason(&form.reason).unwrap_or_default();
    if reason.chars().count() < MIN_BREAK_GLASS_REASON {
        return Ok(render(
            StatusCode::BAD_REQUEST,
            &BreakGlassPage {
                frame: Frame::of(&session, "Not in your care", ""),
                patient,
                min_chars: MIN_BREAK_GLASS_REASON,
                error: Some(format!(
                    "A reason needs at least {MIN_BREAK_GLASS_REASON} characters."
                )),
            },
        ));
    }
    session
        .data
        .break_glass
        .insert(patient.clone(), reason.clone());
    session.save(&state).await?;
    let key = percent_encoding::utf8_percent_encode(&patient, percent_encoding::NON_ALPHANUMERIC);
    Ok(noted(
        Redirect::to(&format!("/ui/patients/{key}")),
        AuditNote {
            access: None,
            detail: json!({ "break_glass_reason_given": true }),
        },
    ))
}

/// `GET /ui/patients/{patient}/documents/{document}`: the document, streamed (ranges as the
/// API serves them). PDFs and common images open in the browser; any other type downloads,
/// so no archived HTML or script ever runs in the viewer's origin.
pub(crate) async fn document(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path((patient, document)): Path<(String, String)>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Response, PageError> {
    let access = match grounds_or_page(&session, &patient, uri.path())? {
        Ok(access) => access,
        Err(page) => return Ok(page),
    };
    let mut response = serve_document(
        &state,
        &session.principal(),
        access,
        (&patient, &document),
        &headers,
        "GET /ui/patients/{patient}/documents/{document}",
    )
    .await?;
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let h = response.headers_mut();
    if shown_inline(&content_type) {
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("inline"),
        );
        // The page policy would stop the browser's own PDF viewer; a document gets its own.
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; img-src 'self'; object-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'self'"),
        );
    } else {
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment"),
        );
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; sandbox"),
        );
    }
    Ok(response)
}

/// Form of `POST /ui/patients/{patient}/print`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PrintRequest {
    csrf: String,
    #[serde(default)]
    recipient: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

#[derive(Template)]
#[template(path = "print_form.html")]
struct PrintForm {
    frame: Frame,
    patient: String,
}

#[derive(Template)]
#[template(path = "print.html")]
struct PrintPage {
    view: ChartView,
    printed_by: String,
    printed_at: String,
    recipient: String,
    reason: String,
    purpose: String,
    range: String,
}

/// `GET /ui/patients/{patient}/print`: the form asking who receives the copy and why (it
/// shows nothing of the patient).
pub(crate) async fn print_form(
    Extension(session): Extension<Session>,
    Path(patient): Path<String>,
    uri: axum::http::Uri,
) -> Result<Response, PageError> {
    let back = uri.path_and_query().map_or("/ui/", |p| p.as_str());
    if let Err(page) = grounds_or_page(&session, &patient, back)? {
        return Ok(page);
    }
    Ok(render(
        StatusCode::OK,
        &PrintForm {
            frame: Frame::of(&session, "Print", ""),
            patient,
        },
    ))
}

/// `POST /ui/patients/{patient}/print`: the copy — the chart (or a date range of it) with a
/// header naming the patient, who printed it, when, for whom and why — audited as a
/// disclosure with those fields. A form of the session (its CSRF token): no other site can
/// make a signed-in browser record a disclosure.
pub(crate) async fn print(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(patient): Path<String>,
    Form(q): Form<PrintRequest>,
) -> Result<Response, PageError> {
    session.check_csrf(&q.csrf)?;
    let back = format!(
        "/ui/patients/{}/print",
        percent_encoding::utf8_percent_encode(&patient, percent_encoding::NON_ALPHANUMERIC)
    );
    let access = match grounds_or_page(&session, &patient, &back)? {
        Ok(access) => access,
        Err(page) => return Ok(page),
    };
    let recipient = cleaned_reason(&q.recipient).unwrap_or_default();
    let reason = cleaned_reason(&q.reason).unwrap_or_default();
    if recipient.is_empty() || reason.is_empty() {
        return Err(ApiError::BadRequest(
            "name the recipient of the copy and the reason for it".into(),
        )
        .into());
    }
    dates(&q.from, &q.to)?;
    let records = history_of(&state, &patient).await?;
    let filters = Filters {
        from: q.from.clone(),
        to: q.to.clone(),
        ..Filters::default()
    };
    let view = chart_view(
        &patient,
        &records,
        &state.fhir,
        filters,
        access.break_glass.clone(),
    );
    let range = match (q.from.is_empty(), q.to.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("from {}", q.from),
        (true, false) => format!("up to {}", q.to),
        (false, false) => format!("{} to {}", q.from, q.to),
    };
    let detail = json!({
        "records": view.shown,
        "view": "print",
        "disclosure": "release of information",
        "recipient": recipient,
        "reason": reason,
        "from": (!q.from.is_empty()).then_some(&q.from),
        "to": (!q.to.is_empty()).then_some(&q.to),
    });
    let page = render(
        StatusCode::OK,
        &PrintPage {
            printed_by: session.data.user.clone(),
            printed_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            purpose: access.purpose.clone(),
            recipient,
            reason,
            range,
            view,
        },
    );
    Ok(noted(
        page,
        AuditNote {
            access: Some(access),
            detail,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FhirTable;
    use crate::history::{DocumentLink, HistoryRecord};
    use crate::viewer::session::SessionData;

    fn record(table: &str, data: serde_json::Value, documents: Vec<DocumentLink>) -> HistoryRecord {
        HistoryRecord {
            table: table.into(),
            key: "id=1".into(),
            record_date: Some("2019-05-01".into()),
            data: data.as_object().unwrap().clone(),
            documents,
        }
    }

    const HOSTILE: &[&str] = &[
        "<script>alert(1)</script>",
        "\"><img src=x onerror=alert(2)>",
        "<svg onload=alert(3)>",
        "javascript:alert(4)",
        "<b>bold column</b>",
    ];

    #[test]
    fn hostile_archived_text_and_file_names_are_shown_as_text() {
        let mapping: std::collections::BTreeMap<String, FhirTable> = serde_json::from_value(
            serde_json::json!({
                "clinical_notes": { "resource": "DocumentReference", "display": "note_type", "text": "body" },
                "documents": { "resource": "DocumentReference", "display": "title" },
            }),
        )
        .unwrap();
        let document = DocumentLink {
            column: "content".into(),
            id: "obj-1".into(),
            href: String::new(),
            content_type: "text/html".into(),
            length: 10,
            sha256: "00".into(),
        };
        let records = vec![
            record(
                "clinical_notes",
                serde_json::json!({ "note_type": HOSTILE[1], "body": HOSTILE[0] }),
                vec![],
            ),
            record(
                "documents",
                serde_json::json!({ "title": HOSTILE[1] }),
                vec![document],
            ),
            record(
                "legacy_misc",
                serde_json::json!({ HOSTILE[4]: HOSTILE[2], "link": HOSTILE[3] }),
                vec![],
            ),
        ];
        let patient = "P<script>1";
        let view = chart_view(
            patient,
            &records,
            &mapping,
            Filters::default(),
            Some(HOSTILE[0].into()),
        );
        let session = Session::for_tests(SessionData {
            user: "dr-<i>x</i>".into(),
            roles: vec![Role::Clinician],
            patients: vec![],
            csrf: "t".into(),
            purpose: Some("TREAT".into()),
            break_glass: Default::default(),
            how: "development".into(),
            fhir_user: None,
        });
        let html = ChartPage {
            frame: Frame::of(&session, &format!("Patient {patient}"), ""),
            view,
        }
        .render()
        .unwrap();
        for raw in [
            "<script>alert",
            "<img src=x",
            "<svg onload",
            "<b>bold",
            "<i>x",
            "P<script>",
            "href=\"javascript:",
        ] {
            assert!(!html.contains(raw), "{raw} reached the page");
        }
        assert!(
            html.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
            "the note text is shown: {html}"
        );
        assert!(html.contains("&#60;svg onload=alert(3)&#62;"));
        // The HTML document downloads, under a name made of safe characters only.
        assert!(
            html.contains("download=\"___img_src_x_onerror_alert_2__.html\""),
            "{html}"
        );
        assert!(html.contains("/ui/patients/P%3Cscript%3E1/documents/obj-1"));
    }
}
