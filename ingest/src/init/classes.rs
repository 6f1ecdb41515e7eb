//! What a column holds, for researchers' exports: proposed by `strata init` from the column's
//! name, then from a sample of its values.

use super::{is_patient_table, lower, TableGuess};
use crate::db::{quote, Db, TableSchema};
use crate::error::Result;
use crate::value::{ColumnType, Value};
use std::collections::BTreeMap;
use strata_deidentify::{patterns_in, Class, Rule};

/// The class a column's name suggests, if any (`patient_table`: the table of patients, where a
/// bare `name` or `first` is a person's).
pub fn class_from_name(column: &str, patient_table: bool) -> Option<Class> {
    let n = lower(column);
    let words: Vec<&str> = n
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let has = |w: &str| words.contains(&w);
    let any = |ws: &[&str]| ws.iter().any(|w| has(w));
    let part = |ps: &[&str]| ps.iter().any(|p| n.contains(p));
    use Class::*;
    Some(if part(&["ssn", "social_security"]) {
        Ssn
    } else if part(&["email", "e_mail"]) {
        Email
    } else if part(&["fax"]) {
        Fax
    } else if part(&["phone", "mobile", "telecom"]) || has("tel") {
        Phone
    } else if has("mrn") || part(&["medical_record", "chart_number", "chart_no"]) {
        Mrn
    } else if part(&["birthplace"]) {
        Address
    } else if part(&["birth"]) || has("dob") {
        BirthDate
    } else if part(&["death", "deceased"]) || has("dod") {
        DeathDate
    } else if has("age") || part(&["_age", "age_"]) && !part(&["stage", "page", "usage", "dosage"])
    {
        Age
    } else if part(&["zip", "postal", "postcode"]) {
        Zip
    } else if part(&["county", "fips"]) {
        County
    } else if any(&["city", "town"]) {
        City
    } else if any(&["state", "province"]) {
        State
    } else if part(&["address", "street"])
        || any(&[
            "addr",
            "line1",
            "line2",
            "lat",
            "lon",
            "latitude",
            "longitude",
        ])
    {
        Address
    } else if part(&[
        "first_name",
        "given",
        "last_name",
        "family_name",
        "surname",
        "middle_name",
        "maiden",
        "full_name",
        "patient_name",
    ]) || (patient_table && any(&["name", "first", "last", "middle", "prefix", "suffix"]))
        || person_name(column)
    {
        Name
    } else if part(&["account"]) || has("acct") {
        Account
    } else if part(&[
        "member_id",
        "insurance",
        "subscriber",
        "policy_number",
        "beneficiary",
        "medicaid",
        "medicare",
    ]) {
        HealthPlan
    } else if part(&["license", "licence", "certificate", "passport", "drivers"]) {
        License
    } else if has("vin") || part(&["vehicle", "license_plate"]) {
        Vehicle
    } else if part(&["device", "serial"]) || has("udi") {
        Device
    } else if has("url") || part(&["website", "homepage"]) {
        Url
    } else if has("ip") || part(&["ip_address"]) {
        Ip
    } else if part(&["fingerprint", "biometric", "voiceprint", "retina"]) {
        Biometric
    } else if part(&["photo", "picture", "portrait"]) {
        Photo
    } else if any(&["npi", "dea", "upin"]) {
        UniqueId
    } else if any(&["sex", "gender"]) {
        Sex
    } else if any(&["unit", "units", "uom"]) {
        Unit
    } else if any(&[
        "code", "icd", "icd9", "icd10", "loinc", "snomed", "rxnorm", "cpt", "ndc", "cvx", "hcpcs",
        "drg",
    ]) || part(&["_code", "_concept_id", "icd10", "icd9"])
    {
        Code
    } else if words.last().is_some_and(|w| {
        [
            "type", "status", "class", "category", "kind", "flag", "severity", "level", "group",
        ]
        .contains(w)
    }) {
        // `note_type`, `result_status`: what kind of note, not a note.
        Category
    } else if any(&[
        "note",
        "notes",
        "body",
        "text",
        "comment",
        "comments",
        "narrative",
        "remark",
        "remarks",
        "impression",
        "findings",
    ]) {
        FreeText
    } else if any(&[
        "value", "result", "amount", "quantity", "qty", "dose", "dosage", "cost", "price", "los",
        "weight", "height", "count", "expenses", "coverage", "income", "payment", "total",
    ]) || part(&["value_", "_num"])
    {
        Value
    } else if any(&[
        "status",
        "type",
        "class",
        "category",
        "severity",
        "race",
        "ethnicity",
        "marital",
        "description",
        "display",
        "title",
        "reason",
        "substance",
        "reaction",
        "route",
        "frequency",
        "priority",
        "specialty",
        "kind",
        "mime",
        "flag",
        "language",
        "religion",
    ]) || (!patient_table && n.ends_with("_name"))
    {
        Category
    } else {
        return None;
    })
}

