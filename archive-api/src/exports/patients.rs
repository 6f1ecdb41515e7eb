//! The patients table's rows in the operational database, for FHIR `Patient` resources when the
//! patients table (the master patient index) stays operational: read-only, streamed in
//! batches shaped like archived rows, so that the same de-identification plan applies.

use arrow::array::{Date32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef};
use futures::TryStreamExt;
use sqlx::Row;
use std::sync::Arc;
use strata_archive::{KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN};
use tokio::sync::mpsc;

/// Rows per batch.
const BATCH_ROWS: usize = 8192;

/// The archived-row schema of the patients' rows: Strata's three columns, then `columns`
/// (dates as dates, the rest as text).
fn schema(columns: &[(String, bool)]) -> SchemaRef {
    let mut fields = vec![
        Field::new(PATIENT_COLUMN, DataType::Utf8, false),
        Field::new(RECORD_DATE_COLUMN, DataType::Date32, true),
        Field::new(KEY_COLUMN, DataType::Utf8, false),
    ];
    for (name, date) in columns {
        let t = if *date {
            DataType::Date32
        } else {
            DataType::Utf8
        };
        fields.push(Field::new(name, t, true));
    }
    Arc::new(Schema::new(fields))
}

fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn batch(
    schema: &SchemaRef,
    keys: Vec<String>,
    values: Vec<Vec<Option<String>>>,
    dates: &[bool],
) -> Result<RecordBatch, String> {
    let n = keys.len();
    let mut columns: Vec<arrow::array::ArrayRef> = vec![
        Arc::new(StringArray::from(keys.clone())),
        Arc::new(Date32Array::from(vec![None; n])),
        Arc::new(StringArray::from(keys)),
    ];
    for (column, date) in values.into_iter().zip(dates) {
        if *date {
            columns.push(Arc::new(
                column
                    .iter()
                    .map(|v| {
                        let v = v.as_deref()?;
                        let day =
                            chrono::NaiveDate::parse_from_str(v.get(..10)?, "%Y-%m-%d").ok()?;
                        Some(Date32Type::from_naive_date(day))
                    })
                    .collect::<Date32Array>(),
            ));
        } else {
            columns.push(Arc::new(StringArray::from(column)));
        }
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

/// Streams `table`'s rows from the operational database at `url` (PostgreSQL or SQLite) as
/// batches: the patient key (`key`) and `columns` (name, whether it holds dates). A task of its
/// own reads them; at most two batches wait at a time.
pub(crate) fn operational_patients(
    url: String,
    table: String,
    key: String,
    columns: Vec<(String, bool)>,
) -> (SchemaRef, mpsc::Receiver<Result<RecordBatch, String>>) {
    let schema = schema(&columns);
    let (tx, rx) = mpsc::channel(2);
    let out = schema.clone();
    tokio::spawn(async move {
        let select = std::iter::once(&key)
            .chain(columns.iter().map(|(c, _)| c))
            .map(|c| format!("CAST({} AS TEXT)", quote(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!("SELECT {select} FROM {}", quote(&table));
        let dates: Vec<bool> = columns.iter().map(|(_, d)| *d).collect();
        let width = columns.len();
        let read = async {
            let mut keys = Vec::with_capacity(BATCH_ROWS);
            let mut values: Vec<Vec<Option<String>>> = vec![Vec::new(); width];
            macro_rules! drain {
                ($rows:expr) => {{
                    let mut rows = $rows;
                    while let Some(row) = rows.try_next().await.map_err(|e| e.to_string())? {
                        let k: Option<String> = row.try_get(0).map_err(|e| e.to_string())?;
                        let Some(k) = k else { continue };
                        keys.push(k);
                        for (i, v) in values.iter_mut().enumerate() {
                            v.push(row.try_get(i + 1).map_err(|e| e.to_string())?);
                        }
                        if keys.len() == BATCH_ROWS {
                            let b = batch(
                                &schema,
                                std::mem::take(&mut keys),
                                std::mem::replace(&mut values, vec![Vec::new(); width]),
                                &dates,
                            )?;
                            if tx.send(Ok(b)).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                }};
            }
            if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await
                    .map_err(|e| format!("operational database: {e}"))?;
                drain!(sqlx::query(sqlx::AssertSqlSafe(sql.clone())).fetch(&pool));
                pool.close().await;
            } else {
                let options: sqlx::sqlite::SqliteConnectOptions = url
                    .parse()
                    .map_err(|e| format!("operational database: {e}"))?;
                let pool = sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options.read_only(true))
                    .await
                    .map_err(|e| format!("operational database: {e}"))?;
                drain!(sqlx::query(sqlx::AssertSqlSafe(sql.clone())).fetch(&pool));
                pool.close().await;
            }
            if !keys.is_empty() {
                let b = batch(&schema, keys, values, &dates)?;
                let _ = tx.send(Ok(b)).await;
            }
            Ok::<(), String>(())
        };
        if let Err(e) = read.await {
            let _ = tx.send(Err(e)).await;
        }
    });
    (out, rx)
}
