//! The auditor's pages: the audit log with filters and the chain's status, the
//! break-the-glass review list (mark reviewed, with a note; the marking is itself audited),
//! and a patient's accounting of disclosures with the fields HIPAA 164.528 asks for (date,
//! recipient, description, purpose), printable.

use super::pages::{render, require, Frame, PageError};
use super::session::Session;
use crate::audit::{noted, AuditNote};
use crate::auth::Role;
use crate::error::ApiError;
use crate::routes::is_disclosure;
use crate::state::AppState;
use askama::Template;
use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Redirect, Response};
use serde::Deserialize;
use serde_json::json;
use strata_control::{AuditQuery, AuditRecord, Outcome};

/// Entries a page shows.
const PAGE: i64 = 200;

fn auditor(session: &Session) -> Result<(), PageError> {
    require(session, &[Role::Auditor, Role::Admin])
}

/// An audit entry shown.
pub(crate) struct EntryView {
    seq: i64,
    at: String,
    user: String,
    roles: String,
    purpose: String,
    patient: String,
    action: String,
    status: u16,
    outcome: &'static str,
    break_glass: String,
    detail: String,
}

fn outcome_text(o: Outcome) -> &'static str {
    match o {
        Outcome::Allowed => "allowed",
        Outcome::Denied => "denied",
        Outcome::Failed => "failed",
    }
}

fn entry_view(e: AuditRecord) -> EntryView {
    EntryView {
        seq: e.seq,
        at: e.at,
        user: e.entry.user,
        roles: e.entry.roles,
        purpose: e.entry.purpose.unwrap_or_default(),
        patient: e.entry.patient.unwrap_or_default(),
        action: e.entry.action,
        status: e.entry.status,
        outcome: outcome_text(e.entry.outcome),
        break_glass: e.entry.break_glass.unwrap_or_default(),
        detail: if e.entry.detail.is_null() {
            String::new()
        } else {
            e.entry.detail.to_string()
        },
    }
}

/// Filters of `GET /ui/audit` (empty: not set).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogFilters {
    #[serde(default)]
    user: String,
    #[serde(default)]
    patient: String,
    #[serde(default)]
    outcome: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    break_glass: Option<String>,
    #[serde(default)]
    after: Option<i64>,
    /// Set to walk the chain and show its status.
    #[serde(default)]
    verify: Option<String>,
}

/// The `until` of a query from a day chosen as the last to include (the log's `until` is
/// exclusive, an instant): the next day's start.
fn through_day(day: &str) -> Result<Option<String>, PageError> {
    let Some(day) = given(day) else {
        return Ok(None);
    };
    let date = chrono::NaiveDate::parse_from_str(&day, "%Y-%m-%d")
        .map_err(|_| ApiError::BadRequest("until must be a date, YYYY-MM-DD".into()))?;
    Ok(Some((date + chrono::Days::new(1)).to_string()))
}

