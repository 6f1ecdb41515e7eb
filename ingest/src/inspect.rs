//! Looking before moving: `strata check` compares each source table with the operational table
//! it will load (what would be truncated, rounded or refused, counted in the data), and
//! `strata profile` describes each column (null rate, distinct values, range, duplicate keys,
//! implausible dates, invalid clinical codes). Both only read.

use crate::db::{Column, Db, DbKind};
use crate::error::Result;
use crate::layout::TableLayout;
use crate::migrate::Migration;
use crate::report::PatientSketch;
use crate::target_check::TargetChecks;
use crate::value::{ColumnType, Value};
use chrono::NaiveDate;
use futures::StreamExt;
use serde::Serialize;
use std::collections::HashSet;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Rows will go to quarantine, or a value changes meaning.
    Warning,
    /// The run cannot load the table as configured.
    Error,
}

/// One finding of `strata check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How serious.
    pub severity: Severity,
    /// The table.
    pub table: String,
    /// The column, when the finding is about one.
    pub column: Option<String>,
    /// What was found (never a value).
    pub message: String,
    /// Source rows concerned, when counted.
    pub rows: Option<u64>,
}

impl Finding {
    /// One line of text.
    pub fn to_line(&self) -> String {
        format!(
            "{:<7} {}{}: {}{}",
            format!("{:?}", self.severity).to_lowercase(),
            self.table,
            self.column
                .as_ref()
                .map(|c| format!(".{c}"))
                .unwrap_or_default(),
            self.message,
            self.rows
                .map(|n| format!(" ({n} rows)"))
                .unwrap_or_default()
        )
    }
}

/// The profile of one column.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnProfile {
    /// The column.
    pub column: String,
    /// Its declared type.
    pub declared: String,
    /// Rows with NULL.
    pub nulls: u64,
    /// Distinct non-NULL values: exact up to [`EXACT_DISTINCT`], estimated (within ~2 %, never
    /// more than the non-NULL values) above.
    pub distinct: u64,
    /// Whether `distinct` is an estimate (shown as `≈`).
    pub distinct_estimated: bool,
    /// Smallest and largest value, as text.
    pub min: Option<String>,
    /// See `min`.
    pub max: Option<String>,
    /// Values that cannot be read as the column's type (they would be quarantined).
    pub unreadable: u64,
    /// Dates before 1900 or after the policy's `as_of` (placeholders such as 1900-01-01 and
    /// typos).
    pub suspicious_dates: u64,
    /// For a code column (LOINC, ICD-10-CM or NPI, by its name): values that fail the
    /// code's check digit or format.
    pub invalid_codes: Option<(String, u64)>,
}

/// The profile of one table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableProfile {
    /// The table.
    pub table: String,
    /// Rows.
    pub rows: u64,
    /// Rows whose configured primary key repeats an earlier row's.
    pub duplicate_keys: u64,
    /// When the key repeats but never with the same patient (ids reused across patients, as
    /// research databases do): the key with the patient's column, which is unique.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposed_key: Option<Vec<String>>,
    /// Per column.
    pub columns: Vec<ColumnProfile>,
}

