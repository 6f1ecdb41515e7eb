//! The audit log's chain: appends from many tasks (and, on PostgreSQL, from two writers as two
//! API replicas would) form one gapless chain, and `verify` names the entry of every kind of
//! tampering: edited, deleted, inserted, and cut from the end.

use serde_json::json;
use sqlx::{AssertSqlSafe, Connection};
use strata_control::{AuditEntry, AuditKey, AuditLog, AuditQuery, Control, Outcome};

const KEY: &str = "8f2e6c1a9b7d4e3f0a5c2b8d1e6f9a3c7b4d0e2f5a8c1b6d9e3f7a0c4b2d8e1f";

/// A fresh control database: SQLite in `dir`, or a new PostgreSQL database when `pg`.
async fn fresh(dir: &tempfile::TempDir, pg: bool) -> Option<(Control, String)> {
    if !pg {
        let url = format!("sqlite://{}", dir.path().join("control.db").display());
        return Some((Control::open(&url).await.unwrap(), url));
    }
    let admin = std::env::var("STRATA_TEST_PG_URL")
        .expect("STRATA_TEST_PG_URL: run the tests with scripts/test, which starts PostgreSQL");
    let name = format!("strata_audit_{:08x}", rand::random::<u32>());
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let url = match admin.rfind('/') {
        Some(i) if admin[..i].ends_with(|c: char| c.is_ascii_digit()) => {
            format!("{}/{name}", &admin[..i])
        }
        _ => format!("{}/{name}", admin.trim_end_matches('/')),
    };
    Some((Control::open(&url).await.unwrap(), url))
}

fn entry(i: usize, patient: &str) -> AuditEntry {
    AuditEntry {
        user: format!("user-{}", i % 3),
        roles: "clinician".into(),
        purpose: Some("TREAT".into()),
        patient: Some(patient.into()),
        action: "GET /v1/patients/{patient}/history".into(),
        status: 200,
        outcome: Outcome::Allowed,
        break_glass: None,
        detail: json!({ "records": i }),
        client: Some("127.0.0.1".into()),
    }
}

async fn raw(url: &str, sql: &str) {
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&mut c)
            .await
            .unwrap();
    } else {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(sql.to_string()))
            .execute(&mut c)
            .await
            .unwrap();
    }
}

/// 40 entries appended from 40 tasks at once.
async fn filled(pg: bool) -> Option<(tempfile::TempDir, AuditLog, String)> {
    let dir = tempfile::tempdir().unwrap();
    let (control, url) = fresh(&dir, pg).await?;
    let log = AuditLog::open(&control, AuditKey::from_hex(KEY).unwrap());
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.append(entry(i, &format!("P{}", i % 4))).await })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap().unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=40).collect::<Vec<i64>>(), "gapless, each once");
    Some((dir, log, url))
}

