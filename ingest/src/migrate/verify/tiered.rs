//! What `strata tier` did to a table after the run, as its ledger in the operational database
//! (`_strata_tier_batches`, committed with each batch's deletes) records it: the records it
//! moved to the archive and those it destroyed on approved lists, by record key. A
//! verification accounts for the source's rows with them: a row the run left operational
//! and tier moved must be archived exactly as the source says (`operational, tiered to the
//! archive`); one tier destroyed must be on a tier destruction record (`destroyed by tier`).

use crate::db::{Db, DbKind};
use crate::error::{IngestError, Result};
use crate::migrate::canonical::Sum;
use crate::migrate::destroyed::{add_256, Destroyed};
use crate::migrate::tier::BATCHES_TABLE;
use crate::value::{ColumnType, Value};
use std::collections::{HashMap, HashSet};

/// One table's records moved and destroyed by tier passes.
#[derive(Debug, Default)]
pub(super) struct TierLedger {
    /// Record keys moved to the archive.
    pub moved: HashSet<String>,
    /// Record keys destroyed on approved lists.
    pub destroyed: HashSet<String>,
    /// What the batches that destroyed them recorded (count and key checksum), per list.
    pub destroyed_by_list: HashMap<String, Sum>,
}

impl TierLedger {
    /// `table`'s ledger in the operational database `target`; None when tier never moved a
    /// record of it (or never ran: a SQLite operational database, or no ledger table).
    pub(super) async fn load(target: &Db, table: &str) -> Result<Option<Self>> {
        if target.kind() != DbKind::Postgres {
            return Ok(None);
        }
        if !crate::migrate::tier::has_batches_table(target).await? {
            return Ok(None);
        }
        let rows = target
            .fetch_all(
                format!(
                    "SELECT request_id, keys, destroyed FROM {BATCHES_TABLE} WHERE table_name = '{}'",
                    table.replace('\'', "''")
                ),
                vec![ColumnType::Text, ColumnType::Text, ColumnType::Text],
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut ledger = TierLedger::default();
        for row in rows {
            let keys: Vec<String> = match &row[1] {
                Value::Text(json) => serde_json::from_str(json).map_err(|e| {
                    IngestError::Run(format!(
                        "{BATCHES_TABLE}: a batch of table {table} lists its keys unreadably: {e}"
                    ))
                })?,
                _ => Vec::new(),
            };
            match (&row[0], &row[2]) {
                (Value::Text(list), Value::Text(json)) => {
                    let d: Destroyed = serde_json::from_str(json).map_err(|e| {
                        IngestError::Run(format!(
                            "{BATCHES_TABLE}: a batch of table {table} records its destruction unreadably: {e}"
                        ))
                    })?;
                    let sum = ledger.destroyed_by_list.entry(list.clone()).or_default();
                    sum.rows += d.rows;
                    add_256(&mut sum.sum, &d.checksum);
                    ledger.destroyed.extend(keys);
                }
                _ => ledger.moved.extend(keys),
            }
        }
        Ok(Some(ledger))
    }
}
