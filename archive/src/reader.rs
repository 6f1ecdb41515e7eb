//! Reads the archive: its catalog, whole files, and one patient's rows.

use crate::blob::{BlobRef, BlobStore};
use crate::catalog::{runs_of, Catalog, Listed};
use crate::error::{ArchiveError, Result};
use crate::keys::{KeyRing, ParquetKeyRetriever};
use crate::manifest::{FileEntry, TableManifest};
use crate::tombstone::{served, tombstones_of, Successors, Tombstone};
use arrow::array::{RecordBatch, Scalar, StringArray};
use arrow::compute::filter_record_batch;
use arrow::compute::kernels::cmp::eq;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::{
    ArrowPredicateFn, ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
    RowFilter, RowSelection, RowSelector,
};
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStreamBuilder};
use parquet::arrow::ProjectionMask;
use parquet::encryption::decrypt::FileDecryptionProperties;
use parquet::errors::ParquetError;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::file::statistics::Statistics;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// What `verify` found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VerifyReport {
    /// Parquet files checked.
    pub files: u64,
    /// Rows read from them.
    pub rows: u64,
    /// BLOB objects checked.
    pub blobs: u64,
    /// Their plaintext bytes.
    pub blob_bytes: u64,
    /// Integrity problems: (object, what is wrong).
    pub problems: Vec<(String, String)>,
    /// Objects no manifest refers to (from interrupted runs, or planted).
    pub unpublished: Vec<String>,
}

/// The BLOB references in a batch of a table whose BLOB columns are `blob_columns`.
pub fn blob_refs(batch: &RecordBatch, blob_columns: &[String]) -> Vec<BlobRef> {
    (0..batch.num_rows())
        .flat_map(|row| {
            blob_columns
                .iter()
                .filter_map(move |b| blob_ref(batch, b, row))
        })
        .collect()
}

/// The BLOB reference in column `blob` of a row, if present.
pub fn blob_ref(batch: &RecordBatch, blob: &str, row: usize) -> Option<BlobRef> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    let col = |suffix: &str| batch.column_by_name(&format!("{blob}{suffix}"));
    let [object, length, sha, ct] = crate::BLOB_REF_SUFFIXES.map(col);
    let (object, length, sha, ct) = (object?, length?, sha?, ct?);
    if object.is_null(row) {
        return None;
    }
    Some(BlobRef {
        object: object.as_string::<i32>().value(row).to_string(),
        length: length.as_primitive::<Int64Type>().value(row) as u64,
        sha256: sha.as_string::<i32>().value(row).to_string(),
        content_type: ct.as_string::<i32>().value(row).to_string(),
    })
}

/// Read access to an archive.
#[derive(Clone)]
pub struct ArchiveReader {
    store: Arc<dyn ObjectStore>,
    keys: KeyRing,
    catalog: Arc<Catalog>,
    /// Files opened for selective reads: footer checked, metadata and page indexes decrypted.
    opened: Arc<std::sync::Mutex<std::collections::HashMap<String, ArrowReaderMetadata>>>,
    /// Tombstone files read (small, and read for every patient lookup of their table).
    tombstones: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<Vec<Tombstone>>>>>,
    /// Each table's [`ArchiveReader::successors`] under this catalog, made at its first
    /// patient lookup.
    successors: Arc<tokio::sync::Mutex<std::collections::HashMap<String, Arc<Successors>>>>,
}

/// Byte ranges of one archived file, for the async Parquet reader (whose metadata comes from
/// [`ArchiveReader::opened`], already checked).
struct FileRanges {
    store: Arc<dyn ObjectStore>,
    path: Path,
    metadata: Arc<ParquetMetaData>,
}

impl AsyncFileReader for FileRanges {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> futures::future::BoxFuture<'_, parquet::errors::Result<Bytes>> {
        Box::pin(async move {
            self.store
                .get_range(&self.path, range)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        })
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> futures::future::BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        Box::pin(async move {
            self.store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        })
    }

    fn get_metadata<'a>(
        &'a mut self,
        _options: Option<&'a ArrowReaderOptions>,
    ) -> futures::future::BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        let metadata = self.metadata.clone();
        Box::pin(async move { Ok(metadata) })
    }
}

/// Files whose metadata is kept open at most; past it the cache starts over.
const MAX_OPENED_FILES: usize = 4096;
/// Bytes read from a file's end at first, hoping for the footer and page indexes in one read.
const FIRST_SUFFIX_BYTES: u64 = 256 << 10;

