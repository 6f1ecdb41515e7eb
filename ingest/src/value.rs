//! Values as read from a source, the column types Strata distinguishes, and coercion between them.

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};

/// How Strata treats a source column. Anything it has no special handling for is `Other`: read
/// as text, written back with the column's declared type (numeric, uuid, json ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// 64-bit integer.
    Int,
    /// 64-bit float.
    Float,
    /// Boolean.
    Bool,
    /// Text.
    Text,
    /// Binary (a BLOB column unless configured otherwise).
    Bytes,
    /// Calendar date.
    Date,
    /// Timestamp without time zone.
    Timestamp,
    /// Timestamp with time zone (UTC).
    TimestampTz,
    /// Any other type, carried as its text form.
    Other,
}

impl ColumnType {
    /// The type of a PostgreSQL column from `format_type()`.
    pub fn from_postgres(decl: &str) -> Self {
        match decl {
            "smallint" | "integer" | "bigint" => ColumnType::Int,
            "real" | "double precision" => ColumnType::Float,
            "boolean" => ColumnType::Bool,
            "text" => ColumnType::Text,
            "bytea" => ColumnType::Bytes,
            "date" => ColumnType::Date,
            "timestamp without time zone" => ColumnType::Timestamp,
            "timestamp with time zone" => ColumnType::TimestampTz,
            d if d.starts_with("character") => ColumnType::Text,
            _ => ColumnType::Other,
        }
    }

    /// The type of a SQLite column from its declared type (SQLite's affinity rules, plus the
    /// date and time names legacy schemas use for text columns).
    pub fn from_sqlite(decl: &str) -> Self {
        let d = decl.to_ascii_uppercase();
        if d.contains("INT") {
            ColumnType::Int
        } else if d.contains("TIMESTAMPTZ") || d.contains("WITH TIME ZONE") {
            // SQLite keeps any declared type: one that says "with time zone" holds instants.
            ColumnType::TimestampTz
        } else if d.contains("TIMESTAMP") || d.contains("DATETIME") {
            ColumnType::Timestamp
        } else if d.contains("DATE") {
            ColumnType::Date
        } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
            ColumnType::Text
        } else if d.contains("BLOB") || d.is_empty() {
            ColumnType::Bytes
        } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
            ColumnType::Float
        } else if d.contains("BOOL") {
            ColumnType::Bool
        } else {
            ColumnType::Other
        }
    }
}

impl ColumnType {
    /// The declared type Strata gives a column of this type in a table it creates.
    pub fn default_decl(self, engine: crate::DbKind) -> &'static str {
        use crate::DbKind::{Postgres, Sqlite};
        match (engine, self) {
            (Postgres, ColumnType::Int) => "bigint",
            (Postgres, ColumnType::Float) => "double precision",
            (Postgres, ColumnType::Bool) => "boolean",
            (Postgres, ColumnType::Bytes) => "bytea",
            (Postgres, ColumnType::Date) => "date",
            (Postgres, ColumnType::Timestamp) => "timestamp without time zone",
            (Postgres, ColumnType::TimestampTz) => "timestamp with time zone",
            (Postgres, ColumnType::Text | ColumnType::Other) => "text",
            (Sqlite, ColumnType::Int) => "INTEGER",
            (Sqlite, ColumnType::Float) => "REAL",
            (Sqlite, ColumnType::Bool) => "BOOLEAN",
            (Sqlite, ColumnType::Bytes) => "BLOB",
            (Sqlite, ColumnType::Date) => "DATE",
            (Sqlite, ColumnType::Timestamp) => "TIMESTAMP",
            (Sqlite, ColumnType::TimestampTz) => "TIMESTAMPTZ",
            (Sqlite, ColumnType::Text | ColumnType::Other) => "TEXT",
        }
    }
}

/// One value of one row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// Integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// Date.
    Date(NaiveDate),
    /// Timestamp without time zone.
    Timestamp(NaiveDateTime),
    /// Timestamp in UTC.
    TimestampTz(DateTime<Utc>),
}

const TIMESTAMP_FORMATS: [&str; 4] = [
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M",
];

/// Parses the date and time texts legacy systems write: ISO dates, ISO timestamps with or
/// without `T`, fractional seconds, `Z` or an offset (converted to UTC).
pub fn parse_timestamp(text: &str) -> Option<NaiveDateTime> {
    let t = text.trim();
    parse_time_of_day(t).or_else(|| {
        NaiveDate::parse_from_str(t, "%Y-%m-%d")
            .ok()
            .map(|d| d.and_hms_opt(0, 0, 0).expect("midnight"))
    })
}

/// Parses `YYYY-MM-DD`, or the date part of a timestamp.
pub fn parse_date(text: &str) -> Option<NaiveDate> {
    parse_timestamp(text).map(|dt| dt.date())
}

fn parse_time_of_day(t: &str) -> Option<NaiveDateTime> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Some(dt.naive_utc());
    }
    let t = t.strip_suffix('Z').unwrap_or(t);
    TIMESTAMP_FORMATS
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(t, f).ok())
}

impl Value {
    /// True for NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The value's date, for the policy: dates, timestamps, and date-like text.
    pub fn as_date(&self) -> Option<NaiveDate> {
        match self {
            Value::Date(d) => Some(*d),
            Value::Timestamp(t) => Some(t.date()),
            Value::TimestampTz(t) => Some(t.date_naive()),
            Value::Text(s) => parse_date(s),
            _ => None,
        }
    }

