//! Change sync's operational upserts and deletes, gathered per table into multi-row
//! statements: one round trip for many changes instead of one or two for each (catching up is
//! bound by round trips).
//!
//! A change joins its table's statements when sync needs nothing back before the next change;
//! changes to different keys commute, so a change to a key already gathered, and anything else
//! that touches the operational database (a read, a row that leaves for the archive), runs
//! what is gathered first (upserts, then deletes), and so does the batch's commit.
//! `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` says which rows were inserted, and
//! `DELETE ... RETURNING` which keys were there: an updated or deleted record the operational
//! database did not hold lives in the archive, and its archived copy gets a tombstone in the
//! outbox, as the change's first entry. Only for PostgreSQL targets and keys of integer or text
//! columns (whose text PostgreSQL and Strata write alike); other tables go row by row.

use super::follow::{Change, SyncReport};
use super::later::{Later, Outbox};
use crate::db::{quote, Column};
use crate::error::Result;
use crate::layout::TableLayout;
use crate::load::TargetTx;
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
    updates: Vec<Option<(u64, usize)>>,
    /// The rows' keys as text (a key twice in one statement is refused by PostgreSQL).
    keys: HashMap<String, usize>,
    /// Deletes: the key values of each (the rest NULL) and the change that made it — None
    /// for the operational copy of a record that left for the archive (nothing to tombstone
    /// when it was not there).
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
    /// Whether a change to `values`' key is gathered for `layout`'s table already (the next
    /// one must wait: flush first).
    pub(super) fn touches(&self, layout: &TableLayout, values: &[Value]) -> bool {
        self.tables.get(layout.name.as_str()).is_some_and(|g| {
            let key = key_text(layout, values);
            g.keys.contains_key(&key) || g.delete_keys.contains(&key)
        })
    }

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

    /// Gathers an upsert; `update`: the change (LSN, position) when it updated a row whose
    /// key it left alone.
    pub(super) fn push(
        &mut self,
        layout: &'a TableLayout,
        columns: &'a [Column],
        values: Vec<Value>,
        update: Option<(u64, usize)>,
    ) {
        let g = self.table(layout, columns);
        g.keys.insert(key_text(layout, &values), g.rows.len());
        g.rows.push(values);
        g.updates.push(update);
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
            report.archive_changes += g.flush_upserts(tx, run_id, &mut self.later).await?;
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
            let mut n = 0;
            let tuples: Vec<String> = chunk
                .iter()
                .map(|_| {
                    let cells: Vec<String> = layout
                        .key
                        .iter()
                        .map(|&k| {
                            n += 1;
                            format!("CAST(${n} AS {})", self.columns[k].decl_type)
                        })
                        .collect();
                    format!("({})", cells.join(", "))
                })
                .collect();
            let sql = format!(
                "DELETE FROM {} WHERE ({}) IN ({}) RETURNING {}",
                quote(&layout.name),
                keys.join(", "),
                tuples.join(", "),
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

    /// Runs the gathered upserts; returns the archived copies tombstoned.
    async fn flush_upserts(
        &mut self,
        tx: &mut TargetTx,
        run_id: &str,
        later: &mut Later,
    ) -> Result<u64> {
        if self.rows.is_empty() {
            return Ok(0);
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
        let mut tombstoned = 0;
        let rows = std::mem::take(&mut self.rows);
        let updates = std::mem::take(&mut self.updates);
        self.keys.clear();
        for (chunk, chunk_updates) in rows
            .chunks(per_statement)
            .zip(updates.chunks(per_statement))
        {
            let mut n = 0;
            let tuples: Vec<String> = chunk
                .iter()
                .map(|_| {
                    let cells: Vec<String> = self
                        .columns
                        .iter()
                        .map(|c| {
                            n += 1;
                            format!("CAST(${n} AS {})", c.decl_type)
                        })
                        .collect();
                    format!("({})", cells.join(", "))
                })
                .collect();
            let sql = format!(
                "INSERT INTO {} ({}) VALUES {} ON CONFLICT ({}) DO UPDATE SET {} RETURNING {}, CAST((xmax = 0) AS TEXT)",
                quote(&layout.name),
                names.join(", "),
                tuples.join(", "),
                keys.join(", "),
                set.join(", "),
                returning.join(", ")
            );
            let values: Vec<Value> = chunk.iter().flatten().cloned().collect();
            let all_types: Vec<ColumnType> = chunk.iter().flat_map(|_| types.clone()).collect();
            let returned = tx.fetch_text_rows(&sql, &values, &all_types).await?;
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
                    tombstoned += 1;
                }
            }
        }
        Ok(tombstoned)
    }
}
