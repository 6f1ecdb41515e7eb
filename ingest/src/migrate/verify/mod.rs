//! `strata verify`: proves, per table and tier, that the source's rows are where the last run
//! put them: **source = operational ⊎ archive ⊎ quarantine ⊎ purged**. The source is read and
//! routed again exactly as a plan does (the same route stage, the same checks, the run's
//! policy and `as_of`), and each row's canonical digest ([`super::canonical`]) is summed into
//! the tier it belongs to; the operational tables and the archive's files are read back and
//! summed alike. Equal counts and sums prove that each tier holds exactly its rows, values
//! included; any difference (a changed value, a missing or extra row, a row in the wrong tier,
//! a row in two places) changes a sum. Quarantine is proven by count, destructions by their
//! records' key checksums (the same sum over the rows' key digests).

mod report;

use report::mismatch;
pub use report::{Difference, Holding, TableProof, VerifyReport, LISTED_DIFFERENCES};

use super::canonical::{columns_of_archive, columns_of_values, row_of_archive, row_of_values, Sum};
use super::destroyed::{add_256, Destroyed};
use super::naming::row_key;
use super::sinks::{LongBlobs, RangeSink, RowChecks};
use super::target::{target_columns, QUARANTINE_TABLE};
use super::Migration;
use crate::db::{pg_select_expr, quote, Db, DbKind, ReadAs};
use crate::error::{IngestError, Result};
use crate::layout::TableLayout;
use crate::ranges::KeyRange;
use crate::report::RunReport;
use crate::target_check::TargetChecks;
use crate::value::{ColumnType, Value};
use chrono::NaiveDate;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use strata_cutoff_policies::Tier;

/// What the source says each tier of a table must hold.
#[derive(Default)]
struct Expected {
    operational: Sum,
    archive: Sum,
    destroyed: Destroyed,
}

/// The sink of a verification: the plan's checks, and each row's digest summed into its tier.
struct Verifying<'c> {
    checks: RowChecks<'c>,
    expected: &'c mut Expected,
    layout: &'c TableLayout,
}

impl RangeSink for Verifying<'_> {
    fn problem(
        &mut self,
        layout: &TableLayout,
        values: &[Value],
        tier: Tier,
    ) -> Option<(usize, &'static str)> {
        self.checks.check(layout, values, tier)
    }

    fn purge(&mut self, layout: &TableLayout, values: &[Value], ordinal: (usize, u64)) {
        self.expected.destroyed.add(layout, values, ordinal);
    }

    async fn operational(&mut self, values: Vec<Value>) -> Result<Option<(Vec<Value>, String)>> {
        self.expected
            .operational
            .add(&row_of_values(self.layout, &values));
        Ok(None)
    }

    async fn archive(
        &mut self,
        layout: &TableLayout,
        _patient: Option<&str>,
        _date: Option<NaiveDate>,
        values: Vec<Value>,
        _long: &LongBlobs<'_>,
    ) -> Result<()> {
        self.expected.archive.add(&row_of_values(layout, &values));
        Ok(())
    }
}

/// A place's records by key: per column, 8 bytes of its value's digest. A key seen again
/// (identical rows of a keyless table, a key held twice) is kept as `key#2`, `key#3`...
#[derive(Default)]
struct Records {
    by_key: BTreeMap<String, Vec<u64>>,
    seen: std::collections::HashMap<String, u32>,
}

impl Records {
    /// Adds a record by its key, or, for a table without one (`key` None), by a digest of its
    /// columns.
    fn insert(&mut self, key: Option<String>, columns: Vec<u64>) {
        use sha2::{Digest, Sha256};
        let key = key.unwrap_or_else(|| {
            let bytes: Vec<u8> = columns.iter().flat_map(|c| c.to_le_bytes()).collect();
            hex::encode(&Sha256::digest(&bytes)[..8])
        });
        let n = self.seen.entry(key.clone()).or_insert(0);
        *n += 1;
        let key = if *n == 1 { key } else { format!("{key}#{n}") };
        self.by_key.insert(key, columns);
    }
}

