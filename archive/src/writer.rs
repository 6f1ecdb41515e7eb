//! Writes one table's archived rows as encrypted, zstd-compressed Parquet files, each sorted in
//! the archive's order (patient key, record date, record key).

use crate::error::{ArchiveError, Result};
use crate::keys::KeyRing;
use crate::manifest::{FileEntry, TableManifest};
use crate::{KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::interleave_record_batch;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::row::{RowConverter, SortField};
use bytes::Bytes;
use futures::future::BoxFuture;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::async_writer::{AsyncArrowWriter, AsyncFileWriter};
use parquet::basic::{Compression, ZstdLevel};
use parquet::encryption::encrypt::FileEncryptionProperties;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// Rows per data page at most (see [`TableWriter`]'s page index).
pub(crate) const PAGE_ROWS: usize = 1024;

/// Encoded bytes per data page, roughly: the writer closes a page past this size. One patient's
/// read decompresses, decrypts and decodes every page that holds one of their rows, so a page
/// of a wide column (note texts, keys) holds a few dozen rows where one of a narrow column
/// (codes, dates) holds [`PAGE_ROWS`]. With the reader's row filter on the patient column,
/// cold history reads about 1.5× as fast as with 1,024-row pages (chained from alternating
/// pairs of builds, not one pair), for files ~13 % larger (docs/benchmarks.md).
const PAGE_BYTES: usize = 4 << 10;

/// Rows the Parquet writer encodes between two checks of the page limits: pages overshoot
/// [`PAGE_BYTES`] by at most this many rows.
const PAGE_CHECK_ROWS: usize = 32;

/// Tuning for [`TableWriter`].
#[derive(Debug, Clone)]
pub struct TableWriterOptions {
    /// Start a new file after this many rows. By default, 1,000,000.
    pub rows_per_file: usize,
    /// ...or after this many encoded bytes. By default, 128 MiB.
    pub bytes_per_file: usize,
    /// Rows per row group: smaller groups make one patient's read cheaper. By default, 65,536.
    pub row_group_rows: usize,
    /// zstd level. By default, 3.
    pub zstd_level: i32,
    /// Columns whose values are (nearly) all distinct, such as primary keys: written without
    /// dictionary encoding, which would only cost time and space. [`KEY_COLUMN`] always is.
    pub distinct_columns: Vec<String>,
}

impl Default for TableWriterOptions {
    fn default() -> Self {
        TableWriterOptions {
            rows_per_file: 1_000_000,
            bytes_per_file: 128 << 20,
            row_group_rows: 65_536,
            zstd_level: 3,
            distinct_columns: Vec::new(),
        }
    }
}

/// Streams a file's bytes to the object store (multipart, in parts of a few MiB) while
/// hashing them, so that a file is never held whole in memory.
struct HashingUpload {
    upload: BufWriter,
    sha256: Sha256,
    bytes: u64,
    /// The last bytes written (up to [`TAIL_BYTES`]): after the file is finished they hold its
    /// footer, whose digest goes into the manifest.
    tail: Vec<u8>,
}

/// Bytes kept of a file's end, to digest its footer.
const TAIL_BYTES: usize = 1 << 20;

impl HashingUpload {
    /// SHA-256 (hex) of the footer: the footer metadata, its length and the magic, which the
    /// file ends with. None when it is longer than the tail kept (readers then check the whole
    /// file instead).
    fn footer_sha256(&self) -> Option<String> {
        let n = self.tail.len();
        if n < 8 {
            return None;
        }
        let len = u32::from_le_bytes(self.tail[n - 8..n - 4].try_into().expect("4 bytes")) as usize;
        let footer = self.tail.get(n.checked_sub(len + 8)?..)?;
        Some(hex::encode(Sha256::digest(footer)))
    }
}

impl AsyncFileWriter for HashingUpload {
    fn write(&mut self, bs: Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        Box::pin(async move {
            self.sha256.update(&bs);
            self.bytes += bs.len() as u64;
            if bs.len() >= TAIL_BYTES {
                self.tail.clear();
                self.tail.extend_from_slice(&bs[bs.len() - TAIL_BYTES..]);
            } else {
                let excess = (self.tail.len() + bs.len()).saturating_sub(TAIL_BYTES);
                self.tail.drain(..excess);
                self.tail.extend_from_slice(&bs);
            }
            self.upload
                .put(bs)
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
        })
    }

    fn complete(&mut self) -> BoxFuture<'_, parquet::errors::Result<()>> {
        Box::pin(async move {
            self.upload
                .shutdown()
                .await
                .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
        })
    }
}

struct OpenFile {
    writer: AsyncArrowWriter<HashingUpload>,
    key_material: String,
    path: String,
    rows: u64,
    min_patient: Option<String>,
    max_patient: Option<String>,
}

/// Writes the archived rows of one table for one run. Feed it record batches whose first two
/// columns are [`PATIENT_COLUMN`] (Utf8, not null), [`RECORD_DATE_COLUMN`] (Date32) and
/// [`KEY_COLUMN`] (Utf8, not null), sorted by
/// patient key; call [`TableWriter::finish`] to close the last file and publish the manifest.
/// Files that were written but never published by a manifest are not part of the archive.
pub struct TableWriter {
    store: Arc<dyn ObjectStore>,
    keys: KeyRing,
    schema: SchemaRef,
    options: TableWriterOptions,
    manifest: TableManifest,
    current: Option<OpenFile>,
}

