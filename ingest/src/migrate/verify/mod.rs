//! `strata verify`: proves, per table and tier, that the source's rows are where the last run
//! put them: **source = operational ⊎ archive ⊎ quarantine ⊎ purged**. The source is read and
//! routed again exactly as a plan does (the same route stage, the same checks, the run's
//! policy and `as_of`), and each row's canonical digest ([`super::canonical`]) is summed into
//! the tier it belongs to; the operational tables and the archive's files are read back and
//! summed alike. Equal counts and sums prove that each tier holds exactly its rows, values
//! included; any difference (a changed value, a missing or extra row, a row in the wrong tier,
//! a row in two places) changes a sum. Quarantine is proven by count, destructions by their
//! records' key checksums (the same sum over the rows' key digests). Archived records on a
//! retention list carried out after the run (`strata archive retain`) are checked apart: one
//! still archived (a hold kept it) by its digests, the others against the lists' destruction
//! records, by count and key checksum. Rows the run left operational that `strata tier` moved
//! or destroyed since are checked against its ledger ([`tiered`]): moved ones in the archive
//! digest for digest, destroyed ones by count and key checksum.

mod narrow;
mod quarantined;
mod report;
mod tiered;

use quarantined::Quarantined;
use report::mismatch;
pub use report::{Difference, Holding, TableProof, VerifyReport, LISTED_DIFFERENCES};
use tiered::TierLedger;

use super::canonical::{row_of_archive, row_of_values, Sum};
use super::destroyed::{add_256, Destroyed};
use super::naming::row_key;
use super::sinks::{LongBlobs, RangeSink, RowChecks, DUPLICATE_KEY};
use super::target::{target_columns, QUARANTINE_TABLE};
use super::workers::{run_jobs, Job};
use super::Migration;
use crate::db::{pg_select_expr, quote, Db, DbKind, ReadAs};
use crate::error::{IngestError, Result};
use crate::layout::TableLayout;
use crate::ranges::{plan_ranges, KeyRange};
use crate::report::{RunReport, Tally};
use crate::target_check::TargetChecks;
use crate::value::{ColumnType, Value};
use chrono::NaiveDate;
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use strata_archive::Fate;
use strata_cutoff_policies::{PatientFacts, Tier};

/// What the source says each tier of a table must hold.
#[derive(Default)]
struct Expected {
    operational: Sum,
    archive: Sum,
    destroyed: Destroyed,
    /// Archived records on a retention list carried out after the run (see
    /// `super::retention`): each copy's digest, by record key, checked apart.
    listed: HashMap<String, Vec<[u8; 32]>>,
    /// Operational rows `strata tier` moved to the archive since: their digests.
    tiered: Sum,
    /// Their keys.
    tiered_keys: HashSet<String>,
    /// Operational rows tier destroyed on approved lists: their key digests.
    tier_destroyed: Sum,
}

/// The sink of a verification: the plan's checks, and each row's digest summed into its tier.
struct Verifying<'c> {
    checks: RowChecks<'c>,
    expected: &'c mut Expected,
    layout: &'c TableLayout,
    /// Rows the run quarantined after routing, when there are (then rows are keyed).
    quarantined: Option<&'c Quarantined>,
    /// Record keys of retention lists carried out since the run.
    retained: Option<&'c HashSet<String>>,
    /// What tier did to the table since the run.
    tiered: Option<&'c TierLedger>,
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

    fn quarantine(
        &mut self,
        layout: &TableLayout,
        values: &[Value],
        _ordinal: (usize, u64),
        _column: usize,
        reason: &str,
        in_range: u64,
    ) -> u64 {
        // A later copy of a key that different ranges of the run loaded: the run may have kept
        // this one.
        if let Some(q) = self.quarantined {
            let key = row_key(layout, values, (0, 0));
            if reason == DUPLICATE_KEY && q.holds(&key) {
                q.note_copy(key, row_of_values(layout, values), true);
            }
        }
        in_range
    }

    fn purge(
        &mut self,
        layout: &TableLayout,
        _patient: Option<&str>,
        values: &[Value],
        ordinal: (usize, u64),
    ) {
        self.expected.destroyed.add(layout, values, ordinal);
    }

    async fn operational(&mut self, values: Vec<Value>) -> Result<Option<(Vec<Value>, String)>> {
        let digest = row_of_values(self.layout, &values);
        if let Some(q) = self.quarantined {
            let key = row_key(self.layout, &values, (0, 0));
            if q.holds(&key) {
                q.note_copy(key, digest, false);
                return Ok(None);
            }
        }
        if let Some(ledger) = self.tiered {
            let key = super::naming::archive_key(self.layout, &values);
            if ledger.moved.contains(&key) {
                // Moved to the archive, and maybe destroyed there since by retention.
                if self.retained.is_some_and(|r| r.contains(&key)) {
                    self.expected.listed.entry(key).or_default().push(digest);
                } else {
                    self.expected.tiered.add(&digest);
                    self.expected.tiered_keys.insert(key);
                }
                return Ok(None);
            }
            if ledger.destroyed.contains(&key) {
                let digest: [u8; 32] =
                    <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()).into();
                self.expected.tier_destroyed.add(&digest);
                return Ok(None);
            }
        }
        self.expected.operational.add(&digest);
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
        let digest = row_of_values(layout, &values);
        if let Some(retained) = self.retained {
            let key = super::naming::archive_key(layout, &values);
            if retained.contains(&key) {
                self.expected.listed.entry(key).or_default().push(digest);
                return Ok(());
            }
        }
        self.expected.archive.add(&digest);
        Ok(())
    }
}

