//! The lock a migration holds while it runs: a second `strata migrate` of the same
//! configuration, or `strata migrate --abandon` while one runs, is refused instead of
//! interleaving with it (an abandon would otherwise roll back tables a live run goes on
//! writing, and the run then mark itself done).

use crate::error::{IngestError, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// The file locked, beside the configuration.
const LOCK_FILE: &str = ".strata-migrate.lock";

/// Held for as long as it lives. The operating system releases the lock when the process
/// ends, however it ends (kill -9 included): a run cut short never leaves it taken.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of the configuration in `base_dir`, or says who holds it.
    pub fn take(base_dir: &Path) -> Result<Self> {
        let path: PathBuf = base_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| {
                IngestError::Run(format!("cannot open the run lock {}: {e}", path.display()))
            })?;
        match file.try_lock() {
            Ok(()) => Ok(RunLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(IngestError::Run(format!(
                "another `strata migrate` of this configuration is running (it holds {}): let it finish, or stop it first",
                path.display()
            ))),
            Err(TryLockError::Error(e)) => Err(IngestError::Run(format!(
                "cannot take the run lock {}: {e}",
                path.display()
            ))),
        }
    }
}
