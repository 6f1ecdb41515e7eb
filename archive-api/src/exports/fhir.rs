//! A FHIR Bulk Data job's output: one NDJSON file per resource type, de-identified by the
//! job's profile exactly as Parquet exports are (the same plan of each table), then mapped by
//! `[api.fhir]`: resources carry pseudonymous ids and subjects, no identifiers, and dates as
//! the profile lets them out (a year is a valid FHIR date). `Patient` resources come from the
//! patients table wherever it lives (archived rows, and the operational database): the
//! classes the profile lets out (year of birth, sex, ZIP3, state...), never a name.

use super::cohort::{fan_out, Cohort};
use super::output::NdjsonOut;
use super::patients::operational_patients;
use super::{shifted, Exporter, Failure, JobSpec, Run, Watch};
use crate::fhir::{resource_of, Fields, Identity};
use crate::state::AppState;
use arrow::array::RecordBatch;
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use strata_archive::{cell, ArchivedBatch, Cell, PATIENT_COLUMN, RECORD_DATE_COLUMN};
use strata_deidentify::{Action, Class, ExportContext, Profile, Scanner, TablePlan};

/// The extension marking a patient aged 90 or over, whose year of birth does not leave.
pub(crate) const AGE_90_EXTENSION: &str =
    "https://strata.dev/fhir/StructureDefinition/age-90-or-over";

/// The text of a value (numbers as written, nulls as None).
fn text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Every resource type of a FHIR job. Returns the files' entries.
pub(crate) async fn files(
    run: &Run<'_>,
    scanner: &mut Scanner,
    watch: &mut Watch<'_>,
) -> Result<Vec<Value>, Failure> {
    let Run {
        exporter,
        state,
        id,
        spec,
        profile,
        ctx,
        ref members,
    } = *run;
    let fhir = spec
        .fhir
        .as_ref()
        .ok_or_else(|| Failure::Internal("a FHIR job without its FHIR part".into()))?;
    if profile.action(Class::PatientKey) != Action::Pseudonym {
        return Err(Failure::Request(format!(
            "profile {} does not let patient keys out as pseudonyms: FHIR resources need a subject",
            profile.name
        )));
    }
    let mut outs = Outputs {
        store: &exporter.store,
        id,
        files: BTreeMap::new(),
    };
    // The patients of the resources exported: they get a Patient resource.
    let mut seen: HashSet<String> = HashSet::new();
    let steps = spec.tables.len() + 1;
    for (n, table) in spec.tables.iter().enumerate() {
        let _ = state
            .control
            .export_progress(id, &format!("{} of {steps}: {table}", n + 1))
            .await;
        let Some(mapping) = state.fhir.get(table).cloned() else {
            continue;
        };
        let Some((plan, rows)) =
            resource_plan(exporter, state, table, spec, profile, &mapping).await?
        else {
            continue;
        };
        let mut rows = rows;
        let cohort = Cohort::new(spec, table, members.clone(), shifted(profile, ctx));
        rows.project(
            plan.input_columns()
                .into_iter()
                .chain(cohort.columns().map(str::to_string)),
        );
        let plan = Arc::new(plan);
        let shape = Shape {
            plan: plan.clone(),
            ctx: ctx.clone(),
            fhir: state.fhir.clone(),
            table: table.clone(),
            domain: format!("{table}:record"),
            file: format!("{}.ndjson", mapping.resource),
            names: Arc::default(),
        };
        let (mut made, workers) = fan_out(rows, plan, cohort, profile.years_only(), move |b, s| {
            shape.resources(b, s)
        });
        while let Some(batch) = made.recv().await {
            watch.check().await?;
            let (bytes, lines, patients) = batch?;
            outs.lines(&mapping.resource, &bytes, lines).await?;
            seen.extend(patients);
        }
        for w in workers {
            scanner.merge(w.await.map_err(|e| e.to_string())?);
        }
    }
    if fhir.types.iter().any(|t| t == "Patient") {
        let _ = state
            .control
            .export_progress(id, &format!("{steps} of {steps}: Patient"))
            .await;
        if spec.tables.is_empty() {
            // Patients only: those with archived records the profile may export.
            seen = archived_patients(run, watch).await?;
        }
        patients(run, &seen, scanner, &mut outs, watch).await?;
    }
    outs.finish().await
}

/// The job's NDJSON files, one per resource type, each started at its first line (a type
/// with no resource has no file).
struct Outputs<'a> {
    store: &'a Arc<dyn object_store::ObjectStore>,
    id: &'a str,
    files: BTreeMap<String, NdjsonOut>,
}

