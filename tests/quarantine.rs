//! Bad rows of every kind go to quarantine with their reason, every good row arrives, and the
//! run goes on: a SQLite legacy table (which enforces little) into a PostgreSQL table designed
//! beforehand with tighter types and constraints.

use crate::support::*;
use std::collections::BTreeMap;
use strata_ingest::{ColumnType, Db, Migration, Value};

const GOOD_ROWS: i64 = 500;

/// A SQLite legacy database in `dir` made by `sql`; returns its URL.
async fn legacy_sqlite(dir: &std::path::Path, sql: &str) -> String {
    let source = format!("sqlite://{}", dir.join("legacy.db").display());
    let db = Db::connect(&format!("{source}?mode=rwc"), false)
        .await
        .unwrap();
    db.execute(sql).await.unwrap();
    db.close().await;
    source
}

/// Writes `strata.toml`, a policy pinning `tables` to the operational tier, and a KEK.
fn write_files(dir: &std::path::Path, config: &str, tables: &[&str]) {
    std::fs::write(dir.join("strata.toml"), config).unwrap();
    let mut policy =
        "version = \"q\"\n[defaults]\narchive_after = \"1y\"\npatient_inactive_after = \"1y\"\n"
            .to_string();
    for t in tables {
        policy.push_str(&format!("[tables.{t}]\ntier = \"operational\"\n"));
    }
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    std::fs::write(dir.join("kek.hex"), strata_archive::Kek::generate_hex()).unwrap();
}

/// (id, what is wrong with it, the reason expected in quarantine, the column named)
const PLANTED: [(i64, &str, &str, &str); 9] = [
    (1001, "a date that is not a date", "not a valid timestamp", "taken_at"),
    (1002, "text that is not UTF-8", "invalid UTF-8 text", "note"),
    (1003, "a code longer than varchar(8)", "would be truncated: longer than the column allows", "code"),
    (1004, "an amount too large for numeric(6,2)", "numeric value too large for the column", "amount"),
    (1005, "an amount with more decimals than numeric(6,2) keeps", "would be rounded: more decimal places than the column keeps", "amount"),
    (1006, "no patient for a NOT NULL column", "NULL in a NOT NULL column", "patient_id"),
    (7, "a second row with key 7", "duplicate primary key", "id"),
    (1008, "an integer too large for the integer column", "integer out of range for the column", "visits"),
    (1009, "a negative amount, refused by a CHECK constraint", "rejected by the operational database: new row for relation \"results\" violates check constraint \"results_amount_check\"", "id"),
];

