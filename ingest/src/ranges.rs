//! Splitting a table into ranges that workers copy in parallel, each checkpointed on its own.
//!
//! A table with a one-column integer key is split into equal-width key ranges: a row's range
//! depends only on its key, so ranges done before a crash stay valid when the resumed run reads
//! from a newer snapshot. Other tables are split by physical position (PostgreSQL page ranges
//! by `ctid`, SQLite `rowid` ranges): cheap to scan, but only meaningful within one snapshot, so
//! such a table restarts from its first range when a run resumes.

use crate::db::{quote, Db, DbKind};
use crate::error::Result;
use crate::layout::TableLayout;
use crate::value::{ColumnType, Value};

/// One range of a table: a condition on the table (aliased `t0`), or all of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct KeyRange {
    /// Position in the table's plan, from 0.
    pub index: usize,
    /// The SQL condition selecting the range's rows.
    pub filter: Option<String>,
}

/// How a table is split.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct RangePlan {
    pub ranges: Vec<KeyRange>,
    /// Whether the ranges select the same rows under any snapshot (key ranges).
    pub stable: bool,
    /// The source's estimate of the table's rows when it was planned.
    #[serde(default)]
    pub estimated_rows: u64,
}

impl RangePlan {
    fn whole() -> Self {
        RangePlan {
            ranges: vec![KeyRange {
                index: 0,
                filter: None,
            }],
            stable: true,
            estimated_rows: 0,
        }
    }
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v {
        Some(Value::Int(i)) => Some(*i),
        Some(Value::Text(t)) => t.trim().parse().ok(),
        Some(Value::Float(f)) => Some(*f as i64),
        _ => None,
    }
}

/// Splits `layout`'s table into ranges of about `rows_per_range` rows.
pub(crate) async fn plan_ranges(
    source: &Db,
    layout: &TableLayout,
    rows_per_range: u64,
) -> Result<RangePlan> {
    let table = quote(&layout.name);
    let key = match layout.key[..] {
        [k] if layout.columns()[k].col_type == ColumnType::Int => {
            Some(quote(&layout.columns()[k].name))
        }
        _ => None,
    };
    let estimate = match source.kind() {
        DbKind::Postgres => {
            let lit = layout.name.replace('\'', "''").replace('"', "\"\"");
            let rows = source
                .fetch_all(
                    format!("SELECT CAST(reltuples AS BIGINT), CAST(relpages AS BIGINT) FROM pg_class WHERE oid = to_regclass('\"{lit}\"')"),
                    vec![ColumnType::Int, ColumnType::Int],
                )
                .await?;
            rows.first().map(|r| (int(r.first()), int(r.get(1))))
        }
        DbKind::Sqlite => None,
    };
    let (rows, pages) = match estimate {
        Some((Some(rows), pages)) if rows >= 0 => (rows as u64, pages.unwrap_or(0)),
        _ => {
            let r = source
                .fetch_all(
                    format!("SELECT CAST(COUNT(*) AS BIGINT) FROM {table}"),
                    vec![ColumnType::Int],
                )
                .await?;
            (
                int(r.first().and_then(|r| r.first())).unwrap_or(0).max(0) as u64,
                0,
            )
        }
    };
    let n = rows.div_ceil(rows_per_range.max(1)).clamp(1, 10_000);
    if n == 1 {
        return Ok(RangePlan {
            estimated_rows: rows,
            ..RangePlan::whole()
        });
    }
    let (column, bounds, stable): (String, Vec<String>, bool) = if let Some(k) = key {
        let Some(bounds) = int_bounds(source, &k, &table, n).await? else {
            return Ok(RangePlan::whole());
        };
        (format!("t0.{k}"), bounds, true)
    } else {
        match source.kind() {
            DbKind::Postgres => {
                let per = (pages as u64).div_ceil(n).max(1);
                let bounds = (1..n)
                    .map(|i| i * per)
                    .filter(|p| *p < pages.max(1) as u64)
                    .map(|p| format!("'({p},0)'::tid"))
                    .collect();
                ("t0.ctid".to_string(), bounds, false)
            }
            DbKind::Sqlite => {
                // A WITHOUT ROWID table has no rowid: it is read whole.
                let Ok(Some(bounds)) = int_bounds(source, "rowid", &table, n).await else {
                    return Ok(RangePlan::whole());
                };
                ("t0.rowid".to_string(), bounds, false)
            }
        }
    };
    Ok(RangePlan {
        estimated_rows: rows,
        ..split(&column, &bounds, stable)
    })
}

/// `n - 1` equal-width bounds between the smallest and largest value of an integer column;
/// None for an empty table.
async fn int_bounds(source: &Db, column: &str, table: &str, n: u64) -> Result<Option<Vec<String>>> {
    let r = source
        .fetch_all(
            format!(
                "SELECT CAST(MIN({column}) AS BIGINT), CAST(MAX({column}) AS BIGINT) FROM {table}"
            ),
            vec![ColumnType::Int, ColumnType::Int],
        )
        .await?;
    let row = r.first();
    let (Some(lo), Some(hi)) = (
        int(row.and_then(|r| r.first())),
        int(row.and_then(|r| r.get(1))),
    ) else {
        return Ok(None);
    };
    let step = ((hi as i128 - lo as i128 + 1) / n as i128).max(1);
    Ok(Some(
        (1..n as i128)
            .map(|i| lo as i128 + i * step)
            .filter(|b| *b <= hi as i128)
            .map(|b| b.to_string())
            .collect(),
    ))
}

/// Ranges below the first bound, between bounds, and from the last bound on: together they
/// cover every value, whatever the snapshot holds.
fn split(column: &str, bounds: &[String], stable: bool) -> RangePlan {
    if bounds.is_empty() {
        return RangePlan::whole();
    }
    let mut ranges = Vec::with_capacity(bounds.len() + 1);
    for i in 0..=bounds.len() {
        let lower = i
            .checked_sub(1)
            .map(|j| format!("{column} >= {}", bounds[j]));
        let upper = bounds.get(i).map(|b| format!("{column} < {b}"));
        let filter = match (lower, upper) {
            (Some(l), Some(u)) => format!("{l} AND {u}"),
            (Some(l), None) => l,
            (None, Some(u)) => u,
            (None, None) => unreachable!("bounds is not empty"),
        };
        ranges.push(KeyRange {
            index: i,
            filter: Some(filter),
        });
    }
    RangePlan {
        ranges,
        stable,
        estimated_rows: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_everything_once() {
        let plan = split("t0.\"id\"", &["10".into(), "20".into()], true);
        let filters: Vec<_> = plan
            .ranges
            .iter()
            .map(|r| r.filter.clone().unwrap())
            .collect();
        assert_eq!(
            filters,
            [
                "t0.\"id\" < 10",
                "t0.\"id\" >= 10 AND t0.\"id\" < 20",
                "t0.\"id\" >= 20"
            ]
        );
        assert_eq!(split("x", &[], false), RangePlan::whole());
    }
}
