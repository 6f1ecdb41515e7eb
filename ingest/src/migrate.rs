//! Plan and run a migration: read each table once, let the policy decide every row, and send
//! it to the operational database, the archive, quarantine, or destruction.
//!
//! A run copies each table in ranges (see `ranges`), several at a time, all read from one
//! exported snapshot of the source. A range commits its operational rows, its quarantined rows
//! and its checkpoint in one transaction of the operational database, after its archive files
//! and manifest are written; a manifest whose range never reached its checkpoint is withdrawn
//! when the range is copied again. So after a crash (`kill -9` at any moment) the next
//! `migrate` resumes the same run (same `as_of`, same policy, same range plan) with the ranges
//! not checkpointed, and nothing is lost or duplicated. Purged rows leave only a destruction
//! record: counts, key range, checksum.

use crate::archive_rows::{archive_schema, ArchiveRun, ArchivedRow};
use crate::config::MigrationConfig;
use crate::db::{quote, Column, Db, DbKind, TableSchema};
use crate::error::{IngestError, Result};
use crate::facts::{local_date, patient_facts, PatientTable};
use crate::layout::TableLayout;
use crate::load::{Load, TargetTx};
use crate::progress::{RunProgress, TableProgress, PROGRESS_EVERY};
use crate::ranges::{plan_ranges, KeyRange, RangePlan};
use crate::report::{RunReport, TableReport, Tally};
use crate::target_check::TargetChecks;
use crate::value::{ColumnType, Value};
use base64::Engine;
use chrono::NaiveDate;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use strata_archive::{BlobStore, TableManifest, TableWriter, TableWriterOptions};
use strata_control::{Control, DestructionRecord, RunRecord};
use strata_cutoff_policies::{
    DateFact, Decision, LegalHold, PatientFacts, Policy, PolicyConfig, RecordFacts, Tier,
};

/// A prepared migration: source connected, config, policy and holds checked against its schema.
pub struct Migration {
    progress: RunProgress,
    config: MigrationConfig,
    source: Db,
    control: Control,
    policy_config: PolicyConfig,
    policy: Policy,
    layouts: Vec<TableLayout>,
}

/// How one record was decided, for `strata explain`.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The record's table.
    pub table: String,
    /// Its key as given.
    pub key: String,
    /// The facts the policy saw, as lines.
    pub facts: Vec<String>,
    /// The decision.
    pub decision: Decision,
    /// Each rule and its outcome, in precedence order.
    pub steps: Vec<String>,
}

const QUARANTINE_TABLE: &str = "_strata_quarantine";
/// Per range of each table, what was done; committed with the range's rows.
const CHECKPOINT_TABLE: &str = "_strata_checkpoints";
const ARCHIVE_BATCH_ROWS: usize = 8192;
/// Archived rows of a range are sorted and written as a file whenever they hold this much
/// memory (and at the range's end): about 200,000 rows a file for the benchmark's 9 columns
/// (~110 bytes a row packed, plus its sort entry).
const ARCHIVE_RUN_BYTES: usize = 24 << 20;

/// The policy text, parsed.
pub fn read_policy(config: &MigrationConfig) -> Result<PolicyConfig> {
    let path = config.policy_path();
    let text = std::fs::read_to_string(&path).map_err(|e| IngestError::Config {
        problems: vec![format!("policy file {}: {e}", path.display())],
    })?;
    Ok(PolicyConfig::parse(&text)?)
}

/// Introspects the configured tables that exist in the source.
async fn source_schemas(
    config: &MigrationConfig,
    source: &Db,
) -> Result<BTreeMap<String, TableSchema>> {
    let existing = source.table_names().await?;
    let mut schemas = BTreeMap::new();
    for (name, table) in &config.tables {
        if existing.contains(name) {
            let mut schema = source.table_schema(name).await?;
            // Computed columns follow the table's own (a name the table has already is
            // reported by validation and skipped here).
            for (c, computed) in &table.computed {
                let Some(col_type) = computed.column_type() else {
                    continue;
                };
                if schema.column(c).is_some() {
                    continue;
                }
                schema.columns.push(Column {
                    name: c.clone(),
                    decl_type: col_type.default_decl(source.kind()).to_string(),
                    col_type,
                    nullable: true,
                });
            }
            schemas.insert(name.clone(), schema);
        }
    }
    Ok(schemas)
}

/// Checks a policy against a config and its source: every problem, with the policy's line
/// numbers. Empty when the policy can run.
pub async fn check_policy(config: &MigrationConfig, policy: &PolicyConfig) -> Result<Vec<String>> {
    let source = config.connect_source().await?;
    let schemas = source_schemas(config, &source).await?;
    source.close().await;
    let mut problems = config.validate(&schemas);
    let columns = schema_columns(&schemas);
    let refs = as_refs(&columns);
    let tables: Vec<(&str, &[&str])> = refs.iter().map(|(t, c)| (*t, c.as_slice())).collect();
    problems.extend(policy.problems(&tables).iter().map(|p| p.to_string()));
    if let Some(p) = &policy.patients {
        if config
            .tables
            .get(&p.table)
            .is_some_and(|t| t.patient_key.is_none())
        {
            problems.push(format!(
                "[patients] table {}: needs patient_key in strata.toml",
                p.table
            ));
        }
    }
    Ok(problems)
}

fn schema_columns(schemas: &BTreeMap<String, TableSchema>) -> Vec<(String, Vec<String>)> {
    schemas
        .iter()
        .map(|(t, s)| {
            (
                t.clone(),
                s.columns.iter().map(|c| c.name.clone()).collect(),
            )
        })
        .collect()
}

fn as_refs(columns: &[(String, Vec<String>)]) -> Vec<(&str, Vec<&str>)> {
    columns
        .iter()
        .map(|(t, c)| (t.as_str(), c.iter().map(String::as_str).collect()))
        .collect()
}

