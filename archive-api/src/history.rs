//! A patient's archived history as JSON: every table's rows for the patient, newest first.

use crate::error::ApiError;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Date32Type, Float64Type, Int64Type, TimeUnit, TimestampMicrosecondType,
};
use serde::Serialize;
use serde_json::{Map, Value};
use strata_archive::{
    blob_ref, ArchiveReader, BlobRef, BLOB_REF_SUFFIXES, KEY_COLUMN, PATIENT_COLUMN,
    RECORD_DATE_COLUMN,
};

/// One archived record.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRecord {
    /// The source table.
    pub table: String,
    /// The record's date (YYYY-MM-DD), if it has one.
    pub record_date: Option<String>,
    /// The record's columns.
    pub data: Map<String, Value>,
    /// Documents (BLOBs) attached to the record.
    pub documents: Vec<DocumentLink>,
}

/// A document attached to a record.
#[derive(Debug, Clone, Serialize)]
pub struct DocumentLink {
    /// The source column.
    pub column: String,
    /// The document id to fetch.
    pub id: String,
    /// Where to fetch it.
    pub href: String,
    /// MIME type.
    pub content_type: String,
    /// Length in bytes.
    pub length: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

fn cell(array: &dyn Array, row: usize) -> Value {
    if array.is_null(row) {
        return Value::Null;
    }
    match array.data_type() {
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row).into(),
        DataType::Float64 => array.as_primitive::<Float64Type>().value(row).into(),
        DataType::Boolean => array.as_boolean().value(row).into(),
        DataType::Utf8 => array.as_string::<i32>().value(row).into(),
        DataType::Date32 => {
            Date32Type::to_naive_date_opt(array.as_primitive::<Date32Type>().value(row))
                .map(|d| d.to_string().into())
                .unwrap_or(Value::Null)
        }
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            let micros = array.as_primitive::<TimestampMicrosecondType>().value(row);
            match chrono::DateTime::from_timestamp_micros(micros) {
                Some(t) if tz.is_some() => t.to_rfc3339().into(),
                Some(t) => t
                    .naive_utc()
                    .format("%Y-%m-%dT%H:%M:%S%.f")
                    .to_string()
                    .into(),
                None => Value::Null,
            }
        }
        DataType::Binary => Value::String(format!(
            "<{} bytes>",
            array.as_binary::<i32>().value(row).len()
        )),
        _ => Value::Null,
    }
}

/// Reads one patient's records from every archived table.
pub async fn patient_history(
    archive: &ArchiveReader,
    patient: &str,
) -> Result<Vec<HistoryRecord>, ApiError> {
    let mut records = Vec::new();
    for table in archive.catalog().tables.keys() {
        let blob_columns = archive.catalog().blob_columns(table);
        for batch in archive.patient_rows(table, patient).await? {
            records.extend(batch_records(table, &batch, &blob_columns, patient));
        }
    }
    records.sort_by(|a, b| {
        b.record_date
            .cmp(&a.record_date)
            .then_with(|| a.table.cmp(&b.table))
    });
    Ok(records)
}

fn batch_records(
    table: &str,
    batch: &RecordBatch,
    blob_columns: &[String],
    patient: &str,
) -> Vec<HistoryRecord> {
    let schema = batch.schema();
    let mut out = Vec::with_capacity(batch.num_rows());
    for row in 0..batch.num_rows() {
        let mut data = Map::new();
        let mut record_date = None;
        for (i, field) in schema.fields().iter().enumerate() {
            let name = field.name();
            if name == PATIENT_COLUMN || name == KEY_COLUMN {
                continue;
            }
            let v = cell(batch.column(i).as_ref(), row);
            if name == RECORD_DATE_COLUMN {
                record_date = v.as_str().map(str::to_string);
                continue;
            }
            if blob_columns
                .iter()
                .any(|b| BLOB_REF_SUFFIXES.iter().any(|s| name == &format!("{b}{s}")))
            {
                continue;
            }
            data.insert(name.clone(), v);
        }
        let documents = blob_columns
            .iter()
            .filter_map(|b| Some((b.clone(), blob_ref(batch, b, row)?)))
            .map(|(column, r)| DocumentLink {
                href: format!("/v1/patients/{patient}/documents/{}", r.object),
                id: r.object,
                column,
                content_type: r.content_type,
                length: r.length,
                sha256: r.sha256,
            })
            .collect();
        out.push(HistoryRecord {
            table: table.to_string(),
            record_date,
            data,
            documents,
        });
    }
    out
}

/// Finds the reference of `document` among the patient's archived rows: a document is served
/// only through a patient whose record points to it.
pub async fn find_document(
    archive: &ArchiveReader,
    patient: &str,
    document: &str,
) -> Result<Option<BlobRef>, ApiError> {
    for table in archive.catalog().tables.keys() {
        let blob_columns = archive.catalog().blob_columns(table);
        if blob_columns.is_empty() {
            continue;
        }
        for batch in archive.patient_rows(table, patient).await? {
            for row in 0..batch.num_rows() {
                for b in &blob_columns {
                    if let Some(r) = blob_ref(&batch, b, row) {
                        if r.object == document {
                            return Ok(Some(r));
                        }
                    }
                }
            }
        }
    }
    Ok(None)
}
