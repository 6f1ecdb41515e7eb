//! Where tier's routed rows go: the operational rows stay; rows for the archive and rows on
//! an approved destruction list are gathered into batches, and each batch moves in one
//! transaction of the operational database:
//!
//! 1. its rows are locked where they are still the version the scan read (`ctid`, `xmin` and
//!    the key, `FOR UPDATE SKIP LOCKED`): a row the application changed, deleted or holds
//!    locked since is left for the next pass;
//! 2. a row another row still references (a foreign key of any table, whatever its
//!    `ON DELETE`) is left, and counted by the key;
//! 3. the archive's files and manifest are written (rows for the archive);
//! 4. the rows are deleted, and the batch's checkpoint (its manifest, or what it destroyed) is
//!    inserted, and the transaction commits.
//!
//! A crash before 4 leaves the rows where they were, unchanged, and at most a manifest that
//! names no checkpoint: the next pass (or compaction, retention, gc) withdraws it before it
//! starts (see `super::settle`).

use super::lists::Found;
use super::schema::{referenced_sql, tid_array, ForeignKey};
use super::{TierTable, BATCHES_TABLE};
use crate::archive_rows::archive_schema;
use crate::db::{quote, Db};
use crate::error::{IngestError, Result};
use crate::layout::{RowVersion, StreamedBlobs, TableLayout};
use crate::load::TargetTx;
use crate::migrate::destroyed::Destroyed;
use crate::migrate::naming::archive_key;
use crate::migrate::sinks::{ArchiveSide, LongBlobs, RangeOutcome, RangeSink};
use crate::migrate::Migration;
use crate::report::Tally;
use crate::value::{ColumnType, Value};
use chrono::NaiveDate;
use std::collections::{HashMap, HashSet};
use strata_archive::{BlobStore, TableManifest, TableWriter};
use strata_cutoff_policies::Tier;

/// The values a batch holds at most (inline BLOBs included), in bytes.
const BATCH_BYTES: usize = 32 << 20;

/// Archived rows sorted in memory at a time.
const RUN_BYTES: usize = 32 << 20;

/// A batch's rows locked and free to move, and its rows changed since they were read.
type Movable<T> = (Vec<(Gathered, T)>, Vec<(Gathered, T)>);

/// A row gathered for a batch, with the version it was read at.
struct Gathered {
    values: Vec<Value>,
    patient: Option<String>,
    date: Option<NaiveDate>,
    streamed: Option<StreamedBlobs>,
    version: RowVersion,
    key: String,
}

/// What one pass shares with every table's sink.
pub(super) struct PassContext<'a> {
    pub migration: &'a Migration,
    pub store: &'a strata_archive::Store,
    pub keys: &'a strata_archive::KeyRing,
    pub pass_id: &'a str,
    /// The pass's batches so far (they name the batches).
    pub batches: &'a std::sync::atomic::AtomicU32,
    pub dry_run: bool,
    /// Per record key of this table: the approved `tier` list it is on.
    pub approved: HashMap<String, String>,
    /// Record keys of this table on a pending list.
    pub pending: HashSet<String>,
}

/// The sink of one table's pass.
pub(super) struct TierSink<'a> {
    pub ctx: PassContext<'a>,
    layout: &'a TableLayout,
    pub table: &'a mut TierTable,
    /// Foreign keys that point at this table.
    pub referencing: Vec<&'a ForeignKey>,
    version: Option<RowVersion>,
    to_archive: Vec<Gathered>,
    archive_bytes: usize,
    to_destroy: Vec<(Gathered, String)>,
    destroy_bytes: usize,
    /// What the table's rows tell the destruction lists.
    found: &'a mut Found,
}

impl<'a> TierSink<'a> {
    pub(super) fn new(
        ctx: PassContext<'a>,
        layout: &'a TableLayout,
        (table, found): (&'a mut TierTable, &'a mut Found),
        referencing: Vec<&'a ForeignKey>,
    ) -> Self {
        TierSink {
            ctx,
            layout,
            table,
            referencing,
            version: None,
            to_archive: Vec::new(),
            archive_bytes: 0,
            to_destroy: Vec::new(),
            destroy_bytes: 0,
            found,
        }
    }