/// The error for a file whose pages could not be read: gone from the store (a read through a
/// catalog older than a gc: [`ArchiveError::is_missing_file`]), or not decrypted or decoded.
fn decode_error(object: &str, e: ParquetError) -> ArchiveError {
    let gone = matches!(&e, ParquetError::External(inner)
        if matches!(inner.downcast_ref::<object_store::Error>(), Some(object_store::Error::NotFound { .. })));
    ArchiveError::Integrity {
        object: object.to_string(),
        detail: if gone {
            crate::error::MISSING_FILE.to_string()
        } else {
            format!("cannot decrypt or decode: {e}")
        },
    }
}

/// Whether `patient` may lie in [min, max] (bounds absent: it may).
fn may_hold(min: Option<&[u8]>, max: Option<&[u8]>, patient: &[u8]) -> bool {
    min.is_none_or(|m| m <= patient) && max.is_none_or(|m| patient <= m)
}

/// The row groups of `metadata` whose patient-key statistics may hold `patient`, and within
/// them the rows of the pages whose page-index bounds may (all rows of a group without one).
fn patient_selection(metadata: &ParquetMetaData, patient: &str) -> (Vec<usize>, RowSelection) {
    let needle = patient.as_bytes();
    let mut groups = Vec::new();
    let mut selectors = Vec::new();
    for (i, rg) in metadata.row_groups().iter().enumerate() {
        let fits = match rg.column(0).statistics() {
            Some(Statistics::ByteArray(s)) => may_hold(
                s.min_opt().map(|v| v.data()),
                s.max_opt().map(|v| v.data()),
                needle,
            ),
            _ => true,
        };
        if !fits {
            continue;
        }
        groups.push(i);
        let rows = rg.num_rows() as usize;
        let page_index = metadata.page_index_for_row_group(i);
        let pages = page_index.column_index(0).zip(page_index.offset_index(0));
        let Some((ColumnIndexMetaData::BYTE_ARRAY(index), offsets)) = pages else {
            selectors.push(RowSelector::select(rows));
            continue;
        };
        let locations = offsets.page_locations();
        for (p, loc) in locations.iter().enumerate() {
            let start = loc.first_row_index as usize;
            let end = locations
                .get(p + 1)
                .map_or(rows, |next| next.first_row_index as usize);
            let keep = may_hold(index.min_value(p), index.max_value(p), needle);
            selectors.push(if keep {
                RowSelector::select(end - start)
            } else {
                RowSelector::skip(end - start)
            });
        }
    }
    (groups, RowSelection::from(selectors))
}

impl ArchiveReader {
    /// Opens an archive and loads its catalog from the manifests.
    pub async fn open(store: Arc<dyn ObjectStore>, keys: KeyRing) -> Result<Self> {
        let keys = keys.for_archive(store.as_ref(), false).await?;
        let (catalog, _) = Catalog::load(store.as_ref(), &keys, &Listed::new()).await?;
        Ok(ArchiveReader {
            store,
            keys,
            catalog: Arc::new(catalog),
            opened: Arc::default(),
            tombstones: Arc::default(),
            successors: Arc::default(),
        })
    }

    /// A reader of the files of an archive whose keys are loaded (`keys` as
    /// [`KeyRing::for_archive`] gives them), without reading its catalog: for a caller that has
    /// the manifests already (`gc`).
    pub(crate) fn without_catalog(store: Arc<dyn ObjectStore>, keys: KeyRing) -> Self {
        ArchiveReader {
            store,
            keys,
            catalog: Arc::default(),
            opened: Arc::default(),
            tombstones: Arc::default(),
            successors: Arc::default(),
        }
    }

    /// A view of the same archive with `catalog` (what [`crate::LiveArchive`] swaps in): files
    /// already opened stay open (a file never changes under its name).
    pub(crate) fn with_catalog(&self, catalog: Catalog) -> Self {
        ArchiveReader {
            catalog: Arc::new(catalog),
            // What newer runs did depends on the catalog.
            successors: Arc::default(),
            ..self.clone()
        }
    }

    /// The store and keys, for [`Catalog::load`].
    pub(crate) fn parts(&self) -> (&dyn ObjectStore, &KeyRing) {
        (self.store.as_ref(), &self.keys)
    }

