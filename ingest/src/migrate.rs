//! Plan and run a migration: read each table once, let the policy decide every row, and send
//! it to the operational database, the archive, or quarantine.
//!
//! A run is recorded in the control database table by table. A table is loaded only into an
//! empty target; if a run stops part-way, the next `migrate` resumes the same run (same
//! `as_of`, same policy), empties the tables it had not finished and loads them again. Archive
//! files of an unfinished table are never published in a manifest, so they are not part of the
//! archive.

use crate::archive_rows::{archive_schema, to_record_batch, ArchivedRow};
use crate::config::MigrationConfig;
use crate::control::{Control, RunRecord};
use crate::db::{quote, Column, Db, DbKind, TableSchema};
use crate::error::{IngestError, Result};
use crate::layout::TableLayout;
use crate::value::{ColumnType, Value};
use base64::Engine;
use chrono::NaiveDate;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use strata_archive::{BlobStore, TableManifest, TableWriter, TableWriterOptions};
use strata_cutoff_policies::{Policy, PolicyConfig, RecordFacts, Tier};

/// What happened (or would happen) to one table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TableReport {
    /// The table.
    pub table: String,
    /// Rows read from the source.
    pub source_rows: u64,
    /// Rows sent to the operational database.
    pub operational_rows: u64,
    /// Rows sent to the archive.
    pub archive_rows: u64,
    /// Rows quarantined (unreadable values), with their reasons in the quarantine table.
    pub quarantined_rows: u64,
    /// Rows kept operational because their date is missing or implausible: to review.
    pub flagged_rows: u64,
    /// Rows per deciding rule.
    pub reasons: BTreeMap<String, u64>,
    /// BLOBs stored in the archive.
    pub blobs: u64,
    /// Their total plaintext bytes.
    pub blob_bytes: u64,
}

/// A whole run's (or plan's) report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// The run id (empty for a plan).
    pub run_id: String,
    /// The policy version applied.
    pub policy_version: String,
    /// SHA-256 of the policy text.
    pub policy_hash: String,
    /// The date taken as "now".
    pub as_of: String,
    /// Per table, in config order.
    pub tables: Vec<TableReport>,
}

impl RunReport {
    /// A table's report.
    pub fn table(&self, name: &str) -> Option<&TableReport> {
        self.tables.iter().find(|t| t.table == name)
    }

    /// Readable text: rows per table per tier.
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{:<24} {:>10} {:>12} {:>10} {:>11} {:>8} {:>7}\n",
            "table", "source", "operational", "archive", "quarantine", "flagged", "blobs"
        );
        for t in &self.tables {
            s.push_str(&format!(
                "{:<24} {:>10} {:>12} {:>10} {:>11} {:>8} {:>7}\n",
                t.table,
                t.source_rows,
                t.operational_rows,
                t.archive_rows,
                t.quarantined_rows,
                t.flagged_rows,
                t.blobs
            ));
        }
        s
    }
}

/// A prepared migration: source connected, config and policy checked against its schema.
pub struct Migration {
    config: MigrationConfig,
    source: Db,
    policy: Policy,
    layouts: Vec<TableLayout>,
}

const QUARANTINE_TABLE: &str = "_strata_quarantine";
const ARCHIVE_BATCH_ROWS: usize = 8192;
const OPERATIONAL_BATCH_BYTES: usize = 16 << 20;

