//! Reading a logical replication slot: the slot is created over SQL (Strata's source role
//! needs `REPLICATION`), and its changes stream over a replication connection
//! (`pgwire-replication`: the wire protocol, TLS and SCRAM, raw `pgoutput` messages), one
//! whole source transaction at a time, in commit order. The slot's confirmed position moves
//! only when the caller confirms what it made durable ([`ChangeStream::confirm`]).

use super::pgoutput::{self, Message};
use crate::error::{IngestError, Result};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};

/// Session settings of the replication connection, so that values arrive as text in the
/// formats a regular connection of Strata reads (ISO dates, full float precision, hex bytea);
/// and a sender timeout of 10 s, so that an idle source says every 5 s how far it has sent
/// (what tells a catch-up it is done; the server's default, 60 s, would make it wait 30 s).
const SESSION_OPTIONS: &str = "-c datestyle=ISO,YMD -c intervalstyle=iso_8601 -c extra_float_digits=3 -c bytea_output=hex -c TimeZone=UTC -c wal_sender_timeout=10s";

/// Creates logical replication slot `name` (plugin `pgoutput`) on the source at `url` and
/// returns its consistent point: every transaction that commits after it is decoded. Create
/// it before the bulk copy's snapshot ([`super::snapshot`]). The slot is made with the
/// replication protocol's `CREATE_REPLICATION_SLOT`, as `pg_recvlogical` and pgcopydb do
/// (PostgreSQL 15's SQL function can fail with "snapshot reference ... is not owned by
/// resource owner" while other transactions run).
pub async fn create_slot(url: &str, name: &str) -> Result<String> {
    let mut config = replication_config(url, name, "")?;
    config.start_lsn = Lsn::from_u64(0);
    let mut client = ReplicationClient::connect_gated(config)
        .await
        .map_err(stream_error)?;
    let rows = client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT \"{}\" LOGICAL pgoutput (SNAPSHOT 'nothing')",
            name.replace('"', "\"\"")
        ))
        .await
        .map_err(stream_error)?;
    client.abort();
    rows.first()
        .and_then(|r| r.get(1).cloned().flatten())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .ok_or_else(|| {
            IngestError::Run(format!(
                "replication slot {name}: PostgreSQL returned no position"
            ))
        })
}

/// A replication connection's settings from a `postgres://` URL (user, password, host, port,
/// database; `sslmode=require`, `verify-ca` or `verify-full` for TLS).
fn replication_config(url: &str, slot: &str, publication: &str) -> Result<ReplicationConfig> {
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
    config.options = Some(SESSION_OPTIONS.to_string());
    // What is applied reaches the slot within a quarter of a second (the source keeps less
    // WAL, and a restart is sent less again).
    config.status_interval = STATUS_INTERVAL;
    Ok(config)
}

/// How often the slot is told what was applied.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// A source transaction as the stream carries it.
#[derive(Debug, Clone)]
pub struct SourceTransaction {
    /// Its transaction id (32 bits).
    pub xid: u32,
    /// Its commit record's position.
    pub commit_lsn: u64,
    /// The position just past its commit: what to confirm once it is applied.
    pub end_lsn: u64,
    /// When it committed (microseconds since 2000-01-01, PostgreSQL's epoch).
    pub commit_time_micros: i64,
    /// Its changes (and the relation descriptions before them), in order.
    pub messages: Vec<Message>,
    /// Their size as the stream carried them.
    pub bytes: usize,
}

/// The changes of a slot, transaction by transaction.
pub struct ChangeStream {
    client: ReplicationClient,
    /// Where to stop, if anywhere.
    stop_at: Option<u64>,
    /// Whether the stream has reached it.
    stopped: bool,
    /// The transaction being received (kept here, so that a caller may stop waiting for the
    /// next transaction and ask again without losing any of it).
    current: Option<SourceTransaction>,
    /// The position the server said it had sent everything up to, while no transaction was
    /// being received: with every received transaction applied, the caller is caught up to it.
    idle_through: u64,
    /// The position last confirmed.
    confirmed: u64,
}

fn stream_error(e: impl std::fmt::Display) -> IngestError {
    IngestError::Run(format!("change stream: {e}"))
}

