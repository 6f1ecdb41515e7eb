//! Workspace-level tests: Strata end to end on real parts (SQLite files, a real PostgreSQL
//! server started by `scripts/test`, the encrypted archive on disk, the API router).

mod api;
mod archive_accounting;
mod blobs;
mod browser;
mod bulk;
mod crash;
mod deploy;
mod exports;
mod legacy_schemas;
mod policies;
mod quarantine;
mod retention;
mod rollback;
mod support;
mod sync;
mod tier;
mod verify;
mod viewer;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::path::Path;
use strata_ingest::{Db, Migration, Value};
use support::*;
use tower::ServiceExt;

async fn generate_sqlite(dir: &Path, scale: f64) -> String {
    let url = format!("sqlite://{}", dir.join("legacy.db").display());
    generate(&url, scale, true).await;
    url
}

/// A SQLite source generated and migrated with the example policy, and its archive opened.
async fn migrated_sqlite(scale: f64) -> (TestDir, String, strata_archive::ArchiveReader) {
    migrated_sqlite_planted(scale, "").await
}

/// [`migrated_sqlite`], with `plant` (SQL, if any) run on the source before the migration.
async fn migrated_sqlite_planted(
    scale: f64,
    plant: &str,
) -> (TestDir, String, strata_archive::ArchiveReader) {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), scale).await;
    if !plant.is_empty() {
        let db = Db::connect(&source, false).await.unwrap();
        db.execute(plant).await.unwrap();
        db.close().await;
    }
    let config_path = write_sqlite_config(dir.path(), &source, &example_policy());
    migrate(&config_path).await;
    let config = load_config(&config_path);
    let archive = open_archive(&config.archive, &config.base_dir).await;
    (dir, source, archive)
}

async fn migrate(config_path: &Path) -> strata_ingest::RunReport {
    let config = load_config(config_path);
    let mut migration = Migration::prepare(config, as_of()).await.unwrap();
    migration.run(&mut |_| {}).await.unwrap()
}

#[tokio::test]
async fn sqlite_to_sqlite_every_row_lands_in_exactly_one_tier() {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), 0.05).await;
    plant_bad_rows(&source).await;
    let config_path = write_sqlite_config(dir.path(), &source, &example_policy());
    let config = load_config(&config_path);

    let plan = Migration::prepare(config.clone(), as_of())
        .await
        .unwrap()
        .plan()
        .await
        .unwrap()
        .0;
    let report = migrate(&config_path).await;
    // The plan predicts the run exactly, and the run's report matches what is really stored.
    assert_eq!(plan.tables, report.tables);
    let counts = tier_counts(&config).await;
    assert_tiers_add_up(&counts);
    assert_report_matches(&report, &counts);
    // The example policy pins patients and keeps active medications operational.
    assert_eq!(counts["patients"].archive, 0);
    let target = Db::connect(&config.resolve_url(&config.operational.url).unwrap(), false)
        .await
        .unwrap();
    let stopped_or_active = count(
        &target,
        "SELECT COUNT(*) FROM medications WHERE status = 'active'".into(),
    )
    .await;
    let source_db = Db::connect(&source, true).await.unwrap();
    assert_eq!(
        stopped_or_active,
        count(
            &source_db,
            "SELECT COUNT(*) FROM medications WHERE status = 'active'".into()
        )
        .await
    );
    // Each planted bad row is quarantined with table, key, column and reason, and kept whole.
    let rows = target
        .fetch_all(
            "SELECT table_name, row_key, column_name, reason, row_data FROM _strata_quarantine"
                .into(),
            vec![strata_ingest::ColumnType::Text; 5],
        )
        .await
        .unwrap();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|v| v.as_key_text().unwrap()).collect())
        .collect();
    for planted in [
        ["lab_results", "id=9000001", "value_num", "not a number"],
        ["clinical_notes", "id=9000002", "body", "invalid UTF-8 text"],
        [
            "medications",
            "id=9000003",
            "started_on",
            "not a valid date",
        ],
    ] {
        let row = rows
            .iter()
            .find(|r| r[..4] == planted)
            .unwrap_or_else(|| panic!("{planted:?} not in {rows:?}"));
        let data: serde_json::Value = serde_json::from_str(&row[4]).unwrap();
        assert_eq!(data["id"], planted[1][3..]);
    }
    let quarantined: u64 = counts.values().map(|c| c.quarantine).sum();
    assert_eq!(rows.len() as u64, quarantined);

    // A second run does not load the same rows twice.
    let err = Migration::prepare(config.clone(), as_of())
        .await
        .unwrap()
        .run(&mut |_| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already has rows"), "{err}");
}

/// Rows a legacy SQLite database really holds: text in a REAL column, bytes that are not UTF-8 in
/// a TEXT column, and a word in a DATE column.
async fn plant_bad_rows(source: &str) {
    let db = Db::connect(source, false).await.unwrap();
    db.execute(
        "INSERT INTO lab_results (id, encounter_id, loinc_code, test_name, value_num, unit, observed_at, status) \
         VALUES (9000001, 1, '2345-7', 'Glucose', 'n/a', 'mg/dL', '2010-01-01 10:00:00', 'final'); \
         INSERT INTO clinical_notes (id, encounter_id, author_npi, note_type, body, written_at) \
         VALUES (9000002, 1, NULL, 'progress', CAST(X'C3FF41' AS TEXT), '2010-01-01 10:00:00'); \
         INSERT INTO medications (id, patient_id, rxnorm_code, drug_name, dose, status, started_on, stopped_on) \
         VALUES (9000003, 1, '197361', 'amlodipine 5 MG Oral Tablet', '5 mg daily', 'stopped', 'someday', NULL);",
    )
    .await
    .unwrap();
    db.close().await;
}

#[tokio::test]
async fn quarantine_threshold_stops_the_run() {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), 0.01).await;
    plant_bad_rows(&source).await;
    let path = write_sqlite_config(dir.path(), &source, &example_policy());
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[tables.lab_results]",
        "[tables.lab_results]\nquarantine_threshold = 0",
    );
    std::fs::write(&path, text).unwrap();
    let err = Migration::prepare(load_config(&path), as_of())
        .await
        .unwrap()
        .run(&mut |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, strata_ingest::IngestError::QuarantineThreshold { ref table, .. } if table == "lab_results"),
        "{err}"
    );
}

