//! Checks a row bound for the operational database against the target table's declared columns,
//! so that a value the database would reject (NULL in a NOT NULL column, an integer too large
//! for the column) or silently change (text longer than `varchar(n)`, digits a `numeric(p,s)`
//! would round away) sends the row to quarantine with its reason, instead of failing the whole
//! range's COPY or storing something other than the source held.

use crate::db::{Column, DbKind};
use crate::value::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    None,
    /// At most this many characters.
    Chars(usize),
    /// At most `precision` significant digits, `scale` of them after the point.
    Numeric {
        precision: u32,
        scale: u32,
    },
    /// An integer between these bounds.
    Int(i64, i64),
}

/// The checks for one operational table, column by column.
#[derive(Debug, Clone)]
pub(crate) struct TargetChecks {
    columns: Vec<(bool, Limit)>,
}

/// The numbers inside the parentheses of a declared type: `numeric(5, 2)` → [5, 2].
fn type_args(decl: &str) -> Vec<u32> {
    decl.split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(args, _)| {
            args.split(',')
                .filter_map(|a| a.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

impl TargetChecks {
    /// Checks for `columns` as `engine` declares them.
    pub fn new(columns: &[Column], engine: DbKind) -> Self {
        let columns = columns
            .iter()
            .map(|c| {
                let decl = c.decl_type.to_ascii_lowercase();
                let base = decl.split('(').next().unwrap_or("").trim();
                let args = type_args(&decl);
                let limit = match (base, args.as_slice(), engine) {
                    (
                        "character varying" | "varchar" | "character" | "char" | "nvarchar"
                        | "nchar",
                        [n],
                        _,
                    ) => Limit::Chars(*n as usize),
                    ("numeric" | "decimal", [p], _) => Limit::Numeric {
                        precision: *p,
                        scale: 0,
                    },
                    ("numeric" | "decimal", [p, s], _) => Limit::Numeric {
                        precision: *p,
                        scale: *s,
                    },
                    ("smallint", _, DbKind::Postgres) => {
                        Limit::Int(i16::MIN.into(), i16::MAX.into())
                    }
                    ("integer", _, DbKind::Postgres) => {
                        Limit::Int(i32::MIN.into(), i32::MAX.into())
                    }
                    _ => Limit::None,
                };
                (!c.nullable, limit)
            })
            .collect();
        TargetChecks { columns }
    }

    /// The first column whose value the target would reject or change, and why.
    pub fn check(&self, values: &[Value]) -> Option<(usize, &'static str)> {
        for (i, (v, (not_null, limit))) in values.iter().zip(&self.columns).enumerate() {
            if v.is_null() {
                if *not_null {
                    return Some((i, "NULL in a NOT NULL column"));
                }
                continue;
            }
            let problem = match (limit, v) {
                (Limit::Chars(n), Value::Text(t)) if t.chars().count() > *n => {
                    Some("would be truncated: longer than the column allows")
                }
                (Limit::Int(lo, hi), Value::Int(x)) if x < lo || x > hi => {
                    Some("integer out of range for the column")
                }
                (Limit::Numeric { precision, scale }, v) => numeric_problem(v, *precision, *scale),
                _ => None,
            };
            if let Some(p) = problem {
                return Some((i, p));
            }
        }
        None
    }
}

fn numeric_problem(v: &Value, precision: u32, scale: u32) -> Option<&'static str> {
    // Texts (numerics read from PostgreSQL) are checked in place: this runs for every value.
    let formatted;
    let text = match v {
        Value::Text(t) => t.trim(),
        Value::Int(i) => {
            formatted = i.to_string();
            formatted.as_str()
        }
        Value::Float(f) if f.is_finite() => {
            formatted = format!("{f}");
            formatted.as_str()
        }
        _ => return None,
    };
    let digits = text.trim_start_matches(['-', '+']);
    if digits.contains(['e', 'E']) || !digits.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None; // not a plain decimal: the database decides
    }
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let int_digits = int.trim_start_matches('0').len() as u32;
    let frac_digits = frac.trim_end_matches('0').len() as u32;
    if int_digits > precision.saturating_sub(scale) {
        Some("numeric value too large for the column")
    } else if frac_digits > scale {
        Some("would be rounded: more decimal places than the column keeps")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::ColumnType;

    fn col(decl: &str, nullable: bool) -> Column {
        Column {
            name: "c".into(),
            decl_type: decl.into(),
            col_type: ColumnType::Other,
            nullable,
        }
    }

    #[test]
    fn names_what_the_target_would_reject_or_change() {
        let checks = TargetChecks::new(
            &[
                col("character varying(5)", true),
                col("numeric(5,2)", true),
                col("integer", false),
            ],
            DbKind::Postgres,
        );
        let row = |a: Value, b: Value, c: Value| checks.check(&[a, b, c]);
        let ok = row(
            Value::Text("héllo".into()),
            Value::Text("123.40".into()),
            Value::Int(7),
        );
        assert_eq!(ok, None);
        assert_eq!(
            row(Value::Text("hello!".into()), Value::Null, Value::Int(1)).map(|p| p.0),
            Some(0)
        );
        assert_eq!(
            row(Value::Null, Value::Text("1234.5".into()), Value::Int(1)),
            Some((1, "numeric value too large for the column"))
        );
        assert_eq!(
            row(Value::Null, Value::Float(1.005), Value::Int(1)),
            Some((
                1,
                "would be rounded: more decimal places than the column keeps"
            ))
        );
        assert_eq!(
            row(Value::Null, Value::Null, Value::Null),
            Some((2, "NULL in a NOT NULL column"))
        );
        assert_eq!(
            row(Value::Null, Value::Null, Value::Int(1 << 40)),
            Some((2, "integer out of range for the column"))
        );
        // SQLite's INTEGER is 64-bit.
        let sqlite = TargetChecks::new(&[col("INTEGER", true)], DbKind::Sqlite);
        assert_eq!(sqlite.check(&[Value::Int(1 << 40)]), None);
    }
}
