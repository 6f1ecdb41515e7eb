//! Strata's archive API: serves the archive read-only to the people who need it.
//!
//! Handlers are thin: they check the caller (a bearer JWT, verified in a tower layer), read
//! through [`strata_archive::ArchiveReader`], and shape JSON. The API never writes to the
//! archive. Errors returned to clients never carry paths, keys, SQL or internal messages; the
//! detail is logged (by table and key only, never row values).
//!
//! Every `/v1` and `/fhir` request is authenticated (bearer JWT), authorized by role (and for
//! patient data, by purpose of use and the clinician's scope, with break-the-glass),
//! rate-limited per user and appended to the control database's hash-chained audit log before
//! its response leaves. Served over TLS (rustls); plain HTTP only on loopback, when the config
//! asks for it.
//!
//! Researchers' exports (`/v1/exports`, and FHIR Bulk Data `$export` under `/fhir`) leave only
//! what their profile lets out of each column's class, pass a scanner for identifiers before
//! they are released, and run as jobs that survive a restart. System clients get their tokens
//! from Strata's own SMART Backend Services token endpoint (`/auth/token`).
#![deny(missing_docs)]

mod access;
mod audit;
mod auth;
mod bulk;
mod config;
mod error;
mod exports;
mod fhir;
mod history;
mod limits;
mod metrics;
mod routes;
mod server;
mod smart;
mod state;
mod viewer;

pub use access::{PatientAccess, BREAK_GLASS_HEADER, PURPOSES, PURPOSE_HEADER};
pub use auth::{Auth, Claims, Principal, Role};
pub use config::{
    ApiConfig, AuditConfig, AuthConfig, CrossReferenceConfig, ExportsConfig, FhirTable,
    LimitsConfig, OpenIdConfig, SmartClient, SmartConfig, StudyKey, ViewerConfig,
};
pub use error::ApiError;
pub use exports::{start_background, ExportRequest, Exporter, JobSpec};
pub use metrics::Rejection;
pub use routes::{ceiling_router, router, ApiDoc, ErrorBody};
pub use server::{serve, serve_router, ClientAddress, Serving, TrustedProxies};
pub use smart::Smart;
pub use state::{audit_key, AppState, ViewerSettings};
