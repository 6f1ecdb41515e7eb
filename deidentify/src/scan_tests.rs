//! Tests of the scanner: every identifier pattern planted and found (codes, values and OIDs
//! not), key copies above their threshold, and FHIR resources scanned element by element.

use super::*;
use arrow::array::{Date32Array, Int64Array, StringArray};
use arrow::datatypes::{Field, Schema};
use std::sync::Arc;

fn column(name: &str, class: Class) -> ScanColumn {
    ScanColumn {
        name: name.into(),
        class: Some(class),
        pseudonym: false,
    }
}

fn rules(text: &str, class: Class) -> Vec<Rule> {
    text_rules(text, TextKind::of(&column("c", class)), true)
}

#[test]
fn every_identifier_pattern_is_found_and_codes_values_and_oids_are_not() {
    assert_eq!(
        rules("SSN 123-45-6789 on file", Class::Category),
        [Rule::Ssn]
    );
    assert_eq!(rules("call (201) 555-0143", Class::Category), [Rule::Phone]);
    assert_eq!(rules("call 201-555-0143", Class::Category), [Rule::Phone]);
    assert_eq!(
        rules("mail ann.lee@example.org", Class::Category),
        [Rule::Email]
    );
    assert_eq!(
        rules("see https://portal.example.org/p/1", Class::Category),
        [Rule::Url]
    );
    assert_eq!(rules("see www.example.org", Class::Category), [Rule::Url]);
    assert_eq!(rules("from 10.20.30.40 today", Class::Category), [Rule::Ip]);
    assert_eq!(
        rules("from fe80::1ff:fe23:4567:890a", Class::Category),
        [Rule::Ip]
    );
    assert_eq!(
        rules("MRN MR4471234 admitted", Class::Category),
        [Rule::Mrn]
    );
    assert_eq!(rules("seen 2019-03-04", Class::Category), [Rule::FullDate]);
    assert_eq!(rules("seen 03/04/2019", Class::Category), [Rule::FullDate]);
    assert_eq!(rules("seen 25.12.2019", Class::Category), [Rule::FullDate]);
    assert_eq!(rules("seen 12-25-19", Class::Category), [Rule::FullDate]);
    assert_eq!(
        rules("seen March 4, 2019", Class::Category),
        [Rule::FullDate]
    );
    assert_eq!(rules("seen 4 Mar 2019", Class::Category), [Rule::FullDate]);
    assert_eq!(rules("seen 03/2019", Class::Category), [Rule::FullDate]);
    assert_eq!(
        rules("seen in March 2019", Class::Category),
        [Rule::FullDate]
    );
    assert_eq!(rules("seen 04MAR2019", Class::Category), [Rule::FullDate]);
    // Eight digits are a compact date and, to the MRN rule, a number like a record's.
    assert_eq!(
        rules("seen 20190304", Class::Category),
        [Rule::Mrn, Rule::FullDate]
    );
    assert_eq!(rules("seen 20190304", Class::Code), Vec::<Rule>::new());
    // Full dates are fine where the profile keeps them.
    assert!(text_rules(
        "seen 2019-03-04",
        TextKind::of(&column("c", Class::Category)),
        false
    )
    .is_empty());
    // Codes of the terminologies, numbers, OIDs and short text are not identifiers.
    for (code, class) in [
        ("44054006", Class::Code),
        ("2345-7", Class::Code),
        ("E11.9", Class::Code),
        ("0069-3150-83", Class::Code),
        ("1.2.840.10008.5.1.4", Class::Code),
        ("1.2.840.10008.5.1.4", Class::Category),
        ("123456.78", Class::Value),
        ("mmol/L", Class::Unit),
        ("Type 2 diabetes mellitus", Class::Category),
        ("2019", Class::Category),
        ("12:30:45", Class::Category),
        ("version 10.20.30", Class::Category),
        ("BP 120/80/60", Class::Category),
    ] {
        assert_eq!(rules(code, class), Vec::<Rule>::new(), "{code}");
    }
    // An MRN in a code column is exempt; in a value column only when it is not a number.
    assert!(rules("4471234", Class::Code).is_empty());
    assert!(rules("4471234", Class::Value).is_empty());
    assert_eq!(rules("MR4471234", Class::Value), [Rule::Mrn]);
    // A measured value with a comparator is not a record number.
    assert!(rules(">100000 CFU/mL", Class::Value).is_empty());
}

