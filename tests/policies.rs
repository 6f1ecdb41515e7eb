//! The worked examples of docs/policies.md, each proven on generated data. Expected tiers are
//! computed here straight from the source with SQL and date arithmetic, independently of the
//! engine, and compared with where every encounter really went.

use crate::support::*;
use chrono::{Datelike, NaiveDate};
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use strata_control::Control;
use strata_cutoff_policies::HoldScope;
use strata_ingest::{ColumnType, Db, Migration, Value};

const POLICY: &str = r#"
version = "worked-examples-1"
as_of = "2026-06-30"
[patients]
table = "patients"
birth_date = "birth_date"
deceased_date = "deceased_date"
age_of_majority = 18
[defaults]
archive_after = "3y"
patient_inactive_after = "2y"
retention = "10y"          # adults: 10 years after the last encounter
minor_retention = "5y"     # minors: not before the age of majority + 5 years
[tables.patients]          # master patient index: permanent
tier = "operational"
permanent = true
"#;

fn add_years(d: NaiveDate, years: i32) -> NaiveDate {
    d.with_year(d.year() + years)
        .unwrap_or_else(|| NaiveDate::from_ymd_opt(d.year() + years, 2, 28).unwrap())
}

async fn ids(db: &Db, sql: &str) -> BTreeSet<i64> {
    db.fetch_all(sql.into(), vec![ColumnType::Int])
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| {
            if let Value::Int(i) = r[0] {
                Some(i)
            } else {
                None
            }
        })
        .collect()
}

