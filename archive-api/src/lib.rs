//! Strata's archive API: serves the archive read-only to the people who need it.
//!
//! Handlers are thin: they check the caller (a bearer JWT, verified in a tower layer), read
//! through [`strata_archive::ArchiveReader`], and shape JSON. The API never writes to the
//! archive. Errors returned to clients never carry paths, keys, SQL or internal messages; the
//! detail is logged (by table and key only, never row values).
//!
//! Every `/v1` request is authenticated (bearer JWT), authorized by role (and for patient data,
//! by purpose of use and the clinician's scope, with break-the-glass), rate-limited per user and
//! appended to the control database's hash-chained audit log before its response leaves.
//! Served over TLS (rustls); plain HTTP only on loopback, when the config asks for it.
#![deny(missing_docs)]

mod access;
mod audit;
mod auth;
mod config;
mod error;
mod exports;
mod fhir;
mod history;
mod limits;
mod metrics;
mod routes;

pub use access::{PatientAccess, BREAK_GLASS_HEADER, PURPOSES, PURPOSE_HEADER};
pub use auth::{Auth, Claims, Principal, Role};
pub use config::{
    ApiConfig, AuditConfig, AuthConfig, ExportProfile, ExportsConfig, FhirTable, LimitsConfig,
};
pub use error::ApiError;
pub use exports::{ExportRequest, Exporter};
pub use routes::{audit_key, router, serve, ApiDoc, AppState, ErrorBody};
