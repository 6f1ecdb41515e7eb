//! The archive writer of `strata sync`: turns what sync left in the outbox
//! (`_strata_sync_archive`, in the operational database) into archive files, by size or time,
//! not one file per change.
//!
//! Each write takes a table's oldest entries (up to [`ENTRIES_PER_WRITE`]), folds them by
//! record (the last change of a record wins; a keyless table's identical rows are counted, two
//! identical rows being two records), and publishes one manifest of a run of its own,
//! `sync-{run}-{last transaction's LSN}`: the records archived again (corrections, newer than every copy
//! before them) and tombstones (records the source deleted, destroyed past retention, or
//! moved back to the operational tier; a deletion a legal hold stops is a held tombstone: the
//! record stays). Exactly once, across crashes: the entries are first marked with that name
//! (one transaction), the files and manifest written under it (the same names again on a
//! retry), and the entries deleted only once the manifest is published; a marked batch whose
//! manifest is published is only deleted.

use super::destroyed::Destroyed;
use super::follow::{ACTIVITY_TABLE, OUTBOX_TABLE, REINSTATED_TABLE};
use super::sinks::Quarantined;
use super::target::target_columns;
use super::Migration;
use crate::archive_rows::{archive_schema, ArchiveRun};
use crate::db::{Column, Db};
use crate::error::{IngestError, Result};
use crate::layout::TableLayout;
use crate::load::TargetTx;
use crate::value::{ColumnType, Value};
use base64::Engine;
use chrono::NaiveDate;
use std::collections::{BTreeMap, HashMap, HashSet};
use strata_archive::{
    ArchiveReader, ArchivedBatch, BlobRef, BlobStore, Cell, TableManifest, TableWriter,
    TableWriterOptions, Tombstone,
};
use strata_control::DestructionRecord;
use strata_cutoff_policies::{HoldScope, PatientFacts};

/// Outbox entries one write takes of a table at most (their values are held in memory).
const ENTRIES_PER_WRITE: usize = 20_000;

/// Archived rows sorted in memory at a time.
const RUN_BYTES: usize = 64 << 20;

/// What the archive writer wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OutboxReport {
    /// Outbox entries written to the archive.
    pub entries: u64,
    /// Runs of archive files published (one manifest per table and write).
    pub manifests: u64,
    /// Records archived (new, or corrections of archived ones).
    pub archived: u64,
    /// Tombstones: records the source deleted, destroyed past retention, or moved back to the
    /// operational tier.
    pub tombstones: u64,
    /// Records destroyed past retention (with a destruction record, as in a migration).
    pub destroyed: u64,
    /// Archived records moved back to the operational tier.
    pub reinstated: u64,
    /// Source deletions a legal hold stopped: (table, record key). The records stay in the
    /// archive; each deletion is on record as a held tombstone.
    pub held: Vec<(String, String)>,
    /// Tables the source truncated.
    pub truncated: Vec<String>,
    /// Changes that could not be written (put in quarantine with the reason).
    pub quarantined: u64,
}

impl OutboxReport {
    /// Adds what another write wrote.
    pub(super) fn add(&mut self, other: OutboxReport) {
        self.entries += other.entries;
        self.manifests += other.manifests;
        self.archived += other.archived;
        self.tombstones += other.tombstones;
        self.destroyed += other.destroyed;
        self.reinstated += other.reinstated;
        self.held.extend(other.held);
        self.truncated.extend(other.truncated);
        self.quarantined += other.quarantined;
    }
}

/// When the outbox is due to be written: by the size of what waits, or the age of the
/// oldest change waiting (`[sync] archive_flush_bytes`, `archive_flush_seconds`).
#[derive(Debug)]
pub(super) struct FlushDue {
    bytes_limit: u64,
    age_limit: std::time::Duration,
    /// When the first change not yet written was seen to wait.
    oldest: Option<std::time::Instant>,
    /// When the size of what waits was last measured (a sum over the outbox: not every time
    /// sync asks).
    measured: Option<std::time::Instant>,
}

/// How often the size of what waits in the outbox is measured, at most.
const MEASURE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl FlushDue {
    pub(super) fn new(bytes_limit: u64, age_limit: std::time::Duration) -> Self {
        FlushDue {
            bytes_limit,
            age_limit,
            oldest: None,
            measured: None,
        }
    }

    /// Notes whether changes wait that no pass of the writer took (the age clock starts with
    /// the first).
    pub(super) fn note(&mut self, waiting: bool) {
        if waiting {
            self.oldest.get_or_insert_with(std::time::Instant::now);
        }
    }

    /// Whether the outbox should be written now (`waiting`: whether changes joined it since
    /// a pass last took it).
    pub(super) async fn due(&mut self, waiting: bool, target: &Db, run_id: &str) -> Result<bool> {
        self.note(waiting);
        let Some(since) = self.oldest else {
            return Ok(false);
        };
        if since.elapsed() >= self.age_limit {
            return Ok(true);
        }
        if self.measured.is_some_and(|m| m.elapsed() < MEASURE_EVERY) {
            return Ok(false);
        }
        self.measured = Some(std::time::Instant::now());
        let bytes = first_value(
            target,
            format!(
                "SELECT COALESCE(SUM(LENGTH(row_data)), 0) FROM {OUTBOX_TABLE} WHERE run_id = '{}'",
                run_id.replace('\'', "''")
            ),
            ColumnType::Int,
        )
        .await?;
        let bytes = match bytes {
            Value::Int(n) => n as u64,
            _ => 0,
        };
        Ok(bytes >= self.bytes_limit)
    }

    /// A pass of the writer takes what waits: what comes after ages anew.
    pub(super) fn taken(&mut self) {
        self.oldest = None;
    }
}

