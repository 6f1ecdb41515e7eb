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
    let url = sqlite_source(
        dir.path(),
        "icu.db",
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
    .await;
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
    let url = sqlite_source(
        dir.path(),
        "icu.db",
        "CREATE TABLE admissions (row_id INTEGER PRIMARY KEY, subject_id INTEGER, hadm_id INTEGER, admittime TIMESTAMP);
         CREATE TABLE stays (row_id INTEGER PRIMARY KEY, subject_id INTEGER, intime TIMESTAMP, outtime TIMESTAMP);
         CREATE TABLE diagnoses (row_id INTEGER PRIMARY KEY, subject_id INTEGER, hadm_id INTEGER, stay INTEGER);",
    )
    .await;
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

/// A research database as they are loaded in practice: surrogate `row_id` primary keys,
/// patients by `subject_id`, child tables that carry only an admission's id, a period table,
/// lab ids reused across patients, unconstrained numerics, dates shifted into the 22nd
/// century, and no foreign key declared. 40 subjects; subject s is active when s % 3 = 0 (a
/// recent admission) or s % 5 = 1 (an open observation period).
const RESEARCH_DB: &str = "
CREATE TABLE patients (row_id int PRIMARY KEY, subject_id int NOT NULL, gender text, dob timestamp, dod timestamp);
CREATE TABLE admissions (row_id int PRIMARY KEY, subject_id int NOT NULL, hadm_id int NOT NULL,
  admittime timestamp, dischtime timestamp, admission_type text);
CREATE TABLE icustays (row_id int PRIMARY KEY, subject_id int, hadm_id int, icustay_id int,
  intime timestamp, outtime timestamp, los numeric);
CREATE TABLE diagnoses_icd (row_id int PRIMARY KEY, subject_id int, hadm_id int, seq_num int, icd9_code text);
CREATE TABLE procedures_icd (row_id int PRIMARY KEY, subject_id int, hadm_id int, seq_num int, icd9_code text);
CREATE TABLE drgcodes (row_id int PRIMARY KEY, subject_id int, hadm_id int, drg_code text);
CREATE TABLE labevents (row_id int, subject_id int, hadm_id int, itemid int, charttime timestamp,
  value text, valuenum numeric, valueuom text);
CREATE TABLE observation_period (observation_period_id int PRIMARY KEY, subject_id int,
  observation_period_start_date date, observation_period_end_date date);
INSERT INTO patients SELECT 1000 + s, s, CASE WHEN s % 2 = 0 THEN 'F' ELSE 'M' END,
  timestamp '2100-01-01' + s * interval '100 days', NULL FROM generate_series(1, 40) s;
INSERT INTO admissions SELECT 100 + s * 2 + k, s, s * 10 + k, t, t + interval '5 days', 'EMERGENCY'
  FROM generate_series(1, 40) s, generate_series(0, 1) k,
  LATERAL (SELECT CASE WHEN s % 3 = 0 AND k = 1 THEN timestamp '2179-01-10 08:00'
    ELSE timestamp '2150-01-10 08:00' + (s % 20) * interval '1 year' + k * interval '40 days' END AS t) a;
INSERT INTO icustays SELECT 500 + a.row_id, subject_id, hadm_id, hadm_id * 10, admittime + interval '1 day',
  admittime + interval '3 days', (subject_id * 0.1234 + hadm_id % 10)::numeric FROM admissions a;
INSERT INTO diagnoses_icd SELECT 2000 + a.row_id * 3 + j, subject_id, hadm_id, j + 1,
  (ARRAY['4019', '25000', '4280'])[j + 1] FROM admissions a, generate_series(0, 2) j;
INSERT INTO diagnoses_icd VALUES (9999, 7, NULL, 1, '7999');
INSERT INTO procedures_icd SELECT 3000 + a.row_id, subject_id, hadm_id, 1, '3893' FROM admissions a;
INSERT INTO drgcodes SELECT 4000 + a.row_id, subject_id, hadm_id, '127' FROM admissions a;
INSERT INTO labevents SELECT (a.row_id % 11) * 3 + j, subject_id, hadm_id, 50912 + j,
  admittime + j * interval '1 hour', (j * 1.5 + subject_id * 0.01)::text,
  (j * 1.5 + subject_id * 0.01)::numeric, 'mg/dL' FROM admissions a, generate_series(0, 2) j;
INSERT INTO observation_period SELECT 7000 + s, s, date '2140-01-01',
  CASE WHEN s % 5 = 1 THEN NULL ELSE (SELECT MAX(admittime)::date + 10 FROM admissions WHERE subject_id = s) END
  FROM generate_series(1, 40) s;
";

/// Per subject and table, the rows the policy below archives, computed with SQL on the source
/// alone: a record is dated by its own column, its admission's (the latest, should an id
/// repeat) or its period's end (as_of while open); a patient's last activity is their latest
/// date; records older than 3 years of patients inactive for 2 are archived.
const EXPECTED_ARCHIVED: &str = "
WITH parent AS (SELECT hadm_id, MAX(admittime) AS d FROM admissions GROUP BY hadm_id),
dated AS (
  SELECT 'admissions' AS t, subject_id, admittime::date AS d FROM admissions
  UNION ALL SELECT 'icustays', subject_id, intime::date FROM icustays
  UNION ALL SELECT 'diagnoses_icd', x.subject_id, p.d::date FROM diagnoses_icd x LEFT JOIN parent p USING (hadm_id)
  UNION ALL SELECT 'procedures_icd', x.subject_id, p.d::date FROM procedures_icd x LEFT JOIN parent p USING (hadm_id)
  UNION ALL SELECT 'drgcodes', x.subject_id, p.d::date FROM drgcodes x LEFT JOIN parent p USING (hadm_id)
  UNION ALL SELECT 'labevents', subject_id, charttime::date FROM labevents
  UNION ALL SELECT 'observation_period', subject_id,
    COALESCE(observation_period_end_date, date '2180-06-30') FROM observation_period),
last AS (SELECT subject_id, MAX(d) AS last FROM dated WHERE d <= date '2180-06-30' GROUP BY subject_id)
SELECT dated.subject_id::text, t, COUNT(*) FROM dated JOIN last USING (subject_id)
WHERE d < date '2177-06-30' AND last < date '2178-06-30' GROUP BY 1, 2";

/// The policy a records manager writes for it: demographics stay; the rest by age and activity.
const RESEARCH_POLICY: &str = r#"
version = "research-1"
as_of = "2180-06-30"
[patients]
table = "patients"
birth_date = "dob"
deceased_date = "dod"
[defaults]
archive_after = "3y"
patient_inactive_after = "2y"
retention = "100y"
[tables.patients]
tier = "operational"
"#;

/// The acceptance of "any legacy schema": on the research database above, `strata init` drafts a
/// config whose patient keys, keys and dates need no edit (it was written by hand nowhere
/// below); `plan` predicts the run exactly; and for every patient, the archived records the API
/// serves per table are exactly those SQL on the source says the policy archives. The drafted
/// `[api]` serves as written, with `strata token`.
#[tokio::test]
async fn a_research_database_migrates_as_init_drafted_it() {
    let url = create_pg_database("research").await;
    let db = Db::connect(&url, false).await.unwrap();
    db.execute(RESEARCH_DB).await.unwrap();
    db.close().await;
    let reader = read_only_url(&url).await;
    let draft = strata_ingest::draft_config(&reader).await.unwrap();
    let drafted: toml::Table = toml::from_str(&draft).unwrap();
    let table = |t: &str| drafted["tables"][t].clone();
    for t in [
        "admissions",
        "icustays",
        "diagnoses_icd",
        "procedures_icd",
        "drgcodes",
        "labevents",
        "observation_period",
        "patients",
    ] {
        assert_eq!(table(t)["patient_key"].as_str(), Some("subject_id"), "{t}");
    }
    for t in ["diagnoses_icd", "procedures_icd", "drgcodes"] {
        assert_eq!(
            table(t)["record_date"].to_string(),
            r#"{ column = "admittime", foreign_key = "hadm_id", via = "admissions" }"#,
            "{t}"
        );
    }
    assert_eq!(
        table("observation_period")["record_date"].to_string(),
        r#"{ end = "observation_period_end_date", start = "observation_period_start_date" }"#
    );
    assert_eq!(
        table("admissions")["record_date"].as_str(),
        Some("admittime")
    );
    assert!(table("patients").get("record_date").is_none(), "{draft}");
    // Lab ids repeat across patients: the key proposed is the id with the patient's.
    assert_eq!(
        table("labevents")["primary_key"].to_string(),
        r#"["row_id", "subject_id"]"#
    );
    assert!(draft.contains("(row_id, subject_id) is unique"), "{draft}");
    assert!(!draft.contains("no patient key found"), "{draft}");
    assert!(!draft.contains("no record date found"), "{draft}");

    // Only where things go changes: the KEK from a file, the API on a free port.
    let dir = TestDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = draft
        .replace("kek_env = \"STRATA_KEK\"", "kek_file = \"kek.hex\"")
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"));
    write_run_files(dir.path(), &config, RESEARCH_POLICY);
    let config = load_config(&dir.path().join("strata.toml"));
    let mut migration = Migration::prepare(config.clone(), as_of()).await.unwrap();
    assert_eq!(migration.warnings(), Vec::<String>::new());
    let (plan, _) = migration.plan().await.unwrap();
    let run = migration.run(&mut |_| {}).await.unwrap();
    assert_eq!(
        serde_json::to_value(&plan.tables).unwrap(),
        serde_json::to_value(&run.tables).unwrap()
    );
    let counts = tier_counts(&config).await;
    assert_tiers_add_up(&counts);
    assert_report_matches(&run, &counts);
    assert!(run.tables.iter().all(|t| t.quarantined_rows == 0));

    // What SQL on the source says is archived, per subject and table.
    let source = Db::connect(&url, true).await.unwrap();
    let mut expected = std::collections::BTreeMap::<(String, String), u64>::new();
    for row in source
        .fetch_all(
            EXPECTED_ARCHIVED.into(),
            vec![
                strata_ingest::ColumnType::Text,
                strata_ingest::ColumnType::Text,
                strata_ingest::ColumnType::Int,
            ],
        )
        .await
        .unwrap()
    {
        let n = match row[2] {
            strata_ingest::Value::Int(n) => n as u64,
            _ => unreachable!(),
        };
        expected.insert(
            (row[0].as_key_text().unwrap(), row[1].as_key_text().unwrap()),
            n,
        );
    }
    source.close().await;
    for t in &run.tables {
        let sql: u64 = expected
            .iter()
            .filter(|((_, table), _)| *table == t.table)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(t.archive_rows, sql, "{}", t.table);
    }
    assert!(expected.len() > 50, "{expected:?}");

    // What the API serves, with the drafted [api] and a development token.
    let secrets = [
        ("STRATA_JWT_SECRET", strata_archive::Kek::generate_hex()),
        ("STRATA_AUDIT_KEY", strata_archive::Kek::generate_hex()),
    ];
    let config_path = dir.path().join("strata.toml");
    let mut token = std::process::Command::new(env!("CARGO_BIN_EXE_strata"));
    token
        .args(["token", "--user", "dr-a", "--role", "clinician", "--config"])
        .arg(&config_path)
        .envs(secrets.clone());
    for s in 1..=40 {
        token.args(["--patient", &s.to_string()]);
    }
    let token = token.output().unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let (mut server, base) = serve(&config_path, &secrets).await;
    let client = reqwest::Client::new();
    let mut served = std::collections::BTreeMap::<(String, String), u64>::new();
    for s in 1..=40 {
        let body = client
            .get(format!("{base}/v1/patients/{s}/history?limit=1000"))
            .bearer_auth(&token)
            .header("X-Purpose-Of-Use", "TREAT")
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let history: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for r in history["records"].as_array().unwrap() {
            *served
                .entry((s.to_string(), r["table"].as_str().unwrap().to_string()))
                .or_default() += 1;
            // An unconstrained numeric is a number, as exact as the source wrote it.
            if r["table"] == "icustays" {
                assert!(r["data"]["los"].is_number(), "{r}");
            }
        }
    }
    server.kill().await.unwrap();
    assert_eq!(served, expected);
}

/// The configs that looked valid and silently lost patients: a table whose rows can be
/// archived with no patient key (no history would ever show them), and a patients table keyed
/// by its surrogate `row_id` while every other table names patients by `subject_id`.
/// `policy check` and `plan` say so, naming the table and what to set.
#[tokio::test]
async fn configs_that_would_hide_archived_rows_from_the_patient_api_are_warned_about() {
    let dir = TestDir::new();
    let url = sqlite_source(
        dir.path(),
        "icu.db",
        "CREATE TABLE patients (row_id INTEGER PRIMARY KEY, subject_id INTEGER, dob DATE);
         CREATE TABLE admissions (row_id INTEGER PRIMARY KEY, subject_id INTEGER, admittime TIMESTAMP);
         CREATE TABLE labevents (row_id INTEGER PRIMARY KEY, subject_id INTEGER, charttime TIMESTAMP);
         CREATE TABLE d_items (itemid INTEGER PRIMARY KEY, label TEXT);
         INSERT INTO patients VALUES (1, 10006, '2094-03-05');
         INSERT INTO admissions VALUES (1, 10006, '2150-10-23 21:09:00');
         INSERT INTO labevents VALUES (1, 10006, '2150-10-24 02:00:00');
         INSERT INTO d_items VALUES (50912, 'Creatinine');",
    )
    .await;
    let config = run_config(&url, "sqlite://operational.db")
        + r#"
[tables.patients]
primary_key = ["row_id"]
patient_key = "row_id"
[tables.admissions]
primary_key = ["row_id"]
record_date = "admittime"
[tables.labevents]
primary_key = ["row_id"]
patient_key = "subject_id"
record_date = "charttime"
[tables.d_items]
primary_key = ["itemid"]
"#;
    let policy = ICU_POLICY.replace(
        "[defaults]",
        "[patients]\ntable = \"patients\"\nbirth_date = \"dob\"\n[tables.patients]\ntier = \"operational\"\n[tables.d_items]\ntier = \"operational\"\n[defaults]",
    );
    write_run_files(dir.path(), &config, &policy);
    let strata = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .arg("--config")
            .arg(dir.path().join("strata.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stderr).unwrap()
    };
    for args in [&["policy", "check"][..], &["plan"]] {
        let warned = strata(args);
        assert!(
            warned.contains("warning: [tables.admissions]: no patient_key"),
            "{args:?}: {warned}"
        );
        assert!(
            warned.contains(
                r#"warning: [tables.patients] patient_key = "row_id", but the other tables name their patient by "subject_id" (1 of them)"#
            ),
            "{args:?}: {warned}"
        );
        // Reference data pinned operational and tables with a patient are fine.
        assert!(!warned.contains("d_items"), "{warned}");
        assert!(!warned.contains("[tables.labevents]"), "{warned}");
    }
}

/// Ids reused across patients under a declared key: `profile` counts the repeats and proposes
/// the key with the patient's column, which is unique; `plan` counts the rows `migrate` will
/// quarantine for it, per column and reason, says why, and the run does exactly that.
#[tokio::test]
async fn a_key_reused_across_patients_is_counted_explained_and_a_unique_one_proposed() {
    let dir = TestDir::new();
    let url = sqlite_source(
        dir.path(),
        "icu.db",
        "CREATE TABLE labevents (row_id INTEGER, subject_id INTEGER, charttime TIMESTAMP, valuenum REAL);
         INSERT INTO labevents VALUES (1, 1, '2150-01-01 10:00:00', 1.0), (2, 1, '2150-01-01 11:00:00', 2.0),
           (1, 2, '2179-01-01 10:00:00', 3.0), (2, 2, '2179-01-01 11:00:00', 4.0), (3, 2, '2179-01-01 12:00:00', 5.0);",
    )
    .await;
    let config = run_config(&url, "sqlite://operational.db")
        + "[tables.labevents]\nprimary_key = [\"row_id\"]\npatient_key = \"subject_id\"\nrecord_date = \"charttime\"\n";
    write_run_files(dir.path(), &config, ICU_POLICY);
    let config = load_config(&dir.path().join("strata.toml"));
    let mut migration = Migration::prepare(config, as_of()).await.unwrap();
    let profile = migration.profile().await.unwrap();
    assert_eq!(profile[0].duplicate_keys, 2);
    assert_eq!(
        profile[0].proposed_key,
        Some(vec!["row_id".to_string(), "subject_id".to_string()])
    );
    assert!(profile[0]
        .to_text()
        .contains(r#"primary_key = ["row_id", "subject_id"] is unique"#));
    let (plan, _) = migration.plan().await.unwrap();
    let reasons =
        std::collections::BTreeMap::from([("row_id: duplicate primary key".to_string(), 2)]);
    assert_eq!(plan.tables[0].quarantine_reasons, reasons);
    let text = plan.to_text();
    assert!(
        text.contains("quarantine: labevents.row_id: duplicate primary key: 2 rows"),
        "{text}"
    );
    assert!(
        text.contains("`strata profile` proposes one that is"),
        "{text}"
    );
    let run = migration.run(&mut |_| {}).await.unwrap();
    assert_eq!(run.tables[0].quarantine_reasons, reasons);
    assert_eq!(
        serde_json::to_value(&plan.tables).unwrap(),
        serde_json::to_value(&run.tables).unwrap()
    );
}

/// Serves `config` with `strata serve` (with `env`) and returns the server and its base URL.
async fn serve(
    config: &std::path::Path,
    env: &[(&str, String)],
) -> (tokio::process::Child, String) {
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["serve", "--config"])
        .arg(config)
        .envs(env.iter().cloned())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(server.stderr.take().unwrap()).lines();
    let base = loop {
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .expect("serve starts")
            .unwrap()
            .expect("serve prints its address");
        if let Some(url) = line.split("listening on ").nth(1) {
            break url.trim().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (server, base)
}

/// The Synthea CSV sample read directly (`csv://`), as `strata init` drafted it, with only a
/// policy written: the plan predicts the run; every patient's archived records per table in
/// the API are those the CSV files say the policy archives ([`synthea_archived`]); timestamps
/// keep their instant; and every archived record of a clinical table is served as FHIR (valid
/// R4 by fhir.resources) besides JSON, one resource per record, of the type its table holds;
/// Encounter periods carry start and end instants.
#[tokio::test]
async fn synthea_as_init_drafted_it_serves_every_archived_record_as_fhir() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/synthea-nj27")
        .canonicalize()
        .unwrap();
    let dir = TestDir::new();
    let draft = strata_ingest::draft_config(&format!("csv://{}", data.display()))
        .await
        .unwrap();
    let drafted: toml::Table = toml::from_str(&draft).unwrap();
    let fhir = drafted["api"]["fhir"].as_table().unwrap();
    let mapped: std::collections::BTreeMap<&str, &str> = fhir
        .iter()
        .map(|(t, m)| (t.as_str(), m["resource"].as_str().unwrap()))
        .collect();
    assert_eq!(
        mapped,
        std::collections::BTreeMap::from([
            ("allergies", "AllergyIntolerance"),
            ("careplans", "CarePlan"),
            ("conditions", "Condition"),
            ("devices", "Device"),
            ("encounters", "Encounter"),
            ("imaging_studies", "ImagingStudy"),
            ("immunizations", "Immunization"),
            ("medications", "MedicationRequest"),
            ("observations", "Observation"),
            ("patients", "Patient"),
            ("payer_transitions", "Coverage"),
            ("procedures", "Procedure"),
            ("supplies", "SupplyDelivery"),
        ])
    );
    assert_eq!(fhir["encounters"]["class"].as_str(), Some("ENCOUNTERCLASS"));
    assert_eq!(fhir["encounters"]["code"].as_str(), Some("CODE"));
    assert_eq!(fhir["encounters"]["end"].as_str(), Some("STOP"));
    assert_eq!(
        fhir["observations"]["system"].as_str(),
        Some("http://loinc.org")
    );
    assert_eq!(fhir["observations"]["value"].as_str(), Some("VALUE"));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = draft
        .replace("kek_env = \"STRATA_KEK\"", "kek_file = \"kek.hex\"")
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"));
    // The policy a records manager writes ([`SYNTHEA_POLICY`]).
    let policy = SYNTHEA_POLICY;
    write_run_files(dir.path(), &config, policy);
    let config_path = dir.path().join("strata.toml");
    let mut migration = Migration::prepare(load_config(&config_path), as_of())
        .await
        .unwrap();
    assert_eq!(migration.warnings(), Vec::<String>::new());
    let (plan, _) = migration.plan().await.unwrap();
    let run = migration.run(&mut |_| {}).await.unwrap();
    assert_eq!(
        serde_json::to_value(&plan.tables).unwrap(),
        serde_json::to_value(&run.tables).unwrap()
    );
    assert_tiers_add_up(&tier_counts(&load_config(&config_path)).await);
    let expected = synthea_archived(&data, &drafted);
    let archived: std::collections::BTreeMap<&str, u64> = run
        .tables
        .iter()
        .filter(|t| t.archive_rows > 0)
        .map(|t| (t.table.as_str(), t.archive_rows))
        .collect();
    assert!(archived.len() >= 8, "{archived:?}");

    let secrets = [
        ("STRATA_JWT_SECRET", strata_archive::Kek::generate_hex()),
        ("STRATA_AUDIT_KEY", strata_archive::Kek::generate_hex()),
    ];
    let token = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "token",
            "--user",
            "him-1",
            "--role",
            "clinician",
            "--config",
        ])
        .arg(&config_path)
        .envs(secrets.clone())
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let (mut server, base) = serve(&config_path, &secrets).await;
    let client = reqwest::Client::new();
    let get = |uri: String| {
        let (client, token) = (client.clone(), token.clone());
        async move {
            let body = client
                .get(uri)
                .bearer_auth(&token)
                .header("X-Purpose-Of-Use", "TREAT")
                // Every patient here is someone else's: read as a release of information.
                .header(
                    "X-Break-Glass-Reason",
                    "release of information request 2024-117",
                )
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .bytes()
                .await
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()
        }
    };
    // Every patient of the sample.
    let patients: Vec<String> = csv::Reader::from_path(data.join("patients.csv"))
        .unwrap()
        .records()
        .map(|r| r.unwrap()[0].to_string())
        .collect();
    assert!(patients.len() > 20);
    let (mut json_by_table, mut fhir_by_type) = (
        std::collections::BTreeMap::<String, u64>::new(),
        std::collections::BTreeMap::<String, u64>::new(),
    );
    let mut entries = Vec::new();
    let mut outcomes = 0;
    let mut served = std::collections::BTreeMap::<(String, String), u64>::new();
    for p in &patients {
        let history = get(format!("{base}/v1/patients/{p}/history?limit=1000")).await;
        for r in history["records"].as_array().unwrap() {
            let table = r["table"].as_str().unwrap();
            *served.entry((p.clone(), table.to_string())).or_default() += 1;
            if mapped.contains_key(table) {
                *json_by_table.entry(mapped[table].to_string()).or_default() += 1;
            }
            // Instants stay instants in JSON too.
            if table == "encounters" {
                let start = r["data"]["START"].as_str().unwrap();
                assert!(start.ends_with("+00:00") || start.ends_with('Z'), "{start}");
            }
        }
        let bundle = get(format!(
            "{base}/v1/patients/{p}/history?limit=1000&format=fhir"
        ))
        .await;
        for e in bundle["entry"].as_array().unwrap() {
            let resource = &e["resource"];
            // What the Bundle leaves out is said: claims have no FHIR mapping here.
            if e["search"]["mode"] == "outcome" {
                let said = resource["issue"][0]["diagnostics"].as_str().unwrap();
                assert!(said.contains("claims"), "{said}");
                outcomes += 1;
                continue;
            }
            *fhir_by_type
                .entry(resource["resourceType"].as_str().unwrap().to_string())
                .or_default() += 1;
            if resource["resourceType"] == "Encounter" {
                let period = &resource["period"];
                for end in ["start", "end"] {
                    let t = period[end].as_str().unwrap();
                    assert!(
                        t.len() > 10 && (t.ends_with('Z') || t.ends_with("+00:00")),
                        "{period}"
                    );
                }
                assert!(
                    resource["class"]["code"].is_string()
                        && resource["type"][0]["coding"][0]["code"].is_string(),
                    "{resource}"
                );
            }
            entries.push(e.clone());
        }
    }
    server.kill().await.unwrap();
    // Every patient's archived records per table are what the CSV files say.
    assert_eq!(served, expected);
    assert_eq!(fhir_by_type, json_by_table);
    assert!(
        outcomes > 0,
        "patients with archived claims are told they are not in the Bundle"
    );
    // Every archived record of a mapped table, once: 8 resource types here.
    for (table, rows) in &archived {
        if let Some(kind) = mapped.get(table) {
            assert_eq!(fhir_by_type.get(*kind), Some(rows), "{table}");
        }
    }
    assert!(fhir_by_type.len() >= 8, "{fhir_by_type:?}");
    let counts = crate::api::validate_fhir(&serde_json::json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": entries.iter().map(|e| serde_json::json!({ "resource": e["resource"] })).collect::<Vec<_>>(),
    }));
    assert_eq!(counts, fhir_by_type);
}

