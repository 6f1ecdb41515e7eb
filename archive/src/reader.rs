//! Reads the archive: its catalog, whole files, and one patient's rows.

use crate::blob::{BlobRef, BlobStore};
use crate::error::{ArchiveError, Result};
use crate::keys::{KeyRing, ParquetKeyRetriever};
use crate::manifest::{FileEntry, TableManifest};
use arrow::array::{RecordBatch, Scalar, StringArray};
use arrow::compute::filter_record_batch;
use arrow::compute::kernels::cmp::eq;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::encryption::decrypt::FileDecryptionProperties;
use parquet::file::statistics::Statistics;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Every published manifest, by table.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Manifests per table, oldest first (by creation time): later ones supersede earlier ones
    /// record by record.
    pub tables: BTreeMap<String, Vec<TableManifest>>,
}

impl Catalog {
    /// Files of `table` whose patient-key range may hold `patient`.
    pub fn files_for_patient<'a>(
        &'a self,
        table: &str,
        patient: &'a str,
    ) -> impl Iterator<Item = &'a FileEntry> + 'a {
        self.tables
            .get(table)
            .into_iter()
            .flatten()
            .flat_map(|m| m.files.iter())
            .filter(move |f| f.min_patient.as_str() <= patient && patient <= f.max_patient.as_str())
    }

    /// The BLOB columns recorded for `table`.
    pub fn blob_columns(&self, table: &str) -> Vec<String> {
        let mut cols: Vec<String> = self
            .tables
            .get(table)
            .into_iter()
            .flatten()
            .flat_map(|m| m.blob_columns.iter().cloned())
            .collect();
        cols.sort();
        cols.dedup();
        cols
    }

    /// Archived rows per table.
    pub fn rows_per_table(&self) -> BTreeMap<String, u64> {
        self.tables
            .iter()
            .map(|(t, ms)| (t.clone(), ms.iter().map(|m| m.rows()).sum()))
            .collect()
    }
}

/// Keeps, of every record key, only its newest copy: `batches` are in archive order (oldest
/// manifest first), so the last occurrence of a key wins.
pub(crate) fn newest_only(batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    use arrow::array::{AsArray, BooleanArray};
    let mut seen = std::collections::HashSet::new();
    let mut masks: Vec<BooleanArray> = Vec::with_capacity(batches.len());
    for batch in batches.iter().rev() {
        let keys = batch.column(2).as_string::<i32>();
        let mut keep: Vec<bool> = (0..batch.num_rows())
            .rev()
            .map(|i| seen.insert(keys.value(i).to_string()))
            .collect();
        keep.reverse();
        masks.push(BooleanArray::from(keep));
    }
    masks.reverse();
    let mut out = Vec::with_capacity(batches.len());
    for (batch, mask) in batches.iter().zip(&masks) {
        let kept = filter_record_batch(batch, mask)?;
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
}

impl ArchiveReader {
    /// Opens an archive and loads its catalog from the manifests.
    pub async fn open(store: Arc<dyn ObjectStore>, keys: KeyRing) -> Result<Self> {
        let keys = keys.for_archive(store.as_ref(), false).await?;
        let mut catalog = Catalog::default();
        let mut metas: Vec<_> = store
            .list(Some(&Path::from("manifests")))
            .try_collect()
            .await?;
        metas.sort_by(|a, b| a.location.cmp(&b.location));
        for meta in metas {
            let object = meta.location.to_string();
            let bytes = store.get(&meta.location).await?.bytes().await?;
            let manifest: TableManifest =
                serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Manifest {
                    object: object.clone(),
                    detail: e.to_string(),
                })?;
            manifest.check_seal(&keys, &object)?;
            catalog
                .tables
                .entry(manifest.table.clone())
                .or_default()
                .push(manifest);
        }
        // A compaction's manifest replaces the ones it lists: the switch happens the moment it is
        // written (a single object put), so a reader sees either the old set or the new one.
        let superseded: std::collections::HashSet<String> = catalog
            .tables
            .values()
            .flatten()
            .flat_map(|m| m.supersedes.iter().cloned())
            .collect();
        for manifests in catalog.tables.values_mut() {
            manifests.retain(|m| !superseded.contains(&TableManifest::path(&m.table, &m.run_id)));
            manifests.sort_by(|a, b| (&a.created_at, &a.run_id).cmp(&(&b.created_at, &b.run_id)));
        }
        Ok(ArchiveReader {
            store,
            keys,
            catalog: Arc::new(catalog),
        })
    }

    /// The catalog loaded at open.
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
                return Err(integrity("file is missing".into()))
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
        let decryption =
            FileDecryptionProperties::with_key_retriever(Arc::new(retriever)).build()?;
        let options = ArrowReaderOptions::new().with_file_decryption_properties(decryption);
        ParquetRecordBatchReaderBuilder::try_new_with_options(bytes, options)
            .map_err(|e| integrity(&entry.path, format!("cannot decrypt or decode: {e}")))
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
                let data = path.rsplit_once('/').and_then(|(dir, name)| {
                    let name = name
                        .strip_prefix("_KEY_MATERIAL_FOR_")?
                        .strip_suffix(".json")?;
                    Some(format!("{dir}/{name}"))
                });
                !published.contains(data.as_ref().unwrap_or(&path))
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
    /// archived more than once (a correction), only its newest copy is returned.
    pub async fn patient_rows(&self, table: &str, patient: &str) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        let needle = Scalar::new(StringArray::from(vec![patient]));
        for entry in self.catalog.files_for_patient(table, patient) {
            let bytes = self.fetch_verified(entry).await?;
            let builder = self.builder(entry, bytes).await?;
            let groups: Vec<usize> = builder
                .metadata()
                .row_groups()
                .iter()
                .enumerate()
                .filter(|(_, rg)| match rg.column(0).statistics() {
                    Some(Statistics::ByteArray(s)) => match (s.min_opt(), s.max_opt()) {
                        (Some(min), Some(max)) => {
                            min.data() <= patient.as_bytes() && patient.as_bytes() <= max.data()
                        }
                        _ => true,
                    },
                    _ => true,
                })
                .map(|(i, _)| i)
                .collect();
            if groups.is_empty() {
                continue;
            }
            for batch in builder.with_row_groups(groups).build()? {
                let batch = batch?;
                let mask = eq(batch.column(0), &needle)?;
                let rows = filter_record_batch(&batch, &mask)?;
                if rows.num_rows() > 0 {
                    out.push(rows);
                }
            }
        }
        if self.catalog.tables.get(table).is_some_and(|m| m.len() > 1) {
            out = newest_only(out)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Kek;
    use crate::manifest::TableManifest;
    use crate::writer::{TableWriter, TableWriterOptions};
    use crate::{KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN};
    use arrow::array::{ArrayRef, Date32Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use object_store::memory::InMemory;
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

    #[tokio::test]
    async fn writes_encrypted_files_and_reads_one_patient() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let keys = KeyRing::new(Kek::from_hex("k1", &Kek::generate_hex()).unwrap(), [])
            .for_archive(store.as_ref(), true)
            .await
            .unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new(PATIENT_COLUMN, DataType::Utf8, false),
            Field::new(RECORD_DATE_COLUMN, DataType::Date32, true),
            Field::new(KEY_COLUMN, DataType::Utf8, false),
            Field::new("id", DataType::Int64, false),
        ]));
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
}
