//! The field's conventions `strata init` knows: which column keys a table (a declared key, an
//! `id`-like column, or, where research databases reuse ids across patients, that column with
//! the patient's), and what dates a record (a date column, a period, or the parent row a
//! dateless child table points to).

use super::{lower, TableGuess};
use crate::config::RecordDateConfig;
use crate::db::{quote, Db, TableSchema};
use crate::error::Result;
use crate::value::{ColumnType, Value};
use std::collections::BTreeMap;

/// Date columns preferred by name, in this order.
const DATE_PREFERENCE: [&str; 12] = [
    "date",
    "start",
    "started_at",
    "observed_at",
    "recorded_at",
    "created_at",
    "written_at",
    "billed_on",
    "recorded_on",
    "started_on",
    "service_date",
    "servicedate",
];

/// Rows of `table` whose `columns` repeat another row's, and rows with a NULL in one of them.
async fn repeats(db: &Db, table: &str, columns: &[&str]) -> Result<(u64, u64)> {
    let cols: Vec<String> = columns.iter().map(|c| quote(c)).collect();
    let list = cols.join(", ");
    let nulls = cols
        .iter()
        .map(|c| format!("{c} IS NULL"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let sql = format!(
        "SELECT (SELECT COUNT(*) FROM {t}) - (SELECT COUNT(*) FROM (SELECT {list} FROM {t} GROUP BY {list}) AS g), \
         (SELECT COUNT(*) FROM {t} WHERE {nulls})",
        t = quote(table)
    );
    let rows = db
        .fetch_all(sql, vec![ColumnType::Int, ColumnType::Int])
        .await?;
    let n = |v: &Value| match v {
        Value::Int(n) => *n as u64,
        _ => 0,
    };
    Ok(rows.first().map_or((0, 0), |r| (n(&r[0]), n(&r[1]))))
}

/// Whether `column` holds a distinct, non-NULL value in every row of `table`.
pub(super) async fn is_unique(db: &Db, table: &str, column: &str) -> Result<bool> {
    Ok(repeats(db, table, &[column]).await? == (0, 0))
}

/// The table's key and how it was found: the declared primary key; else the first of `id`,
/// `row_id`, `<table>_id` and `<table minus s>_id` that is unique and never NULL; else, when
/// that column repeats but never together with the same patient (research databases reuse
/// ids across patients), the column and the patient key together.
pub(super) async fn guess_key(
    db: &Db,
    table: &str,
    schema: &TableSchema,
    patient: Option<&str>,
) -> Result<(Vec<String>, String)> {
    if !schema.primary_key.is_empty() {
        return Ok((schema.primary_key.clone(), "declared".into()));
    }
    let t = lower(table);
    let names = [
        "id".to_string(),
        "row_id".to_string(),
        format!("{t}_id"),
        format!("{}_id", t.strip_suffix('s').unwrap_or(&t)),
    ];
    let Some(column) = names
        .iter()
        .find_map(|n| schema.columns.iter().find(|c| lower(&c.name) == *n))
    else {
        return Ok((
            Vec::new(),
            "guessed: no declared key and no id column (rows are named by their values)".into(),
        ));
    };
    let c = column.name.as_str();
    let (repeated, nulls) = repeats(db, table, &[c]).await?;
    if (repeated, nulls) == (0, 0) {
        return Ok((
            vec![c.to_string()],
            format!("guessed: column {c} is unique and not null"),
        ));
    }
    if let Some(p) = patient.filter(|p| *p != c && nulls == 0) {
        if repeats(db, table, &[c, p]).await? == (0, 0) {
            return Ok((
                vec![c.to_string(), p.to_string()],
                format!(
                    "guessed: {c} repeats in {repeated} rows (ids reused across patients?), but ({c}, {p}) is unique"
                ),
            ));
        }
    }
    Ok((
        Vec::new(),
        format!(
            "guessed: column {c} repeats in {repeated} rows and has {nulls} NULLs, so no key (rows are named by their values)"
        ),
    ))
}

fn is_date(t: ColumnType) -> bool {
    matches!(
        t,
        ColumnType::Date | ColumnType::Timestamp | ColumnType::TimestampTz
    )
}

/// Whether a column's name says it is a birth or death date, or a period's end.
fn not_a_record_date(name: &str) -> bool {
    let n = lower(name);
    matches!(
        super::classes::class_from_name(name, false),
        Some(strata_deidentify::Class::BirthDate | strata_deidentify::Class::DeathDate)
    ) || n.contains("stop")
        || n.starts_with("end")
        || n.contains("_end")
        || n.contains("disch")
        || n == "outtime"
}

/// The column that dates a record: a preferred name, else the first date-typed or date-named
/// column that is not a birth or death date or an end; outside the patients table, a death
/// date when it is the only date (OMOP's `death`).
pub(super) fn guess_date(table: &str, schema: &TableSchema) -> Option<String> {
    for pref in DATE_PREFERENCE {
        if let Some(c) = schema.columns.iter().find(|c| lower(&c.name) == pref) {
            return Some(c.name.clone());
        }
    }
    let dated = |c: &&crate::db::Column| {
        let n = lower(&c.name);
        is_date(c.col_type) || n.ends_with("_at") || n.ends_with("_on") || n.ends_with("date")
    };
    let death = |c: &&crate::db::Column| {
        !super::is_patient_table(table)
            && super::classes::class_from_name(&c.name, false)
                == Some(strata_deidentify::Class::DeathDate)
    };
    let columns = || schema.columns.iter().filter(dated);
    columns()
        .find(|c| !not_a_record_date(&c.name))
        .or_else(|| columns().find(death))
        .map(|c| c.name.clone())
}

/// The column that ends a record: `STOP`, `end_date`, OMOP's `condition_end_date`, MIMIC's
/// `dischtime` and `outtime`, Synthea's `END_YEAR`.
pub(super) fn end_column(schema: &TableSchema) -> Option<String> {
    schema
        .columns
        .iter()
        .find(|c| {
            let n = lower(&c.name);
            matches!(
                n.as_str(),
                "stop"
                    | "end"
                    | "enddate"
                    | "end_date"
                    | "stop_date"
                    | "end_year"
                    | "dischtime"
                    | "outtime"
            ) || n.ends_with("_end_date")
                || n.ends_with("_end_datetime")
        })
        .map(|c| c.name.clone())
}

/// A period table (its name says so: `observation_period`, `payer_plan_period`, enrolments)
/// with a start and an end date column.
pub(super) fn guess_period(table: &str, schema: &TableSchema) -> Option<RecordDateConfig> {
    let t = lower(table);
    if !(t.contains("period") || t.contains("enrol")) {
        return None;
    }
    let dates: Vec<&crate::db::Column> = schema
        .columns
        .iter()
        .filter(|c| is_date(c.col_type) || lower(&c.name).contains("date"))
        .collect();
    let find = |words: &[&str]| {
        dates
            .iter()
            .find(|c| words.iter().any(|w| lower(&c.name).contains(w)))
            .map(|c| c.name.clone())
    };
    Some(RecordDateConfig::Period {
        start: find(&["start", "begin", "from"])?,
        end: find(&["end", "stop", "thru", "until"])?,
    })
}

/// Dates tables with no date of their own through the parent row one of their columns points
/// to: a declared foreign key, or a column named like one that is unique in a dated table
/// (MIMIC's `hadm_id` in `admissions`, OMOP's `visit_occurrence_id`). The reason is kept with
/// the guess.
pub(super) async fn guess_parent_dates(
    db: &Db,
    tables: &mut BTreeMap<String, (TableSchema, TableGuess)>,
) -> Result<()> {
    let dated: BTreeMap<String, String> = tables
        .iter()
        .filter_map(|(n, (_, g))| match &g.record_date {
            Some((RecordDateConfig::Column(c), _)) => Some((n.clone(), c.clone())),
            _ => None,
        })
        .collect();
    let mut found = Vec::new();
    for (name, (schema, g)) in tables.iter() {
        if g.record_date.is_some() {
            continue;
        }
        let declared = schema
            .foreign_keys
            .iter()
            .find(|(_, to, _)| dated.contains_key(to))
            .map(|(fk, to, key)| {
                (
                    fk.clone(),
                    to.clone(),
                    key.clone(),
                    "a declared foreign key".to_string(),
                )
            });
        let mut guess = declared;
        if guess.is_none() {
            let own = |c: &str| {
                g.primary_key.0.iter().any(|k| k == c) || g.patient_key.as_deref() == Some(c)
            };
            'columns: for c in schema.columns.iter().filter(|c| {
                !own(&c.name) && lower(&c.name).ends_with("id") && c.col_type != ColumnType::Bytes
            }) {
                for (parent, date) in &dated {
                    let (parent_schema, _) = &tables[parent];
                    if parent == name || parent_schema.column(&c.name).is_none() {
                        continue;
                    }
                    if is_unique(db, parent, &c.name).await? {
                        guess = Some((
                            c.name.clone(),
                            parent.clone(),
                            c.name.clone(),
                            format!("{} is unique in {parent}, dated by {date}", c.name),
                        ));
                        break 'columns;
                    }
                }
            }
        }
        if let Some((fk, parent, key, why)) = guess {
            let parent_key = (key != fk).then_some(key);
            found.push((
                name.clone(),
                RecordDateConfig::Via {
                    column: Some(dated[&parent].clone()),
                    via: parent,
                    foreign_key: fk,
                    parent_key,
                },
                format!("no date column here; dated by its parent row: {why}"),
            ));
        }
    }
    for (name, date, why) in found {
        if let Some((_, g)) = tables.get_mut(&name) {
            g.record_date = Some((date, why));
        }
    }
    Ok(())
}
