//! Which archived rows a job exports: the record dates, code lists and group of its request,
//! and of a record archived again by a later run (a correction) only the newest copy.
//!
//! A table's files are read run by run, newest run first, each file a row group at a time (no
//! file is held whole). A row is left out when a newer run archived a record with the same key;
//! rows of the same run never supersede one another (two identical rows of a keyless table are
//! two records). Only the keys of runs newer than the oldest are held, as 128-bit digests:
//! memory grows with the corrections, not with the archive.

use crate::exports::spec::JobSpec;
use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::Date32Type;
use futures::stream::BoxStream;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::Arc;
use strata_archive::{
    ArchiveReader, ArchivedBatch, FileEntry, KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN,
};
use strata_deidentify::{PseudonymKey, TablePlan};

/// The row filters of a job for one table.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cohort {
    from: Option<i32>,
    to: Option<i32>,
    codes: Vec<(String, HashSet<String>)>,
    members: Option<Arc<HashSet<String>>>,
    /// The key of the profile's date shifts: the bounds then apply to shifted dates (the
    /// dates as they leave), so that they tell nothing of the real ones.
    shift: Option<PseudonymKey>,
}

impl Cohort {
    /// The filters of `spec` for `table`; `members`: the group's patients, if any; `shift`:
    /// the key of the profile's date shifts, if it shifts dates.
    pub fn new(
        spec: &JobSpec,
        table: &str,
        members: Option<Arc<HashSet<String>>>,
        shift: Option<PseudonymKey>,
    ) -> Self {
        Cohort {
            from: spec.from.map(Date32Type::from_naive_date),
            to: spec.to.map(Date32Type::from_naive_date),
            codes: spec
                .codes
                .get(table)
                .into_iter()
                .flatten()
                .map(|(c, codes)| (c.clone(), codes.iter().cloned().collect()))
                .collect(),
            members,
            shift,
        }
    }

    /// The columns the filters read.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.codes.iter().map(|(c, _)| c.as_str())
    }

    /// Rows in the cohort, of a batch in the table's merged schema.
    fn keep(&self, batch: &RecordBatch) -> Result<Vec<bool>, String> {
        let n = batch.num_rows();
        let archived = ArchivedBatch::new(batch, &[]);
        let patients: Vec<&str> = archived.patients().ok_or("no patient column")?.collect();
        let mut last_shift: Option<(&str, i32)> = None;
        let mut keep: Vec<bool> = (0..n)
            .map(|i| match (self.from, self.to, archived.record_days(i)) {
                (None, None, _) => true,
                (_, _, None) => false,
                (_, _, Some(mut d)) => {
                    if let Some(key) = &self.shift {
                        let p = patients[i];
                        let days = match last_shift {
                            Some((q, s)) if q == p => s,
                            _ => key.shift_days(p),
                        };
                        last_shift = Some((p, days));
                        d += days;
                    }
                    self.from.is_none_or(|f| d >= f) && self.to.is_none_or(|t| d <= t)
                }
            })
            .collect();
        for (column, codes) in &self.codes {
            let values = archived
                .values(column)
                .ok_or_else(|| format!("no column {column:?} for a code list"))?;
            for (k, v) in keep.iter_mut().zip(values) {
                *k = *k && v.to_text().is_some_and(|t| codes.contains(t.as_ref()));
            }
        }
        if let Some(members) = &self.members {
            for (i, k) in keep.iter_mut().enumerate() {
                *k = *k && members.contains(patients[i]);
            }
        }
        Ok(keep)
    }
}

fn key_digest(key: &str) -> u128 {
    u128::from_be_bytes(
        Sha256::digest(key.as_bytes())[..16]
            .try_into()
            .expect("16 bytes"),
    )
}

/// A table's archived rows in a job's cohort, newest run first, conformed to the table's
/// merged schema.
pub(crate) struct TableRows {
    archive: ArchiveReader,
    /// Files per run, newest run first.
    runs: Vec<Vec<FileEntry>>,
    /// Per run (same order), its tombstone files and whether it truncated the table.
    deletions: Vec<(Vec<FileEntry>, bool)>,
    run: usize,
    file: usize,
    current: Option<BoxStream<'static, strata_archive::Result<RecordBatch>>>,
    /// Keys archived by runs newer than the one being read.
    newer: HashSet<u128>,
    /// Keys of the run being read (kept only when an older run follows).
    this_run: Vec<u128>,
    projection: Vec<String>,
    /// Rows read and rows kept.
    pub read: u64,
}

impl TableRows {
    /// The files of `table` (of manifests created at or after `since`, RFC 3339, when given),
    /// grouped by run, newest first.
    pub fn new(archive: &ArchiveReader, table: &str, since: Option<&str>) -> Self {
        let since = since.and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
        let manifests = archive.catalog().tables.get(table).into_iter().flatten();
        let manifests = manifests.filter(|m| {
            let created = chrono::DateTime::parse_from_rfc3339(&m.created_at).ok();
            !matches!((since, created), (Some(since), Some(created)) if created < since)
        });
        let ranked: Vec<_> = strata_archive::runs_of(manifests)
            .into_iter()
            .rev()
            .collect();
        let runs: Vec<Vec<FileEntry>> = ranked
            .iter()
            .map(|run| run.iter().flat_map(|m| m.files.iter().cloned()).collect())
            .collect();
        let deletions = ranked
            .iter()
            .map(|run| {
                let tombstones = run.iter().flat_map(|m| m.tombstones.iter().cloned());
                (tombstones.collect(), run.iter().any(|m| m.truncated))
            })
            .collect();
        TableRows {
            archive: archive.clone(),
            runs,
            deletions,
            run: 0,
            file: 0,
            current: None,
            newer: HashSet::new(),
            this_run: Vec::new(),
            projection: Vec::new(),
            read: 0,
        }
    }

