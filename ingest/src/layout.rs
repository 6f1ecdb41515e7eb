//! How one configured table is read: its SELECT, where the patient key comes from, and which
//! positions in each row the policy and the archive need.

use crate::config::{MigrationConfig, TableConfig};
use crate::db::{pg_select_expr, quote, Column, Db, DbKind, ReadAs, TableSchema};
use crate::value::{ColumnType, Value};

/// A BLOB column's positions.
#[derive(Debug, Clone)]
pub struct BlobLayout {
    /// Index of the BLOB column.
    pub column: usize,
    /// Index of its content-type column, if any.
    pub content_type_column: Option<usize>,
    /// Fixed content type otherwise.
    pub content_type: String,
}

/// What a row read with streamed BLOBs carries besides its values.
#[derive(Debug, Clone)]
pub struct StreamedBlobs {
    /// The row's `ctid` in the source snapshot, which locates it for the pieces.
    pub ctid: String,
    /// Per BLOB of the layout: its length, for those that can be streamed.
    pub lengths: Vec<Option<u64>>,
}

/// A table ready to be read.
#[derive(Debug, Clone)]
pub struct TableLayout {
    /// The table name.
    pub name: String,
    /// The source schema.
    pub schema: TableSchema,
    /// Positions of the primary key columns.
    pub key: Vec<usize>,
    /// Position of the record date column.
    pub record_date: Option<usize>,
    /// Positions of the columns the policy reads (`current_when`, hold filters), in the order
    /// the policy expects them.
    pub policy_columns: Vec<Option<usize>>,
    /// Their names, in the same order.
    pub policy_column_names: Vec<String>,
    /// BLOB columns.
    pub blobs: Vec<BlobLayout>,
    /// SQL expression of the patient key (aliases t0, t1, ...), `NULL` when the table has none.
    pub patient_expr: String,
    /// The joins the patient expression needs.
    pub joins: String,
    /// Per-table quarantine threshold.
    pub quarantine_threshold: Option<u64>,
    /// The column holding the patient key when it is a plain integer or text column of the
    /// table itself: its text is then taken from the value read, instead of selecting
    /// `CAST(... AS TEXT)` (which costs the source a conversion per row).
    pub patient_column: Option<usize>,
    /// Per column, its declared mapping (None when it maps nothing).
    pub maps: Vec<Option<crate::mapping::ColumnMap>>,
    /// Per column, its name in the operational table and the archive (renamed or not).
    pub target_names: Vec<String>,
    /// Per column, the SQL expression of a computed column (None for the table's own).
    pub computed: Vec<Option<String>>,
    /// Per column, the declared type a created operational table gives it, when cast.
    pub casts: Vec<Option<String>>,
}

impl TableLayout {
    /// Resolves a configured table against its schema (the config is validated already).
    pub fn new(
        config: &MigrationConfig,
        name: &str,
        table: &TableConfig,
        schema: TableSchema,
        policy_columns: &[String],
    ) -> Self {
        let pos = |c: &str| schema.columns.iter().position(|col| col.name == c);
        let (patient_expr, joins) = patient_expr(config, name);
        let mappings: Vec<Option<&crate::config::ColumnMapping>> = schema
            .columns
            .iter()
            .map(|c| table.columns.get(&c.name))
            .collect();
        TableLayout {
            name: name.to_string(),
            key: table.primary_key.iter().filter_map(|c| pos(c)).collect(),
            record_date: table.record_date.as_deref().and_then(pos),
            policy_columns: policy_columns.iter().map(|c| pos(c)).collect(),
            policy_column_names: policy_columns.to_vec(),
            blobs: table
                .blobs
                .iter()
                .filter_map(|b| {
                    Some(BlobLayout {
                        column: pos(&b.column)?,
                        content_type_column: b.content_type_column.as_deref().and_then(pos),
                        content_type: b
                            .content_type
                            .clone()
                            .unwrap_or_else(|| "application/octet-stream".into()),
                    })
                })
                .collect(),
            patient_expr,
            joins,
            quarantine_threshold: table.quarantine_threshold,
            maps: mappings
                .iter()
                .map(|m| {
                    m.map(|m| {
                        let mut map = crate::mapping::ColumnMap::new(m);
                        map.convert = m.convert_units.as_ref().and_then(|u| {
                            Some(crate::mapping::UnitConversion {
                                unit: pos(&u.unit_column)?,
                                code: pos(&u.code_column)?,
                                to_si: u.to == "SI",
                                decimals: u.decimals,
                            })
                        });
                        map
                    })
                    .filter(|m| !m.is_identity())
                })
                .collect(),
            casts: mappings
                .iter()
                .map(|m| m.and_then(|m| m.cast.clone()))
                .collect(),
            computed: schema
                .columns
                .iter()
                .map(|c| table.computed.get(&c.name).map(|e| e.expr.clone()))
                .collect(),
            target_names: schema
                .columns
                .iter()
                .zip(&mappings)
                .map(|(c, m)| {
                    m.and_then(|m| m.rename.clone())
                        .unwrap_or_else(|| c.name.clone())
                })
                .collect(),
            patient_column: table.patient_key.as_deref().and_then(pos).filter(|&i| {
                matches!(
                    schema.columns[i].col_type,
                    ColumnType::Int | ColumnType::Text
                )
            }),
            schema,
        }
    }

