//! Change sync (issue #18), its first part: the replication slot and the bulk copy's snapshot
//! meet exactly, under a writer that never stops; the stream decodes whole transactions as a
//! role with only `REPLICATION` and `SELECT` reads them.

use crate::support::*;
use futures::StreamExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use strata_ingest::sync::pgoutput::{Datum, Message};
use strata_ingest::sync::snapshot::XidSnapshot;
use strata_ingest::sync::stream::{create_slot, parse_lsn, ChangeStream};
use strata_ingest::{ColumnType, Db, Value};

/// Slot first, snapshot after, while every few hundred microseconds a transaction commits: each
/// row is either in the snapshot or in a decoded transaction the snapshot did not see, never
/// both, never neither; and some transactions the stream decodes were seen by the snapshot
/// (the overlap the rule is there for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_and_the_copys_snapshot_meet_with_no_gap_and_no_overlap() {
    let url = create_pg_database("strata_sync_gap").await;
    let admin = Db::connect(&url, false).await.unwrap();
    let (base, db) = url.rsplit_once('/').unwrap();
    let role = format!("{db}_sync");
    admin
        .execute(&format!(
            "CREATE TABLE events (id bigserial PRIMARY KEY, note text);
             CREATE TABLE untouched (id int);
             CREATE PUBLICATION strata_gap FOR TABLE events;
             CREATE ROLE {role} LOGIN REPLICATION; GRANT CONNECT ON DATABASE {db} TO {role};
             GRANT USAGE ON SCHEMA public TO {role}; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"
        ))
        .await
        .unwrap();
    let sync_url = format!(
        "{}/{db}",
        base.replacen("postgres@", &format!("{role}@"), 1)
    );
    // A writer that commits one row per transaction, without pause.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let db = Db::connect(&url, false).await.unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                db.execute("INSERT INTO events (note) VALUES ('written while the copy starts')")
                    .await
                    .unwrap();
                n += 1;
            }
            db.close().await;
            n
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let source = Db::connect(&sync_url, true).await.unwrap();
    let slot = format!("{db}_slot");
    create_slot(&sync_url, &slot).await.unwrap();
    // Transactions commit between the slot's consistent point and the snapshot.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let snapshot = source.export_snapshot().await.unwrap().unwrap();
    let seen: XidSnapshot = snapshot.xids.parse().unwrap();
    let copied: Vec<i64> = source
        .fetch_in(
            "SELECT id FROM events".into(),
            vec![ColumnType::Int],
            Some(&snapshot.id),
        )
        .map(|r| match r.unwrap()[0] {
            Value::Int(id) => id,
            ref other => panic!("{other:?}"),
        })
        .collect()
        .await;
    drop(snapshot);
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    // One last row, committed after the stop position, so that the stream has something past
    // it to end at (its transaction may come or not: it is not counted).
    let end = admin
        .fetch_all(
            "SELECT pg_current_wal_lsn()::text".into(),
            vec![ColumnType::Text],
        )
        .await
        .unwrap();
    let Value::Text(end) = &end[0][0] else {
        panic!()
    };
    admin
        .execute("INSERT INTO events (note) VALUES ('last'); INSERT INTO untouched VALUES (1)")
        .await
        .unwrap();

    let mut stream = ChangeStream::open(
        &sync_url,
        &slot,
        "strata_gap",
        Some(parse_lsn(end).unwrap()),
    )
    .await
    .unwrap();
    let (mut applied, mut skipped, mut transactions) = (Vec::new(), 0, 0);
    let mut last_end = 0;
    while let Some(t) = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        stream.next_transaction(),
    )
    .await
    .expect("the stream reaches the stop position")
    .unwrap()
    {
        transactions += 1;
        assert!(t.end_lsn > last_end, "commit order");
        last_end = t.end_lsn;
        if seen.saw(t.xid) {
            skipped += 1;
            continue;
        }
        for m in &t.messages {
            if let Message::Insert { new, .. } = m {
                let Datum::Text(id) = &new[0] else {
                    panic!("{new:?}")
                };
                if new[1] != Datum::Text("last".into()) {
                    applied.push(id.parse::<i64>().unwrap());
                }
            }
        }
        stream.confirm(t.end_lsn);
    }
    stream.close().await.unwrap();

    let all: Vec<i64> = admin
        .fetch_all(
            "SELECT id FROM events WHERE note <> 'last' ORDER BY id".into(),
            vec![ColumnType::Int],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| match r[0] {
            Value::Int(id) => id,
            ref other => panic!("{other:?}"),
        })
        .collect();
    assert!(written > 100, "the writer kept writing ({written} rows)");
    assert!(
        skipped > 0,
        "some decoded transactions were in the snapshot"
    );
    assert!(!copied.is_empty() && !applied.is_empty());
    let copied_set: std::collections::BTreeSet<i64> = copied.iter().copied().collect();
    let both: Vec<&i64> = applied
        .iter()
        .filter(|id| copied_set.contains(id))
        .collect();
    assert!(both.is_empty(), "applied twice: {both:?}");
    let mut union: Vec<i64> = copied.iter().chain(&applied).copied().collect();
    union.sort();
    let missing: Vec<&i64> = all
        .iter()
        .filter(|id| union.binary_search(id).is_err())
        .collect();
    let extra: Vec<&i64> = union
        .iter()
        .filter(|id| all.binary_search(id).is_err())
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && union.len() == all.len(),
        "every row exactly once: missing {missing:?}, extra {extra:?} ({transactions} transactions decoded, {skipped} seen by the snapshot; {} rows, ids up to {:?})",
        all.len(),
        all.last()
    );
    admin
        .execute(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await
        .unwrap();
    admin.close().await;
    source.close().await;
}