fn holds_problems(holds: &[LegalHold], schemas: &BTreeMap<String, TableSchema>) -> Vec<String> {
    use strata_cutoff_policies::HoldScope;
    holds
        .iter()
        .filter_map(|h| match &h.scope {
            HoldScope::Table(t) if !schemas.contains_key(t) => {
                Some(format!("legal hold {}: table {t} is not configured", h.id))
            }
            HoldScope::Filter { table, column, .. } => match schemas.get(table) {
                None => Some(format!(
                    "legal hold {}: table {table} is not configured",
                    h.id
                )),
                Some(s) if s.column(column).is_none() => Some(format!(
                    "legal hold {}: no column {column:?} in {table}",
                    h.id
                )),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

impl Migration {
    /// Connects to the source (read-only) and the control database, introspects the configured
    /// tables, and checks the config, the policy and the legal holds in force against them.
    /// `today` is "now" unless the policy fixes `as_of`.
    pub async fn prepare(config: MigrationConfig, today: NaiveDate) -> Result<Self> {
        let policy_config = read_policy(&config)?;
        let source = config.connect_source().await?;
        let control = Control::open(&config.control_url()?).await?;
        if !config.source.allow_writable_role {
            let tables: Vec<String> = config.tables.keys().cloned().collect();
            let writable = source.write_privileges(&tables).await?;
            if !writable.is_empty() {
                return Err(IngestError::Config {
                    problems: vec![format!(
                        "source: the role can write to the source ({}); connect with a read-only role (GRANT SELECT only), or set allow_writable_role = true under [source]",
                        writable.join(", ")
                    )],
                });
            }
        }
        let schemas = source_schemas(&config, &source).await?;
        let mut problems = config.validate(&schemas);
        if !problems.is_empty() {
            return Err(IngestError::Config { problems });
        }
        let holds: Vec<LegalHold> = control
            .holds()
            .await?
            .into_iter()
            .filter(|h| h.released.is_none())
            .map(|h| LegalHold {
                id: h.hold_id,
                scope: h.scope,
            })
            .collect();
        problems.extend(holds_problems(&holds, &schemas));
        if !problems.is_empty() {
            return Err(IngestError::Config { problems });
        }
        let columns = schema_columns(&schemas);
        let refs = as_refs(&columns);
        let tables: Vec<(&str, &[&str])> = refs.iter().map(|(t, c)| (*t, c.as_slice())).collect();
        let policy = policy_config
            .build(&tables)?
            .with_default_as_of(today)
            .with_holds(holds.clone());
        let layouts = config
            .tables
            .iter()
            .map(|(name, t)| {
                let needed = policy_config.columns_needed(name, &holds);
                TableLayout::new(&config, name, t, schemas[name].clone(), &needed)
            })
            .collect();
        Ok(Migration {
            config,
            source,
            control,
            policy_config,
            policy,
            layouts,
            progress: RunProgress::default(),
        })
    }

    /// The source database.
    pub(crate) fn source(&self) -> &Db {
        &self.source
    }

    /// The configuration.
    pub(crate) fn config(&self) -> &MigrationConfig {
        &self.config
    }

    /// The run's live progress (shared: clone it before [`Migration::run`] to watch).
    pub fn progress(&self) -> RunProgress {
        self.progress.clone()
    }

    /// The compiled policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The tables as read.
    pub fn layouts(&self) -> &[TableLayout] {
        &self.layouts
    }

    /// The control database.
    pub fn control(&self) -> &Control {
        &self.control
    }

    fn as_of(&self) -> NaiveDate {
        self.policy.as_of().expect("set in prepare")
    }

    /// Every patient's facts: last activity, birth and death dates. None when every table is
    /// pinned to a tier (the policy then never asks).
    pub async fn patient_facts(&self) -> Result<HashMap<String, PatientFacts>> {
        self.patient_facts_in(None).await
    }

    async fn patient_facts_in(
        &self,
        snapshot: Option<&str>,
    ) -> Result<HashMap<String, PatientFacts>> {
        if !self
            .policy
            .needs_patient_facts(self.layouts.iter().map(|l| l.name.as_str()))
        {
            return Ok(HashMap::new());
        }
        let patients = self.policy_config.patients.as_ref().and_then(|p| {
            Some(PatientTable {
                layout: self.layouts.iter().find(|l| l.name == p.table)?,
                birth: p.birth_date.clone(),
                death: p.deceased_date.clone(),
            })
        });
        patient_facts(
            &self.source,
            &self.policy,
            &self.layouts,
            patients,
            snapshot,
        )
        .await
    }

    fn report_header(&self, run_id: &str) -> RunReport {
        RunReport {
            run_id: run_id.to_string(),
            policy_version: self.policy.version().to_string(),
            policy_hash: self.policy.hash().to_string(),
            as_of: self.as_of().to_string(),
            holds: self.policy.holds().iter().map(|h| h.id.clone()).collect(),
            tables: Vec::new(),
        }
    }

    async fn store_policy_version(&self) -> Result<()> {
        let author = self
            .policy_config
            .author
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "unknown".into());
        self.control
            .store_policy_version(
                self.policy.hash(),
                self.policy.version(),
                &author,
                &self.policy_config.text,
            )
            .await?;
        Ok(())
    }

    /// Reads every table and reports where each row would go. Moves nothing; records the policy
    /// version and the plan (so the next plan can be compared with it).
    pub async fn plan(&self) -> Result<(RunReport, Option<RunReport>)> {
        let started = std::time::Instant::now();
        let facts = self.patient_facts().await?;
        tracing::info!(
            patients = facts.len(),
            seconds = started.elapsed().as_secs_f64(),
            "patient facts computed"
        );
        let mut report = self.report_header("");
        for layout in &self.layouts {
            let started = std::time::Instant::now();
            let whole = KeyRange {
                index: 0,
                filter: None,
            };
            let outcome = self
                .process_range(layout, &whole, &facts, None, None)
                .await?;
            report.tables.push(outcome.tally.finish());
            tracing::info!(table = %layout.name, seconds = started.elapsed().as_secs_f64(), "table planned");
        }
        self.store_policy_version().await?;
        let previous = self
            .control
            .save_plan(
                self.policy.hash(),
                &serde_json::to_string(&report).expect("report serializes"),
            )
            .await?
            .and_then(|p| serde_json::from_str(&p).ok());
        Ok((report, previous))
    }

    /// Explains one record's tier. `key` is the primary key value, or `col=value,...` for a
    /// composite key; for a table without a primary key, the record's name in the archive (a
    /// digest of its values, `digest#2` for the second of identical rows, as the API shows).
    pub async fn explain(&self, table: &str, key: &str) -> Result<Explanation> {
        let layout = self
            .layouts
            .iter()
            .find(|l| l.name == table)
            .ok_or_else(|| IngestError::Run(format!("table {table} is not configured")))?;
        if layout.key.is_empty() {
            return self.explain_keyless(layout, key).await;
        }
        let parts: Vec<(String, String)> = if layout.key.len() == 1 && !key.contains('=') {
            vec![(
                layout.columns()[layout.key[0]].name.clone(),
                key.to_string(),
            )]
        } else {
            key.split(',')
                .map(|p| {
                    p.split_once('=')
                        .map(|(c, v)| (c.trim().to_string(), v.trim().to_string()))
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    IngestError::Run(format!(
                        "key {key:?}: write col=value,col=value for a composite key"
                    ))
                })?
        };
        let filter = parts
            .iter()
            .map(|(c, v)| {
                format!(
                    "CAST(t0.{} AS TEXT) = '{}'",
                    quote(c),
                    v.replace('\'', "''")
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let mut rows = self.source.fetch(
            layout.select_where(&self.source, Some(&filter), &[], 0),
            layout.fetch_types(&self.source, &[]),
        );
        let Some(row) = rows.next().await else {
            return Err(IngestError::Run(format!(
                "no row of {table} with key {key}"
            )));
        };
        let mut values = row?;
        drop(rows);
        let patient = layout.take_patient(&mut values);
        let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
        if let Some((col, reason)) = layout
            .map_row(&mut values)
            .or_else(|| coerce_row(&mut values, &types))
        {
            return Err(IngestError::Run(format!(
                "{table} {key}: column {}: {reason}: the row goes to quarantine",
                layout.columns()[col].name
            )));
        }
        self.explain_row(layout, key, &values, patient, Vec::new())
            .await
    }

    /// Explains a record of a table without a primary key, named by the digest of its values
    /// (as archived): reads the table until it has seen every row with that digest. Identical
    /// rows are distinct records decided alike; the explanation says how many there are.
    async fn explain_keyless(&self, layout: &TableLayout, key: &str) -> Result<Explanation> {
        let table = &layout.name;
        let (digest, nth) = match key.split_once('#') {
            Some((d, n)) => (d, n.parse::<u64>().ok().filter(|&n| n >= 1)),
            None => (key, Some(1)),
        };
        let (Some(nth), true) = (
            nth,
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        ) else {
            return Err(IngestError::Run(format!(
                "table {table} has no primary key: name a record by its key in the archive (64 hex digits, as the API shows it, `#2` for the second of identical rows), not {key:?}"
            )));
        };
        let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
        let mut rows = self.source.fetch(
            layout.select_where(&self.source, None, &[], 0),
            layout.fetch_types(&self.source, &[]),
        );
        let mut found = None;
        let mut identical = 0u64;
        while let Some(row) = rows.next().await {
            let mut values = row?;
            let patient = layout.take_patient(&mut values);
            if layout
                .map_row(&mut values)
                .or_else(|| coerce_row(&mut values, &types))
                .is_some()
            {
                continue;
            }
            // Archived rows are named without their BLOBs' content (stored apart).
            for b in &layout.blobs {
                values[b.column] = Value::Null;
            }
            if hex::encode(row_digest(&values)).eq_ignore_ascii_case(digest) {
                identical += 1;
                if found.is_none() {
                    found = Some((values, patient));
                }
            }
        }
        drop(rows);
        let Some((values, patient)) = found.filter(|_| nth <= identical) else {
            return Err(IngestError::Run(format!(
                "no row of {table} is named {key} ({identical} row(s) with that digest)"
            )));
        };
        let note = if identical > 1 {
            vec![format!(
                "identical rows: {identical} (distinct records, decided alike; named {digest}, {digest}#2, ... {digest}#{identical})"
            )]
        } else {
            Vec::new()
        };
        self.explain_row(layout, key, &values, patient, note).await
    }

    /// The explanation of a record whose values (mapped and coerced) are `values`; `extra`
    /// facts are added to the policy's.
    async fn explain_row(
        &self,
        layout: &TableLayout,
        key: &str,
        values: &[Value],
        patient: Option<String>,
        extra: Vec<String>,
    ) -> Result<Explanation> {
        let table = layout.name.as_str();
        let facts = self.patient_facts().await?;
        let row = self.row_facts(layout, values, patient.as_deref(), &facts);
        let (date, pf, policy_values) = (row.date, row.patient, &row.columns);
        let record = row.record(&self.policy, patient.as_deref());
        let (decision, steps) = self
            .policy
            .explain(table, &record, &layout.policy_column_names);
        let show = |d: Option<NaiveDate>| d.map_or("not recorded".to_string(), |d| d.to_string());
        let kind = match record.record_date {
            DateFact::Valid(_) => "plausible",
            DateFact::Missing => "missing",
            DateFact::Placeholder => "a placeholder",
            DateFact::Future => "after as_of",
        };
        let mut lines = vec![
            format!(
                "policy: {} (sha256 {}), as of {}",
                self.policy.version(),
                &self.policy.hash()[..12],
                self.as_of()
            ),
            format!("record date: {} ({kind})", show(date)),
            format!("patient: {}", patient.as_deref().unwrap_or("none")),
            format!("patient last activity: {}", show(pf.last_activity)),
            format!("patient birth date: {}", show(pf.birth_date)),
            format!("patient deceased: {}", show(pf.deceased_date)),
        ];
        for (name, v) in layout.policy_column_names.iter().zip(policy_values) {
            lines.push(format!("{name}: {}", v.as_deref().unwrap_or("NULL")));
        }
        lines.extend(extra);
        Ok(Explanation {
            table: table.into(),
            key: key.into(),
            facts: lines,
            decision,
            steps,
        })
    }

    /// Abandons the running run, if there is one, and returns its id: each table it touched
    /// is rolled back (its operational rows, quarantine and checkpoints deleted, its archive
    /// manifests withdrawn: their files are orphans until `strata archive gc`), what it
    /// recorded of the archive and of destructions is forgotten, and the run is marked
    /// `abandoned`. The next `migrate` starts a new run, under the policy as it is then.
    /// Needs neither the source nor the archive's keys: a run that failed on either is
    /// abandoned all the same.
    pub async fn abandon(config: &MigrationConfig) -> Result<Option<String>> {
        // Not while the run goes on in another process.
        let _running = crate::RunLock::take(&config.base_dir)?;
        let control = Control::open(&config.control_url()?).await?;
        let Some(run) = control
            .latest_run()
            .await?
            .filter(|r| r.status == "running")
        else {
            return Ok(None);
        };
        let target = Db::connect(&config.resolve_url(&config.operational.url)?, false).await?;
        ensure_bookkeeping_tables(&target).await?;
        let store = strata_archive::open_store(&config.archive.location(&config.base_dir)?)?;
        let existing = target.table_names().await?;
        for table in control.run_tables(&run.run_id).await? {
            // A table dropped from the operational database since still has its quarantined
            // rows (with their values) and checkpoints to forget.
            forget_table(&target, &run.run_id, &table, existing.contains(&table)).await?;
            strata_archive::withdraw_manifests(store.as_ref(), &table, &run.run_id).await?;
        }
        control.abandon_run(&run.run_id).await?;
        tracing::info!(run_id = %run.run_id, "run abandoned");
        Ok(Some(run.run_id))
    }

    /// Runs (or resumes) the migration. `on_table` is called as each table finishes.
    ///
    /// Each table is split into ranges (see `ranges`), copied by `workers` parallel workers
    /// reading one exported snapshot of the source. A range's operational rows, quarantined rows
    /// and checkpoint commit in one transaction of the operational database, after the range's
    /// archive files and manifest are written; so a crash at any moment loses and duplicates
    /// nothing, and the next `migrate` goes on with the ranges not checkpointed.
    pub async fn run(
        &mut self,
        on_table: &mut (dyn FnMut(&TableReport) + Send),
    ) -> Result<RunReport> {
        let _running = crate::RunLock::take(&self.config.base_dir)?;
        let control = self.control.clone();
        // Everything a run needs is checked before a run is recorded: a start that fails on a
        // missing key or an unreachable database leaves nothing to resume or abandon.
        let target = Db::connect(
            &self.config.resolve_url(&self.config.operational.url)?,
            false,
        )
        .await?;
        let (store, keys) = self.config.archive.open(&self.config.base_dir)?;
        let keys = keys.for_archive(store.as_ref(), true).await?;
        ensure_bookkeeping_tables(&target).await?;
        let run = match control.latest_run().await? {
            Some(run) if run.status == "running" => {
                if run.policy_hash != self.policy.hash() {
                    return Err(IngestError::Run(format!(
                        "run {} was started with policy version {} (hash {}); the policy file has changed since. Restore it to resume the run, or roll the run back with `strata migrate --abandon`.",
                        run.run_id, run.policy_version, run.policy_hash
                    )));
                }
                let as_of = NaiveDate::parse_from_str(&run.as_of, "%Y-%m-%d")
                    .map_err(|_| IngestError::Run(format!("run {}: bad as_of", run.run_id)))?;
                self.policy = self.policy.clone().with_as_of(as_of);
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
                self.store_policy_version().await?;
                control.start_run(&run).await?;
                tracing::info!(run_id = %run.run_id, "starting run");
                run
            }
        };
        let snapshot = self.source.export_snapshot().await?;
        if let Some(s) = &snapshot {
            control.record_snapshot(&run.run_id, &s.wal_lsn).await?;
            tracing::info!(run_id = %run.run_id, wal_lsn = %s.wal_lsn, "source snapshot exported");
        }
        let snapshot_id = snapshot.as_ref().map(|s| s.id.clone());
        let facts = self.patient_facts_in(snapshot_id.as_deref()).await?;
        let workers = match target.kind() {
            // SQLite has one writer: its ranges load one after another.
            DbKind::Sqlite => 1,
            DbKind::Postgres => self.config.run.workers(),
        };
        let mut report = self.report_header(&run.run_id);
        for layout in &self.layouts {
            let status = control.table_status(&run.run_id, &layout.name).await?;
            let plan = match status {
                Some((s, Some(done))) if s == "done" => {
                    let table: TableReport = serde_json::from_str(&done)
                        .map_err(|e| IngestError::Run(format!("control database: {e}")))?;
                    let p = self.progress.table(&layout.name);
                    p.rows.store(table.source_rows, Ordering::Relaxed);
                    p.done.store(1, Ordering::Relaxed);
                    on_table(&table);
                    report.tables.push(table);
                    continue;
                }
                Some((_, Some(plan))) => {
                    let plan: RangePlan = serde_json::from_str(&plan)
                        .map_err(|e| IngestError::Run(format!("control database: {e}")))?;
                    if plan.stable {
                        Some(plan)
                    } else {
                        // Page and rowid ranges mean something only in the snapshot they were
                        // planned in: the table starts over.
                        tracing::info!(table = %layout.name, "table restarts: its ranges are positions in an older snapshot");
                        restart_table(&target, &store, &run.run_id, &layout.name).await?;
                        None
                    }
                }
                _ => None,
            };
            let started = plan.is_some();
            let plan = match plan {
                Some(p) => p,
                None => plan_ranges(&self.source, layout, self.config.run.rows_per_range).await?,
            };
            let target_columns = prepare_target_table(
                &self.source,
                &target,
                &layout.target_schema(),
                &layout.casts,
                started,
            )
            .await?;
            control
                .set_table_status(
                    &run.run_id,
                    &layout.name,
                    "running",
                    Some(&serde_json::to_string(&plan).expect("plan serializes")),
                )
                .await?;
            let done = checkpoints(&target, &run.run_id, &layout.name).await?;
            let table_progress = self.progress.table(&layout.name);
            let sum = |f: fn(&TableReport) -> u64| done.iter().map(|c| f(&c.tally.report)).sum();
            let p = &table_progress;
            p.quarantined
                .store(sum(|r| r.quarantined_rows), Ordering::Relaxed);
            p.rows.store(sum(|r| r.source_rows), Ordering::Relaxed);
            p.expected_rows
                .store(plan.estimated_rows, Ordering::Relaxed);
            p.ranges.store(plan.ranges.len() as u64, Ordering::Relaxed);
            p.ranges_done.store(done.len() as u64, Ordering::Relaxed);
            let todo: Vec<&KeyRange> = plan
                .ranges
                .iter()
                .filter(|r| !done.iter().any(|c| c.range == r.index))
                .collect();
            tracing::info!(table = %layout.name, ranges = plan.ranges.len(), to_do = todo.len(), workers, "copying table");
            let checks = TargetChecks::new(&target_columns, target.kind());
            let unique_keys_unchecked = !self.source_enforces_key(layout);
            let ctx = RangeContext {
                target: &target,
                target_columns: &target_columns,
                checks: &checks,
                unique_keys_unchecked,
                store: &store,
                keys: &keys,
                run_id: &run.run_id,
                snapshot: snapshot_id.as_deref(),
                facts: &facts,
                progress: &table_progress,
            };
            self.copy_ranges(layout, todo, &ctx, workers).await?;
            let (table, destroyed) = self.finish_table(layout, &target, &run.run_id).await?;
            if table.purged_rows > 0 {
                control
                    .record_destruction(&DestructionRecord {
                        run_id: run.run_id.clone(),
                        table: layout.name.clone(),
                        rows: destroyed.rows,
                        key_checksum: destroyed.checksum_text(),
                        key_min: destroyed.key_min,
                        key_max: destroyed.key_max,
                        policy_version: self.policy.version().into(),
                        policy_hash: self.policy.hash().into(),
                    })
                    .await?;
            }
            let json = serde_json::to_string(&table).expect("report serializes");
            control
                .set_table_status(&run.run_id, &layout.name, "done", Some(&json))
                .await?;
            table_progress.done.store(1, Ordering::Relaxed);
            on_table(&table);
            report.tables.push(table);
        }
        control
            .finish_run(
                &run.run_id,
                &serde_json::to_string(&report).expect("report serializes"),
            )
            .await?;
        drop(snapshot);
        target.close().await;
        Ok(report)
    }

    /// Copies ranges on `workers` threads of their own, so that decoding, deciding and encoding
    /// rows use every core (futures polled by one task would share one thread). Each thread
    /// drives its ranges on the runtime's reactor; after a range fails, no new range starts.
    /// On a current-thread runtime (some tests), ranges interleave on that thread instead.
    async fn copy_ranges(
        &self,
        layout: &TableLayout,
        ranges: Vec<&KeyRange>,
        ctx: &RangeContext<'_>,
        workers: usize,
    ) -> Result<()> {
        let handle = tokio::runtime::Handle::current();
        if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
            let mut copies = futures::stream::iter(ranges)
                .map(|range| self.copy_range(layout, range, ctx))
                .buffer_unordered(workers);
            while let Some(done) = copies.next().await {
                done?;
            }
            return Ok(());
        }
        let queue = std::sync::Mutex::new(ranges.into_iter());
        let failed = std::sync::atomic::AtomicBool::new(false);
        let worker = || -> Result<()> {
            while !failed.load(Ordering::Relaxed) {
                let Some(range) = queue.lock().expect("range queue").next() else {
                    break;
                };
                if let Err(e) = handle.block_on(self.copy_range(layout, range, ctx)) {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
            Ok(())
        };
        tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let threads: Vec<_> = (0..workers.max(1))
                    .map(|i| {
                        std::thread::Builder::new()
                            .name(format!("strata-range-{i}"))
                            .spawn_scoped(scope, worker)
                            .expect("a range thread starts")
                    })
                    .collect();
                let mut outcome = Ok(());
                for t in threads {
                    match t.join() {
                        Ok(Err(e)) if outcome.is_ok() => outcome = Err(e),
                        Ok(_) => {}
                        Err(panic) => std::panic::resume_unwind(panic),
                    }
                }
                outcome
            })
        })
    }

    /// Copies one range: reads and decides its rows, writes its archive files and manifest,
    /// then commits its operational rows, quarantined rows and checkpoint in one transaction.
    /// When the operational database rejects a row the checks could not foresee (a CHECK or
    /// foreign-key constraint of a target table created beforehand), the range is copied again
    /// row by row, and each rejected row goes to quarantine with the database's reason.
    async fn copy_range(
        &self,
        layout: &TableLayout,
        range: &KeyRange,
        ctx: &RangeContext<'_>,
    ) -> Result<()> {
        let attempt = Arc::new(TableProgress::default());
        match self
            .copy_range_once(layout, range, ctx, false, &attempt)
            .await
        {
            Err(e) if e.is_data_rejected() => {
                tracing::warn!(table = %layout.name, range = range.index, error = %e, "the operational database rejected a row; copying the range again row by row");
                // What the failed attempt counted is counted again by the next one.
                let p = ctx.progress;
                for (total, counted) in [
                    (&p.rows, &attempt.rows),
                    (&p.bytes, &attempt.bytes),
                    (&p.quarantined, &attempt.quarantined),
                ] {
                    total.fetch_sub(counted.load(Ordering::Relaxed), Ordering::Relaxed);
                }
                self.copy_range_once(layout, range, ctx, true, &Arc::default())
                    .await
            }
            other => other,
        }
    }

    async fn copy_range_once(
        &self,
        layout: &TableLayout,
        range: &KeyRange,
        ctx: &RangeContext<'_>,
        row_by_row: bool,
        attempt: &Arc<TableProgress>,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        // A manifest left by an attempt that never reached its checkpoint is replaced.
        let writer_prefix = format!("{}-r{:05}", ctx.run_id, range.index);
        strata_archive::withdraw_manifests(ctx.store.as_ref(), &layout.name, &writer_prefix)
            .await?;
        let writer_id = format!("{writer_prefix}-{:04x}", rand::random::<u16>());
        let blob_columns = layout
            .blobs
            .iter()
            .map(|b| layout.target_names[b.column].clone())
            .collect();
        let archive = TableWriter::new(
            ctx.store.clone(),
            ctx.keys.clone(),
            TableManifest::new(
                &layout.name,
                &writer_id,
                self.policy.version(),
                blob_columns,
            ),
            archive_schema(layout),
            TableWriterOptions {
                // A one-column key is distinct; columns of a composite key are not.
                distinct_columns: match layout.key[..] {
                    [k] => vec![layout.target_names[k].clone()],
                    _ => Vec::new(),
                },
                ..Default::default()
            },
        )?;
        let mut tx = TargetTx::begin(ctx.target).await?;
        let load = tx
            .load(&layout.name, ctx.target_columns, row_by_row)
            .await?;
        let writers = Writers {
            load,
            archive,
            run: ArchiveRun::new(ARCHIVE_RUN_BYTES),
            blobs: BlobStore::new(ctx.store.clone(), ctx.keys.clone()),
            pending: PendingBlobs::default(),
            quarantine: Vec::new(),
            progress: ctx.progress.clone(),
            attempt: attempt.clone(),
            destroyed: Destroyed::default(),
            checks: ctx.checks,
            seen_keys: (ctx.unique_keys_unchecked && !layout.key.is_empty())
                .then(std::collections::HashSet::new),
        };
        let outcome = self
            .process_range(layout, range, ctx.facts, ctx.snapshot, Some(writers))
            .await?;
        for q in &outcome.quarantine {
            let p = |n| tx.placeholder(n);
            let sql = format!(
                "INSERT INTO {QUARANTINE_TABLE} (run_id, table_name, row_key, column_name, reason, row_data, quarantined_at) VALUES ({}, {}, {}, {}, {}, {}, {})",
                p(1), p(2), p(3), p(4), p(5), p(6), p(7)
            );
            tx.execute_with(
                &sql,
                &[
                    ctx.run_id.to_string(),
                    layout.name.clone(),
                    q.key.clone(),
                    q.column.clone(),
                    q.reason.clone(),
                    q.data.clone(),
                    chrono::Utc::now().to_rfc3339(),
                ],
            )
            .await?;
        }
        let checkpoint = Checkpoint {
            range: range.index,
            tally: outcome.tally,
            destroyed: outcome.destroyed,
            manifest: outcome.manifest,
        };
        let p = |n| tx.placeholder(n);
        let sql = format!(
            "INSERT INTO {CHECKPOINT_TABLE} (run_id, table_name, range_index, checkpoint, finished_at) VALUES ({}, {}, CAST({} AS BIGINT), {}, {})",
            p(1), p(2), p(3), p(4), p(5)
        );
        tx.execute_with(
            &sql,
            &[
                ctx.run_id.to_string(),
                layout.name.clone(),
                range.index.to_string(),
                serde_json::to_string(&checkpoint).expect("checkpoint serializes"),
                chrono::Utc::now().to_rfc3339(),
            ],
        )
        .await?;
        tx.commit().await?;
        ctx.progress.ranges_done.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            table = %layout.name,
            range = range.index,
            rows = checkpoint.tally.report.source_rows,
            seconds = started.elapsed().as_secs_f64(),
            "range done"
        );
        Ok(())
    }

    /// Whether the source guarantees the configured key is unique: it is the table's declared
    /// primary key (PostgreSQL and SQLite enforce theirs).
    fn source_enforces_key(&self, layout: &TableLayout) -> bool {
        let configured: Vec<&str> = layout
            .key
            .iter()
            .map(|&k| layout.columns()[k].name.as_str())
            .collect();
        !configured.is_empty()
            && configured
                == layout
                    .schema
                    .primary_key
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
    }

    /// After every range of a table is checkpointed: adds the primary key if the table was
    /// loaded without it, mirrors the ranges' manifests in the control database and records
    /// them in its ledger (what `archive verify` holds the archive against), and sums the
    /// ranges into the table's report.
    async fn finish_table(
        &self,
        layout: &TableLayout,
        target: &Db,
        run_id: &str,
    ) -> Result<(TableReport, Destroyed)> {
        let duplicates = if self.source_enforces_key(layout) {
            0
        } else {
            quarantine_duplicate_keys(target, layout, run_id).await?
        };
        add_primary_key(target, &layout.target_schema()).await?;
        let mut tally = Tally::new(&layout.name);
        let mut destroyed = Destroyed::default();
        let mut manifests = Vec::new();
        for c in checkpoints(target, run_id, &layout.name).await? {
            tally.merge(c.tally);
            destroyed.merge(c.destroyed);
            manifests.extend(c.manifest);
        }
        self.control
            .mirror_table_manifests(&layout.name, run_id, &manifests)
            .await?;
        self.control
            .record_archived(&layout.name, run_id, &manifests)
            .await?;
        // Rows loaded by different ranges with the same key were moved to quarantine.
        tally.report.operational_rows -= duplicates;
        tally.report.quarantined_rows += duplicates;
        Ok((tally.finish(), destroyed))
    }

    /// Reads one range of a table and decides every row; with `writers`, also writes each row
    /// to its tier (operational rows to the range's load, archived rows to its files).
    async fn process_range(
        &self,
        layout: &TableLayout,
        range: &KeyRange,
        facts: &HashMap<String, PatientFacts>,
        snapshot: Option<&str>,
        mut writers: Option<Writers<'_>>,
    ) -> Result<RangeOutcome> {
        let mut tally = Tally::new(&layout.name);
        let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
        let mut archived: Vec<ArchivedRow> = Vec::new();
        let schema = archive_schema(layout);
        // When writing, BLOBs longer than the inline limit are left out of the rows and
        // streamed from the source in pieces (a plan only counts them).
        let streamed = match writers {
            Some(_) => layout.streamable_blobs(&self.source),
            None => Vec::new(),
        };
        let inline_max = self.config.run.inline_blob_bytes;
        let sql = layout.select_where(&self.source, range.filter.as_deref(), &streamed, inline_max);
        let mut chunks =
            self.source
                .fetch_chunks_in(sql, layout.fetch_types(&self.source, &streamed), snapshot);
        let progress = self.progress.table(&layout.name);
        let (mut unreported_rows, mut unreported_bytes) = (0, 0);
        while let Some(chunk) = chunks.next().await {
            for mut values in chunk? {
                tally.report.source_rows += 1;
                let ordinal = (range.index, tally.report.source_rows);
                let long_blobs = layout.take_streamed(&mut values, &streamed);
                // The length of BLOB `b` when it was left out of the row to be streamed.
                let long = |b: usize| {
                    long_blobs
                        .as_ref()
                        .and_then(|s| s.lengths[b])
                        .filter(|&n| n > inline_max)
                };
                let patient = layout.take_patient(&mut values);
                let size = values.iter().map(Value::size).sum::<usize>() as u64
                    + (0..layout.blobs.len()).filter_map(long).sum::<u64>();
                unreported_rows += 1;
                unreported_bytes += size;
                if unreported_rows == PROGRESS_EVERY {
                    report_progress(
                        &progress,
                        writers.as_ref(),
                        unreported_rows,
                        unreported_bytes,
                    );
                    (unreported_rows, unreported_bytes) = (0, 0);
                }
                if let Some((col, reason)) = layout
                    .map_row(&mut values)
                    .or_else(|| coerce_row(&mut values, &types))
                {
                    quarantine(
                        layout,
                        &mut tally,
                        writers.as_mut(),
                        &values,
                        ordinal,
                        col,
                        reason,
                    )?;
                    continue;
                }
                let row = self.row_facts(layout, &values, patient.as_deref(), facts);
                let date = row.date;
                let record = row.record(&self.policy, patient.as_deref());
                let decision =
                    self.policy
                        .decide(&layout.name, &record, &layout.policy_column_names);
                if decision.tier == Tier::Operational {
                    // The operational database takes a value whole: long BLOBs are read whole here.
                    for (b, blob) in layout.blobs.iter().enumerate() {
                        if let (Some(n), Some(s)) = (long(b), &long_blobs) {
                            let name = &layout.columns()[blob.column].name;
                            let mut pieces = self.source.blob_pieces(
                                &layout.name,
                                name,
                                &s.ctid,
                                n,
                                snapshot.map(str::to_string),
                            )?;
                            let mut content = Vec::with_capacity(n as usize);
                            while let Some(piece) = pieces.next().await {
                                content.extend_from_slice(&piece.map_err(|e| {
                                    IngestError::Run(format!("{}: {e}", layout.name))
                                })?);
                            }
                            values[blob.column] = Value::Bytes(content);
                        }
                    }
                }
                if let Some(w) = writers.as_mut() {
                    if let Some((col, reason)) = w.problem(layout, &values, decision.tier) {
                        quarantine(layout, &mut tally, Some(w), &values, ordinal, col, reason)?;
                        continue;
                    }
                }
                tally.count(&decision, patient.as_deref(), size);
                match decision.tier {
                    Tier::Purge => {
                        if let Some(w) = writers.as_mut() {
                            w.destroyed.add(layout, &values, ordinal);
                        }
                    }
                    Tier::Operational => {
                        if let Some(w) = writers.as_mut() {
                            if let Some((values, reason)) = w.load.write(values).await? {
                                // Counted as operational above; it is quarantined instead.
                                tally.report.operational_rows -= 1;
                                quarantine(
                                    layout,
                                    &mut tally,
                                    Some(w),
                                    &values,
                                    ordinal,
                                    0,
                                    &reason,
                                )?;
                            }
                        }
                    }
                    Tier::Archive => {
                        let Some(w) = writers.as_mut() else {
                            for b in &layout.blobs {
                                if let Value::Bytes(content) = &values[b.column] {
                                    tally.report.blobs += 1;
                                    tally.report.blob_bytes += content.len() as u64;
                                }
                            }
                            continue;
                        };
                        let mut stores = Vec::with_capacity(layout.blobs.len());
                        let mut blob_bytes = 0;
                        for (i, b) in layout.blobs.iter().enumerate() {
                            let content = std::mem::replace(&mut values[b.column], Value::Null);
                            let content_type = b
                                .content_type_column
                                .and_then(|i| values[i].as_key_text())
                                .unwrap_or_else(|| b.content_type.clone());
                            let blobs = w.blobs.clone();
                            match (content, long(i), &long_blobs) {
                                (Value::Bytes(content), _, _) => {
                                    tally.report.blobs += 1;
                                    tally.report.blob_bytes += content.len() as u64;
                                    blob_bytes += content.len();
                                    stores.push(Some(tokio::spawn(async move {
                                        blobs.put(content, &content_type).await
                                    })));
                                }
                                (Value::Null, Some(n), Some(s)) => {
                                    tally.report.blobs += 1;
                                    tally.report.blob_bytes += n;
                                    // A streamed BLOB holds little memory but a source connection
                                    // while it streams: counting it as the whole budget keeps at
                                    // most two in flight per range, well within the source pool.
                                    blob_bytes += BLOB_BYTES_IN_FLIGHT;
                                    let pieces = self.source.blob_pieces(
                                        &layout.name,
                                        &layout.columns()[b.column].name,
                                        &s.ctid,
                                        n,
                                        snapshot.map(str::to_string),
                                    )?;
                                    stores.push(Some(tokio::spawn(async move {
                                        blobs.put_stream(pieces, &content_type).await
                                    })));
                                }
                                _ => stores.push(None),
                            }
                        }
                        let key = if layout.key.is_empty() {
                            hex::encode(row_digest(&values))
                        } else {
                            row_key(layout, &values, (0, 0))
                        };
                        let patient = patient.as_deref().unwrap_or_default();
                        if layout.blobs.is_empty() {
                            w.run.push(layout, patient, date, &key, &values, &[]);
                        } else {
                            let row = ArchivedRow {
                                key,
                                patient: patient.to_string(),
                                date,
                                values,
                                blobs: Vec::new(),
                            };
                            w.pending.push(row, stores, blob_bytes);
                            w.pending.settle(&mut archived, false).await?;
                            for r in archived.drain(..) {
                                w.run
                                    .push(layout, &r.patient, r.date, &r.key, &r.values, &r.blobs);
                            }
                        }
                        if w.run.is_full() {
                            w.write_run(layout, &schema).await?;
                        }
                    }
                }
            }
        }
        report_progress(
            &progress,
            writers.as_ref(),
            unreported_rows,
            unreported_bytes,
        );
        let Some(mut w) = writers else {
            return Ok(RangeOutcome {
                tally,
                destroyed: Destroyed::default(),
                manifest: None,
                quarantine: Vec::new(),
            });
        };
        w.pending.settle(&mut archived, true).await?;
        for r in archived.drain(..) {
            w.run
                .push(layout, &r.patient, r.date, &r.key, &r.values, &r.blobs);
        }
        w.write_run(layout, &schema).await?;
        w.load.finish().await?;
        let manifest = if w.archive.rows() > 0 {
            Some(w.archive.finish().await?)
        } else {
            None
        };
        Ok(RangeOutcome {
            tally,
            destroyed: w.destroyed,
            manifest,
            quarantine: w.quarantine,
        })
    }
}

/// Adds rows and bytes read to the table's progress (and to the attempt's, when writing).
fn report_progress(progress: &TableProgress, writers: Option<&Writers<'_>>, rows: u64, bytes: u64) {
    for p in std::iter::once(progress).chain(writers.map(|w| w.attempt.as_ref())) {
        p.rows.fetch_add(rows, Ordering::Relaxed);
        p.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Counts a row as quarantined; with writers, keeps it for the range's quarantine rows. Fails
/// when the table's threshold is passed (counted over all its ranges when writing).
fn quarantine(
    layout: &TableLayout,
    tally: &mut Tally,
    writers: Option<&mut Writers<'_>>,
    values: &[Value],
    ordinal: (usize, u64),
    col: usize,
    reason: &str,
) -> Result<()> {
    tally.report.quarantined_rows += 1;
    let total = match writers {
        Some(w) => {
            let key = row_key(layout, values, ordinal);
            tracing::warn!(table = %layout.name, key = %key, column = %layout.columns()[col].name, reason, "row quarantined");
            w.quarantine
                .push(Quarantined::new(layout, key, col, reason, values));
            w.attempt.quarantined.fetch_add(1, Ordering::Relaxed);
            w.progress.quarantined.fetch_add(1, Ordering::SeqCst) + 1
        }
        None => tally.report.quarantined_rows,
    };
    match layout.quarantine_threshold {
        Some(limit) if total > limit => Err(IngestError::QuarantineThreshold {
            table: layout.name.clone(),
            quarantined: total,
            threshold: limit,
        }),
        _ => Ok(()),
    }
}

/// What the policy needs of one row, owned, so that a [`RecordFacts`] can borrow it.
struct RowFacts {
    /// The record date in the policy's time zone.
    date: Option<NaiveDate>,
    /// The policy's columns as text, in the policy's order.
    columns: Vec<Option<String>>,
    /// The row's patient's facts.
    patient: PatientFacts,
}

impl RowFacts {
    fn record<'a>(&'a self, policy: &Policy, patient: Option<&'a str>) -> RecordFacts<'a> {
        RecordFacts {
            record_date: policy.date_fact(self.date),
            patient,
            patient_facts: self.patient,
            columns: &self.columns,
        }
    }
}

impl Migration {
    fn row_facts(
        &self,
        layout: &TableLayout,
        values: &[Value],
        patient: Option<&str>,
        facts: &HashMap<String, PatientFacts>,
    ) -> RowFacts {
        RowFacts {
            date: layout
                .record_date
                .and_then(|i| local_date(&self.policy, &values[i])),
            columns: layout
                .policy_columns
                .iter()
                .map(|i| i.and_then(|i| values[i].as_key_text()))
                .collect(),
            patient: patient
                .and_then(|p| facts.get(p).copied())
                .unwrap_or_default(),
        }
    }
}

/// What a table's purged rows leave behind: count, key range, and the sum of the rows' digests
/// (an order-independent checksum in which identical rows count each).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Destroyed {
    rows: u64,
    key_min: Option<String>,
    key_max: Option<String>,
    checksum: [u8; 32],
}

impl Destroyed {
    /// Adds another range's destroyed rows of the same table.
    fn merge(&mut self, other: Destroyed) {
        self.rows += other.rows;
        if let Some(key) = other.key_min {
            if self.key_min.as_deref().is_none_or(|m| key.as_str() < m) {
                self.key_min = Some(key);
            }
        }
        if let Some(key) = other.key_max {
            if self.key_max.as_deref().is_none_or(|m| key.as_str() > m) {
                self.key_max = Some(key);
            }
        }
        add_256(&mut self.checksum, &other.checksum);
    }

    fn add(&mut self, layout: &TableLayout, values: &[Value], ordinal: (usize, u64)) {
        self.rows += 1;
        let digest: [u8; 32] = if layout.key.is_empty() {
            row_digest(values)
        } else {
            let key = row_key(layout, values, ordinal);
            if self.key_min.as_deref().is_none_or(|m| key.as_str() < m) {
                self.key_min = Some(key.clone());
            }
            if self.key_max.as_deref().is_none_or(|m| key.as_str() > m) {
                self.key_max = Some(key.clone());
            }
            Sha256::digest(key.as_bytes()).into()
        };
        add_256(&mut self.checksum, &digest);
    }

    /// The checksum as recorded: `sum256:` and the hex of the sum (a bare hex checksum is the
    /// XOR that earlier versions recorded, in which two identical rows cancel out).
    fn checksum_text(&self) -> String {
        format!("sum256:{}", hex::encode(self.checksum))
    }
}

/// Adds `b` to `a`, both 256-bit big-endian numbers, modulo 2^256: the destruction checksum is
/// the sum of the rows' digests, which is order-independent (ranges finish in any order) and,
/// unlike an XOR, counts two identical rows twice.
fn add_256(a: &mut [u8; 32], b: &[u8; 32]) {
    let mut carry = 0u16;
    for i in (0..32).rev() {
        let sum = a[i] as u16 + b[i] as u16 + carry;
        a[i] = sum as u8;
        carry = sum >> 8;
    }
}

/// BLOBs stored concurrently, at most this many bytes of content at a time...
const BLOB_BYTES_IN_FLIGHT: usize = 32 << 20;
/// ...and at most this many objects.
const BLOBS_IN_FLIGHT: usize = 8;

/// Archived rows waiting for their BLOBs. Each BLOB is encrypted and stored by its own task, so
/// hashing, encryption and object writes overlap with reading the next rows and with each
/// other; rows leave in the order they came, each with its BLOB references.
#[derive(Default)]
struct PendingBlobs {
    rows: std::collections::VecDeque<(ArchivedRow, Vec<Option<BlobTask>>, usize)>,
    bytes: usize,
    objects: usize,
}

type BlobTask = tokio::task::JoinHandle<strata_archive::Result<strata_archive::BlobRef>>;

impl PendingBlobs {
    fn push(&mut self, row: ArchivedRow, stores: Vec<Option<BlobTask>>, bytes: usize) {
        self.bytes += bytes;
        self.objects += stores.iter().flatten().count();
        self.rows.push_back((row, stores, bytes));
    }

    /// Moves rows whose BLOBs are stored to `out`, waiting for the oldest while too much is in
    /// flight (or, with `all`, until none is).
    async fn settle(&mut self, out: &mut Vec<ArchivedRow>, all: bool) -> Result<()> {
        while let Some((_, stores, _)) = self.rows.front() {
            let busy = all || self.bytes > BLOB_BYTES_IN_FLIGHT || self.objects > BLOBS_IN_FLIGHT;
            if !busy && stores.iter().flatten().any(|t| !t.is_finished()) {
                break;
            }
            let (mut row, stores, bytes) = self.rows.pop_front().expect("front exists");
            for store in stores {
                row.blobs.push(match store {
                    None => None,
                    Some(task) => {
                        self.objects -= 1;
                        Some(task.await.map_err(|e| {
                            IngestError::Run(format!("storing a BLOB of {} failed: {e}", row.key))
                        })??)
                    }
                });
            }
            self.bytes -= bytes;
            out.push(row);
        }
        Ok(())
    }
}

/// Where a range's rows go while it is copied.
struct Writers<'c> {
    load: Load<'c>,
    archive: TableWriter,
    /// Archived rows waiting to be sorted into a file.
    run: ArchiveRun,
    blobs: BlobStore,
    pending: PendingBlobs,
    /// The range's quarantined rows, inserted with its checkpoint.
    quarantine: Vec<Quarantined>,
    /// The table's progress; its quarantined rows, counted by every range, are what the
    /// threshold is checked against.
    progress: Arc<TableProgress>,
    /// What this attempt at the range added to `progress`.
    attempt: Arc<TableProgress>,
    destroyed: Destroyed,
    checks: &'c TargetChecks,
    /// Hashes of the keys seen in this range, when the source does not enforce them.
    seen_keys: Option<std::collections::HashSet<u64>>,
}

impl Writers<'_> {
    /// Sorts the held archived rows and writes them as a file of their own.
    async fn write_run(
        &mut self,
        layout: &TableLayout,
        schema: &arrow::datatypes::SchemaRef,
    ) -> Result<()> {
        if self.run.is_empty() {
            return Ok(());
        }
        let mut sorted = self.run.drain_sorted(layout, schema, ARCHIVE_BATCH_ROWS);
        while let Some(batch) = sorted.next_batch() {
            let batch = batch.map_err(strata_archive::ArchiveError::from)?;
            self.archive.write(&batch).await?;
        }
        self.archive.end_file().await?;
        Ok(())
    }

    /// A problem that keeps the row out of every tier: a NULL or repeated primary key (when
    /// the source does not enforce its key), or, for a row bound for the operational
    /// database, a value the target would reject or change.
    fn problem(
        &mut self,
        layout: &TableLayout,
        values: &[Value],
        tier: Tier,
    ) -> Option<(usize, &'static str)> {
        if let Some(seen) = self.seen_keys.as_mut() {
            if let Some(&k) = layout.key.iter().find(|&&k| values[k].is_null()) {
                return Some((k, "NULL primary key"));
            }
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            for &k in &layout.key {
                format!("{:?}", values[k]).hash(&mut h);
            }
            if !seen.insert(h.finish()) {
                return Some((layout.key[0], "duplicate primary key"));
            }
        }
        if tier == Tier::Operational {
            return self.checks.check(values);
        }
        None
    }
}

/// What every range of a table shares.
struct RangeContext<'a> {
    target: &'a Db,
    target_columns: &'a [Column],
    checks: &'a TargetChecks,
    /// Whether keys must be checked for duplicates (the source does not guarantee them).
    unique_keys_unchecked: bool,
    store: &'a strata_archive::Store,
    keys: &'a strata_archive::KeyRing,
    run_id: &'a str,
    snapshot: Option<&'a str>,
    facts: &'a HashMap<String, PatientFacts>,
    progress: &'a Arc<TableProgress>,
}

