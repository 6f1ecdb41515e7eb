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
    }
}
