//! Deleting BLOB objects no record refers to any more (records destroyed past retention, or
//! corrected to other content), as part of `gc`. BLOBs are stored once per content and shared:
//! an object is referenced while any row of any manifest still in the archive names it (a
//! held record's, a retained record's, a superseded manifest's within its grace period).
//!
//! Mark, then sweep: an object found unreferenced is first marked (with the time, in
//! `gc/unreferenced-blobs.json`, sealed like a manifest); a later `gc` deletes it once it has
//! stayed unreferenced for the grace period. Content seen again is stored by reusing the
//! existing object, so a run may reference an object again at any time; the grace period
//! between mark and sweep leaves such a run time to publish its manifest, which unmarks the
//! object. Memory: the set of referenced object ids.

use crate::error::{ArchiveError, Result};
use crate::keys::KeyRing;
use crate::manifest::TableManifest;
use crate::reader::ArchiveReader;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Where the marks are kept.
const MARKS: &str = "gc/unreferenced-blobs.json";

/// The marked objects: id → when first found unreferenced (RFC 3339), sealed.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Marks {
    unreferenced_since: BTreeMap<String, String>,
    #[serde(default)]
    mac: String,
}

impl Marks {
    fn mac(&self, keys: &KeyRing) -> Result<String> {
        use hmac::{Hmac, Mac};
        let key = keys.derive("strata unreferenced blobs v1")?;
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("any key length");
        mac.update(&serde_json::to_vec(&self.unreferenced_since).expect("marks serialize"));
        Ok(hex::encode(mac.finalize().into_bytes()))
    }
}

/// Deletes the BLOB objects no row of `alive` (every manifest left in the archive) refers to
/// that were marked unreferenced at least `grace` ago; marks those newly unreferenced, and
/// unmarks those referenced again. Also deletes temporary uploads (`blobs/tmp/`) older than
/// `grace`. Returns the objects deleted.
pub(crate) async fn sweep_blobs(
    store: &Arc<dyn ObjectStore>,
    keys: &KeyRing,
    alive: &[&TableManifest],
    grace: chrono::Duration,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<String>> {
    // (The manifests are `gc`'s: the files are read without loading the catalog again.)
    let reader = ArchiveReader::without_catalog(store.clone(), keys.clone());
    let mut referenced: HashSet<String> = HashSet::new();
    for m in alive.iter().filter(|m| !m.blob_columns.is_empty()) {
        let columns: Vec<String> = m
            .blob_columns
            .iter()
            .map(|b| format!("{b}{}", crate::BLOB_REF_SUFFIXES[0]))
            .collect();
        for entry in &m.files {
            let mut batches = reader.file_batches(entry, Some(&columns)).await?;
            while let Some(batch) = batches.next().await {
                let batch = batch?;
                for column in &columns {
                    let Some(objects) = batch.column_by_name(column) else {
                        continue;
                    };
                    let objects = arrow::array::AsArray::as_string::<i32>(objects);
                    referenced.extend(objects.iter().flatten().map(str::to_string));
                }
            }
        }
    }
    let mut marks = read_marks(store.as_ref(), keys).await?;
    let listed: Vec<_> = store.list(Some(&Path::from("blobs"))).try_collect().await?;
    let mut deleted = Vec::new();
    let mut seen = HashSet::new();
    let old = |at: chrono::DateTime<chrono::Utc>| now.signed_duration_since(at) >= grace;
    for meta in listed {
        let path = meta.location.to_string();
        let Some(rest) = path.strip_prefix("blobs/") else {
            continue;
        };
        if rest.starts_with("tmp/") {
            // An upload a crash interrupted: never referenced.
            if old(meta.last_modified) {
                delete(store.as_ref(), &path).await?;
                deleted.push(path);
            }
            continue;
        }
        let Some(object) = rest.split('/').nth(1) else {
            continue;
        };
        seen.insert(object.to_string());
        if referenced.contains(object) {
            marks.unreferenced_since.remove(object);
            continue;
        }
        let since = match marks.unreferenced_since.get(object) {
            Some(since) => chrono::DateTime::parse_from_rfc3339(since)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|e| ArchiveError::Manifest {
                    object: MARKS.into(),
                    detail: e.to_string(),
                })?,
            None => {
                marks
                    .unreferenced_since
                    .insert(object.to_string(), now.to_rfc3339());
                continue;
            }
        };
        if old(since) && old(meta.last_modified) {
            delete(store.as_ref(), &path).await?;
            marks.unreferenced_since.remove(object);
            deleted.push(path);
        }
    }
    // Marks of objects gone (deleted by an earlier gc a crash interrupted) go too.
    marks
        .unreferenced_since
        .retain(|object, _| seen.contains(object));
    marks.mac = marks.mac(keys)?;
    let json = serde_json::to_vec_pretty(&marks).expect("marks serialize");
    store
        .put(&Path::from(MARKS), PutPayload::from(json))
        .await?;
    Ok(deleted)
}