/// The key a record is narrowed by: its primary key as the archive names records; None for a
/// table without one (then a digest of its columns, [`Records::insert`]).
fn values_key(layout: &TableLayout, values: &[Value]) -> Option<String> {
    (!layout.key.is_empty()).then(|| row_key(layout, values, (0, 0)))
}

/// The sink of a narrowing pass: the records the source says `tier` must hold, by key.
struct Keyed<'c> {
    checks: RowChecks<'c>,
    tier: Tier,
    records: &'c mut Records,
    layout: &'c TableLayout,
}

impl RangeSink for Keyed<'_> {
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
            let key = values_key(self.layout, &values);
            self.records
                .insert(key, columns_of_values(self.layout, &values));
        }
        Ok(None)
    }

    async fn archive(
        &mut self,
        layout: &TableLayout,
        _patient: Option<&str>,
        _date: Option<NaiveDate>,
        values: Vec<Value>,
        _long: &LongBlobs<'_>,
    ) -> Result<()> {
        if self.tier == Tier::Archive {
            let key = values_key(layout, &values);
            self.records.insert(key, columns_of_values(layout, &values));
        }
        Ok(())
    }
}

/// The differences between what `place` must hold and holds: missing, extra and changed
/// records (the columns that differ), the first [`LISTED_DIFFERENCES`] listed, all counted.
fn differences(
    layout: &TableLayout,
    place: &str,
    expected: &Records,
    found: &Records,
) -> (Vec<Difference>, u64) {
    let mut all = Vec::new();
    for (key, want) in &expected.by_key {
        match found.by_key.get(key) {
            None => all.push((key, "missing", Vec::new())),
            Some(got) if got != want => {
                let columns = want
                    .iter()
                    .zip(got)
                    .enumerate()
                    .filter(|(_, (a, b))| a != b)
                    .map(|(i, _)| layout.target_names[i].clone())
                    .collect();
                all.push((key, "changed", columns));
            }
            Some(_) => {}
        }
    }
    for key in found
        .by_key
        .keys()
        .filter(|k| !expected.by_key.contains_key(*k))
    {
        all.push((key, "extra", Vec::new()));
    }
    let total = all.len() as u64;
    let listed: Vec<Difference> = all
        .into_iter()
        .take(LISTED_DIFFERENCES)
        .map(|(key, kind, columns)| Difference {
            place: place.to_string(),
            key: key.clone(),
            kind: kind.to_string(),
            columns,
        })
        .collect();
    let more = total - listed.len() as u64;
    (listed, more)
}

/// Where a table's rows are held, read back: the operational database, the archive, and the
/// archived BLOBs found unreadable.
struct Places<'a> {
    target: &'a Db,
    archive: &'a strata_archive::ArchiveReader,
    bad_blobs: &'a std::collections::HashSet<String>,
}

