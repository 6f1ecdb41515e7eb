//! Prometheus metrics of the API (`GET /metrics`, text format 0.0.4): requests by route and
//! status, latency histograms by route, audit entries, breaks of the glass, audit failures,
//! and what the server refused before any user was known (by reason: these are counted, not
//! audited). Labels carry route templates only, never patient keys.

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Latency bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Why the server refused a connection or request before any user was known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// A client address already had as many connections open as it may.
    ConnectionLimit,
    /// The TLS handshake failed or took too long.
    TlsHandshake,
    /// A request head too large: 431, or 414 for a long URI.
    HeadTooLarge,
    /// Not HTTP, or malformed HTTP.
    MalformedHttp,
    /// A request head that did not arrive in time (or a keep-alive connection idle as long).
    HeaderTimeout,
    /// A request without a valid token over its client address's rate (429, not audited).
    AnonymousOverRate,
}

impl Rejection {
    const ALL: [Rejection; 6] = [
        Rejection::ConnectionLimit,
        Rejection::TlsHandshake,
        Rejection::HeadTooLarge,
        Rejection::MalformedHttp,
        Rejection::HeaderTimeout,
        Rejection::AnonymousOverRate,
    ];

    fn label(self) -> &'static str {
        match self {
            Rejection::ConnectionLimit => "connection_limit",
            Rejection::TlsHandshake => "tls_handshake",
            Rejection::HeadTooLarge => "head_too_large",
            Rejection::MalformedHttp => "malformed_http",
            Rejection::HeaderTimeout => "header_timeout",
            Rejection::AnonymousOverRate => "anonymous_over_rate",
        }
    }
}

/// The API's counters.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    rejected: Arc<[AtomicU64; Rejection::ALL.len()]>,
    requests: Arc<Mutex<BTreeMap<(String, u16), u64>>>,
    latency: Arc<Mutex<BTreeMap<String, Histogram>>>,
    audit_entries: Arc<AtomicU64>,
    break_glass: Arc<AtomicU64>,
    audit_failures: Arc<AtomicU64>,
    stopped_streams: Arc<AtomicU64>,
}

impl Metrics {
    /// Counts an audit entry written (`flagged`: a break of the glass).
    pub fn audited(&self, flagged: bool) {
        self.audit_entries.fetch_add(1, Ordering::Relaxed);
        if flagged {
            self.break_glass.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an audit entry that could not be written.
    pub fn audit_failed(&self) {
        self.audit_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal before any user was known.
    pub fn rejected(&self, why: Rejection) {
        let i = Rejection::ALL
            .iter()
            .position(|r| *r == why)
            .expect("listed");
        self.rejected[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a document stream stopped by an integrity failure.
    pub fn stream_stopped(&self) {
        self.stopped_streams.fetch_add(1, Ordering::Relaxed);
    }

    fn observe(&self, route: &str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((route.to_string(), status))
            .or_default() += 1;
        let mut latency = self.latency.lock().expect("metrics lock");
        let h = latency.entry(route.to_string()).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP strata_api_requests_total Requests served, by route and status.\n# TYPE strata_api_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                out,
                "strata_api_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP strata_api_request_duration_seconds Time to the response's head, by route.\n# TYPE strata_api_request_duration_seconds histogram\n");
        for (route, h) in self.latency.lock().expect("metrics lock").iter() {
            for (bound, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(out, "strata_api_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "strata_api_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "strata_api_request_duration_seconds_sum{{route=\"{route}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "strata_api_request_duration_seconds_count{{route=\"{route}\"}} {}",
                h.count
            );
        }
        for (name, help, v) in [
            (
                "strata_api_audit_entries_total",
                "Audit log entries written.",
                &self.audit_entries,
            ),
            (
                "strata_api_break_glass_total",
                "Patient reads outside the reader's care (break the glass).",
                &self.break_glass,
            ),
            (
                "strata_api_audit_failures_total",
                "Requests refused because the audit log could not be written.",
                &self.audit_failures,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP strata_api_rejected_total Connections and requests refused before any user was known (not audited), by reason.\n# TYPE strata_api_rejected_total counter\n");
        for (why, n) in Rejection::ALL.iter().zip(self.rejected.iter()) {
            let _ = writeln!(
                out,
                "strata_api_rejected_total{{reason=\"{}\"}} {}",
                why.label(),
                n.load(Ordering::Relaxed)
            );
        }
        out
    }
}

/// The metrics layer: times every request to its response's head.
pub async fn track(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("(no route)", |m| m.as_str())
        .to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.observe(
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}
