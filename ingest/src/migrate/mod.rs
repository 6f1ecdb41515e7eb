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

mod canonical;
mod certificate;
mod cutover;
mod destroyed;
mod evidence;
mod explain;
mod follow;
mod later;
mod naming;
mod outbox;
mod past_retention;
mod range;
mod reactivate;
mod retention;
mod rollback;
mod route;
mod sinks;
mod target;
mod tier;
mod upserts;
mod verify;
mod workers;
mod writer;

pub use certificate::{DestroyedTable, DestructionCertificate, CERTIFICATE_FORMAT};
pub use cutover::{read_only_statements, CutoverReport, TableCounts};
pub use evidence::{
    check as check_report, check_evidence, new_signing_key, sign as sign_report, wrap_signing_key,
    Evidence, Signature,
};
pub use follow::{SyncReport, SyncUntil};
pub use outbox::OutboxReport;
pub use past_retention::{file_retention_list, FiledList};
pub use retention::{carry_out_retention, certify_keys_destroyed, ListedTable, RetentionList};
pub use rollback::RollbackReport;
pub(crate) use route::coerce_row;
pub use tier::{settle_tier_batches, TierList, TierPass, TierReport, TierTable};
pub use verify::{Difference, Holding, TableProof, VerifyReport, LISTED_DIFFERENCES};

use crate::config::MigrationConfig;
use crate::db::{Column, Db, DbKind, TableSchema};
use crate::error::{IngestError, Result};
use crate::facts::{patient_facts, PatientTable};
use crate::layout::TableLayout;
use crate::progress::RunProgress;
use crate::ranges::{plan_ranges, KeyRange, RangePlan};
use crate::report::{RunReport, TableReport, Tally};
use crate::target_check::TargetChecks;
use chrono::NaiveDate;
use destroyed::Destroyed;
use range::RangeContext;
use sinks::{Counting, RowChecks};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use strata_control::{Control, DestructionRecord, RunRecord, TableState};
use strata_cutoff_policies::{Decision, LegalHold, PatientFacts, Policy, PolicyConfig};
use target::{
    add_primary_key, checkpoints, ensure_bookkeeping_tables, forget_table, prepare_target_table,
    quarantine_duplicate_keys, quarantine_summary, restart_table, target_columns,
};

/// A table's state within a run: its range plan while it is copied, its report when done.
type TableRun = TableState<RangePlan, TableReport>;

/// A prepared migration: source connected, config, policy and holds checked against its schema.
pub struct Migration {
    progress: RunProgress,
    config: MigrationConfig,
    source: Db,
    control: Control,
    policy_config: PolicyConfig,
    policy: Policy,
    layouts: Vec<TableLayout>,
    /// Whether a new run creates a replication slot before its snapshot, to be followed.
    follow: bool,
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

/// The policy text, parsed.
pub fn read_policy(config: &MigrationConfig) -> Result<PolicyConfig> {
    let path = config.policy_path();
    let text = std::fs::read_to_string(&path).map_err(|e| IngestError::Config {
        problems: vec![format!("policy file {}: {e}", path.display())],
    })?;
    Ok(PolicyConfig::parse(&text)?)
}

/// The legal holds in force (placed, not released), as the policy takes them.
pub(crate) async fn holds_in_force(control: &Control) -> Result<Vec<LegalHold>> {
    Ok(control
        .holds()
        .await?
        .into_iter()
        .filter(|h| h.released.is_none())
        .map(|h| LegalHold {
            id: h.hold_id,
            scope: h.scope,
        })
        .collect())
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
pub async fn check_policy(config: &MigrationConfig, policy: &PolicyConfig) -> Result<PolicyCheck> {
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
    Ok(PolicyCheck {
        problems,
        warnings: crate::config_warnings(config, policy, &schemas),
    })
}

/// What `strata policy check` found.
#[derive(Debug, Clone, Default)]
pub struct PolicyCheck {
    /// What makes the config or policy invalid: nothing runs.
    pub problems: Vec<String>,
    /// What they allow but probably do not mean ([`crate::config_warnings`]).
    pub warnings: Vec<String>,
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

/// The policy at `as_of` with `holds`, checked against the tables and columns it may name
/// (`known`: table → columns), as a pass after go-live builds it.
fn policy_at(
    policy_config: &PolicyConfig,
    known: &BTreeMap<String, Vec<String>>,
    as_of: NaiveDate,
    holds: &[LegalHold],
) -> Result<Policy> {
    let refs: Vec<(&str, Vec<&str>)> = known
        .iter()
        .map(|(t, cs)| (t.as_str(), cs.iter().map(String::as_str).collect()))
        .collect();
    let tables: Vec<(&str, &[&str])> = refs.iter().map(|(t, c)| (*t, c.as_slice())).collect();
    Ok(policy_config
        .build(&tables)?
        .with_as_of(as_of)
        .with_holds(holds.to_vec()))
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
        // A policy that does not read is reported before any database is opened.
        read_policy(&config)?;
        let control = Control::open(&config.control_url()?).await?;
        Self::prepare_with(config, control, today).await
    }

    /// [`Migration::prepare`] with the control database already open (the CLI opens it once
    /// per command).
    pub async fn prepare_with(
        config: MigrationConfig,
        control: Control,
        today: NaiveDate,
    ) -> Result<Self> {
        let policy_config = read_policy(&config)?;
        let source = config.connect_source().await?;
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
        let holds = holds_in_force(&control).await?;
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
                let mut layout =
                    TableLayout::new(&config, name, t, schemas[name].clone(), &schemas, &needed);
                layout.read_decimals(source.kind());
                layout
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
            follow: false,
        })
    }

