//! The scanner: reads what an export is about to release and names every column where it
//! finds an identifier, so that the export fails instead of leaving (fail closed: a profile or
//! a class that is wrong is caught here, not by the researcher).
//!
//! Rules:
//! - a column whose value equals the row's own patient key, or its record key, in more than 1 %
//!   of the rows (and at least 3);
//! - a full date or timestamp where the profile lets out only years;
//! - text that looks like a US social security number, a telephone number, an e-mail address, a
//!   URL or an IP address, in any text column;
//! - medical-record-number-like values (`\b[A-Z]{0,3}\d{6,10}\b`) in text, except in columns of
//!   class `code`, in Strata's own pseudonyms, and in `value` columns whose text is a number.
//!
//! Findings name the file, the column and the rule with a count, never a value.

use crate::class::Class;
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use regex::{Regex, RegexSet};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::OnceLock;

/// A rule of the scanner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Values equal to the row's own patient key.
    PatientKeyCopy,
    /// Values equal to the row's own record key.
    RecordKeyCopy,
    /// Dates more precise than a year (a day, or a month) where only years may leave.
    FullDate,
    /// US social security numbers.
    Ssn,
    /// Telephone or fax numbers.
    Phone,
    /// E-mail addresses.
    Email,
    /// Web addresses.
    Url,
    /// IP addresses.
    Ip,
    /// Medical-record-number-like values.
    Mrn,
}

impl Rule {
    /// What the rule found, for a finding's message.
    pub fn describe(self) -> &'static str {
        match self {
            Rule::PatientKeyCopy => "equal to the row's own patient key",
            Rule::RecordKeyCopy => "equal to the row's own record key",
            Rule::FullDate => {
                "are dates more precise than a year where the profile lets out only years"
            }
            Rule::Ssn => "look like US social security numbers",
            Rule::Phone => "look like telephone numbers",
            Rule::Email => "look like e-mail addresses",
            Rule::Url => "look like web addresses",
            Rule::Ip => "look like IP addresses",
            Rule::Mrn => "look like medical record numbers",
        }
    }
}

/// What the scanner knows of an exported column.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanColumn {
    /// Its name in the export.
    pub name: String,
    /// Its class, if known.
    pub class: Option<Class>,
    /// Whether its values are Strata's own pseudonyms.
    pub pseudonym: bool,
}

/// One thing the scanner found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// The exported file.
    pub file: String,
    /// The column (or, in FHIR output, the element's path).
    pub column: String,
    /// The rule.
    pub rule: Rule,
    /// How many values matched.
    pub matches: u64,
    /// Of how many values scanned in the column.
    pub values: u64,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, column {}: {} of {} values {} (rule {})",
            self.file,
            self.column,
            self.matches,
            self.values,
            self.rule.describe(),
            serde_json::to_value(self.rule)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        )
    }
}

const TEXT_RULES: [Rule; 10] = [
    Rule::Ssn,
    Rule::Phone,
    Rule::Email,
    Rule::Url,
    Rule::Ip,
    Rule::Mrn,
    Rule::FullDate,
    Rule::FullDate,
    Rule::FullDate,
    Rule::FullDate,
];

