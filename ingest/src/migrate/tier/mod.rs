//! `strata tier`: records keep ageing after go-live, in the operational database the new EHR
//! writes. A pass decides every row of the operational tables under the policy in force at a
//! new `as_of` (the same route stage as a migration: the operational database is one more
//! source of rows), and
//!
//! - leaves the rows that stay operational (clinically current, active patients);
//! - moves the rows now bound for the archive: archive files and manifest first, then the rows
//!   deleted where they are still the version read, with the batch's checkpoint, in one
//!   transaction ([`sink`]);
//! - files the rows past retention as a pending `tier` destruction list, and destroys the rows
//!   of lists a second records manager approved (still past retention when carried out: a
//!   hold or activity since keeps a row), with a destruction record and a signed certificate
//!   per list ([`lists`]).
//!
//! The application writes while a pass runs: a row it changed, deleted or holds locked is left
//! for the next pass, a row other rows reference is kept (whatever the foreign key's
//! `ON DELETE`), children leave before their parents, and a table with a `DELETE` trigger or
//! rule nobody checked is not touched ([`schema`]). kill -9 at any moment: the next pass
//! withdraws the manifests of batches that never committed, and records those that did.
//! PostgreSQL only: a row's version (`xmin`) is what makes a live delete safe.

mod lists;
mod schema;
mod sink;

use super::{holds_in_force, read_policy, Migration};
use crate::config::MigrationConfig;
use crate::db::{Db, DbKind};
use crate::error::{IngestError, Result};
use crate::layout::TableLayout;
use crate::migrate::range::SourceRows;
use crate::operational::OperationalTables;
use crate::progress::RunProgress;
use crate::value::{ColumnType, Value};
use chrono::NaiveDate;
use serde::Serialize;
use std::collections::BTreeMap;
use strata_archive::TableManifest;
use strata_control::Control;
use strata_cutoff_policies::Leaving;

pub use lists::TierList;

/// The operational database's table of tier batches (Strata's own; never tiered).
pub(in crate::migrate) const BATCHES_TABLE: &str = "_strata_tier_batches";

/// What one table's pass did (or, previewed, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierTable {
    /// The table, as the policy and the archive name it.
    pub table: String,
    /// Its name in the operational database.
    pub relation: String,
    /// Rows read: those whose record date lets them leave the operational tier at `as_of`
    /// (when the table is dated by a column of its own; else every row).
    pub rows_read: u64,
    /// Rows that stay operational.
    pub stay: u64,
    /// Rows moved to the archive (previewed: that would be).
    pub archived: u64,
    /// Rows past retention newly filed on a destruction list, for approval.
    pub past_retention_listed: u64,
    /// Rows past retention on a list still waiting for approval.
    pub awaiting_approval: u64,
    /// Rows of approved lists destroyed.
    pub destroyed: u64,
    /// Rows of approved lists the policy no longer finds past retention (a hold or activity
    /// since the list was filed): kept.
    pub kept_since_listed: u64,
    /// Rows the application changed, deleted or held locked after the pass read them: left
    /// for the next pass.
    pub changed_meanwhile: u64,
    /// Rows still referenced by other rows, kept, by referencing table and foreign key.
    pub kept_referenced: BTreeMap<String, u64>,
    /// Rows of approved lists left for the next pass (changed, locked or referenced).
    pub left_on_lists: u64,
    /// Rows whose values the route stage cannot read as their columns' types: left in place.
    pub unreadable: u64,
    /// The first of them: key, column and reason (no values).
    pub unreadable_examples: Vec<String>,
    /// Why the table was not touched, when it was not.
    pub skipped: Option<String>,
}

/// What a pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TierReport {
    /// The pass (its batches' manifests are `tier-{pass}-…`).
    pub pass_id: String,
    /// The day the policy reckoned from.
    pub as_of: String,
    /// The policy version.
    pub policy_version: String,
    /// A preview (`strata plan --tier`): nothing was written.
    pub preview: bool,
    /// Per table, children before parents.
    pub tables: Vec<TierTable>,
    /// The destruction list this pass filed for approval, if it found rows past retention.
    pub filed: Option<TierList>,
    /// Approved lists carried out completely by this pass, with their certificates.
    pub certificates: Vec<super::DestructionCertificate>,
    /// Batches of earlier passes that never committed, withdrawn from the archive.
    pub withdrawn: u64,
}

