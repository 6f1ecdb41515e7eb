//! A directory of CSV exports as a source: `csv://path/to/dir`, one table per `*.csv` file
//! (named by the file's stem), columns from the header line.
//!
//! The files are staged once into a SQLite file, typed column by column, and the migration
//! then reads that file like any SQLite source: ranges, ordering, joins to reach a patient and
//! the patient-facts pass all need a queryable table, which a CSV file is not. The staging file
//! is named by a fingerprint of the files (names, sizes, modification times), so a resumed run
//! reads exactly what the interrupted one read, and changed exports are staged afresh.
//!
//! Types are inferred from every value of a column unless `[tables.T] column_types` names them:
//! INTEGER when every value is an integer without a leading zero (so ZIP codes and other
//! codes keep their zeros), DECIMAL_TEXT(p,s) for decimals all written with the same number of
//! digits after the point (amounts such as `136.00`: kept exactly as written, and archived as
//! DECIMAL), REAL for other decimals, DATE for `YYYY-MM-DD`, TIMESTAMPTZ for ISO
//! date-times that all carry `Z` or an offset (instants), TIMESTAMP for other ISO date-times,
//! TEXT otherwise. An empty field is NULL. A value that does not fit a type the
//! config names is staged as it is, and quarantined by the migration with its reason. Text that
//! is not UTF-8 is staged as bytes, and quarantined as such. The inferred types are logged and
//! kept in the staging file's `_strata_csv_columns` table.

use crate::error::{IngestError, Result};
use crate::value::{parse_date, parse_timestamp};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Declared types by table and column, from the config (`column_types`).
pub type CsvTypes = BTreeMap<String, BTreeMap<String, String>>;

fn err(detail: String) -> IngestError {
    IngestError::Read { detail }
}

/// The CSV files of `dir`, sorted, as (table name, path).
fn csv_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| err(format!("CSV source {}: {e}", dir.display())))?;
    let mut files: Vec<(String, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("csv")))
        .filter_map(|p| Some((p.file_stem()?.to_string_lossy().to_string(), p)))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(err(format!("CSV source {}: no .csv files", dir.display())));
    }
    Ok(files)
}

/// Stages `dir` into a SQLite file under `staging_dir` (created if needed) and returns its
/// path; reuses the file when the exports have not changed.
pub(crate) async fn stage(dir: PathBuf, staging_dir: PathBuf, types: CsvTypes) -> Result<PathBuf> {
    tokio::task::spawn_blocking(move || stage_blocking(&dir, &staging_dir, &types))
        .await
        .map_err(|e| err(format!("CSV staging failed: {e}")))?
}

