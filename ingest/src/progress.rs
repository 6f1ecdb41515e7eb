//! Live progress of a run, per table: what a progress bar, a log line or a metrics scrape shows
//! while the copy goes on. Workers add to atomic counters every few thousand rows; readers take
//! snapshots whenever they like.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One table's counters.
#[derive(Debug, Default)]
pub struct TableProgress {
    /// Rows expected (the source's estimate when the table was planned; 0 when unknown).
    pub expected_rows: AtomicU64,
    /// Rows read so far, in ranges done or in progress (a range copied again counts again).
    pub rows: AtomicU64,
    /// Bytes read so far (values as read).
    pub bytes: AtomicU64,
    /// Ranges planned.
    pub ranges: AtomicU64,
    /// Ranges checkpointed.
    pub ranges_done: AtomicU64,
    /// Rows quarantined so far.
    pub quarantined: AtomicU64,
    /// Set when the table is done.
    pub done: AtomicU64,
}

/// A snapshot of one table's progress.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableProgressSnapshot {
    /// The table.
    pub table: String,
    /// Rows expected (0 when unknown).
    pub expected_rows: u64,
    /// Rows read.
    pub rows: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Ranges planned.
    pub ranges: u64,
    /// Ranges checkpointed.
    pub ranges_done: u64,
    /// Rows quarantined.
    pub quarantined: u64,
    /// Whether the table is done.
    pub done: bool,
}

type NamedProgress = (String, Arc<TableProgress>);

/// One metric: name, help text, and its value in a snapshot.
type Metric = (
    &'static str,
    &'static str,
    fn(&TableProgressSnapshot) -> u64,
);

/// Every table's progress in a run, in the order tables start.
#[derive(Debug, Default, Clone)]
pub struct RunProgress {
    tables: Arc<Mutex<Vec<NamedProgress>>>,
    /// Change sync's counters, once it follows.
    pub sync: Arc<SyncProgress>,
}

/// What change sync has done and how far behind the source it is.
#[derive(Debug, Default)]
pub struct SyncProgress {
    /// Whether sync has started (its metrics are shown from then on).
    pub following: AtomicU64,
    /// Source transactions applied.
    pub transactions: AtomicU64,
    /// Changes applied (or skipped as seen by the copy).
    pub changes: AtomicU64,
    /// Bytes of WAL between the source's current position and what is applied.
    pub lag_bytes: AtomicU64,
    /// Milliseconds since the oldest change not yet applied was committed (0 when caught up).
    pub lag_ms: AtomicU64,
    /// Bytes of WAL the slot holds back on the source.
    pub retained_wal_bytes: AtomicU64,
    /// Whether someone asked sync to stop (see [`SyncProgress::request_stop`]).
    stop_requested: std::sync::atomic::AtomicBool,
    /// Wakes a sync that waits for changes when a stop is asked for.
    stop_wakeup: tokio::sync::Notify,
}

impl SyncProgress {
    /// Asks a running sync to stop: it commits what it has applied, tells the slot, and
    /// returns its report (an interrupted sync would leave its open batch to be applied again,
    /// and the slot up to a status update behind). For the rest of the process: a later sync
    /// with these counters stops at once.
    pub fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
        self.stop_wakeup.notify_one();
    }

    /// Whether a stop was asked for.
    pub fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    /// Waits until a stop is asked for.
    pub async fn stopping(&self) {
        while !self.stop_requested() {
            self.stop_wakeup.notified().await;
        }
    }
}

impl RunProgress {
    /// The counters of `table`, created on first use.
    pub fn table(&self, table: &str) -> Arc<TableProgress> {
        let mut tables = self.tables.lock().expect("progress lock");
        if let Some((_, p)) = tables.iter().find(|(t, _)| t == table) {
            return p.clone();
        }
        let p = Arc::new(TableProgress::default());
        tables.push((table.to_string(), p.clone()));
        p
    }

    /// A snapshot of every table started so far.
    pub fn snapshot(&self) -> Vec<TableProgressSnapshot> {
        let tables = self.tables.lock().expect("progress lock");
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        tables
            .iter()
            .map(|(t, p)| TableProgressSnapshot {
                table: t.clone(),
                expected_rows: get(&p.expected_rows),
                rows: get(&p.rows),
                bytes: get(&p.bytes),
                ranges: get(&p.ranges),
                ranges_done: get(&p.ranges_done),
                quarantined: get(&p.quarantined),
                done: get(&p.done) > 0,
            })
            .collect()
    }

