//! What a plan or a run did to each table: rows, bytes and patients per tier, reasons, holds.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    /// Quarantined rows per column and reason (`column: reason`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub quarantine_reasons: BTreeMap<String, u64>,
    /// Rows covered by a legal hold (counted in their tier too).
    pub held_rows: u64,
    /// Rows whose date is missing or implausible: to review.
    pub flagged_rows: u64,
    /// Rows per deciding rule. A row whose key another range loaded too is counted here (and
    /// in `bytes` and `patients`) as the operational row it was until the table's end moved
    /// it to quarantine.
    pub reasons: BTreeMap<String, u64>,
    /// Source bytes per tier, values as read: texts and bytes by length, others by width.
    pub bytes: BTreeMap<String, u64>,
    /// Distinct patients with rows in each tier: exact up to [`EXACT_PATIENTS`], estimated
    /// (within ~2 %) above, those tiers then listed in `patients_estimated`.
    pub patients: BTreeMap<String, u64>,
    /// The tiers whose `patients` is an estimate.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub patients_estimated: std::collections::BTreeSet<String>,
    /// Rows per tier (operational, archive, purge) by the year of their record date (rows
    /// without a date under no year): what a records manager charts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub years: BTreeMap<i32, YearRows>,
    /// BLOBs stored in the archive.
    pub blobs: u64,
    /// Their total plaintext bytes.
    pub blob_bytes: u64,
}

/// One year's rows per tier.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct YearRows {
    /// Rows to the operational database.
    pub operational: u64,
    /// Rows to the archive.
    pub archive: u64,
    /// Rows past retention.
    pub purge: u64,
}

impl YearRows {
    fn add(&mut self, other: YearRows) {
        self.operational += other.operational;
        self.archive += other.archive;
        self.purge += other.purge;
    }
}

/// Counts rows into a [`TableReport`] as they are decided. Tallies of a table's ranges merge
/// into the table's (patients per tier through mergeable sketches).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Tally {
    pub report: TableReport,
    patients: BTreeMap<String, PatientSketch>,
    /// A plan's patients per year and tier (0 operational, 1 archive, 2 purge); None for a
    /// run (nothing of it is checkpointed).
    #[serde(skip)]
    pub year_patients: Option<BTreeMap<(i32, u8), PatientSketch>>,
}

impl Tally {
    pub fn new(table: &str) -> Self {
        Tally {
            report: TableReport {
                table: table.to_string(),
                ..Default::default()
            },
            patients: BTreeMap::new(),
            year_patients: None,
        }
    }

    pub fn count(
        &mut self,
        decision: &Decision,
        date: Option<chrono::NaiveDate>,
        patient: Option<&str>,
        bytes: u64,
    ) {
        let r = &mut self.report;
        match decision.tier {
            Tier::Operational => r.operational_rows += 1,
            Tier::Archive => r.archive_rows += 1,
            Tier::Purge => r.purged_rows += 1,
        }
        let tier_index = match decision.tier {
            Tier::Operational => 0u8,
            Tier::Archive => 1,
            Tier::Purge => 2,
        };
        if let Some(date) = date {
            use chrono::Datelike;
            let year = r.years.entry(date.year()).or_default();
            match decision.tier {
                Tier::Operational => year.operational += 1,
                Tier::Archive => year.archive += 1,
                Tier::Purge => year.purge += 1,
            }
            if let (Some(by_year), Some(p)) = (self.year_patients.as_mut(), patient) {
                by_year.entry((date.year(), tier_index)).or_default().add(p);
            }
        }
        // Looked up before inserting: a key is allocated once per reason, not once per row.
        bump(&mut r.reasons, decision.reason.as_str(), 1);
        bump(&mut r.bytes, decision.tier.as_str(), bytes);
        r.held_rows += decision.held as u64;
        r.flagged_rows += decision.reason.is_flagged() as u64;
        if let Some(p) = patient {
            let tier = decision.tier.as_str();
            match self.patients.get_mut(tier) {
                Some(sketch) => sketch.add(p),
                None => {
                    let mut sketch = PatientSketch::default();
                    sketch.add(p);
                    self.patients.insert(tier.to_string(), sketch);
                }
            }
        }
    }

