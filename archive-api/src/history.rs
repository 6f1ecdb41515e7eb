//! A patient's archived history as JSON: every table's rows for the patient, newest first.

use crate::error::ApiError;
use arrow::array::RecordBatch;
use serde::Serialize;
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};
use strata_archive::{ArchiveError, ArchiveReader, ArchivedBatch, BlobRef, LiveArchive};

/// One archived record.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HistoryRecord {
    /// The source table.
    pub table: String,
    /// The record's name in its table: its key as archived (`col=value` of its primary key, or
    /// a digest of its values for a table without one); identical rows of a table without a
    /// primary key are distinct records, named `digest`, `digest#2`, `digest#3`, ...
    pub key: String,
    /// The record's date (YYYY-MM-DD), if it has one.
    pub record_date: Option<String>,
    /// The record's columns.
    #[schema(value_type = Object)]
    pub data: Map<String, Value>,
    /// Documents (BLOBs) attached to the record.
    pub documents: Vec<DocumentLink>,
}

/// A document attached to a record.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DocumentLink {
    /// The source column.
    pub column: String,
    /// The document id to fetch.
    pub id: String,
    /// Where to fetch it.
    pub href: String,
    /// MIME type.
    pub content_type: String,
    /// Length in bytes.
    pub length: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// Reads one patient's records from every archived table, through the archive's current
/// view; returns them with the generation of the catalog they were read through. A file gone
/// since that view was taken (a gc after a compaction) means the catalog has moved on: it is
/// re-read and the history read again, once.
pub async fn patient_history(
    archive: &LiveArchive,
    patient: &str,
) -> Result<(Vec<HistoryRecord>, u64), ApiError> {
    let view = archive.view();
    let records = match read_history(&view, patient).await {
        Err(e) if e.is_missing_file() => {
            archive.refresh().await?;
            let view = archive.view();
            return Ok((
                read_history(&view, patient).await?,
                view.catalog().generation(),
            ));
        }
        other => other?,
    };
    Ok((records, view.catalog().generation()))
}

/// [`patient_history`] through one view.
async fn read_history(
    archive: &ArchiveReader,
    patient: &str,
) -> Result<Vec<HistoryRecord>, ArchiveError> {
    // The tables are read on tasks of their own: decrypting and decoding their pages is CPU
    // work, and the runtime's threads share it.
    let reads: Vec<_> = archive
        .catalog()
        .tables
        .keys()
        .map(|table| {
            let (archive, table, patient) = (archive.clone(), table.clone(), patient.to_string());
            tokio::spawn(async move {
                let blob_columns = archive.catalog().blob_columns(&table);
                let batches = archive.patient_rows(&table, &patient).await?;
                Ok::<_, ArchiveError>(
                    batches
                        .iter()
                        .flat_map(|b| batch_records(&table, b, &blob_columns, &patient))
                        .collect::<Vec<_>>(),
                )
            })
        })
        .collect();
    let mut records = Vec::new();
    for read in reads {
        let table_records = read.await.map_err(|e| {
            ArchiveError::Io(std::io::Error::other(format!("history read task: {e}")))
        })??;
        records.extend(table_records);
    }
    records.sort_by(history_order);
    if name_apart(&mut records) {
        records.sort_by(history_order);
    }
    Ok(records)
}

/// Gives records that share a table and key names of their own: identical rows of a table
/// without a primary key (named by a digest of their values) are distinct records, and each
/// needs its own name for page cursors and FHIR ids. The first keeps the key, the next become
/// `key#2`, `key#3`, ... (in history order). Whether any record was renamed.
fn name_apart(records: &mut [HistoryRecord]) -> bool {
    let mut seen: std::collections::HashMap<(String, String), usize> =
        std::collections::HashMap::new();
    let mut renamed = false;
    for r in records.iter_mut() {
        let n = seen.entry((r.table.clone(), r.key.clone())).or_default();
        *n += 1;
        if *n > 1 {
            r.key = format!("{}#{n}", r.key);
            renamed = true;
        }
    }
    renamed
}

