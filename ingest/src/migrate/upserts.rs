//! Change sync's operational upserts and deletes, gathered per table into multi-row
//! statements: one round trip for many changes instead of one or two for each (catching up is
//! bound by round trips).
//!
//! A change joins its table's statements when sync needs nothing back before the next change.
//! Changes to different keys commute. Of two changes to one key, the later replaces the
//! gathered one where the outcome is the same as applying both in turn: an upsert after an
//! upsert (the last values win; whether the record was there is the first change's to find
//! out), a delete after an update's upsert, the delete of a row that leaves for the archive
//! after any upsert. Anything else that meets a gathered key (an upsert after a delete, a
//! delete after an insert), or touches the operational database otherwise (a read), runs what
//! is gathered first (upserts, then deletes), and so does the batch's commit.
//! `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` says which rows were inserted, and
//! `DELETE ... RETURNING` which keys were there: an updated or deleted record the operational
//! database did not hold lives in the archive, and its archived copy gets a tombstone in the
//! outbox, as the change's first entry. Only for PostgreSQL targets and keys of integer or text
//! columns (whose text PostgreSQL and Strata write alike); other tables go row by row.

use super::follow::{Change, SyncReport};
use super::later::{Later, Outbox};
use super::sinks::Quarantined;
use crate::db::{quote, Column};
use crate::error::Result;
use crate::layout::TableLayout;
use crate::load::{TargetTx, DATABASE_REJECTED};
use crate::value::{ColumnType, Value};
use std::collections::HashMap;

/// Bind parameters one statement takes at most (PostgreSQL's limit is 65,535).
const MAX_PARAMETERS: usize = 60_000;
/// Rows one statement takes at most.
const MAX_ROWS: usize = 1_000;

/// Where a change sits in the source's log: its transaction's commit LSN, its position in it.
type ChangeAt = (u64, usize);

/// The upserts and deletes gathered so far, by table, and what the batch leaves for later.
#[derive(Default)]
pub(super) struct Upserts<'a> {
    tables: HashMap<&'a str, Gathered<'a>>,
    /// Outbox entries and activity notes, written at the batch's commit (tombstones among
    /// them come from the gathered statements' results).
    pub(super) later: Later,
}

/// One table's gathered upserts.
struct Gathered<'a> {
    layout: &'a TableLayout,
    columns: &'a [Column],
    rows: Vec<Vec<Value>>,
    /// Per row: the change that made it, when it was an update (its key unchanged) — if the
    /// row turns out inserted, the change tombstones the archived copy.
    updates: Vec<Option<ChangeAt>>,
    /// The rows' keys as text (a key twice in one statement is refused by PostgreSQL).
    keys: HashMap<String, usize>,
    /// Deletes: the values of each (its key, the rest NULL unless the row was known) and the
    /// change that made it — None for the operational copy of a record that left for the
    /// archive (nothing to tombstone when it was not there).
    deletes: Vec<(Vec<Value>, Option<ChangeAt>)>,
    /// Their keys as text.
    delete_keys: std::collections::HashSet<String>,
}

/// Whether a table's upserts may be gathered: a PostgreSQL target and a key of integer or
/// text columns.
pub(super) fn gatherable(tx: &TargetTx, layout: &TableLayout) -> bool {
    matches!(tx, TargetTx::Postgres(_))
        && !layout.key.is_empty()
        && layout.key.iter().all(|&k| {
            matches!(
                layout.columns()[k].col_type,
                ColumnType::Int | ColumnType::Text
            )
        })
}

/// A row of placeholders, each cast to its column's declared type (for [`TargetTx::rows`]).
fn cast_row<'c>(columns: impl Iterator<Item = &'c Column>) -> String {
    let cells: Vec<String> = columns
        .map(|c| format!("CAST(? AS {})", c.decl_type))
        .collect();
    format!("({})", cells.join(", "))
}

