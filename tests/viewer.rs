//! The archive viewer over HTTP, on a migrated archive: the development sign-in (loopback
//! only), the purpose of use, a chart and its documents, break-the-glass, print as a
//! disclosure, CSRF, session fixation and the idle timeout — each checked in the audit log.

use super::api::{api_config, fixture_with, Fixture};
use super::*;
use sha2::Digest;
use std::collections::BTreeMap;
use strata_control::AuditQuery;

/// A browser as far as these tests need one: keeps cookies, does not follow redirects, and
/// says where its forms come from (`Origin`), as browsers do.
struct Browser {
    client: reqwest::Client,
    base: String,
    cookies: BTreeMap<String, String>,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn location(&self) -> &str {
        self.headers
            .get("location")
            .map_or("", |l| l.to_str().unwrap())
    }
}

impl Browser {
    fn new(base: &str) -> Self {
        Browser {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            base: base.to_string(),
            cookies: BTreeMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> Reply {
        let request = if self.cookies.is_empty() {
            request
        } else {
            request.header("cookie", self.cookie_header())
        };
        let response = request.send().await.unwrap();
        for set in response.headers().get_all("set-cookie") {
            let set = set.to_str().unwrap();
            let (pair, attributes) = set.split_once(';').unwrap_or((set, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attributes.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_string(), value.to_string());
            }
        }
        Reply {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: response.bytes().await.unwrap().to_vec(),
        }
    }

    async fn get(&mut self, path: &str) -> Reply {
        let request = self.client.get(format!("{}{path}", self.base));
        self.send(request).await
    }

    async fn get_with(&mut self, path: &str, header: (&str, &str)) -> Reply {
        let request = self
            .client
            .get(format!("{}{path}", self.base))
            .header(header.0, header.1);
        self.send(request).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Reply {
        let request = self
            .client
            .post(format!("{}{path}", self.base))
            .header("origin", self.base.clone())
            .form(form);
        self.send(request).await
    }

    /// Signs in with the development sign-in as `role`, with `patients` in care.
    async fn sign_in(&mut self, user: &str, role: &str, patients: &str) -> Reply {
        let page = self.get("/ui/sign-in").await;
        assert_eq!(page.status, 200);
        let csrf = hidden(&page.text(), "csrf");
        self.post(
            "/ui/dev-sign-in",
            &[
                ("csrf", &csrf),
                ("user", user),
                ("role", role),
                ("patients", patients),
                ("next", "/ui/"),
            ],
        )
        .await
    }
}

/// The value of the hidden input `name` in `html`.
fn hidden(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} in {html}"))
        + marker.len();
    html[start..start + html[start..].find('"').unwrap()].to_string()
}

/// Serves `state` (of `f`) with `config` on loopback over HTTP; returns its base URL and what
/// stops it.
pub async fn serve(
    config: &strata_archive_api::ApiConfig,
    f: &Fixture,
    state: strata_archive_api::AppState,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = strata_archive_api::serve(config, f.dir.path(), state, async {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    (format!("http://{}", serving.addr), stop)
}

/// An API fixture with the viewer's development sign-in, served on loopback over HTTP (with
/// `extra` config, and sessions idle out after `idle_secs` when given).
pub async fn served(
    extra: &str,
    idle_secs: Option<u64>,
) -> (Fixture, String, tokio::sync::oneshot::Sender<()>) {
    let config = api_config(&format!("[viewer]\ndev_sign_in = true\n{extra}"));
    let mut f = fixture_with(config.clone()).await;
    if let Some(secs) = idle_secs {
        f.state.viewer.idle_secs = secs;
    }
    let (base, stop) = serve(&config, &f, f.state.clone()).await;
    (f, base, stop)
}

#[tokio::test]
async fn a_clinician_signs_in_states_a_purpose_and_reads_a_chart_and_its_documents() {
    let (f, base, _stop) = served("", None).await;
    let mut b = Browser::new(&base);
    // Not signed in: the chart asks to sign in, and comes back.
    let r = b.get(&format!("/ui/patients/{}", f.patient)).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(
        r.location(),
        format!("/ui/sign-in?next=%2Fui%2Fpatients%2F{}", f.patient)
    );
    let r = b.sign_in("ada", "clinician", &f.patient).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.location(), "/ui/");
    assert!(b.cookies.contains_key("strata_session"), "{:?}", b.cookies);
    let start = b.get("/ui/").await;
    assert!(
        start
            .text()
            .contains("Signed in as <strong>dev:ada</strong>"),
        "{}",
        start.text()
    );
    assert!(
        start.text().contains("Development sign-in"),
        "a development session says so"
    );
    // The purpose is asked once.
    let chart = format!("/ui/patients/{}", f.patient);
    let r = b.get(&chart).await;
    assert_eq!(r.status, 303);
    assert!(
        r.location().starts_with("/ui/purpose?next="),
        "{}",
        r.location()
    );
    let page = b.get(r.location()).await;
    let csrf = hidden(&page.text(), "csrf");
    let r = b
        .post(
            "/ui/purpose",
            &[("csrf", &csrf), ("purpose", "TREAT"), ("next", &chart)],
        )
        .await;
    assert_eq!((r.status, r.location()), (303, chart.as_str()));
    let page = b.get(&chart).await;
    assert_eq!(page.status, 200, "{}", page.text());
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'")
            && !csp.contains("unsafe-inline")
            && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert_eq!(page.headers["cache-control"], "no-store");
    assert_eq!(page.headers["referrer-policy"], "same-origin");
    let html = page.text();
    assert!(!html.contains("<script>"), "no inline script");
    assert!(!html.contains("style=\""), "no inline style");
    for section in ["Lab results", "Documents"] {
        assert!(html.contains(section), "{section} in the chart");
    }
    // The records shown are the archive's: the chart's count is the JSON history's.
    let token = f.idp.user(
        "ada-api",
        strata_archive_api::Role::Clinician,
        &[&f.patient],
    );
    let (_, _, body) = super::api::call(
        &f.app,
        axum::http::Method::GET,
        &format!("/v1/patients/{}/history?limit=1", f.patient),
        Some(&token),
        &[("x-purpose-of-use", "TREAT")],
        None,
    )
    .await;
    let total = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["total"]
        .as_u64()
        .unwrap();
    assert!(
        html.contains(&format!("{total} of {total} archived records shown")),
        "{total}"
    );
    // The document opens with the archived bytes, whole and by range.
    let href = format!("/ui/patients/{}/documents/{}", f.patient, f.document);
    assert!(html.contains(&href), "the chart links the document");
    let reference = document_reference(&f).await;
    let doc = b.get(&href).await;
    assert_eq!(doc.status, 200);
    assert_eq!(
        hex::encode(sha2::Sha256::digest(&doc.body)),
        reference.sha256
    );
    assert!(doc.headers["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with(
            if reference.content_type == "application/pdf"
                || reference.content_type.starts_with("image/")
            {
                "inline"
            } else {
                "attachment"
            }
        ));
    let part = b.get_with(&href, ("range", "bytes=0-9")).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, doc.body[..10]);
    // Each read is in the audit log under the session's user, with its purpose; the chart
    // and the document are disclosures of the patient.
    let entries = audit(&f, &f.patient).await;
    let reads: Vec<_> = entries
        .iter()
        .filter(|e| e.entry.user == "dev:ada" && e.entry.status < 300)
        .map(|e| (e.entry.action.as_str(), e.entry.purpose.as_deref()))
        .collect();
    assert!(
        reads.contains(&("GET /ui/patients/{patient}", Some("TREAT"))),
        "{reads:?}"
    );
    assert!(
        reads.contains(&(
            "GET /ui/patients/{patient}/documents/{document}",
            Some("TREAT")
        )),
        "{reads:?}"
    );
    let (actions, _) = disclosed_actions(&f, "dev:ada").await;
    assert!(
        actions.iter().any(|a| a == "GET /ui/patients/{patient}"),
        "{actions:?}"
    );
    // Signing out ends the session: the cookie no longer opens anything.
    let start = b.get("/ui/").await;
    let csrf = hidden(&start.text(), "csrf");
    let old = b.cookies["strata_session"].clone();
    let r = b.post("/ui/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(r.status, 303);
    assert!(!b.cookies.contains_key("strata_session"));
    b.cookies.insert("strata_session".into(), old);
    assert_eq!(
        b.get(&chart).await.status,
        303,
        "a signed-out session is gone"
    );
}

/// The archived reference of the fixture's document.
pub async fn document_reference(f: &Fixture) -> strata_archive::BlobRef {
    for m in &f.archive.catalog().tables["documents"] {
        for file in &m.files {
            for batch in f.archive.read_file(file).await.unwrap() {
                let blob_columns = f.archive.catalog().blob_columns("documents");
                let b = strata_archive::ArchivedBatch::new(&batch, &blob_columns);
                for row in 0..b.num_rows() {
                    for (_, r) in b.blobs(row) {
                        if r.object == f.document {
                            return r;
                        }
                    }
                }
            }
        }
    }
    panic!("the fixture's document is archived")
}

/// The audit log's entries about `patient`, oldest first.
async fn audit(f: &Fixture, patient: &str) -> Vec<strata_control::AuditRecord> {
    f.state
        .audit
        .list(&AuditQuery {
            patient: Some(patient.to_string()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Signs in a clinician with `f.patient` in care and purpose TREAT; returns the browser.
async fn clinician(f: &Fixture, base: &str, user: &str) -> Browser {
    let mut b = Browser::new(base);
    assert_eq!(b.sign_in(user, "clinician", &f.patient).await.status, 303);
    let page = b.get("/ui/purpose").await;
    let csrf = hidden(&page.text(), "csrf");
    let r = b
        .post(
            "/ui/purpose",
            &[("csrf", &csrf), ("purpose", "TREAT"), ("next", "/ui/")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    b
}

#[tokio::test]
async fn break_the_glass_asks_a_reason_and_a_print_is_a_disclosure_with_its_recipient() {
    let (f, base, _stop) = served("", None).await;
    let mut b = clinician(&f, &base, "bea").await;
    // Another patient: the break-the-glass form, refused and audited as denied.
    let chart = format!("/ui/patients/{}", f.other);
    let page = b.get(&chart).await;
    assert_eq!(page.status, 403);
    let html = page.text();
    assert!(
        html.contains("role=\"alertdialog\"") && html.contains("id=\"btg-reason\""),
        "{html}"
    );
    let csrf = hidden(&html, "csrf");
    let form = format!("/ui/patients/{}/break-glass", f.other);
    let short = b
        .post(&form, &[("csrf", &csrf), ("reason", "because")])
        .await;
    assert_eq!(short.status, 400);
    assert!(short.text().contains("at least 10 characters"));
    let r = b
        .post(
            &form,
            &[
                ("csrf", &csrf),
                ("reason", "Unconscious in the ED, no other record"),
            ],
        )
        .await;
    assert_eq!((r.status, r.location()), (303, chart.as_str()));
    let page = b.get(&chart).await;
    assert_eq!(page.status, 200);
    assert!(
        page.text().contains("You broke the glass"),
        "the chart says so"
    );
    let entries = audit(&f, &f.other).await;
    let mine: Vec<_> = entries
        .iter()
        .filter(|e| e.entry.user == "dev:bea")
        .collect();
    assert!(
        mine.iter()
            .any(|e| e.entry.action == "GET /ui/patients/{patient}"
                && e.entry.status == 403
                && e.entry.outcome == strata_control::Outcome::Denied),
        "the refused read is audited"
    );
    let read = mine
        .iter()
        .find(|e| e.entry.action == "GET /ui/patients/{patient}" && e.entry.status == 200)
        .expect("the read");
    assert_eq!(
        read.entry.break_glass.as_deref(),
        Some("Unconscious in the ED, no other record")
    );
    // It is on the review list.
    let flagged = f
        .state
        .audit
        .list(&AuditQuery {
            break_glass_only: true,
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(flagged.iter().any(|e| e.seq == read.seq));

    // Print: the form first (no records), then the copy with its header, audited with the
    // recipient and the reason.
    let print = format!("/ui/patients/{}/print", f.patient);
    let form = b.get(&print).await;
    assert_eq!(form.status, 200);
    assert!(form.text().contains("name=\"recipient\""));
    let csrf = hidden(&form.text(), "csrf");
    let copy = b
        .post(
            &print,
            &[
                ("csrf", csrf.as_str()),
                ("recipient", "Dr Lee, St Mary's"),
                ("reason", "ROI request 42"),
                ("from", ""),
                ("to", ""),
            ],
        )
        .await;
    assert_eq!(copy.status, 200, "{}", copy.text());
    let html = copy.text();
    assert!(html.contains("Release-of-information copy"));
    assert!(html.contains("Printed by <strong>dev:bea</strong>"));
    assert!(
        html.contains("Dr Lee, St Mary&#39;s") || html.contains("Dr Lee, St Mary&#x27;s"),
        "{html}"
    );
    let entries = audit(&f, &f.patient).await;
    let printed = entries
        .iter()
        .rev()
        .find(|e| e.entry.action == "POST /ui/patients/{patient}/print")
        .expect("the print is audited");
    assert_eq!(printed.entry.detail["view"], "print");
    assert_eq!(printed.entry.detail["recipient"], "Dr Lee, St Mary's");
    assert_eq!(printed.entry.detail["reason"], "ROI request 42");
    assert_eq!(printed.entry.purpose.as_deref(), Some("TREAT"));
    // Another site cannot make a signed-in browser record a disclosure: no token, no copy.
    let forged = b
        .post(&print, &[("recipient", "attacker"), ("reason", "forged")])
        .await;
    assert!(
        forged.status == 422 || forged.status == 403,
        "{}",
        forged.status
    );
    // The accounting lists the reads that served data: the copy, not the print form.
    let (actions, listed) = disclosed_actions(&f, "dev:bea").await;
    assert_eq!(actions, ["POST /ui/patients/{patient}/print"], "{listed}");
}

#[tokio::test]
async fn forms_need_the_sessions_own_token_and_origin_and_sign_in_makes_a_new_session() {
    let (f, base, _stop) = served("", Some(2)).await;
    // Session fixation: an id planted before sign-in is not the signed-in session's.
    let mut b = Browser::new(&base);
    b.cookies
        .insert("strata_session".into(), "planted-by-an-attacker".into());
    assert_eq!(b.sign_in("cy", "clinician", &f.patient).await.status, 303);
    let id = b.cookies["strata_session"].clone();
    assert_ne!(id, "planted-by-an-attacker");
    assert!(id.len() >= 43, "256 bits");
    let mut attacker = Browser::new(&base);
    attacker
        .cookies
        .insert("strata_session".into(), "planted-by-an-attacker".into());
    assert_eq!(
        attacker.get("/ui/").await.status,
        303,
        "the planted id is no session"
    );
    // A second sign-in in the same browser replaces the session: the first id is gone.
    assert_eq!(b.sign_in("cy", "clinician", &f.patient).await.status, 303);
    let mut stale = Browser::new(&base);
    stale.cookies.insert("strata_session".into(), id);
    assert_eq!(
        stale.get("/ui/").await.status,
        303,
        "the previous session ended"
    );

    // CSRF: no token, another session's valid token, another origin — all refused, nothing
    // changed.
    let mut other = clinician(&f, &base, "dee").await;
    let others_token = hidden(&other.get("/ui/").await.text(), "csrf");
    let own = hidden(&b.get("/ui/").await.text(), "csrf");
    let r = b.post("/ui/purpose", &[("purpose", "TREAT")]).await;
    assert!(
        r.status == 422 || r.status == 400 || r.status == 403,
        "{}",
        r.status
    );
    let r = b
        .post(
            "/ui/purpose",
            &[("csrf", &others_token), ("purpose", "TREAT")],
        )
        .await;
    assert_eq!(r.status, 403);
    let request = b
        .client
        .post(format!("{base}/ui/purpose"))
        .header("origin", "https://evil.example")
        .form(&[("csrf", own.as_str()), ("purpose", "TREAT")]);
    assert_eq!(b.send(request).await.status, 403);
    let chart = b.get(&format!("/ui/patients/{}", f.patient)).await;
    assert_eq!(chart.status, 303, "still no purpose: {}", chart.location());
    assert!(chart.location().starts_with("/ui/purpose"));
    // The refused state changes are audited under the session's user.
    let refused = f
        .state
        .audit
        .list(&AuditQuery {
            user: Some("dev:cy".into()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.entry.action == "POST /ui/purpose" && e.entry.status == 403)
        .count();
    assert_eq!(refused, 2);
    let _ = other.get("/ui/").await;

    // Idle timeout (here 2 s): a session unused that long ends; the next page asks to sign in.
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let r = b.get("/ui/").await;
    assert_eq!(r.status, 303);
    assert!(r.location().starts_with("/ui/sign-in"));
    assert!(
        !b.cookies.contains_key("strata_session"),
        "the dead cookie is removed"
    );
}

#[tokio::test]
async fn the_development_sign_in_is_refused_off_loopback() {
    // Not on a loopback address: the server does not start with it.
    let mut config = api_config("[viewer]\ndev_sign_in = true\n");
    config.listen = "0.0.0.0:0".into();
    let f = fixture_with(api_config("")).await;
    let e = strata_archive_api::AppState::new(
        f.archive.clone(),
        f.control.clone(),
        &config,
        f.dir.path(),
        Default::default(),
    )
    .err()
    .expect("refused");
    assert!(e.contains("dev_sign_in") && e.contains("loopback"), "{e}");
    // On loopback, a client elsewhere (through a trusted proxy, say) is neither offered it
    // nor let in by it.
    let config = api_config("[viewer]\ndev_sign_in = true\n");
    let state = strata_archive_api::AppState::new(
        f.archive.clone(),
        f.control.clone(),
        &config,
        f.dir.path(),
        Default::default(),
    )
    .unwrap();
    let app = strata_archive_api::router(state);
    let from = |addr: &str, request: axum::http::request::Builder| {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        request.extension(axum::extract::ConnectInfo(addr))
    };
    let page = app
        .clone()
        .oneshot(
            from("10.1.2.3:5000", Request::get("/ui/sign-in"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let html = String::from_utf8(
        page.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(!html.contains("dev-sign-in"), "not offered: {html}");
    let post = app
        .clone()
        .oneshot(
            from("10.1.2.3:5000", Request::post("/ui/dev-sign-in"))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("cookie", "strata_sign_in=abc")
                .body(Body::from("csrf=abc&role=auditor&user=mallory"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(post.status(), 403);
    assert!(post.headers().get("set-cookie").is_none());
    // From loopback, but by another name (a page that rebound its name to 127.0.0.1): refused.
    let rebound = app
        .clone()
        .oneshot(
            from("127.0.0.1:5000", Request::post("/ui/dev-sign-in"))
                .header("host", "evil.example:8443")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("cookie", "strata_sign_in=abc")
                .body(Body::from("csrf=abc&role=auditor&user=mallory"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    // From loopback it works.
    let post = app
        .oneshot(
            from("127.0.0.1:5000", Request::post("/ui/dev-sign-in"))
                .header("host", "127.0.0.1:8443")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("cookie", "strata_sign_in=abc")
                .body(Body::from("csrf=abc&role=auditor&user=mallory"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(post.status(), 303);
}

#[tokio::test]
async fn him_staff_find_a_patient_by_mrn_name_and_birth_date_and_the_audit_keeps_no_criteria() {
    let config = api_config(
        "[viewer]\ndev_sign_in = true\n[viewer.cross_reference]\ntable = \"patients\"\ncolumn = \"mrn\"\nkey_column = \"id\"\nname_columns = [\"given_name\", \"family_name\"]\nbirth_date_column = \"birth_date\"\n",
    );
    let f = fixture_with(config.clone()).await;
    let loaded = super::load_config(&f.dir.path().join("strata.toml"));
    let url = loaded.resolve_url(&loaded.operational.url).unwrap();
    let db = strata_ingest::Db::connect(&url, true).await.unwrap();
    let row = db
        .fetch_all(
            format!(
                "SELECT mrn, family_name, CAST(birth_date AS TEXT) FROM patients WHERE id = {}",
                f.patient
            ),
            vec![strata_ingest::ColumnType::Text; 3],
        )
        .await
        .unwrap()
        .remove(0);
    db.close().await;
    let [mrn, family, birth] = [0, 1, 2].map(|i| row[i].as_key_text().unwrap());
    let state = f.state.clone().with_operational_database(url);
    let (base, _stop) = serve(&config, &f, state).await;
    let mut b = Browser::new(&base);
    assert_eq!(b.sign_in("hana", "records_manager", "").await.status, 303);
    let csrf = hidden(&b.get("/ui/search").await.text(), "csrf");
    let by_mrn = b
        .post("/ui/search", &[("csrf", &csrf), ("mrn", &mrn)])
        .await;
    assert_eq!(by_mrn.status, 200, "{}", by_mrn.text());
    assert!(
        by_mrn.text().contains(&format!("<td>{}</td>", f.patient)),
        "{}",
        by_mrn.text()
    );
    assert!(by_mrn.text().contains("1 patient found"));
    // Part of the family name, in other letters' case, with the birth date.
    let part: String = family.chars().take(4).collect::<String>().to_uppercase();
    let by_name = b
        .post(
            "/ui/search",
            &[
                ("csrf", &csrf),
                ("name", &part),
                ("birth_date", &birth[..10]),
            ],
        )
        .await;
    assert!(
        by_name.text().contains(&format!("<td>{}</td>", f.patient)),
        "{}",
        by_name.text()
    );
    // Not a way to list everyone: one letter, or wildcards, are not a name.
    for name in ["a", "_", "%%"] {
        let r = b
            .post("/ui/search", &[("csrf", &csrf), ("name", name)])
            .await;
        assert_eq!(r.status, 400, "{name}");
    }
    let wild = b
        .post(
            "/ui/search",
            &[("csrf", &csrf), ("name", &format!("%{part}_"))],
        )
        .await;
    assert!(
        wild.status == 200 && wild.text().contains("0 patients found"),
        "{}",
        wild.text()
    );
    // Without the session's token, nothing is searched; criteria never travel in a URL.
    assert_eq!(
        b.post("/ui/search", &[("csrf", "x"), ("mrn", &mrn)])
            .await
            .status,
        403
    );
    // Only health information management searches: not clinicians, not auditors.
    for role in ["clinician", "auditor"] {
        let mut other = Browser::new(&b.base.clone());
        assert_eq!(other.sign_in("olga", role, "").await.status, 303);
        assert_eq!(other.get("/ui/search").await.status, 403, "{role}");
    }
    // Audited: who, which criteria, the keys found — never a criterion's value.
    let searches: Vec<_> = f
        .state
        .audit
        .list(&AuditQuery {
            user: Some("dev:hana".into()),
            limit: Some(100),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.entry.action == "POST /ui/search" && e.entry.status == 200)
        .collect();
    assert_eq!(searches.len(), 3);
    assert_eq!(
        searches[0].entry.patient.as_deref(),
        Some(f.patient.as_str())
    );
    assert_eq!(
        searches[0].entry.detail["criteria"],
        serde_json::json!(["mrn"])
    );
    assert!(searches[0].entry.detail["found"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!(f.patient)));
    for e in &searches {
        let text = e.entry.detail.to_string();
        assert!(
            !text.contains(&mrn)
                && !text.to_uppercase().contains(&part)
                && !text.contains(&birth[..10]),
            "{text}"
        );
    }
}

/// The actions of `user` in the accounting of disclosures of the fixture's patient (as an
/// auditor reads it through the API), and the whole answer.
async fn disclosed_actions(f: &Fixture, user: &str) -> (Vec<String>, serde_json::Value) {
    let auditor = f.idp.user("audrey", strata_archive_api::Role::Auditor, &[]);
    let (_, _, body) = super::api::call(
        &f.app,
        axum::http::Method::GET,
        &format!("/v1/patients/{}/disclosures", f.patient),
        Some(&auditor),
        &[],
        None,
    )
    .await;
    let listed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let actions = listed["disclosures"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["user"] == user)
        .map(|d| d["action"].as_str().unwrap().to_string())
        .collect();
    (actions, listed)
}

/// A records manager decides another's destruction list on the records page, with a note,
/// once; their own list shows no decision and a decision posted anyway is refused.
#[tokio::test]
async fn a_records_manager_decides_another_records_managers_destruction_list() {
    let (f, base, _stop) = served("", None).await;
    let summary = serde_json::json!({ "tables": { "lab_results": { "rows": 4 } } });
    let theirs = f
        .control
        .request_destruction("retain", "dev:ines", ("1", "hash"), &summary)
        .await
        .unwrap();
    let own = f
        .control
        .request_destruction("retain", "dev:hana", ("1", "hash"), &summary)
        .await
        .unwrap();
    let mut b = Browser::new(&base);
    assert_eq!(b.sign_in("hana", "records_manager", "").await.status, 303);
    let page = b.get("/ui/records").await;
    assert_eq!(page.status, 200);
    let text = page.text();
    assert!(
        text.contains(&format!("/ui/records/destructions/{theirs}/decision")),
        "{text}"
    );
    assert!(!text.contains(&format!("/ui/records/destructions/{own}/decision")));
    assert!(text.contains("pending: another records manager decides it"));
    let csrf = hidden(&text, "csrf");
    let decide = |id: &str| format!("/ui/records/destructions/{id}/decision");
    let r = b
        .post(
            &decide(&own),
            &[("csrf", &csrf), ("decision", "approve"), ("note", "mine")],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = b
        .post(
            &decide(&theirs),
            &[
                ("csrf", &csrf),
                ("decision", "approve"),
                ("note", "checked the register"),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.location(), "/ui/records?done=approved#destruction");
    let decided = f
        .control
        .destruction_request(&theirs)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(decided.status, strata_control::RequestStatus::Approved);
    assert_eq!(
        decided.decision.map(|d| (d.0, d.2)),
        Some(("dev:hana".to_string(), "checked the register".to_string()))
    );
    let page = b.get("/ui/records?done=approved").await.text();
    assert!(page.contains("The destruction list is approved"), "{page}");
    assert!(page.contains("approved by dev:hana"), "{page}");
    let r = b
        .post(
            &decide(&theirs),
            &[("csrf", &csrf), ("decision", "reject"), ("note", "again")],
        )
        .await;
    assert_eq!(r.status, 400, "decided once"); // Carried out, its certificate is a printable page (and listed by the API's report).
    let certificate = serde_json::json!({
        "request_id": theirs, "kind": "retain", "policy_version": "7", "policy_hash": "abc",
        "rules": ["lab_results: past retention at 2040-01-01"], "as_of": "2040-01-01",
        "requested_by": "dev:ines", "requested_at": "2026-11-29T08:00:00Z",
        "approved_by": "dev:hana", "approved_at": "2026-11-29T09:00:00Z",
        "destroyed_at": "2026-11-29T09:05:00Z",
        "tables": [{ "table": "lab_results", "rows": 4, "key_min": "id=1", "key_max": "id=9",
                     "key_checksum": "sum256:00", "value_checksum": "sum256:11" }],
        "kept_by_holds": 0, "files_replaced": ["tables/lab_results/x.parquet"], "blobs_deleted": 0,
        "signature": { "algorithm": "Ed25519", "public_key": "ab", "value": "<script>" }
    });
    f.control
        .complete_destruction(&theirs, &certificate)
        .await
        .unwrap();
    let page = b.get("/ui/records").await.text();
    let link = format!("/ui/records/destructions/{theirs}/certificate");
    assert!(page.contains(&link), "{page}");
    let shown = b.get(&link).await;
    assert_eq!(shown.status, 200);
    let shown = shown.text();
    assert!(
        shown.contains("Destruction certificate") && shown.contains("by dev:hana"),
        "{shown}"
    );
    assert!(shown.contains("<td class=\"num\">4</td>"), "{shown}");
    assert!(
        !shown.contains("<script>")
            && (shown.contains("&lt;script&gt;") || shown.contains("&#60;script&#62;")),
        "escaped: {shown}"
    );
    let own_certificate = format!("/ui/records/destructions/{own}/certificate");
    assert_eq!(b.get(&own_certificate).await.status, 404);
}
