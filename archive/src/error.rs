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

/// The detail of an [`ArchiveError::Integrity`] for a file that a manifest names and the store
/// lacks (deleted by a gc after a compaction, or by hand).
pub(crate) const MISSING_FILE: &str = "file is missing";

impl ArchiveError {
    /// Whether a file the catalog names is gone from the store. A reader whose catalog is older
    /// than a compaction and its gc meets this; a fresher catalog does not name the file.
    pub fn is_missing_file(&self) -> bool {
        matches!(self, ArchiveError::Integrity { detail, .. } if detail == MISSING_FILE)
    }
}

/// Result with [`ArchiveError`].
pub type Result<T, E = ArchiveError> = std::result::Result<T, E>;
