//! `strata.toml`: what to migrate, from where, to where, under which policy.
//!
//! The engine knows no table or column of any schema: everything comes from here. Parsing does
//! no IO; [`MigrationConfig::validate`] checks the config against the source's schema and
//! reports every problem at once.

use crate::db::TableSchema;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use strata_archive::ArchiveConfig;

/// The migration part of `strata.toml` (the `[api]` section belongs to the archive API).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// The legacy database, read-only.
    pub source: DatabaseConfig,
    /// The new operational database that receives active records (and, after go-live, the
    /// tables `strata tier` moves aged records out of).
    pub operational: crate::operational::OperationalConfig,
    /// Strata's own control database (runs, per-table progress). By default, a SQLite file
    /// `strata-control.db` beside the config file.
    #[serde(default)]
    pub control: Option<DatabaseConfig>,
    /// Where archived records go.
    pub archive: ArchiveConfig,
    /// The cutoff policy.
    pub policy: PolicyFileConfig,
    /// How the copy runs: parallel workers, range size.
    #[serde(default)]
    pub run: RunConfig,
    /// Per-table settings, by source table name. Tables not listed are not migrated.
    pub tables: BTreeMap<String, TableConfig>,
    /// How `strata verify` signs its reports and checks them.
    #[serde(default)]
    pub verify: Option<VerifyConfig>,
    /// Change sync from a PostgreSQL source (`strata migrate --follow`, `strata sync`).
    #[serde(default)]
    pub sync: SyncConfig,
    /// The directory relative paths are resolved against (the config file's); set on load.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// A database URL: `postgres://user@host:port/db` or `sqlite://path` (relative to the config
/// file). `${VAR}` is replaced by the environment variable VAR, so secrets stay out of files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// The URL.
    pub url: String,
    /// Source only: run even though the source role could write (a superuser, or INSERT,
    /// UPDATE, DELETE or TRUNCATE on a migrated table). Strata never writes to the source, but
    /// by default it refuses such a role so that a mistake cannot turn into a write.
    #[serde(default)]
    pub allow_writable_role: bool,
}

/// `[run]`: how the copy runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Ranges copied at the same time. By default, the number of CPU cores (at least 2).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Rows per range: a table larger than this is split into ranges that are copied in
    /// parallel and checkpointed one by one. By default, 1,000,000.
    #[serde(default = "default_rows_per_range")]
    pub rows_per_range: u64,
    /// BLOBs (`bytea`, PostgreSQL sources) larger than this many bytes are not read with their
    /// row but streamed from the source in pieces of 1 MiB, straight into the archive, so that
    /// no BLOB is ever held whole. By default, 8 MiB.
    #[serde(default = "default_inline_blob_bytes")]
    pub inline_blob_bytes: u64,
}

fn default_inline_blob_bytes() -> u64 {
    8 << 20
}

fn default_rows_per_range() -> u64 {
    1_000_000
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            workers: None,
            rows_per_range: default_rows_per_range(),
            inline_blob_bytes: default_inline_blob_bytes(),
        }
    }
}

impl RunConfig {
    /// The workers to use.
    pub fn workers(&self) -> usize {
        self.workers
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
                    .max(2)
            })
            .clamp(1, 8)
    }
}

/// `[verify]`: the Ed25519 keys of verification reports, each as 64 hex digits in a file
/// (relative to the config) or an environment variable. The signing key signs reports; the
/// public key is the only one `strata verify --check-report` trusts.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyConfig {
    /// A file holding the signing key (its 32-byte seed).
    #[serde(default)]
    pub signing_key_file: Option<String>,
    /// An environment variable holding it.
    #[serde(default)]
    pub signing_key_env: Option<String>,
    /// A file holding the signing key wrapped by the archive's key service (its KEK, or the
    /// KMS behind it): `strata verify --new-signing-key FILE --wrapped` writes one. The key is
    /// then never on disk in clear, and signing needs the key service.
    #[serde(default)]
    pub signing_key_wrapped_file: Option<String>,
    /// A file holding the public key reports are checked against.
    #[serde(default)]
    pub public_key_file: Option<String>,
    /// An environment variable holding it.
    #[serde(default)]
    pub public_key_env: Option<String>,
}