#[tokio::test]
async fn archive_files_need_the_key_and_blobs_round_trip() {
    let (dir, source, archive) = migrated_sqlite(0.05).await;

    let file = &archive.catalog().tables["lab_results"][0].files[0];
    let bytes = std::fs::read(dir.path().join("archive").join(&file.path)).unwrap();
    let plain = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        bytes::Bytes::from(bytes),
    );
    let Err(err) = plain else {
        panic!("a plain Parquet read must fail without the key")
    };
    assert!(err.to_string().contains("encrypted footer"), "{err}");
    let batches = archive.read_file(file).await.unwrap();
    assert_eq!(
        batches.iter().map(|b| b.num_rows() as u64).sum::<u64>(),
        file.rows
    );

    // Every archived document comes back byte for byte.
    let source_db = Db::connect(&source, true).await.unwrap();
    let docs = source_db
        .fetch_all(
            "SELECT id, patient_id, content FROM documents".into(),
            vec![
                strata_ingest::ColumnType::Int,
                strata_ingest::ColumnType::Int,
                strata_ingest::ColumnType::Bytes,
            ],
        )
        .await
        .unwrap();
    let mut checked = 0;
    for d in &docs {
        let (Value::Int(id), Value::Int(patient), Value::Bytes(content)) = (&d[0], &d[1], &d[2])
        else {
            panic!()
        };
        for batch in archive
            .patient_rows("documents", &patient.to_string())
            .await
            .unwrap()
        {
            use arrow::array::AsArray;
            let ids = batch
                .column_by_name("id")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>();
            for row in (0..batch.num_rows()).filter(|&r| ids.value(r) == *id) {
                let object = batch
                    .column_by_name("content__object")
                    .unwrap()
                    .as_string::<i32>()
                    .value(row);
                let reference = strata_archive::BlobRef {
                    object: object.into(),
                    length: content.len() as u64,
                    sha256: hex::encode(Sha256::digest(content)),
                    content_type: String::new(),
                };
                assert_eq!(
                    archive.blobs().get(&reference).await.unwrap().as_ref(),
                    content.as_slice()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "no archived documents to check");
}

#[tokio::test]
async fn postgres_to_postgres_every_row_lands_in_exactly_one_tier() {
    let dir = TestDir::new();
    let source = create_pg_database("strata_src").await;
    let operational = create_pg_database("strata_op").await;
    let control = create_pg_database("strata_ctl").await;
    generate(&source, 0.05, true).await;
    let config_path = write_config(
        dir.path(),
        &read_only_url(&source).await,
        &operational,
        &control,
        &example_policy(),
    );
    let report = migrate(&config_path).await;
    let counts = tier_counts(&load_config(&config_path)).await;
    assert_tiers_add_up(&counts);
    assert_report_matches(&report, &counts);
    // Types survive: the operational copy of a numeric column is still numeric(10,2).
    let target = Db::connect(&operational, false).await.unwrap();
    let decl = target
        .table_schema("billing_lines")
        .await
        .unwrap()
        .column("amount")
        .unwrap()
        .decl_type
        .clone();
    assert_eq!(decl, "numeric(10,2)");
    // And `strata verify` proves it, values included (PostgreSQL to PostgreSQL).
    let (status, out) = strata_verify(&config_path);
    assert_eq!(status, 0, "{out}");
}

/// `numeric` columns are read from PostgreSQL in binary and printed by Strata: every value
/// (scales, signs, NaN, infinities, values far beyond 64 bits) arrives in the archive and in
/// the operational database exactly as PostgreSQL prints it. In the archive a `numeric(p,s)`
/// is a Parquet DECIMAL(p,s) and an unconstrained `numeric` its exact text marked as a
/// decimal; the API serves each as a JSON number when a double holds it exactly, else as its
/// text. A NaN, which DECIMAL cannot hold, is quarantined from the archive (planned so).
#[tokio::test]
async fn numerics_arrive_exactly_as_postgres_prints_them() {
    use strata_ingest::ColumnType;
    let dir = TestDir::new();
    let source = create_pg_database("strata_numeric_src").await;
    let operational = create_pg_database("strata_numeric_op").await;
    let db = Db::connect(&source, false).await.unwrap();
    let values = "(VALUES ('0'), ('0.0000'), ('-1.5'), ('10000'), ('9999.9999'), ('NaN'), \
        ('Infinity'), ('-Infinity'), ('12345678901234567890.123456789'), ('-0.00000000000000000001'), \
        ('100000000.00010000'), ('1e-30'), ('-7e25')) AS v(t)";
    for table in ["archived", "kept"] {
        db.execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, patient_id bigint NOT NULL, taken date,
               amount numeric, price numeric(12,4));
             INSERT INTO {table} SELECT row_number() OVER (), 1, DATE '2001-01-01', t::numeric, NULL FROM {values};
             INSERT INTO {table} SELECT 100 + g, g % 7, DATE '2001-01-01',
               round(((random() - 0.5) * 10 ^ (g % 40))::numeric, g % 25),
               CASE WHEN g % 9 > 0 THEN round((random() * 1e8)::numeric, 4) END
             FROM generate_series(1, 3000) g;"
        ))
        .await
        .unwrap();
    }
    db.execute("INSERT INTO archived VALUES (9999, 1, DATE '2001-01-01', 1, 'NaN')")
        .await
        .unwrap();
    let reader = read_only_url(&source).await;
    write_run_files(
        dir.path(),
        &format!(
            "{}[tables.archived]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"taken\"\n\
             [tables.kept]\nprimary_key = [\"id\"]\npatient_key = \"patient_id\"\nrecord_date = \"taken\"\n",
            run_config(&reader, &operational)
        ),
        &format!(
            "version = \"1\"\nas_of = \"{}\"\n[defaults]\narchive_after = \"1y\"\npatient_inactive_after = \"1y\"\n\
             [tables.archived]\ntier = \"archive\"\n[tables.kept]\ntier = \"operational\"\n",
            as_of()
        ),
    );
    let mut migration = Migration::prepare(load_config(&dir.path().join("strata.toml")), as_of())
        .await
        .unwrap();
    let (plan, _) = migration.plan().await.unwrap();
    let report = migration.run(&mut |_| {}).await.unwrap();
    let nan = std::collections::BTreeMap::from([(
        "price: not a decimal the archive's DECIMAL column can hold exactly (NaN?)".to_string(),
        1,
    )]);
    for r in [&plan, &report] {
        assert_eq!(r.table("archived").unwrap().quarantine_reasons, nan);
        assert_eq!(r.table("kept").unwrap().quarantined_rows, 0);
    }
    async fn printed(db: &Db, table: &str) -> Vec<Vec<Value>> {
        let sql = format!(
            "SELECT id, amount::text, price::text FROM {table} WHERE id <> 9999 ORDER BY id"
        );
        let types = vec![ColumnType::Int, ColumnType::Text, ColumnType::Text];
        db.fetch_all(sql, types).await.unwrap()
    }
    let expected = printed(&db, "archived").await;
    assert_eq!(expected.len(), 3013);

    // The archive holds the printed text of each value.
    let config = load_config(&dir.path().join("strata.toml"));
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let mut archived = Vec::new();
    for m in &archive.catalog().tables["archived"] {
        for f in &m.files {
            for batch in archive.read_file(f).await.unwrap() {
                let schema = batch.schema();
                assert_eq!(
                    schema.field_with_name("price").unwrap().data_type(),
                    &arrow::datatypes::DataType::Decimal128(12, 4)
                );
                let amount = schema.field_with_name("amount").unwrap();
                assert_eq!(amount.data_type(), &arrow::datatypes::DataType::Utf8);
                assert_eq!(
                    amount.metadata().get("strata:type").map(String::as_str),
                    Some("decimal")
                );
                let b = strata_archive::ArchivedBatch::new(&batch, &[]);
                for row in 0..b.num_rows() {
                    let text = |name: &str| {
                        b.value(name, row)
                            .unwrap()
                            .to_text()
                            .map_or(Value::Null, |t| Value::Text(t.into_owned()))
                    };
                    let id = match b.value("id", row).unwrap() {
                        strata_archive::Cell::Int(i) => i,
                        other => panic!("{other:?}"),
                    };
                    // JSON: a number when a double holds the value exactly, else the text.
                    let json = b.value("amount", row).unwrap().to_json();
                    match &text("amount") {
                        Value::Text(t)
                            if ["NaN", "Infinity", "-Infinity"].contains(&t.as_str()) =>
                        {
                            assert_eq!(json, serde_json::json!(t))
                        }
                        Value::Text(t) if t == "12345678901234567890.123456789" => {
                            assert_eq!(json, serde_json::json!(t))
                        }
                        Value::Text(t) if t == "-1.5" => assert_eq!(json, serde_json::json!(-1.5)),
                        _ => {}
                    }
                    archived.push(vec![Value::Int(id), text("amount"), text("price")]);
                }
            }
        }
    }
    archived.sort_by_key(|r| match r[0] {
        Value::Int(i) => i,
        _ => unreachable!(),
    });
    assert_eq!(archived.len(), expected.len());
    for (got, want) in archived.iter().zip(&expected) {
        assert_eq!(got, want, "archived");
    }

    // The operational database holds the same values (compared as printed there).
    let target = Db::connect(&operational, false).await.unwrap();
    let kept = printed(&target, "kept").await;
    let expected = printed(&db, "kept").await;
    assert_eq!(kept.len(), expected.len());
    for (got, want) in kept.iter().zip(&expected) {
        assert_eq!(got, want, "operational");
    }
}

