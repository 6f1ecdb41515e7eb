//! KEK rotation: re-wraps every data key with the current KEK and re-seals the manifests. Data
//! objects (Parquet files, BLOB segments) are never rewritten: only their small key-material
//! objects are (BLOB data keys derive from the archive key, which is one of them). Rotation is idempotent; until it has finished, keep the old KEK in the ring
//! (`previous_keks`) and run it again if it stopped.

use crate::error::{ArchiveError, Result};
use crate::keys::KeyRing;
use crate::manifest::TableManifest;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::sync::Arc;

/// What a rotation rewrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationReport {
    /// The KEK now wrapping every data key.
    pub kek_id: String,
    /// Parquet key-material objects re-wrapped.
    pub parquet_keys: u64,
    /// Manifests re-sealed.
    pub manifests: u64,
}

/// Re-wraps every data key of the archive with `keys.current()`.
pub async fn rotate_keys(store: Arc<dyn ObjectStore>, keys: &KeyRing) -> Result<RotationReport> {
    let keys = &keys.clone().for_archive(store.as_ref(), false).await?;
    let mut report = RotationReport {
        kek_id: keys.current_kek_id(),
        ..Default::default()
    };
    let objects: Vec<_> = store.list(None).try_collect().await?;
    let key_error = |object: &str, e: ArchiveError| ArchiveError::Integrity {
        object: object.to_string(),
        detail: format!("cannot re-wrap: {e}"),
    };
    for meta in &objects {
        let path = meta.location.to_string();
        let name = path.rsplit('/').next().unwrap_or_default();
        let data = path.starts_with("tables/") || path.starts_with("tombstones/");
        let rewritten = if data && name.starts_with("_KEY_MATERIAL_FOR_") {
            let bytes = store.get(&meta.location).await?.bytes().await?;
            let mut map: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&bytes)
                    .map_err(|e| key_error(&path, ArchiveError::Key(e.to_string())))?;
            for value in map.values_mut() {
                let material = value.as_str().unwrap_or_default();
                *value = keys
                    .rewrap_key_material(material)
                    .map_err(|e| key_error(&path, e))?
                    .into();
            }
            report.parquet_keys += 1;
            serde_json::Value::Object(map).to_string()
        } else if path == crate::keys::ARCHIVE_KEY_PATH {
            let bytes = store.get(&meta.location).await?.bytes().await?;
            keys.rewrap_key_material(&String::from_utf8_lossy(&bytes))
                .map_err(|e| key_error(&path, e))?
        } else {
            continue;
        };
        store
            .put(&meta.location, PutPayload::from(rewritten.into_bytes()))
            .await?;
    }
    for meta in objects
        .iter()
        .filter(|m| m.location.as_ref().starts_with("manifests/"))
    {
        let path = meta.location.to_string();
        let bytes = store.get(&meta.location).await?.bytes().await?;
        let mut manifest: TableManifest =
            serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Manifest {
                object: path.clone(),
                detail: e.to_string(),
            })?;
        manifest.check_seal(keys, &path)?;
        for f in manifest.files.iter_mut().chain(&mut manifest.tombstones) {
            f.kek_id = report.kek_id.clone();
        }
        manifest.seal(keys)?;
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        store.put(&Path::from(path), PutPayload::from(json)).await?;
        report.manifests += 1;
    }
    Ok(report)
}