/// Clinical, health-system and vocabulary tables of the OMOP CDM 5.4 as its published table
/// definitions give them (columns, types, NULLs), without the primary and foreign keys the
/// CDM ships separately (many loads skip them), and synthetic data for 30 persons: person s
/// is active when s % 3 = 0 (a visit in 2024). Written here from the CDM 5.4 specification.
const OMOP_DB: &str = "
CREATE TABLE person (person_id integer NOT NULL, gender_concept_id integer NOT NULL,
  year_of_birth integer NOT NULL, month_of_birth integer, day_of_birth integer,
  birth_datetime timestamp, race_concept_id integer NOT NULL, ethnicity_concept_id integer NOT NULL,
  location_id integer, provider_id integer, care_site_id integer, person_source_value varchar(50),
  gender_source_value varchar(50), gender_source_concept_id integer, race_source_value varchar(50),
  race_source_concept_id integer, ethnicity_source_value varchar(50), ethnicity_source_concept_id integer);
CREATE TABLE observation_period (observation_period_id integer NOT NULL, person_id integer NOT NULL,
  observation_period_start_date date NOT NULL, observation_period_end_date date NOT NULL,
  period_type_concept_id integer NOT NULL);
CREATE TABLE visit_occurrence (visit_occurrence_id integer NOT NULL, person_id integer NOT NULL,
  visit_concept_id integer NOT NULL, visit_start_date date NOT NULL, visit_start_datetime timestamp,
  visit_end_date date NOT NULL, visit_end_datetime timestamp, visit_type_concept_id integer NOT NULL,
  provider_id integer, care_site_id integer, visit_source_value varchar(50), visit_source_concept_id integer,
  admitted_from_concept_id integer, admitted_from_source_value varchar(50), discharged_to_concept_id integer,
  discharged_to_source_value varchar(50), preceding_visit_occurrence_id integer);
