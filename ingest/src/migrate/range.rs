//! Copying one range of a table: read its rows, decide each, and write them to their tiers;
//! then commit the range's operational rows, quarantined rows and checkpoint together.

use super::destroyed::Destroyed;
use super::naming::{row_digest, row_key};
use super::route::{Route, Router};
use super::target::{CHECKPOINT_TABLE, QUARANTINE_TABLE};
use super::Migration;
use crate::archive_rows::{archive_schema, ArchiveRun, ArchivedRow};
use crate::db::{Column, Db};
use crate::error::{IngestError, Result};
use crate::layout::TableLayout;
use crate::load::{Load, TargetTx};
use crate::progress::{TableProgress, PROGRESS_EVERY};
use crate::ranges::KeyRange;
use crate::report::Tally;
use crate::target_check::TargetChecks;
use crate::value::Value;
use base64::Engine;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use strata_archive::{BlobStore, TableManifest, TableWriter, TableWriterOptions};
use strata_cutoff_policies::{PatientFacts, Tier};

const ARCHIVE_BATCH_ROWS: usize = 8192;
/// Archived rows of a range are sorted and written as a file whenever they hold this much
/// memory (and at the range's end): about 200,000 rows a file for the benchmark's 9 columns
/// (~110 bytes a row packed, plus its sort entry).
const ARCHIVE_RUN_BYTES: usize = 24 << 20;

