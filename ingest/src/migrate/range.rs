//! Copying one range of a table: read its rows, decide each, and write them to their tiers;
//! then commit the range's operational rows, quarantined rows and checkpoint together.

use super::destroyed::Destroyed;
use super::route::{Route, Router};
use super::sinks::{ArchiveSide, LongBlobs, RangeOutcome, RangeSink, RowChecks, Writers};
use super::target::CHECKPOINT_TABLE;
use super::workers::{run_jobs, Job};
use super::Migration;
use crate::archive_rows::archive_schema;
use crate::db::{Column, Db};
use crate::error::{IngestError, Result};
use crate::layout::TableLayout;
use crate::load::TargetTx;
use crate::progress::{TableProgress, PROGRESS_EVERY};
use crate::ranges::KeyRange;
use crate::report::Tally;
use crate::target_check::TargetChecks;
use crate::value::Value;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use strata_archive::{BlobStore, TableManifest, TableWriter};
use strata_cutoff_policies::{PatientFacts, Tier};

/// Archived rows of a range are sorted and written as a file whenever they hold this much
/// memory (and at the range's end): about 200,000 rows a file for the benchmark's 9 columns
/// (~110 bytes a row packed, plus its sort entry).
const ARCHIVE_RUN_BYTES: usize = 24 << 20;

impl Migration {
    /// Copies ranges on `workers` threads of their own ([`run_jobs`]), so that decoding,
    /// deciding and encoding rows use every core; after a range fails, no new range starts.
    pub(super) async fn copy_ranges(
        &self,
        layout: &TableLayout,
        ranges: Vec<&KeyRange>,
        ctx: &RangeContext<'_>,
        workers: usize,
    ) -> Result<()> {
        let jobs: Vec<Job<'_, ()>> = ranges
            .into_iter()
            .map(|range| -> Job<'_, ()> {
                Box::new(move || Box::pin(self.copy_range(layout, range, ctx)))
            })
            .collect();
        run_jobs(jobs, workers).await.map(|_| ())
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
            crate::archive_rows::writer_options(layout),
        )?;
        let mut tx = TargetTx::begin(ctx.target).await?;
        let load = tx
            .load(&layout.name, ctx.target_columns, row_by_row)
            .await?;
        let writers = Writers {
            load,
            archive: ArchiveSide::new(
                layout,
                (&self.source, ctx.snapshot),
                archive,
                BlobStore::new(ctx.store.clone(), ctx.keys.clone()),
                ARCHIVE_RUN_BYTES,
            ),
            quarantine: Vec::new(),
            progress: ctx.progress.clone(),
            attempt: attempt.clone(),
            destroyed: Destroyed::default(),
            checks: RowChecks::new(layout, ctx.checks, ctx.unique_keys_unchecked),
        };
        let outcome = self
            .route_range(layout, range, ctx.facts, ctx.snapshot, writers)
            .await?;
        for q in &outcome.quarantine {
            q.insert(&mut tx, ctx.run_id, &layout.name).await?;
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

    /// Reads one range of a table from the source, routes every row and hands it to `sink` by
    /// its tier: the one path of a plan ([`Counting`]) and of a run ([`Writers`]).
    pub(super) async fn route_range(
        &self,
        layout: &TableLayout,
        range: &KeyRange,
        facts: &HashMap<String, PatientFacts>,
        snapshot: Option<&str>,
        sink: impl RangeSink,
    ) -> Result<RangeOutcome> {
        // A run leaves BLOBs longer than the inline limit out of the rows and streams them from
        // the source in pieces; a plan reads them inline and counts them.
        let streamed = if sink.streams_blobs() {
            layout.streamable_blobs(&self.source)
        } else {
            Vec::new()
        };
        let inline_max = self.config.run.inline_blob_bytes;
        let sql = layout.select_where(&self.source, range.filter.as_deref(), &streamed, inline_max);
        let chunks =
            self.source
                .fetch_chunks_in(sql, layout.fetch_types(&self.source, &streamed), snapshot);
        let rows = SourceRows {
            chunks,
            index: range.index,
            streamed: &streamed,
        };
        self.route_rows(layout, rows, facts, sink).await
    }

    /// Routes every row of `rows` and hands it to `sink` by its tier. Any source of rows in the
    /// table's source column order feeds this (bulk copy's ranges today; change sync's decoded
    /// tuples and tiering's rows read back later): deciding, quarantining, counting and
    /// writing are the same whatever moved the record.
    pub(super) async fn route_rows(
        &self,
        layout: &TableLayout,
        mut rows: SourceRows<'_>,
        facts: &HashMap<String, PatientFacts>,
        mut sink: impl RangeSink,
    ) -> Result<RangeOutcome> {
        let mut tally = Tally::new(&layout.name);
        if sink.counts_patients_by_year() {
            tally.year_patients = Some(Default::default());
        }
        let router = Router::new(&self.policy, layout, facts);
        let streamed = rows.streamed;
        let inline_max = self.config.run.inline_blob_bytes;
        let progress = self.progress.table(&layout.name);
        let (mut unreported_rows, mut unreported_bytes) = (0, 0);
        while let Some(chunk) = rows.chunks.next().await {
            for mut values in chunk? {
                tally.report.source_rows += 1;
                let ordinal = (rows.index, tally.report.source_rows);
                if layout.row_version {
                    sink.row_version(layout.take_row_version(&mut values));
                }
                let streamed_blobs = layout.take_streamed(&mut values, streamed);
                let long = LongBlobs {
                    streamed: streamed_blobs.as_ref(),
                    inline_max,
                };
                let extras = layout.take_extras(&mut values);
                let patient = extras.patient.as_deref();
                let size = values.iter().map(Value::size).sum::<usize>() as u64
                    + (0..layout.blobs.len())
                        .filter_map(|b| long.length(b))
                        .sum::<u64>();
                unreported_rows += 1;
                unreported_bytes += size;
                if unreported_rows == PROGRESS_EVERY {
                    report_read(&progress, &sink, unreported_rows, unreported_bytes);
                    (unreported_rows, unreported_bytes) = (0, 0);
                }
                let (decision, date) = match router.route(&mut values, &extras) {
                    Route::Quarantine { column, reason } => {
                        quarantine(
                            layout, &mut tally, &mut sink, &values, ordinal, column, reason,
                        )?;
                        continue;
                    }
                    Route::Decided { decision, date } => (decision, date),
                };
                sink.decided(date);
                if decision.tier == Tier::Operational && long.streamed.is_some() {
                    sink.read_long_blobs(layout, &mut values, &long).await?;
                }
                if let Some((column, reason)) = sink.problem(layout, &values, decision.tier) {
                    quarantine(
                        layout, &mut tally, &mut sink, &values, ordinal, column, reason,
                    )?;
                    continue;
                }
                match decision.tier {
                    Tier::Purge => {
                        tally.count(&decision, date, patient, size);
                        sink.purge(layout, patient, &values, ordinal);
                    }
                    Tier::Operational => match sink.operational(values).await? {
                        // The database refused it: counted as quarantined, not operational.
                        Some((values, reason)) => {
                            quarantine(layout, &mut tally, &mut sink, &values, ordinal, 0, &reason)?
                        }
                        None => tally.count(&decision, date, patient, size),
                    },
                    Tier::Archive => {
                        tally.count(&decision, date, patient, size);
                        for (b, blob) in layout.blobs.iter().enumerate() {
                            let bytes = match &values[blob.column] {
                                Value::Bytes(content) => Some(content.len() as u64),
                                _ => long.length(b),
                            };
                            if let Some(bytes) = bytes {
                                tally.report.blobs += 1;
                                tally.report.blob_bytes += bytes;
                            }
                        }
                        sink.archive(layout, patient, date, values, &long).await?;
                    }
                }
            }
        }
        report_read(&progress, &sink, unreported_rows, unreported_bytes);
        sink.finish(layout, tally).await
    }
}

