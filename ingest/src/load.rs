//! Writing one key range of a table to the operational database, in one transaction with the
//! checkpoint that says the range is done.
//!
//! PostgreSQL targets are loaded with `COPY ... FROM STDIN (FORMAT binary)`: the rows are
//! encoded here in each column's binary receive format (or, for a column type Strata cannot
//! encode, the whole table in COPY's text format). SQLite targets get multi-row INSERTs. Either
//! way the rows, the range's quarantined rows and its checkpoint commit together, so a crash
//! at any moment leaves a range either wholly loaded and checkpointed or not at all.

use crate::db::{quote, Column, Db};
use crate::error::{IngestError, Result};
use crate::value::Value;
use chrono::NaiveDate;
use sqlx::postgres::PgConnection;
use sqlx::AssertSqlSafe;

/// How a quarantined row refused by the operational database (a constraint Strata could not
/// check beforehand) begins its reason; the database's message follows.
pub(crate) const DATABASE_REJECTED: &str = "rejected by the operational database";

/// A connection of the operational database with an open transaction.
pub(crate) enum TargetTx {
    /// PostgreSQL.
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
    /// SQLite.
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
}

impl TargetTx {
    /// Takes a connection from the pool and begins a transaction.
    pub async fn begin(db: &Db) -> Result<Self> {
        let e = |e| IngestError::sql("begin", e);
        // A transaction dropped without COMMIT (an error, a stopped run) must not go back to the
        // pool half-done: the connection is closed instead.
        let mut tx = match db {
            Db::Postgres(p) => {
                let mut c = p.acquire().await.map_err(e)?;
                c.close_on_drop();
                TargetTx::Postgres(c)
            }
            Db::Sqlite(p, _) => {
                let mut c = p.acquire().await.map_err(e)?;
                c.close_on_drop();
                TargetTx::Sqlite(c)
            }
        };
        // BEGIN IMMEDIATE takes SQLite's write lock now, not halfway through the range.
        let begin = match tx {
            TargetTx::Postgres(_) => "BEGIN",
            TargetTx::Sqlite(_) => "BEGIN IMMEDIATE",
        };
        tx.execute(begin).await?;
        Ok(tx)
    }

