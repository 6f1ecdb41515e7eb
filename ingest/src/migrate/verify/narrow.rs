//! Narrowing a place's mismatch down to the records that differ, in bounded memory.
//!
//! As reladiff and `pgcopydb compare` do, the table is split into segments that are
//! checksummed on both sides, and only the segments that differ are looked at closer. Here a
//! record's segment is a hash of its key (not a key range): every source Strata reads (a CSV
//! file has no order) is split alike, a table without a key too, and each level is one pass
//! over the table instead of a query per segment. The first pass sums each side's records into
//! [`SEGMENTS`] segments (a few MiB); the next passes hold the records of the differing
//! segments by key, at most about [`RECORDS_AT_ONCE`] at a time (a segment larger than that
//! alone), and compare them column by column. A few differences cost two passes; a table that
//! differs everywhere costs one pass per [`RECORDS_AT_ONCE`] records, never more memory.

use super::quarantined::Quarantined;
use super::{operational_select, read_types, Difference, ReadTable, LISTED_DIFFERENCES};
use crate::error::Result;
use crate::layout::TableLayout;
use crate::migrate::canonical::{columns_of_archive, columns_of_values, Sum};
use crate::migrate::naming::row_key;
use crate::migrate::sinks::{LongBlobs, RangeSink, RowChecks};
use crate::migrate::Migration;
use crate::ranges::KeyRange;
use crate::value::{ColumnType, Value};
use chrono::NaiveDate;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use strata_cutoff_policies::Tier;

/// Segments of the first narrowing pass.
const SEGMENTS: usize = 1 << 16;

/// Records held by key at once while narrowing (per side).
pub(super) const RECORDS_AT_ONCE: u64 = 1 << 20;

/// The key a record is narrowed by: its primary key as the archive names records, or, for a
/// table without one, a digest of its columns (then a changed row is one missing and one extra).
fn record_key(layout: &TableLayout, key: Option<String>, columns: &[u64]) -> String {
    key.filter(|_| !layout.key.is_empty()).unwrap_or_else(|| {
        let bytes: Vec<u8> = columns.iter().flat_map(|c| c.to_le_bytes()).collect();
        hex::encode(&Sha256::digest(&bytes)[..8])
    })
}

fn segment_of(key: &str) -> usize {
    let d = Sha256::digest(key.as_bytes());
    usize::from(u16::from_le_bytes([d[0], d[1]])) % SEGMENTS
}

/// A place's records by key: per column, 8 bytes of its value's digest. A key seen again
/// (identical rows of a keyless table, a key held twice) is kept as `key#2`, `key#3`...
#[derive(Default)]
struct Records {
    by_key: BTreeMap<String, Vec<u64>>,
    seen: HashMap<String, u32>,
}

impl Records {
    fn insert(&mut self, key: String, columns: Vec<u64>) {
        let n = self.seen.entry(key.clone()).or_insert(0);
        *n += 1;
        let key = if *n == 1 { key } else { format!("{key}#{n}") };
        self.by_key.insert(key, columns);
    }
}

/// What a narrowing pass keeps of each record it reads.
enum Collect<'a> {
    /// Per segment, the records' count and the sum of their digests.
    Segments(Vec<Sum>),
    /// The records of the wanted segments, by key.
    Records {
        wanted: &'a [bool],
        records: Records,
    },
}

impl Collect<'_> {
    fn segments() -> Self {
        Collect::Segments(vec![Sum::default(); SEGMENTS])
    }

    fn add(&mut self, layout: &TableLayout, key: Option<String>, columns: Vec<u64>) {
        let key = record_key(layout, key, &columns);
        let segment = segment_of(&key);
        match self {
            Collect::Segments(sums) => {
                let mut d = Sha256::new();
                d.update(key.as_bytes());
                d.update([0]);
                for c in &columns {
                    d.update(c.to_le_bytes());
                }
                sums[segment].add(&d.finalize().into());
            }
            Collect::Records { wanted, records } => {
                if wanted[segment] {
                    records.insert(key, columns);
                }
            }
        }
    }
}

/// The sink of a narrowing pass over the source: the records it says `tier` must hold.
struct Keyed<'c, 'w> {
    checks: RowChecks<'c>,
    tier: Tier,
    collect: &'c mut Collect<'w>,
    layout: &'c TableLayout,
    quarantined: Option<&'c Quarantined>,
}

