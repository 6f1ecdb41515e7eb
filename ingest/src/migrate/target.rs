//! The operational database's side of a run: bookkeeping tables (quarantine, checkpoints),
//! target tables and their primary keys, and keys repeated across ranges.

use super::range::Checkpoint;
use crate::db::{quote, Column, Db, DbKind, TableSchema};
use crate::error::{IngestError, Result};
use crate::layout::TableLayout;
use crate::load::TargetTx;
use crate::value::{ColumnType, Value};

pub(super) const QUARANTINE_TABLE: &str = "_strata_quarantine";
/// Per range of each table, what was done; committed with the range's rows.
pub(super) const CHECKPOINT_TABLE: &str = "_strata_checkpoints";

/// Creates the quarantine and checkpoint tables in the operational database.
pub(super) async fn ensure_bookkeeping_tables(target: &Db) -> Result<()> {
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {QUARANTINE_TABLE} (run_id TEXT NOT NULL, table_name TEXT NOT NULL, row_key TEXT NOT NULL, \
             column_name TEXT NOT NULL, reason TEXT NOT NULL, row_data TEXT NOT NULL, quarantined_at TEXT NOT NULL)"
        ))
        .await?;
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (run_id TEXT NOT NULL, table_name TEXT NOT NULL, range_index BIGINT NOT NULL, \
             checkpoint TEXT NOT NULL, finished_at TEXT NOT NULL, PRIMARY KEY (run_id, table_name, range_index))"
        ))
        .await
}

/// The checkpoints of a table's ranges in a run.
pub(super) async fn checkpoints(target: &Db, run_id: &str, table: &str) -> Result<Vec<Checkpoint>> {
    let sql = format!(
        "SELECT checkpoint FROM {CHECKPOINT_TABLE} WHERE run_id = '{}' AND table_name = '{}' ORDER BY range_index",
        run_id.replace('\'', "''"),
        table.replace('\'', "''")
    );
    target
        .fetch_all(sql, vec![ColumnType::Text])
        .await?
        .into_iter()
        .map(|r| {
            let text = r
                .into_iter()
                .next()
                .and_then(Value::into_key_text)
                .unwrap_or_default();
            serde_json::from_str(&text)
                .map_err(|e| IngestError::Run(format!("checkpoint of {table}: {e}")))
        })
        .collect()
}

/// Forgets a table's progress in a run: its loaded rows, quarantined rows and checkpoints (in
/// one transaction) and its range manifests.
pub(super) async fn restart_table(
    target: &Db,
    store: &strata_archive::Store,
    run_id: &str,
    table: &str,
) -> Result<()> {
    forget_table(target, run_id, table, true).await?;
    strata_archive::withdraw_manifests(store.as_ref(), table, run_id).await?;
    Ok(())
}

/// Deletes a run's quarantined rows and checkpoints of `table` in the operational database,
/// and (`rows`) the table's rows, in one transaction.
pub(super) async fn forget_table(target: &Db, run_id: &str, table: &str, rows: bool) -> Result<()> {
    let mut tx = TargetTx::begin(target).await?;
    if rows {
        tx.execute(&format!("DELETE FROM {}", quote(table))).await?;
    }
    for t in [QUARANTINE_TABLE, CHECKPOINT_TABLE] {
        let sql = format!(
            "DELETE FROM {t} WHERE run_id = {} AND table_name = {}",
            tx.placeholder(1),
            tx.placeholder(2)
        );
        tx.execute_with(&sql, &[run_id.to_string(), table.to_string()])
            .await?;
    }
    tx.commit().await
}

use crate::decimal::{Decimal, CSV_DECIMAL_DECL};

/// The declared type of a column in the target engine: the source's own when the engines are
/// the same, else the target's type for the column's kind.
fn target_decl(from: DbKind, to: DbKind, c: &Column) -> String {
    if from == to {
        return c.decl_type.clone();
    }
    // An exact decimal stays one: numeric in PostgreSQL, text that keeps its digits in SQLite.
    match (Decimal::of(&c.decl_type, from), to) {
        (Some(Decimal::Fixed { precision, scale }), DbKind::Postgres) => {
            format!("numeric({precision},{scale})")
        }
        (Some(Decimal::Text), DbKind::Postgres) => "numeric".into(),
        (Some(Decimal::Fixed { precision, scale }), DbKind::Sqlite) => {
            format!("{CSV_DECIMAL_DECL}({precision},{scale})")
        }
        (Some(Decimal::Text), DbKind::Sqlite) => CSV_DECIMAL_DECL.into(),
        (None, _) => c.col_type.default_decl(to).to_string(),
    }
}

