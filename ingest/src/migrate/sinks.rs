//! Where one range's routed rows go. A plan counts them ([`Counting`]); a run writes them
//! ([`Writers`]): operational rows to the range's load, archived rows and their BLOBs to its
//! files and objects, purged rows to its destruction record, quarantined rows to the rows its
//! checkpoint commits. What only a writer checks (a key repeated within the range when the
//! source does not enforce it, a value the target would refuse) is checked here, not in the
//! route stage.

use super::destroyed::Destroyed;
use super::naming::{archive_key, row_key};
use crate::archive_rows::{ArchiveRun, ArchivedRow};
use crate::db::Db;
use crate::error::{IngestError, Result};
use crate::layout::{StreamedBlobs, TableLayout};
use crate::load::Load;
use crate::progress::TableProgress;
use crate::report::Tally;
use crate::target_check::TargetChecks;
use crate::value::Value;
use base64::Engine;
use chrono::NaiveDate;
use futures::StreamExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use strata_archive::{BlobStore, TableManifest, TableWriter};
use strata_cutoff_policies::Tier;

/// Rows handed to the archive writer at a time.
const ARCHIVE_BATCH_ROWS: usize = 8192;

/// A row's BLOBs that were left out of it, to be streamed from the source.
pub(super) struct LongBlobs<'a> {
    /// The row's location and its BLOBs' lengths, when any was left out.
    pub(super) streamed: Option<&'a StreamedBlobs>,
    /// BLOBs up to this length came inline.
    pub(super) inline_max: u64,
}

impl LongBlobs<'_> {
    /// The length of BLOB `b` (in the table's BLOB order) when it was left out of the row.
    pub(super) fn length(&self, b: usize) -> Option<u64> {
        self.streamed
            .and_then(|s| s.lengths[b])
            .filter(|&n| n > self.inline_max)
    }
}

/// Where one range's routed rows go. The provided methods are a sink that only counts (the
/// caller's tally): a plan's, and a verification's, which add what they keep of rows.
pub(super) trait RangeSink {
    /// Whether BLOBs above the inline limit are left out of rows and streamed apart (a run), or
    /// read inline (a plan, which only counts them).
    fn streams_blobs(&self) -> bool {
        false
    }

    /// Whether the range's tally counts distinct patients per year and tier (a plan, for the
    /// records manager's charts; a run does not, nor checkpoints them).
    fn counts_patients_by_year(&self) -> bool {
        false
    }

    /// Rows and bytes read, for this sink's own progress (the table's is counted by the caller).
    fn read(&self, _rows: u64, _bytes: u64) {}

    /// Reads a row's long BLOBs whole into `values`: the operational database takes a value in
    /// one piece (called for rows bound there that have some).
    async fn read_long_blobs(
        &mut self,
        _layout: &TableLayout,
        _values: &mut [Value],
        _long: &LongBlobs<'_>,
    ) -> Result<()> {
        Ok(())
    }

    /// The version of the row about to be routed, when the layout reads it (`strata tier`).
    fn row_version(&mut self, _version: crate::layout::RowVersion) {}

    /// The record date the route stage read of the row it is about to hand over.
    fn decided(&mut self, _date: Option<NaiveDate>) {}

