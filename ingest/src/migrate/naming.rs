//! How a row is named: by its primary key, or by a digest of its values when it has none.

use crate::layout::TableLayout;
use crate::value::Value;
use sha2::{Digest, Sha256};

/// A digest of a row's values: the identity of a row in a table without a primary key.
pub(super) fn row_digest(values: &[Value]) -> [u8; 32] {
    let mut h = Sha256::new();
    for v in values {
        match v {
            Value::Bytes(b) => h.update(b),
            other => h.update(other.as_key_text().unwrap_or_default().as_bytes()),
        }
        h.update([0u8]);
    }
    h.finalize().into()
}

/// How a row is named in messages: its primary key, or its position for a keyless table.
/// A row's name in messages and the quarantine: its primary key, or for a table without one,
/// its position (`row #N of range R`).
pub(super) fn row_key(layout: &TableLayout, values: &[Value], ordinal: (usize, u64)) -> String {
    use std::fmt::Write;
    if layout.key.is_empty() {
        return format!("row #{} of range {}", ordinal.1, ordinal.0);
    }
    // Built in one string: this runs once per archived row.
    let mut key = String::with_capacity(24);
    for (i, &k) in layout.key.iter().enumerate() {
        if i > 0 {
            key.push(',');
        }
        key.push_str(&layout.key_names[i]);
        key.push('=');
        match &values[k] {
            Value::Text(t) => key.push_str(t),
            Value::Int(n) => write!(key, "{n}").expect("writing to a string"),
            v => key.push_str(v.as_key_text().as_deref().unwrap_or("NULL")),
        }
    }
    key
}

/// A record's key in the archive (`strata_archive::KEY_COLUMN`): its primary key, or for a
/// table without one a digest of its values, BLOB columns left out (they are archived apart).
pub(super) fn archive_key(layout: &TableLayout, values: &[Value]) -> String {
    if !layout.key.is_empty() {
        return row_key(layout, values, (0, 0));
    }
    if layout.blobs.is_empty() {
        return hex::encode(row_digest(values));
    }
    let mut values = values.to_vec();
    for b in &layout.blobs {
        values[b.column] = Value::Null;
    }
    hex::encode(row_digest(&values))
}