/// Adds rows and bytes read to the table's progress and to the sink's.
fn report_read(progress: &TableProgress, sink: &impl RangeSink, rows: u64, bytes: u64) {
    progress.rows.fetch_add(rows, Ordering::Relaxed);
    progress.bytes.fetch_add(bytes, Ordering::Relaxed);
    sink.read(rows, bytes);
}

/// Counts a row as quarantined and hands it to `sink`. Fails when the table's threshold is
/// passed (counted over all its ranges when writing).
fn quarantine(
    layout: &TableLayout,
    tally: &mut Tally,
    sink: &mut impl RangeSink,
    values: &[Value],
    ordinal: (usize, u64),
    column: usize,
    reason: &str,
) -> Result<()> {
    tally.quarantine(&layout.columns()[column].name, reason, 1);
    let total = sink.quarantine(
        layout,
        values,
        ordinal,
        column,
        reason,
        tally.report.quarantined_rows,
    );
    match layout.quarantine_threshold {
        Some(limit) if total > limit => Err(IngestError::QuarantineThreshold {
            table: layout.name.clone(),
            quarantined: total,
            threshold: limit,
        }),
        _ => Ok(()),
    }
}

/// Rows of one table as a source yields them: chunks of rows in the table's source column
/// order, each row's BLOBs in `streamed` left out (to be streamed from the source apart).
pub(super) struct SourceRows<'a> {
    /// The rows.
    pub(super) chunks: crate::db::ChunkStream<'a>,
    /// The batch's number (a range's index), which names keyless rows with their position.
    pub(super) index: usize,
    /// The BLOB columns left out of the rows.
    pub(super) streamed: &'a [usize],
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

/// A range's record in the operational database, committed with its rows.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Checkpoint {
    pub(super) range: usize,
    pub(super) tally: Tally,
    pub(super) destroyed: Destroyed,
    pub(super) manifest: Option<TableManifest>,
}
