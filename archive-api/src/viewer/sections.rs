//! A patient's archived records arranged as a chart: encounters on a timeline, lab results as a
//! table and trends, problems, medications, allergies and other tables as lists, notes and
//! documents. Pure: the same records and mapping give the same chart.
//!
//! What a record is comes from its table's FHIR mapping (`[api.fhir.<table>]`): its resource
//! type chooses the section, its columns the code, text, value and unit shown. A table without
//! a mapping is listed under its own name, every column shown.

use super::trend::{trends, Reading, Trend};
use crate::config::FhirTable;
use crate::history::HistoryRecord;
use serde_json::Value;
use std::collections::BTreeMap;

/// The chart's filters, as the form gives them (empty: not set).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Filters {
    /// Records dated on or after (YYYY-MM-DD).
    #[serde(default)]
    pub from: String,
    /// Records dated on or before.
    #[serde(default)]
    pub to: String,
    /// One table.
    #[serde(default)]
    pub kind: String,
    /// Text any column holds (case ignored).
    #[serde(default)]
    pub q: String,
}

impl Filters {
    fn keeps(&self, r: &HistoryRecord) -> bool {
        let date = r.record_date.as_deref().unwrap_or("");
        (self.from.is_empty() || (!date.is_empty() && date >= self.from.as_str()))
            && (self.to.is_empty() || (!date.is_empty() && date <= self.to.as_str()))
            && (self.kind.is_empty() || r.table == self.kind)
            && (self.q.trim().is_empty() || {
                let q = self.q.trim().to_lowercase();
                r.data.values().any(|v| text(v).to_lowercase().contains(&q))
            })
    }
}