/// An application's writes: new patients' visits (recent, so operational under any facts),
/// status changes (of its own visits and of copied current ones) that leave the TOASTed note
/// alone, deletes, and rows of a table without a key; one transaction touches both tables.
async fn application(url: String, stop: Arc<AtomicBool>, first_patient: i64) -> u64 {
    let db = Db::connect(&url, false).await.unwrap();
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let patient = first_patient + n % 50;
        let id = 100_000 + first_patient * 10 + n;
        db.execute(&format!(
            "BEGIN;
             INSERT INTO visits VALUES ({id}, {patient}, DATE '2026-03-01' + ({n} % 90), 'open',
               (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 120)));
             INSERT INTO readings VALUES ({patient}, DATE '2026-04-01', {n}.5);
             COMMIT;"
        ))
        .await
        .unwrap();
        if n % 3 == 0 {
            db.execute(&format!(
                "UPDATE visits SET status = 'closed' WHERE id IN ({id}, {})",
                101 + n % 40
            ))
            .await
            .unwrap();
        }
        if n % 7 == 6 {
            db.execute(&format!(
                "DELETE FROM visits WHERE id = {}; DELETE FROM readings WHERE ctid = (SELECT ctid FROM readings WHERE patient_id = {patient} LIMIT 1)",
                id - 2
            ))
            .await
            .unwrap();
        }
        n += 1;
    }
    db.close().await;
    n as u64
}

fn strata(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .args(["--config", "strata.toml"])
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("panicked"), "{text}");
    (out.status.code().unwrap_or(-1), text)
}

/// A legacy PostgreSQL database being followed: its URL (the owner's), an owner connection,
/// and the operational database's URL.
struct Followed {
    url: String,
    admin: Db,
    operational: String,
}

/// A source of `visits` (half of the patients with only old visits, archived) and keyless
/// `readings`, read by a role with SELECT and REPLICATION; the config in `dir`; and what the
/// owner must do, as `strata sync prepare` prints it, done.
async fn followed_source(
    dir: &std::path::Path,
    visits: i64,
    note_md5s: i64,
    readings: i64,
) -> Followed {
    let url = create_pg_database("strata_sync_follow").await;
    let admin = Db::connect(&url, false).await.unwrap();
    let (_, db) = url.rsplit_once('/').unwrap();
    admin
        .execute(&format!(
            "CREATE TABLE visits (id bigint PRIMARY KEY, patient_id bigint NOT NULL, seen date NOT NULL,
               status text NOT NULL, note text);
             CREATE TABLE readings (patient_id bigint NOT NULL, taken date NOT NULL, value numeric(8,2));
             INSERT INTO visits SELECT g, 1 + g % 200, CASE WHEN g % 200 < 100 THEN DATE '2010-01-01' + g % 300 ELSE DATE '2025-06-01' + g % 300 END,
               'open', (SELECT string_agg(md5(g::text || r::text), '') FROM generate_series(1, {note_md5s}) r)
               FROM generate_series(1, {visits}) g;
             INSERT INTO readings SELECT 101 + g % 100, DATE '2025-07-01' + g % 100, g / 4.0 FROM generate_series(1, {readings}) g;"
        ))
        .await
        .unwrap();
    let source = read_only_url(&url).await;
    admin
        .execute(&format!("ALTER ROLE {db}_reader REPLICATION"))
        .await
        .unwrap();
    let operational = create_pg_database("strata_sync_follow_op").await;
    let config = run_config(&source, &operational)
        + &format!(
            "[sync]\nslot = \"{db}_slot\"\npublication = \"{db}_pub\"\n\
             [tables.visits]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"seen\"\n\
             [tables.readings]\npatient_key = \"patient_id\"\nrecord_date = \"taken\"\n"
        );
    write_run_files(
        dir,
        &config,
        &format!(
            "version = \"1\"\nas_of = \"{}\"\n[defaults]\narchive_after = \"3y\"\npatient_inactive_after = \"2y\"\n",
            as_of()
        ),
    );
    // What the owner must do, printed; run as printed; then in place.
    let (status, out) = strata(dir, &["sync", "prepare"]);
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains("ALTER TABLE \"readings\" REPLICA IDENTITY FULL;"),
        "{out}"
    );
    let statements: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("CREATE PUBLICATION") || l.starts_with("ALTER TABLE"))
        .collect();
    assert_eq!(statements.len(), 2, "{out}");
    admin.execute(&statements.join("\n")).await.unwrap();
    let (status, out) = strata(dir, &["sync", "prepare"]);
    assert_eq!(status, 0, "{out}");
    Followed {
        url,
        admin,
        operational,
    }
}

