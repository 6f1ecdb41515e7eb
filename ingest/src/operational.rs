//! The operational database after go-live, as `strata tier` and retention read it: its tables
//! in the new EHR's names (`[operational.tables.T]`), and the view that lets the one route
//! stage decide their rows under the policy, which names tables and columns as the migration
//! did.
//!
//! Without `[operational.tables]`, the operational tables are the ones the migration created:
//! each migrated table under its own name, its columns under their target names (renamed or
//! not). With it, only the tables listed are read, each under its operational name, with its
//! own keys and dates; `archive_table` and `columns` say what the archive and the policy call
//! the table and its renamed columns. A column the operational table added since the migration
//! is archived under its own name (a new nullable column of new archive files).

use crate::config::{
    BlobColumnConfig, ColumnMapping, MigrationConfig, PatientVia, RecordDateConfig, TableConfig,
};
use crate::db::{Db, DbKind, TableSchema};
use crate::error::{IngestError, Result};
use crate::layout::TableLayout;
use serde::Deserialize;
use std::collections::BTreeMap;
use strata_cutoff_policies::{LegalHold, PolicyConfig};

/// `[operational]`: the new operational database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationalConfig {
    /// Its URL (`postgres://...` or `sqlite://...`; `${VAR}` is expanded).
    pub url: String,
    /// The tables `strata tier` moves records out of after go-live, by their names in the
    /// operational database. By default, the tables the migration created.
    #[serde(default)]
    pub tables: BTreeMap<String, OperationalTableConfig>,
    /// Rows one `strata tier` batch moves at most: each batch holds its rows locked while
    /// their archive file is written, so smaller batches block the application less, larger
    /// ones write fewer files. By default, 2,000.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
}

fn default_batch_rows() -> usize {
    2_000
}

/// `[operational.tables.T]`: one operational table, in the operational database's names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationalTableConfig {
    /// The table's name in the archive and the policy, when the operational database names it
    /// otherwise. By default, the same name.
    #[serde(default)]
    pub archive_table: Option<String>,
    /// Primary key columns (required: a row is deleted by its key and version).
    #[serde(default)]
    pub primary_key: Vec<String>,
    /// The column holding the patient key.
    #[serde(default)]
    pub patient_key: Option<String>,
    /// How to reach the patient through a parent (an operational table listed too).
    #[serde(default)]
    pub patient: Option<PatientVia>,
    /// What dates a record, as under `[tables.T]` (parents are operational tables).
    #[serde(default)]
    pub record_date: Option<RecordDateConfig>,
    /// BLOB columns, archived as encrypted objects.
    #[serde(default)]
    pub blobs: Vec<BlobColumnConfig>,
    /// Columns the operational table names otherwise than the archive:
    /// `{ operational name = "archived name" }`. The policy's columns (`current_when`, hold
    /// filters) are found through them and the migration's renames.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Row-level `DELETE` triggers of the table someone has checked and found harmless (an
    /// audit trail): by name. A table with any other such trigger is not tiered, since what
    /// the trigger does cannot be known (see docs/operations.md).
    #[serde(default)]
    pub allow_delete_triggers: Vec<String>,
}

/// The operational tables as tier reads them: a configuration whose tables are keyed by their
/// archive names, each with its operational name as `relation` and its renamed columns mapped
/// to their archived names, plus how to find the policy's columns.
#[derive(Debug, Clone)]
pub(crate) struct OperationalView {
    /// The view's configuration (its `tables`, the rest the migration's).
    pub config: MigrationConfig,
    /// Per table (archive name): the operational name of each column the migration's config
    /// knows by another name (source name → operational name).
    pub source_names: BTreeMap<String, BTreeMap<String, String>>,
    /// Per table (archive name): the DELETE triggers allowed.
    pub allowed_triggers: BTreeMap<String, Vec<String>>,
    /// Whether the tables are listed (`[operational.tables]`), not taken from the migration.
    pub listed: bool,
}

