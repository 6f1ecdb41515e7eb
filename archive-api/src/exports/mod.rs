//! Researchers' exports: cohorts of archived rows, de-identified by an export profile, written
//! to the export location (never the archive) by a background job whose status the researcher
//! polls: Parquet with a manifest (`/v1/exports`), or FHIR NDJSON (FHIR Bulk Data `$export`).
//!
//! Fail closed. A column leaves only if it has a class and the profile lets that class out
//! (`strata_deidentify`): the patient key leaves only as a keyed pseudonym, record keys as
//! pseudonyms or not at all, dates as the profile says, BLOBs never. Every value written is
//! read by the scanner on its way out; if it finds an identifier, the job fails: its files are
//! deleted, the audit log records why, and nothing is released. A released export is recorded
//! in the audit log (what, for whom, under which profile, study and data use agreement) before
//! the job is marked done.
//!
//! Jobs live in the control database: a server that restarts runs an interrupted job again (up
//! to three times) or marks it failed; finished exports' files are deleted when they expire.
//! Archived files are streamed a row group at a time and export files uploaded in parts, so
//! memory does not grow with the export.

mod cohort;
mod fhir;
mod output;
mod parquet;
mod patients;
pub(crate) mod routes;
pub(crate) mod spec;

use crate::config::{hex_key, ExportsConfig};
use crate::error::ApiError;
use crate::state::AppState;
use chrono::Datelike;
use cohort::TableRows;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use strata_archive::ArchiveReader;
use strata_control::{AuditEntry, Outcome};
use strata_deidentify::{
    merge_schemas, Action, Class, Classification, ExportContext, Finding, Profile, PseudonymKey,
    RestrictedZip3, Scanner, TablePlan,
};

pub use spec::{CodeToken, ExportRequest, FhirSpec, Format, JobSpec};

/// Runs of an interrupted job before it is marked failed.
const MAX_ATTEMPTS: i64 = 3;
/// How often a running job beats its heartbeat (and learns it was cancelled elsewhere).
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);
/// A running job whose heartbeat is older than this was interrupted: its server stopped.
const LEASE_SECS: i64 = 60;
/// How often interrupted jobs are looked for.
const RESUME_EVERY: std::time::Duration = std::time::Duration::from_secs(20);

/// A running job's hold on its record: its local cancel flag, and the heartbeat that tells
/// other servers it is alive and tells it when it was cancelled through another server.
pub(crate) struct Watch<'a> {
    id: &'a str,
    control: &'a strata_control::Control,
    cancelled: Arc<AtomicBool>,
    last: std::time::Instant,
}

impl Watch<'_> {
    /// Fails with `Cancelled` once the job was cancelled; beats the heartbeat now and then.
    pub(crate) async fn check(&mut self) -> Result<(), Failure> {
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(Failure::Cancelled);
        }
        if self.last.elapsed() >= HEARTBEAT {
            self.last = std::time::Instant::now();
            self.still_running().await?;
        }
        Ok(())
    }

    /// Beats the heartbeat; fails with `Cancelled` unless the job is still running.
    async fn still_running(&self) -> Result<(), Failure> {
        match self.control.beat_export(self.id).await {
            Ok(Some(s)) if s == "running" => Ok(()),
            Ok(_) => Err(Failure::Cancelled),
            Err(e) => Err(Failure::Internal(e.to_string())),
        }
    }
}

/// Why a job did not finish.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The scanner found identifiers: nothing is released.
    Identifiers(Vec<Finding>),
    /// The request cannot be exported as asked (a column the profile does not let out...).
    Request(String),
    /// Cancelled by its requester.
    Cancelled,
    /// Anything else: logged; the requester sees only that the export failed.
    Internal(String),
}

