//! `strata verify`: a clean migration proves clean; each way a copy can go wrong after the run
//! (a changed value, a missing or extra row, a row in two tiers, a missing archive file, a
//! quarantined row deleted) is found, naming the table and the place, with exit status 1.

use crate::support::*;
use strata_ingest::Db;

/// `strata verify` on `dir`'s config.
fn verify(dir: &std::path::Path) -> (i32, String) {
    strata_verify(&dir.join("strata.toml"))
}

/// Runs `sql` on the operational database of `dir`.
async fn operational(dir: &std::path::Path, sql: &str) {
    let db = Db::connect(
        &format!("sqlite://{}", dir.join("operational.db").display()),
        false,
    )
    .await
    .unwrap();
    db.execute(sql).await.unwrap();
    db.close().await;
}

#[tokio::test]
async fn verify_proves_a_clean_migration_and_finds_every_mutation() {
    let dir = TestDir::new();
    let source = format!("sqlite://{}", dir.path().join("legacy.db").display());
    generate(&source, 0.02, true).await;
    // A row to quarantine: a date no one can read.
    let db = Db::connect(&source, false).await.unwrap();
    db.execute("UPDATE lab_results SET observed_at = 'not a date' WHERE id = (SELECT MIN(id) FROM lab_results)")
        .await
        .unwrap();
    db.close().await;
    let config_path = write_sqlite_config(dir.path(), &source, &example_policy());
    let report = strata_ingest::Migration::prepare(load_config(&config_path), as_of())
        .await
        .unwrap()
        .run(&mut |_| {})
        .await
        .unwrap();
    assert!(report.tables.iter().any(|t| t.quarantined_rows > 0));
    assert!(report.tables.iter().any(|t| t.purged_rows > 0));
    let (status, out) = verify(dir.path());
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("every source row is in exactly one place"),
        "{out}"
    );

    // Each mutation is made on a copy of the operational database, then undone.
    let db = dir.path().join("operational.db");
    let pristine = dir.path().join("operational.pristine");
    std::fs::copy(&db, &pristine).unwrap();
    let cases: [(&str, &str, &str, &str); 4] = [
        (
            "UPDATE lab_results SET status = 'amended' WHERE id = (SELECT MIN(id) FROM lab_results)",
            "lab_results",
            "operational: ",
            "their values differ",
        ),
        (
            "DELETE FROM encounters WHERE id = (SELECT MIN(id) FROM encounters)",
            "encounters",
            "operational: ",
            "rows missing",
        ),
        (
            // An archived (or purged) record copied into the operational database too.
            &*format!(
                "ATTACH DATABASE '{}' AS src; \
                 INSERT INTO encounters SELECT * FROM src.encounters WHERE id NOT IN (SELECT id FROM encounters) LIMIT 1",
                dir.path().join("legacy.db").display()
            ),
            "encounters",
            "operational: ",
            "extra rows",
        ),
        (
            "DELETE FROM _strata_quarantine WHERE rowid = (SELECT MIN(rowid) FROM _strata_quarantine)",
            "",
            "quarantine: ",
            "rows missing",
        ),
    ];
    for (sql, table, place, what) in cases {
        operational(dir.path(), sql).await;
        let (status, out) = verify(dir.path());
        assert_eq!(status, 1, "{sql}: {out}");
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(place) && l.contains(what))
            .unwrap_or_else(|| panic!("{sql}: {out}"));
        if !table.is_empty() {
            let table_line = out
                .lines()
                .find(|l| l.starts_with(table))
                .unwrap_or_else(|| panic!("{sql}: {out}"));
            assert!(table_line.ends_with("MISMATCH"), "{out}");
        }
        assert!(!line.is_empty());
        std::fs::copy(&pristine, &db).unwrap();
    }
    assert_eq!(verify(dir.path()).0, 0);

    // Destruction records prove the values destroyed, not only the keys.
    let control = Db::connect(
        &format!("sqlite://{}", dir.path().join("control.db").display()),
        false,
    )
    .await
    .unwrap();
    let sum = control
        .fetch_all(
            "SELECT value_checksum FROM strata_destructions WHERE table_name = 'lab_results'"
                .into(),
            vec![strata_ingest::ColumnType::Text],
        )
        .await
        .unwrap()[0][0]
        .as_key_text()
        .unwrap();
    assert!(sum.starts_with("sum256:"), "{sum}");
    let forged = format!("sum256:{}", "0".repeat(64));
    control
        .execute(&format!(
            "UPDATE strata_destructions SET value_checksum = '{forged}' WHERE table_name = 'lab_results'"
        ))
        .await
        .unwrap();
    let (status, out) = verify(dir.path());
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains("purged: ") && out.contains("their values differ"),
        "{out}"
    );
    control
        .execute(&format!(
            "UPDATE strata_destructions SET value_checksum = '{sum}' WHERE table_name = 'lab_results'"
        ))
        .await
        .unwrap();
    control.close().await;
    assert_eq!(verify(dir.path()).0, 0);

    // A mismatch is narrowed down to its records: which key, what kind, which columns.
    operational(
        dir.path(),
        "UPDATE lab_results SET status = 'amended', unit = 'x' WHERE id = (SELECT MIN(id) FROM lab_results); \
         DELETE FROM encounters WHERE id = (SELECT MAX(id) FROM encounters)",
    )
    .await;
    let target = Db::connect(&format!("sqlite://{}", db.display()), true)
        .await
        .unwrap();
    let ids = target
        .fetch_all(
            "SELECT (SELECT MIN(id) FROM lab_results)".into(),
            vec![strata_ingest::ColumnType::Int],
        )
        .await
        .unwrap();
    target.close().await;
    let lab = ids[0][0].as_key_text().unwrap();
    let (status, out) = verify(dir.path());
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains(&format!("operational: changed id={lab} (unit, status)"))
            || out.contains(&format!("operational: changed id={lab} (status, unit)")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("operational: missing id=")),
        "{out}"
    );
    std::fs::copy(&pristine, &db).unwrap();

    // A value changed in the archive: a file rewritten with the archive's own key, under a
    // valid (sealed) manifest, one status changed.
    let config = load_config(&config_path);
    let (store, keys) = config.archive.open(&config.base_dir).unwrap();
    let keys = keys.for_archive(store.as_ref(), false).await.unwrap();
    let reader = strata_archive::ArchiveReader::open(store.clone(), keys.clone())
        .await
        .unwrap();
    let manifest = reader.catalog().tables["lab_results"][0].clone();
    let mut batches = Vec::new();
    for f in &manifest.files {
        batches.extend(reader.read_file(f).await.unwrap());
    }
    let first = &batches[0];
    let status = first.schema().index_of("status").unwrap();
    let key = {
        use arrow::array::AsArray;
        first.column(2).as_string::<i32>().value(0).to_string()
    };
    let mut columns = first.columns().to_vec();
    let mut statuses: Vec<Option<String>> = {
        use arrow::array::AsArray;
        columns[status]
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect()
    };
    statuses[0] = Some(format!(
        "{}-edited",
        statuses[0].clone().unwrap_or_default()
    ));
    columns[status] = std::sync::Arc::new(arrow::array::StringArray::from(statuses));
    batches[0] = arrow::array::RecordBatch::try_new(first.schema(), columns).unwrap();
    let mut writer = strata_archive::TableWriter::new(
        store.clone(),
        keys.clone(),
        strata_archive::TableManifest::new(
            "lab_results",
            &manifest.run_id,
            &manifest.policy_version,
            manifest.blob_columns.clone(),
        ),
        batches[0].schema(),
        strata_archive::TableWriterOptions::default(),
    )
    .unwrap();
    for b in &batches {
        writer.write(b).await.unwrap();
    }
    writer.finish().await.unwrap();
    let (status, out) = verify(dir.path());
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains("archive: ") && out.contains("their values differ"),
        "{out}"
    );
    assert!(
        out.contains(&format!("archive: changed {key} (status)")),
        "{out}"
    );

    // A BLOB altered in the store: found when BLOBs are read back (the default), not when the
    // catalog's hashes are trusted.
    let documents = reader.catalog().tables["documents"][0].clone();
    let batch = reader
        .read_file(&documents.files[0])
        .await
        .unwrap()
        .remove(0);
    let object = strata_archive::ArchivedBatch::new(&batch, &documents.blob_columns)
        .blobs(0)
        .next()
        .expect("an archived document")
        .1
        .object;
    let path = dir
        .path()
        .join("archive")
        .join(strata_archive::BlobStore::object_path(&object));
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let (status, out) = verify(dir.path());
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains("archive: the BLOB in column content of record"),
        "{out}"
    );
    assert!(out.contains("(content)"), "{out}");
    let trusted = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["verify", "--blobs", "trust-catalog", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let documents_line = String::from_utf8_lossy(&trusted.stdout)
        .lines()
        .find(|l| l.starts_with("documents"))
        .unwrap()
        .to_string();
    assert!(documents_line.ends_with("proven"), "{documents_line}");
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    // A missing archive file is named.
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let file = archive.catalog().tables["lab_results"][0].files[0]
        .path
        .clone();
    let on_disk = dir.path().join("archive").join(&file);
    std::fs::rename(&on_disk, dir.path().join("moved.parquet")).unwrap();
    let (status, out) = verify(dir.path());
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains(&format!("archive: file {file} cannot be read")),
        "{out}"
    );
    assert!(
        out.contains("archive: ") && out.contains("rows missing"),
        "{out}"
    );
}

