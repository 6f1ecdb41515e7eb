//! SQL databases Strata reads from and writes to: PostgreSQL and SQLite behind one small enum.
//!
//! Everything is dynamic SQL built from the configuration, so identifiers are always quoted and
//! values always bound; nothing from a row is ever spliced into SQL text.

use crate::error::{IngestError, Result};
use crate::value::{ColumnType, Value};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use futures::{Stream, StreamExt};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Row, TypeInfo, ValueRef};
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

/// Which engine a database is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

/// A connection pool to a source, target or control database.
#[derive(Debug, Clone)]
pub enum Db {
    /// PostgreSQL.
    Postgres(sqlx::PgPool),
    /// SQLite: the pool, and for a read-only source the file that bulk reads open directly.
    Sqlite(sqlx::SqlitePool, Option<Arc<PathBuf>>),
}

/// An exported snapshot of a PostgreSQL source, held open by its transaction.
pub struct SourceSnapshot {
    /// The snapshot id workers import.
    pub id: String,
    /// The source's WAL insert position just after the snapshot was taken: every transaction
    /// the snapshot saw committed before it (also with asynchronous commit).
    pub wal_lsn: String,
    /// The snapshot as `pg_current_snapshot()` writes it (`xmin:xmax:xip,...`): which
    /// transactions it saw, so that change sync skips exactly those
    /// ([`crate::sync::snapshot::XidSnapshot`]).
    pub xids: String,
    _holder: sqlx::pool::PoolConnection<sqlx::Postgres>,
}

/// How a selected field is read from the source: as its column type, or as the text
/// PostgreSQL prints for a `numeric` sent in binary (printing it costs the server more than
/// sending it: ~0.3 CPU-s per 5M values here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadAs {
    /// Decoded as the column type.
    Type(ColumnType),
    /// A PostgreSQL `numeric` in binary, read as its text form ([`Value::Text`]).
    NumericText,
}

impl From<ColumnType> for ReadAs {
    fn from(t: ColumnType) -> Self {
        ReadAs::Type(t)
    }
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Name as in the database.
    pub name: String,
    /// Declared type as the database spells it.
    pub decl_type: String,
    /// How Strata treats it.
    pub col_type: ColumnType,
    /// False when declared NOT NULL.
    pub nullable: bool,
}

/// A table's shape as introspected.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSchema {
    /// Table name.
    pub name: String,
    /// Columns in order.
    pub columns: Vec<Column>,
    /// Declared primary key columns (may be empty).
    pub primary_key: Vec<String>,
    /// Single-column foreign keys: (column, referenced table, referenced column).
    pub foreign_keys: Vec<(String, String, String)>,
}