/// A tier pass, prepared: the operational database connected, its tables read through
/// `[operational.tables]` (or the tables the migration created), the policy and the holds in
/// force checked against them.
pub struct TierPass {
    migration: Migration,
    tables: OperationalTables,
}

impl TierPass {
    /// Prepares a pass at `as_of`: see the type's docs.
    pub async fn prepare(
        config: MigrationConfig,
        control: Control,
        as_of: NaiveDate,
    ) -> Result<Self> {
        let policy_config = read_policy(&config)?;
        if config.operational_kind()? != DbKind::Postgres {
            return Err(IngestError::Config {
                problems: vec!["[operational]: strata tier needs a PostgreSQL operational database: it deletes a row only where it is still the version it read (xmin) while the application writes, and SQLite rows carry no version".into()],
            });
        }
        let op = Db::connect(&config.resolve_url(&config.operational.url)?, false).await?;
        let tables = OperationalTables::read(&config, &op, &policy_config).await?;
        let holds = holds_in_force(&control).await?;
        let policy = super::policy_at(&policy_config, &tables.known, as_of, &holds)?;
        let mut layouts = tables.layouts(&policy_config, &holds, op.kind());
        for layout in &mut layouts {
            layout.row_version = true;
        }
        let migration = Migration {
            config: tables.view.config.clone(),
            source: op,
            control,
            policy_config,
            policy,
            layouts,
            progress: RunProgress::default(),
            follow: false,
        };
        Ok(TierPass { migration, tables })
    }

    /// Runs a pass (`preview`: reads and decides, writes nothing). `requested_by` is who
    /// requests the destruction of what it finds past retention (the list is filed pending a
    /// second records manager's approval).
    pub async fn run(&self, preview: bool, requested_by: &str) -> Result<TierReport> {
        let m = &self.migration;
        let op = m.source();
        let pass_id = format!(
            "{}-{:04x}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            rand::random::<u16>()
        );
        let mut report = TierReport {
            pass_id: pass_id.clone(),
            as_of: m.as_of().to_string(),
            policy_version: m.policy().version().to_string(),
            preview,
            ..Default::default()
        };
        let (store, keys) = m.archive_store().await?;
        let lists = lists::Lists::load(m.control()).await?;
        if !preview {
            if lists.has_approved() && !super::evidence::can_sign(m.config())? {
                return Err(IngestError::Config {
                    problems: vec![
                        "[verify]: a destruction is certified with a signing key (signing_key_file, signing_key_env or signing_key_wrapped_file): none is configured, so nothing is destroyed".into(),
                    ],
                });
            }
            let tables: Vec<String> = m.layouts.iter().map(|l| l.name.clone()).collect();
            report.withdrawn = settle(op, &store, m.control(), &tables).await?;
        }
        let reader = strata_archive::ArchiveReader::open(store.clone(), keys.clone()).await?;
        let patients = self.tables.patients(&m.policy_config, &m.layouts);
        let facts = super::past_retention::facts_after_go_live(
            &m.policy_config,
            &m.policy,
            &reader,
            op,
            &m.layouts,
            patients,
        )
        .await?;
        let foreign_keys = schema::foreign_keys(op).await?;
        let relations: Vec<String> = m.layouts.iter().map(|l| l.relation.clone()).collect();
        let mut filed = lists::Filing::default();
        let mut carried = lists::Carried::default();
        let batches = std::sync::atomic::AtomicU32::new(0);
        for relation in schema::children_first(&relations, &foreign_keys) {
            let layout = m
                .layouts
                .iter()
                .find(|l| l.relation == relation)
                .expect("ordered from the layouts");
            let mut table = TierTable {
                table: layout.name.clone(),
                relation: relation.clone(),
                ..Default::default()
            };
            let leaving = m.policy().leaving_operational(&layout.name);
            if let Some(why) = self.untouched(layout, leaving).await? {
                table.skipped = Some(why);
                carried.untouched(&lists.approved_keys(&layout.name));
                report.tables.push(table);
                continue;
            }
            let ctx = sink::PassContext {
                migration: m,
                store: &store,
                keys: &keys,
                pass_id: &pass_id,
                batches: &batches,
                dry_run: preview,
                approved: lists.approved_keys(&layout.name),
                pending: lists.pending_keys(&layout.name),
            };
            let referencing = foreign_keys
                .iter()
                .filter(|k| k.parent == relation)
                .collect();
            let mut found = lists::Found::default();
            let sink = sink::TierSink::new(ctx, layout, (&mut table, &mut found), referencing);
            let streamed = layout.streamable_blobs(op);
            let filter = match leaving {
                Leaving::DatedUpTo(bound) => dated_up_to(layout, bound),
                _ => None,
            };
            let sql = layout.select_where(
                op,
                filter.as_deref(),
                &streamed,
                m.config().run.inline_blob_bytes,
            );
            let rows = SourceRows {
                chunks: op.fetch_chunks_in(sql, layout.fetch_types(op, &streamed), None),
                index: 0,
                streamed: &streamed,
            };
            m.route_rows(layout, rows, &facts, sink).await?;
            carried.add(&found);
            filed.add(&layout.name, found.newly_past_retention);
            report.tables.push(table);
        }
        if !preview {
            report.filed = filed
                .file(m.control(), m.policy(), &report.as_of, requested_by)
                .await?;
            let read: std::collections::HashSet<String> =
                m.layouts.iter().map(|l| l.name.clone()).collect();
            report.certificates = lists
                .complete(m.config(), m.control(), op, (&carried, &read))
                .await?;
        } else if !filed.is_empty() {
            report.filed = Some(filed.preview(&report.as_of));
        }
        Ok(report)
    }
}