/// Change sync: the replication slot Strata reads and the publication it reads through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// The logical replication slot (created by `strata migrate --follow`; default `strata`).
    #[serde(default = "default_slot")]
    pub slot: String,
    /// The publication of the migrated tables (created by the database's owner with what
    /// `strata sync prepare` prints; default `strata`).
    #[serde(default = "default_slot")]
    pub publication: String,
    /// The most WAL the slot may hold back on the source (`"20GB"`, `"512MB"`; 1024-based, as
    /// PostgreSQL counts): sync warns at 80 % of it and stops, with advice, at it. Unset: no
    /// limit but PostgreSQL's `max_slot_wal_keep_size`.
    #[serde(default)]
    pub max_retained_wal: Option<String>,
    /// Archive-bound changes (corrections, tombstones) wait in the operational database's
    /// outbox until this much is waiting (`"64MB"`, 1024-based; default 64 MiB) or the oldest
    /// has waited `archive_flush_seconds`; then they are written as one run of archive files,
    /// to be compacted later — not one file per change.
    #[serde(default = "default_flush_bytes")]
    pub archive_flush_bytes: String,
    /// See `archive_flush_bytes` (default 300: five minutes).
    #[serde(default = "default_flush_seconds")]
    pub archive_flush_seconds: u64,
}

fn default_slot() -> String {
    "strata".into()
}

fn default_flush_bytes() -> String {
    "64MB".into()
}

fn default_flush_seconds() -> u64 {
    300
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            slot: default_slot(),
            publication: default_slot(),
            max_retained_wal: None,
            archive_flush_bytes: default_flush_bytes(),
            archive_flush_seconds: default_flush_seconds(),
        }
    }
}

/// A size such as `20GB`, `512MB`, `64kB` or `4096` (bytes), 1024-based.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (a number and B, kB, MB, GB or TB)"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "tb" => 1 << 40,
        _ => return Err(format!("{text:?}: the unit is B, kB, MB, GB or TB")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Which policy file to apply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFileConfig {
    /// Path of the policy TOML (relative to the config file).
    pub file: String,
}

/// How one table is read and classified.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Primary key columns. Empty for a table without a key: its rows are then identified by
    /// their position in the read (`row #N`).
    #[serde(default)]
    pub primary_key: Vec<String>,
    /// The column holding the patient key, when the table has one.
    #[serde(default)]
    pub patient_key: Option<String>,
    /// How to reach the patient through a parent table, when the table has no patient column.
    #[serde(default)]
    pub patient: Option<PatientVia>,
    /// What dates a record for the policy: a column of the table, a parent's date, or a
    /// period ([`RecordDateConfig`]).
    #[serde(default)]
    pub record_date: Option<RecordDateConfig>,
    /// BLOB columns stored as encrypted objects in the archive.
    #[serde(default)]
    pub blobs: Vec<BlobColumnConfig>,
    /// How columns are mapped on the way: renamed, their values mapped, NULLs defaulted, dates
    /// parsed with an explicit format and time zone. By source column name.
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnMapping>,
    /// Computed columns, by name: a SQL expression over the table's columns (evaluated by the
    /// source when it is read) and the column's type. They go to the operational table and the
    /// archive like any other column.
    #[serde(default)]
    pub computed: BTreeMap<String, ComputedColumn>,
    /// For a CSV source: column types by column name (INTEGER, REAL, DATE, TIMESTAMP, TEXT, or
    /// any SQLite type name) instead of inferring them from the values.
    #[serde(default)]
    pub column_types: BTreeMap<String, String>,
    /// Stop the run when more rows than this are quarantined in this table. By default, no limit.
    #[serde(default)]
    pub quarantine_threshold: Option<u64>,
    /// The table's name in the database it is read from, when not its name here (set by
    /// `strata tier`'s view of the operational database, never by the config file).
    #[serde(skip)]
    pub relation: Option<String>,
}

/// `[tables.T.computed.NAME]`: a column computed from the row.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputedColumn {
    /// A SQL expression in the source's dialect, e.g. `first_name || ' ' || last_name`.
    pub expr: String,
    /// text, integer, real, boolean, date, timestamp or timestamptz. By default, text.
    #[serde(default = "default_computed_type", rename = "type")]
    pub type_name: String,
    /// What the column holds, for researchers' exports (see `ColumnMapping::class`).
    #[serde(default)]
    pub class: Option<String>,
}

fn default_computed_type() -> String {
    "text".into()
}

impl ComputedColumn {
    /// The column type, if the name is one Strata knows.
    pub fn column_type(&self) -> Option<crate::ColumnType> {
        use crate::ColumnType as T;
        Some(match self.type_name.to_ascii_lowercase().as_str() {
            "text" => T::Text,
            "integer" | "bigint" | "int" => T::Int,
            "real" | "double" | "float" => T::Float,
            "boolean" | "bool" => T::Bool,
            "date" => T::Date,
            "timestamp" => T::Timestamp,
            "timestamptz" => T::TimestampTz,
            _ => return None,
        })
    }
}