impl TableSchema {
    /// A column by name.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// Connections per PostgreSQL pool: range workers, the snapshot holder and bookkeeping.
const MAX_CONNECTIONS: u32 = 12;

/// Quotes an identifier for either engine.
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// A stream of rows, each with its values in select order.
pub type RowStream<'a> = Pin<Box<dyn Stream<Item = Result<Vec<Value>>> + Send + 'a>>;

/// A stream of rows in the chunks they were read in (see [`Db::fetch_chunks_in`]).
pub type ChunkStream<'a> = Pin<Box<dyn Stream<Item = Result<Vec<Vec<Value>>>> + Send + 'a>>;

impl Db {
    /// Connects to `postgres://...`, `sqlite://path` or (a source only) `csv://dir`, a
    /// directory of CSV exports staged into SQLite with inferred column types (see
    /// [`Db::connect_csv`]). A source is opened read-only.
    pub async fn connect(url: &str, read_only: bool) -> Result<Db> {
        if url.starts_with("csv://") {
            return Db::connect_csv(url, &Default::default()).await;
        }
        let conn_err = |e: sqlx::Error| IngestError::Connect {
            url: redact(url),
            detail: strata_control::connection_problem(&e),
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut options = PgConnectOptions::from_str(url)
                .map_err(conn_err)?
                .options([("timezone", "UTC")])
                // Statement text can carry key values: never log it.
                .disable_statement_logging();
            if read_only {
                options = options.options([("default_transaction_read_only", "on")]);
            }
            strata_control::reach_postgres(&options)
                .await
                .map_err(conn_err)?;
            let pool = PgPoolOptions::new()
                .max_connections(MAX_CONNECTIONS)
                .connect_with(options)
                .await
                .map_err(conn_err)?;
            Ok(Db::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let mut options = SqliteConnectOptions::from_str(url)
                .map_err(conn_err)?
                .read_only(read_only)
                .create_if_missing(!read_only)
                // Tables load in config order, children possibly before parents.
                .foreign_keys(false)
                .busy_timeout(std::time::Duration::from_secs(30))
                .disable_statement_logging();
            if !read_only {
                // A source keeps its own journal mode: changing it would be a write.
                options = options.journal_mode(SqliteJournalMode::Wal);
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(if read_only { 4 } else { 1 })
                .connect_with(options.clone())
                .await
                .map_err(conn_err)?;
            let reader = read_only.then(|| Arc::new(options.get_filename().to_path_buf()));
            Ok(Db::Sqlite(pool, reader))
        } else {
            Err(IngestError::Connect {
                url: redact(url),
                detail: "expected a postgres:// or sqlite:// URL".into(),
            })
        }
    }

    /// Opens a directory of CSV exports, `csv://dir[?staging=dir]`, as a read-only SQLite
    /// source: the files are staged (once per version of the exports) into the staging
    /// directory, by default the system's temporary directory. `types` names column types by
    /// table and column; other columns' types are inferred.
    pub async fn connect_csv(url: &str, types: &crate::csv_source::CsvTypes) -> Result<Db> {
        let rest = url.trim_start_matches("csv://");
        let (dir, query) = rest.split_once('?').unwrap_or((rest, ""));
        let staging = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("staging="))
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("strata-csv-staging"));
        let staged = crate::csv_source::stage(PathBuf::from(dir), staging, types.clone()).await?;
        Box::pin(Db::connect(&format!("sqlite://{}", staged.display()), true)).await
    }

    /// For PostgreSQL, opens a repeatable-read transaction, exports its snapshot and reads the
    /// WAL position, so that every worker reads the same consistent state (as `pg_dump -j`
    /// does) and change sync can start where the copy's snapshot stands. The snapshot lives as
    /// long as the returned value. None for other engines.
    pub async fn export_snapshot(&self) -> Result<Option<SourceSnapshot>> {
        let Db::Postgres(pool) = self else {
            return Ok(None);
        };
        let e = |e| IngestError::sql("export snapshot", e);
        let mut conn = pool.acquire().await.map_err(e)?;
        // The snapshot's transaction ends with its connection: returned to the pool, it would
        // stay idle in transaction and hold back the source's vacuum for as long as the pool
        // lives (a whole `migrate --follow`).
        conn.close_on_drop();
        sqlx::raw_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *conn)
            .await
            .map_err(e)?;
        let row = sqlx::query(
            "SELECT pg_export_snapshot(), (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text, pg_current_snapshot()::text",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(e)?;
        Ok(Some(SourceSnapshot {
            id: row.try_get(0).map_err(e)?,
            wal_lsn: row.try_get(1).map_err(e)?,
            xids: row.try_get(2).map_err(e)?,
            _holder: conn,
        }))
    }

    /// What the connected PostgreSQL role could change among `tables`: "superuser", or the
    /// tables it holds INSERT, UPDATE, DELETE or TRUNCATE on. Empty for a read-only role (and
    /// for SQLite, which a source opens read-only).
    pub async fn write_privileges(&self, tables: &[String]) -> Result<Vec<String>> {
        if self.kind() != DbKind::Postgres {
            return Ok(Vec::new());
        }
        let superuser = self
            .fetch_all(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user".into(),
                vec![ColumnType::Bool],
            )
            .await?;
        if superuser
            .iter()
            .any(|r| r.first() == Some(&Value::Bool(true)))
        {
            return Ok(vec!["superuser".into()]);
        }
        let mut writable = Vec::new();
        for table in tables {
            let lit = format!("\"{}\"", table.replace('"', "\"\"")).replace('\'', "''");
            let rows = self
                .fetch_all(
                    format!(
                        "SELECT has_table_privilege('{lit}', 'INSERT, UPDATE, DELETE, TRUNCATE')"
                    ),
                    vec![ColumnType::Bool],
                )
                .await?;
            if rows.iter().any(|r| r.first() == Some(&Value::Bool(true))) {
                writable.push(table.clone());
            }
        }
        Ok(writable)
    }

