//! The archive's error type: integrity failures are their own variant, never data.

/// Errors from reading or writing the archive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    /// An object was modified, truncated, swapped, or decrypts with the wrong key.
    #[error("integrity error in {object}: {detail}")]
    Integrity {
        /// The object's path in the archive.
        object: String,
        /// What did not match.
        detail: String,
    },
    /// A key is missing or malformed.
    #[error("key error: {0}")]
    Key(String),
    /// The archive location or its configuration is not usable.
    #[error("archive location {location}: {detail}")]
    Location {
        /// The location as configured.
        location: String,
        /// What is wrong.
        detail: String,
    },
    /// The object store failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// Parquet encoding or decoding failed.
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// Arrow failed.
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A manifest could not be parsed.
    #[error("manifest {object}: {detail}")]
    Manifest {
        /// The manifest's path.
        object: String,
        /// What is wrong.
        detail: String,
    },
    /// Local IO failed (key files).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Result with [`ArchiveError`].
pub type Result<T, E = ArchiveError> = std::result::Result<T, E>;