CREATE TABLE condition_occurrence (condition_occurrence_id integer NOT NULL, person_id integer NOT NULL,
  condition_concept_id integer NOT NULL, condition_start_date date NOT NULL, condition_start_datetime timestamp,
  condition_end_date date, condition_end_datetime timestamp, condition_type_concept_id integer NOT NULL,
  condition_status_concept_id integer, stop_reason varchar(20), provider_id integer, visit_occurrence_id integer,
  visit_detail_id integer, condition_source_value varchar(50), condition_source_concept_id integer,
  condition_status_source_value varchar(50));
CREATE TABLE drug_exposure (drug_exposure_id integer NOT NULL, person_id integer NOT NULL,
  drug_concept_id integer NOT NULL, drug_exposure_start_date date NOT NULL, drug_exposure_start_datetime timestamp,
  drug_exposure_end_date date NOT NULL, drug_exposure_end_datetime timestamp, verbatim_end_date date,
  drug_type_concept_id integer NOT NULL, stop_reason varchar(20), refills integer, quantity numeric,
  days_supply integer, sig text, route_concept_id integer, lot_number varchar(50), provider_id integer,
  visit_occurrence_id integer, visit_detail_id integer, drug_source_value varchar(50),
  drug_source_concept_id integer, route_source_value varchar(50), dose_unit_source_value varchar(50));
