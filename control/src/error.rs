//! Errors of the control database. They name the operation, never a row's values.

/// A control-database error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The database could not be reached.
    #[error("cannot connect to the control database {url}: {detail}")]
    Connect {
        /// The URL, password removed.
        url: String,
        /// Why.
        detail: String,
    },
    /// A statement failed.
    #[error("control database {context}: {}", crate::db::connection_problem(.source))]
    Sql {
        /// What was being done.
        context: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// A request the control database refuses (a hold without a reason, an unknown hold, ...).
    #[error("{0}")]
    Invalid(String),
    /// The audit log could not record an entry (the request it describes must not proceed).
    #[error("the audit log is unavailable: {0}")]
    AuditUnavailable(String),
}

impl ControlError {
    pub(crate) fn sql(context: &str, source: sqlx::Error) -> Self {
        ControlError::Sql {
            context: context.to_string(),
            source,
        }
    }
}

/// Result with [`ControlError`].
pub type Result<T, E = ControlError> = std::result::Result<T, E>;
