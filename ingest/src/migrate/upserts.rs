//! Change sync's operational upserts, gathered per table into multi-row statements: one round
//! trip for many changes instead of two for each (catching up is bound by round trips).
//!
//! A row joins its table's statement when sync needs nothing back before the next change; the
//! statements run (in the order the rows came) before anything else touches the operational
//! database — a delete, a read, a row that leaves for the archive — and before the batch
//! commits. `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` says which rows were inserted: an
//! updated record the operational database did not hold lives in the archive, and its
//! archived copy gets a tombstone in the outbox, as the change's first entry. Only for
//! PostgreSQL targets and keys of integer or text columns (whose text PostgreSQL and Strata
//! write alike); other tables are applied row by row.

use super::follow::{outbox, Change, Outbox};
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

/// The upserts gathered so far, by table.
#[derive(Default)]
pub(super) struct Upserts<'a> {
    tables: HashMap<&'a str, Gathered<'a>>,
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
    /// Whether a row with `values`' key is gathered for `layout`'s table already (it must
    /// wait: flush first).
    pub(super) fn holds(&self, layout: &TableLayout, values: &[Value]) -> bool {
        self.tables
            .get(layout.name.as_str())
            .is_some_and(|g| g.keys.contains_key(&key_text(layout, values)))
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
        let g = self
            .tables
            .entry(layout.name.as_str())
            .or_insert_with(|| Gathered {
                layout,
                columns,
                rows: Vec::new(),
                updates: Vec::new(),
                keys: HashMap::new(),
            });
        g.keys.insert(key_text(layout, &values), g.rows.len());
        g.rows.push(values);
        g.updates.push(update);
    }

    /// Runs every gathered upsert on `tx`; returns the archived copies tombstoned.
    pub(super) async fn flush(&mut self, tx: &mut TargetTx, run_id: &str) -> Result<u64> {
        let mut tombstoned = 0;
        for g in self.tables.values_mut() {
            tombstoned += g.flush(tx, run_id).await?;
        }
        Ok(tombstoned)
    }
}

impl Gathered<'_> {
    async fn flush(&mut self, tx: &mut TargetTx, run_id: &str) -> Result<u64> {
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
                    outbox(tx, layout, &change, &Outbox::tombstone(layout, &chunk[i])).await?;
                    tombstoned += 1;
                }
            }
        }
        Ok(tombstoned)
    }
}
