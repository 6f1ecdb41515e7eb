//! `strata rollback`: the last finished run undone on the target side and run again; refused
//! while a run goes on; kill -9 during a rollback, then a rollback again, ends in the same state.

use crate::support::*;
use strata_ingest::Db;

const POLICY: &str = "version = \"1\"\nas_of = \"2026-06-30\"\n[defaults]\narchive_after = \"3y\"\npatient_inactive_after = \"2y\"\nretention = \"10y\"\n";

/// A source of three tables (a row of each to archive, to purge, to quarantine), and an
/// operational `visits` table created beforehand (empty), in `dir`.
async fn setup(dir: &std::path::Path) {
    let source = sqlite_source(
        dir,
        "legacy.db",
        "CREATE TABLE visits (id INTEGER PRIMARY KEY, patient_id INTEGER, seen DATE, status TEXT);
         INSERT INTO visits VALUES (1, 1, '2026-01-02', 'open'), (2, 2, '2018-01-03', 'closed'),
           (3, 3, '2001-01-01', 'closed'), (4, 1, 'soon', 'open');
         CREATE TABLE supplies (id INTEGER PRIMARY KEY, patient_id INTEGER, supplied_on DATE, item TEXT);
         INSERT INTO supplies VALUES (1, 1, '2026-01-02', 'gauze'), (2, 2, '2018-01-02', 'gauze');",
    )
    .await;
    let operational = Db::connect(
        &format!("sqlite://{}?mode=rwc", dir.join("operational.db").display()),
        false,
    )
    .await
    .unwrap();
    operational
        .execute("CREATE TABLE visits (id INTEGER PRIMARY KEY, patient_id INTEGER, seen DATE, status TEXT)")
        .await
        .unwrap();
    operational.close().await;
    let config = run_config(&source, "sqlite://operational.db")
        + "[control]\nurl = \"sqlite://control.db\"\n\
           [tables.visits]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"seen\"\n\
           [tables.supplies]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"supplied_on\"\n";
    write_run_files(dir, &config, POLICY);
}

fn strata(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .args(["--config", "strata.toml"])
        .current_dir(dir)
        .output()
        .unwrap()
}

fn rollback(dir: &std::path::Path) -> std::process::Output {
    strata(
        dir,
        &[
            "rollback",
            "--by",
            "jdoe",
            "--reason",
            "wrong policy version used",
        ],
    )
}

async fn migrate(dir: &std::path::Path) -> strata_ingest::RunReport {
    strata_ingest::Migration::prepare(load_config(&dir.join("strata.toml")), as_of())
        .await
        .unwrap()
        .run(&mut |_| {})
        .await
        .unwrap()
}

/// The target side after a rollback of `run_id`: `visits` empty (it was there before),
/// `supplies` gone (the run created it), no quarantined row, no manifest, the run
/// `rolled_back` and its destruction records void.
async fn assert_rolled_back(dir: &std::path::Path, run_id: &str) {
    let target = Db::connect(
        &format!("sqlite://{}", dir.join("operational.db").display()),
        true,
    )
    .await
    .unwrap();
    assert_eq!(
        target.table_names().await.unwrap(),
        vec!["visits".to_string()]
    );
    assert_eq!(
        count(&target, "SELECT COUNT(*) FROM visits".into()).await,
        0
    );
    assert_eq!(
        count(&target, "SELECT COUNT(*) FROM _strata_quarantine".into()).await,
        0
    );
    target.close().await;
    let manifests = dir.join("archive/manifests");
    let left: Vec<_> = walk(&manifests);
    assert!(left.is_empty(), "{left:?}");
    let control =
        strata_control::Control::open(&format!("sqlite://{}", dir.join("control.db").display()))
            .await
            .unwrap();
    let run = control.latest_run().await.unwrap().unwrap();
    assert_eq!(
        (run.run_id.as_str(), run.status.as_str()),
        (run_id, "rolled_back")
    );
    let rollback = &control.rollbacks().await.unwrap()[0];
    assert_eq!(
        (rollback.by.as_str(), rollback.run_id.as_str()),
        ("jdoe", run_id)
    );
    assert!(rollback.finished_at.is_some());
    let destructions = control.destructions().await.unwrap();
    assert!(destructions
        .iter()
        .filter(|(d, _)| d.run_id == run_id)
        .all(|(d, _)| d.void.is_some()));
    assert!(control.destroyed_rows().await.unwrap().is_empty());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flat_map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}

