//! The policy document, its validation, and the per-record decision.

use crate::duration::PolicyDuration;
use chrono::NaiveDate;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Where a record lives after the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// The new operational database.
    Operational,
    /// The encrypted archive.
    Archive,
}

impl Tier {
    /// All tiers, in report order.
    pub const ALL: [Tier; 2] = [Tier::Operational, Tier::Archive];

    /// The tier's name as written in policies and reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Tier::Operational => "operational",
            Tier::Archive => "archive",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy as written: `deny_unknown_fields` everywhere, so a misspelt rule is an error, not a
/// silently ignored line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// A name for this version of the policy, recorded with every run that uses it.
    pub version: String,
    /// The date that counts as "now" for age and activity. By default, the caller's date.
    #[serde(default)]
    pub as_of: Option<NaiveDate>,
    /// Rules for every table that does not override them.
    pub defaults: RulesConfig,
    /// Per-table rules, by source table name.
    #[serde(default)]
    pub tables: BTreeMap<String, TableRulesConfig>,
    /// SHA-256 of the policy text, set by [`PolicyConfig::parse`].
    #[serde(skip)]
    pub hash: String,
}

/// Age and activity rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// A record older than this (by its record date) may be archived.
    pub archive_after: PolicyDuration,
    /// ...but only once its patient has had no activity in any table for this long.
    pub patient_inactive_after: PolicyDuration,
}

/// Rules for one table. Unset fields fall back to the policy's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRulesConfig {
    /// Pins every record of the table to one tier (for example a master patient index).
    #[serde(default)]
    pub tier: Option<Tier>,
    /// Overrides `defaults.archive_after`.
    #[serde(default)]
    pub archive_after: Option<PolicyDuration>,
    /// Overrides `defaults.patient_inactive_after`.
    #[serde(default)]
    pub patient_inactive_after: Option<PolicyDuration>,
    /// Records whose column holds one of these values are clinically current and stay operational.
    #[serde(default)]
    pub current_when: Option<CurrentWhen>,
}

/// "Clinically current when COLUMN is one of VALUES" (compared case-insensitively).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurrentWhen {
    /// The status column.
    pub column: String,
    /// The values meaning "current", such as `active`. A `null` entry is written as `"<null>"`.
    pub values: Vec<String>,
}

/// A policy that could not be parsed or does not fit the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The TOML is malformed or has unknown or mistyped fields.
    #[error("policy is not valid: {message}")]
    Parse {
        /// The parser's message, with line and column.
        message: String,
    },
    /// The policy names things the source does not have; every problem is listed.
    #[error("policy does not fit the source:\n  - {}", problems.join("\n  - "))]
    Invalid {
        /// One line per problem.
        problems: Vec<String>,
    },
}

impl PolicyConfig {
    /// Parses a policy document. Does no IO.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let mut config: PolicyConfig = toml::from_str(text).map_err(|e| PolicyError::Parse {
            message: e.to_string(),
        })?;
        config.hash = hex::encode(Sha256::digest(text.as_bytes()));
        Ok(config)
    }

    /// The columns of `table` the policy reads (beyond the record date and patient key).
    pub fn columns_needed(&self, table: &str) -> Vec<String> {
        self.tables
            .get(table)
            .and_then(|t| t.current_when.as_ref())
            .map(|c| vec![c.column.clone()])
            .unwrap_or_default()
    }

    /// Checks the policy against the source's tables and columns and compiles it. Every problem
    /// is reported, not only the first.
    pub fn build(&self, tables: &[(&str, &[&str])]) -> Result<Policy, PolicyError> {
        let known: HashMap<&str, &[&str]> = tables.iter().copied().collect();
        let mut problems = Vec::new();
        if self.version.trim().is_empty() {
            problems.push("`version` must not be empty".to_string());
        }
        for (name, rules) in &self.tables {
            let Some(columns) = known.get(name.as_str()) else {
                problems.push(format!(
                    "[tables.{name}]: no such table in the configuration"
                ));
                continue;
            };
            if let Some(cw) = &rules.current_when {
                if !columns.iter().any(|c| c == &cw.column) {
                    problems.push(format!(
                        "[tables.{name}] current_when: no column {:?} in table {name}",
                        cw.column
                    ));
                }
                if cw.values.is_empty() {
                    problems.push(format!(
                        "[tables.{name}] current_when: `values` is empty, so the rule can never match"
                    ));
                }
            }
            if rules.tier.is_some()
                && (rules.current_when.is_some()
                    || rules.archive_after.is_some()
                    || rules.patient_inactive_after.is_some())
            {
                problems.push(format!(
                    "[tables.{name}]: `tier` pins every record, so its other rules are unreachable"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(PolicyError::Invalid { problems });
        }
        let table_rules = self
            .tables
            .iter()
            .map(|(name, t)| {
                let rules = CompiledRules {
                    pinned: t.tier,
                    archive_after: t.archive_after.unwrap_or(self.defaults.archive_after),
                    inactive_after: t
                        .patient_inactive_after
                        .unwrap_or(self.defaults.patient_inactive_after),
                    current_values: t
                        .current_when
                        .as_ref()
                        .map(|c| c.values.iter().map(|v| v.to_ascii_lowercase()).collect()),
                };
                (name.clone(), rules)
            })
            .collect();
        Ok(Policy {
            version: self.version.clone(),
            hash: self.hash.clone(),
            as_of: self.as_of,
            defaults: CompiledRules {
                pinned: None,
                archive_after: self.defaults.archive_after,
                inactive_after: self.defaults.patient_inactive_after,
                current_values: None,
            },
            tables: table_rules,
        })
    }
}

#[derive(Debug, Clone)]
struct CompiledRules {
    pinned: Option<Tier>,
    archive_after: PolicyDuration,
    inactive_after: PolicyDuration,
    current_values: Option<Vec<String>>,
}

/// A compiled policy, ready to decide records.
#[derive(Debug, Clone)]
pub struct Policy {
    version: String,
    hash: String,
    as_of: Option<NaiveDate>,
    defaults: CompiledRules,
    tables: HashMap<String, CompiledRules>,
}

/// What the policy knows about a record's date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateFact {
    /// A plausible date.
    Valid(NaiveDate),
    /// NULL or unparseable.
    Missing,
    /// A placeholder such as 1900-01-01, or a date after `as_of`.
    Implausible,
}

/// The facts about one record that the policy decides on.
#[derive(Debug, Clone, Copy)]
pub struct RecordFacts<'a> {
    /// The record's date.
    pub record_date: DateFact,
    /// The value of the table's `current_when` column, if the table has one (None for NULL).
    pub current_value: Option<&'a str>,
    /// The patient's last activity across all tables, if known.
    pub patient_last_activity: Option<NaiveDate>,
}