    /// Runs a statement without parameters.
    pub async fn execute(&mut self, sql: &str) -> Result<()> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            TargetTx::Postgres(c) => sqlx::raw_sql(sql).execute(&mut **c).await.map(|_| ()),
            TargetTx::Sqlite(c) => sqlx::raw_sql(sql).execute(&mut **c).await.map(|_| ()),
        }
        .map_err(|e| IngestError::sql("execute", e))
    }

    /// Runs one statement with text parameters (`$n` for PostgreSQL, `?` for SQLite).
    pub async fn execute_with(&mut self, sql: &str, values: &[String]) -> Result<()> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            TargetTx::Postgres(c) => {
                let mut q = sqlx::query(sql);
                for v in values {
                    q = q.bind(v.clone());
                }
                q.execute(&mut **c).await.map(|_| ())
            }
            TargetTx::Sqlite(c) => {
                let mut q = sqlx::query(sql);
                for v in values {
                    q = q.bind(v.clone());
                }
                q.execute(&mut **c).await.map(|_| ())
            }
        }
        .map_err(|e| IngestError::sql("execute", e))
    }

    /// Runs one statement with values bound by type; returns the rows it affected.
    pub async fn execute_values(
        &mut self,
        sql: &str,
        row: &[Value],
        types: &[crate::value::ColumnType],
    ) -> Result<u64> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            TargetTx::Postgres(c) => {
                let mut q = sqlx::query(sql);
                for (v, t) in row.iter().zip(types) {
                    q = crate::db::bind_pg(q, v, *t);
                }
                q.execute(&mut **c).await.map(|r| r.rows_affected())
            }
            TargetTx::Sqlite(c) => {
                let mut q = sqlx::query(sql);
                for v in row {
                    q = crate::db::bind_sqlite(q, v);
                }
                q.execute(&mut **c).await.map(|r| r.rows_affected())
            }
        }
        .map_err(|e| IngestError::sql("execute", e))
    }

    /// [`TargetTx::execute_values`] in a savepoint: Err with the database's message when it
    /// refuses the row's data (a constraint; the message names it, never the values), the
    /// transaction going on without the statement.
    pub(crate) async fn execute_refusable(
        &mut self,
        sql: &str,
        row: &[Value],
        types: &[crate::value::ColumnType],
    ) -> Result<std::result::Result<u64, String>> {
        self.execute("SAVEPOINT strata_row").await?;
        let outcome = self.execute_values(sql, row, types).await;
        self.settle(outcome).await
    }

    /// [`TargetTx::fetch_text_rows`] in a savepoint, as [`TargetTx::execute_refusable`].
    pub(crate) async fn fetch_refusable(
        &mut self,
        sql: &str,
        params: &[Value],
        param_types: &[crate::value::ColumnType],
    ) -> Result<std::result::Result<Vec<Vec<Option<String>>>, String>> {
        self.execute("SAVEPOINT strata_row").await?;
        let outcome = self.fetch_text_rows(sql, params, param_types).await;
        self.settle(outcome).await
    }

    /// Ends the savepoint of a refusable statement by its outcome.
    async fn settle<T>(&mut self, outcome: Result<T>) -> Result<std::result::Result<T, String>> {
        match outcome {
            Ok(done) => {
                self.execute("RELEASE SAVEPOINT strata_row").await?;
                Ok(Ok(done))
            }
            Err(e) if e.is_data_rejected() => {
                self.execute("ROLLBACK TO SAVEPOINT strata_row").await?;
                Ok(Err(e.database_message()))
            }
            Err(e) => Err(e),
        }
    }

    /// Reads at most one row of a query with values bound by type, each column as text
    /// (the query casts them).
    pub async fn fetch_text_row(
        &mut self,
        sql: &str,
        params: &[Value],
        param_types: &[crate::value::ColumnType],
    ) -> Result<Option<Vec<Option<String>>>> {
        use sqlx::Row;
        let sql = AssertSqlSafe(sql.to_string());
        let e = |e| IngestError::sql("read a row", e);
        match self {
            TargetTx::Postgres(c) => {
                let mut q = sqlx::query(sql);
                for (v, t) in params.iter().zip(param_types) {
                    q = crate::db::bind_pg(q, v, *t);
                }
                let Some(row) = q.fetch_optional(&mut **c).await.map_err(e)? else {
                    return Ok(None);
                };
                (0..row.len())
                    .map(|i| row.try_get::<Option<String>, _>(i).map_err(e))
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
            TargetTx::Sqlite(c) => {
                let mut q = sqlx::query(sql);
                for v in params {
                    q = crate::db::bind_sqlite(q, v);
                }
                let Some(row) = q.fetch_optional(&mut **c).await.map_err(e)? else {
                    return Ok(None);
                };
                (0..row.len())
                    .map(|i| row.try_get::<Option<String>, _>(i).map_err(e))
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
        }
    }

    /// Reads every row of a query with values bound by type, each column as text (the query
    /// casts them).
    pub async fn fetch_text_rows(
        &mut self,
        sql: &str,
        params: &[Value],
        param_types: &[crate::value::ColumnType],
    ) -> Result<Vec<Vec<Option<String>>>> {
        use sqlx::Row;
        let sql = AssertSqlSafe(sql.to_string());
        let e = |e| IngestError::sql("read rows", e);
        let texts = |row: &dyn Fn(usize) -> std::result::Result<Option<String>, sqlx::Error>,
                     n: usize| {
            (0..n).map(row).collect::<std::result::Result<Vec<_>, _>>()
        };
        match self {
            TargetTx::Postgres(c) => {
                let mut q = sqlx::query(sql);
                for (v, t) in params.iter().zip(param_types) {
                    q = crate::db::bind_pg(q, v, *t);
                }
                let rows = q.fetch_all(&mut **c).await.map_err(e)?;
                rows.iter()
                    .map(|r| texts(&|i| r.try_get::<Option<String>, _>(i), r.len()).map_err(e))
                    .collect()
            }
            TargetTx::Sqlite(c) => {
                let mut q = sqlx::query(sql);
                for v in params {
                    q = crate::db::bind_sqlite(q, v);
                }
                let rows = q.fetch_all(&mut **c).await.map_err(e)?;
                rows.iter()
                    .map(|r| texts(&|i| r.try_get::<Option<String>, _>(i), r.len()).map_err(e))
                    .collect()
            }
        }
    }

    /// Commits.
    pub async fn commit(mut self) -> Result<()> {
        self.execute("COMMIT").await
    }

    /// Placeholder `n` (1-based) in this engine's syntax.
    pub fn placeholder(&self, n: usize) -> String {
        match self {
            TargetTx::Postgres(_) => format!("${n}"),
            TargetTx::Sqlite(_) => "?".into(),
        }
    }

    /// `rows` copies of the row `template` (e.g. `(?, CAST(? AS BIGINT))`), comma-separated,
    /// for a multi-row statement: its `?` marks become placeholders numbered on across rows.
    pub fn rows(&self, rows: usize, template: &str) -> String {
        let mut out = String::with_capacity(rows * (template.len() + 8));
        let mut n = 0;
        for row in 0..rows {
            if row > 0 {
                out.push_str(", ");
            }
            for c in template.chars() {
                if c == '?' {
                    n += 1;
                    out.push_str(&self.placeholder(n));
                } else {
                    out.push(c);
                }
            }
        }
        out
    }

    /// Starts loading `table`'s operational rows on this transaction. `row_by_row` inserts
    /// each row under a savepoint, so that a row the database rejects is handed back
    /// instead of failing the load: slow, for a range whose COPY was rejected.
    pub async fn load<'c>(
        &'c mut self,
        table: &str,
        columns: &[Column],
        row_by_row: bool,
    ) -> Result<Load<'c>> {
        if row_by_row {
            let sql = match self {
                TargetTx::Postgres(_) => insert_one(table, columns, |i| {
                    format!("CAST(${} AS {})", i + 1, columns[i].decl_type)
                }),
                TargetTx::Sqlite(_) => insert_one(table, columns, |_| "?".into()),
            };
            return Ok(Load::RowByRow {
                tx: self,
                sql,
                types: columns.iter().map(|c| c.col_type).collect(),
            });
        }
        match self {
            TargetTx::Postgres(c) => {
                let conn: &'c mut PgConnection = c;
                let encoding = CopyEncoding::for_columns(columns);
                let names: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
                let format = match encoding {
                    CopyEncoding::Binary(_) => "binary",
                    CopyEncoding::Text => "text",
                };
                let sql = format!(
                    "COPY {} ({}) FROM STDIN (FORMAT {format})",
                    quote(table),
                    names.join(", ")
                );
                let copy = conn
                    .copy_in_raw(&sql)
                    .await
                    .map_err(|e| IngestError::sql(&format!("copy into {table}"), e))?;
                let mut buf = Vec::with_capacity(COPY_BUFFER_BYTES + 4096);
                if let CopyEncoding::Binary(_) = encoding {
                    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
                    buf.extend_from_slice(&0i32.to_be_bytes());
                    buf.extend_from_slice(&0i32.to_be_bytes());
                }
                Ok(Load::Copy {
                    copy,
                    encoding,
                    buf,
                    table: table.to_string(),
                })
            }
            TargetTx::Sqlite(c) => Ok(Load::Insert {
                conn: c,
                table: table.to_string(),
                columns: columns.to_vec(),
                rows: Vec::new(),
            }),
        }
    }
}