/// Words that make a `*_name` column a person's name (a relative's, a provider's...).
const PERSON_WORDS: [&str; 24] = [
    "guarantor",
    "kin",
    "contact",
    "provider",
    "physician",
    "doctor",
    "nurse",
    "patient",
    "mother",
    "father",
    "spouse",
    "emergency",
    "caregiver",
    "author",
    "user",
    "staff",
    "clinician",
    "surgeon",
    "attending",
    "referring",
    "relative",
    "guardian",
    "parent",
    "subscriber",
];

/// Whether a `*_name` column names a person.
fn person_name(column: &str) -> bool {
    let n = lower(column);
    n.ends_with("name") && PERSON_WORDS.iter().any(|w| n.contains(w))
}

/// The class a text column's values suggest: an identifier pattern in most of them, or long
/// text. `sample` holds up to 100 non-null values.
fn class_from_values(sample: &[String]) -> Option<Class> {
    if sample.is_empty() {
        return None;
    }
    let mut counts: BTreeMap<Rule, usize> = BTreeMap::new();
    for v in sample {
        for r in patterns_in(v) {
            *counts.entry(r).or_default() += 1;
        }
    }
    let most = |r: Rule| counts.get(&r).copied().unwrap_or(0) * 2 > sample.len();
    let long = sample.iter().map(|v| v.chars().count()).sum::<usize>() / sample.len() > 60;
    Some(if most(Rule::Email) {
        Class::Email
    } else if most(Rule::Ssn) {
        Class::Ssn
    } else if most(Rule::Phone) {
        Class::Phone
    } else if most(Rule::Url) {
        Class::Url
    } else if most(Rule::Ip) {
        Class::Ip
    } else if long {
        Class::FreeText
    } else if most(Rule::FullDate) {
        Class::Date
    } else {
        return None;
    })
}

/// Proposes a class for every column whose class does not follow from the guesses (keys,
/// BLOBs, the record date and date types are Strata's own): from the name first, then, for
/// text, from up to 100 values.
pub(super) async fn propose_classes(
    db: &Db,
    table: &str,
    schema: &TableSchema,
    g: &mut TableGuess,
) -> Result<()> {
    let patient_table = is_patient_table(table);
    for c in &schema.columns {
        let own = g.primary_key.0.contains(&c.name)
            || g.patient_key.as_deref() == Some(c.name.as_str())
            || g.patient_via.as_ref().is_some_and(|(_, fk)| fk == &c.name)
            || g.record_date
                .as_ref()
                .is_some_and(|(d, _)| d.own_columns().contains(&c.name.as_str()))
            || g.blobs.iter().any(|(b, _)| b == &c.name);
        if own {
            continue;
        }
        if let Some((_, to, _)) = schema.foreign_keys.iter().find(|(fk, _, _)| fk == &c.name) {
            g.classes.push((
                c.name.clone(),
                Class::RecordKey,
                Some(to.clone()),
                "a declared foreign key",
            ));
            continue;
        }
        let dated = matches!(
            c.col_type,
            ColumnType::Date | ColumnType::Timestamp | ColumnType::TimestampTz
        );
        match class_from_name(&c.name, patient_table) {
            // A "category" whose values are long or nearly all different is prose or names:
            // proposed as free text (which never leaves under the built-in profiles).
            Some(Class::Category) if c.col_type == ColumnType::Text => {
                let sample = sample(db, table, &c.name).await?;
                let distinct: std::collections::HashSet<&String> = sample.iter().collect();
                let long = !sample.is_empty()
                    && sample.iter().map(|v| v.chars().count()).sum::<usize>() / sample.len() > 40;
                let varied = sample.len() >= 20 && distinct.len() * 5 > sample.len() * 4;
                if long || varied {
                    g.classes.push((
                        c.name.clone(),
                        Class::FreeText,
                        None,
                        "its values are long or nearly all different (prose or names?)",
                    ));
                } else {
                    g.classes.push((
                        c.name.clone(),
                        Class::Category,
                        None,
                        "proposed from the column name",
                    ));
                }
                continue;
            }
            // A dated column is a date anyway; only birth and death dates are worth naming.
            Some(class) if !dated || class.is_date() => {
                g.classes
                    .push((c.name.clone(), class, None, "proposed from the column name"));
                continue;
            }
            _ if dated => continue,
            _ => {}
        }
        if c.col_type == ColumnType::Text {
            let sample = sample(db, table, &c.name).await?;
            if let Some(class) = class_from_values(&sample) {
                g.classes
                    .push((c.name.clone(), class, None, "proposed from its values"));
                continue;
            }
        }
        g.unclassified.push(c.name.clone());
    }
    Ok(())
}

