//! What an export job exports: a researcher's `POST /v1/exports` request, and the job it
//! becomes (stored in the control database, so a restarted server can run it again).

use crate::error::ApiError;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Body of `POST /v1/exports`.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// The export profile: `safe_harbor`, `limited_data_set` or one of the site's.
    pub profile: String,
    /// The tables to export.
    pub tables: Vec<String>,
    /// Per table, the columns to export (archived names; by default, every column the profile
    /// lets out).
    #[serde(default)]
    pub columns: BTreeMap<String, Vec<String>>,
    /// Only records dated on or after this day (YYYY-MM-DD).
    #[serde(default)]
    pub from: Option<String>,
    /// Only records dated on or before this day.
    #[serde(default)]
    pub to: Option<String>,
    /// Per table, per column, the codes a row must hold one of.
    #[serde(default)]
    pub codes: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// The study the export is for: its pseudonyms are the study's own, so exports of two
    /// studies cannot be linked. By default, the site's key.
    #[serde(default)]
    pub study: Option<String>,
    /// The data use agreement the export is made under (required by `limited_data_set`;
    /// recorded in the audit log and the manifest).
    #[serde(default)]
    pub data_use_agreement: Option<String>,
    /// A cohort (`/v1/groups`): only its patients' records.
    #[serde(default)]
    pub group: Option<String>,
}

/// The output of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One Parquet file per table, with `manifest.json`.
    Parquet,
    /// FHIR R4 NDJSON, one file per resource type (FHIR Bulk Data).
    Fhir,
}

impl Format {
    /// Its name in the control database.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Fhir => "fhir",
        }
    }
}

/// A `system|code` token of a `_typeFilter` (`code=http://loinc.org|2345-7`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeToken {
    /// The code system, when the token names one.
    pub system: Option<String>,
    /// The code.
    pub code: String,
}

/// What a FHIR Bulk Data job adds to a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FhirSpec {
    /// The resource types to export (`_type`; empty: every type the server exports).
    pub types: Vec<String>,
    /// Only resources of records archived at or after this instant (`_since`, RFC 3339).
    pub since: Option<String>,
    /// Per resource type, the codes its resources must hold one of (`_typeFilter`).
    pub code_filters: BTreeMap<String, Vec<CodeToken>>,
    /// The kick-off request's URL (the manifest's `request`).
    pub request: String,
    /// When the kick-off was accepted (the manifest's `transactionTime`).
    pub transaction_time: String,
    /// Whether the export is of patients (`Patient/$export`, `Group/{id}/$export`) rather than
    /// the whole system.
    pub patient_level: bool,
}

/// An export job as stored: everything needed to run it again after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Parquet or FHIR.
    pub format: Format,
    /// The profile's name.
    pub profile: String,
    /// The study whose pseudonym key applies.
    pub study: Option<String>,
    /// The data use agreement it is made under.
    pub data_use_agreement: Option<String>,
    /// The tables.
    pub tables: Vec<String>,
    /// Per table, the columns asked for.
    pub columns: BTreeMap<String, Vec<String>>,
    /// Records dated on or after.
    pub from: Option<NaiveDate>,
    /// Records dated on or before.
    pub to: Option<NaiveDate>,
    /// Per table, per column, codes.
    pub codes: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// A cohort.
    pub group: Option<String>,
    /// What a FHIR job adds.
    #[serde(default)]
    pub fhir: Option<FhirSpec>,
    /// The requester's roles (for the audit entries the job writes).
    pub roles: String,
}

fn day(text: &Option<String>, name: &str) -> Result<Option<NaiveDate>, ApiError> {
    text.as_deref()
        .map(|t| {
            NaiveDate::parse_from_str(t, "%Y-%m-%d")
                .map_err(|_| ApiError::BadRequest(format!("{name} must be a date, YYYY-MM-DD")))
        })
        .transpose()
}

/// A study name or agreement reference: 1 to 100 letters, digits and `-_.:/`.
pub(crate) fn reference(text: &str, what: &str) -> Result<String, ApiError> {
    let t = text.trim();
    let ok = !t.is_empty()
        && t.chars().count() <= 100
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:/ ".contains(c));
    if ok {
        Ok(t.to_string())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what}: 1 to 100 letters, digits, spaces and - _ . : /"
        )))
    }
}

impl ExportRequest {
    /// The job this request asks for (dates parsed; nothing checked against the archive yet).
    pub fn job(&self, roles: String) -> Result<JobSpec, ApiError> {
        Ok(JobSpec {
            format: Format::Parquet,
            profile: self.profile.clone(),
            study: self
                .study
                .as_deref()
                .map(|s| reference(s, "study"))
                .transpose()?,
            data_use_agreement: self
                .data_use_agreement
                .as_deref()
                .map(|s| reference(s, "data_use_agreement"))
                .transpose()?,
            tables: self.tables.clone(),
            columns: self.columns.clone(),
            from: day(&self.from, "from")?,
            to: day(&self.to, "to")?,
            codes: self.codes.clone(),
            group: self.group.clone(),
            fhir: None,
            roles,
        })
    }
}