impl Outputs<'_> {
    fn file(&mut self, kind: &str) -> &mut NdjsonOut {
        let (store, id) = (self.store, self.id);
        self.files
            .entry(kind.to_string())
            .or_insert_with(|| NdjsonOut::new(store, &format!("{id}/{kind}.ndjson")))
    }

    async fn lines(&mut self, kind: &str, bytes: &[u8], n: u64) -> Result<(), Failure> {
        if n == 0 {
            return Ok(());
        }
        Ok(self.file(kind).lines(bytes, n).await?)
    }

    async fn line(&mut self, kind: &str, resource: &Value) -> Result<(), Failure> {
        let (store, id) = (self.store, self.id);
        let out = self
            .files
            .entry(kind.to_string())
            .or_insert_with(|| NdjsonOut::new(store, &format!("{id}/{kind}.ndjson")));
        Ok(out.line(resource).await?)
    }

    /// Ends every file; returns their entries.
    async fn finish(self) -> Result<Vec<Value>, Failure> {
        let mut files = Vec::new();
        for (kind, out) in self.files {
            let count = out.lines;
            let written = out.finish().await?;
            files.push(json!({
                "type": kind,
                "file": format!("{kind}.ndjson"),
                "count": count,
                "bytes": written.bytes,
                "sha256": written.sha256,
            }));
        }
        Ok(files)
    }
}

/// The plan of a table's resources: only the columns its `[api.fhir]` mapping uses that the
/// profile lets out (no pseudonym is computed that no resource carries).
async fn resource_plan(
    exporter: &Exporter,
    state: &AppState,
    table: &str,
    spec: &JobSpec,
    profile: &Profile,
    mapping: &crate::config::FhirTable,
) -> Result<Option<(TablePlan, super::cohort::TableRows)>, Failure> {
    let Some((full, rows)) = exporter
        .plan(&state.archive.view(), table, spec, profile)
        .await?
    else {
        return Ok(None);
    };
    let used: Vec<&String> = [
        &mapping.code,
        &mapping.display,
        &mapping.status,
        &mapping.value,
        &mapping.unit,
        &mapping.text,
    ]
    .into_iter()
    .flatten()
    .collect();
    let wanted: Vec<String> = full
        .columns
        .iter()
        .filter(|c| used.contains(&&c.source))
        .map(|c| c.source.clone())
        .collect();
    let classes = exporter.classification().table(table);
    let plan = TablePlan::new(table, full.input_schema(), &classes, profile, Some(&wanted))
        .map_err(Failure::Internal)?;
    Ok(Some((plan, rows)))
}

/// What a worker needs to turn a table's rows into resources.
struct Shape {
    plan: Arc<TablePlan>,
    ctx: ExportContext,
    fhir: Arc<BTreeMap<String, crate::config::FhirTable>>,
    table: String,
    /// The pseudonym domain of resource ids.
    domain: String,
    file: String,
    /// Identical records met so far (shared by the table's workers).
    names: Arc<std::sync::Mutex<RecordNames>>,
}

/// Names identical rows of a table without a primary key apart, as the history does: they share
/// their key (a digest of their values) but are distinct records, so each needs a resource id
/// of its own. The first keeps the key's pseudonym, the next get `key#2`, `key#3`, ... Holds 8
/// bytes per keyless record (the key's first 64 bits; a clash only names a record `#2` that
/// needed no suffix, and the ids stay distinct); keyed records (`col=value`) are not held.
#[derive(Default)]
struct RecordNames {
    first: HashSet<u64>,
    more: HashMap<u64, u32>,
}

impl RecordNames {
    /// The name of the next record with `key`.
    fn name<'k>(&mut self, key: &'k str) -> Cow<'k, str> {
        if key.contains('=') {
            return key.into();
        }
        let short = key
            .get(..16)
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or_else(|| {
                use std::hash::{BuildHasher, BuildHasherDefault};
                BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                    .hash_one(key)
            });
        if self.first.insert(short) {
            return key.into();
        }
        let n = self.more.entry(short).or_insert(1);
        *n += 1;
        format!("{key}#{n}").into()
    }
}

