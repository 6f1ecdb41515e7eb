//! What a config and its policy allow but probably do not mean: rows archived where the
//! patient API can never find them, a patients table keyed by another column than the one its
//! patients are named by everywhere else. Warnings, not errors: `policy check`, `plan` and
//! `migrate` print them, and nothing stops.

use crate::config::MigrationConfig;
use crate::db::TableSchema;
use std::collections::BTreeMap;
use strata_cutoff_policies::{PolicyConfig, Tier};

/// Every warning for `config` under `policy` (over the source's `schemas`), naming the table
/// and what to set.
pub fn config_warnings(
    config: &MigrationConfig,
    policy: &PolicyConfig,
    schemas: &BTreeMap<String, TableSchema>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    let pinned = |t: &str| policy.tables.get(t).and_then(|r| r.tier);
    for (name, t) in &config.tables {
        let archivable = !matches!(pinned(name), Some(Tier::Operational));
        if t.patient_key.is_none() && t.patient.is_none() && archivable {
            warnings.push(format!(
                "[tables.{name}]: no patient_key (nor patient = {{ via, foreign_key }}), yet the policy can archive its rows: no patient's history would ever show them. Name its patient, or pin it in the policy (tier = \"operational\") if it is reference data"
            ));
        }
    }
    // The column the clinical tables name their patient by, and in how many tables: when the
    // patients table has a column of that name, it is the one to key it by.
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    if let Some(p) = &policy.patients {
        for (name, t) in &config.tables {
            if *name != p.table {
                if let Some(k) = &t.patient_key {
                    *names.entry(k.as_str()).or_default() += 1;
                }
            }
        }
        let shared = names.iter().max_by_key(|(_, n)| **n);
        let has = |c: &str| schemas.get(&p.table).is_some_and(|s| s.column(c).is_some());
        if let (Some(table), Some((column, n))) = (config.tables.get(&p.table), shared) {
            match &table.patient_key {
                Some(k) if k != column && has(column) => warnings.push(format!(
                    "[tables.{}] patient_key = {k:?}, but the other tables name their patient by {column:?} ({n} of them): birth and death dates would match no one's records. Key the patients table by {column:?}",
                    p.table
                )),
                _ => {}
            }
        }
    }
    warnings
}