/// A key as PostgreSQL writes its columns cast to text, joined.
fn key_text(layout: &TableLayout, values: &[Value]) -> String {
    let parts: Vec<String> = layout
        .key
        .iter()
        .map(|&k| match &values[k] {
            Value::Int(n) => n.to_string(),
            Value::Text(t) => t.clone(),
            other => other.as_key_text().unwrap_or_default(),
        })
        .collect();
    parts.join("\u{1}")
}

impl<'a> Upserts<'a> {
    fn table(&mut self, layout: &'a TableLayout, columns: &'a [Column]) -> &mut Gathered<'a> {
        self.tables
            .entry(layout.name.as_str())
            .or_insert_with(|| Gathered {
                layout,
                columns,
                rows: Vec::new(),
                updates: Vec::new(),
                keys: HashMap::new(),
                deletes: Vec::new(),
                delete_keys: Default::default(),
            })
    }

    /// Gathers a delete by key (`values`: the key columns' values) made by the change (LSN,
    /// position).
    pub(super) fn delete(
        &mut self,
        layout: &'a TableLayout,
        columns: &'a [Column],
        values: Vec<Value>,
        change: (u64, usize),
    ) {
        self.gather_delete(layout, columns, values, Some(change));
    }

    /// Gathers the delete of the operational copy of a record that leaves for the archive
    /// (`values`: its values, coerced).
    pub(super) fn leave(
        &mut self,
        layout: &'a TableLayout,
        columns: &'a [Column],
        values: Vec<Value>,
    ) {
        self.gather_delete(layout, columns, values, None);
    }

    fn gather_delete(
        &mut self,
        layout: &'a TableLayout,
        columns: &'a [Column],
        values: Vec<Value>,
        change: Option<ChangeAt>,
    ) {
        let g = self.table(layout, columns);
        g.delete_keys.insert(key_text(layout, &values));
        g.deletes.push((values, change));
    }

    /// Drops the gathered upsert of `values`' key that a delete (`leaving`: of the
    /// operational copy of a record that leaves for the archive) makes moot, where the
    /// outcome is as if both were applied in turn; true when nothing of the key remains
    /// gathered (else the delete must wait: flush first). A source delete may drop an
    /// update's upsert only: the record was there (operational, or archived — the delete
    /// tombstones it instead of the update), whereas after a gathered insert it would
    /// tombstone a record the archive never held. With a source delete, `values` (the key
    /// the delete carried) become the dropped upsert's whole row, so that a tombstone names
    /// the record's patient as the update's would have.
    pub(super) fn supersede(
        &mut self,
        layout: &TableLayout,
        values: &mut Vec<Value>,
        leaving: bool,
    ) -> bool {
        let Some(g) = self.tables.get_mut(layout.name.as_str()) else {
            return true;
        };
        let key = key_text(layout, values);
        if g.delete_keys.contains(&key) {
            return false;
        }
        let Some(&i) = g.keys.get(&key) else {
            return true;
        };
        if !leaving && g.updates[i].is_none() {
            return false;
        }
        g.keys.remove(&key);
        let row = g.rows.swap_remove(i);
        g.updates.swap_remove(i);
        if let Some(moved) = g.rows.get(i) {
            g.keys.insert(key_text(layout, moved), i);
        }
        if !leaving {
            *values = row;
        }
        true
    }

    /// Whether a delete of `values`' key is gathered for `layout`'s table (an upsert of it
    /// must wait: flush first).
    pub(super) fn deleting(&self, layout: &TableLayout, values: &[Value]) -> bool {
        self.tables
            .get(layout.name.as_str())
            .is_some_and(|g| g.delete_keys.contains(&key_text(layout, values)))
    }

    /// Gathers an upsert; `update`: the change (LSN, position) when it updated a row whose
    /// key it left alone. An upsert of the same key gathered before is replaced: the same
    /// record changed again in this batch, its last values win, and whether the record was
    /// there (an update that inserts tombstones the archived copy) stays the first change's
    /// to tell, as it would be were each applied in turn.
    pub(super) fn push(
        &mut self,
        layout: &'a TableLayout,
        columns: &'a [Column],
        values: Vec<Value>,
        update: Option<ChangeAt>,
    ) {
        let g = self.table(layout, columns);
        let key = key_text(layout, &values);
        match g.keys.get(&key) {
            Some(&i) => g.rows[i] = values,
            None => {
                g.keys.insert(key, g.rows.len());
                g.rows.push(values);
                g.updates.push(update);
            }
        }
    }

    /// Runs every gathered change on `tx`, counting in `report` the rows deleted and the
    /// archived copies tombstoned.
    pub(super) async fn flush(
        &mut self,
        tx: &mut TargetTx,
        run_id: &str,
        report: &mut SyncReport,
    ) -> Result<()> {
        for g in self.tables.values_mut() {
            g.flush_upserts(tx, run_id, report, &mut self.later).await?;
            g.flush_deletes(tx, run_id, report, &mut self.later).await?;
        }
        Ok(())
    }
}