impl OperationalView {
    /// The view of `config`'s operational database: see the module's docs.
    pub fn new(config: &MigrationConfig) -> Self {
        let listed = if config.operational.tables.is_empty() {
            migrated_tables(config)
        } else {
            config.operational.tables.clone()
        };
        let archive_name = |op: &str| -> String {
            listed
                .get(op)
                .and_then(|t| t.archive_table.clone())
                .unwrap_or_else(|| op.to_string())
        };
        let mut view = OperationalView {
            config: config.clone(),
            source_names: BTreeMap::new(),
            allowed_triggers: BTreeMap::new(),
            listed: !config.operational.tables.is_empty(),
        };
        view.config.tables = BTreeMap::new();
        for (op, t) in &listed {
            let name = archive_name(op);
            // Source name → archived name, as the migration renamed; then → operational name.
            let archived_as_op: BTreeMap<&str, &str> = t
                .columns
                .iter()
                .map(|(o, a)| (a.as_str(), o.as_str()))
                .collect();
            let mut names = BTreeMap::new();
            let mut renamed_to = std::collections::BTreeSet::new();
            if let Some(source) = config.tables.get(&name) {
                for (c, m) in &source.columns {
                    let archived = m.rename.as_deref().unwrap_or(c);
                    if m.rename.is_some() {
                        renamed_to.insert(archived);
                    }
                    let op_name = archived_as_op.get(archived).copied().unwrap_or(archived);
                    names.insert(c.clone(), op_name.to_string());
                }
            }
            // A column the migration did not rename: its source name is its archived name.
            for (archived, o) in &archived_as_op {
                if !renamed_to.contains(archived) {
                    names
                        .entry(archived.to_string())
                        .or_insert_with(|| o.to_string());
                }
            }
            view.source_names.insert(name.clone(), names);
            view.allowed_triggers
                .insert(name.clone(), t.allow_delete_triggers.clone());
            let record_date = t.record_date.clone().map(|d| match d {
                RecordDateConfig::Via {
                    via,
                    foreign_key,
                    parent_key,
                    column,
                } => RecordDateConfig::Via {
                    via: archive_name(&via),
                    foreign_key,
                    parent_key,
                    column,
                },
                other => other,
            });
            view.config.tables.insert(
                name,
                TableConfig {
                    primary_key: t.primary_key.clone(),
                    patient_key: t.patient_key.clone(),
                    patient: t.patient.clone().map(|p| PatientVia {
                        via: archive_name(&p.via),
                        foreign_key: p.foreign_key,
                    }),
                    record_date,
                    blobs: t.blobs.clone(),
                    columns: t
                        .columns
                        .iter()
                        .map(|(o, a)| {
                            (
                                o.clone(),
                                ColumnMapping {
                                    rename: Some(a.clone()),
                                    ..Default::default()
                                },
                            )
                        })
                        .collect(),
                    relation: Some(op.clone()),
                    ..Default::default()
                },
            );
        }
        view
    }

    /// The operational name of a column of `table` that the policy or the migration's
    /// config names `column`.
    pub fn column(&self, table: &str, column: &str) -> String {
        self.source_names
            .get(table)
            .and_then(|n| n.get(column))
            .cloned()
            .unwrap_or_else(|| column.to_string())
    }

    /// The name the migration's config gives a column of `table` the operational database
    /// calls `column` (the inverse of [`OperationalView::column`]).
    pub fn source_column(&self, table: &str, column: &str) -> String {
        self.source_names
            .get(table)
            .and_then(|n| n.iter().find(|(_, op)| *op == column))
            .map(|(source, _)| source.clone())
            .unwrap_or_else(|| column.to_string())
    }

    /// Every problem of the tables against their schemas (keyed by archive name). A table
    /// taken from the migration may lack a key (tier then leaves it alone, and says so).
    pub fn problems(&self, schemas: &BTreeMap<String, TableSchema>) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, t) in &self.config.tables {
            let op = t.relation.as_deref().unwrap_or(name);
            let at = format!("[operational.tables.{op}]");
            // A migrated table the operational database lacks (all its rows archived) is
            // left out; a listed one must be there.
            let Some(schema) = schemas.get(name) else {
                if self.listed {
                    problems.push(format!("{at}: no such table in the operational database"));
                }
                continue;
            };
            if t.primary_key.is_empty() && self.listed {
                problems.push(format!(
                    "{at} primary_key: required (tier deletes a row by its key and version)"
                ));
            }
            let mut named: Vec<(&str, &str)> = Vec::new();
            named.extend(t.primary_key.iter().map(|c| ("primary_key", c.as_str())));
            named.extend(t.patient_key.iter().map(|c| ("patient_key", c.as_str())));
            if let Some(d) = &t.record_date {
                named.extend(d.own_columns().into_iter().map(|c| ("record_date", c)));
            }
            named.extend(t.blobs.iter().map(|b| ("blobs.column", b.column.as_str())));
            named.extend(t.columns.keys().map(|c| ("columns", c.as_str())));
            for (what, col) in named {
                if schema.column(col).is_none() {
                    problems.push(format!("{at} {what}: no column {col:?} in {op}"));
                }
            }
        }
        problems
    }
}