#[tokio::test]
async fn every_kind_of_bad_row_is_quarantined_with_its_reason_and_good_rows_arrive() {
    let dir = TestDir::new();
    let source = format!("sqlite://{}", dir.path().join("legacy.db").display());
    let db = Db::connect(&format!("{source}?mode=rwc"), false)
        .await
        .unwrap();
    db.execute(
        "CREATE TABLE results (id INTEGER, patient_id INTEGER, code VARCHAR(8), amount NUMERIC(6,2), \
         visits INTEGER, taken_at TIMESTAMP, note TEXT)",
    )
    .await
    .unwrap();
    let mut sql = String::new();
    for id in 1..=GOOD_ROWS {
        sql.push_str(&format!(
            "INSERT INTO results VALUES ({id}, {}, 'C{:03}', {}.25, {}, '2015-03-0{} 10:00:00', 'fine');",
            1 + id % 40,
            id % 1000,
            id % 9000,
            id % 50,
            1 + id % 9
        ));
    }
    sql.push_str(
        "INSERT INTO results VALUES (1001, 1, 'C1', 1.00, 1, 'someday', 'x');
         INSERT INTO results VALUES (1002, 1, 'C1', 1.00, 1, '2015-01-01', CAST(X'C3FF41' AS TEXT));
         INSERT INTO results VALUES (1003, 1, 'TOO-LONG-CODE', 1.00, 1, '2015-01-01', 'x');
         INSERT INTO results VALUES (1004, 1, 'C1', 12345.5, 1, '2015-01-01', 'x');
         INSERT INTO results VALUES (1005, 1, 'C1', 1.005, 1, '2015-01-01', 'x');
         INSERT INTO results VALUES (1006, NULL, 'C1', 1.00, 1, '2015-01-01', 'x');
         INSERT INTO results VALUES (7, 2, 'C7', 7.00, 1, '2015-01-01', 'again');
         INSERT INTO results VALUES (1008, 1, 'C1', 1.00, 9999999999, '2015-01-01', 'x');
         INSERT INTO results VALUES (1009, 1, 'C1', -5.00, 1, '2015-01-01', 'x');",
    );
    db.execute(&sql).await.unwrap();
    // A table with a text key, read in rowid ranges of 100 rows: its two rows with the same key
    // are loaded by different ranges; the second moves to quarantine before the key is built.
    db.execute(
        "CREATE TABLE codes (code TEXT, label TEXT, loinc TEXT); \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300) \
         INSERT INTO codes SELECT 'K' || i, 'label ' || i, CASE WHEN i = 9 THEN '2345-6' ELSE '2345-7' END FROM n; \
         INSERT INTO codes VALUES ('K5', 'again', '718-7');",
    )
    .await
    .unwrap();
    db.close().await;

    let operational = create_pg_database("strata_quarantine_op").await;
    let target = Db::connect(&operational, false).await.unwrap();
    target
        .execute(
            "CREATE TABLE results (id bigint PRIMARY KEY, patient_id bigint NOT NULL, code varchar(8), \
             amount numeric(6,2) CHECK (amount >= 0), visits integer, taken_at timestamp, note text)",
        )
        .await
        .unwrap();
    write_files(
        dir.path(),
        &format!(
            "{}[run]\nrows_per_range = 100\n[tables.codes]\nprimary_key = [\"code\"]\n[tables.results]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"taken_at\"\n",
            run_config(&source, &operational)
        ),
        &["results", "codes"],
    );

    let config = load_config(&dir.path().join("strata.toml"));
    let mut migration = Migration::prepare(config, as_of()).await.unwrap();

    // Before the run, `check` counts in the data what the designed table would refuse, and
    // `profile` describes the columns.
    let findings: Vec<String> = migration
        .check()
        .await
        .unwrap()
        .iter()
        .map(|f| f.to_line())
        .collect();
    for expected in [
        "warning results.code: would be truncated: longer than the column allows: these rows will be quarantined (1 rows)",
        "warning results.amount: numeric value too large for the column: these rows will be quarantined (1 rows)",
        "warning results.patient_id: NULL in a NOT NULL column: these rows will be quarantined (1 rows)",
        "warning results.taken_at: not a valid timestamp: these rows will be quarantined (1 rows)",
        "info    codes: no operational table yet: it will be created from the source's columns (types mapped to the target engine's)",
    ] {
        assert!(findings.iter().any(|f| f == expected), "{expected}\n{findings:#?}");
    }
    let profiles = migration.profile().await.unwrap();
    let codes = profiles.iter().find(|p| p.table == "codes").unwrap();
    assert_eq!((codes.rows, codes.duplicate_keys), (301, 1));
    let loinc = codes.columns.iter().find(|c| c.column == "loinc").unwrap();
    assert_eq!(loinc.invalid_codes, Some(("LOINC".into(), 1)));
    assert_eq!(loinc.distinct, 3);
    let results = profiles.iter().find(|p| p.table == "results").unwrap();
    let column = |name: &str| results.columns.iter().find(|c| c.column == name).unwrap();
    assert_eq!(column("patient_id").nulls, 1);
    assert_eq!(column("taken_at").unreadable, 1);
    assert_eq!(column("visits").max.as_deref(), Some("9999999999"));
    assert_eq!(results.duplicate_keys, 1);

    // The plan routes and checks rows as the run will: it counts every quarantine the run
    // makes, but one: a CHECK constraint of the table designed beforehand is the database's
    // to apply, known only by loading the row. (Per-rule and byte counts are not compared:
    // a run counts a key repeated across ranges there, as it was loaded before it moved.)
    let (plan, _) = migration.plan().await.unwrap();

    let report = migration.run(&mut |_| {}).await.unwrap();
    let counts = |t: &strata_ingest::TableReport| {
        [
            t.source_rows,
            t.operational_rows,
            t.archive_rows,
            t.purged_rows,
            t.quarantined_rows,
            t.held_rows,
            t.flagged_rows,
        ]
    };
    assert_eq!(counts(&plan.tables[0]), counts(&report.tables[0]), "codes");
    let mut refused_by_the_database = plan.tables[1].clone();
    refused_by_the_database.operational_rows -= 1;
    refused_by_the_database.quarantined_rows += 1;
    assert_eq!(
        counts(&refused_by_the_database),
        counts(&report.tables[1]),
        "results: plan = run, but for the row the CHECK constraint refuses"
    );
    let codes = &report.tables[0];
    assert_eq!(
        (
            codes.source_rows,
            codes.operational_rows,
            codes.quarantined_rows
        ),
        (301, 300, 1)
    );
    let moved = target
        .fetch_all(
            "SELECT row_key, reason, CAST(row_data AS json)->>'label' FROM _strata_quarantine WHERE table_name = 'codes'".into(),
            vec![ColumnType::Text; 3],
        )
        .await
        .unwrap();
    // One copy stays (whichever range loaded first), the other waits in quarantine for review.
    assert_eq!(moved.len(), 1);
    assert_eq!(moved[0][0], Value::Text("code=K5".into()));
    assert_eq!(
        moved[0][1],
        Value::Text("duplicate primary key (loaded by another range)".into())
    );
    let kept = target
        .fetch_all(
            "SELECT label FROM codes WHERE code = 'K5'".into(),
            vec![ColumnType::Text],
        )
        .await
        .unwrap();
    let mut labels = vec![
        moved[0][2].as_key_text().unwrap(),
        kept[0][0].as_key_text().unwrap(),
    ];
    labels.sort();
    assert_eq!(labels, ["again", "label 5"]);
    let table = &report.tables[1];
    assert_eq!(table.source_rows, GOOD_ROWS as u64 + PLANTED.len() as u64);
    assert_eq!(table.quarantined_rows, PLANTED.len() as u64);
    assert_eq!(table.operational_rows, GOOD_ROWS as u64);

    let quarantined: BTreeMap<String, (String, String)> = target
        .fetch_all(
            "SELECT row_key, reason, column_name FROM _strata_quarantine WHERE table_name = 'results'".into(),
            vec![ColumnType::Text; 3],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let t = |v: &Value| v.as_key_text().unwrap();
            (t(&r[0]), (t(&r[1]), t(&r[2])))
        })
        .collect();
    for (id, what, reason, column) in PLANTED {
        let (got_reason, got_column) = quarantined
            .get(&format!("id={id}"))
            .unwrap_or_else(|| panic!("{what} (id {id}) is not in quarantine: {quarantined:?}"));
        assert_eq!(got_reason, reason, "{what}");
        if !reason.starts_with("rejected by") {
            assert_eq!(got_column, column, "{what}");
        }
    }
    // Every good row arrived, with its values (the first row with key 7 among them).
    let rows = target
        .fetch_all(
            "SELECT COUNT(*), SUM(id)::bigint, MIN(note), MAX(amount)::text FROM results".into(),
            vec![
                ColumnType::Int,
                ColumnType::Int,
                ColumnType::Text,
                ColumnType::Text,
            ],
        )
        .await
        .unwrap();
    assert_eq!(rows[0][0], Value::Int(GOOD_ROWS));
    assert_eq!(rows[0][1], Value::Int(GOOD_ROWS * (GOOD_ROWS + 1) / 2));
    assert_eq!(rows[0][2], Value::Text("fine".into()));
    assert_eq!(rows[0][3], Value::Text("500.25".into()));
    // No value of a quarantined row reached the logs' side of things: the quarantine keeps
    // them for review (the UTF-8 row's bytes as the source held them).
    let kept = target
        .fetch_all(
            "SELECT row_data FROM _strata_quarantine WHERE row_key = 'id=1003'".into(),
            vec![ColumnType::Text],
        )
        .await
        .unwrap();
    assert!(kept[0][0].as_key_text().unwrap().contains("TOO-LONG-CODE"));
    // verify proves the run: the row the CHECK constraint refused is in quarantine, and the
    // key loaded twice holds one of its source copies, whichever range loaded first.
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");
    target
        .execute("UPDATE codes SET label = 'neither copy' WHERE code = 'K5'")
        .await
        .unwrap();
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("operational: changed code=K5"), "{out}");
    target.close().await;
}