/// What a sync that stopped or crashed left for the archive writer of run `run_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeftBehind {
    /// Nothing.
    Nothing,
    /// Changes or activity notes not yet written: written when due, like any.
    Waiting,
    /// A write under way (a marked batch, or a reactivation that may have put records back
    /// in the operational tier before publishing their tombstones): it is finished before
    /// any change is applied, or a change applied first (a delete) could be undone by its
    /// retry.
    Interrupted,
}

/// What the outbox and the patients' activity of run `run_id` hold.
pub(super) async fn left_behind(target: &Db, run_id: &str) -> Result<LeftBehind> {
    let run = run_id.replace('\'', "''");
    let found = first_value(
        target,
        format!(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM {OUTBOX_TABLE} WHERE run_id = '{run}' AND drain <> '') \
             OR EXISTS (SELECT 1 FROM {ACTIVITY_TABLE} WHERE run_id = '{run}' AND pending = {REACTIVATING}) THEN 2 \
             WHEN EXISTS (SELECT 1 FROM {OUTBOX_TABLE} WHERE run_id = '{run}') \
             OR EXISTS (SELECT 1 FROM {ACTIVITY_TABLE} WHERE run_id = '{run}' AND pending = 1) THEN 1 ELSE 0 END"
        ),
        ColumnType::Int,
    )
    .await?;
    Ok(match found {
        Value::Int(2) => LeftBehind::Interrupted,
        Value::Int(1) => LeftBehind::Waiting,
        _ => LeftBehind::Nothing,
    })
}

use super::reactivate::REACTIVATING;

/// One outbox entry as read back.
struct Entry {
    lsn: i64,
    position: i64,
    part: i64,
    change: String,
    key: String,
    data: String,
    unchanged: Vec<String>,
    patient: String,
    date: Option<NaiveDate>,
    /// The key of the archived copy holding the unchanged values, when not `key`.
    base_key: String,
}

/// A record as it will be archived: values (BLOB columns `Null`) and its BLOBs, either new
/// bytes or the reference of an archived copy's.
#[derive(Clone)]
pub(super) struct Record {
    pub(super) patient: String,
    pub(super) date: Option<NaiveDate>,
    pub(super) values: Vec<Value>,
    pub(super) blobs: Vec<Blob>,
}

#[derive(Clone)]
pub(super) enum Blob {
    None,
    New(Vec<u8>),
    Archived(BlobRef),
}

/// What one batch makes of a table.
pub(super) struct Batch {
    /// The manifest's writer id.
    pub(super) writer: String,
    /// Records to archive, by key.
    records: Vec<(String, Record)>,
    pub(super) tombstones: Vec<Tombstone>,
    /// Records back to the operational tier, by key (BLOBs read whole), each with a
    /// tombstone for its archived copy.
    pub(super) reinstated: Vec<(String, Vec<Value>)>,
    destroyed: Destroyed,
    /// Whether the source truncated the table first.
    truncated: bool,
}

impl Batch {
    /// A batch that only brings records back.
    pub(super) fn reinstating() -> Self {
        Batch {
            writer: String::new(),
            records: Vec::new(),
            tombstones: Vec::new(),
            reinstated: Vec::new(),
            destroyed: Destroyed::default(),
            truncated: false,
        }
    }

    /// Archives again, instead of bringing back, the records that changed later (`changed`):
    /// their later change decides where they go, and may take values only this version holds
    /// (those it left alone), so this version must be archived before it.
    pub(super) fn archive_instead(&mut self, changed: &HashSet<String>, layout: &TableLayout) {
        if changed.is_empty() {
            return;
        }
        let (later, back): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reinstated)
            .into_iter()
            .partition(|(key, _)| changed.contains(key));
        self.reinstated = back;
        for (key, mut values) in later {
            let Some(i) = self.tombstones.iter().position(|t| t.key == key) else {
                continue;
            };
            let tombstone = self.tombstones.remove(i);
            let blobs = layout
                .blobs
                .iter()
                .map(
                    |b| match std::mem::replace(&mut values[b.column], Value::Null) {
                        Value::Bytes(bytes) => Blob::New(bytes),
                        _ => Blob::None,
                    },
                )
                .collect();
            let record = Record {
                patient: tombstone.patient,
                date: tombstone.date,
                values,
                blobs,
            };
            self.records.push((key, record));
        }
    }

    /// Leaves out the records to bring back that changed later (`changed`), and their
    /// tombstones: their later change decides where they go.
    pub(super) fn keep_reinstated(&mut self, changed: &HashSet<String>) {
        if changed.is_empty() {
            return;
        }
        let left: HashSet<String> = self
            .reinstated
            .iter()
            .filter(|(key, _)| changed.contains(key))
            .map(|(key, _)| key.clone())
            .collect();
        self.reinstated.retain(|(key, _)| !left.contains(key));
        self.tombstones.retain(|t| !left.contains(&t.key));
    }
}