/// A column sample this share of whose values are distinct is written without a dictionary:
/// interning values that hardly repeat costs time (~15 % of an archiving run's CPU in
/// profiles), and the writer would fall back to plain pages anyway.
const DICTIONARY_MAX_DISTINCT_SHARE: f64 = 0.5;
/// Rows sampled to decide a column's encoding.
const DICTIONARY_SAMPLE_ROWS: usize = 4096;

/// The columns of `batch` whose sampled values are mostly distinct.
fn mostly_distinct_columns(batch: &RecordBatch) -> Vec<String> {
    let n = batch.num_rows();
    if n == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(DICTIONARY_SAMPLE_ROWS);
    let sample: Vec<(usize, usize)> = (0..n).step_by(step).map(|i| (0, i)).collect();
    let Ok(sample) = interleave_record_batch(&[batch], &sample) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (field, column) in sample.schema().fields().iter().zip(sample.columns()) {
        let Ok(converter) = RowConverter::new(vec![SortField::new(field.data_type().clone())])
        else {
            continue;
        };
        let Ok(rows) = converter.convert_columns(std::slice::from_ref(column)) else {
            continue;
        };
        let distinct: std::collections::HashSet<_> = rows.iter().collect();
        if distinct.len() as f64 > DICTIONARY_MAX_DISTINCT_SHARE * sample.num_rows() as f64 {
            out.push(field.name().clone());
        }
    }
    out
}