/// Encoded COPY data is sent in messages of about this size.
const COPY_BUFFER_BYTES: usize = 1 << 20;
/// Rows per multi-row INSERT into SQLite (its bound-parameter limit is 32,766).
const SQLITE_PARAMS_PER_INSERT: usize = 30_000;

/// An operational table being loaded inside a range's transaction.
pub(crate) enum Load<'c> {
    /// PostgreSQL `COPY FROM STDIN`.
    Copy {
        copy: sqlx::postgres::PgCopyIn<&'c mut PgConnection>,
        encoding: CopyEncoding,
        buf: Vec<u8>,
        table: String,
    },
    /// INSERTs, each under a savepoint.
    RowByRow {
        tx: &'c mut TargetTx,
        sql: String,
        types: Vec<crate::value::ColumnType>,
    },
    /// SQLite INSERTs.
    Insert {
        conn: &'c mut sqlx::pool::PoolConnection<sqlx::Sqlite>,
        table: String,
        columns: Vec<Column>,
        rows: Vec<Vec<Value>>,
    },
}

/// `INSERT INTO table (columns) VALUES (placeholders)` for one row.
fn insert_one(table: &str, columns: &[Column], placeholder: impl Fn(usize) -> String) -> String {
    let names: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
    let values: Vec<String> = (0..columns.len()).map(placeholder).collect();
    format!(
        "INSERT INTO {} ({}) VALUES ({})",
        quote(table),
        names.join(", "),
        values.join(", ")
    )
}