struct Patterns {
    set: RegexSet,
    ip: Regex,
    compact_date: Regex,
    /// An MRN with a letter prefix (in a measured value, a bare number is a value).
    lettered_mrn: Regex,
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| {
        let month = "(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\\.?";
        let day = "(?:0?[1-9]|[12][0-9]|3[01])";
        let mon = "(?:0?[1-9]|1[0-2])";
        let ip = r"\b(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}\b|(?i:\b(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}\b|(?:\b[0-9a-f]{1,4})?(?::[0-9a-f]{1,4})*::(?:[0-9a-f]{1,4}:)*[0-9a-f]{1,4}\b)";
        let set = RegexSet::new([
            // SSN
            r"\b[0-9]{3}[- ][0-9]{2}[- ][0-9]{4}\b".to_string(),
            // Phone / fax
            r"(?:\+?1[-. ]?)?(?:\([0-9]{3}\)[-. ]?|\b[0-9]{3}[-. ])[0-9]{3}[-. ][0-9]{4}\b".to_string(),
            // E-mail
            r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}".to_string(),
            // URL
            r"(?i)\b(?:https?|ftp)://[^\s]+|\bwww\.[a-z0-9-]+\.[a-z]{2,}".to_string(),
            // IP
            ip.to_string(),
            // MRN
            r"\b[A-Z]{0,3}[0-9]{6,10}\b".to_string(),
            // Full dates: ISO, and day/month numbers with a year.
            // (Dots only with a four-digit year: 10.20.30 is more likely a version or an address.)
            format!(r"\b(?:1[89]|20)[0-9]{{2}}[-/.]{mon}[-/.]{day}\b|\b(?:{mon}[/-]{day}|{day}[/-]{mon})[/-](?:[0-9]{{4}}|[0-9]{{2}})\b|\b(?:{mon}\.{day}|{day}\.{mon})\.[0-9]{{4}}\b"),
            // Full dates with a month's name.
            format!(r"(?i)\b{month}\s+{day}(?:st|nd|rd|th)?,?\s+[0-9]{{4}}\b|\b{day}(?:st|nd|rd|th)?\s+{month},?\s+[0-9]{{4}}\b"),
            // A month and a year (a month is a date element too): 03/2019, March 2019.
            format!(r"\b{mon}[/-](?:19|20)[0-9]{{2}}\b|(?i:\b{month},?\s+(?:19|20)[0-9]{{2}}\b)"),
            // SAS-style dates: 04MAR2019, 4mar19.
            r"(?i)\b[0-3]?[0-9](?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)(?:19|20)?[0-9]{2}\b".to_string(),
        ])
        .expect("the scanner's patterns compile");
        Patterns {
            set,
            ip: Regex::new(ip).expect("compiles"),
            compact_date: Regex::new(
                r"\b(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])\b",
            )
            .expect("compiles"),
            lettered_mrn: Regex::new(r"\b[A-Z]{1,3}[0-9]{6,10}\b").expect("compiles"),
        }
    })
}

/// Whether an IPv4-looking match stands on its own (not a piece of a longer dotted number
/// such as an OID `1.2.840.10008.1.2`).
fn standalone_ip(text: &str) -> bool {
    let bytes = text.as_bytes();
    patterns().ip.find_iter(text).any(|m| {
        if m.as_str().contains(':') {
            return true;
        }
        let before = m.start().checked_sub(1).map(|i| bytes[i]);
        let after = bytes.get(m.end()).copied();
        let after2 = bytes.get(m.end() + 1).copied();
        before != Some(b'.') && !(after == Some(b'.') && after2.is_some_and(|b| b.is_ascii_digit()))
    })
}

/// What kind of text a value is scanned as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TextKind {
    /// The MRN rule (and the compact YYYYMMDD date) do not apply: codes and pseudonyms.
    no_mrn: bool,
    /// Numbers are not identifiers: measured values.
    numbers_are_values: bool,
    /// Configured URIs (FHIR `system`, `url`) are not web addresses of anyone.
    uri: bool,
}

impl TextKind {
    fn of(column: &ScanColumn) -> Self {
        TextKind {
            no_mrn: column.pseudonym || column.class == Some(Class::Code),
            numbers_are_values: column.class == Some(Class::Value),
            uri: false,
        }
    }
}

/// The rules `text` breaks.
/// Whether `text` could match a pattern at all: every identifier pattern needs six characters
/// and a digit, but an e-mail address or a URL (a cheap test before the automaton).
fn may_match(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() >= 6
        && (bytes.iter().any(|b| b.is_ascii_digit())
            || text.contains('@')
            || text.contains("://")
            || text.contains("www."))
}

fn text_rules(text: &str, kind: TextKind, years_only: bool) -> Vec<Rule> {
    if !may_match(text) {
        return Vec::new();
    }
    if kind.numbers_are_values && text.trim().parse::<f64>().is_ok() {
        return Vec::new();
    }
    let p = patterns();
    let mut out = Vec::new();
    for i in p.set.matches(text).iter() {
        let rule = TEXT_RULES[i];
        let skip = match rule {
            Rule::Mrn => kind.no_mrn || (kind.numbers_are_values && !p.lettered_mrn.is_match(text)),
            Rule::FullDate => !years_only,
            Rule::Url => kind.uri,
            Rule::Ip => !standalone_ip(text),
            _ => false,
        };
        if !skip && !out.contains(&rule) {
            out.push(rule);
        }
    }
    if years_only && !kind.no_mrn && !out.contains(&Rule::FullDate) && p.compact_date.is_match(text)
    {
        out.push(Rule::FullDate);
    }
    out
}

/// The identifier patterns `text` matches, read as free text where only years of dates may
/// leave (for proposing a column's class from its values).
pub fn patterns_in(text: &str) -> Vec<Rule> {
    let kind = TextKind {
        no_mrn: false,
        numbers_are_values: false,
        uri: false,
    };
    text_rules(text, kind, true)
}

/// A value as the key rule compares it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cell<'a> {
    Text(&'a str),
    Int(i64),
    None,
}