#[tokio::test]
async fn declared_mappings_rename_map_values_default_nulls_parse_local_dates_convert_units_and_compute(
) {
    let dir = TestDir::new();
    let source = legacy_sqlite(
        dir.path(),
        "CREATE TABLE visits (id INTEGER PRIMARY KEY, pat INTEGER, st TEXT, seen TIMESTAMP, ward TEXT);
         INSERT INTO visits VALUES (1, 10, 'A', '31/01/2015 08:30', 'icu');
         INSERT INTO visits VALUES (2, 11, 'I', '01/02/2015 17:05', NULL);
         INSERT INTO visits VALUES (3, 12, 'X', '2015-02-03', 'icu');
         CREATE TABLE labs (id INTEGER PRIMARY KEY, pat INTEGER, loinc TEXT, val REAL, unit TEXT);
         INSERT INTO labs VALUES (1, 10, '2345-7', 100.0, 'mg/dL');
         INSERT INTO labs VALUES (2, 10, '718-7', 13.5, 'g/dL');
         INSERT INTO labs VALUES (3, 11, '2345-7', 6.1, 'mmol/L');
         INSERT INTO labs VALUES (4, 11, '1234-5', 42.0, 'mg/dL');",
    )
    .await;
    let operational = create_pg_database("strata_mapping_op").await;
    write_files(
        dir.path(),
        &format!(
            r#"{}
[tables.visits]
primary_key = ["id"]
patient_key = "pat"
record_date = "seen"
[tables.visits.columns.st]
rename = "status"
values = {{ A = "active", I = "inactive" }}
[tables.visits.columns.seen]
rename = "seen_at"
date_format = "%d/%m/%Y %H:%M"
[tables.visits.columns.ward]
default = "general"
type = "varchar(10)"
[tables.labs]
primary_key = ["id"]
patient_key = "pat"
[tables.labs.columns.val]
convert_units = {{ unit_column = "unit", code_column = "loinc", to = "SI" }}
[tables.labs.computed.tag]
expr = "loinc || '@' || pat"
"#,
            run_config(&source, &operational)
        ),
        &["visits", "labs"],
    );
    let config = load_config(&dir.path().join("strata.toml"));
    let report = Migration::prepare(config, as_of())
        .await
        .unwrap()
        .run(&mut |_| {})
        .await
        .unwrap();
    let visits = report.tables.iter().find(|t| t.table == "visits").unwrap();
    assert_eq!((visits.operational_rows, visits.quarantined_rows), (2, 1));
    let target = Db::connect(&operational, false).await.unwrap();
    let rows = target
        .fetch_all(
            "SELECT id, status, seen_at::text, ward FROM visits ORDER BY id".into(),
            vec![
                ColumnType::Int,
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Text,
            ],
        )
        .await
        .unwrap();
    let t = |s: &str| Value::Text(s.into());
    assert_eq!(
        rows,
        [
            vec![
                Value::Int(1),
                t("active"),
                t("2015-01-31 08:30:00"),
                t("icu")
            ],
            vec![
                Value::Int(2),
                t("inactive"),
                t("2015-02-01 17:05:00"),
                t("general")
            ],
        ]
    );
    let q = target
        .fetch_all(
            "SELECT row_key, column_name, reason FROM _strata_quarantine".into(),
            vec![ColumnType::Text; 3],
        )
        .await
        .unwrap();
    assert_eq!(
        q,
        [vec![
            t("id=3"),
            t("seen"),
            t("does not match the column's date format")
        ]]
    );
    // The cast column has its declared type.
    let ward = target
        .fetch_all(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'visits'::regclass AND attname = 'ward'".into(),
            vec![ColumnType::Text],
        )
        .await
        .unwrap();
    assert_eq!(ward[0][0], t("character varying(10)"));
    // Lab values in SI units where Strata knows the analyte, and a computed column.
    let labs = target
        .fetch_all(
            "SELECT val::text, unit, tag FROM labs ORDER BY id".into(),
            vec![ColumnType::Text; 3],
        )
        .await
        .unwrap();
    assert_eq!(
        labs,
        [
            vec![t("5.55"), t("mmol/L"), t("2345-7@10")],
            vec![t("135"), t("g/L"), t("718-7@10")],
            vec![t("6.1"), t("mmol/L"), t("2345-7@11")],
            vec![t("42"), t("mg/dL"), t("1234-5@11")],
        ]
    );
    target.close().await;
}