#[test]
fn key_copies_count_only_above_one_percent_and_three_rows() {
    let n = 200;
    let schema = Arc::new(Schema::new(vec![
        Field::new("leak", DataType::Int64, true),
        Field::new("few", DataType::Utf8, true),
        Field::new("note", DataType::Utf8, true),
        Field::new("when", DataType::Date32, true),
    ]));
    let patients: ArrayRef = Arc::new(StringArray::from(
        (0..n).map(|i| format!("{}", 1000 + i)).collect::<Vec<_>>(),
    ));
    let keys: ArrayRef = Arc::new(Int64Array::from((0..n as i64).collect::<Vec<_>>()));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(
                (0..n as i64).map(|i| 1000 + i).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                (0..n)
                    .map(|i| if i < 2 { format!("{i}") } else { "x".into() })
                    .collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                (0..n)
                    .map(|i| {
                        if i == 7 {
                            "call 201-555-0143".to_string()
                        } else {
                            "ok".into()
                        }
                    })
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Date32Array::from(vec![Some(1); n])),
        ],
    )
    .unwrap();
    let columns = vec![
        column("leak", Class::Value),
        column("few", Class::Category),
        column("note", Class::FreeText),
        column("when", Class::Date),
    ];
    let mut s = Scanner::new(true);
    s.key_copies("t.parquet", &batch, &columns, &patients, &[keys]);
    s.batch("t.parquet", &batch, &columns);
    let found: Vec<(String, Rule, u64)> = s
        .findings()
        .into_iter()
        .map(|f| (f.column, f.rule, f.matches))
        .collect();
    assert_eq!(
        found,
        [
            ("leak".to_string(), Rule::PatientKeyCopy, 200),
            ("note".to_string(), Rule::Phone, 1),
            ("when".to_string(), Rule::FullDate, 200),
        ],
        "two record-key copies in 200 rows are below the threshold"
    );
    let text = s.findings()[1].to_string();
    assert!(
        text.contains("column note") && !text.contains("555"),
        "{text}"
    );
    let mut lenient = Scanner::new(false);
    lenient.batch("t.parquet", &batch, &columns);
    assert_eq!(lenient.findings().len(), 1, "dates may leave in full");
}

#[test]
fn fhir_resources_are_scanned_by_element() {
    let mut s = Scanner::new(true);
    let good = serde_json::json!({
        "resourceType": "Observation", "id": "20190304aa", "status": "final",
        "subject": { "reference": "Patient/0123456789abcdef0123456789abcdef" },
        "code": { "coding": [{ "system": "http://loinc.org", "code": "2345-7", "display": "Glucose" }] },
        "effectiveDateTime": "2019",
        "valueQuantity": { "value": 5.4, "unit": "mmol/L" }
    });
    s.resource(
        "Observation.ndjson",
        &good,
        Some(("p-17", &["4711".to_string()])),
    );
    assert!(s.findings().is_empty(), "{:?}", s.findings());
    let bad = serde_json::json!({
        "resourceType": "Observation", "status": "final",
        "note": [{ "text": "ring 201-555-0143" }],
        "effectiveDateTime": "2019-03-04"
    });
    s.resource("Observation.ndjson", &bad, None);
    let found: Vec<(String, Rule)> = s
        .findings()
        .into_iter()
        .map(|f| (f.column, f.rule))
        .collect();
    assert_eq!(
        found,
        [
            ("Observation.effectiveDateTime".to_string(), Rule::FullDate),
            ("Observation.note.text".to_string(), Rule::Phone),
        ]
    );
}
