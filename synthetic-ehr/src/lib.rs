//! A deterministic synthetic legacy EHR, for Strata's demo, tests and benchmarks.
//!
//! It writes a database (SQLite or PostgreSQL) shaped like a small hospital's legacy system:
//! patients (some minors, some deceased), encounters, diagnoses (ICD-10-CM), medications
//! (RxNorm, active or stopped), allergies, lab results (LOINC with UCUM units), clinical notes,
//! billing lines (CPT) and document BLOBs from a few KB to several MB, over more than twenty
//! years, with recently active patients and long-inactive ones. Like real legacy data it has
//! flaws: placeholder, missing and future dates, and (on SQLite, which allows it) text in numeric
//! columns. Every value is synthetic; the same seed and scale give the same database.
#![deny(missing_docs)]

mod codes;

use chrono::{Duration, NaiveDate, NaiveDateTime};
use codes::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use strata_ingest::{Column, ColumnType, Db, DbKind, IngestError, Value};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GeneratorOptions {
    /// Size: scale 1 is about 2,000 patients and 150,000 rows. By default, 1.0.
    pub scale: f64,
    /// Random seed. By default, 42.
    pub seed: u64,
    /// The date the data ends ("today" in the legacy system).
    pub as_of: NaiveDate,
    /// Plant flawed values (placeholder/future/missing dates, text in numeric columns where the
    /// engine allows). By default, true.
    pub flaws: bool,
    /// Largest document in bytes. By default, 4 MiB.
    pub max_document_bytes: usize,
}

impl GeneratorOptions {
    /// Defaults for a given `as_of`.
    pub fn new(as_of: NaiveDate) -> Self {
        GeneratorOptions {
            scale: 1.0,
            seed: 42,
            as_of,
            flaws: true,
            max_document_bytes: 4 << 20,
        }
    }
}

/// Rows written per table.
pub type GeneratedCounts = BTreeMap<String, u64>;

struct Table {
    name: &'static str,
    columns: Vec<Column>,
    ddl: String,
    rows: Vec<Vec<Value>>,
    bytes: usize,
    written: u64,
}

/// The declared type of a generated column: the engine's default, except `Other`, which the
/// generator uses for money amounts.
fn logical_decl(kind: DbKind, t: ColumnType) -> &'static str {
    match (kind, t) {
        (DbKind::Sqlite, ColumnType::Other) => "NUMERIC(10,2)",
        (DbKind::Postgres, ColumnType::Other) => "numeric(10,2)",
        _ => t.default_decl(kind),
    }
}

impl Table {
    /// `spec`: (name, type, not null); the first column is the primary key; `fks`: (column, table).
    fn new(
        kind: DbKind,
        name: &'static str,
        spec: &[(&str, ColumnType, bool)],
        fks: &[(&str, &str)],
    ) -> Self {
        let columns: Vec<Column> = spec
            .iter()
            .map(|(n, t, nn)| Column {
                name: n.to_string(),
                decl_type: logical_decl(kind, *t).into(),
                col_type: *t,
                nullable: !nn,
            })
            .collect();
        let mut defs: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "{} {}{}{}",
                    c.name,
                    c.decl_type,
                    if i == 0 { " PRIMARY KEY" } else { "" },
                    if c.nullable { "" } else { " NOT NULL" }
                )
            })
            .collect();
        for (c, t) in fks {
            defs.push(format!("FOREIGN KEY ({c}) REFERENCES {t}(id)"));
        }
        let ddl = format!("CREATE TABLE {name} ({})", defs.join(", "));
        Table {
            name,
            columns,
            ddl,
            rows: Vec::new(),
            bytes: 0,
            written: 0,
        }
    }

    fn push(&mut self, row: Vec<Value>) {
        self.bytes += row
            .iter()
            .map(|v| if let Value::Bytes(b) = v { b.len() } else { 16 })
            .sum::<usize>();
        self.rows.push(row);
    }

    fn full(&self, db: &Db) -> bool {
        self.rows.len() >= db.rows_per_insert(self.columns.len()) || self.bytes > 8 << 20
    }

    async fn flush(&mut self, db: &Db) -> Result<(), IngestError> {
        db.insert_rows(self.name, &self.columns, &self.rows).await?;
        self.written += self.rows.len() as u64;
        self.rows.clear();
        self.bytes = 0;
        Ok(())
    }
}