impl Migration {
    /// Copies ranges on `workers` threads of their own, so that decoding, deciding and encoding
    /// rows use every core (futures polled by one task would share one thread). Each thread
    /// drives its ranges on the runtime's reactor; after a range fails, no new range starts.
    /// On a current-thread runtime (some tests), ranges interleave on that thread instead.
    pub(super) async fn copy_ranges(
        &self,
        layout: &TableLayout,
        ranges: Vec<&KeyRange>,
        ctx: &RangeContext<'_>,
        workers: usize,
    ) -> Result<()> {
        let handle = tokio::runtime::Handle::current();
        if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
            let mut copies = futures::stream::iter(ranges)
                .map(|range| self.copy_range(layout, range, ctx))
                .buffer_unordered(workers);
            while let Some(done) = copies.next().await {
                done?;
            }
            return Ok(());
        }
        let queue = std::sync::Mutex::new(ranges.into_iter());
        let failed = std::sync::atomic::AtomicBool::new(false);
        let worker = || -> Result<()> {
            while !failed.load(Ordering::Relaxed) {
                let Some(range) = queue.lock().expect("range queue").next() else {
                    break;
                };
                if let Err(e) = handle.block_on(self.copy_range(layout, range, ctx)) {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
            Ok(())
        };
        tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let threads: Vec<_> = (0..workers.max(1))
                    .map(|i| {
                        std::thread::Builder::new()
                            .name(format!("strata-range-{i}"))
                            .spawn_scoped(scope, worker)
                            .expect("a range thread starts")
                    })
                    .collect();
                let mut outcome = Ok(());
                for t in threads {
                    match t.join() {
                        Ok(Err(e)) if outcome.is_ok() => outcome = Err(e),
                        Ok(_) => {}
                        Err(panic) => std::panic::resume_unwind(panic),
                    }
                }
                outcome
            })
        })
    }

    /// Copies one range: reads and decides its rows, writes its archive files and manifest,
    /// then commits its operational rows, quarantined rows and checkpoint in one transaction.
    /// When the operational database rejects a row the checks could not foresee (a CHECK or
    /// foreign-key constraint of a target table created beforehand), the range is copied again
    /// row by row, and each rejected row goes to quarantine with the database's reason.
    async fn copy_range(
        &self,
        layout: &TableLayout,
        range: &KeyRange,
        ctx: &RangeContext<'_>,
    ) -> Result<()> {
        let attempt = Arc::new(TableProgress::default());
        match self
            .copy_range_once(layout, range, ctx, false, &attempt)
            .await
        {
            Err(e) if e.is_data_rejected() => {
                tracing::warn!(table = %layout.name, range = range.index, error = %e, "the operational database rejected a row; copying the range again row by row");
                // What the failed attempt counted is counted again by the next one.
                let p = ctx.progress;
                for (total, counted) in [
                    (&p.rows, &attempt.rows),
                    (&p.bytes, &attempt.bytes),
                    (&p.quarantined, &attempt.quarantined),
                ] {
                    total.fetch_sub(counted.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                self.copy_range_once(layout, range, ctx, true, &Arc::default())
                    .await
            }
            other => other,
        }
    }

    async fn copy_range_once(
        &self,
        layout: &TableLayout,
        range: &KeyRange,
        ctx: &RangeContext<'_>,
        row_by_row: bool,
        attempt: &Arc<TableProgress>,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        // A manifest left by an attempt that never reached its checkpoint is replaced.
        let writer_prefix = format!("{}-r{:05}", ctx.run_id, range.index);
        strata_archive::withdraw_manifests(ctx.store.as_ref(), &layout.name, &writer_prefix)
            .await?;
        let writer_id = format!("{writer_prefix}-{:04x}", rand::random::<u16>());
        let blob_columns = layout
            .blobs
            .iter()
            .map(|b| layout.target_names[b.column].clone())
            .collect();
        let archive = TableWriter::new(
            ctx.store.clone(),
            ctx.keys.clone(),
            TableManifest::new(
                &layout.name,
                &writer_id,
                self.policy.version(),
                blob_columns,
            ),
            archive_schema(layout),
            TableWriterOptions {
                // A one-column key is distinct; columns of a composite key are not.
                distinct_columns: match layout.key[..] {
                    [k] => vec![layout.target_names[k].clone()],
                    _ => Vec::new(),
                },
                ..Default::default()
            },
        )?;
        let mut tx = TargetTx::begin(ctx.target).await?;
        let load = tx
            .load(&layout.name, ctx.target_columns, row_by_row)
            .await?;
        let writers = Writers {
            load,
            archive,
            run: ArchiveRun::new(ARCHIVE_RUN_BYTES),
            blobs: BlobStore::new(ctx.store.clone(), ctx.keys.clone()),
            pending: PendingBlobs::default(),
            quarantine: Vec::new(),
            progress: ctx.progress.clone(),
            attempt: attempt.clone(),
            destroyed: Destroyed::default(),
            checks: ctx.checks,
            seen_keys: (ctx.unique_keys_unchecked && !layout.key.is_empty())
                .then(std::collections::HashSet::new),
        };
        let outcome = self
            .process_range(layout, range, ctx.facts, ctx.snapshot, Some(writers))
            .await?;
        for q in &outcome.quarantine {
            let p = |n| tx.placeholder(n);
            let sql = format!(
                "INSERT INTO {QUARANTINE_TABLE} (run_id, table_name, row_key, column_name, reason, row_data, quarantined_at) VALUES ({}, {}, {}, {}, {}, {}, {})",
                p(1), p(2), p(3), p(4), p(5), p(6), p(7)
            );
            tx.execute_with(
                &sql,
                &[
                    ctx.run_id.to_string(),
                    layout.name.clone(),
                    q.key.clone(),
                    q.column.clone(),
                    q.reason.clone(),
                    q.data.clone(),
                    chrono::Utc::now().to_rfc3339(),
                ],
            )
            .await?;
        }
        let checkpoint = Checkpoint {
            range: range.index,
            tally: outcome.tally,
            destroyed: outcome.destroyed,
            manifest: outcome.manifest,
        };
        let p = |n| tx.placeholder(n);
        let sql = format!(
            "INSERT INTO {CHECKPOINT_TABLE} (run_id, table_name, range_index, checkpoint, finished_at) VALUES ({}, {}, CAST({} AS BIGINT), {}, {})",
            p(1), p(2), p(3), p(4), p(5)
        );
        tx.execute_with(
            &sql,
            &[
                ctx.run_id.to_string(),
                layout.name.clone(),
                range.index.to_string(),
                serde_json::to_string(&checkpoint).expect("checkpoint serializes"),
                chrono::Utc::now().to_rfc3339(),
            ],
        )
        .await?;
        tx.commit().await?;
        ctx.progress.ranges_done.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            table = %layout.name,
            range = range.index,
            rows = checkpoint.tally.report.source_rows,
            seconds = started.elapsed().as_secs_f64(),
            "range done"
        );
        Ok(())
    }

    /// Reads one range of a table and decides every row; with `writers`, also writes each row
    /// to its tier (operational rows to the range's load, archived rows to its files).
    pub(super) async fn process_range(
        &self,
        layout: &TableLayout,
        range: &KeyRange,
        facts: &HashMap<String, PatientFacts>,
        snapshot: Option<&str>,
        mut writers: Option<Writers<'_>>,
    ) -> Result<RangeOutcome> {
        let mut tally = Tally::new(&layout.name);
        let router = Router::new(&self.policy, layout, facts);
        let mut archived: Vec<ArchivedRow> = Vec::new();
        let schema = archive_schema(layout);
        // When writing, BLOBs longer than the inline limit are left out of the rows and
        // streamed from the source in pieces (a plan only counts them).
        let streamed = match writers {
            Some(_) => layout.streamable_blobs(&self.source),
            None => Vec::new(),
        };
        let inline_max = self.config.run.inline_blob_bytes;
        let sql = layout.select_where(&self.source, range.filter.as_deref(), &streamed, inline_max);
        let mut chunks =
            self.source
                .fetch_chunks_in(sql, layout.fetch_types(&self.source, &streamed), snapshot);
        let progress = self.progress.table(&layout.name);
        let (mut unreported_rows, mut unreported_bytes) = (0, 0);
        while let Some(chunk) = chunks.next().await {
            for mut values in chunk? {
                tally.report.source_rows += 1;
                let ordinal = (range.index, tally.report.source_rows);
                let long_blobs = layout.take_streamed(&mut values, &streamed);
                // The length of BLOB `b` when it was left out of the row to be streamed.
                let long = |b: usize| {
                    long_blobs
                        .as_ref()
                        .and_then(|s| s.lengths[b])
                        .filter(|&n| n > inline_max)
                };
                let patient = layout.take_patient(&mut values);
                let size = values.iter().map(Value::size).sum::<usize>() as u64
                    + (0..layout.blobs.len()).filter_map(long).sum::<u64>();
                unreported_rows += 1;
                unreported_bytes += size;
                if unreported_rows == PROGRESS_EVERY {
                    report_progress(
                        &progress,
                        writers.as_ref(),
                        unreported_rows,
                        unreported_bytes,
                    );
                    (unreported_rows, unreported_bytes) = (0, 0);
                }
                let (decision, date) = match router.route(&mut values, patient.as_deref()) {
                    Route::Quarantine { column, reason } => {
                        quarantine(
                            layout,
                            &mut tally,
                            writers.as_mut(),
                            &values,
                            ordinal,
                            column,
                            reason,
                        )?;
                        continue;
                    }
                    Route::Decided { decision, date } => (decision, date),
                };
                if decision.tier == Tier::Operational {
                    // The operational database takes a value whole: long BLOBs are read whole here.
                    for (b, blob) in layout.blobs.iter().enumerate() {
                        if let (Some(n), Some(s)) = (long(b), &long_blobs) {
                            let name = &layout.columns()[blob.column].name;
                            let mut pieces = self.source.blob_pieces(
                                &layout.name,
                                name,
                                &s.ctid,
                                n,
                                snapshot.map(str::to_string),
                            )?;
                            let mut content = Vec::with_capacity(n as usize);
                            while let Some(piece) = pieces.next().await {
                                content.extend_from_slice(&piece.map_err(|e| {
                                    IngestError::Run(format!("{}: {e}", layout.name))
                                })?);
                            }
                            values[blob.column] = Value::Bytes(content);
                        }
                    }
                }
                if let Some(w) = writers.as_mut() {
                    if let Some((col, reason)) = w.problem(layout, &values, decision.tier) {
                        quarantine(layout, &mut tally, Some(w), &values, ordinal, col, reason)?;
                        continue;
                    }
                }
                tally.count(&decision, patient.as_deref(), size);
                match decision.tier {
                    Tier::Purge => {
                        if let Some(w) = writers.as_mut() {
                            w.destroyed.add(layout, &values, ordinal);
                        }
                    }
                    Tier::Operational => {
                        if let Some(w) = writers.as_mut() {
                            if let Some((values, reason)) = w.load.write(values).await? {
                                // Counted as operational above; it is quarantined instead.
                                tally.report.operational_rows -= 1;
                                quarantine(
                                    layout,
                                    &mut tally,
                                    Some(w),
                                    &values,
                                    ordinal,
                                    0,
                                    &reason,
                                )?;
                            }
                        }
                    }
                    Tier::Archive => {
                        let Some(w) = writers.as_mut() else {
                            for b in &layout.blobs {
                                if let Value::Bytes(content) = &values[b.column] {
                                    tally.report.blobs += 1;
                                    tally.report.blob_bytes += content.len() as u64;
                                }
                            }
                            continue;
                        };
                        let mut stores = Vec::with_capacity(layout.blobs.len());
                        let mut blob_bytes = 0;
                        for (i, b) in layout.blobs.iter().enumerate() {
                            let content = std::mem::replace(&mut values[b.column], Value::Null);
                            let content_type = b
                                .content_type_column
                                .and_then(|i| values[i].as_key_text())
                                .unwrap_or_else(|| b.content_type.clone());
                            let blobs = w.blobs.clone();
                            match (content, long(i), &long_blobs) {
                                (Value::Bytes(content), _, _) => {
                                    tally.report.blobs += 1;
                                    tally.report.blob_bytes += content.len() as u64;
                                    blob_bytes += content.len();
                                    stores.push(Some(tokio::spawn(async move {
                                        blobs.put(content, &content_type).await
                                    })));
                                }
                                (Value::Null, Some(n), Some(s)) => {
                                    tally.report.blobs += 1;
                                    tally.report.blob_bytes += n;
                                    // A streamed BLOB holds little memory but a source connection
                                    // while it streams: counting it as the whole budget keeps at
                                    // most two in flight per range, well within the source pool.
                                    blob_bytes += BLOB_BYTES_IN_FLIGHT;
                                    let pieces = self.source.blob_pieces(
                                        &layout.name,
                                        &layout.columns()[b.column].name,
                                        &s.ctid,
                                        n,
                                        snapshot.map(str::to_string),
                                    )?;
                                    stores.push(Some(tokio::spawn(async move {
                                        blobs.put_stream(pieces, &content_type).await
                                    })));
                                }
                                _ => stores.push(None),
                            }
                        }
                        let key = if layout.key.is_empty() {
                            hex::encode(row_digest(&values))
                        } else {
                            row_key(layout, &values, (0, 0))
                        };
                        let patient = patient.as_deref().unwrap_or_default();
                        if layout.blobs.is_empty() {
                            w.run.push(layout, patient, date, &key, &values, &[]);
                        } else {
                            let row = ArchivedRow {
                                key,
                                patient: patient.to_string(),
                                date,
                                values,
                                blobs: Vec::new(),
                            };
                            w.pending.push(row, stores, blob_bytes);
                            w.pending.settle(&mut archived, false).await?;
                            for r in archived.drain(..) {
                                w.run
                                    .push(layout, &r.patient, r.date, &r.key, &r.values, &r.blobs);
                            }
                        }
                        if w.run.is_full() {
                            w.write_run(layout, &schema).await?;
                        }
                    }
                }
            }
        }
        report_progress(
            &progress,
            writers.as_ref(),
            unreported_rows,
            unreported_bytes,
        );
        let Some(mut w) = writers else {
            return Ok(RangeOutcome {
                tally,
                destroyed: Destroyed::default(),
                manifest: None,
                quarantine: Vec::new(),
            });
        };
        w.pending.settle(&mut archived, true).await?;
        for r in archived.drain(..) {
            w.run
                .push(layout, &r.patient, r.date, &r.key, &r.values, &r.blobs);
        }
        w.write_run(layout, &schema).await?;
        w.load.finish().await?;
        let manifest = if w.archive.rows() > 0 {
            Some(w.archive.finish().await?)
        } else {
            None
        };
        Ok(RangeOutcome {
            tally,
            destroyed: w.destroyed,
            manifest,
            quarantine: w.quarantine,
        })
    }
}

