//! `strata sync`: applies the changes a followed run's replication slot carries, through the
//! same route stage as the bulk copy (issue #18).
//!
//! Source transactions are applied whole, in commit order, several to one transaction of the
//! operational database (those already received, up to [`MAX_BATCH_CHANGES`] changes) that
//! also records the position reached (`_strata_sync_position`); the slot is told only after
//! that commit. A transaction at or before the recorded position was applied before a crash
//! and is skipped; a table's changes that its copy's snapshot already saw are skipped
//! ([`crate::sync::snapshot`]). So every change applies exactly once. Within a batch, writes
//! are gathered into multi-row statements ([`super::upserts`], [`super::later`]).
//!
//! Per change, the row is routed as the bulk copy routes it: an operational-tier row is
//! upserted by key (deleted when its key changed); a row that now belongs to the archive, or
//! past retention, leaves the operational database and goes to the archive outbox
//! (`_strata_sync_archive`, in the same transaction, identified by the change's LSN and
//! position, so that the archive writer appends each change once); a row that fails a check
//! goes to quarantine; a delete removes the operational row, or, for an archived record, goes to
//! the outbox as a tombstone. A changed definition of a migrated table stops sync. The archive
//! writer ([`super::outbox`]) turns the outbox into corrections and tombstones in the archive,
//! by size or time, beside the apply ([`super::writer`]). A source delete that a legal hold covers is not carried out: the record
//! goes (or stays) in the archive with a held tombstone. A change that moves a patient's last
//! activity later is recorded, and routed by.

use super::later::{patient_of, Later, Outbox};
use super::naming::{archive_key, row_key};
use super::range::SourceRows;
use super::sinks::{LongBlobs, Quarantined, RangeSink, RowChecks};
use super::target::ensure_bookkeeping_tables;
use super::upserts::{gatherable, quarantine_refused, Upserts};
use super::Migration;
use crate::db::{quote, Column, Db};
use crate::error::{IngestError, Result};
use crate::layout::TableLayout;
use crate::load::TargetTx;
use crate::sync::pgoutput::{Datum, Message, Relation};
use crate::sync::snapshot::XidSnapshot;
use crate::sync::stream::{parse_lsn, ChangeStream, SourceTransaction};
use crate::target_check::TargetChecks;
use crate::value::{ColumnType, Value};
use chrono::NaiveDate;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use strata_cutoff_policies::{PatientFacts, Tier};

/// How often sync measures how far behind it is and what the slot holds back.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// How often sync asks whether the archive writer is due ([`super::outbox::FlushDue`]).
const WRITER_DUE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Changes applied in one target transaction, at most (beyond it, the transaction that
/// passes it): few commits while catching up, locks held for a fraction of a second.
const MAX_BATCH_CHANGES: u64 = 10_000;
/// Bytes of changes (as the stream carried them) applied in one target transaction, at most:
/// a batch holds its gathered rows in memory until it commits.
const MAX_BATCH_BYTES: usize = 32 << 20;

/// How long an open batch waits for another source transaction before it commits.
const BATCH_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// Source transactions applied in one open target transaction.
struct Batch<'a> {
    tx: TargetTx,
    /// Operational upserts gathered into multi-row statements.
    upserts: Upserts<'a>,
    /// The position just past the last of them.
    end_lsn: u64,
    transactions: u64,
    changes: u64,
    bytes: usize,
    /// When the first of them committed on the source.
    oldest_commit_micros: Option<i64>,
}

impl Batch<'_> {
    async fn begin(target: &Db) -> Result<Self> {
        Ok(Batch {
            tx: TargetTx::begin(target).await?,
            upserts: Upserts::default(),
            end_lsn: 0,
            transactions: 0,
            changes: 0,
            bytes: 0,
            oldest_commit_micros: None,
        })
    }

    /// Records the position reached in the same transaction, commits, and only then tells the
    /// slot. Returns the position.
    async fn commit(
        mut self,
        run_id: &str,
        slot: &str,
        stream: &mut ChangeStream,
        progress: &crate::progress::SyncProgress,
        report: &mut SyncReport,
    ) -> Result<u64> {
        self.upserts.flush(&mut self.tx, run_id, report).await?;
        self.upserts.later.write(&mut self.tx, run_id).await?;
        record_position(&mut self.tx, run_id, slot, self.end_lsn).await?;
        self.tx.commit().await?;
        stream.confirm(self.end_lsn);
        report.transactions += self.transactions;
        progress
            .transactions
            .fetch_add(self.transactions, Ordering::Relaxed);
        progress.changes.fetch_add(self.changes, Ordering::Relaxed);
        // How long after its commit on the source the batch's first transaction was applied.
        if let Some(committed) = self.oldest_commit_micros {
            let now = chrono::Utc::now().timestamp_micros() - POSTGRES_EPOCH_MICROS;
            progress
                .lag_ms
                .store(((now - committed).max(0) / 1000) as u64, Ordering::Relaxed);
        }
        Ok(self.end_lsn)
    }
}

/// 2000-01-01 in Unix microseconds: PostgreSQL's timestamps count from there.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// What the WAL a slot holds back calls for, against `[sync] max_retained_wal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retained {
    /// Under 80 % of the limit, or no limit.
    Fine,
    /// At 80 % of it or more.
    Warn,
    /// At the limit or past it: sync stops.
    Stop,
}

fn retained_verdict(retained: u64, limit: Option<u64>) -> Retained {
    match limit {
        Some(limit) if retained >= limit => Retained::Stop,
        Some(limit) if u128::from(retained) * 5 >= u128::from(limit) * 4 => Retained::Warn,
        _ => Retained::Fine,
    }
}

/// Sync's periodic look at the source: lag, retained WAL, apply rate.
#[derive(Default)]
struct SlotWatch {
    /// Whether the last look warned (a warning is logged once per crossing).
    warned: bool,
    /// Transactions applied at the last look, and when.
    last: Option<(u64, std::time::Instant)>,
}