/// Loads a Synthea CSV directory into PostgreSQL the way a legacy export would sit there: no
/// declared keys, column types inferred from the values.
async fn load_synthea(url: &str, dir: &Path) -> Vec<String> {
    let db = Db::connect(url, false).await.unwrap();
    let mut tables = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "csv"))
        .collect();
    files.sort();
    for path in files {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let mut reader = csv::Reader::from_path(&path).unwrap();
        let headers: Vec<String> = reader
            .headers()
            .unwrap()
            .iter()
            .map(str::to_string)
            .collect();
        let rows: Vec<Vec<String>> = reader
            .records()
            .map(|r| r.unwrap().iter().map(str::to_string).collect())
            .collect();
        let infer = |i: usize| {
            let values: Vec<&str> = rows
                .iter()
                .map(|r| r[i].as_str())
                .filter(|v| !v.is_empty())
                .collect();
            let all = |f: &dyn Fn(&str) -> bool| !values.is_empty() && values.iter().all(|v| f(v));
            if all(&|v| v.parse::<i64>().is_ok() && !(v.len() > 1 && v.starts_with('0'))) {
                "bigint"
            } else if all(&|v| {
                v.parse::<f64>().is_ok()
                    && !(v.len() > 1 && v.starts_with('0') && !v.starts_with("0."))
            }) {
                "double precision"
            } else if all(&|v| chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d").is_ok()) {
                "date"
            } else if all(&|v| chrono::DateTime::parse_from_rfc3339(v).is_ok()) {
                "timestamptz"
            } else if all(&|v| v.len() == 36 && v.chars().filter(|c| *c == '-').count() == 4) {
                "uuid"
            } else {
                "text"
            }
        };
        let columns: Vec<strata_ingest::Column> = headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                // Every value is bound as text and cast by PostgreSQL to the inferred type.
                strata_ingest::Column {
                    name: h.clone(),
                    col_type: strata_ingest::ColumnType::Text,
                    decl_type: infer(i).to_string(),
                    nullable: true,
                }
            })
            .collect();
        let defs: Vec<String> = columns
            .iter()
            .map(|c| format!("{} {}", strata_ingest::quote(&c.name), c.decl_type))
            .collect();
        db.execute(&format!(
            "CREATE TABLE {} ({})",
            strata_ingest::quote(&name),
            defs.join(", ")
        ))
        .await
        .unwrap();
        let values: Vec<Vec<Value>> = rows
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|v| {
                        if v.is_empty() {
                            Value::Null
                        } else {
                            Value::Text(v)
                        }
                    })
                    .collect()
            })
            .collect();
        for chunk in values.chunks(db.rows_per_insert(columns.len())) {
            db.insert_rows(&name, &columns, chunk).await.unwrap();
        }
        tables.push(name);
    }
    db.close().await;
    tables
}

#[tokio::test]
async fn synthea_in_postgres_migrates_with_a_config_from_init() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea-nj27");
    assert!(data.is_dir(), "{} is missing", data.display());
    let dir = TestDir::new();
    let source = create_pg_database("strata_synthea").await;
    let operational = create_pg_database("strata_synthea_op").await;
    let tables = load_synthea(&source, &data).await;
    assert_eq!(tables.len(), 18);
    let reader = read_only_url(&source).await;
    synthea_migrates_with_a_config_from_init(&dir, &source, &reader, &operational).await;
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");
}

/// A CSV directory to a PostgreSQL operational database, proven by `strata verify`.
#[tokio::test]
async fn synthea_csv_to_postgres_is_proven_by_verify() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea-nj27");
    let dir = TestDir::new();
    let source = format!("csv://{}", data.canonicalize().unwrap().display());
    let operational = create_pg_database("strata_synthea_csv_op").await;
    synthea_migrates_with_a_config_from_init(&dir, &source, &source, &operational).await;
    let (status, out) = strata_verify(&dir.path().join("strata.toml"));
    assert_eq!(status, 0, "{out}");
}