/// The order of a history: newest first (records without a date last), then by table and key.
pub fn history_order(a: &HistoryRecord, b: &HistoryRecord) -> std::cmp::Ordering {
    match (&a.record_date, &b.record_date) {
        (Some(x), Some(y)) => y.cmp(x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
    .then_with(|| a.table.cmp(&b.table))
    .then_with(|| a.key.cmp(&b.key))
}

fn batch_records(
    table: &str,
    batch: &RecordBatch,
    blob_columns: &[String],
    patient: &str,
) -> Vec<HistoryRecord> {
    let batch = ArchivedBatch::new(batch, blob_columns);
    (0..batch.num_rows())
        .map(|row| HistoryRecord {
            table: table.to_string(),
            key: batch.key(row).unwrap_or_default().to_string(),
            record_date: batch.record_date(row).map(|d| d.to_string()),
            data: batch
                .data(row)
                .map(|(name, v)| (name.to_string(), v.to_json()))
                .collect(),
            documents: batch
                .blobs(row)
                .map(|(column, r)| DocumentLink {
                    href: format!("/v1/patients/{patient}/documents/{}", r.object),
                    id: r.object,
                    column: column.to_string(),
                    content_type: r.content_type,
                    length: r.length,
                    sha256: r.sha256,
                })
                .collect(),
        })
        .collect()
}

/// Finds the reference of `document` among the patient's archived rows: a document is served
/// only through a patient whose record points to it. Read again once through a re-read
/// catalog when a file is gone, as [`patient_history`] is.
pub async fn find_document(
    archive: &LiveArchive,
    patient: &str,
    document: &str,
) -> Result<Option<BlobRef>, ApiError> {
    match find_in(&archive.view(), patient, document).await {
        Err(e) if e.is_missing_file() => {
            archive.refresh().await?;
            Ok(find_in(&archive.view(), patient, document).await?)
        }
        other => Ok(other?),
    }
}

/// [`find_document`] through one view.
async fn find_in(
    archive: &ArchiveReader,
    patient: &str,
    document: &str,
) -> Result<Option<BlobRef>, ArchiveError> {
    for table in archive.catalog().tables.keys() {
        let blob_columns = archive.catalog().blob_columns(table);
        if blob_columns.is_empty() {
            continue;
        }
        for batch in archive.patient_rows(table, patient).await? {
            let batch = ArchivedBatch::new(&batch, &blob_columns);
            let found = (0..batch.num_rows())
                .flat_map(|row| batch.blobs(row))
                .find(|(_, r)| r.object == document);
            if let Some((_, r)) = found {
                return Ok(Some(r));
            }
        }
    }
    Ok(None)
}

/// What part of a history to return (the query of `GET /v1/patients/{p}/history`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct HistoryQuery {
    /// Records dated on or after this day.
    pub from: Option<chrono::NaiveDate>,
    /// Records dated on or before this day.
    pub to: Option<chrono::NaiveDate>,
    /// Only these tables (empty: all).
    pub tables: Vec<String>,
    /// At most this many records.
    pub limit: usize,
    /// Continue after this record (the cursor of the previous page).
    pub after: Option<Cursor>,
}

/// A position in a history's order: the last record of a page.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, Serialize)]
pub struct Cursor(Option<String>, String, String);

impl Cursor {
    /// The cursor after `r`.
    pub fn after(r: &HistoryRecord) -> Self {
        Cursor(r.record_date.clone(), r.table.clone(), r.key.clone())
    }

    /// Opaque text for a URL.
    pub fn encode(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(self).expect("a cursor serializes"))
    }

    /// Reads [`Cursor::encode`]'s text.
    pub fn decode(text: &str) -> Option<Self> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn as_record(&self) -> HistoryRecord {
        HistoryRecord {
            table: self.1.clone(),
            key: self.2.clone(),
            record_date: self.0.clone(),
            data: Map::new(),
            documents: Vec::new(),
        }
    }
}

/// Patients' histories read lately, kept up to a number of bytes, the least recently used
/// leaving first. A clinician opening a chart asks for it several times (pages, the FHIR
/// form, the documents' links): one archive read serves them all. A history is kept with the
/// generation of the catalog it was read through and served only while that catalog is the
/// current one; it lives in memory only, like the answers it was read for.
#[derive(Clone)]
pub struct HistoryCache {
    capacity: usize,
    kept: Arc<Mutex<Kept>>,
}

