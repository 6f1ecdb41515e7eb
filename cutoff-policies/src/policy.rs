//! The policy document, its validation, and the per-record decision with its explanation.

use crate::duration::PolicyDuration;
use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
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

#[derive(Debug, Clone)]
struct CompiledRules {
    pinned: Option<Tier>,
    permanent: bool,
    archive_after: PolicyDuration,
    inactive_after: PolicyDuration,
    keep_chart: Option<PolicyDuration>,
    retention: Option<PolicyDuration>,
    minor_retention: Option<PolicyDuration>,
    deceased_retention: Option<PolicyDuration>,
    current_values: Option<Vec<String>>,
}

/// A compiled policy, ready to decide records.
#[derive(Debug, Clone)]
pub struct Policy {
    version: String,
    hash: String,
    as_of: Option<NaiveDate>,
    timezone: FixedOffset,
    undated: Tier,
    majority: u32,
    defaults: CompiledRules,
    tables: HashMap<String, CompiledRules>,
    holds: Vec<LegalHold>,
}

/// What the policy knows about a record's date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateFact {
    /// A plausible date.
    Valid(NaiveDate),
    /// NULL or unparseable.
    Missing,
    /// A placeholder such as 1900-01-01 (before 1901).
    Placeholder,
    /// After `as_of`.
    Future,
}

/// Facts about a patient, computed once per patient from the data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PatientFacts {
    /// Latest plausible record date of the patient in any table.
    pub last_activity: Option<NaiveDate>,
    /// Date of birth.
    pub birth_date: Option<NaiveDate>,
    /// Date of death.
    pub deceased_date: Option<NaiveDate>,
}

/// The facts about one record that the policy decides on.
#[derive(Debug, Clone, Copy)]
pub struct RecordFacts<'a> {
    /// The record's date.
    pub record_date: DateFact,
    /// The record's patient key, if it has one.
    pub patient: Option<&'a str>,
    /// The patient's facts.
    pub patient_facts: PatientFacts,
    /// Values of [`PolicyConfig::columns_needed`] for the table, in that order (None for NULL).
    pub columns: &'a [Option<String>],
}

/// Why a record got its tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The table is pinned to a tier.
    TablePinned,
    /// A legal hold kept a record past its retention (archived instead of purged).
    LegalHold,
    /// The record is clinically current.
    ClinicallyCurrent,
    /// The record has no usable date (flagged).
    DateMissing,
    /// The record's date is a placeholder such as 1900-01-01 (flagged).
    DatePlaceholder,
    /// The record's date is after `as_of`: kept operational (flagged).
    DateInFuture,
    /// Past retention: purged.
    RetentionExpired,
    /// The record is younger than the table's `archive_after`.
    RecordRecent,
    /// The patient had activity within `patient_inactive_after`.
    PatientActive,
    /// Old record of an inactive patient (or outside an active patient's kept chart).
    AgedOut,
}

impl Reason {
    /// A short stable name for reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::TablePinned => "table_pinned",
            Reason::LegalHold => "legal_hold",
            Reason::ClinicallyCurrent => "clinically_current",
            Reason::DateMissing => "date_missing",
            Reason::DatePlaceholder => "date_placeholder",
            Reason::DateInFuture => "date_in_future",
            Reason::RetentionExpired => "retention_expired",
            Reason::RecordRecent => "record_recent",
            Reason::PatientActive => "patient_active",
            Reason::AgedOut => "aged_out",
        }
    }

    /// True for reasons that a records manager should review.
    pub fn is_flagged(&self) -> bool {
        matches!(
            self,
            Reason::DateMissing | Reason::DatePlaceholder | Reason::DateInFuture
        )
    }
}

/// A tier, the reason for it, and whether a legal hold covers the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Where the record goes.
    pub tier: Tier,
    /// Which rule decided.
    pub reason: Reason,
    /// A legal hold covers the record (it is never purged).
    pub held: bool,
}

