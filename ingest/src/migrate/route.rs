//! The route stage: the one place a row's tier is decided. A row as read from its source
//! (values in the table's column order, the patient key taken out) is mapped, coerced to its
//! columns' types and decided by the policy, with no IO, so that every way a record moves
//! (bulk copy, plan, explain; later change sync and tiering) decides it the same way.
//! Checks across rows (repeated keys) and what a target would refuse belong to the sinks.

use crate::facts::local_date;
use crate::layout::{DateField, RecordDate, RowExtras, TableLayout};
use crate::value::{ColumnType, Value};
use chrono::NaiveDate;
use std::collections::HashMap;
use strata_cutoff_policies::{Decision, PatientFacts, Policy, RecordFacts};

/// What the route stage made of a row.
pub(super) enum Route {
    /// A value could not be mapped or read as its column's type: the row goes to quarantine
    /// (`column` indexes the table's columns).
    Quarantine { column: usize, reason: &'static str },
    /// The policy's decision, and the record date it saw.
    Decided {
        decision: Decision,
        date: Option<NaiveDate>,
    },
}

/// The route stage for one table.
pub(super) struct Router<'a> {
    policy: &'a Policy,
    layout: &'a TableLayout,
    types: Vec<ColumnType>,
    facts: &'a HashMap<String, PatientFacts>,
}

impl<'a> Router<'a> {
    /// The stage for `layout`'s rows under `policy`, with the patients' `facts`.
    pub(super) fn new(
        policy: &'a Policy,
        layout: &'a TableLayout,
        facts: &'a HashMap<String, PatientFacts>,
    ) -> Self {
        Router {
            policy,
            layout,
            types: layout.columns().iter().map(|c| c.col_type).collect(),
            facts,
        }
    }

    /// Maps and coerces `values` in place, then lets the policy decide. On a quarantine the
    /// values are left as read from the column that failed on.
    pub(super) fn route(&self, values: &mut [Value], extras: &RowExtras) -> Route {
        if let Some((column, reason)) = self.prepare(values) {
            return Route::Quarantine { column, reason };
        }
        let patient = extras.patient.as_deref();
        let row = self.facts(values, extras);
        let record = row.record(self.policy, patient);
        let decision =
            self.policy
                .decide(&self.layout.name, &record, &self.layout.policy_column_names);
        Route::Decided {
            decision,
            date: row.date,
        }
    }

    /// Maps and coerces `values` in place: the column and reason of the first failure.
    pub(super) fn prepare(&self, values: &mut [Value]) -> Option<(usize, &'static str)> {
        self.layout
            .map_row(values)
            .or_else(|| coerce_row(values, &self.types))
    }

    /// What the policy needs of a prepared row.
    pub(super) fn facts(&self, values: &[Value], extras: &RowExtras) -> RowFacts {
        let patient = extras.patient.as_deref();
        RowFacts {
            date: self.record_date(values, &extras.parent_dates),
            columns: self
                .layout
                .policy_columns
                .iter()
                .map(|i| i.and_then(|i| values[i].as_key_text()))
                .collect(),
            patient: patient
                .and_then(|p| self.facts.get(p).copied())
                .unwrap_or_default(),
        }
    }
}

impl Router<'_> {
    /// A prepared row's record date in the policy's time zone: a period's end, or `as_of`
    /// while the period is open (no end, a start).
    fn record_date(&self, values: &[Value], parents: &[Value]) -> Option<NaiveDate> {
        match &self.layout.record_date {
            RecordDate::None => None,
            RecordDate::Point(f) => self.date(f, values, parents),
            RecordDate::Period { start, end } => {
                let open = self.value(end, values, parents).is_null()
                    && !self.value(start, values, parents).is_null();
                if open {
                    self.policy.as_of()
                } else {
                    self.date(end, values, parents)
                }
            }
        }
    }

    fn value<'v>(&self, f: &DateField, values: &'v [Value], parents: &'v [Value]) -> &'v Value {
        match f {
            DateField::Column(i) => &values[*i],
            DateField::Parent { field, .. } => parents.get(*field).unwrap_or(&Value::Null),
        }
    }

    fn date(&self, f: &DateField, values: &[Value], parents: &[Value]) -> Option<NaiveDate> {
        let v = self.value(f, values, parents);
        match f {
            DateField::Column(_) => local_date(self.policy, v),
            // Mapped and read as the parent's column is (an unreadable date is a missing one:
            // the parent's own row is quarantined for it).
            DateField::Parent { col_type, map, .. } => {
                let v = match map {
                    Some(m) => m.apply(v.clone(), *col_type).ok()?,
                    None => v.clone(),
                };
                local_date(self.policy, &v.coerce(*col_type).ok()?)
            }
        }
    }
}

/// What the policy needs of one row, owned, so that a [`RecordFacts`] can borrow it.
pub(super) struct RowFacts {
    /// The record date in the policy's time zone.
    pub(super) date: Option<NaiveDate>,
    /// The policy's columns as text, in the policy's order.
    pub(super) columns: Vec<Option<String>>,
    /// The row's patient's facts.
    pub(super) patient: PatientFacts,
}

impl RowFacts {
    pub(super) fn record<'a>(
        &'a self,
        policy: &Policy,
        patient: Option<&'a str>,
    ) -> RecordFacts<'a> {
        RecordFacts {
            record_date: policy.date_fact(self.date),
            patient,
            patient_facts: self.patient,
            columns: &self.columns,
        }
    }
}

/// Coerces every value to its column's type in place; on failure returns the column and the
/// reason and leaves the row as read.
pub(crate) fn coerce_row(
    values: &mut [Value],
    types: &[ColumnType],
) -> Option<(usize, &'static str)> {
    for (i, (v, t)) in values.iter_mut().zip(types).enumerate() {
        if already(v, *t) {
            continue;
        }
        match v.clone().coerce(*t) {
            Ok(c) => *v = c,
            Err(reason) => return Some((i, reason)),
        }
    }
    None
}

fn already(v: &Value, t: ColumnType) -> bool {
    matches!(
        (v, t),
        (Value::Null, _)
            | (Value::Int(_), ColumnType::Int)
            | (Value::Float(_), ColumnType::Float)
            | (Value::Bool(_), ColumnType::Bool)
            | (Value::Text(_), ColumnType::Text | ColumnType::Other)
            | (Value::Bytes(_), ColumnType::Bytes)
            | (Value::Date(_), ColumnType::Date)
            | (Value::Timestamp(_), ColumnType::Timestamp)
            | (Value::TimestampTz(_), ColumnType::TimestampTz)
    )
}