/// The operational tables as they stand: the view, each table's schema (by archive name),
/// and the columns the policy may name in each (the operational columns and, for those the
/// policy knows by another name, that name).
pub(crate) struct OperationalTables {
    pub view: OperationalView,
    pub schemas: BTreeMap<String, TableSchema>,
    pub known: BTreeMap<String, Vec<String>>,
}

impl OperationalTables {
    /// Reads the tables of `config`'s view from the operational database `op`; every problem
    /// of the view against them is an error.
    pub async fn read(config: &MigrationConfig, op: &Db, policy: &PolicyConfig) -> Result<Self> {
        let view = OperationalView::new(config);
        let existing = op.table_names().await?;
        let mut schemas = BTreeMap::new();
        for (name, t) in &view.config.tables {
            let relation = t.relation.clone().unwrap_or_else(|| name.clone());
            if existing.contains(&relation) {
                schemas.insert(name.clone(), op.table_schema(&relation).await?);
            }
        }
        let problems = view.problems(&schemas);
        if !problems.is_empty() {
            return Err(IngestError::Config { problems });
        }
        let mut known: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (table, schema) in &schemas {
            let mut columns: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
            for (policy_name, op_name) in view.source_names.get(table).into_iter().flatten() {
                if schema.column(op_name).is_some() {
                    columns.push(policy_name.clone());
                }
            }
            known.insert(table.clone(), columns);
        }
        // A table the policy has rules for but the view leaves out is not checked here.
        for (table, rules) in &policy.tables {
            known.entry(table.clone()).or_insert_with(|| {
                rules
                    .current_when
                    .iter()
                    .map(|c| c.column.clone())
                    .collect()
            });
        }
        Ok(OperationalTables {
            view,
            schemas,
            known,
        })
    }

    /// The tables' layouts, reading the columns the policy needs (with `holds`) under their
    /// operational names.
    pub fn layouts(
        &self,
        policy: &PolicyConfig,
        holds: &[LegalHold],
        kind: DbKind,
    ) -> Vec<TableLayout> {
        let mut layouts = Vec::new();
        for (name, t) in &self.view.config.tables {
            let Some(schema) = self.schemas.get(name) else {
                continue;
            };
            let needed = policy.columns_needed(name, holds);
            let op_names: Vec<String> = needed.iter().map(|c| self.view.column(name, c)).collect();
            let mut layout = TableLayout::new(
                &self.view.config,
                name,
                t,
                schema.clone(),
                &self.schemas,
                &op_names,
            );
            layout.policy_column_names = needed;
            // Record keys as the migration named them, so that a moved record is the same
            // record in the archive.
            layout.key_names = layout
                .key_names
                .iter()
                .map(|c| self.view.source_column(name, c))
                .collect();
            layout.read_decimals(kind);
            layouts.push(layout);
        }
        layouts
    }

    /// The patients table of `policy`, as the operational database holds it, among `layouts`.
    pub fn patients<'a>(
        &self,
        policy: &PolicyConfig,
        layouts: &'a [TableLayout],
    ) -> Option<crate::facts::PatientTable<'a>> {
        let p = policy.patients.as_ref()?;
        Some(crate::facts::PatientTable {
            layout: layouts.iter().find(|l| l.name == p.table)?,
            birth: p
                .birth_date
                .as_deref()
                .map(|c| self.view.column(&p.table, c)),
            death: p
                .deceased_date
                .as_deref()
                .map(|c| self.view.column(&p.table, c)),
        })
    }
}