/// Up to 100 non-null values of a text column.
async fn sample(db: &Db, table: &str, column: &str) -> Result<Vec<String>> {
    let sql = format!(
        "SELECT {c} FROM {t} WHERE {c} IS NOT NULL LIMIT 100",
        c = quote(column),
        t = quote(table)
    );
    Ok(db
        .fetch_all(sql, vec![ColumnType::Text])
        .await?
        .into_iter()
        .filter_map(|r| match r.into_iter().next() {
            Some(Value::Text(t)) => Some(t),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_proposed_from_names_of_real_schemas() {
        // Synthea's patients, OMOP CDM and MIMIC-style columns.
        for (column, patients, class) in [
            ("FIRST", true, Some(Class::Name)),
            ("LAST", true, Some(Class::Name)),
            ("SSN", true, Some(Class::Ssn)),
            ("DRIVERS", true, Some(Class::License)),
            ("PASSPORT", true, Some(Class::License)),
            ("BIRTHDATE", true, Some(Class::BirthDate)),
            ("BIRTHPLACE", true, Some(Class::Address)),
            ("ZIP", true, Some(Class::Zip)),
            ("LAT", true, Some(Class::Address)),
            ("GENDER", true, Some(Class::Sex)),
            ("RACE", true, Some(Class::Category)),
            ("family_name", false, Some(Class::Name)),
            ("phone_home", false, Some(Class::Phone)),
            ("condition_concept_id", false, Some(Class::Code)),
            ("loinc_code", false, Some(Class::Code)),
            ("value_as_number", false, Some(Class::Value)),
            ("unit_source_value", false, Some(Class::Unit)),
            ("test_name", false, Some(Class::Category)),
            ("guarantor_name", false, Some(Class::Name)),
            ("next_of_kin_name", false, Some(Class::Name)),
            ("anchor_age", false, Some(Class::Age)),
            ("dosage", false, Some(Class::Value)),
            ("provider_npi", false, Some(Class::UniqueId)),
            ("body", false, Some(Class::FreeText)),
            ("insurance", false, Some(Class::HealthPlan)),
            ("hospital_expire_flag", false, Some(Class::Category)),
            ("note_type", false, Some(Class::Category)),
            ("note_text", false, Some(Class::FreeText)),
            ("xyz", false, None),
        ] {
            assert_eq!(class_from_name(column, patients), class, "{column}");
        }
        let emails: Vec<String> = (0..10).map(|i| format!("p{i}@example.org")).collect();
        assert_eq!(class_from_values(&emails), Some(Class::Email));
        let notes = vec!["Patient seen for follow-up of hypertension; counselled on diet and exercise, return in three months.".to_string()];
        assert_eq!(class_from_values(&notes), Some(Class::FreeText));
        assert_eq!(class_from_values(&["active".to_string()]), None);
    }
}
