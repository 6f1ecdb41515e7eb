//! Strata's archive API: serves the archive read-only to the people who need it.
//!
//! Handlers are thin: they check the caller (a bearer JWT, verified in a tower layer), read
//! through [`strata_archive::ArchiveReader`], and shape JSON. The API never writes to the
//! archive. Errors returned to clients never carry paths, keys, SQL or internal messages; the
//! detail is logged (by table and key only, never row values).
//!
//! Routes: `GET /healthz`, `GET /v1/patients/{patient}/history`,
//! `GET /v1/patients/{patient}/documents/{document}` (with HTTP `Range`: only the encrypted
//! segments that hold the range are read and decrypted).
#![deny(missing_docs)]

mod auth;
mod config;
mod error;
mod history;
mod routes;

pub use auth::{Auth, Claims, Principal, Role};
pub use config::{ApiConfig, AuthConfig};
pub use error::ApiError;
pub use routes::{router, serve, AppState};