impl Load<'_> {
    /// Adds one row (values already coerced to the columns' types). Row by row, a row the
    /// database rejects comes back with the database's message (which names the constraint,
    /// never the values).
    pub async fn write(&mut self, row: Vec<Value>) -> Result<Option<(Vec<Value>, String)>> {
        match self {
            Load::RowByRow { tx, sql, types } => {
                if let Err(message) = tx.execute_refusable(sql, &row, types).await? {
                    return Ok(Some((row, format!("{DATABASE_REJECTED}: {message}"))));
                }
            }
            Load::Copy {
                copy,
                encoding,
                buf,
                table,
            } => {
                encoding.encode(buf, &row);
                if buf.len() >= COPY_BUFFER_BYTES {
                    copy.send(buf.as_slice())
                        .await
                        .map_err(|e| IngestError::sql(&format!("copy into {table}"), e))?;
                    buf.clear();
                }
            }
            Load::Insert {
                rows,
                columns,
                conn,
                table,
            } => {
                rows.push(row);
                if rows.len() * columns.len().max(1) >= SQLITE_PARAMS_PER_INSERT {
                    insert_sqlite(conn, table, columns, rows).await?;
                    rows.clear();
                }
            }
        }
        Ok(None)
    }

    /// Sends what is buffered and ends the load (the transaction stays open).
    pub async fn finish(self) -> Result<()> {
        match self {
            Load::Copy {
                mut copy,
                encoding,
                mut buf,
                table,
            } => {
                let e = |e| IngestError::sql(&format!("copy into {table}"), e);
                if let CopyEncoding::Binary(_) = encoding {
                    buf.extend_from_slice(&(-1i16).to_be_bytes());
                }
                if !buf.is_empty() {
                    copy.send(buf.as_slice()).await.map_err(e)?;
                }
                copy.finish().await.map_err(e)?;
            }
            Load::Insert {
                conn,
                table,
                columns,
                rows,
            } => insert_sqlite(conn, &table, &columns, &rows).await?,
            Load::RowByRow { .. } => {}
        }
        Ok(())
    }
}

/// Inserts rows into a SQLite table in one statement.
pub(crate) async fn insert_sqlite(
    conn: &mut sqlx::SqliteConnection,
    table: &str,
    columns: &[Column],
    rows: &[Vec<Value>],
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
    let one = format!("({})", vec!["?"; columns.len()].join(", "));
    let sql = format!(
        "INSERT INTO {} ({}) VALUES {}",
        quote(table),
        names.join(", "),
        vec![one; rows.len()].join(", ")
    );
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for v in rows.iter().flatten() {
        q = crate::db::bind_sqlite(q, v);
    }
    q.execute(conn)
        .await
        .map(|_| ())
        .map_err(|e| IngestError::sql(&format!("insert into {table}"), e))
}

/// How a PostgreSQL column is sent in binary COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinaryType {
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Bool,
    /// text, varchar, char, json: the UTF-8 bytes.
    Text,
    Bytea,
    Date,
    Timestamp,
    Numeric,
    Uuid,
    Jsonb,
}

impl BinaryType {
    /// The binary encoding of a declared type, if Strata has one.
    fn of(decl: &str) -> Option<Self> {
        let base = decl.split('(').next().unwrap_or(decl).trim();
        Some(match base {
            "smallint" => BinaryType::Int2,
            "integer" => BinaryType::Int4,
            "bigint" => BinaryType::Int8,
            "real" => BinaryType::Float4,
            "double precision" => BinaryType::Float8,
            "boolean" => BinaryType::Bool,
            "text" | "character varying" | "character" | "json" => BinaryType::Text,
            "bytea" => BinaryType::Bytea,
            "date" => BinaryType::Date,
            "timestamp without time zone" | "timestamp with time zone" => BinaryType::Timestamp,
            "numeric" => BinaryType::Numeric,
            "uuid" => BinaryType::Uuid,
            "jsonb" => BinaryType::Jsonb,
            _ => return None,
        })
    }
}

/// The COPY format of one table's load.
pub(crate) enum CopyEncoding {
    /// Binary, with each column's type.
    Binary(Vec<BinaryType>),
    /// Text: for tables with a column type Strata has no binary encoding for.
    Text,
}

impl CopyEncoding {
    fn for_columns(columns: &[Column]) -> Self {
        columns
            .iter()
            .map(|c| BinaryType::of(&c.decl_type))
            .collect::<Option<Vec<_>>>()
            .map_or(CopyEncoding::Text, CopyEncoding::Binary)
    }