/// The columns a load into the operational table declares: the existing table's own
/// declarations (what checks and COPY must meet), or, for a table Strata will create, the
/// source's mapped to the target engine (or the configured casts). Creates nothing, so a plan
/// checks rows against exactly what a run will load into. An existing table that lacks a
/// column is a configuration problem. `target` is None when the operational database does
/// not exist yet (a SQLite file a run will create); the bool says whether the table exists.
pub(super) async fn target_columns(
    source: DbKind,
    target: (DbKind, Option<&Db>),
    schema: &TableSchema,
    casts: &[Option<String>],
) -> Result<(Vec<Column>, bool)> {
    let columns: Vec<Column> = schema
        .columns
        .iter()
        .zip(casts)
        .map(|(c, cast)| Column {
            decl_type: match cast {
                Some(cast) => cast.clone(),
                None => target_decl(source, target.0, c),
            },
            ..c.clone()
        })
        .collect();
    let Some(target) = target.1 else {
        return Ok((columns, false));
    };
    if !target.table_names().await?.contains(&schema.name) {
        return Ok((columns, false));
    }
    let existing = target.table_schema(&schema.name).await?;
    let mut missing = Vec::new();
    let columns: Vec<Column> = columns
        .into_iter()
        .map(|c| match existing.column(&c.name) {
            Some(t) => Column {
                decl_type: t.decl_type.clone(),
                nullable: t.nullable,
                ..c
            },
            None => {
                missing.push(c.name.clone());
                c
            }
        })
        .collect();
    if !missing.is_empty() {
        return Err(IngestError::Config {
            problems: vec![format!(
                "operational table {} has no column {}",
                schema.name,
                missing.join(", ")
            )],
        });
    }
    Ok((columns, true))
}

/// Makes the operational table ready to load and returns its columns as loads declare them
/// ([`target_columns`]).
///
/// A table Strata creates in PostgreSQL gets its primary key after the load (building an index
/// once is cheaper than maintaining it row by row: ~25 % here); SQLite cannot add one later, so
/// there it comes with the table. A table that exists already must be empty unless this run
/// started loading it (`resuming`).
pub(super) async fn prepare_target_table(
    source: &Db,
    target: &Db,
    schema: &TableSchema,
    casts: &[Option<String>],
    resuming: bool,
) -> Result<Vec<Column>> {
    let (columns, exists) =
        target_columns(source.kind(), (target.kind(), Some(target)), schema, casts).await?;
    if exists {
        if !resuming {
            let rows = target
                .fetch_all(
                    format!("SELECT 1 FROM {} LIMIT 1", quote(&schema.name)),
                    vec![ColumnType::Int],
                )
                .await?;
            if !rows.is_empty() {
                return Err(IngestError::Run(format!(
                    "operational table {} already has rows; Strata loads only into empty tables (a finished earlier run, or data not from Strata)",
                    schema.name
                )));
            }
        }
        return Ok(columns);
    }
    let mut defs: Vec<String> = columns
        .iter()
        .map(|c| {
            format!(
                "{} {}{}",
                quote(&c.name),
                c.decl_type,
                if c.nullable { "" } else { " NOT NULL" }
            )
        })
        .collect();
    if target.kind() == DbKind::Sqlite && !schema.primary_key.is_empty() {
        defs.push(primary_key_clause(schema));
    }
    target
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} ({})",
            quote(&schema.name),
            defs.join(", ")
        ))
        .await?;
    Ok(columns)
}