impl Cell<'_> {
    fn matches(self, other: Cell<'_>) -> bool {
        match (self, other) {
            (Cell::None, _) | (_, Cell::None) => false,
            (Cell::Text(a), Cell::Text(b)) => !a.is_empty() && a == b,
            (Cell::Int(a), Cell::Int(b)) => a == b,
            (Cell::Text(t), Cell::Int(i)) | (Cell::Int(i), Cell::Text(t)) => {
                t.parse::<i64>().is_ok_and(|v| v == i)
            }
        }
    }
}

fn cell(array: &dyn Array, row: usize) -> Cell<'_> {
    if array.is_null(row) {
        return Cell::None;
    }
    match array.data_type() {
        DataType::Utf8 => Cell::Text(array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Cell::Text(array.as_string::<i64>().value(row)),
        DataType::Int64 => Cell::Int(
            array
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(row),
        ),
        DataType::Int32 => Cell::Int(
            array
                .as_primitive::<arrow::datatypes::Int32Type>()
                .value(row) as i64,
        ),
        DataType::Float64 => {
            let v = array
                .as_primitive::<arrow::datatypes::Float64Type>()
                .value(row);
            if v.fract() == 0.0 && v.abs() < 9.0e15 {
                Cell::Int(v as i64)
            } else {
                Cell::None
            }
        }
        _ => Cell::None,
    }
}

/// What the scanner counted of one column of one file.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    /// Values scanned.
    values: u64,
    /// Matches per rule (by [`Rule::index`]).
    hits: [u64; Rule::ALL.len()],
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 9] = [
        Rule::PatientKeyCopy,
        Rule::RecordKeyCopy,
        Rule::FullDate,
        Rule::Ssn,
        Rule::Phone,
        Rule::Email,
        Rule::Url,
        Rule::Ip,
        Rule::Mrn,
    ];

    fn index(self) -> usize {
        Rule::ALL
            .iter()
            .position(|r| *r == self)
            .expect("every rule is listed")
    }
}

/// Whether `text` is one of Strata's pseudonyms (32 hex digits), or a reference to one: a
/// keyed hash, which cannot equal a key or match an identifier's pattern.
fn is_pseudonym(text: &str) -> bool {
    let hex = text.rsplit('/').next().unwrap_or(text);
    hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

/// FNV-1a: the scanner looks a column up for every value of a FHIR resource, and its keys
/// are short and never chosen by a client (SipHash's resistance is not needed, its cost is).
#[derive(Debug, Default, Clone, Copy)]
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

/// Per column, the rules of values seen (columns of codes, units and statuses repeat a few
/// thousand values: each is matched once).
type Known = FastMap<String, FastMap<String, Vec<Rule>>>;

/// Scans exported rows; collects what it finds per file and column.
#[derive(Debug, Default)]
pub struct Scanner {
    years_only: bool,
    /// Per file, per column, what was counted.
    counts: FastMap<String, FastMap<String, Counts>>,
    known: Known,
    /// Per file of FHIR resources, per resource type, the tree of its elements' counts.
    resources: FastMap<String, FastMap<String, Node>>,
}

/// The counts of `column` in `columns` (made at first use; found without allocating after).
fn counts_of<'a>(columns: &'a mut FastMap<String, Counts>, column: &str) -> &'a mut Counts {
    if !columns.contains_key(column) {
        columns.insert(column.to_string(), Counts::default());
    }
    columns.get_mut(column).expect("inserted above")
}

/// The rules `text` of `column` breaks, remembered per column.
fn known_rules(
    known: &mut Known,
    column: &str,
    text: &str,
    kind: TextKind,
    years_only: bool,
) -> Vec<Rule> {
    if !may_match(text) {
        return Vec::new();
    }
    if let Some(rules) = known.get(column).and_then(|k| k.get(text)) {
        return rules.clone();
    }
    let rules = text_rules(text, kind, years_only);
    if !known.contains_key(column) {
        known.insert(column.to_string(), FastMap::default());
    }
    let of_column = known.get_mut(column).expect("inserted above");
    if of_column.len() < KNOWN_VALUES {
        of_column.insert(text.to_string(), rules.clone());
    }
    rules
}

/// Distinct values remembered per column.
const KNOWN_VALUES: usize = 8192;

/// The counts of a FHIR resource's elements, as a tree mirroring the resources' structure:
/// a walk looks up each element by its own short name, not by its whole path.
#[derive(Debug, Default)]
struct Node {
    counts: Counts,
    children: FastMap<String, Node>,
    /// The rules of the element's values seen.
    known: FastMap<String, Vec<Rule>>,
}