    /// The engine.
    pub fn kind(&self) -> DbKind {
        match self {
            Db::Postgres(_) => DbKind::Postgres,
            Db::Sqlite(..) => DbKind::Sqlite,
        }
    }

    /// Closes the pool.
    pub async fn close(&self) {
        match self {
            Db::Postgres(p) => p.close().await,
            Db::Sqlite(p, _) => p.close().await,
        }
    }

    /// Runs statements without results (DDL, several statements allowed).
    pub async fn execute(&self, sql: &str) -> Result<()> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            Db::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            Db::Sqlite(p, _) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
        }
        .map_err(|e| IngestError::sql("execute", e))
    }

    /// Placeholder number `n` (1-based) in this engine's syntax.
    pub fn placeholder(&self, n: usize) -> String {
        match self {
            Db::Postgres(_) => format!("${n}"),
            Db::Sqlite(..) => "?".to_string(),
        }
    }

    /// Runs one statement with bound values; returns rows affected.
    pub async fn execute_with(&self, sql: &str, values: &[Value]) -> Result<u64> {
        self.execute_typed(sql, values, &[ColumnType::Text]).await
    }

    /// Like [`Db::execute_with`], with the column type of each value (repeating per row), so a
    /// NULL is bound with the same type as the column's other values: PostgreSQL prepared
    /// statements are cached by text, and a parameter must keep one type across executions.
    async fn execute_typed(
        &self,
        sql: &str,
        values: &[Value],
        types: &[ColumnType],
    ) -> Result<u64> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            Db::Postgres(p) => {
                let mut q = sqlx::query(sql);
                for (v, t) in values.iter().zip(types.iter().cycle()) {
                    q = bind_pg(q, v, *t);
                }
                q.execute(p).await.map(|r| r.rows_affected())
            }
            Db::Sqlite(p, _) => {
                let mut q = sqlx::query(sql);
                for v in values {
                    q = bind_sqlite(q, v);
                }
                q.execute(p).await.map(|r| r.rows_affected())
            }
        }
        .map_err(|e| IngestError::sql("execute", e))
    }

    /// Runs a query whose result columns have the given types, streaming the rows.
    pub fn fetch<'a>(&'a self, sql: String, types: Vec<impl Into<ReadAs>>) -> RowStream<'a> {
        self.fetch_in(sql, types, None)
    }

    /// [`Db::fetch`] in an exported PostgreSQL snapshot (see [`Db::export_snapshot`]); other
    /// engines ignore it.
    pub fn fetch_in<'a>(
        &'a self,
        sql: String,
        types: Vec<impl Into<ReadAs>>,
        snapshot: Option<&str>,
    ) -> RowStream<'a> {
        Box::pin(
            self.fetch_chunks_in(sql, types, snapshot)
                .flat_map(|chunk| match chunk {
                    Ok(rows) => futures::stream::iter(rows.into_iter().map(Ok)).left_stream(),
                    Err(e) => futures::stream::iter([Err(e)]).right_stream(),
                }),
        )
    }

    /// [`Db::fetch_in`] in the chunks the rows are read in: a bulk reader loops over a
    /// chunk's rows without polling a stream for each (in a profile of an archiving run,
    /// polling row by row took ~1 % of Strata's CPU).
    pub fn fetch_chunks_in<'a>(
        &'a self,
        sql: String,
        types: Vec<impl Into<ReadAs>>,
        snapshot: Option<&str>,
    ) -> ChunkStream<'a> {
        let types: Vec<ReadAs> = types.into_iter().map(Into::into).collect();
        if let Db::Sqlite(_, Some(path)) = self {
            return sqlite_reader(path.clone(), sql, types.len());
        }
        if let Db::Postgres(p) = self {
            return chunks(crate::pg_copy::copy_out(
                p.clone(),
                sql,
                types,
                snapshot.map(str::to_string),
            ));
        }
        let sql = AssertSqlSafe(sql);
        match self {
            Db::Postgres(_) => unreachable!("read by binary COPY above"),
            Db::Sqlite(p, _) => Box::pin(sqlx::query(sql).fetch(p).map(move |r| {
                r.map_err(|e| IngestError::sql("read", e))
                    .and_then(|row| decode_sqlite(&row, types.len()))
                    .map(|row| vec![row])
            })),
        }
    }

    /// Runs a query and collects its rows.
    pub async fn fetch_all(&self, sql: String, types: Vec<ColumnType>) -> Result<Vec<Vec<Value>>> {
        let mut out = Vec::new();
        let mut rows = self.fetch(sql, types);
        while let Some(row) = rows.next().await {
            out.push(row?);
        }
        Ok(out)
    }

    /// The tables of the database (the current schema for PostgreSQL), Strata's own excluded.
    pub async fn table_names(&self) -> Result<Vec<String>> {
        let sql = match self {
            Db::Postgres(_) => "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r','p') AND n.nspname = current_schema() AND NOT c.relispartition ORDER BY 1",
            Db::Sqlite(..) => "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY 1",
        };
        let rows = self.fetch_all(sql.into(), vec![ColumnType::Text]).await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().and_then(|v| v.as_key_text()))
            .filter(|n| !n.starts_with("_strata"))
            .collect())
    }

    /// Introspects one table.
    pub async fn table_schema(&self, table: &str) -> Result<TableSchema> {
        let text = |v: &Value| v.as_key_text().unwrap_or_default();
        let lit = table.replace('\'', "''");
        let mut schema = TableSchema {
            name: table.to_string(),
            columns: Vec::new(),
            primary_key: Vec::new(),
            foreign_keys: Vec::new(),
        };
        match self {
            Db::Postgres(_) => {
                let rel = format!("(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relname = '{lit}')");
                let cols = format!("SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a \
                     WHERE a.attrelid = {rel} AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum");
                for r in self
                    .fetch_all(
                        cols,
                        vec![ColumnType::Text, ColumnType::Text, ColumnType::Bool],
                    )
                    .await?
                {
                    let decl = text(&r[1]);
                    schema.columns.push(Column {
                        name: text(&r[0]),
                        col_type: ColumnType::from_postgres(&decl),
                        decl_type: decl,
                        nullable: r[2] != Value::Bool(true),
                    });
                }
                let pk = format!("SELECT a.attname::text FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum WHERE i.indrelid = {rel} AND i.indisprimary ORDER BY k.ord");
                schema.primary_key = self
                    .fetch_all(pk, vec![ColumnType::Text])
                    .await?
                    .iter()
                    .map(|r| text(&r[0]))
                    .collect();
                let fk = format!("SELECT a.attname::text, cf.relname::text, af.attname::text FROM pg_constraint c \
                     JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1] \
                     JOIN pg_class cf ON cf.oid = c.confrelid \
                     JOIN pg_attribute af ON af.attrelid = c.confrelid AND af.attnum = c.confkey[1] \
                     WHERE c.contype = 'f' AND c.conrelid = {rel} AND cardinality(c.conkey) = 1 ORDER BY 1");
                schema.foreign_keys = self
                    .fetch_all(fk, vec![ColumnType::Text; 3])
                    .await?
                    .iter()
                    .map(|r| (text(&r[0]), text(&r[1]), text(&r[2])))
                    .collect();
            }
            Db::Sqlite(..) => {
                let cols = format!("SELECT name, type, \"notnull\", pk FROM pragma_table_info('{lit}') ORDER BY cid");
                let mut pk: Vec<(i64, String)> = Vec::new();
                for r in self
                    .fetch_all(
                        cols,
                        vec![
                            ColumnType::Text,
                            ColumnType::Text,
                            ColumnType::Int,
                            ColumnType::Int,
                        ],
                    )
                    .await?
                {
                    let decl = text(&r[1]);
                    let name = text(&r[0]);
                    if let Value::Int(n) = r[3] {
                        if n > 0 {
                            pk.push((n, name.clone()));
                        }
                    }
                    schema.columns.push(Column {
                        name,
                        col_type: ColumnType::from_sqlite(&decl),
                        decl_type: decl,
                        nullable: r[2] != Value::Int(1),
                    });
                }
                pk.sort();
                schema.primary_key = pk.into_iter().map(|(_, n)| n).collect();
                let fk = format!("SELECT \"from\", \"table\", \"to\" FROM pragma_foreign_key_list('{lit}') WHERE id IN \
                     (SELECT id FROM pragma_foreign_key_list('{lit}') GROUP BY id HAVING count(*) = 1) ORDER BY 1");
                schema.foreign_keys = self
                    .fetch_all(fk, vec![ColumnType::Text; 3])
                    .await?
                    .iter()
                    .map(|r| (text(&r[0]), text(&r[1]), text(&r[2])))
                    .collect();
            }
        }
        if schema.columns.is_empty() {
            return Err(IngestError::Config {
                problems: vec![format!("table {table}: not found in the database")],
            });
        }
        Ok(schema)
    }

    /// Inserts rows (values already coerced to the table's column types) in one statement.
    pub async fn insert_rows(
        &self,
        table: &str,
        columns: &[Column],
        rows: &[Vec<Value>],
    ) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        if let Db::Sqlite(p, _) = self {
            let mut conn = p
                .acquire()
                .await
                .map_err(|e| IngestError::sql("insert", e))?;
            return crate::load::insert_sqlite(&mut conn, table, columns, rows).await;
        }
        let names: Vec<String> = columns.iter().map(|c| quote(&c.name)).collect();
        let mut sql = format!(
            "INSERT INTO {} ({}) VALUES ",
            quote(table),
            names.join(", ")
        );
        let mut n = 0;
        for (i, _) in rows.iter().enumerate() {
            sql.push_str(if i == 0 { "(" } else { ", (" });
            for (j, c) in columns.iter().enumerate() {
                n += 1;
                if j > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("CAST(${n} AS {})", c.decl_type));
            }
            sql.push(')');
        }
        let values: Vec<Value> = rows.iter().flatten().cloned().collect();
        let types: Vec<ColumnType> = columns.iter().map(|c| c.col_type).collect();
        self.execute_typed(&sql, &values, &types)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                IngestError::Sql { cause: source, .. } => {
                    IngestError::sql(&format!("insert into {table}"), source)
                }
                other => other,
            })
    }

    /// How many rows a bound-parameter INSERT may carry for `columns` columns.
    pub fn rows_per_insert(&self, columns: usize) -> usize {
        (30_000 / columns.max(1)).clamp(1, 1000)
    }
}