/// What reading one table's places needs.
struct ReadTable<'a> {
    layout: &'a TableLayout,
    facts: &'a HashMap<String, PatientFacts>,
    /// The exported source snapshot, when the source has them.
    snapshot: Option<&'a str>,
    checks: &'a TargetChecks,
    /// The operational database, when the table is there.
    target: Option<&'a Db>,
    archive: &'a strata_archive::ArchiveReader,
    blobs: &'a strata_archive::BlobStore,
    reread_blobs: bool,
    /// Rows the run quarantined after routing them, when there are (and the table has a key).
    quarantined: Option<&'a Quarantined>,
    /// Record keys of retention lists carried out since the run, when there are.
    retained: Option<&'a HashSet<String>>,
    /// What tier did to the table since the run, when it did anything.
    tiered: Option<&'a TierLedger>,
}

/// A table's places read: what the source says each must hold, and what they hold.
#[derive(Default)]
struct Sides {
    expected: Expected,
    tally: Tally,
    operational: Sum,
    archived: Sum,
    unreadable: Vec<String>,
    bad_blobs: HashSet<String>,
    /// The digests of the operational rows of keys loaded twice by the run, by key.
    duplicates_held: HashMap<String, Vec<[u8; 32]>>,
    /// Archived records the source deleted while a legal hold kept them.
    held_after_deletion: u64,
    /// Current archived copies of records on a retention list (kept by a hold), by key.
    listed_found: HashMap<String, Vec<[u8; 32]>>,
    /// Current archived copies of records tier moved, by key.
    tiered_found: HashMap<String, Vec<[u8; 32]>>,
}

impl Sides {
    fn merge(&mut self, other: Sides) {
        self.expected.operational.merge(&other.expected.operational);
        self.expected.archive.merge(&other.expected.archive);
        self.expected.destroyed.merge(other.expected.destroyed);
        self.tally.merge(other.tally);
        self.operational.merge(&other.operational);
        self.archived.merge(&other.archived);
        self.unreadable.extend(other.unreadable);
        self.bad_blobs.extend(other.bad_blobs);
        self.held_after_deletion += other.held_after_deletion;
        for (key, digests) in other.expected.listed {
            self.expected.listed.entry(key).or_default().extend(digests);
        }
        for (key, digests) in other.listed_found {
            self.listed_found.entry(key).or_default().extend(digests);
        }
        for (key, digests) in other.tiered_found {
            self.tiered_found.entry(key).or_default().extend(digests);
        }
        self.expected.tiered.merge(&other.expected.tiered);
        self.expected.tiered_keys.extend(other.expected.tiered_keys);
        self.expected
            .tier_destroyed
            .merge(&other.expected.tier_destroyed);
        for (key, held) in other.duplicates_held {
            self.duplicates_held.entry(key).or_default().extend(held);
        }
    }
}