/// `[tables.T.columns.C]`: what happens to one column's values between source and tiers.
/// Applied in this order: `values`, `default`, `date_format`; then the value is read as the
/// column's type like any other (a value that still does not fit is quarantined).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnMapping {
    /// The column's name in the operational table and the archive.
    #[serde(default)]
    pub rename: Option<String>,
    /// The column's declared type in an operational table Strata creates (a cast, e.g.
    /// `varchar(20)` or `numeric(10,2)`); values that would not fit are quarantined.
    #[serde(default, rename = "type")]
    pub cast: Option<String>,
    /// Value map for codes and statuses (`{ A = "active", I = "inactive" }`), compared as
    /// text; values not listed pass unchanged.
    #[serde(default)]
    pub values: BTreeMap<String, String>,
    /// The value a NULL becomes (as text, read as the column's type).
    #[serde(default)]
    pub default: Option<String>,
    /// The format text dates and times are written in (chrono's `strftime` syntax, e.g.
    /// `%d/%m/%Y %H:%M`); a value that does not match is quarantined.
    #[serde(default)]
    pub date_format: Option<String>,
    /// The time zone those local times are in (`UTC` or an offset such as `+01:00`), for a
    /// timestamp-with-time-zone column. By default, UTC.
    #[serde(default)]
    pub timezone: Option<String>,
    /// Converts lab values between conventional and SI units for the analytes Strata knows
    /// (by LOINC code: glucose, cholesterol, triglycerides, creatinine, urea nitrogen,
    /// hemoglobin), rewriting the unit column too.
    #[serde(default)]
    pub convert_units: Option<UnitConversionConfig>,
    /// What the column holds, for researchers' exports: `name`, `address`, `city`, `county`,
    /// `zip`, `state`, `phone`, `fax`, `email`, `ssn`, `mrn`, `health_plan`, `account`,
    /// `license`, `vehicle`, `device`, `url`, `ip`, `biometric`, `photo`, `unique_id`,
    /// `birth_date`, `death_date`, `age`, `free_text`, `code`, `value`, `unit`, `category`,
    /// `sex`, `record_key`, `patient_key` or `date`. Keys, BLOBs, the record date and date
    /// columns are classed by Strata. A column with no class never leaves in an export
    /// (docs/exports.md).
    #[serde(default)]
    pub class: Option<String>,
    /// For a `record_key` column that points to another table's records: that table (its
    /// pseudonyms then match the other table's keys).
    #[serde(default)]
    pub references: Option<String>,
}

/// `convert_units = { unit_column = "unit", code_column = "loinc_code", to = "SI" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnitConversionConfig {
    /// The column holding each value's unit (rewritten when the value is converted).
    pub unit_column: String,
    /// The column holding the analyte's LOINC code.
    pub code_column: String,
    /// `SI` (mg/dL to mmol/L and the like) or `conventional` (the reverse).
    pub to: String,
    /// Decimal places kept after conversion. By default, 2.
    #[serde(default = "default_decimals")]
    pub decimals: u32,
}

fn default_decimals() -> u32 {
    2
}

/// "This table's patient is the patient of the `via` row that `foreign_key` points to."
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatientVia {
    /// The parent table (configured too, with a single-column primary key).
    pub via: String,
    /// The column of this table that holds the parent's key.
    pub foreign_key: String,
}

/// `record_date`: what dates a record for the policy.
///
/// ```toml
/// record_date = "charttime"                                      # a column of the table
/// record_date = { via = "admissions", foreign_key = "hadm_id", column = "admittime" }
/// record_date = { via = "admissions", foreign_key = "hadm_id" }  # the parent's record date
/// record_date = { start = "period_start", end = "period_end" }   # a period
/// ```
///
/// A parent's date is read in the same query as the row (a join, in the same snapshot), never
/// row by row; without `column` it is the parent's own record date, which may itself come
/// through its parent (chains). The parent's row is the one whose `parent_key` (by default
/// the parent's column named like `foreign_key`, else its primary key) equals `foreign_key`;
/// when that column is not the parent's declared primary key, the latest of the matching
/// rows' dates is taken, so that a repeated id never multiplies a row. A period counts by its end; a period with no end is
/// open, so the record is current: active up to the policy's `as_of`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "toml::Value")]
pub enum RecordDateConfig {
    /// A column of the table.
    Column(String),
    /// A date of the parent row that `foreign_key` points to.
    Via {
        /// The parent table (configured, with a single-column primary key).
        via: String,
        /// The column of this table holding the parent's key.
        foreign_key: String,
        /// The parent's column that `foreign_key` matches: by default the parent's column of
        /// the same name when it has one (`hadm_id` = `hadm_id`), else its primary key.
        parent_key: Option<String>,
        /// The parent's column; by default, the parent's record date.
        column: Option<String>,
    },
    /// A period: dated by its end, current while open.
    Period {
        /// The column where the period starts.
        start: String,
        /// The column where it ends (NULL while it lasts).
        end: String,
    },
}