#[derive(Default)]
struct Kept {
    /// By patient: the history, the catalog generation it was read through, its size.
    histories: hashlink::LinkedHashMap<String, (Arc<Vec<HistoryRecord>>, u64, usize)>,
    bytes: usize,
}

impl HistoryCache {
    /// A cache of at most `capacity` bytes (0: nothing is kept).
    pub fn new(capacity: usize) -> Self {
        HistoryCache {
            capacity,
            kept: Arc::default(),
        }
    }

    /// `patient`'s history, if kept and read through the catalog of `generation` (the
    /// archive's current one: a history read before a new run, a compaction or a gc is not
    /// served after it).
    pub fn get(&self, patient: &str, generation: u64) -> Option<Arc<Vec<HistoryRecord>>> {
        let mut kept = self.kept.lock().expect("history cache lock");
        match kept.histories.to_back(patient) {
            Some((h, g, _)) if *g == generation => Some(h.clone()),
            Some(_) => {
                let (_, _, bytes) = kept.histories.remove(patient).expect("just found");
                kept.bytes -= bytes;
                None
            }
            None => None,
        }
    }

    /// Keeps `patient`'s history, read through the catalog of `generation`, making room by
    /// dropping the least recently used.
    pub fn put(&self, patient: &str, generation: u64, history: Arc<Vec<HistoryRecord>>) {
        // Its size, roughly: the JSON it makes, plus the maps and strings that hold it.
        let bytes = 2 * serde_json::to_vec(history.as_slice()).map_or(0, |j| j.len()) + 256;
        // No history takes more than an eighth: one huge chart does not empty the cache.
        if bytes > self.capacity / 8 {
            return;
        }
        let mut kept = self.kept.lock().expect("history cache lock");
        if let Some((_, _, old)) = kept
            .histories
            .insert(patient.to_string(), (history, generation, bytes))
        {
            kept.bytes -= old;
        }
        kept.bytes += bytes;
        while kept.bytes > self.capacity {
            match kept.histories.pop_front() {
                Some((_, (_, _, b))) => kept.bytes -= b,
                None => break,
            }
        }
    }
}

