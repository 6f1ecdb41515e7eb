//! The lock the archive's maintenance commands take turns on (`strata tier`, `strata archive
//! compact`, `retain` and `gc`): each reads or rewrites what the others write (a tier batch
//! publishes its manifest before it commits; a compaction merges every published manifest; gc
//! deletes what no manifest names). It is a PostgreSQL advisory lock on the operational
//! database, held by a session of its own for as long as the command runs: every host that
//! runs maintenance against that database is excluded, and the lock goes with the session
//! however the command ends (kill -9 included). With a SQLite operational database, tier does
//! not run, and the commands left guard themselves (a rewrite publishes nothing if another was
//! published meanwhile): no lock is taken.

use crate::config::MigrationConfig;
use crate::error::{IngestError, Result};
use crate::DbKind;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use std::str::FromStr;

/// The advisory lock's key: "STRATA" and 1, as a 64-bit number.
const LOCK_KEY: i64 = 0x5354_5241_5441_0001;

/// Tries at taking the lock, 200 ms apart (ten seconds).
const WAIT_ATTEMPTS: u32 = 50;

/// Held for as long as it lives.
#[derive(Debug)]
pub struct MaintenanceLock {
    _session: Option<PgConnection>,
}

impl MaintenanceLock {
    /// Takes the lock of `config`'s operational database (waiting up to ten seconds), or says
    /// that another maintenance command holds it.
    pub async fn take(config: &MigrationConfig) -> Result<Self> {
        if config.operational_kind()? != DbKind::Postgres {
            return Ok(MaintenanceLock { _session: None });
        }
        let url = config.resolve_url(&config.operational.url)?;
        let conn_err = |e: sqlx::Error| IngestError::Connect {
            url: crate::redact(&url),
            detail: strata_control::connection_problem(&e),
        };
        let mut session = PgConnectOptions::from_str(&url)
            .map_err(conn_err)?
            .disable_statement_logging()
            .connect()
            .await
            .map_err(conn_err)?;
        // A holder killed a moment ago is let go by the server as soon as it sees the session
        // end: wait a little before saying the lock is held.
        let mut taken = false;
        for attempt in 0..WAIT_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            taken = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LOCK_KEY)
                .fetch_one(&mut session)
                .await
                .map_err(|e| IngestError::sql("take the maintenance lock", e))?;
            if taken {
                break;
            }
        }
        if !taken {
            return Err(IngestError::Run(
                "another `strata tier` or `strata archive compact|retain|gc` is running against this operational database (it holds the maintenance lock): let it finish, or stop it first".into(),
            ));
        }
        Ok(MaintenanceLock {
            _session: Some(session),
        })
    }
}
