//! Column classes: what a column holds, as far as disclosure is concerned.
//!
//! Some classes follow from the configuration (the patient key and the columns that reach a
//! patient, primary and foreign keys, BLOB columns) or from the column's type (dates and
//! timestamps); the others are declared in `strata.toml` (`[tables.T.columns.C] class = ...`).
//! A column with no class has no rule in any profile, so it never leaves.

use arrow::datatypes::DataType;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a column holds. The identifier classes follow the 18 kinds of identifier of the HIPAA
/// Safe Harbor method (45 CFR 164.514(b)(2)(i)); [`Class::safe_harbor_item`] names each one's item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// The patient key, and any column holding it.
    PatientKey,
    /// A record key: a primary key column, or a foreign key to another table's records.
    RecordKey,
    /// A document (BLOB) and its reference columns.
    Blob,
    /// A date or timestamp (any column of a date or timestamp type, unless declared a birth or
    /// death date).
    Date,
    /// The patient's date of birth.
    BirthDate,
    /// The patient's date of death.
    DeathDate,
    /// An age in years.
    Age,
    /// A person's name.
    Name,
    /// A street address.
    Address,
    /// A city or town.
    City,
    /// A county.
    County,
    /// A ZIP (postal) code.
    Zip,
    /// A state.
    State,
    /// A telephone number.
    Phone,
    /// A fax number.
    Fax,
    /// An e-mail address.
    Email,
    /// A social security number.
    Ssn,
    /// A medical record number.
    Mrn,
    /// A health plan beneficiary (member) number.
    HealthPlan,
    /// An account number.
    Account,
    /// A certificate or licence number.
    License,
    /// A vehicle identifier or serial number (VIN, plate).
    Vehicle,
    /// A device identifier or serial number.
    Device,
    /// A web address.
    Url,
    /// An IP address.
    Ip,
    /// A biometric identifier (finger or voice print).
    Biometric,
    /// A photograph or comparable image.
    Photo,
    /// Any other unique identifying number, characteristic or code.
    UniqueId,
    /// Free text: notes, comments, narratives.
    FreeText,
    /// A code of a terminology (ICD-10, SNOMED CT, LOINC, RxNorm, CPT, ...).
    Code,
    /// A measured or recorded value (a lab result, a dose, an amount).
    Value,
    /// A unit of measure.
    Unit,
    /// A value from a short list: a status, a type, a code's display text, race, ethnicity.
    Category,
    /// Administrative sex or gender.
    Sex,
}

impl Class {
    /// Every class, in declaration order.
    pub const ALL: [Class; 34] = [
        Class::PatientKey,
        Class::RecordKey,
        Class::Blob,
        Class::Date,
        Class::BirthDate,
        Class::DeathDate,
        Class::Age,
        Class::Name,
        Class::Address,
        Class::City,
        Class::County,
        Class::Zip,
        Class::State,
        Class::Phone,
        Class::Fax,
        Class::Email,
        Class::Ssn,
        Class::Mrn,
        Class::HealthPlan,
        Class::Account,
        Class::License,
        Class::Vehicle,
        Class::Device,
        Class::Url,
        Class::Ip,
        Class::Biometric,
        Class::Photo,
        Class::UniqueId,
        Class::FreeText,
        Class::Code,
        Class::Value,
        Class::Unit,
        Class::Category,
        Class::Sex,
    ];

    /// The class's name in `strata.toml`.
    pub fn name(self) -> &'static str {
        match self {
            Class::PatientKey => "patient_key",
            Class::RecordKey => "record_key",
            Class::Blob => "blob",
            Class::Date => "date",
            Class::BirthDate => "birth_date",
            Class::DeathDate => "death_date",
            Class::Age => "age",
            Class::Name => "name",
            Class::Address => "address",
            Class::City => "city",
            Class::County => "county",
            Class::Zip => "zip",
            Class::State => "state",
            Class::Phone => "phone",
            Class::Fax => "fax",
            Class::Email => "email",
            Class::Ssn => "ssn",
            Class::Mrn => "mrn",
            Class::HealthPlan => "health_plan",
            Class::Account => "account",
            Class::License => "license",
            Class::Vehicle => "vehicle",
            Class::Device => "device",
            Class::Url => "url",
            Class::Ip => "ip",
            Class::Biometric => "biometric",
            Class::Photo => "photo",
            Class::UniqueId => "unique_id",
            Class::FreeText => "free_text",
            Class::Code => "code",
            Class::Value => "value",
            Class::Unit => "unit",
            Class::Category => "category",
            Class::Sex => "sex",
        }
    }

    /// The class named `text` in `strata.toml`.
    pub fn parse(text: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == text)
    }

    /// The names of every class, for error messages.
    pub fn names() -> String {
        Class::ALL.map(Class::name).join(", ")
    }

    /// The item of 45 CFR 164.514(b)(2)(i) the class falls under, if it is an identifier.
    pub fn safe_harbor_item(self) -> Option<&'static str> {
        Some(match self {
            Class::Name => "(A) names",
            Class::Address | Class::City | Class::County | Class::Zip => {
                "(B) geographic subdivisions smaller than a state"
            }
            Class::Date | Class::BirthDate | Class::DeathDate | Class::Age => {
                "(C) all elements of dates except the year; ages over 89"
            }
            Class::Phone => "(D) telephone numbers",
            Class::Fax => "(E) fax numbers",
            Class::Email => "(F) e-mail addresses",
            Class::Ssn => "(G) social security numbers",
            Class::Mrn => "(H) medical record numbers",
            Class::HealthPlan => "(I) health plan beneficiary numbers",
            Class::Account => "(J) account numbers",
            Class::License => "(K) certificate/license numbers",
            Class::Vehicle => "(L) vehicle identifiers and serial numbers",
            Class::Device => "(M) device identifiers and serial numbers",
            Class::Url => "(N) web URLs",
            Class::Ip => "(O) IP addresses",
            Class::Biometric => "(P) biometric identifiers",
            Class::Photo | Class::Blob => "(Q) full-face photographs and comparable images",
            Class::PatientKey | Class::RecordKey | Class::UniqueId => {
                "(R) any other unique identifying number, characteristic or code"
            }
            Class::FreeText => "free text may hold any of (A)-(R)",
            Class::State
            | Class::Code
            | Class::Value
            | Class::Unit
            | Class::Category
            | Class::Sex => return None,
        })
    }

    /// Whether the class holds dates.
    pub fn is_date(self) -> bool {
        matches!(self, Class::Date | Class::BirthDate | Class::DeathDate)
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The pseudonym domain of patient keys.
pub const PATIENT_DOMAIN: &str = "patient";

/// A column's class, with the domain its pseudonyms are drawn in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnClass {
    /// The class.
    pub class: Class,
    /// The pseudonym domain: values of the same domain get the same pseudonym in every table
    /// (a foreign key's domain is the table it points to). By default, the class's name.
    pub domain: Option<String>,
}

