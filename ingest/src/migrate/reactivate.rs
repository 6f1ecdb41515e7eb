//! Brings archived records back to the operational tier when a change moved their patient's
//! last activity later (a new encounter makes an inactive patient's records current again):
//! the last step of each pass of the archive writer ([`super::outbox`]).
//!
//! In two steps, so that the slow one runs beside the apply: [`Migration::reactivation`]
//! reads the noted patients' archived records (the outbox written up to the pass's position
//! first, so the archive holds every change applied by then) and routes them by the facts of
//! the pass; [`Migration::finish_reactivation`], between batches, leaves out the records the
//! outbox holds a later change of (that change decided where they go), upserts the others
//! into the operational database, tombstones their archived copies, and clears the notes.

use super::follow::ACTIVITY_TABLE;
use super::outbox::{changed_since, record_of, tombstone, Batch, Blob, Exclusive, OutboxReport};
use super::route::{Route, Router};
use super::Migration;
use crate::db::Db;
use crate::error::Result;
use crate::value::{ColumnType, Value};
use sha2::Digest as _;
use std::collections::{HashMap, HashSet};
use strata_archive::{ArchiveReader, ArchivedBatch};
use strata_cutoff_policies::{PatientFacts, Tier};

/// `_strata_patient_activity.pending` of a patient whose archived records are being brought
/// back (1: noted, not yet looked at; 0: done). Set between batches, just before the records
/// go back: after a crash, sync finishes the pass before it applies anything, and the retry
/// keeps the rows already put back and tombstones their copies.
pub(super) const REACTIVATING: i64 = 2;

impl Migration {
    /// Reads the archived records of the patients noted (at or before `cut`, when given) that
    /// `facts` now send to the operational tier. None when no patient is noted.
    pub(super) async fn reactivation(
        &self,
        run_id: &str,
        target: &Db,
        facts: &HashMap<String, PatientFacts>,
        cut: Option<u64>,
    ) -> Result<Option<Exclusive<'_>>> {
        let run_q = run_id.replace('\'', "''");
        let upto = cut.map_or(String::new(), |lsn| format!(" AND source_lsn <= {lsn}"));
        let pending = target
            .fetch_all(
                format!(
                    "SELECT patient, source_lsn FROM {ACTIVITY_TABLE} WHERE run_id = '{run_q}' AND pending IN (1, {REACTIVATING}){upto}"
                ),
                vec![ColumnType::Text, ColumnType::Int],
            )
            .await?;
        let mut patients = Vec::new();
        let mut through = 0;
        for row in pending {
            if let (Value::Text(p), Value::Int(lsn)) = (&row[0], &row[1]) {
                patients.push(p.clone());
                through = through.max(*lsn);
            }
        }
        if patients.is_empty() {
            return Ok(None);
        }
        let (store, keys) = self.archive_store().await?;
        let archive = ArchiveReader::open(store, keys).await?;
        let mut tables = Vec::new();
        for layout in self.layouts.iter().filter(|l| l.patient_column.is_some()) {
            let router = Router::new(&self.policy, layout, facts);
            let blob_columns = archive.catalog().blob_columns(&layout.name);
            // Records the source deleted under a legal hold stay archived.
            let mut held = HashSet::new();
            for m in archive
                .catalog()
                .tables
                .get(&layout.name)
                .into_iter()
                .flatten()
            {
                for entry in &m.tombstones {
                    let read = archive.tombstones(entry).await?;
                    held.extend(read.iter().filter(|t| t.held).map(|t| t.key.clone()));
                }
            }
            let mut batch = Batch::reinstating();
            for patient in &patients {
                for rows in archive.patient_rows(&layout.name, patient).await? {
                    let rows = ArchivedBatch::new(&rows, &blob_columns);
                    for row in 0..rows.num_rows() {
                        let record = record_of(layout, &rows, row);
                        let mut values = record.values.clone();
                        let extras = layout.take_extras(&mut values);
                        let Route::Decided { decision, .. } = router.route(&mut values, &extras)
                        else {
                            continue;
                        };
                        if decision.tier != Tier::Operational {
                            continue;
                        }
                        let key = rows.key(row).unwrap_or_default();
                        if held.contains(key) {
                            continue;
                        }
                        batch
                            .tombstones
                            .push(tombstone(&record.patient, record.date, key, false));
                        for (b, blob) in layout.blobs.iter().enumerate() {
                            if let Blob::Archived(r) = &record.blobs[b] {
                                values[blob.column] =
                                    Value::Bytes(archive.blobs().get(r).await?.to_vec());
                            }
                        }
                        batch.reinstated.push((key.to_string(), values));
                    }
                }
            }
            if batch.reinstated.is_empty() {
                continue;
            }
            let columns = self.operational_columns(layout, target).await?;
            tables.push((layout, columns, batch));
        }
        Ok(Some(Exclusive::Reactivation {
            patients,
            tables,
            through,
        }))
    }

    /// Puts back what [`Migration::reactivation`] read of `patients`, while no change is
    /// applied: the patients marked first ([`REACTIVATING`]), the records the outbox holds a
    /// change of left out, the rest upserted (a row already there is kept) and tombstoned in
    /// the archive; then the notes are cleared, except those of patients noted again after
    /// `cut` (looked at by the next pass).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn finish_reactivation(
        &self,
        run_id: &str,
        target: &Db,
        patients: &[String],
        tables: Vec<(&crate::layout::TableLayout, Vec<crate::db::Column>, Batch)>,
        through: i64,
        cut: Option<u64>,
        report: &mut OutboxReport,
    ) -> Result<()> {
        let run_q = run_id.replace('\'', "''");
        for chunk in patients.chunks(500) {
            let listed: Vec<String> = chunk
                .iter()
                .map(|p| format!("'{}'", p.replace('\'', "''")))
                .collect();
            target
                .execute(&format!(
                    "UPDATE {ACTIVITY_TABLE} SET pending = {REACTIVATING} WHERE run_id = '{run_q}' AND pending = 1 AND patient IN ({})",
                    listed.join(", ")
                ))
                .await?;
        }
        for (layout, columns, mut batch) in tables {
            let keys: Vec<&str> = batch.reinstated.iter().map(|(k, _)| k.as_str()).collect();
            let changed = changed_since(target, run_id, &layout.name, &keys, false).await?;
            batch.keep_reinstated(&changed);
            if batch.reinstated.is_empty() {
                continue;
            }
            // Named by what it tombstones: a retry that finds more to bring back (facts read
            // again) writes a manifest of its own instead of replacing this one.
            let mut digest = sha2::Sha256::new();
            for t in &batch.tombstones {
                sha2::Digest::update(&mut digest, t.key.as_bytes());
                sha2::Digest::update(&mut digest, [0u8]);
            }
            let digest = hex::encode(&sha2::Digest::finalize(digest)[..4]);
            batch.writer = format!("sync-{run_id}-{through:016x}-reactivated-{digest}");
            self.publish(layout, run_id, target, &columns, batch, report)
                .await?;
        }
        let noted_again = cut.map_or("0".to_string(), |lsn| {
            format!("CASE WHEN source_lsn > {lsn} THEN 1 ELSE 0 END")
        });
        target
            .execute(&format!(
                "UPDATE {ACTIVITY_TABLE} SET pending = {noted_again} WHERE run_id = '{run_q}' AND pending = {REACTIVATING}"
            ))
            .await?;
        Ok(())
    }
}
