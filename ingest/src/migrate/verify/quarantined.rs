//! The rows a run quarantined after routing them to the operational tier, which a second read
//! of the source cannot foresee: rows the operational database refused (a CHECK, foreign-key
//! or unique constraint of a table created beforehand, or a key loaded twice into a table that
//! has its key), and, when the source does not enforce a table's key, rows that different
//! ranges loaded with the same key, of which the run kept the first one loaded (whichever
//! range came first) and moved the others.
//!
//! Verify accounts for such keys one by one: the source's copies of the key must be the rows
//! the operational table holds with it (at most one, and one of the copies, values included)
//! plus the run's quarantine entries for it. Every other row is proven by the sums.

use super::super::canonical::Sum;
use super::super::target::{CROSS_RANGE_DUPLICATE, QUARANTINE_TABLE};
use crate::db::Db;
use crate::error::Result;
use crate::load::DATABASE_REJECTED;
use crate::value::{ColumnType, Value};
use std::collections::HashMap;
use std::sync::Mutex;

/// The keys of a table's rows quarantined after routing, and what the source read says of
/// them.
#[derive(Default)]
pub(super) struct Quarantined {
    /// Per key, the run's quarantine entries for it.
    keys: HashMap<String, u64>,
    /// The digests of the source's copies of each key.
    copies: Mutex<HashMap<String, Vec<[u8; 32]>>>,
    /// Copies the verification's own checks quarantined (a key seen again in the read).
    deduplicated: std::sync::atomic::AtomicU64,
}

/// What reconciling the keys found.
pub(super) struct Reconciled {
    /// The quarantine entries the source says there must be for these keys.
    pub(super) quarantine: u64,
    /// Copies the read's own checks counted as quarantined already.
    pub(super) counted: u64,
    /// Keys that do not hold, with how (`missing`, `extra` or `changed`), in key order.
    pub(super) wrong: Vec<(String, &'static str)>,
}

impl Quarantined {
    /// Reads the keys of `table`'s rows the database refused or moved as loaded twice.
    pub(super) async fn load(target: &Db, table: &str) -> Result<Self> {
        let sql = format!(
            "SELECT row_key, reason FROM {QUARANTINE_TABLE} WHERE table_name = '{}'",
            table.replace('\'', "''")
        );
        let mut q = Quarantined::default();
        for row in target
            .fetch_all(sql, vec![ColumnType::Text, ColumnType::Text])
            .await?
        {
            let (Value::Text(key), Value::Text(reason)) = (&row[0], &row[1]) else {
                continue;
            };
            if reason.starts_with(DATABASE_REJECTED) || reason == CROSS_RANGE_DUPLICATE {
                *q.keys.entry(key.clone()).or_insert(0) += 1;
            }
        }
        Ok(q)
    }

    /// Whether there is anything to reconcile (else rows need not be keyed).
    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether the key is accounted for apart.
    pub(super) fn holds(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// Notes a source copy of a key accounted for apart; `counted` when the read's own checks
    /// quarantined it.
    pub(super) fn note_copy(&self, key: String, digest: [u8; 32], counted: bool) {
        if counted {
            self.deduplicated
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.copies
            .lock()
            .expect("copies")
            .entry(key)
            .or_default()
            .push(digest);
    }

    /// Accounts for each key: where the source's copies are the operational rows `found` with
    /// it (at most one, one of the copies) plus its quarantine entries, that row is added to
    /// both operational sums; else the first copy to the expected sum and what was found to
    /// the found sum (a mismatch), and the key is listed.
    pub(super) fn reconcile(
        &self,
        found: &HashMap<String, Vec<[u8; 32]>>,
        expected_sum: &mut Sum,
        found_sum: &mut Sum,
    ) -> Reconciled {
        let copies = self.copies.lock().expect("copies");
        let mut done = Reconciled {
            quarantine: 0,
            counted: self.deduplicated.load(std::sync::atomic::Ordering::Relaxed),
            wrong: Vec::new(),
        };
        let mut keys: Vec<(&String, &u64)> = self.keys.iter().collect();
        keys.sort();
        for (key, &quarantined) in keys {
            let source = copies.get(key).map(Vec::as_slice).unwrap_or_default();
            let held = found.get(key).map(Vec::as_slice).unwrap_or_default();
            let holds = held.len() <= 1
                && held.iter().all(|h| source.contains(h))
                && source.len() as u64 == held.len() as u64 + quarantined;
            if holds {
                for h in held {
                    expected_sum.add(h);
                    found_sum.add(h);
                }
                done.quarantine += quarantined;
                continue;
            }
            if let Some(first) = source.first() {
                expected_sum.add(first);
            }
            for h in held {
                found_sum.add(h);
            }
            done.quarantine += (source.len() as u64).saturating_sub(1);
            let how = match held.len() {
                0 => "missing",
                1 => "changed",
                _ => "extra",
            };
            done.wrong.push((key.clone(), how));
        }
        done
    }
}