impl SlotWatch {
    /// Measures the lag behind the source (everything `through` is applied) and the WAL the
    /// slot holds back; logs them; warns near `limit` and stops at it.
    async fn check(
        &mut self,
        source: &Db,
        slot: &str,
        through: u64,
        limit: Option<u64>,
        progress: &crate::progress::SyncProgress,
    ) -> Result<()> {
        let rows = source
            .fetch_all(
                format!(
                    "SELECT pg_current_wal_lsn()::text, COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint \
                     FROM pg_replication_slots WHERE slot_name = '{}'",
                    slot.replace('\'', "''")
                ),
                vec![ColumnType::Text, ColumnType::Int],
            )
            .await?;
        let Some([Value::Text(current), Value::Int(retained)]) =
            rows.first().map(|r| [r[0].clone(), r[1].clone()])
        else {
            return Err(IngestError::Run(format!(
                "replication slot {slot} is gone from the source: it can no longer be followed"
            )));
        };
        let lag = parse_lsn(&current)?.saturating_sub(through);
        let retained = retained.max(0) as u64;
        progress.lag_bytes.store(lag, Ordering::Relaxed);
        progress
            .retained_wal_bytes
            .store(retained, Ordering::Relaxed);
        let applied = progress.transactions.load(Ordering::Relaxed);
        let now = std::time::Instant::now();
        let rate = self.last.map_or(0.0, |(before, at)| {
            (applied - before) as f64 / now.duration_since(at).as_secs_f64().max(0.001)
        });
        self.last = Some((applied, now));
        tracing::info!(
            lag_bytes = lag,
            lag_seconds = progress.lag_ms.load(Ordering::Relaxed) as f64 / 1000.0,
            retained_wal_bytes = retained,
            transactions_per_second = rate,
            "sync"
        );
        match retained_verdict(retained, limit) {
            Retained::Fine => self.warned = false,
            Retained::Warn if !self.warned => {
                self.warned = true;
                tracing::warn!(
                    retained_wal_bytes = retained,
                    limit = limit.unwrap_or_default(),
                    "the replication slot holds back 80 % or more of [sync] max_retained_wal of the source's WAL: sync is not keeping up"
                );
            }
            Retained::Warn => {}
            Retained::Stop => {
                return Err(IngestError::Run(format!(
                    "replication slot {slot} holds back {retained} bytes of the source's WAL, at or past [sync] max_retained_wal ({} bytes): sync stops to protect the source's disk. Let it catch up (`strata sync` applies {rate:.0} transactions/s here), raise the limit if the source's disk allows, or give up following (`strata sync stop --drop-slot`, then migrate again); PostgreSQL's max_slot_wal_keep_size is the last line of defence",
                    limit.unwrap_or_default()
                )));
            }
        }
        Ok(())
    }
}

/// The position table in the operational database.
pub(super) const POSITION_TABLE: &str = "_strata_sync_position";
/// The archive outbox in the operational database.
pub(super) const OUTBOX_TABLE: &str = "_strata_sync_archive";
/// Patients whose last activity a change moved later, for the next tiering pass.
pub(super) const ACTIVITY_TABLE: &str = "_strata_patient_activity";
/// The archive writer's batches whose records moved back to the operational tier were
/// inserted there (in the same transaction): a batch retried after a crash does not insert a
/// keyless table's rows twice.
pub(super) const REINSTATED_TABLE: &str = "_strata_sync_reinstated";

/// How long `strata sync` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncUntil {
    /// Until every change committed on the source before it started is applied.
    CaughtUp,
    /// Until stopped.
    Stopped,
}

/// What a sync applied.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncReport {
    /// The run followed.
    pub run_id: String,
    /// Source transactions applied.
    pub transactions: u64,
    /// Changes seen by a table's copy, or applied before a restart: skipped.
    pub skipped_changes: u64,
    /// Rows upserted into the operational database.
    pub upserted: u64,
    /// Rows deleted from it.
    pub deleted: u64,
    /// Changes for the archive, in the outbox.
    pub archive_changes: u64,
    /// Operational records the source deleted while a legal hold covered them: moved to the
    /// archive with their deletion on record (a held tombstone) instead of deleted.
    pub held_deletions: u64,
    /// What the archive writer wrote of the outbox.
    pub archive: super::outbox::OutboxReport,
    /// Rows quarantined.
    pub quarantined: u64,
    /// The position applied up to (LSN).
    pub applied_lsn: String,
}

/// A migrated table as the stream names it.
struct Followed<'a> {
    layout: &'a TableLayout,
    /// The source schema the copy read it from (the stream names a relation by schema and
    /// name).
    schema: String,
    /// The snapshot its copy was read in, and that snapshot's WAL position.
    seen: XidSnapshot,
    seen_lsn: u64,
    /// The operational table's columns (declared types, for casts).
    columns: Vec<Column>,
    checks: TargetChecks,
}

/// What sync knows of patients' activity: the facts it routes by, and the last activity date
/// it noted of each patient (see `Migration::note_activity`).
struct Activity {
    facts: HashMap<String, PatientFacts>,
    noted: HashMap<String, NaiveDate>,
    /// Whether a patient was noted since the archive writer last ran.
    pending: bool,
}

/// Where a routed row goes.
enum Routed {
    Operational(Vec<Value>),
    /// Values, the outbox change (`upsert` or `purge`), patient and record date.
    Archive(Vec<Value>, &'static str, Option<String>, Option<NaiveDate>),
    Quarantine(Quarantined, Vec<Value>),
}

/// The sink of one changed row: where the route stage sends it.
struct Deciding<'c> {
    checks: RowChecks<'c>,
    routed: &'c mut Option<Routed>,
    /// The record date the route stage read.
    date: &'c mut Option<NaiveDate>,
}

impl RangeSink for Deciding<'_> {
    fn decided(&mut self, date: Option<NaiveDate>) {
        *self.date = date;
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
        _ordinal: (usize, u64),
        column: usize,
        reason: &str,
        in_range: u64,
    ) -> u64 {
        let key = row_key(layout, values, (0, 0));
        *self.routed = Some(Routed::Quarantine(
            Quarantined::new(layout, key, column, reason, values),
            values.to_vec(),
        ));
        in_range
    }

    fn purge(
        &mut self,
        _layout: &TableLayout,
        _patient: Option<&str>,
        values: &[Value],
        _ordinal: (usize, u64),
    ) {
        *self.routed = Some(Routed::Archive(values.to_vec(), "purge", None, None));
    }

    async fn operational(&mut self, values: Vec<Value>) -> Result<Option<(Vec<Value>, String)>> {
        *self.routed = Some(Routed::Operational(values));
        Ok(None)
    }

    async fn archive(
        &mut self,
        _layout: &TableLayout,
        patient: Option<&str>,
        date: Option<NaiveDate>,
        values: Vec<Value>,
        _long: &LongBlobs<'_>,
    ) -> Result<()> {
        *self.routed = Some(Routed::Archive(
            values,
            "upsert",
            patient.map(str::to_string),
            date,
        ));
        Ok(())
    }
}

/// A datum as the column's value (text in the type's output format; the route stage coerces
/// what it can from text); None for an unchanged TOASTed value. A `character(n)` value loses
/// its padding, as the bulk copy's cast to text drops it: a record's key and values are the
/// same whichever way they came.
fn datum_value(datum: &Datum, column: &Column) -> Result<Option<Value>> {
    Ok(Some(match datum {
        Datum::Null => Value::Null,
        Datum::Unchanged => return Ok(None),
        Datum::Text(s) if blank_padded(column) => Value::Text(s.trim_end_matches(' ').to_string()),
        Datum::Text(s) => match column.col_type {
            ColumnType::Bytes => Value::Bytes(
                s.strip_prefix("\\x")
                    .and_then(|h| hex::decode(h).ok())
                    .ok_or_else(|| {
                        IngestError::Run("change stream: a bytea value is not hex".into())
                    })?,
            ),
            ColumnType::TimestampTz => {
                match chrono::DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z") {
                    Ok(t) => Value::TimestampTz(t.with_timezone(&chrono::Utc)),
                    Err(_) => Value::Text(s.clone()),
                }
            }
            _ => Value::Text(s.clone()),
        },
    }))
}

/// Whether a column is PostgreSQL's blank-padded `character(n)` (not `character varying`).
fn blank_padded(column: &Column) -> bool {
    column.col_type == ColumnType::Text
        && column.decl_type.starts_with("character")
        && !column.decl_type.starts_with("character varying")
}

