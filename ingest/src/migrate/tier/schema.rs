//! What `strata tier` must know of the operational schema before it deletes a row: the foreign
//! keys that point at a table (a row still referenced is kept, whatever the key's `ON DELETE`
//! says: a cascade or a `SET NULL` would change rows the policy keeps, a `RESTRICT` would fail
//! the batch), the order that moves children before their parents, and the `DELETE` triggers
//! and rules whose effects cannot be known.

use crate::db::{quote, Db};
use crate::error::Result;
use crate::value::ColumnType;
use std::collections::{BTreeMap, BTreeSet};

/// A foreign key of the operational schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ForeignKey {
    /// The constraint's name.
    pub name: String,
    /// The referencing table, schema-qualified and quoted.
    pub child_sql: String,
    /// The referencing table's name (for reports and ordering).
    pub child: String,
    /// The referenced table's name (in the current schema).
    pub parent: String,
    /// The referencing columns, quoted, in the key's order.
    pub child_columns: Vec<String>,
    /// The referenced columns, quoted, in the same order.
    pub parent_columns: Vec<String>,
}

impl ForeignKey {
    /// The condition that keeps a row of the parent (alias `p`) referenced by a row of the
    /// child (alias `c`), other than itself.
    pub fn join_condition(&self) -> String {
        let mut on: Vec<String> = self
            .child_columns
            .iter()
            .zip(&self.parent_columns)
            .map(|(c, p)| format!("c.{c} = p.{p}"))
            .collect();
        if self.child == self.parent {
            on.push("c.ctid <> p.ctid".into());
        }
        on.join(" AND ")
    }
}

/// Every foreign key whose referenced table is in the current schema.
pub(super) async fn foreign_keys(db: &Db) -> Result<Vec<ForeignKey>> {
    let columns = |key: &str, rel: &str| {
        format!(
            "(SELECT string_agg(quote_ident(a.attname), chr(31) ORDER BY k.n) FROM unnest(con.{key}) WITH ORDINALITY AS k(attnum, n) \
             JOIN pg_attribute a ON a.attrelid = con.{rel} AND a.attnum = k.attnum)"
        )
    };
    let sql = format!(
        "SELECT con.conname::text, quote_ident(cn.nspname) || '.' || quote_ident(child.relname), child.relname::text, parent.relname::text, {}, {} \
         FROM pg_constraint con JOIN pg_class child ON child.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = child.relnamespace \
         JOIN pg_class parent ON parent.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = parent.relnamespace \
         WHERE con.contype = 'f' AND pn.nspname = current_schema() ORDER BY 1",
        columns("conkey", "conrelid"),
        columns("confkey", "confrelid")
    );
    let rows = db.fetch_all(sql, vec![ColumnType::Text; 6]).await?;
    let text = |v: &crate::value::Value| v.as_key_text().unwrap_or_default();
    Ok(rows
        .iter()
        .map(|r| ForeignKey {
            name: text(&r[0]),
            child_sql: text(&r[1]),
            child: text(&r[2]),
            parent: text(&r[3]),
            child_columns: text(&r[4]).split('\u{1f}').map(str::to_string).collect(),
            parent_columns: text(&r[5]).split('\u{1f}').map(str::to_string).collect(),
        })
        .collect())
}

/// The row-level `DELETE` triggers (enabled, not a constraint's own) and the `DELETE` rules
/// of `relation`, by name (a rule as `rule NAME`).
pub(super) async fn delete_triggers(db: &Db, relation: &str) -> Result<Vec<String>> {
    let oid = format!(
        "(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relname = '{}')",
        relation.replace('\'', "''")
    );
    let sql = format!(
        "SELECT t.tgname::text FROM pg_trigger t WHERE t.tgrelid = {oid} AND NOT t.tgisinternal AND (t.tgtype & 8) <> 0 AND t.tgenabled <> 'D' \
         UNION ALL SELECT 'rule ' || r.rulename::text FROM pg_rewrite r WHERE r.ev_class = {oid} AND r.ev_type = '4' ORDER BY 1"
    );
    let rows = db.fetch_all(sql, vec![ColumnType::Text]).await?;
    Ok(rows.iter().filter_map(|r| r[0].as_key_text()).collect())
}

/// Whether `relation` is a partitioned table: its rows' locations repeat across partitions,
/// so tier does not move them (yet).
pub(super) async fn is_partitioned(db: &Db, relation: &str) -> Result<bool> {
    let sql = format!(
        "SELECT c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relname = '{}'",
        relation.replace('\'', "''")
    );
    let rows = db.fetch_all(sql, vec![ColumnType::Text]).await?;
    Ok(rows
        .first()
        .and_then(|r| r[0].as_key_text())
        .is_some_and(|k| k == "p"))
}

