//! What `strata verify` reports: per table and place, what the source says it must hold and
//! what it holds, the mismatches as lines and the records that differ; as JSON (the evidence,
//! signed) and as text.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What one place holds of a table: rows, and the order-independent sum of their digests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Holding {
    /// Rows.
    pub rows: u64,
    /// `sum256:` and the sum's hex; None where only rows are compared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// The proof for one table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableProof {
    /// The table.
    pub table: String,
    /// Rows read from the source.
    pub source_rows: u64,
    /// When this table was checked (RFC 3339): before the report's start for a table proven
    /// before a verification was resumed (`strata verify --resume`).
    #[serde(default)]
    pub checked_at: String,
    /// The WAL position of the source snapshot the table was read in (PostgreSQL sources; a
    /// SQLite file or a CSV directory is read as it is, and should not change meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_wal_lsn: Option<String>,
    /// Per place (`operational`, `archive`, `quarantine`, `purged`): what the source says it
    /// must hold.
    pub expected: BTreeMap<String, Holding>,
    /// Per place: what it holds.
    pub found: BTreeMap<String, Holding>,
    /// What does not match, one line per place (never a value).
    pub mismatches: Vec<String>,
    /// The records that differ, narrowed down where a place does not match: `missing`,
    /// `extra` or `changed` (with the columns that differ), by record key, at most
    /// [`LISTED_DIFFERENCES`] per place (then counted in `more_differences`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub differences: Vec<Difference>,
    /// Differences beyond those listed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub more_differences: u64,
    /// Archived records the source deleted (after the migration, found by `strata sync`)
    /// while a legal hold stood: the hold wins, so the archive keeps them, outside the
    /// places the source accounts for.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_after_source_deletion: u64,
    /// Archived copies `strata tier` moved of records the source never had (the new EHR's,
    /// created after go-live): outside the places the source accounts for.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tiered_after_go_live: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Differences listed per place and table; the rest are counted.
pub const LISTED_DIFFERENCES: usize = 20;

/// One record that differs between what the source says a place must hold and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Difference {
    /// `operational` or `archive`.
    pub place: String,
    /// The record's key (`col=value` of its primary key; for a table without one, a digest of
    /// its values, `#2` for the second of identical rows).
    pub key: String,
    /// `missing`, `extra` or `changed`.
    pub kind: String,
    /// For a changed record: the columns whose values differ (never the values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub columns: Vec<String>,
}

/// What `strata verify` proved. Unknown fields are refused when a report is read back: a field
/// added to a signed report is an edit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyReport {
    /// The run verified.
    pub run_id: String,
    /// Its policy version and `as_of`.
    pub policy_version: String,
    /// The day taken as "now" by the run.
    pub as_of: String,
    /// Strata's version.
    pub strata_version: String,
    /// When the verification started and ended (RFC 3339).
    pub started: String,
    /// When it ended.
    pub finished: String,
    /// Per table.
    pub tables: Vec<TableProof>,
    /// The Ed25519 signature over the rest, when a signing key is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::migrate::evidence::Signature>,
}

impl VerifyReport {
    /// Whether every table is proven.
    pub fn proven(&self) -> bool {
        self.tables.iter().all(|t| t.mismatches.is_empty())
    }

    /// Readable text: per table, proven or what differs.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "run {} under policy {} (as of {}): {}\n",
            self.run_id,
            self.policy_version,
            self.as_of,
            if self.proven() {
                "every source row is in exactly one place, values included"
            } else {
                "MISMATCH"
            }
        );
        for t in &self.tables {
            let held = |place: &str| t.found.get(place).map_or(0, |h| h.rows);
            // Records of retention lists carried out since the run: those kept count with the
            // archive, the others apart.
            // Records tier moved or destroyed since the run, and those of retention lists
            // carried out since: those kept count with the archive, the others apart.
            let mut retained = String::new();
            for place in [
                "operational, tiered to the archive",
                "destroyed by tier",
                "destroyed by retention",
            ] {
                if let Some(h) = t.found.get(place) {
                    retained.push_str(&format!(
                        " + {} {}",
                        h.rows,
                        place.replace("operational, ", "")
                    ));
                }
            }
            s.push_str(&format!(
                "{:<24} {:>9} source = {} operational + {} archive + {} quarantine + {} purged{retained}: {}\n",
                t.table,
                t.source_rows,
                held("operational"),
                held("archive") + held("archive, listed for retention and kept"),
                held("quarantine"),
                held("purged"),
                if t.mismatches.is_empty() {
                    "proven"
                } else {
                    "MISMATCH"
                }
            ));
            if t.tiered_after_go_live > 0 {
                s.push_str(&format!(
                    "  and {} archived record(s) tier moved that the source never had (created after go-live)\n",
                    t.tiered_after_go_live
                ));
            }
            if t.held_after_source_deletion > 0 {
                s.push_str(&format!(
                    "  and {} archived record(s) the source deleted while a legal hold stood: kept\n",
                    t.held_after_source_deletion
                ));
            }
            if t.checked_at < self.started {
                s.push_str(&format!(
                    "  checked at {}, before this verification was resumed\n",
                    t.checked_at
                ));
            }
            for m in &t.mismatches {
                s.push_str(&format!("  {m}\n"));
            }
            for d in &t.differences {
                let columns = if d.columns.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", d.columns.join(", "))
                };
                s.push_str(&format!("    {}: {} {}{columns}\n", d.place, d.kind, d.key));
            }
            if t.more_differences > 0 {
                s.push_str(&format!("    ... and {} more\n", t.more_differences));
            }
        }
        s
    }
}

/// One place's mismatch as a line: rows, or the values of rows when the counts agree.
pub(super) fn mismatch(place: &str, want: &Holding, got: &Holding) -> String {
    if want.rows != got.rows {
        format!(
            "{place}: {} rows expected, {} found ({})",
            want.rows,
            got.rows,
            if got.rows > want.rows {
                "extra rows"
            } else {
                "rows missing"
            }
        )
    } else {
        format!(
            "{place}: {} rows as expected, but their values differ (checksum {} expected, {} found)",
            want.rows,
            want.checksum.as_deref().unwrap_or("-"),
            got.checksum.as_deref().unwrap_or("-")
        )
    }
}
