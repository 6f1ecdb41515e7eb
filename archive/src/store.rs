//! Where an archive lives: a local directory or an S3-compatible bucket, both as `ObjectStore`.

use crate::error::{ArchiveError, Result};
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::ObjectStore;
use std::sync::Arc;

/// An archive location as configured: a filesystem path, `file:///path`, or `s3://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveLocation {
    /// A local directory (created if missing).
    Local(std::path::PathBuf),
    /// An S3-compatible bucket; credentials and endpoint come from the standard `AWS_*`
    /// environment variables (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP` for a loopback test server).
    S3 {
        /// The bucket.
        bucket: String,
        /// The key prefix inside the bucket ("" for the whole bucket).
        prefix: String,
    },
}

impl ArchiveLocation {
    /// Parses a configured location.
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(ArchiveError::Location {
                    location: text.into(),
                    detail: "no bucket named".into(),
                });
            }
            return Ok(ArchiveLocation::S3 {
                bucket: bucket.into(),
                prefix: prefix.trim_matches('/').into(),
            });
        }
        if text.contains("://") && !text.starts_with("file://") {
            return Err(ArchiveLocation::unsupported(text));
        }
        let path = text.strip_prefix("file://").unwrap_or(text);
        Ok(ArchiveLocation::Local(path.into()))
    }

    fn unsupported(text: &str) -> ArchiveError {
        ArchiveError::Location {
            location: text.into(),
            detail: "use a directory path, file:///path or s3://bucket/prefix".into(),
        }
    }
}

impl std::fmt::Display for ArchiveLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArchiveLocation::Local(p) => write!(f, "{}", p.display()),
            ArchiveLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Opens the object store behind a location.
pub fn open_store(location: &ArchiveLocation) -> Result<Arc<dyn ObjectStore>> {
    let err = |detail: String| ArchiveError::Location {
        location: location.to_string(),
        detail,
    };
    match location {
        ArchiveLocation::Local(path) => {
            if path.exists() && !path.is_dir() {
                return Err(err(
                    "is a file, not a directory: name a directory (created if missing)".into(),
                ));
            }
            std::fs::create_dir_all(path).map_err(|e| err(e.to_string()))?;
            let store = LocalFileSystem::new_with_prefix(path)?.with_automatic_cleanup(true);
            Ok(Arc::new(store))
        }
        ArchiveLocation::S3 { bucket, prefix } => {
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()?;
            if prefix.is_empty() {
                Ok(Arc::new(store))
            } else {
                Ok(Arc::new(PrefixStore::new(store, prefix.as_str())))
            }
        }
    }
}