    /// Counts `rows` quarantined for `reason` in `column`.
    pub fn quarantine(&mut self, column: &str, reason: &str, rows: u64) {
        self.report.quarantined_rows += rows;
        bump(
            &mut self.report.quarantine_reasons,
            &format!("{column}: {reason}"),
            rows,
        );
    }

    /// Adds another range's tally of the same table.
    pub fn merge(&mut self, other: Tally) {
        let (r, o) = (&mut self.report, other.report);
        r.source_rows += o.source_rows;
        r.operational_rows += o.operational_rows;
        r.archive_rows += o.archive_rows;
        r.purged_rows += o.purged_rows;
        r.quarantined_rows += o.quarantined_rows;
        r.held_rows += o.held_rows;
        r.flagged_rows += o.flagged_rows;
        r.blobs += o.blobs;
        r.blob_bytes += o.blob_bytes;
        for (k, v) in o.reasons {
            bump(&mut r.reasons, &k, v);
        }
        for (k, v) in o.quarantine_reasons {
            bump(&mut r.quarantine_reasons, &k, v);
        }
        for (k, v) in o.bytes {
            bump(&mut r.bytes, &k, v);
        }
        for (year, rows) in o.years {
            r.years.entry(year).or_default().add(rows);
        }
        for (tier, sketch) in other.patients {
            self.patients.entry(tier).or_default().merge(&sketch);
        }
        if let (Some(mine), Some(theirs)) = (self.year_patients.as_mut(), other.year_patients) {
            merge_years(mine, theirs);
        }
    }

    pub fn finish(mut self) -> TableReport {
        for (tier, sketch) in self.patients {
            if !sketch.is_exact() {
                self.report.patients_estimated.insert(tier.clone());
            }
            self.report.patients.insert(tier, sketch.estimate());
        }
        self.report
    }
}

/// Adds `other`'s patients per year and tier to `into`.
pub(crate) fn merge_years(
    into: &mut BTreeMap<(i32, u8), PatientSketch>,
    other: BTreeMap<(i32, u8), PatientSketch>,
) {
    for (k, sketch) in other {
        into.entry(k).or_default().merge(&sketch);
    }
}

/// Patients per year and tier as a report holds them.
pub(crate) fn patients_by_year(
    sketches: &BTreeMap<(i32, u8), PatientSketch>,
) -> BTreeMap<i32, YearRows> {
    let mut out: BTreeMap<i32, YearRows> = BTreeMap::new();
    for ((year, tier), sketch) in sketches {
        let y = out.entry(*year).or_default();
        match tier {
            0 => y.operational = sketch.estimate(),
            1 => y.archive = sketch.estimate(),
            _ => y.purge = sketch.estimate(),
        }
    }
    out
}

/// Distinct patients are counted exactly up to this many per tier and table; estimated above.
pub const EXACT_PATIENTS: usize = 10_000;

/// Distinct patient keys: the keys' 64-bit hashes while there are at most [`EXACT_PATIENTS`]
/// (an exact count), and a HyperLogLog sketch (4,096 registers, within ~2 %) for more. Both
/// merge, so that the ranges of a table, counted by different workers and possibly different
/// processes, add up to the table's distinct patients.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PatientSketch {
    registers: Vec<u8>,
    /// The keys' hashes, while they are few enough to count; None once they were not.
    exact: Option<std::collections::BTreeSet<u64>>,
}

const SKETCH_BITS: u32 = 12;

impl Default for PatientSketch {
    fn default() -> Self {
        PatientSketch {
            registers: vec![0; 1 << SKETCH_BITS],
            exact: Some(Default::default()),
        }
    }
}

