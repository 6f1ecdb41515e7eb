//! Cutoff policies: the rules records managers write to decide where each record lives.
//!
//! A policy is a small TOML document (see `deploy/policy.toml`). It is parsed into a
//! [`PolicyConfig`], checked against the tables and columns the migration knows about, and
//! compiled into a [`Policy`] that decides one record at a time from [`RecordFacts`].
//!
//! Key decision: this crate is pure. It does no IO, knows no database and no clock: "now" is the
//! policy's `as_of` date (or one the caller passes), so the same policy over the same data always
//! gives the same answer, and every decision carries the [`Reason`] that produced it.
//!
//! Precedence, highest first: a legal hold (a held record is never purged) > a table pinned to
//! a tier > a clinically current record (for example an active medication) > a record whose date
//! is missing or implausible (kept where `undated` says, flagged) > retention (purge) > age and
//! patient activity (archive).
//!
//! ```
//! use strata_cutoff_policies::{DateFact, PatientFacts, PolicyConfig, RecordFacts, Tier};
//! use chrono::NaiveDate;
//!
//! let config = PolicyConfig::parse(r#"
//!     version = "example-1"
//!     as_of = "2026-01-01"
//!     [defaults]
//!     archive_after = "5y"
//!     patient_inactive_after = "3y"
//! "#).unwrap();
//! let policy = config.build(&[("labs", &["id", "observed_at"][..])]).unwrap();
//! let old = NaiveDate::from_ymd_opt(2010, 5, 1).unwrap();
//! let facts = RecordFacts {
//!     record_date: DateFact::Valid(old),
//!     patient: Some("17"),
//!     patient_facts: PatientFacts { last_activity: Some(old), ..Default::default() },
//!     columns: &[],
//! };
//! let decision = policy.decide("labs", &facts, &[]);
//! assert_eq!(decision.tier, Tier::Archive);
//! ```
#![deny(missing_docs)]

mod duration;
mod policy;

pub use duration::{PolicyDuration, PolicyDurationError};
pub use policy::{
    CurrentWhen, DateFact, Decision, HoldScope, Leaving, LegalHold, PatientFacts,
    PatientFactsConfig, Policy, PolicyConfig, PolicyError, PolicyProblem, Reason, RecordFacts,
    RulesConfig, TableRulesConfig, Tier,
};