/// A URL with its password replaced, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

pub(crate) fn bind_pg<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    v: &Value,
    t: ColumnType,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    match v.clone() {
        Value::Null => match t {
            ColumnType::Int => q.bind(None::<i64>),
            ColumnType::Float => q.bind(None::<f64>),
            ColumnType::Bool => q.bind(None::<bool>),
            ColumnType::Bytes => q.bind(None::<Vec<u8>>),
            ColumnType::Date => q.bind(None::<NaiveDate>),
            ColumnType::Timestamp => q.bind(None::<NaiveDateTime>),
            ColumnType::TimestampTz => q.bind(None::<DateTime<Utc>>),
            ColumnType::Text | ColumnType::Other => q.bind(None::<String>),
        },
        Value::Int(i) => q.bind(i),
        Value::Float(f) => q.bind(f),
        Value::Bool(b) => q.bind(b),
        Value::Text(s) => q.bind(s),
        Value::Bytes(b) => q.bind(b),
        Value::Date(d) => q.bind(d),
        Value::Timestamp(t) => q.bind(t),
        Value::TimestampTz(t) => q.bind(t),
    }
}

pub(crate) fn bind_sqlite<'q>(
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    v: &Value,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    match v.clone() {
        Value::Null => q.bind(None::<String>),
        Value::Int(i) => q.bind(i),
        Value::Float(f) => q.bind(f),
        Value::Bool(b) => q.bind(b as i64),
        Value::Text(s) => q.bind(s),
        Value::Bytes(b) => q.bind(b),
        Value::Date(d) => q.bind(d.to_string()),
        Value::Timestamp(t) => q.bind(t.format("%Y-%m-%d %H:%M:%S%.f").to_string()),
        Value::TimestampTz(t) => q.bind(t.to_rfc3339()),
    }
}

