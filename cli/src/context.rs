//! What a command works with: the config it was given, the control database it names (opened
//! once, when first asked for) and the archive's store and keys (read once); a reader of the
//! archive is opened on its catalog as it stands whenever the command asks.

use crate::config::{self, LoadedConfig};
use anyhow::{Context as _, Result};
use std::path::Path;
use std::sync::OnceLock;
use strata_archive::{ArchiveReader, KeyRing, Store};
use strata_archive_api::ApiConfig;
use strata_control::Control;
use tokio::sync::OnceCell;

/// A command's context.
pub struct Context {
    /// `strata.toml` as loaded.
    pub config: LoadedConfig,
    control: OnceCell<Control>,
    archive: OnceLock<(Store, KeyRing)>,
}

impl Context {
    /// The context of the config file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Context {
            config: config::load(path)?,
            control: OnceCell::new(),
            archive: OnceLock::new(),
        })
    }

    /// The directory relative paths in the config are resolved against.
    pub fn base_dir(&self) -> &Path {
        &self.config.base_dir
    }

    /// The `[api]` section, which serving, tokens and the audit log need.
    pub fn api(&self) -> Result<&ApiConfig> {
        self.config
            .api
            .as_ref()
            .context("the config has no [api] section")
    }

    /// The control database.
    pub async fn control(&self) -> Result<&Control> {
        self.control
            .get_or_try_init(|| async {
                Ok(Control::open(&self.config.migration.control_url()?).await?)
            })
            .await
    }

    /// The archive's store and key ring (the KEKs read, the archive key not yet unwrapped).
    pub fn archive_store(&self) -> Result<&(Store, KeyRing)> {
        if let Some(opened) = self.archive.get() {
            return Ok(opened);
        }
        let opened = self.config.migration.archive.open(self.base_dir())?;
        Ok(self.archive.get_or_init(|| opened))
    }

    /// The archive, read through its catalog as it stands now.
    pub async fn archive(&self) -> Result<ArchiveReader> {
        let (store, keys) = self.archive_store()?.clone();
        Ok(ArchiveReader::open(store, keys).await?)
    }
}
