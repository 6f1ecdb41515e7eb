//! What change sync needs on the source that Strata's role may not do itself (least
//! privilege: Strata's role has `REPLICATION` and `SELECT` only): a publication of the migrated
//! tables and `REPLICA IDENTITY FULL` for those without a primary key (so that an update or a
//! delete names the whole old row). `strata sync prepare` prints it as SQL for the database's
//! owner and checks what is in place.

use crate::db::{quote, Db};
use crate::error::Result;
use crate::value::{ColumnType, Value};

/// A migrated table as sync needs it prepared.
pub struct PreparedTable {
    /// Its name (in the source's current schema).
    pub name: String,
    /// Whether it has a primary key (else it needs `REPLICA IDENTITY FULL`).
    pub has_primary_key: bool,
}

/// The SQL for the owner, and what is not in place yet.
pub struct Preparation {
    /// Statements for the database's owner, one per line.
    pub sql: Vec<String>,
    /// What is missing, one line each; empty when sync can start.
    pub problems: Vec<String>,
}

async fn texts(source: &Db, sql: String) -> Result<Vec<String>> {
    Ok(source
        .fetch_all(sql, vec![ColumnType::Text])
        .await?
        .into_iter()
        .filter_map(|r| match r.into_iter().next() {
            Some(Value::Text(t)) => Some(t),
            _ => None,
        })
        .collect())
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The statements `publication` and `tables` need, and what of them the source lacks.
pub async fn prepare(
    source: &Db,
    publication: &str,
    tables: &[PreparedTable],
) -> Result<Preparation> {
    let names: Vec<String> = tables.iter().map(|t| quote(&t.name)).collect();
    // A partitioned table's changes are published under its partitions' names unless the
    // publication publishes them under the root's: sync would not know them.
    let partitioned = texts(
        source,
        format!(
            "SELECT c.relname::text FROM pg_class c WHERE c.relkind = 'p' AND c.oid IN ({})",
            tables
                .iter()
                .map(|t| format!("to_regclass({})", literal(&quote(&t.name))))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .await?;
    let via_root = if partitioned.is_empty() {
        ""
    } else {
        " WITH (publish_via_partition_root = true)"
    };
    let mut sql = vec![format!(
        "CREATE PUBLICATION {} FOR TABLE {}{via_root};",
        quote(publication),
        names.join(", ")
    )];
    let mut problems = Vec::new();
    let wal_level = texts(source, "SELECT current_setting('wal_level')".into()).await?;
    if wal_level.first().map(String::as_str) != Some("logical") {
        problems.push(format!(
            "wal_level is {}, not logical: set wal_level = logical in postgresql.conf and restart PostgreSQL",
            wal_level.first().map_or("unknown", String::as_str)
        ));
    }
    let replication = texts(
        source,
        "SELECT (rolreplication OR rolsuper)::text FROM pg_roles WHERE rolname = current_user"
            .into(),
    )
    .await?;
    if replication.first().map(String::as_str) != Some("true") {
        problems.push(
            "Strata's source role lacks REPLICATION: ALTER ROLE <role> REPLICATION (as a superuser)"
                .into(),
        );
    }
    let published = texts(
        source,
        format!(
            "SELECT tablename::text FROM pg_publication_tables WHERE pubname = {} AND schemaname = current_schema()",
            literal(publication)
        ),
    )
    .await?;
    let via_root_now = texts(
        source,
        format!(
            "SELECT pubviaroot::text FROM pg_publication WHERE pubname = {}",
            literal(publication)
        ),
    )
    .await?;
    let exists = !via_root_now.is_empty();
    if exists && !partitioned.is_empty() && via_root_now[0] != "true" {
        problems.push(format!(
            "table(s) {} are partitioned and publication {publication} publishes their changes under the partitions' names: ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
            partitioned.join(", "),
            quote(publication)
        ));
    }
    if !exists {
        problems.push(format!(
            "publication {publication} does not exist: the owner runs the CREATE PUBLICATION below"
        ));
    } else {
        let missing: Vec<&str> = tables
            .iter()
            .map(|t| t.name.as_str())
            .filter(|t| !published.iter().any(|p| p == t))
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "publication {publication} lacks table(s) {}: ALTER PUBLICATION {} ADD TABLE {};",
                missing.join(", "),
                quote(publication),
                missing
                    .iter()
                    .map(|t| quote(t))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    for t in tables.iter().filter(|t| !t.has_primary_key) {
        let statement = format!("ALTER TABLE {} REPLICA IDENTITY FULL;", quote(&t.name));
        let identity = texts(
            source,
            format!(
                "SELECT c.relreplident::text FROM pg_class c WHERE c.oid = to_regclass({})",
                literal(&quote(&t.name))
            ),
        )
        .await?;
        if identity.first().map(String::as_str) != Some("f") {
            problems.push(format!(
                "table {} has no primary key: its updates and deletes name no row until the owner runs {statement}",
                t.name
            ));
        }
        sql.push(statement);
    }
    Ok(Preparation { sql, problems })
}