/// The page of `records` (in [`history_order`]) that `q` asks for: the page, how many records
/// match the filters in all, and the cursor of the next page if there is one.
pub fn select_page(
    records: &[HistoryRecord],
    q: &HistoryQuery,
) -> (Vec<HistoryRecord>, usize, Option<Cursor>) {
    let (from, to) = (q.from.map(|d| d.to_string()), q.to.map(|d| d.to_string()));
    let dated = from.is_some() || to.is_some();
    let matching: Vec<&HistoryRecord> = records
        .iter()
        .filter(|r| q.tables.is_empty() || q.tables.contains(&r.table))
        .filter(|r| match (&r.record_date, dated) {
            (_, false) => true,
            (None, true) => false,
            (Some(d), true) => {
                from.as_ref().is_none_or(|f| d >= f) && to.as_ref().is_none_or(|t| d <= t)
            }
        })
        .collect();
    let total = matching.len();
    let start = match &q.after {
        Some(c) => {
            let pivot = c.as_record();
            matching.partition_point(|r| history_order(r, &pivot) != std::cmp::Ordering::Greater)
        }
        None => 0,
    };
    let more = matching.len() > start + q.limit;
    let page: Vec<HistoryRecord> = matching
        .into_iter()
        .skip(start)
        .take(q.limit)
        .cloned()
        .collect();
    let next = more.then(|| Cursor::after(page.last().expect("a full page")));
    (page, total, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_recent_histories_within_its_bytes() {
        let history = |n: usize| {
            Arc::new(
                (0..n)
                    .map(|i| rec(Some("2020-01-01"), "t", &format!("k{i}")))
                    .collect::<Vec<_>>(),
            )
        };
        let one = 2 * serde_json::to_vec(history(10).as_slice()).unwrap().len() + 256;
        // Room for eight: a history takes at most an eighth of the cache.
        let cache = HistoryCache::new(8 * one + one / 2);
        let patients = ["a", "b", "c", "d", "e", "f", "g", "h"];
        for p in patients {
            cache.put(p, 0, history(10));
        }
        assert!(cache.get("a", 0).is_some(), "a is now the most recent");
        cache.put("i", 0, history(10));
        assert!(cache.get("b", 0).is_none(), "the least recently read left");
        assert!(patients
            .iter()
            .chain(&["i"])
            .filter(|p| **p != "b")
            .all(|p| cache.get(p, 0).is_some()));
        cache.put("huge", 0, history(1000));
        assert!(
            cache.get("huge", 0).is_none(),
            "one history never fills the cache"
        );
        let none = HistoryCache::new(0);
        none.put("a", 0, history(1));
        assert!(none.get("a", 0).is_none());
        // A history read through an older catalog is not served once the archive moved on.
        cache.put("j", 0, history(10));
        assert!(
            cache.get("j", 1).is_none(),
            "read before the catalog changed"
        );
        assert!(cache.get("j", 0).is_none(), "and dropped");
        cache.put("j", 1, history(10));
        assert!(cache.get("j", 1).is_some());
    }

    fn rec(date: Option<&str>, table: &str, key: &str) -> HistoryRecord {
        HistoryRecord {
            table: table.into(),
            key: key.into(),
            record_date: date.map(str::to_string),
            data: Map::new(),
            documents: Vec::new(),
        }
    }

    #[test]
    fn identical_records_get_names_of_their_own_and_page_apart() {
        let mut all = vec![
            rec(Some("2020-01-01"), "supplies", "9f1c"),
            rec(Some("2020-01-01"), "supplies", "9f1c"),
            rec(Some("2020-01-01"), "supplies", "9f1c"),
            rec(Some("2020-01-01"), "labs", "9f1c"),
        ];
        all.sort_by(history_order);
        assert!(name_apart(&mut all));
        all.sort_by(history_order);
        let keys: Vec<(&str, &str)> = all
            .iter()
            .map(|r| (r.table.as_str(), r.key.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("labs", "9f1c"),
                ("supplies", "9f1c"),
                ("supplies", "9f1c#2"),
                ("supplies", "9f1c#3")
            ]
        );
        let mut q = HistoryQuery {
            limit: 1,
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let (page, _, next) = select_page(&all, &q);
            seen.extend(page.iter().map(|r| r.key.clone()));
            match next {
                Some(c) => q.after = Some(c),
                None => break,
            }
        }
        assert_eq!(
            seen.len(),
            4,
            "every identical record on a page of its own: {seen:?}"
        );
    }

    #[test]
    fn pages_follow_the_order_and_filters_without_gaps_or_repeats() {
        let mut all = vec![
            rec(Some("2020-01-01"), "labs", "id=1"),
            rec(Some("2021-06-30"), "labs", "id=2"),
            rec(Some("2021-06-30"), "encounters", "id=9"),
            rec(None, "notes", "id=3"),
            rec(Some("2019-12-31"), "labs", "id=4"),
            rec(Some("2021-06-30"), "labs", "id=10"),
        ];
        all.sort_by(history_order);
        let keys: Vec<&str> = all.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["id=9", "id=10", "id=2", "id=1", "id=4", "id=3"]);

        let mut seen = Vec::new();
        let mut q = HistoryQuery {
            limit: 2,
            ..Default::default()
        };
        loop {
            let (page, total, next) = select_page(&all, &q);
            assert_eq!(total, 6);
            seen.extend(page.iter().map(|r| r.key.clone()));
            match next {
                Some(c) => q.after = Some(Cursor::decode(&c.encode()).unwrap()),
                None => break,
            }
        }
        assert_eq!(seen, keys);

        let q = HistoryQuery {
            from: Some("2020-01-01".parse().unwrap()),
            to: Some("2021-06-30".parse().unwrap()),
            tables: vec!["labs".into()],
            limit: 10,
            after: None,
        };
        let (page, total, next) = select_page(&all, &q);
        assert_eq!(total, 3, "dated labs in range; undated records drop out");
        assert_eq!(
            page.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            ["id=10", "id=2", "id=1"]
        );
        assert!(next.is_none());
        assert!(Cursor::decode("not a cursor").is_none());
    }
}
