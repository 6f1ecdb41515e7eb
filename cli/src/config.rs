//! Loads `strata.toml`: the `[api]` section for the archive API, the rest for ingest.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use strata_archive_api::ApiConfig;
use strata_ingest::MigrationConfig;

/// A loaded config file.
pub struct LoadedConfig {
    pub migration: MigrationConfig,
    pub api: Option<ApiConfig>,
    pub base_dir: PathBuf,
}

impl LoadedConfig {
    /// The classes of the archived columns (from the tables and the policy's patients table),
    /// which researchers' exports follow.
    pub fn classification(&self) -> Result<strata_deidentify::Classification> {
        let policy = strata_ingest::read_policy(&self.migration)?;
        self.migration
            .classification(policy.patients.as_ref())
            .map_err(|problems| anyhow::anyhow!("{}", problems.join("\n")))
    }
}

pub fn load(path: &Path) -> Result<LoadedConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base_dir = if base_dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base_dir
    };
    let api = table
        .remove("api")
        .map(|v| v.try_into::<ApiConfig>())
        .transpose()
        .with_context(|| format!("{}: [api] section", path.display()))?;
    let migration =
        MigrationConfig::parse(table, &base_dir).with_context(|| format!("{}", path.display()))?;
    Ok(LoadedConfig {
        migration,
        api,
        base_dir,
    })
}