    /// A problem that keeps a routed row out of every tier, found by this sink.
    fn problem(
        &mut self,
        layout: &TableLayout,
        values: &[Value],
        tier: Tier,
    ) -> Option<(usize, &'static str)>;

    /// Keeps a quarantined row (`in_range`: the range's quarantined rows so far, this one
    /// included); returns the count to hold against the table's threshold.
    fn quarantine(
        &mut self,
        _layout: &TableLayout,
        _values: &[Value],
        _ordinal: (usize, u64),
        _column: usize,
        _reason: &str,
        in_range: u64,
    ) -> u64 {
        in_range
    }

    /// A row past retention (of `patient`): what its destruction record keeps of it.
    fn purge(
        &mut self,
        _layout: &TableLayout,
        _patient: Option<&str>,
        _values: &[Value],
        _ordinal: (usize, u64),
    ) {
    }

    /// A row for the operational database; back with the reason when the database refuses it.
    async fn operational(&mut self, _values: Vec<Value>) -> Result<Option<(Vec<Value>, String)>> {
        Ok(None)
    }

    /// A row for the archive.
    async fn archive(
        &mut self,
        _layout: &TableLayout,
        _patient: Option<&str>,
        _date: Option<NaiveDate>,
        _values: Vec<Value>,
        _long: &LongBlobs<'_>,
    ) -> Result<()> {
        Ok(())
    }

    /// The range's end: what it produced, with the range's `tally`.
    async fn finish(self, _layout: &TableLayout, tally: Tally) -> Result<RangeOutcome>
    where
        Self: Sized,
    {
        Ok(RangeOutcome {
            tally,
            destroyed: Destroyed::default(),
            manifest: None,
            quarantine: Vec::new(),
        })
    }
}

/// The reason of a row whose key an earlier row of the read had.
pub(super) const DUPLICATE_KEY: &str = "duplicate primary key";

/// What a sink checks that the route stage cannot: a key repeated across rows (when the source
/// does not enforce it) and a value the operational table would refuse or change. A plan and a
/// run check the same way, so that a plan counts what a run will quarantine.
pub(super) struct RowChecks<'c> {
    target: &'c TargetChecks,
    /// Hashes of the keys seen so far, when the source does not enforce them.
    seen_keys: Option<std::collections::HashSet<u64>>,
}

impl<'c> RowChecks<'c> {
    /// Checks against `target`; keys too when `keys_unchecked` (the source does not enforce
    /// `layout`'s key).
    pub(super) fn new(
        layout: &TableLayout,
        target: &'c TargetChecks,
        keys_unchecked: bool,
    ) -> Self {
        RowChecks {
            target,
            seen_keys: (keys_unchecked && !layout.key.is_empty())
                .then(std::collections::HashSet::new),
        }
    }

    /// A problem that keeps the row out of every tier: a NULL or repeated primary key (when
    /// the source does not enforce its key), or, for a row bound for the operational
    /// database, a value the target would reject or change.
    pub(super) fn check(
        &mut self,
        layout: &TableLayout,
        values: &[Value],
        tier: Tier,
    ) -> Option<(usize, &'static str)> {
        if let Some(seen) = self.seen_keys.as_mut() {
            if let Some(&k) = layout.key.iter().find(|&&k| values[k].is_null()) {
                return Some((k, "NULL primary key"));
            }
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            for &k in &layout.key {
                format!("{:?}", values[k]).hash(&mut h);
            }
            if !seen.insert(h.finish()) {
                return Some((layout.key[0], DUPLICATE_KEY));
            }
        }
        match tier {
            Tier::Operational => self.target.check(values),
            Tier::Archive => layout.archive_problem(values),
            Tier::Purge => None,
        }
    }
}

/// The sink of a plan: it checks rows as a run's writers do and keeps only the caller's tally.
/// A plan reads a table as one range, so a key repeated anywhere in it is found here; a run
/// finds one within a range, and across ranges among operational rows, before the table gets
/// its key (archived or purged rows whose key the source does not enforce, repeated in two
/// ranges, stay two records in a run: the plan counts the second as quarantined). The hashes
/// of such a table's keys are held for the whole table (8 bytes and the set's overhead a row).
/// What only the operational database knows (a CHECK constraint, a foreign key, a trigger of
/// a table designed beforehand) is found by loading, not by a plan.
pub(super) struct Counting<'c> {
    pub(super) checks: RowChecks<'c>,
}

impl RangeSink for Counting<'_> {
    fn counts_patients_by_year(&self) -> bool {
        true
    }

    fn problem(
        &mut self,
        layout: &TableLayout,
        values: &[Value],
        tier: Tier,
    ) -> Option<(usize, &'static str)> {
        self.checks.check(layout, values, tier)
    }
}

/// BLOBs stored concurrently, at most this many bytes of content at a time...
const BLOB_BYTES_IN_FLIGHT: usize = 32 << 20;
/// ...and at most this many objects.
const BLOBS_IN_FLIGHT: usize = 8;

/// Archived rows waiting for their BLOBs. Each BLOB is encrypted and stored by its own task, so
/// hashing, encryption and object writes overlap with reading the next rows and with each
/// other; rows leave in the order they came, each with its BLOB references.
#[derive(Default)]
pub(super) struct PendingBlobs {
    rows: std::collections::VecDeque<(ArchivedRow, Vec<Option<BlobTask>>, usize)>,
    bytes: usize,
    objects: usize,
}

