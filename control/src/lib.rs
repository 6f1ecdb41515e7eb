//! Strata's control database: the state Strata keeps about its own work, apart from the data.
//!
//! Runs and their per-table progress (so a stopped run resumes), policy versions, plans, legal
//! holds, destruction records, researchers' export jobs and cohorts, the archive viewer's browser
//! sessions ([`Control`]); what it knows
//! of the archive (the ledger of what runs archived and the mirror of the catalog, held against
//! the archive's manifests by [`cross_check`]); and the
//! hash-chained audit log of the archive API ([`AuditLog`]). Ingest, the API and the `strata`
//! command share it; PostgreSQL in production, SQLite beside the config in the demo.
#![deny(missing_docs)]

mod archive_catalog;
mod audit;
mod control;
mod db;
mod destructions;
mod error;
mod exports;
mod reviews;
mod rollback;
mod sessions;
mod sync;
mod verification;

pub use archive_catalog::{cross_check, CatalogCheck, LedgerEntry, MirroredFile, TableAccount};
pub use audit::{
    AuditEntry, AuditKey, AuditLog, AuditProblem, AuditQuery, AuditRecord, AuditVerifyReport,
    Outcome,
};
pub use control::{
    Control, DestructionRecord, HoldRecord, PolicyVersion, RunRecord, StoredPlan, TableState,
};
pub use db::{connection_problem, database_error_text, reach_postgres, without_values};
pub use destructions::{same_person, DestructionRequest, RequestStatus};
pub use error::{ControlError, Result};
pub use exports::{ExportRecord, GroupRecord};
pub use reviews::BreakGlassReview;
pub use rollback::RollbackRecord;
pub use sessions::StoredSession;
pub use sync::{CutoverRecord, SyncRecord};
pub use verification::VerificationRecord;