/// The SELECT expression that reads a column as the type `decode_pg` expects.
pub fn pg_select_expr(expr: &str, t: ColumnType) -> String {
    match t {
        ColumnType::Int => format!("({expr})::bigint"),
        ColumnType::Float => format!("({expr})::float8"),
        ColumnType::Other => format!("({expr})::text"),
        ColumnType::Text => format!("({expr})::text"),
        _ => expr.to_string(),
    }
}

use crate::pg_copy::{
    CHUNKS_IN_FLIGHT as READ_CHUNKS, CHUNK_BYTES as READ_CHUNK_BYTES, CHUNK_ROWS as READ_CHUNK_ROWS,
};

/// Streams a query's rows from a SQLite file read directly (read-only) on a blocking thread.
/// Bulk reads are several times faster this way than through the async driver, which copies
/// and hands over every row separately; memory stays bounded by the chunks in flight.
fn sqlite_reader(path: Arc<PathBuf>, sql: String, n: usize) -> ChunkStream<'static> {
    use rusqlite::types::ValueRef;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<Vec<Value>>>>(READ_CHUNKS);
    tokio::task::spawn_blocking(move || {
        let read = || -> rusqlite::Result<()> {
            let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = rusqlite::Connection::open_with_flags(path.as_path(), flags)?;
            let mut stmt = conn.prepare(&sql)?;
            let mut rows = stmt.query([])?;
            let mut chunk = Vec::with_capacity(READ_CHUNK_ROWS);
            let mut bytes = 0;
            while let Some(row) = rows.next()? {
                let mut values = Vec::with_capacity(n);
                for i in 0..n {
                    values.push(match row.get_ref(i)? {
                        ValueRef::Null => Value::Null,
                        ValueRef::Integer(v) => Value::Int(v),
                        ValueRef::Real(v) => Value::Float(v),
                        ValueRef::Text(t) => {
                            bytes += t.len();
                            // Text that is not UTF-8 stays bytes: coercion quarantines the row.
                            match std::str::from_utf8(t) {
                                Ok(s) => Value::Text(s.to_owned()),
                                Err(_) => Value::Bytes(t.to_vec()),
                            }
                        }
                        ValueRef::Blob(b) => {
                            bytes += b.len();
                            Value::Bytes(b.to_vec())
                        }
                    });
                }
                chunk.push(values);
                if chunk.len() >= READ_CHUNK_ROWS || bytes >= READ_CHUNK_BYTES {
                    bytes = 0;
                    if tx.blocking_send(Ok(std::mem::take(&mut chunk))).is_err() {
                        return Ok(()); // the consumer stopped reading
                    }
                }
            }
            if !chunk.is_empty() {
                let _ = tx.blocking_send(Ok(chunk));
            }
            Ok(())
        };
        if let Err(e) = read() {
            let _ = tx.blocking_send(Err(IngestError::Read {
                detail: e.to_string(),
            }));
        }
    });
    chunks(rx)
}