impl Migration {
    /// Connects to the source (read-only), introspects the configured tables, and checks the
    /// config and the policy against them. `today` is "now" unless the policy fixes `as_of`.
    pub async fn prepare(config: MigrationConfig, today: NaiveDate) -> Result<Self> {
        let policy_text =
            std::fs::read_to_string(config.policy_path()).map_err(|e| IngestError::Config {
                problems: vec![format!(
                    "policy file {}: {e}",
                    config.policy_path().display()
                )],
            })?;
        let policy_config = PolicyConfig::parse(&policy_text)?;
        let source = Db::connect(&config.resolve_url(&config.source.url)?, true).await?;
        let mut schemas = BTreeMap::new();
        let existing = source.table_names().await?;
        for name in config.tables.keys() {
            if existing.contains(name) {
                schemas.insert(name.clone(), source.table_schema(name).await?);
            }
        }
        let problems = config.validate(&schemas);
        if !problems.is_empty() {
            return Err(IngestError::Config { problems });
        }
        let columns: Vec<(String, Vec<String>)> = schemas
            .iter()
            .map(|(t, s)| {
                (
                    t.clone(),
                    s.columns.iter().map(|c| c.name.clone()).collect(),
                )
            })
            .collect();
        let col_refs: Vec<Vec<&str>> = columns
            .iter()
            .map(|(_, c)| c.iter().map(String::as_str).collect())
            .collect();
        let tables: Vec<(&str, &[&str])> = columns
            .iter()
            .zip(&col_refs)
            .map(|((t, _), c)| (t.as_str(), c.as_slice()))
            .collect();
        let policy = policy_config.build(&tables)?.with_default_as_of(today);
        let layouts = config
            .tables
            .iter()
            .map(|(name, t)| {
                let current = policy_config
                    .tables
                    .get(name)
                    .and_then(|r| r.current_when.as_ref())
                    .map(|c| c.column.as_str());
                TableLayout::new(&config, name, t, schemas[name].clone(), current)
            })
            .collect();
        Ok(Migration {
            config,
            source,
            policy,
            layouts,
        })
    }

    /// The compiled policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The tables as read.
    pub fn layouts(&self) -> &[TableLayout] {
        &self.layouts
    }

    fn as_of(&self) -> NaiveDate {
        self.policy.as_of().expect("set in prepare")
    }

    /// Each patient's last activity (latest plausible record date over every table).
    pub async fn patient_activity(&self) -> Result<HashMap<String, NaiveDate>> {
        let before = self
            .as_of()
            .succ_opt()
            .unwrap_or(NaiveDate::MAX)
            .to_string();
        let mut last: HashMap<String, NaiveDate> = HashMap::new();
        for layout in &self.layouts {
            let Some((sql, types)) = layout.last_activity_sql(&self.source, &before) else {
                continue;
            };
            let mut rows = self.source.fetch(sql, types);
            while let Some(row) = rows.next().await {
                let row = row?;
                let (Some(patient), Some(date)) = (row[0].as_key_text(), row[1].as_date()) else {
                    continue;
                };
                if self.policy.date_fact(Some(date))
                    != strata_cutoff_policies::DateFact::Valid(date)
                {
                    continue;
                }
                let e = last.entry(patient).or_insert(date);
                *e = (*e).max(date);
            }
        }
        Ok(last)
    }

    fn report_header(&self, run_id: &str) -> RunReport {
        RunReport {
            run_id: run_id.to_string(),
            policy_version: self.policy.version().to_string(),
            policy_hash: self.policy.hash().to_string(),
            as_of: self.as_of().to_string(),
            tables: Vec::new(),
        }
    }

    /// Reads every table and reports where each row would go. Moves and writes nothing.
    pub async fn plan(&self) -> Result<RunReport> {
        let activity = self.patient_activity().await?;
        let mut report = self.report_header("");
        for layout in &self.layouts {
            report
                .tables
                .push(self.process_table(layout, &activity, None).await?);
        }
        Ok(report)
    }

