//! Tombstones and the rule that says which archived copy of a record is current.
//!
//! After a migration, `strata sync` keeps the archive in step with the source: a record the
//! source changes is archived again (a correction, in a newer run), and a record the source
//! deletes gets a tombstone. A tombstone file (`tombstones/{table}/{writer}-{seq}.parquet`,
//! encrypted like every data file, listed in the manifest's `tombstones`) holds the patient
//! (empty when the change did not carry it), record date and key of each deleted record, and
//! whether a legal hold kept it. [`Successors`] decides the fate of every archived copy from
//! what newer runs did to its key; every reader (one patient's history, exports, compaction,
//! `strata verify`) goes by it.

use crate::error::Result;
use crate::{KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN};
use arrow::array::{Array, AsArray, BooleanArray, Date32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Date32Type, Field, Schema, SchemaRef};
use chrono::NaiveDate;
use std::collections::HashMap;
use std::sync::Arc;

/// The fourth column of a tombstone file: whether a legal hold kept the record the source
/// deleted (the hold wins: the record stays readable, the deletion is on record).
pub const HELD_COLUMN: &str = "_strata_held";

/// A record the source deleted after a run archived it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// Its patient key; empty when the deletion did not say (a source that sends only the key
    /// of a deleted row).
    pub patient: String,
    /// Its record date, when known.
    pub date: Option<NaiveDate>,
    /// Its record key (see [`KEY_COLUMN`]).
    pub key: String,
    /// Whether a legal hold kept the record: it stays current, and the deletion is recorded.
    pub held: bool,
}

/// The layout of tombstone files: patient, record date, record key, held.
pub fn tombstone_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(PATIENT_COLUMN, DataType::Utf8, false),
        Field::new(RECORD_DATE_COLUMN, DataType::Date32, true),
        Field::new(KEY_COLUMN, DataType::Utf8, false),
        Field::new(HELD_COLUMN, DataType::Boolean, false),
    ]))
}

const EPOCH: NaiveDate = match NaiveDate::from_ymd_opt(1970, 1, 1) {
    Some(d) => d,
    None => panic!(),
};

/// `tombstones` as one batch of [`tombstone_schema`], in the archive's order.
pub(crate) fn tombstone_batch(tombstones: &[Tombstone]) -> Result<RecordBatch> {
    let mut sorted: Vec<&Tombstone> = tombstones.iter().collect();
    sorted.sort_by(|a, b| (&a.patient, a.date, &a.key).cmp(&(&b.patient, b.date, &b.key)));
    let patients = StringArray::from_iter_values(sorted.iter().map(|t| t.patient.as_str()));
    let dates: Date32Array = sorted
        .iter()
        .map(|t| t.date.map(|d| (d - EPOCH).num_days() as i32))
        .collect();
    let keys = StringArray::from_iter_values(sorted.iter().map(|t| t.key.as_str()));
    let held: BooleanArray = sorted.iter().map(|t| Some(t.held)).collect();
    Ok(RecordBatch::try_new(
        tombstone_schema(),
        vec![
            Arc::new(patients),
            Arc::new(dates),
            Arc::new(keys),
            Arc::new(held),
        ],
    )?)
}

/// The tombstones of a batch read from a tombstone file.
pub(crate) fn tombstones_of(batch: &RecordBatch) -> Vec<Tombstone> {
    let patients = batch.column(0).as_string::<i32>();
    let dates = batch.column(1).as_primitive::<Date32Type>();
    let keys = batch.column(2).as_string::<i32>();
    let held = batch.column(3).as_boolean();
    (0..batch.num_rows())
        .map(|i| Tombstone {
            patient: patients.value(i).to_string(),
            date: dates
                .is_valid(i)
                .then(|| EPOCH + chrono::Duration::days(i64::from(dates.value(i)))),
            key: keys.value(i).to_string(),
            held: held.value(i),
        })
        .collect()
}

/// What became of one archived copy of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The record's current version.
    Current,
    /// A newer run archived the record again (a correction).
    Superseded,
    /// The source deleted the record (a tombstone, or a truncate of its table).
    Deleted,
    /// The source deleted the record while a legal hold stood: still current (the hold wins),
    /// the deletion on record.
    Held,
}

impl Fate {
    /// Whether readers return the copy.
    pub fn is_served(self) -> bool {
        matches!(self, Fate::Current | Fate::Held)
    }
}

/// The newest run that did something to a key.
#[derive(Debug, Clone, Copy, Default)]
struct Later {
    copy: Option<usize>,
    deleted: Option<usize>,
    held: Option<usize>,
}