/// An option of the type filter.
pub(crate) struct Choice {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

/// An encounter on the timeline.
pub(crate) struct Entry {
    pub date: String,
    pub summary: String,
}

/// A section listing records as a table.
pub(crate) struct ListSection {
    pub id: String,
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// A lab result.
pub(crate) struct LabRow {
    pub date: String,
    pub name: String,
    pub code: String,
    pub value: String,
    pub unit: String,
    pub range: String,
}

/// Lab results, and a trend per code with numeric values.
#[derive(Default)]
pub(crate) struct Labs {
    pub rows: Vec<LabRow>,
    pub trends: Vec<Trend>,
}

/// A note's text.
pub(crate) struct Note {
    pub date: String,
    pub title: String,
    pub text: String,
}

/// A document to open or download.
pub(crate) struct Doc {
    pub date: String,
    pub title: String,
    pub href: String,
    pub content_type: String,
    pub size: String,
    /// Whether the browser shows it (PDF, common images); other types download.
    pub inline: bool,
    /// The name a download is saved under (letters, digits, `.`, `-`, `_` only).
    pub file_name: String,
    pub sha256: String,
}

/// A patient's chart.
pub(crate) struct ChartView {
    pub patient: String,
    /// The reason given to break the glass, when the patient is outside the user's care.
    pub break_glass: Option<String>,
    pub filters: Filters,
    pub kinds: Vec<Choice>,
    /// Archived records of the patient, and how many the filters keep.
    pub total: usize,
    pub shown: usize,
    pub encounters: Vec<Entry>,
    pub labs: Labs,
    pub lists: Vec<ListSection>,
    pub notes: Vec<Note>,
    pub documents: Vec<Doc>,
}

/// Content types a browser shows itself, safely (no script runs in them).
const SHOWN_INLINE: &[&str] = &[
    "application/pdf",
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
];

/// Whether a document of `content_type` opens in the browser rather than downloads.
pub(crate) fn shown_inline(content_type: &str) -> bool {
    let base = content_type.split(';').next().unwrap_or("").trim();
    SHOWN_INLINE.iter().any(|t| t.eq_ignore_ascii_case(base))
}

/// A value as text: strings as they are, numbers as JSON writes them, nothing for null.
pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn column(r: &HistoryRecord, name: &Option<String>) -> String {
    name.as_ref()
        .and_then(|c| r.data.get(c))
        .map(text)
        .unwrap_or_default()
}

/// Bytes as people read them.
fn size(bytes: u64) -> String {
    match bytes {
        b if b < 1024 => format!("{b} bytes"),
        b if b < 1024 * 1024 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
    }
}

/// A file name safe in any file system, from archived text.
fn file_name(title: &str, content_type: &str) -> String {
    let stem: String = title
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    let stem = if stem.trim_matches('_').is_empty() {
        "document".to_string()
    } else {
        stem
    };
    let ext = match content_type.split(';').next().unwrap_or("").trim() {
        "application/pdf" => "pdf",
        "image/png" => "png",
        "image/jpeg" => "jpg",
        "text/plain" => "txt",
        "text/html" => "html",
        "application/xml" | "text/xml" => "xml",
        _ => "bin",
    };
    format!("{stem}.{ext}")
}

/// Section titles of resource types.
fn list_title(resource: &str) -> Option<&'static str> {
    Some(match resource {
        "Condition" => "Problems and diagnoses",
        "MedicationStatement" | "MedicationRequest" => "Medications",
        "AllergyIntolerance" => "Allergies",
        "Procedure" => "Procedures",
        "Immunization" => "Immunizations",
        "CarePlan" => "Care plans",
        "DiagnosticReport" => "Reports",
        "ImagingStudy" => "Imaging",
        "Device" => "Devices",
        "Coverage" => "Coverage",
        "ServiceRequest" => "Orders",
        "SupplyDelivery" => "Supplies",
        _ => return None,
    })
}

/// Where a table's records go.
enum Place<'a> {
    Timeline(&'a FhirTable),
    Labs(&'a FhirTable),
    Notes(&'a FhirTable),
    List(&'static str, Option<&'a FhirTable>),
    Patient,
}

fn place<'a>(table: &str, fhir: &'a BTreeMap<String, FhirTable>) -> Place<'a> {
    match fhir.get(table) {
        Some(m) if m.resource == "Encounter" => Place::Timeline(m),
        Some(m) if m.resource == "Observation" => Place::Labs(m),
        Some(m) if m.resource == "DocumentReference" && m.text.is_some() => Place::Notes(m),
        Some(m) if m.resource == "Patient" => Place::Patient,
        Some(m) => Place::List(list_title(&m.resource).unwrap_or("Other records"), Some(m)),
        None => Place::List("", None),
    }
}

/// The chart of `patient` from their archived `records` (history order: newest first), with
/// `filters`; documents are fetched under `/ui/patients/{patient}/documents/`.
pub(crate) fn chart_view(
    patient: &str,
    records: &[HistoryRecord],
    fhir: &BTreeMap<String, FhirTable>,
    filters: Filters,
    break_glass: Option<String>,
) -> ChartView {
    let mut tables: Vec<&str> = records.iter().map(|r| r.table.as_str()).collect();
    tables.sort_unstable();
    tables.dedup();
    let kinds = tables
        .iter()
        .map(|t| Choice {
            value: t.to_string(),
            label: t.replace('_', " "),
            selected: filters.kind == *t,
        })
        .collect();
    let kept: Vec<&HistoryRecord> = records.iter().filter(|r| filters.keeps(r)).collect();
    let mut encounters = Vec::new();
    let mut labs = Labs::default();
    let mut readings: Vec<Reading> = Vec::new();
    let mut notes = Vec::new();
    let mut documents = Vec::new();
    // Lists by title, in the order first seen; unmapped tables by name.
    let mut lists: Vec<ListSection> = Vec::new();
    let encoded =
        percent_encoding::utf8_percent_encode(patient, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    for r in &kept {
        let date = r.record_date.clone().unwrap_or_default();
        let mut title = String::new();
        match place(&r.table, fhir) {
            Place::Timeline(m) => {
                let class = column(r, &m.class);
                let code = column(r, &m.display);
                let code = if code.is_empty() {
                    column(r, &m.code)
                } else {
                    code
                };
                let summary = [class, code]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" · ");
                encounters.push(Entry {
                    date: date.clone(),
                    summary: if summary.is_empty() {
                        "Encounter".into()
                    } else {
                        summary
                    },
                });
            }
            Place::Labs(m) => {
                let (code, name, unit) = (
                    column(r, &m.code),
                    column(r, &m.display),
                    column(r, &m.unit),
                );
                let raw = m.value.as_ref().and_then(|c| r.data.get(c));
                let value = raw.map(text).unwrap_or_default();
                let (low, high) = (column(r, &m.reference_low), column(r, &m.reference_high));
                let range = match (low.is_empty(), high.is_empty()) {
                    (false, false) => format!("{low}–{high}"),
                    (false, true) => format!("≥ {low}"),
                    (true, false) => format!("≤ {high}"),
                    (true, true) => String::new(),
                };
                if let Some(number) = raw.and_then(Value::as_f64) {
                    readings.push(Reading {
                        code: code.clone(),
                        name: name.clone(),
                        unit: unit.clone(),
                        date: date.clone(),
                        value: number,
                        shown: value.clone(),
                        low: low.parse().ok(),
                        high: high.parse().ok(),
                    });
                }
                labs.rows.push(LabRow {
                    date: date.clone(),
                    name,
                    code,
                    value,
                    unit,
                    range,
                });
            }
            Place::Notes(m) => {
                title = column(r, &m.display);
                notes.push(Note {
                    date: date.clone(),
                    title: if title.is_empty() {
                        r.table.replace('_', " ")
                    } else {
                        title.clone()
                    },
                    text: column(r, &m.text),
                });
            }
            Place::Patient => {}
            Place::List(section, mapping) => {
                let (id, heading) = match mapping {
                    Some(_) => (
                        section.to_lowercase().replace(' ', "-"),
                        section.to_string(),
                    ),
                    None => (format!("table-{}", r.table), r.table.replace('_', " ")),
                };
                let section = match lists.iter().position(|s| s.id == id) {
                    Some(i) => &mut lists[i],
                    None => {
                        let columns = match mapping {
                            Some(_) => vec!["Date", "Description", "Code", "Status"],
                            None => vec!["Date"],
                        };
                        lists.push(ListSection {
                            id,
                            title: heading,
                            columns: columns.into_iter().map(str::to_string).collect(),
                            rows: Vec::new(),
                        });
                        lists.last_mut().expect("just pushed")
                    }
                };
                let row = match mapping {
                    Some(m) => {
                        title = column(r, &m.display);
                        vec![
                            date.clone(),
                            title.clone(),
                            column(r, &m.code),
                            column(r, &m.status),
                        ]
                    }
                    None => {
                        // Every column any record of the table has (files written before
                        // and after a column was added differ), each cell under its own.
                        for name in r.data.keys() {
                            if !section.columns.contains(name) {
                                section.columns.push(name.clone());
                            }
                        }
                        std::iter::once(date.clone())
                            .chain(
                                section.columns[1..]
                                    .iter()
                                    .map(|c| r.data.get(c).map(text).unwrap_or_default()),
                            )
                            .collect()
                    }
                };
                section.rows.push(row);
            }
        }
        for d in &r.documents {
            let shown_title = if title.is_empty() {
                format!("{} ({})", r.table.replace('_', " "), d.column)
            } else {
                title.clone()
            };
            documents.push(Doc {
                date: date.clone(),
                file_name: file_name(&shown_title, &d.content_type),
                title: shown_title,
                href: format!("/ui/patients/{encoded}/documents/{}", d.id),
                content_type: d.content_type.clone(),
                size: size(d.length),
                inline: shown_inline(&d.content_type),
                sha256: d.sha256.clone(),
            });
        }
    }
    // Rows read before a column appeared get an empty cell for it.
    for section in &mut lists {
        for row in &mut section.rows {
            row.resize(section.columns.len(), String::new());
        }
    }
    labs.trends = trends(readings);
    ChartView {
        patient: patient.to_string(),
        break_glass,
        filters,
        kinds,
        total: records.len(),
        shown: kept.len(),
        encounters,
        labs,
        lists,
        notes,
        documents,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, data: serde_json::Value) -> HistoryRecord {
        HistoryRecord {
            table: "legacy_misc".into(),
            key: key.into(),
            record_date: Some("2019-01-01".into()),
            data: data.as_object().unwrap().clone(),
            documents: Vec::new(),
        }
    }

    #[test]
    fn a_table_whose_files_differ_in_columns_puts_each_cell_under_its_own() {
        // An older file without `drug`, a newer one with it.
        let records = vec![
            record(
                "id=2",
                serde_json::json!({ "drug": "aspirin", "route": "oral" }),
            ),
            record("id=1", serde_json::json!({ "route": "iv" })),
        ];
        let view = chart_view("P1", &records, &BTreeMap::new(), Filters::default(), None);
        let s = &view.lists[0];
        assert_eq!(s.columns, ["Date", "drug", "route"]);
        assert_eq!(s.rows[0], ["2019-01-01", "aspirin", "oral"]);
        assert_eq!(s.rows[1], ["2019-01-01", "", "iv"]);
        let records = vec![records[1].clone(), records[0].clone()];
        let view = chart_view("P1", &records, &BTreeMap::new(), Filters::default(), None);
        let s = &view.lists[0];
        assert_eq!(s.columns, ["Date", "route", "drug"]);
        assert_eq!(s.rows[0], ["2019-01-01", "iv", ""]);
        assert_eq!(s.rows[1], ["2019-01-01", "oral", "aspirin"]);
    }
}