impl Followed<'_> {
    /// Whether the table's copy already holds the changes of transaction `xid`, committed at
    /// `commit_lsn`. One committed after the snapshot's WAL position cannot have been seen
    /// (which keeps the 32-bit id's comparison within its window however long sync runs).
    fn copied(&self, xid: u32, commit_lsn: u64) -> bool {
        commit_lsn <= self.seen_lsn && self.seen.saw(xid)
    }
}

impl Migration {
    /// Applies the changes of the last finished run's replication slot: see the module's docs.
    pub async fn sync(&self, until: SyncUntil) -> Result<SyncReport> {
        let run = self.control.latest_run().await?.ok_or_else(|| {
            IngestError::Run("no run to follow: `strata migrate --follow` makes one".into())
        })?;
        let slot = self.control.sync_of(&run.run_id).await?.ok_or_else(|| {
            IngestError::Run(format!(
                "run {} was migrated without a replication slot and cannot be followed: `strata migrate --follow` (after a rollback) makes a run that can",
                run.run_id
            ))
        })?;
        if run.status != "done" {
            return Err(IngestError::Run(format!(
                "the bulk copy of run {} has not finished (status {}): `strata migrate --follow` finishes it, then follows",
                run.run_id, run.status
            )));
        }
        if run.policy_hash != self.policy.hash() {
            return Err(IngestError::Run(format!(
                "run {} was copied under policy version {} (hash {}); the policy file has changed since: changes are routed as the copy was, so restore it to follow the run",
                run.run_id, run.policy_version, run.policy_hash
            )));
        }
        if slot.dropped_at.is_some() {
            return Err(IngestError::Run(format!(
                "the replication slot of run {} was dropped: it is no longer followed",
                run.run_id
            )));
        }
        refuse_unfollowable(&self.layouts)?;
        self.refuse_unprepared().await?;
        let target = Db::connect(
            &self.config.resolve_url(&self.config.operational.url)?,
            false,
        )
        .await?;
        ensure_bookkeeping_tables(&target).await?;
        ensure_sync_tables(&target).await?;
        let snapshots = self.control.table_snapshots(&run.run_id).await?;
        let mut tables: HashMap<String, Followed<'_>> = HashMap::new();
        for layout in &self.layouts {
            let Some((xids, lsn)) = snapshots.get(&layout.name) else {
                continue;
            };
            let columns = self.operational_columns(layout, &target).await?;
            let checks = TargetChecks::new(&columns, target.kind());
            tables.insert(
                layout.name.clone(),
                Followed {
                    schema: source_schema(&self.source, &layout.name).await?,
                    layout,
                    seen: xids.parse().map_err(IngestError::Run)?,
                    seen_lsn: parse_lsn(lsn)?,
                    columns,
                    checks,
                },
            );
        }
        let mut applied = applied_position(&target, &run.run_id, &slot.slot).await?;
        let flush_bytes = crate::config::parse_size(&self.config.sync.archive_flush_bytes)
            .map_err(|e| IngestError::Config {
                problems: vec![format!("[sync] archive_flush_bytes: {e}")],
            })?;
        let mut flush = super::outbox::FlushDue::new(
            flush_bytes,
            std::time::Duration::from_secs(self.config.sync.archive_flush_seconds),
        );
        let stop = match until {
            SyncUntil::CaughtUp => Some(current_lsn(&self.source).await?),
            SyncUntil::Stopped => None,
        };
        let mut activity = Activity {
            facts: self.patient_facts().await?,
            noted: HashMap::new(),
            pending: false,
        };
        let url = self.config.resolve_url(&self.config.source.url)?;
        wait_for_slot(&self.source, &slot.slot).await?;
        let mut stream = ChangeStream::open(&url, &slot.slot, &slot.publication, stop).await?;
        let mut report = SyncReport {
            run_id: run.run_id.clone(),
            ..Default::default()
        };
        // What waits in the outbox from before (a crash, or a stop) is written when due, like
        // the rest: changes are applied first. A write a crash interrupted is finished now.
        use super::outbox::LeftBehind;
        let mut leftover = match super::outbox::left_behind(&target, &run.run_id).await? {
            LeftBehind::Interrupted => {
                report.archive = self
                    .write_outbox(&run.run_id, &target, &activity.facts)
                    .await?;
                false
            }
            LeftBehind::Waiting => true,
            LeftBehind::Nothing => false,
        };
        let mut outboxed = 0;
        // The stream describes each relation once a session, before its first change, even
        // inside a transaction applied before a restart: every description is kept. None for
        // a published table that is not migrated.
        let mut relations: HashMap<u32, Option<String>> = HashMap::new();
        let limit = self
            .config
            .sync
            .max_retained_wal
            .as_deref()
            .map(crate::config::parse_size)
            .transpose()
            .map_err(|e| IngestError::Config {
                problems: vec![format!("[sync] max_retained_wal: {e}")],
            })?;
        let progress = self.progress.sync.clone();
        progress.following.store(1, Ordering::Relaxed);
        let mut watch = tokio::time::interval(WATCH_EVERY);
        let mut writer_due = tokio::time::interval(WRITER_DUE_EVERY);
        writer_due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watched = SlotWatch::default();
        // A slot already past the retained-WAL limit stops sync before it follows.
        watched
            .check(&self.source, &slot.slot, applied, limit, &progress)
            .await?;
        // The archive writer runs beside the apply (see `super::writer`).
        let (mut writer, writing) = super::writer::Writer::new(self, &run.run_id, &target);
        let applying = async {
            // Source transactions that are already here join the open target transaction, up to
            // MAX_BATCH_CHANGES; it commits when the stream has nothing more at once.
            let mut batch: Option<Batch> = None;
            loop {
                if progress.stop_requested() {
                    break;
                }
                if let Some(outcome) = writer.outcome_now() {
                    writer.took(outcome, &mut report.archive)?;
                }
                // What the writer can only do while no change is applied, once the batch is in.
                if writer.waits() && batch.is_none() {
                    writer.finish(&mut report.archive).await?;
                    continue;
                }
                let next = match batch.as_ref() {
                    Some(b)
                        if b.changes >= MAX_BATCH_CHANGES
                            || b.bytes >= MAX_BATCH_BYTES
                            || writer.waits() =>
                    {
                        None
                    }
                    Some(_) => {
                        match tokio::time::timeout(BATCH_WAIT, stream.next_transaction()).await {
                            Ok(t) => Some(t?),
                            Err(_) => None,
                        }
                    }
                    None => tokio::select! {
                        t = stream.next_transaction() => Some(t?),
                        _ = progress.stopping() => break,
                        outcome = writer.outcome() => {
                            writer.took(outcome, &mut report.archive)?;
                            continue;
                        }
                        _ = watch.tick() => {
                            // Nothing is pending: what the source sent while idle (transactions
                            // on other tables) needs no apply, and the slot may move past it.
                            if stream.idle_through() > applied {
                                stream.confirm(stream.idle_through());
                            }
                            let through = applied.max(stream.idle_through());
                            watched.check(&self.source, &slot.slot, through, limit, &progress).await?;
                            continue;
                        }
                        _ = writer_due.tick() => {
                            let waiting = leftover || report.archive_changes > outboxed || activity.pending;
                            if writer.busy() {
                                // What the pass under way does not take starts to age.
                                flush.note(waiting);
                            } else if flush.due(waiting, &target, &run.run_id).await? {
                                writer.start(applied, &activity.facts)?;
                                outboxed = report.archive_changes;
                                (leftover, activity.pending) = (false, false);
                                flush.taken();
                            }
                            continue;
                        }
                    },
                };
                let t = match next {
                    Some(Some(t)) => t,
                    // The batch is full, or nothing more came at once: it commits.
                    None => {
                        if let Some(b) = batch.take() {
                            applied = b
                                .commit(
                                    &run.run_id,
                                    &slot.slot,
                                    &mut stream,
                                    &progress,
                                    &mut report,
                                )
                                .await?;
                        }
                        continue;
                    }
                    Some(None) => break,
                };
                for m in &t.messages {
                    if let Message::Relation(r) = m {
                        // (A table of the same name in another schema is not the one copied.)
                        let migrated = tables.get(&r.name).filter(|f| f.schema == r.namespace);
                        if let Some(f) = migrated {
                            check_definition(f.layout, r)?;
                        }
                        relations.insert(r.oid, migrated.map(|_| r.name.clone()));
                    }
                }
                if t.end_lsn <= applied {
                    report.skipped_changes += t.messages.len() as u64;
                    continue;
                }
                let table = |oid: &u32| -> Result<Option<&Followed<'_>>> {
                    match relations.get(oid) {
                        Some(name) => Ok(name.as_ref().and_then(|n| tables.get(n))),
                        None => Err(IngestError::Run(format!(
                            "change stream: a change to relation {oid} before its description"
                        ))),
                    }
                };
                if batch.is_none() {
                    batch = Some(Batch::begin(&target).await?);
                }
                let b = batch.as_mut().expect("a batch is open");
                self.apply_transaction(b, &t, &table, &run.run_id, &mut activity, &mut report)
                    .await?;
                b.end_lsn = t.end_lsn;
                b.transactions += 1;
                b.changes += t.messages.len() as u64;
                b.bytes += t.bytes;
                b.oldest_commit_micros.get_or_insert(t.commit_time_micros);
            }
            if let Some(b) = batch.take() {
                applied = b
                    .commit(&run.run_id, &slot.slot, &mut stream, &progress, &mut report)
                    .await?;
            }
            stream.close().await?;
            Ok::<_, IngestError>(())
        };
        // The apply over, a pass under way is dropped (as a crash would leave it).
        tokio::select! {
            applied = applying => applied?,
            never = writing => match never {},
        }
        // (A catch-up asked to stop leaves the outbox to the next sync.)
        if until == SyncUntil::CaughtUp && !progress.stop_requested() {
            report.archive.add(
                self.write_outbox(&run.run_id, &target, &activity.facts)
                    .await?,
            );
        }
        target.close().await;
        report.applied_lsn = lsn_text(applied);
        Ok(report)
    }

    /// Applies one source transaction's changes in the open batch (`table`: the migrated
    /// table a relation id names, None for one not migrated).
    async fn apply_transaction<'u>(
        &self,
        b: &mut Batch<'u>,
        t: &SourceTransaction,
        table: &dyn Fn(&u32) -> Result<Option<&'u Followed<'u>>>,
        run_id: &str,
        activity: &mut Activity,
        report: &mut SyncReport,
    ) -> Result<()> {
        let (tx, upserts) = (&mut b.tx, &mut b.upserts);
        for (position, message) in t.messages.iter().enumerate() {
            let change = Change {
                lsn: t.commit_lsn,
                position,
                run_id,
                parts: std::cell::Cell::new(0),
            };
            match message {
                Message::Relation(_) => {}
                Message::Insert { relation, new } | Message::Update { relation, new, .. } => {
                    let Some(f) = table(relation)? else {
                        continue;
                    };
                    if f.copied(t.xid, t.commit_lsn) {
                        report.skipped_changes += 1;
                        continue;
                    }
                    let old = match message {
                        Message::Update { old: Some(old), .. } => Some(old),
                        _ => None,
                    };
                    let update = matches!(message, Message::Update { .. });
                    self.apply_row(
                        (tx, upserts),
                        f,
                        old,
                        new,
                        update,
                        activity,
                        &change,
                        report,
                    )
                    .await?;
                }
                Message::Delete { relation, old } => {
                    let Some(f) = table(relation)? else {
                        continue;
                    };
                    if f.copied(t.xid, t.commit_lsn) {
                        report.skipped_changes += 1;
                        continue;
                    }
                    let values = tuple_values(f.layout, old)?;
                    if gatherable(tx, f.layout) && self.policy.holds().is_empty() {
                        let mut values = coerced(f.layout, values);
                        if !upserts.supersede(f.layout, &mut values, false) {
                            upserts.flush(tx, run_id, report).await?;
                        }
                        upserts.delete(f.layout, &f.columns, values, (t.commit_lsn, position));
                        continue;
                    }
                    upserts.flush(tx, run_id, report).await?;
                    if self
                        .delete_held((tx, upserts), f, &values, &activity.facts, &change)
                        .await?
                    {
                        report.held_deletions += 1;
                        report.archive_changes += 1;
                        continue;
                    }
                    delete_row((tx, upserts), f, &values, &change, report).await?;
                }
                Message::Truncate {
                    relations: oids, ..
                } => {
                    upserts.flush(tx, run_id, report).await?;
                    for oid in oids {
                        let Some(f) = table(oid)? else {
                            continue;
                        };
                        if f.copied(t.xid, t.commit_lsn) {
                            continue;
                        }
                        if !self.policy.holds().is_empty() {
                            return Err(IngestError::Run(format!(
                            "table {} was truncated on the source while legal holds are in force: sync stops rather than delete records a hold may cover. Restore the table on the source, or release the holds (`strata hold list`), then `strata sync` again",
                            f.layout.name
                        )));
                        }
                        tx.execute(&format!("DELETE FROM {}", quote(&f.layout.name)))
                            .await?;
                        upserts
                            .later
                            .outbox(f.layout, &change, &Outbox::truncate(f.layout));
                        report.archive_changes += 1;
                    }
                }
                Message::Other(_) => {}
            }
        }
        if upserts.later.full() {
            upserts.later.write(tx, run_id).await?;
        }
        Ok(())
    }

    /// Applies an inserted or updated row: its unchanged TOASTed values taken from the
    /// operational row, routed, and written where it belongs; the row under its old key (a
    /// changed key) removed first.
    #[allow(clippy::too_many_arguments)]
    async fn apply_row<'u>(
        &self,
        (tx, upserts): (&mut TargetTx, &mut Upserts<'u>),
        f: &'u Followed<'_>,
        old: Option<&Vec<Datum>>,
        new: &[Datum],
        update: bool,
        activity: &mut Activity,
        change: &Change<'_>,
        report: &mut SyncReport,
    ) -> Result<()> {
        let layout = f.layout;
        let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
        let mut values = Vec::with_capacity(new.len());
        let mut unchanged = Vec::new();
        for (i, (d, c)) in new.iter().zip(layout.columns()).enumerate() {
            match datum_value(d, c)? {
                Some(v) => values.push(v),
                None => {
                    unchanged.push(i);
                    values.push(Value::Null);
                }
            }
        }
        let old_values = old.map(|o| tuple_values(layout, o)).transpose()?;
        let gather = gatherable(tx, layout);
        let key_changed = old_values.as_ref().is_some_and(|o| {
            let new_key = coerced(layout, values.clone());
            layout.key.iter().any(|&k| o[k] != new_key[k])
        });
        // The old row goes first: a keyless table's (identified by its values), or the one
        // under the key the change replaced.
        let replaces = old_values.is_some() && (layout.key.is_empty() || key_changed);
        if !unchanged.is_empty() || replaces {
            // Reads and deletes below see every upsert gathered before.
            upserts.flush(tx, change.run_id, report).await?;
        }
        if !unchanged.is_empty() {
            // The values the update left alone: in the old row the stream carried (replica
            // identity full), else in the operational row (looked up by the old key, before a
            // key change removes it).
            let current = match &old_values {
                Some(o) if layout.key.is_empty() => Some(o.clone()),
                Some(o) => read_row(tx, f, o).await?,
                None if layout.key.is_empty() => None,
                None => read_row(tx, f, &values).await?,
            };
            if let Some(current) = current {
                for &i in &unchanged {
                    values[i] = current[i].clone();
                }
                unchanged.clear();
            }
        }
        // The key whose archived copy holds the values the change left alone.
        let mut base_key = String::new();
        if let Some(old_values) = &old_values {
            if key_changed && !unchanged.is_empty() {
                base_key = archive_key(layout, &coerced(layout, old_values.clone()));
            }
            if replaces {
                delete_row((tx, upserts), f, old_values, change, report).await?;
            }
        }
        // An updated record the operational database does not hold lives in the archive (or
        // quarantine): if it now belongs to the operational tier, its archived copy goes.
        // (Gathered upserts find it out as they run: see `super::upserts`.)
        let elsewhere = update
            && !gather
            && !layout.key.is_empty()
            && !key_changed
            && read_row(tx, f, &values).await?.is_none();
        let unchanged: Vec<String> = unchanged
            .iter()
            .map(|&i| layout.columns()[i].name.clone())
            .collect();
        if layout.patient_column.is_none() {
            // The bulk copy selects the patient key last; a table without one selects NULL.
            values.push(Value::Null);
        }
        // Kept for routing again, should this change move its patient's activity.
        let patient = layout
            .patient_column
            .is_some()
            .then(|| (patient_of(layout, &values), values.clone()));
        let (mut routed, date) = self.decide(f, values, &activity.facts).await?;
        if let (Some((patient, values)), Some(date)) = (patient, date) {
            if self.note_activity(&mut upserts.later, &patient, date, activity, change) {
                (routed, _) = self.decide(f, values, &activity.facts).await?;
            }
        }
        match routed {
            // A record coming back to the operational tier (clinically current again) with
            // values the change did not carry: only the archived copy has them; the archive
            // writer reinstates it whole.
            Some(Routed::Operational(values)) if !unchanged.is_empty() => {
                let mut entry = Outbox::row("reinstate", layout, &values, None, None, unchanged);
                entry.base_key = base_key;
                upserts.later.outbox(layout, change, &entry);
                report.archive_changes += 1;
            }
            Some(Routed::Operational(values)) if gather => {
                if upserts.deleting(layout, &values) {
                    upserts.flush(tx, change.run_id, report).await?;
                }
                let update = (update && !key_changed).then_some((change.lsn, change.position));
                upserts.push(layout, &f.columns, values, update);
                report.upserted += 1;
            }
            Some(Routed::Operational(values)) => {
                if elsewhere {
                    upserts
                        .later
                        .outbox(layout, change, &Outbox::tombstone(layout, &values));
                    report.archive_changes += 1;
                }
                // A row the database refuses for its data goes to quarantine, as in a copy.
                let sql = upsert_sql(tx, layout, &f.columns, Existing::Replace);
                match tx.execute_refusable(&sql, &values, &types).await? {
                    Ok(_) => report.upserted += 1,
                    Err(reason) => {
                        quarantine_refused(tx, layout, &f.columns, change.run_id, &values, &reason)
                            .await?;
                        report.quarantined += 1;
                    }
                }
            }
            Some(Routed::Archive(values, kind, patient, date)) => {
                // A record lives in one place: the operational copy goes.
                if gather {
                    let mut values = coerced(layout, values.clone());
                    if !upserts.supersede(layout, &mut values, true) {
                        upserts.flush(tx, change.run_id, report).await?;
                    }
                    upserts.leave(layout, &f.columns, values);
                } else {
                    report.deleted += delete_operational(tx, f, &values).await?;
                }
                let mut entry = Outbox::row(kind, layout, &values, patient, date, unchanged);
                entry.base_key = base_key;
                upserts.later.outbox(layout, change, &entry);
                report.archive_changes += 1;
            }
            Some(Routed::Quarantine(q, values)) => {
                upserts.flush(tx, change.run_id, report).await?;
                report.deleted += delete_operational(tx, f, &coerced(layout, values)).await?;
                q.insert(tx, change.run_id, &layout.name).await?;
                report.quarantined += 1;
            }
            None => {}
        }
        Ok(())
    }
}

