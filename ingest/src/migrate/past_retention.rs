//! Retention inside the archive, the first step: finding the archived records past retention
//! under the policy in force, at a given `as_of`, and filing them as a destruction list for a
//! records manager's approval (nothing is destroyed here: see [`super::retention`]).
//!
//! Each current archived copy is decided by the policy as a migration decides a row: its
//! record date (as archived), its patient's facts, the columns the policy reads (by their
//! archived names). After go-live the patient facts come from where the records are now:
//! last activity is the latest record date of the patient in the archive (every copy) and in
//! the operational database (read through the configured tables, by their names there), birth
//! and death dates from the patients table in the operational database, else in the archive.
//! Legal holds in force keep records off the list. A record already on a pending or approved
//! list is not listed again. A column the policy reads that the archived files do not hold
//! under its name stops the pass for that table's sake (nothing is guessed).

use super::retention::{ListedTable, RetentionList};
use crate::config::MigrationConfig;
use crate::db::Db;
use crate::error::{IngestError, Result};
use crate::facts::PatientTable;
use crate::layout::TableLayout;
use crate::operational::OperationalTables;
use chrono::NaiveDate;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use strata_archive::{ArchiveReader, ArchivedBatch};
use strata_control::{Control, RequestStatus};
use strata_cutoff_policies::{PatientFacts, RecordFacts, Tier};

/// What [`file_retention_list`] filed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiledList {
    /// The pending request's id.
    pub request_id: String,
    /// Records listed, per table.
    pub tables: BTreeMap<String, u64>,
}

/// Finds the archived records past retention at `as_of` and files them as a pending `retain`
/// list requested by `requested_by`: see the module's docs. None when there are none.
pub async fn file_retention_list(
    config: &MigrationConfig,
    control: &Control,
    as_of: NaiveDate,
    requested_by: &str,
) -> Result<Option<FiledList>> {
    let policy_config = super::read_policy(config)?;
    let holds = super::holds_in_force(control).await?;
    let (store, keys) = config
        .archive
        .open(&config.base_dir)
        .map_err(IngestError::Archive)?;
    let reader = ArchiveReader::open(store, keys).await?;
    // The configured tables the archive holds, with their columns as archived.
    let mut archived: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for table in config.tables.keys() {
        let Some((_, _, newest)) = reader.ranked_files(table).into_iter().last() else {
            continue;
        };
        let schema = reader.file_schema(newest).await?;
        let blob_columns = reader.catalog().blob_columns(table);
        let empty = arrow::array::RecordBatch::new_empty(schema);
        let batch = ArchivedBatch::new(&empty, &blob_columns);
        let mut columns: Vec<String> = batch.data_columns().map(str::to_string).collect();
        columns.extend(blob_columns);
        archived.insert(table.clone(), columns);
    }
    // The operational database, read through its tables as it holds them (the policy checks
    // its rules against every table, archived or not).
    let operational = Db::connect(&config.resolve_url(&config.operational.url)?, true).await?;
    let tables = OperationalTables::read(config, &operational, &policy_config).await?;
    let mut known = tables.known.clone();
    for (t, cs) in &archived {
        known
            .entry(t.clone())
            .or_default()
            .extend(cs.iter().cloned());
    }
    let policy = super::policy_at(&policy_config, &known, as_of, &holds)?;
    let layouts = tables.layouts(&policy_config, &holds, operational.kind());
    let patients = tables.patients(&policy_config, &layouts);
    let facts = facts_after_go_live(
        &policy_config,
        &policy,
        &reader,
        &operational,
        &layouts,
        patients,
    )
    .await?;
    operational.close().await;

    // Records already on a list that is pending or approved.
    let mut listed_already: HashMap<String, HashSet<String>> = HashMap::new();
    for r in control.destruction_requests().await? {
        if r.kind != "retain"
            || !matches!(r.status, RequestStatus::Pending | RequestStatus::Approved)
        {
            continue;
        }
        if let Ok(list) = serde_json::from_value::<RetentionList>(r.summary) {
            for (t, l) in list.tables {
                listed_already.entry(t).or_default().extend(l.keys);
            }
        }
    }
    let mut list = RetentionList {
        as_of: as_of.to_string(),
        rules: Vec::new(),
        tables: BTreeMap::new(),
    };
    for (table, columns) in &archived {
        let needed = policy_config.columns_needed(table, &holds);
        if let Some(missing) = needed.iter().find(|c| !columns.contains(c)) {
            return Err(IngestError::Run(format!(
                "table {table}: the policy reads column {missing}, which its archived files do not hold under that name: retention cannot decide its records, and nothing is listed"
            )));
        }
        let successors = reader.successors(table).await?;
        let blob_columns = reader.catalog().blob_columns(table);
        let mut projection = vec![
            strata_archive::PATIENT_COLUMN.to_string(),
            strata_archive::RECORD_DATE_COLUMN.to_string(),
            strata_archive::KEY_COLUMN.to_string(),
        ];
        projection.extend(needed.iter().cloned());
        let already = listed_already.get(table);
        let mut keys = Vec::new();
        for (rank, _, entry) in reader.ranked_files(table) {
            let mut batches = reader.file_batches(entry, Some(&projection)).await?;
            while let Some(batch) = batches.next().await {
                let batch = batch?;
                let b = ArchivedBatch::new(&batch, &blob_columns);
                for row in 0..b.num_rows() {
                    let Some(key) = b.key(row) else { continue };
                    // Only current copies: one the source deleted while a hold kept it is
                    // left to the hold's release and a decision of its own.
                    if successors.fate(rank, key) != strata_archive::Fate::Current
                        || already.is_some_and(|a| a.contains(key))
                    {
                        continue;
                    }
                    let patient = b.patient(row).filter(|p| !p.is_empty());
                    let values: Vec<Option<String>> = needed
                        .iter()
                        .map(|c| {
                            b.value(c, row)
                                .and_then(|v| v.to_text().map(|t| t.into_owned()))
                        })
                        .collect();
                    let record = RecordFacts {
                        record_date: policy.date_fact(b.record_date(row)),
                        patient,
                        patient_facts: patient
                            .and_then(|p| facts.get(p).cloned())
                            .unwrap_or_default(),
                        columns: &values,
                    };
                    if policy.decide(table, &record, &needed).tier == Tier::Purge {
                        keys.push(key.to_string());
                    }
                }
            }
        }
        if !keys.is_empty() {
            keys.sort();
            list.rules
                .push(format!("{table}: past retention at {as_of}"));
            list.tables.insert(
                table.clone(),
                ListedTable {
                    rows: keys.len() as u64,
                    keys,
                },
            );
        }
    }
    if list.tables.is_empty() {
        return Ok(None);
    }
    let summary = serde_json::to_value(&list).expect("a list serializes");
    let request_id = control
        .request_destruction(
            "retain",
            requested_by,
            (policy.version(), policy.hash()),
            &summary,
        )
        .await?;
    Ok(Some(FiledList {
        request_id,
        tables: list
            .tables
            .iter()
            .map(|(t, l)| (t.clone(), l.rows))
            .collect(),
    }))
}

