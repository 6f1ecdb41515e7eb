//! `strata explain`: how one record was decided, from its row in the source.

use super::naming::row_digest;
use super::route::Router;
use super::{Explanation, Migration};
use crate::db::quote;
use crate::error::{IngestError, Result};
use crate::layout::{RowExtras, TableLayout};
use crate::value::Value;
use chrono::NaiveDate;
use futures::StreamExt;
use std::collections::HashMap;
use strata_cutoff_policies::DateFact;

impl Migration {
    /// Explains one record's tier. `key` is the primary key value, or `col=value,...` for a
    /// composite key; for a table without a primary key, the record's name in the archive (a
    /// digest of its values, `digest#2` for the second of identical rows, as the API shows).
    pub async fn explain(&self, table: &str, key: &str) -> Result<Explanation> {
        let layout = self
            .layouts
            .iter()
            .find(|l| l.name == table)
            .ok_or_else(|| IngestError::Run(format!("table {table} is not configured")))?;
        if layout.key.is_empty() {
            return self.explain_keyless(layout, key).await;
        }
        let parts: Vec<(String, String)> = if layout.key.len() == 1 && !key.contains('=') {
            vec![(
                layout.columns()[layout.key[0]].name.clone(),
                key.to_string(),
            )]
        } else {
            key.split(',')
                .map(|p| {
                    p.split_once('=')
                        .map(|(c, v)| (c.trim().to_string(), v.trim().to_string()))
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    IngestError::Run(format!(
                        "key {key:?}: write col=value,col=value for a composite key"
                    ))
                })?
        };
        let filter = parts
            .iter()
            .map(|(c, v)| {
                format!(
                    "CAST(t0.{} AS TEXT) = '{}'",
                    quote(c),
                    v.replace('\'', "''")
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let mut rows = self.source.fetch(
            layout.select_where(&self.source, Some(&filter), &[], 0),
            layout.fetch_types(&self.source, &[]),
        );
        let Some(row) = rows.next().await else {
            return Err(IngestError::Run(format!(
                "no row of {table} with key {key}"
            )));
        };
        let mut values = row?;
        drop(rows);
        let extras = layout.take_extras(&mut values);
        let facts = HashMap::new(); // preparing a row needs no patient facts
        if let Some((col, reason)) = Router::new(&self.policy, layout, &facts).prepare(&mut values)
        {
            return Err(IngestError::Run(format!(
                "{table} {key}: column {}: {reason}: the row goes to quarantine",
                layout.columns()[col].name
            )));
        }
        self.explain_row(layout, key, &values, extras, Vec::new())
            .await
    }

    /// Explains a record of a table without a primary key, named by the digest of its values
    /// (as archived): reads the table until it has seen every row with that digest. Identical
    /// rows are distinct records decided alike; the explanation says how many there are.
    async fn explain_keyless(&self, layout: &TableLayout, key: &str) -> Result<Explanation> {
        let table = &layout.name;
        let (digest, nth) = match key.split_once('#') {
            Some((d, n)) => (d, n.parse::<u64>().ok().filter(|&n| n >= 1)),
            None => (key, Some(1)),
        };
        let (Some(nth), true) = (
            nth,
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        ) else {
            return Err(IngestError::Run(format!(
                "table {table} has no primary key: name a record by its key in the archive (64 hex digits, as the API shows it, `#2` for the second of identical rows), not {key:?}"
            )));
        };
        let facts = HashMap::new(); // preparing a row needs no patient facts
        let router = Router::new(&self.policy, layout, &facts);
        let mut rows = self.source.fetch(
            layout.select_where(&self.source, None, &[], 0),
            layout.fetch_types(&self.source, &[]),
        );
        let mut found = None;
        let mut identical = 0u64;
        while let Some(row) = rows.next().await {
            let mut values = row?;
            let extras = layout.take_extras(&mut values);
            if router.prepare(&mut values).is_some() {
                continue;
            }
            // Archived rows are named without their BLOBs' content (stored apart).
            for b in &layout.blobs {
                values[b.column] = Value::Null;
            }
            if hex::encode(row_digest(&values)).eq_ignore_ascii_case(digest) {
                identical += 1;
                if found.is_none() {
                    found = Some((values, extras));
                }
            }
        }
        drop(rows);
        let Some((values, extras)) = found.filter(|_| nth <= identical) else {
            return Err(IngestError::Run(format!(
                "no row of {table} is named {key} ({identical} row(s) with that digest)"
            )));
        };
        let note = if identical > 1 {
            vec![format!(
                "identical rows: {identical} (distinct records, decided alike; named {digest}, {digest}#2, ... {digest}#{identical})"
            )]
        } else {
            Vec::new()
        };
        self.explain_row(layout, key, &values, extras, note).await
    }

    /// The explanation of a record whose values (mapped and coerced) are `values`; `extra`
    /// facts are added to the policy's.
    async fn explain_row(
        &self,
        layout: &TableLayout,
        key: &str,
        values: &[Value],
        extras: RowExtras,
        extra: Vec<String>,
    ) -> Result<Explanation> {
        let table = layout.name.as_str();
        let facts = self.patient_facts().await?;
        let row = Router::new(&self.policy, layout, &facts).facts(values, &extras);
        let patient = extras.patient;
        let (date, pf, policy_values) = (row.date, row.patient, &row.columns);
        let record = row.record(&self.policy, patient.as_deref());
        let (decision, steps) = self
            .policy
            .explain(table, &record, &layout.policy_column_names);
        let show = |d: Option<NaiveDate>| d.map_or("not recorded".to_string(), |d| d.to_string());
        let kind = match record.record_date {
            DateFact::Valid(_) => "plausible",
            DateFact::Missing => "missing",
            DateFact::Placeholder => "a placeholder",
            DateFact::Future => "after as_of",
        };
        let mut lines = vec![
            format!(
                "policy: {} (sha256 {}), as of {}",
                self.policy.version(),
                &self.policy.hash()[..12],
                self.as_of()
            ),
            format!("record date: {} ({kind})", show(date)),
            format!("patient: {}", patient.as_deref().unwrap_or("none")),
            format!("patient last activity: {}", show(pf.last_activity)),
            format!("patient birth date: {}", show(pf.birth_date)),
            format!("patient deceased: {}", show(pf.deceased_date)),
        ];
        for (name, v) in layout.policy_column_names.iter().zip(policy_values) {
            lines.push(format!("{name}: {}", v.as_deref().unwrap_or("NULL")));
        }
        lines.extend(extra);
        Ok(Explanation {
            table: table.into(),
            key: key.into(),
            facts: lines,
            decision,
            steps,
        })
    }
}