    /// Runs (or resumes) the migration. `on_table` is called as each table finishes.
    pub async fn run(
        &mut self,
        on_table: &mut (dyn FnMut(&TableReport) + Send),
    ) -> Result<RunReport> {
        let control = Control::open(&self.config.control_url()?).await?;
        let run = match control.latest_run().await? {
            Some(run) if run.status == "running" => {
                if run.policy_hash != self.policy.hash() {
                    return Err(IngestError::Run(format!(
                        "run {} was started with policy version {} (hash {}); the policy file has changed since. Restore it to resume the run.",
                        run.run_id, run.policy_version, run.policy_hash
                    )));
                }
                let as_of = NaiveDate::parse_from_str(&run.as_of, "%Y-%m-%d")
                    .map_err(|_| IngestError::Run(format!("run {}: bad as_of", run.run_id)))?;
                self.policy = self.policy.clone().with_default_as_of(as_of);
                tracing::info!(run_id = %run.run_id, "resuming run");
                run
            }
            _ => {
                let run = RunRecord {
                    run_id: format!(
                        "run-{}-{:04x}",
                        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
                        rand::random::<u16>()
                    ),
                    status: "running".into(),
                    policy_version: self.policy.version().into(),
                    policy_hash: self.policy.hash().into(),
                    as_of: self.as_of().to_string(),
                };
                control.start_run(&run).await?;
                tracing::info!(run_id = %run.run_id, "starting run");
                run
            }
        };
        let target = Db::connect(
            &self.config.resolve_url(&self.config.operational.url)?,
            false,
        )
        .await?;
        ensure_quarantine_table(&target).await?;
        let (store, keys) = self.config.archive.open(&self.config.base_dir)?;
        let activity = self.patient_activity().await?;
        let mut report = self.report_header(&run.run_id);
        for layout in &self.layouts {
            let status = control.table_status(&run.run_id, &layout.name).await?;
            if let Some(("done", Some(done))) =
                status.as_ref().map(|(s, r)| (s.as_str(), r.clone()))
            {
                let table: TableReport = serde_json::from_str(&done)
                    .map_err(|e| IngestError::Run(format!("control database: {e}")))?;
                on_table(&table);
                report.tables.push(table);
                continue;
            }
            let target_columns = create_target_table(&self.source, &target, &layout.schema).await?;
            let resuming = status.is_some();
            if resuming {
                target
                    .execute(&format!("DELETE FROM {}", quote(&layout.name)))
                    .await?;
                let sql = format!(
                    "DELETE FROM {QUARANTINE_TABLE} WHERE run_id = {} AND table_name = {}",
                    target.placeholder(1),
                    target.placeholder(2)
                );
                target
                    .execute_with(
                        &sql,
                        &[
                            Value::Text(run.run_id.clone()),
                            Value::Text(layout.name.clone()),
                        ],
                    )
                    .await?;
            } else if target_has_rows(&target, &layout.name).await? {
                return Err(IngestError::Run(format!(
                    "operational table {} already has rows; Strata loads only into empty tables (a finished earlier run, or data not from Strata)",
                    layout.name
                )));
            }
            control
                .set_table_status(&run.run_id, &layout.name, "running", None)
                .await?;
            let writers = Writers {
                target: &target,
                target_columns,
                archive: TableWriter::new(
                    store.clone(),
                    keys.clone(),
                    TableManifest::new(
                        &layout.name,
                        &run.run_id,
                        self.policy.version(),
                        layout
                            .blobs
                            .iter()
                            .map(|b| layout.columns()[b.column].name.clone())
                            .collect(),
                    ),
                    archive_schema(layout),
                    TableWriterOptions::default(),
                )?,
                blobs: BlobStore::new(store.clone(), keys.clone()),
                run_id: run.run_id.clone(),
            };
            let table = self.process_table(layout, &activity, Some(writers)).await?;
            let json = serde_json::to_string(&table).expect("report serializes");
            control
                .set_table_status(&run.run_id, &layout.name, "done", Some(&json))
                .await?;
            on_table(&table);
            report.tables.push(table);
        }
        control
            .finish_run(
                &run.run_id,
                &serde_json::to_string(&report).expect("report serializes"),
            )
            .await?;
        control.close().await;
        target.close().await;
        Ok(report)
    }