CREATE TABLE procedure_occurrence (procedure_occurrence_id integer NOT NULL, person_id integer NOT NULL,
  procedure_concept_id integer NOT NULL, procedure_date date NOT NULL, procedure_datetime timestamp,
  procedure_end_date date, procedure_end_datetime timestamp, procedure_type_concept_id integer NOT NULL,
  modifier_concept_id integer, quantity integer, provider_id integer, visit_occurrence_id integer,
  visit_detail_id integer, procedure_source_value varchar(50), procedure_source_concept_id integer,
  modifier_source_value varchar(50));
CREATE TABLE measurement (measurement_id integer NOT NULL, person_id integer NOT NULL,
  measurement_concept_id integer NOT NULL, measurement_date date NOT NULL, measurement_datetime timestamp,
  measurement_time varchar(10), measurement_type_concept_id integer NOT NULL, operator_concept_id integer,
  value_as_number numeric, value_as_concept_id integer, unit_concept_id integer, range_low numeric,
  range_high numeric, provider_id integer, visit_occurrence_id integer, visit_detail_id integer,
  measurement_source_value varchar(50), measurement_source_concept_id integer, unit_source_value varchar(50),
  unit_source_concept_id integer, value_source_value varchar(50), measurement_event_id integer,
  meas_event_field_concept_id integer);