impl Migration {
    /// Reads a table's places side by side on the run's workers: the source in its ranges
    /// (one range when the source does not enforce the table's key: a repeated key is found
    /// only by reading every row in one pass, as the plan does), the operational table, and
    /// the archive's files in as many parts as there are workers.
    async fn read_sides(&self, t: &ReadTable<'_>) -> Result<Sides> {
        let layout = t.layout;
        let whole = vec![KeyRange {
            index: 0,
            filter: None,
        }];
        let ranges = if layout.key.is_empty() || self.source_enforces_key(layout) {
            plan_ranges(&self.source, layout, self.config.run.rows_per_range)
                .await?
                .ranges
        } else {
            whole
        };
        let files = t.archive.ranked_files(&layout.name);
        // Copies that later runs superseded or deleted (sync's corrections and tombstones)
        // are not in the archive's place.
        let successors = &t
            .archive
            .successors(&layout.name)
            .await
            .map_err(|e| IngestError::Run(format!("archive: {e}")))?;
        let workers = self.config.run.workers();
        let mut jobs: Vec<Job<'_, Sides>> = Vec::new();
        for range in &ranges {
            jobs.push(Box::new(move || {
                Box::pin(async move {
                    let mut sides = Sides {
                        tally: Tally::new(&layout.name),
                        ..Default::default()
                    };
                    let unchecked = !self.source_enforces_key(layout);
                    let sink = Verifying {
                        checks: RowChecks::new(layout, t.checks, unchecked),
                        expected: &mut sides.expected,
                        layout,
                        quarantined: t.quarantined,
                        retained: t.retained,
                        tiered: t.tiered,
                    };
                    let outcome = self
                        .route_range(layout, range, t.facts, t.snapshot, sink)
                        .await?;
                    sides.tally = outcome.tally;
                    Ok(sides)
                })
            }));
        }
        if let Some(target) = t.target {
            jobs.push(Box::new(move || {
                Box::pin(async move {
                    let (operational, duplicates_held) =
                        operational_sum(target, layout, t.quarantined).await?;
                    Ok(Sides {
                        operational,
                        duplicates_held,
                        ..Default::default()
                    })
                })
            }));
        }
        let part = files.len().div_ceil(workers.max(1)).max(1);
        for files in files.chunks(part) {
            jobs.push(Box::new(move || {
                Box::pin(archive_sum(
                    t.archive,
                    t.blobs,
                    layout,
                    files,
                    successors,
                    (t.reread_blobs, t.retained, t.tiered),
                ))
            }));
        }
        let threads = workers + 2;
        let mut sides = Sides {
            tally: Tally::new(&layout.name),
            ..Default::default()
        };
        for s in run_jobs(jobs, threads).await? {
            sides.merge(s);
        }
        Ok(sides)
    }