/// Rows of (integer id, `YYYY-MM-DD` text) as a map.
fn dates_by_id(rows: &[Vec<Value>]) -> BTreeMap<i64, NaiveDate> {
    rows.iter()
        .map(|r| match (&r[0], &r[1]) {
            (Value::Int(p), Value::Text(d)) => {
                (*p, NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap())
            }
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn worked_examples_adults_minors_master_index_and_a_legal_hold() {
    let dir = TestDir::new();
    let source = format!("sqlite://{}", dir.path().join("legacy.db").display());
    generate(&source, 0.1, false).await;
    let config_path = write_sqlite_config(dir.path(), &source, POLICY);
    let config = load_config(&config_path);
    let src = Db::connect(&source, true).await.unwrap();
    let as_of = as_of();

    // Last activity per patient, by definition: the latest record date in any table.
    let dates = "SELECT patient_id AS p, started_at AS d FROM encounters
        UNION ALL SELECT e.patient_id, l.observed_at FROM lab_results l JOIN encounters e ON e.id = l.encounter_id
        UNION ALL SELECT e.patient_id, n.written_at FROM clinical_notes n JOIN encounters e ON e.id = n.encounter_id
        UNION ALL SELECT e.patient_id, b.billed_on FROM billing_lines b JOIN encounters e ON e.id = b.encounter_id
        UNION ALL SELECT e.patient_id, g.recorded_at FROM diagnoses g JOIN encounters e ON e.id = g.encounter_id
        UNION ALL SELECT patient_id, started_on FROM medications
        UNION ALL SELECT patient_id, recorded_on FROM allergies
        UNION ALL SELECT patient_id, created_at FROM documents
        UNION ALL SELECT id, created_at FROM patients";
    let rows = src
        .fetch_all(
            format!(
                "SELECT p, MAX(substr(d, 1, 10)) FROM ({dates}) WHERE d IS NOT NULL GROUP BY p"
            ),
            vec![ColumnType::Int, ColumnType::Text],
        )
        .await
        .unwrap();
    let last = dates_by_id(&rows);
    let births = dates_by_id(
        &src.fetch_all(
            "SELECT id, birth_date FROM patients".into(),
            vec![ColumnType::Int, ColumnType::Text],
        )
        .await
        .unwrap(),
    );
    let encounters: Vec<(i64, i64, NaiveDate)> = src
        .fetch_all(
            "SELECT id, patient_id, substr(started_at, 1, 10) FROM encounters".into(),
            vec![ColumnType::Int, ColumnType::Int, ColumnType::Text],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| match (&r[0], &r[1], &r[2]) {
            (Value::Int(i), Value::Int(p), Value::Text(d)) => {
                (*i, *p, NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap())
            }
            other => panic!("{other:?}"),
        })
        .collect();
    // The retention schedule, written out: adults 10 years after the last encounter; records
    // made while a minor not before majority + 5 years.
    let retention_end = |patient: i64, date: NaiveDate| {
        let adult_end = add_years(last[&patient], 10);
        let majority = add_years(births[&patient], 18);
        if date < majority {
            adult_end.max(add_years(majority, 5))
        } else {
            adult_end
        }
    };
    let expired: BTreeSet<i64> = encounters
        .iter()
        .filter(|(_, p, d)| retention_end(*p, *d) < as_of)
        .map(|(i, _, _)| *i)
        .collect();
    let kept_by_minor_rule: BTreeSet<i64> = encounters
        .iter()
        .filter(|(_, p, d)| add_years(last[p], 10) < as_of && retention_end(*p, *d) >= as_of)
        .map(|(i, _, _)| *i)
        .collect();
    assert!(expired.len() > 10, "the data has records past retention");
    assert!(
        !kept_by_minor_rule.is_empty(),
        "the data has minors' records kept by the minor rule"
    );

    // A legal hold on one patient whose records would otherwise be destroyed.
    let held_patient = encounters
        .iter()
        .find(|(i, _, _)| expired.contains(i))
        .unwrap()
        .1;
    let control = Control::open(&config.control_url().unwrap()).await.unwrap();
    control
        .place_hold(
            &HoldScope::Patient(held_patient.to_string()),
            "litigation matter 2026-17",
            "records-manager",
        )
        .await
        .unwrap();

    let report = Migration::prepare(config.clone(), as_of)
        .await
        .unwrap()
        .run(&mut |_| {})
        .await
        .unwrap();
    let counts = tier_counts(&config).await;
    assert_tiers_add_up(&counts);
    assert_report_matches(&report, &counts);

    // Where each encounter really went.
    let target = Db::connect(&config.resolve_url(&config.operational.url).unwrap(), false)
        .await
        .unwrap();
    let operational = ids(&target, "SELECT id FROM encounters").await;
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let mut archived = BTreeSet::new();
    for m in &archive.catalog().tables["encounters"] {
        for f in &m.files {
            for b in archive.read_file(f).await.unwrap() {
                use arrow::array::AsArray;
                let col = b
                    .column_by_name("id")
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Int64Type>();
                archived.extend(col.values().iter().copied());
            }
        }
    }
    let purged: BTreeSet<i64> = encounters
        .iter()
        .map(|e| e.0)
        .filter(|i| !operational.contains(i) && !archived.contains(i))
        .collect();
    let held_ids: BTreeSet<i64> = encounters
        .iter()
        .filter(|e| e.1 == held_patient)
        .map(|e| e.0)
        .collect();

    // Adults and minors: exactly the expired records are destroyed, except the held patient's.
    let expected: BTreeSet<i64> = expired.difference(&held_ids).copied().collect();
    assert_eq!(purged, expected);
    assert!(kept_by_minor_rule.is_disjoint(&purged));
    // The legal hold: the held patient's expired records are archived, not destroyed.
    for i in held_ids.intersection(&expired) {
        assert!(archived.contains(i), "held encounter {i} was not archived");
    }
    // Master patient index: every patient stays, even those whose records were all destroyed.
    assert_eq!(counts["patients"].operational, counts["patients"].source);
    assert_eq!(counts["patients"].purged, 0);
    // Destruction records carry counts, key range and checksum, and no values.
    let destroyed = control.destroyed_rows().await.unwrap();
    assert_eq!(destroyed["encounters"], purged.len() as u64);
    // The checksum is recomputed from the destroyed keys alone: the sum of their SHA-256
    // digests modulo 2^256.
    let mut sum = [0u8; 32];
    for id in &purged {
        let digest: [u8; 32] = sha2::Sha256::digest(format!("id={id}").as_bytes()).into();
        let mut carry = 0u16;
        for i in (0..32).rev() {
            let s = sum[i] as u16 + digest[i] as u16 + carry;
            sum[i] = s as u8;
            carry = s >> 8;
        }
    }
    let records = control.destructions().await.unwrap();
    let record = &records
        .iter()
        .find(|(d, _)| d.table == "encounters")
        .unwrap()
        .0;
    assert_eq!(record.key_checksum, format!("sum256:{}", hex::encode(sum)));
}