impl Migration {
    /// A row's record date as the route stage reads it (`values` as routed: a table without a
    /// patient column's with a NULL patient key last). `values` become the row's columns as
    /// the route stage coerces them. None when it has none or cannot be routed.
    fn record_date(
        &self,
        layout: &TableLayout,
        values: &mut Vec<Value>,
        facts: &HashMap<String, PatientFacts>,
    ) -> Option<NaiveDate> {
        let mut routed = values.clone();
        let extras = layout.take_extras(&mut routed);
        match super::route::Router::new(&self.policy, layout, facts).route(&mut routed, &extras) {
            super::route::Route::Decided { date, .. } => {
                *values = routed;
                date
            }
            super::route::Route::Quarantine { .. } => None,
        }
    }

    /// A change (of `patient`, dated `date`) that moves its patient's last activity later (a
    /// new encounter): kept in the patient facts sync routes by, and recorded in the
    /// operational database (`_strata_patient_activity`, same transaction): the archive writer
    /// then brings back the patient's archived records that are current again
    /// ([`super::outbox`]), and the next tiering pass sees it. True when it was noted (the
    /// change is routed again, by the facts as they are now).
    fn note_activity(
        &self,
        later: &mut Later,
        patient: &str,
        date: NaiveDate,
        activity: &mut Activity,
        change: &Change<'_>,
    ) -> bool {
        if activity.facts.is_empty() {
            return false; // the policy does not decide by activity
        }
        if patient.is_empty() || date > self.as_of() {
            return false;
        }
        let patient = patient.to_string();
        // The facts sync started with were read from the source as it is now, ahead of the
        // changes applied: a change as late as the patient's last activity may be the one
        // that set it, and is noted (once).
        let fact = activity.facts.entry(patient.clone()).or_default();
        if fact.last_activity.is_some_and(|d| d > date)
            || activity.noted.get(&patient).is_some_and(|&d| d >= date)
        {
            return false;
        }
        fact.last_activity = Some(date);
        activity.noted.insert(patient.clone(), date);
        activity.pending = true;
        later.activity(patient, date, change.lsn);
        true
    }

