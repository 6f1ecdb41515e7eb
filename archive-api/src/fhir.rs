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
use serde::Serialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
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

#[derive(Serialize)]
struct Coding<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
struct Concept<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    coding: Vec<Coding<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<Cow<'a, str>>,
}

impl<'a> Concept<'a> {
    fn text(text: &'a str) -> Self {
        Concept {
            coding: Vec::new(),
            text: Some(Cow::Borrowed(text)),
        }
    }
}

#[derive(Serialize)]
struct Reference {
    reference: String,
}

#[derive(Serialize)]
struct Period<'a> {
    start: &'a str,
}

#[derive(Serialize)]
struct Context<'a> {
    period: Period<'a>,
}

#[derive(Serialize)]
struct Quantity<'a> {
    value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
struct Identifier<'a> {
    system: &'a str,
    value: &'a str,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct Attachment<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<&'a str>,
}

#[derive(Serialize)]
struct Content<'a> {
    attachment: Attachment<'a>,
}

/// A resource, borrowing what it is made of (serialized without an intermediate JSON tree).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Resource<'a> {
    resource_type: &'a str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    identifier: Option<[Identifier<'a>; 1]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    class: Option<Coding<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clinical_status: Option<Concept<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<Concept<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    medication_codeable_concept: Option<Concept<'a>>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<Concept<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<Reference>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patient: Option<Reference>,
    #[serde(skip_serializing_if = "Option::is_none")]
    period: Option<Period<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recorded_date: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    effective_date_time: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    performed_date_time: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<Context<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_quantity: Option<Quantity<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<Vec<Content<'a>>>,
}

/// The record's concept from the mapping's code, system and display columns.
fn concept<'a>(t: &'a FhirTable, fields: &'a impl Fields) -> Option<Concept<'a>> {
    let code = t.code.as_deref().and_then(|c| fields.text(c));
    let display = t.display.as_deref().and_then(|c| fields.text(c));
    if code.is_none() && display.is_none() {
        return None;
    }
    let coding = match code {
        Some(code) => vec![Coding {
            system: t.system.as_deref(),
            code: Some(code),
            display: display.clone(),
        }],
        None => Vec::new(),
    };
    // The display text only: a code alone is in the coding (an unlabelled code as text would
    // read as a number to anyone scanning text).
    Some(Concept {
        coding,
        text: display,
    })
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

/// One record as a resource of `t`'s type: its values, identity, date and documents (None for
/// a type Strata does not map).
pub(crate) fn resource_of<'a>(
    t: &'a FhirTable,
    fields: &'a impl Fields,
    identity: &'a Identity,
    date: Option<&'a str>,
    documents: &'a [crate::history::DocumentLink],
) -> Option<Resource<'a>> {
    let kind = t.resource.as_str();
    let (codes, fallback) = statuses(kind);
    let status: Option<&'static str> = t
        .status
        .as_deref()
        .and_then(|c| fields.text(c))
        .and_then(|s| codes.iter().copied().find(|c| c.eq_ignore_ascii_case(&s)));
    let subject = || {
        Some(Reference {
            reference: format!("Patient/{}", identity.patient),
        })
    };
    let mut r = Resource {
        resource_type: kind,
        id: &identity.id,
        identifier: identity
            .identifier
            .as_ref()
            .map(|(system, value)| [Identifier { system, value }]),
        status: None,
        class: None,
        clinical_status: None,
        code: None,
        medication_codeable_concept: None,
        kind: None,
        subject: None,
        patient: None,
        period: None,
        recorded_date: None,
        effective_date_time: None,
        performed_date_time: None,
        context: None,
        value_quantity: None,
        content: None,
    };
    let concept = concept(t, fields);
    match kind {
        "Encounter" => {
            r.status = Some(status.unwrap_or(fallback));
            r.class = Some(
                concept
                    .and_then(|c| c.coding.into_iter().next())
                    .unwrap_or(Coding {
                        system: None,
                        code: Some(Cow::Borrowed("unknown")),
                        display: None,
                    }),
            );
            r.subject = subject();
            r.period = date.map(|start| Period { start });
        }
        "Condition" | "AllergyIntolerance" => {
            let system = if kind == "Condition" {
                "http://terminology.hl7.org/CodeSystem/condition-clinical"
            } else {
                "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
            };
            r.clinical_status = status.map(|s| Concept {
                coding: vec![Coding {
                    system: Some(system),
                    code: Some(Cow::Borrowed(s)),
                    display: None,
                }],
                text: None,
            });
            r.code = concept;
            if kind == "Condition" {
                r.subject = subject();
            } else {
                r.patient = subject();
            }
            r.recorded_date = date;
        }
        "MedicationStatement" => {
            r.status = Some(status.unwrap_or(fallback));
            r.medication_codeable_concept = Some(concept.unwrap_or(Concept::text("unknown")));
            r.subject = subject();
            r.effective_date_time = date;
        }
        "Observation" | "Procedure" => {
            r.status = Some(status.unwrap_or(fallback));
            r.code = Some(concept.unwrap_or(Concept::text("unknown")));
            r.subject = subject();
            if kind == "Observation" {
                r.effective_date_time = date;
            } else {
                r.performed_date_time = date;
            }
            r.value_quantity = t
                .value
                .as_deref()
                .and_then(|c| fields.number(c))
                .map(|value| Quantity {
                    value,
                    unit: t.unit.as_deref().and_then(|c| fields.text(c)),
                });
        }
        "DocumentReference" => {
            r.status = Some(status.unwrap_or(fallback));
            r.kind = concept;
            r.subject = subject();
            // `date` is an instant (a time is required); the record has a day only.
            r.context = date.map(|start| Context {
                period: Period { start },
            });
            let mut content: Vec<Content> = documents
                .iter()
                .map(|doc| Content {
                    attachment: Attachment {
                        content_type: Some(&doc.content_type),
                        url: Some(&doc.href),
                        size: Some(doc.length),
                        ..Default::default()
                    },
                })
                .collect();
            if let Some(text) = t.text.as_deref().and_then(|c| fields.text(c)) {
                use base64::Engine;
                content.push(Content {
                    attachment: Attachment {
                        content_type: Some("text/plain; charset=utf-8"),
                        data: Some(
                            base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
                        ),
                        ..Default::default()
                    },
                });
            }
            if content.is_empty() {
                // content is required: say that there is nothing to attach.
                content.push(Content {
                    attachment: Attachment {
                        title: Some("no content archived"),
                        ..Default::default()
                    },
                });
            }
            r.content = Some(content);
        }
        _ => return None,
    }
    Some(r)
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
