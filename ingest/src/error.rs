//! Ingest errors. Messages name tables, keys and columns, never row values (they may be PHI).

/// Errors from planning or running a migration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// A database could not be reached.
    #[error("cannot connect to {url}: {detail}")]
    Connect {
        /// The URL with its password redacted.
        url: String,
        /// The driver's message.
        detail: String,
    },
    /// A SQL statement failed.
    #[error("SQL {context} failed: {}", strata_control::connection_problem(.cause))]
    Sql {
        /// What was being done.
        context: String,
        /// The driver's error (its message is in this one's: not chained as a source, so that
        /// it is printed once).
        cause: sqlx::Error,
    },
    /// Reading a SQLite source failed.
    #[error("SQLite read failed: {detail}")]
    Read {
        /// The driver's message.
        detail: String,
    },
    /// The configuration is invalid; every problem is listed.
    #[error("configuration is not valid:\n  - {}", problems.join("\n  - "))]
    Config {
        /// One line per problem.
        problems: Vec<String>,
    },
    /// The policy is invalid.
    #[error(transparent)]
    Policy(#[from] strata_cutoff_policies::PolicyError),
    /// The archive failed.
    #[error(transparent)]
    Archive(#[from] strata_archive::ArchiveError),
    /// The control database failed.
    #[error(transparent)]
    Control(#[from] strata_control::ControlError),
    /// Too many rows of a table were quarantined.
    #[error("table {table}: {quarantined} rows quarantined, over the threshold of {threshold}; run stopped")]
    QuarantineThreshold {
        /// The table.
        table: String,
        /// Rows quarantined so far.
        quarantined: u64,
        /// The configured threshold.
        threshold: u64,
    },
    /// The run cannot start or resume as asked.
    #[error("{0}")]
    Run(String),
    /// Local IO.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl IngestError {
    /// Whether the database refused data (a constraint violation, or for PostgreSQL SQLSTATE
    /// class 22, data exception, or 23), as opposed to failing for another reason.
    pub(crate) fn is_data_rejected(&self) -> bool {
        let IngestError::Sql { cause, .. } = self else {
            return false;
        };
        let Some(e) = cause.as_database_error() else {
            return false;
        };
        e.kind() != sqlx::error::ErrorKind::Other
            || e.code()
                .is_some_and(|c| c.len() == 5 && (c.starts_with("22") || c.starts_with("23")))
    }

    /// The database's own message of a refused statement, without the values it quotes (a
    /// data exception's `invalid input syntax for type integer: "…"`); its detail, which
    /// holds the values of a constraint's violation, is left out.
    pub(crate) fn database_message(&self) -> String {
        match self {
            IngestError::Sql { cause, .. } => cause
                .as_database_error()
                .map(strata_control::database_error_text)
                .unwrap_or_default(),
            _ => String::new(),
        }
    }

    pub(crate) fn sql(context: &str, source: sqlx::Error) -> Self {
        IngestError::Sql {
            context: context.to_string(),
            cause: source,
        }
    }
}

/// Result with [`IngestError`].
pub type Result<T, E = IngestError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed statement's message is printed once, even by a reporter that prints every
    /// error of the chain (`{:#}`).
    #[test]
    fn a_database_message_is_printed_once() {
        let e = IngestError::sql(
            "plan",
            sqlx::Error::Protocol("column t0.adm_time does not exist".into()),
        );
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        assert_eq!(text.matches("adm_time").count(), 1, "{text}");
    }
}