/// What the runs of a table did to its records' keys, by rank (see [`crate::runs_of`]: higher
/// is newer), to tell each archived copy's [`Fate`]. Copies of one run never supersede one
/// another (two identical rows of a keyless table are two records); a tombstone hides the
/// copies of its key archived by its own run or earlier (a sync run never writes a copy and a
/// tombstone of one key); a truncate hides every copy of earlier runs.
#[derive(Debug, Default)]
pub struct Successors {
    keys: HashMap<String, Later>,
    truncated: Option<usize>,
}

impl Successors {
    /// Run `rank` archived a copy of `key`.
    pub fn copy(&mut self, rank: usize, key: &str) {
        let later = self.later(key);
        later.copy = later.copy.max(Some(rank));
    }

    /// Run `rank` wrote `tombstone`.
    pub fn tombstone(&mut self, rank: usize, tombstone: &Tombstone) {
        let later = self.later(&tombstone.key);
        if tombstone.held {
            later.held = later.held.max(Some(rank));
        } else {
            later.deleted = later.deleted.max(Some(rank));
        }
    }

    /// Run `rank` found its table truncated.
    pub fn truncate(&mut self, rank: usize) {
        self.truncated = self.truncated.max(Some(rank));
    }

    fn later(&mut self, key: &str) -> &mut Later {
        if !self.keys.contains_key(key) {
            self.keys.insert(key.to_string(), Later::default());
        }
        self.keys.get_mut(key).expect("inserted above")
    }

    /// The fate of a copy of `key` that run `rank` archived.
    pub fn fate(&self, rank: usize, key: &str) -> Fate {
        if self.truncated.is_some_and(|t| rank < t) {
            return Fate::Deleted;
        }
        let Some(later) = self.keys.get(key) else {
            return Fate::Current;
        };
        if later.copy.is_some_and(|c| c > rank) {
            Fate::Superseded
        } else if later.deleted.is_some_and(|d| d >= rank) {
            Fate::Deleted
        } else if later.held.is_some_and(|h| h >= rank) {
            Fate::Held
        } else {
            Fate::Current
        }
    }

    /// Whether any run deleted, truncated or archived again anything: if not, every copy is
    /// current.
    pub fn is_empty(&self) -> bool {
        self.truncated.is_none() && self.keys.is_empty()
    }
}

/// The rows of `batches` (each with its run's rank) that readers return, and how many were
/// left out (superseded or deleted).
pub(crate) fn served(
    batches: Vec<(usize, RecordBatch)>,
    successors: &Successors,
) -> Result<(Vec<(usize, RecordBatch)>, u64)> {
    let mut out = Vec::with_capacity(batches.len());
    let mut dropped = 0;
    for (rank, batch) in batches {
        let keys = batch.column(2).as_string::<i32>();
        let keep: BooleanArray = keys
            .iter()
            .map(|k| Some(k.is_none_or(|k| successors.fate(rank, k).is_served())))
            .collect();
        let kept = arrow::compute::filter_record_batch(&batch, &keep)?;
        dropped += (batch.num_rows() - kept.num_rows()) as u64;
        if kept.num_rows() > 0 {
            out.push((rank, kept));
        }
    }
    Ok((out, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tomb(key: &str, held: bool) -> Tombstone {
        Tombstone {
            patient: String::new(),
            date: None,
            key: key.into(),
            held,
        }
    }

    #[test]
    fn the_newest_run_decides_a_copys_fate() {
        let mut s = Successors::default();
        s.copy(0, "a");
        s.copy(0, "b");
        s.copy(0, "c");
        s.copy(0, "d");
        s.copy(1, "a"); // corrected
        s.tombstone(1, &tomb("b", false)); // deleted
        s.tombstone(2, &tomb("c", true)); // deleted under a hold
        s.copy(3, "b"); // inserted again after its deletion
        assert_eq!(s.fate(0, "a"), Fate::Superseded);
        assert_eq!(s.fate(1, "a"), Fate::Current);
        assert_eq!(s.fate(0, "b"), Fate::Superseded);
        assert_eq!(s.fate(3, "b"), Fate::Current);
        assert_eq!(s.fate(0, "c"), Fate::Held);
        assert!(s.fate(0, "c").is_served());
        assert_eq!(s.fate(0, "d"), Fate::Current);
        s.tombstone(4, &tomb("d", false));
        assert_eq!(s.fate(0, "d"), Fate::Deleted);
        s.truncate(5);
        assert_eq!(s.fate(3, "b"), Fate::Deleted);
        assert_eq!(s.fate(5, "e"), Fate::Current);
    }

    #[test]
    fn tombstones_survive_their_batch() {
        let t = vec![
            Tombstone {
                patient: "p2".into(),
                date: NaiveDate::from_ymd_opt(1961, 2, 3),
                key: "id=2".into(),
                held: true,
            },
            tomb("id=1", false),
        ];
        let batch = tombstone_batch(&t).unwrap();
        let back = tombstones_of(&batch);
        assert_eq!(back, vec![t[1].clone(), t[0].clone()]);
    }
}
