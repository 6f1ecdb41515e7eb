//! The row layout of an archived table's files, owned here so that a format change touches one
//! crate: the meta columns (patient key, record date, record key), then the source's columns in
//! order, each BLOB column replaced by its four reference columns. Writers build a table's
//! schema with [`table_schema`]; readers decode a batch with [`ArchivedBatch`], so that no
//! other crate looks for columns by name or downcasts Arrow arrays of archived rows.

use crate::{BlobRef, BLOB_REF_SUFFIXES, KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN};
use arrow::array::{Array, AsArray, Date32Array, RecordBatch, StringArray};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Field, Float64Type, Int32Type, Int64Type, Schema,
    SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use std::sync::Arc;

/// The type a source column is archived as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// 64-bit integer.
    Int,
    /// 64-bit float.
    Float,
    /// Boolean.
    Bool,
    /// Bytes kept in the row (not a BLOB column).
    Bytes,
    /// A calendar day.
    Date,
    /// A timestamp without time zone, microseconds.
    Timestamp,
    /// A timestamp in UTC, microseconds.
    TimestampUtc,
    /// UTF-8 text (also what any other type is archived as).
    Text,
    /// An exact decimal of at most `precision` digits, `scale` of them after the point
    /// (PostgreSQL's `numeric(p,s)`): Parquet DECIMAL, `Decimal128` in Arrow.
    Decimal {
        /// Digits in all (at most 38).
        precision: u8,
        /// Digits after the point.
        scale: i8,
    },
    /// An exact decimal of any size (an unconstrained `numeric`, NaN and infinities
    /// included), kept as the text it was written as: UTF-8 whose field metadata
    /// ([`DECIMAL_TEXT_METADATA`]) says it is a decimal.
    DecimalText,
}

/// The field metadata that marks a text column as holding decimals:
/// `"strata:type" = "decimal"`.
pub const DECIMAL_TEXT_METADATA: (&str, &str) = ("strata:type", "decimal");

impl ValueType {
    fn arrow(self) -> DataType {
        match self {
            ValueType::Int => DataType::Int64,
            ValueType::Float => DataType::Float64,
            ValueType::Bool => DataType::Boolean,
            ValueType::Bytes => DataType::Binary,
            ValueType::Date => DataType::Date32,
            ValueType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            ValueType::TimestampUtc => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            ValueType::Text | ValueType::DecimalText => DataType::Utf8,
            ValueType::Decimal { precision, scale } => DataType::Decimal128(precision, scale),
        }
    }

    fn field(self, name: &str) -> Field {
        let field = Field::new(name, self.arrow(), true);
        match self {
            ValueType::DecimalText => field.with_metadata(std::collections::HashMap::from([(
                DECIMAL_TEXT_METADATA.0.to_string(),
                DECIMAL_TEXT_METADATA.1.to_string(),
            )])),
            _ => field,
        }
    }
}

/// One source column of an archived table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedColumn {
    /// Its name in the archive (the operational name).
    pub name: String,
    /// Its type, or None for a BLOB column (stored as objects, referenced from the row).
    pub value: Option<ValueType>,
}

/// The schema of a table's archive files, for its source `columns` in order.
pub fn table_schema(columns: &[ArchivedColumn]) -> SchemaRef {
    let mut fields = vec![
        Field::new(PATIENT_COLUMN, DataType::Utf8, false),
        Field::new(RECORD_DATE_COLUMN, DataType::Date32, true),
        Field::new(KEY_COLUMN, DataType::Utf8, false),
    ];
    for c in columns {
        match c.value {
            Some(t) => fields.push(t.field(&c.name)),
            None => {
                let types = [
                    DataType::Utf8,
                    DataType::Int64,
                    DataType::Utf8,
                    DataType::Utf8,
                ];
                for (suffix, t) in BLOB_REF_SUFFIXES.iter().zip(types) {
                    fields.push(Field::new(format!("{}{suffix}", c.name), t, true));
                }
            }
        }
    }
    Arc::new(Schema::new(fields))
}