/// Which of `keys` (records of `table` the writer would bring back) the outbox holds a change
/// of (only among the entries not yet marked for a write, with `unmarked`): all of them when
/// it holds a truncate of the table.
pub(super) async fn changed_since(
    target: &Db,
    run_id: &str,
    table: &str,
    keys: &[&str],
    unmarked: bool,
) -> Result<HashSet<String>> {
    if keys.is_empty() {
        return Ok(HashSet::new());
    }
    let text = |t: &str| format!("'{}'", t.replace('\'', "''"));
    let ours = format!(
        "run_id = {} AND table_name = {}{}",
        text(run_id),
        text(table),
        if unmarked { " AND drain = ''" } else { "" }
    );
    let truncated = first_value(
        target,
        format!("SELECT COUNT(*) FROM {OUTBOX_TABLE} WHERE {ours} AND change = 'truncate'"),
        ColumnType::Int,
    )
    .await?;
    if !matches!(truncated, Value::Int(0)) {
        return Ok(keys.iter().map(|k| k.to_string()).collect());
    }
    let mut changed = HashSet::new();
    for chunk in keys.chunks(500) {
        let listed: Vec<String> = chunk.iter().map(|k| text(k)).collect();
        let rows = target
            .fetch_all(
                format!(
                    "SELECT DISTINCT row_key FROM {OUTBOX_TABLE} WHERE {ours} AND row_key IN ({})",
                    listed.join(", ")
                ),
                vec![ColumnType::Text],
            )
            .await?;
        changed.extend(rows.into_iter().filter_map(|r| match r.into_iter().next() {
            Some(Value::Text(k)) => Some(k),
            _ => None,
        }));
    }
    Ok(changed)
}

/// What a write does to one record, after folding its entries.
enum Fold {
    /// Archive this version (`held`: the source deleted it under a legal hold; archived with
    /// a held tombstone).
    Archive { record: Record, held: bool },
    /// A tombstone (`destroyed`: the values of a record destroyed past retention; `last`: its
    /// version folded before, whose values a key change's new record may keep).
    Gone {
        patient: String,
        destroyed: Option<Vec<Value>>,
        last: Option<Record>,
    },
    /// Back to the operational tier: upserted there, and a tombstone in the archive.
    Reinstate(Record),
    /// A keyless table's record (of `patient`): copies added (or removed, negative) to those
    /// archived.
    Count {
        patient: String,
        record: Option<Record>,
        delta: i64,
    },
}

/// What a pass of the archive writer leaves for a moment when no change is being applied:
/// what writes to the operational database. Beside the apply, a record put back could undo a
/// change applied meanwhile (a source delete finds no operational row and only tombstones the
/// archived copy); between batches, the outbox tells which records changed after what the
/// pass read, and those are not put back: their later change decides where they go.
pub(super) enum Exclusive<'a> {
    /// A marked batch of a table that brings records back (changes the outbox reinstates),
    /// published whole between batches (rare: a change that left TOASTed values alone, moving
    /// a record back to the operational tier).
    Batch {
        layout: &'a TableLayout,
        columns: Vec<Column>,
        batch: Box<Batch>,
    },
    /// The archived records of `patients` (whose activity moved) to bring back, per table, as
    /// the pass read them; `through`: the position of the last note among those patients.
    Reactivation {
        patients: Vec<String>,
        tables: Vec<(&'a TableLayout, Vec<Column>, Batch)>,
        through: i64,
    },
}

/// What one table batch of the outbox came to.
enum Written<'a> {
    /// The table had no entries left (up to the pass's position).
    Nothing,
    /// Written and published.
    Published,
    /// Folded, with records to bring back: published between batches.
    Exclusive(Exclusive<'a>),
}

impl Migration {
    /// Writes everything the outbox holds for run `run_id` to the archive, then brings back
    /// the records of the patients noted (see the module's docs): the whole work of the
    /// archive writer, while no change is applied.
    pub(super) async fn write_outbox(
        &self,
        run_id: &str,
        target: &Db,
        facts: &HashMap<String, PatientFacts>,
    ) -> Result<OutboxReport> {
        let mut report = OutboxReport::default();
        loop {
            let (written, left) = self.writer_pass(run_id, target, facts, None).await?;
            report.add(written);
            let Some(left) = left else {
                return Ok(report);
            };
            let last = matches!(left, Exclusive::Reactivation { .. });
            self.finish_exclusive(run_id, target, left, None, &mut report)
                .await?;
            if last {
                return Ok(report);
            }
        }
    }

    /// One pass of the archive writer, which may run beside the apply: the outbox entries of
    /// changes at or before `cut` (all when None) into the archive, table by table, then the
    /// archived records of the patients noted by then read and routed by `facts`. Stops at
    /// the first work that writes to the operational database ([`Exclusive`]): once that is
    /// done, a pass over the same `cut` goes on with the rest.
    pub(super) async fn writer_pass(
        &self,
        run_id: &str,
        target: &Db,
        facts: &HashMap<String, PatientFacts>,
        cut: Option<u64>,
    ) -> Result<(OutboxReport, Option<Exclusive<'_>>)> {
        let mut report = OutboxReport::default();
        let upto = match cut {
            Some(lsn) => format!(" AND (drain <> '' OR lsn <= {lsn})"),
            None => String::new(),
        };
        let tables = target
            .fetch_all(
                format!(
                    "SELECT DISTINCT table_name FROM {OUTBOX_TABLE} WHERE run_id = '{}'{upto}",
                    run_id.replace('\'', "''")
                ),
                vec![ColumnType::Text],
            )
            .await?;
        for row in tables {
            let Some(Value::Text(table)) = row.into_iter().next() else {
                continue;
            };
            let layout = self
                .layouts
                .iter()
                .find(|l| l.name == table)
                .ok_or_else(|| {
                    IngestError::Run(format!(
                        "the sync outbox holds changes of table {table}, which the run does not migrate"
                    ))
                })?;
            loop {
                match self
                    .write_outbox_batch(layout, run_id, target, cut, &mut report)
                    .await?
                {
                    Written::Nothing => break,
                    Written::Published => {}
                    Written::Exclusive(left) => return Ok((report, Some(left))),
                }
            }
        }
        let left = self.reactivation(run_id, target, facts, cut).await?;
        Ok((report, left))
    }

