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

/// Adds `line` to the `[sync]` section of the strata.toml in `dir`.
fn sync_setting(dir: &std::path::Path, line: &str) {
    let path = dir.join("strata.toml");
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        config.replacen("[sync]\n", &format!("[sync]\n{line}\n"), 1),
    )
    .unwrap();
}

/// `strata sync` started in `dir`, following, its output captured.
fn following(dir: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["sync", "--config", "strata.toml"])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
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
    followed_source_with_scans(dir, visits, note_md5s, readings, 0).await
}

/// [`followed_source`], with `scans` rows of a table of images (`scans.image`, a BLOB column
/// of a few kB; half of them of patients whose visits are old).
async fn followed_source_with_scans(
    dir: &std::path::Path,
    visits: i64,
    note_md5s: i64,
    readings: i64,
    scans: i64,
) -> Followed {
    let url = create_pg_database("strata_sync_follow").await;
    let admin = Db::connect(&url, false).await.unwrap();
    let (_, db) = url.rsplit_once('/').unwrap();
    admin
        .execute(&format!(
            "CREATE TABLE visits (id bigint PRIMARY KEY, patient_id bigint NOT NULL, seen date NOT NULL,
               status text NOT NULL, note text, unit character(6) DEFAULT 'W1');
             CREATE TABLE readings (patient_id bigint NOT NULL, taken date NOT NULL, value numeric(8,2));
             INSERT INTO visits SELECT g, 1 + g % 200, CASE WHEN g % 200 < 100 THEN DATE '2010-01-01' + g % 300 ELSE DATE '2025-06-01' + g % 300 END,
               'open', (SELECT string_agg(md5(g::text || r::text), '') FROM generate_series(1, {note_md5s}) r)
               FROM generate_series(1, {visits}) g;
             INSERT INTO readings SELECT 101 + g % 100, DATE '2025-07-01' + g % 100, g / 4.0 FROM generate_series(1, {readings}) g;"
        ))
        .await
        .unwrap();
    if scans > 0 {
        admin
            .execute(&format!(
                "CREATE TABLE scans (id bigint PRIMARY KEY, patient_id bigint NOT NULL, taken date NOT NULL, image bytea);
                 INSERT INTO scans SELECT g, 1 + g % 200, CASE WHEN g % 200 < 100 THEN DATE '2011-01-01' + g % 300 ELSE DATE '2025-08-01' + g % 300 END,
                   decode(repeat(md5(g::text), 100), 'hex') FROM generate_series(1, {scans}) g;"
            ))
            .await
            .unwrap();
    }
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
        )
        + if scans > 0 {
            "[tables.scans]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"taken\"\n\
             [[tables.scans.blobs]]\ncolumn = \"image\"\ncontent_type = \"image/png\"\n"
        } else {
            ""
        };
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
/// through the archive outbox, once, as corrections and tombstones that readers and verify
/// honour.
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

    // Ctrl-C while following and the application writes: sync commits what it applied, tells
    // the slot (which then holds no WAL of what is applied: the next sync is not sent it
    // again), and reports.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(application(url.clone(), stop.clone(), 30_000));
    let child = following(dir.path());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let out = child.wait_with_output().unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("transaction(s) applied"), "{text}");
    let target = Db::connect(&operational, true).await.unwrap();
    let applied = count(&target, "SELECT lsn FROM _strata_sync_position".into()).await;
    target.close().await;
    let (_, db) = url.rsplit_once('/').unwrap();
    let confirmed = count(
        &admin,
        format!("SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = '{db}_slot'"),
    )
    .await;
    assert!(
        confirmed >= applied,
        "slot at {confirmed}, applied {applied}"
    );
    let (status, out) = strata(dir.path(), &["sync", "--catch-up"]);
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("; 0 change(s) the copy had already seen"),
        "{out}"
    );

    // A record the policy archives (a new patient's only visit, years old) goes to the outbox,
    // not to the operational database; caught up twice, it is there once.
    admin
        .execute("INSERT INTO visits VALUES (999999, 99999, DATE '2012-02-02', 'closed', 'old'); UPDATE visits SET status = 'corrected' WHERE id = 1; UPDATE visits SET id = 1000002 WHERE id = 2; UPDATE visits SET seen = DATE '2026-05-01', note = 'seen again' WHERE id = 3; UPDATE visits SET seen = DATE '2026-05-02' WHERE id = 4; UPDATE visits SET patient_id = 12 WHERE id = 9; UPDATE visits SET patient_id = 18, note = 'moved' WHERE id = 15")
        .await
        .unwrap();
    for _ in 0..2 {
        let (status, out) = strata(dir.path(), &["sync", "--catch-up"]);
        assert_eq!(status, 0, "{out}");
    }
    // The archive writer wrote the outbox at the end of each catch-up: nothing waits.
    let target = Db::connect(&operational, true).await.unwrap();
    let waiting = count(&target, "SELECT COUNT(*) FROM _strata_sync_archive".into()).await;
    assert_eq!(waiting, 0);
    // What one patient's history reads (the patient API's path): the newest version of each
    // record, none of those the source deleted or moved back to the operational tier.
    let history = |patient: &'static str| {
        let dir = dir.path().to_path_buf();
        async move {
            let config = load_config(&dir.join("strata.toml"));
            let archive = open_archive(&config.archive, &dir).await;
            let mut visits = Vec::new();
            for b in archive.patient_rows("visits", patient).await.unwrap() {
                let b = strata_archive::ArchivedBatch::new(&b, &[]);
                for row in 0..b.num_rows() {
                    let text = |c: &str| {
                        b.value(c, row)
                            .and_then(|v| v.to_text().map(|t| t.into_owned()))
                    };
                    // A character(6) value, copied or changed, without its padding.
                    assert_eq!(text("unit").as_deref(), Some("W1"));
                    visits.push((text("id").unwrap(), text("status").unwrap()));
                }
            }
            visits.sort();
            visits
        }
    };
    // A new patient's only visit, years old: archived, once although caught up twice.
    assert_eq!(
        history("99999").await,
        [("999999".to_string(), "closed".to_string())]
    );
    // A status change to an archived visit (id 1, patient 2: an old visit of an inactive
    // patient) is a correction: the archive returns the corrected version only.
    let patient_2 = history("2").await;
    assert!(
        patient_2.contains(&("1".to_string(), "corrected".to_string()))
            && !patient_2.contains(&("1".to_string(), "open".to_string())),
        "{patient_2:?}"
    );
    // An archived record whose key changed (id 2 of patient 3): a tombstone for the old key,
    // the record under the new one.
    let patient_3 = history("3").await;
    assert!(
        patient_3.iter().any(|(id, _)| id == "1000002")
            && !patient_3.iter().any(|(id, _)| id == "2"),
        "{patient_3:?}"
    );
    // Archived records filed under another patient (inactive patients): in the new patient's
    // history only — id 9 (from patient 10 to 12), whose TOASTed note the change left alone
    // (taken from the copy filed under patient 10), and id 15 (from 16 to 18), changed whole.
    assert!(!history("10").await.iter().any(|(id, _)| id == "9"));
    assert!(history("12").await.iter().any(|(id, _)| id == "9"));
    assert!(!history("16").await.iter().any(|(id, _)| id == "15"));
    assert!(history("18").await.iter().any(|(id, _)| id == "15"));
    // The same through the patient API (its router, a clinician's token, in care): the
    // corrected version of id 1, id 9 under its new patient only.
    let api = patient_api(dir.path()).await;
    let api_history = |patient: &'static str| {
        let records = api("visits", patient.to_string());
        async move {
            let mut visits: Vec<(String, String)> = records
                .await
                .iter()
                .map(|r| (json_text(&r["data"]["id"]), json_text(&r["data"]["status"])))
                .collect();
            visits.sort();
            visits
        }
    };
    let patient_2 = api_history("2").await;
    assert!(
        patient_2.contains(&("1".to_string(), "corrected".to_string()))
            && !patient_2.contains(&("1".to_string(), "open".to_string())),
        "{patient_2:?}"
    );
    assert!(!api_history("10").await.iter().any(|(id, _)| id == "9"));
    assert!(api_history("12").await.iter().any(|(id, _)| id == "9"));
    // Archived records that became current again (id 3 of patient 4, id 4 of patient 5, dated
    // anew): withdrawn from the archive, upserted into the operational database — id 4, whose
    // TOASTed note the change did not carry, whole, its note taken from the archived copy.
    assert!(!history("4").await.iter().any(|(id, _)| id == "3"));
    assert!(!history("5").await.iter().any(|(id, _)| id == "4"));
    let reinstated = target
        .fetch_all(
            "SELECT seen::text, length(note) FROM visits WHERE id = 4".into(),
            vec![ColumnType::Text, ColumnType::Int],
        )
        .await
        .unwrap();
    assert_eq!(
        reinstated,
        vec![vec![Value::Text("2026-05-02".into()), Value::Int(120 * 32)]]
    );
    // Source = operational ⊎ archive (corrections and tombstones applied) ⊎ quarantine.
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");

    // Legal holds on patients 6 and 150 win over the source's deletes: of an archived visit
    // (id 5, patient 6) and an operational one (id 149, patient 150). Both stay readable in
    // the archive, each deletion on record and listed; verify counts them apart. Deletes of
    // records no hold covers (ids 7 and 151) are carried out.
    for patient in ["6", "150"] {
        let (status, out) = strata(
            dir.path(),
            &[
                "hold",
                "place",
                "--patient",
                patient,
                "--by",
                "jdoe",
                "--reason",
                "litigation",
            ],
        );
        assert_eq!(status, 0, "{out}");
    }
    admin
        .execute("DELETE FROM visits WHERE id IN (5, 149, 7, 151)")
        .await
        .unwrap();
    let (status, out) = strata(dir.path(), &["sync", "--catch-up"]);
    assert_eq!(status, 0, "{out}");
    for key in ["id=5", "id=149"] {
        assert!(
            out.contains(&format!(
                "kept under legal hold although the source deleted it: table visits, record {key}"
            )),
            "{out}"
        );
    }
    assert!(
        !out.contains("record id=7\n") && !out.contains("record id=151"),
        "{out}"
    );
    assert!(history("6").await.iter().any(|(id, _)| id == "5"));
    assert!(history("150").await.iter().any(|(id, _)| id == "149"));
    assert!(!history("8").await.iter().any(|(id, _)| id == "7"));
    let gone = count(
        &target,
        "SELECT COUNT(*) FROM visits WHERE id IN (149, 151)".into(),
    )
    .await;
    assert_eq!(gone, 0);
    // A run is proven under the holds it ran under (verify refuses while holds placed since
    // stand); released, the records they kept stay, counted apart.
    let control = strata_control::Control::open(&format!(
        "sqlite://{}",
        dir.path().join("strata-control.db").display()
    ))
    .await
    .unwrap();
    for hold in control.holds().await.unwrap() {
        control
            .release_hold(&hold.hold_id, "the case settled", "jdoe")
            .await
            .unwrap();
    }
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("and 2 archived record(s) the source deleted while a legal hold stood: kept"),
        "{out}"
    );
    // A TRUNCATE empties the table (and hides what the archive held of it); rows written after
    // it in the same transaction stay.
    admin
        .execute("BEGIN; TRUNCATE readings; INSERT INTO readings VALUES (150, DATE '2026-05-05', 1.25); COMMIT")
        .await
        .unwrap();
    let (status, out) = strata(dir.path(), &["sync", "--catch-up"]);
    assert_eq!(status, 0, "{out}");
    let readings = count(&target, "SELECT COUNT(*) FROM readings".into()).await;
    assert_eq!(readings, 1);
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");
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
    // A row the operational database refuses (a constraint Strata cannot check beforehand)
    // goes to quarantine with the database's reason, which names the constraint and not the
    // values, as in a copy; its record's older version leaves the operational table, and
    // sync goes on.
    let owner = Db::connect(&operational, false).await.unwrap();
    owner
        .execute("ALTER TABLE visits ADD CONSTRAINT status_allowed CHECK (status <> 'refused-by-target') NOT VALID")
        .await
        .unwrap();
    owner.close().await;
    admin
        .execute("UPDATE visits SET status = 'refused-by-target' WHERE id = 3; INSERT INTO visits VALUES (888888, 150, DATE '2026-05-03', 'refused-by-target', 'new'); UPDATE visits SET status = 'fine' WHERE id = 101")
        .await
        .unwrap();
    let (status, out) = strata(dir.path(), &["sync", "--catch-up"]);
    assert_eq!(status, 0, "{out}");
    assert!(
        out.contains("(1 row(s) upserted, 0 deleted, 0 for the archive, 2 quarantined;"),
        "{out}"
    );
    let refused = target
        .fetch_all(
            "SELECT row_key, reason FROM _strata_quarantine WHERE reason LIKE 'rejected by the operational database%' ORDER BY row_key".into(),
            vec![ColumnType::Text, ColumnType::Text],
        )
        .await
        .unwrap();
    assert_eq!(refused.len(), 2, "{refused:?}");
    for row in &refused {
        let reason = row[1].as_key_text().unwrap();
        assert!(
            reason.contains("status_allowed") && !reason.contains("refused-by-target"),
            "{reason}"
        );
    }
    let left = count(
        &target,
        "SELECT COUNT(*) FROM visits WHERE id IN (3, 888888)".into(),
    )
    .await;
    assert_eq!(left, 0);
    let fine = count(
        &target,
        "SELECT COUNT(*) FROM visits WHERE id = 101 AND status = 'fine'".into(),
    )
    .await;
    assert_eq!(fine, 1);
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");
    target.close().await;
    // A slot that holds back more WAL than [sync] max_retained_wal stops sync, with advice.
    let config_path = dir.path().join("strata.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    sync_setting(dir.path(), "max_retained_wal = \"1kB\"");
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
    let child = following(dir.path());
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    admin
        .execute("ALTER TABLE visits ADD COLUMN ward text; INSERT INTO visits VALUES (999998, 20001, DATE '2026-05-05', 'open', 'n', 'U1', 'B2')")
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("table visits changed on the source: its columns are now (id, patient_id, seen, status, note, unit, ward), the run copied (id, patient_id, seen, status, note, unit)"),
        "{said}"
    );
    let (status, out) = strata(dir.path(), &["sync", "stop", "--drop-slot"]);
    assert_eq!(status, 0, "{out}");
    admin.close().await;
}

