//! The policy document and its validation; compiled, it decides records ([`decide`]).

mod decide;

use crate::duration::PolicyDuration;
use chrono::{FixedOffset, NaiveDate};
use decide::CompiledRules;
pub use decide::{DateFact, Decision, Leaving, PatientFacts, Policy, Reason, RecordFacts};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Where a record goes. Ordered from hottest to coldest: moving `as_of` forward may only move a
/// record to the same or a colder tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// The new operational database.
    Operational,
    /// The encrypted archive.
    Archive,
    /// Past retention: not migrated; a destruction record is kept.
    Purge,
}

impl Tier {
    /// All tiers, hottest first.
    pub const ALL: [Tier; 3] = [Tier::Operational, Tier::Archive, Tier::Purge];

    /// The tier's name as written in policies and reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Tier::Operational => "operational",
            Tier::Archive => "archive",
            Tier::Purge => "purge",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy as written. Unknown fields are errors, so a misspelt rule never passes silently.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// A name for this version of the policy, recorded with every run that uses it.
    pub version: String,
    /// Who wrote this version. By default, the user who stores it.
    #[serde(default)]
    pub author: Option<String>,
    /// The date that counts as "now". By default, the day of the run (a run records it, and a
    /// resumed run reuses it).
    #[serde(default)]
    pub as_of: Option<NaiveDate>,
    /// The time zone in which timestamps become calendar dates: `UTC` or a fixed offset such as
    /// `-05:00`. By default, UTC.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Where records with a missing or placeholder date go (`operational` or `archive`); they are
    /// flagged either way. Dates in the future always stay operational. By default, operational.
    #[serde(default)]
    pub undated: Option<Tier>,
    /// Where patient-level facts (birth and death dates) come from.
    #[serde(default)]
    pub patients: Option<PatientFactsConfig>,
    /// Rules for every table that does not override them.
    pub defaults: RulesConfig,
    /// Per-table rules, by source table name.
    #[serde(default)]
    pub tables: BTreeMap<String, TableRulesConfig>,
    /// SHA-256 of the policy text, set by [`PolicyConfig::parse`].
    #[serde(skip)]
    pub hash: String,
    /// The policy text, kept to point problems at their lines.
    #[serde(skip)]
    pub text: String,
}

/// The patient table and the columns that give birth and death dates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientFactsConfig {
    /// The table whose rows are patients (keyed by the patient key).
    pub table: String,
    /// Its birth-date column.
    #[serde(default)]
    pub birth_date: Option<String>,
    /// Its death-date column.
    #[serde(default)]
    pub deceased_date: Option<String>,
    /// Age of majority in years. By default, 18.
    #[serde(default = "default_majority")]
    pub age_of_majority: u32,
}

fn default_majority() -> u32 {
    18
}

/// Age, activity and retention rules.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// A record older than this (by its record date) may be archived.
    pub archive_after: PolicyDuration,
    /// ...but only once its patient has had no activity in any table for this long.
    pub patient_inactive_after: PolicyDuration,
    /// Keep an active patient's chart together: while the patient is active, their records of
    /// this many years stay operational (older ones follow `archive_after`). By default, all of
    /// an active patient's records stay operational.
    #[serde(default)]
    pub keep_chart_together: Option<PolicyDuration>,
    /// Records are destroyed this long after the patient's last activity. By default, never.
    #[serde(default)]
    pub retention: Option<PolicyDuration>,
    /// Records made while the patient was a minor are kept at least this long after the age of
    /// majority (needs `[patients] birth_date`).
    #[serde(default)]
    pub minor_retention: Option<PolicyDuration>,
    /// For deceased patients, retention runs this long from the date of death instead of from
    /// the last activity (needs `[patients] deceased_date`).
    #[serde(default)]
    pub deceased_retention: Option<PolicyDuration>,
}

/// Rules for one table. Unset fields fall back to the policy's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableRulesConfig {
    /// Pins every record of the table to a tier (`operational` or `archive`).
    #[serde(default)]
    pub tier: Option<Tier>,
    /// Never destroy records of this table (a master patient index).
    #[serde(default)]
    pub permanent: bool,
    /// Overrides `defaults.archive_after`.
    #[serde(default)]
    pub archive_after: Option<PolicyDuration>,
    /// Overrides `defaults.patient_inactive_after`.
    #[serde(default)]
    pub patient_inactive_after: Option<PolicyDuration>,
    /// Overrides `defaults.keep_chart_together`.
    #[serde(default)]
    pub keep_chart_together: Option<PolicyDuration>,
    /// Overrides `defaults.retention`.
    #[serde(default)]
    pub retention: Option<PolicyDuration>,
    /// Overrides `defaults.minor_retention`.
    #[serde(default)]
    pub minor_retention: Option<PolicyDuration>,
    /// Overrides `defaults.deceased_retention`.
    #[serde(default)]
    pub deceased_retention: Option<PolicyDuration>,
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
    /// The values meaning "current", such as `active`. `"<null>"` matches NULL.
    pub values: Vec<String>,
}

