//! The archive API on a migrated archive: tokens from an identity provider's keys (RS256 from a
//! PEM file, ES256 from a JWKS), the authorization matrix, break-the-glass, the audit log and
//! the accounting of disclosures, rate limits, and HTTPS with curl as the client.

use super::*;
use arrow::array::AsArray;
use axum::http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value as Json};
use strata_archive_api::{ApiConfig, AppState, Role};
use strata_control::{AuditQuery, Control, Outcome};

/// The identity provider's signing keys (the API gets only the public halves).
pub struct Idp {
    rsa: EncodingKey,
    ec: EncodingKey,
    /// A key the API does not know (forged tokens).
    stranger: EncodingKey,
    /// The RSA public key's PEM (for the algorithm-confusion token).
    rsa_public_pem: String,
}

/// An API over a migrated archive, with what the tests need to call it.
pub struct Fixture {
    pub dir: TestDir,
    pub app: axum::Router,
    pub state: AppState,
    pub archive: strata_archive::ArchiveReader,
    pub control: Control,
    pub idp: Idp,
    /// A patient with an archived document, and the document's id.
    pub patient: String,
    pub document: String,
    /// Another archived patient.
    pub other: String,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Writes the IdP's public keys (an RSA PEM file, a P-256 key in a JWKS) into `dir`.
pub fn make_idp(dir: &Path) -> Idp {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let mut rng = rand_core::OsRng;
    let rsa_key = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
    let rsa_public_pem = rsa_key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .unwrap();
    std::fs::write(dir.join("idp-rs.pem"), &rsa_public_pem).unwrap();
    let ec_key = p256::SecretKey::random(&mut rng);
    let point = ec_key.public_key().to_encoded_point(false);
    let jwks = json!({ "keys": [{
        "kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig", "alg": "ES256",
        "x": b64url(point.x().unwrap()), "y": b64url(point.y().unwrap()),
    }]});
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
    let stranger = p256::SecretKey::random(&mut rng);
    Idp {
        rsa: EncodingKey::from_rsa_pem(rsa_key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes())
            .unwrap(),
        ec: EncodingKey::from_ec_pem(ec_key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes())
            .unwrap(),
        stranger: EncodingKey::from_ec_pem(
            stranger.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap(),
        rsa_public_pem,
    }
}

pub const ISSUER: &str = "https://idp.test";
pub const AUDIENCE: &str = "strata-archive";

/// The `[api]` section the tests serve with (`extra` is appended, e.g. limits), with the FHIR
/// mapping of `deploy/strata.toml`.
pub fn api_config(extra: &str) -> ApiConfig {
    let deploy: toml::Table = toml::from_str(include_str!("../deploy/strata.toml")).unwrap();
    let mut api: toml::Table = toml::from_str(&format!(
        r#"
        listen = "127.0.0.1:0"
        plain_http = true
        [auth]
        issuer = "{ISSUER}"
        audience = "{AUDIENCE}"
        public_key_files = ["idp-rs.pem"]
        jwks_file = "jwks.json"
        [audit]
        key_file = "audit.key"
        [exports]
        location = "exports"
        pseudonym_key_file = "pseudonym.key"
        [exports.studies.cardio-2026]
        [exports.studies.closed-study]
        researchers = ["someone-else"]
        [exports.studies.bulk-study]
        [exports.profiles.registry]
        based_on = "safe_harbor"
        tables = ["lab_results", "diagnoses"]
        classes = {{ category = "drop" }}
        {extra}
        "#
    ))
    .unwrap();
    api.insert("fhir".into(), deploy["api"]["fhir"].clone());
    api.try_into().unwrap()
}

impl Idp {
    /// A token with `claims` (iss, aud, exp, nbf added unless given), signed with ES256
    /// (`kid` ec-1) or, with `rsa`, RS256.
    pub fn token(&self, claims: Json, rsa: bool) -> String {
        let now = chrono::Utc::now().timestamp();
        let mut c = json!({ "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600, "nbf": now - 5 });
        for (k, v) in claims.as_object().unwrap() {
            c[k] = v.clone();
        }
        if rsa {
            // The IdP names its key; the API's PEM key verifies whatever the name.
            let mut h = Header::new(Algorithm::RS256);
            h.kid = Some("idp-2026-11".into());
            jsonwebtoken::encode(&h, &c, &self.rsa).unwrap()
        } else {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some("ec-1".into());
            jsonwebtoken::encode(&h, &c, &self.ec).unwrap()
        }
    }

    /// A valid token for `user` with `role` and `patients` in their care.
    pub fn user(&self, user: &str, role: Role, patients: &[&str]) -> String {
        self.token(
            json!({ "sub": user, "roles": [role], "patients": patients }),
            false,
        )
    }
}

/// Migrates a small SQLite EHR, stores a plan, and builds the API over it.
pub async fn fixture(extra_config: &str) -> Fixture {
    fixture_with(api_config(extra_config)).await
}

/// [`fixture`] with an `[api]` section of the caller's.
pub async fn fixture_with(api: ApiConfig) -> Fixture {
    fixture_prepared(api, |_| {}).await
}

/// [`fixture_with`], with `prepare` writing files the API needs into the directory first.
pub async fn fixture_prepared(api: ApiConfig, prepare: impl FnOnce(&Path)) -> Fixture {
    fixture_planted(api, prepare, "").await
}

/// [`fixture_prepared`], with `plant` (SQL) run on the legacy source before it is migrated.
pub async fn fixture_planted(api: ApiConfig, prepare: impl FnOnce(&Path), plant: &str) -> Fixture {
    let (dir, _source, archive) = migrated_sqlite_planted(0.05, plant).await;
    prepare(dir.path());
    let config = load_config(&dir.path().join("strata.toml"));
    Migration::prepare(config.clone(), as_of())
        .await
        .unwrap()
        .plan()
        .await
        .unwrap();
    let idp = make_idp(dir.path());
    std::fs::write(
        dir.path().join("pseudonym.key"),
        strata_archive::Kek::generate_hex(),
    )
    .unwrap();
    let control = Control::open(&config.control_url().unwrap()).await.unwrap();
    let policy = strata_ingest::read_policy(&config).unwrap();
    let state = AppState::new(
        archive.clone(),
        control.clone(),
        &api,
        dir.path(),
        config.classification(policy.patients.as_ref()).unwrap(),
    )
    .unwrap();
    let app = strata_archive_api::router(state.clone());

    let file = &archive.catalog().tables["documents"][0].files[0];
    let batch = &archive.read_file(file).await.unwrap()[0];
    let patient = batch.column(0).as_string::<i32>().value(0).to_string();
    let document = batch
        .column_by_name("content__object")
        .unwrap()
        .as_string::<i32>()
        .value(0)
        .to_string();
    let mut other = None;
    'files: for m in archive.catalog().tables.values().flatten() {
        for f in &m.files {
            for b in archive.read_file(f).await.unwrap() {
                let ps = b.column(0).as_string::<i32>();
                if let Some(p) = ps.iter().flatten().find(|p| *p != patient) {
                    other = Some(p.to_string());
                    break 'files;
                }
            }
        }
    }
    Fixture {
        dir,
        app,
        state,
        archive,
        control,
        idp,
        patient,
        document,
        other: other.expect("a second archived patient"),
    }
}

/// Sends a request; returns status, headers and body.
pub async fn call(
    app: &axum::Router,
    method: Method,
    uri: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Json>,
) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes().to_vec(),
    )
}

const TREAT: (&str, &str) = ("x-purpose-of-use", "TREAT");

#[tokio::test]
async fn history_and_documents_for_a_clinician_in_whose_care_the_patient_is() {
    let f = fixture("").await;
    let clinician = f.idp.user("dr-a", Role::Clinician, &[&f.patient]);
    let uri = format!("/v1/patients/{}/history", f.patient);
    let (status, _, body) = call(&f.app, Method::GET, &uri, Some(&clinician), &[TREAT], None).await;
    assert_eq!(status, StatusCode::OK);
    let json: Json = serde_json::from_slice(&body).unwrap();
    let records = json["records"].as_array().unwrap();
    let mut expected = 0;
    for table in f.archive.catalog().tables.keys() {
        expected += f
            .archive
            .patient_rows(table, &f.patient)
            .await
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum::<usize>();
    }
    assert_eq!(records.len(), expected);
    let dates: Vec<&str> = records
        .iter()
        .filter_map(|r| r["record_date"].as_str())
        .collect();
    assert!(
        dates.windows(2).all(|w| w[0] >= w[1]),
        "history is newest first"
    );
    let doc = records
        .iter()
        .flat_map(|r| r["documents"].as_array().unwrap())
        .next()
        .expect("a document link");
    let href = doc["href"].as_str().unwrap();
    let (status, _, bytes) =
        call(&f.app, Method::GET, href, Some(&clinician), &[TREAT], None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bytes.len() as u64, doc["length"].as_u64().unwrap());
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        doc["sha256"].as_str().unwrap()
    );

