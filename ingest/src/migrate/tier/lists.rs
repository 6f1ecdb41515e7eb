//! Tier's destruction lists: the operational rows past retention are filed as one pending
//! `tier` list per pass (the same requests as `strata archive retain`'s, approved by a second
//! records manager in the API, the CLI or the viewer), and an approved list is carried out by
//! the passes after it. A list is complete once a pass left none of its rows behind; its
//! destruction records and signed certificate are then made from the batches that destroyed
//! its rows (kept in the operational database with the deletes, so that a crash loses none).

use super::BATCHES_TABLE;
use crate::config::MigrationConfig;
use crate::db::Db;
use crate::error::{IngestError, Result};
use crate::migrate::certificate::{DestroyedTable, DestructionCertificate};
use crate::migrate::destroyed::Destroyed;
use crate::migrate::retention::{ListedTable, RetentionList};
use crate::value::{ColumnType, Value};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use strata_control::{Control, DestructionRecord, DestructionRequest, RequestStatus};
use strata_cutoff_policies::Policy;

/// The list a pass filed (or, previewed, would file).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierList {
    /// The pending request's id (empty in a preview).
    pub request_id: String,
    /// Rows listed, per table.
    pub tables: BTreeMap<String, u64>,
}

/// The `tier` lists in the control database.
pub(super) struct Lists {
    approved: Vec<(DestructionRequest, RetentionList)>,
    pending: HashMap<String, HashSet<String>>,
}

impl Lists {
    pub(super) async fn load(control: &Control) -> Result<Self> {
        let mut lists = Lists {
            approved: Vec::new(),
            pending: HashMap::new(),
        };
        for r in control.destruction_requests().await? {
            if r.kind != "tier" {
                continue;
            }
            let list: RetentionList = match serde_json::from_value(r.summary.clone()) {
                Ok(l) => l,
                Err(e) => {
                    return Err(IngestError::Run(format!(
                        "destruction request {}: not a destruction list: {e}",
                        r.request_id
                    )))
                }
            };
            match r.status {
                RequestStatus::Pending => {
                    for (t, l) in list.tables {
                        lists.pending.entry(t).or_default().extend(l.keys);
                    }
                }
                RequestStatus::Approved => lists.approved.push((r, list)),
                _ => {}
            }
        }
        Ok(lists)
    }

    pub(super) fn has_approved(&self) -> bool {
        !self.approved.is_empty()
    }

    /// The record keys of `table` on approved lists, with their list.
    pub(super) fn approved_keys(&self, table: &str) -> HashMap<String, String> {
        let mut keys = HashMap::new();
        for (r, list) in &self.approved {
            for k in list.tables.get(table).into_iter().flat_map(|l| &l.keys) {
                keys.insert(k.clone(), r.request_id.clone());
            }
        }
        keys
    }

    /// The record keys of `table` on pending lists.
    pub(super) fn pending_keys(&self, table: &str) -> HashSet<String> {
        self.pending.get(table).cloned().unwrap_or_default()
    }