    fn encode(&self, buf: &mut Vec<u8>, row: &[Value]) {
        match self {
            CopyEncoding::Binary(types) => {
                buf.extend_from_slice(&(row.len() as i16).to_be_bytes());
                for (v, t) in row.iter().zip(types) {
                    encode_binary(buf, v, *t);
                }
            }
            CopyEncoding::Text => {
                for (i, v) in row.iter().enumerate() {
                    if i > 0 {
                        buf.push(b'\t');
                    }
                    encode_text(buf, v);
                }
                buf.push(b'\n');
            }
        }
    }
}

const PG_EPOCH: NaiveDate = match NaiveDate::from_ymd_opt(2000, 1, 1) {
    Some(d) => d,
    None => panic!("valid date"),
};

fn field(buf: &mut Vec<u8>, bytes: &[u8]) {
    buf.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    buf.extend_from_slice(bytes);
}

/// One value in its column's binary receive format. Values arrive coerced to the column's
/// type; one that still does not fit (an out-of-range integer for a smaller column, text that
/// is not a number for `numeric`) is sent as text in the field, which PostgreSQL rejects,
/// failing the range's transaction with the table named, rather than storing something else.
fn encode_binary(buf: &mut Vec<u8>, v: &Value, t: BinaryType) {
    use BinaryType as B;
    match (t, v) {
        (_, Value::Null) => buf.extend_from_slice(&(-1i32).to_be_bytes()),
        (B::Int8, Value::Int(i)) => field(buf, &i.to_be_bytes()),
        (B::Int4, Value::Int(i)) if i32::try_from(*i).is_ok() => {
            field(buf, &(*i as i32).to_be_bytes())
        }
        (B::Int2, Value::Int(i)) if i16::try_from(*i).is_ok() => {
            field(buf, &(*i as i16).to_be_bytes())
        }
        (B::Float8, Value::Float(f)) => field(buf, &f.to_be_bytes()),
        (B::Float4, Value::Float(f)) => field(buf, &(*f as f32).to_be_bytes()),
        (B::Bool, Value::Bool(b)) => field(buf, &[*b as u8]),
        (B::Text, Value::Text(s)) => field(buf, s.as_bytes()),
        (B::Jsonb, Value::Text(s)) => {
            buf.extend_from_slice(&(s.len() as i32 + 1).to_be_bytes());
            buf.push(1);
            buf.extend_from_slice(s.as_bytes());
        }
        (B::Bytea, Value::Bytes(b)) => field(buf, b),
        (B::Date, Value::Date(d)) => field(buf, &((*d - PG_EPOCH).num_days() as i32).to_be_bytes()),
        (B::Timestamp, Value::Timestamp(t)) => {
            let micros = (t.and_utc() - PG_EPOCH.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
                .num_microseconds()
                .unwrap_or(i64::MAX);
            field(buf, &micros.to_be_bytes())
        }
        (B::Timestamp, Value::TimestampTz(t)) => {
            let micros = (*t - PG_EPOCH.and_hms_opt(0, 0, 0).expect("midnight").and_utc())
                .num_microseconds()
                .unwrap_or(i64::MAX);
            field(buf, &micros.to_be_bytes())
        }
        (B::Numeric, Value::Text(s)) if encode_numeric(buf, s) => {}
        (B::Numeric, Value::Int(i)) if encode_numeric(buf, &i.to_string()) => {}
        (B::Numeric, Value::Float(f)) if f.is_finite() && encode_numeric(buf, &f.to_string()) => {}
        (B::Uuid, Value::Text(s)) if uuid_bytes(s).is_some() => {
            field(buf, &uuid_bytes(s).expect("checked"))
        }
        (_, other) => field(buf, other.as_key_text().unwrap_or_default().as_bytes()),
    }
}

fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    hex::decode_to_slice(hex.trim_matches(|c| c == '{' || c == '}'), &mut out).ok()?;
    Some(out)
}