impl Migration {
    /// Narrows a mismatch of `tier` in `layout`'s table down to its records: the source
    /// routed again, keyed, against the place read again, keyed.
    async fn narrow(
        &self,
        layout: &TableLayout,
        tier: Tier,
        facts: &std::collections::HashMap<String, strata_cutoff_policies::PatientFacts>,
        checks: &TargetChecks,
        places: &Places<'_>,
    ) -> Result<(Vec<Difference>, u64)> {
        let Places {
            target,
            archive,
            bad_blobs,
        } = places;
        let mut expected = Records::default();
        let sink = Keyed {
            checks: RowChecks::new(layout, checks, !self.source_enforces_key(layout)),
            tier,
            records: &mut expected,
            layout,
        };
        let whole = KeyRange {
            index: 0,
            filter: None,
        };
        self.route_range(layout, &whole, facts, None, sink).await?;
        let mut found = Records::default();
        let place = match tier {
            Tier::Operational => {
                let mut rows = target.fetch(operational_select(target, layout), read_types(layout));
                let types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
                while let Some(row) = rows.next().await {
                    let mut values = row?;
                    let _ = super::route::coerce_row(&mut values, &types);
                    let key = values_key(layout, &values);
                    found.insert(key, columns_of_values(layout, &values));
                }
                "operational"
            }
            _ => {
                for m in archive
                    .catalog()
                    .tables
                    .get(&layout.name)
                    .into_iter()
                    .flatten()
                {
                    for f in &m.files {
                        let Ok(batches) = archive.read_file(f).await else {
                            continue; // named as unreadable already
                        };
                        for b in &batches {
                            let batch = strata_archive::ArchivedBatch::new(b, &m.blob_columns);
                            for row in 0..batch.num_rows() {
                                let key = (!layout.key.is_empty())
                                    .then(|| batch.key(row).map(str::to_string))
                                    .flatten();
                                found.insert(
                                    key,
                                    columns_of_archive(layout, &batch, row, bad_blobs),
                                );
                            }
                        }
                    }
                }
                "archive"
            }
        };
        Ok(differences(layout, place, &expected, &found))
    }

