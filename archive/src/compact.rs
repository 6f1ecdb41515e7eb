//! Compaction and garbage collection.
//!
//! `compact` rewrites all of a table's current files (applying corrections: the newest copy of
//! each record wins) into new large files sorted by patient key, and publishes one manifest that
//! supersedes the old ones; that single write is the catalog switch. Nothing is deleted then:
//! `gc` deletes files and manifests that a newer manifest superseded more than a grace period
//! ago, so readers that opened the old catalog can finish.

use crate::error::{ArchiveError, Result};
use crate::keys::KeyRing;
use crate::manifest::TableManifest;
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
    /// Rows before (all copies) and after (newest copy of each record).
    pub rows_before: u64,
    /// Rows after.
    pub rows_after: u64,
}

/// Compacts one table. The table's rows are held in memory while they are sorted: compact
/// tables whose archived part fits (a streaming merge is future work).
pub async fn compact_table(
    store: Arc<dyn ObjectStore>,
    keys: KeyRing,
    table: &str,
    options: TableWriterOptions,
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
    let mut batches: Vec<RecordBatch> = Vec::new();
    for entry in manifests.iter().flat_map(|m| &m.files) {
        report.files_before += 1;
        batches.extend(reader.read_file(entry).await?);
    }
    report.rows_before = batches.iter().map(|b| b.num_rows() as u64).sum();
    let batches = crate::reader::newest_only(batches)?;
    let Some(schema) = batches.first().map(|b| b.schema()) else {
        return Ok(report);
    };
    let run_id = format!(
        "compact-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.6fZ")
    );
    let mut manifest = TableManifest::new(
        table,
        &run_id,
        &last.policy_version,
        last.blob_columns.clone(),
    );
    manifest.supersedes = manifests
        .iter()
        .map(|m| TableManifest::path(&m.table, &m.run_id))
        .collect();
    let mut writer = TableWriter::new(store, keys, manifest, schema, options)?;
    writer.write_in_order(&batches).await?;
    report.rows_after = writer.rows();
    let published = writer.finish().await?;
    report.files_after = published.files.len();
    Ok(report)
}

/// Deletes manifests that another manifest superseded at least `grace` ago, with their files and
/// key material. Returns the objects deleted.
pub async fn gc(
    store: Arc<dyn ObjectStore>,
    keys: KeyRing,
    grace: chrono::Duration,
) -> Result<Vec<String>> {
    let keys = keys.for_archive(store.as_ref(), false).await?;
    let metas: Vec<_> = store
        .list(Some(&Path::from("manifests")))
        .try_collect()
        .await?;
    let mut manifests = Vec::new();
    for meta in metas {
        let path = meta.location.to_string();
        let bytes = store.get(&meta.location).await?.bytes().await?;
        let m: TableManifest =
            serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Manifest {
                object: path.clone(),
                detail: e.to_string(),
            })?;
        m.check_seal(&keys, &path)?;
        manifests.push((path, m));
    }
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
            for f in &old.files {
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
    Ok(deleted)
}