impl Gathered<'_> {
    /// Runs the gathered deletes: a key the operational database did not hold is an archived
    /// record's, tombstoned.
    async fn flush_deletes(
        &mut self,
        tx: &mut TargetTx,
        run_id: &str,
        report: &mut SyncReport,
        later: &mut Later,
    ) -> Result<()> {
        if self.deletes.is_empty() {
            return Ok(());
        }
        let layout = self.layout;
        let deletes = std::mem::take(&mut self.deletes);
        self.delete_keys.clear();
        let keys: Vec<String> = layout
            .key
            .iter()
            .map(|&k| quote(&layout.target_names[k]))
            .collect();
        let returning: Vec<String> = keys.iter().map(|k| format!("CAST({k} AS TEXT)")).collect();
        let key_types: Vec<ColumnType> = layout
            .key
            .iter()
            .map(|&k| layout.columns()[k].col_type)
            .collect();
        let per_statement = (MAX_PARAMETERS / keys.len()).clamp(1, MAX_ROWS);
        for chunk in deletes.chunks(per_statement) {
            let sql = format!(
                "DELETE FROM {} WHERE ({}) IN ({}) RETURNING {}",
                quote(&layout.name),
                keys.join(", "),
                tx.rows(
                    chunk.len(),
                    &cast_row(layout.key.iter().map(|&k| &self.columns[k]))
                ),
                returning.join(", ")
            );
            let values: Vec<Value> = chunk
                .iter()
                .flat_map(|(v, _)| layout.key.iter().map(|&k| v[k].clone()))
                .collect();
            let types: Vec<ColumnType> = chunk.iter().flat_map(|_| key_types.clone()).collect();
            let gone: std::collections::HashSet<String> = tx
                .fetch_text_rows(&sql, &values, &types)
                .await?
                .into_iter()
                .map(|r| {
                    let parts: Vec<String> = r.into_iter().map(Option::unwrap_or_default).collect();
                    parts.join("\u{1}")
                })
                .collect();
            report.deleted += gone.len() as u64;
            for (values, change) in chunk {
                let Some((lsn, position)) = change else {
                    continue;
                };
                if gone.contains(&key_text(layout, values)) {
                    continue;
                }
                let change = Change {
                    lsn: *lsn,
                    position: *position,
                    run_id,
                    parts: std::cell::Cell::new(0),
                };
                later.outbox(layout, &change, &Outbox::tombstone(layout, values));
                report.archive_changes += 1;
            }
        }
        Ok(())
    }

    /// Runs the gathered upserts. A statement the operational database refuses for a row's
    /// data (a constraint Strata could not check) is run again row by row: each refused row
    /// goes to quarantine with the database's reason, as in a copy, and its record's older
    /// version leaves the operational table.
    async fn flush_upserts(
        &mut self,
        tx: &mut TargetTx,
        run_id: &str,
        report: &mut SyncReport,
        later: &mut Later,
    ) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let layout = self.layout;
        let width = self.columns.len();
        let per_statement = (MAX_PARAMETERS / width.max(1)).clamp(1, MAX_ROWS);
        let names: Vec<String> = layout.target_names.iter().map(|n| quote(n)).collect();
        let keys: Vec<String> = layout.key.iter().map(|&k| names[k].clone()).collect();
        let mut set: Vec<String> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| !layout.key.contains(i))
            .map(|(_, n)| format!("{n} = excluded.{n}"))
            .collect();
        if set.is_empty() {
            // Every column is in the key: a no-op update, so that RETURNING says so.
            set.push(format!("{0} = excluded.{0}", keys[0]));
        }
        let returning: Vec<String> = keys.iter().map(|k| format!("CAST({k} AS TEXT)")).collect();
        let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
        let rows = std::mem::take(&mut self.rows);
        let updates = std::mem::take(&mut self.updates);
        self.keys.clear();
        let upsert = |tx: &TargetTx, rows: usize| {
            format!(
                "INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) DO UPDATE SET {} RETURNING {}, CAST((xmax = 0) AS TEXT)",
                quote(&layout.name),
                names.join(", "),
                tx.rows(rows, &cast_row(self.columns.iter())),
                keys.join(", "),
                set.join(", "),
                returning.join(", ")
            )
        };
        let mut refused = Vec::new();
        for (chunk, chunk_updates) in rows
            .chunks(per_statement)
            .zip(updates.chunks(per_statement))
        {
            let values: Vec<Value> = chunk.iter().flatten().cloned().collect();
            let all_types: Vec<ColumnType> = chunk.iter().flat_map(|_| types.clone()).collect();
            let returned = match tx
                .fetch_refusable(&upsert(tx, chunk.len()), &values, &all_types)
                .await?
            {
                Ok(returned) => returned,
                // Row by row: the rows the database takes, and those it refuses.
                Err(_) => {
                    let mut returned = Vec::new();
                    for (row, update) in chunk.iter().zip(chunk_updates) {
                        match tx.fetch_refusable(&upsert(tx, 1), row, &types).await? {
                            Ok(r) => returned.extend(r),
                            Err(reason) => refused.push((row.clone(), *update, reason)),
                        }
                    }
                    returned
                }
            };
            // Which updates inserted their row: those records were not operational.
            let by_key: HashMap<String, usize> = chunk
                .iter()
                .enumerate()
                .map(|(i, v)| (key_text(layout, v), i))
                .collect();
            for r in returned {
                let inserted = r.last().cloned().flatten().as_deref() == Some("true");
                if !inserted {
                    continue;
                }
                let key: Vec<String> = r[..keys.len()]
                    .iter()
                    .map(|t| t.clone().unwrap_or_default())
                    .collect();
                let Some(&i) = by_key.get(&key.join("\u{1}")) else {
                    continue;
                };
                if let Some((lsn, position)) = chunk_updates[i] {
                    let change = Change {
                        lsn,
                        position,
                        run_id,
                        parts: std::cell::Cell::new(0),
                    };
                    later.outbox(layout, &change, &Outbox::tombstone(layout, &chunk[i]));
                    report.archive_changes += 1;
                }
            }
        }
        for (row, update, reason) in refused {
            let removed =
                quarantine_refused(tx, layout, self.columns, run_id, &row, &reason).await?;
            // (Counted as upserted when it was gathered.)
            report.upserted = report.upserted.saturating_sub(1);
            report.quarantined += 1;
            // An updated record the operational database did not hold is archived: its
            // archived copy goes, the record being in quarantine now.
            if let (false, Some((lsn, position))) = (removed, update) {
                let change = Change {
                    lsn,
                    position,
                    run_id,
                    parts: std::cell::Cell::new(0),
                };
                later.outbox(layout, &change, &Outbox::tombstone(layout, &row));
                report.archive_changes += 1;
            }
        }
        Ok(())
    }
}