/// The mutations a count cannot see: values swapped between two rows (the same rows, the same
/// multiset of values per column), and one of a pair of identical rows of a table without a
/// key deleted.
#[tokio::test]
async fn verify_finds_swapped_values_and_a_lost_identical_row() {
    let dir = TestDir::new();
    let source = sqlite_source(
        dir.path(),
        "legacy.db",
        "CREATE TABLE visits (id INTEGER PRIMARY KEY, patient_id INTEGER, seen DATE, status TEXT);
         INSERT INTO visits VALUES (1, 1, '2026-01-02', 'open'), (2, 1, '2026-01-03', 'closed'), (3, 2, '2010-01-01', 'closed');
         CREATE TABLE supplies (patient_id INTEGER, supplied_on DATE, item TEXT);
         INSERT INTO supplies VALUES (1, '2026-01-02', 'gauze'), (1, '2026-01-02', 'gauze'), (2, '2010-01-01', 'gauze');",
    )
    .await;
    let config = run_config(&source, "sqlite://operational.db")
        + "[tables.visits]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"seen\"\n\
           [tables.supplies]\npatient_key = \"patient_id\"\nrecord_date = \"supplied_on\"\n";
    write_run_files(
        dir.path(),
        &config,
        &format!(
            "version = \"1\"\nas_of = \"{}\"\n[defaults]\narchive_after = \"3y\"\npatient_inactive_after = \"2y\"\n",
            as_of()
        ),
    );
    let run =
        strata_ingest::Migration::prepare(load_config(&dir.path().join("strata.toml")), as_of())
            .await
            .unwrap()
            .run(&mut |_| {})
            .await
            .unwrap();
    assert_eq!(verify(dir.path()).0, 0);
    // Its progress counts the source rows checked against the run's, table by table.
    let migration =
        strata_ingest::Migration::prepare(load_config(&dir.path().join("strata.toml")), as_of())
            .await
            .unwrap();
    assert!(migration.verify(&run, false, false).await.unwrap().proven());
    let progress = migration.progress().snapshot();
    assert_eq!(progress.len(), 2);
    for t in &progress {
        assert!(t.done && t.rows == t.expected_rows && t.rows == 3, "{t:?}");
    }
    let db = dir.path().join("operational.db");
    let pristine = dir.path().join("operational.pristine");
    std::fs::copy(&db, &pristine).unwrap();

    operational(
        dir.path(),
        "UPDATE visits SET status = CASE id WHEN 1 THEN 'closed' ELSE 'open' END WHERE id IN (1, 2)",
    )
    .await;
    let (status, out) = verify(dir.path());
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains("operational: 2 rows as expected, but their values differ"),
        "{out}"
    );
    assert!(out.contains("operational: changed id=1 (status)"), "{out}");
    assert!(out.contains("operational: changed id=2 (status)"), "{out}");
    std::fs::copy(&pristine, &db).unwrap();

    operational(
        dir.path(),
        "DELETE FROM supplies WHERE rowid = (SELECT MIN(rowid) FROM supplies)",
    )
    .await;
    let (status, out) = verify(dir.path());
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains("operational: 2 rows expected, 1 found (rows missing)"),
        "{out}"
    );
    // The second of the two identical rows is the one missing.
    assert!(
        out.lines().any(|l| {
            let l = l.trim();
            l.starts_with("operational: missing ") && l.ends_with("#2")
        }),
        "{out}"
    );
}