type BlobTask = tokio::task::JoinHandle<strata_archive::Result<strata_archive::BlobRef>>;

impl PendingBlobs {
    fn push(&mut self, row: ArchivedRow, stores: Vec<Option<BlobTask>>, bytes: usize) {
        self.bytes += bytes;
        self.objects += stores.iter().flatten().count();
        self.rows.push_back((row, stores, bytes));
    }

    /// Moves rows whose BLOBs are stored to `out`, waiting for the oldest while too much is in
    /// flight (or, with `all`, until none is).
    async fn settle(&mut self, out: &mut Vec<ArchivedRow>, all: bool) -> Result<()> {
        while let Some((_, stores, _)) = self.rows.front() {
            let busy = all || self.bytes > BLOB_BYTES_IN_FLIGHT || self.objects > BLOBS_IN_FLIGHT;
            if !busy && stores.iter().flatten().any(|t| !t.is_finished()) {
                break;
            }
            let (mut row, stores, bytes) = self.rows.pop_front().expect("front exists");
            for store in stores {
                row.blobs.push(match store {
                    None => None,
                    Some(task) => {
                        self.objects -= 1;
                        Some(task.await.map_err(|e| {
                            IngestError::Run(format!("storing a BLOB of {} failed: {e}", row.key))
                        })??)
                    }
                });
            }
            self.bytes -= bytes;
            out.push(row);
        }
        Ok(())
    }
}

/// Where a range's rows go while it is copied: the sink of a run.
pub(super) struct Writers<'c> {
    pub(super) load: Load<'c>,
    /// The archive files and BLOB objects.
    pub(super) archive: ArchiveSide<'c>,
    /// The range's quarantined rows, inserted with its checkpoint.
    pub(super) quarantine: Vec<Quarantined>,
    /// The table's progress; its quarantined rows, counted by every range, are what the
    /// threshold is checked against.
    pub(super) progress: Arc<TableProgress>,
    /// What this attempt at the range added to `progress`.
    pub(super) attempt: Arc<TableProgress>,
    pub(super) destroyed: Destroyed,
    pub(super) checks: RowChecks<'c>,
}

/// Where archived rows go: their BLOBs stored as objects (those left out of the rows streamed
/// from the database they are read from), the rows sorted into files of the archive writer.
/// A run's ranges and `strata tier`'s batches write through it.
pub(super) struct ArchiveSide<'c> {
    /// The database the rows are read from and its snapshot (long BLOBs are read from them).
    pub(super) source: &'c Db,
    pub(super) snapshot: Option<&'c str>,
    pub(super) writer: TableWriter,
    /// Archived rows waiting to be sorted into a file.
    pub(super) run: ArchiveRun,
    pub(super) blobs: BlobStore,
    pub(super) pending: PendingBlobs,
    /// The archive files' schema.
    pub(super) schema: arrow::datatypes::SchemaRef,
    /// Archived rows whose BLOBs are stored, on their way to `run`.
    pub(super) archived: Vec<ArchivedRow>,
}

impl<'c> ArchiveSide<'c> {
    /// Writes `layout`'s rows, read from `source` (in `snapshot`), through `writer`, sorting
    /// up to `run_bytes` of rows at a time.
    pub(super) fn new(
        layout: &TableLayout,
        (source, snapshot): (&'c Db, Option<&'c str>),
        writer: TableWriter,
        blobs: BlobStore,
        run_bytes: usize,
    ) -> Self {
        ArchiveSide {
            source,
            snapshot,
            writer,
            run: ArchiveRun::new(run_bytes),
            blobs,
            pending: PendingBlobs::default(),
            schema: crate::archive_rows::archive_schema(layout),
            archived: Vec::new(),
        }
    }

    /// Sorts the held archived rows and writes them as a file of their own.
    async fn write_run(&mut self, layout: &TableLayout) -> Result<()> {
        if self.run.is_empty() {
            return Ok(());
        }
        let mut sorted = self
            .run
            .drain_sorted(layout, &self.schema, ARCHIVE_BATCH_ROWS);
        while let Some(batch) = sorted.next_batch() {
            let batch = batch.map_err(strata_archive::ArchiveError::from)?;
            self.writer.write(&batch).await?;
        }
        self.writer.end_file().await?;
        Ok(())
    }

