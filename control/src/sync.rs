//! What the control database keeps of change sync: the replication slot a followed run reads
//! (created before its snapshot), per table the snapshot the table was copied in (the
//! transactions it already saw, which sync skips), and the cutover attempts with their go /
//! no-go reports. Where sync has applied up to is kept in the
//! operational database, in the transaction that applied it.

use crate::control::{now, Control};
use crate::db::Col;
use crate::error::Result;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_sync (
    run_id TEXT NOT NULL PRIMARY KEY,
    slot TEXT NOT NULL,
    publication TEXT NOT NULL,
    consistent_lsn TEXT NOT NULL,
    created_at TEXT NOT NULL,
    dropped_at TEXT
);
CREATE TABLE IF NOT EXISTS strata_sync_tables (
    run_id TEXT NOT NULL,
    table_name TEXT NOT NULL,
    snapshot_xids TEXT NOT NULL,
    snapshot_lsn TEXT NOT NULL,
    PRIMARY KEY (run_id, table_name)
);
";

/// A followed run's replication slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRecord {
    /// The run.
    pub run_id: String,
    /// The slot's name.
    pub slot: String,
    /// The publication it reads.
    pub publication: String,
    /// The slot's consistent point.
    pub consistent_lsn: String,
    /// When the slot was dropped, if it was.
    pub dropped_at: Option<String>,
}

impl Control {
    /// Records the slot of a followed run (once, when created).
    pub async fn record_sync(&self, s: &SyncRecord) -> Result<()> {
        let sql = format!(
            "INSERT INTO strata_sync (run_id, slot, publication, consistent_lsn, created_at) VALUES ({})",
            self.db.ps(5)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    (&s.run_id).into(),
                    (&s.slot).into(),
                    (&s.publication).into(),
                    (&s.consistent_lsn).into(),
                    now().into(),
                ],
            )
            .await
            .map(|_| ())
    }

    /// The slot of run `run_id`, if it is followed.
    pub async fn sync_of(&self, run_id: &str) -> Result<Option<SyncRecord>> {
        let sql = format!(
            "SELECT run_id, slot, publication, consistent_lsn, dropped_at FROM strata_sync WHERE run_id = {}",
            self.db.p(1)
        );
        let rows = self
            .db
            .fetch(&sql, &[run_id.into()], &[Col::Text; 5])
            .await?;
        Ok(rows.into_iter().next().map(|r| SyncRecord {
            run_id: r[0].text(),
            slot: r[1].text(),
            publication: r[2].text(),
            consistent_lsn: r[3].text(),
            dropped_at: r[4].opt_text(),
        }))
    }

    /// Records that the slot of `run_id` was dropped.
    pub async fn record_slot_dropped(&self, run_id: &str) -> Result<()> {
        let sql = format!(
            "UPDATE strata_sync SET dropped_at = {} WHERE run_id = {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&sql, &[now().into(), run_id.into()])
            .await
            .map(|_| ())
    }

    /// Records the snapshot (`xmin:xmax:xip,...`, and its WAL position) table `table` of
    /// `run_id` is copied in, replacing an earlier one (a table that restarted).
    pub async fn record_table_snapshot(
        &self,
        run_id: &str,
        table: &str,
        xids: &str,
        lsn: &str,
    ) -> Result<()> {
        self.put_run_table_row(
            "strata_sync_tables",
            run_id,
            table,
            &["snapshot_xids", "snapshot_lsn"],
            &[xids, lsn],
        )
        .await
    }

    /// Per table of `run_id`, the snapshot it was copied in: (its transactions, its WAL
    /// position).
    pub async fn table_snapshots(
        &self,
        run_id: &str,
    ) -> Result<std::collections::BTreeMap<String, (String, String)>> {
        let sql = format!(
            "SELECT table_name, snapshot_xids, snapshot_lsn FROM strata_sync_tables WHERE run_id = {}",
            self.db.p(1)
        );
        let rows = self
            .db
            .fetch(&sql, &[run_id.into()], &[Col::Text; 3])
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r[0].text(), (r[1].text(), r[2].text())))
            .collect())
    }
}

pub(crate) const CUTOVER_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_cutovers (
    run_id TEXT NOT NULL,
    attempted_at TEXT NOT NULL,
    cut_over_by TEXT NOT NULL,
    go BIGINT NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (run_id, attempted_at)
);
";

/// A `strata cutover` attempt as recorded.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CutoverRecord {
    /// The run.
    pub run_id: String,
    /// When (RFC 3339).
    pub attempted_at: String,
    /// Who.
    pub by: String,
    /// Whether it was a "go": the run is cut over.
    pub go: bool,
    /// The go / no-go report, as written.
    pub report: serde_json::Value,
}

impl Control {
    /// Records a cutover attempt of `run_id` (go or no-go) with its report (JSON).
    pub async fn record_cutover(
        &self,
        run_id: &str,
        by: &str,
        go: bool,
        report: &str,
    ) -> Result<()> {
        let sql = format!(
            "INSERT INTO strata_cutovers (run_id, attempted_at, cut_over_by, go, report) VALUES ({})",
            self.db.ps(5)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    run_id.into(),
                    now().into(),
                    by.into(),
                    (go as i64).into(),
                    report.into(),
                ],
            )
            .await
            .map(|_| ())
    }

    /// The cutover of `run_id` (its "go"), if it was cut over.
    pub async fn cutover_of(&self, run_id: &str) -> Result<Option<CutoverRecord>> {
        Ok(self.cutovers(run_id).await?.into_iter().find(|c| c.go))
    }

    /// Every cutover attempt of `run_id`, newest first.
    pub async fn cutovers(&self, run_id: &str) -> Result<Vec<CutoverRecord>> {
        let sql = format!(
            "SELECT run_id, attempted_at, cut_over_by, go, report FROM strata_cutovers WHERE run_id = {} ORDER BY attempted_at DESC",
            self.db.p(1)
        );
        let rows = self
            .db
            .fetch(
                &sql,
                &[run_id.into()],
                &[Col::Text, Col::Text, Col::Text, Col::Int, Col::Text],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| CutoverRecord {
                run_id: r[0].text(),
                attempted_at: r[1].text(),
                by: r[2].text(),
                go: r[3].int() == Some(1),
                report: serde_json::from_str(&r[4].text()).unwrap_or(serde_json::Value::Null),
            })
            .collect())
    }
}
