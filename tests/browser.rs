//! The archive viewer in a real browser: Debian's Chromium, headless, driven over WebDriver
//! (chromedriver) — each role's main flows, checked against the archive and the audit log.
//! Screenshots of each page go to `target/screenshots/` for a reviewer to look at (not
//! committed).

use super::api::{api_config, fixture_with, Fixture};
use arrow::array::AsArray;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value as Json};
use strata_archive_api::Role;
use strata_control::AuditQuery;

/// chromedriver, started for one test on a free port, stopped when dropped.
struct Driver {
    child: std::process::Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts chromedriver (`STRATA_TEST_CHROMEDRIVER`, else Debian's) and a headless Chromium
/// session with a fresh profile and none of Chromium's own network traffic.
async fn browser() -> (Driver, Client) {
    let port = free_port();
    let binary =
        std::env::var("STRATA_TEST_CHROMEDRIVER").unwrap_or("/usr/bin/chromedriver".into());
    let child = std::process::Command::new(&binary)
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{binary}: {e} (scripts/test installs Debian's chromium-driver)")
        });
    let url = format!("http://127.0.0.1:{port}");
    let profile = tempfile::tempdir().unwrap();
    let driver = Driver {
        child,
        url: url.clone(),
        _profile: profile,
    };
    let status = format!("{url}/status");
    let http = reqwest::Client::new();
    for _ in 0..100 {
        if http.get(&status).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let chromium = std::env::var("STRATA_TEST_CHROMIUM").unwrap_or("/usr/bin/chromium".into());
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic", "--no-first-run", "--window-size=1280,1000",
                format!("--user-data-dir={}", driver._profile.path().display()),
            ],
        },
    });
    let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
    builder.capabilities(capabilities.as_object().unwrap().clone());
    let client = builder.connect(&driver.url).await.unwrap();
    (driver, client)
}