impl TableProfile {
    /// Readable text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{}: {} rows, {} duplicate keys\n  {:<28} {:>7} {:>9} {:>10} {:>10} {:>9}  range\n",
            self.table,
            self.rows,
            self.duplicate_keys,
            "column",
            "null %",
            "distinct",
            "unreadable",
            "odd dates",
            "bad codes"
        );
        if let Some(key) = &self.proposed_key {
            s.push_str(&format!(
                "  the key repeats, but never for the same patient: primary_key = [{}] is unique\n",
                key.iter()
                    .map(|c| format!("{c:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for c in &self.columns {
            let pct = if self.rows == 0 {
                0.0
            } else {
                100.0 * c.nulls as f64 / self.rows as f64
            };
            s.push_str(&format!(
                "  {:<28} {:>6.1}% {:>9} {:>10} {:>10} {:>9}  {} .. {}\n",
                c.column,
                pct,
                if c.distinct_estimated {
                    format!("≈{}", c.distinct)
                } else {
                    c.distinct.to_string()
                },
                c.unreadable,
                c.suspicious_dates,
                c.invalid_codes
                    .as_ref()
                    .map(|(kind, n)| format!("{n} {kind}"))
                    .unwrap_or_else(|| "-".into()),
                c.min.as_deref().unwrap_or("-"),
                c.max.as_deref().unwrap_or("-"),
            ));
        }
        s
    }
}

/// The clinical code systems `profile` validates, recognised by column name.
fn code_system(column: &str) -> Option<&'static str> {
    let c = column.to_ascii_lowercase();
    if c.contains("loinc") {
        Some("LOINC")
    } else if c.contains("icd") {
        Some("ICD-10-CM")
    } else if c.contains("npi") {
        Some("NPI")
    } else {
        None
    }
}

/// The Luhn check over a string of digits (the last one being the check digit).
fn luhn_valid(digits: &str) -> bool {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = (b - b'0') as u32;
            if i % 2 == 1 {
                let x = d * 2;
                x / 10 + x % 10
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether `code` is valid in `system`: LOINC `NNNNN-C` with its mod-10 check digit, an
/// ICD-10-CM code's shape (letter, digit, digit or A/B, then up to four characters after an
/// optional dot), or an NPI (ten digits, Luhn over the 80840 prefix).
pub fn valid_code(system: &str, code: &str) -> bool {
    let code = code.trim();
    match system {
        "LOINC" => code.split_once('-').is_some_and(|(body, check)| {
            check.len() == 1
                && (1..=7).contains(&body.len())
                && luhn_valid(&format!("{body}{check}"))
        }),
        "NPI" => code.len() == 10 && luhn_valid(&format!("80840{code}")),
        "ICD-10-CM" => {
            let b = code.as_bytes();
            let rest: String = code.get(3..).unwrap_or("").replace('.', "");
            b.len() >= 3
                && b[0].is_ascii_uppercase()
                && b[1].is_ascii_digit()
                && (b[2].is_ascii_digit() || b[2] == b'A' || b[2] == b'B')
                && rest.len() <= 4
                && rest
                    .bytes()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
                && code.matches('.').count() <= 1
                && (!code.contains('.') || code.find('.') == Some(3))
        }
        _ => true,
    }
}

/// Orders values of one column for min/max.
fn cmp_values(a: &Value, b: &Value) -> std::cmp::Ordering {
    use Value::*;
    match (a, b) {
        (Int(x), Int(y)) => x.cmp(y),
        (Float(x), Float(y)) => x.total_cmp(y),
        (Date(x), Date(y)) => x.cmp(y),
        (Timestamp(x), Timestamp(y)) => x.cmp(y),
        (TimestampTz(x), TimestampTz(y)) => x.cmp(y),
        _ => a.as_key_text().cmp(&b.as_key_text()),
    }
}

impl Migration {
    /// Profiles every configured table (reads each once, moves nothing). Dates are judged
    /// against the policy's `as_of` (today unless the policy fixes it): a date-shifted research
    /// database is not all "odd dates".
    pub async fn profile(&self) -> Result<Vec<TableProfile>> {
        let as_of = self.policy().as_of().expect("set in prepare");
        let mut out = Vec::new();
        for layout in self.layouts() {
            out.push(profile_table(self.source(), layout, as_of).await?);
        }
        Ok(out)
    }

    /// Compares each configured table with the operational table it will load. Counts, in
    /// the source, the rows the load would quarantine.
    /// Reads the operational database without writing to it: a SQLite file not created yet
    /// stays uncreated (every table is then one the run will create).
    pub async fn check(&self) -> Result<Vec<Finding>> {
        let target = self.operational_if_it_exists().await?;
        let target_kind = self.config().operational_kind()?;
        let existing = match &target {
            Some(target) => target.table_names().await?,
            None => Vec::new(),
        };
        let mut findings = Vec::new();
        for layout in self.layouts() {
            let finding = |severity, column: Option<&str>, message: String, rows| Finding {
                severity,
                table: layout.name.clone(),
                column: column.map(str::to_string),
                message,
                rows,
            };
            if !existing.contains(&layout.name) {
                findings.push(finding(
                    Severity::Info,
                    None,
                    format!(
                        "no operational table yet: it will be created from the source's columns{}",
                        if self.source().kind() == target_kind {
                            String::new()
                        } else {
                            " (types mapped to the target engine's)".into()
                        }
                    ),
                    None,
                ));
                continue;
            }
            let Some(target) = target.as_ref() else {
                continue;
            };
            let target_schema = target.table_schema(&layout.name).await?;
            for t in &target_schema.columns {
                if !layout.target_names.contains(&t.name) && !t.nullable {
                    findings.push(finding(
                        Severity::Error,
                        Some(&t.name),
                        "NOT NULL in the operational table, absent from the source: every insert would fail".into(),
                        None,
                    ));
                }
            }
            let mut targets: Vec<Column> = Vec::new();
            for (c, name) in layout.columns().iter().zip(&layout.target_names) {
                let Some(t) = target_schema.column(name) else {
                    findings.push(finding(
                        Severity::Error,
                        Some(&c.name),
                        "no such column in the operational table".into(),
                        None,
                    ));
                    continue;
                };
                if let Some(problem) = type_compatibility(c, t, target.kind()) {
                    findings.push(finding(Severity::Warning, Some(&c.name), problem, None));
                }
                targets.push(Column {
                    decl_type: t.decl_type.clone(),
                    nullable: t.nullable,
                    ..c.clone()
                });
            }
            if targets.len() != layout.columns().len() {
                continue;
            }
            // Count, in the data, what the load would refuse or change.
            let checks = TargetChecks::new(&targets, target.kind());
            let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
            let mut counts =
                vec![std::collections::BTreeMap::<&'static str, u64>::new(); targets.len()];
            let mut unreadable =
                vec![std::collections::BTreeMap::<&'static str, u64>::new(); targets.len()];
            let sql = layout.select_where(self.source(), None, &[], 0);
            let mut rows = self
                .source()
                .fetch(sql, layout.fetch_types(self.source(), &[]));
            while let Some(row) = rows.next().await {
                let mut values = row?;
                layout.take_extras(&mut values);
                if let Some((col, reason)) = layout
                    .map_row(&mut values)
                    .or_else(|| crate::migrate::coerce_row(&mut values, &types))
                {
                    *unreadable[col].entry(reason).or_default() += 1;
                    continue;
                }
                if let Some((col, reason)) = checks.check(&values) {
                    *counts[col].entry(reason).or_default() += 1;
                }
            }
            for (i, c) in layout.columns().iter().enumerate() {
                for (reason, n) in unreadable[i].iter().chain(counts[i].iter()) {
                    findings.push(finding(
                        Severity::Warning,
                        Some(&c.name),
                        format!("{reason}: these rows will be quarantined"),
                        Some(*n),
                    ));
                }
            }
        }
        if let Some(target) = target {
            target.close().await;
        }
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        Ok(findings)
    }
}

/// Whether the source column's values fit the target column's type family.
fn type_compatibility(source: &Column, target: &Column, engine: DbKind) -> Option<String> {
    let t = match engine {
        DbKind::Postgres => ColumnType::from_postgres(&target.decl_type),
        DbKind::Sqlite => ColumnType::from_sqlite(&target.decl_type),
    };
    use ColumnType as C;
    let ok = match (source.col_type, t) {
        (a, b) if a == b => true,
        (C::Int, C::Float | C::Other | C::Text) => true,
        (C::Float, C::Other | C::Text) => true,
        (C::Date, C::Timestamp | C::TimestampTz | C::Text) => true,
        (C::Timestamp | C::TimestampTz, C::Timestamp | C::TimestampTz | C::Text) => true,
        (_, C::Text) => true,
        (C::Other | C::Text, _) => false,
        _ => false,
    };
    (!ok).then(|| {
        format!(
            "source type {} into {}: each value must convert, or its row is quarantined",
            source.decl_type, target.decl_type
        )
    })
}

/// Distinct values counted exactly up to this many per column; estimated above.
pub const EXACT_DISTINCT: usize = 10_000;

async fn profile_table(
    source: &Db,
    layout: &TableLayout,
    as_of: NaiveDate,
) -> Result<TableProfile> {
    let n = layout.columns().len();
    let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
    let mut nulls = vec![0u64; n];
    let mut sketches = vec![PatientSketch::default(); n];
    // Hashes of each column's values while there are few enough to count exactly.
    let mut exact: Vec<Option<HashSet<u64>>> = vec![Some(HashSet::new()); n];
    let mut mins: Vec<Option<Value>> = vec![None; n];
    let mut maxs: Vec<Option<Value>> = vec![None; n];
    let mut unreadable = vec![0u64; n];
    let mut odd_dates = vec![0u64; n];
    let systems: Vec<Option<&'static str>> = layout
        .columns()
        .iter()
        .map(|c| code_system(&c.name))
        .collect();
    let mut invalid = vec![0u64; n];
    let mut keys: HashSet<u64> = HashSet::new();
    let mut with_patient: HashSet<u64> = HashSet::new();
    let (mut rows, mut duplicates, mut duplicates_with_patient) = (0u64, 0u64, 0u64);
    let floor = NaiveDate::from_ymd_opt(1900, 1, 2).expect("valid date");
    let sql = layout.select_where(source, None, &[], 0);
    let mut stream = source.fetch(sql, layout.fetch_types(source, &[]));
    while let Some(row) = stream.next().await {
        let mut values = row?;
        let extras = layout.take_extras(&mut values);
        rows += 1;
        if !layout.key.is_empty() {
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            for &k in &layout.key {
                values[k].as_key_text().hash(&mut h);
            }
            if !keys.insert(h.finish()) {
                duplicates += 1;
            }
            extras.patient.hash(&mut h);
            if !with_patient.insert(h.finish()) {
                duplicates_with_patient += 1;
            }
        }
        for (i, v) in values.into_iter().enumerate() {
            if v.is_null() {
                nulls[i] += 1;
                continue;
            }
            let v = match v.coerce(types[i]) {
                Ok(v) => v,
                Err(_) => {
                    unreadable[i] += 1;
                    continue;
                }
            };
            if let Some(text) = v.as_key_text() {
                sketches[i].add(&text);
                if let Some(set) = exact[i].as_mut() {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::hash::DefaultHasher::new();
                    text.hash(&mut h);
                    set.insert(h.finish());
                    if set.len() > EXACT_DISTINCT {
                        exact[i] = None;
                    }
                }
                if let Some(system) = systems[i] {
                    if !valid_code(system, &text) {
                        invalid[i] += 1;
                    }
                }
            }
            let date = match &v {
                Value::Date(d) => Some(*d),
                Value::Timestamp(t) => Some(t.date()),
                Value::TimestampTz(t) => Some(t.date_naive()),
                _ => None,
            };
            if date.is_some_and(|d| d < floor || d > as_of) {
                odd_dates[i] += 1;
            }
            if mins[i].as_ref().is_none_or(|m| cmp_values(&v, m).is_lt()) {
                mins[i] = Some(v.clone());
            }
            if maxs[i].as_ref().is_none_or(|m| cmp_values(&v, m).is_gt()) {
                maxs[i] = Some(v);
            }
        }
    }
    let columns = layout
        .columns()
        .iter()
        .enumerate()
        .map(|(i, c)| ColumnProfile {
            column: c.name.clone(),
            declared: c.decl_type.clone(),
            nulls: nulls[i],
            distinct: match &exact[i] {
                Some(set) => set.len() as u64,
                None => sketches[i].estimate().min(rows - nulls[i] - unreadable[i]),
            },
            distinct_estimated: exact[i].is_none(),
            min: mins[i].as_ref().and_then(Value::as_key_text),
            max: maxs[i].as_ref().and_then(Value::as_key_text),
            unreadable: unreadable[i],
            suspicious_dates: odd_dates[i],
            invalid_codes: systems[i].map(|s| (s.to_string(), invalid[i])),
        })
        .collect();
    Ok(TableProfile {
        table: layout.name.clone(),
        rows,
        duplicate_keys: duplicates,
        proposed_key: layout
            .patient_column
            .filter(|p| duplicates > 0 && duplicates_with_patient == 0 && !layout.key.contains(p))
            .map(|p| {
                layout
                    .key
                    .iter()
                    .chain([&p])
                    .map(|&i| layout.columns()[i].name.clone())
                    .collect()
            }),
        columns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clinical_codes_are_checked_by_check_digit_and_shape() {
        for loinc in ["2345-7", "718-7", "4548-4", "2160-0"] {
            assert!(valid_code("LOINC", loinc), "{loinc}");
        }
        for bad in ["2345-6", "2345", "ABCD-1", "12345678-9"] {
            assert!(!valid_code("LOINC", bad), "{bad}");
        }
        assert!(valid_code("NPI", "1234567893"));
        assert!(!valid_code("NPI", "1234567890"));
        assert!(!valid_code("NPI", "123456789"));
        for icd in ["E11.9", "I10", "S72.001A", "O09.A1", "E119", "U07.1"] {
            assert!(valid_code("ICD-10-CM", icd), "{icd}");
        }
        for bad in ["e11.9", "11.9", "E1", "E11.12345", "E.119"] {
            assert!(!valid_code("ICD-10-CM", bad), "{bad}");
        }
    }
}
