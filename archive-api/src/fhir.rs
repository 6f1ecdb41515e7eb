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
use std::collections::BTreeMap;

/// Resource types a table may be mapped to.
pub const RESOURCE_TYPES: &[&str] = &[
    "Encounter",
    "Condition",
    "MedicationStatement",
    "AllergyIntolerance",
    "Observation",
    "Procedure",
    "DocumentReference",
];

/// Checks the mapping: known resource types only.
pub fn check(mapping: &BTreeMap<String, FhirTable>) -> Result<(), String> {
    for (table, t) in mapping {
        if !RESOURCE_TYPES.contains(&t.resource.as_str()) {
            return Err(format!(
                "[api.fhir.{table}] resource: {:?} is not one of {}",
                t.resource,
                RESOURCE_TYPES.join(", ")
            ));
        }
    }
    Ok(())
}

/// The status codes of a resource type, and the one used when the source's is not among them.
fn statuses(resource: &str) -> (&'static [&'static str], &'static str) {
    match resource {
        "Encounter" => (
            &[
                "planned",
                "arrived",
                "triaged",
                "in-progress",
                "onleave",
                "finished",
                "cancelled",
                "entered-in-error",
                "unknown",
            ],
            "unknown",
        ),
        "MedicationStatement" => (
            &[
                "active",
                "completed",
                "entered-in-error",
                "intended",
                "stopped",
                "on-hold",
                "unknown",
                "not-taken",
            ],
            "unknown",
        ),
        "Observation" => (
            &[
                "registered",
                "preliminary",
                "final",
                "amended",
                "corrected",
                "cancelled",
                "entered-in-error",
                "unknown",
            ],
            "unknown",
        ),
        "Procedure" => (
            &[
                "preparation",
                "in-progress",
                "not-done",
                "on-hold",
                "stopped",
                "completed",
                "entered-in-error",
                "unknown",
            ],
            "unknown",
        ),
        "DocumentReference" => (&["current", "superseded", "entered-in-error"], "current"),
        // Clinical statuses (optional elements, so there is no fallback).
        "Condition" => (
            &[
                "active",
                "recurrence",
                "relapse",
                "inactive",
                "remission",
                "resolved",
            ],
            "",
        ),
        "AllergyIntolerance" => (&["active", "inactive", "resolved"], ""),
        _ => (&[], ""),
    }
}

fn text_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The FHIR id of a record: 32 hex digits of SHA-256 over table and key.
fn resource_id(table: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(table.as_bytes());
    h.update([0]);
    h.update(key.as_bytes());
    hex::encode(&h.finalize()[..16])
}

fn codeable(t: &FhirTable, data: &Map<String, Value>) -> Option<Value> {
    let code = t.code.as_deref().and_then(|c| text_of(data.get(c)));
    let display = t.display.as_deref().and_then(|c| text_of(data.get(c)));
    if code.is_none() && display.is_none() {
        return None;
    }
    let mut coding = Map::new();
    if let (Some(system), Some(_)) = (&t.system, &code) {
        coding.insert("system".into(), json!(system));
    }
    if let Some(c) = &code {
        coding.insert("code".into(), json!(c));
    }
    if let Some(d) = &display {
        coding.insert("display".into(), json!(d));
    }
    let mut concept = Map::new();
    if code.is_some() {
        concept.insert("coding".into(), json!([coding]));
    }
    // The display text only: a code alone is in the coding (an unlabelled code as text would
    // read as a number to anyone scanning text).
    if let Some(text) = display {
        concept.insert("text".into(), json!(text));
    }
    Some(Value::Object(concept))
}

/// Who a resource is and whose: its id, the identifier that traces it back (clinicians' answers
/// only), and the patient it belongs to.
pub(crate) struct Identity {
    /// The resource's id.
    pub id: String,
    /// `(system, value)` of its identifier, if it may carry one.
    pub identifier: Option<(String, String)>,
    /// The patient's id (a key for clinicians, a pseudonym in exports).
    pub patient: String,
}

/// One record as a resource (None for a table without a mapping).
fn resource(
    record: &HistoryRecord,
    patient: &str,
    mapping: &BTreeMap<String, FhirTable>,
) -> Option<Value> {
    let identity = Identity {
        id: resource_id(&record.table, &record.key),
        identifier: Some((format!("urn:strata:{}", record.table), record.key.clone())),
        patient: patient.to_string(),
    };
    resource_as(record, &identity, mapping)
}