/// Every patient's facts after go-live: last activity over the operational database (read
/// through `layouts`) and every archived copy; birth and death dates from the operational
/// patients table (`patients`), else the archived one. See the module's docs.
pub(super) async fn facts_after_go_live(
    policy_config: &strata_cutoff_policies::PolicyConfig,
    policy: &strata_cutoff_policies::Policy,
    reader: &ArchiveReader,
    operational: &Db,
    layouts: &[TableLayout],
    patients: Option<PatientTable<'_>>,
) -> Result<HashMap<String, PatientFacts>> {
    let as_of = policy.as_of().expect("as_of is set");
    let mut facts =
        crate::facts::patient_facts(operational, policy, layouts, patients, None).await?;
    // The archive: every copy's record date; birth and death from the archived patients table.
    let dates = [
        strata_archive::PATIENT_COLUMN.to_string(),
        strata_archive::RECORD_DATE_COLUMN.to_string(),
    ];
    for table in reader.catalog().tables.keys() {
        let patients_table = policy_config
            .patients
            .as_ref()
            .filter(|p| &p.table == table);
        let mut projection = dates.to_vec();
        if let Some(p) = patients_table {
            projection.extend(p.birth_date.iter().cloned());
            projection.extend(p.deceased_date.iter().cloned());
        }
        for (_, _, entry) in reader.ranked_files(table) {
            let mut batches = reader.file_batches(entry, Some(&projection)).await?;
            while let Some(batch) = batches.next().await {
                let batch = batch?;
                let b = ArchivedBatch::new(&batch, &[]);
                for row in 0..b.num_rows() {
                    let Some(patient) = b.patient(row).filter(|p| !p.is_empty()) else {
                        continue;
                    };
                    let fact = facts.entry(patient.to_string()).or_default();
                    if let Some(d) = b.record_date(row).filter(|d| *d <= as_of) {
                        if fact.last_activity.is_none_or(|l| d > l) {
                            fact.last_activity = Some(d);
                        }
                    }
                    if let Some(p) = patients_table {
                        let date = |c: &Option<String>| {
                            c.as_ref()
                                .and_then(|c| b.value(c, row))
                                .and_then(|v| v.to_text().map(|t| t.into_owned()))
                                .and_then(|t| crate::value::parse_date(&t))
                        };
                        if fact.birth_date.is_none() {
                            fact.birth_date = date(&p.birth_date);
                        }
                        if fact.deceased_date.is_none() {
                            fact.deceased_date = date(&p.deceased_date);
                        }
                    }
                }
            }
        }
    }
    Ok(facts)
}