/// What reading a range produced.
struct RangeOutcome {
    tally: Tally,
    destroyed: Destroyed,
    manifest: Option<TableManifest>,
    quarantine: Vec<Quarantined>,
}

/// A range's record in the operational database, committed with its rows.
#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    range: usize,
    tally: Tally,
    destroyed: Destroyed,
    manifest: Option<TableManifest>,
}

/// A quarantined row: where it is, what is wrong, and its values (kept in the operational
/// database's quarantine table for review, never logged).
struct Quarantined {
    key: String,
    column: String,
    reason: String,
    data: String,
}

impl Quarantined {
    fn new(layout: &TableLayout, key: String, col: usize, reason: &str, values: &[Value]) -> Self {
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
        Quarantined {
            key,
            column: layout.columns()[col].name.clone(),
            reason: reason.to_string(),
            data: serde_json::Value::Object(data).to_string(),
        }
    }
}

/// Coerces every value to its column's type in place; on failure returns the column and the
/// reason and leaves the row as read.
pub(crate) fn coerce_row(
    values: &mut [Value],
    types: &[ColumnType],
) -> Option<(usize, &'static str)> {
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

/// A digest of a row's values: the identity of a row in a table without a primary key.
fn row_digest(values: &[Value]) -> [u8; 32] {
    let mut h = Sha256::new();
    for v in values {
        match v {
            Value::Bytes(b) => h.update(b),
            other => h.update(other.as_key_text().unwrap_or_default().as_bytes()),
        }
        h.update([0u8]);
    }
    h.finalize().into()
}

/// How a row is named in messages: its primary key, or its position for a keyless table.
/// A row's name in messages and the quarantine: its primary key, or for a table without one,
/// its position (`row #N of range R`).
fn row_key(layout: &TableLayout, values: &[Value], ordinal: (usize, u64)) -> String {
    use std::fmt::Write;
    if layout.key.is_empty() {
        return format!("row #{} of range {}", ordinal.1, ordinal.0);
    }
    // Built in one string: this runs once per archived row.
    let mut key = String::with_capacity(24);
    for (i, &k) in layout.key.iter().enumerate() {
        if i > 0 {
            key.push(',');
        }
        key.push_str(&layout.columns()[k].name);
        key.push('=');
        match &values[k] {
            Value::Text(t) => key.push_str(t),
            Value::Int(n) => write!(key, "{n}").expect("writing to a string"),
            v => key.push_str(v.as_key_text().as_deref().unwrap_or("NULL")),
        }
    }
    key
}

/// Creates the quarantine and checkpoint tables in the operational database.
async fn ensure_bookkeeping_tables(target: &Db) -> Result<()> {
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {QUARANTINE_TABLE} (run_id TEXT NOT NULL, table_name TEXT NOT NULL, row_key TEXT NOT NULL, \
             column_name TEXT NOT NULL, reason TEXT NOT NULL, row_data TEXT NOT NULL, quarantined_at TEXT NOT NULL)"
        ))
        .await?;
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (run_id TEXT NOT NULL, table_name TEXT NOT NULL, range_index BIGINT NOT NULL, \
             checkpoint TEXT NOT NULL, finished_at TEXT NOT NULL, PRIMARY KEY (run_id, table_name, range_index))"
        ))
        .await
}