    /// Proves the last finished run (`run_id`) table by table: see the module's docs. The
    /// migration must be prepared with that run's `as_of` and policy. Its progress
    /// ([`Migration::progress`]) counts the source rows checked against the run's. With
    /// `reread_blobs` every archived BLOB is read, decrypted and hashed again (else its
    /// catalogued hash is trusted). With `resume`, the tables a stopped verification of the
    /// same run and options proved are taken as it proved them (each says when).
    pub async fn verify(
        &self,
        run: &RunReport,
        reread_blobs: bool,
        resume: bool,
    ) -> Result<VerifyReport> {
        let run_id = run.run_id.as_str();
        let started = chrono::Utc::now();
        // Each table's proof is kept as it is made: a verification stopped (kill -9, a source
        // that went away) goes on with `resume` from the tables it had not proven, under the
        // same options. Without `resume`, every table is read again.
        let options = format!("blobs reread: {reread_blobs}");
        let mut earlier: HashMap<String, TableProof> = HashMap::new();
        if resume {
            for (table, json) in self.control.table_proofs(run_id, &options).await? {
                let proof = serde_json::from_str(&json).map_err(|e| {
                    IngestError::Run(format!(
                        "control database: the proof kept for table {table}: {e}"
                    ))
                })?;
                earlier.insert(table, proof);
            }
        } else {
            self.control.forget_table_proofs().await?;
        }
        // The source is read in one exported snapshot (PostgreSQL), its ranges side by side.
        let snapshot = self.source.export_snapshot().await?;
        let snapshot_id = snapshot.as_ref().map(|s| s.id.clone());
        let facts = self.patient_facts_in(snapshot_id.as_deref()).await?;
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
        // Retention lists carried out since the run: their records left the archive after it
        // (see `super::retention`), accounted for apart.
        let mut retained: HashMap<String, HashSet<String>> = HashMap::new();
        let mut retentions: HashSet<String> = HashSet::new();
        // Tier lists carried out since the run: operational rows destroyed after it.
        let mut tier_lists: HashSet<String> = HashSet::new();
        // A carried-out list's certificate must check against the public key, when one is
        // configured: what it says, per table of the list.
        let mut certificate_findings: HashMap<String, Vec<String>> = HashMap::new();
        let can_check = self
            .config
            .verify
            .as_ref()
            .is_some_and(|v| v.public_key_file.is_some() || v.public_key_env.is_some());
        for r in self.control.destruction_requests().await? {
            if let (true, Some(certificate)) = (can_check, &r.certificate) {
                let text = certificate.to_string();
                if let Err(e) = super::evidence::check_evidence::<
                    super::certificate::DestructionCertificate,
                >(&self.config, &text)
                {
                    let tables = serde_json::from_value::<super::retention::RetentionList>(
                        r.summary.clone(),
                    )
                    .map(|l| l.tables.into_keys().collect::<Vec<_>>())
                    .unwrap_or_default();
                    for table in tables {
                        certificate_findings.entry(table).or_default().push(format!(
                            "the certificate of destruction list {}: {e}",
                            r.request_id
                        ));
                    }
                }
            }
            if r.kind == "tier"
                && matches!(
                    r.status,
                    strata_control::RequestStatus::Done | strata_control::RequestStatus::Approved
                )
            {
                tier_lists.insert(r.request_id.clone());
            }
            // (An approved list a pass has begun carrying out counts as well.)
            if r.kind != "retain"
                || !matches!(
                    r.status,
                    strata_control::RequestStatus::Done | strata_control::RequestStatus::Approved
                )
            {
                continue;
            }
            if let Ok(list) = serde_json::from_value::<super::retention::RetentionList>(r.summary) {
                for (table, listed) in list.tables {
                    retained.entry(table).or_default().extend(listed.keys);
                }
            }
            retentions.insert(r.request_id);
        }
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
            if let Some(proof) = earlier.remove(&layout.name) {
                progress.rows.store(proof.source_rows, Ordering::Relaxed);
                progress.done.store(1, Ordering::Relaxed);
                report.tables.push(proof);
                continue;
            }
            let checked_at = chrono::Utc::now().to_rfc3339();
            // What the source says.
            let (columns, _) = target_columns(
                self.source.kind(),
                (target_kind, Some(&target)),
                &layout.target_schema(),
                &layout.casts,
            )
            .await?;
            let checks = TargetChecks::new(&columns, target_kind);
            let holds_rows = existing.contains(&layout.name);
            // Strata's own tables are not among the tables listed: a run creates the
            // quarantine table with the first operational table.
            let after_routing = match existing.is_empty() || layout.key.is_empty() {
                true => Quarantined::default(),
                false => Quarantined::load(&target, &layout.name).await?,
            };
            let tier_ledger = match holds_rows {
                true => TierLedger::load(&target, &layout.name).await?,
                false => None,
            };
            let read = ReadTable {
                layout,
                facts: &facts,
                snapshot: snapshot_id.as_deref(),
                checks: &checks,
                target: holds_rows.then_some(&target),
                archive: &archive,
                blobs: &blobs,
                reread_blobs,
                quarantined: (!after_routing.is_empty()).then_some(&after_routing),
                retained: retained.get(&layout.name),
                tiered: tier_ledger.as_ref(),
            };
            let Sides {
                mut expected,
                tally,
                mut operational,
                archived,
                unreadable,
                bad_blobs,
                duplicates_held,
                held_after_deletion,
                listed_found,
                tiered_found,
            } = self.read_sides(&read).await?;
            let reconciled = after_routing.reconcile(
                &duplicates_held,
                &mut expected.operational,
                &mut operational,
            );
            let tally = tally.report;
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
                .filter(|(d, _)| {
                    d.table == layout.name
                        && d.void.is_none()
                        && !retentions.contains(&d.run_id)
                        && !tier_lists.contains(&d.run_id)
                })
                .map(|(d, _)| d)
                .collect();
            let by_retention = destructions
                .iter()
                .filter(|(d, _)| d.table == layout.name && retentions.contains(&d.run_id))
                .fold(Sum::default(), |mut acc, (d, _)| {
                    acc.rows += d.rows;
                    if let Some(s) = sum256(Some(&d.key_checksum)) {
                        add_256(&mut acc.sum, &s);
                    }
                    acc
                });
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
                checked_at,
                snapshot_wal_lsn: snapshot.as_ref().map(|s| s.wal_lsn.clone()),
                held_after_source_deletion: held_after_deletion,
                ..Default::default()
            };
            proof.mismatches.extend(unreadable);
            let mut retention_findings = Vec::new();
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
            let rows_only = |rows| Holding {
                rows,
                checksum: None,
            };
            place("archive", held(&expected.archive), held(&archived));
            if let Some(ledger) = &tier_ledger {
                // Rows the run left operational that tier moved since: archived exactly as the
                // source says. A copy of a record the source never had (the new EHR's) is
                // counted apart.
                let mut found = Sum::default();
                for (key, digests) in &tiered_found {
                    if expected.tiered_keys.contains(key) {
                        for d in digests {
                            found.add(d);
                        }
                    } else {
                        proof.tiered_after_go_live += digests.len() as u64;
                    }
                }
                place(
                    "operational, tiered to the archive",
                    held(&expected.tiered),
                    held(&found),
                );
                // What tier's batches destroyed (by count and key checksum, as recorded with
                // the deletes); a completed list's destruction records must say the same.
                let by_tier =
                    ledger
                        .destroyed_by_list
                        .values()
                        .fold(Sum::default(), |mut acc, s| {
                            acc.merge(s);
                            acc
                        });
                for (list, batches) in &ledger.destroyed_by_list {
                    let recorded = destructions
                        .iter()
                        .find(|(d, _)| d.table == layout.name && &d.run_id == list);
                    if let Some((d, _)) = recorded {
                        if d.rows != batches.rows
                            || sum256(Some(&d.key_checksum)) != Some(batches.sum)
                        {
                            retention_findings.push(format!(
                                "destroyed by tier: the destruction record of list {list} does not say what its batches destroyed"
                            ));
                        }
                    }
                }
                place(
                    "destroyed by tier",
                    held(&expected.tier_destroyed),
                    held(&by_tier),
                );
            }
            if retained.contains_key(&layout.name) {
                // Records on retention lists carried out since the run: a copy still archived
                // (a hold kept it) exactly as the source says; the others destroyed by the
                // lists, by count and key checksum (each copy counts).
                let mut destroyed_keys = Sum::default();
                let (mut kept_expected, mut kept_found) = (0u64, 0u64);
                let mut findings = Vec::new();
                let expected_keys: HashSet<String> = expected.listed.keys().cloned().collect();
                for (key, mut want) in expected.listed {
                    match listed_found.get(&key) {
                        Some(found) => {
                            let mut found = found.clone();
                            kept_expected += want.len() as u64;
                            kept_found += found.len() as u64;
                            want.sort();
                            found.sort();
                            if want != found {
                                findings.push(format!(
                                    "archive: record {key}, on a retention list and kept, is not as the source says"
                                ));
                            }
                        }
                        None => {
                            let digest: [u8; 32] =
                                <sha2::Sha256 as sha2::Digest>::digest(key.as_bytes()).into();
                            for _ in &want {
                                destroyed_keys.add(&digest);
                            }
                        }
                    }
                }
                for key in listed_found.keys() {
                    if !expected_keys.contains(key) {
                        findings.push(format!(
                            "archive: record {key} is archived, the source does not say so"
                        ));
                    }
                }
                place(
                    "archive, listed for retention and kept",
                    rows_only(kept_expected),
                    rows_only(kept_found),
                );
                place(
                    "destroyed by retention",
                    held(&destroyed_keys),
                    held(&by_retention),
                );
                retention_findings.extend(findings);
            }
            // The keys accounted for apart: their quarantine entries as the source says.
            let expected_quarantine =
                tally.quarantined_rows - reconciled.counted + reconciled.quarantine;
            place(
                "quarantine",
                rows_only(expected_quarantine),
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
            proof.mismatches.extend(retention_findings);
            proof.mismatches.extend(
                certificate_findings
                    .remove(&layout.name)
                    .unwrap_or_default(),
            );
            for (key, how) in reconciled.wrong {
                if proof.differences.len() < LISTED_DIFFERENCES {
                    proof.differences.push(Difference {
                        place: "operational".into(),
                        key,
                        kind: how.into(),
                        columns: Vec::new(),
                    });
                } else {
                    proof.more_differences += 1;
                }
            }
            for (place, tier) in [
                ("operational", Tier::Operational),
                ("archive", Tier::Archive),
            ] {
                if proof.expected.get(place) != proof.found.get(place) {
                    let (listed, more) = self.narrow(&read, tier, &bad_blobs).await?;
                    proof.differences.extend(listed);
                    proof.more_differences += more;
                }
            }
            let json = serde_json::to_string(&proof)
                .map_err(|e| IngestError::Run(format!("table {}: {e}", layout.name)))?;
            self.control
                .save_table_proof(run_id, &layout.name, &options, &json)
                .await?;
            report.tables.push(proof);
            progress.ranges_done.store(1, Ordering::Relaxed);
            progress.done.store(1, Ordering::Relaxed);
        }
        drop(snapshot);
        target.close().await;
        self.control.forget_table_proofs().await?;
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

/// The sum of an operational table's rows, read back as the layout's column types, but for
/// the rows of keys the run loaded twice: their digests by key.
async fn operational_sum(
    target: &Db,
    layout: &TableLayout,
    quarantined: Option<&Quarantined>,
) -> Result<(Sum, HashMap<String, Vec<[u8; 32]>>)> {
    let mut rows = target.fetch(operational_select(target, layout), read_types(layout));
    let mut sum = Sum::default();
    let mut held: HashMap<String, Vec<[u8; 32]>> = HashMap::new();
    let column_types: Vec<ColumnType> = layout.columns().iter().map(|c| c.col_type).collect();
    while let Some(row) = rows.next().await {
        let mut values = row?;
        // Read as the route stage coerces: what the database returns as another type (a
        // SQLite integer in a REAL column) is compared as the column's type.
        let _ = super::route::coerce_row(&mut values, &column_types);
        let digest = row_of_values(layout, &values);
        if let Some(q) = quarantined {
            let key = row_key(layout, &values, (0, 0));
            if q.holds(&key) {
                held.entry(key).or_default().push(digest);
                continue;
            }
        }
        sum.add(&digest);
    }
    Ok((sum, held))
}

/// The sum of some of a table's archived files' rows (with each file's manifest's BLOB
/// columns), the files that cannot be read, and the BLOB objects that do not read back as
/// catalogued (with `reread_blobs`; else their hashes are trusted).
async fn archive_sum(
    archive: &strata_archive::ArchiveReader,
    blobs: &strata_archive::BlobStore,
    layout: &TableLayout,
    files: &[(usize, &[String], &strata_archive::FileEntry)],
    successors: &strata_archive::Successors,
    (reread_blobs, retained, tiered): (bool, Option<&HashSet<String>>, Option<&TierLedger>),
) -> Result<Sides> {
    let mut sides = Sides::default();
    for &(rank, blob_columns, f) in files {
        // A file the catalog lists but the store lacks (or cannot decrypt) is a finding, not a
        // failure to verify.
        let batches = match archive.read_file(f).await {
            Ok(b) => b,
            Err(e) => {
                sides
                    .unreadable
                    .push(format!("archive: file {} cannot be read: {e}", f.path));
                continue;
            }
        };
        for b in &batches {
            let batch = strata_archive::ArchivedBatch::new(b, blob_columns);
            if reread_blobs {
                for row in 0..batch.num_rows() {
                    for (column, r) in batch.blobs(row) {
                        if let Err(e) = reread(blobs, &r).await {
                            sides.unreadable.push(format!(
                                "archive: the BLOB in column {column} of record {} cannot be read back as catalogued: {e}",
                                batch.key(row).unwrap_or("?")
                            ));
                            sides.bad_blobs.insert(r.object.clone());
                        }
                    }
                }
            }
            for row in 0..batch.num_rows() {
                let key = batch.key(row).unwrap_or_default();
                match successors.fate(rank, key) {
                    Fate::Current if retained.is_some_and(|r| r.contains(key)) => {
                        let digest = row_of_archive(layout, &batch, row, &sides.bad_blobs);
                        sides
                            .listed_found
                            .entry(key.to_string())
                            .or_default()
                            .push(digest);
                    }
                    Fate::Current if tiered.is_some_and(|t| t.moved.contains(key)) => {
                        let digest = row_of_archive(layout, &batch, row, &sides.bad_blobs);
                        sides
                            .tiered_found
                            .entry(key.to_string())
                            .or_default()
                            .push(digest);
                    }
                    Fate::Current => {
                        sides
                            .archived
                            .add(&row_of_archive(layout, &batch, row, &sides.bad_blobs))
                    }
                    // Deleted at the source while a legal hold stood: kept, apart.
                    Fate::Held => sides.held_after_deletion += 1,
                    Fate::Superseded | Fate::Deleted => {}
                }
            }
        }
    }
    Ok(sides)
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
