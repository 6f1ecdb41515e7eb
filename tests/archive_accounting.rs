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

/// Every current copy's key, per table, sorted (identical rows' keys repeated).
async fn archived_keys(dir: &Path) -> std::collections::BTreeMap<String, Vec<String>> {
    use arrow::array::AsArray;
    let config = load_config(&dir.join("strata.toml"));
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let mut out = std::collections::BTreeMap::new();
    for table in archive.catalog().tables.keys() {
        let mut keys = Vec::new();
        for (_, _, entry) in archive.ranked_files(table) {
            for batch in archive.read_file(entry).await.unwrap() {
                keys.extend(
                    batch
                        .column(2)
                        .as_string::<i32>()
                        .iter()
                        .map(|k| k.unwrap_or_default().to_string()),
                );
            }
        }
        keys.sort();
        out.insert(table.clone(), keys);
    }
    out
}

/// Data files of `dir`'s archive that no manifest names (what an interrupted attempt left).
fn unnamed_files(dir: &Path) -> usize {
    let mut named = std::collections::HashSet::new();
    for table in std::fs::read_dir(dir.join("archive/manifests")).unwrap() {
        for m in std::fs::read_dir(table.unwrap().path()).unwrap() {
            let text = std::fs::read_to_string(m.unwrap().path()).unwrap();
            let m: Json = serde_json::from_str(&text).unwrap();
            for list in ["files", "tombstones"] {
                for f in m[list].as_array().into_iter().flatten() {
                    named.insert(f["path"].as_str().unwrap().to_string());
                }
            }
        }
    }
    let mut n = 0;
    for table in std::fs::read_dir(dir.join("archive/tables")).unwrap() {
        let table = table.unwrap();
        for f in std::fs::read_dir(table.path()).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().to_string();
            let path = format!("tables/{}/{name}", table.file_name().to_string_lossy());
            if name.ends_with(".parquet") && !named.contains(&path) {
                n += 1;
            }
        }
    }
    n
}

/// kill -9 at any moment of `strata archive compact` and of `strata archive gc` loses
/// nothing: the catalog switches only when a compaction's manifest is written (one object);
/// what an interrupted attempt wrote is named by no manifest; a retry finishes. After every
/// kill, `archive verify` accounts for every row and the archive serves the same records.
#[tokio::test]
async fn kill_9_in_compact_and_gc_loses_nothing() {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), 0.4).await;
    let config_path = write_sqlite_config(dir.path(), &source, &example_policy());
    // Small ranges: many manifests and files per table, merged in passes.
    let mut config = std::fs::read_to_string(&config_path).unwrap();
    assert!(!config.contains("[run]"));
    config.push_str("\n[run]\nrows_per_range = 100\n");
    std::fs::write(&config_path, config).unwrap();
    migrate(&config_path).await;
    let before = archived_keys(dir.path()).await;
    let files: usize = std::fs::read_dir(dir.path().join("archive/tables/lab_results"))
        .unwrap()
        .count();
    assert!(
        files > 2 * strata_archive::MERGE_FAN_IN,
        "{files} files of lab_results (with key material)"
    );
    let kill_after = |args: &'static [&'static str], ms: u64| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(ms));
        let finished = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        child.wait().unwrap();
        finished
    };
    let (mut interrupted_mid_write, mut unnamed) = (0, unnamed_files(dir.path()));
    // Kills 50 ms apart, later each time, until an attempt finishes before its kill.
    for ms in (1..=200).map(|n| n * 50) {
        if kill_after(&["archive", "compact"], ms) {
            break;
        }
        // (An attempt killed while it wrote left files that no manifest names.)
        let now = unnamed_files(dir.path());
        if now > unnamed {
            interrupted_mid_write += 1;
        }
        unnamed = now;
        let (passed, out) = verify_archive(dir.path());
        assert!(passed, "after a kill at {ms} ms: {out}");
        assert_eq!(
            archived_keys(dir.path()).await,
            before,
            "after a kill at {ms} ms"
        );
    }
    assert!(
        interrupted_mid_write >= 2,
        "kills that interrupted a compaction writing its files: {interrupted_mid_write}"
    );
    ok(&strata(&["archive", "compact"], dir.path()));
    assert_eq!(archived_keys(dir.path()).await, before);
    for ms in [5, 15, 30, 60, 100] {
        kill_after(&["archive", "gc", "--grace-hours", "0"], ms);
        let (passed, out) = verify_archive(dir.path());
        assert!(passed, "after a kill of gc at {ms} ms: {out}");
        assert_eq!(archived_keys(dir.path()).await, before);
    }
    ok(&strata(
        &["archive", "gc", "--grace-hours", "0"],
        dir.path(),
    ));
    assert_eq!(
        unnamed_files(dir.path()),
        0,
        "what interrupted attempts left is gone"
    );
    let (passed, out) = verify_archive(dir.path());
    assert!(passed, "{out}");
    assert_eq!(archived_keys(dir.path()).await, before);
}
