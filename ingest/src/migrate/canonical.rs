//! A row's canonical digest: the same bytes for the same values whichever side they are read
//! from (the source after mapping, the operational database, an archived Parquet file), so
//! that sums of digests prove two sides hold the same rows. Each value is encoded by what it
//! means, not how it is stored: a type tag, then integers and days as fixed-width numbers,
//! floats by their bits (0.0 and -0.0 alike, every NaN alike), timestamps as microseconds
//! (instants in UTC), decimals by their text (as PostgreSQL prints them, the archive keeps
//! them), texts and bytes with their length. A BLOB column counts by its content's SHA-256.

use super::destroyed::add_256;
use crate::layout::TableLayout;
use crate::value::Value;
use sha2::{Digest, Sha256};
use strata_archive::{ArchivedBatch, Cell};

/// Builds one row's digest, value by value.
pub(super) struct RowDigest(Sha256);

impl RowDigest {
    pub(super) fn new() -> Self {
        RowDigest(Sha256::new())
    }

    fn tagged(&mut self, tag: u8, bytes: &[u8]) {
        self.0.update([tag]);
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn float(&mut self, f: f64) {
        let f = if f == 0.0 {
            0.0
        } else if f.is_nan() {
            f64::NAN
        } else {
            f
        };
        self.tagged(2, &f.to_bits().to_le_bytes());
    }

    /// A value as the source (mapped and coerced) or the operational database gives it.
    pub(super) fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.tagged(0, &[]),
            Value::Int(i) => self.tagged(1, &i.to_le_bytes()),
            Value::Float(f) => self.float(*f),
            Value::Bool(b) => self.tagged(3, &[*b as u8]),
            Value::Text(t) => self.tagged(4, t.as_bytes()),
            Value::Bytes(b) => self.tagged(5, b),
            Value::Date(d) => self.tagged(6, &days(*d).to_le_bytes()),
            Value::Timestamp(t) => self.tagged(7, &t.and_utc().timestamp_micros().to_le_bytes()),
            Value::TimestampTz(t) => self.tagged(8, &t.timestamp_micros().to_le_bytes()),
        }
    }

    /// A value as an archived file gives it.
    pub(super) fn cell(&mut self, c: &Cell<'_>) {
        match c {
            Cell::Null => self.tagged(0, &[]),
            Cell::Int(i) => self.tagged(1, &i.to_le_bytes()),
            Cell::Float(f) => self.float(*f),
            Cell::Bool(b) => self.tagged(3, &[*b as u8]),
            Cell::Text(t) | Cell::DecimalText(t) => self.tagged(4, t.as_bytes()),
            Cell::Decimal { .. } => {
                let text = c.to_text().expect("a decimal has a text");
                self.tagged(4, text.as_bytes())
            }
            Cell::Bytes(b) => self.tagged(5, b),
            Cell::Date(d) => self.tagged(6, &days(*d).to_le_bytes()),
            Cell::Timestamp(t) => self.tagged(7, &t.and_utc().timestamp_micros().to_le_bytes()),
            Cell::TimestampUtc(t) => self.tagged(8, &t.timestamp_micros().to_le_bytes()),
        }
    }

    /// A BLOB column: the SHA-256 (hex) of its content, or NULL.
    pub(super) fn blob(&mut self, sha256: Option<&str>) {
        match sha256 {
            Some(h) => self.tagged(9, h.to_ascii_lowercase().as_bytes()),
            None => self.tagged(0, &[]),
        }
    }

    pub(super) fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