fn given(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// The chain's status, when asked.
pub(crate) struct ChainView {
    ok: bool,
    entries: u64,
    problems: Vec<String>,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    frame: Frame,
    filters: LogFilters,
    entries: Vec<EntryView>,
    next: Option<String>,
    chain: Option<ChainView>,
}

/// `GET /ui/audit`: the audit log, filtered, a page at a time (oldest first).
pub(crate) async fn log(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Query(f): Query<LogFilters>,
    uri: axum::http::Uri,
) -> Result<Response, PageError> {
    auditor(&session)?;
    let outcome = match f.outcome.as_str() {
        "" => None,
        "allowed" => Some(Outcome::Allowed),
        "denied" => Some(Outcome::Denied),
        "failed" => Some(Outcome::Failed),
        _ => {
            return Err(ApiError::BadRequest("outcome is allowed, denied or failed".into()).into())
        }
    };
    let entries = state
        .audit
        .list(&AuditQuery {
            after_seq: f.after,
            limit: Some(PAGE),
            user: given(&f.user),
            patient: given(&f.patient),
            outcome,
            since: given(&f.since),
            until: through_day(&f.until)?,
            break_glass_only: f.break_glass.is_some(),
        })
        .await?;
    let next = (entries.len() as i64 == PAGE)
        .then(|| entries.last().map(|e| e.seq))
        .flatten()
        .map(|seq| {
            let query = uri.query().unwrap_or("");
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| !p.is_empty() && !p.starts_with("after=") && !p.starts_with("verify="))
                .collect();
            format!(
                "/ui/audit?{}after={seq}",
                kept.iter().map(|p| format!("{p}&")).collect::<String>()
            )
        });
    let chain = match f.verify {
        Some(_) => {
            let report = state.audit.verify().await?;
            Some(ChainView {
                ok: report.ok(),
                entries: report.entries,
                problems: report.problems.iter().map(|p| format!("{p:?}")).collect(),
            })
        }
        None => None,
    };
    let detail =
        json!({ "view": "audit log", "entries": entries.len(), "verified": chain.is_some() });
    let page = render(
        StatusCode::OK,
        &AuditPage {
            frame: Frame::of(&session, "Audit log", "/ui/audit"),
            entries: entries.into_iter().map(entry_view).collect(),
            filters: f,
            next,
            chain,
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

/// A break-the-glass read to review.
pub(crate) struct FlaggedView {
    entry: EntryView,
    /// Who reviewed it, when, with what note.
    review: Option<(String, String, String)>,
}

#[derive(Template)]
#[template(path = "break_glass_review.html")]
struct ReviewPage {
    frame: Frame,
    flagged: Vec<FlaggedView>,
    pending: usize,
}

/// Every entry `q` selects, oldest first, read a thousand at a time.
async fn every_entry(state: &AppState, mut q: AuditQuery) -> Result<Vec<AuditRecord>, ApiError> {
    let mut all = Vec::new();
    loop {
        q.limit = Some(1000);
        let page = state.audit.list(&q).await?;
        let full = page.len() == 1000;
        q.after_seq = page.last().map(|e| e.seq);
        all.extend(page);
        if !full {
            return Ok(all);
        }
    }
}

/// `GET /ui/audit/break-glass`: every read that broke the glass, with its review.
pub(crate) async fn reviews(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
) -> Result<Response, PageError> {
    auditor(&session)?;
    let flagged = every_entry(
        &state,
        AuditQuery {
            break_glass_only: true,
            ..Default::default()
        },
    )
    .await?;
    let seqs: Vec<i64> = flagged.iter().map(|e| e.seq).collect();
    let reviews = state.control.break_glass_reviews(&seqs).await?;
    let mut flagged: Vec<FlaggedView> = flagged
        .into_iter()
        .map(|e| {
            let review = reviews
                .iter()
                .find(|r| r.seq == e.seq)
                .map(|r| (r.reviewed_by.clone(), r.reviewed_at.clone(), r.note.clone()));
            FlaggedView {
                entry: entry_view(e),
                review,
            }
        })
        .collect();
    // Those waiting for a review first, newest first within each.
    flagged.sort_by(|a, b| {
        a.review
            .is_some()
            .cmp(&b.review.is_some())
            .then(b.entry.seq.cmp(&a.entry.seq))
    });
    let pending = flagged.iter().filter(|f| f.review.is_none()).count();
    let detail =
        json!({ "view": "break-the-glass review", "entries": flagged.len(), "pending": pending });
    let page = render(
        StatusCode::OK,
        &ReviewPage {
            frame: Frame::of(&session, "Break-the-glass review", "/ui/audit/break-glass"),
            flagged,
            pending,
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

/// Form of `POST /ui/audit/break-glass/{seq}/review`.
#[derive(Debug, Deserialize)]
pub(crate) struct ReviewForm {
    csrf: String,
    note: String,
}

/// `POST /ui/audit/break-glass/{seq}/review`: marks a flagged read reviewed, with a note.
pub(crate) async fn review(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(seq): Path<i64>,
    Form(form): Form<ReviewForm>,
) -> Result<Response, PageError> {
    session.check_csrf(&form.csrf)?;
    auditor(&session)?;
    let note = crate::access::cleaned_reason(&form.note)
        .ok_or_else(|| ApiError::BadRequest("a review needs a note".into()))?;
    let entry = state
        .audit
        .list(&AuditQuery {
            after_seq: Some(seq - 1),
            limit: Some(1),
            break_glass_only: true,
            ..Default::default()
        })
        .await?;
    if entry.first().map(|e| e.seq) != Some(seq) {
        return Err(ApiError::NotFound.into());
    }
    let first = state
        .control
        .review_break_glass(seq, &session.data.user, &note)
        .await?;
    Ok(noted(
        Redirect::to("/ui/audit/break-glass"),
        AuditNote {
            access: None,
            detail: json!({ "reviewed": seq, "note": note, "first_review": first }),
        },
    ))
}

/// A disclosure as HIPAA 164.528 lists it.
pub(crate) struct DisclosureView {
    at: String,
    recipient: String,
    description: String,
    purpose: String,
    break_glass: String,
    seq: i64,
}

/// What a disclosure made known, from its audited detail.
fn description(action: &str, detail: &serde_json::Value) -> String {
    let records = detail.get("records").and_then(|r| r.as_u64());
    let what = if action.contains("/documents/") {
        "a document".to_string()
    } else if action.ends_with("/print") {
        match records {
            Some(n) => format!("a printed copy of the archived chart ({n} records)"),
            None => "the print form (no records)".into(),
        }
    } else {
        match records {
            Some(n) => format!("{n} archived records"),
            None => "archived records".into(),
        }
    };
    let range = match (
        detail.get("from").and_then(|v| v.as_str()),
        detail.get("to").and_then(|v| v.as_str()),
    ) {
        (Some(f), Some(t)) => format!(", dated {f} to {t}"),
        (Some(f), None) => format!(", dated from {f}"),
        (None, Some(t)) => format!(", dated up to {t}"),
        (None, None) => String::new(),
    };
    let through = if action.contains(" /ui/") {
        "viewer"
    } else {
        "API"
    };
    format!("{what}{range} ({through})")
}

#[derive(Template)]
#[template(path = "disclosures.html")]
struct DisclosuresPage {
    frame: Frame,
    patient: String,
    disclosures: Vec<DisclosureView>,
    printed_at: String,
}

/// Query of `GET /ui/audit/disclosures`.
#[derive(Debug, Deserialize)]
pub(crate) struct DisclosureQuery {
    #[serde(default)]
    patient: String,
}

/// `GET /ui/audit/disclosures?patient=`: the patient's accounting of disclosures.
pub(crate) async fn disclosures(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Query(q): Query<DisclosureQuery>,
) -> Result<Response, PageError> {
    auditor(&session)?;
    let patient = q.patient.trim().to_string();
    let mut disclosures = Vec::new();
    if !patient.is_empty() {
        let entries = every_entry(
            &state,
            AuditQuery {
                patient: Some(patient.clone()),
                outcome: Some(Outcome::Allowed),
                ..Default::default()
            },
        )
        .await?;
        for e in entries {
            if !is_disclosure(&e.entry) {
                continue;
            }
            let d = &e.entry.detail;
            let recipient = d
                .get("recipient")
                .and_then(|r| r.as_str())
                .map(|r| format!("{r} (released by {})", e.entry.user))
                .unwrap_or_else(|| format!("{} ({})", e.entry.user, e.entry.roles));
            let purpose = match d.get("reason").and_then(|r| r.as_str()) {
                Some(reason) => {
                    format!("{}: {reason}", e.entry.purpose.clone().unwrap_or_default())
                }
                None => e.entry.purpose.clone().unwrap_or_default(),
            };
            disclosures.push(DisclosureView {
                at: e.at.clone(),
                recipient,
                description: description(&e.entry.action, d),
                purpose,
                break_glass: e.entry.break_glass.clone().unwrap_or_default(),
                seq: e.seq,
            });
        }
    }
    let detail = json!({ "view": "accounting of disclosures", "disclosures": disclosures.len() });
    let page = render(
        StatusCode::OK,
        &DisclosuresPage {
            frame: Frame::of(
                &session,
                "Accounting of disclosures",
                "/ui/audit/disclosures",
            ),
            patient: patient.clone(),
            disclosures,
            printed_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        },
    );
    // The accounting names the patient: it is recorded under their key.
    let mut response = noted(
        page,
        AuditNote {
            access: None,
            detail,
        },
    );
    if !patient.is_empty() {
        response
            .extensions_mut()
            .insert(crate::audit::AuditedPatient(patient));
    }
    Ok(response)
}
