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
mod patients;
pub(crate) mod routes;
pub(crate) mod spec;

use crate::config::{hex_key, ExportsConfig};
use crate::error::ApiError;
use crate::routes::AppState;
use cohort::{Cohort, TableRows};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use output::ParquetOut;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use strata_archive::ArchiveReader;
use strata_control::{AuditEntry, Outcome};
use strata_deidentify::{
    merge_schemas, Classification, ExportContext, Finding, Profile, PseudonymKey, RestrictedZip3,
    Scanner, TablePlan,
};

pub use spec::{CodeToken, ExportRequest, FhirSpec, Format, JobSpec};

/// Runs of an interrupted job before it is marked failed.
const MAX_ATTEMPTS: i64 = 3;

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
    studies: Arc<BTreeMap<String, PseudonymKey>>,
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
            match hex_key(
                s.pseudonym_key_file.as_ref(),
                s.pseudonym_key_env.as_ref(),
                base,
                &format!("[api.exports.studies.{name}]"),
                "pseudonym_key",
            ) {
                Ok(k) => {
                    studies.insert(name.clone(), PseudonymKey::new(&k));
                }
                Err(e) => problems.push(e),
            }
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
                key: PseudonymKey::new(&key),
                studies: Arc::new(studies),
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

    fn context(&self, study: Option<&str>) -> ExportContext {
        let key = match study {
            None => self.key.clone(),
            Some(s) => self
                .studies
                .get(s)
                .cloned()
                .unwrap_or_else(|| self.key.for_study(s)),
        };
        ExportContext {
            key,
            as_of: chrono::Utc::now().date_naive(),
            zip3: self.zip3.clone(),
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

    /// Checks a job before it starts: profile, agreement, tables, columns, code lists and group.
    /// Errors say what to change.
    pub(crate) async fn check(&self, spec: &JobSpec, state: &AppState) -> Result<(), ApiError> {
        let profile = self.profile(&spec.profile)?;
        if profile.requires_dua && spec.data_use_agreement.is_none() {
            return Err(ApiError::BadRequest(format!(
                "profile {} needs the reference of a data use agreement in data_use_agreement",
                profile.name
            )));
        }
        if spec.tables.is_empty() {
            return Err(ApiError::BadRequest("name at least one table".into()));
        }
        let catalog = state.archive.catalog();
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
            let plan = match self.plan(&state.archive, table, spec, profile).await {
                Ok(plan) => plan,
                Err(Failure::Request(r)) => return Err(ApiError::BadRequest(r)),
                Err(e) => return Err(ApiError::Internal(format!("{e:?}"))),
            };
            if let Some((plan, _)) = plan {
                for column in spec.codes.get(table).into_iter().flat_map(|c| c.keys()) {
                    if plan.input_schema().field_with_name(column).is_err() {
                        return Err(ApiError::BadRequest(format!(
                            "table {table} has no column {column:?} for a code list"
                        )));
                    }
                }
            }
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
        let cancel = Arc::new(AtomicBool::new(false));
        self.cancels
            .lock()
            .expect("cancel flags")
            .insert(id.clone(), cancel.clone());
        let exporter = self.clone();
        tokio::spawn(async move {
            let outcome = exporter.run(&state, &id, &spec, &cancel).await;
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
        cancel: &AtomicBool,
    ) -> Result<Value, Failure> {
        let profile = self
            .profiles
            .get(&spec.profile)
            .ok_or_else(|| {
                Failure::Request(format!("profile {} is no longer configured", spec.profile))
            })?
            .clone();
        let members = self.members(state, spec).await?;
        let ctx = self.context(spec.study.as_deref());
        let mut scanner = Scanner::new(profile.years_only());
        let files = match spec.format {
            Format::Parquet => {
                self.parquet_files(
                    state,
                    id,
                    spec,
                    &profile,
                    &ctx,
                    members,
                    &mut scanner,
                    cancel,
                )
                .await?
            }
            Format::Fhir => {
                fhir::files(
                    self,
                    state,
                    id,
                    spec,
                    &profile,
                    &ctx,
                    members,
                    &mut scanner,
                    cancel,
                )
                .await?
            }
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

    /// Every table of a Parquet job: `<id>/<table>.parquet`. Returns the files' entries.
    #[allow(clippy::too_many_arguments)]
    async fn parquet_files(
        &self,
        state: &AppState,
        id: &str,
        spec: &JobSpec,
        profile: &Profile,
        ctx: &ExportContext,
        members: Option<Arc<HashSet<String>>>,
        scanner: &mut Scanner,
        cancel: &AtomicBool,
    ) -> Result<Vec<Value>, Failure> {
        let mut files = Vec::new();
        for (n, table) in spec.tables.iter().enumerate() {
            let _ = state
                .control
                .export_progress(
                    id,
                    &format!("table {} of {}: {table}", n + 1, spec.tables.len()),
                )
                .await;
            let Some((plan, mut rows)) = self.plan(&state.archive, table, spec, profile).await?
            else {
                continue;
            };
            let cohort = Cohort::new(spec, table, members.clone());
            rows.project(
                plan.input_columns()
                    .into_iter()
                    .chain(cohort.columns().map(str::to_string)),
            );
            let name = format!("{table}.parquet");
            let mut out =
                ParquetOut::new(&self.store, &format!("{id}/{name}"), plan.output_schema())?;
            let columns = plan.scan_columns();
            let mut exported = 0u64;
            while let Some(batch) = rows.next(&plan, &cohort).await? {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Failure::Cancelled);
                }
                let out_batch = plan.apply(&batch, ctx).map_err(|e| e.to_string())?;
                let (patients, keys) = plan.row_keys(&batch);
                scanner.key_copies(&name, &out_batch, &columns, &patients, &keys);
                scanner.batch(&name, &out_batch, &columns);
                out.write(&out_batch).await?;
                exported += out_batch.num_rows() as u64;
            }
            let written = out.finish().await?;
            files.push(json!({
                "table": table,
                "file": name,
                "rows": exported,
                "bytes": written.bytes,
                "sha256": written.sha256,
                "columns": plan.columns.iter().map(|c| json!({
                    "name": c.name, "source": c.source, "class": c.class, "action": c.action,
                })).collect::<Vec<_>>(),
                "removed": plan.removed.iter().map(|(c, why)| json!({ "column": c, "reason": why })).collect::<Vec<_>>(),
            }));
        }
        Ok(files)
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
        let audit = |status: u16, outcome: Outcome, detail: Value| AuditEntry {
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
        };
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
                match state
                    .audit
                    .append(audit(200, Outcome::Allowed, released))
                    .await
                {
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
        if let Err(e) = self.delete_files(id).await {
            tracing::error!(export = %id, error = %e, "export files not deleted");
        }
        let Some(failure) = failure else { return };
        if let Failure::Internal(detail) = &failure {
            tracing::error!(export = %id, %detail, "export failed");
        }
        let reason = failure.reason();
        let status = match failure {
            Failure::Identifiers(_) | Failure::Request(_) => 422,
            _ => 500,
        };
        if let Err(e) = state
            .audit
            .append(audit(
                status,
                Outcome::Failed,
                json!({ "export": id, "reason": reason }),
            ))
            .await
        {
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

    /// Runs again the jobs a stopped server left running (up to three attempts in all), or
    /// marks them failed.
    pub async fn resume(&self, state: &AppState) -> Result<usize, ApiError> {
        let mut resumed = 0;
        for job in state.control.exports_with_status("running").await? {
            let id = job.export_id.clone();
            if self.cancels.lock().expect("cancel flags").contains_key(&id) {
                continue; // running here
            }
            if let Err(e) = self.delete_files(&id).await {
                tracing::error!(export = %id, error = %e, "partial export files not deleted");
            }
            let attempts = state.control.retry_export(&id).await?;
            let spec: Option<JobSpec> = serde_json::from_value(job.request.clone()).ok();
            match spec {
                Some(spec) if attempts <= MAX_ATTEMPTS => {
                    tracing::warn!(export = %id, attempts, "export interrupted by a restart: running it again");
                    self.spawn(state.clone(), id, job.requested_by.clone(), spec);
                    resumed += 1;
                }
                _ => {
                    let reason = format!(
                        "interrupted by restarts of the server {} times; not run again: ask for it anew",
                        attempts - 1
                    );
                    state.control.finish_export(&id, Err(&reason)).await?;
                }
            }
        }
        Ok(resumed)
    }

    /// Deletes the files of exports that expired; returns how many.
    pub async fn expire(&self, state: &AppState) -> Result<usize, ApiError> {
        let now = chrono::Utc::now();
        let mut n = 0;
        for job in state.control.exports_with_status("done").await? {
            let due = job
                .expires_at
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t <= now);
            if due {
                self.delete_files(&job.export_id)
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                state.control.expire_export(&job.export_id).await?;
                n += 1;
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

    /// How often expired exports are looked for.
    pub fn sweep_interval(&self) -> std::time::Duration {
        let secs = (self.expire_after.num_seconds() / 4).clamp(1, 300);
        std::time::Duration::from_secs(secs as u64)
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

/// Resumes interrupted export jobs and deletes expired exports from time to time: what
/// `strata serve` runs beside the API.
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
        }
    });
}
