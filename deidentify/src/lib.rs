//! De-identification for what leaves Strata in researchers' exports.
//!
//! Key decision: **allow-lists, fail closed.** Every archived column has a [`Class`] — from the
//! configuration (keys, BLOBs), from its type (dates), or declared by the site — and an export
//! [`Profile`] names the classes it lets out and the [`Action`] applied to each (keep, year,
//! shift, pseudonym, ZIP3, age 90+). A column whose class the profile does not name, or that
//! has no class at all, is removed, never copied: a column added to a source table cannot leak
//! into the next export. Before an export is released, a [`Scanner`] reads every output value
//! and names each column that still looks like an identifier, so that the export fails instead.
//!
//! Two profiles are built in: HIPAA Safe Harbor ([`Profile::safe_harbor`]) and a limited data
//! set ([`Profile::limited_data_set`]). Pseudonyms are keyed ([`PseudonymKey`], 45 CFR
//! 164.514(c)).
//!
//! ```
//! use std::sync::Arc;
//! use arrow::array::{Date32Array, RecordBatch, StringArray};
//! use arrow::datatypes::{DataType, Field, Schema};
//! use strata_deidentify::*;
//!
//! let schema = Arc::new(Schema::new(vec![
//!     Field::new("_strata_patient", DataType::Utf8, false),
//!     Field::new("_strata_record_date", DataType::Date32, true),
//!     Field::new("_strata_key", DataType::Utf8, false),
//!     Field::new("family_name", DataType::Utf8, true),
//!     Field::new("loinc_code", DataType::Utf8, true),
//!     Field::new("remark", DataType::Utf8, true),
//! ]));
//! let rows = RecordBatch::try_new(schema.clone(), vec![
//!     Arc::new(StringArray::from(vec!["17"])),
//!     Arc::new(Date32Array::from(vec![Some(18_000)])),
//!     Arc::new(StringArray::from(vec!["id=4711"])),
//!     Arc::new(StringArray::from(vec!["Lee"])),
//!     Arc::new(StringArray::from(vec!["2345-7"])),
//!     Arc::new(StringArray::from(vec!["nobody classified this column"])),
//! ]).unwrap();
//! let mut classes = TableClasses::default();
//! classes.columns.insert("family_name".into(), ColumnClass::of(Class::Name));
//! classes.columns.insert("loinc_code".into(), ColumnClass::of(Class::Code));
//!
//! let plan = TablePlan::new("labs", schema, &classes, &Profile::safe_harbor(), None).unwrap();
//! let ctx = ExportContext {
//!     key: PseudonymKey::new(&[7; 32]),
//!     as_of: chrono::NaiveDate::from_ymd_opt(2026, 6, 30).unwrap(),
//!     zip3: Arc::default(),
//! };
//! let out = plan.apply(&rows, &ctx).unwrap();
//! let names: Vec<_> = out.schema().fields().iter().map(|f| f.name().clone()).collect();
//! assert_eq!(names, ["patient_pseudonym", "record_year", "loinc_code"]);
//!
//! let mut scanner = Scanner::new(true);
//! scanner.batch("labs.parquet", &out, &plan.scan_columns());
//! assert!(scanner.findings().is_empty());
//! ```
#![deny(missing_docs)]

mod class;
mod profile;
mod pseudonym;
mod scan;
mod transform;
mod zip3;

pub use class::{Class, Classification, ColumnClass, PatientsTable, TableClasses};
pub use profile::{Action, Profile, ProfileConfig, LIMITED_DATA_SET, SAFE_HARBOR};
pub use pseudonym::PseudonymKey;
pub use scan::{patterns_in, Finding, Rule, ScanColumn, Scanner};
pub use transform::{merge_schemas, ExportContext, OutputColumn, TablePlan, PATIENT_PSEUDONYM};
pub use zip3::{RestrictedZip3, HHS_RESTRICTED_ZIP3};