    /// Routes a changed row (its values as the route stage takes them): where it goes, and the
    /// record date the route stage read.
    async fn decide(
        &self,
        f: &Followed<'_>,
        values: Vec<Value>,
        facts: &HashMap<String, PatientFacts>,
    ) -> Result<(Option<Routed>, Option<NaiveDate>)> {
        let (mut routed, mut date) = (None, None);
        let sink = Deciding {
            checks: RowChecks::new(f.layout, &f.checks, false),
            routed: &mut routed,
            date: &mut date,
        };
        let rows = SourceRows {
            chunks: Box::pin(futures::stream::iter([Ok(vec![values])])),
            index: 0,
            streamed: &[],
        };
        self.route_rows(f.layout, rows, facts, sink).await?;
        Ok((routed, date))
    }

    /// A source delete of an operational record a legal hold covers: the hold wins, so the
    /// record leaves the operational database for the archive, with its deletion on record
    /// (the outbox's `held`). False when no hold covers it (or it is not operational: the
    /// archive writer checks archived records).
    async fn delete_held(
        &self,
        (tx, upserts): (&mut TargetTx, &mut Upserts<'_>),
        f: &Followed<'_>,
        values: &[Value],
        facts: &HashMap<String, PatientFacts>,
        change: &Change<'_>,
    ) -> Result<bool> {
        let holds = self.policy.holds();
        if holds.is_empty() {
            return Ok(false);
        }
        let layout = f.layout;
        let Some(mut row) = read_row(tx, f, values).await? else {
            return Ok(false);
        };
        let patient = patient_of(layout, &row);
        let value_of = |column: &str| {
            layout
                .columns()
                .iter()
                .position(|c| c.name == column)
                .and_then(|i| row[i].as_key_text())
        };
        let held = holds
            .iter()
            .any(|h| h.covers(&layout.name, Some(&patient), value_of));
        if !held {
            return Ok(false);
        }
        delete_operational(tx, f, &row).await?;
        let mut routed = row.clone();
        if layout.patient_column.is_none() {
            routed.push(Value::Null);
        }
        let date = self.record_date(layout, &mut routed, facts);
        if date.is_some() {
            row = routed;
        }
        let patient = (!patient.is_empty()).then_some(patient);
        let entry = Outbox::row("held", layout, &row, patient, date, Vec::new());
        upserts.later.outbox(layout, change, &entry);
        Ok(true)
    }
}

/// Where a change sits in the source's log: its transaction's commit LSN and its position in
/// that transaction (the archive outbox's identity for it), and the run followed.
pub(super) struct Change<'a> {
    pub(super) lsn: u64,
    pub(super) position: usize,
    pub(super) run_id: &'a str,
    /// Outbox entries this change made so far (a key change of an archived record makes two;
    /// a truncate of several tables, one each).
    pub(super) parts: std::cell::Cell<u32>,
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// A tuple of a delete or an old row as values (unchanged values as NULL), coerced to the
/// columns' types where they can be.
fn tuple_values(layout: &TableLayout, tuple: &[Datum]) -> Result<Vec<Value>> {
    let values = layout
        .columns()
        .iter()
        .zip(tuple)
        .map(|(c, d)| Ok(datum_value(d, c)?.unwrap_or(Value::Null)))
        .collect::<Result<Vec<Value>>>()?;
    Ok(coerced(layout, values))
}

/// Why change sync cannot follow `layout`'s table yet, if it cannot: a changed row carries
/// only its own columns, while such a table's routing needs another table's (its patient or
/// record date through a parent) or values the source computes.
pub(super) fn not_followable(layout: &TableLayout) -> Option<&'static str> {
    if layout.patient_column.is_none() && layout.patient_expr != "NULL" {
        Some("its patient comes through another table")
    } else if !layout.parent_dates.is_empty() {
        Some("its record date comes through another table")
    } else if layout.computed.iter().any(Option::is_some) {
        Some("it has computed columns")
    } else if layout.key.is_empty() && layout.maps.iter().any(Option::is_some) {
        // A keyless row is found by its values, which a mapping changed on the way.
        Some("it has no key and mapped columns: an update or delete could not find its row")
    } else if layout.key.is_empty() && layout.columns().iter().any(without_equality) {
        Some("it has no key and a column PostgreSQL cannot compare (json, xml, geometric): an update or delete could not find its row")
    } else {
        None
    }
}