/// Writes a screenshot of the page shown to `target/screenshots/{name}.png`.
async fn screenshot(client: &Client, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = client.screenshot().await.unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Clicks the element `at` finds.
async fn click(c: &Client, at: Locator<'_>) {
    c.find(at).await.unwrap().click().await.unwrap();
}

/// Types `text` into the element `at` finds.
async fn fill(c: &Client, at: Locator<'_>, text: &str) {
    c.find(at).await.unwrap().send_keys(text).await.unwrap();
}

/// Chooses the purpose of use on the page asking for it (TREAT, the first).
async fn choose_purpose(c: &Client) {
    click(
        c,
        Locator::Css("form[action='/ui/purpose'] button[type=submit]"),
    )
    .await;
    c.wait().for_element(Locator::Css("h1")).await.unwrap();
}

/// Signs in as `user` at the OpenID provider's sign-in page (oidc-provider's development
/// interactions: any password), then consents.
async fn at_provider(c: &Client, user: &str, shot: Option<&str>) {
    let login = c
        .wait()
        .for_element(Locator::Css("input[name=login]"))
        .await
        .unwrap();
    login.send_keys(user).await.unwrap();
    fill(c, Locator::Css("input[name=password]"), "x").await;
    if let Some(name) = shot {
        screenshot(c, name).await;
    }
    click(c, Locator::Css("button[type=submit]")).await;
    if c.wait()
        .for_element(Locator::Css("input[name=prompt][value=consent]"))
        .await
        .is_err()
    {
        let text = c
            .find(Locator::Css("body"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        panic!(
            "no consent page at {}: {text}",
            c.current_url().await.unwrap()
        );
    }
    click(c, Locator::Css("button[type=submit]")).await;
}

/// The viewer over a migrated archive with the development sign-in, on loopback.
async fn served() -> (Fixture, String, tokio::sync::oneshot::Sender<()>) {
    super::viewer::served("", None).await
}

/// Signs in with the development sign-in form as `role` (the button of that name).
async fn sign_in(c: &Client, base: &str, user: &str, role: &str, patients: &str) {
    c.goto(&format!("{base}/ui/sign-in")).await.unwrap();
    let name = c.find(Locator::Id("dev-user")).await.unwrap();
    name.clear().await.unwrap();
    name.send_keys(user).await.unwrap();
    let care = c.find(Locator::Id("dev-patients")).await.unwrap();
    care.clear().await.unwrap();
    care.send_keys(patients).await.unwrap();
    click(c, Locator::Css(&format!("button[name=role][value={role}]"))).await;
    if c.wait()
        .for_element(Locator::Css("form[action='/ui/sign-out']"))
        .await
        .is_err()
    {
        panic!("not signed in: {}", c.source().await.unwrap());
    }
}

/// A patient with at least two numeric lab results of one code, from the archive.
async fn lab_patient(f: &Fixture) -> String {
    let mut counts = std::collections::BTreeMap::<(String, String), usize>::new();
    for m in &f.archive.catalog().tables["lab_results"] {
        for file in &m.files {
            for b in f.archive.read_file(file).await.unwrap() {
                let patients = b.column(0).as_string::<i32>();
                let codes = b.column_by_name("loinc_code").unwrap();
                let codes = arrow::compute::cast(codes, &arrow::datatypes::DataType::Utf8).unwrap();
                let codes = codes.as_string::<i32>();
                for i in 0..b.num_rows() {
                    *counts
                        .entry((patients.value(i).to_string(), codes.value(i).to_string()))
                        .or_default() += 1;
                }
            }
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|((p, _), _)| p)
        .unwrap()
}

/// The audit log's entries of `user`.
async fn audited(f: &Fixture, user: &str) -> Vec<strata_control::AuditRecord> {
    f.state
        .audit
        .list(&AuditQuery {
            user: Some(user.into()),
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// The patient's archived records of `table` as the JSON API returns them.
async fn history(f: &Fixture, patient: &str, table: &str) -> Vec<Json> {
    let token = f.idp.user("checker", Role::Clinician, &[patient]);
    let (status, _, body) = super::api::call(
        &f.app,
        axum::http::Method::GET,
        &format!("/v1/patients/{patient}/history?table={table}&limit=1000"),
        Some(&token),
        &[("x-purpose-of-use", "TREAT")],
        None,
    )
    .await;
    assert_eq!(status, 200);
    let page: Json = serde_json::from_slice(&body).unwrap();
    page["records"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clinician_reads_a_chart_its_lab_trend_and_a_document_breaks_the_glass_by_keyboard_and_prints(
) {
    let (f, base, _stop) = served().await;
    let patient = lab_patient(&f).await;
    let (_driver, c) = browser().await;
    sign_in(
        &c,
        &base,
        "carla",
        "clinician",
        &format!("{patient},{}", f.patient),
    )
    .await;
    screenshot(&c, "clinician-start").await;
    // The chart asks for the purpose of use first.
    c.goto(&format!("{base}/ui/patients/{patient}"))
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Id("purpose-TREAT"))
        .await
        .unwrap();
    screenshot(&c, "clinician-purpose").await;
    choose_purpose(&c).await;
    c.find(Locator::Id("labs")).await.unwrap();
    screenshot(&c, "clinician-chart").await;

    // The trend chart plots the archive's values and units: every point of every chart.
    let plotted: Json = c
        .execute(
            "return [...document.querySelectorAll('figure.trend')].map(f => ({
                code: f.dataset.code, unit: f.dataset.unit,
                points: [...f.querySelectorAll('circle.point')].map(p => [p.dataset.date, p.dataset.value])
            }))",
            vec![],
        )
        .await
        .unwrap();
    let plotted = plotted.as_array().unwrap();
    assert!(!plotted.is_empty(), "the chart has lab trends");
    let labs = history(&f, &patient, "lab_results").await;
    for chart in plotted {
        let (code, unit) = (
            chart["code"].as_str().unwrap(),
            chart["unit"].as_str().unwrap(),
        );
        let mut archived: Vec<(String, String)> = labs
            .iter()
            .filter(|r| {
                super::viewer_text(&r["data"]["loinc_code"]) == code
                    && super::viewer_text(&r["data"]["unit"]) == unit
                    && r["data"]["value_num"].is_number()
            })
            .map(|r| {
                (
                    r["record_date"].as_str().unwrap().to_string(),
                    r["data"]["value_num"].to_string(),
                )
            })
            .collect();
        archived.sort();
        let mut points: Vec<(String, String)> = chart["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        points.sort();
        assert_eq!(points, archived, "trend of {code} in {unit}");
    }

    // A document opened in the browser has the archived bytes.
    c.goto(&format!("{base}/ui/patients/{}", f.patient))
        .await
        .unwrap();
    let link = c
        .wait()
        .for_element(Locator::Css("ul.documents a"))
        .await
        .unwrap();
    let href = link.attr("href").await.unwrap().unwrap();
    let expected = link.attr("data-sha256").await.unwrap().unwrap();
    let digest: Json = c
        .execute_async(
            "const [href, done] = arguments;
             fetch(href).then(r => r.arrayBuffer()).then(b => crypto.subtle.digest('SHA-256', b))
               .then(d => done([...new Uint8Array(d)].map(x => x.toString(16).padStart(2, '0')).join('')));",
            vec![json!(href)],
        )
        .await
        .unwrap();
    assert_eq!(digest.as_str().unwrap(), expected);
    let reference = super::viewer::document_reference(&f).await;
    assert_eq!(
        expected, reference.sha256,
        "the link names the archived digest"
    );

    // Break the glass with the keyboard only: the reason field has the focus; Tab reaches the
    // button; Enter submits.
    c.goto(&format!("{base}/ui/patients/{}", f.other))
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Id("btg-reason"))
        .await
        .unwrap();
    screenshot(&c, "clinician-break-the-glass").await;
    let focused: Json = c
        .execute("return document.activeElement.id", vec![])
        .await
        .unwrap();
    assert_eq!(focused, "btg-reason");
    let active = c.active_element().await.unwrap();
    active
        .send_keys("Patient unconscious in the ED")
        .await
        .unwrap();
    active.send_keys("\u{E004}").await.unwrap(); // Tab
    let on: Json = c
        .execute("return document.activeElement.textContent", vec![])
        .await
        .unwrap();
    assert!(on.as_str().unwrap().contains("Break the glass"), "{on}");
    c.active_element()
        .await
        .unwrap()
        .send_keys("\u{E007}")
        .await
        .unwrap(); // Enter
    c.wait().for_element(Locator::Css("p.flag")).await.unwrap();
    screenshot(&c, "clinician-chart-after-break-the-glass").await;

    // Print view: the form, then the copy with its header.
    c.goto(&format!("{base}/ui/patients/{patient}/print"))
        .await
        .unwrap();
    fill(&c, Locator::Id("p-recipient"), "Dr Osei, County Clinic").await;
    fill(&c, Locator::Id("p-reason"), "Release request 2026-118").await;
    click(
        &c,
        Locator::Css("form[action$='/print'] button[type=submit]"),
    )
    .await;
    let header = c
        .wait()
        .for_element(Locator::Css("header.release"))
        .await
        .unwrap();
    let text = header.text().await.unwrap();
    assert!(
        text.contains("Dr Osei, County Clinic")
            && text.contains("dev:carla")
            && text.contains("Release request 2026-118"),
        "{text}"
    );
    screenshot(&c, "clinician-print").await;

    // The audit log holds each of these reads, under the user, with purpose and grounds.
    let entries = audited(&f, "dev:carla").await;
    let seen = |action: &str, patient_key: &str| {
        entries.iter().any(|e| {
            e.entry.action == action
                && e.entry.patient.as_deref() == Some(patient_key)
                && e.entry.status < 300
        })
    };
    assert!(seen("GET /ui/patients/{patient}", &patient));
    assert!(seen(
        "GET /ui/patients/{patient}/documents/{document}",
        &f.patient
    ));
    assert!(seen("POST /ui/patients/{patient}/print", &patient));
    let flagged = entries
        .iter()
        .find(|e| e.entry.patient.as_deref() == Some(f.other.as_str()) && e.entry.status == 200)
        .expect("the read that broke the glass");
    assert_eq!(
        flagged.entry.break_glass.as_deref(),
        Some("Patient unconscious in the ED")
    );
    assert!(entries
        .iter()
        .all(|e| e.entry.purpose.as_deref().is_none_or(|p| p == "TREAT")));
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_manager_sees_the_plan_chart_and_places_and_releases_a_hold() {
    let (f, base, _stop) = served().await;
    let (_driver, c) = browser().await;
    sign_in(&c, &base, "rita", "records_manager", "").await;
    c.goto(&format!("{base}/ui/records")).await.unwrap();
    c.wait()
        .for_element(Locator::Id("plan-years"))
        .await
        .unwrap();
    screenshot(&c, "records-manager").await;
    // The chart's bars are the plan's rows per tier.
    let drawn: Json = c
        .execute(
            "let sums = {};
             document.querySelectorAll('#plan-years rect').forEach(r => {
               sums[r.dataset.tier] = (sums[r.dataset.tier] || 0) + Number(r.dataset.rows); });
             return sums;",
            vec![],
        )
        .await
        .unwrap();
    let plan = f
        .control
        .latest_plan::<Json>()
        .await
        .unwrap()
        .unwrap()
        .report;
    let mut dated = [0u64; 3];
    for t in plan["tables"].as_array().unwrap() {
        for rows in t["years"].as_object().unwrap().values() {
            dated[0] += rows["operational"].as_u64().unwrap();
            dated[1] += rows["archive"].as_u64().unwrap();
            dated[2] += rows["purge"].as_u64().unwrap();
        }
    }
    assert!(dated[0] > 0 && dated[1] > 0, "{dated:?}");
    for (tier, rows) in ["operational", "archive", "purge"].iter().zip(dated) {
        assert_eq!(drawn[tier].as_u64().unwrap_or(0), rows, "{tier}");
    }
    // The patients-per-year chart draws the plan's distinct patients per tier and year.
    let drawn: Json = c
        .execute(
            "return [...document.querySelectorAll('#plan-patient-years rect')]
               .map(r => [r.closest('g').dataset.label, r.dataset.tier, Number(r.dataset.rows)]);",
            vec![],
        )
        .await
        .unwrap();
    let mut expected = Vec::new();
    for (year, p) in plan["patients_by_year"]
        .as_object()
        .expect("patients by year")
    {
        for tier in ["operational", "archive", "purge"] {
            let n = p[tier].as_u64().unwrap();
            if n > 0 {
                expected.push(json!([year, tier, n]));
            }
        }
    }
    assert!(!expected.is_empty());
    assert_eq!(drawn.as_array().unwrap(), &expected);
    // Place a hold on a patient, then release it with a reason.
    fill(&c, Locator::Id("hold-patient"), &f.patient).await;
    fill(&c, Locator::Id("hold-reason"), "Litigation 2026-7").await;
    click(&c, Locator::Css("form[action='/ui/records/holds'] button")).await;
    c.wait()
        .for_element(Locator::Css("p.notice"))
        .await
        .unwrap();
    let holds = f.control.holds().await.unwrap();
    let hold = holds
        .iter()
        .find(|h| h.reason == "Litigation 2026-7")
        .expect("placed");
    assert_eq!(hold.placed_by, "dev:rita");
    screenshot(&c, "records-manager-hold-placed").await;
    let release = c
        .find(Locator::Css(&format!(
            "tr[id='{}'] input[name=reason]",
            hold.hold_id
        )))
        .await
        .unwrap();
    release.send_keys("Case settled").await.unwrap();
    click(
        &c,
        Locator::Css(&format!("tr[id='{}'] button", hold.hold_id)),
    )
    .await;
    c.wait()
        .for_element(Locator::Css("p.notice"))
        .await
        .unwrap();
    let released = f
        .control
        .holds()
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.hold_id == hold.hold_id)
        .unwrap();
    assert_eq!(
        released
            .released
            .as_ref()
            .map(|r| (r.0.as_str(), r.2.as_str())),
        Some(("dev:rita", "Case settled"))
    );
    let entries = audited(&f, "dev:rita").await;
    let posts: Vec<&str> = entries
        .iter()
        .filter(|e| e.entry.status == 303)
        .map(|e| e.entry.action.as_str())
        .collect();
    assert!(posts.contains(&"POST /ui/records/holds"), "{posts:?}");
    assert!(
        posts.contains(&"POST /ui/records/holds/{hold}/release"),
        "{posts:?}"
    );
    let placed = entries
        .iter()
        .find(|e| e.entry.action == "POST /ui/records/holds")
        .unwrap();
    assert_eq!(placed.entry.detail["hold"], json!(hold.hold_id));
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auditor_finds_the_break_the_glass_read_and_marks_it_reviewed() {
    let (f, base, _stop) = served().await;
    // A clinician breaks the glass through the API.
    let token = f.idp.user("dr-b", Role::Clinician, &[]);
    let (status, _, _) = super::api::call(
        &f.app,
        axum::http::Method::GET,
        &format!("/v1/patients/{}/history", f.other),
        Some(&token),
        &[
            ("x-purpose-of-use", "ETREAT"),
            ("x-break-glass-reason", "Cardiac arrest, no chart"),
        ],
        None,
    )
    .await;
    assert_eq!(status, 200);
    let read = audited(&f, "dr-b")
        .await
        .into_iter()
        .find(|e| e.entry.break_glass.is_some())
        .unwrap();
    let (_driver, c) = browser().await;
    sign_in(&c, &base, "audrey", "auditor", "").await;
    c.goto(&format!("{base}/ui/audit/break-glass"))
        .await
        .unwrap();
    let entry = c
        .wait()
        .for_element(Locator::Id(&format!("entry-{}", read.seq)))
        .await
        .unwrap();
    assert!(entry
        .text()
        .await
        .unwrap()
        .contains("Cardiac arrest, no chart"));
    screenshot(&c, "auditor-break-the-glass-review").await;
    entry
        .find(Locator::Css("textarea"))
        .await
        .unwrap()
        .send_keys("Justified: ED record")
        .await
        .unwrap();
    entry
        .find(Locator::Css("button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let entry = c
        .wait()
        .for_element(Locator::Css(&format!("#entry-{} .reviewed", read.seq)))
        .await
        .unwrap();
    assert!(entry.text().await.unwrap().contains("Justified: ED record"));
    let reviews = f.control.break_glass_reviews(&[read.seq]).await.unwrap();
    assert_eq!(reviews[0].reviewed_by, "dev:audrey");
    // The review is itself audited; the log and the accounting show the read.
    let entries = audited(&f, "dev:audrey").await;
    let review = entries
        .iter()
        .find(|e| e.entry.action == "POST /ui/audit/break-glass/{seq}/review")
        .expect("the review is audited");
    assert_eq!(review.entry.detail["reviewed"], json!(read.seq));
    c.goto(&format!("{base}/ui/audit?break_glass=1&verify=1"))
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Id("chain-status"))
        .await
        .unwrap();
    let status = c
        .find(Locator::Id("chain-status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(status.contains("intact"), "{status}");
    assert!(c
        .find(Locator::Css(&format!("tr[data-seq='{}']", read.seq)))
        .await
        .is_ok());
    screenshot(&c, "auditor-log").await;
    c.goto(&format!("{base}/ui/audit/disclosures?patient={}", f.other))
        .await
        .unwrap();
    let table = c
        .wait()
        .for_element(Locator::Id("disclosures"))
        .await
        .unwrap();
    let text = table.text().await.unwrap();
    assert!(
        text.contains("dr-b")
            && text.contains("ETREAT")
            && text.contains("Cardiac arrest, no chart"),
        "{text}"
    );
    screenshot(&c, "auditor-disclosures").await;
    c.close().await.unwrap();
}

/// Runs axe-core (from npm, `STRATA_TEST_NODE_MODULES`) on the page shown, against WCAG 2.1
/// A and AA; returns the serious and critical violations as `rule: targets`.
async fn axe(c: &Client) -> Vec<String> {
    let modules = std::env::var("STRATA_TEST_NODE_MODULES")
        .expect("STRATA_TEST_NODE_MODULES: run through scripts/test, which installs axe-core");
    let source = std::fs::read_to_string(format!("{modules}/axe-core/axe.min.js")).unwrap();
    c.execute(&format!("{source}\nreturn typeof window.axe;"), vec![])
        .await
        .unwrap();
    let found: Json = c
        .execute_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } })
               .then(r => done(r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
                 .map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))))
               .catch(e => done(['axe failed: ' + e]));",
            vec![],
        )
        .await
        .unwrap();
    found
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_passes_axe_core_with_no_serious_violation() {
    let (f, base, _stop) = served().await;
    let patient = lab_patient(&f).await;
    let (_driver, c) = browser().await;
    let mut problems = Vec::new();
    let mut check = |page: String, found: Vec<String>| {
        problems.extend(found.into_iter().map(|v| format!("{page}: {v}")));
    };
    c.goto(&format!("{base}/ui/sign-in")).await.unwrap();
    check("sign-in".into(), axe(&c).await);
    sign_in(&c, &base, "ally", "clinician", &patient).await;
    let pages = ["/ui/".to_string(), "/ui/purpose".to_string()];
    for page in &pages {
        c.goto(&format!("{base}{page}")).await.unwrap();
        check(page.clone(), axe(&c).await);
    }
    choose_purpose(&c).await;
    for page in [
        format!("/ui/patients/{patient}"),
        format!("/ui/patients/{}", f.other),
        format!("/ui/patients/{patient}/print"),
    ] {
        c.goto(&format!("{base}{page}")).await.unwrap();
        check(page.clone(), axe(&c).await);
    }
    // The copy itself (the print form's answer).
    fill(&c, Locator::Id("p-recipient"), "A clinic").await;
    fill(&c, Locator::Id("p-reason"), "A request").await;
    click(
        &c,
        Locator::Css("form[action$='/print'] button[type=submit]"),
    )
    .await;
    c.wait()
        .for_element(Locator::Css("header.release"))
        .await
        .unwrap();
    check("print copy".into(), axe(&c).await);
    for (user, role, pages) in [
        ("rho", "records_manager", vec!["/ui/records", "/ui/search"]),
        (
            "ada",
            "auditor",
            vec![
                "/ui/audit?verify=1",
                "/ui/audit/break-glass",
                "/ui/audit/disclosures?patient=1",
            ],
        ),
    ] {
        sign_in(&c, &base, user, role, "").await;
        for page in pages {
            c.goto(&format!("{base}{page}")).await.unwrap();
            check(page.to_string(), axe(&c).await);
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
    // On a tablet (768 px wide, portrait), the chart fits: wide tables scroll inside their
    // box, the page itself does not.
    sign_in(&c, &base, "tess", "clinician", &patient).await;
    c.goto(&format!("{base}/ui/purpose")).await.unwrap();
    choose_purpose(&c).await;
    c.set_window_size(768, 1024).await.unwrap();
    c.goto(&format!("{base}/ui/patients/{patient}"))
        .await
        .unwrap();
    c.wait().for_element(Locator::Id("labs")).await.unwrap();
    let overflow: Json = c
        .execute(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth",
            vec![],
        )
        .await
        .unwrap();
    screenshot(&c, "clinician-chart-tablet").await;
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the page scrolls sideways by {overflow} px"
    );
    // The check finds what it must: an image without a text alternative, planted.
    c.execute(
        "document.querySelector('main').insertAdjacentHTML('beforeend', '<img src=\"/ui/assets/none.png\">')",
        vec![],
    )
    .await
    .unwrap();
    let planted = axe(&c).await;
    assert!(
        planted.iter().any(|v| v.starts_with("image-alt")),
        "{planted:?}"
    );
    c.close().await.unwrap();
}

/// The hospital's OpenID provider (oidc-provider, `tests/node/smart-idp.mjs`) on `port`, for a
/// Strata at `strata`, with `accounts`; stopped when dropped.
struct Idp(std::process::Child);

impl Drop for Idp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn smart_idp(port: u16, strata: &str, accounts: &Json) -> Idp {
    use std::io::BufRead;
    let modules = std::env::var("STRATA_TEST_NODE_MODULES")
        .expect("STRATA_TEST_NODE_MODULES: run through scripts/test, which installs oidc-provider");
    // Beside its node_modules, so that Node finds oidc-provider.
    let script = std::path::Path::new(&modules).join("../smart-idp.mjs");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/smart-idp.mjs"),
        &script,
    )
    .unwrap();
    let mut child = std::process::Command::new("node")
        .arg(&script)
        .arg(port.to_string())
        .arg(strata)
        .arg(accounts.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "listening",
        "the OpenID provider did not start"
    );
    // What it prints later (its warnings) is read, or its writes would fail.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    Idp(child)
}

/// The operational database's URL, and the MRN of patient `key` in its patients table (the
/// legacy key is its `id`).
async fn mrn_of(f: &Fixture, key: &str) -> (String, String) {
    let config = super::load_config(&f.dir.path().join("strata.toml"));
    let url = config.resolve_url(&config.operational.url).unwrap();
    let db = strata_ingest::Db::connect(&url, true).await.unwrap();
    let rows = db
        .fetch_all(
            format!(
                "SELECT mrn FROM patients WHERE id = {}",
                key.parse::<i64>().unwrap()
            ),
            vec![strata_ingest::ColumnType::Text],
        )
        .await
        .unwrap();
    db.close().await;
    (url, rows[0][0].as_key_text().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ehr_launch_signs_in_at_the_hospitals_provider_and_opens_the_patients_chart() {
    let idp_port = free_port();
    let config = api_config(&format!(
        "[viewer.openid]\nissuer = \"http://127.0.0.1:{idp_port}\"\nclient_id = \"strata-viewer\"\nroles_claim = \"hospital_roles\"\nrole_names = {{ \"HIM\" = \"records_manager\" }}\n[viewer.cross_reference]\ntable = \"patients\"\ncolumn = \"mrn\"\nkey_column = \"id\"\n"
    ));
    let f = fixture_with(config.clone()).await;
    // The EHR knows the patient by MRN; the operational patients table holds it beside the
    // legacy key.
    let key = lab_patient(&f).await;
    let (operational, mrn) = mrn_of(&f, &key).await;
    let state = f.state.clone().with_operational_database(operational);
    let (base, stop) = super::viewer::serve(&config, &f, state).await;
    let _idp = smart_idp(
        idp_port,
        &base,
        &json!({
            "dr-ehr": { "roles": ["clinician"], "fhirUser": "Practitioner/7" },
            "him-clerk": { "roles": ["HIM"], "fhirUser": "Practitioner/9" },
        }),
    );
    let (_driver, c) = browser().await;
    // The EHR shows its patient (by MRN) and launches Strata.
    c.goto(&format!("http://127.0.0.1:{idp_port}/ehr?patient={mrn}"))
        .await
        .unwrap();
    screenshot(&c, "ehr-launcher").await;
    click(&c, Locator::Id("open-archive")).await;
    // The hospital's sign-in page, then its consent page.
    at_provider(&c, "dr-ehr", Some("ehr-launch-provider-sign-in")).await;
    // Back in Strata, the launch's patient: the purpose first, then the chart.
    c.wait()
        .for_element(Locator::Id("purpose-TREAT"))
        .await
        .unwrap();
    let url = c.current_url().await.unwrap();
    assert!(
        url.as_str()
            .contains(&format!("next=%2Fui%2Fpatients%2F{key}")),
        "{url}"
    );
    choose_purpose(&c).await;
    let heading = c.find(Locator::Css("h1")).await.unwrap();
    assert_eq!(
        heading.text().await.unwrap(),
        format!("Archived chart of patient {key}")
    );
    assert!(
        c.find(Locator::Css("p.flag")).await.is_err(),
        "in the user's care: no glass broken"
    );
    screenshot(&c, "ehr-launch-chart").await;
    let entries = audited(&f, "dr-ehr").await;
    let signed_in = entries
        .iter()
        .find(|e| e.entry.action == "GET /ui/callback")
        .expect("the sign-in is audited");
    assert_eq!(signed_in.entry.detail["launch"], "ehr");
    assert_eq!(signed_in.entry.detail["fhir_user"], "Practitioner/7");
    assert_eq!(signed_in.entry.patient.as_deref(), Some(key.as_str()));
    assert!(entries
        .iter()
        .any(|e| e.entry.action == "GET /ui/patients/{patient}"
            && e.entry.patient.as_deref() == Some(key.as_str())
            && e.entry.break_glass.is_none()
            && e.entry.status == 200));
    c.close().await.unwrap();

    // A standalone launch: the provider's role name maps to records manager.
    let (_driver2, c) = browser().await;
    c.goto(&format!("{base}/ui/sign-in")).await.unwrap();
    click(&c, Locator::LinkText("Sign in with your hospital account")).await;
    at_provider(&c, "him-clerk", None).await;
    c.wait()
        .for_element(Locator::Css("form[action='/ui/sign-out']"))
        .await
        .unwrap();
    c.goto(&format!("{base}/ui/records")).await.unwrap();
    c.wait()
        .for_element(Locator::Id("plan-years"))
        .await
        .unwrap();
    c.close().await.unwrap();

    // A callback with a state Strata never issued, or from another browser, signs no one in.
    let mut http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{base}/ui/callback?code=x&state=forged"));
    http = http.header("cookie", "strata_launch=anything");
    assert_eq!(http.send().await.unwrap().status(), 403);
    let _ = stop.send(());
}

/// Archived text and file names written to attack the viewer: script, event handlers, markup
/// breaking out of attributes — and an HTML document that would run script if shown.
const HOSTILE: &str = r#"
UPDATE clinical_notes SET
  body = '<script>window.__xss = 1; alert(1)</script><img src=x onerror="window.__xss = 2">',
  note_type = '"><svg onload="window.__xss = 3">'
  WHERE id % 3 = 0;
UPDATE documents SET
  title = '"><img src=x onerror="window.__xss = 4">.pdf',
  mime_type = 'text/html',
  content = CAST('<html><script>window.__xss = 5; alert(5)</script></html>' AS BLOB)
  WHERE id % 3 = 0;
"#;

/// An archived patient with a hostile note and a hostile document.
async fn hostile_patient(f: &Fixture) -> String {
    let mut noted = std::collections::BTreeSet::new();
    for table in ["clinical_notes", "documents"] {
        let mut found = std::collections::BTreeSet::new();
        for m in &f.archive.catalog().tables[table] {
            for file in &m.files {
                for b in f.archive.read_file(file).await.unwrap() {
                    let column = if table == "documents" {
                        "title"
                    } else {
                        "body"
                    };
                    let text = b.column_by_name(column).unwrap().as_string::<i32>();
                    let patients = b.column(0).as_string::<i32>();
                    for i in 0..b.num_rows() {
                        if text.value(i).contains("window.__xss") {
                            found.insert(patients.value(i).to_string());
                        }
                    }
                }
            }
        }
        if table == "clinical_notes" {
            noted = found;
        } else {
            return found
                .intersection(&noted)
                .next()
                .expect("an archived patient with a hostile note and document")
                .clone();
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_archived_text_and_file_names_run_no_script_in_the_browser() {
    let config = api_config("[viewer]\ndev_sign_in = true\n");
    let f = super::api::fixture_planted(config.clone(), |_| {}, HOSTILE).await;
    let (base, stop) = super::viewer::serve(&config, &f, f.state.clone()).await;
    let patient = hostile_patient(&f).await;
    let (_driver, c) = browser().await;
    sign_in(&c, &base, "xena", "clinician", &patient).await;
    c.goto(&format!("{base}/ui/purpose")).await.unwrap();
    choose_purpose(&c).await;
    c.goto(&format!("{base}/ui/patients/{patient}"))
        .await
        .unwrap();
    c.wait().for_element(Locator::Id("notes")).await.unwrap();
    screenshot(&c, "hostile-chart").await;
    // Nothing ran, nothing was injected; the text is there, as text.
    let ran: Json = c
        .execute(
            "return window.__xss === undefined ? null : window.__xss",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(ran, Json::Null, "a planted script ran");
    assert!(c.get_alert_text().await.is_err(), "no alert is open");
    let injected: Json = c
        .execute("return document.querySelectorAll('main img, main svg:not(figure svg), main script').length", vec![])
        .await
        .unwrap();
    assert_eq!(injected, json!(0));
    let notes = c
        .find(Locator::Id("notes"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        notes.contains("<script>window.__xss = 1; alert(1)</script>"),
        "{notes}"
    );
    // The HTML document downloads, under a safe name, sandboxed; it never renders here.
    let link = c
        .find(Locator::Css("ul.documents a[download]"))
        .await
        .expect("the hostile HTML document is a download");
    let name = link.attr("download").await.unwrap().unwrap();
    assert!(
        name.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch)),
        "{name}"
    );
    let href = link.attr("href").await.unwrap().unwrap();
    let headers: Json = c
        .execute_async(
            "const [href, done] = arguments;
             fetch(href).then(r => done([r.headers.get('content-disposition'), r.headers.get('content-security-policy'), r.headers.get('x-content-type-options')]));",
            vec![json!(href)],
        )
        .await
        .unwrap();
    assert_eq!(headers[0], "attachment");
    assert!(headers[1].as_str().unwrap().contains("sandbox"));
    assert_eq!(headers[2], "nosniff");
    let ran: Json = c
        .execute(
            "return window.__xss === undefined ? null : window.__xss",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(ran, Json::Null);
    let _ = stop.send(());
    c.close().await.unwrap();
}
