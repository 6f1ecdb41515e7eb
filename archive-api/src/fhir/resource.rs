//! One archived record as one FHIR R4 resource of the type its table is mapped to: the
//! elements each type requires (status, intent, code, the patient), its date element, and the
//! optional ones the mapping names. Serialized straight from borrowed values, without an
//! intermediate JSON tree.

use super::Fields;
use crate::config::FhirTable;
use serde::Serialize;
use std::borrow::Cow;

/// Resource types a table may be mapped to.
pub const RESOURCE_TYPES: &[&str] = &[
    "Patient",
    "Encounter",
    "Condition",
    "Observation",
    "Procedure",
    "MedicationStatement",
    "MedicationRequest",
    "AllergyIntolerance",
    "Immunization",
    "CarePlan",
    "Device",
    "ImagingStudy",
    "SupplyDelivery",
    "Coverage",
    "DiagnosticReport",
    "ServiceRequest",
    "DocumentReference",
];

/// The status codes of a resource type, and the one used when the source's is not among them
/// (`""`: the element is optional and left out).
fn statuses(resource: &str) -> (&'static [&'static str], &'static str) {
    const REQUEST: &[&str] = &[
        "draft",
        "active",
        "on-hold",
        "revoked",
        "completed",
        "entered-in-error",
        "unknown",
    ];
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
        "MedicationRequest" => (
            &[
                "active",
                "on-hold",
                "cancelled",
                "completed",
                "entered-in-error",
                "stopped",
                "draft",
                "unknown",
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
        "DiagnosticReport" => (
            &[
                "registered",
                "partial",
                "preliminary",
                "final",
                "amended",
                "corrected",
                "appended",
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
        "CarePlan" | "ServiceRequest" => (REQUEST, "unknown"),
        "ImagingStudy" => (
            &[
                "registered",
                "available",
                "cancelled",
                "entered-in-error",
                "unknown",
            ],
            "unknown",
        ),
        // An archived immunization record is one that was given; a coverage, one that held:
        // their status is required and has no "unknown".
        "Immunization" => (&["completed", "entered-in-error", "not-done"], "completed"),
        "Coverage" => (
            &["active", "cancelled", "draft", "entered-in-error"],
            "active",
        ),
        "Device" => (&["active", "inactive", "entered-in-error", "unknown"], ""),
        "SupplyDelivery" => (
            &["in-progress", "completed", "abandoned", "entered-in-error"],
            "",
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

/// One element or a list of them (`type` is a list in Encounter, one concept elsewhere).
#[derive(Serialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

#[derive(Serialize, Default)]
struct Reference<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
struct Period {
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<String>,
}

#[derive(Serialize)]
struct Context {
    period: Period,
}

#[derive(Serialize)]
struct Quantity<'a> {
    value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<Cow<'a, str>>,
}

/// An Observation's reference range: `low` and `high` in the value's unit.
#[derive(Serialize)]
struct ReferenceRange<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    low: Option<Quantity<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    high: Option<Quantity<'a>>,
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SuppliedItem<'a> {
    item_codeable_concept: Concept<'a>,
}

/// A resource, borrowing what it is made of. Each type sets the elements it has.
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
    intent: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    class: Option<Coding<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clinical_status: Option<Concept<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    category: Option<Vec<Concept<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<Concept<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vaccine_code: Option<Concept<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    medication_codeable_concept: Option<Concept<'a>>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<OneOrMany<Concept<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    procedure_code: Option<Vec<Concept<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    supplied_item: Option<SuppliedItem<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gender: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    birth_date: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<Reference<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    patient: Option<Reference<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    beneficiary: Option<Reference<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payor: Option<Vec<Reference<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    period: Option<Period>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recorded_date: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    effective_date_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    performed_date_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    occurrence_date_time: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    occurrence_string: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authored_on: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    started: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<Context>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_quantity: Option<Quantity<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference_range: Option<Vec<ReferenceRange<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<Vec<Content<'a>>>,
}

impl<'a> Resource<'a> {
    fn new(resource_type: &'a str, id: &'a str) -> Self {
        Resource {
            resource_type,
            id,
            identifier: None,
            status: None,
            intent: None,
            class: None,
            clinical_status: None,
            category: None,
            code: None,
            vaccine_code: None,
            medication_codeable_concept: None,
            kind: None,
            procedure_code: None,
            supplied_item: None,
            gender: None,
            birth_date: None,
            subject: None,
            patient: None,
            beneficiary: None,
            payor: None,
            period: None,
            recorded_date: None,
            effective_date_time: None,
            performed_date_time: None,
            occurrence_date_time: None,
            occurrence_string: None,
            authored_on: None,
            started: None,
            context: None,
            value_quantity: None,
            reference_range: None,
            content: None,
        }
    }
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

/// An offset as FHIR writes it (`Z`, `-05:00`) from the config's `UTC` or `-05:00`.
pub(super) fn offset(tz: &str) -> Option<&str> {
    if tz.eq_ignore_ascii_case("UTC") || tz == "Z" {
        return Some("Z");
    }
    let b = tz.as_bytes();
    let ok = b.len() == 6
        && matches!(b[0], b'+' | b'-')
        && b[1..3].iter().all(u8::is_ascii_digit)
        && b[3] == b':'
        && b[4..6].iter().all(u8::is_ascii_digit);
    ok.then_some(tz)
}

/// A date or date-time value as a FHIR `dateTime`: a day stays a day; a time keeps its zone
/// (`Z` or an offset), takes the configured one when it has none, and is given as its day when
/// there is neither (FHIR times must carry a zone).
fn date_time(text: &str, timezone: Option<&str>) -> Option<String> {
    let text = text.trim();
    let day = text.get(..10)?;
    let valid_day = day.len() == 10
        && day.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !valid_day {
        return None;
    }
    let Some(time) = text.get(11..).filter(|t| !t.is_empty()) else {
        return Some(day.to_string());
    };
    let zoned = time.ends_with('Z')
        || time.len() > 6 && matches!(time.as_bytes()[time.len() - 6], b'+' | b'-');
    let mut time = time.to_string();
    if time.len() == 5 {
        time.push_str(":00"); // HH:MM: FHIR needs the seconds
    }
    if zoned {
        return Some(format!("{day}T{time}"));
    }
    match timezone.and_then(offset) {
        Some(zone) => Some(format!("{day}T{time}{zone}")),
        None => Some(day.to_string()),
    }
}

/// FHIR's administrative gender for a source's sex or gender value.
fn gender(value: &str) -> &'static str {
    match value.trim().to_ascii_lowercase().as_str() {
        "m" | "male" | "man" => "male",
        "f" | "female" | "woman" => "female",
        "o" | "other" | "x" => "other",
        _ => "unknown",
    }
}

/// An encounter's class as a v3 ActCode coding when Strata knows the word, else as written.
fn encounter_class(value: Cow<'_, str>) -> Coding<'_> {
    const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
    let (code, display) = match value.trim().to_ascii_lowercase().as_str() {
        "amb" | "ambulatory" | "outpatient" | "wellness" | "urgentcare" | "urgent care" => {
            ("AMB", "ambulatory")
        }
        "emer" | "emergency" => ("EMER", "emergency"),
        "imp" | "inpatient" | "inpatient encounter" => ("IMP", "inpatient encounter"),
        "acute" => ("ACUTE", "inpatient acute"),
        "obsenc" | "observation" => ("OBSENC", "observation encounter"),
        "hh" | "home" | "home health" => ("HH", "home health"),
        "vr" | "virtual" => ("VR", "virtual"),
        "prenc" | "pre-admission" => ("PRENC", "pre-admission"),
        "ss" | "short stay" => ("SS", "short stay"),
        _ => {
            return Coding {
                system: None,
                code: Some(value),
                display: None,
            }
        }
    };
    Coding {
        system: Some(ACT_CODE),
        code: Some(Cow::Borrowed(code)),
        display: Some(Cow::Borrowed(display)),
    }
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

/// One record as a resource of `t`'s type: its values, identity, record date (a day) and
/// documents (None for a type Strata does not map).
pub(crate) fn resource_of<'a>(
    t: &'a FhirTable,
    fields: &'a impl Fields,
    identity: &'a Identity,
    date: Option<&'a str>,
    documents: &'a [crate::history::DocumentLink],
) -> Option<Resource<'a>> {
    let kind = t.resource.as_str();
    let (codes, fallback) = statuses(kind);
    let source_status: Option<&'static str> = t
        .status
        .as_deref()
        .and_then(|c| fields.text(c))
        .and_then(|s| codes.iter().copied().find(|c| c.eq_ignore_ascii_case(&s)));
    let status = source_status.or(Some(fallback).filter(|f| !f.is_empty()));
    let patient = || {
        Some(Reference {
            reference: Some(format!("Patient/{}", identity.patient)),
            display: None,
        })
    };
    let tz = t.timezone.as_deref();
    let column_time = |c: &Option<String>| {
        c.as_deref()
            .and_then(|c| fields.text(c))
            .and_then(|v| date_time(&v, tz))
    };
    // When it happened: the mapped start instant, else the record date.
    let when = column_time(&t.start).or_else(|| date.map(str::to_string));
    let end = column_time(&t.end);
    let period = || {
        (when.is_some() || end.is_some()).then(|| Period {
            start: when.clone(),
            end: end.clone(),
        })
    };
    let id = if kind == "Patient" {
        identity.patient.as_str()
    } else {
        identity.id.as_str()
    };
    let mut r = Resource::new(kind, id);
    r.identifier = identity
        .identifier
        .as_ref()
        .map(|(system, value)| [Identifier { system, value }]);
    let concept = concept(t, fields);
    let unknown = || Concept::text("unknown");
    match kind {
        "Patient" => {
            r.gender = t
                .gender
                .as_deref()
                .and_then(|c| fields.text(c))
                .map(|g| gender(&g));
            r.birth_date = t
                .birth_date
                .as_deref()
                .and_then(|c| fields.text(c))
                .and_then(|d| date_time(&d, None))
                .map(|d| d[..10].to_string());
        }
        "Encounter" => {
            r.status = status;
            r.class = Some(
                t.class
                    .as_deref()
                    .and_then(|c| fields.text(c))
                    .map(encounter_class)
                    .unwrap_or(Coding {
                        system: None,
                        code: Some(Cow::Borrowed("unknown")),
                        display: None,
                    }),
            );
            r.kind = concept.map(|c| OneOrMany::Many(vec![c]));
            r.subject = patient();
            r.period = period();
        }
        "Condition" | "AllergyIntolerance" => {
            let system = if kind == "Condition" {
                "http://terminology.hl7.org/CodeSystem/condition-clinical"
            } else {
                "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
            };
            r.clinical_status = source_status.map(|s| Concept {
                coding: vec![Coding {
                    system: Some(system),
                    code: Some(Cow::Borrowed(s)),
                    display: None,
                }],
                text: None,
            });
            r.code = concept;
            if kind == "Condition" {
                r.subject = patient();
            } else {
                r.patient = patient();
            }
            r.recorded_date = when;
        }
        "MedicationStatement" => {
            r.status = status;
            r.medication_codeable_concept = Some(concept.unwrap_or_else(unknown));
            r.subject = patient();
            r.effective_date_time = when;
        }
        "MedicationRequest" => {
            r.status = status;
            r.intent = Some("order");
            r.medication_codeable_concept = Some(concept.unwrap_or_else(unknown));
            r.subject = patient();
            r.authored_on = when;
        }
        "Observation" | "Procedure" | "DiagnosticReport" => {
            r.status = status;
            r.code = Some(concept.unwrap_or_else(unknown));
            r.subject = patient();
            if kind == "Procedure" {
                r.performed_date_time = when;
            } else {
                r.effective_date_time = when;
            }
            if kind == "Observation" {
                r.value_quantity = t
                    .value
                    .as_deref()
                    .and_then(|c| fields.number(c))
                    .map(|value| Quantity {
                        value,
                        unit: t.unit.as_deref().and_then(|c| fields.text(c)),
                    });
                let bound = |column: &Option<String>| {
                    column
                        .as_deref()
                        .and_then(|c| fields.number(c))
                        .map(|value| Quantity {
                            value,
                            unit: t.unit.as_deref().and_then(|c| fields.text(c)),
                        })
                };
                let (low, high) = (bound(&t.reference_low), bound(&t.reference_high));
                if low.is_some() || high.is_some() {
                    r.reference_range = Some(vec![ReferenceRange { low, high }]);
                }
            }
        }
        "Immunization" => {
            r.status = status;
            r.vaccine_code = Some(concept.unwrap_or_else(unknown));
            r.patient = patient();
            // occurrence[x] is required.
            match when {
                Some(w) => r.occurrence_date_time = Some(w),
                None => r.occurrence_string = Some("unknown"),
            }
        }
        "CarePlan" => {
            r.status = status;
            r.intent = Some("plan");
            r.category = concept.map(|c| vec![c]);
            r.subject = patient();
            r.period = period();
        }
        "ServiceRequest" => {
            r.status = status;
            r.intent = Some("order");
            r.code = concept;
            r.subject = patient();
            r.authored_on = when;
        }
        "Device" => {
            r.status = status;
            r.kind = concept.map(OneOrMany::One);
            r.patient = patient();
        }
        "ImagingStudy" => {
            r.status = status;
            r.procedure_code = concept.map(|c| vec![c]);
            r.subject = patient();
            r.started = when;
        }
        "SupplyDelivery" => {
            r.status = status;
            r.supplied_item = concept.map(|c| SuppliedItem {
                item_codeable_concept: c,
            });
            r.patient = patient();
            r.occurrence_date_time = when;
        }
        "Coverage" => {
            r.status = status;
            r.kind = t.code.as_deref().and_then(|c| fields.text(c)).map(|code| {
                OneOrMany::One(Concept {
                    coding: vec![Coding {
                        system: t.system.as_deref(),
                        code: Some(code),
                        display: None,
                    }],
                    text: None,
                })
            });
            r.beneficiary = patient();
            // payor is required: the payer's name as written, when the mapping names it.
            r.payor = Some(vec![Reference {
                reference: None,
                display: Some(
                    t.display
                        .as_deref()
                        .and_then(|c| fields.text(c))
                        .unwrap_or(Cow::Borrowed("unknown")),
                ),
            }]);
            r.period = period();
        }
        "DocumentReference" => {
            r.status = status;
            r.kind = concept.map(OneOrMany::One);
            r.subject = patient();
            r.context = when.map(|start| Context {
                period: Period {
                    start: Some(start),
                    end: None,
                },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_keep_their_zone_or_become_days() {
        assert_eq!(
            date_time("2022-07-20T07:13:55Z", None).as_deref(),
            Some("2022-07-20T07:13:55Z")
        );
        assert_eq!(
            date_time("2022-07-20T07:13:55+00:00", None).as_deref(),
            Some("2022-07-20T07:13:55+00:00")
        );
        assert_eq!(
            date_time("2150-01-01T10:00:00", None).as_deref(),
            Some("2150-01-01")
        );
        assert_eq!(
            date_time("2150-01-01 10:00:00", Some("-05:00")).as_deref(),
            Some("2150-01-01T10:00:00-05:00")
        );
        assert_eq!(
            date_time("2150-01-01T10:00", Some("UTC")).as_deref(),
            Some("2150-01-01T10:00:00Z")
        );
        assert_eq!(date_time("2150-01-01", None).as_deref(), Some("2150-01-01"));
        assert_eq!(date_time("01/02/2150", None), None);
        assert_eq!(offset("+01:00"), Some("+01:00"));
        assert_eq!(offset("Europe/Paris"), None);
    }
}