/// Whether PostgreSQL has no equality for a column's type, so that a keyless row cannot be
/// found by its values (arrays of them included).
fn without_equality(column: &Column) -> bool {
    let element = column.decl_type.trim_end_matches("[]");
    matches!(
        element.split('(').next().unwrap_or("").trim(),
        "json" | "xml" | "point" | "line" | "lseg" | "box" | "path" | "polygon" | "circle"
    )
}

/// The tables change sync cannot follow yet, as one error.
pub(super) fn refuse_unfollowable(layouts: &[TableLayout]) -> Result<()> {
    let refused: Vec<String> = layouts
        .iter()
        .filter_map(|l| not_followable(l).map(|why| format!("{} ({why})", l.name)))
        .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(IngestError::Run(format!(
        "change sync does not follow these tables yet: {}. Migrate without --follow, or leave them out of the config",
        refused.join(", ")
    )))
}

/// Stops when a migrated table's definition changed on the source: its columns (names, in
/// order) are no longer the ones the run copied.
fn check_definition(layout: &TableLayout, r: &Relation) -> Result<()> {
    // Updates and deletes name a row by the replica identity: it must be the key the run
    // copied by (or the whole row).
    let identity: Vec<usize> = r
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.in_key)
        .map(|(i, _)| i)
        .collect();
    if r.replica_identity != b'f' && identity != layout.key {
        return Err(IngestError::Run(format!(
            "table {}: the source names changed rows by ({}), the run keyed them by ({}): have the owner run ALTER TABLE {} REPLICA IDENTITY FULL (or key the table as the source does), then run `strata sync` again",
            layout.name,
            identity.iter().map(|&i| r.columns[i].name.as_str()).collect::<Vec<_>>().join(", "),
            layout.key.iter().map(|&k| layout.columns()[k].name.as_str()).collect::<Vec<_>>().join(", "),
            quote(&layout.name)
        )));
    }
    let now: Vec<&str> = r.columns.iter().map(|c| c.name.as_str()).collect();
    let copied: Vec<&str> = layout.columns().iter().map(|c| c.name.as_str()).collect();
    if now != copied {
        return Err(IngestError::Run(format!(
            "table {} changed on the source: its columns are now ({}), the run copied ({}). Sync stops here, nothing after this change is applied; plan the change (add it to the operational table and the config), then run `strata sync` again",
            layout.name,
            now.join(", "),
            copied.join(", ")
        )));
    }
    Ok(())
}

async fn ensure_sync_tables(target: &Db) -> Result<()> {
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {POSITION_TABLE} (run_id TEXT NOT NULL, slot TEXT NOT NULL, lsn BIGINT NOT NULL, applied_at TEXT NOT NULL, PRIMARY KEY (run_id, slot))"
        ))
        .await?;
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {ACTIVITY_TABLE} (run_id TEXT NOT NULL, patient TEXT NOT NULL, last_activity TEXT NOT NULL, \
             source_lsn BIGINT NOT NULL, pending BIGINT NOT NULL, PRIMARY KEY (run_id, patient))"
        ))
        .await?;
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {OUTBOX_TABLE} (lsn BIGINT NOT NULL, position BIGINT NOT NULL, run_id TEXT NOT NULL, table_name TEXT NOT NULL, \
             part BIGINT NOT NULL, change TEXT NOT NULL, row_key TEXT NOT NULL, row_data TEXT NOT NULL, unchanged TEXT NOT NULL, \
             patient TEXT NOT NULL, record_date TEXT NOT NULL, base_key TEXT NOT NULL, drain TEXT NOT NULL DEFAULT '', PRIMARY KEY (lsn, position, part))"
        ))
        .await?;
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {REINSTATED_TABLE} (writer TEXT PRIMARY KEY)"
        ))
        .await
}

