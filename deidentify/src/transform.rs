//! De-identifying one archived table's rows: which columns leave under a profile, under what
//! names, and the transformation of each (pseudonyms, years, shifted dates, ZIP3, ages).
//!
//! A [`TablePlan`] is made once per table from the table's archived schema (merged over its
//! files), its column classes and the profile; it then turns batches of archived rows into
//! batches of exported rows. A column leaves only if it has a class and the profile has a rule
//! for that class; every other column is listed in [`TablePlan::removed`] with the reason.

use crate::class::{Class, TableClasses, PATIENT_DOMAIN};
use crate::profile::{Action, Profile};
use crate::pseudonym::PseudonymKey;
use crate::scan::ScanColumn;
use crate::zip3::RestrictedZip3;
use arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::compute::kernels::temporal::{date_part, DatePart};
use arrow::compute::{cast, cast_with_options, CastOptions};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use chrono::{Datelike, NaiveDate};
use std::sync::Arc;
use strata_archive::{KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN};

/// The name of the patient's pseudonym column in every exported table.
pub const PATIENT_PSEUDONYM: &str = "patient_pseudonym";

/// What an export needs besides the profile: the key of its pseudonyms and date shifts, the
/// day ages are counted to, and the restricted ZIP3 list.
#[derive(Debug, Clone)]
pub struct ExportContext {
    /// The pseudonym key (a study's own, see [`PseudonymKey::for_study`]).
    pub key: PseudonymKey,
    /// Ages (for `90+`) are counted to this day: the day of the export.
    pub as_of: NaiveDate,
    /// Three-digit ZIP codes released as `000`.
    pub zip3: Arc<RestrictedZip3>,
}

/// One exported column.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputColumn {
    /// Its name in the export.
    pub name: String,
    /// The archived column it comes from.
    pub source: String,
    /// Its class.
    pub class: Class,
    /// What is done to its values.
    pub action: Action,
    domain: String,
    input: usize,
    data_type: DataType,
}

/// How one table's archived rows become exported rows.
#[derive(Debug, Clone)]
pub struct TablePlan {
    /// The table.
    pub table: String,
    /// The exported columns, in order: the patient's pseudonym, the record's date (or year),
    /// then the table's columns the profile lets out.
    pub columns: Vec<OutputColumn>,
    /// The archived columns that do not leave, each with the reason.
    pub removed: Vec<(String, String)>,
    input: SchemaRef,
    output: SchemaRef,
    patient: usize,
    record_keys: Vec<usize>,
}

fn internal(name: &str) -> bool {
    name == PATIENT_COLUMN || name == RECORD_DATE_COLUMN || name == KEY_COLUMN
}

fn output_type(action: Action, class: Class, input: &DataType) -> DataType {
    match action {
        Action::Pseudonym | Action::Zip3 | Action::Age90 => DataType::Utf8,
        Action::Year if class == Class::BirthDate => DataType::Utf8,
        Action::Year => DataType::Int32,
        Action::Shift => match input {
            DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Microsecond, tz.clone()),
            _ => DataType::Date32,
        },
        Action::Keep | Action::Drop => input.clone(),
    }
}