impl ColumnClass {
    /// A class with the class's own domain.
    pub fn of(class: Class) -> Self {
        ColumnClass {
            class,
            domain: None,
        }
    }

    /// The domain pseudonyms of this column are drawn in: `patient` for every column holding
    /// the patient key (so they all match the export's patient pseudonym).
    pub fn domain(&self) -> &str {
        match (&self.domain, self.class) {
            (_, Class::PatientKey) => PATIENT_DOMAIN,
            (Some(d), _) => d,
            (None, c) => c.name(),
        }
    }
}

/// The classes of one archived table's columns, by archived column name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TableClasses {
    /// Classes by archived column name (after renames; a BLOB column's reference columns are
    /// listed under their own names).
    pub columns: BTreeMap<String, ColumnClass>,
    /// The primary key's archived column names (the scanner compares output values with them).
    pub primary_key: Vec<String>,
}

impl TableClasses {
    /// The class of column `name` of type `data_type`: a column of a date or timestamp type is
    /// always a date (a birth or death date when declared so), whatever else it was declared;
    /// a column nobody classified has none.
    pub fn class_of(&self, name: &str, data_type: &DataType) -> Option<ColumnClass> {
        let declared = self.columns.get(name);
        let dated = matches!(
            data_type,
            DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
        );
        match declared {
            Some(c) if dated && !c.class.is_date() => Some(ColumnClass::of(Class::Date)),
            Some(c) => Some(c.clone()),
            None if dated => Some(ColumnClass::of(Class::Date)),
            None => None,
        }
    }
}

/// Where the patients' demographics live (for FHIR `Patient` resources).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PatientsTable {
    /// The table.
    pub table: String,
    /// Its column holding the patient key (in the operational database and the archive).
    pub key: String,
}

/// The classes of every archived table.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Classification {
    /// By table.
    pub tables: BTreeMap<String, TableClasses>,
    /// The patients table, when the policy names one.
    pub patients: Option<PatientsTable>,
}

impl Classification {
    /// The classes of `table` (none when it is not configured: nothing of it leaves).
    pub fn table(&self, table: &str) -> TableClasses {
        self.tables.get(table).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_every_identifier_names_its_item() {
        for c in Class::ALL {
            assert_eq!(Class::parse(c.name()), Some(c));
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                serde_json::Value::String(c.name().into())
            );
        }
        assert_eq!(Class::parse("nickname"), None);
        let items: std::collections::BTreeSet<&str> = Class::ALL
            .iter()
            .filter_map(|c| c.safe_harbor_item())
            .filter_map(|i| i.strip_prefix('(')?.split(')').next())
            .collect();
        assert_eq!(items.len(), 18, "A to R: {items:?}");
    }

    #[test]
    fn dated_columns_are_dates_whatever_they_were_declared() {
        let mut t = TableClasses::default();
        t.columns
            .insert("dob".into(), ColumnClass::of(Class::BirthDate));
        t.columns
            .insert("seen".into(), ColumnClass::of(Class::Code));
        t.columns
            .insert("note".into(), ColumnClass::of(Class::FreeText));
        let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None);
        assert_eq!(
            t.class_of("dob", &DataType::Date32).unwrap().class,
            Class::BirthDate
        );
        assert_eq!(t.class_of("seen", &ts).unwrap().class, Class::Date);
        assert_eq!(t.class_of("other", &ts).unwrap().class, Class::Date);
        assert_eq!(
            t.class_of("note", &DataType::Utf8).unwrap().class,
            Class::FreeText
        );
        assert_eq!(t.class_of("other", &DataType::Utf8), None);
    }
}