async fn applied_position(target: &Db, run_id: &str, slot: &str) -> Result<u64> {
    let rows = target
        .fetch_all(
            format!(
                "SELECT lsn FROM {POSITION_TABLE} WHERE run_id = '{}' AND slot = '{}'",
                run_id.replace('\'', "''"),
                slot.replace('\'', "''")
            ),
            vec![ColumnType::Int],
        )
        .await?;
    Ok(match rows.first().map(|r| &r[0]) {
        Some(Value::Int(n)) => *n as u64,
        _ => 0,
    })
}

/// How long sync waits for a slot that another connection still holds.
const SLOT_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Waits until no connection streams from `slot`: a sync killed a moment ago holds it until
/// its server process sees the connection gone, and a restart must not fail for that. A slot
/// still held after [`SLOT_BUSY_WAIT`] is another sync's: an error says so.
async fn wait_for_slot(source: &Db, slot: &str) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        let rows = source
            .fetch_all(
                format!(
                    "SELECT COALESCE(active_pid, 0) FROM pg_replication_slots WHERE slot_name = '{}'",
                    slot.replace('\'', "''")
                ),
                vec![ColumnType::Int],
            )
            .await?;
        let pid = match rows.first().map(|r| &r[0]) {
            Some(Value::Int(pid)) => *pid,
            _ => 0,
        };
        if pid == 0 {
            return Ok(());
        }
        if started.elapsed() >= SLOT_BUSY_WAIT {
            return Err(IngestError::Run(format!(
                "replication slot {slot} is in use by another connection (server process {pid}): is another `strata sync` running? Stop it first"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The schema of the table the source's connection reads as `table` (as the bulk copy names
/// it, unqualified).
async fn source_schema(source: &Db, table: &str) -> Result<String> {
    let literal = format!("'{}'", quote(table).replace('\'', "''"));
    let rows = source
        .fetch_all(
            format!(
                "SELECT n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass({literal})"
            ),
            vec![ColumnType::Text],
        )
        .await?;
    match rows.into_iter().next().and_then(|r| r.into_iter().next()) {
        Some(Value::Text(schema)) => Ok(schema),
        _ => Err(IngestError::Run(format!(
            "table {table} is no longer on the source: sync cannot follow it"
        ))),
    }
}

async fn current_lsn(source: &Db) -> Result<u64> {
    let rows = source
        .fetch_all(
            "SELECT pg_current_wal_lsn()::text".into(),
            vec![ColumnType::Text],
        )
        .await?;
    match rows.first().map(|r| &r[0]) {
        Some(Value::Text(t)) => parse_lsn(t),
        _ => Err(IngestError::Run("the source gave no WAL position".into())),
    }
}

async fn record_position(tx: &mut TargetTx, run_id: &str, slot: &str, lsn: u64) -> Result<()> {
    let p = |n| tx.placeholder(n);
    let sql = format!(
        "INSERT INTO {POSITION_TABLE} (run_id, slot, lsn, applied_at) VALUES ({}, {}, CAST({} AS BIGINT), {}) \
         ON CONFLICT (run_id, slot) DO UPDATE SET lsn = excluded.lsn, applied_at = excluded.applied_at",
        p(1),
        p(2),
        p(3),
        p(4)
    );
    tx.execute_with(
        &sql,
        &[
            run_id.to_string(),
            slot.to_string(),
            lsn.to_string(),
            chrono::Utc::now().to_rfc3339(),
        ],
    )
    .await
}

/// `col = CAST(? AS decl)` for the key columns (or every column of a keyless table).
fn match_columns(tx: &TargetTx, f: &Followed<'_>, from: usize) -> (String, Vec<usize>) {
    let layout = f.layout;
    let at: Vec<usize> = if layout.key.is_empty() {
        (0..layout.columns().len()).collect()
    } else {
        layout.key.clone()
    };
    let conditions: Vec<String> = at
        .iter()
        .enumerate()
        .map(|(n, &i)| {
            let name = quote(&layout.target_names[i]);
            let p = cast(tx, &f.columns[i], n + from);
            if layout.key.is_empty() {
                format!("{name} IS NOT DISTINCT FROM {p}")
            } else {
                format!("{name} = {p}")
            }
        })
        .collect();
    (conditions.join(" AND "), at)
}

fn cast(tx: &TargetTx, column: &Column, n: usize) -> String {
    match tx {
        TargetTx::Postgres(_) => format!("CAST(${n} AS {})", column.decl_type),
        TargetTx::Sqlite(_) => "?".into(),
    }
}

/// Deletes the operational row with `values`' key (one matching row of a keyless table);
/// returns how many went.
async fn delete_operational(tx: &mut TargetTx, f: &Followed<'_>, values: &[Value]) -> Result<u64> {
    let (conditions, at) = match_columns(tx, f, 1);
    let table = quote(&f.layout.name);
    let sql = match (f.layout.key.is_empty(), &*tx) {
        (false, _) => format!("DELETE FROM {table} WHERE {conditions}"),
        (true, TargetTx::Postgres(_)) => format!(
            "DELETE FROM {table} WHERE ctid = (SELECT ctid FROM {table} WHERE {conditions} LIMIT 1)"
        ),
        (true, TargetTx::Sqlite(_)) => format!(
            "DELETE FROM {table} WHERE rowid = (SELECT rowid FROM {table} WHERE {conditions} LIMIT 1)"
        ),
    };
    let row: Vec<Value> = at.iter().map(|&i| values[i].clone()).collect();
    let types: Vec<ColumnType> = at.iter().map(|&i| f.layout.columns()[i].col_type).collect();
    tx.execute_values(&sql, &row, &types).await
}

/// Deletes a row (a source delete, or the old version of a row whose key changed): from the
/// operational database if it is there, else it is an archived record's tombstone.
async fn delete_row(
    (tx, upserts): (&mut TargetTx, &mut Upserts<'_>),
    f: &Followed<'_>,
    values: &[Value],
    change: &Change<'_>,
    report: &mut SyncReport,
) -> Result<()> {
    let values = coerced(f.layout, values.to_vec());
    let gone = delete_operational(tx, f, &values).await?;
    report.deleted += gone;
    if gone == 0 {
        upserts
            .later
            .outbox(f.layout, change, &Outbox::tombstone(f.layout, &values));
        report.archive_changes += 1;
    }
    Ok(())
}

/// Values coerced to the layout's column types (for binding).
fn coerced(layout: &TableLayout, mut values: Vec<Value>) -> Vec<Value> {
    for (v, c) in values.iter_mut().zip(layout.columns()) {
        if let Ok(x) = v.clone().coerce(c.col_type) {
            *v = x;
        }
    }
    values
}

/// The operational row with `values`' key, read back as the layout's types (through text, as
/// the stream carries values).
async fn read_row(
    tx: &mut TargetTx,
    f: &Followed<'_>,
    values: &[Value],
) -> Result<Option<Vec<Value>>> {
    let values = coerced(f.layout, values.to_vec());
    let (conditions, at) = match_columns(tx, f, 1);
    let layout = f.layout;
    let names: Vec<String> = layout
        .target_names
        .iter()
        .map(|n| match tx {
            TargetTx::Postgres(_) => format!("CAST({} AS TEXT)", quote(n)),
            TargetTx::Sqlite(_) => format!(
                "CASE WHEN typeof({0}) = 'blob' THEN '\\x' || hex({0}) ELSE CAST({0} AS TEXT) END",
                quote(n)
            ),
        })
        .collect();
    let sql = format!(
        "SELECT {} FROM {} WHERE {conditions}",
        names.join(", "),
        quote(&layout.name)
    );
    let key: Vec<Value> = at.iter().map(|&i| values[i].clone()).collect();
    let key_types: Vec<ColumnType> = at.iter().map(|&i| layout.columns()[i].col_type).collect();
    let Some(texts) = tx.fetch_text_row(&sql, &key, &key_types).await? else {
        return Ok(None);
    };
    let datums: Vec<Datum> = texts
        .into_iter()
        .map(|t| t.map_or(Datum::Null, Datum::Text))
        .collect();
    tuple_values(layout, &datums).map(Some)
}

/// What [`upsert_row`] does to a row already there with the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Existing {
    /// Updates it.
    Replace,
    /// Keeps it (it is newer).
    Keep,
}

/// Inserts the row, or updates the one with its key (or keeps it: `existing`).
pub(super) async fn upsert_row(
    tx: &mut TargetTx,
    layout: &TableLayout,
    columns: &[Column],
    values: &[Value],
    existing: Existing,
) -> Result<()> {
    let sql = upsert_sql(tx, layout, columns, existing);
    let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
    tx.execute_values(&sql, values, &types).await.map(|_| ())
}

/// The statement of [`upsert_row`], its values bound in the layout's column order.
fn upsert_sql(
    tx: &TargetTx,
    layout: &TableLayout,
    columns: &[Column],
    existing: Existing,
) -> String {
    let names: Vec<String> = layout.target_names.iter().map(|n| quote(n)).collect();
    let placeholders: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cast(tx, c, i + 1))
        .collect();
    let mut sql = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        quote(&layout.name),
        names.join(", "),
        placeholders.join(", ")
    );
    if !layout.key.is_empty() {
        let keys: Vec<String> = layout.key.iter().map(|&k| names[k].clone()).collect();
        let set: Vec<String> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| !layout.key.contains(i))
            .map(|(_, n)| format!("{n} = excluded.{n}"))
            .collect();
        sql.push_str(&format!(" ON CONFLICT ({}) ", keys.join(", ")));
        if set.is_empty() || existing == Existing::Keep {
            sql.push_str("DO NOTHING");
        } else {
            sql.push_str(&format!("DO UPDATE SET {}", set.join(", ")));
        }
    }
    sql
}

impl Migration {
    /// What change sync needs on the source ([`crate::sync::prepare`]) for the configured
    /// tables and publication.
    pub async fn sync_prepare(&self) -> Result<crate::sync::prepare::Preparation> {
        let tables: Vec<crate::sync::prepare::PreparedTable> = self
            .layouts
            .iter()
            .map(|l| crate::sync::prepare::PreparedTable {
                name: l.name.clone(),
                has_primary_key: !l.schema.primary_key.is_empty(),
            })
            .collect();
        crate::sync::prepare::prepare(&self.source, &self.config.sync.publication, &tables).await
    }

    /// Refuses to follow while the source lacks what `strata sync prepare` checks (logical
    /// WAL, the role's REPLICATION, the publication of every migrated table, the replica
    /// identity of tables without a key, partitions published under their root's name):
    /// changes would be missed or could not be matched to their rows.
    pub(super) async fn refuse_unprepared(&self) -> Result<()> {
        let preparation = self.sync_prepare().await?;
        if preparation.problems.is_empty() {
            return Ok(());
        }
        Err(IngestError::Run(format!(
            "the source is not prepared for change sync:\n  - {}\n`strata sync prepare` prints the statements for the database's owner",
            preparation.problems.join("\n  - ")
        )))
    }

    /// Drops the replication slot of the last followed run (`strata sync stop --drop-slot`):
    /// the source stops keeping WAL for it; the run can no longer be followed. Returns the
    /// slot's name, None when there was none.
    pub async fn drop_slot(&self) -> Result<Option<String>> {
        let Some(run) = self.control.latest_run().await? else {
            return Ok(None);
        };
        let Some(sync) = self.control.sync_of(&run.run_id).await? else {
            return Ok(None);
        };
        if sync.dropped_at.is_none() {
            crate::sync::stream::drop_slot(&self.source, &sync.slot).await?;
            self.control.record_slot_dropped(&run.run_id).await?;
        }
        Ok(Some(sync.slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retained_wal_warns_at_80_percent_and_stops_at_the_limit() {
        let limit = Some(1000);
        assert_eq!(retained_verdict(10_000, None), Retained::Fine);
        assert_eq!(retained_verdict(799, limit), Retained::Fine);
        assert_eq!(retained_verdict(800, limit), Retained::Warn);
        assert_eq!(retained_verdict(999, limit), Retained::Warn);
        assert_eq!(retained_verdict(1000, limit), Retained::Stop);
        assert_eq!(
            retained_verdict(u64::MAX, Some(u64::MAX - 1)),
            Retained::Stop
        );
        assert_eq!(crate::config::parse_size("20GB"), Ok(20 << 30));
        assert_eq!(crate::config::parse_size("64kB"), Ok(64 << 10));
        assert_eq!(crate::config::parse_size("4096"), Ok(4096));
        assert!(crate::config::parse_size("12 parsecs").is_err());
    }

    fn column(decl_type: &str, col_type: ColumnType) -> Column {
        Column {
            name: "c".into(),
            decl_type: decl_type.into(),
            col_type,
            nullable: true,
        }
    }

    /// pgoutput sends a `character(n)` value padded; the bulk copy's cast to text dropped the
    /// padding, so a changed record keeps the key and values its copy has.
    #[test]
    fn a_blank_padded_value_arrives_as_the_copy_read_it() {
        let padded = Datum::Text("W1    ".into());
        let value = |decl: &str| {
            datum_value(&padded, &column(decl, ColumnType::from_postgres(decl)))
                .unwrap()
                .unwrap()
        };
        assert_eq!(value("character(6)"), Value::Text("W1".into()));
        assert_eq!(value("character varying(6)"), Value::Text("W1    ".into()));
        assert_eq!(value("text"), Value::Text("W1    ".into()));
    }

    /// A keyless row is found by its values: a type without equality cannot be followed.
    #[test]
    fn keyless_rows_need_comparable_columns() {
        assert!(without_equality(&column("json", ColumnType::Other)));
        assert!(without_equality(&column("json[]", ColumnType::Other)));
        assert!(without_equality(&column("point", ColumnType::Other)));
        assert!(!without_equality(&column("jsonb", ColumnType::Other)));
        assert!(!without_equality(&column(
            "numeric(8,2)",
            ColumnType::Other
        )));
    }
}