    /// Does what a pass left for a moment when no change is applied (see [`Exclusive`]):
    /// records put back and their archived copies tombstoned, except those with a later
    /// change in the outbox.
    pub(super) async fn finish_exclusive(
        &self,
        run_id: &str,
        target: &Db,
        left: Exclusive<'_>,
        cut: Option<u64>,
        report: &mut OutboxReport,
    ) -> Result<()> {
        match left {
            Exclusive::Batch {
                layout,
                columns,
                mut batch,
            } => {
                // Changes after the batch: the entries not marked with it.
                let keys: Vec<&str> = batch.reinstated.iter().map(|(k, _)| k.as_str()).collect();
                let changed = changed_since(target, run_id, &layout.name, &keys, true).await?;
                batch.archive_instead(&changed, layout);
                self.publish(layout, run_id, target, &columns, *batch, report)
                    .await
            }
            Exclusive::Reactivation {
                patients,
                tables,
                through,
            } => {
                self.finish_reactivation(run_id, target, &patients, tables, through, cut, report)
                    .await
            }
        }
    }

    /// Writes one batch of a table's outbox entries (of changes at or before `cut`, when
    /// given), unless it brings records back to the operational tier: that is left for
    /// between batches.
    async fn write_outbox_batch<'a>(
        &self,
        layout: &'a TableLayout,
        run_id: &str,
        target: &Db,
        cut: Option<u64>,
        report: &mut OutboxReport,
    ) -> Result<Written<'a>> {
        let (store, keys) = self.archive_store().await?;
        let archive = ArchiveReader::open(store.clone(), keys.clone()).await?;
        let table = layout.name.as_str();
        let run_q = run_id.replace('\'', "''");
        let table_q = table.replace('\'', "''");
        let ours = format!("run_id = '{run_q}' AND table_name = '{table_q}'");
        // A batch marked before a crash is written again under the same name, or, when its
        // manifest was published, only deleted.
        let marked = format!("SELECT MIN(drain) FROM {OUTBOX_TABLE} WHERE {ours} AND drain <> ''");
        let writer = match first_value(target, marked, ColumnType::Text).await? {
            Value::Text(w) if !w.is_empty() => w,
            _ => match self.mark_batch(target, run_id, &ours, cut).await? {
                Some(w) => w,
                None => return Ok(Written::Nothing),
            },
        };
        let writer_q = writer.replace('\'', "''");
        let published = archive
            .catalog()
            .tables
            .get(table)
            .into_iter()
            .flatten()
            .find(|m| m.run_id == writer)
            .cloned();
        if let Some(m) = published {
            self.record_published(&m).await?;
            target
                .execute(&format!(
                    "DELETE FROM {OUTBOX_TABLE} WHERE {ours} AND drain = '{writer_q}'"
                ))
                .await?;
            return Ok(Written::Published);
        }
        let entries = read_entries(target, &ours, &writer_q).await?;
        report.entries += entries.len() as u64;
        let columns = self.operational_columns(layout, target).await?;
        let mut folded: BTreeMap<String, Fold> = BTreeMap::new();
        let mut truncated = false;
        // Changes that cannot be archived, with their outbox entries.
        let mut quarantine: Vec<(Quarantined, [i64; 3])> = Vec::new();
        for e in entries {
            match e.change.as_str() {
                "truncate" => {
                    folded.clear();
                    truncated = true;
                    continue;
                }
                "delete" if layout.key.is_empty() => {
                    let fold = folded.entry(e.key.clone()).or_insert(Fold::Count {
                        patient: e.patient.clone(),
                        record: None,
                        delta: 0,
                    });
                    if let Fold::Count { delta, .. } = fold {
                        *delta -= 1;
                    }
                    continue;
                }
                "delete" => {
                    let last = match folded.remove(&e.key) {
                        Some(Fold::Archive { record, .. }) | Some(Fold::Reinstate(record)) => {
                            Some(record)
                        }
                        Some(Fold::Gone { last, .. }) => last,
                        _ => None,
                    };
                    let gone = Fold::Gone {
                        patient: e.patient.clone(),
                        destroyed: None,
                        last,
                    };
                    folded.insert(e.key, gone);
                    continue;
                }
                _ => {}
            }
            let mut record = match decode(layout, &e) {
                Ok(r) => r,
                Err(reason) => {
                    quarantine.push((quarantined(layout, &e, &reason), e.id()));
                    continue;
                }
            };
            if !e.unchanged.is_empty() {
                // The values the change left alone: the record's version folded so far, else
                // its archived copy.
                let base_key = if e.base_key.is_empty() {
                    &e.key
                } else {
                    &e.base_key
                };
                // (After a truncate in this batch, no archived copy counts.)
                let base = match folded.get(base_key) {
                    Some(Fold::Archive { record, .. })
                    | Some(Fold::Reinstate(record))
                    | Some(Fold::Gone {
                        last: Some(record), ..
                    }) => Some(record.clone()),
                    _ if truncated => None,
                    _ => archived_copy(&archive, layout, &e.patient, base_key).await?,
                };
                let Some(base) = base else {
                    let why =
                        "the change left values unchanged that no archived copy of the record holds";
                    quarantine.push((quarantined(layout, &e, why), e.id()));
                    continue;
                };
                for name in &e.unchanged {
                    let Some(i) = layout.columns().iter().position(|c| &c.name == name) else {
                        continue;
                    };
                    match layout.blobs.iter().position(|b| b.column == i) {
                        Some(b) => record.blobs[b] = base.blobs[b].clone(),
                        None => record.values[i] = base.values[i].clone(),
                    }
                }
            }
            let fold = match e.change.as_str() {
                "reinstate" => Fold::Reinstate(record),
                "purge" => Fold::Gone {
                    patient: e.patient.clone(),
                    destroyed: Some(record.values),
                    last: None,
                },
                "held" => Fold::Archive { record, held: true },
                _ if layout.key.is_empty() => {
                    let fold = folded.entry(e.key.clone()).or_insert(Fold::Count {
                        patient: e.patient.clone(),
                        record: None,
                        delta: 0,
                    });
                    if let Fold::Count {
                        record: r, delta, ..
                    } = fold
                    {
                        *r = Some(record);
                        *delta += 1;
                    }
                    continue;
                }
                _ => Fold::Archive {
                    record,
                    held: false,
                },
            };
            folded.insert(e.key, fold);
        }

        // What the batch makes: archived records, tombstones, destroyed rows, reinstated rows.
        let holds = self.policy.holds();
        let held_patients: Vec<&str> = holds
            .iter()
            .filter_map(|h| match &h.scope {
                HoldScope::Patient(p) => Some(p.as_str()),
                _ => None,
            })
            .collect();
        let table_held = holds.iter().any(|h| match &h.scope {
            HoldScope::Table(t) => t == table,
            HoldScope::Filter { table: t, .. } => t == table,
            HoldScope::Patient(_) => false,
        });
        let mut records: Vec<(String, Record)> = Vec::new();
        let mut tombstones: Vec<Tombstone> = Vec::new();
        let mut destroyed = Destroyed::default();
        let mut reinstated: Vec<(String, Vec<Value>)> = Vec::new();
        for (key, fold) in folded {
            match fold {
                Fold::Archive { record, held } => {
                    if held {
                        tombstones.push(tombstone(&record.patient, record.date, &key, true));
                        report.held.push((table.to_string(), key.clone()));
                    }
                    records.push((key, record));
                }
                Fold::Gone {
                    patient,
                    destroyed: Some(values),
                    ..
                } => {
                    destroyed.add(layout, &values, (0, destroyed.rows + 1));
                    tombstones.push(tombstone(&patient, None, &key, false));
                }
                Fold::Gone {
                    patient,
                    destroyed: None,
                    ..
                } => {
                    // A deletion a legal hold covers is recorded, and the record kept.
                    let held = table_held
                        || (!patient.is_empty() && held_patients.contains(&patient.as_str()))
                        || (patient.is_empty()
                            && held_record(&archive, table, &held_patients, &key).await?);
                    if held {
                        report.held.push((table.to_string(), key.clone()));
                    }
                    tombstones.push(tombstone(&patient, None, &key, held));
                }
                Fold::Reinstate(record) => {
                    tombstones.push(tombstone(&record.patient, record.date, &key, false));
                    let mut values = record.values.clone();
                    for (b, blob) in layout.blobs.iter().enumerate() {
                        values[blob.column] = match &record.blobs[b] {
                            Blob::New(bytes) => Value::Bytes(bytes.clone()),
                            Blob::Archived(r) => {
                                Value::Bytes(archive.blobs().get(r).await?.to_vec())
                            }
                            Blob::None => Value::Null,
                        };
                    }
                    reinstated.push((key, values));
                }
                Fold::Count {
                    patient,
                    record,
                    delta,
                } => {
                    // The copies archived before (none after a truncate in this batch).
                    let (archived, prototype) = if truncated {
                        (0, None)
                    } else {
                        archived_copies(&archive, layout, &patient, &key).await?
                    };
                    let count = archived as i64 + delta;
                    match record.or(prototype) {
                        Some(r) if count > 0 => {
                            for _ in 0..count {
                                records.push((key.clone(), r.clone()));
                            }
                        }
                        Some(r) if archived > 0 => {
                            tombstones.push(tombstone(&r.patient, r.date, &key, false));
                        }
                        _ => {}
                    }
                }
            }
        }

        // What cannot be archived goes to quarantine and leaves the outbox first, in one
        // transaction: a retry folds the same batch without it.
        if !quarantine.is_empty() {
            let mut tx = TargetTx::begin(target).await?;
            for (q, [lsn, position, part]) in &quarantine {
                q.insert(&mut tx, run_id, table).await?;
                tx.execute(&format!(
                    "DELETE FROM {OUTBOX_TABLE} WHERE lsn = {lsn} AND position = {position} AND part = {part}"
                ))
                .await?;
            }
            tx.commit().await?;
            report.quarantined += quarantine.len() as u64;
        }
        let batch = Batch {
            writer: writer.clone(),
            records,
            tombstones,
            reinstated,
            destroyed,
            truncated,
        };
        if !batch.reinstated.is_empty() {
            return Ok(Written::Exclusive(Exclusive::Batch {
                layout,
                columns,
                batch: Box::new(batch),
            }));
        }
        self.publish(layout, run_id, target, &columns, batch, report)
            .await?;
        Ok(Written::Published)
    }

    /// Publishes what a batch makes of a table: reinstated records into the operational
    /// database first (upserts a retry repeats harmlessly), the destruction record, then the
    /// archive files and their manifest, recorded in the control database; then the batch
    /// leaves the outbox.
    pub(super) async fn publish(
        &self,
        layout: &TableLayout,
        run_id: &str,
        target: &Db,
        columns: &[crate::db::Column],
        batch: Batch,
        report: &mut OutboxReport,
    ) -> Result<()> {
        let Batch {
            writer,
            records,
            tombstones,
            reinstated,
            destroyed,
            truncated,
        } = batch;
        let table = layout.name.as_str();
        let (store, keys) = self.archive_store().await?;
        // Records moved back to the operational tier go there first. A row already there was
        // put there by this write before a crash (sync finishes an interrupted write before
        // it applies anything: see `LeftBehind`), and is kept; the batch is marked done in the
        // same transaction, so that a keyless table's rows (which no key finds there) are not
        // inserted again.
        // (Marked per table and batch: two tables' batches may end at the same transaction.)
        let marker = format!("{table}/{writer}");
        if !reinstated.is_empty() {
            let mut tx = TargetTx::begin(target).await?;
            let sql = format!(
                "INSERT INTO {REINSTATED_TABLE} (writer) VALUES ({}) ON CONFLICT DO NOTHING RETURNING writer",
                tx.placeholder(1)
            );
            let first_time = !tx
                .fetch_text_rows(&sql, &[Value::Text(marker.clone())], &[ColumnType::Text])
                .await?
                .is_empty();
            if first_time {
                for (_, values) in &reinstated {
                    use super::follow::{upsert_row, Existing};
                    upsert_row(&mut tx, layout, columns, values, Existing::Keep).await?;
                }
            }
            tx.commit().await?;
        }
        report.reinstated += reinstated.len() as u64;
        if destroyed.rows > 0 {
            report.destroyed += destroyed.rows;
            self.control
                .record_destruction(&DestructionRecord {
                    run_id: writer.clone(),
                    table: table.to_string(),
                    rows: destroyed.rows,
                    key_checksum: destroyed.checksum_text(),
                    value_checksum: destroyed.value_checksum_text(),
                    key_min: destroyed.key_min.clone(),
                    key_max: destroyed.key_max.clone(),
                    policy_version: self.policy.version().into(),
                    policy_hash: self.policy.hash().into(),
                    void: None,
                })
                .await?;
        }

        // The archive files and manifest.
        let blob_store = BlobStore::new(store.clone(), keys.clone());
        let blob_columns = layout
            .blobs
            .iter()
            .map(|b| layout.target_names[b.column].clone())
            .collect();
        let mut manifest = TableManifest::new(table, &writer, self.policy.version(), blob_columns);
        manifest.truncated = truncated;
        let schema = archive_schema(layout);
        let mut files = TableWriter::new(
            store,
            keys,
            manifest,
            schema.clone(),
            TableWriterOptions::default(),
        )?;
        let mut run = ArchiveRun::new(RUN_BYTES);
        report.archived += records.len() as u64;
        for (key, record) in records {
            let mut refs = Vec::with_capacity(layout.blobs.len());
            for (b, blob) in record.blobs.into_iter().enumerate() {
                refs.push(match blob {
                    Blob::None => None,
                    Blob::Archived(r) => Some(r),
                    Blob::New(bytes) => {
                        let spec = &layout.blobs[b];
                        let content_type = spec
                            .content_type_column
                            .and_then(|i| record.values[i].as_key_text())
                            .unwrap_or_else(|| spec.content_type.clone());
                        Some(blob_store.put(bytes, &content_type).await?)
                    }
                });
            }
            run.push(
                layout,
                &record.patient,
                record.date,
                &key,
                &record.values,
                &refs,
            );
            if run.is_full() {
                write_run(&mut run, layout, &schema, &mut files).await?;
            }
        }
        write_run(&mut run, layout, &schema, &mut files).await?;
        report.tombstones += tombstones.len() as u64;
        files.write_tombstones(&tombstones).await?;
        let manifest = files.finish().await?;
        report.manifests += 1;
        if truncated {
            report.truncated.push(table.to_string());
        }
        self.record_published(&manifest).await?;
        // The batch leaves the outbox, and its mark goes with it, in one transaction.
        let mut tx = TargetTx::begin(target).await?;
        tx.execute(&format!(
            "DELETE FROM {OUTBOX_TABLE} WHERE run_id = '{}' AND table_name = '{}' AND drain = '{}'",
            run_id.replace('\'', "''"),
            table.replace('\'', "''"),
            writer.replace('\'', "''")
        ))
        .await?;
        tx.execute(&format!(
            "DELETE FROM {REINSTATED_TABLE} WHERE writer = '{}'",
            marker.replace('\'', "''")
        ))
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks the table's oldest unwritten entries (those of the source transactions of the
    /// first [`ENTRIES_PER_WRITE`], at or before `cut` when given) as one batch, named after
    /// its last transaction's position. None when there are none.
    async fn mark_batch(
        &self,
        target: &Db,
        run_id: &str,
        ours: &str,
        cut: Option<u64>,
    ) -> Result<Option<String>> {
        let ours = match cut {
            Some(lsn) => format!("{ours} AND lsn <= {lsn}"),
            None => ours.to_string(),
        };
        let nth = format!(
            "SELECT lsn FROM {OUTBOX_TABLE} WHERE {ours} ORDER BY lsn, position, part LIMIT 1 OFFSET {}",
            ENTRIES_PER_WRITE - 1
        );
        let last = match first_value(target, nth, ColumnType::Int).await? {
            Value::Null => {
                let all = format!("SELECT MAX(lsn) FROM {OUTBOX_TABLE} WHERE {ours}");
                first_value(target, all, ColumnType::Int).await?
            }
            nth => nth,
        };
        // Whole source transactions: a change's entries (a key change's tombstone and record)
        // stay together.
        let Value::Int(lsn) = last else {
            return Ok(None);
        };
        let writer = format!("sync-{run_id}-{lsn:016x}");
        target
            .execute(&format!(
                "UPDATE {OUTBOX_TABLE} SET drain = '{}' WHERE {ours} AND lsn <= {lsn}",
                writer.replace('\'', "''")
            ))
            .await?;
        Ok(Some(writer))
    }

    /// The columns of `layout`'s table in the operational database `target`, as declared.
    pub(super) async fn operational_columns(
        &self,
        layout: &TableLayout,
        target: &Db,
    ) -> Result<Vec<Column>> {
        let (columns, _) = target_columns(
            self.source.kind(),
            (target.kind(), Some(target)),
            &layout.target_schema(),
            &layout.casts,
        )
        .await?;
        Ok(columns)
    }

    /// The archive's store and keys (its own key loaded).
    pub(super) async fn archive_store(
        &self,
    ) -> Result<(strata_archive::Store, strata_archive::KeyRing)> {
        let (store, keys) = self
            .config
            .archive
            .open(&self.config.base_dir)
            .map_err(|e| IngestError::Run(format!("archive: {e}")))?;
        let keys = keys.for_archive(store.as_ref(), true).await?;
        Ok((store, keys))
    }

    /// Records a published manifest of the outbox in the control database's ledger and
    /// catalog mirror (again, harmlessly, after a crash).
    pub(super) async fn record_published(&self, m: &TableManifest) -> Result<()> {
        self.control.mirror_manifest(m).await?;
        self.control
            .record_archived(&m.table, &m.run_id, std::slice::from_ref(m))
            .await?;
        Ok(())
    }
}