impl TierPass {
    /// Why a pass leaves `layout`'s table alone, if it does: pinned to the operational tier,
    /// no key, partitioned, or a DELETE trigger or rule nobody checked.
    async fn untouched(&self, layout: &TableLayout, leaving: Leaving) -> Result<Option<String>> {
        let op = self.migration.source();
        let relation = &layout.relation;
        if leaving == Leaving::Never {
            return Ok(Some(
                "the policy keeps every record of it operational: not read".into(),
            ));
        }
        if layout.key.is_empty() {
            return Ok(Some(format!(
                "no primary key: tier deletes a row by its key and version (name one under [operational.tables.{relation}] primary_key)"
            )));
        }
        if schema::is_partitioned(op, relation).await? {
            return Ok(Some(
                "a partitioned table: its rows' locations repeat across partitions, and tier does not move rows it cannot name by location (list its partitions under [operational.tables] instead)".into(),
            ));
        }
        let allowed = self.tables.view.allowed_triggers.get(&layout.name);
        let unchecked: Vec<String> = schema::delete_triggers(op, relation)
            .await?
            .into_iter()
            .filter(|t| !allowed.is_some_and(|a| a.contains(t)))
            .collect();
        if !unchecked.is_empty() {
            return Ok(Some(format!(
                "DELETE triggers or rules nobody checked: {}; what they do cannot be known, so no row is deleted (once checked, list them under [operational.tables.{relation}] allow_delete_triggers)",
                unchecked.join(", ")
            )));
        }
        Ok(None)
    }
}

/// The condition that reads only the rows of `layout` dated on or before `bound` (or undated),
/// when the record date is a date or time column of the table itself; None otherwise (every
/// row is read). A period counts by its end.
fn dated_up_to(layout: &TableLayout, bound: NaiveDate) -> Option<String> {
    use crate::layout::{DateField, RecordDate};
    let column = match &layout.record_date {
        RecordDate::Point(DateField::Column(i)) => *i,
        RecordDate::Period {
            end: DateField::Column(i),
            ..
        } => *i,
        _ => return None,
    };
    let c = &layout.columns()[column];
    let dated = matches!(
        c.col_type,
        ColumnType::Date | ColumnType::Timestamp | ColumnType::TimestampTz
    );
    if !dated || layout.computed[column].is_some() {
        return None;
    }
    let next = bound + chrono::Duration::days(1);
    let column = crate::db::quote(&c.name);
    Some(format!(
        "(t0.{column} < DATE '{next}' OR t0.{column} IS NULL)"
    ))
}

