//! `strata tier` (issue #20): after go-live, the operational database's aged records move to
//! the archive while the application writes, foreign keys and DELETE triggers respected,
//! kill -9 at any moment losing and duplicating nothing; records past retention are destroyed
//! only once a second records manager approved their list, holds winning.

use super::*;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use strata_control::{Control, RequestStatus};
use strata_ingest::ColumnType;
use strata_ingest::DestructionCertificate;

/// Patients of the fixture; each has `VISITS` visits, from 2015 to 2024 (even patients,
/// active at the migration) or from 2012 to 2017 (odd ones, whose old visits it archived).
const PATIENTS: i64 = 60;
const VISITS: i64 = 20;

/// A legacy source (patients, visits, orders of visits), migrated at the suite's `as_of`
/// into a PostgreSQL operational database, which then gains a foreign key from orders to
/// visits (the new EHR's). Returns the directory, the operational URL and the config path.
async fn gone_live() -> (TestDir, String, PathBuf) {
    gone_live_with("").await
}

/// [`gone_live`], with `orders_rules` (TOML lines) added to the policy's `[tables.orders]`.
async fn gone_live_with(orders_rules: &str) -> (TestDir, String, PathBuf) {
    let source = create_pg_database("strata_tier_src").await;
    let db = Db::connect(&source, false).await.unwrap();
    db.execute(&format!(
        "CREATE TABLE patients (id bigint PRIMARY KEY, name text, birth_date date);
         CREATE TABLE visits (id bigint PRIMARY KEY, patient_id bigint NOT NULL, visit_date date NOT NULL, status text NOT NULL, version integer NOT NULL DEFAULT 0, note text);
         CREATE TABLE orders (id bigint PRIMARY KEY, visit_id bigint NOT NULL, patient_id bigint NOT NULL, ordered date NOT NULL, state text NOT NULL);
         INSERT INTO patients SELECT p, 'patient ' || p, DATE '1950-01-01' + p * 100 FROM generate_series(1, {PATIENTS}) p;
         INSERT INTO visits SELECT (p - 1) * {VISITS} + v, p, CASE WHEN p % 2 = 0 THEN DATE '2015-01-01' + (v * 180 + p) ELSE DATE '2012-01-01' + (v * 100 + p) END, CASE WHEN v % 7 = 0 THEN 'active' ELSE 'closed' END, 0, 'first'
           FROM generate_series(1, {PATIENTS}) p, generate_series(1, {VISITS}) v;
         INSERT INTO orders SELECT id, id, patient_id, visit_date, CASE WHEN id % 10 = 3 THEN 'open' ELSE 'done' END FROM visits WHERE id % 2 = 1;
         CREATE TABLE scans (id bigint PRIMARY KEY, patient_id bigint NOT NULL, taken date NOT NULL, image bytea);
         INSERT INTO scans SELECT p, p, DATE '2015-06-01' + p * 30, decode(repeat(md5(p::text), CASE WHEN p % 10 = 0 THEN 1000 ELSE 20 END), 'hex')
           FROM generate_series(1, {PATIENTS}) p;"
    ))
    .await
    .unwrap();
    db.close().await;
    let source = read_only_url(&source).await;
    let operational = create_pg_database("strata_tier_op").await;
    let dir = TestDir::new();
    let config = format!(
        "{}[control]\nurl = \"sqlite://control.db\"\n\
         [tables.patients]\nprimary_key = [\"id\"]\npatient_key = \"id\"\n\
         [tables.visits]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"visit_date\"\n\
         [tables.orders]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"ordered\"\n\
         [tables.scans]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"taken\"\n\
         blobs = [{{ column = \"image\", content_type = \"application/dicom\" }}]\n\
         [run]\ninline_blob_bytes = 4096\n",
        run_config(&source, &operational)
    );
    let policy = format!(
        "version = \"tier-test\"\nas_of = \"{}\"\n[patients]\ntable = \"patients\"\nbirth_date = \"birth_date\"\n\
         [defaults]\narchive_after = \"2y\"\npatient_inactive_after = \"2y\"\nretention = \"10y\"\n\
         [tables.patients]\ntier = \"operational\"\n\
         [tables.visits]\ncurrent_when = {{ column = \"status\", values = [\"active\"] }}\n\
         [tables.orders]\ncurrent_when = {{ column = \"state\", values = [\"open\"] }}\n{orders_rules}",
        as_of()
    );
    write_run_files(dir.path(), &config, &policy);
    let config_path = dir.path().join("strata.toml");
    let mut migration = Migration::prepare(load_config(&config_path), as_of())
        .await
        .unwrap();
    migration.run(&mut |_| {}).await.unwrap();
    let op = Db::connect(&operational, false).await.unwrap();
    op.execute("ALTER TABLE orders ADD CONSTRAINT orders_visit_fk FOREIGN KEY (visit_id) REFERENCES visits (id) NOT VALID")
        .await
        .unwrap();
    op.close().await;
    (dir, operational, config_path)
}