/// The first column of the first row `sql` returns (NULL when none).
async fn first_value(target: &Db, sql: String, t: ColumnType) -> Result<Value> {
    let rows = target.fetch_all(sql, vec![t]).await?;
    Ok(rows
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next())
        .unwrap_or(Value::Null))
}

async fn write_run(
    run: &mut ArchiveRun,
    layout: &TableLayout,
    schema: &arrow::datatypes::SchemaRef,
    files: &mut TableWriter,
) -> Result<()> {
    if run.is_empty() {
        return Ok(());
    }
    let mut sorted = run.drain_sorted(layout, schema, 8192);
    while let Some(batch) = sorted.next_batch() {
        let batch = batch.map_err(strata_archive::ArchiveError::from)?;
        files.write(&batch).await?;
    }
    files.end_file().await?;
    Ok(())
}

pub(super) fn tombstone(
    patient: &str,
    date: Option<NaiveDate>,
    key: &str,
    held: bool,
) -> Tombstone {
    Tombstone {
        patient: patient.to_string(),
        date,
        key: key.to_string(),
        held,
    }
}

async fn read_entries(target: &Db, ours: &str, writer_q: &str) -> Result<Vec<Entry>> {
    let rows = target
        .fetch_all(
            format!(
                "SELECT lsn, position, part, change, row_key, row_data, unchanged, patient, record_date, base_key \
                 FROM {OUTBOX_TABLE} WHERE {ours} AND drain = '{writer_q}' ORDER BY lsn, position, part"
            ),
            vec![
                ColumnType::Int,
                ColumnType::Int,
                ColumnType::Int,
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Text,
                ColumnType::Text,
            ],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut r = r.into_iter();
            let int = |v: Option<Value>| match v {
                Some(Value::Int(n)) => n,
                _ => 0,
            };
            let text = |v: Option<Value>| match v {
                Some(Value::Text(t)) => t,
                _ => String::new(),
            };
            let (lsn, position, part) = (int(r.next()), int(r.next()), int(r.next()));
            let (change, key, data) = (text(r.next()), text(r.next()), text(r.next()));
            let unchanged = text(r.next());
            let (patient, date) = (text(r.next()), text(r.next()));
            let base_key = text(r.next());
            Entry {
                lsn,
                position,
                part,
                change,
                key,
                data,
                unchanged: unchanged
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                patient,
                date: date.parse().ok(),
                base_key,
            }
        })
        .collect())
}

