//! Researchers' exports: a cohort of archived rows, de-identified by an export profile, written
//! as Parquet with a manifest (rows and SHA-256 per file) to the export location — never to the
//! archive — by a background job whose status the researcher polls.
//!
//! A profile (`[api.exports.profiles.<name>]`) says which tables may leave, which columns never
//! do (`remove`), which are replaced by keyed pseudonyms (`identifiers`), and whether record
//! dates keep their day or only their year. The patient key always leaves as a pseudonym: the
//! HMAC-SHA-256, under the export key, of `patient:` and the key (the same patient has the same
//! pseudonym in every table and every export made with that key); an identifier column's values
//! the same with `<column>:`. The record key (which holds primary-key values) never leaves, and
//! neither do BLOBs or their references.
//!
//! The cohort: tables, their columns (by default every column the profile lets out), a range of
//! record dates, and code lists (rows whose column holds one of the codes). When a record was
//! archived more than once, only its newest copy is exported.

use crate::config::{ExportProfile, ExportsConfig};
use crate::error::ApiError;
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray};
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Date32Type, Field, Schema};
use futures::TryStreamExt;
use hmac::{Hmac, Mac};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use strata_archive::{
    ArchiveReader, BLOB_REF_SUFFIXES, KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN,
};

/// Body of `POST /v1/exports`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// The export profile to follow.
    pub profile: String,
    /// The tables to export.
    pub tables: Vec<String>,
    /// Per table, the columns to export (by default, every column the profile lets out).
    #[serde(default)]
    pub columns: BTreeMap<String, Vec<String>>,
    /// Only records dated on or after this day (YYYY-MM-DD).
    #[serde(default)]
    pub from: Option<String>,
    /// Only records dated on or before this day.
    #[serde(default)]
    pub to: Option<String>,
    /// Per table, per column, the codes a row must hold one of.
    #[serde(default)]
    pub codes: BTreeMap<String, BTreeMap<String, Vec<String>>>,
}

/// Where exports go and how identifiers are replaced.
#[derive(Clone)]
pub struct Exporter {
    store: Arc<dyn ObjectStore>,
    key: Arc<Vec<u8>>,
    profiles: Arc<BTreeMap<String, ExportProfile>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

fn day(text: &Option<String>, name: &str) -> Result<Option<i32>, ApiError> {
    text.as_deref()
        .map(|t| {
            chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d")
                .map(Date32Type::from_naive_date)
                .map_err(|_| ApiError::BadRequest(format!("{name} must be a date, YYYY-MM-DD")))
        })
        .transpose()
}

impl Exporter {
    /// The exporter of `[api.exports]` (`base` resolves a relative location and key file).
    pub fn from_config(config: &ExportsConfig, base: &std::path::Path) -> Result<Self, String> {
        let hex_key =
            match (&config.pseudonym_key_file, &config.pseudonym_key_env) {
                (Some(file), None) => std::fs::read_to_string(base.join(file))
                    .map_err(|e| format!("[api.exports]: cannot read {file}: {e}"))?,
                (None, Some(var)) => std::env::var(var)
                    .map_err(|_| format!("[api.exports]: environment variable {var} is not set"))?,
                _ => return Err(
                    "[api.exports]: set exactly one of pseudonym_key_file and pseudonym_key_env"
                        .into(),
                ),
            };
        let key = hex::decode(hex_key.trim())
            .ok()
            .filter(|k| k.len() >= 32)
            .ok_or("[api.exports]: the pseudonym key must be 64 or more hex digits")?;
        let location = if config.location.contains("://") {
            config.location.clone()
        } else {
            base.join(&config.location).display().to_string()
        };
        let location = strata_archive::ArchiveLocation::parse(&location)
            .map_err(|e| format!("[api.exports] location: {e}"))?;
        let store = strata_archive::open_store(&location)
            .map_err(|e| format!("[api.exports] location: {e}"))?;
        for (name, p) in &config.profiles {
            if !matches!(p.dates.as_str(), "keep" | "year") {
                return Err(format!(
                    "[api.exports.profiles.{name}] dates: \"keep\" or \"year\", not {:?}",
                    p.dates
                ));
            }
        }
        Ok(Exporter {
            store,
            key: Arc::new(key),
            profiles: Arc::new(config.profiles.clone()),
        })
    }

    /// Checks a request against the profiles and the catalog: errors say what to change.
    pub fn check(&self, r: &ExportRequest, archive: &ArchiveReader) -> Result<(), ApiError> {
        let profile = self
            .profiles
            .get(&r.profile)
            .ok_or_else(|| ApiError::BadRequest(format!("no export profile {:?}", r.profile)))?;
        if r.tables.is_empty() {
            return Err(ApiError::BadRequest("name at least one table".into()));
        }
        for t in r
            .tables
            .iter()
            .chain(r.columns.keys())
            .chain(r.codes.keys())
        {
            if !archive.catalog().tables.contains_key(t) {
                return Err(ApiError::BadRequest(format!("no archived table {t:?}")));
            }
            if !profile.tables.is_empty() && !profile.tables.contains(t) {
                return Err(ApiError::BadRequest(format!(
                    "profile {:?} does not export table {t:?}",
                    r.profile
                )));
            }
        }
        day(&r.from, "from")?;
        day(&r.to, "to")?;
        Ok(())
    }

