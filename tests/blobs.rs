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
        let r = blobs.put(bytes.as_slice(), ct).await.unwrap();
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

/// The peak resident memory (VmHWM) of a running process, in bytes.
fn high_water_mark(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A BLOB far larger than the inline limit is streamed from PostgreSQL in pieces: the
/// migration's peak memory stays below the BLOB's own size, the archived object matches the
/// source byte for byte (whole and by range), and long BLOBs of a row bound for the
/// operational database arrive whole there.
#[tokio::test]
async fn long_blobs_stream_from_postgres_in_pieces() {
    use crate::support::*;
    let dir = TestDir::new();
    let source = create_pg_database("strata_blob_stream_src").await;
    let operational = create_pg_database("strata_blob_stream_op").await;
    const BIG: i64 = 128 << 20;
    let db = strata_ingest::Db::connect(&source, false).await.unwrap();
    db.execute(&format!(
        "CREATE TABLE scans (id bigint PRIMARY KEY, patient_id bigint NOT NULL, taken date, content bytea);
         CREATE TABLE letters (id bigint PRIMARY KEY, patient_id bigint NOT NULL, written date, content bytea);
         -- Incompressible bytes (PostgreSQL stores them uncompressed, as real scans are).
         INSERT INTO scans SELECT 1, 7, DATE '2001-02-03',
           (SELECT string_agg(sha256(int8send(i)), ''::bytea) FROM generate_series(1, {BIG} / 32) i);
         INSERT INTO scans SELECT g, g, DATE '2002-01-01' + g,
           (SELECT string_agg(sha256(int8send(g * 100000 + i)), ''::bytea) FROM generate_series(1, g * 40000) i)
           FROM generate_series(2, 4) g;
         INSERT INTO scans VALUES (5, 5, NULL, ''::bytea), (6, 6, NULL, NULL);
         INSERT INTO letters SELECT g, g, DATE '2026-01-01',
           (SELECT string_agg(sha256(int8send(g * 7 + i)), ''::bytea) FROM generate_series(1, 50000 + g) i)
           FROM generate_series(1, 3) g;"
    ))
    .await
    .unwrap();
    let reader = read_only_url(&source).await;
    write_run_files(
        dir.path(),
        &format!(
            r#"{}
[run]
inline_blob_bytes = 1000000
[tables.scans]
primary_key = ["id"]
patient_key = "patient_id"
record_date = "taken"
blobs = [{{ column = "content", content_type = "application/dicom" }}]
[tables.letters]
primary_key = ["id"]
patient_key = "patient_id"
record_date = "written"
blobs = [{{ column = "content", content_type = "text/plain" }}]
"#,
            run_config(&reader, &operational)
        ),
        &format!(
            "version = \"1\"\nas_of = \"{}\"\n[defaults]\narchive_after = \"1y\"\npatient_inactive_after = \"1y\"\n[tables.scans]\ntier = \"archive\"\n[tables.letters]\ntier = \"operational\"\n",
            as_of()
        ),
    );

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["migrate", "--config", "strata.toml"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    let status = loop {
        if let Some(hwm) = high_water_mark(child.id()) {
            peak = peak.max(hwm);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    assert!(status.success(), "migrate failed: {status}");
    assert!(peak > 0, "the high-water mark was read while migrate ran");
    eprintln!("peak RSS of migrate: {} MiB", peak >> 20);
    assert!(
        peak < BIG as u64,
        "peak RSS {} MiB: a {} MiB BLOB was held whole",
        peak >> 20,
        BIG >> 20
    );

    // The archived objects match the source, whole and by range.
    let config = load_config(&dir.path().join("strata.toml"));
    let archive = open_archive(&config.archive, &config.base_dir).await;
    let mut checked = 0;
    for m in &archive.catalog().tables["scans"] {
        for f in &m.files {
            for batch in archive.read_file(f).await.unwrap() {
                let keys = batch
                    .column_by_name(strata_archive::KEY_COLUMN)
                    .unwrap()
                    .clone();
                let keys = arrow::array::AsArray::as_string::<i32>(&keys);
                for row in 0..batch.num_rows() {
                    let id: i64 = keys.value(row).trim_start_matches("id=").parse().unwrap();
                    let blob = strata_archive::blob_ref(&batch, "content", row);
                    let expected = db
                        .fetch_all(
                            format!("SELECT encode(sha256(content), 'hex'), length(content)::bigint FROM scans WHERE id = {id}"),
                            vec![strata_ingest::ColumnType::Text, strata_ingest::ColumnType::Int],
                        )
                        .await
                        .unwrap()
                        .remove(0);
                    let Some(blob) = blob else {
                        assert_eq!(expected[1], strata_ingest::Value::Null, "scan {id}");
                        checked += 1;
                        continue;
                    };
                    assert_eq!(
                        (
                            strata_ingest::Value::Text(blob.sha256.clone()),
                            strata_ingest::Value::Int(blob.length as i64)
                        ),
                        (expected[0].clone(), expected[1].clone()),
                        "scan {id}"
                    );
                    let bytes = archive.blobs().get(&blob).await.unwrap();
                    assert_eq!(
                        hex::encode(Sha256::digest(&bytes)),
                        blob.sha256,
                        "scan {id}"
                    );
                    if blob.length > 3_000_000 {
                        let (from, to) = (blob.length / 3 - 12_345, 2 * blob.length / 3 + 777);
                        let part = archive.blobs().get_range(&blob, from..to).await.unwrap();
                        assert_eq!(&part[..], &bytes[from as usize..to as usize], "scan {id}");
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 6, "every scan is archived");

    // Letters went to the operational database, each long BLOB whole.
    let target = strata_ingest::Db::connect(&operational, false)
        .await
        .unwrap();
    let sql = "SELECT id, encode(sha256(content), 'hex') FROM letters ORDER BY id";
    let types = || {
        vec![
            strata_ingest::ColumnType::Int,
            strata_ingest::ColumnType::Text,
        ]
    };
    let want = db.fetch_all(sql.into(), types()).await.unwrap();
    let got = target.fetch_all(sql.into(), types()).await.unwrap();
    assert_eq!(want.len(), 3);
    assert_eq!(got, want);
    db.close().await;
    target.close().await;
}