fn primary_key_clause(schema: &TableSchema) -> String {
    format!(
        "PRIMARY KEY ({})",
        schema
            .primary_key
            .iter()
            .map(|k| quote(k))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

pub(super) const CROSS_RANGE_DUPLICATE: &str = "duplicate primary key (loaded by another range)";

/// Before a PostgreSQL table gets its primary key: rows that different ranges loaded with the
/// same key (possible only when the source does not enforce the key, and the ranges are not
/// key ranges) move to quarantine, all but the first loaded, in one transaction. Returns how
/// many rows of the run's table are in quarantine for this reason (so a finish interrupted
/// after the move still reports them).
pub(super) async fn quarantine_duplicate_keys(
    target: &Db,
    layout: &TableLayout,
    run_id: &str,
) -> Result<u64> {
    if target.kind() != DbKind::Postgres || layout.key.is_empty() {
        return Ok(0);
    }
    let table = quote(&layout.name);
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let keys: Vec<String> = layout
        .key
        .iter()
        .map(|&k| quote(&layout.target_names[k]))
        .collect();
    let key_text = layout
        .key
        .iter()
        .map(|&k| {
            let name = &layout.target_names[k];
            format!(
                "{} || COALESCE(t.{}::text, 'NULL')",
                lit(&format!("{name}=")),
                quote(name)
            )
        })
        .collect::<Vec<_>>()
        .join(" || ',' || ");
    let has_pk = !target
        .table_schema(&layout.name)
        .await?
        .primary_key
        .is_empty();
    if !has_pk {
        let mut tx = TargetTx::begin(target).await?;
        tx.execute(&format!(
            "CREATE TEMP TABLE _strata_dups ON COMMIT DROP AS SELECT ctid AS at FROM              (SELECT ctid, row_number() OVER (PARTITION BY {k} ORDER BY ctid) AS n FROM {table}) d WHERE n > 1;              INSERT INTO {QUARANTINE_TABLE} (run_id, table_name, row_key, column_name, reason, row_data, quarantined_at)              SELECT {run}, {name}, {key_text}, {first}, {reason}, row_to_json(t)::text, now()::text              FROM {table} t WHERE t.ctid IN (SELECT at FROM _strata_dups);              DELETE FROM {table} WHERE ctid IN (SELECT at FROM _strata_dups)",
            k = keys.join(", "),
            run = lit(run_id),
            name = lit(&layout.name),
            first = lit(&layout.target_names[layout.key[0]]),
            reason = lit(CROSS_RANGE_DUPLICATE),
        ))
        .await?;
        tx.commit().await?;
    }
    let sql = format!(
        "SELECT COUNT(*) FROM {QUARANTINE_TABLE} WHERE run_id = {} AND table_name = {} AND reason = {}",
        lit(run_id),
        lit(&layout.name),
        lit(CROSS_RANGE_DUPLICATE)
    );
    Ok(
        match target
            .fetch_all(sql, vec![ColumnType::Int])
            .await?
            .first()
            .map(|r| &r[0])
        {
            Some(Value::Int(n)) => *n as u64,
            _ => 0,
        },
    )
}

/// A run's quarantined rows of `table`, per column and reason: what the table's end logs, a
/// line each (the rows themselves, with their keys and values, stay in the quarantine table).
pub(super) async fn quarantine_summary(
    target: &Db,
    run_id: &str,
    table: &str,
) -> Result<Vec<(String, String, u64)>> {
    let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let sql = format!(
        "SELECT column_name, reason, COUNT(*) FROM {QUARANTINE_TABLE} WHERE run_id = {} AND table_name = {} GROUP BY column_name, reason ORDER BY column_name, reason",
        lit(run_id),
        lit(table)
    );
    Ok(target
        .fetch_all(
            sql,
            vec![ColumnType::Text, ColumnType::Text, ColumnType::Int],
        )
        .await?
        .into_iter()
        .map(|r| {
            let text = |v: &Value| v.as_key_text().unwrap_or_default();
            let n = match r[2] {
                Value::Int(n) => n as u64,
                _ => 0,
            };
            (text(&r[0]), text(&r[1]), n)
        })
        .collect())
}

/// Adds the source's primary key to a loaded PostgreSQL table that has none yet.
pub(super) async fn add_primary_key(target: &Db, schema: &TableSchema) -> Result<()> {
    if target.kind() != DbKind::Postgres || schema.primary_key.is_empty() {
        return Ok(());
    }
    let existing = target.table_schema(&schema.name).await?;
    if !existing.primary_key.is_empty() {
        return Ok(());
    }
    target
        .execute(&format!(
            "ALTER TABLE {} ADD {}",
            quote(&schema.name),
            primary_key_clause(schema)
        ))
        .await
}
