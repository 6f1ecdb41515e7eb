//! The connection behind the control database: PostgreSQL in production, SQLite beside the
//! config in the demo. Only what the control tables need: statements with bound text and
//! integer parameters, and rows read back as text or integers.

use crate::error::{ControlError, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Row};
use std::str::FromStr;
use std::time::Duration;

/// A bound parameter. NULLs carry their type: PostgreSQL caches prepared statements by text,
/// and a parameter must keep one type across executions.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
    NullText,
}

impl From<&str> for Param {
    fn from(s: &str) -> Self {
        Param::Text(s.to_string())
    }
}

impl From<String> for Param {
    fn from(s: String) -> Self {
        Param::Text(s)
    }
}

impl From<&String> for Param {
    fn from(s: &String) -> Self {
        Param::Text(s.clone())
    }
}

impl From<i64> for Param {
    fn from(i: i64) -> Self {
        Param::Int(i)
    }
}

impl From<Option<&String>> for Param {
    fn from(s: Option<&String>) -> Self {
        s.map_or(Param::NullText, |s| Param::Text(s.clone()))
    }
}

/// How a result column is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Col {
    Text,
    Int,
}

/// A value read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Text(Option<String>),
    Int(Option<i64>),
}

impl Cell {
    /// The text, or "" for NULL or an integer.
    pub(crate) fn text(&self) -> String {
        self.opt_text().unwrap_or_default()
    }

    pub(crate) fn opt_text(&self) -> Option<String> {
        match self {
            Cell::Text(t) => t.clone(),
            Cell::Int(_) => None,
        }
    }

    pub(crate) fn int(&self) -> Option<i64> {
        match self {
            Cell::Int(i) => *i,
            Cell::Text(_) => None,
        }
    }
}

/// A pool to the control database.
#[derive(Debug, Clone)]
pub(crate) enum ControlDb {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

/// `url` without its password.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Binds `params` to a query of either engine.
macro_rules! bind_all {
    ($q:expr, $params:expr) => {{
        let mut q = $q;
        for p in $params {
            q = match p {
                Param::Text(s) => q.bind(s.clone()),
                Param::Int(i) => q.bind(*i),
                Param::NullText => q.bind(None::<String>),
            };
        }
        q
    }};
}

/// Reads rows of either engine as `cols`.
macro_rules! read_rows {
    ($rows:expr, $cols:expr) => {
        $rows
            .iter()
            .map(|row| {
                $cols
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match c {
                        Col::Text => row.try_get::<Option<String>, _>(i).map(Cell::Text),
                        Col::Int => row.try_get::<Option<i64>, _>(i).map(Cell::Int),
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()
            })
            .collect::<std::result::Result<Vec<_>, _>>()
    };
}

/// Why a connection failed, in words a user can act on: the server's own message (without
/// PostgreSQL's source line, "at line 334"), or the network's ("connection refused") where a
/// pool would only say it timed out.
pub fn connection_problem(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => database_error_text(db.as_ref()),
        sqlx::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused (is the server running and listening there?)".into()
            }
            std::io::ErrorKind::TimedOut => "timed out".into(),
            _ => io.to_string(),
        },
        sqlx::Error::PoolTimedOut => "timed out waiting for the server to answer".into(),
        other => other.to_string(),
    }
}

/// A database error as Strata may show it (logs, errors, quarantine reasons): PostgreSQL's
/// own messages without the values they quote ([`without_values`]); an error a trigger or
/// function raised (SQLSTATE class P0), whose text is the application's and may hold any
/// value, only by its code and table.
pub fn database_error_text(db: &dyn sqlx::error::DatabaseError) -> String {
    match db.code() {
        Some(code) if code.starts_with("P0") => {
            let table = db
                .table()
                .map(|t| format!(" on table {t}"))
                .unwrap_or_default();
            format!("a trigger or function of the database raised an error{table} (SQLSTATE {code}; its text is not shown, it may hold values)")
        }
        _ => without_values(db.message()),
    }
}

/// Words after which a database's message quotes a name, which is kept (`column "x" of
/// relation "t"`, `constraint "c"`, `syntax error at or near "select"`).
const NAMES_QUOTED_AFTER: &[&str] = &[
    "column",
    "relation",
    "constraint",
    "table",
    "index",
    "encoding",
    "type",
    "schema",
    "database",
    "role",
    "user",
    "function",
    "sequence",
    "publication",
    "slot",
    "extension",
    "near",
];

