//! The records manager's page: the policy in force and its versions, the latest plan as
//! charts (rows per tier per year, patients per tier per table) with what changed since the
//! plan before it (by table and reason), legal holds (place, release with a reason), and the
//! last run's and the destruction reports.

use super::bars::{stacked, Bars};
use super::pages::{render, require, Frame, PageError};
use super::session::Session;
use crate::audit::{noted, AuditNote};
use crate::auth::Role;
use crate::error::ApiError;
use crate::routes::{decide_destruction_list, hold_scope, release_active_hold};
use crate::state::AppState;
use askama::Template;
use axum::extract::{Extension, Form, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Redirect, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use strata_control::RequestStatus;
use strata_cutoff_policies::HoldScope;

/// A policy version shown.
pub(crate) struct PolicyView {
    version: String,
    author: String,
    stored_at: String,
    hash: String,
    text: String,
}

/// A table's rows per tier.
pub(crate) struct TableRow {
    table: String,
    source: u64,
    operational: u64,
    archive: u64,
    purge: u64,
    quarantine: u64,
    held: u64,
}

/// A reason's rows in a table, before and now.
pub(crate) struct ChangeRow {
    table: String,
    reason: String,
    before: u64,
    after: u64,
    delta: String,
}

/// The latest plan.
pub(crate) struct PlanView {
    created_at: String,
    as_of: String,
    policy_version: String,
    years: Bars,
    /// Distinct patients per tier by year (whatever their tables); empty for a plan made
    /// before Strata counted them.
    patient_years: Bars,
    patients: Bars,
    tables: Vec<TableRow>,
    changes: Vec<ChangeRow>,
    /// When the plan compared with was made.
    compared_with: Option<String>,
}

/// A hold shown.
pub(crate) struct HoldView {
    id: String,
    scope: String,
    reason: String,
    placed_by: String,
    placed_at: String,
    /// Who released it, when, why.
    released: Option<(String, String, String)>,
}

/// A destruction record shown.
pub(crate) struct DestructionView {
    table: String,
    rows: u64,
    run: String,
    policy_version: String,
    key_checksum: String,
    void: bool,
}

/// A destruction list shown.
pub(crate) struct RequestView {
    id: String,
    kind: String,
    requested_by: String,
    requested_at: String,
    policy_version: String,
    /// Records on the list (the summary's `rows`, summed over its tables).
    records: u64,
    /// Per table, as `table: n`, and the day retention was reckoned from: what is approved.
    tables: String,
    as_of: String,
    status: &'static str,
    /// Who decided it, when, their note.
    decision: Option<(String, String, String)>,
    /// Whether the signed-in user requested it (and so cannot decide it).
    own: bool,
    /// Whether it was carried out and certified.
    certified: bool,
}

/// Records on a destruction list: its summary's tables' `rows`.
fn listed_records(summary: &Value) -> u64 {
    summary["tables"]
        .as_object()
        .map(|tables| tables.values().map(|t| number(t, "rows")).sum())
        .unwrap_or(0)
}

#[derive(Template)]
#[template(path = "records.html")]
struct RecordsPage {
    frame: Frame,
    notice: Option<String>,
    policy: Option<PolicyView>,
    older_policies: Vec<PolicyView>,
    plan: Option<PlanView>,
    holds: Vec<HoldView>,
    requests: Vec<RequestView>,
    last_run: Option<(String, Vec<TableRow>)>,
    destructions: Vec<DestructionView>,
}

fn number(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn table_rows(report: &Value) -> Vec<TableRow> {
    report["tables"]
        .as_array()
        .map(|tables| {
            tables
                .iter()
                .map(|t| TableRow {
                    table: t["table"].as_str().unwrap_or("").to_string(),
                    source: number(t, "source_rows"),
                    operational: number(t, "operational_rows"),
                    archive: number(t, "archive_rows"),
                    purge: number(t, "purged_rows"),
                    quarantine: number(t, "quarantined_rows"),
                    held: number(t, "held_rows"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Rows per reason per table of a plan report.
fn reasons(report: &Value) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for t in report["tables"].as_array().into_iter().flatten() {
        let table = t["table"].as_str().unwrap_or("").to_string();
        for (reason, n) in t["reasons"].as_object().into_iter().flatten() {
            out.insert((table.clone(), reason.clone()), n.as_u64().unwrap_or(0));
        }
    }
    out
}

/// The plan view of `report`, compared with `previous` (made at `previous_at`).
fn plan_view(created_at: String, report: &Value, previous: Option<(&Value, String)>) -> PlanView {
    let mut years: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    for t in report["tables"].as_array().into_iter().flatten() {
        for (year, rows) in t["years"].as_object().into_iter().flatten() {
            let y = years.entry(year.clone()).or_default();
            y[0] += number(rows, "operational");
            y[1] += number(rows, "archive");
            y[2] += number(rows, "purge");
        }
    }
    let years: Vec<(String, [u64; 3])> = years.into_iter().collect();
    let patient_years: Vec<(String, [u64; 3])> = report["patients_by_year"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(year, p)| {
            (
                year.clone(),
                [
                    number(p, "operational"),
                    number(p, "archive"),
                    number(p, "purge"),
                ],
            )
        })
        .collect();
    let patients: Vec<(String, [u64; 3])> = report["tables"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let p = &t["patients"];
            (
                t["table"].as_str().unwrap_or("").to_string(),
                [
                    number(p, "operational"),
                    number(p, "archive"),
                    number(p, "purge"),
                ],
            )
        })
        .filter(|(_, v)| v.iter().sum::<u64>() > 0)
        .collect();
    let (changes, compared_with) = match previous {
        Some((before, at)) => {
            let (now, then) = (reasons(report), reasons(before));
            let mut keys: Vec<&(String, String)> = now.keys().chain(then.keys()).collect();
            keys.sort();
            keys.dedup();
            let changes = keys
                .into_iter()
                .filter_map(|k| {
                    let (b, a) = (
                        then.get(k).copied().unwrap_or(0),
                        now.get(k).copied().unwrap_or(0),
                    );
                    (a != b).then(|| ChangeRow {
                        table: k.0.clone(),
                        reason: k.1.replace('_', " "),
                        before: b,
                        after: a,
                        delta: format!("{:+}", a as i64 - b as i64),
                    })
                })
                .collect();
            (changes, Some(at))
        }
        None => (Vec::new(), None),
    };
    PlanView {
        created_at,
        as_of: report["as_of"].as_str().unwrap_or("").to_string(),
        policy_version: report["policy_version"].as_str().unwrap_or("").to_string(),
        years: stacked(&years),
        patient_years: stacked(&patient_years),
        patients: stacked(&patients),
        tables: table_rows(report),
        changes,
        compared_with,
    }
}

/// A hold's scope as people read it.
fn scope_text(scope: &HoldScope) -> String {
    match scope {
        HoldScope::Patient(p) => format!("patient {p}"),
        HoldScope::Table(t) => format!("table {t}"),
        HoldScope::Filter {
            table,
            column,
            value,
        } => format!("table {table} where {column} = {value}"),
    }
}

fn records_manager(session: &Session) -> Result<(), PageError> {
    require(session, &[Role::RecordsManager, Role::Admin])
}

/// Query of `GET /ui/records`: what the last action did.
#[derive(Debug, Deserialize)]
pub(crate) struct Notice {
    #[serde(default)]
    done: Option<String>,
}

/// `GET /ui/records`.
pub(crate) async fn page(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Query(q): Query<Notice>,
) -> Result<Response, PageError> {
    records_manager(&session)?;
    let c = &state.control;
    let mut versions: Vec<PolicyView> = c
        .policy_versions()
        .await?
        .into_iter()
        .map(|v| PolicyView {
            version: v.version,
            author: v.author,
            stored_at: v.stored_at,
            hash: v.policy_hash.chars().take(12).collect(),
            text: v.policy_text,
        })
        .collect();
    let policy = (!versions.is_empty()).then(|| versions.remove(0));
    let plans = c.recent_plans::<Value>(2).await?;
    let plan = plans.first().map(|latest| {
        plan_view(
            latest.created_at.clone(),
            &latest.report,
            plans.get(1).map(|p| (&p.report, p.created_at.clone())),
        )
    });
    let holds: Vec<HoldView> = c
        .holds()
        .await?
        .into_iter()
        .map(|h| HoldView {
            id: h.hold_id,
            scope: scope_text(&h.scope),
            reason: h.reason,
            placed_by: h.placed_by,
            placed_at: h.placed_at,
            released: h.released,
        })
        .collect();
    let requests = c
        .destruction_requests()
        .await?
        .into_iter()
        .map(|r| RequestView {
            own: strata_control::same_person(&r.requested_by, &session.data.user),
            certified: r.certificate.is_some(),
            records: listed_records(&r.summary),
            tables: r.summary["tables"]
                .as_object()
                .map(|t| {
                    t.iter()
                        .map(|(name, l)| format!("{name}: {}", number(l, "rows")))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default(),
            as_of: text(&r.summary, "as_of"),
            status: match r.status {
                RequestStatus::Pending => "pending",
                RequestStatus::Approved => "approved",
                RequestStatus::Rejected => "rejected",
                RequestStatus::Done => "destroyed",
            },
            id: r.request_id,
            kind: r.kind,
            requested_by: r.requested_by,
            requested_at: r.requested_at,
            policy_version: r.policy_version,
            decision: r.decision,
        })
        .collect();
    let last_run = c
        .last_finished_run_report::<Value>()
        .await?
        .map(|(run, report)| (run, table_rows(&report)));
    let destructions = c
        .destructions()
        .await?
        .into_iter()
        .map(|(d, _)| DestructionView {
            table: d.table,
            rows: d.rows,
            run: d.run_id,
            policy_version: d.policy_version,
            key_checksum: d.key_checksum.chars().take(20).collect(),
            void: d.void.is_some(),
        })
        .collect();
    let detail = json!({ "view": "records management", "holds": holds.len() });
    let page = render(
        StatusCode::OK,
        &RecordsPage {
            frame: Frame::of(&session, "Records management", "/ui/records"),
            notice: q.done.map(|d| match d.as_str() {
                "placed" => "The legal hold is placed.".to_string(),
                "released" => "The legal hold is released.".to_string(),
                "approved" => {
                    "The destruction list is approved: the next pass destroys it.".to_string()
                }
                "rejected" => {
                    "The destruction list is rejected: nothing of it is destroyed.".to_string()
                }
                _ => String::new(),
            }),
            policy,
            older_policies: versions,
            plan,
            holds,
            requests,
            last_run,
            destructions,
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

/// Form of `POST /ui/records/holds`.
#[derive(Debug, Deserialize)]
pub(crate) struct NewHold {
    csrf: String,
    #[serde(default)]
    patient: String,
    #[serde(default)]
    table: String,
    #[serde(default)]
    column: String,
    #[serde(default)]
    value: String,
    reason: String,
}

fn given(s: String) -> Option<String> {
    let s = s.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// `POST /ui/records/holds`: places a legal hold.
pub(crate) async fn place_hold(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Form(form): Form<NewHold>,
) -> Result<Response, PageError> {
    session.check_csrf(&form.csrf)?;
    records_manager(&session)?;
    let column = given(form.column);
    let value = if column.is_some() {
        given(form.value)
    } else {
        None
    };
    let scope = hold_scope(given(form.patient), given(form.table), column, value)?;
    let reason = form.reason.trim();
    if reason.is_empty() {
        return Err(ApiError::BadRequest("a legal hold needs a reason".into()).into());
    }
    let id = state
        .control
        .place_hold(&scope, reason, &session.data.user)
        .await?;
    let patient = match &scope {
        HoldScope::Patient(p) => Some(p.clone()),
        _ => None,
    };
    Ok(noted(
        Redirect::to("/ui/records?done=placed#holds"),
        AuditNote {
            access: None,
            detail: json!({ "hold": id, "patient": patient }),
        },
    ))
}

/// Form of `POST /ui/records/holds/{hold}/release`.
#[derive(Debug, Deserialize)]
pub(crate) struct ReleaseHold {
    csrf: String,
    reason: String,
}

/// `POST /ui/records/holds/{hold}/release`: releases an active hold, with a reason.
pub(crate) async fn release_hold(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(hold): Path<String>,
    Form(form): Form<ReleaseHold>,
) -> Result<Response, PageError> {
    session.check_csrf(&form.csrf)?;
    records_manager(&session)?;
    release_active_hold(&state, &hold, &form.reason, &session.data.user).await?;
    Ok(noted(
        Redirect::to("/ui/records?done=released#holds"),
        AuditNote {
            access: None,
            detail: json!({ "hold": hold, "released": true }),
        },
    ))
}

/// Form of `POST /ui/records/destructions/{request}/decision`.
#[derive(Debug, Deserialize)]
pub(crate) struct Decision {
    csrf: String,
    /// `approve` or `reject`.
    decision: String,
    note: String,
}

/// `POST /ui/records/destructions/{request}/decision`: a records manager approves or rejects a
/// pending destruction list (never their own).
pub(crate) async fn decide_destruction(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(request): Path<String>,
    Form(form): Form<Decision>,
) -> Result<Response, PageError> {
    session.check_csrf(&form.csrf)?;
    records_manager(&session)?;
    let approve = match form.decision.as_str() {
        "approve" => true,
        "reject" => false,
        _ => return Err(ApiError::BadRequest("approve or reject".into()).into()),
    };
    decide_destruction_list(&state, &request, &session.data.user, approve, &form.note).await?;
    let done = if approve { "approved" } else { "rejected" };
    Ok(noted(
        Redirect::to(&format!("/ui/records?done={done}#destruction")),
        AuditNote {
            access: None,
            detail: json!({ "destruction_request": request, "approve": approve }),
        },
    ))
}

/// A destruction certificate shown (from its JSON: see `strata_ingest::DestructionCertificate`).
pub(crate) struct CertificateView {
    request_id: String,
    kind: String,
    policy_version: String,
    policy_hash: String,
    rules: Vec<String>,
    as_of: String,
    requested_by: String,
    requested_at: String,
    approved_by: String,
    approved_at: String,
    destroyed_at: String,
    kept_by_holds: u64,
    files_replaced: usize,
    keys_destroyed_at: Option<String>,
    tables: Vec<CertificateTable>,
    /// Algorithm, public key, signature.
    signature: Option<(String, String, String)>,
}

/// One table of a certificate.
pub(crate) struct CertificateTable {
    table: String,
    rows: u64,
    key_min: String,
    key_max: String,
    key_checksum: String,
    value_checksum: String,
}

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

impl CertificateView {
    fn of(c: &Value) -> Self {
        CertificateView {
            request_id: text(c, "request_id"),
            kind: text(c, "kind"),
            policy_version: text(c, "policy_version"),
            policy_hash: text(c, "policy_hash"),
            rules: c["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect(),
            as_of: text(c, "as_of"),
            requested_by: text(c, "requested_by"),
            requested_at: text(c, "requested_at"),
            approved_by: text(c, "approved_by"),
            approved_at: text(c, "approved_at"),
            destroyed_at: text(c, "destroyed_at"),
            kept_by_holds: number(c, "kept_by_holds"),
            files_replaced: c["files_replaced"].as_array().map_or(0, Vec::len),
            keys_destroyed_at: c["keys_destroyed_at"].as_str().map(str::to_string),
            tables: c["tables"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| CertificateTable {
                    table: text(t, "table"),
                    rows: number(t, "rows"),
                    key_min: text(t, "key_min"),
                    key_max: text(t, "key_max"),
                    key_checksum: text(t, "key_checksum"),
                    value_checksum: text(t, "value_checksum"),
                })
                .collect(),
            signature: c["signature"].is_object().then(|| {
                let s = &c["signature"];
                (
                    text(s, "algorithm"),
                    text(s, "public_key"),
                    text(s, "value"),
                )
            }),
        }
    }
}

#[derive(Template)]
#[template(path = "certificate.html")]
struct CertificatePage {
    c: CertificateView,
}

/// `GET /ui/records/destructions/{request}/certificate`: a carried-out list's certificate, as a
/// printable page.
pub(crate) async fn certificate(
    State(state): State<AppState>,
    Extension(session): Extension<Session>,
    Path(request): Path<String>,
) -> Result<Response, PageError> {
    records_manager(&session)?;
    let certificate = state
        .control
        .destruction_request(&request)
        .await?
        .and_then(|r| r.certificate)
        .ok_or(ApiError::NotFound)?;
    let page = render(
        StatusCode::OK,
        &CertificatePage {
            c: CertificateView::of(&certificate),
        },
    );
    Ok(noted(
        page,
        AuditNote {
            access: None,
            detail: json!({ "destruction_certificate": request }),
        },
    ))
}