/// The chunks of rows arriving from a reader task.
fn chunks(rx: tokio::sync::mpsc::Receiver<crate::pg_copy::Chunk>) -> ChunkStream<'static> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (c, rx))
    }))
}

fn decode_sqlite(row: &SqliteRow, n: usize) -> Result<Vec<Value>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let e = |e: sqlx::Error| IngestError::sql("decode", e);
        let raw = row.try_get_raw(i).map_err(e)?;
        if raw.is_null() {
            out.push(Value::Null);
            continue;
        }
        let kind = raw.type_info().name().to_string();
        out.push(match kind.as_str() {
            "INTEGER" | "BOOLEAN" => Value::Int(row.try_get::<i64, _>(i).map_err(e)?),
            "REAL" | "NUMERIC" => Value::Float(row.try_get::<f64, _>(i).map_err(e)?),
            "BLOB" => Value::Bytes(row.try_get::<Vec<u8>, _>(i).map_err(e)?),
            // Text that is not valid UTF-8 comes back as bytes; coercion to a text column
            // then quarantines the row as "invalid UTF-8 text".
            _ => match row.try_get::<String, _>(i) {
                Ok(s) => Value::Text(s),
                Err(_) => Value::Bytes(row.try_get_unchecked::<Vec<u8>, _>(i).map_err(e)?),
            },
        });
    }
    Ok(out)
}

/// Size of the pieces in which [`Db::blob_pieces`] reads a long BLOB.
const BLOB_PIECE_BYTES: u64 = 1 << 20;

/// What [`Db::blob_pieces`] carries from one piece to the next.
struct PieceReader {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Postgres>>,
    offset: u64,
    sha256: sha2::Sha256,
    done: bool,
}