/// The patient API over the archive of the run in `dir` (its router, in process): a function
/// giving a patient's archived records of a table (the history's `records`), read by a
/// clinician in whose care the patient is, for treatment.
async fn patient_api(
    dir: &std::path::Path,
) -> impl Fn(&'static str, String) -> futures::future::BoxFuture<'static, Vec<serde_json::Value>> {
    use crate::api::{api_config, call, make_idp};
    use strata_archive_api::{AppState, Role};
    let api = api_config("");
    let idp = Arc::new(make_idp(dir));
    for key in ["pseudonym.key", "audit.key"] {
        std::fs::write(dir.join(key), strata_archive::Kek::generate_hex()).unwrap();
    }
    let config = load_config(&dir.join("strata.toml"));
    let archive = open_archive(&config.archive, dir).await;
    let control = strata_control::Control::open(&config.control_url().unwrap())
        .await
        .unwrap();
    let policy = strata_ingest::read_policy(&config).unwrap();
    let classification = config.classification(policy.patients.as_ref()).unwrap();
    let state = AppState::new(archive, control, &api, dir, classification).unwrap();
    let app = strata_archive_api::router(state);
    move |table: &'static str, patient: String| {
        let (app, idp) = (app.clone(), idp.clone());
        Box::pin(async move {
            let token = idp.user("dr-a", Role::Clinician, &[&patient]);
            let uri = format!("/v1/patients/{patient}/history?table={table}&limit=1000");
            let (status, _, body) = call(
                &app,
                axum::http::Method::GET,
                &uri,
                Some(&token),
                &[("x-purpose-of-use", "TREAT")],
                None,
            )
            .await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            json["records"].as_array().unwrap().clone()
        })
    }
}