impl PatientSketch {
    pub fn add(&mut self, item: &str) {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same key hashes the same in every worker and process.
        let mut h = std::hash::DefaultHasher::new();
        item.hash(&mut h);
        let hash = h.finish();
        let index = (hash >> (64 - SKETCH_BITS)) as usize;
        let rest = (hash << SKETCH_BITS) | (1 << (SKETCH_BITS - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        if self.registers[index] < rank {
            self.registers[index] = rank;
        }
        if let Some(exact) = self.exact.as_mut() {
            exact.insert(hash);
            if exact.len() > EXACT_PATIENTS {
                self.exact = None;
            }
        }
    }

    pub fn merge(&mut self, other: &PatientSketch) {
        for (a, b) in self.registers.iter_mut().zip(&other.registers) {
            *a = (*a).max(*b);
        }
        self.exact = match (self.exact.take(), &other.exact) {
            (Some(mut a), Some(b)) => {
                a.extend(b);
                (a.len() <= EXACT_PATIENTS).then_some(a)
            }
            _ => None,
        };
    }

    /// Whether [`PatientSketch::estimate`] is an exact count.
    pub fn is_exact(&self) -> bool {
        self.exact.is_some()
    }

    pub fn estimate(&self) -> u64 {
        if let Some(exact) = &self.exact {
            return exact.len() as u64;
        }
        let m = self.registers.len() as f64;
        let zeros = self.registers.iter().filter(|r| **r == 0).count();
        let sum: f64 = self.registers.iter().map(|r| (-(*r as f64)).exp2()).sum();
        let raw = 0.7213 / (1.0 + 1.079 / m) * m * m / sum;
        let e = if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        e.round() as u64
    }
}

/// A sketch as checkpoints keep it: the registers (base64), and the hashes while exact. A
/// checkpoint written before exact counts holds the registers alone, and reads as an estimate.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum StoredSketch {
    Registers(String),
    Exact { registers: String, exact: Vec<u64> },
}

impl Serialize for PatientSketch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        let registers = base64::engine::general_purpose::STANDARD.encode(&self.registers);
        match &self.exact {
            None => StoredSketch::Registers(registers),
            Some(exact) => StoredSketch::Exact {
                registers,
                exact: exact.iter().copied().collect(),
            },
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for PatientSketch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let (text, exact) = match StoredSketch::deserialize(d)? {
            StoredSketch::Registers(text) => (text, None),
            StoredSketch::Exact { registers, exact } => {
                (registers, Some(exact.into_iter().collect()))
            }
        };
        let registers = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)?;
        if registers.len() != 1 << SKETCH_BITS {
            return Err(serde::de::Error::custom(
                "a patient sketch has 4096 registers",
            ));
        }
        Ok(PatientSketch { registers, exact })
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
    /// A plan's distinct patients per tier by year: those with a record of that year in that
    /// tier, whatever its table (estimated above [`EXACT_PATIENTS`] per year and tier). Empty
    /// for a run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub patients_by_year: BTreeMap<i32, YearRows>,
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
        for t in &self.tables {
            for (reason, rows) in &t.quarantine_reasons {
                s.push_str(&format!("quarantine: {}.{reason}: {rows} rows\n", t.table));
                if reason.ends_with(": duplicate primary key") {
                    s.push_str(&format!(
                        "  the key of {} is not unique in the source: `strata profile` proposes one that is\n",
                        t.table
                    ));
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_sketches_count_distinct_keys_across_ranges() {
        let (mut a, mut b) = (PatientSketch::default(), PatientSketch::default());
        for i in 0..60_000 {
            a.add(&format!("p{i}"));
        }
        for i in 40_000..100_000 {
            b.add(&format!("p{i}"));
        }
        a.merge(&b);
        let e = a.estimate() as f64;
        assert!((e - 100_000.0).abs() / 100_000.0 < 0.03, "{e}");
        assert!(!a.is_exact());
        let mut small = PatientSketch::default();
        for i in 0..50 {
            small.add(&format!("p{}", i % 25));
        }
        assert_eq!(small.estimate(), 25);
    }

    /// Patients per tier are exact up to EXACT_PATIENTS, across ranges and checkpoints (a
    /// sketch alone counted 113 patients of 111); above, an estimate says it is one.
    #[test]
    fn patient_counts_are_exact_up_to_the_limit_and_marked_above() {
        for n in [111, 1_999, EXACT_PATIENTS] {
            let (mut a, mut b) = (PatientSketch::default(), PatientSketch::default());
            for i in 0..n {
                // Two ranges that share some patients.
                if i % 3 != 0 {
                    a.add(&format!("patient-{i}"));
                }
                if i % 3 == 0 || i % 2 == 0 {
                    b.add(&format!("patient-{i}"));
                }
            }
            // Through a checkpoint and back.
            let b: PatientSketch =
                serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
            a.merge(&b);
            assert_eq!((a.estimate(), a.is_exact()), (n as u64, true), "{n}");
        }
        let mut tally = Tally::new("t");
        let mut big = PatientSketch::default();
        for i in 0..=EXACT_PATIENTS {
            big.add(&format!("patient-{i}"));
        }
        tally.patients.insert("archive".into(), big);
        let report = tally.finish();
        assert!(report.patients_estimated.contains("archive"));
        // A checkpoint of an earlier version (registers only) reads as an estimate.
        let old: PatientSketch = serde_json::from_str(&format!(
            "\"{}\"",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [0u8; 4096])
        ))
        .unwrap();
        assert!(!old.is_exact());
    }
}

#[cfg(test)]
mod year_tests {
    use super::*;
    use strata_cutoff_policies::{Decision, Reason, Tier};

    #[test]
    fn a_plan_counts_each_patient_once_per_year_and_tier_across_ranges_and_tables() {
        let d = |y, m| chrono::NaiveDate::from_ymd_opt(y, m, 1);
        let decide = |tier| Decision {
            tier,
            reason: Reason::TablePinned,
            held: false,
        };
        let plan_tally = || {
            let mut t = Tally::new("t");
            t.year_patients = Some(Default::default());
            t
        };
        // Two ranges of one table: P1 twice in 2019 (archive), P2 in 2019 (archive) and 2020
        // (operational); P1 again in the other range, same year and tier.
        let (mut a, mut b) = (plan_tally(), plan_tally());
        a.count(&decide(Tier::Archive), d(2019, 1), Some("P1"), 1);
        a.count(&decide(Tier::Archive), d(2019, 5), Some("P1"), 1);
        a.count(&decide(Tier::Archive), d(2019, 6), Some("P2"), 1);
        b.count(&decide(Tier::Operational), d(2020, 2), Some("P2"), 1);
        b.count(&decide(Tier::Archive), d(2019, 7), Some("P1"), 1);
        b.count(&decide(Tier::Archive), None, Some("P3"), 1);
        a.merge(b);
        // Another table: P1 in 2019 again (still once), P3 past retention in 2001.
        let mut c = plan_tally();
        c.count(&decide(Tier::Archive), d(2019, 3), Some("P1"), 1);
        c.count(&decide(Tier::Purge), d(2001, 3), Some("P3"), 1);
        let mut all = a.year_patients.take().unwrap();
        merge_years(&mut all, c.year_patients.take().unwrap());
        let by_year = patients_by_year(&all);
        let rows = |o, a, p| YearRows {
            operational: o,
            archive: a,
            purge: p,
        };
        assert_eq!(
            by_year,
            BTreeMap::from([
                (2001, rows(0, 0, 1)),
                (2019, rows(0, 2, 0)),
                (2020, rows(1, 0, 0))
            ])
        );
        // A run's tally counts none (nothing of it goes into checkpoints).
        let mut run = Tally::new("t");
        run.count(&decide(Tier::Archive), d(2019, 1), Some("P1"), 1);
        assert!(run.year_patients.is_none());
    }
}