#[tokio::test]
async fn a_sqlite_target_quarantines_a_key_loaded_twice_by_different_ranges() {
    let dir = TestDir::new();
    let source = legacy_sqlite(
        dir.path(),
        "CREATE TABLE codes (code TEXT, label TEXT); \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300) \
         INSERT INTO codes SELECT 'K' || i, 'label ' || i FROM n; \
         INSERT INTO codes VALUES ('K5', 'again');",
    )
    .await;
    let operational = format!("sqlite://{}", dir.path().join("operational.db").display());
    write_files(
        dir.path(),
        &format!(
            "{}[run]\nrows_per_range = 100\n[tables.codes]\nprimary_key = [\"code\"]\n",
            run_config(&source, &operational)
        ),
        &["codes"],
    );
    let report = Migration::prepare(load_config(&dir.path().join("strata.toml")), as_of())
        .await
        .unwrap()
        .run(&mut |_| {})
        .await
        .unwrap();
    let codes = &report.tables[0];
    assert_eq!(
        (
            codes.source_rows,
            codes.operational_rows,
            codes.quarantined_rows
        ),
        (301, 300, 1)
    );
    let target = Db::connect(&operational, false).await.unwrap();
    let q = target
        .fetch_all(
            "SELECT row_key, reason FROM _strata_quarantine".into(),
            vec![ColumnType::Text; 2],
        )
        .await
        .unwrap();
    assert_eq!(
        q,
        [vec![
            Value::Text("code=K5".into()),
            Value::Text(
                "rejected by the operational database: UNIQUE constraint failed: codes.code".into()
            )
        ]]
    );
    target.close().await;
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");
}