use ColumnType as T;

fn ts(d: NaiveDateTime) -> Value {
    Value::Timestamp(d)
}

fn pick<'a, R: Rng + ?Sized, X>(rng: &mut R, xs: &'a [X]) -> &'a X {
    &xs[rng.random_range(0..xs.len())]
}

/// Generates the database at `url` (its tables must not exist yet).
pub async fn generate(
    url: &str,
    options: &GeneratorOptions,
) -> Result<GeneratedCounts, IngestError> {
    let db = Db::connect(url, false).await?;
    let counts = generate_into(&db, options).await;
    db.close().await;
    counts
}

/// Generates into an open database.
pub async fn generate_into(db: &Db, o: &GeneratorOptions) -> Result<GeneratedCounts, IngestError> {
    let k = db.kind();
    let mut rng = ChaCha8Rng::seed_from_u64(o.seed);
    let mut patients = Table::new(
        k,
        "patients",
        &[
            ("id", T::Int, true),
            ("mrn", T::Text, true),
            ("given_name", T::Text, true),
            ("family_name", T::Text, true),
            ("sex", T::Text, true),
            ("birth_date", T::Date, true),
            ("deceased_date", T::Date, false),
            ("postal_code", T::Text, false),
            ("created_at", T::Timestamp, true),
        ],
        &[],
    );
    let mut encounters = Table::new(
        k,
        "encounters",
        &[
            ("id", T::Int, true),
            ("patient_id", T::Int, true),
            ("started_at", T::Timestamp, false),
            ("ended_at", T::Timestamp, false),
            ("encounter_class", T::Text, true),
            ("reason_icd10", T::Text, false),
            ("provider_npi", T::Text, false),
        ],
        &[("patient_id", "patients")],
    );
    let mut diagnoses = Table::new(
        k,
        "diagnoses",
        &[
            ("id", T::Int, true),
            ("encounter_id", T::Int, true),
            ("icd10_code", T::Text, true),
            ("description", T::Text, true),
            ("status", T::Text, true),
            ("recorded_at", T::Date, false),
        ],
        &[("encounter_id", "encounters")],
    );
    let mut medications = Table::new(
        k,
        "medications",
        &[
            ("id", T::Int, true),
            ("patient_id", T::Int, true),
            ("rxnorm_code", T::Text, true),
            ("drug_name", T::Text, true),
            ("dose", T::Text, false),
            ("status", T::Text, true),
            ("started_on", T::Date, false),
            ("stopped_on", T::Date, false),
        ],
        &[("patient_id", "patients")],
    );
    let mut allergies = Table::new(
        k,
        "allergies",
        &[
            ("id", T::Int, true),
            ("patient_id", T::Int, true),
            ("substance", T::Text, true),
            ("reaction", T::Text, false),
            ("severity", T::Text, false),
            ("status", T::Text, true),
            ("recorded_on", T::Date, false),
        ],
        &[("patient_id", "patients")],
    );
    let mut labs = Table::new(
        k,
        "lab_results",
        &[
            ("id", T::Int, true),
            ("encounter_id", T::Int, true),
            ("loinc_code", T::Text, true),
            ("test_name", T::Text, true),
            ("value_num", T::Float, false),
            ("unit", T::Text, false),
            ("observed_at", T::Timestamp, false),
            ("status", T::Text, true),
        ],
        &[("encounter_id", "encounters")],
    );
    let mut notes = Table::new(
        k,
        "clinical_notes",
        &[
            ("id", T::Int, true),
            ("encounter_id", T::Int, true),
            ("author_npi", T::Text, false),
            ("note_type", T::Text, true),
            ("body", T::Text, true),
            ("written_at", T::Timestamp, false),
        ],
        &[("encounter_id", "encounters")],
    );
    let mut billing = Table::new(
        k,
        "billing_lines",
        &[
            ("id", T::Int, true),
            ("encounter_id", T::Int, true),
            ("cpt_code", T::Text, true),
            ("amount", T::Other, true),
            ("billed_on", T::Date, false),
        ],
        &[("encounter_id", "encounters")],
    );
    let mut documents = Table::new(
        k,
        "documents",
        &[
            ("id", T::Int, true),
            ("patient_id", T::Int, true),
            ("encounter_id", T::Int, false),
            ("title", T::Text, true),
            ("mime_type", T::Text, true),
            ("content", T::Bytes, true),
            ("created_at", T::Timestamp, false),
        ],
        &[("patient_id", "patients"), ("encounter_id", "encounters")],
    );
    for t in [
        &patients,
        &encounters,
        &diagnoses,
        &medications,
        &allergies,
        &labs,
        &notes,
        &billing,
        &documents,
    ] {
        db.execute(&t.ddl).await?;
    }

    let n_patients = ((2000.0 * o.scale).round() as i64).max(5);
    let as_of = o.as_of;
    let history_start = NaiveDate::from_ymd_opt(2001, 1, 1).expect("date");
    let (mut enc_id, mut row_id) = (0i64, 0i64);
    let mut next = || {
        row_id += 1;
        row_id
    };
    let sqlite = k == DbKind::Sqlite;
    for pid in 1..=n_patients {
        // Activity profile: recent, lapsed, or long inactive.
        let profile = rng.random_range(0..100);
        let birth = as_of - Duration::days(rng.random_range(365..95 * 365));
        let first = (birth.max(history_start) + Duration::days(rng.random_range(0..2000)))
            .min(as_of - Duration::days(1));
        let last = match profile {
            0..35 => as_of - Duration::days(rng.random_range(0..540)),
            35..60 => as_of - Duration::days(rng.random_range(2 * 365..8 * 365)),
            _ => as_of - Duration::days(rng.random_range(8 * 365..24 * 365)),
        }
        .max(first);
        let deceased = (rng.random_range(0..100) < 8 && profile >= 35)
            .then(|| last + Duration::days(rng.random_range(1..200)));
        let sex = if rng.random_bool(0.5) { "F" } else { "M" };
        let given = if sex == "F" {
            pick(&mut rng, GIVEN_F)
        } else {
            pick(&mut rng, GIVEN_M)
        };
        patients.push(vec![
            Value::Int(pid),
            Value::Text(format!("MRN{:08}", 10_000_000 + pid * 7919 % 9_000_000)),
            Value::Text(given.to_string()),
            Value::Text(pick(&mut rng, FAMILY).to_string()),
            Value::Text(sex.into()),
            Value::Date(birth),
            deceased.map_or(Value::Null, Value::Date),
            Value::Text(format!("{:05}", rng.random_range(1000..99999))),
            ts(first.and_hms_opt(9, 0, 0).expect("time")),
        ]);

        let span = (last - first).num_days().max(1);
        let n_enc = 1 + rng.random_range(0..(4 + span / 500).min(30));
        let mut enc_dates = Vec::new();
        for e in 0..n_enc {
            enc_id += 1;
            let day = if e == n_enc - 1 {
                last
            } else {
                first + Duration::days(rng.random_range(0..=span))
            };
            let start = day
                .and_hms_opt(rng.random_range(7..19), rng.random_range(0..60), 0)
                .expect("time");
            enc_dates.push((enc_id, start));
            let (code, _) = *pick(&mut rng, ICD10);
            encounters.push(vec![
                Value::Int(enc_id),
                Value::Int(pid),
                ts(start),
                ts(start + Duration::minutes(rng.random_range(15..240))),
                Value::Text(
                    pick(
                        &mut rng,
                        &["ambulatory", "inpatient", "emergency", "wellness"],
                    )
                    .to_string(),
                ),
                Value::Text(code.into()),
                Value::Text(npi(&mut rng)),
            ]);
            if rng.random_bool(0.8) {
                let (code, desc) = *pick(&mut rng, ICD10);
                let status = if day > as_of - Duration::days(365) && rng.random_bool(0.5) {
                    "active"
                } else {
                    "resolved"
                };
                diagnoses.push(vec![
                    Value::Int(next()),
                    Value::Int(enc_id),
                    Value::Text(code.into()),
                    Value::Text(desc.into()),
                    Value::Text(status.into()),
                    Value::Date(day),
                ]);
            }
            for _ in 0..rng.random_range(0..6) {
                let (code, name, unit, lo, hi) = *pick(&mut rng, LOINC);
                let mut observed = ts(start + Duration::minutes(rng.random_range(5..120)));
                let mut value =
                    Value::Float(((rng.random_range(lo..hi) * 10.0_f64).round()) / 10.0);
                if o.flaws {
                    match rng.random_range(0..1000) {
                        0..2 => {
                            observed = ts(NaiveDate::from_ymd_opt(1900, 1, 1)
                                .expect("date")
                                .and_hms_opt(0, 0, 0)
                                .expect("time"))
                        }
                        2 => observed = Value::Null,
                        3 => {
                            observed = ts((as_of + Duration::days(400))
                                .and_hms_opt(0, 0, 0)
                                .expect("time"))
                        }
                        4 if sqlite => value = Value::Text("see note".into()),
                        _ => {}
                    }
                }
                let status = if rng.random_range(0..50) == 0 {
                    "amended"
                } else {
                    "final"
                };
                labs.push(vec![
                    Value::Int(next()),
                    Value::Int(enc_id),
                    Value::Text(code.into()),
                    Value::Text(name.into()),
                    value,
                    Value::Text(unit.into()),
                    observed,
                    Value::Text(status.into()),
                ]);
            }
            if rng.random_bool(0.5) {
                let body = note_body(&mut rng, given);
                notes.push(vec![
                    Value::Int(next()),
                    Value::Int(enc_id),
                    Value::Text(npi(&mut rng)),
                    Value::Text(
                        pick(
                            &mut rng,
                            &["progress", "discharge", "consult", "history_and_physical"],
                        )
                        .to_string(),
                    ),
                    Value::Text(body),
                    ts(start + Duration::hours(2)),
                ]);
            }
            for _ in 0..rng.random_range(1..3) {
                let cpt = *pick(&mut rng, CPT);
                billing.push(vec![
                    Value::Int(next()),
                    Value::Int(enc_id),
                    Value::Text(cpt.into()),
                    Value::Text(format!(
                        "{}.{:02}",
                        rng.random_range(20..900),
                        rng.random_range(0..100)
                    )),
                    Value::Date((day + Duration::days(rng.random_range(1..30))).min(as_of)),
                ]);
            }
        }
        for _ in 0..rng.random_range(0..5) {
            let (code, name, dose) = *pick(&mut rng, RXNORM);
            let started = first + Duration::days(rng.random_range(0..=span));
            let started = started.min(as_of);
            let active =
                deceased.is_none() && last > as_of - Duration::days(730) && rng.random_bool(0.5);
            let stopped =
                (!active).then(|| (started + Duration::days(rng.random_range(10..800))).min(as_of));
            medications.push(vec![
                Value::Int(next()),
                Value::Int(pid),
                Value::Text(code.into()),
                Value::Text(name.into()),
                Value::Text(dose.into()),
                Value::Text(if active {
                    "active".to_string()
                } else {
                    pick(&mut rng, &["stopped", "completed"]).to_string()
                }),
                Value::Date(started),
                stopped.map_or(Value::Null, Value::Date),
            ]);
        }
        if rng.random_bool(0.3) {
            let (substance, reaction) = *pick(&mut rng, ALLERGENS);
            let status = if rng.random_bool(0.8) {
                "active"
            } else {
                "resolved"
            };
            allergies.push(vec![
                Value::Int(next()),
                Value::Int(pid),
                Value::Text(substance.into()),
                Value::Text(reaction.into()),
                Value::Text(pick(&mut rng, &["mild", "moderate", "severe"]).to_string()),
                Value::Text(status.into()),
                Value::Date(first + Duration::days(rng.random_range(0..=span))),
            ]);
        }
        if rng.random_bool(0.1) {
            let (eid, start) = *pick(&mut rng, &enc_dates);
            let (title, mime, content) = document(&mut rng, o.max_document_bytes);
            documents.push(vec![
                Value::Int(next()),
                Value::Int(pid),
                Value::Int(eid),
                Value::Text(title),
                Value::Text(mime.into()),
                Value::Bytes(content),
                ts(start + Duration::hours(1)),
            ]);
        }
        // Parents are flushed before children, so foreign keys hold at every statement.
        let mut all = [
            &mut patients,
            &mut encounters,
            &mut diagnoses,
            &mut medications,
            &mut allergies,
            &mut labs,
            &mut notes,
            &mut billing,
            &mut documents,
        ];
        if all.iter().any(|t| t.full(db)) {
            for t in all.iter_mut() {
                t.flush(db).await?;
            }
        }
    }
    let mut counts = GeneratedCounts::new();
    let mut tables = [
        patients,
        encounters,
        diagnoses,
        medications,
        allergies,
        labs,
        notes,
        billing,
        documents,
    ];
    for t in tables.iter_mut() {
        t.flush(db).await?;
        counts.insert(t.name.to_string(), t.written);
    }
    Ok(counts)
}

