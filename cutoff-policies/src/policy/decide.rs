//! The compiled policy and the per-record decision: the facts a record is decided by, the
//! rules in precedence order, and the explanation of each decision.

use super::{LegalHold, Tier};
use crate::duration::PolicyDuration;
use chrono::{DateTime, FixedOffset, NaiveDate, Utc};
use std::collections::HashMap;
use std::fmt;

#[derive(Debug, Clone)]
pub(super) struct CompiledRules {
    pub(super) pinned: Option<Tier>,
    pub(super) permanent: bool,
    pub(super) archive_after: PolicyDuration,
    pub(super) inactive_after: PolicyDuration,
    pub(super) keep_chart: Option<PolicyDuration>,
    pub(super) retention: Option<PolicyDuration>,
    pub(super) minor_retention: Option<PolicyDuration>,
    pub(super) deceased_retention: Option<PolicyDuration>,
    pub(super) current_values: Option<Vec<String>>,
}

/// Which records of a table can leave the operational tier ([`Policy::leaving_operational`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// None: the table is pinned to the operational tier (or there is no `as_of`).
    Never,
    /// Only records dated on or before this day, and undated ones.
    DatedUpTo(NaiveDate),
    /// Any record, whatever its date.
    Any,
}

/// A compiled policy, ready to decide records.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(super) version: String,
    pub(super) hash: String,
    pub(super) as_of: Option<NaiveDate>,
    pub(super) timezone: FixedOffset,
    pub(super) undated: Tier,
    pub(super) majority: u32,
    pub(super) defaults: CompiledRules,
    pub(super) tables: HashMap<String, CompiledRules>,
    pub(super) holds: Vec<LegalHold>,
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

    /// Which records of `table` can leave the operational tier at `as_of` (archived or
    /// purged), by record date: a pass over an operational table after go-live reads only
    /// those (an index on the date makes it cheap). The bound is conservative: a few days
    /// later than the policy's exact cutoff, for calendar arithmetic.
    pub fn leaving_operational(&self, table: &str) -> Leaving {
        let rules = self.rules(table);
        match rules.pinned {
            Some(Tier::Operational) => return Leaving::Never,
            Some(_) => return Leaving::Any,
            None => {}
        }
        let Some(now) = self.as_of else {
            return Leaving::Never;
        };
        let destroys = !rules.permanent && rules.retention.is_some();
        // Retention counted from a death date ends whatever the record's own date.
        if destroys && rules.deceased_retention.is_some() {
            return Leaving::Any;
        }
        let mut bound = rules.archive_after.before(now);
        if let (true, Some(retention)) = (destroys, rules.retention) {
            bound = bound.max(retention.before(now));
        }
        Leaving::DatedUpTo(bound + chrono::Duration::days(3))
    }

    fn rules(&self, table: &str) -> &CompiledRules {
        self.tables.get(table).unwrap_or(&self.defaults)
    }

    /// The holds covering a record.
    fn holds_on(&self, table: &str, facts: &RecordFacts<'_>, extra: &[String]) -> Vec<&LegalHold> {
        let value_of = |column: &str| {
            extra
                .iter()
                .position(|c| c == column)
                .and_then(|i| facts.columns.get(i).cloned().flatten())
        };
        self.holds
            .iter()
            .filter(|h| h.covers(table, facts.patient, value_of))
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