    fn pseudonym(&self, domain: &str, value: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(domain.as_bytes());
        mac.update(b":");
        mac.update(value.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// `column`'s values replaced by pseudonyms (nulls stay null).
    fn pseudonymize(&self, domain: &str, column: &ArrayRef) -> Result<ArrayRef, String> {
        let text = cast(column, &DataType::Utf8).map_err(|e| e.to_string())?;
        let text = text.as_string::<i32>();
        Ok(Arc::new(
            text.iter()
                .map(|v| v.map(|v| self.pseudonym(domain, v)))
                .collect::<StringArray>(),
        ))
    }

    /// Runs an export: every table of the request to `exports/<id>/<table>.parquet`, then the
    /// manifest. Returns the manifest (JSON).
    pub async fn run(
        &self,
        archive: &ArchiveReader,
        id: &str,
        r: &ExportRequest,
    ) -> Result<serde_json::Value, String> {
        let profile = self
            .profiles
            .get(&r.profile)
            .ok_or("the profile is gone")?
            .clone();
        let (from, to) = (
            day(&r.from, "from").map_err(|e| e.to_string())?,
            day(&r.to, "to").map_err(|e| e.to_string())?,
        );
        let mut files = Vec::new();
        for table in &r.tables {
            let path = format!("{id}/{table}.parquet");
            let rows = self
                .export_table(archive, table, r, &profile, (from, to), &path)
                .await
                .map_err(|e| format!("table {table}: {e}"))?;
            let bytes = self
                .store
                .get(&Path::from(path.as_str()))
                .await
                .map_err(|e| e.to_string())?
                .bytes()
                .await
                .map_err(|e| e.to_string())?;
            files.push(json!({
                "table": table,
                "file": format!("{table}.parquet"),
                "rows": rows,
                "bytes": bytes.len(),
                "sha256": hex::encode(Sha256::digest(&bytes)),
            }));
        }
        let manifest = json!({
            "export_id": id,
            "profile": r.profile,
            "request": r,
            "files": files,
            "created_at": chrono::Utc::now().to_rfc3339(),
        });
        self.store
            .put(
                &Path::from(format!("{id}/manifest.json")),
                serde_json::to_vec_pretty(&manifest)
                    .expect("a manifest serializes")
                    .into(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(manifest)
    }

    async fn export_table(
        &self,
        archive: &ArchiveReader,
        table: &str,
        r: &ExportRequest,
        profile: &ExportProfile,
        (from, to): (Option<i32>, Option<i32>),
        path: &str,
    ) -> Result<u64, String> {
        let manifests = archive
            .catalog()
            .tables
            .get(table)
            .cloned()
            .unwrap_or_default();
        let blob_columns = archive.catalog().blob_columns(table);
        let mut writer: Option<
            parquet::arrow::AsyncArrowWriter<object_store::buffered::BufWriter>,
        > = None;
        let mut seen: HashSet<String> = HashSet::new();
        let dedup = manifests.len() > 1;
        let mut rows = 0u64;
        // Newest manifest first: a record's newest copy is met first, older ones are skipped.
        for entry in manifests.iter().rev().flat_map(|m| m.files.iter().rev()) {
            for batch in archive.read_file(entry).await.map_err(|e| e.to_string())? {
                let batch = self.cohort(&batch, table, r, (from, to), dedup, &mut seen)?;
                if batch.num_rows() == 0 {
                    continue;
                }
                let out = self.deidentify(&batch, table, r, profile, &blob_columns)?;
                rows += out.num_rows() as u64;
                if writer.is_none() {
                    let upload = object_store::buffered::BufWriter::new(
                        self.store.clone(),
                        Path::from(path),
                    );
                    let props = parquet::file::properties::WriterProperties::builder()
                        .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
                        .build();
                    writer = Some(
                        parquet::arrow::AsyncArrowWriter::try_new(
                            upload,
                            out.schema(),
                            Some(props),
                        )
                        .map_err(|e| e.to_string())?,
                    );
                }
                writer
                    .as_mut()
                    .expect("opened above")
                    .write(&out)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        match writer {
            Some(w) => {
                w.close().await.map_err(|e| e.to_string())?;
            }
            None => {
                // No row matched: an empty file still says so, with the columns it would have.
                let empty = RecordBatch::new_empty(Arc::new(Schema::new(vec![Field::new(
                    "patient_pseudonym",
                    DataType::Utf8,
                    false,
                )])));
                let upload =
                    object_store::buffered::BufWriter::new(self.store.clone(), Path::from(path));
                let mut w = parquet::arrow::AsyncArrowWriter::try_new(upload, empty.schema(), None)
                    .map_err(|e| e.to_string())?;
                w.write(&empty).await.map_err(|e| e.to_string())?;
                w.close().await.map_err(|e| e.to_string())?;
            }
        }
        Ok(rows)
    }

    /// The rows of `batch` in the cohort: dates in range, codes in their lists, and (when the
    /// table was archived more than once) not superseded by a newer copy already taken.
    fn cohort(
        &self,
        batch: &RecordBatch,
        table: &str,
        r: &ExportRequest,
        (from, to): (Option<i32>, Option<i32>),
        dedup: bool,
        seen: &mut HashSet<String>,
    ) -> Result<RecordBatch, String> {
        let n = batch.num_rows();
        let dates = batch
            .column_by_name(RECORD_DATE_COLUMN)
            .ok_or("no record date column")?
            .as_primitive::<Date32Type>();
        let keys = batch
            .column_by_name(KEY_COLUMN)
            .ok_or("no record key column")?
            .as_string::<i32>();
        let mut keep: Vec<bool> = (0..n)
            .map(|i| match (from, to) {
                (None, None) => true,
                _ if dates.is_null(i) => false,
                _ => {
                    let d = dates.value(i);
                    from.is_none_or(|f| d >= f) && to.is_none_or(|t| d <= t)
                }
            })
            .collect();
        for (column, codes) in r.codes.get(table).into_iter().flatten() {
            let values = batch
                .column_by_name(column)
                .ok_or_else(|| format!("no column {column:?} for a code list"))?;
            let values = cast(values, &DataType::Utf8).map_err(|e| e.to_string())?;
            let values = values.as_string::<i32>();
            for (i, k) in keep.iter_mut().enumerate() {
                *k = *k && !values.is_null(i) && codes.iter().any(|c| c == values.value(i));
            }
        }
        if dedup {
            for (i, k) in keep.iter_mut().enumerate() {
                // Every copy marks its key as seen; only the first (newest) is kept.
                let first = seen.insert(keys.value(i).to_string());
                *k = *k && first;
            }
        }
        filter_record_batch(batch, &BooleanArray::from(keep)).map_err(|e| e.to_string())
    }

    /// The exported columns of `batch`: the patient pseudonym, the record date (or year), then
    /// the requested (or all) columns the profile lets out, identifiers pseudonymized.
    fn deidentify(
        &self,
        batch: &RecordBatch,
        table: &str,
        r: &ExportRequest,
        profile: &ExportProfile,
        blob_columns: &[String],
    ) -> Result<RecordBatch, String> {
        let schema = batch.schema();
        let is_blob = |name: &str| {
            blob_columns
                .iter()
                .any(|b| BLOB_REF_SUFFIXES.iter().any(|s| name == format!("{b}{s}")))
        };
        let internal =
            |name: &str| name == PATIENT_COLUMN || name == RECORD_DATE_COLUMN || name == KEY_COLUMN;
        let wanted: Vec<String> = match r.columns.get(table) {
            Some(cols) => {
                for c in cols {
                    if schema.field_with_name(c).is_err() || internal(c) || is_blob(c) {
                        return Err(format!("no exportable column {c:?}"));
                    }
                    if profile.remove.contains(c) {
                        return Err(format!(
                            "profile {:?} never exports column {c:?}",
                            r.profile
                        ));
                    }
                }
                cols.clone()
            }
            None => schema
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .filter(|n| !internal(n) && !is_blob(n) && !profile.remove.contains(n))
                .collect(),
        };
        let patient = batch
            .column_by_name(PATIENT_COLUMN)
            .ok_or("no patient column")?;
        let mut fields = vec![Field::new("patient_pseudonym", DataType::Utf8, false)];
        let mut columns: Vec<ArrayRef> = vec![self.pseudonymize("patient", patient)?];
        let dates = batch
            .column_by_name(RECORD_DATE_COLUMN)
            .ok_or("no record date column")?;
        if profile.dates == "year" {
            let years: arrow::array::Int32Array = dates
                .as_primitive::<Date32Type>()
                .iter()
                .map(|d| {
                    d.and_then(Date32Type::to_naive_date_opt)
                        .map(|d| chrono::Datelike::year(&d))
                })
                .collect();
            fields.push(Field::new("record_year", DataType::Int32, true));
            columns.push(Arc::new(years));
        } else {
            fields.push(Field::new("record_date", DataType::Date32, true));
            columns.push(dates.clone());
        }
        for name in wanted {
            let column = batch.column_by_name(&name).expect("checked above");
            if profile.identifiers.contains(&name) {
                fields.push(Field::new(&name, DataType::Utf8, true));
                columns.push(self.pseudonymize(&name, column)?);
            } else {
                fields.push(Field::new(&name, column.data_type().clone(), true));
                columns.push(column.clone());
            }
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(|e| e.to_string())
    }

    /// Streams a file of an export.
    pub async fn file(
        &self,
        id: &str,
        name: &str,
    ) -> Result<impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + use<>, ApiError> {
        if name.contains('/') || name.contains("..") {
            return Err(ApiError::NotFound);
        }
        match self.store.get(&Path::from(format!("{id}/{name}"))).await {
            Ok(r) => Ok(r.into_stream().map_err(std::io::Error::other)),
            Err(object_store::Error::NotFound { .. }) => Err(ApiError::NotFound),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }
}