impl Keyed<'_, '_> {
    fn add(&mut self, values: &[Value]) {
        let layout = self.layout;
        let key = (!layout.key.is_empty()).then(|| row_key(layout, values, (0, 0)));
        // Keys the run quarantined after routing are accounted for apart
        // ([`Quarantined::reconcile`]).
        if let (Some(q), Some(k)) = (self.quarantined, &key) {
            if self.tier == Tier::Operational && q.holds(k) {
                return;
            }
        }
        self.collect
            .add(layout, key, columns_of_values(layout, values));
    }
}

impl RangeSink for Keyed<'_, '_> {
    fn problem(
        &mut self,
        layout: &TableLayout,
        values: &[Value],
        tier: Tier,
    ) -> Option<(usize, &'static str)> {
        self.checks.check(layout, values, tier)
    }

    async fn operational(&mut self, values: Vec<Value>) -> Result<Option<(Vec<Value>, String)>> {
        if self.tier == Tier::Operational {
            self.add(&values);
        }
        Ok(None)
    }

    async fn archive(
        &mut self,
        _layout: &TableLayout,
        _patient: Option<&str>,
        _date: Option<NaiveDate>,
        values: Vec<Value>,
        _long: &LongBlobs<'_>,
    ) -> Result<()> {
        if self.tier == Tier::Archive {
            self.add(&values);
        }
        Ok(())
    }
}

/// Missing, extra and changed records (with the columns that differ) between what `place`
/// must hold and holds: at most `room` listed, all counted.
fn differences(
    layout: &TableLayout,
    place: &str,
    expected: &Records,
    found: &Records,
    room: usize,
) -> (Vec<Difference>, u64) {
    let mut listed = Vec::new();
    let mut total = 0u64;
    let mut note = |key: &String, kind: &str, columns: Vec<String>| {
        total += 1;
        if listed.len() < room {
            listed.push(Difference {
                place: place.to_string(),
                key: key.clone(),
                kind: kind.to_string(),
                columns,
            });
        }
    };
    for (key, want) in &expected.by_key {
        match found.by_key.get(key) {
            None => note(key, "missing", Vec::new()),
            Some(got) if got != want => {
                let columns = want
                    .iter()
                    .zip(got)
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(|(i, _)| layout.target_names[i].clone())
                    .collect();
                note(key, "changed", columns);
            }
            Some(_) => {}
        }
    }
    for key in found.by_key.keys() {
        if !expected.by_key.contains_key(key) {
            note(key, "extra", Vec::new());
        }
    }
    (listed, total)
}

/// The differing segments in batches of about [`RECORDS_AT_ONCE`] records (the larger side's).
fn batches(expected: &[Sum], found: &[Sum]) -> Vec<Vec<bool>> {
    let mut batches = Vec::new();
    let mut batch = vec![false; SEGMENTS];
    let mut held = 0u64;
    for i in (0..SEGMENTS).filter(|&i| expected[i] != found[i]) {
        let size = expected[i].rows.max(found[i].rows);
        if held > 0 && held + size > RECORDS_AT_ONCE {
            batches.push(std::mem::replace(&mut batch, vec![false; SEGMENTS]));
            held = 0;
        }
        batch[i] = true;
        held += size;
    }
    if held > 0 {
        batches.push(batch);
    }
    batches
}

impl Migration {
    /// Narrows a mismatch of `tier` in a table down to its records: the differences listed (at
    /// most [`LISTED_DIFFERENCES`]) and how many more there are.
    pub(super) async fn narrow(
        &self,
        t: &ReadTable<'_>,
        tier: Tier,
        bad_blobs: &HashSet<String>,
    ) -> Result<(Vec<Difference>, u64)> {
        let (mut expected, mut found) = (Collect::segments(), Collect::segments());
        futures::try_join!(
            self.collect_expected(t, tier, &mut expected),
            collect_found(t, tier, bad_blobs, &mut found),
        )?;
        let (Collect::Segments(expected), Collect::Segments(found)) = (expected, found) else {
            unreachable!("segment passes")
        };
        let place = match tier {
            Tier::Operational => "operational",
            _ => "archive",
        };
        let (mut listed, mut total) = (Vec::new(), 0u64);
        for wanted in batches(&expected, &found) {
            let records = |wanted| Collect::Records {
                wanted,
                records: Records::default(),
            };
            let (mut expected, mut found) = (records(&wanted), records(&wanted));
            futures::try_join!(
                self.collect_expected(t, tier, &mut expected),
                collect_found(t, tier, bad_blobs, &mut found),
            )?;
            let (Collect::Records { records: e, .. }, Collect::Records { records: f, .. }) =
                (expected, found)
            else {
                unreachable!("record passes")
            };
            let room = LISTED_DIFFERENCES - listed.len();
            let (more, n) = differences(t.layout, place, &e, &f, room);
            listed.extend(more);
            total += n;
        }
        let more = total - listed.len() as u64;
        Ok((listed, more))
    }

