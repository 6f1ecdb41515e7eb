//! Strata ingest: reads a legacy SQL database, lets the cutoff policy decide every row, and
//! writes active rows to the new operational database and older rows to the encrypted archive.
//!
//! The source is only ever read (SQLite opened read-only, PostgreSQL sessions with
//! `default_transaction_read_only`). Every table, key and column comes from the configuration
//! ([`MigrationConfig`]); nothing here knows a schema. Rows whose values cannot be read as their
//! column's type are quarantined with the table, key, column and reason, and the run goes on.
//!
//! The flow for one table: key ranges read in parallel → coerce → policy decision (with
//! patient facts computed once and the legal holds in force) → operational batch insert | Arrow
//! batch to the archive writer (BLOBs to encrypted objects) | purge (a destruction record with
//! counts, key range and checksum) | quarantine. [`Migration::plan`] runs the same path without
//! writing anything. SQLite sources are read directly (rusqlite, read-only, on a blocking
//! thread, in bounded chunks) and PostgreSQL sources as binary `COPY (SELECT ...) TO STDOUT`
//! streams decoded on their own task: both several times faster than row by row.
#![deny(missing_docs)]

mod archive_rows;
mod classes;
mod config;
mod csv_source;
mod db;
mod decimal;
mod error;
mod facts;
mod init;
mod inspect;
mod layout;
mod load;
mod maintenance_lock;
mod mapping;
mod migrate;
mod operational;
mod pg_copy;
mod progress;
mod ranges;
mod report;
mod run_lock;
pub mod sync;
mod target_check;
mod value;
mod warnings;

pub use config::{
    BlobColumnConfig, ColumnMapping, ComputedColumn, DatabaseConfig, MigrationConfig, PatientVia,
    PolicyFileConfig, RecordDateConfig, TableConfig, UnitConversionConfig, VerifyConfig,
};
pub use db::{quote, redact, Column, Db, DbKind, ReadAs, TableSchema};
pub use decimal::{Decimal, CSV_DECIMAL_DECL};
pub use error::{IngestError, Result};
pub use init::{draft, draft_config, guess_tables, Draft, TableGuess};
pub use inspect::{valid_code, ColumnProfile, Finding, Severity, TableProfile, EXACT_DISTINCT};
pub use layout::TableLayout;
pub use maintenance_lock::MaintenanceLock;
pub use migrate::{
    carry_out_retention, certify_keys_destroyed, check_evidence, check_policy, check_report,
    file_retention_list, new_signing_key, read_only_statements, read_policy, settle_tier_batches,
    sign_report, wrap_signing_key, CutoverReport, DestroyedTable, DestructionCertificate,
    Difference, Evidence, Explanation, FiledList, Holding, ListedTable, Migration, OutboxReport,
    PolicyCheck, RetentionList, RollbackReport, Signature, SyncReport, SyncUntil, TableCounts,
    TableProof, TierList, TierPass, TierReport, TierTable, VerifyReport, CERTIFICATE_FORMAT,
    LISTED_DIFFERENCES,
};
pub use operational::{OperationalConfig, OperationalTableConfig};
pub use progress::{RunProgress, TableProgress, TableProgressSnapshot};
pub use report::{RunReport, TableReport, YearRows, EXACT_PATIENTS};
pub use run_lock::RunLock;
pub use value::{parse_date, parse_timestamp, ColumnType, Value};
pub use warnings::config_warnings;