async fn read_marks(store: &dyn ObjectStore, keys: &KeyRing) -> Result<Marks> {
    let bytes = match store.get(&Path::from(MARKS)).await {
        Ok(got) => got.bytes().await?,
        Err(object_store::Error::NotFound { .. }) => return Ok(Marks::default()),
        Err(e) => return Err(e.into()),
    };
    let marks: Marks = serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Manifest {
        object: MARKS.into(),
        detail: e.to_string(),
    })?;
    if marks.mac(keys)? != marks.mac {
        return Err(ArchiveError::Integrity {
            object: MARKS.into(),
            detail: "the marks of unreferenced BLOBs were modified (their seal does not match): gc deletes no BLOB; remove the file to start marking again".into(),
        });
    }
    Ok(marks)
}

async fn delete(store: &dyn ObjectStore, path: &str) -> Result<()> {
    match store.delete(&Path::from(path)).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use crate::compact::{gc, rewrite_table, Destroyer};
    use crate::{BlobStore, TableManifest, TableWriter, TableWriterOptions};
    use arrow::array::{ArrayRef, Date32Array, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    struct Named(Vec<&'static str>);
    impl Destroyer for Named {
        fn destroy(&mut self, batch: &RecordBatch, row: usize) -> bool {
            use arrow::array::AsArray;
            self.0
                .contains(&batch.column(2).as_string::<i32>().value(row))
        }
        fn record(&self) -> (String, serde_json::Value) {
            ("destroy-1".into(), serde_json::Value::Null)
        }
    }

    /// Records sharing one BLOB (stored once): destroying one of them leaves the BLOB to the
    /// other (here the record a hold kept); a BLOB only destroyed records referred to is
    /// marked by the first gc and deleted by the next once the grace period has passed.
    #[tokio::test]
    async fn a_blob_goes_only_when_no_record_refers_to_it() {
        let (store, keys, _) = crate::test_support::test_archive("unused").await;
        let blobs = BlobStore::new(store.clone(), keys.clone());
        let shared = blobs
            .put(b"shared image".to_vec(), "image/png")
            .await
            .unwrap();
        let alone = blobs
            .put(b"only one's image".to_vec(), "image/png")
            .await
            .unwrap();
        let kept = blobs
            .put(b"kept image".to_vec(), "image/png")
            .await
            .unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new(crate::PATIENT_COLUMN, DataType::Utf8, false),
            Field::new(crate::RECORD_DATE_COLUMN, DataType::Date32, true),
            Field::new(crate::KEY_COLUMN, DataType::Utf8, false),
            Field::new("scan__object", DataType::Utf8, true),
            Field::new("scan__length", DataType::Int64, true),
            Field::new("scan__sha256", DataType::Utf8, true),
            Field::new("scan__content_type", DataType::Utf8, true),
        ]));
        // (patient, key, blob): r1 held, r2 and r3 destroyed, r4 kept.
        let rows = [
            ("a", "r1", &shared),
            ("a", "r2", &shared),
            ("a", "r3", &alone),
            ("b", "r4", &kept),
        ];
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Date32Array::from(vec![Some(10_000); rows.len()])),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.2.object.clone()),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.2.length as i64),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.2.sha256.clone()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.2.content_type.clone()),
            )),
        ];
        let mut w = TableWriter::new(
            store.clone(),
            keys.clone(),
            TableManifest::new("scans", "run-1-r00000-0a01", "p1", vec!["scan".into()]),
            schema.clone(),
            TableWriterOptions::default(),
        )
        .unwrap();
        w.write(&RecordBatch::try_new(schema, cols).unwrap())
            .await
            .unwrap();
        w.finish().await.unwrap();
        let gc = || gc(store.clone(), keys.clone(), chrono::Duration::zero(), true);
        assert!(gc().await.unwrap().iter().all(|p| !p.starts_with("blobs/")));
        rewrite_table(
            store.clone(),
            keys.clone(),
            "scans",
            TableWriterOptions::default(),
            Some(&mut Named(vec!["r2", "r3"])),
        )
        .await
        .unwrap();
        // The first gc deletes the replaced file and marks the BLOB no record refers to now.
        let first = gc().await.unwrap();
        assert!(
            first.iter().any(|p| p.starts_with("tables/scans/run-1")),
            "{first:?}"
        );
        assert!(first.iter().all(|p| !p.starts_with("blobs/")), "{first:?}");
        blobs.get(&alone).await.unwrap();
        // The next one deletes it; the shared and the kept BLOBs stay.
        let second = gc().await.unwrap();
        assert_eq!(second, vec![BlobStore::object_path(&alone.object)]);
        assert!(blobs.get(&alone).await.is_err());
        assert_eq!(&blobs.get(&shared).await.unwrap()[..], b"shared image");
        assert_eq!(&blobs.get(&kept).await.unwrap()[..], b"kept image");
        // The marks are sealed: edited, gc deletes no BLOB.
        let path = object_store::path::Path::from(super::MARKS);
        let text = String::from_utf8(
            object_store::ObjectStoreExt::get(store.as_ref(), &path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        let forged = text.replace("\"mac\": \"", "\"mac\": \"00");
        object_store::ObjectStoreExt::put(store.as_ref(), &path, forged.into_bytes().into())
            .await
            .unwrap();
        assert!(matches!(
            gc().await.unwrap_err(),
            crate::ArchiveError::Integrity { .. }
        ));
    }
}
