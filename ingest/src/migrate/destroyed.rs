//! What purged rows leave behind: a count, a key range and an order-independent checksum.

use super::naming::{row_digest, row_key};
use crate::layout::TableLayout;
use crate::value::Value;
use sha2::{Digest, Sha256};

/// What a table's purged rows leave behind: count, key range, the sum of the rows' key digests
/// and the sum of their canonical value digests (order-independent checksums in which
/// identical rows count each).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct Destroyed {
    pub(super) rows: u64,
    pub(super) key_min: Option<String>,
    pub(super) key_max: Option<String>,
    pub(super) checksum: [u8; 32],
    /// The sum of the rows' canonical digests ([`super::canonical`]).
    #[serde(default)]
    pub(super) values: [u8; 32],
    /// Whether `values` covers every row: false for a range checkpointed by a version that
    /// did not sum values (a run resumed across versions).
    #[serde(default)]
    pub(super) values_complete: bool,
}

impl Default for Destroyed {
    fn default() -> Self {
        Destroyed {
            rows: 0,
            key_min: None,
            key_max: None,
            checksum: [0; 32],
            values: [0; 32],
            values_complete: true,
        }
    }
}

impl Destroyed {
    /// Adds another range's destroyed rows of the same table.
    pub(super) fn merge(&mut self, other: Destroyed) {
        self.rows += other.rows;
        if let Some(key) = other.key_min {
            if self.key_min.as_deref().is_none_or(|m| key.as_str() < m) {
                self.key_min = Some(key);
            }
        }
        if let Some(key) = other.key_max {
            if self.key_max.as_deref().is_none_or(|m| key.as_str() > m) {
                self.key_max = Some(key);
            }
        }
        add_256(&mut self.checksum, &other.checksum);
        add_256(&mut self.values, &other.values);
        self.values_complete &= other.values_complete;
    }

    pub(super) fn add(&mut self, layout: &TableLayout, values: &[Value], ordinal: (usize, u64)) {
        self.rows += 1;
        add_256(
            &mut self.values,
            &super::canonical::row_of_values(layout, values),
        );
        let digest: [u8; 32] = if layout.key.is_empty() {
            row_digest(values)
        } else {
            let key = row_key(layout, values, ordinal);
            if self.key_min.as_deref().is_none_or(|m| key.as_str() < m) {
                self.key_min = Some(key.clone());
            }
            if self.key_max.as_deref().is_none_or(|m| key.as_str() > m) {
                self.key_max = Some(key.clone());
            }
            Sha256::digest(key.as_bytes()).into()
        };
        add_256(&mut self.checksum, &digest);
    }

    /// The checksum as recorded: `sum256:` and the hex of the sum (a bare hex checksum is the
    /// XOR that earlier versions recorded, in which two identical rows cancel out).
    pub(super) fn checksum_text(&self) -> String {
        format!("sum256:{}", hex::encode(self.checksum))
    }

    /// The value checksum as recorded (`sum256:` and hex), when it covers every row.
    pub(super) fn value_checksum_text(&self) -> Option<String> {
        self.values_complete
            .then(|| format!("sum256:{}", hex::encode(self.values)))
    }
}

/// Adds `b` to `a`, both 256-bit big-endian numbers, modulo 2^256: the destruction checksum is
/// the sum of the rows' digests, which is order-independent (ranges finish in any order) and,
/// unlike an XOR, counts two identical rows twice.
pub(super) fn add_256(a: &mut [u8; 32], b: &[u8; 32]) {
    let mut carry = 0u16;
    for i in (0..32).rev() {
        let sum = a[i] as u16 + b[i] as u16 + carry;
        a[i] = sum as u8;
        carry = sum >> 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_rows_count_twice_in_the_destruction_checksum() {
        let row = vec![Value::Int(7), Value::Text("gauze".into())];
        let (mut once, mut twice) = (Destroyed::default(), Destroyed::default());
        let digest = row_digest(&row);
        add_256(&mut once.checksum, &digest);
        add_256(&mut twice.checksum, &digest);
        add_256(&mut twice.checksum, &digest);
        assert_ne!(twice.checksum, [0; 32], "an XOR would cancel out");
        assert_ne!(twice.checksum, once.checksum);
        // Order-independent, and ranges merge into the same sum.
        let other = Sha256::digest(b"id=9").into();
        let mut a = Destroyed::default();
        add_256(&mut a.checksum, &other);
        a.merge(twice);
        let mut b = Destroyed::default();
        add_256(&mut b.checksum, &digest);
        add_256(&mut b.checksum, &other);
        add_256(&mut b.checksum, &digest);
        assert_eq!(a.checksum, b.checksum);
        assert!(a.checksum_text().starts_with("sum256:"));
        // Carries cross bytes: 0x..ff + 1 = 0x..100.
        let mut x = [0u8; 32];
        x[31] = 0xff;
        let mut one = [0u8; 32];
        one[31] = 1;
        add_256(&mut x, &one);
        assert_eq!((x[30], x[31]), (1, 0));
    }
}