    /// The value's size in bytes as read: texts and bytes by length, others by their width.
    /// Plans and runs report bytes per tier with it.
    pub fn size(&self) -> usize {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Date(_) => 4,
            Value::Int(_) | Value::Float(_) | Value::Timestamp(_) | Value::TimestampTz(_) => 8,
            Value::Text(t) => t.len(),
            Value::Bytes(b) => b.len(),
        }
    }

    /// Like [`Value::as_key_text`], without copying a text.
    pub fn into_key_text(self) -> Option<String> {
        match self {
            Value::Text(t) => Some(t),
            other => other.as_key_text(),
        }
    }

    /// The value as text for keys and status comparisons (None for NULL and bytes).
    pub fn as_key_text(&self) -> Option<String> {
        match self {
            Value::Null | Value::Bytes(_) => None,
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Text(s) => Some(s.clone()),
            Value::Date(d) => Some(d.to_string()),
            Value::Timestamp(t) => Some(t.format("%Y-%m-%d %H:%M:%S%.f").to_string()),
            Value::TimestampTz(t) => Some(t.to_rfc3339()),
        }
    }

    /// Converts the value to a column's type, or says why it cannot (never quoting the value:
    /// it may be PHI).
    pub fn coerce(self, to: ColumnType) -> Result<Value, &'static str> {
        use ColumnType as T;
        use Value as V;
        Ok(match (to, self) {
            (_, V::Null) => V::Null,
            (T::Int, V::Int(i)) => V::Int(i),
            (T::Int, V::Float(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => V::Int(f as i64),
            (T::Int, V::Bool(b)) => V::Int(b as i64),
            (T::Int, V::Text(s)) => V::Int(s.trim().parse().map_err(|_| "not an integer")?),
            (T::Int, _) => return Err("not an integer"),
            (T::Float, V::Float(f)) => V::Float(f),
            (T::Float, V::Int(i)) => V::Float(i as f64),
            (T::Float, V::Text(s)) => V::Float(s.trim().parse().map_err(|_| "not a number")?),
            (T::Float, _) => return Err("not a number"),
            (T::Bool, V::Bool(b)) => V::Bool(b),
            (T::Bool, V::Int(0)) => V::Bool(false),
            (T::Bool, V::Int(1)) => V::Bool(true),
            (T::Bool, V::Text(s)) => match s.trim().to_ascii_lowercase().as_str() {
                "t" | "true" | "1" | "y" | "yes" => V::Bool(true),
                "f" | "false" | "0" | "n" | "no" => V::Bool(false),
                _ => return Err("not a boolean"),
            },
            (T::Bool, _) => return Err("not a boolean"),
            (T::Text | T::Other, V::Bytes(b)) => {
                V::Text(String::from_utf8(b).map_err(|_| "invalid UTF-8 text")?)
            }
            (T::Text | T::Other, v) => V::Text(v.as_key_text().expect("not null or bytes")),
            (T::Bytes, V::Bytes(b)) => V::Bytes(b),
            (T::Bytes, V::Text(s)) => V::Bytes(s.into_bytes()),
            (T::Bytes, _) => return Err("not binary data"),
            (T::Date, V::Text(s)) => V::Date(parse_date(&s).ok_or("not a valid date")?),
            (T::Date, v) => V::Date(v.as_date().ok_or("not a valid date")?),
            (T::Timestamp, V::Timestamp(t)) => V::Timestamp(t),
            (T::Timestamp, V::TimestampTz(t)) => V::Timestamp(t.naive_utc()),
            (T::Timestamp, V::Date(d)) => V::Timestamp(d.and_hms_opt(0, 0, 0).expect("midnight")),
            (T::Timestamp, V::Text(s)) => {
                V::Timestamp(parse_timestamp(&s).ok_or("not a valid timestamp")?)
            }
            (T::Timestamp, _) => return Err("not a valid timestamp"),
            (T::TimestampTz, V::TimestampTz(t)) => V::TimestampTz(t),
            (T::TimestampTz, V::Timestamp(t)) => V::TimestampTz(t.and_utc()),
            (T::TimestampTz, V::Date(d)) => {
                V::TimestampTz(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
            }
            (T::TimestampTz, V::Text(s)) => V::TimestampTz(
                parse_timestamp(&s)
                    .ok_or("not a valid timestamp")?
                    .and_utc(),
            ),
            (T::TimestampTz, _) => return Err("not a valid timestamp"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_legacy_date_texts() {
        for t in [
            "2020-01-02",
            "2020-01-02T03:04:05Z",
            "2020-01-02 03:04:05.123",
            "2020-01-02T03:04:05+00:00",
        ] {
            assert_eq!(parse_date(t), NaiveDate::from_ymd_opt(2020, 1, 2), "{t}");
        }
        assert_eq!(parse_date("02/01/2020"), None);
        assert_eq!(parse_date("2020-02-30"), None);
    }

    #[test]
    fn coerces_or_names_the_problem() {
        assert_eq!(
            Value::Text("42".into()).coerce(ColumnType::Int),
            Ok(Value::Int(42))
        );
        assert_eq!(
            Value::Text("4x2".into()).coerce(ColumnType::Int),
            Err("not an integer")
        );
        assert_eq!(
            Value::Bytes(vec![0xff, 0xfe]).coerce(ColumnType::Text),
            Err("invalid UTF-8 text")
        );
        assert_eq!(
            Value::Text("2020-13-01".into()).coerce(ColumnType::Date),
            Err("not a valid date")
        );
        assert_eq!(Value::Null.coerce(ColumnType::Date), Ok(Value::Null));
    }
}