/// `strata profile` judges dates against the policy's `as_of` (a research database shifted into
/// the 22nd century is not all "odd dates"), counts distinct values exactly up to
/// `EXACT_DISTINCT` and never more than there are values, and marks an estimate as one.
#[tokio::test]
async fn profile_judges_dates_by_the_policys_as_of_and_counts_distinct_values_honestly() {
    let dir = TestDir::new();
    let source = legacy_sqlite(
        dir.path(),
        "CREATE TABLE visits (id INTEGER PRIMARY KEY, seen DATE, ward TEXT); \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 12000) \
         INSERT INTO visits SELECT i, date('2187-01-01', '+' || (i % 700) || ' days'), 'W' || (i % 2694) FROM n; \
         INSERT INTO visits VALUES (20001, '1850-01-01', NULL), (20002, '2190-06-01', NULL);",
    )
    .await;
    let operational = create_pg_database("strata_profile_op").await;
    write_run_files(
        dir.path(),
        &format!(
            "{}[tables.visits]\nprimary_key = [\"id\"]\nrecord_date = \"seen\"\n",
            run_config(&source, &operational)
        ),
        "version = \"p\"\nas_of = \"2189-12-31\"\n[defaults]\narchive_after = \"1y\"\npatient_inactive_after = \"1y\"\n[tables.visits]\ntier = \"operational\"\n",
    );
    let config = load_config(&dir.path().join("strata.toml"));
    let migration = Migration::prepare(config, as_of()).await.unwrap();
    let profiles = migration.profile().await.unwrap();
    let column = |name: &str| {
        profiles[0]
            .columns
            .iter()
            .find(|c| c.column == name)
            .unwrap()
            .clone()
    };
    // Only the placeholder before 1900 and the date after the policy's as_of are odd.
    assert_eq!(column("seen").suspicious_dates, 2);
    // 2,694 wards: counted exactly (an estimate said 2,698 of 2,694 rows once).
    let ward = column("ward");
    assert_eq!((ward.distinct, ward.distinct_estimated), (2694, false));
    // 12,002 ids: more than counted exactly; an estimate, never more than the values.
    let id = column("id");
    assert!(id.distinct_estimated);
    assert!(
        id.distinct <= 12_002 && id.distinct > 11_500,
        "{}",
        id.distinct
    );
    assert!(profiles[0].to_text().contains(&format!("≈{}", id.distinct)));
}

