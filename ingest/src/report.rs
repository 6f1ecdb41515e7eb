//! What a plan or a run did to each table: rows, bytes and patients per tier, reasons, holds.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use strata_cutoff_policies::{Decision, Tier};

/// What happened (or would happen) to one table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableReport {
    /// The table.
    pub table: String,
    /// Rows read from the source.
    pub source_rows: u64,
    /// Rows sent to the operational database.
    pub operational_rows: u64,
    /// Rows sent to the archive.
    pub archive_rows: u64,
    /// Rows past retention, destroyed (not migrated) with a destruction record.
    pub purged_rows: u64,
    /// Rows quarantined (unreadable values), with their reasons in the quarantine table.
    pub quarantined_rows: u64,
    /// Rows covered by a legal hold (counted in their tier too).
    pub held_rows: u64,
    /// Rows whose date is missing or implausible: to review.
    pub flagged_rows: u64,
    /// Rows per deciding rule.
    pub reasons: BTreeMap<String, u64>,
    /// Source bytes per tier, values as read: texts and bytes by length, others by width.
    pub bytes: BTreeMap<String, u64>,
    /// Distinct patients with rows in each tier.
    pub patients: BTreeMap<String, u64>,
    /// BLOBs stored in the archive.
    pub blobs: u64,
    /// Their total plaintext bytes.
    pub blob_bytes: u64,
}

/// Counts rows into a [`TableReport`] as they are decided.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub report: TableReport,
    patients: BTreeMap<Tier, HashSet<String>>,
}

impl Tally {
    pub fn new(table: &str) -> Self {
        Tally {
            report: TableReport {
                table: table.to_string(),
                ..Default::default()
            },
            patients: BTreeMap::new(),
        }
    }

    pub fn count(&mut self, decision: &Decision, patient: Option<&str>, bytes: u64) {
        let r = &mut self.report;
        match decision.tier {
            Tier::Operational => r.operational_rows += 1,
            Tier::Archive => r.archive_rows += 1,
            Tier::Purge => r.purged_rows += 1,
        }
        // Looked up before inserting: a key is allocated once per reason, not once per row.
        bump(&mut r.reasons, decision.reason.as_str(), 1);
        bump(&mut r.bytes, decision.tier.as_str(), bytes);
        r.held_rows += decision.held as u64;
        r.flagged_rows += decision.reason.is_flagged() as u64;
        if let Some(p) = patient {
            let set = self.patients.entry(decision.tier).or_default();
            if !set.contains(p) {
                set.insert(p.to_string());
            }
        }
    }

    pub fn finish(mut self) -> TableReport {
        for (tier, set) in self.patients {
            self.report
                .patients
                .insert(tier.as_str().to_string(), set.len() as u64);
        }
        self.report
    }
}

fn bump(counts: &mut BTreeMap<String, u64>, key: &str, by: u64) {
    match counts.get_mut(key) {
        Some(n) => *n += by,
        None => {
            counts.insert(key.to_string(), by);
        }
    }
}

/// A whole run's (or plan's) report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// The run id (empty for a plan).
    pub run_id: String,
    /// The policy version applied.
    pub policy_version: String,
    /// SHA-256 of the policy text.
    pub policy_hash: String,
    /// The date taken as "now".
    pub as_of: String,
    /// Legal holds in force.
    pub holds: Vec<String>,
    /// Per table, in config order.
    pub tables: Vec<TableReport>,
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

impl RunReport {
    /// A table's report.
    pub fn table(&self, name: &str) -> Option<&TableReport> {
        self.tables.iter().find(|t| t.table == name)
    }

    /// Readable text: rows (and MB) per table per tier.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{:<24} {:>9} {:>19} {:>19} {:>17} {:>6} {:>10} {:>7}\n",
            "table",
            "source",
            "operational (MB)",
            "archive (MB)",
            "purge (MB)",
            "held",
            "quarantine",
            "flagged"
        );
        let cell = |rows: u64, t: &TableReport, tier: Tier| {
            format!(
                "{rows} ({})",
                mb(t.bytes.get(tier.as_str()).copied().unwrap_or(0))
            )
        };
        for t in &self.tables {
            s.push_str(&format!(
                "{:<24} {:>9} {:>19} {:>19} {:>17} {:>6} {:>10} {:>7}\n",
                t.table,
                t.source_rows,
                cell(t.operational_rows, t, Tier::Operational),
                cell(t.archive_rows, t, Tier::Archive),
                cell(t.purged_rows, t, Tier::Purge),
                t.held_rows,
                t.quarantined_rows,
                t.flagged_rows
            ));
        }
        s
    }

    /// What changed per table and tier since `previous` (another plan or run).
    pub fn diff(&self, previous: &RunReport) -> String {
        let mut lines = Vec::new();
        for t in &self.tables {
            let before = previous.table(&t.table).cloned().unwrap_or_default();
            let pairs = [
                ("operational", t.operational_rows, before.operational_rows),
                ("archive", t.archive_rows, before.archive_rows),
                ("purge", t.purged_rows, before.purged_rows),
                ("held", t.held_rows, before.held_rows),
                ("quarantine", t.quarantined_rows, before.quarantined_rows),
            ];
            let changes: Vec<String> = pairs
                .iter()
                .filter(|(_, now, was)| now != was)
                .map(|(name, now, was)| {
                    format!("{name} {was} → {now} ({:+})", *now as i64 - *was as i64)
                })
                .collect();
            if !changes.is_empty() {
                lines.push(format!("{:<24} {}", t.table, changes.join(", ")));
            }
        }
        if lines.is_empty() {
            format!(
                "no change since the previous plan (policy {}, as of {})\n",
                previous.policy_version, previous.as_of
            )
        } else {
            format!(
                "changes since the previous plan (policy {}, as of {}):\n{}\n",
                previous.policy_version,
                previous.as_of,
                lines.join("\n")
            )
        }
    }
}