    /// Counts a row of an approved list that the policy no longer finds past retention.
    fn kept_off_list(&mut self, values: &[Value]) {
        if self.ctx.approved.is_empty() {
            return;
        }
        let key = archive_key(self.layout, values);
        if let Some(request) = self.ctx.approved.get(&key) {
            *self.found.kept.entry(request.clone()).or_default() += 1;
            self.table.kept_since_listed += 1;
        }
    }

    /// Rows a batch moves at most (`[operational] batch_rows`).
    fn batch_rows(&self) -> usize {
        self.ctx.migration.config().operational.batch_rows.max(1)
    }

    fn next_batch(&self) -> u32 {
        self.ctx
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    fn op(&self) -> &'a Db {
        self.ctx.migration.source()
    }

    fn gathered(
        &mut self,
        layout: &TableLayout,
        patient: Option<&str>,
        date: Option<NaiveDate>,
        values: Vec<Value>,
        long: &LongBlobs<'_>,
    ) -> Gathered {
        Gathered {
            key: archive_key(layout, &values),
            values,
            patient: patient.map(str::to_string),
            date,
            streamed: long.streamed.cloned(),
            version: self.version.take().unwrap_or(RowVersion {
                ctid: String::new(),
                xmin: String::new(),
            }),
        }
    }

    /// Locks the batch's rows that are still the version read and that no other row
    /// references: those, and the rows changed since (the rows referenced are counted by
    /// foreign key, and left out of both).
    async fn lock_movable<T>(
        &mut self,
        tx: &mut TargetTx,
        layout: &TableLayout,
        batch: Vec<(Gathered, T)>,
    ) -> Result<Movable<T>> {
        let ctids: Vec<&str> = batch.iter().map(|(g, _)| g.version.ctid.as_str()).collect();
        let array = tid_array(&ctids).ok_or_else(|| {
            IngestError::Run(format!(
                "table {}: a row's location is not one PostgreSQL prints",
                layout.relation
            ))
        })?;
        // The row's key is read back too: a location and a transaction id name the row read
        // only while the table is not rewritten (VACUUM FULL, CLUSTER keep xmin, not ctid). A
        // key PostgreSQL prints otherwise than the scan read it leaves its row for later
        // (never deleted wrongly).
        let keys: Vec<String> = layout
            .key
            .iter()
            .map(|&k| format!("{}::text", quote(&layout.columns()[k].name)))
            .collect();
        let sql = format!(
            "SELECT ctid::text, xmin::text, {} FROM {} WHERE ctid = ANY({array}) FOR UPDATE SKIP LOCKED",
            keys.join(", "),
            quote(&layout.relation)
        );
        let locked: HashSet<Vec<Option<String>>> = tx
            .fetch_text_rows(&sql, &[], &[])
            .await?
            .into_iter()
            .collect();
        let (mut movable, changed): (Vec<_>, Vec<_>) = batch.into_iter().partition(|(g, _)| {
            let mut read = vec![Some(g.version.ctid.clone()), Some(g.version.xmin.clone())];
            read.extend(layout.key.iter().map(|&k| g.values[k].as_key_text()));
            locked.contains(&read)
        });
        self.table.changed_meanwhile += changed.len() as u64;
        if movable.is_empty() || self.referencing.is_empty() {
            return Ok((movable, changed));
        }
        let ctids: Vec<&str> = movable
            .iter()
            .map(|(g, _)| g.version.ctid.as_str())
            .collect();
        let array = tid_array(&ctids).expect("checked above");
        let mut referenced: HashSet<String> = HashSet::new();
        for key in &self.referencing {
            let sql = referenced_sql(&layout.relation, key, &array);
            for row in tx.fetch_text_rows(&sql, &[], &[]).await? {
                let Some(Some(ctid)) = row.into_iter().next() else {
                    continue;
                };
                if referenced.insert(ctid) {
                    *self
                        .table
                        .kept_referenced
                        .entry(format!("{} ({})", key.child, key.name))
                        .or_default() += 1;
                }
            }
        }
        movable.retain(|(g, _)| !referenced.contains(&g.version.ctid));
        Ok((movable, changed))
    }