impl Shape {
    /// A batch of archived rows as NDJSON lines, their values scanned: the bytes, how many
    /// lines, and the patients they refer to.
    fn resources(
        &self,
        batch: &RecordBatch,
        scanner: &mut Scanner,
    ) -> Result<(Vec<u8>, u64, Vec<String>), String> {
        let plan = &self.plan;
        let Some(mapping) = self.fhir.get(&self.table) else {
            return Ok((Vec::new(), 0, Vec::new()));
        };
        let exported = plan.apply(batch, &self.ctx).map_err(|e| e.to_string())?;
        let (patients, keys) = plan.row_keys(batch);
        let archived = ArchivedBatch::new(batch, &[]);
        let strata_keys: Vec<&str> = archived.keys().ok_or("no record key column")?.collect();
        let index = |source: &str| plan.columns.iter().position(|c| c.source == source);
        let (subjects, dates) = (index(PATIENT_COLUMN), index(RECORD_DATE_COLUMN));
        let mut bytes = Vec::with_capacity(exported.num_rows() * 400);
        let mut lines = 0;
        let mut seen = Vec::new();
        // The records' names first, the lock held only for that: the workers shape their
        // batches side by side.
        let names: Vec<Cow<str>> = {
            let mut names = self.names.lock().map_err(|_| "a worker failed")?;
            (0..exported.num_rows())
                .map(|row| names.name(strata_keys[row]))
                .collect()
        };
        for (row, name) in names.iter().enumerate() {
            let fields = RowFields {
                plan,
                batch: &exported,
                row,
            };
            let Some(subject) = subjects.and_then(|i| fields.at(i)) else {
                continue;
            };
            let date = dates.and_then(|i| fields.at(i));
            let identity = Identity {
                id: self.ctx.key.pseudonym(&self.domain, name),
                identifier: None,
                patient: subject.into_owned(),
            };
            let Some(resource) = resource_of(mapping, &fields, &identity, date.as_deref(), &[])
            else {
                continue;
            };
            serde_json::to_writer(&mut bytes, &resource).map_err(|e| e.to_string())?;
            bytes.push(b'\n');
            lines += 1;
            seen.push(text(&cell(patients.as_ref(), row).to_json()).unwrap_or_default());
        }
        // The resources carry the values of these columns and Strata's own pseudonyms and
        // constants (types, code systems): scanning the columns scans every value that came
        // from a record, once per value rather than once per element.
        let columns = plan.scan_columns();
        scanner.key_copies(&self.file, &exported, &columns, &patients, &keys);
        scanner.batch(&self.file, &exported, &columns);
        Ok((bytes, lines, seen))
    }
}

/// A de-identified row's values, read in place by source column.
struct RowFields<'a> {
    plan: &'a TablePlan,
    batch: &'a RecordBatch,
    row: usize,
}

impl RowFields<'_> {
    /// The text of the row's value in output column `i` (dates as YYYY-MM-DD, years as digits).
    fn at(&self, i: usize) -> Option<Cow<'_, str>> {
        match cell(self.batch.column(i).as_ref(), self.row) {
            Cell::Null => None,
            Cell::Text(t) => Some(Cow::Borrowed(t)),
            other => text(&other.to_json()).map(Cow::Owned),
        }
    }
}

impl Fields for RowFields<'_> {
    fn text(&self, column: &str) -> Option<Cow<'_, str>> {
        let i = self.plan.columns.iter().position(|c| c.source == column)?;
        self.at(i)
    }

    fn number(&self, column: &str) -> Option<f64> {
        let i = self.plan.columns.iter().position(|c| c.source == column)?;
        cell(self.batch.column(i).as_ref(), self.row)
            .as_f64()
            .or_else(|| self.at(i)?.parse().ok())
    }
}

/// The patients with an archived record in a table the job may export (of its group, if any).
async fn archived_patients(
    run: &Run<'_>,
    watch: &mut Watch<'_>,
) -> Result<HashSet<String>, Failure> {
    let Run {
        exporter,
        state,
        spec,
        profile,
        ref members,
        ..
    } = *run;
    let mut found = HashSet::new();
    for (table, mapping) in state.fhir.iter() {
        if mapping.resource == "DocumentReference"
            || (!profile.tables.is_empty() && !profile.tables.contains(table))
        {
            continue;
        }
        let Some((plan, mut rows)) = exporter
            .plan(&state.archive.view(), table, spec, profile)
            .await?
        else {
            continue;
        };
        rows.project(std::iter::empty());
        let cohort = Cohort::new(spec, table, members.clone(), None);
        while let Some(batch) = rows.next(&plan, &cohort).await? {
            watch.check().await?;
            let archived = ArchivedBatch::new(&batch, &[]);
            found.extend(
                archived
                    .patients()
                    .ok_or("no patient column")?
                    .filter(|k| !k.is_empty())
                    .map(str::to_string),
            );
        }
    }
    Ok(found)
}