/// The tables the migration created, as `[operational.tables]` would list them: each
/// migrated table under its name, keys, dates and BLOBs under their target names.
fn migrated_tables(config: &MigrationConfig) -> BTreeMap<String, OperationalTableConfig> {
    let renamed = |table: &str, column: &str| -> String {
        config
            .tables
            .get(table)
            .and_then(|t| t.columns.get(column))
            .and_then(|m| m.rename.clone())
            .unwrap_or_else(|| column.to_string())
    };
    config
        .tables
        .iter()
        .map(|(name, t)| {
            let r = |c: &str| renamed(name, c);
            let record_date = t.record_date.as_ref().map(|d| match d {
                RecordDateConfig::Column(c) => RecordDateConfig::Column(r(c)),
                RecordDateConfig::Period { start, end } => RecordDateConfig::Period {
                    start: r(start),
                    end: r(end),
                },
                RecordDateConfig::Via {
                    via,
                    foreign_key,
                    parent_key,
                    column,
                } => RecordDateConfig::Via {
                    via: via.clone(),
                    foreign_key: r(foreign_key),
                    parent_key: parent_key.as_deref().map(|k| renamed(via, k)),
                    column: column.as_deref().map(|c| renamed(via, c)),
                },
            });
            let table = OperationalTableConfig {
                archive_table: None,
                primary_key: t.primary_key.iter().map(|c| r(c)).collect(),
                patient_key: t.patient_key.as_deref().map(r),
                patient: t.patient.as_ref().map(|p| PatientVia {
                    via: p.via.clone(),
                    foreign_key: r(&p.foreign_key),
                }),
                record_date,
                blobs: t
                    .blobs
                    .iter()
                    .map(|b| BlobColumnConfig {
                        column: r(&b.column),
                        content_type_column: b.content_type_column.as_deref().map(r),
                        content_type: b.content_type.clone(),
                    })
                    .collect(),
                columns: BTreeMap::new(),
                allow_delete_triggers: Vec::new(),
            };
            (name.clone(), table)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> MigrationConfig {
        let base = "[source]\nurl = \"sqlite://legacy.db\"\n[archive]\nlocation = \"archive\"\nkek_id = \"test\"\n[policy]\nfile = \"policy.toml\"\n";
        MigrationConfig::parse(
            toml::from_str(&format!("{base}{text}")).unwrap(),
            std::path::Path::new("."),
        )
        .unwrap()
    }

    #[test]
    fn by_default_the_tables_the_migration_created_under_their_target_names() {
        let c = config(
            "[operational]\nurl = \"sqlite://new.db\"\n\
             [tables.labs]\nprimary_key = [\"id\"]\npatient_key = \"subject\"\nrecord_date = \"taken\"\n\
             [tables.labs.columns.subject]\nrename = \"patient_id\"\n\
             [tables.labs.columns.flag]\nrename = \"status\"\n",
        );
        let view = OperationalView::new(&c);
        let labs = &view.config.tables["labs"];
        assert_eq!(labs.relation.as_deref(), Some("labs"));
        assert_eq!(labs.patient_key.as_deref(), Some("patient_id"));
        assert_eq!(
            labs.record_date,
            Some(RecordDateConfig::Column("taken".into()))
        );
        assert!(labs.columns.is_empty());
        // The policy's `flag` is the operational `status`.
        assert_eq!(view.column("labs", "flag"), "status");
        assert_eq!(view.column("labs", "taken"), "taken");
    }

    #[test]
    fn listed_tables_are_read_in_the_new_ehr_names() {
        let c = config(
            "[operational]\nurl = \"sqlite://new.db\"\n\
             [operational.tables.lab_result]\narchive_table = \"labs\"\nprimary_key = [\"lab_id\"]\n\
             patient_key = \"person\"\nrecord_date = \"collected\"\ncolumns = { lab_state = \"status\" }\n\
             [tables.labs]\nprimary_key = [\"id\"]\n\
             [tables.labs.columns.flag]\nrename = \"status\"\n",
        );
        let view = OperationalView::new(&c);
        let labs = &view.config.tables["labs"];
        assert_eq!(labs.relation.as_deref(), Some("lab_result"));
        assert_eq!(labs.primary_key, ["lab_id"]);
        assert_eq!(labs.columns["lab_state"].rename.as_deref(), Some("status"));
        assert_eq!(view.column("labs", "flag"), "lab_state");
        assert_eq!(view.column("labs", "status"), "status", "not a source name");
        // Record keys are named as the migration named them.
        assert_eq!(view.source_column("labs", "lab_state"), "flag");
    }

    #[test]
    fn record_keys_keep_the_source_names_of_renamed_keys() {
        let c = config(
            "[operational]\nurl = \"sqlite://new.db\"\n\
             [tables.labs]\nprimary_key = [\"lab_no\"]\n\
             [tables.labs.columns.lab_no]\nrename = \"id\"\n",
        );
        let view = OperationalView::new(&c);
        assert_eq!(view.config.tables["labs"].primary_key, ["id"]);
        assert_eq!(view.source_column("labs", "id"), "lab_no");
    }
}