CREATE TABLE death (person_id integer NOT NULL, death_date date NOT NULL, death_datetime timestamp,
  death_type_concept_id integer, cause_concept_id integer, cause_source_value varchar(50),
  cause_source_concept_id integer);
CREATE TABLE note (note_id integer NOT NULL, person_id integer NOT NULL, note_date date NOT NULL,
  note_datetime timestamp, note_type_concept_id integer NOT NULL, note_class_concept_id integer NOT NULL,
  note_title varchar(250), note_text text NOT NULL, encoding_concept_id integer NOT NULL,
  language_concept_id integer NOT NULL, provider_id integer, visit_occurrence_id integer,
  visit_detail_id integer, note_source_value varchar(50), note_event_id integer,
  note_event_field_concept_id integer);
CREATE TABLE payer_plan_period (payer_plan_period_id integer NOT NULL, person_id integer NOT NULL,
  payer_plan_period_start_date date NOT NULL, payer_plan_period_end_date date NOT NULL,
  payer_concept_id integer, payer_source_value varchar(50), payer_source_concept_id integer,
  plan_concept_id integer, plan_source_value varchar(50), plan_source_concept_id integer,
  sponsor_concept_id integer, sponsor_source_value varchar(50), sponsor_source_concept_id integer,
  family_source_value varchar(50), stop_reason_concept_id integer, stop_reason_source_value varchar(50),
  stop_reason_source_concept_id integer);
CREATE TABLE location (location_id integer NOT NULL, address_1 varchar(50), address_2 varchar(50),
  city varchar(50), state varchar(2), zip varchar(9), county varchar(20), location_source_value varchar(50),
  country_concept_id integer, country_source_value varchar(80), latitude numeric, longitude numeric);