    /// Proves the last finished run (`run_id`) table by table: see the module's docs. The
    /// migration must be prepared with that run's `as_of` and policy. Its progress
    /// ([`Migration::progress`]) counts the source rows checked against the run's. With `reread_blobs`
    /// every archived BLOB is read, decrypted and hashed again (else its catalogued hash is
    /// trusted).
    pub async fn verify(&self, run: &RunReport, reread_blobs: bool) -> Result<VerifyReport> {
        let run_id = run.run_id.as_str();
        let started = chrono::Utc::now();
        let facts = self.patient_facts().await?;
        let url = self.config.resolve_url(&self.config.operational.url)?;
        let target = Db::connect(&url, true).await?;
        let target_kind = target.kind();
        let (store, keys) = self
            .config
            .archive
            .open(&self.config.base_dir)
            .map_err(|e| IngestError::Run(format!("archive: {e}")))?;
        let archive = strata_archive::ArchiveReader::open(store, keys)
            .await
            .map_err(|e| IngestError::Run(format!("archive: {e}")))?;
        let destructions = self.control.destructions().await?;
        let blobs = archive.blobs();
        let existing = target.table_names().await?;
        let mut report = VerifyReport {
            run_id: run_id.to_string(),
            policy_version: self.policy.version().to_string(),
            as_of: self.as_of().to_string(),
            strata_version: env!("CARGO_PKG_VERSION").to_string(),
            started: started.to_rfc3339(),
            ..Default::default()
        };
        for layout in &self.layouts {
            let progress = self.progress.table(&layout.name);
            if let Some(t) = run.table(&layout.name) {
                progress
                    .expected_rows
                    .store(t.source_rows, Ordering::Relaxed);
            }
            progress.ranges.store(1, Ordering::Relaxed);
            // What the source says.
            let (columns, _) = target_columns(
                self.source.kind(),
                (target_kind, Some(&target)),
                &layout.target_schema(),
                &layout.casts,
            )
            .await?;
            let checks = TargetChecks::new(&columns, target_kind);
            let mut expected = Expected::default();
            let sink = Verifying {
                checks: RowChecks::new(layout, &checks, !self.source_enforces_key(layout)),
                expected: &mut expected,
                layout,
            };
            let whole = KeyRange {
                index: 0,
                filter: None,
            };
            // The source, the operational table and the archive are read at the same time.
            let holds_rows = existing.contains(&layout.name);
            let (outcome, operational, (archived, unreadable, bad_blobs)) = futures::try_join!(
                self.route_range(layout, &whole, &facts, None, sink),
                async {
                    if holds_rows {
                        operational_sum(&target, layout).await
                    } else {
                        Ok(Sum::default())
                    }
                },
                archive_sum(&archive, &blobs, layout, reread_blobs),
            )?;
            let tally = outcome.tally.report;
            // Strata's own tables are not among the tables listed: a run creates the
            // quarantine table with the first operational table.
            let quarantined = if !existing.is_empty() {
                count(
                    &target,
                    &format!(
                        "SELECT COUNT(*) FROM {QUARANTINE_TABLE} WHERE table_name = '{}'",
                        layout.name.replace('\'', "''")
                    ),
                )
                .await?
            } else {
                0
            };
            // Destruction records: by the sum of the destroyed rows' values where every record
            // has one, else by their key checksums, else (records of the oldest versions, an
            // XOR) by count.
            let sum256 = |text: Option<&str>| {
                text.and_then(|t| t.strip_prefix("sum256:"))
                    .and_then(|h| hex::decode(h).ok())
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
            };
            let records: Vec<_> = destructions
                .iter()
                .filter(|(d, _)| d.table == layout.name && d.void.is_none())
                .map(|(d, _)| d)
                .collect();
            let purged_rows: u64 = records.iter().map(|d| d.rows).sum();
            let total = |sums: Vec<Option<[u8; 32]>>| {
                sums.into_iter().try_fold([0u8; 32], |mut acc, s| {
                    add_256(&mut acc, &s?);
                    Some(acc)
                })
            };
            let by_values = total(
                records
                    .iter()
                    .map(|d| sum256(d.value_checksum.as_deref()))
                    .collect(),
            );
            let by_keys = total(
                records
                    .iter()
                    .map(|d| sum256(Some(&d.key_checksum)))
                    .collect(),
            );
            let mut proof = TableProof {
                table: layout.name.clone(),
                source_rows: tally.source_rows,
                ..Default::default()
            };
            proof.mismatches.extend(unreadable);
            let mut place = |name: &str, want: Holding, got: Holding| {
                if want != got {
                    proof.mismatches.push(mismatch(name, &want, &got));
                }
                proof.expected.insert(name.to_string(), want);
                proof.found.insert(name.to_string(), got);
            };
            let held = |s: &Sum| Holding {
                rows: s.rows,
                checksum: Some(s.text()),
            };
            place(
                "operational",
                held(&expected.operational),
                held(&operational),
            );
            place("archive", held(&expected.archive), held(&archived));
            let rows_only = |rows| Holding {
                rows,
                checksum: None,
            };
            place(
                "quarantine",
                rows_only(tally.quarantined_rows),
                rows_only(quarantined),
            );
            let sum = |rows, sum| Sum { rows, sum };
            match (by_values, by_keys) {
                (Some(values), _) => place(
                    "purged",
                    held(&sum(expected.destroyed.rows, expected.destroyed.values)),
                    held(&sum(purged_rows, values)),
                ),
                (None, Some(keys)) => place(
                    "purged",
                    held(&sum(expected.destroyed.rows, expected.destroyed.checksum)),
                    held(&sum(purged_rows, keys)),
                ),
                (None, None) => place(
                    "purged",
                    rows_only(expected.destroyed.rows),
                    rows_only(purged_rows),
                ),
            }
            for (place, tier) in [
                ("operational", Tier::Operational),
                ("archive", Tier::Archive),
            ] {
                if proof.expected.get(place) != proof.found.get(place) {
                    let (listed, more) = self
                        .narrow(
                            layout,
                            tier,
                            &facts,
                            &checks,
                            &Places {
                                target: &target,
                                archive: &archive,
                                bad_blobs: &bad_blobs,
                            },
                        )
                        .await?;
                    proof.differences.extend(listed);
                    proof.more_differences += more;
                }
            }
            report.tables.push(proof);
            progress.ranges_done.store(1, Ordering::Relaxed);
            progress.done.store(1, Ordering::Relaxed);
        }
        target.close().await;
        report.finished = chrono::Utc::now().to_rfc3339();
        Ok(report)
    }
}