/// The Synthea CSV exports migrate as they are, as a CSV source.
#[tokio::test]
async fn synthea_csv_directory_migrates_directly() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea-nj27");
    let dir = TestDir::new();
    let source = format!("csv://{}", data.canonicalize().unwrap().display());
    let operational = format!("sqlite://{}", dir.path().join("operational.db").display());
    synthea_migrates_with_a_config_from_init(&dir, &source, &source, &operational).await;
    // Every record of every file is accounted for (counted here with the csv crate itself).
    let counts = tier_counts(&load_config(&dir.path().join("strata.toml"))).await;
    for (table, c) in &counts {
        let records = csv::Reader::from_path(data.join(format!("{table}.csv")))
            .unwrap()
            .byte_records()
            .count() as u64;
        assert_eq!(c.source, records, "{table}");
        assert_eq!(
            c.operational + c.archive + c.quarantine + c.purged,
            records,
            "{table}"
        );
    }
    // Staged beside the config, with the inferred types on record: ZIP codes keep their
    // leading zeros, dates are dates.
    let staged: Vec<_> = std::fs::read_dir(dir.path().join(".strata-staging"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");
    let db = Db::connect(&format!("sqlite://{}", staged[0].display()), true)
        .await
        .unwrap();
    let types: std::collections::BTreeMap<String, String> = db
        .fetch_all(
            "SELECT column_name, column_type FROM _strata_csv_columns WHERE table_name = 'patients'".into(),
            vec![strata_ingest::ColumnType::Text; 2],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r[0].as_key_text().unwrap(), r[1].as_key_text().unwrap()))
        .collect();
    assert_eq!(types["ZIP"], "TEXT");
    assert_eq!(types["BIRTHDATE"], "DATE");
    assert_eq!(types["LAT"], "REAL");
    // Synthea writes instants (`2023-01-27T16:17:47Z`): they stay instants, staged as
    // TIMESTAMPTZ and archived as UTC timestamps, never as local times without a zone.
    let start: Vec<Vec<Value>> = db
        .fetch_all(
            "SELECT column_type FROM _strata_csv_columns WHERE table_name = 'encounters' AND column_name = 'START'".into(),
            vec![strata_ingest::ColumnType::Text],
        )
        .await
        .unwrap();
    assert_eq!(start[0][0], Value::Text("TIMESTAMPTZ".into()));
    let config = load_config(&dir.path().join("strata.toml"));
    let archive = open_archive(&config.archive, &config.base_dir).await;
    // Amounts keep the digits they were written with (`0.00`, `136.00`), in the operational
    // database and in the archive (as DECIMAL) alike.
    let cost: Vec<Vec<Value>> = db
        .fetch_all(
            "SELECT column_type FROM _strata_csv_columns WHERE table_name = 'encounters' AND column_name = 'PAYER_COVERAGE'".into(),
            vec![strata_ingest::ColumnType::Text],
        )
        .await
        .unwrap();
    assert!(
        matches!(&cost[0][0], Value::Text(t) if t.starts_with("DECIMAL_TEXT(") && t.ends_with(",2)")),
        "{cost:?}"
    );
    let mut written: Vec<String> = csv::Reader::from_path(data.join("encounters.csv"))
        .unwrap()
        .deserialize::<std::collections::HashMap<String, String>>()
        .map(|r| r.unwrap()["PAYER_COVERAGE"].clone())
        .collect();
    let operational = Db::connect(
        &format!("sqlite://{}", dir.path().join("operational.db").display()),
        true,
    )
    .await
    .unwrap();
    let mut kept: Vec<String> = operational
        .fetch_all(
            "SELECT PAYER_COVERAGE FROM encounters".into(),
            vec![strata_ingest::ColumnType::Text],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r[0].as_key_text().unwrap())
        .collect();
    for f in archive.catalog().tables["encounters"]
        .iter()
        .flat_map(|m| &m.files)
    {
        for batch in archive.read_file(f).await.unwrap() {
            assert!(matches!(
                batch
                    .schema()
                    .field_with_name("PAYER_COVERAGE")
                    .unwrap()
                    .data_type(),
                arrow::datatypes::DataType::Decimal128(_, 2)
            ));
            let b = strata_archive::ArchivedBatch::new(&batch, &[]);
            kept.extend(
                b.values("PAYER_COVERAGE")
                    .unwrap()
                    .map(|c| c.to_text().unwrap().into_owned()),
            );
        }
    }
    written.sort();
    kept.sort();
    assert!(written.iter().any(|w| w.ends_with('0')));
    assert_eq!(kept, written);
    let encounters = archive.catalog().tables["encounters"][0].files[0].clone();
    let schema = archive.file_schema(&encounters).await.unwrap();
    assert_eq!(
        schema.field_with_name("START").unwrap().data_type(),
        &arrow::datatypes::DataType::Timestamp(
            arrow::datatypes::TimeUnit::Microsecond,
            Some("UTC".into())
        )
    );
}

/// `strata init` drafts a config for the Synthea tables at `source`; with a hand-written policy
/// the migration (reading `config_source`) puts every row in exactly one place.
async fn synthea_migrates_with_a_config_from_init(
    dir: &TestDir,
    source: &str,
    config_source: &str,
    operational: &str,
) {
    // The draft from `strata init`, untouched but for where things go.
    let draft = strata_ingest::draft_config(source).await.unwrap();
    assert!(draft.contains("REVIEW"));
    let mut config: toml::Table = toml::from_str(&draft).unwrap();
    let drafted_tables = config["tables"].as_table().unwrap().clone();
    assert_eq!(drafted_tables.len(), 18);
    assert_eq!(
        drafted_tables["patients"]["primary_key"]
            .as_array()
            .unwrap()[0]
            .as_str(),
        Some("Id")
    );
    assert_eq!(
        drafted_tables["conditions"]["patient_key"].as_str(),
        Some("PATIENT")
    );
    assert_eq!(
        drafted_tables["claims"]["patient_key"].as_str(),
        Some("PATIENTID")
    );
    assert!(drafted_tables["conditions"]
        .get("primary_key")
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty());
    let local: toml::Table = toml::from_str(&format!(
        "[source]\nurl = \"{config_source}\"\n[operational]\nurl = \"{operational}\"\n[control]\nurl = \"sqlite://control.db\"\n[archive]\nlocation = \"archive\"\nkek_id = \"k\"\nkek_file = \"kek.hex\"\n"
    ))
    .unwrap();
    for (k, v) in local {
        config.insert(k, v);
    }
    std::fs::write(
        dir.path().join("strata.toml"),
        toml::to_string(&config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("kek.hex"),
        strata_archive::Kek::generate_hex(),
    )
    .unwrap();
    // A hand-written policy ([`SYNTHEA_POLICY`]).
    std::fs::write(dir.path().join("policy.toml"), SYNTHEA_POLICY).unwrap();
    let report = migrate(&dir.path().join("strata.toml")).await;
    let counts = tier_counts(&load_config(&dir.path().join("strata.toml"))).await;
    assert_tiers_add_up(&counts);
    assert_eq!(
        counts.values().map(|c| c.source).sum::<u64>(),
        report.tables.iter().map(|t| t.source_rows).sum::<u64>()
    );
    assert!(
        counts["observations"].archive > 0,
        "old observations are archived: {:?}",
        counts["observations"]
    );
    // UUID patient keys are archived as their text and found by it.
    let config = load_config(&dir.path().join("strata.toml"));
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let file = &archive.catalog().tables["encounters"][0].files[0];
    assert_eq!(file.min_patient.len(), 36);
    let rows: usize = archive
        .patient_rows("encounters", &file.min_patient)
        .await
        .unwrap()
        .iter()
        .map(|b| b.num_rows())
        .sum();
    assert!(rows > 0);
}

#[tokio::test]
async fn bad_config_is_rejected_naming_table_and_column() {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), 0.01).await;
    let path = write_sqlite_config(dir.path(), &source, &example_policy());
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(
            "record_date = \"observed_at\"",
            "record_date = \"observed\"",
        )
        .replace("[tables.billing_lines]", "[tables.billing]");
    std::fs::write(&path, text).unwrap();
    let err = Migration::prepare(load_config(&path), as_of())
        .await
        .err()
        .expect("invalid config");
    let msg = err.to_string();
    assert!(
        msg.contains("[tables.lab_results] record_date: no column \"observed\""),
        "{msg}"
    );
    assert!(msg.contains("[tables.billing]: no such table"), "{msg}");
}