/// A database's message without the values it quotes: PostgreSQL quotes the offending value in
/// its data exceptions (`invalid input syntax for type integer: "…"`, `value "…" is out of
/// range for type integer`, a trigger's `RAISE`), and a value may be PHI. Every double-quoted
/// part becomes `"(value withheld)"` unless it follows a word that names what it quotes (a
/// column, relation, constraint ...: [`NAMES_QUOTED_AFTER`]).
pub fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        let (before, from_quote) = rest.split_at(open);
        out.push_str(before);
        // The quoted part ends at the next quote not doubled (PostgreSQL doubles quotes inside).
        let inner = &from_quote[1..];
        let mut end = None;
        let bytes = inner.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'"' {
                if bytes.get(i + 1) == Some(&b'"') {
                    i += 2;
                    continue;
                }
                end = Some(i);
                break;
            }
            i += 1;
        }
        let word = out
            .trim_end()
            .rsplit(|c: char| !c.is_alphanumeric() && c != '_')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let named = NAMES_QUOTED_AFTER.contains(&word.as_str());
        match end {
            Some(end) => {
                if named {
                    out.push_str(&from_quote[..end + 2]);
                } else {
                    out.push_str("\"(value withheld)\"");
                }
                rest = &inner[end + 1..];
            }
            // An unclosed quote: what follows it is withheld too.
            None => {
                out.push_str(if named {
                    from_quote
                } else {
                    "\"(value withheld)"
                });
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Opens and closes one connection to PostgreSQL, so that a refused connection or a bad
/// password is reported as such: a pool retries until it times out and says only that.
pub async fn reach_postgres(options: &PgConnectOptions) -> std::result::Result<(), sqlx::Error> {
    use sqlx::Connection;
    sqlx::PgConnection::connect_with(options)
        .await?
        .close()
        .await
}

impl ControlDb {
    /// Connects to `postgres://...` or `sqlite://path` (created if missing).
    pub(crate) async fn connect(url: &str) -> Result<Self> {
        let conn_err = |e: sqlx::Error| ControlError::Connect {
            url: redact(url),
            detail: connection_problem(&e),
        };
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)
                .map_err(conn_err)?
                .options([("timezone", "UTC")])
                // Statements carry patient keys: never log them.
                .disable_statement_logging();
            reach_postgres(&options).await.map_err(conn_err)?;
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .connect_with(options)
                .await
                .map_err(conn_err)?;
            Ok(ControlDb::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(conn_err)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(30))
                .disable_statement_logging();
            let pool = SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .map_err(conn_err)?;
            Ok(ControlDb::Sqlite(pool))
        } else {
            Err(ControlError::Connect {
                url: redact(url),
                detail: "expected a postgres:// or sqlite:// URL".into(),
            })
        }
    }

    /// Placeholder number `n` (1-based) in this engine's syntax.
    pub(crate) fn p(&self, n: usize) -> String {
        match self {
            ControlDb::Postgres(_) => format!("${n}"),
            ControlDb::Sqlite(_) => format!("?{n}"),
        }
    }

    /// `n` placeholders, comma-separated, starting at 1.
    pub(crate) fn ps(&self, n: usize) -> String {
        (1..=n).map(|i| self.p(i)).collect::<Vec<_>>().join(", ")
    }

    /// Runs statements without parameters or results (DDL; several allowed).
    pub(crate) async fn execute(&self, sql: &str) -> Result<()> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            ControlDb::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            ControlDb::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
        }
        .map_err(|e| ControlError::sql("execute", e))
    }

    /// Runs one statement with bound parameters; returns the rows affected.
    pub(crate) async fn execute_with(&self, sql: &str, params: &[Param]) -> Result<u64> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            ControlDb::Postgres(pool) => bind_all!(sqlx::query(sql), params)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
            ControlDb::Sqlite(pool) => bind_all!(sqlx::query(sql), params)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
        }
        .map_err(|e| ControlError::sql("execute", e))
    }

    /// Runs a query with bound parameters and reads every row as `cols`.
    pub(crate) async fn fetch(
        &self,
        sql: &str,
        params: &[Param],
        cols: &[Col],
    ) -> Result<Vec<Vec<Cell>>> {
        let sql = AssertSqlSafe(sql.to_string());
        match self {
            ControlDb::Postgres(pool) => {
                let rows = bind_all!(sqlx::query(sql), params).fetch_all(pool).await;
                rows.and_then(|rows| read_rows!(rows, cols))
            }
            ControlDb::Sqlite(pool) => {
                let rows = bind_all!(sqlx::query(sql), params).fetch_all(pool).await;
                rows.and_then(|rows| read_rows!(rows, cols))
            }
        }
        .map_err(|e| ControlError::sql("query", e))
    }

    /// The columns of table `table` (for adding the ones a newer Strata needs).
    pub(crate) async fn columns_of(&self, table: &str) -> Result<Vec<String>> {
        let sql = match self {
            ControlDb::Postgres(_) => {
                "SELECT column_name::text FROM information_schema.columns WHERE table_name = $1"
            }
            ControlDb::Sqlite(_) => "SELECT name FROM pragma_table_info(?1)",
        };
        Ok(self
            .fetch(sql, &[table.into()], &[Col::Text])
            .await?
            .into_iter()
            .filter_map(|r| r[0].opt_text())
            .collect())
    }

    /// Closes the pool.
    pub(crate) async fn close(&self) {
        match self {
            ControlDb::Postgres(p) => p.close().await,
            ControlDb::Sqlite(p) => p.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::without_values;

    /// PostgreSQL's messages quote the offending value of a data exception: withheld; the
    /// names it quotes stay.
    #[test]
    fn quoted_values_are_withheld_and_names_kept() {
        let cases = [
            (
                r#"invalid input syntax for type integer: "MRN-4411 Smith""#,
                r#"invalid input syntax for type integer: "(value withheld)""#,
            ),
            (
                r#"value "19991231999" is out of range for type integer"#,
                r#"value "(value withheld)" is out of range for type integer"#,
            ),
            (
                r#"date/time field value out of range: "1961-13-45""#,
                r#"date/time field value out of range: "(value withheld)""#,
            ),
            (
                r#"null value in column "mrn" of relation "patients" violates not-null constraint"#,
                r#"null value in column "mrn" of relation "patients" violates not-null constraint"#,
            ),
            (
                r#"duplicate key value violates unique constraint "visits_pkey""#,
                r#"duplicate key value violates unique constraint "visits_pkey""#,
            ),
            (
                r#"patient "Jane ""JJ"" Doe" is deceased"#,
                r#"patient "(value withheld)" is deceased"#,
            ),
            (r#"unclosed: "Jane Doe"#, r#"unclosed: "(value withheld)"#),
            (
                r#"syntax error at or near "SELEC""#,
                r#"syntax error at or near "SELEC""#,
            ),
        ];
        for (message, expected) in cases {
            assert_eq!(without_values(message), expected, "{message}");
        }
    }
}