/// A legal hold: records it covers are never purged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegalHold {
    /// The hold's id.
    pub id: String,
    /// What it covers.
    pub scope: HoldScope,
}

impl LegalHold {
    /// Whether the hold covers a record of `table` of `patient` (None when unknown) whose
    /// column values `value_of` gives as text (None for NULL or unknown).
    pub fn covers(
        &self,
        table: &str,
        patient: Option<&str>,
        value_of: impl Fn(&str) -> Option<String>,
    ) -> bool {
        match &self.scope {
            HoldScope::Patient(p) => patient == Some(p.as_str()),
            HoldScope::Table(t) => t == table,
            HoldScope::Filter {
                table: t,
                column,
                value,
            } => t == table && value_of(column).is_some_and(|v| v == *value),
        }
    }
}

/// What a legal hold covers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldScope {
    /// Every record of one patient.
    Patient(String),
    /// Every record of one table.
    Table(String),
    /// Records of a table whose column equals a value.
    Filter {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// The value (compared as text).
        value: String,
    },
}

/// One problem with a policy, with the line it is on when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    /// 1-based line in the policy file.
    pub line: Option<usize>,
    /// The rule, such as `[tables.labs] current_when`.
    pub rule: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.rule, self.message),
            None => write!(f, "{}: {}", self.rule, self.message),
        }
    }
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
    /// The policy names things the source does not have, or has rules that conflict or can
    /// never apply; every problem is listed.
    #[error("policy does not fit the source:\n  - {}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  - "))]
    Invalid {
        /// Every problem.
        problems: Vec<PolicyProblem>,
    },
}