#[tokio::test]
async fn a_run_is_rolled_back_and_run_again() {
    let dir = TestDir::new();
    setup(dir.path()).await;
    let report = migrate(dir.path()).await;
    let counted =
        |f: fn(&strata_ingest::TableReport) -> u64| report.tables.iter().map(f).sum::<u64>();
    assert!(counted(|t| t.archive_rows) > 0 && counted(|t| t.purged_rows) > 0);
    assert!(counted(|t| t.quarantined_rows) > 0);
    // A reason is required.
    let out = strata(
        dir.path(),
        &["rollback", "--by", "jdoe", "--reason", "oops"],
    );
    assert!(!out.status.success());
    let out = rollback(dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("1 table(s) dropped, 1 emptied"), "{said}");
    assert_rolled_back(dir.path(), &report.run_id).await;
    // Nothing more to roll back; and the run can be made again, and proven.
    assert!(String::from_utf8_lossy(&rollback(dir.path()).stdout).contains("no finished run"));
    let again = migrate(dir.path()).await;
    assert_ne!(again.run_id, report.run_id);
    assert_eq!(
        serde_json::to_value(&again.tables).unwrap(),
        serde_json::to_value(&report.tables).unwrap()
    );
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");

    // Refused while a run goes on: that is what `migrate --abandon` is for.
    let control = Db::connect(
        &format!("sqlite://{}", dir.path().join("control.db").display()),
        false,
    )
    .await
    .unwrap();
    control
        .execute("UPDATE strata_runs SET status = 'running'")
        .await
        .unwrap();
    let out = rollback(dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("strata migrate --abandon"));
    control
        .execute("UPDATE strata_runs SET status = 'done'")
        .await
        .unwrap();
    control.close().await;
}

/// kill -9 at five moments of a rollback, then a rollback again: the same end state each time.
#[tokio::test]
async fn a_rollback_killed_at_any_moment_finishes_when_run_again() {
    let dir = TestDir::new();
    setup(dir.path()).await;
    for delay_ms in [0u64, 3, 8, 15, 30] {
        let run = migrate(dir.path()).await;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args([
                "rollback",
                "--by",
                "jdoe",
                "--reason",
                "wrong policy version used",
                "--config",
                "strata.toml",
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let out = rollback(dir.path());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_rolled_back(dir.path(), &run.run_id).await;
    }
}

/// `--table`: one table of a run rolled back (the others kept), the run unfinished again, and
/// `strata migrate` copies that table again into the same run, which then proves clean.
#[tokio::test]
async fn one_table_of_a_run_is_rolled_back_and_copied_again() {
    let dir = TestDir::new();
    setup(dir.path()).await;
    let report = migrate(dir.path()).await;
    let args = |table: &'static str| {
        [
            "rollback",
            "--by",
            "jdoe",
            "--reason",
            "supplies mapped with the wrong units",
            "--table",
            table,
        ]
    };
    // A table the run did not copy is refused, named.
    let out = strata(dir.path(), &args("stock"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("table stock is not one of run"));
    let out = strata(dir.path(), &args("supplies"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("table(s) supplies of run"), "{said}");
    assert!(said.contains("1 table(s) dropped, 0 emptied"), "{said}");

    // supplies is gone from the operational database and the archive; visits stays.
    let target = Db::connect(
        &format!("sqlite://{}", dir.path().join("operational.db").display()),
        true,
    )
    .await
    .unwrap();
    assert!(!target
        .table_names()
        .await
        .unwrap()
        .contains(&"supplies".to_string()));
    let visits = report.table("visits").unwrap();
    assert_eq!(
        count(&target, "SELECT COUNT(*) FROM visits".into()).await,
        visits.operational_rows
    );
    assert_eq!(
        count(
            &target,
            "SELECT COUNT(*) FROM _strata_quarantine WHERE table_name = 'visits'".into()
        )
        .await,
        visits.quarantined_rows
    );
    target.close().await;
    assert!(walk(&dir.path().join("archive/manifests/supplies")).is_empty());
    assert!(!walk(&dir.path().join("archive/manifests/visits")).is_empty());
    let control = strata_control::Control::open(&format!(
        "sqlite://{}",
        dir.path().join("control.db").display()
    ))
    .await
    .unwrap();
    let run = control.latest_run().await.unwrap().unwrap();
    assert_eq!(run.status, "running");
    let recorded = &control.rollbacks().await.unwrap()[0];
    assert_eq!(recorded.tables, Some(vec!["supplies".to_string()]));
    let destructions = control.destructions().await.unwrap();
    for (d, _) in &destructions {
        assert_eq!(d.void.is_some(), d.table == "supplies", "{}", d.table);
    }
    // The run is unfinished: a whole rollback is refused, `migrate` finishes it.
    let out = rollback(dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("copies again the tables rolled back"));
    let again = migrate(dir.path()).await;
    assert_eq!(again.run_id, report.run_id);
    assert_eq!(
        serde_json::to_value(&again.tables).unwrap(),
        serde_json::to_value(&report.tables).unwrap()
    );
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");
}