    /// Deletes the locked rows of `moved` in `tx`, checking each went.
    async fn delete(
        &self,
        tx: &mut TargetTx,
        layout: &TableLayout,
        moved: &[&Gathered],
    ) -> Result<()> {
        let ctids: Vec<&str> = moved.iter().map(|g| g.version.ctid.as_str()).collect();
        let array = tid_array(&ctids).expect("checked when locked");
        let sql = format!(
            "WITH d AS (DELETE FROM {} WHERE ctid = ANY({array}) RETURNING 1) SELECT count(*)::text FROM d",
            quote(&layout.relation)
        );
        let deleted = tx.fetch_text_rows(&sql, &[], &[]).await?;
        let deleted: usize = deleted
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if deleted != moved.len() {
            return Err(IngestError::Run(format!(
                "table {}: {deleted} of {} locked rows were deleted; nothing of the batch is kept",
                layout.relation,
                moved.len()
            )));
        }
        Ok(())
    }

    /// Records the batch's checkpoint in `tx`.
    async fn checkpoint(
        &self,
        tx: &mut TargetTx,
        layout: &TableLayout,
        writer: &str,
        (request, rows, keys): (Option<&str>, usize, Vec<&str>),
        (manifest, destroyed): (Option<String>, Option<String>),
    ) -> Result<()> {
        let p = |n| tx.placeholder(n);
        let sql = format!(
            "INSERT INTO {BATCHES_TABLE} (writer, table_name, pass_id, request_id, rows_moved, keys, manifest, destroyed, recorded, finished_at) \
             VALUES ({}, {}, {}, {}, CAST({} AS BIGINT), {}, {}, {}, {}, {})",
            p(1), p(2), p(3), p(4), p(5), p(6), p(7), p(8), "FALSE", p(9)
        );
        let text = |s: Option<String>| s.map_or(Value::Null, Value::Text);
        tx.execute_values(
            &sql,
            &[
                Value::Text(writer.to_string()),
                Value::Text(layout.name.clone()),
                Value::Text(self.ctx.pass_id.to_string()),
                text(request.map(str::to_string)),
                Value::Int(rows as i64),
                Value::Text(serde_json::to_string(&keys).expect("keys serialize")),
                text(manifest),
                text(destroyed),
                Value::Text(chrono::Utc::now().to_rfc3339()),
            ],
            &[
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Int,
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Text,
            ],
        )
        .await?;
        Ok(())
    }

    /// Moves the gathered archive-bound rows: see the module's docs.
    async fn flush_archive(&mut self, layout: &TableLayout) -> Result<()> {
        let batch: Vec<(Gathered, ())> = std::mem::take(&mut self.to_archive)
            .into_iter()
            .map(|g| (g, ()))
            .collect();
        self.archive_bytes = 0;
        if batch.is_empty() {
            return Ok(());
        }
        if self.ctx.dry_run {
            self.table.archived += batch.len() as u64;
            return Ok(());
        }
        let op = self.op();
        let mut tx = TargetTx::begin(op).await?;
        let (movable, _) = self.lock_movable(&mut tx, layout, batch).await?;
        if movable.is_empty() {
            return tx.commit().await;
        }
        let writer_id = format!("tier-{}-b{:05}", self.ctx.pass_id, self.next_batch());
        let m = self.ctx.migration;
        let blob_columns = layout
            .blobs
            .iter()
            .map(|b| layout.target_names[b.column].clone())
            .collect();
        let writer = TableWriter::new(
            self.ctx.store.clone(),
            self.ctx.keys.clone(),
            TableManifest::new(&layout.name, &writer_id, m.policy().version(), blob_columns),
            archive_schema(layout),
            crate::archive_rows::writer_options(layout),
        )?;
        let mut side = ArchiveSide::new(
            layout,
            (op, None),
            writer,
            BlobStore::new(self.ctx.store.clone(), self.ctx.keys.clone()),
            RUN_BYTES,
        );
        let inline_max = m.config().run.inline_blob_bytes;
        for (g, _) in &movable {
            let long = LongBlobs {
                streamed: g.streamed.as_ref(),
                inline_max,
            };
            side.archive(
                layout,
                g.patient.as_deref(),
                g.date,
                g.values.clone(),
                &long,
            )
            .await?;
        }
        let manifest = side
            .finish(layout)
            .await?
            .expect("a batch with rows writes a manifest");
        let moved: Vec<&Gathered> = movable.iter().map(|(g, _)| g).collect();
        self.delete(&mut tx, layout, &moved).await?;
        let keys = moved.iter().map(|g| g.key.as_str()).collect();
        let json = serde_json::to_string(&manifest).expect("a manifest serializes");
        self.checkpoint(
            &mut tx,
            layout,
            &writer_id,
            (None, moved.len(), keys),
            (Some(json), None),
        )
        .await?;
        tx.commit().await?;
        self.table.archived += moved.len() as u64;
        super::record_batch(self.op(), m.control(), &writer_id, &manifest).await
    }

