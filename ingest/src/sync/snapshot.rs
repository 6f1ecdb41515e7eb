//! Where the bulk copy and the change stream meet: the transactions a copied snapshot already
//! saw. The replication slot is created first; every transaction that commits after its
//! consistent point is decoded. The bulk copy's snapshot is taken after that, so each decoded
//! transaction is either one the snapshot saw (its rows are in the copy: skipped) or one it
//! did not (applied). Deciding by the snapshot's own visibility rule (`pg_current_snapshot()`,
//! taken in the exported snapshot's transaction) rather than by LSN is exact: a transaction
//! whose commit record precedes the snapshot in the WAL but which was still running when the
//! snapshot was taken is not in the copy, and is applied.

use std::fmt;
use std::str::FromStr;

/// A snapshot as `pg_current_snapshot()` writes it: `xmin:xmax:xip,...` (64-bit transaction
/// ids, epoch included).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct XidSnapshot {
    xmin: u64,
    xmax: u64,
    xip: Vec<u64>,
}

impl XidSnapshot {
    /// Whether the transaction `xid` (32 bits, as the change stream names it) had committed
    /// when the snapshot was taken, so that its changes are in what was read in it.
    ///
    /// A 32-bit id is widened next to `xmax`: the transactions the stream carries began
    /// within 2^31 transactions of the snapshot (PostgreSQL's own wraparound horizon).
    pub fn saw(&self, xid: u32) -> bool {
        let diff = xid.wrapping_sub(self.xmax as u32) as i32;
        let full = (self.xmax as i64 + i64::from(diff)) as u64;
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

impl FromStr for XidSnapshot {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("not a snapshot (xmin:xmax:xip,...): {s:?}");
        let mut parts = s.trim().splitn(3, ':');
        let id = |p: Option<&str>| p.and_then(|t| t.parse::<u64>().ok()).ok_or_else(bad);
        let xmin = id(parts.next())?;
        let xmax = id(parts.next())?;
        let xip = match parts.next() {
            Some("") | None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|t| t.parse::<u64>().map_err(|_| bad()))
                .collect::<Result<_, _>>()?,
        };
        if xmin > xmax {
            return Err(bad());
        }
        Ok(XidSnapshot { xmin, xmax, xip })
    }
}

impl fmt::Display for XidSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let xip: Vec<String> = self.xip.iter().map(u64::to_string).collect();
        write!(f, "{}:{}:{}", self.xmin, self.xmax, xip.join(","))
    }
}

impl TryFrom<String> for XidSnapshot {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<XidSnapshot> for String {
    fn from(s: XidSnapshot) -> String {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_saw_what_committed_before_it() {
        let s: XidSnapshot = "100:110:103,107".parse().unwrap();
        assert_eq!(s.to_string(), "100:110:103,107");
        for (xid, saw) in [
            (90, true),   // before xmin
            (100, true),  // between, not running
            (103, false), // running when taken
            (109, true),
            (110, false), // xmax and after: not yet started
            (5000, false),
        ] {
            assert_eq!(s.saw(xid), saw, "{xid}");
        }
        // Across an epoch: xmax 2^32 + 5; xid 3 is 2^32 + 3 (running? no: below xmax, seen),
        // xid 0xFFFF_FFF0 is the previous epoch's (seen), xid 9 is after (not seen).
        let wrapped: XidSnapshot = format!("{}:{}:", (1u64 << 32) - 20, (1u64 << 32) + 5)
            .parse()
            .unwrap();
        assert!(wrapped.saw(3));
        assert!(wrapped.saw(0xFFFF_FFF0));
        assert!(!wrapped.saw(9));
        assert!("10:5:".parse::<XidSnapshot>().is_err());
        assert!("x".parse::<XidSnapshot>().is_err());
    }
}