async fn appends_form_one_verified_chain(pg: bool) {
    let Some((_dir, log, _)) = filled(pg).await else {
        return;
    };
    let report = log.verify().await.unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!((report.entries, report.head_seq), (40, 40));
    let p1 = log
        .list(&AuditQuery {
            patient: Some("P1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(p1.len(), 10);
    assert!(p1.iter().all(|r| r.entry.patient.as_deref() == Some("P1")));
    let page = log
        .list(&AuditQuery {
            after_seq: Some(35),
            limit: Some(3),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), [36, 37, 38]);
    assert_eq!(
        page[0].prev_hash,
        log.list(&AuditQuery {
            after_seq: Some(34),
            limit: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()[0]
            .hash
    );
}

async fn tampering_is_named(pg: bool) {
    // Edited.
    let Some((_d, log, url)) = filled(pg).await else {
        return;
    };
    raw(&url, "UPDATE strata_audit SET patient = 'P9' WHERE seq = 7").await;
    let problems = log.verify().await.unwrap().problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].seq, 7);
    assert!(problems[0].problem.contains("edited"), "{problems:?}");

    // Edits the types would hide: an unknown outcome, an out-of-range status.
    let (_d, log, url) = filled(pg).await.unwrap();
    raw(
        &url,
        "UPDATE strata_audit SET outcome = 'whatever' WHERE seq = 3",
    )
    .await;
    raw(&url, "UPDATE strata_audit SET status = 65736 WHERE seq = 5").await;
    let problems = log.verify().await.unwrap().problems;
    assert_eq!(
        problems.iter().map(|p| p.seq).collect::<Vec<_>>(),
        [3, 5],
        "{problems:?}"
    );

    // Deleted from the middle.
    let (_d, log, url) = filled(pg).await.unwrap();
    raw(&url, "DELETE FROM strata_audit WHERE seq = 12").await;
    let problems = log.verify().await.unwrap().problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].seq, 12);
    assert!(
        problems[0].problem.contains("entry 12 is missing"),
        "{problems:?}"
    );

    // Inserted: entries 20.. moved up by one and a forged entry put at 20, linking to 19.
    let (_d, log, url) = filled(pg).await.unwrap();
    raw(
        &url,
        "UPDATE strata_audit SET seq = seq + 1000 WHERE seq >= 20",
    )
    .await;
    raw(
        &url,
        "UPDATE strata_audit SET seq = seq - 999 WHERE seq >= 1020",
    )
    .await;
    raw(
        &url,
        "INSERT INTO strata_audit (seq, at, user_id, roles, purpose, patient, action, status, outcome, break_glass, detail, client, prev_hash, hash) \
         SELECT 20, at, 'intruder', roles, purpose, 'P1', action, status, outcome, break_glass, detail, client, hash, \
         '1111111111111111111111111111111111111111111111111111111111111111' FROM strata_audit WHERE seq = 19",
    )
    .await;
    raw(&url, "UPDATE strata_audit_head SET seq = 41").await;
    let problems = log.verify().await.unwrap().problems;
    assert!(!problems.is_empty());
    assert_eq!(problems[0].seq, 20, "{problems:?}");
    assert!(problems[0].problem.contains("inserted"), "{problems:?}");
    // Every entry after it carries a number it was not hashed with.
    assert!(problems.iter().all(|p| p.seq >= 20));

    // Cut from the end.
    let (_d, log, url) = filled(pg).await.unwrap();
    raw(&url, "DELETE FROM strata_audit WHERE seq > 38").await;
    let problems = log.verify().await.unwrap().problems;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].seq, 40);
    assert!(
        problems[0].problem.contains("ends at entry 38"),
        "{problems:?}"
    );

    // The wrong key: nothing verifies.
    let (_d, _log, url) = filled(pg).await.unwrap();
    let control = Control::open(&url).await.unwrap();
    let other = AuditLog::open(
        &control,
        AuditKey::from_hex(&KEY.replace('8', "9")).unwrap(),
    );
    assert_eq!(other.verify().await.unwrap().problems.len(), 40);
}

#[tokio::test]
async fn sqlite_appends_form_one_verified_chain() {
    appends_form_one_verified_chain(false).await
}

#[tokio::test]
async fn postgres_appends_form_one_verified_chain() {
    appends_form_one_verified_chain(true).await
}

#[tokio::test]
async fn sqlite_tampering_is_named() {
    tampering_is_named(false).await
}

#[tokio::test]
async fn postgres_tampering_is_named() {
    tampering_is_named(true).await
}

/// Two writers on one PostgreSQL database (two API replicas) still make one chain.
#[tokio::test]
async fn postgres_two_writers_share_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let Some((control, url)) = fresh(&dir, true).await else {
        return;
    };
    let other = Control::open(&url).await.unwrap();
    let key = AuditKey::from_hex(KEY).unwrap();
    let a = AuditLog::open(&control, key.clone());
    let b = AuditLog::open(&other, key);
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let log = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { log.append(entry(i, "P1")).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=60).collect::<Vec<i64>>());
    let report = a.verify().await.unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.entries, 60);
}

#[test]
fn a_short_or_non_hex_key_is_refused() {
    assert!(AuditKey::from_hex("abcd").is_err());
    assert!(AuditKey::from_hex(&"zz".repeat(32)).is_err());
    assert!(AuditKey::from_hex(KEY).is_ok());
}