    /// Completes every approved list no row of which was left behind, all of whose tables the
    /// pass `read`: its destruction records, from the batches that destroyed its rows, and its
    /// signed certificate.
    pub(super) async fn complete(
        &self,
        config: &MigrationConfig,
        control: &Control,
        op: &Db,
        (carried, read): (&Carried, &HashSet<String>),
    ) -> Result<Vec<DestructionCertificate>> {
        let mut certificates = Vec::new();
        for (request, list) in &self.approved {
            let id = &request.request_id;
            // Rows left, or a table of the list the pass does not read (no longer listed in
            // [operational.tables]): the list stays open.
            if carried.left.get(id).copied().unwrap_or(0) > 0
                || list.tables.keys().any(|t| !read.contains(t))
            {
                continue;
            }
            let rows = op
                .fetch_all(
                    format!(
                        "SELECT table_name, destroyed FROM {BATCHES_TABLE} WHERE request_id = '{}' ORDER BY writer",
                        id.replace('\'', "''")
                    ),
                    vec![ColumnType::Text, ColumnType::Text],
                )
                .await?;
            let mut by_table: BTreeMap<String, Destroyed> = list
                .tables
                .keys()
                .map(|t| (t.clone(), Destroyed::default()))
                .collect();
            for row in rows {
                let (Value::Text(table), Value::Text(json)) = (&row[0], &row[1]) else {
                    continue;
                };
                let d: Destroyed = serde_json::from_str(json).map_err(|e| {
                    IngestError::Run(format!(
                        "destruction request {id}: a batch's record is unreadable: {e}"
                    ))
                })?;
                by_table.entry(table.clone()).or_default().merge(d);
            }
            let mut certificate = DestructionCertificate::of_request(request, list);
            certificate.destroyed_at = chrono::Utc::now().to_rfc3339();
            certificate.kept_by_holds = carried.kept.get(id).copied().unwrap_or(0);
            for (table, destroyed) in by_table {
                let record = DestructionRecord {
                    run_id: id.clone(),
                    table: table.clone(),
                    rows: destroyed.rows,
                    key_min: destroyed.key_min.clone(),
                    key_max: destroyed.key_max.clone(),
                    key_checksum: destroyed.checksum_text(),
                    value_checksum: destroyed.value_checksum_text(),
                    policy_version: request.policy_version.clone(),
                    policy_hash: request.policy_hash.clone(),
                    void: None,
                };
                control.record_destruction(&record).await?;
                certificate.tables.push(DestroyedTable {
                    table,
                    rows: record.rows,
                    key_min: record.key_min,
                    key_max: record.key_max,
                    key_checksum: record.key_checksum,
                    value_checksum: record.value_checksum.unwrap_or_default(),
                });
            }
            crate::migrate::evidence::sign(config, &mut certificate)?;
            let json = serde_json::to_value(&certificate).expect("a certificate serializes");
            control.complete_destruction(id, &json).await?;
            certificates.push(certificate);
        }
        Ok(certificates)
    }
}

/// What one table's rows told the lists.
#[derive(Debug, Default)]
pub(super) struct Found {
    /// Record keys past retention and on no list yet: to file.
    pub newly_past_retention: Vec<String>,
    /// Per approved list: its rows left for the next pass (changed or locked since read,
    /// unreadable, or of a table the pass did not touch), which keep the list open.
    pub left: HashMap<String, u64>,
    /// Per approved list: its rows kept (no longer past retention, covered by a hold, or
    /// still referenced by another row).
    pub kept: HashMap<String, u64>,
}

/// What every table's rows told the approved lists.
#[derive(Debug, Default)]
pub(super) struct Carried {
    left: HashMap<String, u64>,
    kept: HashMap<String, u64>,
}

impl Carried {
    pub(super) fn add(&mut self, found: &Found) {
        for (r, n) in &found.left {
            *self.left.entry(r.clone()).or_default() += n;
        }
        for (r, n) in &found.kept {
            *self.kept.entry(r.clone()).or_default() += n;
        }
    }

    /// The approved lists' rows of a table the pass did not touch stay for a later pass.
    pub(super) fn untouched(&mut self, approved: &HashMap<String, String>) {
        for request in approved.values() {
            *self.left.entry(request.clone()).or_default() += 1;
        }
    }
}

/// The rows past retention a pass found on no list, per table.
#[derive(Debug, Default)]
pub(super) struct Filing {
    tables: BTreeMap<String, Vec<String>>,
}

impl Filing {
    pub(super) fn add(&mut self, table: &str, mut keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        keys.sort();
        self.tables.insert(table.to_string(), keys);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    fn list(&self, as_of: &str) -> RetentionList {
        RetentionList {
            as_of: as_of.to_string(),
            rules: self
                .tables
                .keys()
                .map(|t| format!("{t}: past retention at {as_of} (operational)"))
                .collect(),
            tables: self
                .tables
                .iter()
                .map(|(t, keys)| {
                    (
                        t.clone(),
                        ListedTable {
                            rows: keys.len() as u64,
                            keys: keys.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// What a preview would file.
    pub(super) fn preview(&self, as_of: &str) -> TierList {
        TierList {
            request_id: String::new(),
            tables: self
                .list(as_of)
                .tables
                .iter()
                .map(|(t, l)| (t.clone(), l.rows))
                .collect(),
        }
    }

    /// Files the rows as a pending `tier` list requested by `requested_by`.
    pub(super) async fn file(
        &self,
        control: &Control,
        policy: &Policy,
        as_of: &str,
        requested_by: &str,
    ) -> Result<Option<TierList>> {
        if self.is_empty() {
            return Ok(None);
        }
        let mut filed = self.preview(as_of);
        let summary = serde_json::to_value(self.list(as_of)).expect("a list serializes");
        filed.request_id = control
            .request_destruction(
                "tier",
                requested_by,
                (policy.version(), policy.hash()),
                &summary,
            )
            .await?;
        Ok(Some(filed))
    }
}