/// `strata init` on a research database's conventions, without declared foreign keys: patients
/// keyed by `subject_id` beside a surrogate `row_id` primary key in every table. Every clinical
/// table gets `subject_id` as its patient key, and so does the patients table (not `row_id`).
#[tokio::test]
async fn init_finds_subject_id_patients_behind_surrogate_row_ids() {
    let dir = TestDir::new();
    let url = format!("sqlite://{}", dir.path().join("icu.db").display());
    let db = Db::connect(&format!("{url}?mode=rwc"), false)
        .await
        .unwrap();
    db.execute(
        "CREATE TABLE patients (row_id INTEGER PRIMARY KEY, subject_id INTEGER NOT NULL, gender TEXT, dob TIMESTAMP);
         CREATE TABLE admissions (row_id INTEGER PRIMARY KEY, subject_id INTEGER NOT NULL, hadm_id INTEGER, admittime TIMESTAMP);
         CREATE TABLE labevents (row_id INTEGER PRIMARY KEY, subject_id INTEGER NOT NULL, charttime TIMESTAMP, valuenum REAL);
         INSERT INTO patients VALUES (1, 10006, 'F', '2094-03-05 00:00:00');
         INSERT INTO admissions VALUES (1, 10006, 142345, '2164-10-23 21:09:00');
         INSERT INTO labevents VALUES (1, 10006, '2164-10-24 02:00:00', 7.4);",
    )
    .await
    .unwrap();
    db.close().await;
    let draft = strata_ingest::draft_config(&url).await.unwrap();
    let block = |table: &str| {
        let start = draft.find(&format!("[tables.{table}]")).unwrap();
        let rest = &draft[start + 1..];
        rest[..rest.find("\n[").unwrap_or(rest.len())].to_string()
    };
    for table in ["patients", "admissions", "labevents"] {
        assert!(
            block(table).contains("patient_key = \"subject_id\""),
            "{table}:\n{}",
            block(table)
        );
    }
    assert!(!draft.contains("no patient key found"), "{draft}");
}

/// `check` and `plan` move nothing and create nothing: an operational SQLite database that does
/// not exist yet stays uncreated (every table is one the run will create).
#[tokio::test]
async fn check_and_plan_create_no_operational_database() {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), 0.01).await;
    let config_path = write_sqlite_config(dir.path(), &source, &example_policy());
    let migration = Migration::prepare(load_config(&config_path), as_of())
        .await
        .unwrap();
    let findings = migration.check().await.unwrap();
    assert!(
        findings
            .iter()
            .any(|f| f.message.starts_with("no operational table yet")),
        "{findings:?}"
    );
    migration.plan().await.unwrap();
    assert!(!dir.path().join("operational.db").exists());
}

/// `strata init --help` names every kind of source it reads, CSV exports included.
#[test]
fn init_help_names_every_kind_of_source() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["init", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for scheme in ["postgres://", "sqlite://", "csv://"] {
        assert!(help.contains(scheme), "{help}");
    }
}

/// `strata ... | head`: a reader that stops early ends the command quietly, without a panic or
/// a backtrace (here the reader is gone before the command writes).
#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("openapi")
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn demo_command_migrates_and_plan_reports() {
    let dir = TestDir::new();
    let demo = dir.path().join("demo");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["demo", "--no-serve", "--scale", "0.02", "--dir"])
        .arg(&demo)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("lab_results"), "{stdout}");
    assert!(demo.join("archive/manifests").is_dir());
    let plan = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["plan", "--json", "--config"])
        .arg(demo.join("strata.toml"))
        .output()
        .unwrap();
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(report["plan"]["tables"].as_array().unwrap().len(), 9);
    // The plan routes and checks every row as the demo's run did: it predicts the run exactly.
    let ran = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let control = strata_control::Control::open(&format!(
            "sqlite://{}",
            demo.join("strata-control.db").display()
        ))
        .await
        .unwrap();
        control
            .last_finished_run_report::<serde_json::Value>()
            .await
            .unwrap()
            .unwrap()
            .1
    });
    assert_eq!(report["plan"]["tables"], ran["tables"]);
    // Running the demo again replaces its own directory; a foreign directory is refused.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["demo", "--no-serve", "--scale", "0.01", "--dir"])
        .arg(&demo)
        .output()
        .unwrap();
    assert!(again.status.success());
    let foreign = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["demo", "--no-serve", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!foreign.status.success());
}

#[tokio::test]
async fn an_interrupted_run_resumes_without_losing_or_duplicating_rows() {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), 0.03).await;
    let config_path = write_sqlite_config(dir.path(), &source, &example_policy());
    let first = migrate(&config_path).await;
    // Make it look as if the process died while loading lab_results: the run and the table are
    // still "running" with their range plan, and the range's transaction (rows, quarantined
    // rows, checkpoint) never committed.
    let control = Db::connect(
        &format!("sqlite://{}", dir.path().join("control.db").display()),
        false,
    )
    .await
    .unwrap();
    control
        .execute(&format!(
            "UPDATE strata_runs SET status = 'running'; UPDATE strata_table_runs SET status = 'running', \
             report = '{{\"ranges\":[{{\"index\":0,\"filter\":null}}],\"stable\":true}}' \
             WHERE run_id = '{}' AND table_name = 'lab_results'",
            first.run_id
        ))
        .await
        .unwrap();
    control.close().await;
    let target = Db::connect(
        &format!("sqlite://{}", dir.path().join("operational.db").display()),
        false,
    )
    .await
    .unwrap();
    target
        .execute(
            "DELETE FROM lab_results; DELETE FROM _strata_quarantine WHERE table_name = 'lab_results'; \
             DELETE FROM _strata_checkpoints WHERE table_name = 'lab_results'",
        )
        .await
        .unwrap();
    target.close().await;

    let resumed = migrate(&config_path).await;
    assert_eq!(
        resumed.run_id, first.run_id,
        "the unfinished run is resumed, not restarted"
    );
    assert_eq!(resumed.tables, first.tables);
    let counts = tier_counts(&load_config(&config_path)).await;
    assert_tiers_add_up(&counts);
    // Each archived lab result is stored once: the range copied again replaced the manifest
    // its first attempt had left.
    assert_report_matches(&resumed, &counts);
}