fn days(d: chrono::NaiveDate) -> i32 {
    (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid day")).num_days() as i32
}

/// The digest of a row of `layout` from its values (the source's after mapping, or the
/// operational database's): BLOB columns by their content's hash.
pub(super) fn row_of_values(layout: &TableLayout, values: &[Value]) -> [u8; 32] {
    let mut d = RowDigest::new();
    for (i, v) in values.iter().enumerate().take(layout.columns().len()) {
        if layout.blobs.iter().any(|b| b.column == i) {
            match v {
                Value::Bytes(b) => d.blob(Some(&hex::encode(Sha256::digest(b)))),
                Value::Null => d.blob(None),
                other => d.blob(Some(&hex::encode(Sha256::digest(
                    other.as_key_text().unwrap_or_default().as_bytes(),
                )))),
            }
        } else {
            d.value(v);
        }
    }
    d.finish()
}

/// The digest of row `row` of an archived batch of `layout`'s table: its columns by their
/// archived names, in the layout's order; BLOB columns by the hash their reference records
/// (see [`blob_hashes`] for `unreadable` objects).
pub(super) fn row_of_archive(
    layout: &TableLayout,
    batch: &ArchivedBatch<'_>,
    row: usize,
    unreadable: &std::collections::HashSet<String>,
) -> [u8; 32] {
    let mut d = RowDigest::new();
    let blobs = blob_hashes(batch, row, unreadable);
    for (i, name) in layout.target_names.iter().enumerate() {
        if layout.blobs.iter().any(|b| b.column == i) {
            d.blob(
                blobs
                    .iter()
                    .find(|(c, _)| c == name)
                    .map(|(_, h)| h.as_str()),
            );
        } else {
            d.cell(&batch.value(name, row).unwrap_or(Cell::Null));
        }
    }
    d.finish()
}

/// Per column of a row of `layout`, 8 bytes of its value's digest: what a mismatch is narrowed
/// with (which record, which columns), never the values. From the source or the operational
/// database (`values`), or from an archived batch.
pub(super) fn columns_of_values(layout: &TableLayout, values: &[Value]) -> Vec<u64> {
    (0..layout.columns().len())
        .map(|i| {
            let mut d = RowDigest::new();
            if layout.blobs.iter().any(|b| b.column == i) {
                match &values[i] {
                    Value::Bytes(b) => d.blob(Some(&hex::encode(Sha256::digest(b)))),
                    Value::Null => d.blob(None),
                    other => d.blob(Some(&hex::encode(Sha256::digest(
                        other.as_key_text().unwrap_or_default().as_bytes(),
                    )))),
                }
            } else {
                d.value(&values[i]);
            }
            short(d.finish())
        })
        .collect()
}

/// [`columns_of_values`] for row `row` of an archived batch.
pub(super) fn columns_of_archive(
    layout: &TableLayout,
    batch: &ArchivedBatch<'_>,
    row: usize,
    unreadable: &std::collections::HashSet<String>,
) -> Vec<u64> {
    let blobs = blob_hashes(batch, row, unreadable);
    layout
        .target_names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut d = RowDigest::new();
            if layout.blobs.iter().any(|b| b.column == i) {
                d.blob(
                    blobs
                        .iter()
                        .find(|(c, _)| c == name)
                        .map(|(_, h)| h.as_str()),
                );
            } else {
                d.cell(&batch.value(name, row).unwrap_or(Cell::Null));
            }
            short(d.finish())
        })
        .collect()
}

/// A row's BLOB columns and the hash each counts by: the one its reference records, or, for
/// an object found `unreadable` (missing, or not matching that hash when re-read), a mark that
/// matches no content.
fn blob_hashes<'b>(
    batch: &ArchivedBatch<'b>,
    row: usize,
    unreadable: &std::collections::HashSet<String>,
) -> Vec<(&'b str, String)> {
    batch
        .blobs(row)
        .map(|(column, r)| {
            let hash = if unreadable.contains(&r.object) {
                format!("unreadable:{}", r.object)
            } else {
                r.sha256
            };
            (column, hash)
        })
        .collect()
}

fn short(d: [u8; 32]) -> u64 {
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Rows and the sum (mod 2^256) of their digests: an order-independent checksum in which two
/// identical rows count twice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Sum {
    pub(super) rows: u64,
    pub(super) sum: [u8; 32],
}

impl Sum {
    pub(super) fn add(&mut self, digest: &[u8; 32]) {
        self.rows += 1;
        add_256(&mut self.sum, digest);
    }

    /// Adds another sum's rows.
    pub(super) fn merge(&mut self, other: &Sum) {
        self.rows += other.rows;
        add_256(&mut self.sum, &other.sum);
    }

    /// As reports write it: `sum256:` and the hex of the sum.
    pub(super) fn text(&self) -> String {
        format!("sum256:{}", hex::encode(self.sum))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value digests alike from the source and from the archive; types, NULLs and the
    /// boundaries between values cannot be confused.
    #[test]
    fn values_digest_alike_from_every_side() {
        let day = chrono::NaiveDate::from_ymd_opt(2150, 1, 1).unwrap();
        let pairs: Vec<(Value, Cell)> = vec![
            (Value::Int(7), Cell::Int(7)),
            (Value::Float(-0.0), Cell::Float(0.0)),
            (
                Value::Text("136.00".into()),
                Cell::Decimal {
                    units: 13600,
                    scale: 2,
                },
            ),
            (Value::Text("NaN".into()), Cell::DecimalText("NaN")),
            (Value::Date(day), Cell::Date(day)),
            (Value::Null, Cell::Null),
        ];
        for (v, c) in &pairs {
            let (mut a, mut b) = (RowDigest::new(), RowDigest::new());
            a.value(v);
            b.cell(c);
            assert_eq!(a.finish(), b.finish(), "{v:?} / {c:?}");
        }
        let digest = |values: &[Value]| {
            let mut d = RowDigest::new();
            values.iter().for_each(|v| d.value(v));
            d.finish()
        };
        assert_ne!(
            digest(&[Value::Text("ab".into()), Value::Text("c".into())]),
            digest(&[Value::Text("a".into()), Value::Text("bc".into())])
        );
        assert_ne!(digest(&[Value::Int(1)]), digest(&[Value::Text("1".into())]));
        assert_ne!(
            digest(&[Value::Null]),
            digest(&[Value::Text(String::new())])
        );
        // Identical rows count twice; the order of rows does not count.
        let (x, y) = (digest(&[Value::Int(1)]), digest(&[Value::Int(2)]));
        let (mut s1, mut s2, mut once) = (Sum::default(), Sum::default(), Sum::default());
        for d in [x, y, x] {
            s1.add(&d);
        }
        for d in [x, x, y] {
            s2.add(&d);
        }
        once.add(&x);
        once.add(&y);
        assert_eq!(s1, s2);
        assert_ne!(s1.sum, once.sum);
    }
}
