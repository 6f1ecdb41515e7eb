//! Every archived record stays accounted for: identical rows of a table without a primary key
//! are distinct records through migrate, compaction, gc, verify, explain and the API; a
//! manifest or a whole run that vanishes from the archive is an error for `archive verify`,
//! for `sync-catalog` and for `serve`, never a quietly shorter history.

use super::*;
use crate::api::{api_config, call, make_idp};
use axum::http::Method;
use serde_json::Value as Json;
use strata_archive_api::{AppState, Role};
use strata_control::Control;

/// Rows of `allergies` in the archive's current files.
async fn archived_allergies(dir: &Path) -> u64 {
    let config = load_config(&dir.join("strata.toml"));
    let archive = open_archive(&config.archive, &config.base_dir).await;
    archive.catalog().tables["allergies"]
        .iter()
        .map(|m| m.rows())
        .sum()
}

fn ok(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

fn failed(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "succeeded:\n{text}");
    text
}

/// Runs `strata serve`, stopping it after 30 s if it has not exited by itself.
fn serve_briefly(dir: &Path) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("serve")
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() && started.elapsed().as_secs() < 30 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn identical_rows_survive_compaction_and_a_vanished_manifest_is_an_error() {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), 0.05).await;
    // `allergies` without a primary key, every row twice and the first ten three times: two
    // identical rows are two records. Small ranges put copies in different ranges' files.
    let db = Db::connect(&format!("{source}?mode=rw"), false)
        .await
        .unwrap();
    let ddl = db
        .fetch_all(
            "SELECT sql FROM sqlite_master WHERE name = 'allergies'".into(),
            vec![strata_ingest::ColumnType::Text],
        )
        .await
        .unwrap()[0][0]
        .as_key_text()
        .unwrap();
    let keyless = ddl
        .replace("CREATE TABLE allergies", "CREATE TABLE allergies_keyless")
        .replace(" PRIMARY KEY", "");
    assert!(!keyless.contains("PRIMARY"), "{keyless}");
    db.execute(&format!(
        "{keyless}; INSERT INTO allergies_keyless SELECT * FROM allergies; \
         INSERT INTO allergies_keyless SELECT * FROM allergies; \
         INSERT INTO allergies_keyless SELECT * FROM allergies ORDER BY id LIMIT 10; \
         DROP TABLE allergies; ALTER TABLE allergies_keyless RENAME TO allergies"
    ))
    .await
    .unwrap();
    db.close().await;
    let config_path = write_sqlite_config(dir.path(), &source, &example_policy());
    let mut config: toml::Table =
        toml::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let tables = config["tables"].as_table_mut().unwrap();
    tables["allergies"]
        .as_table_mut()
        .unwrap()
        .remove("primary_key");
    config.insert(
        "run".into(),
        toml::Value::Table(toml::from_str("rows_per_range = 60").unwrap()),
    );
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();

    let report = migrate(&config_path).await;
    let counts = tier_counts(&load_config(&config_path)).await;
    assert_tiers_add_up(&counts);
    assert_report_matches(&report, &counts);
    let archived = counts["allergies"].archive;
    let config = load_config(&config_path);
    let archive = open_archive(&config.archive, &config.base_dir).await;
    assert!(
        archive.catalog().tables["allergies"].len() > 1,
        "several ranges, several manifests"
    );

    // A patient with an archived allergy that has identical copies.
    let mut by_key: std::collections::BTreeMap<(String, String), u64> = Default::default();
    for m in &archive.catalog().tables["allergies"] {
        for f in &m.files {
            for b in archive.read_file(f).await.unwrap() {
                use arrow::array::AsArray;
                let (p, k) = (
                    b.column(0).as_string::<i32>(),
                    b.column(2).as_string::<i32>(),
                );
                for i in 0..b.num_rows() {
                    *by_key
                        .entry((p.value(i).to_string(), k.value(i).to_string()))
                        .or_default() += 1;
                }
            }
        }
    }
    let ((patient, key), copies) = by_key
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, n)| (k.clone(), *n))
        .unwrap();
    assert!(copies >= 2, "identical archived rows: {copies}");
    let history_keys = |archive: strata_archive::ArchiveReader| {
        let (patient, dir) = (patient.clone(), dir.path().to_path_buf());
        async move {
            let idp = make_idp(&dir);
            std::fs::write(
                dir.join("pseudonym.key"),
                strata_archive::Kek::generate_hex(),
            )
            .unwrap();
            let config = load_config(&dir.join("strata.toml"));
            let control = Control::open(&config.control_url().unwrap()).await.unwrap();
            let policy = strata_ingest::read_policy(&config).unwrap();
            let state = AppState::new(
                archive,
                control,
                &api_config(""),
                &dir,
                config.classification(policy.patients.as_ref()).unwrap(),
            )
            .unwrap();
            let app = strata_archive_api::router(state);
            let token = idp.user("dr-a", Role::Clinician, &[&patient]);
            let uri = format!("/v1/patients/{patient}/history?table=allergies&limit=1000");
            let (status, _, body) = call(
                &app,
                Method::GET,
                &uri,
                Some(&token),
                &[("x-purpose-of-use", "TREAT")],
                None,
            )
            .await;
            assert_eq!(status, axum::http::StatusCode::OK);
            let json: Json = serde_json::from_slice(&body).unwrap();
            let mut keys: Vec<String> = json["records"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["table"] == "allergies")
                .map(|r| r["key"].as_str().unwrap().to_string())
                .collect();
            keys.sort();
            keys
        }
    };
    let before = history_keys(archive.clone()).await;
    let named: Vec<String> = (1..=copies)
        .map(|n| {
            if n == 1 {
                key.clone()
            } else {
                format!("{key}#{n}")
            }
        })
        .collect();
    for name in &named {
        assert!(before.contains(name), "{name} not in {before:?}");
    }
    // `explain` names each of them too.
    let out = ok(&strata(&["explain", "allergies", &named[1]], dir.path()));
    assert!(out.contains(&format!("identical rows: {copies}")), "{out}");
    failed(&strata(
        &["explain", "allergies", &format!("{key}#{}", copies + 1)],
        dir.path(),
    ));

    // Compaction keeps every one; gc deletes what it replaced; verify accounts for every row.
    let out = ok(&strata(
        &["archive", "compact", "--table", "allergies"],
        dir.path(),
    ));
    assert!(
        out.contains(&format!("{archived} rows -> 1 manifest"))
            && out.contains(&format!("{archived} rows (0 superseded")),
        "{out}"
    );
    ok(&strata(
        &["archive", "gc", "--grace-hours", "0"],
        dir.path(),
    ));
    assert_eq!(archived_allergies(dir.path()).await, archived);
    let (passed, out) = verify_archive(dir.path());
    assert!(passed, "{out}");
    assert!(
        out.contains(&format!(
            "allergies: the runs archived {archived} rows; the archive holds {archived}"
        )),
        "{out}"
    );
    let archive = open_archive(&config.archive, &config.base_dir).await;
    assert_eq!(
        history_keys(archive).await,
        before,
        "the same records after compaction and gc"
    );

    // A manifest that vanishes is a loss: verify, sync-catalog and serve say so.
    let manifests = dir.path().join("archive/manifests/encounters");
    let mut names: Vec<_> = std::fs::read_dir(&manifests)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let hidden = dir.path().join("hidden");
    std::fs::create_dir(&hidden).unwrap();
    let one = hidden.join(names[0].file_name().unwrap());
    std::fs::rename(&names[0], &one).unwrap();
    let (passed, out) = verify_archive(dir.path());
    assert!(!passed, "{out}");
    assert!(
        out.contains("table encounters: 1 of the") && out.contains("are missing from the archive"),
        "{out}"
    );
    let out = failed(&strata(&["archive", "sync-catalog"], dir.path()));
    assert!(out.contains("missing: table encounters: manifest"), "{out}");
    let out = failed(&serve_briefly(dir.path()));
    assert!(out.contains("not serving it"), "{out}");
    // Every manifest gone: the whole run is missing, for every table it archived.
    for n in &names[1..] {
        std::fs::rename(n, hidden.join(n.file_name().unwrap())).unwrap();
    }
    let (passed, out) = verify_archive(dir.path());
    assert!(!passed && out.contains("table encounters: run"), "{out}");
    assert!(
        out.contains("is missing from the archive: none of its"),
        "{out}"
    );
    // Put back, all is well again.
    for n in &names {
        std::fs::rename(hidden.join(n.file_name().unwrap()), n).unwrap();
    }
    let (passed, out) = verify_archive(dir.path());
    assert!(passed, "{out}");
    ok(&strata(&["archive", "sync-catalog"], dir.path()));
}