fn npi<R: Rng>(rng: &mut R) -> String {
    // Ten digits whose Luhn check (with the 80840 prefix) holds, like a real NPI.
    let base: Vec<u32> = std::iter::once(1)
        .chain((0..8).map(|_| rng.random_range(0..10)))
        .collect();
    let mut sum = 24; // the constant for the 80840 prefix
    for (i, d) in base.iter().rev().enumerate() {
        let mut x = *d;
        if i % 2 == 0 {
            x *= 2;
            if x > 9 {
                x -= 9;
            }
        }
        sum += x;
    }
    let check = (10 - sum % 10) % 10;
    base.iter()
        .map(|d| char::from_digit(*d, 10).expect("digit"))
        .chain(std::iter::once(char::from_digit(check, 10).expect("digit")))
        .collect()
}

fn note_body<R: Rng>(rng: &mut R, given: &str) -> String {
    let mut s = format!("Patient {given} seen today. ");
    for _ in 0..rng.random_range(3..12) {
        let sentence = pick::<_, &str>(rng, NOTE_SENTENCES);
        s.push_str(sentence);
        s.push(' ');
    }
    s
}

fn document<R: Rng>(rng: &mut R, max: usize) -> (String, &'static str, Vec<u8>) {
    let size = match rng.random_range(0..100) {
        0..80 => rng.random_range(2_000..40_000),
        80..95 => rng.random_range(40_000..500_000),
        _ => rng.random_range(1_000_000..4_200_000),
    }
    .min(max);
    let (title, mime) = *pick(rng, DOCUMENT_KINDS);
    let mut content = Vec::with_capacity(size);
    if mime == "text/plain" {
        while content.len() < size {
            content.extend_from_slice((*pick(rng, NOTE_SENTENCES)).as_bytes());
            content.push(b' ');
        }
        content.truncate(size);
    } else {
        let header: &[u8] = if mime == "application/pdf" {
            b"%PDF-1.4\n%synthetic\n"
        } else {
            b"\xff\xd8\xff\xe0synthetic"
        };
        content.extend_from_slice(header);
        content.resize(size.max(header.len()), 0);
        rng.fill(&mut content[header.len()..]);
    }
    (title.to_string(), mime, content)
}