    /// Reads the row's long BLOBs whole from the source.
    async fn read_whole(
        &self,
        layout: &TableLayout,
        values: &mut [Value],
        long: &LongBlobs<'_>,
    ) -> Result<()> {
        for (b, blob) in layout.blobs.iter().enumerate() {
            let (Some(n), Some(s)) = (long.length(b), long.streamed) else {
                continue;
            };
            let name = &layout.columns()[blob.column].name;
            let mut pieces = self.source.blob_pieces(
                &layout.relation,
                name,
                &s.ctid,
                n,
                self.snapshot.map(str::to_string),
            )?;
            let mut content = Vec::with_capacity(n as usize);
            while let Some(piece) = pieces.next().await {
                content.extend_from_slice(
                    &piece.map_err(|e| IngestError::Run(format!("{}: {e}", layout.name)))?,
                );
            }
            values[blob.column] = Value::Bytes(content);
        }
        Ok(())
    }

    /// Archives one row: its BLOBs stored, then the row held for its file.
    pub(super) async fn archive(
        &mut self,
        layout: &TableLayout,
        patient: Option<&str>,
        date: Option<NaiveDate>,
        mut values: Vec<Value>,
        long: &LongBlobs<'_>,
    ) -> Result<()> {
        let mut stores = Vec::with_capacity(layout.blobs.len());
        let mut blob_bytes = 0;
        for (i, b) in layout.blobs.iter().enumerate() {
            let content = std::mem::replace(&mut values[b.column], Value::Null);
            let content_type = b
                .content_type_column
                .and_then(|i| values[i].as_key_text())
                .unwrap_or_else(|| b.content_type.clone());
            let blobs = self.blobs.clone();
            match (content, long.length(i), long.streamed) {
                (Value::Bytes(content), _, _) => {
                    blob_bytes += content.len();
                    stores.push(Some(tokio::spawn(async move {
                        blobs.put(content, &content_type).await
                    })));
                }
                (Value::Null, Some(n), Some(s)) => {
                    // A streamed BLOB holds little memory but a source connection while it
                    // streams: counting it as the whole budget keeps at most two in flight per
                    // range, well within the source pool.
                    blob_bytes += BLOB_BYTES_IN_FLIGHT;
                    let pieces = self.source.blob_pieces(
                        &layout.relation,
                        &layout.columns()[b.column].name,
                        &s.ctid,
                        n,
                        self.snapshot.map(str::to_string),
                    )?;
                    stores.push(Some(tokio::spawn(async move {
                        blobs.put_stream(pieces, &content_type).await
                    })));
                }
                _ => stores.push(None),
            }
        }
        let key = archive_key(layout, &values);
        let patient = patient.unwrap_or_default();
        if layout.blobs.is_empty() {
            self.run.push(layout, patient, date, &key, &values, &[]);
        } else {
            let row = ArchivedRow {
                key,
                patient: patient.to_string(),
                date,
                values,
                blobs: Vec::new(),
            };
            self.pending.push(row, stores, blob_bytes);
            self.pending.settle(&mut self.archived, false).await?;
            for r in self.archived.drain(..) {
                self.run
                    .push(layout, &r.patient, r.date, &r.key, &r.values, &r.blobs);
            }
        }
        if self.run.is_full() {
            self.write_run(layout).await?;
        }
        Ok(())
    }

    /// Writes what is held and publishes the manifest, when any row was archived.
    pub(super) async fn finish(mut self, layout: &TableLayout) -> Result<Option<TableManifest>> {
        self.pending.settle(&mut self.archived, true).await?;
        for r in self.archived.drain(..) {
            self.run
                .push(layout, &r.patient, r.date, &r.key, &r.values, &r.blobs);
        }
        self.write_run(layout).await?;
        Ok(if self.writer.rows() > 0 {
            Some(self.writer.finish().await?)
        } else {
            None
        })
    }
}

