//! Compaction and garbage collection.
//!
//! `compact` rewrites all of a table's current files (applying corrections: a record archived
//! again by a later run keeps only that run's copies; rows of one run are never merged, since
//! identical rows are distinct records) into new large files sorted by patient key, and
//! publishes one manifest that supersedes the old ones; that single write is the catalog
//! switch. The manifest accounts for every row it replaced: the rows of each run manifest, and
//! how many superseded copies it left out. Nothing is deleted then:
//! `gc` deletes files and manifests that a newer manifest superseded more than a grace period
//! ago, so readers that opened the old catalog can finish.

use crate::error::{ArchiveError, Result};
use crate::keys::KeyRing;
use crate::manifest::{FileEntry, TableManifest};
use crate::merge::{merge, SortedInput};
use crate::reader::ArchiveReader;
use crate::writer::{TableWriter, TableWriterOptions};
use arrow::array::RecordBatch;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::sync::Arc;

/// What a compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// The table.
    pub table: String,
    /// Manifests replaced.
    pub manifests: usize,
    /// Files before and after.
    pub files_before: usize,
    /// Files after.
    pub files_after: usize,
    /// Rows before (all copies) and after (without copies superseded by a later run).
    pub rows_before: u64,
    /// Rows after.
    pub rows_after: u64,
    /// Copies of records destroyed past retention left out (a rewrite for retention).
    pub destroyed: u64,
}

/// What a rewrite for retention destroys ([`rewrite_table`]): asked of each current copy
/// (row `row` of `batch`, in the table's current layout; its third column is the record key),
/// it says whether the copy is destroyed, and counts and checksums what it destroys.
pub trait Destroyer: Send {
    /// Whether this copy is destroyed (left out).
    fn destroy(&mut self, batch: &RecordBatch, row: usize) -> bool;
    /// The destruction's id and its record of what it destroyed, kept in the rewrite's
    /// manifest (`destructions`) once the rows are all read.
    fn record(&self) -> (String, serde_json::Value);
}

/// Inputs a merge pass opens at once: what bounds a compaction's memory (each open input holds
/// a decoded batch and the row group being read), whatever the table's size.
pub const MERGE_FAN_IN: usize = 16;

/// Compacts one table by a streaming merge ([`crate::merge`]) of its files, in passes of at
/// most [`MERGE_FAN_IN`] files: the first pass leaves out what later runs superseded or deleted
/// (what [`ArchiveReader::successors`] says: memory grows with the corrections, not with the
/// table); a pass over more inputs writes intermediate files (encrypted like the archive's,
/// never named by a manifest, deleted once the compaction is published; `gc --orphans`
/// deletes those a crash left). A table whose every record was deleted is compacted into a
/// manifest without files, which still accounts for every row it replaced.
pub async fn compact_table(
    store: Arc<dyn ObjectStore>,
    keys: KeyRing,
    table: &str,
    options: TableWriterOptions,
) -> Result<CompactionReport> {
    rewrite_table(store, keys, table, options, None).await
}