impl Failure {
    /// The reason recorded and shown to the requester (never row values, paths or keys).
    fn reason(&self) -> String {
        match self {
            Failure::Identifiers(found) => format!(
                "the scanner found what looks like identifiers, so nothing was released: {}",
                found
                    .iter()
                    .map(Finding::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Failure::Request(r) => r.clone(),
            Failure::Cancelled => "cancelled".into(),
            Failure::Internal(_) => {
                "the export failed (internal error); nothing was released".into()
            }
        }
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Internal(e)
    }
}

impl From<&str> for Failure {
    fn from(e: &str) -> Self {
        Failure::Internal(e.to_string())
    }
}

/// Where exports go, how identifiers are replaced, and under which profiles.
#[derive(Clone)]
pub struct Exporter {
    store: Arc<dyn ObjectStore>,
    key: PseudonymKey,
    studies: Arc<BTreeMap<String, (PseudonymKey, Vec<String>)>>,
    profiles: Arc<BTreeMap<String, Profile>>,
    classes: Arc<Classification>,
    zip3: Arc<RestrictedZip3>,
    expire_after: chrono::Duration,
    cancels: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter")
            .field("profiles", &self.profiles.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// The exporter of `[api.exports]` (`base` resolves relative files) over the archive's
    /// column classes. Lists every problem of the config.
    pub fn from_config(
        config: &ExportsConfig,
        base: &std::path::Path,
        classes: Classification,
    ) -> Result<Self, String> {
        let mut problems = Vec::new();
        let key = hex_key(
            config.pseudonym_key_file.as_ref(),
            config.pseudonym_key_env.as_ref(),
            base,
            "[api.exports]",
            "pseudonym_key",
        )
        .map_err(|e| problems.push(e))
        .ok();
        let mut studies = BTreeMap::new();
        for (name, s) in &config.studies {
            let own = if s.pseudonym_key_file.is_none() && s.pseudonym_key_env.is_none() {
                None
            } else {
                hex_key(
                    s.pseudonym_key_file.as_ref(),
                    s.pseudonym_key_env.as_ref(),
                    base,
                    &format!("[api.exports.studies.{name}]"),
                    "pseudonym_key",
                )
                .map_err(|e| problems.push(e))
                .ok()
            };
            studies.insert(name.clone(), (own, s.researchers.clone()));
        }
        let mut profiles: BTreeMap<String, Profile> =
            [Profile::safe_harbor(), Profile::limited_data_set()]
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect();
        for (name, p) in &config.profiles {
            match p.build(name) {
                Ok(p) => {
                    profiles.insert(name.clone(), p);
                }
                Err(e) => problems.extend(e),
            }
        }
        let zip3 = match &config.restricted_zip3_file {
            None => RestrictedZip3::default(),
            Some(file) => std::fs::read_to_string(base.join(file))
                .map_err(|e| e.to_string())
                .and_then(|t| RestrictedZip3::parse(&t))
                .unwrap_or_else(|e| {
                    problems.push(format!("[api.exports] restricted_zip3_file {file}: {e}"));
                    RestrictedZip3::default()
                }),
        };
        let location = if config.location.contains("://") {
            config.location.clone()
        } else {
            base.join(&config.location).display().to_string()
        };
        let store = strata_archive::ArchiveLocation::parse(&location)
            .and_then(|l| strata_archive::open_store(&l))
            .map_err(|e| problems.push(format!("[api.exports] location: {e}")))
            .ok();
        match (key, store) {
            (Some(key), Some(store)) if problems.is_empty() => Ok(Exporter {
                store,
                studies: Arc::new(
                    studies
                        .into_iter()
                        .map(|(name, (own, researchers))| {
                            let key = match own {
                                Some(k) => PseudonymKey::new(&k),
                                None => PseudonymKey::new(&key).for_study(&name),
                            };
                            (name, (key, researchers))
                        })
                        .collect(),
                ),
                key: PseudonymKey::new(&key),
                profiles: Arc::new(profiles),
                classes: Arc::new(classes),
                zip3: Arc::new(zip3),
                expire_after: chrono::Duration::seconds(
                    config.expire_after_secs.min(i64::MAX as u64 / 1000) as i64,
                ),
                cancels: Arc::default(),
            }),
            _ => Err(problems.join("\n")),
        }
    }

    /// The profile named `name`.
    pub fn profile(&self, name: &str) -> Result<&Profile, ApiError> {
        self.profiles.get(name).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "no export profile {name:?}: {}",
                self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Every profile: the built-in ones and the site's.
    pub fn profiles(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.values()
    }

    /// The archive's column classes the exports follow.
    pub fn classification(&self) -> &Classification {
        &self.classes
    }

    /// The pseudonym key of a job: its study's (or the site's), then its profile's, so that
    /// exports of two studies, or under two profiles, cannot be linked by their pseudonyms.
    fn context(&self, study: Option<&str>, profile: &str) -> ExportContext {
        let base = study
            .and_then(|s| self.studies.get(s))
            .map_or(&self.key, |(k, _)| k);
        ExportContext {
            key: base.for_profile(profile),
            as_of: chrono::Utc::now().date_naive(),
            zip3: self.zip3.clone(),
        }
    }

    /// Whether `study` is configured.
    pub(crate) fn has_study(&self, study: &str) -> bool {
        self.studies.contains_key(study)
    }

    /// Whether `user` may export under `study` (a system client: the study its registration
    /// names).
    fn may_use_study(&self, study: &str, user: &str) -> Result<(), ApiError> {
        match self.studies.get(study) {
            None => Err(ApiError::BadRequest(format!(
                "no study {study:?}: studies are configured in [api.exports.studies]"
            ))),
            Some((_, researchers))
                if !researchers.is_empty()
                    && !user.starts_with("system:")
                    && !researchers.iter().any(|r| r == user) =>
            {
                Err(ApiError::Forbidden)
            }
            Some(_) => Ok(()),
        }
    }

    /// A table's archived rows and the plan that de-identifies them under `profile`.
    async fn plan(
        &self,
        archive: &ArchiveReader,
        table: &str,
        spec: &JobSpec,
        profile: &Profile,
    ) -> Result<Option<(TablePlan, TableRows)>, Failure> {
        let since = spec.fhir.as_ref().and_then(|f| f.since.as_deref());
        let rows = TableRows::new(archive, table, since);
        let mut schemas = Vec::new();
        for f in rows.files() {
            schemas.push(archive.file_schema(f).await.map_err(|e| e.to_string())?);
        }
        if schemas.is_empty() {
            return Ok(None);
        }
        let merged = merge_schemas(&schemas).map_err(|e| format!("table {table}: {e}"))?;
        let plan = TablePlan::new(
            table,
            merged,
            &self.classes.table(table),
            profile,
            spec.columns.get(table).map(Vec::as_slice),
        )
        .map_err(Failure::Request)?;
        Ok(Some((plan, rows)))
    }

    /// Checks a job of `user`'s before it starts: profile, agreement, study, tables, columns,
    /// date bounds, code lists and group. Errors say what to change.
    pub(crate) async fn check(
        &self,
        spec: &JobSpec,
        user: &str,
        state: &AppState,
    ) -> Result<(), ApiError> {
        let profile = self.profile(&spec.profile)?;
        if profile.requires_dua && spec.data_use_agreement.is_none() {
            return Err(ApiError::BadRequest(format!(
                "profile {} needs the reference of a data use agreement in data_use_agreement",
                profile.name
            )));
        }
        if let Some(study) = &spec.study {
            self.may_use_study(study, user)?;
        }
        if spec.tables.is_empty() && spec.format == Format::Parquet {
            return Err(ApiError::BadRequest("name at least one table".into()));
        }
        // Date bounds finer than the dates that leave would tell what the export hides.
        if profile.years_only() {
            let whole = spec.from.is_none_or(|d| (d.month(), d.day()) == (1, 1))
                && spec.to.is_none_or(|d| (d.month(), d.day()) == (12, 31));
            if !whole {
                return Err(ApiError::BadRequest(format!(
                    "profile {} lets out only years of dates: from must be a year's first day and to its last (YYYY-01-01, YYYY-12-31)",
                    profile.name
                )));
            }
        }
        let archive = state.archive.view();
        let catalog = archive.catalog();
        for t in spec
            .tables
            .iter()
            .chain(spec.columns.keys())
            .chain(spec.codes.keys())
        {
            if !catalog.tables.contains_key(t) {
                return Err(ApiError::BadRequest(format!("no archived table {t:?}")));
            }
            if !profile.tables.is_empty() && !profile.tables.contains(t) {
                return Err(ApiError::BadRequest(format!(
                    "profile {} does not export table {t:?}",
                    profile.name
                )));
            }
            if !spec.tables.contains(t) {
                return Err(ApiError::BadRequest(format!(
                    "table {t:?} has columns or codes but is not among the tables"
                )));
            }
        }
        for table in &spec.tables {
            let plan = match self.plan(&archive, table, spec, profile).await {
                Ok(plan) => plan,
                Err(Failure::Request(r)) => return Err(ApiError::BadRequest(r)),
                Err(e) => return Err(ApiError::Internal(format!("{e:?}"))),
            };
            if let Some((plan, _)) = plan {
                // Rows are chosen only by values the export lets out as they are: choosing them
                // by anything else (a social security number, a patient key) would tie it to
                // a pseudonym.
                for column in spec.codes.get(table).into_iter().flat_map(|c| c.keys()) {
                    let kept = plan
                        .columns
                        .iter()
                        .any(|c| &c.source == column && c.action == Action::Keep);
                    if !kept {
                        return Err(ApiError::BadRequest(format!(
                            "a code list needs a column the profile lets out as it is: column {column:?} of {table} is not one"
                        )));
                    }
                }
            }
        }
        let patients_table = self.classes.patients.as_ref().map(|p| p.table.as_str());
        let wants_patients = spec
            .fhir
            .as_ref()
            .is_some_and(|f| f.types.iter().any(|t| t == "Patient"));
        if wants_patients
            && !profile.tables.is_empty()
            && !patients_table.is_some_and(|t| profile.tables.iter().any(|p| p == t))
        {
            return Err(ApiError::BadRequest(format!(
                "profile {} does not export the patients table: leave Patient out of _type",
                profile.name
            )));
        }
        if let Some(g) = &spec.group {
            if state.control.groups(Some(g)).await?.is_empty() {
                return Err(ApiError::BadRequest(format!("no group {g:?}")));
            }
        }
        Ok(())
    }

    /// Records a job and runs it on a task of its own; returns its id.
    pub(crate) async fn start(
        &self,
        state: &AppState,
        user: &str,
        spec: JobSpec,
    ) -> Result<String, ApiError> {
        let id = state
            .control
            .start_export(
                user,
                spec.format.as_str(),
                &spec.profile,
                &serde_json::to_value(&spec).expect("a job serializes"),
            )
            .await?;
        self.spawn(state.clone(), id.clone(), user.to_string(), spec);
        Ok(id)
    }

    fn spawn(&self, state: AppState, id: String, user: String, spec: JobSpec) {
        let cancelled = Arc::new(AtomicBool::new(false));
        self.cancels
            .lock()
            .expect("cancel flags")
            .insert(id.clone(), cancelled.clone());
        let exporter = self.clone();
        tokio::spawn(async move {
            let mut watch = Watch {
                id: &id,
                control: &state.control,
                cancelled,
                last: std::time::Instant::now(),
            };
            let outcome = exporter.run(&state, &id, &spec, &mut watch).await;
            // Released only while still running here (not cancelled through another server).
            let outcome = match outcome {
                Ok(m) => watch.still_running().await.map(|()| m),
                Err(e) => Err(e),
            };
            exporter.end(&state, &id, &user, &spec, outcome).await;
            exporter.cancels.lock().expect("cancel flags").remove(&id);
        });
    }

    /// Asks a running job to stop (its status is already `cancelled`).
    pub(crate) fn cancel(&self, id: &str) {
        if let Some(flag) = self.cancels.lock().expect("cancel flags").get(id) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    async fn members(
        &self,
        state: &AppState,
        spec: &JobSpec,
    ) -> Result<Option<Arc<HashSet<String>>>, Failure> {
        let Some(g) = &spec.group else {
            return Ok(None);
        };
        let group = state
            .control
            .groups(Some(g))
            .await
            .map_err(|e| e.to_string())?
            .pop()
            .ok_or_else(|| Failure::Request(format!("group {g} no longer exists")))?;
        Ok(Some(Arc::new(group.members.into_iter().collect())))
    }

    async fn run(
        &self,
        state: &AppState,
        id: &str,
        spec: &JobSpec,
        watch: &mut Watch<'_>,
    ) -> Result<Value, Failure> {
        let profile = self
            .profiles
            .get(&spec.profile)
            .ok_or_else(|| {
                Failure::Request(format!("profile {} is no longer configured", spec.profile))
            })?
            .clone();
        let members = self.members(state, spec).await?;
        let ctx = self.context(spec.study.as_deref(), &profile.name);
        let mut scanner = Scanner::new(profile.years_only());
        let run = Run {
            exporter: self,
            state,
            id,
            spec,
            profile: &profile,
            ctx: &ctx,
            members,
        };
        let files = match spec.format {
            Format::Parquet => run.parquet_files(&mut scanner, watch).await?,
            Format::Fhir => fhir::files(&run, &mut scanner, watch).await?,
        };
        let findings = scanner.findings();
        if !findings.is_empty() {
            return Err(Failure::Identifiers(findings));
        }
        let manifest = json!({
            "export_id": id,
            "format": spec.format,
            "profile": profile.name,
            "profile_lets_out": profile.lets_out().iter().map(|(c, a)| json!({ "class": c, "action": a })).collect::<Vec<_>>(),
            "study": spec.study,
            "data_use_agreement": spec.data_use_agreement,
            "group": spec.group,
            "pseudonyms": "HMAC-SHA-256 under a key kept by the site (45 CFR 164.514(c)); the study's own key when a study is named",
            "ages_counted_to": ctx.as_of.to_string(),
            "files": files,
            "scanner": { "findings": 0, "rules": ["patient_key_copy", "record_key_copy", "full_date", "ssn", "phone", "email", "url", "ip", "mrn"] },
            "created_at": chrono::Utc::now().to_rfc3339(),
        });
        if spec.format == Format::Parquet {
            self.store
                .put(
                    &Path::from(format!("{id}/manifest.json")),
                    serde_json::to_vec_pretty(&manifest)
                        .expect("a manifest serializes")
                        .into(),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(manifest)
    }

    /// The audit entry of a job's end.
    fn entry(
        user: &str,
        spec: &JobSpec,
        status: u16,
        outcome: Outcome,
        detail: Value,
    ) -> AuditEntry {
        AuditEntry {
            user: user.to_string(),
            roles: spec.roles.clone(),
            purpose: None,
            patient: None,
            action: format!("EXPORT {}", spec.format.as_str()),
            status,
            outcome,
            break_glass: None,
            detail,
            client: None,
        }
    }

    /// Records how a job ended: released (audited first: no audit entry, no release), failed
    /// (files deleted, the reason audited) or cancelled (files deleted).
    async fn end(
        &self,
        state: &AppState,
        id: &str,
        user: &str,
        spec: &JobSpec,
        outcome: Result<Value, Failure>,
    ) {
        let failure = match outcome {
            Ok(manifest) => {
                let released = json!({
                    "export": id,
                    "profile": spec.profile,
                    "study": spec.study,
                    "data_use_agreement": spec.data_use_agreement,
                    "group": spec.group,
                    "files": manifest["files"].as_array().map(|f| f.iter().map(|f| json!({
                        "file": f["file"], "rows": f["rows"], "sha256": f["sha256"],
                    })).collect::<Vec<_>>()),
                });
                let entry = Self::entry(user, spec, 200, Outcome::Allowed, released);
                match state.audit.append(entry).await {
                    Ok(_) => {
                        let expires = (chrono::Utc::now() + self.expire_after).to_rfc3339();
                        match state
                            .control
                            .finish_export(id, Ok((&manifest, &expires)))
                            .await
                        {
                            Ok(true) => return,
                            Ok(false) => None, // cancelled meanwhile
                            Err(e) => Some(Failure::Internal(e.to_string())),
                        }
                    }
                    Err(e) => Some(Failure::Internal(format!("audit log: {e}"))),
                }
            }
            Err(Failure::Cancelled) => None,
            Err(f) => Some(f),
        };
        // Files of an export another server released are never touched.
        let released = matches!(
            state.control.export(id).await.map(|r| r.map(|r| r.status)),
            Ok(Some(s)) if s == "done"
        );
        if !released {
            if let Err(e) = self.delete_files(id).await {
                tracing::error!(export = %id, error = %e, "export files not deleted");
            }
        }
        let Some(failure) = failure else { return };
        if let Failure::Internal(detail) = &failure {
            tracing::error!(export = %id, %detail, "export failed");
        }
        self.fail(state, id, user, spec, &failure).await;
    }

    /// Marks a job failed, with its reason in the audit log.
    async fn fail(
        &self,
        state: &AppState,
        id: &str,
        user: &str,
        spec: &JobSpec,
        failure: &Failure,
    ) {
        let reason = failure.reason();
        let status = match failure {
            Failure::Identifiers(_) | Failure::Request(_) => 422,
            _ => 500,
        };
        let entry = Self::entry(
            user,
            spec,
            status,
            Outcome::Failed,
            json!({ "export": id, "reason": reason }),
        );
        if let Err(e) = state.audit.append(entry).await {
            tracing::error!(export = %id, error = %e, "audit entry of a failed export not written");
        }
        if let Err(e) = state.control.finish_export(id, Err(&reason)).await {
            tracing::error!(export = %id, error = %e, "export status not recorded");
        }
    }

    /// Deletes every file of a job.
    async fn delete_files(&self, id: &str) -> Result<(), object_store::Error> {
        let prefix = Path::from(id);
        let listed: Vec<_> = self.store.list(Some(&prefix)).try_collect().await?;
        for meta in listed {
            self.store.delete(&meta.location).await?;
        }
        Ok(())
    }

    /// Runs again the jobs whose server stopped (their heartbeat is older than the lease): each
    /// claimed by one server only, up to three attempts in all, then marked failed.
    pub async fn resume(&self, state: &AppState) -> Result<usize, ApiError> {
        let mut resumed = 0;
        let stale_before = chrono::Utc::now() - chrono::Duration::seconds(LEASE_SECS);
        for job in state.control.exports_with_status("running").await? {
            let id = job.export_id.clone();
            if self.cancels.lock().expect("cancel flags").contains_key(&id) {
                continue; // running here
            }
            if !state.control.claim_export(&id, stale_before).await? {
                continue; // alive elsewhere, or claimed by another server
            }
            if let Err(e) = self.delete_files(&id).await {
                tracing::error!(export = %id, error = %e, "partial export files not deleted");
            }
            let attempts = job.attempts + 1;
            let spec: Option<JobSpec> = serde_json::from_value(job.request.clone()).ok();
            match spec {
                Some(spec) if attempts <= MAX_ATTEMPTS => {
                    tracing::warn!(export = %id, attempts, "export interrupted: running it again");
                    self.spawn(state.clone(), id, job.requested_by.clone(), spec);
                    resumed += 1;
                }
                Some(spec) => {
                    let reason = format!(
                        "interrupted {} times (its server stopped); not run again: ask for it anew",
                        attempts - 1
                    );
                    let failure = Failure::Request(reason);
                    self.fail(state, &id, &job.requested_by, &spec, &failure)
                        .await;
                }
                None => {
                    state
                        .control
                        .finish_export(&id, Err("interrupted; its request cannot be read again"))
                        .await?;
                }
            }
        }
        Ok(resumed)
    }

    /// Deletes the files of exports that expired; returns how many (one that cannot be deleted
    /// now is tried again at the next sweep).
    pub async fn expire(&self, state: &AppState) -> Result<usize, ApiError> {
        let now = chrono::Utc::now();
        let mut n = 0;
        for job in state.control.exports_with_status("done").await? {
            if !expired(&job, now) {
                continue;
            }
            match self.delete_files(&job.export_id).await {
                Ok(()) => {
                    state.control.expire_export(&job.export_id).await?;
                    n += 1;
                }
                Err(e) => {
                    tracing::error!(export = %job.export_id, error = %e, "expired export not deleted")
                }
            }
        }
        Ok(n)
    }

    /// Deletes a finished export's files now (its requester no longer needs them); returns
    /// whether it was finished.
    pub(crate) async fn expire_now(&self, state: &AppState, id: &str) -> Result<bool, ApiError> {
        self.delete_files(id)
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(state.control.expire_export(id).await?)
    }

    /// How often interrupted jobs and expired exports are looked for.
    pub fn sweep_interval(&self) -> std::time::Duration {
        let secs = (self.expire_after.num_seconds() / 4).clamp(1, 300);
        std::time::Duration::from_secs(secs as u64).min(RESUME_EVERY)
    }

    /// Streams a file of an export.
    pub async fn file(
        &self,
        id: &str,
        name: &str,
    ) -> Result<impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + use<>, ApiError> {
        if name.contains('/') || name.contains("..") {
            return Err(ApiError::NotFound);
        }
        match self.store.get(&Path::from(format!("{id}/{name}"))).await {
            Ok(r) => Ok(r.into_stream().map_err(std::io::Error::other)),
            Err(object_store::Error::NotFound { .. }) => Err(ApiError::NotFound),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }
}

/// One run of a job: what each of its stages reads.
pub(crate) struct Run<'a> {
    exporter: &'a Exporter,
    state: &'a AppState,
    id: &'a str,
    spec: &'a JobSpec,
    profile: &'a Profile,
    ctx: &'a ExportContext,
    /// The patients of the job's group, if it names one.
    members: Option<Arc<HashSet<String>>>,
}

/// Whether a finished job's files have expired (they are not served from then on, even before
/// the sweep deletes them).
pub(crate) fn expired(
    job: &strata_control::ExportRecord,
    now: chrono::DateTime<chrono::Utc>,
) -> bool {
    job.expires_at
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .is_some_and(|t| t <= now)
}

/// The key of a profile's date shifts, when it shifts dates: date bounds then apply to the
/// dates as they leave.
pub(crate) fn shifted(profile: &Profile, ctx: &ExportContext) -> Option<PseudonymKey> {
    (profile.action(Class::Date) == Action::Shift).then(|| ctx.key.clone())
}

/// Resumes interrupted export jobs (now, and whenever one's server stops beating its
/// heartbeat) and deletes expired exports: what `strata serve` runs beside the API.
pub async fn start_background(state: &AppState) {
    let Some(exporter) = state.exporter.clone() else {
        return;
    };
    if let Err(e) = exporter.resume(state).await {
        tracing::error!(error = %e, "interrupted exports not resumed");
    }
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            if let Err(e) = exporter.expire(&state).await {
                tracing::error!(error = %e, "expired exports not deleted");
            }
            tokio::time::sleep(exporter.sweep_interval()).await;
            if let Err(e) = exporter.resume(&state).await {
                tracing::error!(error = %e, "interrupted exports not resumed");
            }
        }
    });
}