/// Quarantined rows are logged once per table, column and reason with their count, not a line
/// per row (the rows, keys and values are in the quarantine table, never in the log).
#[tokio::test]
async fn quarantined_rows_are_summarised_in_the_log_one_line_per_reason() {
    let dir = TestDir::new();
    let source = legacy_sqlite(
        dir.path(),
        "CREATE TABLE visits (id INTEGER PRIMARY KEY, seen TIMESTAMP); \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) \
         INSERT INTO visits SELECT i, CASE WHEN i % 3 = 0 THEN 'soon-ish ' || i ELSE '2015-03-01 10:00:00' END FROM n;",
    )
    .await;
    let operational = format!("sqlite://{}", dir.path().join("operational.db").display());
    write_files(
        dir.path(),
        &format!(
            "{}[tables.visits]\nprimary_key = [\"id\"]\nrecord_date = \"seen\"\n",
            run_config(&source, &operational)
        ),
        &["visits"],
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["migrate", "--config"])
        .arg(dir.path().join("strata.toml"))
        .env("STRATA_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("quarantined (see"))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("\"rows\":33"), "{}", lines[0]);
    assert!(lines[0].contains("not a valid timestamp"), "{}", lines[0]);
    // No row's key or value reaches the log.
    assert!(
        !stderr.contains("id=3") && !stderr.contains("soon-ish"),
        "{stderr}"
    );
}

/// An error a trigger or function of the database raises carries the application's text,
/// which may hold any value: Strata shows its code and table only. PostgreSQL's own data
/// exceptions are shown without the values they quote.
#[tokio::test]
async fn database_errors_never_carry_the_values_they_name() {
    let url = create_pg_database("strata_raise_text").await;
    let db = Db::connect(&url, false).await.unwrap();
    db.execute(
        "CREATE TABLE patients (id bigint PRIMARY KEY, mrn text);
         CREATE FUNCTION refuse() RETURNS trigger AS $$
         BEGIN RAISE EXCEPTION 'patient % (MRN %) is deceased', NEW.id, NEW.mrn; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER refuse BEFORE INSERT ON patients FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .await
    .unwrap();
    let err = db
        .execute("INSERT INTO patients VALUES (4411, 'MRN-4411-SMITH')")
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains("MRN-4411") && !err.contains("4411"), "{err}");
    assert!(
        err.contains("trigger or function") && err.contains("P0001"),
        "{err}"
    );
    let err = db
        .execute("SELECT CAST('MRN-4411-SMITH' AS integer)")
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.contains("MRN-4411"), "{err}");
    assert!(
        err.contains("invalid input syntax for type integer"),
        "{err}"
    );
    db.close().await;
}
