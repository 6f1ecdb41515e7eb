//! FHIR Bulk Data exports with SMART Backend Services: every failure path of the token endpoint
//! and the asynchronous pattern, and an export of the demo archive through a client written
//! from the specifications (Python), validated with fhir.resources and checked for identifiers
//! by Strata's scanner and by the client itself.

use super::*;
use crate::api::{api_config, call, fixture, fixture_prepared, serve_https, Fixture};
use arrow::array::AsArray;
use axum::http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value as Json};

/// A system client's signing key and what it registers.
struct Client {
    id: &'static str,
    kid: &'static str,
    alg: Algorithm,
    key: EncodingKey,
    /// The private key as PKCS#8 PEM (for the Python client).
    pem: String,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Writes the JWKS of `etl` (ES384, every read scope) and `narrow` (RS384, Observation only)
/// into `dir/clients/`; returns them and a key nobody registered.
fn clients(dir: &Path) -> (Client, Client, EncodingKey) {
    use p384::elliptic_curve::sec1::ToEncodedPoint;
    use p384::pkcs8::{EncodePrivateKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    let mut rng = rand_core::OsRng;
    std::fs::create_dir_all(dir.join("clients")).unwrap();
    let ec = p384::SecretKey::random(&mut rng);
    let point = ec.public_key().to_encoded_point(false);
    let jwks = json!({ "keys": [{ "kty": "EC", "crv": "P-384", "kid": "etl-1", "use": "sig", "alg": "ES384",
        "x": b64url(point.x().unwrap()), "y": b64url(point.y().unwrap()) }] });
    std::fs::write(dir.join("clients/etl.jwks.json"), jwks.to_string()).unwrap();
    let ec_pem = ec.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let rsa_key = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
    let public = rsa_key.to_public_key();
    let jwks = json!({ "keys": [{ "kty": "RSA", "kid": "narrow-1", "use": "sig", "alg": "RS384",
        "n": b64url(&public.n().to_bytes_be()), "e": b64url(&public.e().to_bytes_be()) }] });
    std::fs::write(dir.join("clients/narrow.jwks.json"), jwks.to_string()).unwrap();
    let rsa_pem = rsa_key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let stranger = p384::SecretKey::random(&mut rng)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string();
    (
        Client {
            id: "etl",
            kid: "etl-1",
            alg: Algorithm::ES384,
            key: EncodingKey::from_ec_pem(ec_pem.as_bytes()).unwrap(),
            pem: ec_pem,
        },
        Client {
            id: "narrow",
            kid: "narrow-1",
            alg: Algorithm::RS384,
            key: EncodingKey::from_rsa_pem(rsa_pem.as_bytes()).unwrap(),
            pem: rsa_pem,
        },
        EncodingKey::from_ec_pem(stranger.as_bytes()).unwrap(),
    )
}

/// The `[api]` lines registering the two clients.
const SMART: &str = r#"
[smart]
[smart.clients.etl]
jwks_file = "clients/etl.jwks.json"
profile = "safe_harbor"
study = "bulk-study"
[smart.clients.narrow]
jwks_file = "clients/narrow.jwks.json"
scopes = ["system/Observation.read"]
"#;

/// A client assertion: `aud` the token endpoint, `exp` this many seconds away.
fn assertion(c: &Client, key: Option<&EncodingKey>, aud: &str, exp_in: i64, jti: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut h = Header::new(c.alg);
    h.kid = Some(c.kid.into());
    jsonwebtoken::encode(
        &h,
        &json!({ "iss": c.id, "sub": c.id, "aud": aud, "exp": now + exp_in, "jti": jti }),
        key.unwrap_or(&c.key),
    )
    .unwrap()
}

/// POSTs a token request; returns the status and the JSON answer.
async fn token_request(app: &axum::Router, form: &[(&str, &str)]) -> (StatusCode, Json) {
    let body = url_encode(form);
    let req = Request::builder()
        .method(Method::POST)
        .uri("/auth/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn url_encode(form: &[(&str, &str)]) -> String {
    form.iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

const TOKEN_URL: &str = "http://localhost/auth/token";
const ASYNC: [(&str, &str); 2] = [
    ("accept", "application/fhir+json"),
    ("prefer", "respond-async"),
];

/// An access token for `c` with `scope`.
async fn access_token(f: &Fixture, c: &Client, scope: &str) -> String {
    let jti = format!(
        "jti-{}",
        rand_core::RngCore::next_u64(&mut rand_core::OsRng)
    );
    let a = assertion(c, None, TOKEN_URL, 240, &jti);
    let (status, answer) = token_request(&f.app, &grant(&a, scope)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["access_token"].as_str().unwrap().to_string()
}

fn grant<'a>(assertion: &'a str, scope: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", "client_credentials"),
        ("scope", scope),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion),
    ]
}

/// Every way a system client can be refused: replayed, expired, too long-lived, misaddressed,
/// wrongly signed or unknown assertions; scopes it may not have; kick-offs without a token,
/// outside the scopes, without `Prefer: respond-async`, with a parameter the server does not
/// support, or while one of its exports runs; a cancelled export's status (404); a file
/// without a token; and a system token anywhere but Bulk Data.
#[tokio::test]
async fn bulk_data_refuses_what_the_specifications_refuse() {
    let mut keys = None;
    let mut api = api_config(SMART);
    api.public_url = Some("http://localhost".into());
    let f = fixture_prepared(api, |dir| keys = Some(clients(dir))).await;
    let (etl, narrow, stranger) = keys.unwrap();
    let good = assertion(&etl, None, TOKEN_URL, 240, "j-1");
    let (status, answer) = token_request(&f.app, &grant(&good, "system/*.read")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["scope"], "system/*.read");
    assert_eq!(answer["token_type"], "bearer");
    for (what, a, scope, want, error) in [
        (
            "replayed",
            good.clone(),
            "system/*.read",
            401,
            "invalid_client",
        ),
        (
            "expired",
            assertion(&etl, None, TOKEN_URL, -120, "j-2"),
            "system/*.read",
            401,
            "invalid_client",
        ),
        (
            "an hour long",
            assertion(&etl, None, TOKEN_URL, 3600, "j-3"),
            "system/*.read",
            401,
            "invalid_client",
        ),
        (
            "misaddressed",
            assertion(&etl, None, "https://elsewhere/token", 240, "j-4"),
            "system/*.read",
            401,
            "invalid_client",
        ),
        (
            "signed by a stranger",
            assertion(&etl, Some(&stranger), TOKEN_URL, 240, "j-5"),
            "system/*.read",
            401,
            "invalid_client",
        ),
        (
            "a user scope",
            assertion(&etl, None, TOKEN_URL, 240, "j-6"),
            "user/*.read",
            400,
            "invalid_scope",
        ),
        (
            "beyond its scopes",
            assertion(&narrow, None, TOKEN_URL, 240, "j-7"),
            "system/*.read",
            400,
            "invalid_scope",
        ),
    ] {
        let (status, answer) = token_request(&f.app, &grant(&a, scope)).await;
        assert_eq!(
            (status.as_u16(), answer["error"].as_str().unwrap()),
            (want, error),
            "{what}: {answer}"
        );
    }
    let (status, answer) = token_request(&f.app, &[("grant_type", "password")]).await;
    assert_eq!(
        (status, answer["error"].as_str().unwrap()),
        (StatusCode::BAD_REQUEST, "unsupported_grant_type")
    );

    // Kick-offs.
    let (status, _, _) = call(
        &f.app,
        Method::GET,
        "/fhir/Patient/$export",
        None,
        &ASYNC,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
    let narrow_token = access_token(&f, &narrow, "system/Observation.read").await;
    let (status, _, body) = call(
        &f.app,
        Method::GET,
        "/fhir/Patient/$export?_type=Condition",
        Some(&narrow_token),
        &ASYNC,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "outside its scopes");
    let outcome: Json = serde_json::from_slice(&body).unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("Condition"));
    let etl_token = access_token(&f, &etl, "system/*.read").await;
    let (status, _, _) = call(
        &f.app,
        Method::GET,
        "/fhir/$export",
        Some(&etl_token),
        &[("accept", "application/fhir+json")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no Prefer: respond-async");
    let (status, _, _) = call(
        &f.app,
        Method::GET,
        "/fhir/$export?_elements=id",
        Some(&etl_token),
        &ASYNC,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an unsupported parameter");
    let (status, _, _) = call(
        &f.app,
        Method::GET,
        "/fhir/$export?profile=limited_data_set",
        Some(&etl_token),
        &ASYNC,
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a client cannot pick its profile"
    );
    let (status, _, _) = call(
        &f.app,
        Method::GET,
        "/fhir/Group/group-0000/$export",
        Some(&etl_token),
        &ASYNC,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no such group");
    let impostor = f.idp.token(
        json!({ "sub": "system:etl", "roles": ["researcher"] }),
        false,
    );
    let (status, _, _) = call(
        &f.app,
        Method::GET,
        "/fhir/$export",
        Some(&impostor),
        &ASYNC,
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a user cannot take a system client's name"
    );
    let idp_system = f
        .idp
        .token(json!({ "sub": "mallory", "roles": ["system"] }), false);
    let (status, headers, body) = call(
        &f.app,
        Method::GET,
        "/fhir/$export",
        Some(&idp_system),
        &ASYNC,
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "an identity provider cannot make a system client"
    );
    // Bulk Data answers in FHIR, its role refusals too.
    assert_eq!(headers["content-type"], "application/fhir+json");
    let outcome: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["code"], "forbidden");
    let (status, _, _) = call(
        &f.app,
        Method::GET,
        &format!("/v1/patients/{}/history", f.patient),
        Some(&etl_token),
        &[("x-purpose-of-use", "TREAT")],
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a system token reads Bulk Data only"
    );

    // A second kick-off while one of the client's exports runs (one left running: no task).
    let running = f
        .control
        .start_export("system:etl", "fhir", "safe_harbor", &json!({}))
        .await
        .unwrap();
    let (status, headers, _) = call(
        &f.app,
        Method::GET,
        "/fhir/Patient/$export",
        Some(&etl_token),
        &ASYNC,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key("retry-after"));
    // DELETE cancels it; its status is then not found.
    let status_url = format!("/fhir/bulkstatus/{running}");
    let (status, _, _) = call(
        &f.app,
        Method::DELETE,
        &status_url,
        Some(&etl_token),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _, _) = call(
        &f.app,
        Method::GET,
        &status_url,
        Some(&etl_token),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A finished export: its status is the manifest; its files need the token, of its owner.
    let (status, headers, _) = call(
        &f.app,
        Method::GET,
        "/fhir/Patient/$export?_type=Observation",
        Some(&etl_token),
        &ASYNC,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let location = headers["content-location"].to_str().unwrap().to_string();
    let path = location
        .strip_prefix("http://localhost")
        .unwrap()
        .to_string();
    let manifest = polled(&f.app, &etl_token, &path).await;
    assert_eq!(manifest["requiresAccessToken"], true);
    let file = manifest["output"][0]["url"]
        .as_str()
        .unwrap()
        .strip_prefix("http://localhost")
        .unwrap()
        .to_string();
    assert_eq!(manifest["output"][0]["type"], "Observation");
    let (status, _, _) = call(&f.app, Method::GET, &file, None, &[], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(&f.app, Method::GET, &file, Some(&narrow_token), &[], None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "another client's export");
    let (status, _, body) = call(&f.app, Method::GET, &file, Some(&etl_token), &[], None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count() as u64
            == manifest["output"][0]["count"].as_u64().unwrap()
    );
    // Deleting a finished export removes its files.
    let (status, _, _) = call(&f.app, Method::DELETE, &path, Some(&etl_token), &[], None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _, _) = call(&f.app, Method::GET, &file, Some(&etl_token), &[], None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Polls a Bulk Data status URL until the export is done; returns its manifest.
async fn polled(app: &axum::Router, token: &str, path: &str) -> Json {
    loop {
        let (status, headers, body) = call(app, Method::GET, path, Some(token), &[], None).await;
        if status == StatusCode::ACCEPTED {
            assert!(headers.contains_key("retry-after") && headers.contains_key("x-progress"));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        return serde_json::from_slice::<Json>(&body).unwrap();
    }
}

/// `_since` keeps the resources of records archived at or after the instant: none after today,
/// all of them since long ago.
#[tokio::test]
async fn since_keeps_the_records_archived_from_then_on() {
    let mut keys = None;
    let mut api = api_config(SMART);
    api.public_url = Some("http://localhost".into());
    let f = fixture_prepared(api, |dir| keys = Some(clients(dir))).await;
    let (etl, _, _) = keys.unwrap();
    let token = access_token(&f, &etl, "system/Observation.read").await;
    let mut counts = Vec::new();
    for since in ["2999-01-01T00:00:00Z", "2000-01-01T00:00:00Z"] {
        let uri = format!("/fhir/$export?_type=Observation&_since={since}");
        let (status, headers, body) =
            call(&f.app, Method::GET, &uri, Some(&token), &ASYNC, None).await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let location = headers["content-location"].to_str().unwrap().to_string();
        let manifest = polled(
            &f.app,
            &token,
            location.strip_prefix("http://localhost").unwrap(),
        )
        .await;
        counts.push(
            manifest["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["count"].as_u64().unwrap())
                .sum::<u64>(),
        );
    }
    let archived: u64 = f.archive.catalog().rows_per_table()["lab_results"];
    assert_eq!(counts, [0, archived]);
}

/// A Bulk Data export of the demo archive through a client written from the specifications:
/// the client authenticates with a signed assertion, kicks off, polls, downloads every file
/// with its token and validates every line with fhir.resources; its own identifier check and
/// Strata's scanner find nothing; the counts are the archive's (Observations of the filtered
/// code) and the operational patients table's (one Patient each, from where it lives).
#[tokio::test]
async fn a_bulk_data_export_of_the_demo_archive_passes_a_client_written_from_the_spec() {
    let f = fixture("").await;
    let (etl, _, _) = clients(f.dir.path());
    std::fs::write(f.dir.path().join("clients/etl.pem"), &etl.pem).unwrap();
    // The most common LOINC code of the archived lab results, and how many results have it.
    let mut codes = std::collections::BTreeMap::<String, u64>::new();
    for m in &f.archive.catalog().tables["lab_results"] {
        for file in &m.files {
            for b in f.archive.read_file(file).await.unwrap() {
                for v in b
                    .column_by_name("loinc_code")
                    .unwrap()
                    .as_string::<i32>()
                    .iter()
                    .flatten()
                {
                    *codes.entry(v.to_string()).or_default() += 1;
                }
            }
        }
    }
    let (code, observations) = codes.iter().max_by_key(|(_, n)| **n).unwrap();
    let config = load_config(&f.dir.path().join("strata.toml"));
    let operational = Db::connect(&config.resolve_url(&config.operational.url).unwrap(), false)
        .await
        .unwrap();
    let patients = count(&operational, "SELECT COUNT(*) FROM patients".into()).await;
    operational.close().await;
    assert!(patients > 0);

    let (mut server, base, ca) = serve_https(&f, SMART).await;
    let out = f.dir.path().join("bulk");
    let python = std::env::var("STRATA_TEST_PYTHON")
        .expect("STRATA_TEST_PYTHON is not set: run the suite with ./scripts/test");
    let run = tokio::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/bulk_client.py"
        ))
        .args([
            "--base",
            &base,
            "--ca",
            &ca,
            "--client-id",
            "etl",
            "--kid",
            "etl-1",
            "--alg",
            "ES384",
        ])
        .arg("--key")
        .arg(f.dir.path().join("clients/etl.pem"))
        .args(["--type", "Patient,Observation,Condition,Encounter"])
        .args([
            "--type-filter",
            &format!("Observation?code=http://loinc.org|{code}"),
        ])
        .arg("--out")
        .arg(&out)
        .arg("--years-only")
        .output()
        .await
        .unwrap();
    server.kill().await.unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary: Json = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        summary["counts"]["Observation"].as_u64(),
        Some(*observations),
        "{summary}"
    );
    assert!(summary["counts"]["Condition"].as_u64().unwrap() > 0);
    assert!(summary["counts"]["Encounter"].as_u64().unwrap() > 0);
    assert_eq!(summary["file_without_token"], 401);
    assert_eq!(summary["violations"], json!([]));

    // Strata's own scanner over what the client downloaded finds nothing either.
    let mut scanner = strata_deidentify::Scanner::new(true);
    let mut lines = 0;
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            scanner.resource(&name, &serde_json::from_str(line).unwrap(), None);
            lines += 1;
        }
    }
    assert_eq!(lines, summary["lines"].as_u64().unwrap());
    assert!(scanner.findings().is_empty(), "{:?}", scanner.findings());
    // One Patient for each patient the other resources refer to, from the operational patients
    // table (the demo keeps it operational).
    let mut subjects = std::collections::BTreeSet::new();
    for kind in ["Observation", "Condition", "Encounter"] {
        for line in std::fs::read_to_string(out.join(format!("{kind}.ndjson")))
            .unwrap()
            .lines()
        {
            let r: Json = serde_json::from_str(line).unwrap();
            let subject = r["subject"]["reference"].as_str().unwrap();
            subjects.insert(subject.strip_prefix("Patient/").unwrap().to_string());
        }
    }
    let patients_file = std::fs::read_to_string(out.join("Patient.ndjson")).unwrap();
    let ids: std::collections::BTreeSet<String> = patients_file
        .lines()
        .map(|l| {
            serde_json::from_str::<Json>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, subjects);
    assert!(ids.len() as u64 <= patients);
    let first: Json = serde_json::from_str(patients_file.lines().next().unwrap()).unwrap();
    assert!(first.get("name").is_none() && first.get("identifier").is_none());
    assert_eq!(first["id"].as_str().unwrap().len(), 32, "a pseudonym");
}