/// A JSON value as text (a string's own text).
fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An application that brings inactive patients back while sync follows: each new patient's
/// first visit is of 2012 (the patient inactive, the visit archived); ten patients later the
/// patient has a new visit (the 2012 visit comes back to the operational tier) and, a moment
/// after, that 2012 visit is deleted, changed, or left alone. Returns the ids deleted and the
/// ids left to come back.
async fn coming_back(url: String, stop: Arc<AtomicBool>) -> (Vec<i64>, Vec<i64>) {
    let db = Db::connect(&url, false).await.unwrap();
    let (mut deleted, mut left) = (Vec::new(), Vec::new());
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        db.execute(&format!(
            "INSERT INTO visits VALUES ({}, {}, DATE '2012-02-01', 'old', 'first')",
            900_000 + 2 * n,
            60_000 + n
        ))
        .await
        .unwrap();
        if n >= 10 {
            let (old, patient) = (900_000 + 2 * (n - 10), 60_000 + n - 10);
            db.execute(&format!(
                "INSERT INTO visits VALUES ({}, {patient}, DATE '2026-05-01', 'new', 'back')",
                old + 1
            ))
            .await
            .unwrap();
            // Spread over the writer's second, so that some of these changes come while a
            // pass has read the record to bring back and not yet put it back.
            tokio::time::sleep(std::time::Duration::from_millis(((n % 8) * 100) as u64)).await;
            match n % 4 {
                0 | 1 => {
                    db.execute(&format!("DELETE FROM visits WHERE id = {old}"))
                        .await
                        .unwrap();
                    deleted.push(old);
                }
                2 => db
                    .execute(&format!(
                        "UPDATE visits SET status = 'changed' WHERE id = {old}"
                    ))
                    .await
                    .unwrap(),
                _ => {
                    // Noted again: the patient's note moves past what a pass may have read.
                    db.execute(&format!(
                        "INSERT INTO visits VALUES ({}, {patient}, DATE '2026-05-02', 'again', 'back')",
                        2_000_000 + n
                    ))
                    .await
                    .unwrap();
                    left.push(old)
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        n += 1;
    }
    db.close().await;
    (deleted, left)
}

/// The archive writer runs beside the apply (`archive_flush_seconds = 0`: a pass about every
/// second) while patients come back ([`coming_back`]), and sync is killed twice on the way. A
/// record the writer read to bring back but that the source deleted meanwhile must not be put
/// back (it would be resurrected), nor one changed meanwhile tombstoned twice: sync, stopped,
/// reports records moved back in several writes; caught up, verify proves source = target
/// row for row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_writer_runs_beside_the_apply() {
    let dir = TestDir::new();
    let Followed {
        url,
        admin,
        operational,
    } = followed_source(dir.path(), 400, 2, 100).await;
    sync_setting(dir.path(), "archive_flush_seconds = 0");
    let config_path = dir.path().join("strata.toml");
    let mut migration = strata_ingest::Migration::prepare(load_config(&config_path), as_of())
        .await
        .unwrap();
    migration.follow(true);
    migration.run(&mut |_| {}).await.unwrap();

    let mut sync = following(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    let application = tokio::spawn(coming_back(url.clone(), stop.clone()));
    // Killed twice on the way (kill -9 may land in a pass, or between its two steps).
    for after_ms in [3300u64, 4100] {
        tokio::time::sleep(std::time::Duration::from_millis(after_ms)).await;
        assert!(
            sync.try_wait().unwrap().is_none(),
            "sync stopped on its own"
        );
        sync.kill().unwrap();
        sync.wait().unwrap();
        sync = following(dir.path());
    }
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    let (deleted, left) = application.await.unwrap();
    assert!(deleted.len() > 10 && left.len() > 5, "{deleted:?} {left:?}");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &sync.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let out = sync.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    // "archive: … N moved back to the operational tier, … in M manifest(s)"
    let figure = |before: &str| -> u64 {
        let head = text.split(before).next().unwrap_or_default();
        head.rsplit(' ')
            .find(|w| !w.is_empty())
            .and_then(|w| w.parse().ok())
            .unwrap_or(0)
    };
    let moved_back = figure(" moved back to the operational tier");
    let manifests = figure(" manifest(s)");
    assert!(moved_back > 0 && manifests > 3, "{text}");

    let (status, out) = strata(dir.path(), &["sync", "--catch-up"]);
    assert_eq!(status, 0, "{out}");
    let (status, out) = strata_verify(&config_path);
    assert_eq!(status, 0, "{text}\n{out}");
    // Explicitly: no deleted visit is back, every one left alone is.
    let target = Db::connect(&operational, true).await.unwrap();
    let list = |ids: &[i64]| {
        ids.iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let back = |ids: &[i64]| format!("SELECT COUNT(*) FROM visits WHERE id IN ({})", list(ids));
    assert_eq!(count(&target, back(&deleted)).await, 0);
    assert_eq!(count(&target, back(&left)).await, left.len() as u64);
    target.close().await;
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
               seen date NOT NULL, status text NOT NULL, note text, unit character(6))",
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

/// The acceptance, end to end: an application writes (multi-table transactions,
/// updates that leave a TOASTed note alone, deletes, a keyless table, BLOB updates of archived
/// and operational records) while `strata migrate --follow` copies and follows, and Strata is
/// killed with SIGKILL six times — in the bulk copy, while following (twice in `strata sync`,
/// once in `migrate --follow`), and during the cutover (twice) — then cuts over: verify proves
/// source = target; the archive holds corrections and tombstones; one patient's history
/// returns the newest version of a BLOB changed after it was archived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_every_phase_then_a_proven_cutover() {
    let dir = TestDir::new();
    let Followed { url, admin, .. } =
        followed_source_with_scans(dir.path(), 3000, 60, 2000, 400).await;
    // The archive writer runs about every second beside the apply: kills land in its passes.
    sync_setting(dir.path(), "archive_flush_seconds = 0");
    let control = || async {
        strata_control::Control::open(&format!(
            "sqlite://{}",
            dir.path().join("strata-control.db").display()
        ))
        .await
        .unwrap()
    };
    let spawn = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .args(["--config", "strata.toml"])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let kill = |mut child: std::process::Child| {
        child.kill().unwrap();
        child.wait().unwrap();
    };
    // BLOB updates: archived scans (patients 2..100) and operational ones, new scans, deletes.
    let scans = |url: String, stop: Arc<AtomicBool>| async move {
        let db = Db::connect(&url, false).await.unwrap();
        let mut n = 0i64;
        while !stop.load(Ordering::Relaxed) {
            let id = 1 + (n * 7) % 400;
            db.execute(&format!(
                "BEGIN;
                 UPDATE scans SET image = decode(repeat(md5(random()::text), 120), 'hex') WHERE id = {id};
                 INSERT INTO scans VALUES ({}, 150, DATE '2026-04-01', decode(md5({n}::text), 'hex'));
                 UPDATE visits SET status = 'imaged' WHERE id = {id};
                 COMMIT;",
                500_000 + n
            ))
            .await
            .unwrap();
            if n % 5 == 4 {
                db.execute(&format!("DELETE FROM scans WHERE id = {}", 500_000 + n - 2))
                    .await
                    .unwrap();
            }
            if n % 25 == 24 {
                // An archived scan (ids 200..249: patients 1..50, whose records are old; the
                // scans of patients 51..100 are left for the deletion after the copy).
                db.execute(&format!(
                    "DELETE FROM scans WHERE id = {}",
                    200 + (n / 25 * 7) % 50
                ))
                .await
                .unwrap();
            }
            n += 1;
        }
        db.close().await;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writers = [
        tokio::spawn(application(url.clone(), stop.clone(), 30_000)),
        tokio::spawn({
            let scanning = scans(url.clone(), stop.clone());
            async move {
                scanning.await;
                0
            }
        }),
    ];

    // Kill 1, in the bulk copy: once a table is copied and the run is still running.
    let child = spawn(&["migrate", "--follow"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the copy never got going"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let c = control().await;
        let Some(run) = c.latest_run().await.unwrap() else {
            continue;
        };
        let mut done = 0;
        for t in ["visits", "readings", "scans"] {
            let state = c
                .table_state::<serde_json::Value, serde_json::Value>(&run.run_id, t)
                .await
                .unwrap();
            done += matches!(state, Some(strata_control::TableState::Done { .. })) as usize;
        }
        if run.status == "running" && done >= 1 {
            assert!(done < 3, "killed after the copy");
            break;
        }
    }
    kill(child);
    // Kill 2, while `migrate --follow` follows: after its copy is done.
    let child = spawn(&["migrate", "--follow"]);
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let run = control().await.latest_run().await.unwrap().unwrap();
        if run.status == "done" {
            break;
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    kill(child);
    // Kills 3 and 4, in `strata sync`.
    for delay_ms in [300u64, 1200] {
        let child = spawn(&["sync"]);
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        kill(child);
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    // An archived scan deleted after the copy, however many turns the workload had (it may
    // have deleted every one of its own range before the copy read the table): one of
    // patients 51..100's, whose records are old and which the workload leaves alone.
    let deleted_scan = admin
        .fetch_all(
            "SELECT id FROM scans WHERE id BETWEEN 250 AND 299 ORDER BY id LIMIT 1".into(),
            vec![ColumnType::Int],
        )
        .await
        .unwrap()[0][0]
        .as_key_text()
        .unwrap();
    admin
        .execute(&format!("DELETE FROM scans WHERE id = {deleted_scan}"))
        .await
        .unwrap();
    let deleted_scan = format!("id={deleted_scan}");
    // Kills 5 and 6, during the cutover (catching up, then verifying).
    for delay_ms in [400u64, 2500] {
        let child = spawn(&["cutover", "--by", "jdoe", "--quiet-seconds", "1"]);
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        kill(child);
    }
    let (status, out) = strata(
        dir.path(),
        &["cutover", "--by", "jdoe", "--quiet-seconds", "1", "--json"],
    );
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("\"decision\": \"go\""), "{out}");

    // Proven again on its own: source = operational ⊎ archive ⊎ quarantine, row for row.
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");

    // The archive holds corrections (runs written by sync) and tombstones.
    let config = load_config(&dir.path().join("strata.toml"));
    let archive = open_archive(&config.archive, dir.path()).await;
    let synced: Vec<&strata_archive::TableManifest> = archive
        .catalog()
        .tables
        .values()
        .flatten()
        .filter(|m| m.run_id.starts_with("sync-"))
        .collect();
    assert!(
        synced.iter().any(|m| m.table == "scans" && m.rows() > 0),
        "corrected scans"
    );
    assert!(
        synced.iter().any(|m| m.table == "visits" && m.rows() > 0),
        "corrected visits"
    );
    // One patient's history returns each archived scan's newest image: the bytes the source
    // holds now, including those updated after the bulk copy archived them.
    let source_images = admin
        .fetch_all(
            "SELECT id, encode(sha256(image), 'hex') FROM scans WHERE patient_id BETWEEN 2 AND 100"
                .into(),
            vec![ColumnType::Int, ColumnType::Text],
        )
        .await
        .unwrap();
    let source_images: std::collections::BTreeMap<String, String> = source_images
        .into_iter()
        .map(|r| {
            (
                format!("id={}", r[0].as_key_text().unwrap()),
                r[1].as_key_text().unwrap(),
            )
        })
        .collect();
    let mut archived = std::collections::BTreeMap::new();
    let blob_columns = archive.catalog().blob_columns("scans");
    for patient in 2..=100 {
        for b in archive
            .patient_rows("scans", &patient.to_string())
            .await
            .unwrap()
        {
            let b = strata_archive::ArchivedBatch::new(&b, &blob_columns);
            for row in 0..b.num_rows() {
                let (_, image) = b.blobs(row).next().unwrap();
                let bytes = archive.blobs().get(&image).await.unwrap();
                use sha2::Digest;
                archived.insert(
                    b.key(row).unwrap().to_string(),
                    hex::encode(sha2::Sha256::digest(&bytes)),
                );
            }
        }
    }
    assert!(!archived.is_empty());
    assert_eq!(
        archived.len(),
        source_images.len(),
        "every old scan is archived, once"
    );
    for (key, digest) in &archived {
        assert_eq!(source_images.get(key), Some(digest), "scan {key}");
    }
    // The patient API returns the same newest images: each scan's document digest.
    let api = patient_api(dir.path()).await;
    let mut served = std::collections::BTreeMap::new();
    for patient in 2..=100 {
        for r in api("scans", patient.to_string()).await {
            let documents = r["documents"].as_array().unwrap();
            assert_eq!(documents.len(), 1, "{r}");
            served.insert(json_text(&r["key"]), json_text(&documents[0]["sha256"]));
        }
    }
    assert_eq!(
        served, archived,
        "the patient API serves the newest version of every scan"
    );
    // The scan deleted after the copy archived it has a tombstone, written by sync.
    let mut tombstoned_by = Vec::new();
    for m in archive.catalog().tables.values().flatten() {
        for entry in &m.tombstones {
            let read = archive.tombstones(entry).await.unwrap();
            if read.iter().any(|t| t.key == deleted_scan) {
                tombstoned_by.push(m.run_id.clone());
            }
        }
    }
    assert!(
        tombstoned_by.iter().any(|r| r.starts_with("sync-")),
        "scan {deleted_scan} tombstoned by {tombstoned_by:?}; manifests: {:?}",
        archive
            .catalog()
            .tables
            .values()
            .flatten()
            .map(|m| (&m.table, &m.run_id, m.rows(), m.tombstones.len()))
            .collect::<Vec<_>>()
    );
    admin.close().await;
}