    async fn process_table(
        &self,
        layout: &TableLayout,
        activity: &HashMap<String, NaiveDate>,
        mut writers: Option<Writers<'_>>,
    ) -> Result<TableReport> {
        let mut report = TableReport {
            table: layout.name.clone(),
            ..Default::default()
        };
        let n = layout.columns().len();
        let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
        let mut operational: Vec<Vec<Value>> = Vec::new();
        let mut operational_bytes = 0usize;
        let mut archived: Vec<ArchivedRow> = Vec::new();
        let schema = archive_schema(layout);
        let rows_per_insert = writers.as_ref().map_or(1, |w| w.target.rows_per_insert(n));
        let mut rows = self
            .source
            .fetch(layout.select_sql(&self.source), layout.fetch_types());
        while let Some(row) = rows.next().await {
            let mut values = row?;
            report.source_rows += 1;
            let patient = values.pop().and_then(|v| v.as_key_text());
            if let Some((col, reason)) = coerce_row(&mut values, &types) {
                report.quarantined_rows += 1;
                let key = row_key(layout, &values, report.source_rows);
                tracing::warn!(table = %layout.name, key = %key, column = %layout.columns()[col].name, reason, "row quarantined");
                if let Some(w) = &writers {
                    w.quarantine(layout, &key, col, reason, &values).await?;
                }
                if let Some(limit) = layout.quarantine_threshold {
                    if report.quarantined_rows > limit {
                        return Err(IngestError::QuarantineThreshold {
                            table: layout.name.clone(),
                            quarantined: report.quarantined_rows,
                            threshold: limit,
                        });
                    }
                }
                continue;
            }
            let date = layout.record_date.and_then(|i| values[i].as_date());
            let current = layout.current_when.and_then(|i| values[i].as_key_text());
            let facts = RecordFacts {
                record_date: self.policy.date_fact(date),
                current_value: current.as_deref(),
                patient_last_activity: patient.as_ref().and_then(|p| activity.get(p).copied()),
            };
            let decision = self.policy.decide(&layout.name, &facts);
            *report
                .reasons
                .entry(decision.reason.as_str().to_string())
                .or_default() += 1;
            report.flagged_rows += decision.reason.is_flagged() as u64;
            match decision.tier {
                Tier::Operational => {
                    report.operational_rows += 1;
                    let Some(w) = &writers else { continue };
                    operational_bytes += values
                        .iter()
                        .map(|v| match v {
                            Value::Bytes(b) => b.len(),
                            Value::Text(s) => s.len(),
                            _ => 8,
                        })
                        .sum::<usize>();
                    operational.push(values);
                    if operational.len() >= rows_per_insert
                        || operational_bytes >= OPERATIONAL_BATCH_BYTES
                    {
                        w.target
                            .insert_rows(&layout.name, &w.target_columns, &operational)
                            .await?;
                        operational.clear();
                        operational_bytes = 0;
                    }
                }
                Tier::Archive => {
                    report.archive_rows += 1;
                    let Some(w) = &mut writers else {
                        for b in &layout.blobs {
                            if let Value::Bytes(content) = &values[b.column] {
                                report.blobs += 1;
                                report.blob_bytes += content.len() as u64;
                            }
                        }
                        continue;
                    };
                    let mut refs = Vec::with_capacity(layout.blobs.len());
                    for b in &layout.blobs {
                        let content = std::mem::replace(&mut values[b.column], Value::Null);
                        let Value::Bytes(content) = content else {
                            refs.push(None);
                            continue;
                        };
                        let content_type = b
                            .content_type_column
                            .and_then(|i| values[i].as_key_text())
                            .unwrap_or_else(|| b.content_type.clone());
                        report.blobs += 1;
                        report.blob_bytes += content.len() as u64;
                        refs.push(Some(w.blobs.put(&content, &content_type).await?));
                    }
                    archived.push(ArchivedRow {
                        patient: patient.clone().unwrap_or_default(),
                        date,
                        values,
                        blobs: refs,
                    });
                    if archived.len() >= ARCHIVE_BATCH_ROWS {
                        w.archive
                            .write(
                                &to_record_batch(layout, &schema, &archived)
                                    .map_err(strata_archive::ArchiveError::from)?,
                            )
                            .await?;
                        archived.clear();
                    }
                }
            }
        }
        if let Some(mut w) = writers {
            w.target
                .insert_rows(&layout.name, &w.target_columns, &operational)
                .await?;
            if !archived.is_empty() {
                w.archive
                    .write(
                        &to_record_batch(layout, &schema, &archived)
                            .map_err(strata_archive::ArchiveError::from)?,
                    )
                    .await?;
            }
            if w.archive.rows() > 0 {
                w.archive.finish().await?;
            }
        }
        Ok(report)
    }
}

struct Writers<'a> {
    target: &'a Db,
    target_columns: Vec<Column>,
    archive: TableWriter,
    blobs: BlobStore,
    run_id: String,
}