CREATE TABLE care_site (care_site_id integer NOT NULL, care_site_name varchar(255),
  place_of_service_concept_id integer, location_id integer, care_site_source_value varchar(50),
  place_of_service_source_value varchar(50));
CREATE TABLE concept (concept_id integer NOT NULL, concept_name varchar(255) NOT NULL,
  domain_id varchar(20) NOT NULL, vocabulary_id varchar(20) NOT NULL, concept_class_id varchar(20) NOT NULL,
  standard_concept varchar(1), concept_code varchar(50) NOT NULL, valid_start_date date NOT NULL,
  valid_end_date date NOT NULL, invalid_reason varchar(1));
CREATE TABLE cdm_source (cdm_source_name varchar(255) NOT NULL, cdm_source_abbreviation varchar(25) NOT NULL,
  cdm_holder varchar(255) NOT NULL, source_description text, source_documentation_reference varchar(255),
  cdm_etl_reference varchar(255), source_release_date date NOT NULL, cdm_release_date date NOT NULL,
  cdm_version varchar(10), cdm_version_concept_id integer NOT NULL, vocabulary_version varchar(20) NOT NULL);

INSERT INTO location VALUES (1, '1 Main St', NULL, 'Springfield', 'MA', '01101', 'Hampden', 'L1', 42046, 'US', 42.1, -72.5);
INSERT INTO care_site VALUES (1, 'General Hospital', 8717, 1, 'GH', 'inpatient');
INSERT INTO concept VALUES (9201, 'Inpatient Visit', 'Visit', 'Visit', 'Visit', 'S', 'IP', '1970-01-01', '2099-12-31', NULL),
  (320128, 'Essential hypertension', 'Condition', 'SNOMED', 'Clinical Finding', 'S', '59621000', '1970-01-01', '2099-12-31', NULL);
INSERT INTO cdm_source VALUES ('Test CDM', 'TCDM', 'Strata tests', NULL, NULL, NULL, '2024-06-01', '2024-06-01', '5.4', 756265, 'v5.0');
INSERT INTO person SELECT s, CASE WHEN s % 2 = 0 THEN 8532 ELSE 8507 END, 1950 + s, 1, 1,
  make_timestamp(1950 + s, 1, 1, 0, 0, 0), 8527, 38003564, 1, NULL, 1, 'P' || s, NULL, NULL, NULL, NULL, NULL, NULL
  FROM generate_series(1, 30) s;
INSERT INTO visit_occurrence SELECT s * 10 + k, s, 9201, d, d + time '09:30', d + 3, d + 3 + time '11:00',
  44818517, NULL, 1, 'V' || (s * 10 + k), NULL, NULL, NULL, NULL, NULL, NULL
  FROM generate_series(1, 30) s, generate_series(0, 1) k,
  LATERAL (SELECT CASE WHEN s % 3 = 0 AND k = 1 THEN date '2024-01-15'
    ELSE date '2012-03-01' + (s % 8) * 365 + k * 40 END AS d) v;
INSERT INTO condition_occurrence SELECT visit_occurrence_id * 10 + j, person_id, 320128, visit_start_date,
  NULL, NULL, NULL, 32817, NULL, NULL, NULL, visit_occurrence_id, NULL, 'I10', NULL, NULL
  FROM visit_occurrence, generate_series(0, 1) j;
INSERT INTO drug_exposure SELECT visit_occurrence_id, person_id, 1308216, visit_start_date, NULL,
  visit_start_date + 30, NULL, NULL, 38000177, NULL, 2, (person_id * 0.5)::numeric, 30, NULL, NULL, NULL,
  NULL, visit_occurrence_id, NULL, '197361', NULL, NULL, NULL FROM visit_occurrence;
INSERT INTO procedure_occurrence SELECT visit_occurrence_id, person_id, 4163872, visit_start_date, NULL,
  NULL, NULL, 38000275, NULL, 1, NULL, visit_occurrence_id, NULL, '99213', NULL, NULL FROM visit_occurrence;
INSERT INTO measurement SELECT visit_occurrence_id * 10 + j, person_id, 3004410, visit_start_date, NULL, NULL,
  44818702, NULL, (5.1 + j * 0.25 + person_id * 0.01)::numeric, NULL, 8554, 4.0, 5.6, NULL, visit_occurrence_id,
  NULL, '4548-4', NULL, '%', NULL, NULL, NULL, NULL FROM visit_occurrence, generate_series(0, 2) j;
INSERT INTO death SELECT s, date '2017-05-01' + s, NULL, 32817, NULL, NULL, NULL FROM generate_series(1, 30) s
  WHERE s % 7 = 0 AND s % 3 <> 0;
INSERT INTO note SELECT visit_occurrence_id, person_id, visit_start_date, NULL, 44814637, 44814646,
  'Discharge summary', 'Synthetic note for visit ' || visit_occurrence_id, 32678, 4180186, NULL,
  visit_occurrence_id, NULL, NULL, NULL, NULL FROM visit_occurrence;
INSERT INTO observation_period SELECT s, s, date '2010-01-01',
  (SELECT MAX(visit_end_date) FROM visit_occurrence v WHERE v.person_id = s), 44814724 FROM generate_series(1, 30) s;
INSERT INTO payer_plan_period SELECT s, s, date '2010-01-01', date '2016-12-31', NULL, 'Medicare', NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM generate_series(1, 30) s;
";

/// Per person and table, the rows the policy below archives, with SQL on the source: records
/// dated by their table's date (periods by their end), persons' last activity their latest
/// date; records older than 3 years of persons inactive for 2.
const OMOP_EXPECTED: &str = "
WITH dated AS (
  SELECT 'visit_occurrence' AS t, person_id, visit_start_date AS d FROM visit_occurrence
  UNION ALL SELECT 'condition_occurrence', person_id, condition_start_date FROM condition_occurrence
  UNION ALL SELECT 'drug_exposure', person_id, drug_exposure_start_date FROM drug_exposure
  UNION ALL SELECT 'procedure_occurrence', person_id, procedure_date FROM procedure_occurrence
  UNION ALL SELECT 'measurement', person_id, measurement_date FROM measurement
  UNION ALL SELECT 'death', person_id, death_date FROM death
  UNION ALL SELECT 'note', person_id, note_date FROM note
  UNION ALL SELECT 'observation_period', person_id, observation_period_end_date FROM observation_period
  UNION ALL SELECT 'payer_plan_period', person_id, payer_plan_period_end_date FROM payer_plan_period),