impl Node {
    fn child(&mut self, key: &str) -> &mut Node {
        if !self.children.contains_key(key) {
            self.children.insert(key.to_string(), Node::default());
        }
        self.children.get_mut(key).expect("inserted above")
    }

    /// Every element's counts, by path.
    fn flatten(&self, path: &str, out: &mut Vec<(String, Counts)>) {
        if self.counts.values > 0 {
            out.push((path.to_string(), self.counts));
        }
        for (k, child) in &self.children {
            child.flatten(&format!("{path}.{k}"), out);
        }
    }
}

/// A walk over one FHIR resource's elements.
struct Walk<'a> {
    years_only: bool,
    keys: Option<(&'a str, &'a [String])>,
}

impl Walk<'_> {
    fn visit(&self, node: &mut Node, value: &Json, key: &str) {
        match value {
            Json::Object(map) => {
                for (k, v) in map {
                    self.visit(node.child(k), v, k);
                }
            }
            Json::Array(items) => {
                for v in items {
                    self.visit(node, v, key);
                }
            }
            Json::Null => {}
            scalar => self.leaf(node, key, scalar),
        }
    }

    fn leaf(&self, node: &mut Node, key: &str, value: &Json) {
        node.counts.values += 1;
        let pseudonym = matches!(value, Json::String(t) if (key == "id" || key == "reference") && is_pseudonym(t));
        if pseudonym {
            return;
        }
        if let Some((patient, records)) = self.keys {
            let v = match value {
                Json::String(s) => Cell::Text(s),
                Json::Number(n) => match (n.as_i64(), n.as_f64()) {
                    (Some(i), _) => Cell::Int(i),
                    (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Cell::Int(f as i64),
                    _ => Cell::None,
                },
                _ => Cell::None,
            };
            if v.matches(Cell::Text(patient)) {
                node.counts.hits[Rule::PatientKeyCopy.index()] += 1;
            } else if records.iter().any(|r| v.matches(Cell::Text(r))) {
                node.counts.hits[Rule::RecordKeyCopy.index()] += 1;
            }
        }
        let Json::String(text) = value else { return };
        if !may_match(text) {
            return;
        }
        let rules = match node.known.get(text.as_str()) {
            Some(r) => r.clone(),
            None => {
                let kind = TextKind {
                    no_mrn: key == "code" || key == "id" || key == "reference",
                    numbers_are_values: false,
                    uri: key == "system" || key == "url",
                };
                let r = text_rules(text, kind, self.years_only);
                if node.known.len() < KNOWN_VALUES {
                    node.known.insert(text.clone(), r.clone());
                }
                r
            }
        };
        for rule in rules {
            node.counts.hits[rule.index()] += 1;
        }
    }
}

impl Scanner {
    /// A scanner for a profile that lets out only years of dates (`years_only`) or full dates.
    pub fn new(years_only: bool) -> Self {
        Scanner {
            years_only,
            ..Default::default()
        }
    }

    /// The counts of `file`'s columns.
    fn file(&mut self, file: &str) -> &mut FastMap<String, Counts> {
        if !self.counts.contains_key(file) {
            self.counts.insert(file.to_string(), FastMap::default());
        }
        self.counts.get_mut(file).expect("inserted above")
    }

    /// The counts of `column` in `file`.
    fn counts(&mut self, file: &str, column: &str) -> &mut Counts {
        counts_of(self.file(file), column)
    }

    /// The rules `text` of `column` breaks (remembered per column).
    fn rules_of(&mut self, column: &str, text: &str, kind: TextKind) -> Vec<Rule> {
        known_rules(&mut self.known, column, text, kind, self.years_only)
    }

    /// Scans a batch of an exported file: every text value (and every integer of a column
    /// that is not a measured value or a code) against the identifier patterns, and typed
    /// dates where only years may leave.
    pub fn batch(&mut self, file: &str, batch: &RecordBatch, columns: &[ScanColumn]) {
        for (array, column) in batch.columns().iter().zip(columns) {
            let non_null = (array.len() - array.null_count()) as u64;
            self.counts(file, &column.name).values += array.len() as u64;
            let scanned_as_text = match array.data_type() {
                DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
                    if self.years_only =>
                {
                    self.counts(file, &column.name).hits[Rule::FullDate.index()] += non_null;
                    false
                }
                DataType::Utf8 | DataType::LargeUtf8 => true,
                // An integer of a category or free-form column can be a record number or a
                // compact date: scanned as its digits.
                DataType::Int64 | DataType::Int32 => {
                    !column.pseudonym && !matches!(column.class, Some(Class::Value | Class::Code))
                }
                _ => false,
            };
            if !scanned_as_text || column.pseudonym {
                continue;
            }
            let kind = TextKind::of(column);
            let text = arrow::compute::cast(array, &DataType::Utf8).expect("casts to text");
            let mut hits = [0u64; Rule::ALL.len()];
            for v in text.as_string::<i32>().iter().flatten() {
                for r in self.rules_of(&column.name, v, kind) {
                    hits[r.index()] += 1;
                }
            }
            let counts = self.counts(file, &column.name);
            for (total, n) in counts.hits.iter_mut().zip(hits) {
                *total += n;
            }
        }
    }

