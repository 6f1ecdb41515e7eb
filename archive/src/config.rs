//! The `[archive]` section of `strata.toml`: where the archive lives and where its keys come from.

use crate::error::{ArchiveError, Result};
use crate::keys::{Kek, KeyRing};
use crate::secret::SecretSource;
use crate::store::{open_store, ArchiveLocation};
use object_store::ObjectStore;
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;

/// Archive location and key source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// A directory (relative to the config file), `file:///path`, or `s3://bucket/prefix`.
    pub location: String,
    /// The id of the current key-encryption key; recorded in every file it wraps.
    pub kek_id: String,
    /// A file holding the KEK as 64 hex characters (development; relative to the config file).
    #[serde(default)]
    pub kek_file: Option<String>,
    /// An environment variable holding the KEK as 64 hex characters.
    #[serde(default)]
    pub kek_env: Option<String>,
    /// Older KEKs that still unwrap data keys (after a rotation), as `{ id, file | env }`.
    #[serde(default)]
    pub previous_keks: Vec<PreviousKek>,
}

/// An older KEK.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviousKek {
    /// Its id.
    pub id: String,
    /// A file with its hex.
    #[serde(default)]
    pub file: Option<String>,
    /// An environment variable with its hex.
    #[serde(default)]
    pub env: Option<String>,
}

fn load_kek(id: &str, file: Option<&str>, env: Option<&str>, base: &Path) -> Result<Kek> {
    let at = format!("KEK {id:?}");
    let hex_key = SecretSource::required(file, env, &at, ("a key file", "an environment variable"))
        .and_then(|source| source.read(base, &at))
        .map_err(ArchiveError::Key)?;
    Kek::from_hex(id, &hex_key)
}

impl ArchiveConfig {
    /// The parsed location, with a relative directory resolved against `base`.
    pub fn location(&self, base: &Path) -> Result<ArchiveLocation> {
        Ok(match ArchiveLocation::parse(&self.location)? {
            ArchiveLocation::Local(p) if p.is_relative() => ArchiveLocation::Local(base.join(p)),
            other => other,
        })
    }

    /// Loads the key ring.
    pub fn key_ring(&self, base: &Path) -> Result<KeyRing> {
        let current = load_kek(
            &self.kek_id,
            self.kek_file.as_deref(),
            self.kek_env.as_deref(),
            base,
        )?;
        let older = self
            .previous_keks
            .iter()
            .map(|p| load_kek(&p.id, p.file.as_deref(), p.env.as_deref(), base))
            .collect::<Result<Vec<_>>>()?;
        Ok(KeyRing::new(current, older))
    }

    /// Opens the store and loads the keys.
    pub fn open(&self, base: &Path) -> Result<(Arc<dyn ObjectStore>, KeyRing)> {
        let store = open_store(&self.location(base)?)?;
        Ok((store, self.key_ring(base)?))
    }
}
