//! The FHIR mapping `strata init` proposes for a table whose shape it recognises: the resource
//! type from the table's name (`encounters`, `diagnoses_icd`, `immunizations`, OMOP's
//! `condition_occurrence`...), and its code, display, class, value, unit and times from the
//! columns' names, with Synthea's code systems for Synthea's tables.

use super::classes::class_from_name;
use super::{is_patient_table, lower, TableGuess};
use crate::config::RecordDateConfig;
use crate::db::TableSchema;
use strata_deidentify::Class;

/// A proposed `[api.fhir.<table>]`: the resource type and its settings, in order.
#[derive(Debug, Clone)]
pub struct FhirGuess {
    /// The resource type.
    pub resource: &'static str,
    /// `(setting, value)`, values as written in the config.
    pub settings: Vec<(&'static str, String)>,
}

/// The resource type a table's name says it holds (a period table only as a coverage).
fn resource_type(table: &str, period: bool) -> Option<&'static str> {
    let t = lower(table);
    let has = |words: &[&str]| words.iter().any(|w| t.contains(w));
    if is_patient_table(table) {
        return Some("Patient");
    }
    if period {
        return has(&["payer", "coverage", "insurance"]).then_some("Coverage");
    }
    Some(if has(&["encounter", "admission", "visit"]) {
        "Encounter"
    } else if has(&["immuniz", "vaccin"]) {
        "Immunization"
    } else if has(&["allerg"]) {
        "AllergyIntolerance"
    } else if has(&["careplan", "care_plan"]) {
        "CarePlan"
    } else if has(&["device"]) {
        "Device"
    } else if has(&["imaging"]) {
        "ImagingStudy"
    } else if has(&["suppl"]) {
        "SupplyDelivery"
    } else if has(&["payer_transition", "coverage", "insurance"]) {
        "Coverage"
    } else if has(&["condition", "diagnos", "problem"]) {
        "Condition"
    } else if has(&["procedure"]) {
        "Procedure"
    } else if has(&["medication", "prescription", "drug_exposure"]) {
        "MedicationRequest"
    } else if has(&["observation", "lab", "measurement", "vital", "chartevent"]) {
        "Observation"
    } else if has(&["report"]) {
        "DiagnosticReport"
    } else if has(&["order", "request", "referral"]) {
        "ServiceRequest"
    } else if has(&["note", "document"]) {
        "DocumentReference"
    } else {
        return None;
    })
}

/// A code system's URI from a code column's name, or Synthea's for its tables.
fn system(column: &str, resource: &str, synthea: bool) -> Option<&'static str> {
    let c = lower(column);
    let by_name = [
        ("icd9", "http://hl7.org/fhir/sid/icd-9-cm"),
        ("icd10", "http://hl7.org/fhir/sid/icd-10-cm"),
        ("loinc", "http://loinc.org"),
        ("rxnorm", "http://www.nlm.nih.gov/research/umls/rxnorm"),
        ("cvx", "http://hl7.org/fhir/sid/cvx"),
        ("snomed", "http://snomed.info/sct"),
        ("ndc", "http://hl7.org/fhir/sid/ndc"),
    ];
    if let Some((_, uri)) = by_name.iter().find(|(w, _)| c.contains(w)) {
        return Some(uri);
    }
    if !synthea {
        return None;
    }
    Some(match resource {
        "Observation" | "DiagnosticReport" => "http://loinc.org",
        "MedicationRequest" => "http://www.nlm.nih.gov/research/umls/rxnorm",
        "Immunization" => "http://hl7.org/fhir/sid/cvx",
        "Coverage" => return None,
        _ => "http://snomed.info/sct",
    })
}

/// The mapping for `table`, if its shape is recognised.
pub(super) fn guess_fhir(table: &str, schema: &TableSchema, g: &TableGuess) -> Option<FhirGuess> {
    let period = matches!(g.record_date, Some((RecordDateConfig::Period { .. }, _)));
    let resource = resource_type(table, period)?;
    let named = |names: &[&str]| {
        schema
            .columns
            .iter()
            .find(|c| names.contains(&lower(&c.name).as_str()))
            .map(|c| c.name.clone())
    };
    let classed = |class: Class| {
        schema
            .columns
            .iter()
            .find(|c| class_from_name(&c.name, resource == "Patient") == Some(class))
            .map(|c| c.name.clone())
    };
    // Synthea's CSV tables: PATIENT, ENCOUNTER, CODE and DESCRIPTION.
    let synthea = ["PATIENT", "ENCOUNTER", "CODE", "DESCRIPTION"]
        .iter()
        .all(|c| schema.column(c).is_some());
    let mut settings: Vec<(&'static str, String)> = Vec::new();
    if resource == "Patient" {
        if let Some(c) = classed(Class::Sex) {
            settings.push(("gender", c));
        }
        if let Some(c) = classed(Class::BirthDate) {
            settings.push(("birth_date", c));
        }
        return Some(FhirGuess { resource, settings });
    }
    let code = match resource {
        "ImagingStudy" => named(&["procedure_code"]),
        _ => None,
    }
    .or_else(|| named(&["code"]))
    .or_else(|| classed(Class::Code));
    if let Some(code) = code {
        if let Some(uri) = system(&code, resource, synthea) {
            settings.push(("system", uri.to_string()));
        }
        settings.insert(0, ("code", code));
    }
    let display = if resource == "Coverage" {
        named(&["payer", "payer_name", "plan_source_value", "insurance"])
    } else {
        named(&[
            "description",
            "display",
            "label",
            "title",
            "long_title",
            "short_title",
            "drug",
            "drug_name",
            "test_name",
        ])
    };
    if let Some(c) = display {
        settings.push(("display", c));
    }
    if resource == "Encounter" {
        if let Some(c) = named(&[
            "encounterclass",
            "encounter_class",
            "admission_type",
            "class",
        ]) {
            settings.push(("class", c));
        }
    }
    if resource == "Observation" {
        if let Some(c) = named(&[
            "value",
            "valuenum",
            "value_as_number",
            "value_num",
            "result_value",
        ]) {
            settings.push(("value", c));
        }
        if let Some(c) = named(&["units", "unit", "valueuom", "unit_source_value"]) {
            settings.push(("unit", c));
        }
    }
    if resource == "DocumentReference" {
        if let Some(c) = named(&["note_text", "text", "body", "note", "content"]) {
            settings.push(("text", c));
        }
    }
    if let Some(c) = named(&["status"]) {
        settings.push(("status", c));
    }
    let (start, end) = match &g.record_date {
        Some((RecordDateConfig::Column(c), _)) => (Some(c.clone()), None),
        Some((RecordDateConfig::Period { start, end }, _)) => {
            (Some(start.clone()), Some(end.clone()))
        }
        _ => (None, None),
    };
    let end = end.or_else(|| super::conventions::end_column(schema));
    if let Some(c) = start {
        settings.push(("start", c));
    }
    if let Some(c) = end.filter(|_| matches!(resource, "Encounter" | "CarePlan" | "Coverage")) {
        settings.push(("end", c));
    }
    Some(FhirGuess { resource, settings })
}