fn stage_blocking(dir: &Path, staging_dir: &Path, types: &CsvTypes) -> Result<PathBuf> {
    let files = csv_files(dir)?;
    let mut fingerprint = Sha256::new();
    fingerprint.update(dir.display().to_string());
    fingerprint.update(format!("{types:?}"));
    for (_, path) in &files {
        let meta = std::fs::metadata(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        fingerprint.update(format!("{}|{}|{modified}\n", path.display(), meta.len()));
    }
    let name = format!("csv-{}.db", &hex::encode(fingerprint.finalize())[..16]);
    std::fs::create_dir_all(staging_dir)
        .map_err(|e| err(format!("staging directory {}: {e}", staging_dir.display())))?;
    let target = staging_dir.join(name);
    if target.exists() {
        return Ok(target);
    }
    // Staged under a temporary name and renamed when complete: a crash mid-way stages again.
    let partial = target.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let mut conn = rusqlite::Connection::open(&partial).map_err(|e| err(e.to_string()))?;
    conn.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; \
         CREATE TABLE _strata_csv_columns (table_name TEXT, column_name TEXT, column_type TEXT, inferred INTEGER)",
    )
    .map_err(|e| err(e.to_string()))?;
    for (table, path) in &files {
        stage_file(&mut conn, table, path, types.get(table))?;
    }
    drop(conn);
    std::fs::rename(&partial, &target).map_err(|e| err(e.to_string()))?;
    Ok(target)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inferred {
    Empty,
    Integer,
    /// Decimals all written with `scale` digits after the point, at most `digits` before it.
    Decimal {
        digits: usize,
        scale: usize,
    },
    Real,
    Date,
    /// Date-times that all carry `Z` or an offset: instants.
    TimestampTz,
    Timestamp,
    Text,
}

impl Inferred {
    fn widen(self, value: &str) -> Self {
        use Inferred::*;
        if let (Empty | Decimal { .. }, Some((int, frac))) = (self, decimal_parts(value)) {
            match self {
                Empty => {
                    return Decimal {
                        digits: int,
                        scale: frac,
                    }
                }
                Decimal { digits, scale } if scale == frac => {
                    return Decimal {
                        digits: digits.max(int),
                        scale,
                    }
                }
                _ => {}
            }
        }
        let fits = |t: Inferred| match t {
            Empty | Text | Decimal { .. } => true,
            Integer => is_integer(value),
            Real => is_integer(value) || is_decimal(value),
            Date => value.len() == 10 && parse_date(value).is_some(),
            TimestampTz => {
                value.len() > 10 && chrono::DateTime::parse_from_rfc3339(value.trim()).is_ok()
            }
            Timestamp => value.len() > 10 && parse_timestamp(value).is_some(),
        };
        let order: &[Inferred] = match self {
            Empty => &[Integer, Real, Date, TimestampTz, Timestamp, Text],
            Integer => &[Integer, Real, Text],
            // Another scale, or an integer among them: decimals as floats.
            Decimal { .. } => &[Real, Text],
            Real => &[Real, Text],
            Date => &[Date, Text],
            // A date-time without an offset among instants: which zone it meant is unknown,
            // so the column is kept as written.
            TimestampTz => &[TimestampTz, Text],
            Timestamp => &[Timestamp, Text],
            Text => &[Text],
        };
        order.iter().copied().find(|t| fits(*t)).unwrap_or(Text)
    }

    fn decl(self) -> String {
        match self {
            Inferred::Decimal { digits, scale } if digits + scale <= 38 => format!(
                "{}({},{scale})",
                crate::decimal::CSV_DECIMAL_DECL,
                (digits + scale).max(1)
            ),
            Inferred::Decimal { .. } => crate::decimal::CSV_DECIMAL_DECL.to_string(),
            other => other.fixed_decl().to_string(),
        }
    }

    fn fixed_decl(self) -> &'static str {
        match self {
            Inferred::Decimal { .. } => crate::decimal::CSV_DECIMAL_DECL,
            Inferred::Integer => "INTEGER",
            Inferred::Real => "REAL",
            Inferred::Date => "DATE",
            Inferred::TimestampTz => "TIMESTAMPTZ",
            Inferred::Timestamp => "TIMESTAMP",
            Inferred::Empty | Inferred::Text => "TEXT",
        }
    }
}

fn is_integer(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    !digits.is_empty()
        && digits.len() <= 18
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !(digits.len() > 1 && digits.starts_with('0'))
}

/// Digits before and after the point of a decimal such as `-136.00` (not an integer).
fn decimal_parts(v: &str) -> Option<(usize, usize)> {
    if !is_decimal(v) {
        return None;
    }
    let digits = v.strip_prefix('-').unwrap_or(v);
    let (int, frac) = digits.split_once('.')?;
    Some((int.trim_start_matches('0').len(), frac.len()))
}

fn is_decimal(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    let Some((int, frac)) = digits.split_once('.') else {
        return false;
    };
    !int.is_empty()
        && !frac.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && !(int.len() > 1 && int.starts_with('0'))
}

fn reader(path: &Path) -> Result<csv::Reader<std::fs::File>> {
    csv::ReaderBuilder::new()
        .has_headers(true)
        .from_path(path)
        .map_err(|e| err(format!("{}: {e}", path.display())))
}