    /// Compares an exported batch with the keys of the archived rows it came from (same rows,
    /// same order): `patients` the patient keys, `record_keys` the record's key columns.
    pub fn key_copies(
        &mut self,
        file: &str,
        batch: &RecordBatch,
        columns: &[ScanColumn],
        patients: &ArrayRef,
        record_keys: &[ArrayRef],
    ) {
        for (array, column) in batch.columns().iter().zip(columns) {
            if column.pseudonym {
                continue;
            }
            let (mut to_patient, mut to_record) = (0, 0);
            for row in 0..batch.num_rows() {
                let v = cell(array.as_ref(), row);
                if v == Cell::None {
                    continue;
                }
                if v.matches(cell(patients.as_ref(), row)) {
                    to_patient += 1;
                } else if record_keys.iter().any(|k| v.matches(cell(k.as_ref(), row))) {
                    to_record += 1;
                }
            }
            let counts = self.counts(file, &column.name);
            counts.hits[Rule::PatientKeyCopy.index()] += to_patient;
            counts.hits[Rule::RecordKeyCopy.index()] += to_record;
        }
    }

    /// Scans one FHIR resource (a line of NDJSON): every string element against the patterns
    /// (its path is the column), and, when the keys of the record it came from are given,
    /// every element against them. Strata's pseudonyms (ids, references) are passed over.
    pub fn resource(&mut self, file: &str, resource: &Json, keys: Option<(&str, &[String])>) {
        let kind = resource
            .get("resourceType")
            .and_then(Json::as_str)
            .unwrap_or("Resource");
        if !self.resources.contains_key(file) {
            self.resources.insert(file.to_string(), FastMap::default());
        }
        let of_file = self.resources.get_mut(file).expect("inserted above");
        if !of_file.contains_key(kind) {
            of_file.insert(kind.to_string(), Node::default());
        }
        let root = of_file.get_mut(kind).expect("inserted above");
        let walk = Walk {
            years_only: self.years_only,
            keys,
        };
        walk.visit(root, resource, "");
    }

    /// Every column's counts of every file, resources' elements flattened to their paths.
    fn all_counts(&self) -> Vec<(String, String, Counts)> {
        let mut out = Vec::new();
        for (file, columns) in &self.counts {
            for (column, c) in columns {
                out.push((file.clone(), column.clone(), *c));
            }
        }
        for (file, kinds) in &self.resources {
            for (kind, root) in kinds {
                let mut paths = Vec::new();
                root.flatten(kind, &mut paths);
                out.extend(paths.into_iter().map(|(p, c)| (file.clone(), p, c)));
            }
        }
        out
    }

    /// Adds what another scanner (of another part of the same export) counted.
    pub fn merge(&mut self, other: Scanner) {
        for (file, column, c) in other.all_counts() {
            let mine = self.counts(&file, &column);
            mine.values += c.values;
            for (total, n) in mine.hits.iter_mut().zip(c.hits) {
                *total += n;
            }
        }
    }

    /// What was found, by file, column and rule: every pattern match, and key copies in more
    /// than 1 % of a column's values (at least 3).
    pub fn findings(&self) -> Vec<Finding> {
        // A path counted both ways (merged and walked) adds up.
        let mut totals: std::collections::BTreeMap<(String, String), Counts> = Default::default();
        for (file, column, c) in self.all_counts() {
            let t = totals.entry((file, column)).or_default();
            t.values += c.values;
            for (total, n) in t.hits.iter_mut().zip(c.hits) {
                *total += n;
            }
        }
        let mut out = Vec::new();
        for ((file, column), c) in totals {
            for (rule, n) in Rule::ALL.iter().zip(c.hits) {
                if n == 0 {
                    continue;
                }
                let keyed = matches!(rule, Rule::PatientKeyCopy | Rule::RecordKeyCopy);
                if keyed && (n < 3 || n * 100 <= c.values) {
                    continue;
                }
                out.push(Finding {
                    file: file.clone(),
                    column: column.clone(),
                    rule: *rule,
                    matches: n,
                    values: c.values.max(n),
                });
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;
