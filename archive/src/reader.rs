//! Reads the archive: its catalog, whole files, and one patient's rows.

use crate::blob::{BlobRef, BlobStore};
use crate::catalog::{runs_of, Catalog, Listed};
use crate::error::{ArchiveError, Result};
use crate::keys::{KeyRing, ParquetKeyRetriever};
use crate::manifest::FileEntry;
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

/// Keeps, of every record key, only the copies of the newest run that archived it. `batches`
/// carry the rank of their run (higher is newer, see [`runs_of`]): a record archived again by a
/// later run (a correction) supersedes its copies of earlier runs, while rows of the same run
/// never supersede one another, so two identical rows of a keyless table (which share a key,
/// a digest of their values) both stay: they are two records.
pub(crate) fn newest_only(batches: Vec<(usize, RecordBatch)>) -> Result<Vec<RecordBatch>> {
    use arrow::array::{AsArray, BooleanArray};
    let mut newest: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (rank, batch) in &batches {
        for key in batch.column(2).as_string::<i32>().iter().flatten() {
            let r = newest.entry(key).or_insert(*rank);
            *r = (*r).max(*rank);
        }
    }
    let mut out = Vec::with_capacity(batches.len());
    for (rank, batch) in &batches {
        let keys = batch.column(2).as_string::<i32>();
        let keep: BooleanArray = keys
            .iter()
            .map(|k| Some(k.is_none_or(|k| newest[k] == *rank)))
            .collect();
        let kept = filter_record_batch(batch, &keep)?;
        if kept.num_rows() > 0 {
            out.push(kept);
        }
    }
    Ok(out)
}

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
        })
    }

    /// A view of the same archive with `catalog` (what [`crate::LiveArchive`] swaps in): files
    /// already opened stay open (a file never changes under its name).
    pub(crate) fn with_catalog(&self, catalog: Catalog) -> Self {
        ArchiveReader {
            catalog: Arc::new(catalog),
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
            let unpublished = if path.starts_with("tables/") {
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
    /// the patient, and in them only the row groups whose statistics can. When a record was
    /// archived again by a later run (a correction), only the copies of the newest run that
    /// archived it are returned (see [`runs_of`]).
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
        if runs.len() > 1 {
            newest_only(out)
        } else {
            Ok(out.into_iter().map(|(_, b)| b).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Kek;
    use crate::manifest::TableManifest;
    use crate::writer::{TableWriter, TableWriterOptions};
    use arrow::array::{ArrayRef, Date32Array, Int64Array};
    use arrow::datatypes::Schema;
    use object_store::PutPayload;

    fn batch(schema: &Arc<Schema>, patients: &[&str], start: i64) -> RecordBatch {
        let n = patients.len();
        let ids: Vec<i64> = (start..start + n as i64).collect();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(patients.to_vec())),
            Arc::new(Date32Array::from(vec![Some(10_000); n])),
            Arc::new(StringArray::from(
                ids.iter().map(|i| format!("id={i}")).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(ids)),
        ];
        RecordBatch::try_new(schema.clone(), cols).unwrap()
    }

    /// An empty in-memory archive, and the schema of its `labs` table (the three archive columns
    /// and an id).
    async fn labs_archive() -> (Arc<dyn ObjectStore>, KeyRing, Arc<Schema>) {
        crate::test_support::test_archive("id").await
    }

    #[tokio::test]
    async fn writes_encrypted_files_and_reads_one_patient() {
        let (store, keys, schema) = labs_archive().await;
        let options = TableWriterOptions {
            rows_per_file: 4,
            row_group_rows: 2,
            ..Default::default()
        };
        let mut w = TableWriter::new(
            store.clone(),
            keys.clone(),
            TableManifest::new("labs", "r1", "p1", vec![]),
            schema.clone(),
            options,
        )
        .unwrap();
        w.write(&batch(&schema, &["a", "a", "b", "b"], 0))
            .await
            .unwrap();
        w.write(&batch(&schema, &["b", "c", "c"], 4)).await.unwrap();
        let manifest = w.finish().await.unwrap();
        assert_eq!(manifest.rows(), 7);
        assert_eq!(manifest.files.len(), 2);

        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let rows: usize = reader
            .patient_rows("labs", "b")
            .await
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(rows, 3);
        assert!(reader.patient_rows("labs", "zz").await.unwrap().is_empty());

        // Without the key, a plain Parquet read fails.
        let entry = &manifest.files[0];
        let bytes = store
            .get(&Path::from(entry.path.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let err = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap_err();
        assert!(err.to_string().contains("decryption"), "{err}");

        // With another KEK, the archive key does not unwrap: an integrity error naming it; and
        // a file does not decrypt: an integrity error naming the file.
        let other = KeyRing::new(Kek::from_hex("k1", &Kek::generate_hex()).unwrap(), []);
        let err = ArchiveReader::open(store.clone(), other.clone())
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ArchiveError::Integrity { object, .. } if object == "keys/archive-key.json"),
            "{err}"
        );
        let stranger = ArchiveReader {
            store: store.clone(),
            keys: other,
            catalog: reader.catalog.clone(),
            opened: Arc::default(),
        };
        let err = stranger.read_file(entry).await.unwrap_err();
        assert!(
            matches!(&err, ArchiveError::Integrity { object, .. } if object == &entry.path),
            "{err}"
        );

        // A flipped byte is caught before decryption.
        let mut flipped = bytes.to_vec();
        flipped[10] ^= 1;
        store
            .put(&Path::from(entry.path.as_str()), PutPayload::from(flipped))
            .await
            .unwrap();
        assert!(matches!(
            reader.read_file(entry).await,
            Err(ArchiveError::Integrity { .. })
        ));
    }

    /// A file streamed a row group at a time holds the same rows as a whole read, a projection
    /// reads only the columns named, and a flipped byte fails the stream closed.
    #[tokio::test]
    async fn streamed_files_match_whole_reads_and_fail_closed() {
        use futures::TryStreamExt;
        let (store, keys, schema) = labs_archive().await;
        let mut w = TableWriter::new(
            store.clone(),
            keys.clone(),
            TableManifest::new("labs", "r1", "p1", vec![]),
            schema.clone(),
            TableWriterOptions {
                rows_per_file: 50_000,
                row_group_rows: 10_000,
                ..Default::default()
            },
        )
        .unwrap();
        let patients: Vec<String> = (0..50_000).map(|i| format!("p{:05}", i / 10)).collect();
        let refs: Vec<&str> = patients.iter().map(String::as_str).collect();
        w.write(&batch(&schema, &refs, 0)).await.unwrap();
        let manifest = w.finish().await.unwrap();
        let entry = &manifest.files[0];
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        assert_eq!(reader.file_schema(entry).await.unwrap(), schema);
        let whole = reader.read_file(entry).await.unwrap();
        let streamed: Vec<RecordBatch> = reader
            .file_batches(entry, None)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert!(streamed.len() > 1, "streamed in pieces");
        let concat = |b: &[RecordBatch]| arrow::compute::concat_batches(&schema, b).unwrap();
        assert_eq!(concat(&streamed), concat(&whole));
        let ids: Vec<RecordBatch> = reader
            .file_batches(entry, Some(&["id".to_string(), "nope".to_string()]))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(ids[0].schema().fields().len(), 1);
        assert_eq!(ids.iter().map(|b| b.num_rows()).sum::<usize>(), 50_000);

        let path = Path::from(entry.path.as_str());
        let mut bytes = store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        bytes[200] ^= 1;
        store.put(&path, bytes.into()).await.unwrap();
        let fresh = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let read: Result<Vec<RecordBatch>> = match fresh.file_batches(entry, None).await {
            Ok(s) => s.try_collect().await,
            Err(e) => Err(e),
        };
        assert!(
            matches!(read, Err(ArchiveError::Integrity { .. })),
            "{read:?}"
        );
    }

    /// One patient's rows come from the pages that hold them (the rest of the file is not
    /// read), the same rows as a whole-file read; and the selective path still fails closed on
    /// a flipped byte in a page it reads, a file replaced by another one (with its key
    /// material), and a truncated file.
    #[tokio::test]
    async fn selective_reads_match_whole_reads_and_fail_closed() {
        let (store, keys, schema) = labs_archive().await;
        let mut w = TableWriter::new(
            store.clone(),
            keys.clone(),
            TableManifest::new("labs", "r1", "p1", vec![]),
            schema.clone(),
            TableWriterOptions {
                rows_per_file: 60_000,
                row_group_rows: 20_000,
                ..Default::default()
            },
        )
        .unwrap();
        // 120,000 rows over 3,000 patients, sorted: two files of three row groups each.
        let patients: Vec<String> = (0..120_000).map(|i| format!("p{:05}", i / 40)).collect();
        for (n, chunk) in patients.chunks(10_000).enumerate() {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            w.write(&batch(&schema, &refs, n as i64 * 10_000))
                .await
                .unwrap();
        }
        let manifest = w.finish().await.unwrap();
        assert_eq!(manifest.files.len(), 2);
        assert!(manifest.files.iter().all(|f| f.footer_sha256.len() == 64));
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        for p in ["p00000", "p01234", "p01499", "p01500", "p02999"] {
            let rows = reader.patient_rows("labs", p).await.unwrap();
            assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 40, "{p}");
            let whole: usize = {
                let mut n = 0;
                for f in &manifest.files {
                    for b in reader.read_file(f).await.unwrap() {
                        let ps = arrow::array::AsArray::as_string::<i32>(b.column(0));
                        n += ps.iter().filter(|v| *v == Some(p)).count();
                    }
                }
                n
            };
            assert_eq!(whole, 40);
        }
        let entry = manifest.files[0].clone();
        let metadata = reader.opened(&entry).await.unwrap().unwrap();
        let (groups, selection) = patient_selection(metadata.metadata(), "p01234");
        assert_eq!(
            groups.len(),
            1,
            "one row group of the file can hold the patient"
        );
        let selected: usize = selection
            .iter()
            .filter(|s| !s.skip)
            .map(|s| s.row_count)
            .sum();
        assert!(
            selected < 20_000,
            "only some pages are read: {selected} rows"
        );

        let path = Path::from(entry.path.as_str());
        let original = store.get(&path).await.unwrap().bytes().await.unwrap();
        let fresh = || async {
            ArchiveReader::open(store.clone(), keys.clone())
                .await
                .unwrap()
        };
        let integrity = |r: Result<Vec<RecordBatch>>| match r {
            Err(ArchiveError::Integrity { object, .. }) => assert_eq!(object, entry.path),
            other => panic!("expected an integrity error, got {other:?}"),
        };
        // A flipped byte in the first page of the patient column of the first row group.
        let loc = metadata
            .metadata()
            .page_index_for_row_group(0)
            .offset_index(0)
            .unwrap()
            .page_locations()[0]
            .clone();
        let mut bytes = original.to_vec();
        bytes[loc.offset as usize + loc.compressed_page_size as usize - 5] ^= 1;
        store.put(&path, bytes.into()).await.unwrap();
        integrity(fresh().await.patient_rows("labs", "p00000").await);
        // Another file (and its key material) in its place.
        let other = &manifest.files[1];
        let other_bytes = store
            .get(&Path::from(other.path.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let material = |p: &str| Path::from(crate::keys::key_material_path(p));
        let own_material = store
            .get(&material(&entry.path))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let other_material = store
            .get(&material(&other.path))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        store.put(&path, other_bytes.clone().into()).await.unwrap();
        store
            .put(&material(&entry.path), other_material.into())
            .await
            .unwrap();
        let mut swapped = manifest.files[0].clone();
        swapped.bytes = other_bytes.len() as u64;
        let r = fresh().await;
        integrity(r.file_patient_rows(&swapped, "p00000").await);
        store
            .put(&material(&entry.path), own_material.into())
            .await
            .unwrap();
        // Truncated.
        store
            .put(&path, original.slice(..original.len() - 100).into())
            .await
            .unwrap();
        integrity(fresh().await.patient_rows("labs", "p00000").await);
        store.put(&path, original.into()).await.unwrap();
        assert_eq!(
            fresh()
                .await
                .patient_rows("labs", "p00000")
                .await
                .unwrap()
                .iter()
                .map(|b| b.num_rows())
                .sum::<usize>(),
            40
        );
    }
}
