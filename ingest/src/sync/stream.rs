//! Reading a logical replication slot: the slot is created over SQL (Strata's source role
//! needs `REPLICATION`), and its changes stream over a replication connection
//! (`pgwire-replication`: the wire protocol, TLS and SCRAM, raw `pgoutput` messages), one
//! whole source transaction at a time, in commit order. The slot's confirmed position moves
//! only when the caller confirms what it made durable ([`ChangeStream::confirm`]).

use super::pgoutput::{self, Message};
use crate::db::Db;
use crate::error::{IngestError, Result};
use crate::value::{ColumnType, Value};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};

/// Session settings of the replication connection, so that values arrive as text in the
/// formats a regular connection of Strata reads (ISO dates, full float precision, hex bytea).
const SESSION_OPTIONS: &str =
    "-c datestyle=ISO,YMD -c intervalstyle=iso_8601 -c extra_float_digits=3 -c bytea_output=hex -c TimeZone=UTC";

/// Creates logical replication slot `name` (plugin `pgoutput`) and returns its consistent
/// point: every transaction that commits after it is decoded. Create it before the bulk
/// copy's snapshot ([`super::snapshot`]).
pub async fn create_slot(source: &Db, name: &str) -> Result<String> {
    let sql = format!(
        "SELECT lsn::text FROM pg_create_logical_replication_slot('{}', 'pgoutput')",
        name.replace('\'', "''")
    );
    let rows = source.fetch_all(sql, vec![ColumnType::Text]).await?;
    match rows.first().map(|r| &r[0]) {
        Some(Value::Text(lsn)) => Ok(lsn.clone()),
        _ => Err(IngestError::Run(format!(
            "replication slot {name}: PostgreSQL returned no position"
        ))),
    }
}

/// A source transaction as the stream carries it.
#[derive(Debug, Clone)]
pub struct SourceTransaction {
    /// Its transaction id (32 bits).
    pub xid: u32,
    /// Its commit record's position.
    pub commit_lsn: u64,
    /// The position just past its commit: what to confirm once it is applied.
    pub end_lsn: u64,
    /// Its changes (and the relation descriptions before them), in order.
    pub messages: Vec<Message>,
}

/// The changes of a slot, transaction by transaction.
pub struct ChangeStream {
    client: ReplicationClient,
}

fn stream_error(e: impl std::fmt::Display) -> IngestError {
    IngestError::Run(format!("change stream: {e}"))
}

impl ChangeStream {
    /// Opens the stream of `slot` for `publication` on the source at `url` (a `postgres://`
    /// URL: user, password, host, port, database; `sslmode=require` or `verify-full` for TLS),
    /// from the slot's confirmed position; it ends after the transaction that reaches
    /// `stop_at`, if given.
    pub async fn open(
        url: &str,
        slot: &str,
        publication: &str,
        stop_at: Option<u64>,
    ) -> Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| stream_error(format!("source URL: {e}")))?;
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let sslmode = parsed
            .query_pairs()
            .find(|(k, _)| k == "sslmode")
            .map(|(_, v)| v.into_owned());
        let mut config = ReplicationConfig::default();
        config.host = parsed.host_str().unwrap_or("localhost").to_string();
        config.port = parsed.port().unwrap_or(5432);
        config.user = decode(parsed.username());
        config.password = decode(parsed.password().unwrap_or(""));
        config.database = parsed.path().trim_start_matches('/').to_string();
        config.tls = match sslmode.as_deref() {
            Some("require") => TlsConfig::require(),
            Some("verify-ca") => TlsConfig::verify_ca(None),
            Some("verify-full") => TlsConfig::verify_full(None),
            _ => TlsConfig::disabled(),
        };
        config.slot = slot.to_string();
        config.publication = publication.into();
        config.start_lsn = Lsn::from_u64(0);
        config.stop_at_lsn = stop_at.map(Lsn::from_u64);
        config.options = Some(SESSION_OPTIONS.to_string());
        let client = ReplicationClient::connect(config)
            .await
            .map_err(stream_error)?;
        Ok(ChangeStream { client })
    }

    /// The next whole transaction; None once the stream stopped at `stop_at` or ended.
    /// A transaction is held whole in memory (its rows, each up to PostgreSQL's 1 GB value
    /// limit).
    pub async fn next_transaction(&mut self) -> Result<Option<SourceTransaction>> {
        let mut current: Option<SourceTransaction> = None;
        loop {
            let Some(event) = self.client.recv().await.map_err(stream_error)? else {
                return Ok(None);
            };
            match event {
                ReplicationEvent::Begin { xid, .. } => {
                    current = Some(SourceTransaction {
                        xid,
                        commit_lsn: 0,
                        end_lsn: 0,
                        messages: Vec::new(),
                    });
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let message = pgoutput::decode(&data).map_err(stream_error)?;
                    match current.as_mut() {
                        Some(t) => t.messages.push(message),
                        None => {
                            return Err(stream_error(
                                "a change outside a transaction (is the slot pgoutput?)",
                            ))
                        }
                    }
                }
                ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                    if let Some(mut t) = current.take() {
                        t.commit_lsn = lsn.as_u64();
                        t.end_lsn = end_lsn.as_u64();
                        return Ok(Some(t));
                    }
                }
                ReplicationEvent::StoppedAt { .. } => return Ok(None),
                ReplicationEvent::KeepAlive { .. } | ReplicationEvent::Message { .. } => {}
            }
        }
    }

    /// Tells the slot that everything up to `lsn` is durable on the target side: the source
    /// may recycle the WAL before it. Call it only after the target transaction that applied
    /// those changes (and recorded `lsn`) committed.
    pub fn confirm(&self, lsn: u64) {
        self.client.update_applied_lsn(Lsn::from_u64(lsn));
    }

    /// Ends the stream.
    pub async fn close(mut self) -> Result<()> {
        self.client.shutdown().await.map_err(stream_error)
    }
}

/// Parses a PostgreSQL LSN (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Result<u64> {
    Lsn::parse(text)
        .map(Lsn::as_u64)
        .map_err(|e| stream_error(format!("LSN {text:?}: {e}")))
}