impl Entry {
    /// Its identity in the outbox: LSN, position, part.
    fn id(&self) -> [i64; 3] {
        [self.lsn, self.position, self.part]
    }
}

/// An entry's record, from its values as JSON (as the quarantine keeps them: text, bytes in
/// base64).
fn decode(layout: &TableLayout, e: &Entry) -> std::result::Result<Record, String> {
    let data: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&e.data).map_err(|_| "its values are not readable".to_string())?;
    let mut values = Vec::with_capacity(layout.columns().len());
    let mut blobs = vec![Blob::None; layout.blobs.len()];
    for (i, c) in layout.columns().iter().enumerate() {
        let value = match data.get(&c.name) {
            None | Some(serde_json::Value::Null) => Value::Null,
            Some(serde_json::Value::String(s)) if c.col_type == ColumnType::Bytes => Value::Bytes(
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|_| format!("column {}: not base64", c.name))?,
            ),
            Some(serde_json::Value::String(s)) => Value::Text(s.clone())
                .coerce(c.col_type)
                .map_err(|why| format!("column {}: {why}", c.name))?,
            Some(_) => return Err(format!("column {}: not text", c.name)),
        };
        match layout.blobs.iter().position(|b| b.column == i) {
            Some(b) => {
                if let Value::Bytes(bytes) = value {
                    blobs[b] = Blob::New(bytes);
                }
                values.push(Value::Null);
            }
            None => values.push(value),
        }
    }
    Ok(Record {
        patient: e.patient.clone(),
        date: e.date,
        values,
        blobs,
    })
}