impl RangeSink for Writers<'_> {
    fn streams_blobs(&self) -> bool {
        true
    }

    fn read(&self, rows: u64, bytes: u64) {
        self.attempt.rows.fetch_add(rows, Ordering::Relaxed);
        self.attempt.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    async fn read_long_blobs(
        &mut self,
        layout: &TableLayout,
        values: &mut [Value],
        long: &LongBlobs<'_>,
    ) -> Result<()> {
        self.archive.read_whole(layout, values, long).await
    }

    fn problem(
        &mut self,
        layout: &TableLayout,
        values: &[Value],
        tier: Tier,
    ) -> Option<(usize, &'static str)> {
        self.checks.check(layout, values, tier)
    }

    fn quarantine(
        &mut self,
        layout: &TableLayout,
        values: &[Value],
        ordinal: (usize, u64),
        column: usize,
        reason: &str,
        _in_range: u64,
    ) -> u64 {
        // Logged once per table and reason when the table ends (`quarantine_summary`), not
        // per row: the rows, with their keys, are in the quarantine table.
        let key = row_key(layout, values, ordinal);
        self.quarantine
            .push(Quarantined::new(layout, key, column, reason, values));
        self.attempt.quarantined.fetch_add(1, Ordering::Relaxed);
        self.progress.quarantined.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn purge(
        &mut self,
        layout: &TableLayout,
        _patient: Option<&str>,
        values: &[Value],
        ordinal: (usize, u64),
    ) {
        self.destroyed.add(layout, values, ordinal);
    }

    async fn operational(&mut self, values: Vec<Value>) -> Result<Option<(Vec<Value>, String)>> {
        self.load.write(values).await
    }

    async fn archive(
        &mut self,
        layout: &TableLayout,
        patient: Option<&str>,
        date: Option<NaiveDate>,
        values: Vec<Value>,
        long: &LongBlobs<'_>,
    ) -> Result<()> {
        self.archive
            .archive(layout, patient, date, values, long)
            .await
    }

    async fn finish(self, layout: &TableLayout, tally: Tally) -> Result<RangeOutcome> {
        let manifest = self.archive.finish(layout).await?;
        self.load.finish().await?;
        Ok(RangeOutcome {
            tally,
            destroyed: self.destroyed,
            manifest,
            quarantine: self.quarantine,
        })
    }
}

/// What reading a range produced.
pub(super) struct RangeOutcome {
    pub(super) tally: Tally,
    pub(super) destroyed: Destroyed,
    pub(super) manifest: Option<TableManifest>,
    pub(super) quarantine: Vec<Quarantined>,
}

/// A quarantined row: where it is, what is wrong, and its values (kept in the operational
/// database's quarantine table for review, never logged).
pub(super) struct Quarantined {
    pub(super) key: String,
    pub(super) column: String,
    pub(super) reason: String,
    pub(super) data: String,
}

impl Quarantined {
    /// Writes it to the quarantine table on `tx`, as run `run_id`'s.
    pub(super) async fn insert(
        &self,
        tx: &mut crate::load::TargetTx,
        run_id: &str,
        table: &str,
    ) -> Result<()> {
        let p = |n| tx.placeholder(n);
        let sql = format!(
            "INSERT INTO {} (run_id, table_name, row_key, column_name, reason, row_data, quarantined_at) VALUES ({}, {}, {}, {}, {}, {}, {})",
            super::target::QUARANTINE_TABLE,
            p(1), p(2), p(3), p(4), p(5), p(6), p(7)
        );
        tx.execute_with(
            &sql,
            &[
                run_id.to_string(),
                table.to_string(),
                self.key.clone(),
                self.column.clone(),
                self.reason.clone(),
                self.data.clone(),
                chrono::Utc::now().to_rfc3339(),
            ],
        )
        .await
    }

    pub(super) fn new(
        layout: &TableLayout,
        key: String,
        col: usize,
        reason: &str,
        values: &[Value],
    ) -> Self {
        let data: serde_json::Map<String, serde_json::Value> = layout
            .columns()
            .iter()
            .zip(values)
            .map(|(c, v)| {
                let j = match v {
                    Value::Null => serde_json::Value::Null,
                    Value::Bytes(b) => base64::engine::general_purpose::STANDARD.encode(b).into(),
                    other => other.as_key_text().unwrap_or_default().into(),
                };
                (c.name.clone(), j)
            })
            .collect();
        Quarantined {
            key,
            column: layout.columns()[col].name.clone(),
            reason: reason.to_string(),
            data: serde_json::Value::Object(data).to_string(),
        }
    }
}