/// `strata sync prepare` prints what the owner must run; `strata migrate --follow` copies while
/// an application writes; `strata sync --catch-up` applies what the copy did not see, and
/// `strata verify` proves source = target. Then `strata sync` is killed (SIGKILL) at three
/// moments while the application goes on, and caught up: proven again, nothing applied twice.
/// A record the policy sends to the archive, and a correction to an archived record, leave
/// through the archive outbox, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_run_catches_up_through_the_policy_and_survives_kill_9() {
    let dir = TestDir::new();
    let Followed {
        url,
        admin,
        operational,
    } = followed_source(dir.path(), 3000, 120, 2000).await;

    // The copy, while the application writes.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(application(url.clone(), stop.clone(), 10_000));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut migration =
        strata_ingest::Migration::prepare(load_config(&dir.path().join("strata.toml")), as_of())
            .await
            .unwrap();
    migration.follow(true);
    let report = migration.run(&mut |_| {}).await.unwrap();
    assert!(report.tables.iter().any(|t| t.archive_rows > 0));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(writer.await.unwrap() > 20);
    let (status, out) = strata(dir.path(), &["sync", "--catch-up"]);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("transaction(s) applied"), "{out}");
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");

    // kill -9 while following, the application still writing.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(application(url.clone(), stop.clone(), 20_000));
    for delay_ms in [150u64, 400, 900] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["sync", "--config", "strata.toml"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        child.kill().unwrap();
        child.wait().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let (status, caught_up) = strata(dir.path(), &["sync", "--catch-up"]);
    assert_eq!(status, 0, "{caught_up}");
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{caught_up}\n{out}");

    // A record the policy archives (a new patient's only visit, years old) goes to the outbox,
    // not to the operational database; caught up twice, it is there once.
    admin
        .execute("INSERT INTO visits VALUES (999999, 99999, DATE '2012-02-02', 'closed', 'old'); UPDATE visits SET status = 'corrected' WHERE id = 1; UPDATE visits SET id = 1000002 WHERE id = 2; UPDATE visits SET seen = DATE '2026-05-01', note = 'seen again' WHERE id = 3; UPDATE visits SET seen = DATE '2026-05-02' WHERE id = 4")
        .await
        .unwrap();
    for _ in 0..2 {
        let (status, out) = strata(dir.path(), &["sync", "--catch-up"]);
        assert_eq!(status, 0, "{out}");
    }
    let target = Db::connect(&operational, true).await.unwrap();
    let outbox: Vec<(String, String)> = target
        .fetch_all(
            "SELECT change, row_key FROM _strata_sync_archive WHERE table_name = 'visits'".into(),
            vec![ColumnType::Text, ColumnType::Text],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r[0].as_key_text().unwrap(), r[1].as_key_text().unwrap()))
        .collect();
    let once: Vec<&(String, String)> = outbox.iter().filter(|(_, k)| k == "id=999999").collect();
    assert_eq!(once, [&("upsert".to_string(), "id=999999".to_string())]);
    // A status change to an archived visit (id 1: an old visit of an inactive patient) is a
    // correction for the archive too, never an operational row.
    assert!(
        outbox.iter().any(|(c, k)| c == "upsert" && k == "id=1"),
        "{outbox:?}"
    );
    // An archived record whose key changed: a tombstone for the old key and the record under
    // the new one, two outbox entries of one change.
    // An archived record that became current again (id 3, dated anew): its archived copy is
    // withdrawn (a tombstone), the record upserted into the operational database. One whose
    // TOASTed note the change did not carry (id 4) waits for the archive writer to reinstate
    // it whole.
    for (change, key) in [
        ("delete", "id=2"),
        ("upsert", "id=1000002"),
        ("delete", "id=3"),
        ("reinstate", "id=4"),
    ] {
        assert!(
            outbox.iter().any(|(c, k)| c == change && k == key),
            "{change} {key}: {outbox:?}"
        );
    }
    let held = target
        .fetch_all(
            "SELECT COUNT(*) FROM visits WHERE id IN (1, 999999)".into(),
            vec![ColumnType::Int],
        )
        .await
        .unwrap();
    assert_eq!(held[0][0], Value::Int(0));
    let current = target
        .fetch_all(
            "SELECT COUNT(*) FROM visits WHERE id = 3".into(),
            vec![ColumnType::Int],
        )
        .await
        .unwrap();
    assert_eq!(current[0][0], Value::Int(1));
    target.close().await;
    // A slot that holds back more WAL than [sync] max_retained_wal stops sync, with advice.
    let config_path = dir.path().join("strata.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(
        &config_path,
        config.replacen("[sync]\n", "[sync]\nmax_retained_wal = \"1kB\"\n", 1),
    )
    .unwrap();
    let (status, out) = strata(dir.path(), &["sync", "--catch-up"]);
    assert_ne!(status, 0, "{out}");
    assert!(
        out.contains("at or past [sync] max_retained_wal (1024 bytes): sync stops to protect the source's disk")
            && out.contains("strata sync stop --drop-slot"),
        "{out}"
    );
    std::fs::write(&config_path, config).unwrap();

    // A migrated table's definition changes on the source while sync follows: it stops,
    // naming the table and both column lists.
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["sync", "--config", "strata.toml"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    admin
        .execute("ALTER TABLE visits ADD COLUMN ward text; INSERT INTO visits VALUES (999998, 20001, DATE '2026-05-05', 'open', 'n', 'B2')")
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("table visits changed on the source: its columns are now (id, patient_id, seen, status, note, ward), the run copied (id, patient_id, seen, status, note)"),
        "{said}"
    );
    let (status, out) = strata(dir.path(), &["sync", "stop", "--drop-slot"]);
    assert_eq!(status, 0, "{out}");
    admin.close().await;
}

