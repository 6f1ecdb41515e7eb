//! How one configured table is read: its SELECT, where the patient key comes from, and which
//! positions in each row the policy and the archive need.

use crate::config::{MigrationConfig, RecordDateConfig, TableConfig};
use crate::db::{pg_select_expr, quote, Column, Db, DbKind, ReadAs, TableSchema};
use crate::decimal::Decimal;
use crate::mapping::ColumnMap;
use crate::value::{ColumnType, Value};
use std::collections::BTreeMap;

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

/// A PostgreSQL row version: where the row is (`ctid`) and the transaction that wrote it
/// (`xmin`). An update writes a new version, with both changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowVersion {
    /// The tuple's location, as PostgreSQL prints it (`(page,item)`).
    pub ctid: String,
    /// The writing transaction's id.
    pub xmin: String,
}

/// Where a row's record date is read.
#[derive(Debug, Clone)]
pub enum RecordDate {
    /// The table has none.
    None,
    /// A point in time.
    Point(DateField),
    /// A period: dated by its end, current (dated `as_of`) while its end is NULL.
    Period {
        /// Where it starts.
        start: DateField,
        /// Where it ends.
        end: DateField,
    },
}

/// One date a row's record date is read from.
#[derive(Debug, Clone)]
pub enum DateField {
    /// A column of the row, mapped and coerced with it.
    Column(usize),
    /// The `field`-th date read through a parent, after the row's columns
    /// ([`TableLayout::take_extras`]): read as the parent's column's type and mapped by its
    /// mapping.
    Parent {
        /// Its position among the parents' dates.
        field: usize,
        /// The parent column's type.
        col_type: ColumnType,
        /// The parent column's mapping, if it maps anything.
        map: Option<Box<ColumnMap>>,
    },
}

/// What a row read carries besides its own columns.
#[derive(Debug, Default)]
pub struct RowExtras {
    /// The patient key as text.
    pub patient: Option<String>,
    /// The dates read through parents, in the order of [`DateField::Parent`]'s `field`.
    pub parent_dates: Vec<Value>,
}

/// A parent's date as SQL: its expression over the table's alias `t0` and the joins it needs.
struct ParentDate {
    expr: String,
    joins: String,
    col_type: ColumnType,
    map: Option<Box<ColumnMap>>,
}

/// A table ready to be read.
#[derive(Debug, Clone)]
pub struct TableLayout {
    /// The table name (in the policy, the archive and the operational database a migration
    /// fills).
    pub name: String,
    /// The table's name in the database it is read from: `name`, but for an operational table
    /// `strata tier` reads under another name.
    pub relation: String,
    /// The source schema.
    pub schema: TableSchema,
    /// Positions of the primary key columns.
    pub key: Vec<usize>,
    /// The key columns' names in record keys (`col=value,...`): their names as read, but for
    /// a table `strata tier` reads under other names (its record keys are the migration's).
    pub key_names: Vec<String>,
    /// Where the record date is read.
    pub record_date: RecordDate,
    /// The SQL expressions of the dates read through parents (selected after the columns).
    pub parent_dates: Vec<String>,
    /// The joins those dates need.
    pub date_joins: String,
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
    /// Whether rows are read with their version, `ctid` and `xmin` (PostgreSQL), last
    /// ([`TableLayout::take_row_version`]): `strata tier` deletes a row only where it is the
    /// version it read.
    pub row_version: bool,
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
    /// Per column, the exact decimal it holds, if any (set by [`TableLayout::read_decimals`]).
    pub decimals: Vec<Option<Decimal>>,
}