/// Dates before this are placeholders (1900-01-01 and friends).
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

    /// The date taken as "now", once set.
    pub fn as_of(&self) -> Option<NaiveDate> {
        self.as_of
    }

    /// Sets "now" when the policy does not fix it.
    pub fn with_default_as_of(mut self, today: NaiveDate) -> Self {
        self.as_of.get_or_insert(today);
        self
    }

    /// Replaces "now" (for exploring what a later date would do).
    pub fn with_as_of(mut self, as_of: NaiveDate) -> Self {
        self.as_of = Some(as_of);
        self
    }

    /// Adds the legal holds in force.
    pub fn with_holds(mut self, holds: Vec<LegalHold>) -> Self {
        self.holds = holds;
        self
    }

    /// The holds in force.
    pub fn holds(&self) -> &[LegalHold] {
        &self.holds
    }

    /// The calendar date of an instant in the policy's time zone.
    pub fn local_date(&self, instant: DateTime<Utc>) -> NaiveDate {
        instant.with_timezone(&self.timezone).date_naive()
    }

    /// Classifies a date against `as_of`.
    pub fn date_fact(&self, date: Option<NaiveDate>) -> DateFact {
        match date {
            None => DateFact::Missing,
            Some(d) if d < EARLIEST_PLAUSIBLE => DateFact::Placeholder,
            Some(d) if self.as_of.is_some_and(|now| d > now) => DateFact::Future,
            Some(d) => DateFact::Valid(d),
        }
    }

    /// Whether deciding records of these tables can depend on patient facts (last activity,
    /// birth and death dates): false only when each of them is pinned to a tier, so a caller
    /// can skip the pass over the data that computes them.
    pub fn needs_patient_facts<'a>(&self, tables: impl IntoIterator<Item = &'a str>) -> bool {
        tables.into_iter().any(|t| self.rules(t).pinned.is_none())
    }

    /// Whether any record of `table` can go to the archive: false when the table is pinned to
    /// another tier. (Archived rows must arrive sorted by patient; other rows need no order.)
    pub fn may_archive(&self, table: &str) -> bool {
        self.rules(table)
            .pinned
            .is_none_or(|tier| tier == Tier::Archive)
    }

    fn rules(&self, table: &str) -> &CompiledRules {
        self.tables.get(table).unwrap_or(&self.defaults)
    }

    /// The holds covering a record.
    fn holds_on(&self, table: &str, facts: &RecordFacts<'_>, extra: &[String]) -> Vec<&LegalHold> {
        self.holds
            .iter()
            .filter(|h| match &h.scope {
                HoldScope::Patient(p) => facts.patient == Some(p.as_str()),
                HoldScope::Table(t) => t == table,
                HoldScope::Filter {
                    table: t,
                    column,
                    value,
                } => {
                    t == table
                        && extra
                            .iter()
                            .position(|c| c == column)
                            .and_then(|i| facts.columns.get(i).cloned().flatten())
                            .is_some_and(|v| v == *value)
                }
            })
            .collect()
    }

    /// The date a record's retention ends, if the rules destroy it at all.
    fn retention_end(
        &self,
        rules: &CompiledRules,
        record_date: NaiveDate,
        p: &PatientFacts,
    ) -> Option<NaiveDate> {
        if rules.permanent {
            return None;
        }
        let retention = rules.retention?;
        let mut end = match (p.deceased_date, rules.deceased_retention) {
            (Some(death), Some(after_death)) => after_death.after(death),
            _ => retention.after(p.last_activity.unwrap_or(record_date).max(record_date)),
        };
        if let (Some(birth), Some(minor)) = (p.birth_date, rules.minor_retention) {
            let majority = PolicyDuration {
                years: self.majority,
                months: 0,
                days: 0,
            }
            .after(birth);
            if record_date < majority {
                end = end.max(minor.after(majority));
            }
        }
        Some(end)
    }

    /// Decides one record of `table`. Deterministic: the same facts always give the same answer.
    pub fn decide(
        &self,
        table: &str,
        facts: &RecordFacts<'_>,
        extra_columns: &[String],
    ) -> Decision {
        self.evaluate(table, facts, extra_columns, &mut |_| {})
    }

    /// Decides one record and says, rule by rule, how.
    pub fn explain(
        &self,
        table: &str,
        facts: &RecordFacts<'_>,
        extra_columns: &[String],
    ) -> (Decision, Vec<String>) {
        let mut steps = Vec::new();
        let d = self.evaluate(table, facts, extra_columns, &mut |s| {
            steps.push(s.to_string())
        });
        (d, steps)
    }

    fn evaluate(
        &self,
        table: &str,
        facts: &RecordFacts<'_>,
        extra: &[String],
        // Steps are formatted only by `explain`: deciding a row builds no strings.
        trace: &mut dyn FnMut(fmt::Arguments<'_>),
    ) -> Decision {
        let rules = self.rules(table);
        let holds = self.holds_on(table, facts, extra);
        let held = !holds.is_empty();
        let decision = |tier, reason| Decision { tier, reason, held };
        if held {
            let ids: Vec<&str> = holds.iter().map(|h| h.id.as_str()).collect();
            trace(format_args!(
                "legal hold: covered by {}: never purged",
                ids.join(", ")
            ));
        } else {
            trace(format_args!("legal hold: none covers this record"));
        }
        if let Some(tier) = rules.pinned {
            trace(format_args!(
                "table rule: every record of {table} is pinned to {tier}"
            ));
            return decision(tier, Reason::TablePinned);
        }
        if let Some(values) = &rules.current_values {
            let value = facts.columns.first().cloned().flatten();
            let v = value
                .clone()
                .unwrap_or_else(|| "<null>".into())
                .to_ascii_lowercase();
            if values.contains(&v) {
                trace(format_args!(
                    "clinically current: status {v:?} is one of {values:?}: stays operational"
                ));
                return decision(Tier::Operational, Reason::ClinicallyCurrent);
            }
            trace(format_args!(
                "clinically current: status {v:?} is not one of {values:?}"
            ));
        }
        let date = match facts.record_date {
            DateFact::Missing => {
                trace(format_args!(
                    "record date: missing: goes to {} and is flagged",
                    self.undated
                ));
                return decision(self.undated, Reason::DateMissing);
            }
            DateFact::Placeholder => {
                trace(format_args!(
                    "record date: a placeholder before 1901: goes to {} and is flagged",
                    self.undated
                ));
                return decision(self.undated, Reason::DatePlaceholder);
            }
            DateFact::Future => {
                trace(format_args!(
                    "record date: after as_of: stays operational and is flagged"
                ));
                return decision(Tier::Operational, Reason::DateInFuture);
            }
            DateFact::Valid(d) => d,
        };
        let Some(now) = self.as_of else {
            return decision(Tier::Operational, Reason::RecordRecent);
        };
        match self.retention_end(rules, date, &facts.patient_facts) {
            Some(end) if end < now && held => {
                trace(format_args!(
                    "retention: ended {end}, but a legal hold keeps it: archived, not purged"
                ));
                return decision(Tier::Archive, Reason::LegalHold);
            }
            Some(end) if end < now => {
                trace(format_args!(
                    "retention: ended {end} (before {now}): purged"
                ));
                return decision(Tier::Purge, Reason::RetentionExpired);
            }
            Some(end) => trace(format_args!("retention: runs until {end}")),
            None => trace(format_args!("retention: permanent or no retention rule")),
        }
        let cutoff = rules.archive_after.before(now);
        if date > cutoff {
            trace(format_args!("age: record date {date} is after the archive cutoff {cutoff} ({} before {now}): stays operational", rules.archive_after));
            return decision(Tier::Operational, Reason::RecordRecent);
        }
        let inactive_since = rules.inactive_after.before(now);
        let active = facts
            .patient_facts
            .last_activity
            .is_some_and(|last| last > inactive_since);
        if active {
            let within_chart = rules.keep_chart.is_none_or(|w| date > w.before(now));
            trace(format_args!(
                "activity: patient's last activity {} is after {inactive_since}: active",
                facts
                    .patient_facts
                    .last_activity
                    .expect("active has a date")
            ));
            if within_chart {
                trace(format_args!(
                    "chart: an active patient's chart is kept together: stays operational"
                ));
                return decision(Tier::Operational, Reason::PatientActive);
            }
            trace(format_args!(
                "chart: the record is older than the kept chart window"
            ));
        } else {
            trace(format_args!(
                "activity: patient's last activity {} is not after {inactive_since}: inactive",
                DateOrUnknown(facts.patient_facts.last_activity)
            ));
        }
        trace(format_args!(
            "age: record date {date} is not after the archive cutoff {cutoff}: archived"
        ));
        decision(Tier::Archive, Reason::AgedOut)
    }
}

/// A date, or "unknown", for explanations.
struct DateOrUnknown(Option<NaiveDate>);

impl fmt::Display for DateOrUnknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(d) => d.fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

#[cfg(test)]
mod tests;