    /// The columns.
    pub fn columns(&self) -> &[Column] {
        &self.schema.columns
    }

    /// How `Db::fetch` reads the fields of [`TableLayout::select_where`] from `db`: the columns,
    /// then the patient key, then what `streamed` BLOBs add.
    pub fn fetch_types(&self, db: &Db, streamed: &[usize]) -> Vec<ReadAs> {
        let mut t: Vec<ReadAs> = self
            .columns()
            .iter()
            .zip(&self.computed)
            .map(|(c, computed)| {
                if computed.is_none() && numeric_in_binary(db, c) {
                    ReadAs::NumericText
                } else {
                    ReadAs::Type(c.col_type)
                }
            })
            .collect();
        if self.patient_column.is_none() {
            t.push(ColumnType::Text.into());
        }
        if !streamed.is_empty() {
            t.extend(streamed.iter().map(|_| ReadAs::Type(ColumnType::Int)));
            t.push(ColumnType::Text.into());
        }
        t
    }

    /// The table as the operational database and the archive name it: columns renamed and
    /// cast as configured, and the configured primary key (which the source may not declare).
    pub fn target_schema(&self) -> TableSchema {
        TableSchema {
            name: self.name.clone(),
            columns: self
                .columns()
                .iter()
                .zip(&self.target_names)
                .zip(&self.casts)
                .map(|((c, n), cast)| Column {
                    name: n.clone(),
                    decl_type: cast.clone().unwrap_or_else(|| c.decl_type.clone()),
                    ..c.clone()
                })
                .collect(),
            primary_key: self
                .key
                .iter()
                .map(|&k| self.target_names[k].clone())
                .collect(),
            foreign_keys: Vec::new(),
        }
    }

    /// Applies the declared mappings to a row read (its own columns only); on failure, the
    /// column and the reason.
    pub fn map_row(&self, values: &mut [Value]) -> Option<(usize, &'static str)> {
        for (i, m) in self.maps.iter().enumerate() {
            let Some(m) = m else { continue };
            let v = std::mem::replace(&mut values[i], Value::Null);
            match m.apply(v, self.columns()[i].col_type) {
                Ok(mapped) => values[i] = mapped,
                Err(reason) => return Some((i, reason)),
            }
            if let Some(convert) = &m.convert {
                convert.apply(values, i);
            }
        }
        None
    }

