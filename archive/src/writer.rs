//! Writes one table's archived rows as encrypted, zstd-compressed Parquet files.

use crate::error::{ArchiveError, Result};
use crate::keys::KeyRing;
use crate::manifest::{FileEntry, TableManifest};
use crate::{KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
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
}

impl AsyncFileWriter for HashingUpload {
    fn write(&mut self, bs: Bytes) -> BoxFuture<'_, parquet::errors::Result<()>> {
        Box::pin(async move {
            self.sha256.update(&bs);
            self.bytes += bs.len() as u64;
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

    /// Rows written so far, including the open file.
    pub fn rows(&self) -> u64 {
        self.manifest.rows() + self.current.as_ref().map_or(0, |f| f.rows)
    }

    fn open_file(&self) -> Result<OpenFile> {
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
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_column_bloom_filter_enabled(patient, true)
            .with_file_encryption_properties(encryption);
        for column in std::iter::once(KEY_COLUMN)
            .chain(self.options.distinct_columns.iter().map(String::as_str))
        {
            props = props.set_column_dictionary_enabled(ColumnPath::from(column), false);
        }
        let props = props.build();
        let seq = self.manifest.files.len();
        let path = format!(
            "tables/{}/{}-{:05}.parquet",
            self.manifest.table, self.manifest.run_id, seq
        );
        let upload = HashingUpload {
            upload: BufWriter::new(self.store.clone(), Path::from(path.clone())),
            sha256: Sha256::new(),
            bytes: 0,
        };
        Ok(OpenFile {
            writer: AsyncArrowWriter::try_new(upload, self.schema.clone(), Some(props))?,
            path,
            key_material: self.keys.key_material(&data_key)?,
            rows: 0,
            min_patient: None,
            max_patient: None,
        })
    }

    /// Appends a batch (its schema must be the writer's).
    pub async fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.current.is_none() {
            self.current = Some(self.open_file()?);
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

    async fn close_file(&mut self) -> Result<()> {
        let Some(file) = self.current.take() else {
            return Ok(());
        };
        let mut writer = file.writer;
        writer.finish().await?;
        let upload = writer.into_inner();
        let entry = FileEntry {
            path: file.path.clone(),
            rows: file.rows,
            bytes: upload.bytes,
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
        self.manifest.files.push(entry);
        Ok(())
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