/// One archived value, borrowed from its batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    /// NULL (or a type this version does not read).
    Null,
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// Text.
    Text(&'a str),
    /// Bytes kept in the row.
    Bytes(&'a [u8]),
    /// A day.
    Date(NaiveDate),
    /// A timestamp without time zone.
    Timestamp(NaiveDateTime),
    /// A timestamp in UTC.
    TimestampUtc(DateTime<Utc>),
    /// An exact decimal: `units` × 10^-`scale`.
    Decimal {
        /// The value in units of the last digit.
        units: i128,
        /// Digits after the point.
        scale: i8,
    },
    /// An exact decimal kept as its text (`NaN` and `Infinity` too).
    DecimalText(&'a str),
}

/// A decimal as text with exactly `scale` digits after the point (`136.00`).
fn decimal_text(units: i128, scale: i8) -> String {
    if scale <= 0 {
        return (units * 10i128.pow(u32::from(scale.unsigned_abs()))).to_string();
    }
    let digits = units.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    let sign = if units < 0 { "-" } else { "" };
    format!("{sign}{int}.{frac}")
}

/// A decimal's text reduced to a canonical form (no `+`, no leading zeros, no trailing zeros
/// after the point, no `-0`), to compare two ways of writing one number.
fn canonical_decimal(text: &str) -> Option<String> {
    let t = text.trim();
    let (negative, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let zero = int == "0" && frac.is_empty();
    let sign = if negative && !zero { "-" } else { "" };
    Some(if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

/// A decimal as JSON: a number when a double holds exactly the value written (its shortest
/// text is the same number), else the exact text as a string (so that no digit is lost).
pub fn decimal_json(text: &str) -> serde_json::Value {
    let exact = text
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .filter(|f| {
            canonical_decimal(text).is_some_and(|c| Some(c) == canonical_decimal(&f.to_string()))
        });
    match exact.and_then(serde_json::Number::from_f64) {
        Some(n) => serde_json::Value::Number(n),
        None => serde_json::Value::String(text.to_string()),
    }
}

impl Cell<'_> {
    /// The value as JSON: numbers and booleans as such, days as `YYYY-MM-DD`, timestamps in
    /// ISO 8601 (RFC 3339 in UTC), bytes as their length only (`<n bytes>`).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match *self {
            Cell::Null => Value::Null,
            Cell::Int(i) => i.into(),
            Cell::Float(f) => f.into(),
            Cell::Bool(b) => b.into(),
            Cell::Text(t) => t.into(),
            Cell::Bytes(b) => format!("<{} bytes>", b.len()).into(),
            Cell::Date(d) => d.to_string().into(),
            Cell::Timestamp(t) => t.format("%Y-%m-%dT%H:%M:%S%.f").to_string().into(),
            Cell::TimestampUtc(t) => t.to_rfc3339().into(),
            Cell::Decimal { units, scale } => decimal_json(&decimal_text(units, scale)),
            Cell::DecimalText(t) => decimal_json(t),
        }
    }

    /// The value as text, as Arrow's cast to UTF-8 shows it (for comparing with codes): text
    /// as is, bytes when they are UTF-8, numbers, booleans, days and timestamps as
    /// [`Cell::to_json`] writes them, unquoted; None for NULL.
    pub fn to_text(&self) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match *self {
            Cell::Null => None,
            Cell::Text(t) | Cell::DecimalText(t) => Some(Cow::Borrowed(t)),
            Cell::Decimal { units, scale } => Some(Cow::Owned(decimal_text(units, scale))),
            Cell::Bytes(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
            other => match other.to_json() {
                serde_json::Value::String(s) => Some(Cow::Owned(s)),
                serde_json::Value::Null => None,
                v => Some(Cow::Owned(v.to_string())),
            },
        }
    }

    /// The value as a number, for a numeric value.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Cell::Int(i) => Some(i as f64),
            Cell::Float(f) => Some(f),
            Cell::Decimal { units, scale } => decimal_text(units, scale).parse().ok(),
            Cell::DecimalText(t) => t.trim().parse().ok(),
            _ => None,
        }
    }
}