fn strata_in(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `strata tier` in 2030 (a rehearsal: every patient inactive by then).
const TIER_2030: [&str; 6] = [
    "tier",
    "--by",
    "rm-alice",
    "--as-of",
    "2030-01-01",
    "--allow-future-as-of",
];

/// The current archived copies of `table`: key → the value of `column` (as text).
async fn archived(config_path: &Path, table: &str, column: &str) -> Vec<(String, String)> {
    let config = load_config(config_path);
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let successors = archive.successors(table).await.unwrap();
    let mut out = Vec::new();
    for (rank, _, entry) in archive.ranked_files(table) {
        for b in archive.read_file(entry).await.unwrap() {
            let b = strata_archive::ArchivedBatch::new(&b, &[]);
            for row in 0..b.num_rows() {
                let key = b.key(row).unwrap();
                if successors.fate(rank, key) != strata_archive::Fate::Current {
                    continue;
                }
                let value = b
                    .value(column, row)
                    .and_then(|v| v.to_text().map(|t| t.into_owned()))
                    .unwrap_or_default();
                out.push((key.to_string(), value));
            }
        }
    }
    out
}

/// What the application did: per visit id, the version its last successful write left (None
/// once it deleted the visit).
type Written = Arc<Mutex<BTreeMap<i64, Option<i64>>>>;

/// The new EHR at work: updates visits (bumping their version), records new old-dated
/// visits, deletes some, until `stop`.
async fn application(url: String, stop: Arc<AtomicBool>, written: Written) -> u64 {
    let db = Db::connect(&url, false).await.unwrap();
    let mut n: u64 = 0;
    let mut next_id = 1_000_000;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let id = (rand::random::<u64>() % (PATIENTS * VISITS) as u64) as i64 + 1;
        match n % 10 {
            0 => {
                next_id += 1;
                // An even patient's: active until 2024, so not past retention in 2030.
                let patient = (id % (PATIENTS / 2) + 1) * 2;
                db.execute(&format!(
                    "INSERT INTO visits (id, patient_id, visit_date, status, version, note) VALUES ({next_id}, {patient}, DATE '2019-03-01', 'closed', 0, 'new')"
                ))
                .await
                .unwrap();
                written.lock().unwrap().insert(next_id, Some(0));
            }
            7 => {
                // Visits no order points at (even ids) may be deleted.
                let id = id - id % 2;
                if id == 0 {
                    continue;
                }
                let gone = db
                    .fetch_all(
                        format!("DELETE FROM visits WHERE id = {id} RETURNING id"),
                        vec![ColumnType::Int],
                    )
                    .await
                    .unwrap();
                if !gone.is_empty() {
                    written.lock().unwrap().insert(id, None);
                }
            }
            _ => {
                let rows = db
                    .fetch_all(
                        format!("UPDATE visits SET version = version + 1, note = 'edited' WHERE id = {id} RETURNING version"),
                        vec![ColumnType::Int],
                    )
                    .await
                    .unwrap();
                if let Some(Value::Int(v)) = rows.first().map(|r| r[0].clone()) {
                    written.lock().unwrap().insert(id, Some(v));
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    db.close().await;
    n
}

/// Every visit in exactly one place, as the application last left it: nothing lost, nothing
/// archived stale, nothing twice.
async fn assert_visits_in_one_place(operational: &str, config_path: &Path, written: &Written) {
    let op = Db::connect(operational, false).await.unwrap();
    let in_op: BTreeMap<String, i64> = op
        .fetch_all(
            "SELECT 'id=' || id, version FROM visits".into(),
            vec![ColumnType::Text, ColumnType::Int],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| match (&r[0], &r[1]) {
            (Value::Text(k), Value::Int(v)) => (k.clone(), *v),
            _ => unreachable!(),
        })
        .collect();
    op.close().await;
    let in_archive = archived(config_path, "visits", "version").await;
    let mut archived_versions: HashMap<String, i64> = HashMap::new();
    for (key, version) in &in_archive {
        let earlier = archived_versions.insert(key.clone(), version.parse().unwrap());
        assert!(
            earlier.is_none(),
            "visit {key} has two current archived copies"
        );
        assert!(
            !in_op.contains_key(key),
            "visit {key} is both operational and archived"
        );
    }
    let written = written.lock().unwrap().clone();
    let mut expected: BTreeSet<String> =
        (1..=PATIENTS * VISITS).map(|i| format!("id={i}")).collect();
    for (id, last) in &written {
        let key = format!("id={id}");
        match last {
            None => {
                expected.remove(&key);
            }
            Some(version) => {
                expected.insert(key.clone());
                let found = in_op.get(&key).or(archived_versions.get(&key));
                assert_eq!(
                    found,
                    Some(version),
                    "visit {key}: the application last wrote version {version}"
                );
            }
        }
    }
    let found: BTreeSet<String> = in_op
        .keys()
        .chain(archived_versions.keys())
        .cloned()
        .collect();
    assert_eq!(
        found, expected,
        "every visit once, none the application deleted"
    );
}

/// Aged records move while the application writes, through five or more kill -9s: every visit
/// ends in exactly one place as the application last wrote it; open orders keep the visits
/// they point at operational (a foreign key), children leave before parents; the ledger of the
/// archive accounts for every batch; a preview moves nothing.
#[tokio::test]
async fn tier_moves_aged_rows_while_the_application_writes_through_kill_9() {
    let (dir, operational, config_path) = gone_live().await;
    let op = Db::connect(&operational, false).await.unwrap();
    let count = |sql: &str| {
        let sql = sql.to_string();
        let op = &op;
        async move { super::count(op, sql).await }
    };
    let visits_before = count("SELECT COUNT(*) FROM visits").await;
    let archived_before = archived(&config_path, "visits", "version").await.len();
    assert!(
        archived_before > 0,
        "the migration archived old visits already"
    );

    // A preview says what would move, and moves nothing.
    let (ok, out) = strata_in(
        dir.path(),
        &[
            "plan",
            "--tier",
            "--as-of",
            "2030-01-01",
            "--allow-future-as-of",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("would move"), "{out}");
    assert_eq!(count("SELECT COUNT(*) FROM visits").await, visits_before);

    // Small batches: a pass commits many, so that kills land between them and inside them.
    let text = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        text.replace("[operational]\n", "[operational]\nbatch_rows = 5\n"),
    )
    .unwrap();
    // A pass reads only the rows dated early enough to leave: in 2020, visits up to 2018.
    let (ok, out) = strata_in(
        dir.path(),
        &["plan", "--tier", "--as-of", "2020-01-01", "--json"],
    );
    assert!(ok, "{out}");
    let preview: serde_json::Value = serde_json::from_str(&out).unwrap();
    let table = |name: &str| {
        preview["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == name)
            .cloned()
            .unwrap()
    };
    let read = table("visits")["rows_read"].as_u64().unwrap();
    let early = count("SELECT COUNT(*) FROM visits WHERE visit_date <= DATE '2018-01-01'").await;
    assert!(
        read >= early && read < visits_before,
        "{read} of {visits_before} read: {out}"
    );
    assert!(table("patients")["skipped"]
        .as_str()
        .unwrap()
        .contains("not read"));
    let stop = Arc::new(AtomicBool::new(false));
    let written: Written = Arc::default();
    let app = tokio::spawn(application(
        operational.clone(),
        stop.clone(),
        written.clone(),
    ));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (mut kills, mut interrupted) = (0, 0);
    let mut archived_so_far = archived(&config_path, "visits", "version").await.len();
    for attempt in 0..40 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(TIER_2030)
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let wait = 150 + (attempt * 97) % 700;
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        let killed = child.try_wait().unwrap().is_none();
        if killed {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        // A kill that came after the pass had moved some of its batches cut it in the middle.
        let now = archived(&config_path, "visits", "version").await.len();
        if killed && now > archived_so_far {
            interrupted += 1;
        }
        archived_so_far = now;
        if kills >= 6 && interrupted >= 2 {
            break;
        }
    }
    assert!(kills >= 5, "tier was killed {kills} times");
    assert!(
        interrupted >= 2,
        "{interrupted} kills cut a pass that had moved rows"
    );
    // Passes to the end while the application goes on, then one after it stopped.
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = app.await.unwrap();
    assert!(writes > 100, "the application wrote {writes} times");
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    assert!(
        out.contains("kept: still referenced by orders (orders_visit_fk)"),
        "{out}"
    );

    assert_visits_in_one_place(&operational, &config_path, &written).await;
    // What stays: current visits, and visits an open order points at; open orders.
    let stayed = op
        .fetch_all(
            "SELECT id::text || ' ' || patient_id::text || ' ' || visit_date::text FROM visits v WHERE v.status <> 'active' AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.visit_id = v.id) ORDER BY id LIMIT 5".into(),
            vec![ColumnType::Text],
        )
        .await
        .unwrap();
    assert!(
        stayed.is_empty(),
        "every visit neither current nor referenced left, but {stayed:?}: {out}"
    );
    assert!(count("SELECT COUNT(*) FROM visits v WHERE v.status <> 'active'").await > 0);
    assert_eq!(
        count("SELECT COUNT(*) FROM orders WHERE state <> 'open'").await,
        0
    );
    // Orders moved in the same passes as the visits they pointed at (children first).
    assert!(!archived(&config_path, "orders", "state").await.is_empty());
    // The archive's ledger (the control database) accounts for every batch published.
    let (ok, out) = strata_in(dir.path(), &["archive", "verify"]);
    assert!(ok, "{out}");
    op.close().await;
}

/// A row the application holds locked (an edit in progress) is left for the next pass; once
/// the edit commits, the next pass archives the row as the edit left it, never as it was
/// read before.
#[tokio::test]
async fn a_row_being_edited_is_left_then_archived_as_edited() {
    use sqlx::Connection;
    let (dir, operational, config_path) = gone_live().await;
    // Visit 22: patient 2's second visit (closed, 2015), bound for the archive in 2030.
    let mut editor = sqlx::PgConnection::connect(&operational).await.unwrap();
    sqlx::raw_sql("BEGIN; UPDATE visits SET version = 7, note = 'edited' WHERE id = 22")
        .execute(&mut editor)
        .await
        .unwrap();
    let mut args = TIER_2030.to_vec();
    args.extend(["--report", "tier.json"]);
    let (ok, out) = strata_in(dir.path(), &args);
    assert!(ok, "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tier.json")).unwrap())
            .unwrap();
    let visits = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "visits")
        .unwrap();
    assert_eq!(visits["changed_meanwhile"], 1, "{out}");
    assert!(visits["archived"].as_u64().unwrap() > 0, "{out}");
    assert!(!archived(&config_path, "visits", "version")
        .await
        .iter()
        .any(|(k, _)| k == "id=22"));
    sqlx::raw_sql("COMMIT").execute(&mut editor).await.unwrap();
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    let copies: Vec<String> = archived(&config_path, "visits", "version")
        .await
        .into_iter()
        .filter(|(k, _)| k == "id=22")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(copies, ["7"]);
}

/// A table with a DELETE trigger nobody checked is not touched (its trigger's effects cannot
/// be known); once the trigger is listed as checked, the table is tiered.
#[tokio::test]
async fn an_unchecked_delete_trigger_keeps_its_table_untouched() {
    let (dir, operational, config_path) = gone_live().await;
    let op = Db::connect(&operational, false).await.unwrap();
    op.execute(
        "CREATE TABLE visit_log (id bigint, at timestamptz DEFAULT now());
         CREATE FUNCTION log_visit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO visit_log (id) VALUES (OLD.id); RETURN OLD; END $$;
         CREATE TRIGGER visit_deleted AFTER DELETE ON visits FOR EACH ROW EXECUTE FUNCTION log_visit();",
    )
    .await
    .unwrap();
    let before = count(&op, "SELECT COUNT(*) FROM visits".into()).await;
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    assert!(
        out.contains("visits: not touched: DELETE triggers or rules nobody checked: visit_deleted"),
        "{out}"
    );
    assert_eq!(
        count(&op, "SELECT COUNT(*) FROM visits".into()).await,
        before
    );
    // Orders moved regardless (they have no trigger).
    assert_eq!(
        count(
            &op,
            "SELECT COUNT(*) FROM orders WHERE state <> 'open'".into()
        )
        .await,
        0
    );

    let mut text = std::fs::read_to_string(&config_path).unwrap();
    text.push_str(
        "[operational.tables.visits]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"visit_date\"\nallow_delete_triggers = [\"visit_deleted\"]\n\
         [operational.tables.orders]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"ordered\"\n\
         [operational.tables.patients]\nprimary_key = [\"id\"]\npatient_key = \"id\"\n",
    );
    // ([operational] must come before [tables.*] only in spirit: TOML places the keys.)
    std::fs::write(&config_path, text).unwrap();
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    let moved = before - count(&op, "SELECT COUNT(*) FROM visits".into()).await;
    assert!(moved > 0, "{out}");
    assert_eq!(
        count(&op, "SELECT COUNT(*) FROM visit_log".into()).await,
        moved
    );
    op.close().await;
}

/// `strata verify` proves the migration run after tier and retention: the rows tier moved are
/// archived exactly as the source says, those it destroyed are on its destruction records,
/// those retention destroyed in the archive on its, and the rest where the run put them.
#[tokio::test]
async fn verify_proves_every_row_in_one_place_after_tier_and_retain() {
    // Done orders are kept three years: in 2030 they are past retention, while their visits
    // are only old enough for the archive.
    let (dir, operational, config_path) = gone_live_with("retention = \"3y\"\n").await;
    with_signing_key(dir.path());
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    let request = filed_request(&out);
    assert!(
        out.contains("kept: still referenced by orders (orders_visit_fk)"),
        "{out}"
    );
    let (ok, out) = strata_in(
        dir.path(),
        &[
            "destruction",
            "approve",
            &request,
            "--by",
            "rm-bob",
            "--note",
            "checked",
        ],
    );
    assert!(ok, "{out}");
    // The done orders go (children first), which frees the visits they pointed at.
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    assert!(out.contains("destroyed, approved by rm-bob"), "{out}");
    let op = Db::connect(&operational, false).await.unwrap();
    assert_eq!(
        count(
            &op,
            "SELECT COUNT(*) FROM orders WHERE state <> 'open'".into()
        )
        .await,
        0
    );
    op.close().await;
    let (code, out) = strata_verify(&config_path);
    assert_eq!(code, 0, "{out}");
    let visits = out.lines().find(|l| l.starts_with("visits")).unwrap();
    let tiered: u64 = visits
        .split(" + ")
        .find(|p| p.ends_with("tiered to the archive"))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(tiered > 0, "{out}");
    assert!(out.contains("destroyed by tier"), "{out}");
    // Retention inside the archive in 2045: the archived visits (tiered ones among them).
    let retain_2045 = [
        "archive",
        "retain",
        "--by",
        "rm-alice",
        "--as-of",
        "2045-01-01",
        "--allow-future-as-of",
    ];
    let (ok, out) = strata_in(dir.path(), &retain_2045);
    assert!(ok, "{out}");
    let request = filed_request(&out);
    let (ok, out) = strata_in(
        dir.path(),
        &[
            "destruction",
            "approve",
            &request,
            "--by",
            "rm-bob",
            "--note",
            "checked",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = strata_in(dir.path(), &retain_2045);
    assert!(ok, "{out}");
    let (code, out) = strata_verify(&config_path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("destroyed by retention"), "{out}");
    // The ledger is not taken on trust: a visit still operational that it claims was moved is
    // a mismatch.
    let op = Db::connect(&operational, false).await.unwrap();
    op.execute(
        "UPDATE _strata_tier_batches SET keys = replace(keys, '[', '[\"id=' || (SELECT MIN(id) FROM visits) || '\",') \
         WHERE writer = (SELECT MIN(writer) FROM _strata_tier_batches WHERE table_name = 'visits' AND request_id IS NULL)",
    )
    .await
    .unwrap();
    op.close().await;
    let (code, out) = strata_verify(&config_path);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("tiered to the archive"), "{out}");
    // Nor are certificates: an edited one is named.
    let config = load_config(&config_path);
    let control = Db::connect(&config.control_url().unwrap(), false)
        .await
        .unwrap();
    control
        .execute("UPDATE strata_destruction_requests SET certificate = replace(certificate, '\"blobs_deleted\":0', '\"blobs_deleted\":7') WHERE kind = 'tier'")
        .await
        .unwrap();
    control.close().await;
    let (code, out) = strata_verify(&config_path);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("the certificate of destruction list") && out.contains("was edited"),
        "{out}"
    );
}

/// Records past retention in the operational database are filed for approval, never destroyed
/// before a second records manager approves; a hold placed after the approval keeps its
/// patient's records; the certificate is signed.
#[tokio::test]
async fn tier_destroys_past_retention_only_after_another_records_manager_approves() {
    let (dir, operational, config_path) = gone_live().await;
    with_signing_key(dir.path());
    let op = Db::connect(&operational, false).await.unwrap();
    let rows = |sql: &'static str| {
        let op = &op;
        async move { count(op, sql.to_string()).await }
    };
    const PAST: &str = "(SELECT id, patient_id FROM visits WHERE status <> 'active' UNION ALL SELECT id, patient_id FROM orders WHERE state <> 'open' UNION ALL SELECT id, patient_id FROM scans)";
    let past_before = count(&op, format!("SELECT COUNT(*) FROM {PAST} r")).await;
    let held_before = count(
        &op,
        format!("SELECT COUNT(*) FROM {PAST} r WHERE patient_id = 4"),
    )
    .await;
    assert!(past_before > 0 && held_before > 0);
    // In 2045 every patient has been inactive for more than ten years: every record that is
    // not clinically current (nor a patient, pinned) is past retention.
    let tier_2045 = [
        "tier",
        "--by",
        "rm-alice",
        "--as-of",
        "2045-01-01",
        "--allow-future-as-of",
    ];
    let (ok, out) = strata_in(dir.path(), &tier_2045);
    assert!(ok, "{out}");
    assert!(out.contains("filed for approval"), "{out}");
    let request = filed_request(&out);
    // Nothing is destroyed before the approval, however many passes run.
    let (ok, out) = strata_in(dir.path(), &tier_2045);
    assert!(ok, "{out}");
    assert!(out.contains("awaiting approval"), "{out}");
    assert_eq!(
        count(&op, format!("SELECT COUNT(*) FROM {PAST} r")).await,
        past_before
    );
    let (refused, out) = strata_in(
        dir.path(),
        &[
            "destruction",
            "approve",
            &request,
            "--by",
            "rm-alice",
            "--note",
            "mine",
        ],
    );
    assert!(!refused, "{out}");
    let (ok, out) = strata_in(
        dir.path(),
        &[
            "destruction",
            "approve",
            &request,
            "--by",
            "rm-bob",
            "--note",
            "checked",
        ],
    );
    assert!(ok, "{out}");
    // A hold placed after the approval keeps patient 4's records.
    let (ok, out) = strata_in(
        dir.path(),
        &[
            "hold",
            "place",
            "--patient",
            "4",
            "--by",
            "counsel",
            "--reason",
            "matter 20",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = strata_in(dir.path(), &tier_2045);
    assert!(ok, "{out}");
    assert!(out.contains("destroyed, approved by rm-bob"), "{out}");
    // Left operational: visits an open order still points at (kept by the key). The held
    // patient's records are never destroyed: aged, they went to the archive instead.
    const REFERENCED: &str = "SELECT COUNT(*) FROM visits v WHERE status <> 'active' AND EXISTS (SELECT 1 FROM orders o WHERE o.visit_id = v.id)";
    assert_eq!(
        count(&op, format!("SELECT COUNT(*) FROM {PAST} r")).await,
        rows(REFERENCED).await
    );
    let held_archived = archived(&config_path, "orders", "patient_id")
        .await
        .into_iter()
        .filter(|(_, p)| p == "4")
        .count() as u64;
    assert!(held_archived > 0);
    let config = load_config(&config_path);
    let control = Control::open(&config.control_url().unwrap()).await.unwrap();
    let done = control
        .destruction_request(&request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, RequestStatus::Done);
    let certificate: DestructionCertificate =
        serde_json::from_value(done.certificate.unwrap()).unwrap();
    assert_eq!(certificate.kind, "tier");
    let destroyed: u64 = certificate.tables.iter().map(|t| t.rows).sum();
    assert!(destroyed > 0);
    assert_eq!(destroyed + certificate.kept_by_holds, past_before);
    strata_ingest::check_evidence::<DestructionCertificate>(
        &config,
        &serde_json::to_string(&certificate).unwrap(),
    )
    .unwrap();
    op.close().await;
}

/// A batch whose manifest was published but whose delete never committed (tier killed
/// between the two) is withdrawn before a compaction could merge it: the records stay
/// operational only, and the archive's accounting holds.
#[tokio::test]
async fn a_batch_killed_before_its_commit_is_withdrawn_before_compaction_merges_it() {
    let (dir, operational, config_path) = gone_live().await;
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    // Put the state of a kill between the manifest and the commit back together: the rows of
    // one batch operational again, its checkpoint gone, its manifest still published.
    let op = Db::connect(&operational, false).await.unwrap();
    let batch = op
        .fetch_all(
            "SELECT writer, keys FROM _strata_tier_batches WHERE table_name = 'visits' ORDER BY writer LIMIT 1".into(),
            vec![ColumnType::Text, ColumnType::Text],
        )
        .await
        .unwrap()
        .remove(0);
    let (Value::Text(writer), Value::Text(keys)) = (&batch[0], &batch[1]) else {
        unreachable!()
    };
    let keys: BTreeSet<String> = serde_json::from_str::<Vec<String>>(keys)
        .unwrap()
        .into_iter()
        .collect();
    let columns = ["patient_id", "visit_date", "status", "version", "note"];
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for column in columns {
        for (key, value) in archived(&config_path, "visits", column).await {
            if keys.contains(&key) {
                values.entry(key).or_default().push(value);
            }
        }
    }
    assert_eq!(values.len(), keys.len());
    for (key, v) in &values {
        let id = key.strip_prefix("id=").unwrap();
        op.execute(&format!(
            "INSERT INTO visits (id, patient_id, visit_date, status, version, note) VALUES ({id}, {}, DATE '{}', '{}', {}, '{}')",
            v[0], v[1], v[2], v[3], v[4]
        ))
        .await
        .unwrap();
    }
    op.execute(&format!(
        "DELETE FROM _strata_tier_batches WHERE writer = '{writer}'"
    ))
    .await
    .unwrap();
    // (A batch is recorded in the control database's ledger only once committed.)
    let config = load_config(&config_path);
    let control = Db::connect(&config.control_url().unwrap(), false)
        .await
        .unwrap();
    control
        .execute(&format!(
            "DELETE FROM strata_archive_ledger WHERE run_id = '{writer}'; DELETE FROM strata_archive_files WHERE run_id = '{writer}'"
        ))
        .await
        .unwrap();
    control.close().await;
    let (ok, out) = strata_in(dir.path(), &["archive", "compact"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("1 batch(es) of an interrupted tier pass withdrawn"),
        "{out}"
    );
    let archived_keys: BTreeSet<String> = archived(&config_path, "visits", "version")
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        archived_keys.is_disjoint(&keys),
        "the batch's records are operational only"
    );
    let (ok, out) = strata_in(dir.path(), &["archive", "verify"]);
    assert!(ok, "{out}");
    // The next pass moves them again, once.
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    let again: Vec<String> = archived(&config_path, "visits", "version")
        .await
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| keys.contains(k))
        .collect();
    assert_eq!(again.len(), keys.len());
    op.close().await;
}

/// Tier and the archive's maintenance take turns on one lock in the operational database,
/// whichever host runs them: while another session holds it, each waits, then says so.
#[tokio::test]
async fn maintenance_commands_take_turns_on_the_operational_databases_lock() {
    use sqlx::Connection;
    let (dir, operational, _config_path) = gone_live().await;
    let mut other_host = sqlx::PgConnection::connect(&operational).await.unwrap();
    sqlx::raw_sql("SELECT pg_advisory_lock(6004514643731611649)")
        .execute(&mut other_host)
        .await
        .unwrap();
    for args in [&TIER_2030[..], &["archive", "compact"][..]] {
        let (ok, out) = strata_in(dir.path(), args);
        assert!(!ok, "{args:?}: {out}");
        assert!(out.contains("holds the maintenance lock"), "{out}");
    }
    other_host.close().await.unwrap();
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
}

/// The new EHR adds and drops columns: tier archives a visit as the operational table holds it
/// (a new column in new files), and a compaction of old and new files keeps every column of
/// every file (none is dropped because the newest file lacks it).
#[tokio::test]
async fn columns_the_new_ehr_added_or_dropped_survive_tier_and_compaction() {
    let (dir, operational, config_path) = gone_live().await;
    let notes_before = archived(&config_path, "visits", "note").await;
    assert!(notes_before.iter().all(|(_, n)| n == "first"));
    let op = Db::connect(&operational, false).await.unwrap();
    op.execute("ALTER TABLE visits ADD COLUMN triage text DEFAULT 'green'; ALTER TABLE visits DROP COLUMN note")
        .await
        .unwrap();
    op.close().await;
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    let triage = |copies: Vec<(String, String)>| -> BTreeMap<String, String> {
        copies.into_iter().collect()
    };
    let moved: BTreeMap<String, String> = triage(archived(&config_path, "visits", "triage").await)
        .into_iter()
        .filter(|(_, t)| t == "green")
        .collect();
    assert!(!moved.is_empty());
    for compaction in 0..2 {
        let (ok, out) = strata_in(dir.path(), &["archive", "compact"]);
        assert!(ok, "{out}");
        let notes: BTreeMap<String, String> = archived(&config_path, "visits", "note")
            .await
            .into_iter()
            .collect();
        for (key, note) in &notes_before {
            assert_eq!(
                notes.get(key),
                Some(note),
                "pass {compaction}: {key}'s note"
            );
        }
        let after = triage(archived(&config_path, "visits", "triage").await);
        for key in moved.keys() {
            assert_eq!(after[key], "green", "pass {compaction}: {key}'s triage");
        }
    }
    let (ok, out) = strata_in(dir.path(), &["archive", "verify"]);
    assert!(ok, "{out}");
}

/// Documents move with their records: each archived as an encrypted object that reads back
/// as it was (one longer than the inline limit streamed from the operational row, locked).
#[tokio::test]
async fn documents_move_with_their_records() {
    let (dir, operational, config_path) = gone_live().await;
    let op = Db::connect(&operational, false).await.unwrap();
    let digests: BTreeMap<String, String> = op
        .fetch_all(
            "SELECT 'id=' || id, encode(sha256(image), 'hex') FROM scans".into(),
            vec![ColumnType::Text, ColumnType::Text],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r[0].as_key_text().unwrap(), r[1].as_key_text().unwrap()))
        .collect();
    assert!(
        count(
            &op,
            "SELECT COUNT(*) FROM scans WHERE octet_length(image) > 4096".into()
        )
        .await
            > 0
    );
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    assert_eq!(
        count(&op, "SELECT COUNT(*) FROM scans".into()).await,
        0,
        "{out}"
    );
    op.close().await;
    let config = load_config(&config_path);
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let blobs = archive.blobs();
    let columns = archive.catalog().blob_columns("scans");
    let (mut moved, mut long) = (0, 0);
    for (_, _, entry) in archive.ranked_files("scans") {
        for b in archive.read_file(entry).await.unwrap() {
            let b = strata_archive::ArchivedBatch::new(&b, &columns);
            for row in 0..b.num_rows() {
                // (The scans the migration archived are not in the operational database.)
                let Some(digest) = digests.get(b.key(row).unwrap()) else {
                    continue;
                };
                for (_, r) in b.blobs(row) {
                    let content = blobs.get(&r).await.unwrap();
                    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&content));
                    assert_eq!(&sha, digest);
                    assert_eq!(r.content_type, "application/dicom");
                    moved += 1;
                    long += usize::from(content.len() > 4096);
                }
            }
        }
    }
    assert_eq!(moved, digests.len());
    assert!(long > 0);
}