/// Settles what tier passes left before anything else reads or rewrites the archive
/// (`strata archive compact`, `retain` and `gc` call it, under the maintenance lock): withdraws
/// the manifests of batches that never committed, records the committed ones not recorded yet,
/// and returns the manifests withdrawn. Nothing to do without a PostgreSQL operational
/// database or tier batches.
pub async fn settle_tier_batches(config: &MigrationConfig, control: &Control) -> Result<u64> {
    if config.operational_kind()? != DbKind::Postgres {
        return Ok(0);
    }
    let op = Db::connect(&config.resolve_url(&config.operational.url)?, false).await?;
    if !has_batches_table(&op).await? {
        op.close().await;
        return Ok(0);
    }
    let (store, _) = config
        .archive
        .open(&config.base_dir)
        .map_err(IngestError::Archive)?;
    let tables: Vec<String> = crate::operational::OperationalView::new(config)
        .config
        .tables
        .into_keys()
        .collect();
    let withdrawn = settle(&op, &store, control, &tables).await;
    op.close().await;
    withdrawn
}

/// Whether a tier pass ever ran against the PostgreSQL operational database `op` (its batches
/// table exists).
pub(in crate::migrate) async fn has_batches_table(op: &Db) -> Result<bool> {
    let exists = op
        .fetch_all(
            format!("SELECT to_regclass('{BATCHES_TABLE}')::text"),
            vec![ColumnType::Text],
        )
        .await?;
    Ok(matches!(
        exists.first().map(|r| &r[0]),
        Some(Value::Text(_))
    ))
}

/// Withdraws the manifests of tier batches that never committed (their rows are still
/// operational; a pass killed between its manifest and its commit leaves one) and records in
/// the control database the committed batches not recorded yet. Returns the manifests
/// withdrawn. Only under the maintenance lock: a batch of a running pass is between the two.
async fn settle(
    op: &Db,
    store: &strata_archive::Store,
    control: &Control,
    tables: &[String],
) -> Result<u64> {
    op.execute(&format!(
        "CREATE TABLE IF NOT EXISTS {BATCHES_TABLE} (writer TEXT PRIMARY KEY, table_name TEXT NOT NULL, pass_id TEXT NOT NULL, request_id TEXT, rows_moved BIGINT NOT NULL, keys TEXT NOT NULL, manifest TEXT, destroyed TEXT, recorded BOOLEAN NOT NULL DEFAULT FALSE, finished_at TEXT NOT NULL)"
    ))
    .await?;
    let mut withdrawn = 0;
    for table in tables {
        let committed: std::collections::HashSet<String> = op
            .fetch_all(
                format!(
                    "SELECT writer FROM {BATCHES_TABLE} WHERE table_name = '{}'",
                    table.replace('\'', "''")
                ),
                vec![ColumnType::Text],
            )
            .await?
            .into_iter()
            .filter_map(|r| r[0].as_key_text())
            .collect();
        for run in strata_archive::manifest_run_ids(store.as_ref(), table, "tier-").await? {
            if !committed.contains(&run) {
                withdrawn += strata_archive::withdraw_manifests(
                    store.as_ref(),
                    table,
                    &format!("{run}.json"),
                )
                .await?;
            }
        }
    }
    let unrecorded = op
        .fetch_all(
            format!(
                "SELECT writer, manifest FROM {BATCHES_TABLE} WHERE NOT recorded AND manifest IS NOT NULL"
            ),
            vec![ColumnType::Text, ColumnType::Text],
        )
        .await?;
    for row in unrecorded {
        let (Some(writer), Some(json)) = (row[0].as_key_text(), row[1].as_key_text()) else {
            continue;
        };
        let manifest: TableManifest = serde_json::from_str(&json).map_err(|e| {
            IngestError::Run(format!(
                "tier batch {writer}: its manifest is unreadable: {e}"
            ))
        })?;
        record_batch(op, control, &writer, &manifest).await?;
    }
    Ok(withdrawn)
}

/// Records a committed batch's manifest in the control database's ledger and catalog mirror,
/// then marks the batch recorded.
pub(super) async fn record_batch(
    op: &Db,
    control: &Control,
    writer: &str,
    manifest: &TableManifest,
) -> Result<()> {
    control.mirror_manifest(manifest).await?;
    control
        .record_archived(
            &manifest.table,
            &manifest.run_id,
            std::slice::from_ref(manifest),
        )
        .await?;
    op.execute_with(
        &format!("UPDATE {BATCHES_TABLE} SET recorded = TRUE WHERE writer = $1"),
        &[Value::Text(writer.to_string())],
    )
    .await?;
    Ok(())
}