/// The checkpoints of a table's ranges in a run.
async fn checkpoints(target: &Db, run_id: &str, table: &str) -> Result<Vec<Checkpoint>> {
    let sql = format!(
        "SELECT checkpoint FROM {CHECKPOINT_TABLE} WHERE run_id = '{}' AND table_name = '{}' ORDER BY range_index",
        run_id.replace('\'', "''"),
        table.replace('\'', "''")
    );
    target
        .fetch_all(sql, vec![ColumnType::Text])
        .await?
        .into_iter()
        .map(|r| {
            let text = r
                .into_iter()
                .next()
                .and_then(Value::into_key_text)
                .unwrap_or_default();
            serde_json::from_str(&text)
                .map_err(|e| IngestError::Run(format!("checkpoint of {table}: {e}")))
        })
        .collect()
}

/// Forgets a table's progress in a run: its loaded rows, quarantined rows and checkpoints (in
/// one transaction) and its range manifests.
async fn restart_table(
    target: &Db,
    store: &strata_archive::Store,
    run_id: &str,
    table: &str,
) -> Result<()> {
    forget_table(target, run_id, table, true).await?;
    strata_archive::withdraw_manifests(store.as_ref(), table, run_id).await?;
    Ok(())
}

/// Deletes a run's quarantined rows and checkpoints of `table` in the operational database,
/// and (`rows`) the table's rows, in one transaction.
async fn forget_table(target: &Db, run_id: &str, table: &str, rows: bool) -> Result<()> {
    let mut tx = TargetTx::begin(target).await?;
    if rows {
        tx.execute(&format!("DELETE FROM {}", quote(table))).await?;
    }
    for t in [QUARANTINE_TABLE, CHECKPOINT_TABLE] {
        let sql = format!(
            "DELETE FROM {t} WHERE run_id = {} AND table_name = {}",
            tx.placeholder(1),
            tx.placeholder(2)
        );
        tx.execute_with(&sql, &[run_id.to_string(), table.to_string()])
            .await?;
    }
    tx.commit().await
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

/// Makes the operational table ready to load and returns its columns as loads declare them.
///
/// A table Strata creates in PostgreSQL gets its primary key after the load (building an index
/// once is cheaper than maintaining it row by row: ~25 % here); SQLite cannot add one later, so
/// there it comes with the table. A table that exists already must be empty unless this run
/// started loading it (`resuming`).
async fn prepare_target_table(
    source: &Db,
    target: &Db,
    schema: &TableSchema,
    casts: &[Option<String>],
    resuming: bool,
) -> Result<Vec<Column>> {
    let columns: Vec<Column> = schema
        .columns
        .iter()
        .zip(casts)
        .map(|(c, cast)| Column {
            decl_type: match cast {
                Some(cast) => cast.clone(),
                None => target_decl(source.kind(), target.kind(), c),
            },
            ..c.clone()
        })
        .collect();
    let exists = target.table_names().await?.contains(&schema.name);
    if exists {
        // Load with the target's own declarations: they are what checks and COPY must meet.
        let existing = target.table_schema(&schema.name).await?;
        let mut missing = Vec::new();
        let columns: Vec<Column> = columns
            .into_iter()
            .map(|c| match existing.column(&c.name) {
                Some(t) => Column {
                    decl_type: t.decl_type.clone(),
                    nullable: t.nullable,
                    ..c
                },
                None => {
                    missing.push(c.name.clone());
                    c
                }
            })
            .collect();
        if !missing.is_empty() {
            return Err(IngestError::Config {
                problems: vec![format!(
                    "operational table {} has no column {}",
                    schema.name,
                    missing.join(", ")
                )],
            });
        }
        if !resuming {
            let rows = target
                .fetch_all(
                    format!("SELECT 1 FROM {} LIMIT 1", quote(&schema.name)),
                    vec![ColumnType::Int],
                )
                .await?;
            if !rows.is_empty() {
                return Err(IngestError::Run(format!(
                    "operational table {} already has rows; Strata loads only into empty tables (a finished earlier run, or data not from Strata)",
                    schema.name
                )));
            }
        }
        return Ok(columns);
    }
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
    if target.kind() == DbKind::Sqlite && !schema.primary_key.is_empty() {
        defs.push(primary_key_clause(schema));
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

fn primary_key_clause(schema: &TableSchema) -> String {
    format!(
        "PRIMARY KEY ({})",
        schema
            .primary_key
            .iter()
            .map(|k| quote(k))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

const CROSS_RANGE_DUPLICATE: &str = "duplicate primary key (loaded by another range)";

/// Before a PostgreSQL table gets its primary key: rows that different ranges loaded with the
/// same key (possible only when the source does not enforce the key, and the ranges are not
/// key ranges) move to quarantine, all but the first loaded, in one transaction. Returns how
/// many rows of the run's table are in quarantine for this reason (so a finish interrupted
/// after the move still reports them).
async fn quarantine_duplicate_keys(target: &Db, layout: &TableLayout, run_id: &str) -> Result<u64> {
    if target.kind() != DbKind::Postgres || layout.key.is_empty() {
        return Ok(0);
    }
    let table = quote(&layout.name);
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let keys: Vec<String> = layout
        .key
        .iter()
        .map(|&k| quote(&layout.target_names[k]))
        .collect();
    let key_text = layout
        .key
        .iter()
        .map(|&k| {
            let name = &layout.target_names[k];
            format!(
                "{} || COALESCE(t.{}::text, 'NULL')",
                lit(&format!("{name}=")),
                quote(name)
            )
        })
        .collect::<Vec<_>>()
        .join(" || ',' || ");
    let has_pk = !target
        .table_schema(&layout.name)
        .await?
        .primary_key
        .is_empty();
    if !has_pk {
        let mut tx = TargetTx::begin(target).await?;
        tx.execute(&format!(
            "CREATE TEMP TABLE _strata_dups ON COMMIT DROP AS SELECT ctid AS at FROM              (SELECT ctid, row_number() OVER (PARTITION BY {k} ORDER BY ctid) AS n FROM {table}) d WHERE n > 1;              INSERT INTO {QUARANTINE_TABLE} (run_id, table_name, row_key, column_name, reason, row_data, quarantined_at)              SELECT {run}, {name}, {key_text}, {first}, {reason}, row_to_json(t)::text, now()::text              FROM {table} t WHERE t.ctid IN (SELECT at FROM _strata_dups);              DELETE FROM {table} WHERE ctid IN (SELECT at FROM _strata_dups)",
            k = keys.join(", "),
            run = lit(run_id),
            name = lit(&layout.name),
            first = lit(&layout.target_names[layout.key[0]]),
            reason = lit(CROSS_RANGE_DUPLICATE),
        ))
        .await?;
        tx.commit().await?;
    }
    let sql = format!(
        "SELECT COUNT(*) FROM {QUARANTINE_TABLE} WHERE run_id = {} AND table_name = {} AND reason = {}",
        lit(run_id),
        lit(&layout.name),
        lit(CROSS_RANGE_DUPLICATE)
    );
    Ok(
        match target
            .fetch_all(sql, vec![ColumnType::Int])
            .await?
            .first()
            .map(|r| &r[0])
        {
            Some(Value::Int(n)) => *n as u64,
            _ => 0,
        },
    )
}

/// Adds the source's primary key to a loaded PostgreSQL table that has none yet.
async fn add_primary_key(target: &Db, schema: &TableSchema) -> Result<()> {
    if target.kind() != DbKind::Postgres || schema.primary_key.is_empty() {
        return Ok(());
    }
    let existing = target.table_schema(&schema.name).await?;
    if !existing.primary_key.is_empty() {
        return Ok(());
    }
    target
        .execute(&format!(
            "ALTER TABLE {} ADD {}",
            quote(&schema.name),
            primary_key_clause(schema)
        ))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_rows_count_twice_in_the_destruction_checksum() {
        let row = vec![Value::Int(7), Value::Text("gauze".into())];
        let (mut once, mut twice) = (Destroyed::default(), Destroyed::default());
        let digest = row_digest(&row);
        add_256(&mut once.checksum, &digest);
        add_256(&mut twice.checksum, &digest);
        add_256(&mut twice.checksum, &digest);
        assert_ne!(twice.checksum, [0; 32], "an XOR would cancel out");
        assert_ne!(twice.checksum, once.checksum);
        // Order-independent, and ranges merge into the same sum.
        let other = Sha256::digest(b"id=9").into();
        let mut a = Destroyed::default();
        add_256(&mut a.checksum, &other);
        a.merge(twice);
        let mut b = Destroyed::default();
        add_256(&mut b.checksum, &digest);
        add_256(&mut b.checksum, &other);
        add_256(&mut b.checksum, &digest);
        assert_eq!(a.checksum, b.checksum);
        assert!(a.checksum_text().starts_with("sum256:"));
        // Carries cross bytes: 0x..ff + 1 = 0x..100.
        let mut x = [0u8; 32];
        x[31] = 0xff;
        let mut one = [0u8; 32];
        one[31] = 1;
        add_256(&mut x, &one);
        assert_eq!((x[30], x[31]), (1, 0));
    }
}
