//! The policy `strata init` drafts beside the config: a starting point for the records
//! manager, every rule marked for review, nothing destroyed until a retention is written. It
//! names the patients table and its birth and death dates, pins the patients table and the
//! tables without patients (reference data) to the operational database, and keeps ongoing
//! problems, medications, allergies and care plans (no end yet) clinically current.

use super::classes::class_from_name;
use super::{is_patient_table, toml_str, TableGuess};
use crate::db::TableSchema;
use std::collections::BTreeMap;
use std::fmt::Write;
use strata_deidentify::Class;

/// Resource types whose records are ongoing while they have no end.
const ONGOING: [&str; 5] = [
    "Condition",
    "MedicationRequest",
    "MedicationStatement",
    "AllergyIntolerance",
    "CarePlan",
];

/// The draft policy for the guessed `tables`.
pub(super) fn draft_policy(tables: &BTreeMap<String, (TableSchema, TableGuess)>) -> String {
    let mut s = String::from(
        "# Drafted by `strata init`: a starting point for the records manager. Review every rule;\n\
         # `strata plan` shows where each row would go, `strata explain` why.\n\
         version = \"draft-1\"\n\
         # as_of = \"YYYY-MM-DD\"  # REVIEW: the day records are judged by (by default, the day of the run)\n\
         timezone = \"UTC\"  # REVIEW: the zone in which timestamps become calendar days\n\
         undated = \"operational\"\n\n",
    );
    let patients = tables.iter().find(|(n, _)| is_patient_table(n));
    if let Some((name, (schema, _))) = patients {
        let column = |class: Class| {
            schema
                .columns
                .iter()
                .find(|c| class_from_name(&c.name, true) == Some(class))
                .map(|c| c.name.clone())
        };
        let _ = writeln!(s, "[patients]\ntable = {}", toml_str(name));
        if let Some(c) = column(Class::BirthDate) {
            let _ = writeln!(s, "birth_date = {}", toml_str(&c));
        }
        if let Some(c) = column(Class::DeathDate) {
            let _ = writeln!(s, "deceased_date = {}", toml_str(&c));
        }
        s.push_str("age_of_majority = 18  # REVIEW\n\n");
    }
    s.push_str(
        "[defaults]\n\
         archive_after = \"3y\"  # REVIEW: records older than this may be archived...\n\
         patient_inactive_after = \"2y\"  # REVIEW: ...once their patient has been inactive this long\n\
         # retention = \"10y\"  # REVIEW: destruction after the last activity; none until written\n\n",
    );
    for (name, (schema, g)) in tables {
        let key = super::toml_key(name);
        if is_patient_table(name) {
            let _ = writeln!(
                s,
                "[tables.{key}]\ntier = \"operational\"  # the patients themselves\npermanent = true\n"
            );
        } else if g.patient_key.is_none() && g.patient_via.is_none() {
            let _ = writeln!(
                s,
                "[tables.{key}]\ntier = \"operational\"  # REVIEW: no patient column (reference data?)\n"
            );
        } else if let Some(end) = g
            .fhir
            .as_ref()
            .filter(|f| ONGOING.contains(&f.resource))
            .and_then(|_| super::conventions::end_column(schema))
        {
            let _ = writeln!(
                s,
                "[tables.{key}]\ncurrent_when = {{ column = {}, values = [\"<null>\"] }}  # REVIEW: ongoing while it has no end\n",
                toml_str(&end)
            );
        }
    }
    s
}
