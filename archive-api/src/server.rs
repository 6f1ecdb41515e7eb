//! The server: accepts connections (TLS, or plain HTTP on loopback), bounds what one client
//! may hold, and hands each request to the router with the address it comes from.
//!
//! What a client may hold (`[api.limits]`, see docs/operations.md):
//! - a request's head must arrive within `header_read_timeout_secs` — a connection dribbling
//!   header lines (slowloris) or sending nothing is closed, and so is an HTTP/1 keep-alive
//!   connection idle that long (an HTTP/2 one stays while its pings are answered);
//! - the whole request, body included, within `request_timeout_secs` (the router's timeout: a
//!   request with a valid token that times out is audited like any other);
//! - at most `connections_per_client` connections per client address, except from
//!   `[api] trusted_proxies`: a hospital's reverse proxy carries many users and is not throttled
//!   as one client; its `X-Forwarded-For` names the client (and only its: from anyone else the
//!   header is ignored).
//!
//! What is refused before any user is known — a connection over the cap, a failed TLS
//! handshake, a request head too large (414, 431), malformed HTTP, a header timeout — is
//! counted in `/metrics` and not audited: an anonymous flood must not grow the audit log.

use crate::metrics::{Metrics, Rejection};
use crate::routes::router;
use crate::state::AppState;
use crate::ApiConfig;
use axum::http::HeaderMap;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::Service;

/// The address a request comes from (the peer, or the client a trusted proxy names), put in
/// the request's extensions for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress(pub IpAddr);

/// Time a client has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time connections have to finish their requests after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The most a request's head (request line and headers) may take, in bytes: more gets 431
/// (or 414 for a long URI).
const MAX_HEAD_BYTES: usize = 64 << 10;

/// `[api] trusted_proxies`: addresses (`10.0.0.5`) or networks (`10.0.0.0/24`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Arc<Vec<IpNet>>);

