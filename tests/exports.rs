//! Researchers' exports cannot leak: allow-list profiles over column classes, the scanner that
//! fails a job carrying identifiers, the built-in HIPAA Safe Harbor and limited data set
//! profiles, keyed pseudonyms per study, and jobs that survive a restart and expire. Every
//! rule is tested with identifiers planted in the data.

use super::*;
use crate::api::{
    api_config, call, ended_export, finished_export, fixture, fixture_with, make_idp, Idp,
};
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::DataType;
use axum::http::Method;
use serde_json::{json, Value as Json};
use std::collections::{BTreeMap, BTreeSet};
use strata_archive_api::{AppState, Role};
use strata_deidentify::PseudonymKey;
use strata_ingest::ColumnType;

/// The fixture's site pseudonym key.
fn site_key(f: &crate::api::Fixture) -> PseudonymKey {
    let hex_key = std::fs::read_to_string(f.dir.path().join("pseudonym.key")).unwrap();
    PseudonymKey::new(&hex::decode(hex_key.trim()).unwrap())
}

/// Downloads an export's file.
async fn download(app: &axum::Router, token: &str, id: &str, name: &str) -> Vec<u8> {
    let (status, _, bytes) = call(
        app,
        Method::GET,
        &format!("/v1/exports/{id}/files/{name}"),
        Some(token),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{name}");
    bytes
}

/// The rows of an exported Parquet file.
fn parquet_rows(bytes: Vec<u8>) -> Vec<RecordBatch> {
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(
        bytes,
    ))
    .unwrap()
    .build()
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Every value of a batch as text (typed dates as their text), by column.
fn texts(batches: &[RecordBatch]) -> BTreeMap<String, Vec<Option<String>>> {
    let mut out: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for b in batches {
        for (f, c) in b.schema().fields().iter().zip(b.columns()) {
            let text = arrow::compute::cast(c, &DataType::Utf8).unwrap();
            out.entry(f.name().clone()).or_default().extend(
                text.as_string::<i32>()
                    .iter()
                    .map(|v| v.map(str::to_string)),
            );
        }
    }
    out
}

/// The export's column names.
fn names(batches: &[RecordBatch]) -> Vec<String> {
    batches[0]
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// An API over a hand-made SQLite source (`sql`) whose tables (`tables`: strata.toml
/// sections) are all pinned to the archive and migrated.
struct Source {
    dir: TestDir,
    app: axum::Router,
    state: AppState,
    idp: Idp,
}

async fn archived_source(sql: &str, tables: &str, patients: Option<&str>) -> Source {
    let dir = TestDir::new();
    let source = format!("sqlite://{}", dir.path().join("legacy.db").display());
    let db = Db::connect(&format!("{source}?mode=rwc"), false)
        .await
        .unwrap();
    db.execute(sql).await.unwrap();
    db.close().await;
    let config = format!("{}{tables}", run_config(&source, "sqlite://operational.db"));
    let mut policy = format!(
        "version = \"exports-test\"\nas_of = \"{}\"\n[defaults]\narchive_after = \"1y\"\npatient_inactive_after = \"1y\"\n",
        as_of()
    );
    if let Some(p) = patients {
        policy.push_str(p);
    }
    let parsed: toml::Table = toml::from_str(&config).unwrap();
    for table in parsed["tables"].as_table().unwrap().keys() {
        policy.push_str(&format!("[tables.{table}]\ntier = \"archive\"\n"));
    }
    write_run_files(dir.path(), &config, &policy);
    std::fs::write(
        dir.path().join("audit.key"),
        strata_archive::Kek::generate_hex(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pseudonym.key"),
        strata_archive::Kek::generate_hex(),
    )
    .unwrap();
    migrate(&dir.path().join("strata.toml")).await;
    let config = load_config(&dir.path().join("strata.toml"));
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let control = strata_control::Control::open(&config.control_url().unwrap())
        .await
        .unwrap();
    let idp = make_idp(dir.path());
    let policy = strata_ingest::read_policy(&config).unwrap();
    let state = AppState::new(
        archive,
        control,
        &api_config(
            "[exports.profiles.notes]\nbased_on = \"safe_harbor\"\nclasses = { free_text = \"keep\" }",
        ),
        dir.path(),
        config.classification(policy.patients.as_ref()).unwrap(),
    )
    .unwrap();
    Source {
        app: strata_archive_api::router(state.clone()),
        dir,
        state,
        idp,
    }
}

/// The leak found on an OMOP-style and an ICU-style schema: a researcher's export carried the
/// patient key in clear, every record key and full dates next to the pseudonym. Under
/// `safe_harbor` none of them leaves: no value equals a patient or record key, no column is a
/// date or timestamp, no text is a full date, and what nobody classified is gone.
#[tokio::test]
async fn the_patient_key_record_keys_and_full_dates_of_omop_and_icu_schemas_never_leave() {
    let mut omop = String::from(
        "CREATE TABLE person (person_id INTEGER PRIMARY KEY, gender_concept_id INTEGER, year_of_birth INTEGER, birth_datetime TIMESTAMP, person_source_value TEXT);
         CREATE TABLE condition_occurrence (condition_occurrence_id INTEGER PRIMARY KEY, person_id INTEGER, condition_concept_id INTEGER, condition_start_date DATE, condition_start_datetime TIMESTAMP, condition_end_date DATE, condition_source_value TEXT, visit_occurrence_id INTEGER);",
    );
    let mut icu = String::from(
        "CREATE TABLE patients (row_id INTEGER PRIMARY KEY, subject_id INTEGER, gender TEXT, dob TIMESTAMP);
         CREATE TABLE admissions (row_id INTEGER PRIMARY KEY, subject_id INTEGER, hadm_id INTEGER, admittime TIMESTAMP, dischtime TIMESTAMP, admission_type TEXT, diagnosis TEXT);",
    );
    for p in 0..30 {
        let person = 7001 + p;
        omop.push_str(&format!(
            "INSERT INTO person VALUES ({person}, 8532, 1969, '1969-12-12 00:00:00', 'P{person}');"
        ));
        icu.push_str(&format!(
            "INSERT INTO patients VALUES ({}, {person}, 'F', '2089-03-01 00:00:00');",
            3001 + p
        ));
        for v in 0..5 {
            let record = 90_000 + p * 10 + v;
            omop.push_str(&format!(
                "INSERT INTO condition_occurrence VALUES ({record}, {person}, 201826, '2012-0{m}-12', '2012-0{m}-12 08:30:00', '2012-0{m}-20', 'E11.9', {});",
                60_000 + record,
                m = 1 + v
            ));
            icu.push_str(&format!(
                "INSERT INTO admissions VALUES ({record}, {person}, {}, '2164-10-2{v} 21:09:00', '2164-10-28 12:00:00', 'EMERGENCY', 'SEPSIS');",
                150_000 + record
            ));
        }
    }
    let omop_tables = r#"
        [tables.person]
        primary_key = ["person_id"]
        patient_key = "person_id"
        record_date = "birth_datetime"
        columns.gender_concept_id.class = "code"
        [tables.condition_occurrence]
        primary_key = ["condition_occurrence_id"]
        patient_key = "person_id"
        record_date = "condition_start_date"
        columns.condition_concept_id.class = "code"
        columns.condition_source_value.class = "code"
        columns.visit_occurrence_id = { class = "record_key" }
    "#;
    let icu_tables = r#"
        [tables.patients]
        primary_key = ["row_id"]
        patient_key = "subject_id"
        record_date = "dob"
        columns.gender.class = "sex"
        [tables.admissions]
        primary_key = ["row_id"]
        patient_key = "subject_id"
        record_date = "admittime"
        columns.hadm_id = { class = "record_key" }
        columns.admission_type.class = "category"
        columns.diagnosis.class = "category"
    "#;
    let date = regex::Regex::new(r"\d{4}-\d{2}-\d{2}").unwrap();
    for (sql, tables, table, keys) in [
        (
            omop,
            omop_tables,
            "condition_occurrence",
            [
                "person_id",
                "condition_occurrence_id",
                "visit_occurrence_id",
            ],
        ),
        (
            icu,
            icu_tables,
            "admissions",
            ["subject_id", "row_id", "hadm_id"],
        ),
    ] {
        let s = archived_source(&sql, tables, None).await;
        let researcher = s.idp.user("res-1", Role::Researcher, &[]);
        let (record, _) = ended_export(
            &s.app,
            &researcher,
            json!({ "profile": "safe_harbor", "tables": [table] }),
        )
        .await;
        assert_eq!(record["status"], "done", "{table}: {record}");
        let id = record["export_id"].as_str().unwrap();
        let batches =
            parquet_rows(download(&s.app, &researcher, id, &format!("{table}.parquet")).await);
        // Every key of the source, in clear.
        let db = Db::connect(
            &format!("sqlite://{}", s.dir.path().join("legacy.db").display()),
            true,
        )
        .await
        .unwrap();
        let mut clear = BTreeSet::new();
        for k in keys {
            for row in db
                .fetch_all(
                    format!("SELECT CAST({k} AS TEXT) FROM {table}"),
                    vec![ColumnType::Text],
                )
                .await
                .unwrap()
            {
                if let Value::Text(t) = &row[0] {
                    clear.insert(t.clone());
                }
            }
        }
        db.close().await;
        assert!(clear.len() > 100, "{table}: keys to look for");
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 150, "{table}: every archived record is exported");
        for field in batches[0].schema().fields() {
            assert!(
                !matches!(
                    field.data_type(),
                    DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
                ),
                "{table}: {} is a full date",
                field.name()
            );
        }
        for (column, values) in texts(&batches) {
            for v in values.iter().flatten() {
                assert!(!clear.contains(v), "{table}.{column}: a key in clear");
                assert!(!date.is_match(v), "{table}.{column}: a full date");
            }
        }
        let exported = names(&batches);
        assert_eq!(
            exported[..2],
            ["patient_pseudonym", "record_year"],
            "{table}"
        );
        for gone in [
            "condition_start_datetime",
            "condition_end_date",
            "dischtime",
        ] {
            assert!(!exported.iter().any(|n| n == gone), "{table}: {gone} left");
        }
        let classes: Vec<&str> = record["manifest"]["files"][0]["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["class"].as_str().unwrap())
            .collect();
        assert_eq!(
            classes.len(),
            exported.len(),
            "{table}: the manifest gives every column's class"
        );
        let years = texts(&batches)["record_year"].clone();
        assert!(
            years.iter().flatten().all(|y| y == "2012" || y == "2164"),
            "{table}: {years:?}"
        );
    }
}

/// One identifier of every kind planted: each is dropped by the `safe_harbor` profile (names,
/// geography, dates, ages, contact details, numbers of every kind, images, free text, a column
/// nobody classified) or, planted in a column the profile lets out, caught by the scanner,
/// which fails the job with a reason that names the column and the rule, leaves nothing in the
/// export location and records the failure in the audit log.
#[tokio::test]
async fn every_planted_identifier_is_dropped_by_the_profile_or_fails_the_job() {
    let mut sql = String::from(
        "CREATE TABLE people (person_id INTEGER PRIMARY KEY, full_name TEXT, street TEXT, town TEXT, county TEXT, zip TEXT, phone TEXT, fax TEXT, email TEXT, ssn TEXT, mrn TEXT, plan_no TEXT, account_no TEXT, licence TEXT, vin TEXT, device_serial TEXT, homepage TEXT, last_ip TEXT, fingerprint TEXT, photo_ref TEXT, badge TEXT, nickname TEXT, sex TEXT, birth_date DATE, age INTEGER, state TEXT, registered_at TIMESTAMP, portrait BLOB);
         CREATE TABLE visits (visit_id INTEGER PRIMARY KEY, person_id INTEGER, visit_date DATE, code TEXT, label TEXT, note TEXT, ref_code TEXT, ref_visit TEXT, seen_on TEXT, contact TEXT, callback TEXT, mail TEXT, link TEXT, host TEXT, remark TEXT);",
    );
    for i in 0..40 {
        let old = i % 4 == 0;
        sql.push_str(&format!(
            "INSERT INTO people VALUES ({id}, 'Planted Name {i}', '{i} Planted Street', 'Plantedtown{i}', 'Planted County {i}', '{zip}', '201-555-{i:04}', '973-555-{i:04}', 'person{i}@planted.example', '123-45-{i:04}', 'MRN{i:07}', 'PLAN{i:06}', 'ACCT{i:06}', 'LIC{i:06}', 'VIN1HGCM82633A{i:05}', 'SER{i:08}', 'https://planted.example/{i}', '10.1.2.{i}', 'FP{i:08}', 'photos/p{i}.jpg', 'BADGE{i:05}', 'Nick{i}', '{sex}', '{birth}', {age}, 'NJ', '2015-03-04 10:00:00', X'FFD8FFE0{i:02X}');",
            id = 1000 + i,
            zip = if i % 3 == 0 { "03601" } else { "07302-1234" },
            sex = if i % 2 == 0 { "F" } else { "M" },
            birth = if old { "1930-01-01" } else { "1980-05-01" },
            age = if old { 96 } else { 46 },
        ));
    }
    for j in 0..200 {
        let person = 1000 + j % 40;
        let visit = 5000 + j;
        let one = |planted: &str| {
            if j == 17 {
                planted.to_string()
            } else {
                "ok".to_string()
            }
        };
        sql.push_str(&format!(
            "INSERT INTO visits VALUES ({visit}, {person}, '2018-0{m}-1{d}', 'E11.9', 'routine', 'Planted note {j}', '{person}', '{visit}', '{seen}', '{contact}', '{callback}', '{mail}', '{link}', '{host}', '{remark}');",
            m = 1 + j % 9,
            d = j % 9,
            seen = one("seen on 2019-03-04"),
            contact = one("SSN 123-45-6789"),
            callback = one("call back on 201-555-0143"),
            mail = one("write to x@planted.example"),
            link = one("see https://planted.example/p"),
            host = one("from 10.20.30.40"),
            remark = one("chart MR4471234 reviewed"),
        ));
    }
    let tables = r#"
        [tables.people]
        primary_key = ["person_id"]
        patient_key = "person_id"
        record_date = "registered_at"
        blobs = [{ column = "portrait", content_type = "image/jpeg" }]
        columns.full_name.class = "name"
        columns.street.class = "address"
        columns.town.class = "city"
        columns.county.class = "county"
        columns.zip.class = "zip"
        columns.phone.class = "phone"
        columns.fax.class = "fax"
        columns.email.class = "email"
        columns.ssn.class = "ssn"
        columns.mrn.class = "mrn"
        columns.plan_no.class = "health_plan"
        columns.account_no.class = "account"
        columns.licence.class = "license"
        columns.vin.class = "vehicle"
        columns.device_serial.class = "device"
        columns.homepage.class = "url"
        columns.last_ip.class = "ip"
        columns.fingerprint.class = "biometric"
        columns.photo_ref.class = "photo"
        columns.badge.class = "unique_id"
        columns.sex.class = "sex"
        columns.age.class = "age"
        columns.state.class = "state"
        [tables.visits]
        primary_key = ["visit_id"]
        patient_key = "person_id"
        record_date = "visit_date"
        columns.code.class = "code"
        columns.label.class = "category"
        columns.note.class = "free_text"
        columns.ref_code.class = "code"
        columns.ref_visit.class = "category"
        columns.seen_on.class = "category"
        columns.contact.class = "category"
        columns.callback.class = "category"
        columns.mail.class = "category"
        columns.link.class = "category"
        columns.host.class = "category"
        columns.remark.class = "free_text"
    "#;
    let s = archived_source(
        &sql,
        tables,
        Some("[patients]\ntable = \"people\"\nbirth_date = \"birth_date\"\n"),
    )
    .await;
    let researcher = s.idp.user("res-1", Role::Researcher, &[]);

    // The profile: every identifier class of the patients table is dropped or generalised.
    let (record, _) = finished_export(
        &s.app,
        &researcher,
        json!({ "profile": "safe_harbor", "tables": ["people"] }),
    )
    .await;
    let id = record["export_id"].as_str().unwrap();
    let batches = parquet_rows(download(&s.app, &researcher, id, "people.parquet").await);
    assert_eq!(
        names(&batches),
        [
            "patient_pseudonym",
            "record_year",
            "person_id",
            "zip",
            "sex",
            "birth_date_year",
            "age",
            "state",
            "registered_at_year"
        ]
    );
    let values = texts(&batches);
    // Pseudonyms are 32 hex digits; every other value is checked for what was planted.
    for c in ["patient_pseudonym", "person_id"] {
        assert!(values[c]
            .iter()
            .flatten()
            .all(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit())));
    }
    let all: Vec<&String> = values
        .iter()
        .filter(|(c, _)| !["patient_pseudonym", "person_id"].contains(&c.as_str()))
        .flat_map(|(_, v)| v.iter().flatten())
        .collect();
    for planted in [
        "Planted", "201-555", "973-555", "@", "MRN", "PLAN", "ACCT", "LIC", "VIN", "SER", "http",
        "10.1.2", "FP", "photos", "BADGE", "Nick", "1000", "1930", "96", "03601", "07302",
    ] {
        assert!(
            !all.iter().any(|v| v.contains(planted)),
            "{planted} left the archive"
        );
    }
    let column = |name: &str| {
        values[name]
            .iter()
            .flatten()
            .cloned()
            .collect::<BTreeSet<String>>()
    };
    assert_eq!(column("zip"), ["000", "073"].map(String::from).into());
    assert_eq!(
        column("birth_date_year"),
        ["1980", "90+"].map(String::from).into()
    );
    assert_eq!(column("age"), ["46", "90+"].map(String::from).into());
    assert_eq!(column("record_year"), ["2015"].map(String::from).into());
    assert_eq!(column("patient_pseudonym"), column("person_id"));
    assert_eq!(column("patient_pseudonym").len(), 40);

    // The profile refuses what it does not let out, and what has no class.
    for (body, why) in [
        (
            json!({ "profile": "safe_harbor", "tables": ["visits"], "columns": { "visits": ["note"] } }),
            "class free_text",
        ),
        (
            json!({ "profile": "safe_harbor", "tables": ["people"], "columns": { "people": ["nickname"] } }),
            "has no class",
        ),
        (
            json!({ "profile": "safe_harbor", "tables": ["people"], "columns": { "people": ["full_name"] } }),
            "class name",
        ),
    ] {
        let (status, _, bytes) = call(
            &s.app,
            Method::POST,
            "/v1/exports",
            Some(&researcher),
            &[],
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            String::from_utf8_lossy(&bytes).contains(why),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
    }

    // The scanner: one identifier planted per rule in a column the profile lets out.
    let exports_dir = s.dir.path().join("exports");
    for (column, profile, rule) in [
        (
            "ref_code",
            "safe_harbor",
            "equal to the row's own patient key",
        ),
        (
            "ref_visit",
            "safe_harbor",
            "equal to the row's own record key",
        ),
        ("seen_on", "safe_harbor", "dates more precise than a year"),
        ("contact", "safe_harbor", "social security numbers"),
        ("callback", "safe_harbor", "telephone numbers"),
        ("mail", "safe_harbor", "e-mail addresses"),
        ("link", "safe_harbor", "web addresses"),
        ("host", "safe_harbor", "IP addresses"),
        ("remark", "notes", "medical record numbers"),
    ] {
        let (record, _) = ended_export(
            &s.app,
            &researcher,
            json!({ "profile": profile, "tables": ["visits"], "columns": { "visits": [column] } }),
        )
        .await;
        assert_eq!(record["status"], "failed", "{column}: {record}");
        let error = record["error"].as_str().unwrap();
        assert!(
            error.contains(&format!("column {column}")) && error.contains(rule),
            "{column}: {error}"
        );
        for planted in [
            "6789",
            "0143",
            "planted.example",
            "10.20.30.40",
            "4471234",
            "2019-03-04",
        ] {
            assert!(
                !error.contains(planted),
                "{column}: the reason carries a value: {error}"
            );
        }
        let id = record["export_id"].as_str().unwrap();
        assert!(
            !exports_dir.join(id).exists()
                || std::fs::read_dir(exports_dir.join(id))
                    .unwrap()
                    .next()
                    .is_none(),
            "{column}: files were left"
        );
        let (status, _, _) = call(
            &s.app,
            Method::GET,
            &format!("/v1/exports/{id}/files/visits.parquet"),
            Some(&researcher),
            &[],
            None,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    // A clean column of the same table passes.
    finished_export(
        &s.app,
        &researcher,
        json!({ "profile": "safe_harbor", "tables": ["visits"], "columns": { "visits": ["code", "label"] } }),
    )
    .await;
    // Every failure is in the audit log with its reason.
    let failed = s
        .state
        .audit
        .list(&strata_control::AuditQuery {
            outcome: Some(strata_control::Outcome::Failed),
            ..Default::default()
        })
        .await
        .unwrap();
    let reasons: Vec<String> = failed
        .iter()
        .filter(|e| e.entry.action == "EXPORT parquet")
        .map(|e| {
            e.entry.detail["reason"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(reasons.len(), 9, "{reasons:#?}");
    assert!(reasons.iter().all(|r| r.contains("nothing was released")));
}

/// A clean `safe_harbor` export of the demo's archive has known contents: every archived record
/// of every table once, the columns each table's classes let out, and for sampled lab results
/// the archived code, value, unit and year under the patient's and the record's pseudonyms —
/// the same in a second export with the same key, others under another study's key.
#[tokio::test]
async fn a_safe_harbor_export_of_the_demo_has_known_contents() {
    let f = fixture("").await;
    let researcher = f.idp.user("res-1", Role::Researcher, &[]);
    let tables: Vec<String> = f.archive.catalog().tables.keys().cloned().collect();
    let (record, _) = finished_export(
        &f.app,
        &researcher,
        json!({ "profile": "safe_harbor", "tables": tables }),
    )
    .await;
    let id = record["export_id"].as_str().unwrap().to_string();
    let rows_per_table = f.archive.catalog().rows_per_table();
    let mut exported = BTreeMap::new();
    for file in record["manifest"]["files"].as_array().unwrap() {
        let table = file["table"].as_str().unwrap().to_string();
        let bytes = download(&f.app, &researcher, &id, file["file"].as_str().unwrap()).await;
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            file["sha256"].as_str().unwrap()
        );
        let batches = parquet_rows(bytes);
        let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
        assert_eq!(rows, rows_per_table[&table], "{table}");
        assert_eq!(file["rows"].as_u64(), Some(rows));
        exported.insert(table, batches);
    }
    assert_eq!(exported.len(), tables.len());
    assert_eq!(
        names(&exported["lab_results"]),
        [
            "patient_pseudonym",
            "record_year",
            "id",
            "encounter_id",
            "loinc_code",
            "test_name",
            "value_num",
            "unit",
            "observed_at_year",
            "status"
        ]
    );
    assert_eq!(
        names(&exported["clinical_notes"]),
        [
            "patient_pseudonym",
            "record_year",
            "id",
            "encounter_id",
            "note_type",
            "written_at_year"
        ],
        "notes' text and authors never leave"
    );
    assert!(!names(&exported["documents"])
        .iter()
        .any(|n| n.starts_with("content")));

    // Sampled lab results, as archived, under their pseudonyms.
    let key = site_key(&f).for_profile("safe_harbor");
    let labs = texts(&exported["lab_results"]);
    let by_id: BTreeMap<&str, usize> = labs["id"]
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_deref().unwrap(), i))
        .collect();
    let file = &f.archive.catalog().tables["lab_results"][0].files[0];
    let archived = &f.archive.read_file(file).await.unwrap()[0];
    let a = texts(std::slice::from_ref(archived));
    let mut sampled = 0;
    for row in (0..archived.num_rows()).step_by(7).take(25) {
        let lab_id = a["id"][row].as_deref().unwrap();
        let i = by_id[key.pseudonym("lab_results", lab_id).as_str()];
        let patient = a["_strata_patient"][row].as_deref().unwrap();
        assert_eq!(
            labs["patient_pseudonym"][i].as_deref(),
            Some(key.pseudonym("patient", patient).as_str())
        );
        for c in ["loinc_code", "value_num", "unit", "test_name", "status"] {
            assert_eq!(labs[c][i], a[c][row], "{c} of lab {lab_id}");
        }
        let year = a["_strata_record_date"][row]
            .as_deref()
            .map(|d| d[..4].to_string());
        assert_eq!(labs["record_year"][i], year);
        sampled += 1;
    }
    assert_eq!(sampled, 25);

    // The same key gives the same pseudonyms; a study's own key others.
    let patients = |b: &[RecordBatch]| {
        texts(b)["patient_pseudonym"]
            .iter()
            .flatten()
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    let again = |body: Json| {
        let (f, researcher) = (&f, &researcher);
        async move {
            let (record, _) = finished_export(&f.app, researcher, body).await;
            let id = record["export_id"].as_str().unwrap().to_string();
            parquet_rows(download(&f.app, researcher, &id, "lab_results.parquet").await)
        }
    };
    let first = patients(&exported["lab_results"]);
    assert_eq!(
        patients(&again(json!({ "profile": "safe_harbor", "tables": ["lab_results"] })).await),
        first
    );
    let study = patients(
        &again(
            json!({ "profile": "safe_harbor", "tables": ["lab_results"], "study": "cardio-2026" }),
        )
        .await,
    );
    assert_eq!(study.len(), first.len());
    assert!(
        study.is_disjoint(&first),
        "another study's pseudonyms cannot be linked"
    );
    // What a request may not ask for: rows chosen by a column that does not leave as it is,
    // day bounds where only years leave, a study not configured or closed to the researcher.
    for (body, want, why) in [
        (
            json!({ "profile": "safe_harbor", "tables": ["clinical_notes"], "codes": { "clinical_notes": { "body": ["x"] } } }),
            400,
            "as it is",
        ),
        (
            json!({ "profile": "safe_harbor", "tables": ["lab_results"], "codes": { "lab_results": { "id": ["1"] } } }),
            400,
            "as it is",
        ),
        (
            json!({ "profile": "safe_harbor", "tables": ["lab_results"], "from": "2015-03-04" }),
            400,
            "only years",
        ),
        (
            json!({ "profile": "safe_harbor", "tables": ["lab_results"], "study": "no-such-study" }),
            400,
            "no study",
        ),
        (
            json!({ "profile": "safe_harbor", "tables": ["lab_results"], "study": "closed-study" }),
            403,
            "",
        ),
    ] {
        let (status, _, bytes) = call(
            &f.app,
            Method::POST,
            "/v1/exports",
            Some(&researcher),
            &[],
            Some(body.clone()),
        )
        .await;
        assert_eq!(status.as_u16(), want, "{body}");
        assert!(
            String::from_utf8_lossy(&bytes).contains(why),
            "{body}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    finished_export(&f.app, &researcher, json!({ "profile": "safe_harbor", "tables": ["lab_results"], "from": "2015-01-01", "to": "2020-12-31" })).await;
    assert_eq!(study, texts(&again(json!({ "profile": "safe_harbor", "tables": ["lab_results"], "study": "cardio-2026" })).await)["patient_pseudonym"].iter().flatten().cloned().collect::<BTreeSet<_>>());
}

/// A limited data set needs a data use agreement, recorded in the audit log and the manifest;
/// its dates move by the same days for the same patient in every table and stay in full.
#[tokio::test]
async fn a_limited_data_set_shifts_each_patients_dates_alike_under_an_agreement() {
    let f = fixture("").await;
    let researcher = f.idp.user("res-1", Role::Researcher, &[]);
    let (status, _, body) = call(
        &f.app,
        Method::POST,
        "/v1/exports",
        Some(&researcher),
        &[],
        Some(json!({ "profile": "limited_data_set", "tables": ["lab_results"] })),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("data use agreement"));
    let (record, _) = finished_export(&f.app, &researcher, json!({
        "profile": "limited_data_set", "tables": ["lab_results", "diagnoses"], "data_use_agreement": "DUA-2026-017" })).await;
    assert_eq!(record["manifest"]["data_use_agreement"], "DUA-2026-017");
    let id = record["export_id"].as_str().unwrap();
    let key = site_key(&f).for_profile("limited_data_set");
    // Per patient pseudonym: the shift of every exported record date against its archived date.
    let mut shifts: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    for table in ["lab_results", "diagnoses"] {
        let exported =
            parquet_rows(download(&f.app, &researcher, id, &format!("{table}.parquet")).await);
        assert!(exported[0].schema().field_with_name("record_date").is_ok());
        let e = texts(&exported);
        let by_id: BTreeMap<String, usize> = e["id"]
            .iter()
            .enumerate()
            .map(|(i, v)| (v.clone().unwrap(), i))
            .collect();
        for m in &f.archive.catalog().tables[table] {
            for file in &m.files {
                for b in f.archive.read_file(file).await.unwrap() {
                    let a = texts(std::slice::from_ref(&b));
                    let rows = a["_strata_record_date"]
                        .iter()
                        .zip(&a["id"])
                        .zip(&a["_strata_patient"]);
                    for ((date, pid), patient) in rows {
                        let (Some(date), Some(pid)) = (date, pid) else {
                            continue;
                        };
                        let i = by_id[&key.pseudonym(table, pid)];
                        let shifted = e["record_date"][i].as_deref().unwrap();
                        let days = (chrono::NaiveDate::parse_from_str(shifted, "%Y-%m-%d").unwrap()
                            - chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").unwrap())
                        .num_days() as i32;
                        assert_eq!(days, key.shift_days(patient.as_deref().unwrap()));
                        shifts
                            .entry(e["patient_pseudonym"][i].clone().unwrap())
                            .or_default()
                            .insert(days);
                    }
                }
            }
        }
    }
    assert!(shifts.len() > 5);
    assert!(
        shifts.values().all(|s| s.len() == 1),
        "one shift per patient across tables"
    );
    let entries = f.state.audit.list(&Default::default()).await.unwrap();
    let mentions = entries
        .iter()
        .filter(|e| e.entry.detail.to_string().contains("DUA-2026-017"))
        .count();
    assert_eq!(
        mentions, 2,
        "the request and the release name the agreement"
    );
}

/// Jobs survive a restart of the server: one that was running is run again (and completes),
/// one interrupted three times is marked failed, never left running; finished exports' files
/// are deleted once they expire. A cohort (group) limits an export to its patients.
#[tokio::test]
async fn export_jobs_resume_after_a_restart_expire_and_follow_groups() {
    let mut api = api_config("");
    api.exports.as_mut().unwrap().expire_after_secs = 3;
    let f = fixture_with(api).await;
    let researcher = f.idp.user("res-1", Role::Researcher, &[]);
    let request: strata_archive_api::ExportRequest =
        serde_json::from_value(json!({ "profile": "safe_harbor", "tables": ["diagnoses"] }))
            .unwrap();
    let spec = serde_json::to_value(request.job("researcher".into()).unwrap()).unwrap();
    // Two jobs a stopped server left running: one on its first attempt, one on its third.
    let fresh = f
        .control
        .start_export("res-1", "parquet", "safe_harbor", &spec)
        .await
        .unwrap();
    let tired = f
        .control
        .start_export("res-1", "parquet", "safe_harbor", &spec)
        .await
        .unwrap();
    // Their server stopped: no heartbeat for a long time; the second was run three times.
    let config = load_config(&f.dir.path().join("strata.toml"));
    let control_db = Db::connect(&config.control_url().unwrap(), false)
        .await
        .unwrap();
    control_db
        .execute(&format!(
            "UPDATE strata_exports SET heartbeat_at = '2000-01-01T00:00:00.000000Z' WHERE export_id IN ('{fresh}', '{tired}');
             UPDATE strata_exports SET attempts = 3 WHERE export_id = '{tired}'"
        ))
        .await
        .unwrap();
    control_db.close().await;
    // A job whose server is alive (a fresh heartbeat) is left alone.
    let alive = f
        .control
        .start_export("res-1", "parquet", "safe_harbor", &spec)
        .await
        .unwrap();
    strata_archive_api::start_background(&f.state).await;
    let record = loop {
        let r = f.control.export(&fresh).await.unwrap().unwrap();
        if r.status != "running" {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        (record.status.as_str(), record.attempts),
        ("done", 2),
        "{record:?}"
    );
    let tired = f.control.export(&tired).await.unwrap().unwrap();
    assert_eq!(tired.status, "failed");
    assert!(tired.error.as_deref().unwrap().contains("interrupted"));
    let alive = f.control.export(&alive).await.unwrap().unwrap();
    assert_eq!((alive.status.as_str(), alive.attempts), ("running", 1));
    let gave_up = f
        .state
        .audit
        .list(&strata_control::AuditQuery {
            outcome: Some(strata_control::Outcome::Failed),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        gave_up
            .iter()
            .any(|e| e.entry.detail["export"] == tired.export_id.as_str()),
        "giving up is audited"
    );
    let file = f
        .dir
        .path()
        .join("exports")
        .join(&fresh)
        .join("diagnoses.parquet");
    assert!(file.exists());
    // Expiry: the sweep (every second here) deletes the files and marks the job.
    let expired = loop {
        let r = f.control.export(&fresh).await.unwrap().unwrap();
        if r.status == "expired" {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(expired.status, "expired");
    assert!(!file.exists());
    let (status, _, _) = call(
        &f.app,
        Method::GET,
        &format!("/v1/exports/{fresh}/files/diagnoses.parquet"),
        Some(&researcher),
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A cohort from criteria: patients with a given diagnosis code; the export holds only them.
    let code = {
        let file = &f.archive.catalog().tables["diagnoses"][0].files[0];
        let b = &f.archive.read_file(file).await.unwrap()[0];
        texts(std::slice::from_ref(b))["icd10_code"][0]
            .clone()
            .unwrap()
    };
    let (status, _, body) = call(&f.app, Method::POST, "/v1/groups", Some(&researcher), &[],
        Some(json!({ "name": "cohort E", "criteria": { "table": "diagnoses", "codes": { "icd10_code": [code] } } }))).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let group: Json = serde_json::from_slice(&body).unwrap();
    let keys: BTreeSet<&str> = group
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "created_at",
            "created_by",
            "criteria",
            "group_id",
            "name",
            "size"
        ]
        .into(),
        "a cohort never shows its patients"
    );
    let size = group["size"].as_u64().unwrap();
    assert!(size > 0);
    let (status, _, _) = call(
        &f.app,
        Method::POST,
        "/v1/groups",
        Some(&researcher),
        &[],
        Some(json!({ "name": "listed", "patients": [f.patient] })),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "researchers do not list patients"
    );
    let (record, _) = finished_export(
        &f.app,
        &researcher,
        json!({ "profile": "safe_harbor", "tables": ["lab_results"], "group": group["group_id"] }),
    )
    .await;
    let id = record["export_id"].as_str().unwrap();
    let batches = parquet_rows(download(&f.app, &researcher, id, "lab_results.parquet").await);
    let patients: BTreeSet<String> = texts(&batches)["patient_pseudonym"]
        .iter()
        .flatten()
        .cloned()
        .collect();
    // Exactly the lab results' patients who have the diagnosis.
    let archived_patients = |table: &str, code: Option<&str>| {
        let (f, table, code) = (&f, table.to_string(), code.map(str::to_string));
        async move {
            let mut out = BTreeSet::new();
            for m in &f.archive.catalog().tables[&table] {
                for file in &m.files {
                    for b in f.archive.read_file(file).await.unwrap() {
                        let t = texts(std::slice::from_ref(&b));
                        for (i, p) in t["_strata_patient"].iter().enumerate() {
                            if code.is_none() || t["icd10_code"][i] == code {
                                out.insert(p.clone().unwrap());
                            }
                        }
                    }
                }
            }
            out
        }
    };
    let members = archived_patients("diagnoses", Some(&code)).await;
    assert_eq!(members.len() as u64, size);
    let key = site_key(&f).for_profile("safe_harbor");
    let expected: BTreeSet<String> = archived_patients("lab_results", None)
        .await
        .intersection(&members)
        .map(|p| key.pseudonym("patient", p))
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(patients, expected);
}

/// The deny-list profiles of before are refused with what to write instead.
#[test]
fn an_old_deny_list_profile_is_refused_with_what_changed() {
    let dir = TestDir::new();
    std::fs::write(
        dir.path().join("pseudonym.key"),
        strata_archive::Kek::generate_hex(),
    )
    .unwrap();
    let config: strata_archive_api::ExportsConfig = toml::from_str(
        "pseudonym_key_file = \"pseudonym.key\"\n[profiles.old]\nremove = [\"name\"]\nidentifiers = [\"mrn\"]\ndates = \"year\"\n",
    )
    .unwrap();
    let err = strata_archive_api::Exporter::from_config(&config, dir.path(), Default::default())
        .unwrap_err();
    assert!(
        err.contains("[api.exports.profiles.old]")
            && err.contains("allow-lists")
            && err.contains("docs/exports.md"),
        "{err}"
    );
}