/// The value in row `row` of an archived column.
pub fn cell(array: &dyn Array, row: usize) -> Cell<'_> {
    if array.is_null(row) {
        return Cell::Null;
    }
    match array.data_type() {
        DataType::Int64 => Cell::Int(array.as_primitive::<Int64Type>().value(row)),
        DataType::Int32 => Cell::Int(array.as_primitive::<Int32Type>().value(row).into()),
        DataType::Float64 => Cell::Float(array.as_primitive::<Float64Type>().value(row)),
        DataType::Boolean => Cell::Bool(array.as_boolean().value(row)),
        DataType::Utf8 => Cell::Text(array.as_string::<i32>().value(row)),
        DataType::Decimal128(_, scale) => Cell::Decimal {
            units: array.as_primitive::<Decimal128Type>().value(row),
            scale: *scale,
        },
        DataType::Binary => Cell::Bytes(array.as_binary::<i32>().value(row)),
        DataType::Date32 => {
            Date32Type::to_naive_date_opt(array.as_primitive::<Date32Type>().value(row))
                .map_or(Cell::Null, Cell::Date)
        }
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            let micros = array.as_primitive::<TimestampMicrosecondType>().value(row);
            match DateTime::from_timestamp_micros(micros) {
                Some(t) if tz.is_some() => Cell::TimestampUtc(t),
                Some(t) => Cell::Timestamp(t.naive_utc()),
                None => Cell::Null,
            }
        }
        _ => Cell::Null,
    }
}

/// [`cell`], with the text of a column marked as holding decimals read as decimals.
fn typed_cell(array: &dyn Array, row: usize, decimal_text: bool) -> Cell<'_> {
    match cell(array, row) {
        Cell::Text(t) if decimal_text => Cell::DecimalText(t),
        other => other,
    }
}

/// A batch read from a table's archive files (all columns or a projection), decoded by the
/// layout: its meta columns typed, its data columns apart from BLOB references.
pub struct ArchivedBatch<'a> {
    batch: &'a RecordBatch,
    patients: Option<&'a StringArray>,
    keys: Option<&'a StringArray>,
    dates: Option<&'a Date32Array>,
    /// Data columns: index in the batch, name, and whether it holds decimals as text.
    data: Vec<(usize, &'a str, bool)>,
    blob_columns: &'a [String],
}

