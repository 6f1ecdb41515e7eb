//! What change sync leaves in the operational database for later: the archive outbox's
//! entries (changes for the archive writer, [`super::outbox`]) and patients' activity notes
//! (for the archive writer and the next tiering pass).
//!
//! Nothing in a batch reads them back, so they are gathered while the batch applies and
//! written in multi-row INSERTs just before it commits (or once they hold [`HELD_BYTES`]) —
//! one round trip for many changes, as catching up is bound by round trips. They commit with
//! the batch either way, so a crash loses or repeats none of them.

use super::follow::{Change, ACTIVITY_TABLE, OUTBOX_TABLE};
use super::naming::archive_key;
use super::sinks::Quarantined;
use crate::error::Result;
use crate::layout::TableLayout;
use crate::load::TargetTx;
use crate::value::Value;
use chrono::NaiveDate;
use std::collections::HashMap;

/// Outbox entries one statement takes at most (12 parameters each: under SQLite's 32,766).
const ENTRIES_PER_STATEMENT: usize = 1_000;
/// Bytes of outbox entries held before they are written (a BLOB-heavy batch).
const HELD_BYTES: usize = 16 << 20;

/// A change for the archive, as the outbox keeps it until the archive writer
/// ([`super::outbox`]) writes it.
pub(super) struct Outbox {
    /// `upsert` (an archived record, new or changed), `purge` (past retention: destroyed),
    /// `delete` (a tombstone), `held` (a deleted record a legal hold keeps: archived with a
    /// held tombstone), `truncate`, `reinstate` (an archived record back in the operational
    /// tier, whose values the change did not all carry).
    pub(super) kind: &'static str,
    /// The record's key in the archive (a digest of its values for a keyless table).
    pub(super) key: String,
    /// Its patient key, when known ("" otherwise).
    pub(super) patient: String,
    /// Its record date, when known.
    pub(super) date: Option<NaiveDate>,
    /// Its values as JSON (as the quarantine keeps them).
    pub(super) data: String,
    /// The columns whose values the change did not carry (TOASTed values it left alone, for a
    /// record not in the operational database: the archive writer keeps the archived copy's).
    pub(super) unchanged: Vec<String>,
    /// The key of the archived copy that holds those values, when the change also changed
    /// the record's key ("" otherwise).
    pub(super) base_key: String,
}

impl Outbox {
    /// A whole record's entry.
    pub(super) fn row(
        kind: &'static str,
        layout: &TableLayout,
        values: &[Value],
        patient: Option<String>,
        date: Option<NaiveDate>,
        unchanged: Vec<String>,
    ) -> Self {
        let key = archive_key(layout, values);
        let patient = patient.unwrap_or_else(|| patient_of(layout, values));
        Outbox {
            kind,
            data: Quarantined::new(layout, key.clone(), 0, kind, values).data,
            key,
            patient,
            date,
            unchanged,
            base_key: String::new(),
        }
    }

    /// The tombstone of the archived record with `values`' key (its patient when `values`
    /// carry it: a keyless table's deleted rows come whole).
    pub(super) fn tombstone(layout: &TableLayout, values: &[Value]) -> Self {
        Self::marker("delete", layout, archive_key(layout, values), values)
    }

    /// A table's truncation.
    pub(super) fn truncate(layout: &TableLayout) -> Self {
        Self::marker("truncate", layout, String::new(), &[])
    }

    fn marker(kind: &'static str, layout: &TableLayout, key: String, values: &[Value]) -> Self {
        Outbox {
            kind,
            key,
            patient: patient_of(layout, values),
            date: None,
            data: "{}".into(),
            unchanged: Vec::new(),
            base_key: String::new(),
        }
    }
}

/// The patient key in a row's values, when the table has a patient column and the row
/// carries it ("" otherwise).
pub(super) fn patient_of(layout: &TableLayout, values: &[Value]) -> String {
    layout
        .patient_column
        .and_then(|i| values.get(i))
        .and_then(Value::as_key_text)
        .unwrap_or_default()
}

/// The entries and notes a batch gathered, not yet written.
#[derive(Default)]
pub(super) struct Later {
    /// Outbox entries as their INSERT binds them.
    entries: Vec<[String; 12]>,
    /// Their size, roughly.
    bytes: usize,
    /// Per patient: the last activity noted, and the LSN of the change that noted it.
    activity: HashMap<String, (NaiveDate, u64)>,
}

impl Later {
    /// Puts a change for the archive in the outbox (as the change's next part).
    pub(super) fn outbox(&mut self, layout: &TableLayout, change: &Change<'_>, entry: &Outbox) {
        let part = change.parts.get();
        change.parts.set(part + 1);
        self.bytes += entry.data.len() + entry.key.len() + 64;
        self.entries.push([
            change.lsn.to_string(),
            change.position.to_string(),
            part.to_string(),
            change.run_id.to_string(),
            layout.name.clone(),
            entry.kind.to_string(),
            entry.key.clone(),
            entry.data.clone(),
            entry.unchanged.join(","),
            entry.patient.clone(),
            entry.date.map(|d| d.to_string()).unwrap_or_default(),
            entry.base_key.clone(),
        ]);
    }

    /// Notes that a change at `lsn` moved `patient`'s last activity to `date` (later than any
    /// noted before: see `Migration::note_activity`).
    pub(super) fn activity(&mut self, patient: String, date: NaiveDate, lsn: u64) {
        self.activity.insert(patient, (date, lsn));
    }

    /// Whether what is held should be written before the batch goes on.
    pub(super) fn full(&self) -> bool {
        self.bytes >= HELD_BYTES
    }

    /// Writes what is gathered, in `tx` (the batch's transaction).
    pub(super) async fn write(&mut self, tx: &mut TargetTx, run_id: &str) -> Result<()> {
        let entries = std::mem::take(&mut self.entries);
        self.bytes = 0;
        for chunk in entries.chunks(ENTRIES_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO {OUTBOX_TABLE} (lsn, position, part, run_id, table_name, change, row_key, row_data, unchanged, patient, record_date, base_key) VALUES {}",
                tx.rows(
                    chunk.len(),
                    "(CAST(? AS BIGINT), CAST(? AS BIGINT), CAST(? AS BIGINT), ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                )
            );
            let values: Vec<String> = chunk.iter().flatten().cloned().collect();
            tx.execute_with(&sql, &values).await?;
        }
        let activity: Vec<(String, (NaiveDate, u64))> = self.activity.drain().collect();
        for chunk in activity.chunks(ENTRIES_PER_STATEMENT) {
            // A later batch's note of a patient wins; an earlier one (applied again after a
            // restart from the facts as they are now) does not undo it.
            let sql = format!(
                "INSERT INTO {ACTIVITY_TABLE} (run_id, patient, last_activity, source_lsn, pending) VALUES {} \
                 ON CONFLICT (run_id, patient) DO UPDATE SET last_activity = excluded.last_activity, source_lsn = excluded.source_lsn, pending = 1 \
                 WHERE excluded.last_activity >= {ACTIVITY_TABLE}.last_activity",
                tx.rows(chunk.len(), "(?, ?, ?, CAST(? AS BIGINT), 1)")
            );
            let values: Vec<String> = chunk
                .iter()
                .flat_map(|(patient, (date, lsn))| {
                    [
                        run_id.to_string(),
                        patient.clone(),
                        date.to_string(),
                        lsn.to_string(),
                    ]
                })
                .collect();
            tx.execute_with(&sql, &values).await?;
        }
        Ok(())
    }
}