/// The SELECT that reads an operational table back in the layout's column order and types.
fn operational_select(target: &Db, layout: &TableLayout) -> String {
    let columns: Vec<String> = layout
        .target_names
        .iter()
        .zip(layout.columns())
        .map(|(name, c)| match target.kind() {
            DbKind::Postgres => pg_select_expr(&quote(name), c.col_type),
            DbKind::Sqlite => quote(name),
        })
        .collect();
    format!("SELECT {} FROM {}", columns.join(", "), quote(&layout.name))
}

fn read_types(layout: &TableLayout) -> Vec<ReadAs> {
    layout
        .columns()
        .iter()
        .map(|c| ReadAs::Type(c.col_type))
        .collect()
}

/// The sum of an operational table's rows, read back as the layout's column types.
async fn operational_sum(target: &Db, layout: &TableLayout) -> Result<Sum> {
    let mut rows = target.fetch(operational_select(target, layout), read_types(layout));
    let mut sum = Sum::default();
    let column_types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
    while let Some(row) = rows.next().await {
        let mut values = row?;
        // Read as the route stage coerces: what the database returns as another type (a
        // SQLite integer in a REAL column) is compared as the column's type.
        let _ = super::route::coerce_row(&mut values, &column_types);
        sum.add(&row_of_values(layout, &values));
    }
    Ok(sum)
}

/// The sum of a table's archived rows, the files that cannot be read, and the BLOB objects
/// that do not read back as catalogued (with `reread_blobs`; else their hashes are trusted).
async fn archive_sum(
    archive: &strata_archive::ArchiveReader,
    blobs: &strata_archive::BlobStore,
    layout: &TableLayout,
    reread_blobs: bool,
) -> Result<(Sum, Vec<String>, std::collections::HashSet<String>)> {
    let mut archived = Sum::default();
    let mut unreadable = Vec::new();
    let mut bad_blobs = std::collections::HashSet::new();
    for m in archive
        .catalog()
        .tables
        .get(&layout.name)
        .into_iter()
        .flatten()
    {
        for f in &m.files {
            // A file the catalog lists but the store lacks (or cannot decrypt) is a finding,
            // not a failure to verify.
            let batches = match archive.read_file(f).await {
                Ok(b) => b,
                Err(e) => {
                    unreadable.push(format!("archive: file {} cannot be read: {e}", f.path));
                    continue;
                }
            };
            for b in &batches {
                let batch = strata_archive::ArchivedBatch::new(b, &m.blob_columns);
                if reread_blobs {
                    for row in 0..batch.num_rows() {
                        for (column, r) in batch.blobs(row) {
                            if let Err(e) = reread(blobs, &r).await {
                                unreadable.push(format!(
                                    "archive: the BLOB in column {column} of record {} cannot be read back as catalogued: {e}",
                                    batch.key(row).unwrap_or("?")
                                ));
                                bad_blobs.insert(r.object.clone());
                            }
                        }
                    }
                }
                for row in 0..batch.num_rows() {
                    archived.add(&row_of_archive(layout, &batch, row, &bad_blobs));
                }
            }
        }
    }
    Ok((archived, unreadable, bad_blobs))
}

/// Reads a BLOB whole, decrypting and authenticating every segment and checking the content's
/// SHA-256 against its reference, holding a few segments at a time.
async fn reread(
    blobs: &strata_archive::BlobStore,
    r: &strata_archive::BlobRef,
) -> std::result::Result<(), strata_archive::ArchiveError> {
    let mut stream = std::pin::pin!(blobs.stream_range(r, 0..r.length).await?);
    while let Some(piece) = stream.next().await {
        piece?;
    }
    Ok(())
}

async fn count(db: &Db, sql: &str) -> Result<u64> {
    let rows = db.fetch_all(sql.to_string(), vec![ColumnType::Int]).await?;
    Ok(match rows.first().map(|r| &r[0]) {
        Some(Value::Int(n)) => *n as u64,
        _ => 0,
    })
}