impl TablePlan {
    /// The plan for `table`, whose archived rows have `schema` (merged over its files), under
    /// `profile`. `requested` limits the columns (archived names); asking for a column the
    /// profile does not let out is an error that names it and says why.
    pub fn new(
        table: &str,
        schema: SchemaRef,
        classes: &TableClasses,
        profile: &Profile,
        requested: Option<&[String]>,
    ) -> Result<TablePlan, String> {
        let index = |name: &str| {
            schema
                .index_of(name)
                .map_err(|_| format!("table {table} is not in the archive's layout (no {name})"))
        };
        let patient = index(PATIENT_COLUMN)?;
        let date = index(RECORD_DATE_COLUMN)?;
        let mut columns = Vec::new();
        let mut removed = Vec::new();
        let patient_action = profile.action(Class::PatientKey);
        if patient_action != Action::Drop {
            columns.push(OutputColumn {
                name: PATIENT_PSEUDONYM.into(),
                source: PATIENT_COLUMN.into(),
                class: Class::PatientKey,
                action: patient_action,
                domain: PATIENT_DOMAIN.into(),
                input: patient,
                data_type: DataType::Utf8,
            });
        }
        let date_action = profile.action(Class::Date);
        if date_action != Action::Drop {
            columns.push(OutputColumn {
                name: if date_action == Action::Year {
                    "record_year".into()
                } else {
                    "record_date".into()
                },
                source: RECORD_DATE_COLUMN.into(),
                class: Class::Date,
                action: date_action,
                domain: String::new(),
                input: date,
                data_type: output_type(date_action, Class::Date, &DataType::Date32),
            });
        }
        if let Some(wanted) = requested {
            for w in wanted {
                let Ok(field) = schema.field_with_name(w) else {
                    return Err(format!("table {table} has no column {w:?}"));
                };
                if internal(w) {
                    return Err(format!(
                        "column {w:?} of {table} is Strata's own: the patient and the record date leave as {PATIENT_PSEUDONYM} and record_year or record_date"
                    ));
                }
                match classes.class_of(w, field.data_type()) {
                    None => {
                        return Err(format!(
                            "column {w:?} of {table} has no class, so it never leaves: give it one in strata.toml ([tables.{table}.columns.{w}] class = ...)"
                        ))
                    }
                    Some(c) if profile.action(c.class) == Action::Drop => {
                        return Err(format!(
                            "profile {} does not let out column {w:?} of {table} (class {})",
                            profile.name, c.class
                        ))
                    }
                    Some(_) => {}
                }
            }
        }
        for (i, field) in schema.fields().iter().enumerate() {
            let name = field.name();
            if internal(name) {
                continue;
            }
            let Some(class) = classes.class_of(name, field.data_type()) else {
                removed.push((name.clone(), "no class".to_string()));
                continue;
            };
            let action = profile.action(class.class);
            if action == Action::Drop {
                removed.push((
                    name.clone(),
                    format!("class {}: not let out by {}", class.class, profile.name),
                ));
                continue;
            }
            if requested.is_some_and(|r| !r.contains(name)) {
                removed.push((name.clone(), "not requested".to_string()));
                continue;
            }
            columns.push(OutputColumn {
                name: if action == Action::Year {
                    format!("{name}_year")
                } else {
                    name.clone()
                },
                source: name.clone(),
                class: class.class,
                action,
                domain: class.domain().to_string(),
                input: i,
                data_type: output_type(action, class.class, field.data_type()),
            });
        }
        let output = Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(&c.name, c.data_type.clone(), true))
                .collect::<Vec<_>>(),
        ));
        // The record's keys: its primary key, the foreign keys to other records, and its
        // archive key (what the scanner's record-key rule compares with).
        let mut record_keys: Vec<usize> = classes
            .primary_key
            .iter()
            .filter_map(|k| schema.index_of(k).ok())
            .chain(schema.fields().iter().enumerate().filter_map(|(i, f)| {
                (classes.columns.get(f.name()).map(|c| c.class) == Some(Class::RecordKey))
                    .then_some(i)
            }))
            .chain(schema.index_of(KEY_COLUMN).ok())
            .collect();
        record_keys.sort_unstable();
        record_keys.dedup();
        Ok(TablePlan {
            table: table.to_string(),
            columns,
            removed,
            input: schema,
            output,
            patient,
            record_keys,
        })
    }

    /// The schema of the exported rows.
    pub fn output_schema(&self) -> SchemaRef {
        self.output.clone()
    }

    /// The archived schema batches are conformed to.
    pub fn input_schema(&self) -> SchemaRef {
        self.input.clone()
    }

    /// The archived columns the plan reads: Strata's own, the exported columns' sources and the
    /// record key (for the scanner).
    pub fn input_columns(&self) -> Vec<String> {
        let mut names: Vec<String> = [PATIENT_COLUMN, RECORD_DATE_COLUMN, KEY_COLUMN]
            .into_iter()
            .map(str::to_string)
            .chain(self.columns.iter().map(|c| c.source.clone()))
            .chain(
                self.record_keys
                    .iter()
                    .map(|i| self.input.field(*i).name().clone()),
            )
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// What the scanner needs to know of each exported column.
    pub fn scan_columns(&self) -> Vec<ScanColumn> {
        self.columns
            .iter()
            .map(|c| ScanColumn {
                name: c.name.clone(),
                class: Some(c.class),
                pseudonym: c.action == Action::Pseudonym,
            })
            .collect()
    }

    /// A batch of one archived file in the merged schema: columns the file lacks (added to the
    /// table later) are null; a column of another type is cast.
    pub fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
        if batch.schema().fields() == self.input.fields() {
            return Ok(batch.clone());
        }
        let n = batch.num_rows();
        let columns = self
            .input
            .fields()
            .iter()
            .map(|f| match batch.column_by_name(f.name()) {
                Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
                Some(c) => cast(c, f.data_type()),
                None => Ok(arrow::array::new_null_array(f.data_type(), n)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        RecordBatch::try_new(self.input.clone(), columns)
    }

    /// The source keys of a conformed batch's rows, for the scanner's key-copy rule: the
    /// patient key, then the record's key columns.
    pub fn row_keys(&self, batch: &RecordBatch) -> (ArrayRef, Vec<ArrayRef>) {
        (
            batch.column(self.patient).clone(),
            self.record_keys
                .iter()
                .map(|i| batch.column(*i).clone())
                .collect(),
        )
    }

    /// De-identifies a conformed batch.
    pub fn apply(
        &self,
        batch: &RecordBatch,
        ctx: &ExportContext,
    ) -> Result<RecordBatch, ArrowError> {
        let patients = batch.column(self.patient).as_string::<i32>();
        let mut shifts: Option<Vec<i32>> = None;
        let mut out = Vec::with_capacity(self.columns.len());
        for c in &self.columns {
            let input = batch.column(c.input);
            let array: ArrayRef = match c.action {
                Action::Keep | Action::Drop => input.clone(),
                Action::Pseudonym if c.source == PATIENT_COLUMN => {
                    pseudonyms(&ctx.key, &c.domain, patients, true)
                }
                Action::Pseudonym => {
                    let text = cast(input, &DataType::Utf8)?;
                    pseudonyms(&ctx.key, &c.domain, text.as_string::<i32>(), false)
                }
                Action::Year if c.class == Class::BirthDate => {
                    birth_years(&naive(input), ctx.as_of)?
                }
                Action::Year => cast(
                    &date_part(naive(input).as_ref(), DatePart::Year)?,
                    &DataType::Int32,
                )?,
                Action::Shift => {
                    let shifts = shifts.get_or_insert_with(|| {
                        let mut last: Option<(&str, i32)> = None;
                        (0..patients.len())
                            .map(|i| {
                                let p = patients.value(i);
                                match last {
                                    Some((q, s)) if q == p => s,
                                    _ => {
                                        let s = ctx.key.shift_days(p);
                                        last = Some((p, s));
                                        s
                                    }
                                }
                            })
                            .collect()
                    });
                    shift(input, shifts)?
                }
                Action::Zip3 => {
                    let text = cast(input, &DataType::Utf8)?;
                    Arc::new(
                        text.as_string::<i32>()
                            .iter()
                            .map(|v| v.and_then(|z| ctx.zip3.zip3(z)))
                            .collect::<StringArray>(),
                    )
                }
                Action::Age90 => ages(input)?,
            };
            out.push(array);
        }
        RecordBatch::try_new(self.output.clone(), out)
    }
}

/// Pseudonyms of `values` in `domain`; nulls (and, for the patient column, empty keys) stay
/// null. Runs of the same value (rows are sorted by patient) are computed once.
fn pseudonyms(key: &PseudonymKey, domain: &str, values: &StringArray, patient: bool) -> ArrayRef {
    let mut last: Option<(&str, String)> = None;
    let out: StringArray = values
        .iter()
        .map(|v| {
            let v = v.filter(|v| !(patient && v.is_empty()))?;
            match &last {
                Some((prev, p)) if *prev == v => Some(p.clone()),
                _ => {
                    let p = key.pseudonym(domain, v);
                    last = Some((v, p.clone()));
                    Some(p)
                }
            }
        })
        .collect();
    Arc::new(out)
}

/// A timestamp column without its time zone's name: archived timestamps hold UTC instants,
/// and arrow's calendar kernels read only offsets, not names such as "UTC" (without chrono-tz).
fn naive(input: &ArrayRef) -> ArrayRef {
    use arrow::datatypes::{
        TimestampMicrosecondType as Us, TimestampMillisecondType as Ms,
        TimestampNanosecondType as Ns, TimestampSecondType as S,
    };
    match input.data_type() {
        DataType::Timestamp(unit, Some(_)) => match unit {
            TimeUnit::Second => Arc::new(
                input
                    .as_primitive::<S>()
                    .clone()
                    .with_timezone_opt(None::<String>),
            ),
            TimeUnit::Millisecond => Arc::new(
                input
                    .as_primitive::<Ms>()
                    .clone()
                    .with_timezone_opt(None::<String>),
            ),
            TimeUnit::Microsecond => Arc::new(
                input
                    .as_primitive::<Us>()
                    .clone()
                    .with_timezone_opt(None::<String>),
            ),
            TimeUnit::Nanosecond => Arc::new(
                input
                    .as_primitive::<Ns>()
                    .clone()
                    .with_timezone_opt(None::<String>),
            ),
        },
        _ => input.clone(),
    }
}

/// Years of birth, `90+` for anyone aged 90 or over on `as_of`.
fn birth_years(input: &ArrayRef, as_of: NaiveDate) -> Result<ArrayRef, ArrowError> {
    let dates = cast(input, &DataType::Date32)?;
    let dates = dates.as_primitive::<arrow::datatypes::Date32Type>();
    Ok(Arc::new(
        dates
            .iter()
            .map(|d| {
                let d = d.and_then(arrow::datatypes::Date32Type::to_naive_date_opt)?;
                let mut age = as_of.year() - d.year();
                if (as_of.month(), as_of.day()) < (d.month(), d.day()) {
                    age -= 1;
                }
                Some(if age >= 90 {
                    "90+".to_string()
                } else {
                    d.year().to_string()
                })
            })
            .collect::<StringArray>(),
    ))
}

/// Ages, `90+` over 89.
fn ages(input: &ArrayRef) -> Result<ArrayRef, ArrowError> {
    let numbers = cast_with_options(
        input,
        &DataType::Float64,
        &CastOptions {
            safe: true,
            ..Default::default()
        },
    )?;
    let numbers = numbers.as_primitive::<arrow::datatypes::Float64Type>();
    Ok(Arc::new(
        numbers
            .iter()
            .map(|a| {
                let a = a.filter(|a| a.is_finite())?;
                Some(if a > 89.0 {
                    "90+".to_string()
                } else if a.fract() == 0.0 {
                    format!("{a:.0}")
                } else {
                    a.to_string()
                })
            })
            .collect::<StringArray>(),
    ))
}

/// Dates and timestamps moved by each row's days.
fn shift(input: &ArrayRef, days: &[i32]) -> Result<ArrayRef, ArrowError> {
    const MICROS_PER_DAY: i64 = 86_400_000_000;
    match input.data_type() {
        DataType::Timestamp(_, tz) => {
            let ts = cast(
                &naive(input),
                &DataType::Timestamp(TimeUnit::Microsecond, None),
            )?;
            let ts = ts.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            let shifted: TimestampMicrosecondArray = ts
                .iter()
                .zip(days)
                .map(|(t, d)| t.map(|t| t + *d as i64 * MICROS_PER_DAY))
                .collect();
            Ok(Arc::new(shifted.with_timezone_opt(tz.clone())))
        }
        _ => {
            let dates = cast(input, &DataType::Date32)?;
            let dates = dates.as_primitive::<arrow::datatypes::Date32Type>();
            Ok(Arc::new(
                dates
                    .iter()
                    .zip(days)
                    .map(|(v, d)| v.map(|v| v + d))
                    .collect::<Date32Array>(),
            ))
        }
    }
}

/// The merged schema of a table's files (a column added later appears once; types must agree).
pub fn merge_schemas(schemas: &[SchemaRef]) -> Result<SchemaRef, String> {
    let mut fields: Vec<Field> = Vec::new();
    for s in schemas {
        for f in s.fields() {
            match fields.iter().find(|g| g.name() == f.name()) {
                Some(g) if g.data_type() != f.data_type() => {
                    return Err(format!(
                        "column {} is {} in one archived file and {} in another",
                        f.name(),
                        g.data_type(),
                        f.data_type()
                    ))
                }
                Some(_) => {}
                None => fields.push(f.as_ref().clone().with_nullable(true)),
            }
        }
    }
    Ok(Arc::new(Schema::new(fields)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::class::ColumnClass;
    use crate::profile::ProfileConfig;
    use arrow::array::{Float64Array, Int64Array};

    fn archived() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new(PATIENT_COLUMN, DataType::Utf8, false),
            Field::new(RECORD_DATE_COLUMN, DataType::Date32, true),
            Field::new(KEY_COLUMN, DataType::Utf8, false),
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("dob", DataType::Date32, true),
            Field::new("zip", DataType::Utf8, true),
            Field::new("age", DataType::Float64, true),
            Field::new("code", DataType::Utf8, true),
            Field::new("added_later", DataType::Utf8, true),
            Field::new(
                "seen_at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ]));
        let day = |y, m, d| {
            arrow::datatypes::Date32Type::from_naive_date(NaiveDate::from_ymd_opt(y, m, d).unwrap())
        };
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["p1", "p1", "p2"])),
                Arc::new(Date32Array::from(vec![
                    Some(day(2019, 3, 4)),
                    None,
                    Some(day(2020, 1, 1)),
                ])),
                Arc::new(StringArray::from(vec!["id=1", "id=2", "id=3"])),
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec!["Ann", "Ann", "Bo"])),
                Arc::new(Date32Array::from(vec![
                    Some(day(1930, 1, 1)),
                    Some(day(1930, 1, 1)),
                    Some(day(1990, 7, 1)),
                ])),
                Arc::new(StringArray::from(vec![
                    Some("03601"),
                    Some("07302-1234"),
                    None,
                ])),
                Arc::new(Float64Array::from(vec![Some(96.0), Some(89.0), Some(36.5)])),
                Arc::new(StringArray::from(vec!["E11.9", "I10", "I10"])),
                Arc::new(StringArray::from(vec!["x", "y", "z"])),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![
                        Some(1_600_000_000_000_000),
                        None,
                        Some(0),
                    ])
                    .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap()
    }

    fn classes() -> TableClasses {
        let mut t = TableClasses::default();
        for (c, class) in [
            ("id", Class::RecordKey),
            ("name", Class::Name),
            ("dob", Class::BirthDate),
            ("zip", Class::Zip),
            ("age", Class::Age),
            ("code", Class::Code),
        ] {
            t.columns.insert(c.into(), ColumnClass::of(class));
        }
        t.columns.get_mut("id").unwrap().domain = Some("labs".into());
        t.primary_key = vec!["id".into()];
        t
    }

    fn ctx(key: u8) -> ExportContext {
        ExportContext {
            key: PseudonymKey::new(&[key; 32]),
            as_of: NaiveDate::from_ymd_opt(2026, 6, 30).unwrap(),
            zip3: Arc::default(),
        }
    }

    #[test]
    fn safe_harbor_lets_out_only_classified_columns_generalised() {
        let batch = archived();
        let plan = TablePlan::new(
            "labs",
            batch.schema(),
            &classes(),
            &Profile::safe_harbor(),
            None,
        )
        .unwrap();
        let names: Vec<&str> = plan.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "patient_pseudonym",
                "record_year",
                "id",
                "dob_year",
                "zip",
                "age",
                "code",
                "seen_at_year"
            ]
        );
        let removed: Vec<&str> = plan.removed.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(removed, ["name", "added_later"]);
        let out = plan.apply(&batch, &ctx(1)).unwrap();
        let text = |name: &str| {
            out.column_by_name(name)
                .unwrap()
                .as_string::<i32>()
                .iter()
                .map(|v| v.map(str::to_string))
                .collect::<Vec<_>>()
        };
        let p = text("patient_pseudonym");
        assert_eq!(p[0], p[1]);
        assert_ne!(p[0], p[2]);
        assert_eq!(
            p[0].as_deref(),
            Some(ctx(1).key.pseudonym("patient", "p1").as_str())
        );
        assert_eq!(
            text("id")[0].as_deref(),
            Some(ctx(1).key.pseudonym("labs", "1").as_str())
        );
        assert_eq!(
            text("dob_year"),
            [Some("90+".into()), Some("90+".into()), Some("1990".into())]
        );
        assert_eq!(text("zip"), [Some("000".into()), Some("073".into()), None]);
        assert_eq!(
            text("age"),
            [Some("90+".into()), Some("89".into()), Some("36.5".into())]
        );
        let years = out
            .column_by_name("record_year")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int32Type>();
        assert_eq!(
            years.iter().collect::<Vec<_>>(),
            [Some(2019), None, Some(2020)]
        );
        let seen = out
            .column_by_name("seen_at_year")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int32Type>();
        assert_eq!(
            seen.iter().collect::<Vec<_>>(),
            [Some(2020), None, Some(1970)]
        );
    }

    #[test]
    fn limited_data_set_shifts_a_patients_dates_by_the_same_days() {
        let batch = archived();
        let plan = TablePlan::new(
            "labs",
            batch.schema(),
            &classes(),
            &Profile::limited_data_set(),
            None,
        )
        .unwrap();
        let out = plan.apply(&batch, &ctx(2)).unwrap();
        let dob = out
            .column_by_name("dob")
            .unwrap()
            .as_primitive::<arrow::datatypes::Date32Type>();
        let input = batch
            .column_by_name("dob")
            .unwrap()
            .as_primitive::<arrow::datatypes::Date32Type>();
        let d0 = dob.value(0) - input.value(0);
        assert_eq!(d0, ctx(2).key.shift_days("p1"));
        assert_eq!(
            dob.value(1) - input.value(1),
            d0,
            "same patient, same shift"
        );
        assert_eq!(dob.value(2) - input.value(2), ctx(2).key.shift_days("p2"));
        let rec = out
            .column_by_name("record_date")
            .unwrap()
            .as_primitive::<arrow::datatypes::Date32Type>();
        let rec_in = batch
            .column(1)
            .as_primitive::<arrow::datatypes::Date32Type>();
        assert_eq!(rec.value(0) - rec_in.value(0), d0);
        assert!(rec.is_null(1));
        let seen = out
            .column_by_name("seen_at")
            .unwrap()
            .as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
        assert_eq!(
            seen.value(2),
            ctx(2).key.shift_days("p2") as i64 * 86_400_000_000
        );
        assert_eq!(
            out.column_by_name("zip")
                .unwrap()
                .as_string::<i32>()
                .value(1),
            "07302-1234",
            "ZIP5 stays in a limited data set"
        );
        assert!(out.column_by_name("name").is_none());
    }

    #[test]
    fn requested_columns_must_be_let_out_and_batches_conform_to_the_merged_schema() {
        let batch = archived();
        let sh = Profile::safe_harbor();
        let err = TablePlan::new(
            "labs",
            batch.schema(),
            &classes(),
            &sh,
            Some(&["name".into()]),
        )
        .unwrap_err();
        assert!(err.contains("class name"), "{err}");
        let err = TablePlan::new(
            "labs",
            batch.schema(),
            &classes(),
            &sh,
            Some(&["added_later".into()]),
        )
        .unwrap_err();
        assert!(err.contains("has no class"), "{err}");
        let plan = TablePlan::new(
            "labs",
            batch.schema(),
            &classes(),
            &sh,
            Some(&["code".into()]),
        )
        .unwrap();
        assert_eq!(plan.output_schema().fields().len(), 3);
        // An older file without the later columns.
        let old = batch.project(&[0, 1, 2, 3, 8]).unwrap();
        let conformed = plan.conform(&old).unwrap();
        assert_eq!(conformed.schema(), batch.schema());
        assert_eq!(conformed.column_by_name("zip").unwrap().null_count(), 3);
        let codes = ProfileConfig::default();
        assert!(codes.build("nothing").unwrap().lets_out().is_empty());
    }
}
