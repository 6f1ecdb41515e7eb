//! Real documents round-trip through encrypted BLOB objects byte for byte, whole and by range:
//! the DICOM files and the FHIR DocumentReference notes in ../shared/data.

use base64::Engine;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use strata_archive::{BlobStore, Kek, KeyRing};

fn shared(path: &str) -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(path);
    assert!(p.exists(), "{} is missing", p.display());
    p
}

/// (name, content type, bytes) of every DICOM file and every FHIR DocumentReference attachment.
pub fn real_documents() -> Vec<(String, String, Vec<u8>)> {
    let mut docs = Vec::new();
    let mut dicom: Vec<_> = std::fs::read_dir(shared("dicom-samples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    dicom.sort();
    for p in dicom {
        docs.push((
            p.file_name().unwrap().to_string_lossy().to_string(),
            "application/dicom".to_string(),
            std::fs::read(&p).unwrap(),
        ));
    }
    let ndjson =
        std::fs::read_to_string(shared("fhir-documents/DocumentReference.000.ndjson")).unwrap();
    for (i, line) in ndjson.lines().enumerate() {
        let resource: serde_json::Value = serde_json::from_str(line).unwrap();
        for (j, content) in resource["content"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let attachment = &content["attachment"];
            let Some(data) = attachment["data"].as_str() else {
                continue;
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap();
            let ct = attachment["contentType"]
                .as_str()
                .unwrap_or("text/plain")
                .to_string();
            docs.push((format!("DocumentReference line {i} content {j}"), ct, bytes));
        }
    }
    docs
}

/// Stores real documents, reads each back whole and by three ranges (one crossing a segment
/// boundary where the document has one), and compares SHA-256 and bytes. `fhir_stride` keeps
/// every n-th FHIR note (every DICOM file is always kept).
pub async fn round_trip(blobs: &BlobStore, fhir_stride: usize) -> usize {
    let all = real_documents();
    assert!(all.len() > 1200, "{} documents", all.len());
    let docs: Vec<_> = all
        .into_iter()
        .filter(|(name, _, _)| {
            !name.starts_with("DocumentReference")
                || name
                    .split(' ')
                    .nth(2)
                    .and_then(|i| i.parse::<usize>().ok())
                    .is_some_and(|i| i % fhir_stride == 0)
        })
        .collect();
    let seg = strata_archive::BLOB_SEGMENT_SIZE as u64;
    for (name, ct, bytes) in &docs {
        let r = blobs.put(bytes, ct).await.unwrap();
        assert_eq!(r.sha256, hex::encode(Sha256::digest(bytes)), "{name}");
        let whole = blobs.get(&r).await.unwrap();
        assert_eq!(hex::encode(Sha256::digest(&whole)), r.sha256, "{name}");
        let n = bytes.len() as u64;
        let crossing = if n > seg {
            seg - 10..(seg + 10).min(n)
        } else {
            n / 2..n
        };
        for range in [0..n.min(132), n / 3..n, crossing] {
            let part = blobs.get_range(&r, range.clone()).await.unwrap();
            assert_eq!(
                part.as_ref(),
                &bytes[range.start as usize..range.end as usize],
                "{name} {range:?}"
            );
        }
    }
    docs.len()
}

#[tokio::test]
async fn dicom_files_and_fhir_notes_round_trip_on_local_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = strata_archive::open_store(&strata_archive::ArchiveLocation::Local(
        dir.path().to_path_buf(),
    ))
    .unwrap();
    let keys = KeyRing::new(Kek::from_hex("k", &Kek::generate_hex()).unwrap(), [])
        .for_archive(store.as_ref(), true)
        .await
        .unwrap();
    let n = round_trip(&BlobStore::new(Arc::clone(&store), keys), 1).await;
    assert!(n > 1200);
}

/// The test S3 bucket that scripts/test starts, with a fresh prefix.
pub fn s3_location(prefix: &str) -> String {
    let bucket = std::env::var("STRATA_TEST_S3_BUCKET").expect("STRATA_TEST_S3_BUCKET is not set: run the suite with ./scripts/test, which starts an S3 server");
    format!(
        "s3://{bucket}/{prefix}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    )
}

#[tokio::test]
async fn dicom_files_and_fhir_notes_round_trip_on_s3() {
    let location = strata_archive::ArchiveLocation::parse(&s3_location("blobs")).unwrap();
    let store = strata_archive::open_store(&location).unwrap();
    let keys = KeyRing::new(Kek::from_hex("k", &Kek::generate_hex()).unwrap(), [])
        .for_archive(store.as_ref(), true)
        .await
        .unwrap();
    // Every DICOM file and every 25th note: the loopback S3 server answers a request in tens of
    // milliseconds, and each document takes about ten.
    let n = round_trip(&BlobStore::new(store, keys), 25).await;
    assert!(n > 120, "{n}");
}