impl TableLayout {
    /// Resolves a configured table against its schema (the config is validated already);
    /// `schemas` holds the other tables' schemas, for dates read through parents.
    pub fn new(
        config: &MigrationConfig,
        name: &str,
        table: &TableConfig,
        schema: TableSchema,
        schemas: &BTreeMap<String, TableSchema>,
        policy_columns: &[String],
    ) -> Self {
        let pos = |c: &str| schema.columns.iter().position(|col| col.name == c);
        let (patient_expr, joins) = patient_expr(config, name);
        let mut parent_dates = Vec::new();
        let mut date_joins = String::new();
        let field = |c: &str| pos(c).map(DateField::Column);
        let record_date = match &table.record_date {
            None => RecordDate::None,
            Some(RecordDateConfig::Column(c)) => {
                field(c).map_or(RecordDate::None, RecordDate::Point)
            }
            Some(RecordDateConfig::Period { start, end }) => match (field(start), field(end)) {
                (Some(start), Some(end)) => RecordDate::Period { start, end },
                _ => RecordDate::None,
            },
            Some(RecordDateConfig::Via { .. }) => match parent_date(config, schemas, name, 1) {
                Some(p) => {
                    parent_dates.push(p.expr);
                    date_joins = p.joins;
                    RecordDate::Point(DateField::Parent {
                        field: 0,
                        col_type: p.col_type,
                        map: p.map,
                    })
                }
                None => RecordDate::None,
            },
        };
        let mappings: Vec<Option<&crate::config::ColumnMapping>> = schema
            .columns
            .iter()
            .map(|c| table.columns.get(&c.name))
            .collect();
        TableLayout {
            name: name.to_string(),
            relation: table.relation.clone().unwrap_or_else(|| name.to_string()),
            key: table.primary_key.iter().filter_map(|c| pos(c)).collect(),
            key_names: table
                .primary_key
                .iter()
                .filter(|c| pos(c).is_some())
                .cloned()
                .collect(),
            record_date,
            parent_dates,
            date_joins,
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
            row_version: false,
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
            decimals: vec![None; schema.columns.len()],
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

    /// Marks the columns that hold exact decimals in a `source` of this kind ([`Decimal::of`]),
    /// so that they are archived as decimals.
    pub fn read_decimals(&mut self, source: DbKind) {
        self.decimals = self
            .columns()
            .iter()
            .zip(&self.computed)
            .map(|(c, computed)| {
                computed
                    .is_none()
                    .then(|| Decimal::of(&c.decl_type, source))
                    .flatten()
            })
            .collect();
    }

    /// A value of a row bound for the archive that the archive cannot hold exactly: a NaN or
    /// an infinity in a `numeric(p,s)` column (Parquet's DECIMAL has neither).
    pub fn archive_problem(&self, values: &[Value]) -> Option<(usize, &'static str)> {
        self.decimals.iter().enumerate().find_map(|(i, d)| match d {
            Some(d @ Decimal::Fixed { .. })
                if !values[i].is_null() && d.units(&values[i]).is_none() =>
            {
                Some((
                    i,
                    "not a decimal the archive's DECIMAL column can hold exactly (NaN?)",
                ))
            }
            _ => None,
        })
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
        if let RecordDate::Point(DateField::Parent { col_type, .. }) = &self.record_date {
            t.push(ReadAs::Type(*col_type));
        }
        if self.patient_column.is_none() {
            t.push(ColumnType::Text.into());
        }
        if !streamed.is_empty() {
            t.extend(streamed.iter().map(|_| ReadAs::Type(ColumnType::Int)));
            t.push(ColumnType::Text.into());
        }
        if self.row_version {
            t.extend([
                ReadAs::Type(ColumnType::Text),
                ReadAs::Type(ColumnType::Text),
            ]);
        }
        t
    }

    /// Takes a row's version off its end (read with `row_version`): its `ctid` and `xmin`.
    pub fn take_row_version(&self, values: &mut Vec<Value>) -> RowVersion {
        let xmin = values.pop().and_then(Value::into_key_text);
        let ctid = values.pop().and_then(Value::into_key_text);
        RowVersion {
            ctid: ctid.unwrap_or_default(),
            xmin: xmin.unwrap_or_default(),
        }
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

    /// Takes what a fetched row carries after its own columns (after
    /// [`TableLayout::take_streamed`]): the patient key as text and the parents' dates.
    pub fn take_extras(&self, values: &mut Vec<Value>) -> RowExtras {
        let patient = match self.patient_column {
            Some(i) => values[i].as_key_text(),
            None => values.pop().and_then(Value::into_key_text),
        };
        let parent_dates = values.split_off(self.columns().len().min(values.len()));
        RowExtras {
            patient,
            parent_dates,
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
        for (expr, field) in self.parent_dates.iter().zip(self.parent_date_types()) {
            cols.push(match db.kind() {
                DbKind::Postgres => pg_select_expr(expr, field),
                DbKind::Sqlite => expr.clone(),
            });
        }
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
        if self.row_version {
            cols.push("t0.ctid::text".into());
            cols.push("t0.xmin::text".into());
        }
        format!(
            "SELECT {} FROM {} AS t0{}{}{}",
            cols.join(", "),
            quote(&self.relation),
            self.joins,
            self.date_joins,
            filter.map(|f| format!(" WHERE {f}")).unwrap_or_default(),
        )
    }

    /// The types of the dates read through parents.
    fn parent_date_types(&self) -> Vec<ColumnType> {
        match &self.record_date {
            RecordDate::Point(DateField::Parent { col_type, .. }) => vec![*col_type],
            _ => Vec::new(),
        }
    }

    /// A date field's SQL expression and type.
    fn date_sql(&self, f: &DateField) -> (String, ColumnType) {
        match f {
            DateField::Column(i) => {
                let c = &self.columns()[*i];
                match &self.computed[*i] {
                    Some(expr) => (format!("({expr})"), c.col_type),
                    None => (format!("t0.{}", quote(&c.name)), c.col_type),
                }
            }
            DateField::Parent {
                field, col_type, ..
            } => (self.parent_dates[*field].clone(), *col_type),
        }
    }

    /// Per patient, the latest record date before `before` (YYYY-MM-DD), if the table has both.
    /// For a period table, a third field is 1 when the patient has an open period (which
    /// makes them active up to `as_of`).
    pub fn last_activity_sql(&self, db: &Db, before: &str) -> Option<(String, Vec<ColumnType>)> {
        if self.patient_expr == "NULL" {
            return None;
        }
        let select = |e: String, t: ColumnType| match db.kind() {
            DbKind::Postgres => pg_select_expr(&e, t),
            DbKind::Sqlite => e,
        };
        let from = format!(
            "FROM {} AS t0{}{}",
            quote(&self.relation),
            self.joins,
            self.date_joins
        );
        let patient = self.patient_text();
        Some(match &self.record_date {
            RecordDate::None => return None,
            RecordDate::Point(f) => {
                let (date, t) = self.date_sql(f);
                let max = select(format!("MAX({date})"), t);
                (
                    format!("SELECT {patient}, {max} {from} WHERE {date} < '{before}' GROUP BY 1"),
                    vec![ColumnType::Text, t],
                )
            }
            RecordDate::Period { start, end } => {
                let (start, _) = self.date_sql(start);
                let (end, t) = self.date_sql(end);
                let ended = format!("{end} < '{before}'");
                let open = format!("{end} IS NULL AND {start} < '{before}'");
                let max = select(format!("MAX(CASE WHEN {ended} THEN {end} END)"), t);
                let any_open = select(
                    format!("MAX(CASE WHEN {open} THEN 1 ELSE 0 END)"),
                    ColumnType::Int,
                );
                (
                    format!(
                        "SELECT {patient}, {max}, {any_open} {from} WHERE ({ended}) OR ({open}) GROUP BY 1"
                    ),
                    vec![ColumnType::Text, t, ColumnType::Int],
                )
            }
        })
    }
}

/// The point record date of `table` read through its `record_date = { via = ... }` parent, as
/// SQL over `t0`: the parent is joined as a subquery (aliased `sd{depth}`, its own parents
/// deeper), grouped by its key when the source does not declare that key unique, so that a
/// join never multiplies rows.
fn parent_date(
    config: &MigrationConfig,
    schemas: &BTreeMap<String, TableSchema>,
    table: &str,
    depth: usize,
) -> Option<ParentDate> {
    let RecordDateConfig::Via {
        via,
        foreign_key,
        parent_key,
        column,
    } = config.tables.get(table)?.record_date.as_ref()?
    else {
        return None;
    };
    if depth > config.tables.len() {
        return None; // a loop (refused by validation)
    }
    let parent = config.tables.get(via)?;
    let schema = schemas.get(via)?;
    let own = |c: &str| -> Option<ParentDate> {
        let col = schema.column(c)?;
        Some(ParentDate {
            expr: format!("t0.{}", quote(c)),
            joins: String::new(),
            col_type: col.col_type,
            map: parent
                .columns
                .get(c)
                .map(ColumnMap::new)
                .filter(|m| !m.is_identity())
                .map(Box::new),
        })
    };
    let date = match (column, &parent.record_date) {
        (Some(c), _) => own(c)?,
        (None, Some(RecordDateConfig::Column(c))) => own(c)?,
        (None, Some(RecordDateConfig::Via { .. })) => parent_date(config, schemas, via, depth + 1)?,
        _ => return None,
    };
    let key = match parent_key {
        Some(k) => k.clone(),
        None if schema.column(foreign_key).is_some() => foreign_key.clone(),
        None => match parent.primary_key.as_slice() {
            [k] => k.clone(),
            _ => return None,
        },
    };
    let unique = schema.primary_key == [key.clone()];
    let alias = format!("sd{depth}");
    let subquery = if unique {
        format!(
            "SELECT t0.{k} AS k, {d} AS d FROM {p} AS t0{j}",
            k = quote(&key),
            d = date.expr,
            p = quote(parent.relation.as_deref().unwrap_or(via)),
            j = date.joins
        )
    } else {
        format!(
            "SELECT t0.{k} AS k, MAX({d}) AS d FROM {p} AS t0{j} GROUP BY t0.{k}",
            k = quote(&key),
            d = date.expr,
            p = quote(parent.relation.as_deref().unwrap_or(via)),
            j = date.joins
        )
    };
    Some(ParentDate {
        expr: format!("{alias}.d"),
        joins: format!(
            " LEFT JOIN ({subquery}) AS {alias} ON t0.{} = {alias}.k",
            quote(foreign_key)
        ),
        col_type: date.col_type,
        map: date.map,
    })
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
            quote(parent.relation.as_deref().unwrap_or(&via.via)),
            alias + 1,
            quote(&via.foreign_key),
            alias + 1,
            quote(pk)
        ));
        current = &via.via;
    }
    ("NULL".to_string(), String::new())
}

/// A table's layout for unit tests: `table` of `columns` (all nullable), configured by the
/// `[tables.{table}]` lines `settings` (primary key, patient key, record date, BLOBs) on a
/// SQLite-to-SQLite config.
#[cfg(test)]
pub(crate) fn test_layout(
    table: &str,
    settings: &str,
    columns: &[(&str, crate::value::ColumnType)],
) -> TableLayout {
    let config: toml::Table = toml::from_str(&format!(
        "[source]\nurl = \"sqlite://unused.db\"\n[operational]\nurl = \"sqlite://unused-target.db\"\n\
         [archive]\nlocation = \"archive\"\nkek_id = \"test\"\n[policy]\nfile = \"policy.toml\"\n\
         [tables.{table}]\n{settings}\n"
    ))
    .expect("a test config");
    let config = crate::config::MigrationConfig::parse(config, std::path::Path::new("."))
        .expect("a valid test config");
    let settings = &config.tables[table];
    let schema = crate::db::TableSchema {
        name: table.into(),
        columns: columns
            .iter()
            .map(|&(name, col_type)| crate::db::Column {
                name: name.into(),
                decl_type: String::new(),
                col_type,
                nullable: true,
            })
            .collect(),
        primary_key: settings.primary_key.clone(),
        foreign_keys: Vec::new(),
    };
    TableLayout::new(&config, table, settings, schema, &Default::default(), &[])
}