fn quarantined(layout: &TableLayout, e: &Entry, reason: &str) -> Quarantined {
    let reason = format!(
        "sync could not archive this change (at {:X}/{:X}, {}.{}): {reason}",
        e.lsn >> 32,
        e.lsn & 0xFFFF_FFFF,
        e.position,
        e.part
    );
    Quarantined {
        key: e.key.clone(),
        column: layout
            .key
            .first()
            .map(|&k| layout.columns()[k].name.clone())
            .unwrap_or_default(),
        reason,
        data: e.data.clone(),
    }
}

/// The current archived copy of a record (of `patient`, or "" for a table without patients),
/// with its values and BLOB references. A record not found under `patient` may be filed under
/// another: a change that moved it to `patient` (its patient key updated) carries only the new
/// patient, so the record is then looked up by its key across the table.
async fn archived_copy(
    archive: &ArchiveReader,
    layout: &TableLayout,
    patient: &str,
    key: &str,
) -> Result<Option<Record>> {
    if let (_, Some(found)) = archived_copies(archive, layout, patient, key).await? {
        return Ok(Some(found));
    }
    if layout.patient_column.is_none() {
        return Ok(None);
    }
    for other in archive.patients_of_key(&layout.name, key).await? {
        if other == patient {
            continue;
        }
        if let (_, Some(found)) = archived_copies(archive, layout, &other, key).await? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// How many current archived copies a record has, and one of them.
async fn archived_copies(
    archive: &ArchiveReader,
    layout: &TableLayout,
    patient: &str,
    key: &str,
) -> Result<(u64, Option<Record>)> {
    let mut count = 0;
    let mut found = None;
    let blob_columns = archive.catalog().blob_columns(&layout.name);
    for batch in archive.patient_rows(&layout.name, patient).await? {
        let batch = ArchivedBatch::new(&batch, &blob_columns);
        for row in 0..batch.num_rows() {
            if batch.key(row) != Some(key) {
                continue;
            }
            count += 1;
            if found.is_none() {
                found = Some(record_of(layout, &batch, row));
            }
        }
    }
    Ok((count, found))
}

/// Whether a record whose patient the deletion did not carry belongs to a patient under a
/// legal hold: looked up among those patients' archived records (holds are few).
async fn held_record(
    archive: &ArchiveReader,
    table: &str,
    held_patients: &[&str],
    key: &str,
) -> Result<bool> {
    for patient in held_patients {
        for batch in archive.patient_rows(table, patient).await? {
            let keys = arrow::array::AsArray::as_string::<i32>(batch.column(2));
            if keys.iter().flatten().any(|k| k == key) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// An archived row as a record: its values as the layout's types, its BLOB references.
pub(super) fn record_of(layout: &TableLayout, batch: &ArchivedBatch<'_>, row: usize) -> Record {
    let mut blobs = vec![Blob::None; layout.blobs.len()];
    for (name, r) in batch.blobs(row) {
        if let Some(b) = layout
            .blobs
            .iter()
            .position(|b| layout.target_names[b.column] == name)
        {
            blobs[b] = Blob::Archived(r);
        }
    }
    let values = layout
        .columns()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if layout.blobs.iter().any(|b| b.column == i) {
                return Value::Null;
            }
            let cell = batch
                .value(&layout.target_names[i], row)
                .unwrap_or(Cell::Null);
            let value = match cell {
                Cell::Null => Value::Null,
                Cell::Int(n) => Value::Int(n),
                Cell::Float(f) => Value::Float(f),
                Cell::Bool(b) => Value::Bool(b),
                Cell::Bytes(b) => Value::Bytes(b.to_vec()),
                Cell::Date(d) => Value::Date(d),
                Cell::Timestamp(t) => Value::Timestamp(t),
                Cell::TimestampUtc(t) => Value::TimestampTz(t),
                other => other
                    .to_text()
                    .map_or(Value::Null, |t| Value::Text(t.into_owned())),
            };
            value.clone().coerce(c.col_type).unwrap_or(value)
        })
        .collect();
    Record {
        patient: batch.patient(row).unwrap_or_default().to_string(),
        date: batch.record_date(row),
        values,
        blobs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record a batch would bring back, with a later change in the outbox, is archived
    /// again instead (whole, its BLOB as new bytes, no tombstone); the others go back.
    #[test]
    fn a_record_changed_later_is_archived_again_instead_of_brought_back() {
        let layout = crate::layout::test_layout(
            "scans",
            "primary_key = [\"id\"]\npatient_key = \"patient\"\nrecord_date = \"taken\"\n\
             [[tables.scans.blobs]]\ncolumn = \"image\"\ncontent_type = \"image/png\"",
            &[
                ("id", ColumnType::Int),
                ("patient", ColumnType::Text),
                ("taken", ColumnType::Date),
                ("image", ColumnType::Bytes),
            ],
        );
        let date = NaiveDate::from_ymd_opt(2026, 5, 1);
        let row = |id: i64| {
            vec![
                Value::Int(id),
                Value::Text("7".into()),
                Value::Date(date.unwrap()),
                Value::Bytes(vec![id as u8; 3]),
            ]
        };
        let mut batch = Batch::reinstating();
        for id in [1, 2] {
            let key = format!("id={id}");
            batch.tombstones.push(tombstone("7", date, &key, false));
            batch.reinstated.push((key, row(id)));
        }
        batch.archive_instead(&HashSet::new(), &layout);
        assert_eq!(batch.reinstated.len(), 2);

        batch.archive_instead(&HashSet::from(["id=2".to_string()]), &layout);
        let back: Vec<&str> = batch.reinstated.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(back, ["id=1"]);
        let tombstoned: Vec<&str> = batch.tombstones.iter().map(|t| t.key.as_str()).collect();
        assert_eq!(tombstoned, ["id=1"]);
        let [(key, record)] = batch.records.as_slice() else {
            panic!("one record archived again, not {}", batch.records.len());
        };
        assert_eq!(key, "id=2");
        assert_eq!((record.patient.as_str(), record.date), ("7", date));
        assert_eq!(record.values[..3], row(2)[..3]);
        assert_eq!(record.values[3], Value::Null);
        assert!(matches!(record.blobs.as_slice(), [Blob::New(b)] if b == &vec![2u8; 3]));
    }
}