impl<'a> ArchivedBatch<'a> {
    /// Decodes `batch` of a table whose BLOB columns are `blob_columns` (its manifest's).
    pub fn new(batch: &'a RecordBatch, blob_columns: &'a [String]) -> Self {
        let schema = batch.schema_ref();
        let text = |name: &str| {
            schema
                .index_of(name)
                .ok()
                .and_then(|i| batch.column(i).as_string_opt::<i32>())
        };
        let is_blob_ref = |name: &str| {
            blob_columns.iter().any(|b| {
                name.strip_prefix(b.as_str())
                    .is_some_and(|rest| BLOB_REF_SUFFIXES.contains(&rest))
            })
        };
        let data = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let decimal = f
                    .metadata()
                    .get(DECIMAL_TEXT_METADATA.0)
                    .map(String::as_str)
                    == Some(DECIMAL_TEXT_METADATA.1);
                (i, f.name().as_str(), decimal)
            })
            .filter(|(_, n, _)| {
                ![PATIENT_COLUMN, RECORD_DATE_COLUMN, KEY_COLUMN].contains(n) && !is_blob_ref(n)
            })
            .collect();
        ArchivedBatch {
            batch,
            patients: text(PATIENT_COLUMN),
            keys: text(KEY_COLUMN),
            dates: schema
                .index_of(RECORD_DATE_COLUMN)
                .ok()
                .and_then(|i| batch.column(i).as_primitive_opt::<Date32Type>()),
            data,
            blob_columns,
        }
    }

    /// Rows in the batch.
    pub fn num_rows(&self) -> usize {
        self.batch.num_rows()
    }

    /// The row's patient key ("" for a record without one; None when not read).
    pub fn patient(&self, row: usize) -> Option<&'a str> {
        self.patients.map(|p| p.value(row))
    }

    /// The row's record key (None when not read).
    pub fn key(&self, row: usize) -> Option<&'a str> {
        self.keys.map(|k| k.value(row))
    }

    /// Every row's patient key, in order; None when the batch has no patient column.
    pub fn patients(&self) -> Option<impl Iterator<Item = &'a str> + 'a> {
        self.patients.map(|p| (0..p.len()).map(move |r| p.value(r)))
    }

    /// Every row's record key, in order; None when the batch has no key column.
    pub fn keys(&self) -> Option<impl Iterator<Item = &'a str> + 'a> {
        self.keys.map(|k| (0..k.len()).map(move |r| k.value(r)))
    }

    /// The row's record date, if it has one (and it was read).
    pub fn record_date(&self, row: usize) -> Option<NaiveDate> {
        self.record_days(row)
            .and_then(Date32Type::to_naive_date_opt)
    }

    /// The row's record date as the archive stores it, days since 1970-01-01 (for filters
    /// that compare many rows' dates).
    pub fn record_days(&self, row: usize) -> Option<i32> {
        self.dates.filter(|d| !d.is_null(row)).map(|d| d.value(row))
    }

    /// The data columns' names, in the file's order (BLOB columns only by their references).
    pub fn data_columns(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.data.iter().map(|(_, n, _)| *n)
    }

    /// The data columns' values in a row, with their names, in the file's order.
    pub fn data(&self, row: usize) -> impl Iterator<Item = (&'a str, Cell<'a>)> + '_ {
        self.data.iter().map(move |&(i, n, decimal)| {
            (n, typed_cell(self.batch.column(i).as_ref(), row, decimal))
        })
    }

    /// The value of data column `name` in a row: None when the batch has no such column.
    pub fn value(&self, name: &str, row: usize) -> Option<Cell<'a>> {
        self.data
            .iter()
            .find(|(_, n, _)| *n == name)
            .map(|&(i, _, decimal)| typed_cell(self.batch.column(i).as_ref(), row, decimal))
    }

    /// Every row's value of data column `name`, in order: None when the batch has no such
    /// column.
    pub fn values(&self, name: &str) -> Option<impl Iterator<Item = Cell<'a>> + 'a> {
        let &(i, _, decimal) = self.data.iter().find(|(_, n, _)| *n == name)?;
        let column = self.batch.column(i);
        Some((0..self.batch.num_rows()).map(move |row| typed_cell(column.as_ref(), row, decimal)))
    }

    /// The row's BLOB references, with their columns, in the manifest's order.
    pub fn blobs(&self, row: usize) -> impl Iterator<Item = (&'a str, BlobRef)> + '_ {
        self.blob_columns
            .iter()
            .filter_map(move |b| Some((b.as_str(), crate::blob_ref(self.batch, b, row)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decimal is a JSON number when a double holds exactly the value written, else its
    /// exact text; its text keeps the digits it was written with.
    #[test]
    fn decimals_are_numbers_only_when_exact() {
        assert_eq!(decimal_json("0.7146"), serde_json::json!(0.7146));
        assert_eq!(decimal_json("136.00"), serde_json::json!(136.0));
        assert_eq!(decimal_json("-0.50"), serde_json::json!(-0.5));
        for exact_text in [
            "12345678901234567890.123456789",
            "0.1000000000000000055511151231257827",
            "NaN",
            "Infinity",
            "-Infinity",
        ] {
            assert_eq!(decimal_json(exact_text), serde_json::json!(exact_text));
        }
        let cell = Cell::Decimal {
            units: 13600,
            scale: 2,
        };
        assert_eq!(cell.to_text().unwrap(), "136.00");
        assert_eq!(
            Cell::Decimal {
                units: -5,
                scale: 3
            }
            .to_text()
            .unwrap(),
            "-0.005"
        );
        assert_eq!(Cell::Decimal { units: 7, scale: 0 }.to_text().unwrap(), "7");
        assert_eq!(cell.as_f64(), Some(136.0));
        assert_eq!(
            Cell::DecimalText("0.7146").to_json(),
            serde_json::json!(0.7146)
        );
    }
    use arrow::array::{ArrayRef, Date32Array, Int64Array, StringArray, TimestampMicrosecondArray};

    #[test]
    fn a_batch_decodes_by_its_layout() {
        let columns = [
            ArchivedColumn {
                name: "value".into(),
                value: Some(ValueType::Int),
            },
            ArchivedColumn {
                name: "scan".into(),
                value: None,
            },
            ArchivedColumn {
                name: "taken".into(),
                value: Some(ValueType::TimestampUtc),
            },
        ];
        let schema = table_schema(&columns);
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            [
                PATIENT_COLUMN,
                RECORD_DATE_COLUMN,
                KEY_COLUMN,
                "value",
                "scan__object",
                "scan__length",
                "scan__sha256",
                "scan__content_type",
                "taken"
            ]
        );
        let text = |v: Vec<Option<&str>>| Arc::new(StringArray::from(v)) as ArrayRef;
        let batch = RecordBatch::try_new(
            schema,
            vec![
                text(vec![Some("p1"), Some("")]),
                Arc::new(Date32Array::from(vec![Some(0), None])),
                text(vec![Some("id=1"), Some("id=2")]),
                Arc::new(Int64Array::from(vec![Some(7), None])),
                text(vec![Some("obj"), None]),
                Arc::new(Int64Array::from(vec![Some(3), None])),
                text(vec![Some("ab"), None]),
                text(vec![Some("image/png"), None]),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![Some(1_000_000), None])
                        .with_timezone("UTC"),
                ),
            ],
        )
        .unwrap();
        let blob_columns = vec!["scan".to_string()];
        let b = ArchivedBatch::new(&batch, &blob_columns);
        assert_eq!(b.num_rows(), 2);
        assert_eq!(b.patients().unwrap().collect::<Vec<_>>(), ["p1", ""]);
        assert_eq!(b.keys().unwrap().collect::<Vec<_>>(), ["id=1", "id=2"]);
        assert_eq!((b.patient(0), b.key(1)), (Some("p1"), Some("id=2")));
        assert_eq!(b.record_date(0), NaiveDate::from_ymd_opt(1970, 1, 1));
        assert_eq!(b.record_date(1), None);
        assert_eq!(b.data_columns().collect::<Vec<_>>(), ["value", "taken"]);
        let row: Vec<(&str, serde_json::Value)> =
            b.data(0).map(|(n, c)| (n, c.to_json())).collect();
        assert_eq!(
            row,
            [
                ("value", 7.into()),
                ("taken", "1970-01-01T00:00:01+00:00".into())
            ]
        );
        assert_eq!(b.value("value", 1), Some(Cell::Null));
        let text = |c: Cell| c.to_text().map(|t| t.into_owned());
        assert_eq!(text(Cell::Int(42)), Some("42".into()));
        assert_eq!(text(Cell::Bool(true)), Some("true".into()));
        assert_eq!(
            text(Cell::Date(NaiveDate::from_ymd_opt(2020, 1, 2).unwrap())),
            Some("2020-01-02".into())
        );
        assert_eq!(text(Cell::Bytes(b"718-7")), Some("718-7".into()));
        assert_eq!(text(Cell::Null), None);
        assert_eq!(b.value("nope", 0), None);
        assert_eq!(
            b.values("value").unwrap().collect::<Vec<_>>(),
            [Cell::Int(7), Cell::Null]
        );
        assert!(b.values("nope").is_none());
        let blobs: Vec<_> = b.blobs(0).collect();
        assert_eq!(blobs.len(), 1);
        assert_eq!((blobs[0].0, blobs[0].1.length), ("scan", 3));
        assert_eq!(b.blobs(1).count(), 0);
    }
}