    /// Every file, for reading their schemas.
    pub fn files(&self) -> impl Iterator<Item = &FileEntry> {
        self.runs.iter().flatten()
    }

    /// Reads only these columns (besides Strata's own).
    pub fn project(&mut self, columns: impl IntoIterator<Item = String>) {
        self.projection = [PATIENT_COLUMN, RECORD_DATE_COLUMN, KEY_COLUMN]
            .into_iter()
            .map(str::to_string)
            .chain(columns)
            .collect();
    }

    /// The next batch of rows in the cohort (conformed to `plan`'s schema), or None at the end.
    pub async fn next(
        &mut self,
        plan: &TablePlan,
        cohort: &Cohort,
    ) -> Result<Option<RecordBatch>, String> {
        loop {
            if let Some(stream) = &mut self.current {
                match stream.next().await {
                    Some(batch) => {
                        let batch = plan
                            .conform(&batch.map_err(|e| e.to_string())?)
                            .map_err(|e| e.to_string())?;
                        self.read += batch.num_rows() as u64;
                        let mut keep = cohort.keep(&batch)?;
                        let older_follow =
                            self.run + 1 < self.runs.len() && !self.deletions[self.run].1;
                        if older_follow || !self.newer.is_empty() {
                            let archived = ArchivedBatch::new(&batch, &[]);
                            let keys = archived.keys().ok_or("no record key column")?;
                            for (k, key) in keep.iter_mut().zip(keys) {
                                let digest = key_digest(key);
                                if self.newer.contains(&digest) {
                                    *k = false;
                                }
                                if older_follow {
                                    self.this_run.push(digest);
                                }
                            }
                        }
                        let kept = filter_record_batch(&batch, &BooleanArray::from(keep))
                            .map_err(|e| e.to_string())?;
                        if kept.num_rows() > 0 {
                            return Ok(Some(kept));
                        }
                        continue;
                    }
                    None => self.current = None,
                }
            }
            let Some(files) = self.runs.get(self.run) else {
                return Ok(None);
            };
            match files.get(self.file) {
                Some(entry) => {
                    self.file += 1;
                    let columns = (!self.projection.is_empty()).then_some(&self.projection[..]);
                    self.current = Some(
                        self.archive
                            .file_batches(entry, columns)
                            .await
                            .map_err(|e| e.to_string())?,
                    );
                }
                None => {
                    // What this run deleted is gone from the older runs: tombstones (those a
                    // legal hold stopped excepted) hide their keys; a truncate, every row.
                    let (tombstones, truncated) = &self.deletions[self.run];
                    if *truncated {
                        return Ok(None);
                    }
                    for entry in tombstones {
                        let read = self
                            .archive
                            .tombstones(entry)
                            .await
                            .map_err(|e| e.to_string())?;
                        self.newer
                            .extend(read.iter().filter(|t| !t.held).map(|t| key_digest(&t.key)));
                    }
                    self.newer.extend(self.this_run.drain(..));
                    self.run += 1;
                    self.file = 0;
                }
            }
        }
    }
}

/// Threads that de-identify and scan one table's rows.
const WORKERS: usize = 2;

/// Runs one table's export in stages on threads of their own: the archived rows are read
/// (decrypted, decoded, filtered) on a task, then de-identified, scanned and shaped by
/// `WORKERS` threads (`work`, each with a scanner of its own), and what they make is received
/// in order of completion. The scanners come back when the workers end. Every channel is
/// bounded: memory does not grow with the table.
pub(crate) fn fan_out<T: Send + 'static>(
    mut rows: TableRows,
    plan: Arc<TablePlan>,
    cohort: Cohort,
    years_only: bool,
    work: impl Fn(&RecordBatch, &mut strata_deidentify::Scanner) -> Result<T, String>
        + Send
        + Sync
        + 'static,
) -> (
    tokio::sync::mpsc::Receiver<Result<T, String>>,
    Vec<tokio::sync::oneshot::Receiver<strata_deidentify::Scanner>>,
) {
    use tokio::sync::mpsc::channel;
    let (out_tx, out_rx) = channel(WORKERS * 2);
    let work = Arc::new(work);
    let mut inputs = Vec::new();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (tx, mut rx) = channel::<Result<RecordBatch, String>>(2);
        inputs.push(tx);
        let (out, work) = (out_tx.clone(), work.clone());
        // Threads of their own, not the runtime's blocking pool: they live as long as the
        // table's export and wait on reads that need that pool (`strata serve` caps it).
        let (done, scanned) = tokio::sync::oneshot::channel();
        workers.push(scanned);
        std::thread::spawn(move || {
            let mut scanner = strata_deidentify::Scanner::new(years_only);
            while let Some(batch) = rx.blocking_recv() {
                let made = batch.and_then(|b| work(&b, &mut scanner));
                if out.blocking_send(made).is_err() {
                    break;
                }
            }
            let _ = done.send(scanner);
        });
    }
    drop(out_tx);
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let next = rows.next(&plan, &cohort).await;
            let stop = !matches!(next, Ok(Some(_)));
            let item = match next {
                Ok(Some(b)) => Ok(b),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            if inputs[n % WORKERS].send(item).await.is_err() || stop {
                break;
            }
            n += 1;
        }
    });
    (out_rx, workers)
}