    /// The BLOB columns (indexes into `blobs`) that a PostgreSQL source can stream in pieces:
    /// `bytea` columns read as they are.
    pub fn streamable_blobs(&self, db: &Db) -> Vec<usize> {
        if db.kind() != DbKind::Postgres {
            return Vec::new();
        }
        self.blobs
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                self.computed[b.column].is_none()
                    && self.columns()[b.column].col_type == ColumnType::Bytes
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Takes the trailing columns that [`TableLayout::select_where`] adds for `streamed`
    /// BLOBs: the row's `ctid` and the length of each such BLOB, whose value was left out when
    /// longer than the inline limit.
    pub fn take_streamed(
        &self,
        values: &mut Vec<Value>,
        streamed: &[usize],
    ) -> Option<StreamedBlobs> {
        if streamed.is_empty() {
            return None;
        }
        let ctid = values
            .pop()
            .and_then(Value::into_key_text)
            .unwrap_or_default();
        let mut lengths = vec![None; self.blobs.len()];
        for &b in streamed.iter().rev() {
            if let Some(Value::Int(n)) = values.pop() {
                lengths[b] = Some(n as u64);
            }
        }
        Some(StreamedBlobs { ctid, lengths })
    }

    /// Takes a fetched row's patient key as text, leaving the row's own columns.
    pub fn take_patient(&self, values: &mut Vec<Value>) -> Option<String> {
        match self.patient_column {
            Some(i) => values[i].as_key_text(),
            None => values.pop().and_then(Value::into_key_text),
        }
    }

    fn patient_text(&self) -> String {
        format!("CAST({} AS TEXT)", self.patient_expr)
    }

    /// SELECT of every column plus the patient key, restricted by a condition on `t0`. Rows
    /// come in whatever order is cheapest: the archive writer sorts archived rows itself
    /// (an `ORDER BY` would cost the source as much as the read).
    ///
    /// With `streamed` BLOBs (from [`TableLayout::streamable_blobs`]), each of those columns
    /// is NULL when longer than `inline_max` bytes, and the row ends with their lengths and
    /// its `ctid` ([`TableLayout::take_streamed`]) so that the long ones can be read in pieces.
    pub fn select_where(
        &self,
        db: &Db,
        filter: Option<&str>,
        streamed: &[usize],
        inline_max: u64,
    ) -> String {
        let column = |i: usize| format!("t0.{}", quote(&self.columns()[i].name));
        let mut cols: Vec<String> = self
            .columns()
            .iter()
            .zip(&self.computed)
            .enumerate()
            .map(|(i, (c, computed))| {
                let e = match computed {
                    Some(expr) => format!("({expr})"),
                    None if streamed.iter().any(|&b| self.blobs[b].column == i) => format!(
                        "CASE WHEN octet_length({0}) <= {inline_max} THEN {0} END",
                        column(i)
                    ),
                    None => column(i),
                };
                match db.kind() {
                    // Integers, floats, text of any width and numerics arrive in binary as
                    // they are; other types are converted by the server.
                    DbKind::Postgres
                        if computed.is_none() && (arrives_as_is(c) || numeric_in_binary(db, c)) =>
                    {
                        e
                    }
                    DbKind::Postgres => pg_select_expr(&e, c.col_type),
                    DbKind::Sqlite => e,
                }
            })
            .collect();
        if self.patient_column.is_none() {
            cols.push(self.patient_text());
        }
        if !streamed.is_empty() {
            for &b in streamed {
                cols.push(format!(
                    "octet_length({})::bigint",
                    column(self.blobs[b].column)
                ));
            }
            cols.push("t0.ctid::text".into());
        }
        format!(
            "SELECT {} FROM {} AS t0{}{}",
            cols.join(", "),
            quote(&self.name),
            self.joins,
            filter.map(|f| format!(" WHERE {f}")).unwrap_or_default(),
        )
    }

    /// Per patient, the latest record date before `before` (YYYY-MM-DD), if the table has both.
    pub fn last_activity_sql(&self, db: &Db, before: &str) -> Option<(String, Vec<ColumnType>)> {
        let d = self.record_date?;
        if self.patient_expr == "NULL" {
            return None;
        }
        let col = &self.columns()[d];
        let date = format!("t0.{}", quote(&col.name));
        let max = match db.kind() {
            DbKind::Postgres => pg_select_expr(&format!("MAX({date})"), col.col_type),
            DbKind::Sqlite => format!("MAX({date})"),
        };
        let sql = format!(
            "SELECT {}, {max} FROM {} AS t0{} WHERE {date} < '{before}' GROUP BY 1",
            self.patient_text(),
            quote(&self.name),
            self.joins
        );
        Some((sql, vec![ColumnType::Text, col.col_type]))
    }
}

/// A PostgreSQL `numeric` column: read in binary and printed by Strata as PostgreSQL prints it
/// (see [`ReadAs::NumericText`]).
fn numeric_in_binary(db: &Db, c: &Column) -> bool {
    db.kind() == DbKind::Postgres
        && c.col_type == ColumnType::Other
        && c.decl_type.split('(').next() == Some("numeric")
}

/// Whether a PostgreSQL column's binary form is what the decoder reads for its type without a
/// cast (`character(n)` is cast to drop its padding, as text always was).
fn arrives_as_is(c: &Column) -> bool {
    match c.col_type {
        ColumnType::Int => matches!(c.decl_type.as_str(), "smallint" | "integer" | "bigint"),
        ColumnType::Float => matches!(c.decl_type.as_str(), "real" | "double precision"),
        ColumnType::Text => c.decl_type == "text" || c.decl_type.starts_with("character varying"),
        _ => false,
    }
}

fn patient_expr(config: &MigrationConfig, table: &str) -> (String, String) {
    let mut joins = String::new();
    let mut current = table;
    for alias in 0..=config.tables.len() {
        let Some(t) = config.tables.get(current) else {
            break;
        };
        if let Some(col) = &t.patient_key {
            return (format!("t{alias}.{}", quote(col)), joins);
        }
        let Some(via) = &t.patient else { break };
        let Some(parent) = config.tables.get(&via.via) else {
            break;
        };
        let Some(pk) = parent.primary_key.first() else {
            break;
        };
        joins.push_str(&format!(
            " LEFT JOIN {} AS t{} ON t{alias}.{} = t{}.{}",
            quote(&via.via),
            alias + 1,
            quote(&via.foreign_key),
            alias + 1,
            quote(pk)
        ));
        current = &via.via;
    }
    ("NULL".to_string(), String::new())
}