impl ChangeStream {
    /// Opens the stream of `slot` for `publication` on the source at `url` (a `postgres://`
    /// URL: user, password, host, port, database; `sslmode=require` or `verify-full` for TLS),
    /// from the slot's confirmed position. With `stop_at`, it ends once every transaction
    /// committed before that position has come: after the first transaction that ends at or
    /// past it, or when the server says it has sent everything up to it (a keepalive, as
    /// `pg_recvlogical --endpos` does, for a source with nothing more to send).
    pub async fn open(
        url: &str,
        slot: &str,
        publication: &str,
        stop_at: Option<u64>,
    ) -> Result<Self> {
        let mut config = replication_config(url, slot, publication)?;
        config.start_lsn = Lsn::from_u64(0);
        let client = ReplicationClient::connect(config)
            .await
            .map_err(stream_error)?;
        Ok(ChangeStream {
            client,
            stop_at,
            stopped: false,
            current: None,
            idle_through: 0,
            confirmed: 0,
        })
    }

    /// The next whole transaction; None once the stream stopped at `stop_at` or ended.
    /// A transaction is held whole in memory (its rows, each up to PostgreSQL's 1 GB value
    /// limit). Cancel-safe: dropped while waiting, it loses nothing.
    pub async fn next_transaction(&mut self) -> Result<Option<SourceTransaction>> {
        if self.stopped {
            return Ok(None);
        }
        let stop_at = self.stop_at;
        let reached = |lsn: u64| stop_at.is_some_and(|stop| lsn >= stop);
        let current = &mut self.current;
        loop {
            let Some(event) = self.client.recv().await.map_err(stream_error)? else {
                return Ok(None);
            };
            match event {
                ReplicationEvent::Begin {
                    xid,
                    commit_time_micros,
                    ..
                } => {
                    *current = Some(SourceTransaction {
                        xid,
                        commit_time_micros,
                        commit_lsn: 0,
                        end_lsn: 0,
                        messages: Vec::new(),
                        bytes: 0,
                    });
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let message = pgoutput::decode(&data).map_err(stream_error)?;
                    match current.as_mut() {
                        Some(t) => {
                            t.messages.push(message);
                            t.bytes += data.len();
                        }
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
                        self.stopped = reached(t.end_lsn);
                        return Ok(Some(t));
                    }
                }
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    if current.is_none() {
                        self.idle_through = self.idle_through.max(wal_end.as_u64());
                        if reached(wal_end.as_u64()) {
                            self.stopped = true;
                            return Ok(None);
                        }
                    }
                }
                ReplicationEvent::StoppedAt { .. } => return Ok(None),
                ReplicationEvent::Message { .. } => {}
            }
        }
    }

    /// The position the server said it had sent everything up to while no transaction was
    /// under way (0 before it said so).
    pub fn idle_through(&self) -> u64 {
        self.idle_through
    }

    /// Tells the slot that everything up to `lsn` is durable on the target side: the source
    /// may recycle the WAL before it. Call it only after the target transaction that applied
    /// those changes (and recorded `lsn`) committed.
    pub fn confirm(&mut self, lsn: u64) {
        self.confirmed = self.confirmed.max(lsn);
        self.client.update_applied_lsn(Lsn::from_u64(lsn));
    }

    /// Ends the stream, once the slot was told the last position confirmed (within a moment:
    /// else the next session is sent again what was applied since the last status update,
    /// to be skipped).
    pub async fn close(mut self) -> Result<()> {
        let told = tokio::time::Instant::now() + 2 * STATUS_INTERVAL;
        while self.client.metrics().last_applied_lsn().as_u64() < self.confirmed
            && tokio::time::Instant::now() < told
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        self.client.shutdown().await.map_err(stream_error)
    }
}

/// Parses a PostgreSQL LSN (`16/B374D848`).
pub fn parse_lsn(text: &str) -> Result<u64> {
    Lsn::parse(text)
        .map(Lsn::as_u64)
        .map_err(|e| stream_error(format!("LSN {text:?}: {e}")))
}

/// Drops replication slot `name` on `source` if it is there (the source then stops keeping
/// WAL for it). Returns whether it was there.
pub async fn drop_slot(source: &crate::db::Db, name: &str) -> Result<bool> {
    use crate::value::ColumnType;
    let literal = format!("'{}'", name.replace('\'', "''"));
    let exists = source
        .fetch_all(
            format!("SELECT slot_name::text FROM pg_replication_slots WHERE slot_name = {literal}"),
            vec![ColumnType::Text],
        )
        .await?;
    if exists.is_empty() {
        return Ok(false);
    }
    source
        .fetch_all(
            format!("SELECT pg_drop_replication_slot({literal})::text"),
            vec![ColumnType::Text],
        )
        .await?;
    Ok(true)
}
