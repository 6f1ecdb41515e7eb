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
    create_slot(&source, &slot).await.unwrap();
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
    // One last row, committed after the stop position, ends the stream there (unapplied: the
    // stream stops at the first message past the position, before that transaction's rows).
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
                applied.push(id.parse::<i64>().unwrap());
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
        "every row exactly once: missing {missing:?}, extra {extra:?} ({transactions} transactions decoded, {skipped} seen by the snapshot)"
    );
    admin
        .execute(&format!("SELECT pg_drop_replication_slot('{slot}')"))
        .await
        .unwrap();
    admin.close().await;
    source.close().await;
}