/// Why a record got its tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The table is pinned to a tier.
    TablePinned,
    /// The record is clinically current.
    ClinicallyCurrent,
    /// The record has no usable date: kept operational and flagged.
    DateMissing,
    /// The record's date is a placeholder or in the future: kept operational and flagged.
    DateImplausible,
    /// The record is younger than the table's `archive_after`.
    RecordRecent,
    /// The patient had activity within `patient_inactive_after`.
    PatientActive,
    /// Old record of an inactive patient.
    AgedOut,
}

impl Reason {
    /// A short stable name for reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::TablePinned => "table_pinned",
            Reason::ClinicallyCurrent => "clinically_current",
            Reason::DateMissing => "date_missing",
            Reason::DateImplausible => "date_implausible",
            Reason::RecordRecent => "record_recent",
            Reason::PatientActive => "patient_active",
            Reason::AgedOut => "aged_out",
        }
    }

    /// True for reasons that a records manager should review.
    pub fn is_flagged(&self) -> bool {
        matches!(self, Reason::DateMissing | Reason::DateImplausible)
    }
}

/// A tier and the reason for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Where the record goes.
    pub tier: Tier,
    /// Which rule decided.
    pub reason: Reason,
}

/// Dates before this are treated as placeholders (1900-01-01 and friends).
const EARLIEST_PLAUSIBLE: NaiveDate = match NaiveDate::from_ymd_opt(1901, 1, 1) {
    Some(d) => d,
    None => panic!(),
};

impl Policy {
    /// The policy's version name.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// SHA-256 of the policy text.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The policy's `as_of` date, if it fixes one.
    pub fn as_of(&self) -> Option<NaiveDate> {
        self.as_of
    }

    /// Sets "now" when the policy does not fix it.
    pub fn with_default_as_of(mut self, today: NaiveDate) -> Self {
        self.as_of.get_or_insert(today);
        self
    }

    /// Classifies a date against `as_of`: placeholders and future dates are implausible.
    pub fn date_fact(&self, date: Option<NaiveDate>) -> DateFact {
        match date {
            None => DateFact::Missing,
            Some(d) if d < EARLIEST_PLAUSIBLE => DateFact::Implausible,
            Some(d) if self.as_of.is_some_and(|now| d > now) => DateFact::Implausible,
            Some(d) => DateFact::Valid(d),
        }
    }

