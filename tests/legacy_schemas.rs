//! Unknown legacy schemas as research databases and EHR exports shape them: records dated
//! through their parents, periods, surrogate keys, ids repeated across patients, no declared
//! foreign keys; and the config `strata init` drafts for them.

use crate::support::*;
use strata_ingest::{Db, Migration, RunReport};

/// The policy of the research database below (dates shifted into the 22nd century).
const ICU_POLICY: &str = r#"
version = "icu-test-1"
as_of = "2180-06-30"
undated = "operational"
[defaults]
archive_after = "3y"
patient_inactive_after = "2y"
retention = "100y"
"#;

/// Per table: rows routed to the operational database and to the archive.
fn tiers(report: &RunReport) -> Vec<(String, u64, u64, u64)> {
    report
        .tables
        .iter()
        .map(|t| {
            (
                t.table.clone(),
                t.operational_rows,
                t.archive_rows,
                t.quarantined_rows,
            )
        })
        .collect()
}

/// A child table dated only through its parent (`record_date = { via, foreign_key, column }`),
/// a grandchild dated through that chain, and a period table: dates are read in the same
/// query as the rows, a parent id repeated in the source multiplies no row (the latest of its
/// dates counts), an open period keeps its patient active, and plan, explain and migrate agree.
#[tokio::test]
async fn records_are_dated_through_their_parents_and_periods_by_their_end() {
    let dir = TestDir::new();
    let url = format!("sqlite://{}", dir.path().join("icu.db").display());
    let db = Db::connect(&format!("{url}?mode=rwc"), false)
        .await
        .unwrap();
    db.execute(
        "CREATE TABLE admissions (row_id INTEGER PRIMARY KEY, subject_id INTEGER, hadm_id INTEGER, admittime TIMESTAMP);
         CREATE TABLE diagnoses (row_id INTEGER PRIMARY KEY, subject_id INTEGER, hadm_id INTEGER, icd9_code TEXT);
         CREATE TABLE diagnosis_notes (row_id INTEGER PRIMARY KEY, subject_id INTEGER, diagnosis INTEGER, note TEXT);
         CREATE TABLE drgcodes (row_id INTEGER PRIMARY KEY, subject_id INTEGER, hadm_id INTEGER, drg_code TEXT);
         INSERT INTO drgcodes VALUES (1, 1, 100, '127'), (2, 3, 300, '291');
         CREATE TABLE observation_period (row_id INTEGER PRIMARY KEY, subject_id INTEGER, start_date DATE, end_date DATE);
         -- Subject 1: inactive since 2151; hadm_id 100 appears twice (the latest date counts).
         INSERT INTO admissions VALUES (1, 1, 100, '2150-01-01 10:00:00'), (2, 1, 100, '2151-03-01 10:00:00');
         -- Subject 2: as old, but observed in an open period: active.
         INSERT INTO admissions VALUES (3, 2, 200, '2150-02-01 10:00:00');
         -- Subject 3: admitted this year.
         INSERT INTO admissions VALUES (4, 3, 300, '2180-01-01 10:00:00');
         INSERT INTO diagnoses VALUES (1, 1, 100, '4019'), (2, 1, 100, '25000'), (3, 2, 200, '4280'),
                                      (4, 3, 300, '5849'), (5, 1, NULL, '7999');
         INSERT INTO diagnosis_notes VALUES (1, 1, 1, 'old'), (2, 3, 4, 'new'), (3, 2, 3, 'active');
         INSERT INTO observation_period VALUES (1, 1, '2150-01-01', '2151-12-31'), (2, 2, '2149-06-01', NULL),
                                               (3, 3, '2179-01-01', '2180-02-01');",
    )
    .await
    .unwrap();
    db.close().await;
    let config = run_config(&url, "sqlite://operational.db")
        + r#"
[tables.admissions]
primary_key = ["row_id"]
patient_key = "subject_id"
record_date = "admittime"
[tables.diagnoses]
primary_key = ["row_id"]
patient_key = "subject_id"
record_date = { via = "admissions", foreign_key = "hadm_id", column = "admittime" }
[tables.diagnosis_notes]
primary_key = ["row_id"]
patient_key = "subject_id"
record_date = { via = "diagnoses", foreign_key = "diagnosis", parent_key = "row_id" }
[tables.drgcodes]
primary_key = ["row_id"]
patient_key = "subject_id"
record_date = "adm_time"
# The way before parents' dates: a computed column, which patient facts read too.
computed.adm_time = { expr = "SELECT MAX(a.admittime) FROM admissions a WHERE a.hadm_id = t0.hadm_id", type = "timestamp" }
[tables.observation_period]
primary_key = ["row_id"]
patient_key = "subject_id"
record_date = { start = "start_date", end = "end_date" }
"#;
    write_run_files(dir.path(), &config, ICU_POLICY);
    let config = load_config(&dir.path().join("strata.toml"));
    let mut migration = Migration::prepare(config.clone(), as_of()).await.unwrap();
    let (plan, _) = migration.plan().await.unwrap();
    let why = migration.explain("diagnoses", "2").await.unwrap();
    assert!(
        why.facts
            .contains(&"record date: 2151-03-01 (plausible)".to_string()),
        "{:?}",
        why.facts
    );
    let why = migration.explain("diagnosis_notes", "1").await.unwrap();
    assert!(
        why.facts
            .contains(&"record date: 2151-03-01 (plausible)".to_string()),
        "{:?}",
        why.facts
    );
    // The open period dates its record at as_of and keeps subject 2 active.
    let why = migration.explain("observation_period", "2").await.unwrap();
    assert!(
        why.facts
            .contains(&"record date: 2180-06-30 (plausible)".to_string()),
        "{:?}",
        why.facts
    );
    let why = migration.explain("diagnoses", "3").await.unwrap();
    assert!(
        why.facts
            .contains(&"patient last activity: 2180-06-30".to_string()),
        "{:?}",
        why.facts
    );
    let run = migration.run(&mut |_| {}).await.unwrap();
    let expected = [
        ("admissions", 2, 2, 0),
        ("diagnoses", 3, 2, 0),
        ("diagnosis_notes", 2, 1, 0),
        ("drgcodes", 1, 1, 0),
        ("observation_period", 2, 1, 0),
    ]
    .map(|(t, o, a, q)| (t.to_string(), o, a, q))
    .to_vec();
    assert_eq!(tiers(&run), expected);
    assert_eq!(tiers(&plan), expected);
    let counts = tier_counts(&config).await;
    assert_tiers_add_up(&counts);
    assert_report_matches(&run, &counts);
    // The archived diagnoses carry their parent's date as their record date.
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let dates: Vec<_> = archive
        .patient_rows("diagnoses", "1")
        .await
        .unwrap()
        .iter()
        .flat_map(|b| {
            let b = strata_archive::ArchivedBatch::new(b, &[]);
            (0..b.num_rows())
                .map(|r| b.record_date(r).map(|d| d.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(dates, vec![Some("2151-03-01".to_string()); 2]);
}

/// A date through a parent is checked like any other setting: the parent, its key, its column,
/// and whether it has a date to give.
#[tokio::test]
async fn a_record_date_through_a_parent_is_checked_against_the_schema() {
    let dir = TestDir::new();
    let url = format!("sqlite://{}", dir.path().join("icu.db").display());
    let db = Db::connect(&format!("{url}?mode=rwc"), false)
        .await
        .unwrap();
    db.execute(
        "CREATE TABLE admissions (row_id INTEGER PRIMARY KEY, subject_id INTEGER, hadm_id INTEGER, admittime TIMESTAMP);
         CREATE TABLE stays (row_id INTEGER PRIMARY KEY, subject_id INTEGER, intime TIMESTAMP, outtime TIMESTAMP);
         CREATE TABLE diagnoses (row_id INTEGER PRIMARY KEY, subject_id INTEGER, hadm_id INTEGER, stay INTEGER);",
    )
    .await
    .unwrap();
    db.close().await;
    let head = run_config(&url, "sqlite://operational.db")
        + r#"
[tables.admissions]
primary_key = ["row_id"]
patient_key = "subject_id"
[tables.stays]
primary_key = ["row_id"]
patient_key = "subject_id"
record_date = { start = "intime", end = "outtime" }
"#;
    for (diagnoses, problem) in [
        (
            r#"record_date = { via = "admission", foreign_key = "hadm_id" }"#,
            r#"[tables.diagnoses] record_date.via: table "admission" is not configured"#,
        ),
        (
            r#"record_date = { via = "admissions", foreign_key = "hadm", column = "admittime" }"#,
            r#"[tables.diagnoses] record_date.foreign_key: no column "hadm" in diagnoses"#,
        ),
        (
            r#"record_date = { via = "admissions", foreign_key = "hadm_id", column = "admitted" }"#,
            r#"[tables.diagnoses] record_date.column: no column "admitted" in admissions"#,
        ),
        (
            r#"record_date = { via = "admissions", foreign_key = "hadm_id" }"#,
            r#"[tables.diagnoses] record_date.via: table "admissions" has no record_date; name the parent's column (column = "...")"#,
        ),
        (
            r#"record_date = { via = "stays", foreign_key = "stay" }"#,
            r#"[tables.diagnoses] record_date.via: table "stays" is dated by a period; name the parent's column to date by (column = "...")"#,
        ),
        (
            r#"record_date = { via = "admissions", foreign_key = "hadm_id", parent_key = "hadm" }"#,
            r#"[tables.diagnoses] record_date.parent_key: no column "hadm" in admissions"#,
        ),
    ] {
        let config = format!(
            "{head}[tables.diagnoses]\nprimary_key = [\"row_id\"]\npatient_key = \"subject_id\"\n{diagnoses}\n"
        );
        write_run_files(dir.path(), &config, ICU_POLICY);
        let err = Migration::prepare(load_config(&dir.path().join("strata.toml")), as_of())
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains(problem), "{diagnoses}: {err}");
    }
    // A shape that is none of the three is named as such.
    let config = format!(
        "{head}[tables.diagnoses]\nprimary_key = [\"row_id\"]\nrecord_date = {{ via = \"admissions\" }}\n"
    );
    let mut table: toml::Table = toml::from_str(&config).unwrap();
    table.remove("api");
    let err = strata_ingest::MigrationConfig::parse(table, dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("record_date: write a column name"),
        "{err}"
    );
}