impl PolicyConfig {
    /// Parses a policy document. Does no IO.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let mut config: PolicyConfig = toml::from_str(text).map_err(|e| PolicyError::Parse {
            message: e.to_string(),
        })?;
        config.hash = hex::encode(Sha256::digest(text.as_bytes()));
        config.text = text.to_string();
        Ok(config)
    }

    /// The line of the first line of the text that starts with `needle` (after spaces).
    fn line_of(&self, needle: &str) -> Option<usize> {
        self.text
            .lines()
            .position(|l| l.trim_start().starts_with(needle))
            .map(|i| i + 1)
    }

    fn table_line(&self, table: &str) -> Option<usize> {
        self.line_of(&format!("[tables.{table}]"))
            .or_else(|| self.line_of(&format!("[tables.\"{table}\"]")))
    }

    /// The extra columns of `table` the policy reads, in the order [`RecordFacts::columns`] must
    /// give their values: the `current_when` column, then hold filter columns.
    pub fn columns_needed(&self, table: &str, holds: &[LegalHold]) -> Vec<String> {
        let mut cols: Vec<String> = self
            .tables
            .get(table)
            .and_then(|t| t.current_when.as_ref())
            .map(|c| vec![c.column.clone()])
            .unwrap_or_default();
        for h in holds {
            if let HoldScope::Filter {
                table: t, column, ..
            } = &h.scope
            {
                if t == table && !cols.contains(column) {
                    cols.push(column.clone());
                }
            }
        }
        cols
    }

    /// Every problem of the policy against the source's tables and columns.
    pub fn problems(&self, tables: &[(&str, &[&str])]) -> Vec<PolicyProblem> {
        let known: HashMap<&str, &[&str]> = tables.iter().copied().collect();
        let mut problems = Vec::new();
        let mut problem = |line: Option<usize>, rule: &str, message: String| {
            problems.push(PolicyProblem {
                line,
                rule: rule.to_string(),
                message,
            })
        };
        if self.version.trim().is_empty() {
            problem(
                self.line_of("version"),
                "version",
                "must not be empty".into(),
            );
        }
        if let Some(tz) = &self.timezone {
            if parse_timezone(tz).is_none() {
                problem(
                    self.line_of("timezone"),
                    "timezone",
                    format!("{tz:?} is not UTC or an offset such as -05:00"),
                );
            }
        }
        if self.undated == Some(Tier::Purge) {
            problem(
                self.line_of("undated"),
                "undated",
                "records without a usable date cannot be purged: use operational or archive".into(),
            );
        }
        let has_birth = self
            .patients
            .as_ref()
            .is_some_and(|p| p.birth_date.is_some());
        let has_death = self
            .patients
            .as_ref()
            .is_some_and(|p| p.deceased_date.is_some());
        if let Some(p) = &self.patients {
            let line = self.line_of("[patients]");
            match known.get(p.table.as_str()) {
                None => problem(
                    line,
                    "[patients] table",
                    format!("no table {:?} in the configuration", p.table),
                ),
                Some(cols) => {
                    for c in [&p.birth_date, &p.deceased_date].into_iter().flatten() {
                        if !cols.contains(&c.as_str()) {
                            problem(
                                line,
                                "[patients]",
                                format!("no column {c:?} in table {}", p.table),
                            );
                        }
                    }
                }
            }
        }
        let check_rules =
            |rule: &str,
             line: Option<usize>,
             minor: bool,
             deceased: bool,
             problem: &mut dyn FnMut(Option<usize>, &str, String)| {
                if minor && !has_birth {
                    problem(
                        line,
                        rule,
                        "minor_retention needs [patients] birth_date to know who was a minor"
                            .into(),
                    );
                }
                if deceased && !has_death {
                    problem(
                        line,
                        rule,
                        "deceased_retention needs [patients] deceased_date".into(),
                    );
                }
            };
        check_rules(
            "[defaults]",
            self.line_of("[defaults]"),
            self.defaults.minor_retention.is_some(),
            self.defaults.deceased_retention.is_some(),
            &mut problem,
        );
        if self.defaults.retention.is_none()
            && (self.defaults.minor_retention.is_some()
                || self.defaults.deceased_retention.is_some())
        {
            problem(self.line_of("[defaults]"), "[defaults]", "minor_retention and deceased_retention adjust `retention`, which is not set, so they never apply".into());
        }
        for (name, rules) in &self.tables {
            let line = self.table_line(name);
            let rule = format!("[tables.{name}]");
            let Some(columns) = known.get(name.as_str()) else {
                problem(line, &rule, "no such table in the configuration".into());
                continue;
            };
            if let Some(cw) = &rules.current_when {
                if !columns.contains(&cw.column.as_str()) {
                    problem(
                        line,
                        &format!("{rule} current_when"),
                        format!("no column {:?} in table {name}", cw.column),
                    );
                }
                if cw.values.is_empty() {
                    problem(
                        line,
                        &format!("{rule} current_when"),
                        "`values` is empty, so the rule can never match".into(),
                    );
                }
            }
            let others = rules.current_when.is_some()
                || rules.archive_after.is_some()
                || rules.patient_inactive_after.is_some()
                || rules.keep_chart_together.is_some()
                || rules.retention.is_some()
                || rules.minor_retention.is_some()
                || rules.deceased_retention.is_some();
            match rules.tier {
                Some(Tier::Purge) => problem(
                    line,
                    &format!("{rule} tier"),
                    "a whole table cannot be pinned to purge: use retention".into(),
                ),
                Some(_) if others => problem(
                    line,
                    &rule,
                    "`tier` pins every record, so the table's other rules can never apply".into(),
                ),
                _ => {}
            }
            if rules.permanent
                && (rules.retention.is_some()
                    || rules.minor_retention.is_some()
                    || rules.deceased_retention.is_some())
            {
                problem(
                    line,
                    &rule,
                    "`permanent` conflicts with a retention rule".into(),
                );
            }
            check_rules(
                &rule,
                line,
                rules.minor_retention.is_some(),
                rules.deceased_retention.is_some(),
                &mut problem,
            );
        }
        problems
    }

    /// Checks the policy against the source's tables and columns and compiles it.
    pub fn build(&self, tables: &[(&str, &[&str])]) -> Result<Policy, PolicyError> {
        let problems = self.problems(tables);
        if !problems.is_empty() {
            return Err(PolicyError::Invalid { problems });
        }
        let compile = |t: &TableRulesConfig| CompiledRules {
            pinned: t.tier,
            permanent: t.permanent,
            archive_after: t.archive_after.unwrap_or(self.defaults.archive_after),
            inactive_after: t
                .patient_inactive_after
                .unwrap_or(self.defaults.patient_inactive_after),
            keep_chart: t.keep_chart_together.or(self.defaults.keep_chart_together),
            retention: t.retention.or(self.defaults.retention),
            minor_retention: t.minor_retention.or(self.defaults.minor_retention),
            deceased_retention: t.deceased_retention.or(self.defaults.deceased_retention),
            current_values: t
                .current_when
                .as_ref()
                .map(|c| c.values.iter().map(|v| v.to_ascii_lowercase()).collect()),
        };
        Ok(Policy {
            version: self.version.clone(),
            hash: self.hash.clone(),
            as_of: self.as_of,
            timezone: self
                .timezone
                .as_deref()
                .and_then(parse_timezone)
                .unwrap_or(FixedOffset::east_opt(0).expect("UTC")),
            undated: self.undated.unwrap_or(Tier::Operational),
            majority: self.patients.as_ref().map_or(18, |p| p.age_of_majority),
            defaults: compile(&TableRulesConfig::default()),
            tables: self
                .tables
                .iter()
                .map(|(n, t)| (n.clone(), compile(t)))
                .collect(),
            holds: Vec::new(),
        })
    }
}

fn parse_timezone(tz: &str) -> Option<FixedOffset> {
    if tz.eq_ignore_ascii_case("UTC") || tz == "Z" {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match tz.as_bytes().first()? {
        b'+' => (1, &tz[1..]),
        b'-' => (-1, &tz[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if !(0..=14).contains(&h) || !(0..60).contains(&m) {
        return None;
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests;
