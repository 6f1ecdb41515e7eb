//! Strata's control database: the state Strata keeps about its own work, apart from the data.
//!
//! Runs and their per-table progress (so a stopped run resumes), policy versions, plans, legal
//! holds, destruction records, the mirror of the archive's catalog ([`Control`]), and the
//! hash-chained audit log of the archive API ([`AuditLog`]). Ingest, the API and the `strata`
//! command share it; PostgreSQL in production, SQLite beside the config in the demo.
#![deny(missing_docs)]

mod audit;
mod control;
mod db;
mod error;

pub use audit::{
    AuditEntry, AuditKey, AuditLog, AuditProblem, AuditQuery, AuditRecord, AuditVerifyReport,
    Outcome,
};
pub use control::{Control, DestructionRecord, ExportRecord, HoldRecord, PolicyVersion, RunRecord};
pub use error::{ControlError, Result};