    // Range reads: a slice, a suffix, and an unsatisfiable range.
    let ranged = |range: &'static str| {
        let (app, clinician) = (f.app.clone(), clinician.clone());
        async move {
            let (status, headers, body) = call(
                &app,
                Method::GET,
                href,
                Some(&clinician),
                &[TREAT, ("range", range)],
                None,
            )
            .await;
            let content_range = headers
                .get("content-range")
                .map(|v| v.to_str().unwrap().to_string());
            (status, content_range, body)
        }
    };
    let (status, content_range, part) = ranged("bytes=10-99").await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        content_range.unwrap(),
        format!("bytes 10-99/{}", bytes.len())
    );
    assert_eq!(part, bytes[10..100]);
    let (status, _, part) = ranged("bytes=-5").await;
    assert_eq!(
        (status, part.as_slice()),
        (StatusCode::PARTIAL_CONTENT, &bytes[bytes.len() - 5..])
    );
    assert_eq!(
        ranged("bytes=999999999-").await.0,
        StatusCode::RANGE_NOT_SATISFIABLE
    );

    // The same document through another patient (in the clinician's care) is not found.
    let other = f.idp.user("dr-a", Role::Clinician, &[&f.other]);
    let uri = format!(
        "/v1/patients/{}/documents/{}",
        f.other,
        doc["id"].as_str().unwrap()
    );
    let (status, _, _) = call(&f.app, Method::GET, &uri, Some(&other), &[TREAT], None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // RS256 tokens (the PEM key) verify too.
    let rs = f.idp.token(
        json!({ "sub": "dr-r", "roles": ["clinician"], "patients": [f.patient] }),
        true,
    );
    let uri = format!("/v1/patients/{}/history", f.patient);
    assert_eq!(
        call(&f.app, Method::GET, &uri, Some(&rs), &[TREAT], None)
            .await
            .0,
        StatusCode::OK
    );
}

/// The roles in the order of the matrix's columns.
const ROLES: [Role; 5] = [
    Role::Clinician,
    Role::Researcher,
    Role::RecordsManager,
    Role::Auditor,
    Role::Admin,
];