impl Writers<'_> {
    async fn quarantine(
        &self,
        layout: &TableLayout,
        key: &str,
        col: usize,
        reason: &str,
        values: &[Value],
    ) -> Result<()> {
        let data: serde_json::Map<String, serde_json::Value> = layout
            .columns()
            .iter()
            .zip(values)
            .map(|(c, v)| {
                let j = match v {
                    Value::Null => serde_json::Value::Null,
                    Value::Bytes(b) => base64::engine::general_purpose::STANDARD.encode(b).into(),
                    other => other.as_key_text().unwrap_or_default().into(),
                };
                (c.name.clone(), j)
            })
            .collect();
        let p = |n| self.target.placeholder(n);
        let sql = format!(
            "INSERT INTO {QUARANTINE_TABLE} (run_id, table_name, row_key, column_name, reason, row_data, quarantined_at) VALUES ({}, {}, {}, {}, {}, {}, {})",
            p(1), p(2), p(3), p(4), p(5), p(6), p(7)
        );
        let t = |s: &str| Value::Text(s.to_string());
        self.target
            .execute_with(
                &sql,
                &[
                    t(&self.run_id),
                    t(&layout.name),
                    t(key),
                    t(&layout.columns()[col].name),
                    t(reason),
                    t(&serde_json::Value::Object(data).to_string()),
                    t(&chrono::Utc::now().to_rfc3339()),
                ],
            )
            .await
            .map(|_| ())
    }
}

/// Coerces every value to its column's type in place; on failure returns the column and the
/// reason and leaves the row as read.
fn coerce_row(values: &mut [Value], types: &[ColumnType]) -> Option<(usize, &'static str)> {
    for (i, (v, t)) in values.iter_mut().zip(types).enumerate() {
        if already(v, *t) {
            continue;
        }
        match v.clone().coerce(*t) {
            Ok(c) => *v = c,
            Err(reason) => return Some((i, reason)),
        }
    }
    None
}

fn already(v: &Value, t: ColumnType) -> bool {
    matches!(
        (v, t),
        (Value::Null, _)
            | (Value::Int(_), ColumnType::Int)
            | (Value::Float(_), ColumnType::Float)
            | (Value::Bool(_), ColumnType::Bool)
            | (Value::Text(_), ColumnType::Text | ColumnType::Other)
            | (Value::Bytes(_), ColumnType::Bytes)
            | (Value::Date(_), ColumnType::Date)
            | (Value::Timestamp(_), ColumnType::Timestamp)
            | (Value::TimestampTz(_), ColumnType::TimestampTz)
    )
}

/// How a row is named in messages: its primary key, or its position for a keyless table.
fn row_key(layout: &TableLayout, values: &[Value], ordinal: u64) -> String {
    if layout.key.is_empty() {
        return format!("row #{ordinal}");
    }
    layout
        .key
        .iter()
        .map(|&k| {
            format!(
                "{}={}",
                layout.columns()[k].name,
                values[k].as_key_text().unwrap_or_else(|| "NULL".into())
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

async fn ensure_quarantine_table(target: &Db) -> Result<()> {
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {QUARANTINE_TABLE} (run_id TEXT NOT NULL, table_name TEXT NOT NULL, row_key TEXT NOT NULL, \
             column_name TEXT NOT NULL, reason TEXT NOT NULL, row_data TEXT NOT NULL, quarantined_at TEXT NOT NULL)"
        ))
        .await
}

async fn target_has_rows(target: &Db, table: &str) -> Result<bool> {
    let rows = target
        .fetch_all(
            format!("SELECT 1 FROM {} LIMIT 1", quote(table)),
            vec![ColumnType::Int],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// The declared type of a column in the target engine: the source's own when the engines are
/// the same, else the target's type for the column's kind.
fn target_decl(from: DbKind, to: DbKind, c: &Column) -> String {
    if from == to {
        c.decl_type.clone()
    } else {
        c.col_type.default_decl(to).to_string()
    }
}

/// Creates the target table from the source schema when absent; returns the target's columns
/// as inserts should declare them.
async fn create_target_table(
    source: &Db,
    target: &Db,
    schema: &TableSchema,
) -> Result<Vec<Column>> {
    let columns: Vec<Column> = schema
        .columns
        .iter()
        .map(|c| Column {
            decl_type: target_decl(source.kind(), target.kind(), c),
            ..c.clone()
        })
        .collect();
    let mut defs: Vec<String> = columns
        .iter()
        .map(|c| {
            format!(
                "{} {}{}",
                quote(&c.name),
                c.decl_type,
                if c.nullable { "" } else { " NOT NULL" }
            )
        })
        .collect();
    if !schema.primary_key.is_empty() {
        defs.push(format!(
            "PRIMARY KEY ({})",
            schema
                .primary_key
                .iter()
                .map(|k| quote(k))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            quote(&schema.name),
            defs.join(", ")
        ))
        .await?;
    Ok(columns)
}