    /// The source routed again: the records it says `tier` must hold.
    async fn collect_expected(
        &self,
        t: &ReadTable<'_>,
        tier: Tier,
        collect: &mut Collect<'_>,
    ) -> Result<()> {
        let layout = t.layout;
        let sink = Keyed {
            checks: RowChecks::new(layout, t.checks, !self.source_enforces_key(layout)),
            tier,
            collect,
            layout,
            quarantined: t.quarantined,
        };
        let whole = KeyRange {
            index: 0,
            filter: None,
        };
        self.route_range(layout, &whole, t.facts, t.snapshot, sink)
            .await
            .map(|_| ())
    }
}

/// The place read again: the records it holds.
async fn collect_found(
    t: &ReadTable<'_>,
    tier: Tier,
    bad_blobs: &HashSet<String>,
    collect: &mut Collect<'_>,
) -> Result<()> {
    let layout = t.layout;
    match tier {
        Tier::Operational => {
            let Some(target) = t.target else {
                return Ok(());
            };
            let mut rows = target.fetch(operational_select(target, layout), read_types(layout));
            let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
            while let Some(row) = rows.next().await {
                let mut values = row?;
                let _ = crate::migrate::route::coerce_row(&mut values, &types);
                let key = (!layout.key.is_empty()).then(|| row_key(layout, &values, (0, 0)));
                if let (Some(q), Some(k)) = (t.quarantined, &key) {
                    if q.holds(k) {
                        continue; // reconciled apart
                    }
                }
                collect.add(layout, key, columns_of_values(layout, &values));
            }
        }
        _ => {
            let successors = t
                .archive
                .successors(&layout.name)
                .await
                .map_err(|e| crate::error::IngestError::Run(format!("archive: {e}")))?;
            for (rank, blob_columns, f) in t.archive.ranked_files(&layout.name) {
                let Ok(batches) = t.archive.read_file(f).await else {
                    continue; // named as unreadable already
                };
                for b in &batches {
                    let batch = strata_archive::ArchivedBatch::new(b, blob_columns);
                    for row in 0..batch.num_rows() {
                        let key = batch.key(row).map(str::to_string);
                        let fate = successors.fate(rank, key.as_deref().unwrap_or_default());
                        if fate == strata_archive::Fate::Current {
                            let columns = columns_of_archive(layout, &batch, row, bad_blobs);
                            collect.add(layout, key, columns);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(rows: u64) -> Sum {
        let mut s = Sum::default();
        for i in 0..rows {
            s.add(&[i as u8; 32]);
        }
        s
    }

    /// Differing segments are batched by the larger side's records, a segment larger than a
    /// batch alone; equal segments are never read again.
    #[test]
    fn differing_segments_are_read_in_bounded_batches() {
        let mut expected = vec![Sum::default(); SEGMENTS];
        let mut found = expected.clone();
        let half = RECORDS_AT_ONCE / 2 + 1;
        expected[3] = sum(1);
        expected[7] = sum(2);
        found[7] = sum(1);
        found[9] = Sum {
            rows: half,
            sum: [1; 32],
        };
        expected[11] = Sum {
            rows: half,
            sum: [2; 32],
        };
        expected[20] = Sum {
            rows: RECORDS_AT_ONCE * 3,
            sum: [3; 32],
        };
        found[20] = expected[20];
        expected[30] = Sum {
            rows: RECORDS_AT_ONCE * 2,
            sum: [4; 32],
        };
        let b = batches(&expected, &found);
        let picked: Vec<Vec<usize>> = b
            .iter()
            .map(|w| (0..SEGMENTS).filter(|&i| w[i]).collect())
            .collect();
        assert_eq!(picked, vec![vec![3, 7, 9], vec![11], vec![30]]);
    }
}