/// kill -9 in the bulk phase of `strata migrate --follow` while the application writes, once
/// the first table is copied: the next run finishes the copy (the table cut short copied
/// again, in a new snapshot recorded for it), sync catches up, and verify proves it exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followed_copy_killed_in_its_bulk_phase_ends_exact() {
    let dir = TestDir::new();
    let Followed { url, admin, .. } = followed_source(dir.path(), 300_000, 1, 2000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(application(url.clone(), stop.clone(), 30_000));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["migrate", "--follow", "--config", "strata.toml"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed while visits (the second table) is being copied, readings done.
    let control_db = dir.path().join("strata-control.db");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the copy ended ({status}) before it could be killed");
        }
        if control_db.exists() {
            let control = Db::connect(&format!("sqlite://{}", control_db.display()), true)
                .await
                .unwrap();
            let started = control
                .fetch_all(
                    "SELECT table_name FROM strata_sync_tables WHERE table_name = 'visits'".into(),
                    vec![ColumnType::Text],
                )
                .await
                .unwrap_or_default();
            control.close().await;
            if !started.is_empty() {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the copy ended before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let control = strata_control::Control::open(&format!("sqlite://{}", control_db.display()))
        .await
        .unwrap();
    let run = control.latest_run().await.unwrap().unwrap();
    assert_eq!(run.status, "running");
    assert_eq!(
        control
            .table_state::<serde_json::Value, serde_json::Value>(&run.run_id, "readings")
            .await
            .unwrap()
            .map(|s| matches!(s, strata_control::TableState::Done { .. })),
        Some(true)
    );
    let before = control.table_snapshots(&run.run_id).await.unwrap();
    // The next run finishes the copy, following the same slot.
    let mut migration =
        strata_ingest::Migration::prepare(load_config(&dir.path().join("strata.toml")), as_of())
            .await
            .unwrap();
    migration.follow(true);
    let report = migration.run(&mut |_| {}).await.unwrap();
    assert_eq!(report.run_id, run.run_id);
    let after = control.table_snapshots(&run.run_id).await.unwrap();
    assert_eq!(after["readings"], before["readings"]);
    assert_ne!(after["visits"], before["visits"]);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let (status, out) = strata(dir.path(), &["sync", "--catch-up"]);
    assert_eq!(status, 0, "{out}");
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");
    // Rolled back, the run is no longer followed: its slot goes with it.
    let (status, out) = strata(
        dir.path(),
        &[
            "rollback",
            "--by",
            "jdoe",
            "--reason",
            "a rehearsal, not the real thing",
        ],
    );
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("replication slot") && out.contains("was dropped"),
        "{out}"
    );
    let (_, db) = url.rsplit_once('/').unwrap();
    let slots = admin
        .fetch_all(
            format!(
                "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = '{db}_slot'"
            ),
            vec![ColumnType::Text],
        )
        .await
        .unwrap();
    assert!(slots.is_empty());
    admin.close().await;
}

/// `strata cutover`: "no-go" while the application still writes (with the statements that make
/// the source read-only; the slot kept); "go" once it is quiet: recorded, the slot dropped, the
/// new EHR's identity sequence set past every migrated key. A rollback is then refused unless
/// `--after-cutover`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_is_no_go_while_the_source_writes_and_go_once_it_is_quiet() {
    let dir = TestDir::new();
    let Followed {
        url,
        admin,
        operational,
    } = followed_source(dir.path(), 500, 1, 300).await;
    let (_, db) = url.rsplit_once('/').unwrap();
    // The new EHR's schema, made beforehand: visits keyed by an identity column.
    let target = Db::connect(&operational, false).await.unwrap();
    target
        .execute(
            "CREATE TABLE visits (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, patient_id bigint NOT NULL,
               seen date NOT NULL, status text NOT NULL, note text)",
        )
        .await
        .unwrap();
    let mut migration =
        strata_ingest::Migration::prepare(load_config(&dir.path().join("strata.toml")), as_of())
            .await
            .unwrap();
    migration.follow(true);
    migration.run(&mut |_| {}).await.unwrap();
    let slots = |admin: &Db| {
        let sql = format!(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = '{db}_slot'"
        );
        let admin = admin.clone();
        async move {
            admin
                .fetch_all(sql, vec![ColumnType::Text])
                .await
                .unwrap()
                .len()
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(application(url.clone(), stop.clone(), 40_000));
    let (status, out) = strata(
        dir.path(),
        &["cutover", "--by", "jdoe", "--quiet-seconds", "2"],
    );
    assert_eq!(status, 1, "{out}");
    assert!(
        out.contains("NO-GO")
            && out.contains("the source is not quiet")
            && out.contains("default_transaction_read_only = on"),
        "{out}"
    );
    assert_eq!(slots(&admin).await, 1);
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let (status, out) = strata(
        dir.path(),
        &[
            "cutover",
            "--by",
            "jdoe",
            "--quiet-seconds",
            "1",
            "--report",
            "cutover.json",
        ],
    );
    assert_eq!(status, 0, "{out}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("cutover.json")).unwrap())
            .unwrap();
    assert_eq!(report["decision"], "go", "{report}");
    assert_eq!(report["verified"], true);
    assert_eq!(slots(&admin).await, 0);
    let control = strata_control::Control::open(&format!(
        "sqlite://{}",
        dir.path().join("strata-control.db").display()
    ))
    .await
    .unwrap();
    let run = control.latest_run().await.unwrap().unwrap();
    assert_eq!(control.cutovers(&run.run_id).await.unwrap().len(), 2);
    assert_eq!(
        control.cutover_of(&run.run_id).await.unwrap().unwrap().by,
        "jdoe"
    );
    // The new EHR's next key is past every migrated one.
    let source_max = admin
        .fetch_all("SELECT MAX(id) FROM visits".into(), vec![ColumnType::Int])
        .await
        .unwrap();
    let next = target
        .fetch_all(
            "SELECT nextval(pg_get_serial_sequence('visits', 'id'))".into(),
            vec![ColumnType::Int],
        )
        .await
        .unwrap();
    match (&source_max[0][0], &next[0][0]) {
        (Value::Int(max), Value::Int(next)) => assert!(next > max, "{next} <= {max}"),
        other => panic!("{other:?}"),
    }
    // Rolling back now would lose what the new EHR writes: refused unless asked.
    let reason = [
        "--by",
        "jdoe",
        "--reason",
        "the new EHR failed its first day",
    ];
    let (status, out) = strata(dir.path(), &[&["rollback"][..], &reason].concat());
    assert_ne!(status, 0, "{out}");
    assert!(out.contains("--after-cutover"), "{out}");
    let (status, out) = strata(
        dir.path(),
        &[&["rollback"][..], &reason, &["--after-cutover"]].concat(),
    );
    assert_eq!(status, 0, "{out}");
    target.close().await;
    admin.close().await;
}