/// A verification report is evidence: signed with the configured Ed25519 key, checked offline
/// against the configured public key only. An edited field, an added field and a report
/// signed with another key are all refused.
#[tokio::test]
async fn a_signed_report_holds_only_as_signed_by_the_configured_key() {
    let dir = TestDir::new();
    let source = sqlite_source(
        dir.path(),
        "legacy.db",
        "CREATE TABLE visits (id INTEGER PRIMARY KEY, patient_id INTEGER, seen DATE);
         INSERT INTO visits VALUES (1, 1, '2026-01-02'), (2, 2, '2010-01-01');",
    )
    .await;
    let strata = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    for key in ["verify.key", "other.key"] {
        assert!(strata(&["verify", "--new-signing-key", key])
            .status
            .success());
    }
    let head = run_config(&source, "sqlite://operational.db")
        + "[tables.visits]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"seen\"\n";
    let config = |signing: &str| {
        format!(
            "{head}[verify]\nsigning_key_file = \"{signing}\"\npublic_key_file = \"verify.pub\"\n"
        )
    };
    write_run_files(
        dir.path(),
        &config("verify.key"),
        &format!(
            "version = \"1\"\nas_of = \"{}\"\n[defaults]\narchive_after = \"3y\"\npatient_inactive_after = \"2y\"\n",
            as_of()
        ),
    );
    strata_ingest::Migration::prepare(load_config(&dir.path().join("strata.toml")), as_of())
        .await
        .unwrap()
        .run(&mut |_| {})
        .await
        .unwrap();
    let out = strata(&[
        "verify",
        "--config",
        "strata.toml",
        "--report",
        "report.json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["signature"]["algorithm"], "Ed25519");
    let check = |file: &str, content: &str| {
        std::fs::write(dir.path().join(file), content).unwrap();
        let out = strata(&["verify", "--config", "strata.toml", "--check-report", file]);
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (status, out) = check("report.json", &text);
    assert_eq!(status, Some(0), "{out}");
    assert!(out.contains("signature valid"), "{out}");
    // An edited count.
    let mut edited = report.clone();
    edited["tables"][0]["found"]["archive"]["rows"] = serde_json::json!(2);
    let (status, out) = check("edited.json", &edited.to_string());
    assert_eq!(status, Some(1), "{out}");
    assert!(out.contains("NOT VALID"), "{out}");
    // An added field.
    let mut added = report.clone();
    added["note"] = serde_json::json!("all fine");
    let (status, out) = check("added.json", &added.to_string());
    assert_ne!(status, Some(0), "{out}");
    // The same report signed with another key (which it names as its own).
    std::fs::write(dir.path().join("strata.toml"), config("other.key")).unwrap();
    let out = strata(&[
        "verify",
        "--config",
        "strata.toml",
        "--report",
        "other.json",
    ]);
    assert!(out.status.success());
    std::fs::write(dir.path().join("strata.toml"), config("verify.key")).unwrap();
    let other = std::fs::read_to_string(dir.path().join("other.json")).unwrap();
    let (status, out) = check("other.json", &other);
    assert_eq!(status, Some(1), "{out}");

    // A signing key kept wrapped by the archive's key service: never on disk in clear.
    let out = strata(&[
        "verify",
        "--config",
        "strata.toml",
        "--new-signing-key",
        "wrapped.key",
        "--wrapped",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("wrapped.key")).unwrap())
            .unwrap();
    assert!(
        kept["kek_id"].is_string() && kept["wrapped"].is_string(),
        "{kept}"
    );
    std::fs::write(
        dir.path().join("strata.toml"),
        format!(
            "{head}[verify]\nsigning_key_wrapped_file = \"wrapped.key\"\npublic_key_file = \"wrapped.pub\"\n"
        ),
    )
    .unwrap();
    let out = strata(&[
        "verify",
        "--config",
        "strata.toml",
        "--report",
        "wrapped.json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let signed = std::fs::read_to_string(dir.path().join("wrapped.json")).unwrap();
    let (status, out) = check("wrapped.json", &signed);
    assert_eq!(status, Some(0), "{out}");
    // The report signed with the clear key does not hold under the wrapped key's public key.
    let (status, out) = check("report.json", &text);
    assert_eq!(status, Some(1), "{out}");
}

/// Verifies `run` (without re-reading BLOBs) with the run files in `dir`, stopped while
/// `table`'s rows are being checked, before its proof is kept. A verification that got past
/// the table before the stop was seen (a loaded machine) is started again with a fresh
/// migration, up to a few times.
async fn stop_when_checking(dir: &std::path::Path, run: &strata_ingest::RunReport, table: &str) {
    let config = load_config(&dir.join("strata.toml"));
    for _ in 0..5 {
        let migration = strata_ingest::Migration::prepare(config.clone(), as_of())
            .await
            .unwrap();
        let started = async {
            loop {
                let progress = migration.progress().snapshot();
                if progress.iter().any(|t| t.table == table && t.rows > 0) {
                    return;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            done = migration.verify(run, false, false) => panic!("not stopped: {:?}", done.map(|r| r.proven())),
            _ = started => {}
        }
        // The control database keeps a stopped verification's proofs.
        let db = Db::connect(
            &format!("sqlite://{}", dir.join("strata-control.db").display()),
            false,
        )
        .await
        .unwrap();
        let kept = count(
            &db,
            format!("SELECT COUNT(*) FROM strata_verify_progress WHERE table_name = '{table}'"),
        )
        .await;
        db.close().await;
        if kept == 0 {
            return;
        }
    }
    panic!("{table}: never stopped before its proof was kept");
}

/// A verification stopped in its second table goes on with `--resume` from that table: the
/// first is taken as proven then (the report says when), so a change made to it since is not
/// seen; the next verification, not resumed, reads every table again and finds it.
#[tokio::test]
async fn a_stopped_verification_resumes_from_the_tables_it_proved() {
    let dir = TestDir::new();
    let source = sqlite_source(
        dir.path(),
        "legacy.db",
        "CREATE TABLE a_visits (id INTEGER PRIMARY KEY, patient_id INTEGER, seen DATE, status TEXT);
         INSERT INTO a_visits VALUES (1, 1, '2026-01-02', 'open'), (2, 2, '2010-01-01', 'closed');
         CREATE TABLE b_observations (id INTEGER PRIMARY KEY, patient_id INTEGER, observed DATE, value REAL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 40000)
         INSERT INTO b_observations SELECT i, i % 500, '2026-01-01', i * 0.5 FROM n;",
    )
    .await;
    let config = run_config(&source, "sqlite://operational.db")
        + "[tables.a_visits]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"seen\"\n\
           [tables.b_observations]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"observed\"\n";
    write_run_files(
        dir.path(),
        &config,
        &format!(
            "version = \"1\"\nas_of = \"{}\"\n[defaults]\narchive_after = \"3y\"\npatient_inactive_after = \"2y\"\n",
            as_of()
        ),
    );
    let config = load_config(&dir.path().join("strata.toml"));
    let run = strata_ingest::Migration::prepare(config.clone(), as_of())
        .await
        .unwrap()
        .run(&mut |_| {})
        .await
        .unwrap();
    stop_when_checking(dir.path(), &run, "b_observations").await;
    operational(
        dir.path(),
        "UPDATE a_visits SET status = 'closed' WHERE id = 1",
    )
    .await;
    let resumed = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["verify", "--config", "strata.toml"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // Resumed under other options (BLOBs re-read), nothing earlier is taken: found.
    let (status, out) = resumed(&["--resume"]);
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("a_visits"), "{out}");
    // Stopped again in the second table, then resumed as it was asked.
    operational(
        dir.path(),
        "UPDATE a_visits SET status = 'open' WHERE id = 1",
    )
    .await;
    stop_when_checking(dir.path(), &run, "b_observations").await;
    operational(
        dir.path(),
        "UPDATE a_visits SET status = 'closed' WHERE id = 1",
    )
    .await;
    let (status, out) = resumed(&["--resume", "--blobs", "trust-catalog"]);
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("a_visits") && out.contains("before this verification was resumed"),
        "{out}"
    );
    assert_eq!(
        out.matches("before this verification was resumed").count(),
        1,
        "{out}"
    );
    // Done: the next verification reads every table again.
    let (status, out) = resumed(&["--resume", "--blobs", "trust-catalog"]);
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains("a_visits") && out.contains("MISMATCH"),
        "{out}"
    );
}