last AS (SELECT person_id, MAX(d) AS last FROM dated WHERE d <= date '2024-06-30' GROUP BY person_id)
SELECT dated.person_id::text, t, COUNT(*) FROM dated JOIN last USING (person_id)
WHERE d < date '2021-06-30' AND last < date '2022-06-30' GROUP BY 1, 2";

/// The same acceptance on an OMOP CDM 5.4 database: `strata init` keys every table by its
/// `<table>_id` (none is declared), names persons by `person_id`, dates each table (periods by
/// their end), and maps the clinical tables to FHIR; only a policy is written (vocabulary and
/// health-system tables pinned); plan = run; every person's archived rows per table in the
/// API equal SQL on the source, and their FHIR resources are valid R4.
#[tokio::test]
async fn an_omop_cdm_database_migrates_as_init_drafted_it() {
    let url = create_pg_database("omop").await;
    let db = Db::connect(&url, false).await.unwrap();
    db.execute(OMOP_DB).await.unwrap();
    db.close().await;
    let reader = read_only_url(&url).await;
    let draft = strata_ingest::draft_config(&reader).await.unwrap();
    let drafted: toml::Table = toml::from_str(&draft).unwrap();
    let table = |t: &str| drafted["tables"][t].clone();
    for t in [
        "observation_period",
        "visit_occurrence",
        "condition_occurrence",
        "drug_exposure",
        "procedure_occurrence",
        "measurement",
        "note",
        "payer_plan_period",
    ] {
        assert_eq!(table(t)["patient_key"].as_str(), Some("person_id"), "{t}");
        assert_eq!(
            table(t)["primary_key"].to_string(),
            format!("[\"{t}_id\"]"),
            "{t}"
        );
    }
    assert_eq!(table("person")["patient_key"].as_str(), Some("person_id"));
    assert_eq!(
        table("visit_occurrence")["record_date"].as_str(),
        Some("visit_start_date")
    );
    assert_eq!(table("death")["record_date"].as_str(), Some("death_date"));
    assert_eq!(
        table("payer_plan_period")["record_date"].to_string(),
        r#"{ end = "payer_plan_period_end_date", start = "payer_plan_period_start_date" }"#
    );
    assert!(draft.contains(
        "tables without patients (reference data?): care_site, cdm_source, concept, location"
    ));
    let fhir = drafted["api"]["fhir"].as_table().unwrap();
    assert_eq!(
        fhir["visit_occurrence"]["resource"].as_str(),
        Some("Encounter")
    );
    assert_eq!(
        fhir["measurement"]["value"].as_str(),
        Some("value_as_number")
    );
    assert_eq!(fhir["note"]["text"].as_str(), Some("note_text"));

    let dir = TestDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = draft
        .replace("kek_env = \"STRATA_KEK\"", "kek_file = \"kek.hex\"")
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{port}"));
    let mut policy = String::from(
        "version = \"omop-1\"\nas_of = \"2024-06-30\"\n[patients]\ntable = \"person\"\nbirth_date = \"birth_datetime\"\n\
         [defaults]\narchive_after = \"3y\"\npatient_inactive_after = \"2y\"\nretention = \"100y\"\n",
    );
    for t in ["person", "location", "care_site", "concept", "cdm_source"] {
        policy.push_str(&format!("[tables.{t}]\ntier = \"operational\"\n"));
    }
    write_run_files(dir.path(), &config, &policy);
    let config_path = dir.path().join("strata.toml");
    let config = load_config(&config_path);
    let mut migration = Migration::prepare(config.clone(), as_of()).await.unwrap();
    assert_eq!(migration.warnings(), Vec::<String>::new());
    let (plan, _) = migration.plan().await.unwrap();
    let run = migration.run(&mut |_| {}).await.unwrap();
    assert_eq!(
        serde_json::to_value(&plan.tables).unwrap(),
        serde_json::to_value(&run.tables).unwrap()
    );
    assert_tiers_add_up(&tier_counts(&config).await);
    assert!(run.tables.iter().all(|t| t.quarantined_rows == 0));

    let source = Db::connect(&url, true).await.unwrap();
    let mut expected = std::collections::BTreeMap::<(String, String), u64>::new();
    for row in source
        .fetch_all(
            OMOP_EXPECTED.into(),
            vec![
                strata_ingest::ColumnType::Text,
                strata_ingest::ColumnType::Text,
                strata_ingest::ColumnType::Int,
            ],
        )
        .await
        .unwrap()
    {
        let strata_ingest::Value::Int(n) = row[2] else {
            unreachable!()
        };
        expected.insert(
            (row[0].as_key_text().unwrap(), row[1].as_key_text().unwrap()),
            n as u64,
        );
    }
    source.close().await;
    assert!(expected.len() > 100, "{expected:?}");

    let secrets = [
        ("STRATA_JWT_SECRET", strata_archive::Kek::generate_hex()),
        ("STRATA_AUDIT_KEY", strata_archive::Kek::generate_hex()),
    ];
    let mut token = std::process::Command::new(env!("CARGO_BIN_EXE_strata"));
    token
        .args(["token", "--user", "dr-o", "--role", "clinician", "--config"])
        .arg(&config_path)
        .envs(secrets.clone());
    for s in 1..=30 {
        token.args(["--patient", &s.to_string()]);
    }
    let token = token.output().unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let (mut server, base) = serve(&config_path, &secrets).await;
    let client = reqwest::Client::new();
    let mut served = std::collections::BTreeMap::<(String, String), u64>::new();
    let mut entries = Vec::new();
    let mut outcomes = 0;
    for s in 1..=30 {
        for format in ["json", "fhir"] {
            let body = client
                .get(format!(
                    "{base}/v1/patients/{s}/history?limit=1000&format={format}"
                ))
                .bearer_auth(&token)
                .header("X-Purpose-Of-Use", "TREAT")
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let page: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if format == "json" {
                for r in page["records"].as_array().unwrap() {
                    *served
                        .entry((s.to_string(), r["table"].as_str().unwrap().to_string()))
                        .or_default() += 1;
                }
            } else {
                for e in page["entry"].as_array().unwrap() {
                    if e["search"]["mode"] == "outcome" {
                        // death and observation_period have no FHIR mapping: the Bundle says
                        // which of the person's records are not in it.
                        let left_out: Vec<String> = expected
                            .iter()
                            .filter(|((p, t), _)| *p == s.to_string() && !fhir.contains_key(t))
                            .map(|((_, t), n)| format!("{t} ({n} records)"))
                            .collect();
                        let said = e["resource"]["issue"][0]["diagnostics"].as_str().unwrap();
                        assert!(said.contains(&left_out.join(", ")), "{said}");
                        outcomes += 1;
                    } else {
                        entries.push(e.clone());
                    }
                }
            }
        }
    }
    server.kill().await.unwrap();
    assert_eq!(served, expected);
    // Every archived record of a mapped table is a resource (death has no FHIR mapping).
    let mapped_rows: u64 = expected
        .iter()
        .filter(|((_, t), _)| fhir.contains_key(t.as_str()))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(entries.len() as u64, mapped_rows);
    let told: std::collections::BTreeSet<&String> = expected
        .keys()
        .filter(|(_, t)| !fhir.contains_key(t))
        .map(|(p, _)| p)
        .collect();
    assert!(expected.keys().any(|(_, t)| t == "death"));
    assert_eq!(outcomes, told.len());
    let counts = crate::api::validate_fhir(&serde_json::json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": entries.iter().map(|e| serde_json::json!({ "resource": e["resource"] })).collect::<Vec<_>>(),
    }));
    assert!(counts.len() >= 6, "{counts:?}");
}