impl TryFrom<toml::Value> for RecordDateConfig {
    type Error = String;

    fn try_from(value: toml::Value) -> Result<Self, String> {
        const SHAPES: &str = "write a column name, { via = \"parent\", foreign_key = \"column\", column = \"parent's date column\" } or { start = \"column\", end = \"column\" }";
        let table = match value {
            toml::Value::String(column) => return Ok(RecordDateConfig::Column(column)),
            toml::Value::Table(t) => t,
            other => return Err(format!("record_date: a {}; {SHAPES}", other.type_str())),
        };
        let mut fields = BTreeMap::new();
        for (k, v) in table {
            if !matches!(
                k.as_str(),
                "via" | "foreign_key" | "parent_key" | "column" | "start" | "end"
            ) {
                return Err(format!("record_date: unknown field {k:?}; {SHAPES}"));
            }
            let toml::Value::String(v) = v else {
                return Err(format!("record_date.{k}: not a string"));
            };
            fields.insert(k, v);
        }
        let mut take = |k: &str| fields.remove(k);
        let parent_key = take("parent_key");
        match (
            take("via"),
            take("foreign_key"),
            take("column"),
            take("start"),
            take("end"),
        ) {
            (Some(via), Some(foreign_key), column, None, None) => Ok(RecordDateConfig::Via {
                via,
                foreign_key,
                parent_key,
                column,
            }),
            (None, None, None, Some(start), Some(end)) => {
                Ok(RecordDateConfig::Period { start, end })
            }
            _ => Err(format!("record_date: {SHAPES}")),
        }
    }
}

impl RecordDateConfig {
    /// The table's own columns it reads (the foreign key of a parent's date).
    pub fn own_columns(&self) -> Vec<&str> {
        match self {
            RecordDateConfig::Column(c) => vec![c],
            RecordDateConfig::Via { foreign_key, .. } => vec![foreign_key],
            RecordDateConfig::Period { start, end } => vec![start, end],
        }
    }

    /// The one column of the table that holds the date, when there is one.
    pub fn column(&self) -> Option<&str> {
        match self {
            RecordDateConfig::Column(c) => Some(c),
            _ => None,
        }
    }
}

/// A BLOB column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobColumnConfig {
    /// The column.
    pub column: String,
    /// A column holding each BLOB's MIME type.
    #[serde(default)]
    pub content_type_column: Option<String>,
    /// A fixed MIME type when there is no such column. By default, application/octet-stream.
    #[serde(default)]
    pub content_type: Option<String>,
}

fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
        let var = &rest[start + 2..start + end];
        out.push_str(
            &std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?,
        );
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl MigrationConfig {
    /// Parses the config text (minus any `[api]` section, which the caller removes).
    pub fn parse(table: toml::Table, base_dir: &Path) -> Result<Self, crate::IngestError> {
        let mut config: MigrationConfig =
            table
                .try_into()
                .map_err(|e: toml::de::Error| crate::IngestError::Config {
                    problems: vec![e.to_string()],
                })?;
        config.base_dir = base_dir.to_path_buf();
        Ok(config)
    }

    /// The operational database's engine, by its URL's scheme.
    pub fn operational_kind(&self) -> Result<crate::DbKind, crate::IngestError> {
        let url = self.resolve_url(&self.operational.url)?;
        if url.starts_with("sqlite:") {
            Ok(crate::DbKind::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(crate::DbKind::Postgres)
        } else {
            Err(crate::IngestError::Config {
                problems: vec!["[operational] url: not a postgres:// or sqlite:// URL".into()],
            })
        }
    }

    /// A database URL with `${VAR}` expanded and a relative SQLite path resolved.
    pub fn resolve_url(&self, url: &str) -> Result<String, crate::IngestError> {
        let url = expand_env(url).map_err(|p| crate::IngestError::Config { problems: vec![p] })?;
        if let Some(path) = url.strip_prefix("csv://") {
            // Staged beside the config: the operator's directory, kept for resumed runs.
            let dir = if Path::new(path).is_relative() {
                self.base_dir.join(path)
            } else {
                PathBuf::from(path)
            };
            return Ok(format!(
                "csv://{}?staging={}",
                dir.display(),
                self.base_dir.join(".strata-staging").display()
            ));
        }
        if let Some(path) = url.strip_prefix("sqlite://") {
            let (path, query) = path
                .split_once('?')
                .map_or((path, None), |(p, q)| (p, Some(q)));
            if Path::new(path).is_relative() {
                let full = self.base_dir.join(path);
                return Ok(format!(
                    "sqlite://{}{}",
                    full.display(),
                    query.map(|q| format!("?{q}")).unwrap_or_default()
                ));
            }
        }
        Ok(url)
    }

    /// Connects to the source, read-only (a CSV directory is staged with the configured column
    /// types).
    pub async fn connect_source(&self) -> Result<crate::Db, crate::IngestError> {
        let url = self.resolve_url(&self.source.url)?;
        if url.starts_with("csv://") {
            let types = self
                .tables
                .iter()
                .filter(|(_, t)| !t.column_types.is_empty())
                .map(|(n, t)| (n.clone(), t.column_types.clone()))
                .collect();
            return crate::Db::connect_csv(&url, &types).await;
        }
        crate::Db::connect(&url, true).await
    }

    /// The control database URL.
    pub fn control_url(&self) -> Result<String, crate::IngestError> {
        match &self.control {
            Some(c) => self.resolve_url(&c.url),
            None => self.resolve_url("sqlite://strata-control.db"),
        }
    }

    /// The policy file's path.
    pub fn policy_path(&self) -> PathBuf {
        self.base_dir.join(&self.policy.file)
    }

    /// Checks every table's settings against the source schema; lists every problem.
    pub fn validate(&self, schemas: &BTreeMap<String, TableSchema>) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, t) in &self.tables {
            let Some(schema) = schemas.get(name) else {
                problems.push(format!("[tables.{name}]: no such table in the source"));
                continue;
            };
            let mut check = |what: &str, col: &str| {
                if schema.column(col).is_none() {
                    problems.push(format!(
                        "[tables.{name}] {what}: no column {col:?} in {name}"
                    ));
                }
            };
            for c in &t.primary_key {
                check("primary_key", c);
            }
            if let Some(c) = &t.patient_key {
                check("patient_key", c);
            }
            match &t.record_date {
                Some(RecordDateConfig::Column(c)) => check("record_date", c),
                Some(RecordDateConfig::Period { start, end }) => {
                    check("record_date.start", start);
                    check("record_date.end", end);
                }
                Some(RecordDateConfig::Via { foreign_key, .. }) => {
                    check("record_date.foreign_key", foreign_key)
                }
                None => {}
            }
            for c in t.columns.keys() {
                check("columns", c);
            }

            for b in &t.blobs {
                check("blobs.column", &b.column);
                if let Some(c) = &b.content_type_column {
                    check("blobs.content_type_column", c);
                }
            }
            for (c, computed) in &t.computed {
                if computed.column_type().is_none() {
                    problems.push(format!(
                        "[tables.{name}.computed.{c}] type: {:?} is not text, integer, real, boolean, date, timestamp or timestamptz",
                        computed.type_name
                    ));
                }
            }
            for (c, m) in &t.columns {
                if let Some(u) = &m.convert_units {
                    for col in [&u.unit_column, &u.code_column] {
                        if schema.column(col).is_none() {
                            problems.push(format!(
                                "[tables.{name}.columns.{c}] convert_units: no column {col:?} in {name}"
                            ));
                        }
                    }
                    if !matches!(u.to.as_str(), "SI" | "conventional") {
                        problems.push(format!(
                            "[tables.{name}.columns.{c}] convert_units.to: {:?} is not SI or conventional",
                            u.to
                        ));
                    }
                }
                if let Some(tz) = &m.timezone {
                    if crate::mapping::parse_offset(tz).is_none() {
                        problems.push(format!(
                            "[tables.{name}.columns.{c}] timezone: {tz:?} is not UTC or an offset like +01:00"
                        ));
                    }
                }
            }
            if t.patient_key.is_some() && t.patient.is_some() {
                problems.push(format!(
                    "[tables.{name}]: set patient_key or patient, not both"
                ));
            }
            if let Some(via) = &t.patient {
                if schema.column(&via.foreign_key).is_none() {
                    problems.push(format!(
                        "[tables.{name}] patient.foreign_key: no column {:?} in {name}",
                        via.foreign_key
                    ));
                }
                match self.tables.get(&via.via) {
                    None => problems.push(format!("[tables.{name}] patient.via: table {:?} is not configured", via.via)),
                    Some(parent) if parent.primary_key.len() != 1 => problems.push(format!(
                        "[tables.{name}] patient.via: table {:?} needs a single-column primary_key", via.via
                    )),
                    Some(parent) if parent.patient_key.is_none() && parent.patient.is_none() => problems.push(format!(
                        "[tables.{name}] patient.via: table {:?} has no patient_key or patient of its own", via.via
                    )),
                    _ => {}
                }
                if self.via_chain_len(name) > self.tables.len() {
                    problems.push(format!(
                        "[tables.{name}] patient.via: the chain of parents loops"
                    ));
                }
            }
        }
        for name in self.tables.keys() {
            problems.extend(self.parent_date_problems(name, schemas));
        }
        if let Err(classes) = self.classification(None) {
            problems.extend(classes);
        }
        problems
    }

    /// What is wrong with a `record_date = { via = ... }` of `table`: the parent, its key, its
    /// column or its own record date; a loop of parents.
    fn parent_date_problems(
        &self,
        table: &str,
        schemas: &BTreeMap<String, TableSchema>,
    ) -> Vec<String> {
        let Some(RecordDateConfig::Via {
            via,
            foreign_key,
            parent_key,
            column,
        }) = self.tables.get(table).and_then(|t| t.record_date.as_ref())
        else {
            return Vec::new();
        };
        let at = format!("[tables.{table}] record_date.via");
        let Some(parent) = self.tables.get(via) else {
            return vec![format!("{at}: table {via:?} is not configured")];
        };
        let mut problems = Vec::new();
        let parent_schema = schemas.get(via);
        match parent_key {
            Some(k) if parent_schema.is_some_and(|s| s.column(k).is_none()) => {
                problems.push(format!(
                    "[tables.{table}] record_date.parent_key: no column {k:?} in {via}"
                ))
            }
            Some(_) => {}
            None if parent_schema.is_some_and(|s| s.column(foreign_key).is_some()) => {}
            None if parent.primary_key.len() != 1 => problems.push(format!(
                "{at}: {via:?} has no column {foreign_key:?}; name the parent's key (parent_key = \"...\") or give {via} a single-column primary_key"
            )),
            None => {}
        }
        match (column, &parent.record_date) {
            (Some(c), _) => {
                if schemas.get(via).is_some_and(|s| s.column(c).is_none()) {
                    problems.push(format!(
                        "[tables.{table}] record_date.column: no column {c:?} in {via}"
                    ));
                }
            }
            (None, None) => problems.push(format!(
                "{at}: table {via:?} has no record_date; name the parent's column (column = \"...\")"
            )),
            (None, Some(RecordDateConfig::Period { .. })) => problems.push(format!(
                "{at}: table {via:?} is dated by a period; name the parent's column to date by (column = \"...\")"
            )),
            (None, Some(_)) => {
                // The parent's own date: follow the chain to see it ends.
                let mut current = via.as_str();
                for _ in 0..self.tables.len() {
                    match self.tables.get(current).and_then(|t| t.record_date.as_ref()) {
                        Some(RecordDateConfig::Via {
                            via, column: None, ..
                        }) if via == table => {
                            problems.push(format!("{at}: the chain of parents loops"));
                            break;
                        }
                        Some(RecordDateConfig::Via {
                            via, column: None, ..
                        }) => current = via,
                        _ => break,
                    }
                }
            }
        }
        problems
    }

    fn via_chain_len(&self, table: &str) -> usize {
        let mut n = 0;
        let mut t = table;
        while let Some(via) = self.tables.get(t).and_then(|c| c.patient.as_ref()) {
            n += 1;
            if n > self.tables.len() {
                break;
            }
            t = &via.via;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_environment_variables() {
        std::env::set_var("STRATA_TEST_EXPAND", "secret");
        assert_eq!(
            expand_env("postgres://u:${STRATA_TEST_EXPAND}@h/db").unwrap(),
            "postgres://u:secret@h/db"
        );
        assert!(expand_env("${STRATA_TEST_UNSET_VARIABLE}").is_err());
    }
}