/// A start that fails (here, on a missing key) records no run; a run left behind (here, one
/// cut short, whose policy has changed since) is rolled back by `strata migrate --abandon`,
/// and the next migrate starts afresh under the new policy, archiving every row once.
#[tokio::test]
async fn a_failed_start_pins_nothing_and_a_run_can_be_abandoned() {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), 0.03).await;
    write_sqlite_config(dir.path(), &source, &example_policy());
    let config = ["migrate", "--config", "strata.toml"];
    let key = std::fs::read(dir.path().join("kek.hex")).unwrap();
    std::fs::remove_file(dir.path().join("kek.hex")).unwrap();
    let out = strata(&config, dir.path());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kek.hex"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let control = strata_control::Control::open(&format!(
        "sqlite://{}",
        dir.path().join("control.db").display()
    ))
    .await
    .unwrap();
    assert_eq!(control.latest_run().await.unwrap(), None, "no run recorded");
    std::fs::write(dir.path().join("kek.hex"), &key).unwrap();

    // A run cut short after archiving, then a changed policy: refused, with the way out.
    let out = strata(&config, dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = control.latest_run().await.unwrap().unwrap();
    let db = Db::connect(
        &format!("sqlite://{}", dir.path().join("control.db").display()),
        false,
    )
    .await
    .unwrap();
    db.execute("UPDATE strata_runs SET status = 'running'")
        .await
        .unwrap();
    db.close().await;
    let policy = example_policy().replace("archive_after = \"3y\"", "archive_after = \"4y\"");
    assert_ne!(policy, example_policy());
    std::fs::write(dir.path().join("policy.toml"), &policy).unwrap();
    let out = strata(&config, dir.path());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("--abandon"),
        "{said}"
    );

    // Not while a migrate of this configuration runs (here, this test holds its lock).
    let held = strata_ingest::RunLock::take(dir.path()).unwrap();
    let out = strata(
        &["migrate", "--config", "strata.toml", "--abandon"],
        dir.path(),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("is running"),
        "{said}"
    );
    drop(held);
    let out = strata(
        &["migrate", "--config", "strata.toml", "--abandon"],
        dir.path(),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains(&format!("run {} abandoned", first.run_id)),
        "{said}"
    );
    assert_eq!(
        control.latest_run().await.unwrap().unwrap().status,
        "abandoned"
    );
    let counts = tier_counts(&load_config(&dir.path().join("strata.toml"))).await;
    assert!(
        counts
            .values()
            .all(|c| c.operational == 0 && c.archive == 0),
        "rolled back: {counts:?}"
    );
    let (ok, said) = verify_archive(dir.path());
    assert!(ok, "nothing of the abandoned run is missing: {said}");

    let out = strata(&config, dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = control.latest_run().await.unwrap().unwrap();
    assert_ne!(second.run_id, first.run_id);
    assert_eq!(second.status, "done");
    let counts = tier_counts(&load_config(&dir.path().join("strata.toml"))).await;
    assert_tiers_add_up(&counts);
    let (ok, said) = verify_archive(dir.path());
    assert!(ok, "{said}");
    let out = strata(
        &["migrate", "--config", "strata.toml", "--abandon"],
        dir.path(),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to abandon"));
}

/// Errors a user can act on: a refused connection says so (not "pool timed out"), a server's
/// refusal comes without PostgreSQL's source line ("at line 334"), an archive path that is a
/// file says that.
#[tokio::test]
async fn connection_and_archive_errors_say_what_is_wrong() {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), 0.01).await;
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cases = [
        (
            format!("postgres://strata@127.0.0.1:{refused}/op"),
            format!("127.0.0.1:{refused}/op: connection refused"),
        ),
        (
            {
                let admin = pg_admin_url();
                format!(
                    "{}/strata_no_such_database",
                    &admin[..admin.rfind('/').unwrap()]
                )
            },
            "database \"strata_no_such_database\" does not exist".to_string(),
        ),
    ];
    for (operational, expected) in cases {
        write_config(
            dir.path(),
            &source,
            &operational,
            "sqlite://control.db",
            &example_policy(),
        );
        let started = std::time::Instant::now();
        let out = strata(&["migrate", "--config", "strata.toml"], dir.path());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(said.contains(&expected), "{said}");
        assert!(
            !said.contains("pool timed out") && !said.contains(" at line "),
            "{said}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
    }
    write_sqlite_config(dir.path(), &source, &example_policy());
    std::fs::write(dir.path().join("archive"), "not a directory").unwrap();
    let out = strata(&["migrate", "--config", "strata.toml"], dir.path());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("is a file, not a directory"), "{said}");
    assert!(!said.contains("os error"), "{said}");
}