impl TrustedProxies {
    /// Parses the entries; the error names the one that is neither an address nor a network.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                let e = e.trim();
                e.parse::<IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!("[api] trusted_proxies: {e:?} is not an IP address or network")
                    })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|nets| TrustedProxies(Arc::new(nets)))
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client of a request from `peer`: the peer itself, unless it is a trusted proxy;
    /// then the nearest address of `X-Forwarded-For` (read from the right, each proxy
    /// appending the address it got the request from) that is not a trusted proxy. An entry
    /// that is not an address ends the walk: what lies left of it cannot be trusted.
    pub fn client_of(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        // Split as bytes: a client's own entry may hold anything, and must not hide the
        // entries proxies appended after it.
        let hops: Vec<&[u8]> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = std::str::from_utf8(hop)
                .ok()
                .and_then(|h| forwarded_ip(h.trim()))
            else {
                break;
            };
            client = ip.to_canonical();
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// An address of `X-Forwarded-For`: `192.0.2.1`, `2001:db8::1`, with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`) or brackets.
fn forwarded_ip(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(addr) = hop.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Connections open per client address, capped.
#[derive(Clone)]
struct ConnectionCap {
    per_client: usize,
    trusted: TrustedProxies,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// A connection counted against its address until dropped.
struct Counted {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("connection counts lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl ConnectionCap {
    /// Counts a new connection from `ip`; None when its address has too many open (a trusted
    /// proxy is never capped).
    fn admit(&self, ip: IpAddr) -> Option<Option<Counted>> {
        if self.trusted.trusts(ip) {
            return Some(None);
        }
        let mut open = self.open.lock().expect("connection counts lock");
        let n = open.entry(ip).or_default();
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(Some(Counted {
            ip,
            open: self.open.clone(),
        }))
    }
}

/// TLS settings from the certificate chain and key files (PEM).
fn tls_config(cert: &FsPath, key: &FsPath) -> Result<rustls::ServerConfig, std::io::Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad =
        |what: &str, e: &dyn std::fmt::Display| std::io::Error::other(format!("[api] {what}: {e}"));
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("tls_cert_file", &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls_cert_file", &e))?;
    if certs.is_empty() {
        return Err(bad("tls_cert_file", &"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("tls_key_file", &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad("TLS", &e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| bad("TLS certificate and key", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// What every connection's task needs.
#[derive(Clone)]
struct Connections {
    app: axum::Router,
    http: Arc<Builder<TokioExecutor>>,
    trusted: TrustedProxies,
    metrics: Metrics,
    /// Time from the connection's start (after TLS) to its first request's head.
    first_request_timeout: Duration,
}

impl Connections {
    /// Serves one connection's requests until it ends; counts why it ended when that was a
    /// refusal (a head too large, malformed HTTP, a header timeout).
    async fn serve<I>(self, io: I, peer: SocketAddr, watcher: hyper_util::server::graceful::Watcher)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (app, trusted) = (self.app, self.trusted);
        // The first request's head must come in time whatever the protocol: hyper's header
        // timeout covers HTTP/1 only, and not the bytes read to tell HTTP/1 from HTTP/2.
        let (first_tx, mut first_rx) = tokio::sync::oneshot::channel::<()>();
        let first_tx = Arc::new(Mutex::new(Some(first_tx)));
        let service =
            hyper::service::service_fn(move |mut request: axum::http::Request<Incoming>| {
                if let Some(first) = first_tx.lock().expect("first request lock").take() {
                    let _ = first.send(());
                }
                let client = trusted.client_of(peer.ip(), request.headers());
                request.extensions_mut().insert(ClientAddress(client));
                let mut app = app.clone();
                async move { app.call(request).await }
            });
        let connection = watcher.watch(self.http.serve_connection(TokioIo::new(io), service));
        tokio::pin!(connection);
        let deadline = tokio::time::sleep(self.first_request_timeout);
        tokio::pin!(deadline);
        let mut waiting = true;
        let ended = loop {
            tokio::select! {
                ended = &mut connection => break ended,
                _ = &mut deadline, if waiting => {
                    // Dropping the connection closes it.
                    self.metrics.rejected(Rejection::HeaderTimeout);
                    return;
                }
                _ = &mut first_rx, if waiting => waiting = false,
            }
        };
        if let Err(e) = ended {
            let Some(e) = e.downcast_ref::<hyper::Error>() else {
                return;
            };
            if e.is_parse_too_large() {
                self.metrics.rejected(Rejection::HeadTooLarge);
            } else if e.is_parse() {
                self.metrics.rejected(Rejection::MalformedHttp);
            } else if e.is_timeout() {
                self.metrics.rejected(Rejection::HeaderTimeout);
            }
        }
    }
}

/// A server [`serve`] started: where it listens, and its end.
#[derive(Debug)]
pub struct Serving {
    /// The bound address.
    pub addr: SocketAddr,
    done: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Waits until the server has stopped: its shutdown future resolved, it stopped accepting,
    /// and its connections finished their requests (or the grace period passed).
    pub async fn stopped(self) {
        let _ = self.done.await;
    }
}

/// Serves until `shutdown` resolves: HTTPS with the configured certificate, or plain HTTP when
/// the config asks for it on a loopback address, with export jobs resumed and expired exports
/// deleted beside it.
pub async fn serve(
    config: &ApiConfig,
    base: &FsPath,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Serving, std::io::Error> {
    let app = router(state.clone());
    serve_router(config, base, state, app, shutdown).await
}

/// [`serve`] with another router over the same state (the benchmark's ceiling,
/// [`crate::ceiling_router`]).
pub async fn serve_router(
    config: &ApiConfig,
    base: &FsPath,
    state: AppState,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Serving, std::io::Error> {
    let addr: SocketAddr = config.listen.parse().map_err(|_| {
        std::io::Error::other(format!(
            "[api] listen: {:?} is not an address:port",
            config.listen
        ))
    })?;
    let trusted = TrustedProxies::parse(&config.trusted_proxies).map_err(std::io::Error::other)?;
    let tls = if config.plain_http {
        if !addr.ip().is_loopback() {
            return Err(std::io::Error::other(
                "[api]: plain HTTP is allowed only on a loopback address",
            ));
        }
        None
    } else {
        let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
            return Err(std::io::Error::other(
                "[api]: set tls_cert_file and tls_key_file (or, for development on loopback, plain_http = true)",
            ));
        };
        let tls = tls_config(&base.join(cert), &base.join(key))?;
        Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
    };
    let limits = &config.limits;
    let head_time = Duration::from_secs(limits.header_read_timeout_secs.max(1));
    let mut http = Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_time)
        .max_buf_size(MAX_HEAD_BYTES);
    // HTTP/2: pings find peers that went away; an idle but live connection stays, within the
    // per-client cap.
    http.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let cap = ConnectionCap {
        per_client: limits.connections_per_client.max(1),
        trusted: trusted.clone(),
        open: Arc::default(),
    };
    let metrics = state.metrics.clone();
    crate::exports::start_background(&state).await;
    follow_the_archive(&state, config.catalog_refresh_secs);
    let connections = Connections {
        app,
        http: Arc::new(http),
        trusted,
        metrics: metrics.clone(),
        first_request_timeout: head_time,
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let done = tokio::spawn(async move {
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, most likely: wait rather than spin.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = &mut shutdown => break,
            };
            // An IPv4 client of a dual-stack listener arrives as ::ffff:a.b.c.d.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let Some(counted) = cap.admit(peer.ip()) else {
                metrics.rejected(Rejection::ConnectionLimit);
                continue;
            };
            // Without TCP_NODELAY a response written in more than one segment waits out the
            // client's delayed ACK (40 ms a request).
            let _ = tcp.set_nodelay(true);
            let (connections, tls, watcher) =
                (connections.clone(), tls.clone(), graceful.watcher());
            tokio::spawn(async move {
                let _counted = counted;
                match tls {
                    None => connections.serve(tcp, peer, watcher).await,
                    Some(tls) => {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                            Ok(Ok(stream)) => connections.serve(stream, peer, watcher).await,
                            _ => connections.metrics.rejected(Rejection::TlsHandshake),
                        }
                    }
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the shutdown grace period: closed");
        }
    });
    Ok(Serving { addr: bound, done })
}

/// Re-reads the archive's manifests every `secs` seconds (0: never) while the server's state
/// lives, so that new runs, compactions and gcs are served without a restart (see
/// [`strata_archive::LiveArchive`]). A failed refresh keeps the catalog served so far.
fn follow_the_archive(state: &AppState, secs: u64) {
    if secs == 0 {
        return;
    }
    let archive = Arc::downgrade(&state.archive);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(secs));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            let Some(archive) = archive.upgrade() else {
                return;
            };
            match archive.refresh().await {
                Ok(Some(refreshed)) => {
                    tracing::info!(
                        generation = refreshed.generation,
                        "archive catalog changed: serving it"
                    );
                    for manifest in &refreshed.vanished {
                        tracing::error!(%manifest, "an archive manifest is gone and no compaction replaced it: its records are no longer served; run `strata archive verify`");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-read the archive's manifests; serving the catalog read before")
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", value.parse().unwrap());
        h
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies() {
        let trusted = TrustedProxies::parse(&["10.0.0.0/24".into(), "192.0.2.7".into()]).unwrap();
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "198.51.100.9".parse().unwrap();
        let h = forwarded("203.0.113.1, 198.51.100.20");
        assert_eq!(
            trusted.client_of(stranger, &h),
            stranger,
            "ignored from others"
        );
        assert_eq!(
            trusted.client_of(proxy, &h),
            "198.51.100.20".parse::<IpAddr>().unwrap(),
            "the nearest untrusted hop, not what the client claimed"
        );
        let chain = forwarded("203.0.113.1, 192.0.2.7");
        assert_eq!(
            trusted.client_of(proxy, &chain),
            "203.0.113.1".parse::<IpAddr>().unwrap(),
            "trusted hops are passed over"
        );
        assert_eq!(
            trusted.client_of(proxy, &forwarded("garbage, [2001:db8::1]:4711")),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(trusted.client_of(proxy, &HeaderMap::new()), proxy);
        // A client's own entry with bytes that are not text does not hide the proxy's.
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            axum::http::HeaderValue::from_bytes(b"\xff\xfe, 198.51.100.20").unwrap(),
        );
        assert_eq!(
            trusted.client_of(proxy, &h),
            "198.51.100.20".parse::<IpAddr>().unwrap()
        );
        // An IPv4 proxy seen through a dual-stack listener is still trusted.
        assert_eq!(
            trusted.client_of(
                "::ffff:10.0.0.5".parse().unwrap(),
                &forwarded("198.51.100.20")
            ),
            "198.51.100.20".parse::<IpAddr>().unwrap()
        );
        assert!(TrustedProxies::parse(&["10.0.0.300".into()])
            .unwrap_err()
            .contains("10.0.0.300"));
    }

    #[test]
    fn connections_are_capped_per_address_but_not_for_proxies() {
        let cap = ConnectionCap {
            per_client: 2,
            trusted: TrustedProxies::parse(&["10.0.0.5".into()]).unwrap(),
            open: Arc::default(),
        };
        let a: IpAddr = "198.51.100.9".parse().unwrap();
        let first = cap.admit(a).unwrap();
        let _second = cap.admit(a).unwrap();
        assert!(cap.admit(a).is_none());
        assert!(cap.admit("198.51.100.10".parse().unwrap()).is_some());
        drop(first);
        assert!(
            cap.admit(a).is_some(),
            "a closed connection frees its place"
        );
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        assert!((0..10).all(|_| cap.admit(proxy).is_some()));
    }
}
