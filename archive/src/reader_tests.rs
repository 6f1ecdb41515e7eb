//! Tests of the reader: one patient's rows from encrypted files, whole, streamed and selective
//! reads that agree, and reads that fail closed on a wrong key, a flipped byte or a swapped file.

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
        tombstones: Arc::default(),
        successors: Arc::default(),
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