fn strata(args: &[&str], dir: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn policy_check_explain_and_holds_from_the_command_line() {
    let dir = TestDir::new();
    let demo = dir.path().join("demo");
    let out = strata(
        &[
            "demo",
            "--no-serve",
            "--scale",
            "0.02",
            "--dir",
            demo.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A malformed policy is rejected with every problem and its line, before anything runs.
    std::fs::write(
        demo.join("bad.toml"),
        "version = \"bad\"\n[defaults]\narchive_after = \"3y\"\npatient_inactive_after = \"2y\"\n\n[tables.labs]\ntier = \"archive\"\n\n[tables.medications]\ncurrent_when = { column = \"state\", values = [\"active\"] }\n",
    )
    .unwrap();
    let check = strata(&["policy", "check", "bad.toml"], &demo);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success());
    assert!(
        stderr.contains("line 6: [tables.labs]: no such table"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "line 9: [tables.medications] current_when: no column \"state\" in table medications"
        ),
        "{stderr}"
    );
    std::fs::write(demo.join("bad-duration.toml"), "version = \"bad\"\n[defaults]\narchive_after = \"3 years\"\npatient_inactive_after = \"2y\"\n").unwrap();
    let check = strata(&["policy", "check", "bad-duration.toml"], &demo);
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("line 3"),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(strata(&["policy", "check"], &demo).status.success());

    // Explain one record.
    let explain = strata(&["explain", "encounters", "1"], &demo);
    let text = String::from_utf8_lossy(&explain.stdout);
    assert!(
        explain.status.success(),
        "{}",
        String::from_utf8_lossy(&explain.stderr)
    );
    assert!(text.starts_with("encounters 1: "), "{text}");
    assert!(
        text.contains("patient last activity: ") && text.contains("rules, in precedence order:"),
        "{text}"
    );
    assert!(!strata(&["explain", "encounters", "999999999"], &demo)
        .status
        .success());

    // Place a hold (who and why are required), see it in the plan, release it.
    let place = strata(
        &[
            "hold",
            "place",
            "--patient",
            "1",
            "--by",
            "rm-1",
            "--reason",
            "matter 17",
        ],
        &demo,
    );
    assert!(
        place.status.success(),
        "{}",
        String::from_utf8_lossy(&place.stderr)
    );
    let id = String::from_utf8_lossy(&place.stdout).trim().to_string();
    let plan = strata(&["plan", "--json"], &demo);
    let json: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(json["plan"]["holds"][0], id.as_str());
    let held: u64 = json["plan"]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["held_rows"].as_u64().unwrap())
        .sum();
    assert!(held > 0);
    assert!(!strata(
        &["hold", "release", &id, "--by", "rm-1", "--reason", ""],
        &demo
    )
    .status
    .success());
    assert!(strata(
        &[
            "hold",
            "release",
            &id,
            "--by",
            "rm-2",
            "--reason",
            "matter closed"
        ],
        &demo
    )
    .status
    .success());
    let list: serde_json::Value =
        serde_json::from_slice(&strata(&["hold", "list"], &demo).stdout).unwrap();
    assert_eq!(list[0]["placed_by"], "rm-1");
    assert_eq!(list[0]["released"][0], "rm-2");
    // The second plan is compared with the first.
    let plan = strata(&["plan"], &demo);
    assert!(String::from_utf8_lossy(&plan.stdout).contains("since the previous plan"));
}

#[tokio::test]
async fn pyarrow_reads_the_archive_through_its_kms_client_and_fails_without_the_key() {
    let python = std::env::var("STRATA_TEST_PYTHON")
        .expect("STRATA_TEST_PYTHON is not set: run the suite with ./scripts/test");
    let (dir, _source, archive) = migrated_sqlite(0.03).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/read_archive.py");
    let kek = std::fs::read_to_string(dir.path().join("kek.hex")).unwrap();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(&python)
            .arg(&script)
            .arg(dir.path().join("archive"))
            .arg("test-kek")
            .args(extra)
            .env("STRATA_KEK", kek.trim())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let read = run(&[]);
    let mut files = 0;
    for manifests in archive.catalog().tables.values() {
        for f in manifests.iter().flat_map(|m| &m.files) {
            assert_eq!(read[&f.path].as_u64(), Some(f.rows), "{}", f.path);
            files += 1;
        }
    }
    assert!(files > 5);
    let without = run(&["--no-key"]);
    for (path, message) in without.as_object().unwrap() {
        assert_ne!(message, "READ WITHOUT KEY", "{path}");
    }
}

/// Runs `strata archive verify` on a test's config; returns (success, stdout + stderr).
fn verify_archive(dir: &Path) -> (bool, String) {
    let out = strata(&["archive", "verify", "--config", "strata.toml"], dir);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn tampering_is_detected_by_reads_and_by_verify() {
    let (dir, _source, archive) = migrated_sqlite(0.05).await;
    let (ok, out) = verify_archive(dir.path());
    assert!(ok, "{out}");
    assert!(out.contains("archive verified"), "{out}");
    let root = dir.path().join("archive");
    let files: Vec<strata_archive::FileEntry> = archive
        .catalog()
        .tables
        .values()
        .flatten()
        .flat_map(|m| m.files.clone())
        .collect();
    let (a, b) = (&files[0], &files[1]);
    let docs = &archive.catalog().tables["documents"][0].files[0];
    let batch = &archive.read_file(docs).await.unwrap()[0];
    let blob = strata_archive::blob_refs(batch, &["content".to_string()]).remove(0);
    let blob_path = root.join(strata_archive::BlobStore::object_path(&blob.object));

    type Tamper = Box<dyn Fn(&Path)>;
    let path_a = root.join(&a.path);
    let path_b = root.join(&b.path);
    let cases: Vec<(&str, Vec<std::path::PathBuf>, Tamper, String)> = vec![
        (
            "flip a byte in a Parquet file",
            vec![path_a.clone()],
            Box::new(|p: &Path| {
                let mut bytes = std::fs::read(p).unwrap();
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x40;
                std::fs::write(p, bytes).unwrap();
            }),
            a.path.clone(),
        ),
        (
            "truncate a Parquet file",
            vec![path_a.clone()],
            Box::new(|p: &Path| {
                let bytes = std::fs::read(p).unwrap();
                std::fs::write(p, &bytes[..bytes.len() - 100]).unwrap();
            }),
            a.path.clone(),
        ),
        (
            "delete a Parquet file",
            vec![path_a.clone()],
            Box::new(|p: &Path| std::fs::remove_file(p).unwrap()),
            a.path.clone(),
        ),
        (
            "flip a byte in a BLOB",
            vec![blob_path.clone()],
            Box::new(|p: &Path| {
                let mut bytes = std::fs::read(p).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                std::fs::write(p, bytes).unwrap();
            }),
            strata_archive::BlobStore::object_path(&blob.object),
        ),
        (
            "truncate a BLOB",
            vec![blob_path.clone()],
            Box::new(|p: &Path| {
                let bytes = std::fs::read(p).unwrap();
                std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap();
            }),
            strata_archive::BlobStore::object_path(&blob.object),
        ),
    ];
    for (what, touched, tamper, object) in cases {
        let saved: Vec<Vec<u8>> = touched.iter().map(|p| std::fs::read(p).unwrap()).collect();
        tamper(&touched[0]);
        let (ok, out) = verify_archive(dir.path());
        assert!(!ok, "{what}: verify passed:\n{out}");
        assert!(
            out.contains(&format!("integrity error in {object}")),
            "{what}:\n{out}"
        );
        for (p, bytes) in touched.iter().zip(saved) {
            std::fs::write(p, bytes).unwrap();
        }
    }
    // Reads fail closed too: a flipped Parquet byte is an integrity error, never data.
    let saved = std::fs::read(&path_a).unwrap();
    let mut bytes = saved.clone();
    bytes[10] ^= 1;
    std::fs::write(&path_a, bytes).unwrap();
    assert!(matches!(
        archive.read_file(a).await,
        Err(strata_archive::ArchiveError::Integrity { .. })
    ));
    std::fs::write(&path_a, &saved).unwrap();

    // Swapping two files: both are reported.
    let (sa, sb) = (
        std::fs::read(&path_a).unwrap(),
        std::fs::read(&path_b).unwrap(),
    );
    std::fs::write(&path_a, &sb).unwrap();
    std::fs::write(&path_b, &sa).unwrap();
    let (ok, out) = verify_archive(dir.path());
    assert!(
        !ok && out.contains(&a.path) && out.contains(&b.path),
        "{out}"
    );
    std::fs::write(&path_a, &sa).unwrap();
    std::fs::write(&path_b, &sb).unwrap();

    // An edited manifest (pointing at a tampered file's new digest) is refused.
    let manifest_path = root.join(strata_archive::TableManifest::path(
        &archive.catalog().tables["documents"][0].table,
        &archive.catalog().tables["documents"][0].run_id,
    ));
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    std::fs::write(
        &manifest_path,
        text.replacen("\"rows\": ", "\"rows\": 1", 1),
    )
    .unwrap();
    let (ok, out) = verify_archive(dir.path());
    assert!(!ok && out.contains("manifest was modified"), "{out}");
    std::fs::write(&manifest_path, text).unwrap();
    assert!(verify_archive(dir.path()).0);
}

#[tokio::test]
async fn a_migration_archives_to_s3_and_reads_back() {
    let dir = TestDir::new();
    let source = generate_sqlite(dir.path(), 0.03).await;
    let config_path = write_sqlite_config(dir.path(), &source, &example_policy());
    let location = blobs::s3_location("archive");
    let text = std::fs::read_to_string(&config_path).unwrap().replace(
        "location = \"archive\"",
        &format!("location = \"{location}\""),
    );
    std::fs::write(&config_path, text).unwrap();
    let report = migrate(&config_path).await;
    let config = load_config(&config_path);
    let counts = tier_counts(&config).await;
    assert_tiers_add_up(&counts);
    assert_report_matches(&report, &counts);
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let verified = archive.verify().await.unwrap();
    assert!(verified.problems.is_empty(), "{:?}", verified.problems);
    assert_eq!(
        verified.rows,
        counts.values().map(|c| c.archive).sum::<u64>()
    );
    assert!(verified.blobs > 0);
    let (ok, out) = verify_archive(dir.path());
    assert!(ok, "{out}");
}

/// SHA-256 of every data object of an archive directory (Parquet files and BLOB objects, not
/// their key material).
fn data_digests(root: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                stack.push(p);
            } else if !name.ends_with(".key") && !name.ends_with(".json") {
                out.insert(
                    p.strip_prefix(root).unwrap().display().to_string(),
                    hex::encode(Sha256::digest(std::fs::read(&p).unwrap())),
                );
            }
        }
    }
    out
}

