//! Turns archived rows into Arrow record batches in the archive's layout: patient key, record
//! date, then the source columns, each BLOB column replaced by its four reference columns.

use crate::layout::TableLayout;
use crate::value::{ColumnType, Value};
use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder,
    RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::NaiveDate;
use std::sync::Arc;
use strata_archive::{BlobRef, BLOB_REF_SUFFIXES, KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN};

/// One row bound for the archive.
#[derive(Debug, Clone)]
pub struct ArchivedRow {
    /// Patient key ("" when the row has none).
    pub patient: String,
    /// Record date.
    pub date: Option<NaiveDate>,
    /// The record's key (see `strata_archive::KEY_COLUMN`).
    pub key: String,
    /// Values, coerced to the column types; BLOB columns are `Null` here.
    pub values: Vec<Value>,
    /// References of the row's BLOB columns, in the layout's BLOB order.
    pub blobs: Vec<Option<BlobRef>>,
}

fn arrow_type(t: ColumnType) -> DataType {
    match t {
        ColumnType::Int => DataType::Int64,
        ColumnType::Float => DataType::Float64,
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Bytes => DataType::Binary,
        ColumnType::Date => DataType::Date32,
        ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        ColumnType::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        ColumnType::Text | ColumnType::Other => DataType::Utf8,
    }
}

/// The archive schema of a table.
pub fn archive_schema(layout: &TableLayout) -> SchemaRef {
    let mut fields = vec![
        Field::new(PATIENT_COLUMN, DataType::Utf8, false),
        Field::new(RECORD_DATE_COLUMN, DataType::Date32, true),
        Field::new(KEY_COLUMN, DataType::Utf8, false),
    ];
    for (i, c) in layout.columns().iter().enumerate() {
        let name = &layout.target_names[i];
        if layout.blobs.iter().any(|b| b.column == i) {
            let types = [
                DataType::Utf8,
                DataType::Int64,
                DataType::Utf8,
                DataType::Utf8,
            ];
            for (suffix, t) in BLOB_REF_SUFFIXES.iter().zip(types) {
                fields.push(Field::new(format!("{name}{suffix}"), t, true));
            }
        } else {
            fields.push(Field::new(name, arrow_type(c.col_type), true));
        }
    }
    Arc::new(Schema::new(fields))
}

const EPOCH: NaiveDate = match NaiveDate::from_ymd_opt(1970, 1, 1) {
    Some(d) => d,
    None => panic!(),
};

fn days(d: NaiveDate) -> i32 {
    (d - EPOCH).num_days() as i32
}

/// Builds one record batch.
pub fn to_record_batch(
    layout: &TableLayout,
    schema: &SchemaRef,
    rows: &[ArchivedRow],
) -> arrow::error::Result<RecordBatch> {
    let n = rows.len();
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    let mut patients = StringBuilder::with_capacity(n, n * 8);
    let mut dates = Date32Builder::with_capacity(n);
    for r in rows {
        patients.append_value(&r.patient);
        dates.append_option(r.date.map(days));
    }
    let keys: arrow::array::StringArray = rows.iter().map(|r| Some(r.key.as_str())).collect();
    arrays.push(Arc::new(patients.finish()));
    arrays.push(Arc::new(dates.finish()));
    arrays.push(Arc::new(keys));
    for (i, c) in layout.columns().iter().enumerate() {
        if let Some(b) = layout.blobs.iter().position(|b| b.column == i) {
            let refs = || rows.iter().map(move |r| r.blobs[b].as_ref());
            arrays.push(Arc::new(
                refs()
                    .map(|r| r.map(|r| r.object.clone()))
                    .collect::<arrow::array::StringArray>(),
            ));
            arrays.push(Arc::new(
                refs()
                    .map(|r| r.map(|r| r.length as i64))
                    .collect::<arrow::array::Int64Array>(),
            ));
            arrays.push(Arc::new(
                refs()
                    .map(|r| r.map(|r| r.sha256.clone()))
                    .collect::<arrow::array::StringArray>(),
            ));
            arrays.push(Arc::new(
                refs()
                    .map(|r| r.map(|r| r.content_type.clone()))
                    .collect::<arrow::array::StringArray>(),
            ));
            continue;
        }
        let values = rows.iter().map(|r| &r.values[i]);
        let array: ArrayRef = match c.col_type {
            ColumnType::Int => {
                let mut b = Int64Builder::with_capacity(n);
                values.for_each(|v| {
                    b.append_option(if let Value::Int(x) = v {
                        Some(*x)
                    } else {
                        None
                    })
                });
                Arc::new(b.finish())
            }
            ColumnType::Float => {
                let mut b = Float64Builder::with_capacity(n);
                values.for_each(|v| {
                    b.append_option(if let Value::Float(x) = v {
                        Some(*x)
                    } else {
                        None
                    })
                });
                Arc::new(b.finish())
            }
            ColumnType::Bool => {
                let mut b = BooleanBuilder::with_capacity(n);
                values.for_each(|v| {
                    b.append_option(if let Value::Bool(x) = v {
                        Some(*x)
                    } else {
                        None
                    })
                });
                Arc::new(b.finish())
            }
            ColumnType::Bytes => {
                let mut b = BinaryBuilder::new();
                values.for_each(|v| {
                    b.append_option(if let Value::Bytes(x) = v {
                        Some(x)
                    } else {
                        None
                    })
                });
                Arc::new(b.finish())
            }
            ColumnType::Date => {
                let mut b = Date32Builder::with_capacity(n);
                values.for_each(|v| {
                    b.append_option(if let Value::Date(x) = v {
                        Some(days(*x))
                    } else {
                        None
                    })
                });
                Arc::new(b.finish())
            }
            ColumnType::Timestamp => {
                let mut b = TimestampMicrosecondBuilder::with_capacity(n);
                values.for_each(|v| {
                    b.append_option(if let Value::Timestamp(x) = v {
                        Some(x.and_utc().timestamp_micros())
                    } else {
                        None
                    })
                });
                Arc::new(b.finish())
            }
            ColumnType::TimestampTz => {
                let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
                values.for_each(|v| {
                    b.append_option(if let Value::TimestampTz(x) = v {
                        Some(x.timestamp_micros())
                    } else {
                        None
                    })
                });
                Arc::new(b.finish())
            }
            ColumnType::Text | ColumnType::Other => {
                let mut b = StringBuilder::new();
                values.for_each(|v| {
                    b.append_option(if let Value::Text(x) = v {
                        Some(x)
                    } else {
                        None
                    })
                });
                Arc::new(b.finish())
            }
        };
        arrays.push(array);
    }
    RecordBatch::try_new(schema.clone(), arrays)
}