/// `strata init --output` drafts the policy beside the config: the patients table with its
/// birth and death dates, the patients and the tables without patients pinned operational,
/// ongoing problems, medications, allergies and care plans current, nothing destroyed. The
/// pair passes `policy check` and `plan` as written, without a warning; a policy already there
/// is never overwritten.
#[test]
fn init_drafts_a_policy_that_plans_as_written() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/synthea-nj27")
        .canonicalize()
        .unwrap();
    let dir = TestDir::new();
    let strata = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(args)
            .current_dir(dir.path())
            .env("STRATA_KEK", strata_archive::Kek::generate_hex())
            .output()
            .unwrap()
    };
    let source = format!("csv://{}", data.display());
    let out = strata(&["init", "--source", &source, "--output", "strata.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let policy = std::fs::read_to_string(dir.path().join("policy.toml")).unwrap();
    let parsed: toml::Table = toml::from_str(&policy).unwrap();
    assert_eq!(parsed["patients"]["table"].as_str(), Some("patients"));
    assert_eq!(parsed["patients"]["birth_date"].as_str(), Some("BIRTHDATE"));
    assert_eq!(
        parsed["patients"]["deceased_date"].as_str(),
        Some("DEATHDATE")
    );
    for t in ["patients", "organizations", "providers", "payers"] {
        assert_eq!(
            parsed["tables"][t]["tier"].as_str(),
            Some("operational"),
            "{t}"
        );
    }
    for t in ["conditions", "medications", "allergies", "careplans"] {
        assert_eq!(
            parsed["tables"][t]["current_when"]["column"].as_str(),
            Some("STOP"),
            "{t}"
        );
    }
    assert!(parsed["defaults"].get("retention").is_none());
    for args in [&["policy", "check"][..], &["plan"]] {
        let out = strata(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {stderr}");
        assert!(!stderr.contains("warning"), "{args:?}: {stderr}");
    }
    std::fs::write(dir.path().join("policy.toml"), "# mine\n").unwrap();
    let out = strata(&["init", "--source", &source, "--output", "strata.toml"]);
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("policy.toml")).unwrap(),
        "# mine\n"
    );
}

/// Per patient and table, the Synthea records the policy of
/// [`synthea_as_init_drafted_it_serves_every_archived_record_as_fhir`] archives, computed from
/// the CSV files alone (the csv crate) with the patient and date columns `init` drafted: a
/// record is archived when its table is not pinned, it is not ongoing (conditions, medications
/// and allergies without a STOP), its day (UTC) is a plausible one on or before 2019-06-30, and
/// its patient's latest plausible day in any table is on or before 2022-06-30.
fn synthea_archived(
    data: &std::path::Path,
    drafted: &toml::Table,
) -> std::collections::BTreeMap<(String, String), u64> {
    use chrono::NaiveDate;
    let day = |s: &str| NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok();
    let (floor, as_of) = (
        NaiveDate::from_ymd_opt(1901, 1, 1).unwrap(),
        NaiveDate::from_ymd_opt(2024, 6, 30).unwrap(),
    );
    let plausible = |d: &Option<NaiveDate>| d.filter(|d| *d >= floor && *d <= as_of);
    // (table, patient, day, ongoing) of every record with a patient.
    let mut records = Vec::new();
    for (table, t) in drafted["tables"].as_table().unwrap() {
        let (Some(patient), Some(date)) = (
            t.get("patient_key").and_then(|v| v.as_str()),
            t.get("record_date").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        let mut reader = csv::Reader::from_path(data.join(format!("{table}.csv"))).unwrap();
        for row in reader.deserialize::<std::collections::HashMap<String, String>>() {
            let row = row.unwrap();
            let ongoing = ["conditions", "medications", "allergies"].contains(&table.as_str())
                && row["STOP"].is_empty();
            records.push((
                table.clone(),
                row[patient].clone(),
                day(&row[date]),
                ongoing,
            ));
        }
    }
    let mut last = std::collections::HashMap::<String, NaiveDate>::new();
    for (_, patient, d, _) in &records {
        if let Some(d) = plausible(d) {
            let l = last.entry(patient.clone()).or_insert(d);
            *l = (*l).max(d);
        }
    }
    let pinned = ["patients", "organizations", "providers", "payers"];
    let (archive_cut, inactive_cut) = (
        NaiveDate::from_ymd_opt(2019, 6, 30).unwrap(),
        NaiveDate::from_ymd_opt(2022, 6, 30).unwrap(),
    );
    let mut archived = std::collections::BTreeMap::new();
    for (table, patient, d, ongoing) in records {
        let old = plausible(&d).is_some_and(|d| d <= archive_cut);
        let inactive = last.get(&patient).is_none_or(|l| *l <= inactive_cut);
        if !pinned.contains(&table.as_str()) && !ongoing && old && inactive {
            *archived.entry((patient, table)).or_insert(0) += 1;
        }
    }
    archived
}