/// Adds rows and bytes read to the table's progress (and to the attempt's, when writing).
fn report_progress(progress: &TableProgress, writers: Option<&Writers<'_>>, rows: u64, bytes: u64) {
    for p in std::iter::once(progress).chain(writers.map(|w| w.attempt.as_ref())) {
        p.rows.fetch_add(rows, Ordering::Relaxed);
        p.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Counts a row as quarantined; with writers, keeps it for the range's quarantine rows. Fails
/// when the table's threshold is passed (counted over all its ranges when writing).
fn quarantine(
    layout: &TableLayout,
    tally: &mut Tally,
    writers: Option<&mut Writers<'_>>,
    values: &[Value],
    ordinal: (usize, u64),
    col: usize,
    reason: &str,
) -> Result<()> {
    tally.report.quarantined_rows += 1;
    let total = match writers {
        Some(w) => {
            let key = row_key(layout, values, ordinal);
            tracing::warn!(table = %layout.name, key = %key, column = %layout.columns()[col].name, reason, "row quarantined");
            w.quarantine
                .push(Quarantined::new(layout, key, col, reason, values));
            w.attempt.quarantined.fetch_add(1, Ordering::Relaxed);
            w.progress.quarantined.fetch_add(1, Ordering::SeqCst) + 1
        }
        None => tally.report.quarantined_rows,
    };
    match layout.quarantine_threshold {
        Some(limit) if total > limit => Err(IngestError::QuarantineThreshold {
            table: layout.name.clone(),
            quarantined: total,
            threshold: limit,
        }),
        _ => Ok(()),
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
struct PendingBlobs {
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

/// Where a range's rows go while it is copied.
pub(super) struct Writers<'c> {
    load: Load<'c>,
    archive: TableWriter,
    /// Archived rows waiting to be sorted into a file.
    run: ArchiveRun,
    blobs: BlobStore,
    pending: PendingBlobs,
    /// The range's quarantined rows, inserted with its checkpoint.
    quarantine: Vec<Quarantined>,
    /// The table's progress; its quarantined rows, counted by every range, are what the
    /// threshold is checked against.
    progress: Arc<TableProgress>,
    /// What this attempt at the range added to `progress`.
    attempt: Arc<TableProgress>,
    destroyed: Destroyed,
    checks: &'c TargetChecks,
    /// Hashes of the keys seen in this range, when the source does not enforce them.
    seen_keys: Option<std::collections::HashSet<u64>>,
}

impl Writers<'_> {
    /// Sorts the held archived rows and writes them as a file of their own.
    async fn write_run(
        &mut self,
        layout: &TableLayout,
        schema: &arrow::datatypes::SchemaRef,
    ) -> Result<()> {
        if self.run.is_empty() {
            return Ok(());
        }
        let mut sorted = self.run.drain_sorted(layout, schema, ARCHIVE_BATCH_ROWS);
        while let Some(batch) = sorted.next_batch() {
            let batch = batch.map_err(strata_archive::ArchiveError::from)?;
            self.archive.write(&batch).await?;
        }
        self.archive.end_file().await?;
        Ok(())
    }

    /// A problem that keeps the row out of every tier: a NULL or repeated primary key (when
    /// the source does not enforce its key), or, for a row bound for the operational
    /// database, a value the target would reject or change.
    fn problem(
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
                return Some((layout.key[0], "duplicate primary key"));
            }
        }
        if tier == Tier::Operational {
            return self.checks.check(values);
        }
        None
    }
}

/// What every range of a table shares.
pub(super) struct RangeContext<'a> {
    pub(super) target: &'a Db,
    pub(super) target_columns: &'a [Column],
    pub(super) checks: &'a TargetChecks,
    /// Whether keys must be checked for duplicates (the source does not guarantee them).
    pub(super) unique_keys_unchecked: bool,
    pub(super) store: &'a strata_archive::Store,
    pub(super) keys: &'a strata_archive::KeyRing,
    pub(super) run_id: &'a str,
    pub(super) snapshot: Option<&'a str>,
    pub(super) facts: &'a HashMap<String, PatientFacts>,
    pub(super) progress: &'a Arc<TableProgress>,
}

/// What reading a range produced.
pub(super) struct RangeOutcome {
    pub(super) tally: Tally,
    pub(super) destroyed: Destroyed,
    pub(super) manifest: Option<TableManifest>,
    pub(super) quarantine: Vec<Quarantined>,
}

/// A range's record in the operational database, committed with its rows.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Checkpoint {
    pub(super) range: usize,
    pub(super) tally: Tally,
    pub(super) destroyed: Destroyed,
    pub(super) manifest: Option<TableManifest>,
}

/// A quarantined row: where it is, what is wrong, and its values (kept in the operational
/// database's quarantine table for review, never logged).
pub(super) struct Quarantined {
    key: String,
    column: String,
    reason: String,
    data: String,
}

impl Quarantined {
    fn new(layout: &TableLayout, key: String, col: usize, reason: &str, values: &[Value]) -> Self {
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