    /// The catalog this view reads.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The archive's BLOB store.
    pub fn blobs(&self) -> BlobStore {
        BlobStore::new(self.store.clone(), self.keys.clone())
    }

    async fn fetch_verified(&self, entry: &FileEntry) -> Result<Bytes> {
        let integrity = |detail: String| ArchiveError::Integrity {
            object: entry.path.clone(),
            detail,
        };
        let bytes = match self.store.get(&Path::from(entry.path.as_str())).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(integrity(crate::error::MISSING_FILE.into()))
            }
            Err(e) => return Err(e.into()),
        };
        if bytes.len() as u64 != entry.bytes || hex::encode(Sha256::digest(&bytes)) != entry.sha256
        {
            return Err(integrity(
                "size or SHA-256 differs from the manifest".into(),
            ));
        }
        Ok(bytes)
    }

    async fn builder(
        &self,
        entry: &FileEntry,
        bytes: Bytes,
    ) -> Result<ParquetRecordBatchReaderBuilder<Bytes>> {
        let decryption = self.decryption(entry).await?;
        let options = ArrowReaderOptions::new().with_file_decryption_properties(decryption);
        ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, options).map_err(|e| {
            ArchiveError::Integrity {
                object: entry.path.clone(),
                detail: format!("cannot decrypt or decode: {e}"),
            }
        })
    }

    /// The decryption properties of a file: its data key, unwrapped from its key material.
    async fn decryption(&self, entry: &FileEntry) -> Result<Arc<FileDecryptionProperties>> {
        let material_path = crate::keys::key_material_path(&entry.path);
        let integrity = |object: &str, detail: String| ArchiveError::Integrity {
            object: object.to_string(),
            detail,
        };
        let material = match self.store.get(&Path::from(material_path.as_str())).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(integrity(&material_path, "key material is missing".into()))
            }
            Err(e) => return Err(e.into()),
        };
        let materials = match serde_json::from_slice::<serde_json::Value>(&material) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => {
                return Err(integrity(
                    &material_path,
                    "key material is not a JSON object".into(),
                ))
            }
        };
        let retriever = ParquetKeyRetriever {
            keys: self.keys.clone(),
            materials,
        };
        Ok(FileDecryptionProperties::with_key_retriever(Arc::new(retriever)).build()?)
    }

    /// Opens a file for selective reads, once: reads its end, checks the footer against the
    /// manifest's digest, and decrypts its metadata and page indexes (kept for the next
    /// lookup). None for a file whose manifest has no footer digest (it is read and checked
    /// whole).
    async fn opened(&self, entry: &FileEntry) -> Result<Option<ArrowReaderMetadata>> {
        if let Some(m) = self.opened.lock().expect("cache lock").get(&entry.path) {
            return Ok(Some(m.clone()));
        }
        let Some(metadata) = self.open_footer(entry, PageIndexPolicy::Optional).await? else {
            return Ok(None);
        };
        let mut opened = self.opened.lock().expect("cache lock");
        if opened.len() >= MAX_OPENED_FILES {
            opened.clear();
        }
        opened.insert(entry.path.clone(), metadata.clone());
        Ok(Some(metadata))
    }

    /// Opens a file to read it through: its footer checked and metadata decrypted, without
    /// page indexes (every page is read) and not kept (an export reads each file once; what
    /// it opens must not stay in memory). The kept metadata of a file already opened for
    /// lookups serves too.
    async fn opened_once(&self, entry: &FileEntry) -> Result<Option<ArrowReaderMetadata>> {
        if let Some(m) = self.opened.lock().expect("cache lock").get(&entry.path) {
            return Ok(Some(m.clone()));
        }
        self.open_footer(entry, PageIndexPolicy::Skip).await
    }

    /// Reads a file's end, checks its footer against the manifest's digest and decrypts its
    /// metadata (and page indexes, as `page_index` says).
    async fn open_footer(
        &self,
        entry: &FileEntry,
        page_index: PageIndexPolicy,
    ) -> Result<Option<ArrowReaderMetadata>> {
        if entry.footer_sha256.is_empty() {
            return Ok(None);
        }
        let integrity = |detail: String| ArchiveError::Integrity {
            object: entry.path.clone(),
            detail,
        };
        let path = Path::from(entry.path.as_str());
        let size = entry.bytes;
        let decryption = self.decryption(entry).await?;
        let mut suffix = FIRST_SUFFIX_BYTES.min(size);
        let metadata = loop {
            let tail = match self.store.get_range(&path, size - suffix..size).await {
                Ok(b) => b,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(integrity(crate::error::MISSING_FILE.into()))
                }
                Err(e) => return Err(integrity(format!("cannot read its end: {e}"))),
            };
            let n = tail.len();
            if n < 8 || &tail[n - 4..] != b"PARE" {
                return Err(integrity(
                    "not an encrypted Parquet file of this size".into(),
                ));
            }
            let footer =
                u32::from_le_bytes(tail[n - 8..n - 4].try_into().expect("4 bytes")) as u64 + 8;
            if footer > size {
                return Err(integrity(
                    "truncated: its footer is longer than the file".into(),
                ));
            }
            if footer > n as u64 {
                suffix = footer;
                continue;
            }
            if hex::encode(Sha256::digest(&tail[n - footer as usize..])) != entry.footer_sha256 {
                return Err(integrity(
                    "its footer differs from the manifest (file replaced or altered)".into(),
                ));
            }
            let mut reader = ParquetMetaDataReader::new()
                .with_page_index_policy(page_index)
                .with_decryption_properties(Some(decryption.clone()));
            match reader.try_parse_sized(&tail, size) {
                Ok(()) => break reader.finish()?,
                Err(ParquetError::NeedMoreData(more))
                    if more as u64 > suffix && more as u64 <= size =>
                {
                    suffix = more as u64
                }
                Err(e) => return Err(integrity(format!("cannot decrypt or decode: {e}"))),
            }
        };
        let metadata = ArrowReaderMetadata::try_new(
            Arc::new(metadata),
            ArrowReaderOptions::new().with_file_decryption_properties(decryption),
        )
        .map_err(|e| integrity(format!("cannot decode: {e}")))?;
        Ok(Some(metadata))
    }

    /// One patient's rows of one file: read selectively when the manifest has the file's footer
    /// digest, else read whole and checked against the manifest's digest.
    async fn file_patient_rows(
        &self,
        entry: &FileEntry,
        patient: &str,
    ) -> Result<Vec<RecordBatch>> {
        if let Some(metadata) = self.opened(entry).await? {
            return self.patient_rows_selective(entry, metadata, patient).await;
        }
        let needle = Scalar::new(StringArray::from(vec![patient]));
        let bytes = self.fetch_verified(entry).await?;
        let builder = self.builder(entry, bytes).await?;
        // Row groups by their statistics (the whole file is in memory: no page selection).
        let (groups, _) = patient_selection(builder.metadata(), patient);
        let mut out = Vec::new();
        if groups.is_empty() {
            return Ok(out);
        }
        for batch in builder.with_row_groups(groups).build()? {
            let batch = batch?;
            let rows = filter_record_batch(&batch, &eq(batch.column(0), &needle)?)?;
            if rows.num_rows() > 0 {
                out.push(rows);
            }
        }
        Ok(out)
    }

    /// One patient's rows of a file opened for selective reads: only the row groups and pages
    /// whose bounds may hold the patient are fetched and decrypted.
    async fn patient_rows_selective(
        &self,
        entry: &FileEntry,
        metadata: ArrowReaderMetadata,
        patient: &str,
    ) -> Result<Vec<RecordBatch>> {
        let (groups, selection) = patient_selection(metadata.metadata(), patient);
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let integrity = |e: ParquetError| decode_error(&entry.path, e);
        let input = FileRanges {
            store: self.store.clone(),
            path: Path::from(entry.path.as_str()),
            metadata: metadata.metadata().clone(),
        };
        // The page index narrows the read to the patient column's pages that may hold the
        // patient; this filter then decodes that column and keeps exactly the patient's rows,
        // so of the other columns only the pages holding those rows are fetched, decrypted and
        // decoded (a wide column's pages hold a few dozen rows: the writer's `PAGE_BYTES`), and
        // a file without the patient costs one column.
        let patient_column =
            ProjectionMask::leaves(metadata.metadata().file_metadata().schema_descr(), [0]);
        let needle = Scalar::new(StringArray::from(vec![patient]));
        let filter = RowFilter::new(vec![Box::new(ArrowPredicateFn::new(
            patient_column,
            move |batch: RecordBatch| eq(batch.column(0), &needle),
        ))]);
        let stream = ParquetRecordBatchStreamBuilder::new_with_metadata(input, metadata)
            .with_row_groups(groups)
            .with_row_selection(selection)
            .with_row_filter(filter)
            .build()
            .map_err(integrity)?;
        let batches: Vec<RecordBatch> = stream.try_collect().await.map_err(integrity)?;
        // Checked again: another patient's row must never come out of here.
        let needle = Scalar::new(StringArray::from(vec![patient]));
        let mut out = Vec::new();
        for batch in batches {
            let rows = filter_record_batch(&batch, &eq(batch.column(0), &needle)?)?;
            if rows.num_rows() > 0 {
                out.push(rows);
            }
        }
        Ok(out)
    }

    /// The Arrow schema of a file's rows (from its footer, checked against the manifest).
    pub async fn file_schema(&self, entry: &FileEntry) -> Result<arrow::datatypes::SchemaRef> {
        match self.opened_once(entry).await? {
            Some(metadata) => Ok(metadata.schema().clone()),
            None => {
                let bytes = self.fetch_verified(entry).await?;
                Ok(self.builder(entry, bytes).await?.schema().clone())
            }
        }
    }

    /// A file's rows as a stream of batches, a row group at a time, so that no file is held
    /// whole in memory: the footer is checked against the manifest and every page is
    /// authenticated as it is decrypted (as for patient lookups). `columns` limits the columns
    /// read (by name; names the file lacks are skipped). A file whose manifest has no footer
    /// digest (written before it was recorded) is read whole and checked against its SHA-256.
    pub async fn file_batches(
        &self,
        entry: &FileEntry,
        columns: Option<&[String]>,
    ) -> Result<futures::stream::BoxStream<'static, Result<RecordBatch>>> {
        use futures::StreamExt;
        let Some(metadata) = self.opened_once(entry).await? else {
            let batches = self.read_file(entry).await?;
            let batches = match columns {
                Some(names) => batches
                    .into_iter()
                    .map(|b| {
                        let keep: Vec<usize> = b
                            .schema()
                            .fields()
                            .iter()
                            .enumerate()
                            .filter(|(_, f)| names.contains(f.name()))
                            .map(|(i, _)| i)
                            .collect();
                        b.project(&keep)
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?,
                None => batches,
            };
            return Ok(futures::stream::iter(batches.into_iter().map(Ok)).boxed());
        };
        let input = FileRanges {
            store: self.store.clone(),
            path: Path::from(entry.path.as_str()),
            metadata: metadata.metadata().clone(),
        };
        let roots: Option<Vec<usize>> = columns.map(|names| {
            metadata
                .schema()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| names.contains(f.name()))
                .map(|(i, _)| i)
                .collect()
        });
        let mut builder = ParquetRecordBatchStreamBuilder::new_with_metadata(input, metadata);
        if let Some(roots) = roots {
            let mask = parquet::arrow::ProjectionMask::roots(builder.parquet_schema(), roots);
            builder = builder.with_projection(mask);
        }
        let object = entry.path.clone();
        let stream = builder
            .with_batch_size(8192)
            .build()
            .map_err(|e| decode_error(&object, e))?;
        Ok(stream
            .map(move |b| b.map_err(|e| decode_error(&object, e)))
            .boxed())
    }

    /// Reads and decrypts a whole file, after checking it against the manifest.
    pub async fn read_file(&self, entry: &FileEntry) -> Result<Vec<RecordBatch>> {
        let bytes = self.fetch_verified(entry).await?;
        let reader = self.builder(entry, bytes).await?.build()?;
        Ok(reader.collect::<Result<Vec<_>, _>>()?)
    }

    /// Checks the whole archive against its manifests: every file's size, digest, decryption,
    /// row count and patient range, and every referenced BLOB's length and digest. Problems are
    /// collected, not returned as the first error; objects no manifest refers to (left by an
    /// interrupted run) are listed separately.
    pub async fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        let mut published = std::collections::HashSet::new();
        let mut referenced = std::collections::BTreeMap::new();
        for (table, manifests) in &self.catalog.tables {
            let blob_columns = self.catalog.blob_columns(table);
            for entry in manifests.iter().flat_map(|m| &m.tombstones) {
                published.insert(entry.path.clone());
                report.files += 1;
                match self.read_file(entry).await {
                    Ok(b) => {
                        let rows: u64 = b.iter().map(|b| b.num_rows() as u64).sum();
                        if rows != entry.rows {
                            report.problems.push((
                                entry.path.clone(),
                                format!("{rows} tombstones, the manifest says {}", entry.rows),
                            ));
                        }
                    }
                    Err(ArchiveError::Integrity { object, detail }) => {
                        report.problems.push((object, detail))
                    }
                    Err(e) => return Err(e),
                }
            }
            for entry in manifests.iter().flat_map(|m| &m.files) {
                published.insert(entry.path.clone());
                report.files += 1;
                let batches = match self.read_file(entry).await {
                    Ok(b) => b,
                    Err(ArchiveError::Integrity { object, detail }) => {
                        report.problems.push((object, detail));
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
                report.rows += rows;
                if rows != entry.rows {
                    report.problems.push((
                        entry.path.clone(),
                        format!("{rows} rows, the manifest says {}", entry.rows),
                    ));
                }
                for batch in &batches {
                    let patients = arrow::array::AsArray::as_string::<i32>(batch.column(0));
                    let outside = patients
                        .iter()
                        .flatten()
                        .any(|p| p < entry.min_patient.as_str() || p > entry.max_patient.as_str());
                    if outside {
                        report.problems.push((
                            entry.path.clone(),
                            "a patient key lies outside the manifest's range".into(),
                        ));
                        break;
                    }
                    for r in blob_refs(batch, &blob_columns) {
                        referenced.insert(r.object.clone(), r);
                    }
                }
            }
        }
        let blobs = self.blobs();
        for r in referenced.values() {
            report.blobs += 1;
            match blobs.get(r).await {
                Ok(b) => report.blob_bytes += b.len() as u64,
                Err(ArchiveError::Integrity { object, detail }) => {
                    report.problems.push((object, detail))
                }
                Err(e) => return Err(e),
            }
        }
        let listed: Vec<_> = self.store.list(None).try_collect().await?;
        for meta in listed {
            let path = meta.location.to_string();
            let unpublished = if path.starts_with("tables/") || path.starts_with("tombstones/") {
                !published.contains(&crate::keys::data_file_of(&path))
            } else if let Some(id) = path
                .strip_prefix("blobs/")
                .and_then(|p| p.split('/').nth(1))
            {
                !referenced.contains_key(id)
            } else {
                false
            };
            if unpublished {
                report.unpublished.push(path);
            }
        }
        Ok(report)
    }

    /// One patient's archived rows of `table`: opens only the files whose key range can hold
    /// the patient, and in them only the row groups whose statistics can. Only current copies
    /// are returned ([`Successors`]): when a record was archived again by a later run (a
    /// correction), the copies of the newest run that archived it — under whichever patient:
    /// a record moved to another patient leaves this one's history; none of a record the
    /// source deleted (a tombstone), unless a legal hold kept it. The table's successors are
    /// read once per catalog (the keys of runs after the first, and the tombstones).
    pub async fn patient_rows(&self, table: &str, patient: &str) -> Result<Vec<RecordBatch>> {
        let runs = runs_of(self.catalog.tables.get(table).into_iter().flatten());
        let mut out = Vec::new();
        for (rank, run) in runs.iter().enumerate() {
            for entry in run.iter().flat_map(|m| &m.files) {
                if entry.min_patient.as_str() <= patient && patient <= entry.max_patient.as_str() {
                    let batches = self.file_patient_rows(entry, patient).await?;
                    out.extend(batches.into_iter().map(|b| (rank, b)));
                }
            }
        }
        if out.is_empty() {
            return Ok(Vec::new());
        }
        // The fates of these copies: what newer runs did to their keys, anywhere in the table.
        let successors = if runs.len() > 1
            || runs
                .iter()
                .flatten()
                .any(|m| m.truncated || !m.tombstones.is_empty())
        {
            self.table_successors(table).await?
        } else {
            return Ok(out.into_iter().map(|(_, b)| b).collect());
        };
        Ok(served(out, &successors)?
            .0
            .into_iter()
            .map(|(_, b)| b)
            .collect())
    }

    /// A tombstone file's tombstones, sorted by key (read once, checked against the manifest,
    /// then kept).
    pub async fn tombstones(&self, entry: &FileEntry) -> Result<Arc<Vec<Tombstone>>> {
        if let Some(t) = self.tombstones.lock().expect("cache lock").get(&entry.path) {
            return Ok(t.clone());
        }
        let mut read: Vec<Tombstone> = self
            .read_file(entry)
            .await?
            .iter()
            .flat_map(tombstones_of)
            .collect();
        read.sort_by(|a, b| a.key.cmp(&b.key));
        let read = Arc::new(read);
        let mut cache = self.tombstones.lock().expect("cache lock");
        if cache.len() >= MAX_OPENED_FILES {
            cache.clear();
        }
        cache.insert(entry.path.clone(), read.clone());
        Ok(read)
    }

    /// Adds to `successors` what the manifests of run `rank` deleted: their tombstones and
    /// truncates.
    pub async fn add_deletions(
        &self,
        successors: &mut Successors,
        rank: usize,
        run: &[&TableManifest],
    ) -> Result<()> {
        for m in run {
            if m.truncated {
                successors.truncate(rank);
            }
            for entry in &m.tombstones {
                for t in self.tombstones(entry).await?.iter() {
                    successors.tombstone(rank, t);
                }
            }
        }
        Ok(())
    }

    /// [`ArchiveReader::successors`] of `table`, made once for this catalog.
    async fn table_successors(&self, table: &str) -> Result<Arc<Successors>> {
        let mut made = self.successors.lock().await;
        if let Some(s) = made.get(table) {
            return Ok(s.clone());
        }
        let s = Arc::new(self.successors(table).await?);
        made.insert(table.to_string(), s.clone());
        Ok(s)
    }

    /// What the runs of `table` did after its oldest run, for telling each copy's fate while
    /// reading the table through: the keys of every copy of a newer run (read from their key
    /// column alone), the tombstones and truncates. Memory grows with the rows of runs after
    /// the first (corrections), not with the table.
    pub async fn successors(&self, table: &str) -> Result<Successors> {
        use futures::StreamExt;
        let runs = runs_of(self.catalog.tables.get(table).into_iter().flatten());
        let mut successors = Successors::default();
        let key_column = [crate::KEY_COLUMN.to_string()];
        for (rank, run) in runs.iter().enumerate() {
            self.add_deletions(&mut successors, rank, run).await?;
            if rank == 0 {
                continue;
            }
            for entry in run.iter().flat_map(|m| &m.files) {
                let mut batches = self.file_batches(entry, Some(&key_column)).await?;
                while let Some(batch) = batches.next().await {
                    let batch = batch?;
                    let keys = arrow::array::AsArray::as_string::<i32>(batch.column(0));
                    for key in keys.iter().flatten() {
                        successors.copy(rank, key);
                    }
                }
            }
        }
        Ok(successors)
    }

    /// The patients under whom `table` holds copies of record `key` (current or not), read
    /// from the patient and key columns of every file: a scan of the table, for the rare
    /// lookup of a record whose patient is not known (a change that moved it to another
    /// patient carries only the new one).
    pub async fn patients_of_key(&self, table: &str, key: &str) -> Result<Vec<String>> {
        use futures::StreamExt;
        let columns = [
            crate::PATIENT_COLUMN.to_string(),
            crate::KEY_COLUMN.to_string(),
        ];
        let mut patients = std::collections::BTreeSet::new();
        for (_, _, entry) in self.ranked_files(table) {
            let mut batches = self.file_batches(entry, Some(&columns)).await?;
            while let Some(batch) = batches.next().await {
                let batch = batch?;
                let (Some(p), Some(k)) = (
                    batch.column_by_name(crate::PATIENT_COLUMN),
                    batch.column_by_name(crate::KEY_COLUMN),
                ) else {
                    continue;
                };
                let (p, k) = (
                    arrow::array::AsArray::as_string::<i32>(p),
                    arrow::array::AsArray::as_string::<i32>(k),
                );
                for (k, p) in k.iter().zip(p.iter()) {
                    if let (Some(k), Some(p)) = (k, p) {
                        if k == key {
                            patients.insert(p.to_string());
                        }
                    }
                }
            }
        }
        Ok(patients.into_iter().collect())
    }

    /// The files of `table` with the rank of their run (see [`runs_of`]), and their
    /// manifests' BLOB columns.
    pub fn ranked_files(&self, table: &str) -> Vec<(usize, &[String], &FileEntry)> {
        runs_of(self.catalog.tables.get(table).into_iter().flatten())
            .into_iter()
            .enumerate()
            .flat_map(|(rank, run)| {
                run.into_iter().flat_map(move |m| {
                    m.files
                        .iter()
                        .map(move |f| (rank, m.blob_columns.as_slice(), f))
                })
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "reader_tests.rs"]
mod tests;