impl TableWriter {
    /// A writer for the table and run that `manifest` (from [`TableManifest::new`]) names.
    /// Checks the schema's leading columns.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        keys: KeyRing,
        manifest: TableManifest,
        schema: SchemaRef,
        options: TableWriterOptions,
    ) -> Result<Self> {
        let table = &manifest.table;
        let fields = schema.fields();
        let ok = fields.len() >= 3
            && fields[2].name() == KEY_COLUMN
            && fields[2].data_type() == &DataType::Utf8
            && fields[0].name() == PATIENT_COLUMN
            && fields[0].data_type() == &DataType::Utf8
            && fields[1].name() == RECORD_DATE_COLUMN
            && fields[1].data_type() == &DataType::Date32;
        if !ok {
            return Err(ArchiveError::Arrow(arrow::error::ArrowError::SchemaError(format!(
                "archived rows of {table} must start with {PATIENT_COLUMN} (Utf8), {RECORD_DATE_COLUMN} (Date32) and {KEY_COLUMN} (Utf8)"
            ))));
        }
        Ok(TableWriter {
            store,
            keys,
            schema,
            options,
            manifest,
            current: None,
        })
    }

    /// The manifest being written, for what a writer records besides its files (a
    /// compaction's accounting).
    pub(crate) fn manifest_mut(&mut self) -> &mut TableManifest {
        &mut self.manifest
    }

    /// Rows written so far, including the open file.
    pub fn rows(&self) -> u64 {
        self.manifest.rows() + self.current.as_ref().map_or(0, |f| f.rows)
    }

    /// Opens the next data file; `sample` (its first rows) decides which columns get
    /// dictionaries.
    fn open_file(&self, sample: &RecordBatch) -> Result<OpenFile> {
        let path = format!(
            "tables/{}/{}-{:05}.parquet",
            self.manifest.table,
            self.manifest.run_id,
            self.manifest.files.len()
        );
        self.open_file_at(path, self.schema.clone(), sample)
    }

    /// Opens a file at `path` for rows of `schema`.
    fn open_file_at(
        &self,
        path: String,
        schema: SchemaRef,
        sample: &RecordBatch,
    ) -> Result<OpenFile> {
        let data_key = KeyRing::new_data_key();
        let encryption = FileEncryptionProperties::builder(data_key.clone())
            .with_footer_key_metadata(crate::keys::EXTERNAL_FOOTER_KEY.as_bytes().to_vec())
            .build()?;
        let patient = ColumnPath::from(PATIENT_COLUMN);
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(
                self.options.zstd_level,
            )?))
            .set_max_row_group_row_count(Some(self.options.row_group_rows))
            // Small pages: one patient's read fetches and decrypts the pages that hold their
            // rows (the page index says which), not whole row groups.
            .set_data_page_row_count_limit(PAGE_ROWS)
            .set_data_page_size_limit(PAGE_BYTES)
            .set_write_batch_size(PAGE_CHECK_ROWS)
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_column_bloom_filter_enabled(patient, true)
            .with_file_encryption_properties(encryption);
        let sampled = mostly_distinct_columns(sample);
        for column in std::iter::once(KEY_COLUMN)
            .chain(self.options.distinct_columns.iter().map(String::as_str))
            .chain(sampled.iter().map(String::as_str))
        {
            props = props.set_column_dictionary_enabled(ColumnPath::from(column), false);
        }
        let props = props.build();
        let upload = HashingUpload {
            // Parts of 8 MiB (S3 wants at least 5), two in flight: a few files are written at
            // once, and their buffers count against the run's memory.
            upload: BufWriter::with_capacity(self.store.clone(), Path::from(path.clone()), 8 << 20)
                .with_max_concurrency(2),
            sha256: Sha256::new(),
            bytes: 0,
            tail: Vec::new(),
        };
        Ok(OpenFile {
            writer: AsyncArrowWriter::try_new(upload, schema, Some(props))?,
            path,
            key_material: self.keys.key_material(&data_key)?,
            rows: 0,
            min_patient: None,
            max_patient: None,
        })
    }

    /// Appends a batch already in the archive's order, continuing the batches before it (its
    /// schema must be the writer's).
    pub async fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.current.is_none() {
            self.current = Some(self.open_file(batch)?);
        }
        let file = self.current.as_mut().expect("opened above");
        file.writer.write(batch).await?;
        file.rows += batch.num_rows() as u64;
        let patients = batch.column(0).as_string::<i32>();
        for i in 0..patients.len() {
            let p = patients.value(i);
            if file.min_patient.as_deref().is_none_or(|m| p < m) {
                file.min_patient = Some(p.to_string());
            }
            if file.max_patient.as_deref().is_none_or(|m| p > m) {
                file.max_patient = Some(p.to_string());
            }
        }
        let size = file.writer.bytes_written() + file.writer.in_progress_size();
        if file.rows as usize >= self.options.rows_per_file || size >= self.options.bytes_per_file {
            self.close_file().await?;
        }
        Ok(())
    }

    /// Closes the file being written: the next batch starts a new file (and a new sorted
    /// sequence).
    pub async fn end_file(&mut self) -> Result<()> {
        self.close_file().await
    }

    /// Writes `tombstones` (records the source deleted: see [`crate::Tombstone`]) as one
    /// tombstone file of the manifest.
    pub async fn write_tombstones(&mut self, tombstones: &[crate::Tombstone]) -> Result<()> {
        if tombstones.is_empty() {
            return Ok(());
        }
        let batch = crate::tombstone::tombstone_batch(tombstones)?;
        let path = format!(
            "tombstones/{}/{}-{:05}.parquet",
            self.manifest.table,
            self.manifest.run_id,
            self.manifest.tombstones.len()
        );
        let mut file = self.open_file_at(path, batch.schema(), &batch)?;
        file.writer.write(&batch).await?;
        file.rows = batch.num_rows() as u64;
        let patients = batch.column(0).as_string::<i32>();
        file.min_patient = patients.iter().flatten().min().map(str::to_string);
        file.max_patient = patients.iter().flatten().max().map(str::to_string);
        let entry = self.close(file).await?;
        self.manifest.tombstones.push(entry);
        Ok(())
    }

    async fn close_file(&mut self) -> Result<()> {
        let Some(file) = self.current.take() else {
            return Ok(());
        };
        let entry = self.close(file).await?;
        self.manifest.files.push(entry);
        Ok(())
    }

    /// Finishes `file` and stores its key material; returns its manifest entry.
    async fn close(&self, file: OpenFile) -> Result<FileEntry> {
        let mut writer = file.writer;
        writer.finish().await?;
        let upload = writer.into_inner();
        let footer_sha256 = upload.footer_sha256().unwrap_or_default();
        let entry = FileEntry {
            path: file.path.clone(),
            rows: file.rows,
            bytes: upload.bytes,
            footer_sha256,
            sha256: hex::encode(upload.sha256.finalize()),
            min_patient: file.min_patient.unwrap_or_default(),
            max_patient: file.max_patient.unwrap_or_default(),
            kek_id: self.keys.current_kek_id(),
        };
        let material = serde_json::json!({ "footerKey": file.key_material }).to_string();
        let material_path = crate::keys::key_material_path(&file.path);
        self.store
            .put(
                &Path::from(material_path),
                PutPayload::from(material.into_bytes()),
            )
            .await?;
        Ok(entry)
    }

    /// Closes the last file and returns the files written, in the order written, without
    /// publishing a manifest: what an intermediate pass of a merge writes (see
    /// [`crate::compact`]), deleted once the pass after it is published.
    pub(crate) async fn finish_unpublished(mut self) -> Result<Vec<FileEntry>> {
        self.close_file().await?;
        Ok(self.manifest.files)
    }

    /// Closes the last file and publishes the manifest. Returns it.
    pub async fn finish(mut self) -> Result<TableManifest> {
        self.close_file().await?;
        self.manifest.created_at = chrono::Utc::now().to_rfc3339();
        self.manifest
            .files
            .sort_by(|a, b| a.min_patient.cmp(&b.min_patient));
        self.manifest.seal(&self.keys)?;
        let path = TableManifest::path(&self.manifest.table, &self.manifest.run_id);
        let json = serde_json::to_vec_pretty(&self.manifest).expect("manifest serializes");
        self.store
            .put(&Path::from(path), PutPayload::from(json))
            .await?;
        Ok(self.manifest)
    }
}