#[tokio::test]
async fn rotating_the_kek_rewraps_keys_without_rewriting_data() {
    let python = std::env::var("STRATA_TEST_PYTHON")
        .expect("STRATA_TEST_PYTHON is not set: run the suite with ./scripts/test");
    let (dir, _source, _archive) = migrated_sqlite(0.03).await;
    let root = dir.path().join("archive");
    let before = data_digests(&root);
    assert!(before.len() > 10);
    // New KEK current, old one kept until the rotation has finished.
    std::fs::write(
        dir.path().join("kek-2.hex"),
        strata_archive::Kek::generate_hex(),
    )
    .unwrap();
    let config_path = dir.path().join("strata.toml");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let rotating = text
        .replace("kek_id = \"test-kek\"", "kek_id = \"test-kek-2\"")
        .replace(
            "kek_file = \"kek.hex\"",
            "kek_file = \"kek-2.hex\"\nprevious_keks = [{ id = \"test-kek\", file = \"kek.hex\" }]",
        );
    std::fs::write(&config_path, &rotating).unwrap();
    let out = strata(&["archive", "rotate-key"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The old KEK is no longer needed: remove it from the config and from disk.
    std::fs::write(
        &config_path,
        text.replace("kek_id = \"test-kek\"", "kek_id = \"test-kek-2\"")
            .replace("kek_file = \"kek.hex\"", "kek_file = \"kek-2.hex\""),
    )
    .unwrap();
    let old = std::fs::read_to_string(dir.path().join("kek.hex")).unwrap();
    std::fs::remove_file(dir.path().join("kek.hex")).unwrap();
    let (ok, out) = verify_archive(dir.path());
    assert!(ok, "{out}");
    assert_eq!(data_digests(&root), before, "no data object was rewritten");
    // pyarrow reads with the new KEK only; the old one no longer opens anything.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/read_archive.py");
    let new = std::fs::read_to_string(dir.path().join("kek-2.hex")).unwrap();
    let read = std::process::Command::new(&python)
        .arg(&script)
        .arg(&root)
        .arg("test-kek-2")
        .env("STRATA_KEK", new.trim())
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let stale = std::process::Command::new(&python)
        .arg(&script)
        .arg(&root)
        .arg("test-kek")
        .env("STRATA_KEK", old.trim())
        .output()
        .unwrap();
    assert!(!stale.status.success());
}

#[tokio::test]
async fn the_catalog_is_mirrored_in_the_control_database_and_rebuilt_from_the_archive() {
    let (dir, _source, archive) = migrated_sqlite(0.03).await;
    let expected: std::collections::BTreeMap<String, u64> = archive
        .catalog()
        .tables
        .iter()
        .map(|(t, ms)| (t.clone(), ms.iter().map(|m| m.files.len() as u64).sum()))
        .collect();
    let control_path = dir.path().join("control.db");
    let control = strata_control::Control::open(&format!("sqlite://{}", control_path.display()))
        .await
        .unwrap();
    assert_eq!(control.mirrored_files().await.unwrap(), expected);
    control.close().await;
    // The control database is lost: the archive still verifies on its own, and the mirror is
    // rebuilt from its manifests.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", control_path.display()));
    }
    let (ok, out) = verify_archive(dir.path());
    assert!(ok, "{out}");
    let out = strata(&["archive", "sync-catalog"], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let control = strata_control::Control::open(&format!("sqlite://{}", control_path.display()))
        .await
        .unwrap();
    assert_eq!(control.mirrored_files().await.unwrap(), expected);
}

#[tokio::test]
async fn a_record_archived_again_supersedes_its_earlier_copy() {
    let (dir, source, archive) = migrated_sqlite(0.03).await;
    // An archived lab result, corrected in the source after the first run.
    let file = &archive.catalog().tables["lab_results"][0].files[0];
    let batch = &archive.read_file(file).await.unwrap()[0];
    use arrow::array::AsArray;
    let patient = batch.column(0).as_string::<i32>().value(0).to_string();
    let id = batch
        .column_by_name("id")
        .unwrap()
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0);
    let db = Db::connect(&source, false).await.unwrap();
    db.execute(&format!(
        "UPDATE lab_results SET value_num = 4242.5 WHERE id = {id}"
    ))
    .await
    .unwrap();
    db.close().await;
    let rows_for = |archive: strata_archive::ArchiveReader, patient: String| async move {
        let mut found = Vec::new();
        for b in archive.patient_rows("lab_results", &patient).await.unwrap() {
            let ids = b
                .column_by_name("id")
                .unwrap()
                .as_primitive::<arrow::datatypes::Int64Type>();
            let values = b
                .column_by_name("value_num")
                .unwrap()
                .as_primitive::<arrow::datatypes::Float64Type>();
            for i in 0..b.num_rows() {
                found.push((ids.value(i), values.value(i)));
            }
        }
        found
    };
    let before = rows_for(archive.clone(), patient.clone()).await;

    // A second run (new operational and control databases) archives into the same archive.
    let config_path = dir.path().join("strata.toml");
    let text = std::fs::read_to_string(&config_path)
        .unwrap()
        .replace("operational.db", "operational-2.db")
        .replace("control.db", "control-2.db");
    std::fs::write(&config_path, text).unwrap();
    migrate(&config_path).await;
    let config = load_config(&config_path);
    let archive = open_archive(&config.archive, &config.base_dir).await;
    assert_eq!(
        archive.catalog().tables["lab_results"].len(),
        2,
        "two manifests: the first run and the correction"
    );
    let after = rows_for(archive.clone(), patient.clone()).await;
    assert_eq!(after.len(), before.len(), "each record once: {after:?}");
    let corrected: Vec<_> = after.iter().filter(|(i, _)| *i == id).collect();
    assert_eq!(corrected, vec![&(id, 4242.5)]);
    assert!(verify_archive(dir.path()).0);

    // Compaction: one manifest replaces both; reads are unchanged; nothing is deleted yet.
    let first_run_file = dir.path().join("archive").join(&file.path);
    let out = strata(
        &["archive", "compact", "--table", "lab_results"],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let archive = open_archive(&config.archive, &config.base_dir).await;
    assert_eq!(archive.catalog().tables["lab_results"].len(), 1);
    assert!(archive.catalog().tables["lab_results"][0]
        .run_id
        .starts_with("compact-"));
    let mut compacted = rows_for(archive.clone(), patient.clone()).await;
    let mut expected = after.clone();
    compacted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    expected.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(compacted, expected);
    assert!(first_run_file.exists());
    let (ok, out) = verify_archive(dir.path());
    assert!(ok, "{out}");
    // Within the grace period gc keeps the old files; after it, they go.
    assert!(strata(&["archive", "gc"], dir.path()).status.success());
    assert!(first_run_file.exists());
    assert!(strata(&["archive", "gc", "--grace-hours", "0"], dir.path())
        .status
        .success());
    assert!(!first_run_file.exists());
    let (ok, out) = verify_archive(dir.path());
    assert!(ok, "{out}");
    assert_eq!(
        rows_for(
            open_archive(&config.archive, &config.base_dir).await,
            patient
        )
        .await
        .len(),
        after.len()
    );
}

/// A JSON value as the viewer shows it: strings as they are, other values as JSON writes them.
fn viewer_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