    /// Destroys the gathered rows of approved lists: locked as the archive-bound rows are,
    /// counted and checksummed, deleted, and their destruction checkpointed per list.
    async fn flush_destroy(&mut self, layout: &TableLayout) -> Result<()> {
        let batch = std::mem::take(&mut self.to_destroy);
        self.destroy_bytes = 0;
        if batch.is_empty() {
            return Ok(());
        }
        let seen = batch.len() as u64;
        if self.ctx.dry_run {
            self.table.destroyed += seen;
            return Ok(());
        }
        // A hold placed since the pass began wins: the holds are read again now.
        let holds = crate::migrate::holds_in_force(self.ctx.migration.control()).await?;
        let (held, batch): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .partition(|(g, _)| held_now(&holds, layout, g));
        for (_, request) in held {
            *self.found.kept.entry(request).or_default() += 1;
            self.table.kept_since_listed += 1;
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = TargetTx::begin(self.op()).await?;
        let mut seen_by_request: HashMap<String, u64> = HashMap::new();
        for (_, request) in &batch {
            *seen_by_request.entry(request.clone()).or_default() += 1;
        }
        let (movable, changed) = self.lock_movable(&mut tx, layout, batch).await?;
        // A row changed since it was read keeps its list open for the next pass; a row still
        // referenced is kept (its list completes without it; a later pass lists it again).
        for (_, request) in &changed {
            *self.found.left.entry(request.clone()).or_default() += 1;
            self.table.left_on_lists += 1;
        }
        let mut by_request: HashMap<String, Vec<&Gathered>> = HashMap::new();
        for (g, request) in &movable {
            by_request.entry(request.clone()).or_default().push(g);
        }
        for (request, seen) in seen_by_request {
            let moved = by_request.get(&request).map_or(0, |r| r.len() as u64);
            let changed_here = changed.iter().filter(|(_, r)| *r == request).count() as u64;
            let referenced = seen - moved - changed_here;
            if referenced > 0 {
                *self.found.kept.entry(request).or_default() += referenced;
            }
        }
        let mut destroyed_now = 0;
        for (request, rows) in by_request {
            let writer_id = format!("tier-{}-d{:05}", self.ctx.pass_id, self.next_batch());
            let mut destroyed = Destroyed::default();
            for g in &rows {
                destroyed.add(layout, &g.values, (0, 0));
            }
            self.delete(&mut tx, layout, &rows).await?;
            let keys = rows.iter().map(|g| g.key.as_str()).collect();
            let json = serde_json::to_string(&destroyed).expect("a record serializes");
            self.checkpoint(
                &mut tx,
                layout,
                &writer_id,
                (Some(&request), rows.len(), keys),
                (None, Some(json)),
            )
            .await?;
            destroyed_now += rows.len() as u64;
        }
        tx.commit().await?;
        self.table.destroyed += destroyed_now;
        Ok(())
    }
}

/// Whether a hold in `holds` covers the gathered row. A filter hold on a column the pass did
/// not read covers it (fail closed).
fn held_now(
    holds: &[strata_cutoff_policies::LegalHold],
    layout: &TableLayout,
    g: &Gathered,
) -> bool {
    holds.iter().any(|h| {
        let unknown = std::cell::Cell::new(false);
        let covered = h.covers(&layout.name, g.patient.as_deref(), |column| {
            let read = layout
                .policy_column_names
                .iter()
                .position(|c| c == column)
                .and_then(|i| layout.policy_columns[i]);
            match read {
                Some(i) => g.values[i].as_key_text(),
                None => {
                    unknown.set(true);
                    None
                }
            }
        });
        covered || unknown.get()
    })
}

impl RangeSink for TierSink<'_> {
    fn streams_blobs(&self) -> bool {
        true
    }