/// The new EHR renamed the table and its columns: `[operational.tables]` reads it in its
/// names, the policy's `current_when` column is found through them, and the moved records are
/// archived under the archive's names (the same table, the same columns, the same keys).
#[tokio::test]
async fn tables_and_columns_the_new_ehr_renamed_are_read_in_its_names() {
    let (dir, operational, config_path) = gone_live().await;
    let op = Db::connect(&operational, false).await.unwrap();
    op.execute(
        "ALTER TABLE visits RENAME TO encounters;
         ALTER TABLE encounters RENAME COLUMN status TO encounter_status;
         ALTER TABLE encounters RENAME COLUMN visit_date TO started_on;",
    )
    .await
    .unwrap();
    let mut text = std::fs::read_to_string(&config_path).unwrap();
    text.push_str(
        "[operational.tables.encounters]\narchive_table = \"visits\"\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\n\
         record_date = \"started_on\"\ncolumns = { encounter_status = \"status\", started_on = \"visit_date\" }\n\
         [operational.tables.orders]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"ordered\"\n\
         [operational.tables.patients]\nprimary_key = [\"id\"]\npatient_key = \"id\"\n",
    );
    std::fs::write(&config_path, text).unwrap();
    let before: BTreeSet<String> = archived(&config_path, "visits", "status")
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let (ok, out) = strata_in(dir.path(), &TIER_2030);
    assert!(ok, "{out}");
    assert!(out.contains("encounters (archived as visits)"), "{out}");
    // Clinically current encounters stayed (the policy's `status` is `encounter_status`).
    assert!(
        count(
            &op,
            "SELECT COUNT(*) FROM encounters WHERE encounter_status = 'active'".into()
        )
        .await
            > 0
    );
    assert_eq!(
        count(&op, "SELECT COUNT(*) FROM encounters e WHERE encounter_status <> 'active' AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.visit_id = e.id)".into()).await,
        0
    );
    let moved: Vec<(String, String)> = archived(&config_path, "visits", "status")
        .await
        .into_iter()
        .filter(|(k, _)| !before.contains(k))
        .collect();
    assert!(!moved.is_empty());
    assert!(moved
        .iter()
        .all(|(k, s)| k.starts_with("id=") && s == "closed"));
    let dates = archived(&config_path, "visits", "visit_date").await;
    assert!(
        dates.iter().all(|(_, d)| !d.is_empty()),
        "dates under the archive's name"
    );
    op.close().await;
}
