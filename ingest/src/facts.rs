//! Patient-level facts, computed once per patient from the data before any table is decided:
//! last activity (latest plausible record date in any table), birth and death dates.

use crate::db::{pg_select_expr, quote, Db, DbKind};
use crate::error::Result;
use crate::layout::TableLayout;
use crate::value::{ColumnType, Value};
use chrono::NaiveDate;
use futures::StreamExt;
use std::collections::HashMap;
use strata_cutoff_policies::{DateFact, PatientFacts, Policy};

/// A value's calendar date in the policy's time zone.
pub fn local_date(policy: &Policy, v: &Value) -> Option<NaiveDate> {
    match v {
        Value::TimestampTz(t) => Some(policy.local_date(*t)),
        other => other.as_date(),
    }
}

/// Where birth and death dates are read: the patient table, its patient-key column, and the
/// two date columns with their types.
pub struct PatientTable<'a> {
    /// The table's layout.
    pub layout: &'a TableLayout,
    /// The birth-date column.
    pub birth: Option<String>,
    /// The death-date column.
    pub death: Option<String>,
}

/// Computes every patient's facts.
pub async fn patient_facts(
    source: &Db,
    policy: &Policy,
    layouts: &[TableLayout],
    patients: Option<PatientTable<'_>>,
    snapshot: Option<&str>,
) -> Result<HashMap<String, PatientFacts>> {
    let as_of = policy
        .as_of()
        .expect("as_of is set before facts are computed");
    let before = as_of.succ_opt().unwrap_or(NaiveDate::MAX).to_string();
    let mut facts: HashMap<String, PatientFacts> = HashMap::new();
    for layout in layouts {
        let Some((sql, types)) = layout.last_activity_sql(source, &before) else {
            continue;
        };
        let mut rows = source.fetch_in(sql, types, snapshot);
        while let Some(row) = rows.next().await {
            let row = row?;
            // A period table's third field says the patient has an open period.
            let open = matches!(row.get(2), Some(Value::Int(1)));
            let ended = local_date(policy, &row[1]);
            let date = if open { Some(as_of) } else { ended };
            let (Some(patient), Some(date)) = (row[0].as_key_text(), date) else {
                continue;
            };
            if policy.date_fact(Some(date)) != DateFact::Valid(date) {
                continue;
            }
            let f = facts.entry(patient).or_default();
            f.last_activity = Some(f.last_activity.map_or(date, |d| d.max(date)));
        }
    }
    if let Some(p) = patients {
        let col = |name: &Option<String>| -> (String, ColumnType) {
            match name.as_ref().and_then(|n| p.layout.schema.column(n)) {
                Some(c) => {
                    let e = format!("t0.{}", quote(&c.name));
                    match source.kind() {
                        DbKind::Postgres => (pg_select_expr(&e, c.col_type), c.col_type),
                        DbKind::Sqlite => (e, c.col_type),
                    }
                }
                None => ("NULL".into(), ColumnType::Text),
            }
        };
        let (birth, birth_type) = col(&p.birth);
        let (death, death_type) = col(&p.death);
        let sql = format!(
            "SELECT CAST({} AS TEXT), {birth}, {death} FROM {} AS t0{}",
            p.layout.patient_expr,
            quote(&p.layout.relation),
            p.layout.joins
        );
        let mut rows = source.fetch_in(
            sql,
            vec![ColumnType::Text, birth_type, death_type],
            snapshot,
        );
        while let Some(row) = rows.next().await {
            let row = row?;
            let Some(patient) = row[0].as_key_text() else {
                continue;
            };
            let f = facts.entry(patient).or_default();
            f.birth_date = local_date(policy, &row[1]);
            f.deceased_date = local_date(policy, &row[2]);
        }
    }
    Ok(facts)
}
