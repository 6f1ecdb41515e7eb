//! The EHR's patient id (a launch's `patient`: a new EHR id, an MRN) to the legacy patient key
//! the archive is laid out by, through `[api.viewer.cross_reference]`: the table and column
//! holding the EHR's id beside the legacy key, looked up in the operational database (active
//! patients) and then in the archive (patients whose rows were archived). Without a
//! cross-reference, the EHR's id is the legacy key.
//!
//! The archive's side is an index of the table's rows, built once per catalog (about 100
//! bytes per archived patient) and rebuilt when the catalog changes.

use crate::error::ApiError;
use crate::state::AppState;
use arrow::array::{Array, AsArray};
use std::collections::HashMap;
use std::sync::Arc;

/// The archive's index: the catalog generation it was built for, and EHR id → the legacy keys
/// of the rows holding it (more than one: ambiguous).
pub type ArchiveIndex = Arc<tokio::sync::Mutex<Option<(u64, Arc<HashMap<String, Vec<String>>>)>>>;

/// The legacy patient key of the EHR's patient `ehr_id`, if any patient has it.
pub(crate) async fn legacy_key(state: &AppState, ehr_id: &str) -> Result<Option<String>, ApiError> {
    let Some(xref) = &state.viewer.cross_reference else {
        return Ok(Some(ehr_id.to_string()));
    };
    if let (Some(url), Some(key_column)) = (&state.operational, &xref.key_column) {
        if let Some(key) = operational(url, &xref.table, &xref.column, key_column, ehr_id).await? {
            return Ok(Some(key));
        }
    }
    let index = archive_index(state, &xref.table, &xref.column).await?;
    unambiguous(index.get(ehr_id).cloned().unwrap_or_default())
}

pub(crate) fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Runs `sql` (one query, `$1`.. bound to `binds`, every column text) on the operational
/// database at `url`, read-only, on a connection of its own.
pub(crate) async fn operational_rows(
    url: &str,
    sql: &str,
    binds: &[String],
) -> Result<Vec<Vec<Option<String>>>, ApiError> {
    let failed = |e: sqlx::Error| ApiError::Internal(format!("the operational database: {e}"));
    // The same query and reading on either engine's pool.
    macro_rules! text_rows {
        ($pool:expr) => {{
            use sqlx::Row;
            let pool = $pool;
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()));
            for b in binds {
                q = q.bind(b.clone());
            }
            let rows = q.fetch_all(&pool).await.map_err(failed);
            pool.close().await;
            rows?
                .iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| r.try_get::<Option<String>, _>(i).ok().flatten())
                        .collect()
                })
                .collect()
        }};
    }
    if url.starts_with("sqlite:") {
        let options = url
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .map_err(failed)?
            .read_only(true);
        Ok(text_rows!(sqlx::SqlitePool::connect_with(options)
            .await
            .map_err(failed)?))
    } else {
        Ok(text_rows!(sqlx::PgPool::connect(url)
            .await
            .map_err(failed)?))
    }
}

/// Looks `ehr_id` up in the operational database.
async fn operational(
    url: &str,
    table: &str,
    column: &str,
    key_column: &str,
    ehr_id: &str,
) -> Result<Option<String>, ApiError> {
    let sql = format!(
        "SELECT DISTINCT CAST({} AS TEXT) FROM {} WHERE CAST({} AS TEXT) = $1 LIMIT 2",
        quoted(key_column),
        quoted(table),
        quoted(column)
    );
    let keys: Vec<String> = operational_rows(url, &sql, &[ehr_id.to_string()])
        .await?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
    unambiguous(keys)
}

/// The one key of `keys`; an id that names two patients (an MRN reassigned, two records
/// merged) names none: a launch must not open the wrong patient's chart as in care.
fn unambiguous(keys: Vec<String>) -> Result<Option<String>, ApiError> {
    match keys.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        _ => Err(ApiError::BadRequest(
            "the EHR's patient id matches more than one legacy patient: fix the cross-reference"
                .into(),
        )),
    }
}

/// The archive's index of `table`'s `column`, for the current catalog.
async fn archive_index(
    state: &AppState,
    table: &str,
    column: &str,
) -> Result<Arc<HashMap<String, Vec<String>>>, ApiError> {
    let view = state.archive.view();
    let generation = view.catalog().generation();
    let mut slot = state.viewer.archive_index.lock().await;
    if let Some((g, index)) = slot.as_ref() {
        if *g == generation {
            return Ok(index.clone());
        }
    }
    let mut index: HashMap<String, Vec<String>> = HashMap::new();
    for manifest in view.catalog().tables.get(table).into_iter().flatten() {
        for file in &manifest.files {
            for batch in view.read_file(file).await? {
                let Some(ids) = batch.column_by_name(column) else {
                    continue;
                };
                let ids = arrow::compute::cast(ids, &arrow::datatypes::DataType::Utf8)
                    .map_err(|e| ApiError::Internal(format!("cross-reference: {e}")))?;
                let ids = ids.as_string::<i32>();
                let patients = batch.column(0).as_string::<i32>();
                for row in 0..batch.num_rows() {
                    if ids.is_valid(row) && patients.is_valid(row) {
                        let keys = index.entry(ids.value(row).to_string()).or_default();
                        let key = patients.value(row);
                        if !keys.iter().any(|k| k == key) {
                            keys.push(key.to_string());
                        }
                    }
                }
            }
        }
    }
    let index = Arc::new(index);
    *slot = Some((generation, index.clone()));
    Ok(index)
}