    /// Decides one record of `table`. Deterministic: the same facts always give the same answer.
    pub fn decide(&self, table: &str, facts: &RecordFacts<'_>) -> Decision {
        let rules = self.tables.get(table).unwrap_or(&self.defaults);
        let decision = |tier, reason| Decision { tier, reason };
        if let Some(tier) = rules.pinned {
            return decision(tier, Reason::TablePinned);
        }
        if let Some(values) = &rules.current_values {
            let value = facts.current_value.unwrap_or("<null>").to_ascii_lowercase();
            if values.contains(&value) {
                return decision(Tier::Operational, Reason::ClinicallyCurrent);
            }
        }
        let date = match facts.record_date {
            DateFact::Missing => return decision(Tier::Operational, Reason::DateMissing),
            DateFact::Implausible => return decision(Tier::Operational, Reason::DateImplausible),
            DateFact::Valid(d) => d,
        };
        let Some(now) = self.as_of else {
            // Without a "now" nothing can be old: keep everything operational.
            return decision(Tier::Operational, Reason::RecordRecent);
        };
        if date > rules.archive_after.before(now) {
            return decision(Tier::Operational, Reason::RecordRecent);
        }
        let inactive_since = rules.inactive_after.before(now);
        if facts
            .patient_last_activity
            .is_some_and(|last| last > inactive_since)
        {
            return decision(Tier::Operational, Reason::PatientActive);
        }
        decision(Tier::Archive, Reason::AgedOut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    const POLICY: &str = r#"
        version = "t-1"
        as_of = "2026-01-01"
        [defaults]
        archive_after = "5y"
        patient_inactive_after = "3y"
        [tables.patients]
        tier = "operational"
        [tables.medications]
        current_when = { column = "status", values = ["active"] }
    "#;

    fn policy() -> Policy {
        PolicyConfig::parse(POLICY)
            .unwrap()
            .build(&[
                ("patients", &["id"][..]),
                ("medications", &["id", "status"][..]),
                ("labs", &["id"][..]),
            ])
            .unwrap()
    }

    fn facts(date: DateFact, current: Option<&str>, last: Option<NaiveDate>) -> RecordFacts<'_> {
        RecordFacts {
            record_date: date,
            current_value: current,
            patient_last_activity: last,
        }
    }

    #[test]
    fn precedence_and_reasons() {
        let p = policy();
        let old = DateFact::Valid(d(2010, 1, 1));
        let cases = [
            (
                "patients",
                facts(old, None, Some(d(2010, 1, 1))),
                Tier::Operational,
                Reason::TablePinned,
            ),
            (
                "medications",
                facts(old, Some("Active"), Some(d(2010, 1, 1))),
                Tier::Operational,
                Reason::ClinicallyCurrent,
            ),
            (
                "medications",
                facts(old, Some("stopped"), Some(d(2010, 1, 1))),
                Tier::Archive,
                Reason::AgedOut,
            ),
            (
                "labs",
                facts(DateFact::Missing, None, None),
                Tier::Operational,
                Reason::DateMissing,
            ),
            (
                "labs",
                facts(p.date_fact(Some(d(1900, 1, 1))), None, None),
                Tier::Operational,
                Reason::DateImplausible,
            ),
            (
                "labs",
                facts(p.date_fact(Some(d(2030, 1, 1))), None, None),
                Tier::Operational,
                Reason::DateImplausible,
            ),
            (
                "labs",
                facts(DateFact::Valid(d(2023, 1, 1)), None, None),
                Tier::Operational,
                Reason::RecordRecent,
            ),
            (
                "labs",
                facts(old, None, Some(d(2024, 6, 1))),
                Tier::Operational,
                Reason::PatientActive,
            ),
            (
                "labs",
                facts(old, None, Some(d(2022, 6, 1))),
                Tier::Archive,
                Reason::AgedOut,
            ),
            (
                "labs",
                facts(old, None, None),
                Tier::Archive,
                Reason::AgedOut,
            ),
        ];
        for (table, f, tier, reason) in cases {
            let got = p.decide(table, &f);
            assert_eq!((got.tier, got.reason), (tier, reason), "{table} {f:?}");
        }
    }

    #[test]
    fn rejects_every_problem_at_once() {
        let text = r#"
            version = "t"
            [defaults]
            archive_after = "5y"
            patient_inactive_after = "3y"
            [tables.nope]
            tier = "archive"
            [tables.medications]
            tier = "operational"
            current_when = { column = "state", values = [] }
        "#;
        let err = PolicyConfig::parse(text)
            .unwrap()
            .build(&[("medications", &["id", "status"][..])])
            .unwrap_err();
        let PolicyError::Invalid { problems } = err else {
            panic!("{err}")
        };
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("nope")));
        assert!(problems.iter().any(|p| p.contains("\"state\"")));
    }

    #[test]
    fn rejects_malformed_documents() {
        for bad in [
            "version = 1",
            "version = \"x\"\n[defaults]\narchive_after = \"5 years\"\npatient_inactive_after = \"3y\"",
            "version = \"x\"\n[defaults]\narchive_after = \"5y\"\npatient_inactive_after = \"3y\"\nunknown = 1",
            "version = \"x\"\n[defaults]\narchive_after = \"5y\"\npatient_inactive_after = \"3y\"\n[tables.t]\ntier = \"cold\"",
        ] {
            assert!(matches!(PolicyConfig::parse(bad), Err(PolicyError::Parse { .. })), "{bad}");
        }
    }
}