impl Db {
    /// Streams one `bytea` value of a PostgreSQL source in pieces of 1 MiB: the
    /// value of `column` in the row at `ctid` of `table`, read in `snapshot` (the one its row
    /// came from) on a connection of its own. After the last piece the source computes the
    /// value's SHA-256, which must equal the pieces' (a BLOB is never stored truncated or
    /// reassembled wrong); a mismatch, a missing row or a short read ends the stream with an
    /// error naming the table and the row's position, never a value.
    pub fn blob_pieces(
        &self,
        table: &str,
        column: &str,
        ctid: &str,
        length: u64,
        snapshot: Option<String>,
    ) -> Result<futures::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>> {
        use sha2::Digest;
        let Db::Postgres(pool) = self else {
            return Err(IngestError::Run(
                "BLOBs are streamed in pieces from PostgreSQL sources only".into(),
            ));
        };
        if !ctid
            .bytes()
            .all(|b| b.is_ascii_digit() || b"(),".contains(&b))
        {
            return Err(IngestError::Run(format!(
                "{table}: unexpected ctid {ctid:?}"
            )));
        }
        let pool = pool.clone();
        let at = format!("FROM {} WHERE ctid = '{ctid}'::tid", quote(table));
        let what = format!("{table} row at ctid {ctid}");
        let column = quote(column);
        let failed = move |what: &str, detail: String| {
            std::io::Error::other(format!("reading the BLOB of {what}: {detail}"))
        };
        let start = PieceReader {
            conn: None,
            offset: 0,
            sha256: sha2::Sha256::new(),
            done: false,
        };
        Ok(futures::stream::unfold(start, move |mut r| {
            let (pool, snapshot, at, what, column) = (
                pool.clone(),
                snapshot.clone(),
                at.clone(),
                what.clone(),
                column.clone(),
            );
            async move {
                if r.done {
                    return None;
                }
                // An error ends the stream (and closes the connection with `r`).
                let end = |e: std::io::Error| Some((Err(e), PieceReader::ended()));
                if r.conn.is_none() {
                    match piece_connection(&pool, snapshot.as_deref()).await {
                        Ok(c) => r.conn = Some(c),
                        Err(e) => return end(failed(&what, e.to_string())),
                    }
                }
                let conn = r.conn.as_mut().expect("connected above");
                if r.offset >= length {
                    let sql = format!("SELECT encode(sha256({column}), 'hex') {at}");
                    let source: std::result::Result<Option<Option<String>>, _> =
                        sqlx::query_scalar(AssertSqlSafe(sql))
                            .fetch_optional(&mut **conn)
                            .await;
                    let read = hex::encode(std::mem::take(&mut r.sha256).finalize());
                    return match source {
                        Ok(Some(Some(s))) if s == read => None,
                        Ok(_) => end(failed(
                            &what,
                            "its SHA-256 differs from the source's".into(),
                        )),
                        Err(e) => end(failed(&what, e.to_string())),
                    };
                }
                let sql = format!(
                    "SELECT substring({column} FROM {} FOR {BLOB_PIECE_BYTES}) {at}",
                    r.offset + 1
                );
                let piece: std::result::Result<Option<Option<Vec<u8>>>, _> =
                    sqlx::query_scalar(AssertSqlSafe(sql))
                        .fetch_optional(&mut **conn)
                        .await;
                match piece {
                    Ok(Some(Some(bytes))) if !bytes.is_empty() => {
                        r.offset += bytes.len() as u64;
                        r.sha256.update(&bytes);
                        Some((Ok(bytes::Bytes::from(bytes)), r))
                    }
                    Ok(_) => end(failed(
                        &what,
                        format!("the source ended at byte {} of {length}", r.offset),
                    )),
                    Err(e) => end(failed(&what, e.to_string())),
                }
            }
        })
        .boxed())
    }
}

impl PieceReader {
    fn ended() -> Self {
        PieceReader {
            conn: None,
            offset: 0,
            sha256: Default::default(),
            done: true,
        }
    }
}

/// A connection for reading BLOB pieces, in `snapshot` when given; closed (not returned to
/// the pool) when dropped, since its transaction stays open.
async fn piece_connection(
    pool: &sqlx::PgPool,
    snapshot: Option<&str>,
) -> std::result::Result<sqlx::pool::PoolConnection<sqlx::Postgres>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    conn.close_on_drop();
    if let Some(id) = snapshot {
        let setup = format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            id.replace('\'', "")
        );
        sqlx::raw_sql(AssertSqlSafe(setup))
            .execute(&mut *conn)
            .await?;
    }
    Ok(conn)
}