    /// The snapshot in Prometheus' text exposition format.
    pub fn prometheus(&self) -> String {
        let snapshot = self.snapshot();
        let mut out = String::new();
        let metrics: [Metric; 6] = [
            (
                "strata_migrate_rows_read_total",
                "Rows read from the source",
                |s| s.rows,
            ),
            (
                "strata_migrate_bytes_read_total",
                "Bytes read from the source (values as read)",
                |s| s.bytes,
            ),
            (
                "strata_migrate_rows_expected",
                "Rows the source estimated when the table was planned",
                |s| s.expected_rows,
            ),
            ("strata_migrate_ranges", "Ranges planned", |s| s.ranges),
            ("strata_migrate_ranges_done", "Ranges checkpointed", |s| {
                s.ranges_done
            }),
            (
                "strata_migrate_rows_quarantined_total",
                "Rows quarantined",
                |s| s.quarantined,
            ),
        ];
        for (name, help, value) in metrics {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            out.push_str(&format!("# HELP {name} {help}.\n# TYPE {name} {kind}\n"));
            for s in &snapshot {
                out.push_str(&format!(
                    "{name}{{table=\"{}\"}} {}\n",
                    s.table.replace('"', "\\\""),
                    value(s)
                ));
            }
        }
        out.push_str("# HELP strata_migrate_tables_done Tables finished.\n# TYPE strata_migrate_tables_done gauge\n");
        out.push_str(&format!(
            "strata_migrate_tables_done {}\n",
            snapshot.iter().filter(|s| s.done).count()
        ));
        let sync = &self.sync;
        if sync.following.load(Ordering::Relaxed) == 1 {
            let metrics: [(&str, &str, &AtomicU64); 5] = [
                (
                    "strata_sync_transactions_total",
                    "Source transactions applied",
                    &sync.transactions,
                ),
                (
                    "strata_sync_changes_total",
                    "Changes applied or skipped as seen by the copy",
                    &sync.changes,
                ),
                (
                    "strata_sync_lag_bytes",
                    "WAL between the source's position and what is applied",
                    &sync.lag_bytes,
                ),
                (
                    "strata_sync_lag_seconds",
                    "Seconds since the oldest change not yet applied was committed",
                    &sync.lag_ms,
                ),
                (
                    "strata_sync_retained_wal_bytes",
                    "WAL the replication slot holds back on the source",
                    &sync.retained_wal_bytes,
                ),
            ];
            for (name, help, value) in metrics {
                let kind = if name.ends_with("_total") {
                    "counter"
                } else {
                    "gauge"
                };
                let v = value.load(Ordering::Relaxed);
                let v = if name.ends_with("_seconds") {
                    format!("{:.3}", v as f64 / 1000.0)
                } else {
                    v.to_string()
                };
                out.push_str(&format!(
                    "# HELP {name} {help}.\n# TYPE {name} {kind}\n{name} {v}\n"
                ));
            }
        }
        out
    }
}

/// Rows counted locally before they are added to the shared counters.
pub(crate) const PROGRESS_EVERY: u64 = 4096;

/// Breaks a map of snapshots out by table, for tests.
#[cfg(test)]
pub(crate) fn by_table(
    p: &RunProgress,
) -> std::collections::BTreeMap<String, TableProgressSnapshot> {
    p.snapshot()
        .into_iter()
        .map(|s| (s.table.clone(), s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_in_snapshots_and_prometheus_text() {
        let p = RunProgress::default();
        let t = p.table("lab_results");
        t.rows.fetch_add(10, Ordering::Relaxed);
        t.expected_rows.store(40, Ordering::Relaxed);
        assert_eq!(by_table(&p)["lab_results"].rows, 10);
        let text = p.prometheus();
        assert!(
            text.contains("strata_migrate_rows_read_total{table=\"lab_results\"} 10\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE strata_migrate_rows_expected gauge"),
            "{text}"
        );
        // Sync's metrics appear once it follows.
        assert!(!text.contains("strata_sync_"), "{text}");
        p.sync.following.store(1, Ordering::Relaxed);
        p.sync.lag_ms.store(1250, Ordering::Relaxed);
        p.sync.retained_wal_bytes.store(4096, Ordering::Relaxed);
        p.sync.transactions.fetch_add(3, Ordering::Relaxed);
        let text = p.prometheus();
        for line in [
            "strata_sync_lag_seconds 1.250\n",
            "strata_sync_retained_wal_bytes 4096\n",
            "# TYPE strata_sync_transactions_total counter\nstrata_sync_transactions_total 3\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }
}