/// `Patient` resources of `scope` (patient keys), from the patients table's archived rows and
/// its operational rows (each patient once).
async fn patients(
    run: &Run<'_>,
    scope: &HashSet<String>,
    scanner: &mut Scanner,
    outs: &mut Outputs<'_>,
    watch: &mut Watch<'_>,
) -> Result<(), Failure> {
    let Run {
        exporter,
        state,
        spec,
        profile,
        ctx,
        ..
    } = *run;
    let Some(table) = exporter.classification().patients.clone() else {
        return Ok(());
    };
    let classes = exporter.classification().table(&table.table);
    let mut done: HashSet<String> = HashSet::new();
    let mut emit = |plan: &TablePlan,
                    source: &RecordBatch,
                    scanner: &mut Scanner|
     -> Result<Vec<Value>, Failure> {
        let exported = plan.apply(source, ctx).map_err(|e| e.to_string())?;
        let archived = ArchivedBatch::new(source, &[]);
        let keys = archived.patients().ok_or("no patient column")?;
        let mut resources = Vec::new();
        for (row, key) in keys.enumerate().take(exported.num_rows()) {
            if !scope.contains(key) || !done.insert(key.to_string()) {
                continue;
            }
            let resource = patient_resource(plan, &exported, row);
            scanner.resource("Patient.ndjson", &resource, Some((key, &[])));
            resources.push(resource);
        }
        Ok(resources)
    };
    // The archived rows.
    let patient_spec = JobSpec {
        columns: BTreeMap::new(),
        codes: BTreeMap::new(),
        from: None,
        to: None,
        ..spec.clone()
    };
    if let Some((plan, mut rows)) = exporter
        .plan(&state.archive.view(), &table.table, &patient_spec, profile)
        .await?
    {
        let cohort = Cohort::default();
        rows.project(plan.input_columns());
        while let Some(batch) = rows.next(&plan, &cohort).await? {
            watch.check().await?;
            for r in emit(&plan, &batch, scanner)? {
                outs.line("Patient", &r).await?;
            }
        }
    }
    // The operational rows: only the columns a Patient resource can carry.
    if let Some(url) = &state.operational {
        let columns: Vec<(String, bool)> = classes
            .columns
            .iter()
            .filter(|(_, c)| {
                matches!(
                    c.class,
                    Class::BirthDate
                        | Class::DeathDate
                        | Class::Sex
                        | Class::Zip
                        | Class::State
                        | Class::City
                ) && profile.action(c.class) != Action::Drop
            })
            .map(|(name, c)| (name.clone(), c.class.is_date()))
            .collect();
        let (schema, mut batches) =
            operational_patients(url.clone(), table.table.clone(), table.key.clone(), columns);
        let plan = TablePlan::new(&table.table, schema, &classes, profile, None)
            .map_err(Failure::Internal)?;
        while let Some(batch) = batches.recv().await {
            watch.check().await?;
            for r in emit(&plan, &batch?, scanner)? {
                outs.line("Patient", &r).await?;
            }
        }
    }
    Ok(())
}

/// FHIR's administrative gender of a recorded sex.
fn gender(v: &str) -> &'static str {
    match v.trim().to_ascii_lowercase().as_str() {
        "f" | "female" | "w" | "woman" => "female",
        "m" | "male" | "man" => "male",
        "o" | "other" | "x" | "nonbinary" | "non-binary" => "other",
        _ => "unknown",
    }
}

/// One patient's de-identified row as a `Patient`: pseudonymous id, and only what the profile
/// let out of the classes a Patient carries.
fn patient_resource(plan: &TablePlan, exported: &RecordBatch, row: usize) -> Value {
    let mut r = Map::new();
    r.insert("resourceType".into(), json!("Patient"));
    let mut address = Map::new();
    for (i, c) in plan.columns.iter().enumerate() {
        let Some(v) = text(&cell(exported.column(i).as_ref(), row).to_json()) else {
            continue;
        };
        match c.class {
            Class::PatientKey if c.source == PATIENT_COLUMN => {
                r.insert("id".into(), json!(v));
            }
            Class::Sex => {
                r.insert("gender".into(), json!(gender(&v)));
            }
            Class::BirthDate if v == "90+" => {
                r.insert(
                    "extension".into(),
                    json!([{ "url": AGE_90_EXTENSION, "valueBoolean": true }]),
                );
            }
            // A day at most: a time would need a zone, and says more than a day of birth.
            Class::BirthDate => {
                r.insert("birthDate".into(), json!(v.get(..10).unwrap_or(&v)));
            }
            Class::DeathDate => {
                r.insert("deceasedDateTime".into(), json!(v.get(..10).unwrap_or(&v)));
            }
            Class::Zip => {
                address.insert("postalCode".into(), json!(v));
            }
            Class::State => {
                address.insert("state".into(), json!(v));
            }
            Class::City => {
                address.insert("city".into(), json!(v));
            }
            _ => {}
        }
    }
    if !address.is_empty() {
        r.insert("address".into(), json!([address]));
    }
    Value::Object(r)
}