/// `relations` ordered so that a table referencing another comes first (its rows leave before
/// the rows they point at); tables in a cycle keep their name order, after the others.
pub(super) fn children_first(relations: &[String], keys: &[ForeignKey]) -> Vec<String> {
    let listed: BTreeSet<&str> = relations.iter().map(String::as_str).collect();
    // parent → its children among the listed tables (self-references left out).
    let mut waiting_for: BTreeMap<&str, BTreeSet<&str>> = relations
        .iter()
        .map(|r| (r.as_str(), BTreeSet::new()))
        .collect();
    for k in keys {
        if k.child != k.parent
            && listed.contains(k.child.as_str())
            && listed.contains(k.parent.as_str())
        {
            waiting_for
                .get_mut(k.parent.as_str())
                .expect("listed")
                .insert(k.child.as_str());
        }
    }
    let mut order: Vec<String> = Vec::new();
    loop {
        let ready: Vec<&str> = waiting_for
            .iter()
            .filter(|(_, children)| children.is_empty())
            .map(|(t, _)| *t)
            .collect();
        if ready.is_empty() {
            break;
        }
        for t in ready {
            waiting_for.remove(t);
            for children in waiting_for.values_mut() {
                children.remove(t);
            }
            order.push(t.to_string());
        }
    }
    order.extend(waiting_for.keys().map(|t| t.to_string()));
    order
}

/// The rows of `relation` among `ctids` (aliased `p`) that a row of the table `key` points
/// from references.
pub(super) fn referenced_sql(relation: &str, key: &ForeignKey, ctids: &str) -> String {
    format!(
        "SELECT DISTINCT p.ctid::text FROM {} AS p JOIN {} AS c ON {} WHERE p.ctid = ANY({ctids})",
        quote(relation),
        key.child_sql,
        key.join_condition()
    )
}

/// A `tid[]` literal of row locations as PostgreSQL prints them (`(page,item)`); None when
/// one is not such a location (it is then never put in SQL).
pub(super) fn tid_array(ctids: &[&str]) -> Option<String> {
    let valid = |c: &str| {
        c.strip_prefix('(')
            .and_then(|c| c.strip_suffix(')'))
            .and_then(|c| c.split_once(','))
            .is_some_and(|(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().all(|x| x.is_ascii_digit())
                    && b.bytes().all(|x| x.is_ascii_digit())
            })
    };
    if !ctids.iter().all(|c| valid(c)) {
        return None;
    }
    let items: Vec<String> = ctids.iter().map(|c| format!("\"{c}\"")).collect();
    Some(format!("'{{{}}}'::tid[]", items.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(child: &str, parent: &str) -> ForeignKey {
        ForeignKey {
            name: format!("{child}_{parent}_fk"),
            child_sql: format!("public.{child}"),
            child: child.into(),
            parent: parent.into(),
            child_columns: vec!["parent_id".into()],
            parent_columns: vec!["id".into()],
        }
    }

    #[test]
    fn children_leave_before_their_parents() {
        let tables: Vec<String> = ["admissions", "labs", "notes", "patients"]
            .map(String::from)
            .to_vec();
        let keys = [
            key("admissions", "patients"),
            key("labs", "admissions"),
            key("notes", "notes"),
            key("audit", "patients"),
        ];
        let order = children_first(&tables, &keys);
        let at = |t: &str| order.iter().position(|o| o == t).unwrap();
        assert!(at("labs") < at("admissions"));
        assert!(at("admissions") < at("patients"));
        assert_eq!(order.len(), 4);
        // A cycle still lists every table.
        let cycle = children_first(
            &["a".to_string(), "b".to_string()],
            &[key("a", "b"), key("b", "a")],
        );
        assert_eq!(cycle, ["a", "b"]);
    }

    #[test]
    fn only_row_locations_become_sql() {
        assert_eq!(
            tid_array(&["(0,1)", "(12,40)"]).unwrap(),
            "'{\"(0,1)\",\"(12,40)\"}'::tid[]"
        );
        assert!(tid_array(&["(0,1)'); DROP TABLE x; --"]).is_none());
        assert!(tid_array(&["(,1)"]).is_none());
    }

    #[test]
    fn a_self_reference_does_not_keep_the_row_itself() {
        assert_eq!(
            key("notes", "notes").join_condition(),
            "c.parent_id = p.id AND c.ctid <> p.ctid"
        );
    }
}