    fn row_version(&mut self, version: RowVersion) {
        self.version = Some(version);
    }

    fn problem(
        &mut self,
        _layout: &TableLayout,
        _values: &[Value],
        _tier: Tier,
    ) -> Option<(usize, &'static str)> {
        None
    }

    fn quarantine(
        &mut self,
        layout: &TableLayout,
        values: &[Value],
        _ordinal: (usize, u64),
        column: usize,
        reason: &str,
        in_range: u64,
    ) -> u64 {
        // Left where it is: nothing is moved that the route stage cannot read (a row of an
        // approved list keeps its list open).
        self.version = None;
        self.table.unreadable += 1;
        if let Some(request) = self.ctx.approved.get(&archive_key(layout, values)) {
            *self.found.left.entry(request.clone()).or_default() += 1;
        }
        if self.table.unreadable_examples.len() < 10 {
            self.table.unreadable_examples.push(format!(
                "{} column {}: {reason}",
                crate::migrate::naming::row_key(layout, values, (0, 0)),
                layout.columns()[column].name
            ));
        }
        in_range
    }

    fn purge(
        &mut self,
        layout: &TableLayout,
        patient: Option<&str>,
        values: &[Value],
        _ordinal: (usize, u64),
    ) {
        let key = archive_key(layout, values);
        if let Some(request) = self.ctx.approved.get(&key).cloned() {
            let size: usize = values.iter().map(Value::size).sum();
            let long = LongBlobs {
                streamed: None,
                inline_max: 0,
            };
            let g = self.gathered(layout, patient, None, values.to_vec(), &long);
            self.to_destroy.push((g, request));
            self.destroy_bytes += size;
        } else if self.ctx.pending.contains(&key) {
            self.version = None;
            self.table.awaiting_approval += 1;
        } else {
            self.version = None;
            self.table.past_retention_listed += 1;
            self.found.newly_past_retention.push(key);
        }
    }

    async fn operational(&mut self, values: Vec<Value>) -> Result<Option<(Vec<Value>, String)>> {
        self.version = None;
        self.table.stay += 1;
        self.kept_off_list(&values);
        if self.to_destroy.len() >= self.batch_rows() || self.destroy_bytes >= BATCH_BYTES {
            let layout = self.layout;
            self.flush_destroy(layout).await?;
        }
        Ok(None)
    }

    async fn archive(
        &mut self,
        layout: &TableLayout,
        patient: Option<&str>,
        date: Option<NaiveDate>,
        values: Vec<Value>,
        long: &LongBlobs<'_>,
    ) -> Result<()> {
        self.archive_bytes += values.iter().map(Value::size).sum::<usize>();
        self.kept_off_list(&values);
        let g = self.gathered(layout, patient, date, values, long);
        self.to_archive.push(g);
        if self.to_archive.len() >= self.batch_rows() || self.archive_bytes >= BATCH_BYTES {
            self.flush_archive(layout).await?;
        }
        if self.to_destroy.len() >= self.batch_rows() || self.destroy_bytes >= BATCH_BYTES {
            self.flush_destroy(layout).await?;
        }
        Ok(())
    }

    async fn finish(mut self, layout: &TableLayout, tally: Tally) -> Result<RangeOutcome> {
        self.flush_archive(layout).await?;
        self.flush_destroy(layout).await?;
        self.table.rows_read = tally.report.source_rows;
        Ok(RangeOutcome {
            tally,
            destroyed: Destroyed::default(),
            manifest: None,
            quarantine: Vec::new(),
        })
    }
}