/// `numeric`'s binary form from its text: digit groups of base 10,000, the weight of the
/// first group, sign and display scale. Returns false when the text is not a plain decimal.
pub(crate) fn encode_numeric(buf: &mut Vec<u8>, text: &str) -> bool {
    let t = text.trim();
    let special = match t {
        "NaN" => Some(0xC000u16),
        "Infinity" => Some(0xD000),
        "-Infinity" => Some(0xF000),
        _ => None,
    };
    if let Some(sign) = special {
        let mut f = Vec::with_capacity(8);
        f.extend_from_slice(&0i16.to_be_bytes());
        f.extend_from_slice(&0i16.to_be_bytes());
        f.extend_from_slice(&sign.to_be_bytes());
        f.extend_from_slice(&0u16.to_be_bytes());
        field(buf, &f);
        return true;
    }
    let (negative, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return false;
    }
    let dscale = frac_part.len() as u16;
    let int_part = int_part.trim_start_matches('0');
    let int_pad = (4 - int_part.len() % 4) % 4;
    let frac_pad = (4 - frac_part.len() % 4) % 4;
    let padded: Vec<u8> = std::iter::repeat_n(b'0', int_pad)
        .chain(int_part.bytes())
        .chain(frac_part.bytes())
        .chain(std::iter::repeat_n(b'0', frac_pad))
        .collect();
    let mut groups: Vec<i16> = padded
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |n, d| n * 10 + (d - b'0') as i16))
        .collect();
    let mut weight = ((int_pad + int_part.len()) / 4) as i16 - 1;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let sign: u16 = if negative && !groups.is_empty() {
        0x4000
    } else {
        0
    };
    let mut f = Vec::with_capacity(8 + 2 * groups.len());
    f.extend_from_slice(&(groups.len() as i16).to_be_bytes());
    f.extend_from_slice(&weight.to_be_bytes());
    f.extend_from_slice(&sign.to_be_bytes());
    f.extend_from_slice(&dscale.to_be_bytes());
    for g in groups {
        f.extend_from_slice(&g.to_be_bytes());
    }
    field(buf, &f);
    true
}

/// One value in COPY's text format.
fn encode_text(buf: &mut Vec<u8>, v: &Value) {
    let escaped = |buf: &mut Vec<u8>, s: &str| {
        for b in s.bytes() {
            match b {
                b'\\' => buf.extend_from_slice(b"\\\\"),
                b'\t' => buf.extend_from_slice(b"\\t"),
                b'\n' => buf.extend_from_slice(b"\\n"),
                b'\r' => buf.extend_from_slice(b"\\r"),
                _ => buf.push(b),
            }
        }
    };
    match v {
        Value::Null => buf.extend_from_slice(b"\\N"),
        Value::Bytes(b) => {
            buf.extend_from_slice(b"\\\\x");
            buf.extend_from_slice(hex::encode(b).as_bytes());
        }
        Value::Float(f) if f.is_infinite() => buf.extend_from_slice(if *f > 0.0 {
            b"Infinity".as_slice()
        } else {
            b"-Infinity".as_slice()
        }),
        Value::Float(f) if f.is_nan() => buf.extend_from_slice(b"NaN"),
        Value::TimestampTz(t) => {
            escaped(buf, &t.format("%Y-%m-%d %H:%M:%S%.f+00").to_string());
        }
        other => escaped(buf, &other.as_key_text().unwrap_or_default()),
    }
}

/// The column types a binary COPY needs to know, for tests.
#[cfg(test)]
pub(crate) fn binary_type(decl: &str) -> Option<BinaryType> {
    BinaryType::of(decl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(text: &str) -> Option<(i16, i16, u16, u16, Vec<i16>)> {
        let mut buf = Vec::new();
        if !encode_numeric(&mut buf, text) {
            return None;
        }
        let n = |i: usize| i16::from_be_bytes([buf[4 + 2 * i], buf[5 + 2 * i]]);
        let ndigits = n(0);
        Some((
            ndigits,
            n(1),
            n(2) as u16,
            n(3) as u16,
            (0..ndigits as usize).map(|i| n(4 + i)).collect(),
        ))
    }

    #[test]
    fn numeric_texts_become_base_10000_groups() {
        assert_eq!(numeric("0"), Some((0, 0, 0, 0, vec![])));
        assert_eq!(numeric("0.0000"), Some((0, 0, 0, 4, vec![])));
        assert_eq!(
            numeric("12345.6789"),
            Some((3, 1, 0, 4, vec![1, 2345, 6789]))
        );
        assert_eq!(numeric("-0.5"), Some((1, -1, 0x4000, 1, vec![5000])));
        assert_eq!(numeric("10000"), Some((1, 1, 0, 0, vec![1])));
        assert_eq!(numeric("0.00012"), Some((2, -1, 0, 5, vec![1, 2000])));
        assert_eq!(numeric("NaN").map(|n| n.2), Some(0xC000));
        assert_eq!(numeric("12a"), None);
        assert_eq!(numeric(""), None);
        assert_eq!(binary_type("numeric(12,4)"), Some(BinaryType::Numeric));
        assert_eq!(binary_type("interval"), None);
    }
}
