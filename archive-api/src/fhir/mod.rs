//! A patient's archived history as a FHIR R4 `searchset` Bundle.
//!
//! Each table named in `[api.fhir.<table>]` becomes one resource type; its record date becomes
//! the resource's date element, the configured columns its code, status and value, and a
//! document link a `DocumentReference` attachment that points at the document endpoint.
//! Resource ids are derived from table and key (FHIR ids allow neither `_` nor `=`); the key
//! itself is kept as an identifier (`urn:strata:<table>`), so a resource can be traced back.
//! Statuses are the source's value when it is one of the resource's codes, else the resource's
//! "unknown" (a required element must not be guessed).

use crate::config::FhirTable;
use crate::history::HistoryRecord;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::BTreeMap;

mod resource;

pub use resource::RESOURCE_TYPES;
pub(crate) use resource::{resource_of, Identity};

/// Checks the mapping: known resource types and time zones only.
pub fn check(mapping: &BTreeMap<String, FhirTable>) -> Result<(), String> {
    for (table, t) in mapping {
        if !RESOURCE_TYPES.contains(&t.resource.as_str()) {
            return Err(format!(
                "[api.fhir.{table}] resource: {:?} is not one of {}",
                t.resource,
                RESOURCE_TYPES.join(", ")
            ));
        }
        if let Some(tz) = &t.timezone {
            if resource::offset(tz).is_none() {
                return Err(format!(
                    "[api.fhir.{table}] timezone: {tz:?} is not UTC or an offset such as -05:00"
                ));
            }
        }
    }
    Ok(())
}

/// The FHIR id of a record: 32 hex digits of SHA-256 over table and key.
fn resource_id(table: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(table.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// The values a resource is made of, by source column: a history record's, or an exported
/// row's (read in place, without building JSON first).
pub(crate) trait Fields {
    /// A column's value as text (numbers as written); None when absent or null.
    fn text(&self, column: &str) -> Option<Cow<'_, str>>;
    /// A column's value as a number (text that reads as one too).
    fn number(&self, column: &str) -> Option<f64>;
}

impl Fields for Map<String, Value> {
    fn text(&self, column: &str) -> Option<Cow<'_, str>> {
        match self.get(column)? {
            Value::Null => None,
            Value::String(s) => Some(Cow::Borrowed(s)),
            other => Some(Cow::Owned(other.to_string())),
        }
    }

    fn number(&self, column: &str) -> Option<f64> {
        match self.get(column)? {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }
}

/// One record as a resource (None for a table without a mapping).
fn resource(
    record: &HistoryRecord,
    patient: &str,
    mapping: &BTreeMap<String, FhirTable>,
) -> Option<Value> {
    let t = mapping.get(&record.table)?;
    let identity = Identity {
        id: resource_id(&record.table, &record.key),
        identifier: Some((format!("urn:strata:{}", record.table), record.key.clone())),
        patient: patient.to_string(),
    };
    let r = resource_of(
        t,
        &record.data,
        &identity,
        record.record_date.as_deref(),
        &record.documents,
    )?;
    Some(serde_json::to_value(r).expect("a resource serializes"))
}

/// The page of records as a `searchset` Bundle: `total` counts every match of the query,
/// `links` are (relation, url) pairs such as self and next. `unmapped` names the patient's
/// archived records of tables without a FHIR mapping (table, records): an OperationOutcome
/// entry says they are not in the Bundle, so that no one reads it as the whole chart.
pub fn bundle(
    patient: &str,
    records: &[HistoryRecord],
    total: usize,
    links: &[(&str, String)],
    mapping: &BTreeMap<String, FhirTable>,
    unmapped: &BTreeMap<&str, u64>,
) -> Value {
    let mut entries: Vec<Value> = records
        .iter()
        .filter_map(|r| resource(r, patient, mapping))
        .map(|resource| json!({ "resource": resource, "search": { "mode": "match" } }))
        .collect();
    if !unmapped.is_empty() {
        let tables: Vec<String> = unmapped
            .iter()
            .map(|(t, n)| format!("{t} ({n} records)"))
            .collect();
        entries.push(json!({
            "resource": {
                "resourceType": "OperationOutcome",
                "issue": [{
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": format!(
                        "not in this Bundle: archived records of tables without a FHIR mapping: {} (ask for format=json)",
                        tables.join(", ")
                    ),
                }],
            },
            "search": { "mode": "outcome" },
        }));
    }
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links.iter().map(|(rel, url)| json!({ "relation": rel, "url": url })).collect::<Vec<_>>(),
        "entry": entries,
    })
}
