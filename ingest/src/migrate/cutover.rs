//! `strata cutover`'s parts and its go / no-go report: the source seen quiet after sync caught
//! up, the target's sequences set past the source's values. The command (in the CLI) runs
//! them with `strata verify` between, records the attempt and, on "go", drops the slot.

use super::follow::{SyncReport, SyncUntil};
use super::verify::VerifyReport;
use super::Migration;
use crate::db::{quote, Db};
use crate::error::Result;
use crate::value::{ColumnType, Value};
use serde::Serialize;

/// What a cutover attempt found and decided.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CutoverReport {
    /// The run cut over (or not).
    pub run_id: String,
    /// `go` or `no-go`.
    pub decision: String,
    /// Why not, one line each (empty for a "go").
    pub reasons: Vec<String>,
    /// When the attempt started and ended (RFC 3339), and how long it took.
    pub started: String,
    /// When it ended.
    pub finished: String,
    /// Seconds it took.
    pub seconds: f64,
    /// Source transactions sync applied while catching up.
    pub transactions_applied: u64,
    /// Those that committed while the source should have been quiet.
    pub transactions_while_quiet: u64,
    /// The position everything was applied up to when sync stopped.
    pub applied_lsn: String,
    /// Whether `strata verify` proved every table at that point.
    pub verified: bool,
    /// Rows per table and place, as verify found them.
    pub tables: Vec<TableCounts>,
    /// Target sequences set past the source's values (`table.column = value`).
    pub sequences: Vec<String>,
    /// What to do next.
    pub next_steps: Vec<String>,
}

/// A table's rows per place at cutover.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableCounts {
    /// The table.
    pub table: String,
    /// Rows in the source.
    pub source: u64,
    /// In the operational database.
    pub operational: u64,
    /// In the archive.
    pub archive: u64,
    /// In quarantine.
    pub quarantine: u64,
    /// Destroyed.
    pub purged: u64,
}

impl CutoverReport {
    /// Counts per table from a verification.
    pub fn counts_from(verify: &VerifyReport) -> Vec<TableCounts> {
        verify
            .tables
            .iter()
            .map(|t| {
                let held = |place: &str| t.found.get(place).map_or(0, |h| h.rows);
                TableCounts {
                    table: t.table.clone(),
                    source: t.source_rows,
                    operational: held("operational"),
                    archive: held("archive"),
                    quarantine: held("quarantine"),
                    purged: held("purged"),
                }
            })
            .collect()
    }

    /// Readable text.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "cutover of run {}: {} ({:.0} s)\n",
            self.run_id,
            self.decision.to_uppercase(),
            self.seconds
        );
        for r in &self.reasons {
            s.push_str(&format!("  not ready: {r}\n"));
        }
        s.push_str(&format!(
            "  sync applied {} source transaction(s) up to {}; {} while the source should have been quiet\n  verify: {}\n",
            self.transactions_applied,
            self.applied_lsn,
            self.transactions_while_quiet,
            if self.verified { "every table proven" } else { "NOT proven" }
        ));
        for t in &self.tables {
            s.push_str(&format!(
                "  {:<24} {:>9} source = {} operational + {} archive + {} quarantine + {} purged\n",
                t.table, t.source, t.operational, t.archive, t.quarantine, t.purged
            ));
        }
        for q in &self.sequences {
            s.push_str(&format!("  sequence {q}\n"));
        }
        for n in &self.next_steps {
            s.push_str(&format!("  next: {n}\n"));
        }
        s
    }
}

/// The statements that make the source database (at `url`) read-only for its applications,
/// for its owner to run.
pub fn read_only_statements(url: &str) -> Vec<String> {
    let db = url::Url::parse(url)
        .map(|u| u.path().trim_start_matches('/').to_string())
        .unwrap_or_default();
    let db = db.as_str();
    vec![
        format!("ALTER DATABASE {} SET default_transaction_read_only = on;", quote(db)),
        format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}' AND backend_type = 'client backend' AND pid <> pg_backend_pid();",
            db.replace('\'', "''")
        ),
    ]
}

impl Migration {
    /// Catches up, waits `quiet`, and catches up again: the source is quiet when nothing on a
    /// migrated table committed meanwhile. Returns (catch-up, the second catch-up).
    pub async fn catch_up_quietly(
        &self,
        quiet: std::time::Duration,
    ) -> Result<(SyncReport, SyncReport)> {
        let first = self.sync(SyncUntil::CaughtUp).await?;
        tokio::time::sleep(quiet).await;
        let second = self.sync(SyncUntil::CaughtUp).await?;
        Ok((first, second))
    }

    /// Sets each sequence of the operational tables (serial and identity columns) past the
    /// largest value the source's column holds and the operational table's, never lower than
    /// it already is: the new system's next key cannot collide with a migrated one. (The
    /// source's own sequence is not read: Strata's read-only role has no right to it; keys
    /// the legacy system handed out and then deleted may come again.) Returns `table.column = value` per sequence.
    pub async fn set_sequences(&self) -> Result<Vec<String>> {
        let target = Db::connect(
            &self.config.resolve_url(&self.config.operational.url)?,
            false,
        )
        .await?;
        if target.kind() != crate::db::DbKind::Postgres {
            target.close().await;
            return Ok(Vec::new());
        }
        let existing = target.table_names().await?;
        let mut set = Vec::new();
        for layout in self.layouts.iter().filter(|l| existing.contains(&l.name)) {
            for (i, column) in layout.columns().iter().enumerate() {
                if column.col_type != ColumnType::Int {
                    continue;
                }
                let name = &layout.target_names[i];
                let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
                let sequence = first_text(
                    &target,
                    format!(
                        "SELECT pg_get_serial_sequence({}, {})",
                        literal(&quote(&layout.name)),
                        literal(name)
                    ),
                )
                .await?;
                let Some(sequence) = sequence else {
                    continue;
                };
                let source_max = first_int(
                    &self.source,
                    format!(
                        "SELECT COALESCE(MAX({}), 0)::bigint FROM {}",
                        quote(&column.name),
                        quote(&layout.name)
                    ),
                )
                .await?;
                let value = first_int(
                    &target,
                    format!(
                        "SELECT setval({0}, GREATEST({source_max}, (SELECT COALESCE(MAX({1}), 0) FROM {2}), COALESCE(pg_sequence_last_value({0}::regclass), 0), 1))::bigint",
                        literal(&sequence),
                        quote(name),
                        quote(&layout.name)
                    ),
                )
                .await?;
                set.push(format!("{}.{name} = {value}", layout.name));
            }
        }
        target.close().await;
        Ok(set)
    }
}

async fn first_text(db: &Db, sql: String) -> Result<Option<String>> {
    let rows = db.fetch_all(sql, vec![ColumnType::Text]).await?;
    Ok(
        match rows.into_iter().next().and_then(|r| r.into_iter().next()) {
            Some(Value::Text(t)) => Some(t),
            _ => None,
        },
    )
}

async fn first_int(db: &Db, sql: String) -> Result<i64> {
    let rows = db.fetch_all(sql, vec![ColumnType::Int]).await?;
    Ok(
        match rows.into_iter().next().and_then(|r| r.into_iter().next()) {
            Some(Value::Int(n)) => n,
            _ => 0,
        },
    )
}