/// Puts a row the operational database refused (`message`: its reason, which names the
/// constraint, never the values) in quarantine, as a copy does, and removes its record's
/// older version from the operational table: the record is in quarantine now. True when
/// there was an older version to remove.
pub(super) async fn quarantine_refused(
    tx: &mut TargetTx,
    layout: &TableLayout,
    columns: &[Column],
    run_id: &str,
    values: &[Value],
    message: &str,
) -> Result<bool> {
    let mut removed = false;
    if !layout.key.is_empty() {
        let keys: Vec<String> = layout
            .key
            .iter()
            .map(|&k| quote(&layout.target_names[k]))
            .collect();
        let sql = format!(
            "DELETE FROM {} WHERE ({}) IN ({}) RETURNING 'removed'",
            quote(&layout.name),
            keys.join(", "),
            tx.rows(1, &cast_row(layout.key.iter().map(|&k| &columns[k])))
        );
        let key: Vec<Value> = layout.key.iter().map(|&k| values[k].clone()).collect();
        let types: Vec<ColumnType> = layout
            .key
            .iter()
            .map(|&k| layout.columns()[k].col_type)
            .collect();
        removed = !tx.fetch_text_rows(&sql, &key, &types).await?.is_empty();
    }
    let reason = format!("{DATABASE_REJECTED}: {message}");
    let key = super::naming::row_key(layout, values, (0, 0));
    Quarantined::new(layout, key, 0, &reason, values)
        .insert(tx, run_id, &layout.name)
        .await?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visits() -> (TableLayout, Vec<Column>) {
        let layout = crate::layout::test_layout(
            "visits",
            "primary_key = [\"id\"]\npatient_key = \"patient\"\nrecord_date = \"seen\"",
            &[
                ("id", ColumnType::Int),
                ("patient", ColumnType::Text),
                ("seen", ColumnType::Text),
            ],
        );
        let columns = layout.columns().to_vec();
        (layout, columns)
    }

    fn row(id: i64, seen: &str) -> Vec<Value> {
        vec![
            Value::Int(id),
            Value::Text("p".into()),
            Value::Text(seen.into()),
        ]
    }

    /// The gathered rows by key, with the change that tells whether each was there.
    fn gathered(u: &Upserts<'_>) -> Vec<(String, Vec<Value>, Option<ChangeAt>)> {
        let g = &u.tables["visits"];
        let mut out: Vec<_> = g
            .keys
            .iter()
            .map(|(k, &i)| (k.clone(), g.rows[i].clone(), g.updates[i]))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(out.len(), g.rows.len());
        out
    }

    #[test]
    fn a_later_change_to_a_gathered_key_replaces_it_only_where_the_outcome_is_the_same() {
        let (layout, columns) = visits();
        let mut u = Upserts::default();
        u.push(&layout, &columns, row(1, "a"), Some((10, 0)));
        u.push(&layout, &columns, row(2, "b"), None);
        u.push(&layout, &columns, row(3, "c"), Some((11, 0)));
        // The same record updated again: its last values, its first change.
        u.push(&layout, &columns, row(1, "a2"), Some((12, 0)));
        assert_eq!(
            gathered(&u),
            [
                ("1".to_string(), row(1, "a2"), Some((10, 0))),
                ("2".to_string(), row(2, "b"), None),
                ("3".to_string(), row(3, "c"), Some((11, 0))),
            ]
        );
        // A source delete after an insert must wait (it would tombstone a record the archive
        // never held); a record leaving for the archive need not.
        assert!(!u.supersede(&layout, &mut row(2, ""), false));
        assert!(u.supersede(&layout, &mut row(2, ""), true));
        // A source delete after an update replaces it (and carries the update's whole row, for
        // its tombstone's patient); the rows left keep their keys.
        let mut deleted = vec![Value::Int(1), Value::Null, Value::Null];
        assert!(u.supersede(&layout, &mut deleted, false));
        assert_eq!(deleted, row(1, "a2"));
        assert_eq!(
            gathered(&u),
            [("3".to_string(), row(3, "c"), Some((11, 0)))]
        );
        // Once a delete of a key is gathered, an upsert or another delete of it waits.
        assert!(u.supersede(&layout, &mut row(3, ""), false));
        u.delete(&layout, &columns, row(3, ""), (13, 0));
        assert!(u.deleting(&layout, &row(3, "")));
        assert!(!u.supersede(&layout, &mut row(3, ""), true));
        assert!(!u.deleting(&layout, &row(4, "")));
        assert!(u.supersede(&layout, &mut row(4, ""), false));
    }
}