fn stage_file(
    conn: &mut rusqlite::Connection,
    table: &str,
    path: &Path,
    declared: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let file_err = |e: csv::Error| {
        // The csv crate's message names the line and field count, never the values.
        err(format!("CSV file {}: {e}", path.display()))
    };
    let mut rdr = reader(path)?;
    let headers: Vec<String> = rdr
        .byte_headers()
        .map_err(file_err)?
        .iter()
        .map(|h| String::from_utf8_lossy(h).trim().to_string())
        .collect();
    // First pass: infer each column's type from all its values.
    let mut inferred = vec![Inferred::Empty; headers.len()];
    let mut record = csv::ByteRecord::new();
    while rdr.read_byte_record(&mut record).map_err(file_err)? {
        for (t, field) in inferred.iter_mut().zip(record.iter()) {
            if field.is_empty() || *t == Inferred::Text {
                continue;
            }
            *t = match std::str::from_utf8(field) {
                Ok(v) => t.widen(v),
                Err(_) => Inferred::Text,
            };
        }
    }
    let decls: Vec<(String, bool)> = headers
        .iter()
        .zip(&inferred)
        .map(|(h, t)| match declared.and_then(|d| d.get(h)) {
            Some(d) => (d.clone(), false),
            None => (t.decl(), true),
        })
        .collect();
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let columns: Vec<String> = headers
        .iter()
        .zip(&decls)
        .map(|(h, (d, _))| format!("{} {d}", q(h)))
        .collect();
    let tx = conn.transaction().map_err(|e| err(e.to_string()))?;
    tx.execute_batch(&format!(
        "CREATE TABLE {} ({})",
        q(table),
        columns.join(", ")
    ))
    .map_err(|e| err(format!("staging {table}: {e}")))?;
    for (h, (d, was_inferred)) in headers.iter().zip(&decls) {
        tx.execute(
            "INSERT INTO _strata_csv_columns VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![table, h, d, *was_inferred as i64],
        )
        .map_err(|e| err(e.to_string()))?;
        tracing::info!(table, column = %h, r#type = %d, inferred = was_inferred, "CSV column");
    }
    {
        let placeholders = vec!["?"; headers.len()].join(", ");
        let mut insert = tx
            .prepare(&format!("INSERT INTO {} VALUES ({placeholders})", q(table)))
            .map_err(|e| err(e.to_string()))?;
        let mut rdr = reader(path)?;
        while rdr.read_byte_record(&mut record).map_err(file_err)? {
            let values: Vec<rusqlite::types::Value> = record
                .iter()
                .zip(&decls)
                .map(|(field, (decl, _))| stage_value(field, decl))
                .collect();
            insert
                .execute(rusqlite::params_from_iter(values))
                .map_err(|e| err(format!("staging {table}: {e}")))?;
        }
    }
    tx.commit().map_err(|e| err(e.to_string()))
}

/// A field as SQLite stores it: NULL when empty, a number when the column is numeric and the
/// text is one, bytes when it is not UTF-8, else text.
fn stage_value(field: &[u8], decl: &str) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    if field.is_empty() {
        return V::Null;
    }
    let Ok(text) = std::str::from_utf8(field) else {
        return V::Blob(field.to_vec());
    };
    let decl = decl.to_ascii_uppercase();
    if decl.contains("INT") && is_integer(text) {
        if let Ok(i) = text.parse() {
            return V::Integer(i);
        }
    }
    if (decl.contains("REAL") || decl.contains("FLOA") || decl.contains("DOUB"))
        && (is_integer(text) || is_decimal(text))
    {
        if let Ok(f) = text.parse() {
            return V::Real(f);
        }
    }
    V::Text(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infers_types_without_losing_leading_zeros() {
        let infer = |values: &[&str]| {
            values
                .iter()
                .fold(Inferred::Empty, |t, v| t.widen(v))
                .decl()
        };
        assert_eq!(infer(&["1", "-20", "300"]), "INTEGER");
        assert_eq!(infer(&["02155", "10001"]), "TEXT");
        assert_eq!(infer(&["1", "2.5"]), "REAL");
        // Amounts keep the digits they were written with.
        assert_eq!(infer(&["136.00", "7.49", "-0.50"]), "DECIMAL_TEXT(5,2)");
        assert_eq!(infer(&["42.36877442769006", "-71.15"]), "REAL");
        assert_eq!(infer(&["2.50", "3"]), "REAL");
        assert_eq!(infer(&["2014-10-06", "1999-01-31"]), "DATE");
        // An instant keeps its time zone (Synthea writes `2019-02-17T05:07:38Z`).
        assert_eq!(infer(&["2019-02-17T05:07:38Z"]), "TIMESTAMPTZ");
        assert_eq!(
            infer(&["2019-02-17T05:07:38+01:00", "2019-02-18T00:00:00Z"]),
            "TIMESTAMPTZ"
        );
        assert_eq!(
            infer(&["2019-02-17T05:07:38Z", "2019-02-17 05:07:38"]),
            "TEXT"
        );
        assert_eq!(infer(&["2019-02-17 05:07:38"]), "TIMESTAMP");
        assert_eq!(infer(&["2014-10-06", "soon"]), "TEXT");
        assert_eq!(infer(&["999-17-5017"]), "TEXT");
    }
}
