//! The classes of archived columns that researchers' exports follow: those that follow from
//! the config (the patient key, the foreign key that reaches a patient, primary keys, BLOBs,
//! the record date, the policy's birth and death dates), and those declared in `strata.toml`
//! (`[tables.T.columns.C] class = "..."`, `[tables.T.computed.C] class = "..."`).
//!
//! Classes are keyed by the column's archived name (after `rename`). A declaration that
//! contradicts the config (a primary key declared `code`) is a problem, not a silent override:
//! what follows from the config always wins.

use crate::config::{MigrationConfig, RecordDateConfig, TableConfig};
use std::collections::BTreeMap;
use strata_cutoff_policies::PatientFactsConfig;
use strata_deidentify::{Class, Classification, ColumnClass, PatientsTable, TableClasses};

/// The name a source column is archived under.
fn archived_name(table: &TableConfig, column: &str) -> String {
    table
        .columns
        .get(column)
        .and_then(|m| m.rename.clone())
        .unwrap_or_else(|| column.to_string())
}

impl MigrationConfig {
    /// The classes of every configured table's archived columns, with the patients table the
    /// policy names (`patients`: birth and death dates are classed from it). Every problem of
    /// the declarations is listed.
    pub fn classification(
        &self,
        patients: Option<&PatientFactsConfig>,
    ) -> Result<Classification, Vec<String>> {
        let mut problems = Vec::new();
        let mut out = Classification::default();
        for (name, table) in &self.tables {
            let mut derived: BTreeMap<String, (ColumnClass, String)> = BTreeMap::new();
            let mut derive = |column: &str, class: ColumnClass, why: String| {
                derived.insert(archived_name(table, column), (class, why));
            };
            for c in &table.primary_key {
                derive(
                    c,
                    ColumnClass {
                        class: Class::RecordKey,
                        domain: Some(name.clone()),
                    },
                    "it is the table's primary key".into(),
                );
            }
            if let Some(via) = &table.patient {
                derive(
                    &via.foreign_key,
                    ColumnClass {
                        class: Class::RecordKey,
                        domain: Some(via.via.clone()),
                    },
                    format!("it reaches the patient through {}", via.via),
                );
            }
            match &table.record_date {
                Some(RecordDateConfig::Column(c)) => derive(
                    c,
                    ColumnClass::of(Class::Date),
                    "it is the record date".into(),
                ),
                Some(RecordDateConfig::Period { start, end }) => {
                    for c in [start, end] {
                        derive(
                            c,
                            ColumnClass::of(Class::Date),
                            "it dates the record (a period)".into(),
                        );
                    }
                }
                Some(RecordDateConfig::Via {
                    via, foreign_key, ..
                }) => derive(
                    foreign_key,
                    ColumnClass {
                        class: Class::RecordKey,
                        domain: Some(via.clone()),
                    },
                    format!("it reaches the record date through {via}"),
                ),
                None => {}
            }
            if let Some(p) = patients.filter(|p| &p.table == name) {
                if let Some(c) = &p.birth_date {
                    derive(
                        c,
                        ColumnClass::of(Class::BirthDate),
                        "the policy's [patients] birth_date".into(),
                    );
                }
                if let Some(c) = &p.deceased_date {
                    derive(
                        c,
                        ColumnClass::of(Class::DeathDate),
                        "the policy's [patients] deceased_date".into(),
                    );
                }
            }
            if let Some(c) = &table.patient_key {
                derive(
                    c,
                    ColumnClass::of(Class::PatientKey),
                    "it is the patient key".into(),
                );
            }
            let mut classes = TableClasses {
                primary_key: table
                    .primary_key
                    .iter()
                    .map(|c| archived_name(table, c))
                    .collect(),
                ..Default::default()
            };
            for b in &table.blobs {
                let base = archived_name(table, &b.column);
                for suffix in strata_archive::BLOB_REF_SUFFIXES {
                    classes
                        .columns
                        .insert(format!("{base}{suffix}"), ColumnClass::of(Class::Blob));
                }
            }
            let declared = table
                .columns
                .iter()
                .map(|(c, m)| (c, m.class.as_ref(), m.references.as_ref(), "columns"))
                .chain(
                    table
                        .computed
                        .iter()
                        .map(|(c, m)| (c, m.class.as_ref(), None, "computed")),
                );
            for (column, class, references, section) in declared {
                let at = format!("[tables.{name}.{section}.{column}]");
                let Some(text) = class else {
                    if references.is_some() {
                        problems.push(format!(
                            "{at} references: only a record_key column references a table"
                        ));
                    }
                    continue;
                };
                let Some(class) = Class::parse(text) else {
                    problems.push(format!(
                        "{at} class: {text:?} is not a class ({})",
                        Class::names()
                    ));
                    continue;
                };
                if class == Class::Blob {
                    problems.push(format!(
                        "{at} class: blob follows from the table's `blobs`; declare the column there"
                    ));
                    continue;
                }
                let target = archived_name(table, column);
                if let Some((d, why)) = derived.get(&target) {
                    if d.class != class {
                        problems.push(format!(
                            "{at} class: {column} is {} because {why}; remove the declaration",
                            d.class
                        ));
                    }
                    continue;
                }
                let domain = match references {
                    Some(_) if class != Class::RecordKey => {
                        problems.push(format!(
                            "{at} references: only a record_key column references a table (this one is {class})"
                        ));
                        None
                    }
                    Some(r) if !self.tables.contains_key(r) => {
                        problems.push(format!("{at} references: table {r:?} is not configured"));
                        None
                    }
                    Some(r) => Some(r.clone()),
                    None => None,
                };
                classes
                    .columns
                    .insert(target, ColumnClass { class, domain });
            }
            for (column, (class, _)) in derived {
                classes.columns.insert(column, class);
            }
            out.tables.insert(name.clone(), classes);
        }
        if let Some(p) = patients {
            if let Some(key) = self
                .tables
                .get(&p.table)
                .and_then(|t| t.patient_key.as_ref().map(|k| archived_name(t, k)))
            {
                out.patients = Some(PatientsTable {
                    table: p.table.clone(),
                    key,
                });
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tables: &str) -> MigrationConfig {
        let text = format!(
            "[source]\nurl = \"sqlite://a.db\"\n[operational]\nurl = \"sqlite://b.db\"\n\
             [archive]\nlocation = \"archive\"\nkek_id = \"k\"\nkek_env = \"K\"\n\
             [policy]\nfile = \"policy.toml\"\n{tables}"
        );
        MigrationConfig::parse(toml::from_str(&text).unwrap(), std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn classes_follow_the_config_and_declarations_never_override_it() {
        let c = config(
            r#"
            [tables.person]
            primary_key = ["person_id"]
            patient_key = "person_id"
            columns.year_of_birth.class = "category"
            columns.zip.class = "zip"
            columns.zip.rename = "postal_code"
            [tables.visit]
            primary_key = ["visit_id"]
            patient_key = "person_id"
            record_date = "visit_start"
            blobs = [{ column = "scan" }]
            columns.provider_id = { class = "record_key", references = "person" }
            [tables.dx]
            primary_key = ["dx_id"]
            patient = { via = "visit", foreign_key = "visit_id" }
            computed.label = { expr = "code || ' ' || text", class = "category" }
            "#,
        );
        let patients = PatientFactsConfig {
            table: "person".into(),
            birth_date: Some("birth".into()),
            deceased_date: None,
            age_of_majority: 18,
        };
        let k = c.classification(Some(&patients)).unwrap();
        let class = |t: &str, col: &str| {
            k.tables[t]
                .columns
                .get(col)
                .map(|c| (c.class, c.domain().to_string()))
        };
        assert_eq!(
            class("person", "person_id"),
            Some((Class::PatientKey, "patient".into()))
        );
        assert_eq!(
            class("person", "postal_code"),
            Some((Class::Zip, "zip".into()))
        );
        assert_eq!(class("person", "zip"), None, "classes go by archived name");
        assert_eq!(
            class("person", "birth"),
            Some((Class::BirthDate, "birth_date".into()))
        );
        assert_eq!(
            class("visit", "visit_id"),
            Some((Class::RecordKey, "visit".into()))
        );
        assert_eq!(
            class("visit", "provider_id"),
            Some((Class::RecordKey, "person".into()))
        );
        assert_eq!(
            class("visit", "visit_start"),
            Some((Class::Date, "date".into()))
        );
        assert_eq!(
            class("visit", "scan__sha256"),
            Some((Class::Blob, "blob".into()))
        );
        assert_eq!(
            class("dx", "visit_id"),
            Some((Class::RecordKey, "visit".into()))
        );
        assert_eq!(
            class("dx", "label"),
            Some((Class::Category, "category".into()))
        );
        assert_eq!(k.tables["dx"].primary_key, ["dx_id"]);
        assert_eq!(k.patients.unwrap().key, "person_id");

        let bad = config(
            r#"
            [tables.person]
            primary_key = ["person_id"]
            patient_key = "person_id"
            columns.person_id.class = "code"
            columns.nick.class = "nickname"
            columns.photo.class = "blob"
            columns.x = { class = "code", references = "person" }
            columns.y = { class = "record_key", references = "nowhere" }
            "#,
        );
        let problems = bad.classification(None).unwrap_err();
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(
            problems.iter().any(|p| p.contains("it is the patient key")),
            "{problems:#?}"
        );
    }
}