/// [`compact_table`], leaving out besides the superseded copies the current copies of the
/// records `destroyer` destroys (counted in the manifest's `destroyed_copies`): the rewrite of
/// `strata archive retain`. Readers stop serving them once its manifest is published (the
/// catalog switch); the files it replaced, and their data keys, go with `gc`.
pub async fn rewrite_table(
    store: Arc<dyn ObjectStore>,
    keys: KeyRing,
    table: &str,
    options: TableWriterOptions,
    mut destroyer: Option<&mut dyn Destroyer>,
) -> Result<CompactionReport> {
    let keys = keys.for_archive(store.as_ref(), false).await?;
    let reader = ArchiveReader::open(store.clone(), keys.clone()).await?;
    let manifests = reader
        .catalog()
        .tables
        .get(table)
        .cloned()
        .unwrap_or_default();
    let mut report = CompactionReport {
        table: table.into(),
        manifests: manifests.len(),
        ..Default::default()
    };
    let Some(last) = manifests.last() else {
        return Ok(report);
    };
    // Each file is one sorted input, with the rank of its run: a correction supersedes copies
    // of earlier runs only, never rows of its own run (identical rows of a keyless table are
    // distinct records); a tombstone or truncate deletes copies (see `Successors`).
    let mut inputs: Vec<SortedInput> = reader
        .ranked_files(table)
        .into_iter()
        .map(|(rank, _, entry)| SortedInput {
            files: vec![entry.clone()],
            rank,
        })
        .collect();
    report.files_before = inputs.len();
    report.rows_before = inputs.iter().flat_map(|i| &i.files).map(|f| f.rows).sum();
    if inputs.is_empty() {
        return Ok(report);
    }
    let schema = merged_schema(&reader, &inputs).await?;
    let successors = reader.successors(table).await?;
    // The deletions a legal hold stopped stay on record while a copy they kept is current.
    let mut held: Vec<crate::Tombstone> = Vec::new();
    for m in &manifests {
        for entry in &m.tombstones {
            held.extend(
                reader
                    .tombstones(entry)
                    .await?
                    .iter()
                    .filter(|t| t.held)
                    .cloned(),
            );
        }
    }
    let held_keys: std::collections::HashSet<String> = held.iter().map(|t| t.key.clone()).collect();
    let mut held_kept: std::collections::HashSet<String> = Default::default();
    // Fates are decided in the first pass; what it wrote is all current.
    let decided = std::sync::atomic::AtomicBool::new(false);
    let mut destroyed = 0u64;
    let mut keep = |rank: usize, batch: &RecordBatch, row: usize| {
        if decided.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        let key = arrow::array::AsArray::as_string::<i32>(batch.column(2)).value(row);
        if !successors.fate(rank, key).is_served() {
            return false;
        }
        if destroyer
            .as_deref_mut()
            .is_some_and(|d| d.destroy(batch, row))
        {
            destroyed += 1;
            return false;
        }
        if held_keys.contains(key) {
            held_kept.insert(key.to_string());
        }
        true
    };
    let run_id = format!(
        "compact-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ")
    );
    let mut kept_rows = None;
    let mut staged: Vec<FileEntry> = Vec::new();
    let mut pass = 0;
    while inputs.len() > MERGE_FAN_IN {
        pass += 1;
        let mut next = Vec::new();
        let mut written = 0;
        let mut rest = inputs.into_iter().peekable();
        while rest.peek().is_some() {
            let group: Vec<SortedInput> = rest.by_ref().take(MERGE_FAN_IN).collect();
            let staging = TableManifest::new(
                table,
                &format!("{run_id}-pass{pass}-{:05}", next.len()),
                &last.policy_version,
                last.blob_columns.clone(),
            );
            let mut out = TableWriter::new(
                store.clone(),
                keys.clone(),
                staging,
                schema.clone(),
                options.clone(),
            )?;
            written += merge(&reader, group, &schema, &mut keep, &mut out)
                .await?
                .written;
            let files = out.finish_unpublished().await?;
            staged.extend(files.iter().cloned());
            next.push(SortedInput { files, rank: 0 });
        }
        kept_rows.get_or_insert(written);
        decided.store(true, std::sync::atomic::Ordering::Relaxed);
        inputs = next;
    }
    let manifest = TableManifest::new(
        table,
        &run_id,
        &last.policy_version,
        last.blob_columns.clone(),
    );
    let mut writer = TableWriter::new(
        store.clone(),
        keys.clone(),
        manifest,
        schema.clone(),
        options,
    )?;
    let written = merge(&reader, inputs, &schema, &mut keep, &mut writer)
        .await?
        .written;
    let kept_rows = *kept_rows.get_or_insert(written);
    report.destroyed = destroyed;
    held.retain(|t| held_kept.contains(&t.key));
    held.sort_by(|a, b| a.key.cmp(&b.key));
    held.dedup_by(|a, b| a.key == b.key);
    // The accounting carries over from the compactions replaced, so that it stays whole after
    // `gc` deletes them.
    let manifest = writer.manifest_mut();
    let mut supersedes = std::collections::BTreeSet::new();
    for m in &manifests {
        let path = TableManifest::path(&m.table, &m.run_id);
        if m.replaced_rows.is_empty() {
            manifest.replaced_rows.insert(path.clone(), m.rows());
        }
        manifest
            .replaced_rows
            .extend(m.replaced_rows.iter().map(|(p, n)| (p.clone(), *n)));
        manifest.superseded_copies += m.superseded_copies;
        manifest.destroyed_copies += m.destroyed_copies;
        manifest
            .destructions
            .extend(m.destructions.iter().map(|(k, v)| (k.clone(), v.clone())));
        supersedes.insert(path);
        supersedes.extend(m.supersedes.iter().cloned());
    }
    manifest.superseded_copies += report.rows_before - kept_rows - destroyed;
    manifest.destroyed_copies += destroyed;
    if let Some(d) = &destroyer {
        let (id, record) = d.record();
        manifest.destructions.insert(id, record);
    }
    manifest.supersedes = supersedes.into_iter().collect();
    // As new as what it read: a run published meanwhile stays newer.
    manifest.ranks_as_of = manifests
        .iter()
        .map(|m| m.ranks_at())
        .max()
        .unwrap_or_default()
        .to_string();
    writer.write_tombstones(&held).await?;
    report.rows_after = writer.rows();
    if report.rows_after != kept_rows {
        return Err(ArchiveError::Integrity {
            object: TableManifest::path(table, &run_id),
            detail: format!(
                "compaction wrote {} rows of {kept_rows}: nothing was published",
                report.rows_after
            ),
        });
    }
    // Another rewrite of the table (a compaction, a retention pass) published while this one
    // worked replaces the same manifests: publishing as well would serve again copies the
    // other left out. (Sync's runs do not replace anything: they rank after this one.)
    let inputs: std::collections::HashSet<String> = manifests
        .iter()
        .map(|m| TableManifest::path(&m.table, &m.run_id))
        .collect();
    let now = ArchiveReader::open(store.clone(), keys).await?;
    let rewritten_meanwhile = now
        .catalog()
        .tables
        .get(table)
        .into_iter()
        .flatten()
        .any(|m| m.supersedes.iter().any(|p| inputs.contains(p)));
    if rewritten_meanwhile {
        return Err(ArchiveError::Integrity {
            object: TableManifest::path(table, &run_id),
            detail: "another rewrite of the table (a compaction or a retention pass) was published meanwhile: nothing was published; run this one again".into(),
        });
    }
    let published = writer.finish().await?;
    report.files_after = published.files.len();
    // The intermediate passes' files are named by no manifest: gone now.
    for f in &staged {
        for object in [f.path.clone(), crate::keys::key_material_path(&f.path)] {
            match store.delete(&Path::from(object)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(report)
}

/// Deletes manifests that another manifest superseded at least `grace` ago, with their files and
/// key material; with `orphans`, also the Parquet files (and key material) that no manifest
/// names and that were written at least `grace` ago: those of an attempt that never reached its
/// checkpoint, and the BLOB objects no row refers to any more, once they have stayed so for
/// `grace` ([`crate::blob_gc`]). Pass `orphans` only when no run is in progress (a range's
/// files are written before its manifest). Returns the objects deleted.
pub async fn gc(
    store: Arc<dyn ObjectStore>,
    keys: KeyRing,
    grace: chrono::Duration,
    orphans: bool,
) -> Result<Vec<String>> {
    gc_sweeping(store, keys, grace, orphans, orphans).await
}

/// [`gc`], saying apart whether BLOBs no record refers to are swept (`blobs`): not while
/// change sync follows a run, which may reuse an existing BLOB object for new content and
/// publish its manifest while the sweep works.
pub async fn gc_sweeping(
    store: Arc<dyn ObjectStore>,
    keys: KeyRing,
    grace: chrono::Duration,
    orphans: bool,
    blobs: bool,
) -> Result<Vec<String>> {
    let keys = keys.for_archive(store.as_ref(), false).await?;
    let mut manifests: Vec<(String, TableManifest)> =
        crate::catalog::list_manifests(store.as_ref(), &keys, &crate::catalog::Listed::new())
            .await?
            .into_iter()
            .collect();
    manifests.sort_by(|a, b| a.0.cmp(&b.0));
    let now = chrono::Utc::now();
    let mut deleted = Vec::new();
    for (_, newer) in &manifests {
        let at = chrono::DateTime::parse_from_rfc3339(&newer.created_at).map_err(|e| {
            ArchiveError::Manifest {
                object: newer.run_id.clone(),
                detail: e.to_string(),
            }
        })?;
        if now.signed_duration_since(at) < grace {
            continue;
        }
        for old_path in &newer.supersedes {
            let Some((_, old)) = manifests.iter().find(|(p, _)| p == old_path) else {
                continue;
            };
            for f in old.files.iter().chain(&old.tombstones) {
                for object in [f.path.clone(), crate::keys::key_material_path(&f.path)] {
                    match store.delete(&Path::from(object.as_str())).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted.push(object),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            store.delete(&Path::from(old_path.as_str())).await?;
            deleted.push(old_path.clone());
        }
    }
    if orphans {
        let named: std::collections::HashSet<&str> = manifests
            .iter()
            .flat_map(|(_, m)| m.files.iter().chain(&m.tombstones).map(|f| f.path.as_str()))
            .collect();
        let mut listed: Vec<_> = store
            .list(Some(&Path::from("tables")))
            .try_collect()
            .await?;
        let tombstones: Vec<_> = store
            .list(Some(&Path::from("tombstones")))
            .try_collect()
            .await?;
        listed.extend(tombstones);
        for meta in listed {
            let path = meta.location.to_string();
            let data = crate::keys::data_file_of(&path);
            if named.contains(data.as_str())
                || now.signed_duration_since(meta.last_modified) < grace
            {
                continue;
            }
            match store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted.push(path),
                Err(e) => return Err(e.into()),
            }
        }
        let gone: std::collections::HashSet<&str> = deleted.iter().map(String::as_str).collect();
        let alive: Vec<&TableManifest> = manifests
            .iter()
            .filter(|(path, _)| !gone.contains(path.as_str()))
            .map(|(_, m)| m)
            .collect();
        if blobs {
            deleted.extend(crate::blob_gc::sweep_blobs(&store, &keys, &alive, grace, now).await?);
        }
    }
    Ok(deleted)
}

/// The layout a rewrite writes: the newest file's columns (files an older version wrote are
/// brought to their types), then every column only older files have, in the order they come
/// (a column the operational table dropped since, or the source had): no column is ever left
/// out, and a column some file lacks is nullable.
async fn merged_schema(
    reader: &ArchiveReader,
    inputs: &[SortedInput],
) -> Result<arrow::datatypes::SchemaRef> {
    let mut schemas = Vec::new();
    for file in inputs.iter().rev().flat_map(|i| i.files.iter().rev()) {
        schemas.push(reader.file_schema(file).await?);
    }
    let mut fields: Vec<arrow::datatypes::Field> = Vec::new();
    for schema in &schemas {
        for f in schema.fields() {
            if !fields.iter().any(|known| known.name() == f.name()) {
                fields.push(f.as_ref().clone());
            }
        }
    }
    let fields = fields.into_iter().map(|f| {
        let everywhere = schemas.iter().all(|s| s.field_with_name(f.name()).is_ok());
        if everywhere {
            f
        } else {
            f.with_nullable(true)
        }
    });
    let newest = &schemas[0];
    Ok(Arc::new(arrow::datatypes::Schema::new_with_metadata(
        fields.collect::<Vec<_>>(),
        newest.metadata().clone(),
    )))
}

/// `batch` in `schema`'s layout: its columns by name, cast where a later format changed a
/// column's type (numerics older files kept as text are decimals now), NULL where it lacks a
/// column. A value that does not convert fails the compaction instead of becoming NULL.
pub(crate) fn conform(
    batch: &RecordBatch,
    schema: &arrow::datatypes::SchemaRef,
) -> Result<RecordBatch> {
    if batch.schema_ref() == schema {
        return Ok(batch.clone());
    }
    let options = arrow::compute::CastOptions {
        safe: false,
        ..Default::default()
    };
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => arrow::compute::cast_with_options(c, f.data_type(), &options),
            None => Ok(arrow::array::new_null_array(
                f.data_type(),
                batch.num_rows(),
            )),
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, AsArray, Date32Array, Int64Array, StringArray};
    use arrow::datatypes::{Int64Type, Schema};

    /// A keyless table's rows: (patient, record key, value). Identical rows share their key.
    fn rows(schema: &Arc<Schema>, rows: &[(&str, &str, i64)]) -> RecordBatch {
        let n = rows.len();
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Date32Array::from(vec![Some(10_000); n])),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
        ];
        RecordBatch::try_new(schema.clone(), cols).unwrap()
    }

    async fn publish(
        store: &Arc<dyn ObjectStore>,
        keys: &KeyRing,
        schema: &Arc<Schema>,
        writer_id: &str,
        batch: RecordBatch,
    ) -> TableManifest {
        let mut w = TableWriter::new(
            store.clone(),
            keys.clone(),
            TableManifest::new("supplies", writer_id, "p1", vec![]),
            schema.clone(),
            TableWriterOptions::default(),
        )
        .unwrap();
        w.write(&batch).await.unwrap();
        w.finish().await.unwrap()
    }

    /// One patient's rows as sorted (key, value) pairs.
    async fn read(
        store: &Arc<dyn ObjectStore>,
        keys: &KeyRing,
        patient: &str,
    ) -> Vec<(String, i64)> {
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let mut out: Vec<(String, i64)> = Vec::new();
        for b in reader.patient_rows("supplies", patient).await.unwrap() {
            let k = b.column(2).as_string::<i32>();
            let v = b.column(3).as_primitive::<Int64Type>();
            out.extend((0..b.num_rows()).map(|i| (k.value(i).to_string(), v.value(i))));
        }
        out.sort();
        out
    }

    /// Files written before numerics were archived as decimals (as text) compact with newer
    /// ones into the newer layout, every value kept; a value that would not convert stops the
    /// compaction rather than becoming NULL.
    #[tokio::test]
    async fn older_text_numerics_compact_into_decimals_without_losing_a_value() {
        use crate::layout::{table_schema, ArchivedBatch, ArchivedColumn, Cell, ValueType};
        let (store, keys, _) = crate::test_support::test_archive("quantity").await;
        let layout = |value| {
            table_schema(&[ArchivedColumn {
                name: "amount".into(),
                value: Some(value),
            }])
        };
        let (old, new) = (
            layout(ValueType::Text),
            layout(ValueType::Decimal {
                precision: 10,
                scale: 2,
            }),
        );
        let batch = |schema: &Arc<Schema>, key: &str, amount: ArrayRef| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(vec!["a"])),
                    Arc::new(Date32Array::from(vec![Some(10_000)])),
                    Arc::new(StringArray::from(vec![key])),
                    amount,
                ],
            )
            .unwrap()
        };
        let text = |t: &str| Arc::new(StringArray::from(vec![t])) as ArrayRef;
        publish(
            &store,
            &keys,
            &old,
            "run-1-r00000-0a01",
            batch(&old, "k1", text("136.00")),
        )
        .await;
        let decimal = arrow::array::Decimal128Array::from(vec![750])
            .with_precision_and_scale(10, 2)
            .unwrap();
        publish(
            &store,
            &keys,
            &new,
            "run-2-r00000-0b01",
            batch(&new, "k2", Arc::new(decimal)),
        )
        .await;
        compact_table(
            store.clone(),
            keys.clone(),
            "supplies",
            TableWriterOptions::default(),
        )
        .await
        .unwrap();
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let mut amounts = Vec::new();
        for b in reader.patient_rows("supplies", "a").await.unwrap() {
            assert_eq!(
                b.schema().field_with_name("amount").unwrap().data_type(),
                &arrow::datatypes::DataType::Decimal128(10, 2)
            );
            let b = ArchivedBatch::new(&b, &[]);
            amounts.extend((0..b.num_rows()).map(|r| {
                b.value("amount", r)
                    .unwrap()
                    .to_text()
                    .unwrap()
                    .into_owned()
            }));
        }
        assert_eq!(amounts, ["136.00", "7.50"]);
        assert!(matches!(
            ArchivedBatch::new(
                &batch(
                    &new,
                    "k3",
                    Arc::new(
                        arrow::array::Decimal128Array::from(vec![1])
                            .with_precision_and_scale(10, 2)
                            .unwrap()
                    )
                ),
                &[]
            )
            .value("amount", 0),
            Some(Cell::Decimal { units: 1, scale: 2 })
        ));
        // "NaN" has no DECIMAL: compacting it into one fails, and loses nothing.
        publish(
            &store,
            &keys,
            &old,
            "run-3-r00000-0c01",
            batch(&old, "k4", text("NaN")),
        )
        .await;
        publish(
            &store,
            &keys,
            &new,
            "run-4-r00000-0d01",
            batch(
                &new,
                "k5",
                Arc::new(
                    arrow::array::Decimal128Array::from(vec![1])
                        .with_precision_and_scale(10, 2)
                        .unwrap(),
                ),
            ),
        )
        .await;
        assert!(compact_table(
            store.clone(),
            keys.clone(),
            "supplies",
            TableWriterOptions::default()
        )
        .await
        .is_err());
    }

    #[tokio::test]
    async fn identical_rows_survive_corrections_compaction_and_gc() {
        let (store, keys, schema) = crate::test_support::test_archive("quantity").await;
        let compact = || {
            compact_table(
                store.clone(),
                keys.clone(),
                "supplies",
                TableWriterOptions::default(),
            )
        };
        // Run 1 archives three identical deliveries (two in one range, one in another) and two
        // other records; run 2 corrects record "e".
        let run1 = [("a", "d", 1), ("a", "d", 1), ("a", "e", 2), ("b", "f", 3)];
        publish(
            &store,
            &keys,
            &schema,
            "run-1-r00000-0a01",
            rows(&schema, &run1),
        )
        .await;
        publish(
            &store,
            &keys,
            &schema,
            "run-1-r00001-0a02",
            rows(&schema, &[("a", "d", 1)]),
        )
        .await;
        publish(
            &store,
            &keys,
            &schema,
            "run-2-r00000-0b01",
            rows(&schema, &[("a", "e", 20)]),
        )
        .await;
        let expected_a = vec![
            ("d".to_string(), 1),
            ("d".to_string(), 1),
            ("d".to_string(), 1),
            ("e".to_string(), 20),
        ];
        assert_eq!(
            read(&store, &keys, "a").await,
            expected_a,
            "before compaction"
        );

        let r = compact().await.unwrap();
        assert_eq!(
            (r.rows_before, r.rows_after),
            (6, 5),
            "only the corrected copy goes: {r:?}"
        );
        assert_eq!(
            read(&store, &keys, "a").await,
            expected_a,
            "after compaction"
        );

        // A correction of "f" after the compaction supersedes the compacted copy only.
        publish(
            &store,
            &keys,
            &schema,
            "run-3-r00000-0c01",
            rows(&schema, &[("b", "f", 30)]),
        )
        .await;
        assert_eq!(read(&store, &keys, "b").await, vec![("f".to_string(), 30)]);
        let r = compact().await.unwrap();
        assert_eq!((r.rows_before, r.rows_after), (6, 5));
        // A file an interrupted attempt left, which no manifest names.
        let orphan = Path::from("tables/supplies/run-9-r00000-0f0f-000.parquet");
        store.put(&orphan, b"PAR1".to_vec().into()).await.unwrap();
        let superseded = gc(store.clone(), keys.clone(), chrono::Duration::zero(), false)
            .await
            .unwrap();
        assert!(!superseded.is_empty());
        assert!(
            !superseded.contains(&orphan.to_string()),
            "kept while a run may be writing it"
        );
        let deleted = gc(store.clone(), keys.clone(), chrono::Duration::zero(), true)
            .await
            .unwrap();
        assert_eq!(deleted, vec![orphan.to_string()]);
        assert_eq!(read(&store, &keys, "a").await, expected_a, "after gc");
        assert_eq!(read(&store, &keys, "b").await, vec![("f".to_string(), 30)]);

        // The last compaction accounts for every row the runs archived, after gc too.
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let live = &reader.catalog().tables["supplies"];
        assert_eq!(live.len(), 1);
        let m = &live[0];
        let replaced: Vec<(&str, u64)> = m
            .replaced_rows
            .iter()
            .map(|(p, n)| (p.as_str(), *n))
            .collect();
        assert_eq!(
            replaced,
            vec![
                ("manifests/supplies/run-1-r00000-0a01.json", 4),
                ("manifests/supplies/run-1-r00001-0a02.json", 1),
                ("manifests/supplies/run-2-r00000-0b01.json", 1),
                ("manifests/supplies/run-3-r00000-0c01.json", 1),
            ]
        );
        assert_eq!(m.superseded_copies, 2);
        assert_eq!(m.rows(), 7 - 2);
        assert_eq!(
            m.supersedes.len(),
            5,
            "four run manifests and the first compaction"
        );
    }

    /// Tombstones hide the copies of earlier runs (a held one hides nothing), a truncate
    /// hides every earlier copy; compaction applies them (counting what it left out), keeps
    /// the held deletions on record, and gc removes the tombstone files it replaced.
    #[tokio::test]
    async fn tombstones_and_truncates_delete_earlier_copies_through_compaction() {
        let (store, keys, schema) = crate::test_support::test_archive("quantity").await;
        publish(
            &store,
            &keys,
            &schema,
            "run-1-r00000-0a01",
            rows(
                &schema,
                &[("a", "d", 1), ("a", "e", 2), ("a", "g", 4), ("b", "f", 3)],
            ),
        )
        .await;
        let tomb = |patient: &str, key: &str, held| crate::Tombstone {
            patient: patient.into(),
            date: None,
            key: key.into(),
            held,
        };
        // A sync run corrects "d", deletes "e" (its patient unknown), and records the deletion
        // of "g" that a legal hold stopped.
        let mut w = TableWriter::new(
            store.clone(),
            keys.clone(),
            TableManifest::new("supplies", "sync-run-1-0000000001", "p1", vec![]),
            schema.clone(),
            TableWriterOptions::default(),
        )
        .unwrap();
        w.write(&rows(&schema, &[("a", "d", 10)])).await.unwrap();
        w.write_tombstones(&[tomb("", "e", false), tomb("a", "g", true)])
            .await
            .unwrap();
        w.finish().await.unwrap();
        let expected_a = vec![("d".to_string(), 10), ("g".to_string(), 4)];
        assert_eq!(read(&store, &keys, "a").await, expected_a);
        assert_eq!(read(&store, &keys, "b").await, vec![("f".to_string(), 3)]);
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let successors = reader.successors("supplies").await.unwrap();
        assert_eq!(successors.fate(0, "d"), crate::Fate::Superseded);
        assert_eq!(successors.fate(0, "e"), crate::Fate::Deleted);
        assert_eq!(successors.fate(0, "g"), crate::Fate::Held);
        assert_eq!(successors.fate(1, "d"), crate::Fate::Current);
        let checked = reader.verify().await.unwrap();
        assert!(
            checked.problems.is_empty() && checked.unpublished.is_empty(),
            "{checked:?}"
        );
        assert_eq!(checked.files, 3, "two data files and a tombstone file");

        let r = compact_table(
            store.clone(),
            keys.clone(),
            "supplies",
            TableWriterOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!((r.rows_before, r.rows_after), (5, 3), "{r:?}");
        assert_eq!(
            read(&store, &keys, "a").await,
            expected_a,
            "after compaction"
        );
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let m = &reader.catalog().tables["supplies"][0];
        assert_eq!(
            m.superseded_copies, 2,
            "the corrected copy and the deleted one"
        );
        assert_eq!(m.tombstones.len(), 1, "the held deletion stays on record");
        let held = reader.tombstones(&m.tombstones[0]).await.unwrap();
        assert_eq!(*held, vec![tomb("a", "g", true)]);
        let deleted = gc(store.clone(), keys.clone(), chrono::Duration::zero(), true)
            .await
            .unwrap();
        assert!(
            deleted
                .iter()
                .any(|p| p.starts_with("tombstones/supplies/sync-run-1")),
            "{deleted:?}"
        );
        assert_eq!(read(&store, &keys, "a").await, expected_a, "after gc");

        // A truncate hides every earlier copy; rows after it in the same run stay.
        let mut manifest = TableManifest::new("supplies", "sync-run-1-0000000002", "p1", vec![]);
        manifest.truncated = true;
        let mut w = TableWriter::new(
            store.clone(),
            keys.clone(),
            manifest,
            schema.clone(),
            TableWriterOptions::default(),
        )
        .unwrap();
        w.write(&rows(&schema, &[("b", "h", 5)])).await.unwrap();
        w.finish().await.unwrap();
        assert_eq!(read(&store, &keys, "a").await, vec![]);
        assert_eq!(read(&store, &keys, "b").await, vec![("h".to_string(), 5)]);
    }

    /// Every row of the table's current files, in file order: (patient, key, value).
    async fn scan(store: &Arc<dyn ObjectStore>, keys: &KeyRing) -> Vec<(String, String, i64)> {
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let mut out = Vec::new();
        for m in &reader.catalog().tables["supplies"] {
            for f in &m.files {
                for b in reader.read_file(f).await.unwrap() {
                    let p = b.column(0).as_string::<i32>();
                    let k = b.column(2).as_string::<i32>();
                    let v = b.column(3).as_primitive::<Int64Type>();
                    out.extend(
                        (0..b.num_rows())
                            .map(|i| (p.value(i).to_string(), k.value(i).to_string(), v.value(i))),
                    );
                }
            }
        }
        out
    }

    /// More files than a pass opens: merged in passes (intermediate files deleted once the
    /// compaction is published), into one sequence sorted by patient; a correction in a late
    /// run supersedes a copy read in another group of the first pass; identical rows of one
    /// run all stay.
    #[tokio::test]
    async fn many_files_compact_in_passes_into_one_sorted_sequence() {
        let (store, keys, schema) = crate::test_support::test_archive("quantity").await;
        let runs = 2 * MERGE_FAN_IN + 3;
        let mut expected = Vec::new();
        for run in 0..runs {
            // Each run archives two patients' records, interleaved with other runs' patients.
            let mut rows_of_run = vec![
                (format!("p{:03}", run % 7), format!("k{run:03}"), run as i64),
                (format!("p{:03}", 50 + run % 5), format!("m{run:03}"), 1),
            ];
            if run == 3 {
                // Identical rows of one run: two records.
                rows_of_run.push(rows_of_run[1].clone());
            }
            if run == runs - 1 {
                // A correction of run 0's first record.
                rows_of_run.push(("p000".into(), "k000".into(), -1));
            }
            rows_of_run.sort();
            let batch: Vec<(&str, &str, i64)> = rows_of_run
                .iter()
                .map(|(p, k, v)| (p.as_str(), k.as_str(), *v))
                .collect();
            publish(
                &store,
                &keys,
                &schema,
                &format!("run-{run:03}-r00000-0a01"),
                rows(&schema, &batch),
            )
            .await;
            expected.extend(rows_of_run);
        }
        expected.retain(|r| r != &("p000".to_string(), "k000".to_string(), 0));
        expected.sort();
        let r = compact_table(
            store.clone(),
            keys.clone(),
            "supplies",
            TableWriterOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(r.files_before, runs);
        assert_eq!(
            (r.rows_before, r.rows_after),
            (expected.len() as u64 + 1, expected.len() as u64),
            "{r:?}"
        );
        // One sequence, sorted as the archive orders rows (the dates are all equal here).
        assert_eq!(scan(&store, &keys).await, expected);
        assert_eq!(
            read(&store, &keys, "p000").await.first(),
            Some(&("k000".to_string(), -1))
        );
        let listed: Vec<String> = store
            .list(Some(&Path::from("tables/supplies")))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        assert!(
            !listed.iter().any(|p| p.contains("-pass")),
            "intermediate files are deleted: {listed:?}"
        );
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let checked = reader.verify().await.unwrap();
        assert!(checked.problems.is_empty(), "{checked:?}");
    }

    /// A table whose every archived record the source deleted compacts into a manifest
    /// without files that replaces the old ones and still accounts for their rows.
    #[tokio::test]
    async fn a_table_whose_every_record_was_deleted_compacts_into_an_empty_manifest() {
        let (store, keys, schema) = crate::test_support::test_archive("quantity").await;
        publish(
            &store,
            &keys,
            &schema,
            "run-1-r00000-0a01",
            rows(&schema, &[("a", "d", 1), ("b", "e", 2)]),
        )
        .await;
        let tomb = |key: &str| crate::Tombstone {
            patient: String::new(),
            date: None,
            key: key.into(),
            held: false,
        };
        let mut w = TableWriter::new(
            store.clone(),
            keys.clone(),
            TableManifest::new("supplies", "sync-run-1-0000000001", "p1", vec![]),
            schema.clone(),
            TableWriterOptions::default(),
        )
        .unwrap();
        w.write_tombstones(&[tomb("d"), tomb("e")]).await.unwrap();
        w.finish().await.unwrap();
        let r = compact_table(
            store.clone(),
            keys.clone(),
            "supplies",
            TableWriterOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!((r.rows_before, r.rows_after, r.files_after), (2, 0, 0));
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let live = &reader.catalog().tables["supplies"];
        assert_eq!(live.len(), 1, "the compaction replaces both manifests");
        assert_eq!(live[0].supersedes.len(), 2);
        assert_eq!(live[0].superseded_copies, 2);
        assert_eq!(read(&store, &keys, "a").await, vec![]);
    }

    /// A file whose rows are not in the archive's order stops the compaction, naming it;
    /// nothing is published.
    #[tokio::test]
    async fn rows_out_of_order_stop_the_compaction() {
        let (store, keys, schema) = crate::test_support::test_archive("quantity").await;
        let m = publish(
            &store,
            &keys,
            &schema,
            "run-1-r00000-0a01",
            rows(&schema, &[("b", "d", 1), ("a", "e", 2)]),
        )
        .await;
        let err = compact_table(
            store.clone(),
            keys.clone(),
            "supplies",
            TableWriterOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, ArchiveError::Integrity { object, .. } if object == &m.files[0].path),
            "{err}"
        );
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        assert_eq!(reader.catalog().tables["supplies"].len(), 1);
    }

    /// A rewrite for retention leaves out the current copies of the records it destroys,
    /// telling the destroyer of each (a corrected record's superseded copy is not told: it is
    /// superseded, not destroyed); the manifest accounts for both.
    #[tokio::test]
    async fn a_rewrite_for_retention_destroys_the_records_it_names() {
        struct Named {
            keys: Vec<&'static str>,
            told: Vec<(String, i64)>,
        }
        impl Destroyer for Named {
            fn destroy(&mut self, batch: &RecordBatch, row: usize) -> bool {
                let k = batch.column(2).as_string::<i32>().value(row).to_string();
                if !self.keys.contains(&k.as_str()) {
                    return false;
                }
                let v = batch.column(3).as_primitive::<Int64Type>().value(row);
                self.told.push((k, v));
                true
            }
            fn record(&self) -> (String, serde_json::Value) {
                (
                    "destroy-1".into(),
                    serde_json::json!({ "rows": self.told.len() }),
                )
            }
        }
        let (store, keys, schema) = crate::test_support::test_archive("quantity").await;
        publish(
            &store,
            &keys,
            &schema,
            "run-1-r00000-0a01",
            rows(&schema, &[("a", "d", 1), ("a", "e", 2), ("b", "f", 3)]),
        )
        .await;
        publish(
            &store,
            &keys,
            &schema,
            "run-2-r00000-0b01",
            rows(&schema, &[("a", "e", 20)]),
        )
        .await;
        let mut named = Named {
            keys: vec!["e", "f"],
            told: Vec::new(),
        };
        let r = rewrite_table(
            store.clone(),
            keys.clone(),
            "supplies",
            TableWriterOptions::default(),
            Some(&mut named),
        )
        .await
        .unwrap();
        assert_eq!((r.rows_before, r.rows_after, r.destroyed), (4, 1, 2));
        named.told.sort();
        assert_eq!(named.told, [("e".to_string(), 20), ("f".to_string(), 3)]);
        assert_eq!(read(&store, &keys, "a").await, [("d".to_string(), 1)]);
        assert_eq!(read(&store, &keys, "b").await, []);
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let m = &reader.catalog().tables["supplies"][0];
        assert_eq!((m.superseded_copies, m.destroyed_copies), (1, 2));
        assert_eq!(m.rows() + 1 + 2, m.replaced_rows.values().sum::<u64>());
        // Compacted again, the accounting carries over.
        compact_table(
            store.clone(),
            keys.clone(),
            "supplies",
            TableWriterOptions::default(),
        )
        .await
        .unwrap();
        let reader = ArchiveReader::open(store.clone(), keys.clone())
            .await
            .unwrap();
        let m = &reader.catalog().tables["supplies"][0];
        assert_eq!(
            (m.superseded_copies, m.destroyed_copies, m.rows()),
            (1, 2, 1)
        );
        assert_eq!(
            m.destructions.get("destroy-1"),
            Some(&serde_json::json!({ "rows": 2 })),
            "the destruction's record stays with the table through compaction"
        );
    }
}