/// Every endpoint × every role × own/other patient, with the status each cell must return;
/// then every endpoint with each kind of bad token. Zero leaks: a refused request's body is an
/// error message only, and every request is in the audit log with its outcome.
#[tokio::test]
async fn authorization_matrix() {
    let f = fixture("").await;
    let (own, other, doc) = (f.patient.as_str(), f.other.as_str(), f.document.as_str());
    // {p}: the patient of the row; {doc}: the document (of `own`); {hold}: a fresh active hold.
    // Columns: clinician, researcher, records_manager, auditor, admin.
    #[rustfmt::skip]
    let matrix: &[(&str, &str, &str, [u16; 5])] = &[
        ("GET", "/v1/patients/{p}/history", "own",          [200, 403, 403, 403, 403]),
        ("GET", "/v1/patients/{p}/history", "other",        [403, 403, 403, 403, 403]),
        ("GET", "/v1/patients/{p}/documents/{doc}", "own",  [200, 403, 403, 403, 403]),
        ("GET", "/v1/patients/{p}/documents/{doc}", "other",[403, 403, 403, 403, 403]),
        ("GET", "/v1/patients/{p}/disclosures", "own",      [403, 403, 403, 200, 200]),
        ("GET", "/v1/patients/{p}/disclosures", "other",    [403, 403, 403, 200, 200]),
        ("GET", "/v1/audit", "-",                           [403, 403, 403, 200, 200]),
        ("GET", "/v1/audit/verify", "-",                    [403, 403, 403, 200, 200]),
        ("GET", "/v1/policies", "-",                        [403, 403, 200, 403, 200]),
        ("GET", "/v1/plan", "-",                            [403, 403, 200, 403, 200]),
        ("GET", "/v1/holds", "-",                           [403, 403, 200, 403, 200]),
        ("POST", "/v1/holds", "own",                        [403, 403, 201, 403, 201]),
        ("DELETE", "/v1/holds/{hold}", "-",                 [403, 403, 200, 403, 200]),
        ("GET", "/v1/reports/last-run", "-",                [403, 403, 200, 403, 200]),
        ("GET", "/v1/reports/destructions", "-",            [403, 403, 200, 403, 200]),
        ("POST", "/v1/exports", "-",                        [403, 202, 403, 403, 403]),
        ("GET", "/v1/exports/{export}", "-",                [403, 200, 403, 403, 403]),
        ("GET", "/v1/exports/{export}/files/manifest.json", "-", [403, 200, 403, 403, 403]),
        ("POST", "/v1/groups", "-",                         [403, 201, 201, 403, 201]),
        ("GET", "/v1/groups", "-",                          [403, 200, 200, 403, 200]),
        ("GET", "/v1/no-such-endpoint", "-",                [404, 404, 404, 404, 404]),
    ];
    // An export of the matrix's researcher, finished, for the export rows.
    let (record, mut requests) = finished_export(
        &f.app,
        &f.idp.user("researcher-user", Role::Researcher, &[own]),
        json!({ "profile": "safe_harbor", "tables": ["diagnoses"] }),
    )
    .await;
    let export = record["export_id"].as_str().unwrap().to_string();
    let mut denied = 0u64;
    let uri_of = |template: &str, patient: &str, hold: &str| {
        template
            .replace("{p}", patient)
            .replace("{doc}", doc)
            .replace("{hold}", hold)
            .replace("{export}", &export)
    };
    let assert_no_leak = |status: StatusCode, body: &[u8], what: &str| {
        if !status.is_success() {
            let json: Json =
                serde_json::from_slice(body).unwrap_or_else(|_| panic!("{what}: body is not JSON"));
            let keys: Vec<_> = json.as_object().unwrap().keys().collect();
            assert_eq!(
                keys,
                ["error"],
                "{what}: a refusal carries only an error message"
            );
            let text = String::from_utf8_lossy(body);
            assert!(
                !text.contains(own) && !text.contains(other),
                "{what}: {text}"
            );
        }
    };
    for (method, template, which, expected) in matrix {
        let patient = if *which == "other" { other } else { own };
        for (role, want) in ROLES.iter().zip(expected) {
            // A clinician's care covers `own` only.
            let token = f
                .idp
                .user(&format!("{}-user", role.as_str()), *role, &[own]);
            let hold = f
                .control
                .place_hold(
                    &strata_cutoff_policies::HoldScope::Patient(own.into()),
                    "matrix",
                    "setup",
                )
                .await
                .unwrap();
            let body = match (*method, *template) {
                ("POST", "/v1/exports") => {
                    Some(json!({ "profile": "safe_harbor", "tables": ["lab_results"] }))
                }
                ("POST", "/v1/groups") => {
                    Some(json!({ "name": "matrix cohort", "criteria": { "table": "diagnoses" } }))
                }
                ("POST", _) => Some(json!({ "patient": patient, "reason": "litigation 2026-17" })),
                ("DELETE", _) => Some(json!({ "reason": "litigation settled" })),
                _ => None,
            };
            let uri = uri_of(template, patient, &hold);
            let (status, _, bytes) = call(
                &f.app,
                Method::from_bytes(method.as_bytes()).unwrap(),
                &uri,
                Some(&token),
                &[TREAT],
                body,
            )
            .await;
            let what = format!("{method} {template} ({which}) as {}", role.as_str());
            assert_eq!(status.as_u16(), *want, "{what}");
            assert_no_leak(status, &bytes, &what);
            requests += 1;
            denied += u64::from(matches!(status.as_u16(), 401 | 403));
        }
    }

    // Bad tokens, on every endpoint, carrying the admin and clinician roles.
    let now = chrono::Utc::now().timestamp();
    let claims = json!({ "sub": "mallory", "roles": ["admin", "clinician"], "patients": [own] });
    let with = |extra: Json| {
        let mut c = claims.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let es256 = |c: &Json, key: &EncodingKey| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("ec-1".into());
        jsonwebtoken::encode(&h, c, key).unwrap()
    };
    let base = json!({ "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600 });
    let full = |extra: Json| {
        let mut c = with(base.clone());
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let alg_none = {
        let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = b64url(full(json!({})).to_string().as_bytes());
        format!("{header}.{payload}.")
    };
    let bad_tokens: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("not a JWT", Some("not-a-jwt".into())),
        (
            "expired",
            Some(es256(&full(json!({ "exp": now - 3600 })), &f.idp.ec)),
        ),
        (
            "not yet valid",
            Some(es256(&full(json!({ "nbf": now + 3600 })), &f.idp.ec)),
        ),
        (
            "wrong audience",
            Some(es256(&full(json!({ "aud": "someone-else" })), &f.idp.ec)),
        ),
        (
            "wrong issuer",
            Some(es256(
                &full(json!({ "iss": "https://evil.test" })),
                &f.idp.ec,
            )),
        ),
        (
            "no subject",
            Some(es256(
                &{
                    let mut c = full(json!({}));
                    c.as_object_mut().unwrap().remove("sub");
                    c
                },
                &f.idp.ec,
            )),
        ),
        // A subject must name someone: "-" is how the audit log marks no user.
        (
            "with an empty subject",
            Some(es256(&full(json!({ "sub": "" })), &f.idp.ec)),
        ),
        (
            "with a blank subject",
            Some(es256(&full(json!({ "sub": "  " })), &f.idp.ec)),
        ),
        (
            "whose subject is the audit log's mark of no user",
            Some(es256(&full(json!({ "sub": "-" })), &f.idp.ec)),
        ),
        (
            "forged (unknown key)",
            Some(es256(&full(json!({})), &f.idp.stranger)),
        ),
        (
            "HS256 keyed with the RSA public key (algorithm confusion)",
            Some(
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    &full(json!({})),
                    &EncodingKey::from_secret(f.idp.rsa_public_pem.as_bytes()),
                )
                .unwrap(),
            ),
        ),
        ("alg none", Some(alg_none)),
    ];
    for (method, template, which, _) in matrix.iter().filter(|r| !r.1.contains("no-such")) {
        let patient = if *which == "other" { other } else { own };
        for (fault, token) in &bad_tokens {
            let uri = uri_of(template, patient, "hold-x");
            let body = (*method != "GET").then(|| json!({ "patient": own, "reason": "x" }));
            let (status, headers, bytes) = call(
                &f.app,
                Method::from_bytes(method.as_bytes()).unwrap(),
                &uri,
                token.as_deref(),
                &[TREAT],
                body,
            )
            .await;
            let what = format!("{method} {template} with a token {fault}");
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
            assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer", "{what}");
            assert_no_leak(status, &bytes, &what);
            requests += 1;
            denied += 1;
        }
    }

    // Every request is in the audit log, refusals as denied; the chain is intact.
    let auditor = f.idp.user("aud-1", Role::Auditor, &[]);
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let uri = format!("/v1/audit?after={after}&limit=1000");
        let (status, _, body) = call(&f.app, Method::GET, &uri, Some(&auditor), &[], None).await;
        assert_eq!(status, StatusCode::OK);
        let page: Json = serde_json::from_slice(&body).unwrap();
        entries.extend(page["entries"].as_array().unwrap().clone());
        match page["next"].as_i64() {
            Some(n) => after = n,
            None => break,
        }
    }
    // The listing's own requests are audited too: those before the last page.
    let listings = entries
        .iter()
        .filter(|e| e["action"] == "GET /v1/audit" && e["user"] == "aud-1")
        .count() as u64;
    // Export jobs write entries of their own when they release (or fail).
    let jobs = entries
        .iter()
        .filter(|e| {
            e["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("EXPORT "))
        })
        .count() as u64;
    assert!(jobs >= 1, "the finished export's release is audited");
    assert_eq!(entries.len() as u64, requests + listings + jobs);
    let refused = entries.iter().filter(|e| e["outcome"] == "denied").count() as u64;
    assert_eq!(refused, denied);
    let history = entries
        .iter()
        .find(|e| e["action"] == "GET /v1/patients/{patient}/history" && e["outcome"] == "allowed")
        .unwrap();
    assert_eq!(history["patient"], own);
    assert_eq!(history["purpose"], "TREAT");
    assert_eq!(history["user"], "clinician-user");
    assert!(history["detail"]["records"].as_u64().unwrap() > 0);
    let report = strata_control::AuditLog::open(
        &f.control,
        strata_control::AuditKey::from_hex(
            &std::fs::read_to_string(f.dir.path().join("audit.key")).unwrap(),
        )
        .unwrap(),
    )
    .verify()
    .await
    .unwrap();
    assert!(report.ok(), "{:?}", report.problems);
}

/// A clinician reads a patient outside their care by giving a reason: allowed, flagged in the
/// log, on the auditors' review list and in the patient's accounting of disclosures.
#[tokio::test]
async fn break_the_glass_is_allowed_flagged_and_listed_for_review() {
    let f = fixture("").await;
    let clinician = f.idp.user("dr-b", Role::Clinician, &[&f.patient]);
    let auditor = f.idp.user("aud-1", Role::Auditor, &[]);
    let uri = format!("/v1/patients/{}/history", f.other);
    // Clinicians do not all write English: a reason in UTF-8 is read as given.
    let reason = "Patientin bewusstlos – Notaufnahme";
    let btg = [
        ("x-purpose-of-use", "ETREAT"),
        ("x-break-glass-reason", reason),
    ];
    assert_eq!(
        call(&f.app, Method::GET, &uri, Some(&clinician), &[TREAT], None)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    // Grounds come before the query: outside their care, a bad query is still a refusal.
    assert_eq!(
        call(
            &f.app,
            Method::GET,
            &format!("{uri}?limit=many"),
            Some(&clinician),
            &[TREAT],
            None
        )
        .await
        .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(
            &f.app,
            Method::GET,
            &uri,
            Some(&clinician),
            &[
                ("x-purpose-of-use", "ETREAT"),
                ("x-break-glass-reason", "because")
            ],
            None
        )
        .await
        .0,
        StatusCode::BAD_REQUEST,
        "a reason too short to review"
    );
    assert_eq!(
        call(&f.app, Method::GET, &uri, Some(&clinician), &[], None)
            .await
            .0,
        StatusCode::BAD_REQUEST,
        "no purpose of use"
    );
    let (status, _, _) = call(&f.app, Method::GET, &uri, Some(&clinician), &btg, None).await;
    assert_eq!(status, StatusCode::OK);
    // An in-care read is not flagged.
    let own = format!("/v1/patients/{}/history", f.patient);
    assert_eq!(
        call(&f.app, Method::GET, &own, Some(&clinician), &[TREAT], None)
            .await
            .0,
        StatusCode::OK
    );

    let (_, _, body) = call(
        &f.app,
        Method::GET,
        "/v1/audit?break_glass=true",
        Some(&auditor),
        &[],
        None,
    )
    .await;
    let review: Json = serde_json::from_slice(&body).unwrap();
    let review = review["entries"].as_array().unwrap();
    assert_eq!(review.len(), 1, "{review:?}");
    assert_eq!(review[0]["break_glass"], reason);
    assert_eq!(review[0]["patient"], f.other.as_str());
    assert_eq!(review[0]["user"], "dr-b");
    assert_eq!(review[0]["purpose"], "ETREAT");

    let uri = format!("/v1/patients/{}/disclosures", f.other);
    let (_, _, body) = call(&f.app, Method::GET, &uri, Some(&auditor), &[], None).await;
    let d: Json = serde_json::from_slice(&body).unwrap();
    let d = d["disclosures"].as_array().unwrap();
    assert_eq!(d.len(), 1, "only the served read is a disclosure: {d:?}");
    assert_eq!(d[0]["user"], "dr-b");
    assert_eq!(d[0]["break_glass"], reason);

    // The log lists the refused attempts as denied or failed, never as disclosures.
    let log = strata_control::AuditLog::open(
        &f.control,
        strata_control::AuditKey::from_hex(
            &std::fs::read_to_string(f.dir.path().join("audit.key")).unwrap(),
        )
        .unwrap(),
    );
    let about_other = log
        .list(&AuditQuery {
            patient: Some(f.other.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    let outcomes: Vec<Outcome> = about_other
        .iter()
        .filter(|e| e.entry.action.ends_with("/history"))
        .map(|e| e.entry.outcome)
        .collect();
    assert_eq!(
        outcomes,
        [
            Outcome::Denied,
            Outcome::Denied,
            Outcome::Failed,
            Outcome::Failed,
            Outcome::Allowed
        ]
    );
}

/// A user's burst is served, the next request is refused with 429 and Retry-After (and
/// audited as denied); other users are not affected.
#[tokio::test]
async fn rate_limits_are_per_user() {
    let f = fixture("[limits]\nrequests_per_minute = 6\nburst = 3").await;
    let a = f.idp.user("rm-a", Role::RecordsManager, &[]);
    let b = f.idp.user("rm-b", Role::RecordsManager, &[]);
    for _ in 0..3 {
        assert_eq!(
            call(&f.app, Method::GET, "/v1/holds", Some(&a), &[], None)
                .await
                .0,
            StatusCode::OK
        );
    }
    let (status, headers, _) = call(&f.app, Method::GET, "/v1/holds", Some(&a), &[], None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers.get("retry-after").unwrap(), "10");
    assert_eq!(
        call(&f.app, Method::GET, "/v1/holds", Some(&b), &[], None)
            .await
            .0,
        StatusCode::OK
    );
}

/// `strata serve` over HTTPS with the configured certificate, curl as the client; plain HTTP is
/// refused off loopback; `strata audit verify` passes, then names an edited entry.
#[tokio::test]
async fn https_with_curl_and_audit_verify_from_the_command_line() {
    let f = fixture("").await;
    let dir = f.dir.path();
    let (mut child, base, cacert) = serve_https(&f, "").await;
    let addr = base.trim_start_matches("https://").to_string();
    let strata = env!("CARGO_BIN_EXE_strata");

    // Plain HTTP off loopback is refused.
    let serve = std::fs::read_to_string(dir.join("serve.toml")).unwrap();
    let mut plain: toml::Table = toml::from_str(&serve).unwrap();
    let api = plain["api"].as_table_mut().unwrap();
    api.insert("listen".into(), "0.0.0.0:0".into());
    api.insert("plain_http".into(), true.into());
    std::fs::write(dir.join("plain.toml"), toml::to_string(&plain).unwrap()).unwrap();
    let out = std::process::Command::new(strata)
        .args(["serve", "--config"])
        .arg(dir.join("plain.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("plain HTTP is allowed only on a loopback address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-S", "--max-time", "20", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
        (
            code.to_string(),
            body.to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, body, _) = curl(&["--cacert", &cacert, &format!("https://{addr}/healthz")]);
    assert_eq!((code.as_str(), body.as_str()), ("200", "ok"));
    let token = f.idp.user("dr-c", Role::Clinician, &[&f.patient]);
    let (code, body, _) = curl(&[
        "--cacert",
        &cacert,
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-H",
        "X-Purpose-Of-Use: TREAT",
        &format!("https://{addr}/v1/patients/{}/history", f.patient),
    ]);
    assert_eq!(code, "200", "{body}");
    assert!(!serde_json::from_str::<Json>(&body).unwrap()["records"]
        .as_array()
        .unwrap()
        .is_empty());
    // Without the CA the certificate is refused; plain HTTP gets no answer.
    let (code, _, err) = curl(&[&format!("https://{addr}/healthz")]);
    assert_eq!(code, "000", "{err}");
    let (code, _, _) = curl(&[&format!("http://{addr}/healthz")]);
    assert_ne!(code, "200");
    child.kill().await.unwrap();

    let verify = || {
        std::process::Command::new(strata)
            .args(["audit", "verify", "--config"])
            .arg(dir.join("serve.toml"))
            .output()
            .unwrap()
    };
    let out = verify();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["entries"], 1,
        "the one audited request (healthz is not audited)"
    );
    let control_db = dir.join("control.db");
    let conn = sqlx::SqlitePool::connect(&format!("sqlite://{}", control_db.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE strata_audit SET user_id = 'someone-else' WHERE seq = 1")
        .execute(&conn)
        .await
        .unwrap();
    conn.close().await;
    let out = verify();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("first at entry 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Validates a FHIR Bundle with fhir.resources (Python); returns its resource counts.
pub fn validate_fhir(bundle: &Json) -> std::collections::BTreeMap<String, u64> {
    use std::io::Write;
    let python = std::env::var("STRATA_TEST_PYTHON")
        .expect("STRATA_TEST_PYTHON is not set: run the suite with ./scripts/test");
    let mut child = std::process::Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/validate_fhir.py"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(bundle.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "not a valid FHIR R4 Bundle: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Cursor paging walks the whole history once, in order; date and table filters narrow it;
/// the FHIR Bundle is valid R4 (fhir.resources), holds the mapped tables' records, and pages
/// by its `next` link.
#[tokio::test]
async fn history_pages_filters_and_fhir_bundles() {
    let f = fixture("").await;
    let clinician = f.idp.user("dr-d", Role::Clinician, &[&f.patient]);
    let get = |uri: String, accept: Option<&'static str>| {
        let (app, token) = (f.app.clone(), clinician.clone());
        async move {
            let mut headers = vec![TREAT];
            if let Some(a) = accept {
                headers.push(("accept", a));
            }
            let (status, h, body) =
                call(&app, Method::GET, &uri, Some(&token), &headers, None).await;
            let content_type = h
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (
                status,
                content_type,
                serde_json::from_slice::<Json>(&body).unwrap(),
            )
        }
    };
    let base = format!("/v1/patients/{}/history", f.patient);
    let (status, _, all) = get(format!("{base}?limit=1000"), None).await;
    assert_eq!(status, StatusCode::OK);
    let all = all["records"].as_array().unwrap().clone();
    assert!(all.len() > 10, "a patient with some history: {}", all.len());
    let ids = |records: &[Json]| {
        records
            .iter()
            .map(|r| {
                format!(
                    "{}/{}",
                    r["table"].as_str().unwrap(),
                    r["key"].as_str().unwrap()
                )
            })
            .collect::<Vec<_>>()
    };

    // Pages of 7, by cursor: every record once, in the same order.
    let mut paged = Vec::new();
    let mut uri = format!("{base}?limit=7");
    loop {
        let (status, _, page) = get(uri.clone(), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["total"], all.len());
        let records = page["records"].as_array().unwrap();
        assert!(records.len() <= 7);
        paged.extend(records.iter().cloned());
        match page["next"].as_str() {
            Some(c) => uri = format!("{base}?limit=7&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(ids(&paged), ids(&all));

    // Filters.
    let dated: Vec<&str> = all
        .iter()
        .filter_map(|r| r["record_date"].as_str())
        .collect();
    let (newest, oldest) = (dated[0], dated[dated.len() - 1]);
    let middle = dated[dated.len() / 2];
    let (_, _, page) = get(format!("{base}?from={middle}&to={newest}&limit=1000"), None).await;
    let expected: Vec<Json> = all
        .iter()
        .filter(|r| {
            r["record_date"]
                .as_str()
                .is_some_and(|d| d >= middle && d <= newest)
        })
        .cloned()
        .collect();
    assert_eq!(ids(page["records"].as_array().unwrap()), ids(&expected));
    assert!(oldest < middle || expected.len() == dated.len());
    let (_, _, page) = get(
        format!("{base}?table=lab_results,encounters&limit=1000"),
        None,
    )
    .await;
    let expected: Vec<Json> = all
        .iter()
        .filter(|r| r["table"] == "lab_results" || r["table"] == "encounters")
        .cloned()
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(ids(page["records"].as_array().unwrap()), ids(&expected));
    for bad in [
        "from=2020-13-01",
        "cursor=bm90IGEgY3Vyc29y",
        "limit=x",
        "colour=red",
        "format=xml",
    ] {
        let (status, _, body) = get(format!("{base}?{bad}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }

    // FHIR: by Accept and by ?format=fhir; valid R4; the mapped tables' records.
    let mapped = [
        "encounters",
        "diagnoses",
        "medications",
        "allergies",
        "lab_results",
        "clinical_notes",
        "documents",
    ];
    let expected = all
        .iter()
        .filter(|r| mapped.contains(&r["table"].as_str().unwrap()))
        .count();
    let (status, content_type, bundle) =
        get(format!("{base}?limit=1000"), Some("application/fhir+json")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/fhir+json");
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["total"], expected);
    let mut counts = validate_fhir(&bundle);
    // The records of tables without a mapping are said to be left out, not silently dropped.
    let unmapped = all.len() - expected;
    assert!(unmapped > 0);
    assert_eq!(counts.remove("OperationOutcome"), Some(1), "{counts:?}");
    let outcome = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .unwrap();
    let said = outcome["resource"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap();
    assert!(
        said.starts_with("not in this Bundle: archived records of tables without a FHIR mapping"),
        "{said}"
    );
    assert_eq!(
        counts.values().sum::<u64>() as usize,
        expected,
        "{counts:?}"
    );
    let labs = all.iter().filter(|r| r["table"] == "lab_results").count() as u64;
    assert_eq!(counts.get("Observation").copied().unwrap_or(0), labs);
    let documents = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["resource"]["content"][0]["attachment"]["url"].as_str())
        .collect::<Vec<_>>();
    assert!(
        documents.iter().any(|u| u.ends_with(&f.document)),
        "the document is a DocumentReference pointing at the document endpoint"
    );
    let (_, _, only) = get(
        format!("{base}?format=fhir&type=Observation&limit=1000"),
        None,
    )
    .await;
    assert_eq!(
        validate_fhir(&only),
        [("Observation".to_string(), labs)].into()
    );
    // A FHIR answer for a table without a mapping, or a type nothing maps to, is refused and
    // says why: an empty Bundle would say the patient has no such records.
    let (status, _, refused) = get(
        format!("{base}?format=fhir&table=billing_lines,lab_results"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("no FHIR mapping for table billing_lines"),
        "{refused}"
    );
    let (status, _, refused) = get(format!("{base}?type=Immunization"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    // Tables mapped to other types than the one asked for: an empty answer, not every table.
    let (status, _, none) = get(
        format!("{base}?format=fhir&table=lab_results&type=Condition"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(none["total"], 0, "{none}");
    // FHIR pages follow the Bundle's next link.
    let mut seen = 0;
    let mut uri = format!("{base}?format=fhir&limit=5");
    loop {
        let (_, _, page) = get(uri, None).await;
        validate_fhir(&page);
        seen += page["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["search"]["mode"] == "match")
            .count();
        let next = page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
        match next {
            Some(n) => uri = n,
            None => break,
        }
    }
    assert_eq!(seen, expected);
}

/// A document whose stored object was altered: the transfer is cut short (never completed with
/// bad bytes), and the audit log gets a failed entry for it beside the allowed one.
#[tokio::test]
async fn a_tampered_document_stream_fails_closed_and_is_audited() {
    let f = fixture("").await;
    let clinician = f.idp.user("dr-e", Role::Clinician, &[&f.patient]);
    let uri = format!("/v1/patients/{}/documents/{}", f.patient, f.document);
    let object = f
        .dir
        .path()
        .join("archive")
        .join(strata_archive::BlobStore::object_path(&f.document));
    let original = std::fs::read(&object).unwrap();
    let mut bad = original.clone();
    let at = bad.len() - 40; // in the last segment, before the binding
    bad[at] ^= 1;
    std::fs::write(&object, &bad).unwrap();
    let req = Request::get(&uri)
        .header("authorization", format!("Bearer {clinician}"))
        .header("x-purpose-of-use", "TREAT")
        .body(Body::empty())
        .unwrap();
    let resp = f.app.clone().oneshot(req).await.unwrap();
    let declared: usize = resp.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    match resp.into_body().collect().await {
        Ok(body) => panic!(
            "a tampered document was served whole ({} of {declared} bytes)",
            body.to_bytes().len()
        ),
        Err(e) => assert!(e.to_string().contains("integrity"), "{e}"),
    }
    std::fs::write(&object, &original).unwrap();
    // The failure entry is appended by a spawned task: give it a moment.
    let log = strata_control::AuditLog::open(
        &f.control,
        strata_control::AuditKey::from_hex(
            &std::fs::read_to_string(f.dir.path().join("audit.key")).unwrap(),
        )
        .unwrap(),
    );
    let mut outcomes = Vec::new();
    for _ in 0..50 {
        outcomes = log
            .list(&AuditQuery {
                patient: Some(f.patient.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .map(|e| {
                (
                    e.entry.outcome,
                    e.entry.detail["integrity"].as_str().map(str::to_string),
                )
            })
            .collect();
        if outcomes.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        outcomes,
        [
            (Outcome::Allowed, None),
            (Outcome::Failed, Some("stream stopped".to_string()))
        ]
    );
    // Intact again, it streams whole.
    let (status, _, bytes) =
        call(&f.app, Method::GET, &uri, Some(&clinician), &[TREAT], None).await;
    assert_eq!((status, bytes.len()), (StatusCode::OK, declared));
}

/// Starts `strata serve` over HTTPS on the fixture, with `extra` added to its `[api]` section;
/// returns the server, its base URL and the CA certificate's path.
pub async fn serve_https(f: &Fixture, extra: &str) -> (tokio::process::Child, String, String) {
    let dir = f.dir.path();
    let tls =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), tls.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), tls.signing_key.serialize_pem()).unwrap();
    let mut config: toml::Table =
        toml::from_str(&std::fs::read_to_string(dir.join("strata.toml")).unwrap()).unwrap();
    // A port chosen first: the server's public URL names it (system clients address their
    // assertions to it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut api: toml::Table = toml::from_str(&format!(
        "listen = \"127.0.0.1:{port}\"\npublic_url = \"https://127.0.0.1:{port}\"\n\
         tls_cert_file = \"cert.pem\"\ntls_key_file = \"key.pem\"\n\
         [auth]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks_file = \"jwks.json\"\n\
         public_key_files = [\"idp-rs.pem\"]\n[audit]\nkey_file = \"audit.key\"\n\
         [exports]\npseudonym_key_file = \"pseudonym.key\"\n[exports.studies.bulk-study]\n"
    ))
    .unwrap();
    // `extra`: more of `[api]` (its keys, or tables such as `[limits]`).
    for (key, value) in toml::from_str::<toml::Table>(extra).unwrap() {
        match (api.get_mut(&key), value) {
            (Some(toml::Value::Table(have)), toml::Value::Table(more)) => have.extend(more),
            (_, value) => {
                api.insert(key, value);
            }
        }
    }
    api.insert("fhir".into(), config["api"]["fhir"].clone());
    config.insert("api".into(), api.into());
    std::fs::write(dir.join("serve.toml"), toml::to_string(&config).unwrap()).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["serve", "--config"])
        .arg(dir.join("serve.toml"))
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .expect("serve starts")
            .unwrap()
            .expect("serve prints its address");
        // https://…, or http://… when `extra` asks for plain_http.
        if let Some(url) = line.split("listening on ").nth(1) {
            break url.trim().to_string();
        }
    };
    // Keep draining the server's log so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr, dir.join("cert.pem").display().to_string())
}

/// Sends `request` over a new connection from the loopback address `from` to `addr`; returns
/// what came back until the server closed the connection (or 10 s passed).
async fn raw_http(addr: &str, from: &str, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(addr.parse().unwrap()).await.unwrap();
    let _ = s.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server closed a connection, waiting at most `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// A rejection counter of `/metrics`.
fn rejected(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("strata_api_rejected_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {reason} counter in:\n{metrics}"))
}

/// Slow and greedy clients, on the real server: a request head dribbled a line at a time
/// (slowloris) is cut off; a client address gets only so many connections, a trusted proxy is
/// not capped and only its X-Forwarded-For names the client; a request with a valid token
/// whose body never arrives gets 408 and is audited under its user, as is a valid token on an
/// unknown route; heads too large and malformed HTTP are counted in /metrics, not audited.
#[tokio::test]
async fn slow_and_greedy_clients_are_cut_off_counted_and_every_token_audited() {
    use tokio::io::AsyncWriteExt;
    let f = fixture("").await;
    let (mut server, base, _) = serve_https(
        &f,
        "plain_http = true\ntrusted_proxies = [\"127.0.0.2\"]\n[limits]\n\
         header_read_timeout_secs = 2\nrequest_timeout_secs = 2\nconnections_per_client = 4\n\
         anonymous_requests_per_minute = 1\nanonymous_burst = 3",
    )
    .await;
    let addr = base.strip_prefix("http://").unwrap().to_string();
    let connect = |from: &'static str| {
        let addr = addr.clone();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
            socket.connect(addr.parse().unwrap()).await.unwrap()
        }
    };
    let second = std::time::Duration::from_secs(1);

    // Slowloris: one header line a second never makes a head; cut off after 2 s.
    let mut slow = connect("127.0.0.1").await;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: strata\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut cut_off = false;
    while started.elapsed() < std::time::Duration::from_secs(15) {
        let _ = slow.write_all(b"X-Slow: 1\r\n").await;
        if closed_within(&mut slow, second).await {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "a head dribbled for 15 s is still being read");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // A connection that sends nothing at all is closed as well.
    let mut silent = connect("127.0.0.1").await;
    assert!(closed_within(&mut silent, std::time::Duration::from_secs(4)).await);

    // Four connections per address; the fifth is closed as it comes. A trusted proxy is not
    // capped.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect("127.0.0.1").await);
    }
    let mut fifth = connect("127.0.0.1").await;
    assert!(closed_within(&mut fifth, second).await, "over the cap");
    let mut proxied = Vec::new();
    for _ in 0..6 {
        proxied.push(connect("127.0.0.2").await);
    }
    for p in &mut proxied {
        assert!(!closed_within(p, std::time::Duration::from_millis(100)).await);
    }
    drop((held, proxied));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    // X-Forwarded-For names the client from the proxy only.
    let clinician = f.idp.user("dr-xff", Role::Clinician, &[&f.patient]);
    let history = |xff: &str| {
        format!(
            "GET /v1/patients/{}/history HTTP/1.1\r\nHost: strata\r\nAuthorization: Bearer {clinician}\r\n\
             X-Purpose-Of-Use: TREAT\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n",
            f.patient
        )
    };
    let via_proxy = raw_http(&addr, "127.0.0.2", history("203.0.113.9").as_bytes()).await;
    assert!(via_proxy.starts_with("HTTP/1.1 200"), "{via_proxy:.200}");
    let spoofed = raw_http(&addr, "127.0.0.1", history("203.0.113.66").as_bytes()).await;
    assert!(spoofed.starts_with("HTTP/1.1 200"), "{spoofed:.200}");

    // A body that never arrives: 408 after 2 s, audited under the token's user.
    let researcher = f.idp.user("res-slow", Role::Researcher, &[]);
    let slow_body = format!(
        "POST /v1/exports HTTP/1.1\r\nHost: strata\r\nAuthorization: Bearer {researcher}\r\n\
         Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{{\"profile\":"
    );
    let answer = raw_http(&addr, "127.0.0.1", slow_body.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:.200}");
    // A valid token on a route that does not exist is audited under its user too.
    let unknown = format!(
        "GET /v1/no-such-thing HTTP/1.1\r\nHost: strata\r\nAuthorization: Bearer {researcher}\r\nConnection: close\r\n\r\n"
    );
    assert!(raw_http(&addr, "127.0.0.1", unknown.as_bytes())
        .await
        .starts_with("HTTP/1.1 404"));

    // Requests that name no one are audited up to their address's rate, then get 429 and
    // are counted, not audited.
    let anonymous = b"GET /v1/audit HTTP/1.1\r\nHost: strata\r\nConnection: close\r\n\r\n";
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let answer = raw_http(&addr, "127.0.0.1", anonymous).await;
        statuses.push(answer.get(9..12).unwrap_or("").to_string());
    }
    assert_eq!(statuses, ["401", "401", "401", "429", "429", "429"]);

    // Refused before any user is known: counted, not audited.
    let huge = format!(
        "GET /v1/audit HTTP/1.1\r\nHost: strata\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let answer = raw_http(&addr, "127.0.0.1", huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    let long_uri = format!(
        "GET /v1/{} HTTP/1.1\r\nHost: strata\r\n\r\n",
        "a".repeat(70_000)
    );
    let answer = raw_http(&addr, "127.0.0.1", long_uri.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer:.200}");
    let answer = raw_http(&addr, "127.0.0.1", b"HELLO STRATA\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:.200}");

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    server.kill().await.unwrap();
    assert!(rejected(&metrics, "header_timeout") >= 2, "{metrics}");
    assert!(rejected(&metrics, "connection_limit") >= 1, "{metrics}");
    assert!(rejected(&metrics, "head_too_large") >= 2, "{metrics}");
    assert!(rejected(&metrics, "malformed_http") >= 1, "{metrics}");
    assert_eq!(rejected(&metrics, "anonymous_over_rate"), 3, "{metrics}");

    let log = strata_control::AuditLog::open(
        &f.control,
        strata_control::AuditKey::from_hex(
            &std::fs::read_to_string(f.dir.path().join("audit.key")).unwrap(),
        )
        .unwrap(),
    );
    let entries = log
        .list(&AuditQuery {
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap();
    let entries: Vec<_> = entries.into_iter().map(|e| e.entry).collect();
    let client_of = |user: &str| {
        entries
            .iter()
            .filter(|e| e.user == user)
            .map(|e| e.client.clone().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        client_of("dr-xff"),
        ["203.0.113.9", "127.0.0.1"],
        "X-Forwarded-For from the trusted proxy only"
    );
    let timed_out = entries
        .iter()
        .find(|e| e.status == 408)
        .expect("the timed-out request is audited");
    assert_eq!(
        (timed_out.user.as_str(), timed_out.action.as_str()),
        ("res-slow", "POST /v1/exports")
    );
    assert!(entries
        .iter()
        .any(|e| e.user == "res-slow" && e.status == 404));
    assert!(
        entries
            .iter()
            .all(|e| !matches!(e.status, 400 | 414 | 431) || e.user != "-"),
        "refusals before any user is known are not audited: {entries:?}"
    );
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.user == "-" && e.status == 401)
            .count(),
        3,
        "anonymous requests under the rate are audited"
    );
    assert_eq!(entries.len(), 7, "{entries:?}");
    assert!(log.verify().await.unwrap().ok());
}

/// The OpenAPI document the API serves is the one kept in the repo, and schemathesis (PyPI),
/// fuzzing every operation from it with a token that holds every role, gets no 5xx and every
/// response matches the schema the document gives its body.
#[tokio::test]
async fn openapi_document_is_kept_and_fuzzing_finds_no_server_error() {
    let f = fixture("").await;
    let (status, _, served) = call(&f.app, Method::GET, "/openapi.json", None, &[], None).await;
    assert_eq!(status, StatusCode::OK);
    let served: Json = serde_json::from_slice(&served).unwrap();
    let kept: Json = serde_json::from_str(include_str!("../docs/openapi.json")).unwrap();
    assert!(
        served == kept,
        "docs/openapi.json is out of date: run `cargo run -- openapi > docs/openapi.json`"
    );

    let (mut server, base, ca) = serve_https(
        &f,
        "[limits]\nrequests_per_minute = 1000000\nburst = 100000",
    )
    .await;
    let token = f.idp.token(
        json!({ "sub": "fuzzer", "roles": ["clinician", "researcher", "records_manager", "auditor", "admin"],
                "patients": [f.patient] }),
        false,
    );
    let python = std::env::var("STRATA_TEST_PYTHON")
        .expect("STRATA_TEST_PYTHON is not set: run the suite with ./scripts/test");
    let schemathesis = std::path::Path::new(&python).with_file_name("schemathesis");
    let out = tokio::process::Command::new(schemathesis)
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args([
            "--tls-verify",
            &ca,
            "-c",
            "not_a_server_error,response_schema_conformance",
            "-n",
            "40",
            "--seed",
            "20261126",
        ])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .env("NO_COLOR", "1")
        // Its cache of found examples goes beside the test's files, not into the checkout.
        .current_dir(f.dir.path())
        .output()
        .await
        .unwrap();
    server.kill().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tested = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Tested: "))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(0);
    assert!(tested >= 15, "every operation was tested:\n{text}");
    assert!(text.contains("passed"), "{text}");
}

/// A number of /proc/PID/status: VmRSS and VmHWM in KiB, Threads.
fn proc_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} for process {pid}"))
}

/// A bounded soak test on loopback: 100 clinicians, each with a token and a connection of
/// their own, ask for histories, documents and FHIR bundles over HTTPS until 20,000
/// (STRATA_SOAK_REQUESTS) have been answered, under the default limits. Zero errors (a 429
/// or 503 counts as one); the server's peak RSS stays under 512 MiB and its RSS does not grow
/// through the last third of the run (5 % past the middle third's highest); every request is in
/// the audit log and the chain verifies.
#[tokio::test]
async fn soak_100_users_20k_requests_in_bounded_memory_all_audited() {
    let total: u64 = std::env::var("STRATA_SOAK_REQUESTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let f = fixture("").await;
    let (mut server, base, ca) = serve_https(&f, "").await;
    let pid = server.id().unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let uris = [
        format!("{base}/v1/patients/{}/history", f.patient),
        format!(
            "{base}/v1/patients/{}/history?format=fhir&limit=20",
            f.patient
        ),
        format!("{base}/v1/patients/{}/documents/{}", f.patient, f.document),
    ];
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..100 {
        let client = reqwest::Client::builder()
            .tls_certs_merge([ca.clone()])
            .build()
            .unwrap();
        let token = f
            .idp
            .user(&format!("soak-{c}"), Role::Clinician, &[&f.patient]);
        let (uris, asked, answered) = (uris.clone(), asked.clone(), answered.clone());
        tasks.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let mut errors = Vec::new();
            let mut i = c;
            while asked.fetch_add(1, Relaxed) < total {
                let resp = client
                    .get(&uris[i % uris.len()])
                    .bearer_auth(&token)
                    .header("x-purpose-of-use", "TREAT")
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status().is_success() => {
                        if let Err(e) = r.bytes().await {
                            errors.push(format!("body: {e}"));
                        }
                    }
                    Ok(r) => errors.push(format!("status {}", r.status())),
                    Err(e) => errors.push(format!("request: {e}")),
                }
                answered.fetch_add(1, Relaxed);
                i += 1;
            }
            errors
        }));
    }
    // RSS once the first 2,000 requests are answered; the most threads the server ran (each
    // holds an allocator heap: before the cap, a burst of readers grew the blocking pool to
    // 50-70 threads and the memory with it).
    let mut after_2k = None;
    let mut threads = 0;
    let mut trajectory = Vec::new();
    while !tasks.iter().all(|t| t.is_finished()) {
        let done = answered.load(std::sync::atomic::Ordering::Relaxed);
        if after_2k.is_none() && done >= 2_000.min(total) {
            after_2k = Some(proc_field(pid, "VmRSS"));
        }
        if done / 2_000 > trajectory.len() as u64 {
            trajectory.push(proc_field(pid, "VmRSS") / 1024);
        }
        threads = threads.max(proc_field(pid, "Threads"));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    let seconds = started.elapsed().as_secs_f64();
    let (end, peak) = (proc_field(pid, "VmRSS"), proc_field(pid, "VmHWM"));
    let after_2k = after_2k.unwrap();
    server.kill().await.unwrap();
    eprintln!(
        "soak: {total} requests from 100 users in {seconds:.0} s ({:.0}/s), {} errors; RSS after 2k {} MiB, end {} MiB, peak {} MiB; {threads} threads at most; RSS each 2k requests {trajectory:?} MiB",
        total as f64 / seconds,
        errors.len(),
        after_2k / 1024,
        end / 1024,
        peak / 1024
    );
    assert!(
        errors.is_empty(),
        "{} errors, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB");
    // A runtime worker per core, at most four blocking threads, the main thread, SQLite's
    // and a few to spare.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    assert!(
        threads <= cores + 4 + 6,
        "the server ran {threads} threads on {cores} cores"
    );
    // No leak: the median RSS of the run's last third stays within 5 % of the highest of its
    // middle third. (Not the RSS after 2k requests: the allocator takes memory in steps of 4-9
    // MiB as threads come to serve, at any point of the run, and the process settles at 75-80
    // MiB, so one sample may jump; a leak grows on through the last third and lifts its
    // median. 5 % of ~77 MiB over ~6,700 requests is ~600 bytes a request.)
    assert!(trajectory.len() >= 3, "too few requests to see a trend");
    let third = trajectory.len() / 3;
    let middle = *trajectory[third..2 * third].iter().max().unwrap();
    let mut last_third = trajectory[2 * third..].to_vec();
    last_third.sort_unstable();
    let last = last_third[last_third.len() / 2];
    assert!(
        last * 100 <= middle * 105,
        "RSS grew from {middle} MiB (the middle third's highest) to a median of {last} MiB in the last third: {trajectory:?} MiB each 2k requests"
    );
    let log = strata_control::AuditLog::open(
        &f.control,
        strata_control::AuditKey::from_hex(
            &std::fs::read_to_string(f.dir.path().join("audit.key")).unwrap(),
        )
        .unwrap(),
    );
    let report = log.verify().await.unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.entries, total, "one audit entry per request");
}

/// Starts an export through the API and polls it until it is done; returns its record and the
/// number of requests made (each is audited).
pub async fn finished_export(app: &axum::Router, token: &str, body: Json) -> (Json, u64) {
    let (record, requests) = ended_export(app, token, body).await;
    assert_eq!(record["status"], "done", "{record}");
    (record, requests)
}

/// Starts an export through the API and polls it until it ends (done, failed...); returns its
/// record and the number of requests made.
pub async fn ended_export(app: &axum::Router, token: &str, body: Json) -> (Json, u64) {
    let (status, _, bytes) = call(
        app,
        Method::POST,
        "/v1/exports",
        Some(token),
        &[],
        Some(body),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let id = serde_json::from_slice::<Json>(&bytes).unwrap()["export_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut requests = 1;
    loop {
        let (status, _, bytes) = call(
            app,
            Method::GET,
            &format!("/v1/exports/{id}"),
            Some(token),
            &[],
            None,
        )
        .await;
        requests += 1;
        assert_eq!(status, StatusCode::OK);
        let record: Json = serde_json::from_slice(&bytes).unwrap();
        if record["status"] != "running" {
            return (record, requests);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A running `strata serve` follows the archive: a record corrected by a new run is served
/// within seconds, without a restart; after a compaction and a gc with no grace, histories
/// still read, the same records; and a server that never re-reads its catalog on a timer
/// (`catalog_refresh_secs = 0`) recovers by itself when a file it knew is gone (issue #15).
#[tokio::test]
async fn a_running_server_follows_new_runs_compactions_and_gcs() {
    let f = fixture("").await;
    let dir = f.dir.path();
    let file = &f.archive.catalog().tables["lab_results"][0].files[0];
    let batch = &f.archive.read_file(file).await.unwrap()[0];
    let patient = batch.column(0).as_string::<i32>().value(0).to_string();
    let id = batch
        .column_by_name("id")
        .unwrap()
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0);
    let token = f.idp.user("dr-live", Role::Clinician, &[&patient]);
    // The patient's lab results as (id, value) through a server (its certificate, PEM).
    let labs = |base: String, ca: Vec<u8>| {
        let (token, patient) = (token.clone(), patient.clone());
        async move {
            let ca = reqwest::Certificate::from_pem(&ca).unwrap();
            let client = reqwest::Client::builder()
                .tls_certs_merge([ca])
                .build()
                .unwrap();
            let response = client
                .get(format!(
                    "{base}/v1/patients/{patient}/history?table=lab_results&limit=1000"
                ))
                .bearer_auth(&token)
                .header("x-purpose-of-use", "TREAT")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let json: Json = serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
            let mut labs: Vec<(i64, Option<f64>)> = json["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["data"]["id"].as_i64().unwrap(),
                        r["data"]["value_num"].as_f64(),
                    )
                })
                .collect();
            labs.sort_by(|a, b| a.partial_cmp(b).unwrap());
            labs
        }
    };
    let (mut following, base, ca) = serve_https(&f, "catalog_refresh_secs = 1").await;
    let ca = std::fs::read(ca).unwrap();
    let before = labs(base.clone(), ca.clone()).await;
    assert!(before.iter().any(|(i, _)| *i == id), "{before:?}");

    // A correction in the source, archived by a second run (new operational and control
    // databases, the same archive) while the server runs.
    let db = Db::connect(
        &format!("sqlite://{}", dir.join("legacy.db").display()),
        false,
    )
    .await
    .unwrap();
    db.execute(&format!(
        "UPDATE lab_results SET value_num = 4242.5 WHERE id = {id}"
    ))
    .await
    .unwrap();
    db.close().await;
    let config_path = dir.join("strata.toml");
    let text = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("operational.db", "operational-2.db")
        .replace("control.db", "control-2.db");
    std::fs::write(&config_path, text).unwrap();
    migrate(&config_path).await;
    let mut expected = before.clone();
    for lab in &mut expected {
        if lab.0 == id {
            lab.1 = Some(4242.5);
        }
    }
    let started = std::time::Instant::now();
    loop {
        let now = labs(base.clone(), ca.clone()).await;
        if now == expected {
            break;
        }
        assert!(
            started.elapsed().as_secs() < 20,
            "the new run is not served: {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // A server that re-reads its catalog only when it must, started now.
    let (mut lazy, lazy_base, lazy_ca) = serve_https(
        &f,
        "catalog_refresh_secs = 0\n[limits]\nhistory_cache_mib = 0",
    )
    .await;
    let lazy_ca = std::fs::read(lazy_ca).unwrap();
    assert_eq!(labs(lazy_base.clone(), lazy_ca.clone()).await, expected);

    // Compaction, then a gc with no grace: the files both servers read are deleted.
    for args in [
        &["archive", "compact", "--table", "lab_results"][..],
        &["archive", "gc", "--grace-hours", "0"][..],
    ] {
        let out = strata(args, dir);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!dir.join("archive").join(&file.path).exists(), "gc deleted");
    assert_eq!(labs(lazy_base, lazy_ca).await, expected, "read again once");
    assert_eq!(labs(base, ca).await, expected);
    following.kill().await.unwrap();
    lazy.kill().await.unwrap();
}

/// Verification reports are kept as evidence: `strata verify` stores each, and records
/// managers and auditors (not clinicians) list them through the API.
#[tokio::test]
async fn verification_reports_are_listed_for_records_managers_and_auditors() {
    let f = fixture("").await;
    let (status, out) = strata_verify(&f.dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");
    for role in [Role::RecordsManager, Role::Auditor] {
        let token = f.idp.user("rm-1", role, &[]);
        let (status, _, body) = call(
            &f.app,
            Method::GET,
            "/v1/reports/verifications",
            Some(&token),
            &[],
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let json: Json = serde_json::from_slice(&body).unwrap();
        let list = json["verifications"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{json}");
        assert_eq!(list[0]["proven"], true);
        assert!(list[0]["report"]["tables"].as_array().unwrap().len() > 5);
    }
    let clinician = f.idp.user("dr-a", Role::Clinician, &[&f.patient]);
    let (status, _, _) = call(
        &f.app,
        Method::GET,
        "/v1/reports/verifications",
        Some(&clinician),
        &[TREAT],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// A destruction list is decided by a records manager other than its requester, once, with a
/// note; the decision is audited; the CLI does the same.
#[tokio::test]
async fn destruction_lists_are_decided_by_another_records_manager() {
    let f = fixture("").await;
    let summary = json!({ "tables": { "lab_results": { "rows": 4 } } });
    let request = f
        .control
        .request_destruction("retain", "rm-alice", ("1", "hash"), &summary)
        .await
        .unwrap();
    let alice = f.idp.user("rm-alice", Role::RecordsManager, &[]);
    let bob = f.idp.user("rm-bob", Role::RecordsManager, &[]);
    let clinician = f.idp.user("dr-a", Role::Clinician, &[&f.patient]);
    let (status, _, body) = call(
        &f.app,
        Method::GET,
        "/v1/destructions",
        Some(&bob),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let listed: Json = serde_json::from_slice(&body).unwrap();
    assert_eq!(listed["requests"][0]["request_id"], request.as_str());
    assert_eq!(listed["requests"][0]["status"], "pending");
    let uri = format!("/v1/destructions/{request}/decision");
    let decide = |token: &str, body: Json| {
        let (app, uri, token) = (f.app.clone(), uri.clone(), token.to_string());
        async move { call(&app, Method::POST, &uri, Some(&token), &[], Some(body)).await }
    };
    let approve = json!({ "approve": true, "note": "checked against the retention schedule" });
    // Not a clinician's to decide; not the requester's (four eyes); not without a note.
    assert_eq!(
        decide(&clinician, approve.clone()).await.0,
        StatusCode::FORBIDDEN
    );
    let (status, _, body) = decide(&alice, approve.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(String::from_utf8_lossy(&body).contains("four eyes"));
    let blank = json!({ "approve": true, "note": " " });
    assert_eq!(decide(&bob, blank).await.0, StatusCode::BAD_REQUEST);
    let (status, _, body) = decide(&bob, approve.clone()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let decided: Json = serde_json::from_slice(&body).unwrap();
    assert_eq!(decided["status"], "approved");
    assert_eq!(decided["decision"][0], "rm-bob");
    // Decided once.
    assert_eq!(
        decide(&bob, approve.clone()).await.0,
        StatusCode::BAD_REQUEST
    );
    let (status, _, _) = call(
        &f.app,
        Method::POST,
        "/v1/destructions/destroy-none/decision",
        Some(&bob),
        &[],
        Some(approve),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The decision is in the audit log, by whom.
    let log = strata_control::AuditLog::open(
        &f.control,
        strata_control::AuditKey::from_hex(
            &std::fs::read_to_string(f.dir.path().join("audit.key")).unwrap(),
        )
        .unwrap(),
    );
    let entries = log.list(&AuditQuery::default()).await.unwrap();
    assert!(
        entries.iter().any(|e| e.entry.user == "rm-bob"
            && e.entry.action == "POST /v1/destructions/{request}/decision"
            && e.entry.status == 200
            && e.entry.detail["request"] == request.as_str()),
        "the decision is audited"
    );

    // The command line: the requester cannot approve; another records manager can.
    let other = f
        .control
        .request_destruction("tier", "rm-alice", ("1", "hash"), &summary)
        .await
        .unwrap();
    let run = |by: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["destruction", "approve", &other, "--by", by, "--note", "ok"])
            .current_dir(f.dir.path())
            .output()
            .unwrap()
    };
    let refused = run("rm-alice");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("four eyes"));
    let approved = run("rm-carol");
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["destruction", "list"])
        .current_dir(f.dir.path())
        .output()
        .unwrap();
    let listed: Json = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["request_id"], other.as_str());
    assert_eq!(listed[0]["status"], "approved");
}