/// One record as a resource with the given identity (None for a table without a mapping).
pub(crate) fn resource_as(
    record: &HistoryRecord,
    identity: &Identity,
    mapping: &BTreeMap<String, FhirTable>,
) -> Option<Value> {
    let t = mapping.get(&record.table)?;
    let data = &record.data;
    let kind = t.resource.as_str();
    let mut r = Map::new();
    r.insert("resourceType".into(), json!(kind));
    r.insert("id".into(), json!(identity.id));
    if let Some((system, value)) = &identity.identifier {
        r.insert(
            "identifier".into(),
            json!([{ "system": system, "value": value }]),
        );
    }
    let subject = json!({ "reference": format!("Patient/{}", identity.patient) });
    let (codes, fallback) = statuses(kind);
    let status = t
        .status
        .as_deref()
        .and_then(|c| text_of(data.get(c)))
        .map(|s| s.to_ascii_lowercase())
        .filter(|s| codes.contains(&s.as_str()));
    let concept = codeable(t, data);
    let date = record.record_date.clone();
    match kind {
        "Encounter" => {
            r.insert(
                "status".into(),
                json!(status.as_deref().unwrap_or(fallback)),
            );
            let class = concept
                .as_ref()
                .and_then(|c| c.get("coding")?.get(0).cloned())
                .unwrap_or_else(|| json!({ "code": "unknown" }));
            r.insert("class".into(), class);
            r.insert("subject".into(), subject);
            if let Some(d) = date {
                r.insert("period".into(), json!({ "start": d }));
            }
        }
        "Condition" | "AllergyIntolerance" => {
            let system = if kind == "Condition" {
                "http://terminology.hl7.org/CodeSystem/condition-clinical"
            } else {
                "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
            };
            if let Some(s) = status {
                r.insert(
                    "clinicalStatus".into(),
                    json!({ "coding": [{ "system": system, "code": s }] }),
                );
            }
            if let Some(c) = concept {
                r.insert("code".into(), c);
            }
            r.insert(
                if kind == "Condition" {
                    "subject"
                } else {
                    "patient"
                }
                .into(),
                subject,
            );
            if let Some(d) = date {
                r.insert("recordedDate".into(), json!(d));
            }
        }
        "MedicationStatement" => {
            r.insert(
                "status".into(),
                json!(status.as_deref().unwrap_or(fallback)),
            );
            r.insert(
                "medicationCodeableConcept".into(),
                concept.unwrap_or_else(|| json!({ "text": "unknown" })),
            );
            r.insert("subject".into(), subject);
            if let Some(d) = date {
                r.insert("effectiveDateTime".into(), json!(d));
            }
        }
        "Observation" | "Procedure" => {
            r.insert(
                "status".into(),
                json!(status.as_deref().unwrap_or(fallback)),
            );
            r.insert(
                "code".into(),
                concept.unwrap_or_else(|| json!({ "text": "unknown" })),
            );
            r.insert("subject".into(), subject);
            if let Some(d) = date {
                let element = if kind == "Observation" {
                    "effectiveDateTime"
                } else {
                    "performedDateTime"
                };
                r.insert(element.into(), json!(d));
            }
            let value = t.value.as_deref().and_then(|c| data.get(c));
            if let Some(v) = value.and_then(|v| match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            }) {
                let mut q = Map::new();
                q.insert("value".into(), json!(v));
                if let Some(u) = t.unit.as_deref().and_then(|c| text_of(data.get(c))) {
                    q.insert("unit".into(), json!(u));
                }
                r.insert("valueQuantity".into(), Value::Object(q));
            }
        }
        "DocumentReference" => {
            r.insert(
                "status".into(),
                json!(status.as_deref().unwrap_or(fallback)),
            );
            if let Some(c) = concept {
                r.insert("type".into(), c);
            }
            r.insert("subject".into(), subject);
            if let Some(d) = date {
                // `date` is an instant (a time is required); the record has a day only.
                r.insert("context".into(), json!({ "period": { "start": d } }));
            }
            let mut content = Vec::new();
            for doc in &record.documents {
                content.push(json!({ "attachment": {
                    "contentType": doc.content_type,
                    "url": doc.href,
                    "size": doc.length,
                }}));
            }
            if let Some(text) = t.text.as_deref().and_then(|c| text_of(data.get(c))) {
                use base64::Engine;
                content.push(json!({ "attachment": {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
                }}));
            }
            if content.is_empty() {
                // content is required: say that there is nothing to attach.
                content.push(json!({ "attachment": { "title": "no content archived" } }));
            }
            r.insert("content".into(), Value::Array(content));
        }
        _ => return None,
    }
    Some(Value::Object(r))
}

/// The page of records as a `searchset` Bundle: `total` counts every match of the query,
/// `links` are (relation, url) pairs such as self and next.
pub fn bundle(
    patient: &str,
    records: &[HistoryRecord],
    total: usize,
    links: &[(&str, String)],
    mapping: &BTreeMap<String, FhirTable>,
) -> Value {
    let entries: Vec<Value> = records
        .iter()
        .filter_map(|r| resource(r, patient, mapping))
        .map(|resource| json!({ "resource": resource, "search": { "mode": "match" } }))
        .collect();
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links.iter().map(|(rel, url)| json!({ "relation": rel, "url": url })).collect::<Vec<_>>(),
        "entry": entries,
    })
}
