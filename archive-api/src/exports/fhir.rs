//! A FHIR Bulk Data job's output: one NDJSON file per resource type, de-identified by the
//! job's profile exactly as Parquet exports are (the same plan of each table), then mapped by
//! `[api.fhir]`: resources carry pseudonymous ids and subjects, no identifiers, and dates as
//! the profile lets them out (a year is a valid FHIR date). `Patient` resources come from the
//! patients table wherever it lives (archived rows, and the operational database): the
//! classes the profile lets out (year of birth, sex, ZIP3, state...), never a name.

use super::cohort::Cohort;
use super::output::NdjsonOut;
use super::patients::operational_patients;
use super::{shifted, Exporter, Failure, JobSpec, Watch};
use crate::fhir::{resource_as, Identity};
use crate::history::{cell, HistoryRecord};
use crate::routes::AppState;
use arrow::array::{Array, AsArray, RecordBatch};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use strata_archive::{KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN};
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

/// A source row's keys as text: the patient key and the record's keys, for the scanner.
fn row_keys(
    patients: &dyn Array,
    keys: &[arrow::array::ArrayRef],
    row: usize,
) -> (String, Vec<String>) {
    let patient = text(&cell(patients, row)).unwrap_or_default();
    let keys = keys
        .iter()
        .filter_map(|k| text(&cell(k.as_ref(), row)))
        .collect();
    (patient, keys)
}

/// Every resource type of a FHIR job. Returns the files' entries.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn files(
    exporter: &Exporter,
    state: &AppState,
    id: &str,
    spec: &JobSpec,
    profile: &Profile,
    ctx: &ExportContext,
    members: Option<Arc<HashSet<String>>>,
    scanner: &mut Scanner,
    watch: &mut Watch<'_>,
) -> Result<Vec<Value>, Failure> {
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
        let Some(mapping) = state.fhir.get(table) else {
            continue;
        };
        let Some((plan, mut rows)) = exporter.plan(&state.archive, table, spec, profile).await?
        else {
            continue;
        };
        let cohort = Cohort::new(spec, table, members.clone(), shifted(profile, ctx));
        rows.project(
            plan.input_columns()
                .into_iter()
                .chain(cohort.columns().map(str::to_string)),
        );
        let file = format!("{}.ndjson", mapping.resource);
        let domain = format!("{table}:record");
        while let Some(batch) = rows.next(&plan, &cohort).await? {
            watch.check().await?;
            let exported = plan.apply(&batch, ctx).map_err(|e| e.to_string())?;
            let (patients, keys) = plan.row_keys(&batch);
            let strata_keys = batch
                .column_by_name(KEY_COLUMN)
                .ok_or("no record key column")?
                .as_string::<i32>();
            for row in 0..exported.num_rows() {
                let mut data = Map::new();
                let (mut date, mut subject) = (None, None);
                for (i, c) in plan.columns.iter().enumerate() {
                    let v = cell(exported.column(i).as_ref(), row);
                    match c.source.as_str() {
                        PATIENT_COLUMN => subject = text(&v),
                        RECORD_DATE_COLUMN => date = text(&v),
                        _ => {
                            data.insert(c.source.clone(), v);
                        }
                    }
                }
                let Some(subject) = subject else { continue };
                let record = HistoryRecord {
                    table: table.clone(),
                    key: String::new(),
                    record_date: date,
                    data,
                    documents: Vec::new(),
                };
                let identity = Identity {
                    id: ctx.key.pseudonym(&domain, strata_keys.value(row)),
                    identifier: None,
                    patient: subject,
                };
                let Some(resource) = resource_as(&record, &identity, &state.fhir) else {
                    continue;
                };
                let (patient, record_keys) = row_keys(patients.as_ref(), &keys, row);
                scanner.resource(&file, &resource, Some((&patient, &record_keys)));
                outs.line(&mapping.resource, &resource).await?;
                seen.insert(patient);
            }
        }
    }
    if fhir.types.iter().any(|t| t == "Patient") {
        let _ = state
            .control
            .export_progress(id, &format!("{steps} of {steps}: Patient"))
            .await;
        if spec.tables.is_empty() {
            // Patients only: those with archived records the profile may export.
            seen =
                archived_patients(exporter, state, spec, profile, members.as_ref(), watch).await?;
        }
        patients(
            exporter, state, spec, profile, ctx, &seen, scanner, &mut outs, watch,
        )
        .await?;
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

/// The patients with an archived record in a table the job may export (of its group, if any).
async fn archived_patients(
    exporter: &Exporter,
    state: &AppState,
    spec: &JobSpec,
    profile: &Profile,
    members: Option<&Arc<HashSet<String>>>,
    watch: &mut Watch<'_>,
) -> Result<HashSet<String>, Failure> {
    let mut found = HashSet::new();
    for (table, mapping) in state.fhir.iter() {
        if mapping.resource == "DocumentReference"
            || (!profile.tables.is_empty() && !profile.tables.contains(table))
        {
            continue;
        }
        let Some((plan, mut rows)) = exporter.plan(&state.archive, table, spec, profile).await?
        else {
            continue;
        };
        rows.project(std::iter::empty());
        let cohort = Cohort::new(spec, table, members.cloned(), None);
        while let Some(batch) = rows.next(&plan, &cohort).await? {
            watch.check().await?;
            let keys = batch
                .column_by_name(PATIENT_COLUMN)
                .ok_or("no patient column")?
                .as_string::<i32>();
            found.extend(
                keys.iter()
                    .flatten()
                    .filter(|k| !k.is_empty())
                    .map(str::to_string),
            );
        }
    }
    Ok(found)
}

/// `Patient` resources of `scope` (patient keys), from the patients table's archived rows and
/// its operational rows (each patient once).
#[allow(clippy::too_many_arguments)]
async fn patients(
    exporter: &Exporter,
    state: &AppState,
    spec: &JobSpec,
    profile: &Profile,
    ctx: &ExportContext,
    scope: &HashSet<String>,
    scanner: &mut Scanner,
    outs: &mut Outputs<'_>,
    watch: &mut Watch<'_>,
) -> Result<(), Failure> {
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
        let keys = source
            .column_by_name(PATIENT_COLUMN)
            .ok_or("no patient column")?
            .as_string::<i32>();
        let mut resources = Vec::new();
        for row in 0..exported.num_rows() {
            let key = keys.value(row);
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
        .plan(&state.archive, &table.table, &patient_spec, profile)
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
        let Some(v) = text(&cell(exported.column(i).as_ref(), row)) else {
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