    /// Makes a new run followable (`strata migrate --follow`): a replication slot is created
    /// before its snapshot, so that `strata sync` applies every change committed since.
    pub fn follow(&mut self, yes: bool) {
        self.follow = yes;
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

    /// What the config and policy allow but probably do not mean
    /// ([`crate::config_warnings`]).
    pub fn warnings(&self) -> Vec<String> {
        let schemas = self
            .layouts
            .iter()
            .map(|l| (l.name.clone(), l.schema.clone()))
            .collect();
        crate::config_warnings(&self.config, &self.policy_config, &schemas)
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

    /// What a run under this migration's policy, `as_of` and holds would record (its tables
    /// empty): to compare with the run a verification proves.
    pub fn report_header_for_verify(&self) -> RunReport {
        self.report_header("")
    }

    fn report_header(&self, run_id: &str) -> RunReport {
        RunReport {
            run_id: run_id.to_string(),
            policy_version: self.policy.version().to_string(),
            policy_hash: self.policy.hash().to_string(),
            as_of: self.as_of().to_string(),
            holds: self.policy.holds().iter().map(|h| h.id.clone()).collect(),
            tables: Vec::new(),
            patients_by_year: Default::default(),
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
        let target = self.operational_if_it_exists().await?;
        let target_kind = self.config.operational_kind()?;
        let mut report = self.report_header("");
        let mut year_patients = Default::default();
        for layout in &self.layouts {
            let started = std::time::Instant::now();
            let whole = KeyRange {
                index: 0,
                filter: None,
            };
            let (columns, _) = target_columns(
                self.source.kind(),
                (target_kind, target.as_ref()),
                &layout.target_schema(),
                &layout.casts,
            )
            .await?;
            let checks = TargetChecks::new(&columns, target_kind);
            let sink = Counting {
                checks: RowChecks::new(layout, &checks, !self.source_enforces_key(layout)),
            };
            let mut outcome = self.route_range(layout, &whole, &facts, None, sink).await?;
            if let Some(by_year) = outcome.tally.year_patients.take() {
                crate::report::merge_years(&mut year_patients, by_year);
            }
            report.tables.push(outcome.tally.finish());
            tracing::info!(table = %layout.name, seconds = started.elapsed().as_secs_f64(), "table planned");
        }
        if let Some(target) = target {
            target.close().await;
        }
        report.patients_by_year = crate::report::patients_by_year(&year_patients);
        self.store_policy_version().await?;
        let previous = self.control.save_plan(self.policy.hash(), &report).await?;
        Ok((report, previous))
    }

    /// The operational database, read-only, for a plan to read its tables' declarations; None
    /// when it is a SQLite file not created yet (the run creates it).
    pub(crate) async fn operational_if_it_exists(&self) -> Result<Option<Db>> {
        let url = self.config.resolve_url(&self.config.operational.url)?;
        if let Some(rest) = url.strip_prefix("sqlite://") {
            let path = rest.split_once('?').map_or(rest, |(p, _)| p);
            if !std::path::Path::new(path).exists() {
                return Ok(None);
            }
        }
        Db::connect(&url, true).await.map(Some)
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
        let following = self.slot_for(&run).await?;
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
            let state: Option<TableRun> = control.table_state(&run.run_id, &layout.name).await?;
            let plan = match state {
                Some(TableState::Done { report: table }) => {
                    let p = self.progress.table(&layout.name);
                    p.rows.store(table.source_rows, Ordering::Relaxed);
                    p.done.store(1, Ordering::Relaxed);
                    on_table(&table);
                    report.tables.push(table);
                    continue;
                }
                Some(TableState::Running { plan }) => {
                    if plan.stable && following.is_none() {
                        Some(plan)
                    } else {
                        // Page and rowid ranges mean something only in the snapshot they were
                        // planned in; and a followed table is copied in one snapshot, the one
                        // change sync knows it by: the table starts over.
                        tracing::info!(table = %layout.name, "table restarts: its ranges were copied in an older snapshot");
                        restart_table(&target, &store, &run.run_id, &layout.name).await?;
                        None
                    }
                }
                None => None,
            };
            let started = plan.is_some();
            let plan = match plan {
                Some(p) => p,
                None => plan_ranges(&self.source, layout, self.config.run.rows_per_range).await?,
            };
            if let (Some(_), Some(s)) = (&following, &snapshot) {
                control
                    .record_table_snapshot(&run.run_id, &layout.name, &s.xids, &s.wal_lsn)
                    .await?;
            }
            if !target.table_names().await?.contains(&layout.name) {
                // Recorded before it exists: a rollback drops what this run created.
                control
                    .record_created_table(&run.run_id, &layout.name)
                    .await?;
            }
            let target_columns = prepare_target_table(
                &self.source,
                &target,
                &layout.target_schema(),
                &layout.casts,
                started,
            )
            .await?;
            let running = TableRun::Running { plan: plan.clone() };
            control
                .set_table_state(&run.run_id, &layout.name, &running)
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
                        value_checksum: destroyed.value_checksum_text(),
                        key_min: destroyed.key_min,
                        key_max: destroyed.key_max,
                        policy_version: self.policy.version().into(),
                        policy_hash: self.policy.hash().into(),
                        void: None,
                    })
                    .await?;
            }
            let done = TableRun::Done {
                report: table.clone(),
            };
            control
                .set_table_state(&run.run_id, &layout.name, &done)
                .await?;
            table_progress.done.store(1, Ordering::Relaxed);
            on_table(&table);
            report.tables.push(table);
        }
        control.finish_run(&run.run_id, &report).await?;
        drop(snapshot);
        target.close().await;
        Ok(report)
    }

    /// The replication slot `run` is followed by: created now (before the run's snapshot) for
    /// a new run made with [`Migration::follow`], the one recorded for a run resumed. None for
    /// a run not followed; a run started without a slot cannot be followed later.
    async fn slot_for(&self, run: &RunRecord) -> Result<Option<strata_control::SyncRecord>> {
        if let Some(recorded) = self.control.sync_of(&run.run_id).await? {
            return Ok(Some(recorded));
        }
        if !self.follow {
            return Ok(None);
        }
        if self.source.kind() != DbKind::Postgres {
            return Err(IngestError::Run(
                "--follow reads changes from PostgreSQL's logical replication: the source is not PostgreSQL".into(),
            ));
        }
        follow::refuse_unfollowable(&self.layouts)?;
        self.refuse_unprepared().await?;
        let started = self.control.run_tables(&run.run_id).await?;
        if !started.is_empty() {
            return Err(IngestError::Run(format!(
                "run {} was started without a replication slot and cannot be followed: finish it without --follow, or roll it back (`strata migrate --abandon`) and start again with --follow",
                run.run_id
            )));
        }
        let sync = &self.config.sync;
        let url = self.config.resolve_url(&self.config.source.url)?;
        let consistent_lsn = crate::sync::stream::create_slot(&url, &sync.slot)
            .await
            .map_err(|e| {
                IngestError::Run(format!(
                    "replication slot {}: {e} (the source role needs REPLICATION; a slot left by an earlier run goes with `strata sync stop --drop-slot`)",
                    sync.slot
                ))
            })?;
        let record = strata_control::SyncRecord {
            run_id: run.run_id.clone(),
            slot: sync.slot.clone(),
            publication: sync.publication.clone(),
            consistent_lsn,
            dropped_at: None,
        };
        self.control.record_sync(&record).await?;
        tracing::info!(run_id = %run.run_id, slot = %record.slot, lsn = %record.consistent_lsn, "replication slot created");
        Ok(Some(record))
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
        for (column, reason, rows) in quarantine_summary(target, run_id, &layout.name).await? {
            tracing::warn!(table = %layout.name, %column, %reason, rows, "rows quarantined (see _strata_quarantine)");
        }
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
        if duplicates > 0 {
            let key = &layout.columns()[layout.key[0]].name;
            tally.quarantine(key, sinks::DUPLICATE_KEY, duplicates);
        }
        Ok((tally.finish(), destroyed))
    }
}
