//! What the control database knows of the archive, and the check that nothing vanished from it.
//!
//! Two records, kept for different reasons:
//! - the **ledger** (`strata_archive_ledger`): what every run archived, manifest by manifest,
//!   copied from the runs' checkpoints when a table finishes. It is history: compaction and
//!   `gc` never change it, so it says what must exist whatever was rewritten since.
//! - the **mirror** (`strata_archive_files`): where the archive's current files are, for
//!   queries. It follows compactions and can be rebuilt from the manifests at any time.
//!
//! [`cross_check`] holds an archive's manifests against both. The archive's manifests are the
//! truth about *content* (they are sealed, and name every file's digest); the control database
//! is the truth about *existence*: a manifest the ledger records and the archive lacks is a
//! loss, never a quiet change of the catalog. Only when the control database itself was lost
//! does `strata archive sync-catalog` rebuild both from the manifests (the only evidence left).

use crate::control::Control;
use crate::db::{Col, Param};
use crate::error::Result;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use strata_archive::{Catalog, TableManifest};

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS strata_archive_files (
    table_name TEXT NOT NULL,
    run_id TEXT NOT NULL,
    path TEXT PRIMARY KEY,
    rows_in_file BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    min_patient TEXT NOT NULL,
    max_patient TEXT NOT NULL,
    kek_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS strata_archive_files_patients ON strata_archive_files (table_name, min_patient, max_patient);
CREATE TABLE IF NOT EXISTS strata_archive_ledger (
    table_name TEXT NOT NULL,
    manifest TEXT NOT NULL,
    run_id TEXT NOT NULL,
    rows_archived BIGINT NOT NULL,
    recorded_at TEXT NOT NULL,
    PRIMARY KEY (table_name, manifest)
);
";

/// What one manifest of a run archived, as the run's checkpoints recorded it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LedgerEntry {
    /// The table.
    pub table: String,
    /// The manifest's path in the archive (`manifests/{table}/{writer}.json`).
    pub manifest: String,
    /// The run that wrote it.
    pub run_id: String,
    /// The rows it published.
    pub rows: u64,
}

/// One file of the catalog mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirroredFile {
    /// The table.
    pub table: String,
    /// The path of the manifest that published it.
    pub manifest: String,
    /// The file's path in the archive.
    pub path: String,
}

/// One table's rows, as recorded and as held.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableAccount {
    /// Rows the ledger records as archived by the runs.
    pub recorded: u64,
    /// Rows the archive's current manifests hold.
    pub held: u64,
    /// Copies compactions left out because a later run archived the same record again (or
    /// deleted it).
    pub superseded: u64,
    /// Copies of records destroyed past retention inside the archive (their destruction
    /// certified): with the superseded ones, the only rows that may be recorded and not held.
    pub destroyed: u64,
}

/// What [`cross_check`] found.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct CatalogCheck {
    /// Losses: a manifest or a whole run the control database records and the archive lacks,
    /// row counts that do not add up.
    pub errors: Vec<String>,
    /// Counted, not errors: manifests the control database does not record (archived by a run
    /// it does not know, or before the ledger existed), a mirror behind a compaction.
    pub warnings: Vec<String>,
    /// Per table, the rows recorded and held.
    pub tables: BTreeMap<String, TableAccount>,
}

/// Holds an archive's catalog (its current manifests) against the ledger and the mirror.
/// `running`: runs still in progress, whose finished ranges are not in the ledger yet.
pub fn cross_check(
    catalog: &Catalog,
    ledger: &[LedgerEntry],
    mirror: &[MirroredFile],
    running: &HashSet<String>,
) -> CatalogCheck {
    let mut check = CatalogCheck::default();
    let live: HashMap<String, &TableManifest> = catalog
        .tables
        .values()
        .flatten()
        .map(|m| (TableManifest::path(&m.table, &m.run_id), m))
        .collect();
    // Every run manifest the archive accounts for, with its rows: a current manifest of a run,
    // or one a current compaction replaced. A compaction written before compactions recorded
    // the rows they replace vouches for its manifests, not for their rows.
    let mut accounted: HashMap<&str, Option<u64>> = HashMap::new();
    let mut replaced: HashSet<&str> = HashSet::new();
    // Tables with such a compaction, whose totals cannot be held against the ledger.
    let mut legacy: HashSet<&str> = HashSet::new();
    for (path, m) in &live {
        let account = check.tables.entry(m.table.clone()).or_default();
        account.held += m.rows();
        account.superseded += m.superseded_copies;
        account.destroyed += m.destroyed_copies;
        replaced.extend(m.supersedes.iter().map(String::as_str));
        if m.replaced_rows.is_empty() && m.supersedes.is_empty() {
            accounted.insert(path.as_str(), Some(m.rows()));
            continue;
        }
        for (p, rows) in &m.replaced_rows {
            accounted.insert(p.as_str(), Some(*rows));
        }
        if m.replaced_rows.is_empty() {
            accounted.extend(m.supersedes.iter().map(|p| (p.as_str(), None)));
            legacy.insert(m.table.as_str());
            continue;
        }
        let replaced_rows: u64 = m.replaced_rows.values().sum();
        if m.rows() + m.superseded_copies + m.destroyed_copies != replaced_rows {
            check.errors.push(format!(
                "table {}: compaction {path} holds {} rows, but the manifests it replaced held {replaced_rows} and it left out {} superseded copies and {} destroyed",
                m.table,
                m.rows(),
                m.superseded_copies,
                m.destroyed_copies
            ));
        }
    }

    // What the ledger records must be in the archive, with the same rows. Missing manifests
    // are reported per table and run (a run all of whose manifests are gone is a missing run).
    let mut missing: BTreeMap<(&str, &str), (usize, u64, &str)> = BTreeMap::new();
    let mut recorded_runs: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let recorded: HashSet<&str> = ledger.iter().map(|e| e.manifest.as_str()).collect();
    for e in ledger {
        check.tables.entry(e.table.clone()).or_default().recorded += e.rows;
        *recorded_runs.entry((&e.table, &e.run_id)).or_default() += 1;
        match accounted.get(e.manifest.as_str()) {
            Some(Some(rows)) if *rows != e.rows => check.errors.push(format!(
                "table {}: manifest {} of run {} holds {rows} rows, the run archived {}",
                e.table, e.manifest, e.run_id, e.rows
            )),
            Some(_) => {}
            None => {
                let m = missing
                    .entry((&e.table, &e.run_id))
                    .or_insert((0, 0, &e.manifest));
                m.0 += 1;
                m.1 += e.rows;
            }
        }
    }
    for ((table, run), (n, rows, first)) in missing {
        let of = recorded_runs[&(table, run)];
        if n == of {
            check.errors.push(format!(
                "table {table}: run {run} is missing from the archive: none of its {n} manifests ({rows} rows archived) is there, e.g. {first}"
            ));
        } else {
            check.errors.push(format!(
                "table {table}: {n} of the {of} manifests of run {run} are missing from the archive ({rows} rows archived), e.g. {first}"
            ));
        }
    }
    let mut unrecorded: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
    let mut unrecorded_tables: HashSet<&str> = HashSet::new();
    for (path, rows) in &accounted {
        let run = run_of_path(path);
        if rows.is_some() && !recorded.contains(path) {
            unrecorded_tables.insert(table_of_path(path));
            if !running.contains(run) {
                let u = unrecorded.entry(run).or_insert((0, path));
                u.0 += 1;
                u.1 = u.1.min(path);
            }
        }
    }
    for (run, (n, first)) in unrecorded {
        check.warnings.push(format!(
            "{n} manifest(s) of run {run} are not in the control database's ledger (archived by a run this control database does not record, or before it kept a ledger; `strata archive sync-catalog` records them), e.g. {first}"
        ));
    }
    // A table's totals add up when everything it holds is recorded: rows recorded are rows held
    // plus copies superseded or destroyed, and nothing else.
    for (table, a) in &check.tables {
        let checkable =
            !legacy.contains(table.as_str()) && !unrecorded_tables.contains(table.as_str());
        if checkable && a.held + a.superseded + a.destroyed != a.recorded {
            check.errors.push(format!(
                "table {table}: the runs archived {} rows; the archive holds {} and accounts for {} superseded copies and {} destroyed",
                a.recorded, a.held, a.superseded, a.destroyed
            ));
        }
    }

    // The mirror must name only files a current manifest publishes.
    let published: HashSet<&str> = live
        .values()
        .flat_map(|m| m.files.iter().map(|f| f.path.as_str()))
        .collect();
    let mut behind = 0;
    let mut gone: BTreeSet<(&str, &str)> = BTreeSet::new();
    for f in mirror {
        if published.contains(f.path.as_str()) {
            continue;
        }
        if replaced.contains(f.manifest.as_str()) {
            behind += 1;
        } else {
            gone.insert((&f.table, &f.manifest));
        }
    }
    for (table, manifest) in gone {
        check.errors.push(format!(
            "table {table}: manifest {manifest} is missing from the archive: the control database's catalog mirror lists its files"
        ));
    }
    if behind > 0 {
        check.warnings.push(format!(
            "the catalog mirror still lists {behind} file(s) a compaction replaced (`strata archive sync-catalog` brings it up to date)"
        ));
    }
    let mirrored: HashSet<&str> = mirror.iter().map(|f| f.path.as_str()).collect();
    let unmirrored = live
        .values()
        .filter(|m| !running.contains(m.run()))
        .flat_map(|m| &m.files)
        .filter(|f| !mirrored.contains(f.path.as_str()))
        .count();
    if unmirrored > 0 {
        check.warnings.push(format!(
            "{unmirrored} file(s) of the archive are not in the catalog mirror (`strata archive sync-catalog` adds them)"
        ));
    }
    check
}

/// The table of a manifest path (`manifests/{table}/{writer}.json`).
fn table_of_path(path: &str) -> &str {
    path.split('/').nth(1).unwrap_or_default()
}

/// The run of a manifest path (`manifests/{table}/{writer}.json`).
fn run_of_path(path: &str) -> &str {
    let writer = path.rsplit('/').next().unwrap_or(path);
    strata_archive::run_of_writer(writer.trim_end_matches(".json"))
}

impl Control {
    /// Records in the ledger what a run archived of a table (its ranges' manifests, from their
    /// checkpoints), replacing what was recorded for the table and run before.
    pub async fn record_archived(
        &self,
        table: &str,
        run_id: &str,
        manifests: &[TableManifest],
    ) -> Result<()> {
        let del = format!(
            "DELETE FROM strata_archive_ledger WHERE table_name = {} AND run_id = {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&del, &[table.into(), run_id.into()])
            .await?;
        for m in manifests {
            self.add_to_ledger(&LedgerEntry {
                table: table.to_string(),
                manifest: TableManifest::path(&m.table, &m.run_id),
                run_id: run_id.to_string(),
                rows: m.rows(),
            })
            .await?;
        }
        Ok(())
    }

    async fn add_to_ledger(&self, e: &LedgerEntry) -> Result<()> {
        let sql = format!(
            "INSERT INTO strata_archive_ledger (table_name, manifest, run_id, rows_archived, recorded_at) VALUES ({})",
            self.db.ps(5)
        );
        self.db
            .execute_with(
                &sql,
                &[
                    (&e.table).into(),
                    (&e.manifest).into(),
                    (&e.run_id).into(),
                    (e.rows as i64).into(),
                    crate::control::now().into(),
                ],
            )
            .await
            .map(|_| ())
    }

    /// Mirrors the manifests of a table written by one run's ranges (writer ids `{run}-r...`),
    /// replacing what was mirrored for them before.
    pub async fn mirror_table_manifests(
        &self,
        table: &str,
        run_id: &str,
        manifests: &[strata_archive::TableManifest],
    ) -> Result<()> {
        let del = format!(
            "DELETE FROM strata_archive_files WHERE table_name = {} AND run_id LIKE {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(
                &del,
                &[
                    table.into(),
                    format!("{}-%", run_id.replace(['%', '_'], "")).into(),
                ],
            )
            .await?;
        for m in manifests {
            self.mirror_manifest(m).await?;
        }
        Ok(())
    }

    /// Mirrors a published manifest into the control database's catalog (`strata_archive_files`),
    /// replacing the rows of the same table and run. The archive's own manifests stay the source
    /// of truth: the mirror can be rebuilt from them ([`Control::rebuild_catalog`]).
    pub async fn mirror_manifest(&self, m: &strata_archive::TableManifest) -> Result<()> {
        let del = format!(
            "DELETE FROM strata_archive_files WHERE table_name = {} AND run_id = {}",
            self.db.p(1),
            self.db.p(2)
        );
        self.db
            .execute_with(&del, &[(&m.table).into(), (&m.run_id).into()])
            .await?;
        let sql = format!(
            "INSERT INTO strata_archive_files (table_name, run_id, path, rows_in_file, bytes, sha256, min_patient, max_patient, kek_id) VALUES ({})",
            self.db.ps(9)
        );
        for f in &m.files {
            self.db
                .execute_with(
                    &sql,
                    &[
                        (&m.table).into(),
                        (&m.run_id).into(),
                        (&f.path).into(),
                        (f.rows as i64).into(),
                        (f.bytes as i64).into(),
                        (&f.sha256).into(),
                        (&f.min_patient).into(),
                        (&f.max_patient).into(),
                        (&f.kek_id).into(),
                    ],
                )
                .await?;
        }
        Ok(())
    }

    /// Rebuilds the catalog mirror from the archive's manifests (after the control database
    /// was lost or restored from an older backup). Returns the files mirrored.
    pub async fn rebuild_catalog(&self, catalog: &strata_archive::Catalog) -> Result<u64> {
        self.db.execute("DELETE FROM strata_archive_files").await?;
        let mut files = 0;
        for m in catalog.tables.values().flatten() {
            self.mirror_manifest(m).await?;
            files += m.files.len() as u64;
        }
        Ok(files)
    }

    /// Files in the catalog mirror per table.
    pub async fn mirrored_files(&self) -> Result<BTreeMap<String, u64>> {
        self.per_table("SELECT table_name, CAST(COUNT(*) AS BIGINT) FROM strata_archive_files GROUP BY table_name").await
    }

    /// The whole ledger.
    pub async fn ledger(&self) -> Result<Vec<LedgerEntry>> {
        let rows = self
            .db
            .fetch(
                "SELECT table_name, manifest, run_id, rows_archived FROM strata_archive_ledger ORDER BY table_name, manifest",
                &[],
                &[Col::Text, Col::Text, Col::Text, Col::Int],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| LedgerEntry {
                table: r[0].text(),
                manifest: r[1].text(),
                run_id: r[2].text(),
                rows: r[3].int().unwrap_or_default() as u64,
            })
            .collect())
    }

    /// Runs still in progress.
    pub async fn running_runs(&self) -> Result<HashSet<String>> {
        let rows = self
            .db
            .fetch(
                "SELECT run_id FROM strata_runs WHERE status = 'running'",
                &[],
                &[Col::Text],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r[0].text()).collect())
    }

    /// The catalog mirror, file by file.
    pub async fn mirrored(&self) -> Result<Vec<MirroredFile>> {
        let rows = self
            .db
            .fetch(
                "SELECT table_name, run_id, path FROM strata_archive_files ORDER BY path",
                &[],
                &[Col::Text; 3],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| MirroredFile {
                manifest: TableManifest::path(&r[0].text(), &r[1].text()),
                table: r[0].text(),
                path: r[2].text(),
            })
            .collect())
    }

    /// Holds `catalog` against this database's ledger and mirror (see [`cross_check`]).
    pub async fn check_catalog(&self, catalog: &Catalog) -> Result<CatalogCheck> {
        Ok(cross_check(
            catalog,
            &self.ledger().await?,
            &self.mirrored().await?,
            &self.running_runs().await?,
        ))
    }

    /// After the control database was lost or restored from an older backup: rebuilds the
    /// mirror from `catalog` and records in the ledger every run manifest it accounts for that
    /// the ledger lacks. Ledger entries whose manifest the archive lacks are returned, and
    /// removed only when `forget_missing` (an operator accepting a loss, by name). Returns the
    /// files mirrored, the entries added and the entries missing.
    pub async fn sync_catalog(
        &self,
        catalog: &Catalog,
        forget_missing: bool,
    ) -> Result<(u64, usize, Vec<LedgerEntry>)> {
        let files = self.rebuild_catalog(catalog).await?;
        let ledger = self.ledger().await?;
        let known: HashSet<&str> = ledger.iter().map(|e| e.manifest.as_str()).collect();
        let mut accounted: BTreeMap<String, (String, u64)> = BTreeMap::new();
        let mut vouched: HashSet<String> = HashSet::new();
        for m in catalog.tables.values().flatten() {
            vouched.extend(m.supersedes.iter().cloned());
            if m.replaced_rows.is_empty() && m.supersedes.is_empty() {
                accounted.insert(
                    TableManifest::path(&m.table, &m.run_id),
                    (m.table.clone(), m.rows()),
                );
            }
            for (p, rows) in &m.replaced_rows {
                accounted.insert(p.clone(), (m.table.clone(), *rows));
            }
        }
        let mut added = 0;
        for (manifest, (table, rows)) in &accounted {
            if !known.contains(manifest.as_str()) {
                self.add_to_ledger(&LedgerEntry {
                    table: table.clone(),
                    run_id: run_of_path(manifest).to_string(),
                    manifest: manifest.clone(),
                    rows: *rows,
                })
                .await?;
                added += 1;
            }
        }
        let missing: Vec<LedgerEntry> = ledger
            .into_iter()
            .filter(|e| !accounted.contains_key(&e.manifest) && !vouched.contains(&e.manifest))
            .collect();
        if forget_missing {
            let del = format!(
                "DELETE FROM strata_archive_ledger WHERE table_name = {} AND manifest = {}",
                self.db.p(1),
                self.db.p(2)
            );
            for e in &missing {
                let params: [Param; 2] = [(&e.table).into(), (&e.manifest).into()];
                self.db.execute_with(&del, &params).await?;
            }
        }
        Ok((files, added, missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_archive::FileEntry;

    fn manifest(table: &str, writer: &str, rows: &[u64]) -> TableManifest {
        let mut m = TableManifest::new(table, writer, "p1", vec![]);
        m.created_at = "2026-11-28T10:00:00+00:00".into();
        m.files = rows
            .iter()
            .enumerate()
            .map(|(i, &rows)| FileEntry {
                path: format!("tables/{table}/{writer}-{i}.parquet"),
                rows,
                bytes: 1,
                sha256: String::new(),
                footer_sha256: String::new(),
                min_patient: "a".into(),
                max_patient: "z".into(),
                kek_id: "k".into(),
            })
            .collect();
        m
    }

    fn catalog(manifests: &[&TableManifest]) -> Catalog {
        let mut c = Catalog::default();
        for m in manifests {
            c.tables
                .entry(m.table.clone())
                .or_default()
                .push((*m).clone());
        }
        c
    }

    fn entry(m: &TableManifest, run: &str) -> LedgerEntry {
        LedgerEntry {
            table: m.table.clone(),
            manifest: TableManifest::path(&m.table, &m.run_id),
            run_id: run.into(),
            rows: m.rows(),
        }
    }

    fn mirrored(m: &TableManifest) -> Vec<MirroredFile> {
        m.files
            .iter()
            .map(|f| MirroredFile {
                table: m.table.clone(),
                manifest: TableManifest::path(&m.table, &m.run_id),
                path: f.path.clone(),
            })
            .collect()
    }

    #[test]
    fn a_whole_archive_passes_and_every_loss_is_an_error() {
        let r0 = manifest("labs", "run-1-r00000-0a01", &[5, 5]);
        let r1 = manifest("labs", "run-1-r00001-0a02", &[3]);
        let ledger = vec![entry(&r0, "run-1"), entry(&r1, "run-1")];
        let mirror: Vec<MirroredFile> = mirrored(&r0).into_iter().chain(mirrored(&r1)).collect();
        let none = HashSet::new();

        let whole = cross_check(&catalog(&[&r0, &r1]), &ledger, &mirror, &none);
        assert_eq!(whole.errors, Vec::<String>::new());
        assert_eq!(whole.warnings, Vec::<String>::new());
        assert_eq!(
            whole.tables["labs"],
            TableAccount {
                recorded: 13,
                held: 13,
                superseded: 0,
                destroyed: 0
            }
        );

        // One manifest gone: named, with its run and rows; the mirror says so too.
        let one_gone = cross_check(&catalog(&[&r0]), &ledger, &mirror, &none);
        assert!(
            one_gone.errors.iter().any(|e| e.contains(
                "1 of the 2 manifests of run run-1 are missing from the archive (3 rows archived), e.g. manifests/labs/run-1-r00001-0a02.json"
            )),
            "{:?}",
            one_gone.errors
        );
        assert!(one_gone
            .errors
            .iter()
            .any(|e| e.contains("catalog mirror lists its files")));
        assert!(one_gone
            .errors
            .iter()
            .any(|e| e.contains("the runs archived 13 rows; the archive holds 10")));
        // Every manifest gone: the run is missing.
        let all_gone = cross_check(&Catalog::default(), &ledger, &[], &none);
        assert!(
            all_gone.errors.iter().any(|e| e.contains(
                "run run-1 is missing from the archive: none of its 2 manifests (13 rows archived)"
            )),
            "{:?}",
            all_gone.errors
        );
        // A manifest holding fewer rows than its run recorded.
        let mut short = r1.clone();
        short.files[0].rows = 2;
        let fewer = cross_check(&catalog(&[&r0, &short]), &ledger, &mirror, &none);
        assert!(fewer
            .errors
            .iter()
            .any(|e| e.contains("holds 2 rows, the run archived 3")));
    }

    #[test]
    fn compactions_account_for_what_they_replaced_and_unknown_runs_are_warnings() {
        let r0 = manifest("labs", "run-1-r00000-0a01", &[5]);
        let r1 = manifest("labs", "run-2-r00000-0b01", &[2]);
        let ledger = vec![entry(&r0, "run-1"), entry(&r1, "run-2")];
        let mut c = manifest("labs", "compact-20261128T110000.000000Z", &[6]);
        c.supersedes = vec![
            TableManifest::path("labs", &r0.run_id),
            TableManifest::path("labs", &r1.run_id),
        ];
        c.replaced_rows = c.supersedes.iter().cloned().zip([5, 2]).collect();
        c.superseded_copies = 1;
        // The mirror still lists the replaced files: behind, not lost.
        let mirror: Vec<MirroredFile> = mirrored(&r0).into_iter().chain(mirrored(&r1)).collect();
        let none = HashSet::new();
        let check = cross_check(&catalog(&[&c]), &ledger, &mirror, &none);
        assert_eq!(check.errors, Vec::<String>::new());
        assert_eq!(check.warnings.len(), 2, "{:?}", check.warnings);
        assert_eq!(
            check.tables["labs"],
            TableAccount {
                recorded: 7,
                held: 6,
                superseded: 1,
                destroyed: 0
            }
        );
        // A compaction that lost a row it does not account for.
        let mut lossy = c.clone();
        lossy.files[0].rows = 5;
        let check = cross_check(&catalog(&[&lossy]), &ledger, &mirrored(&lossy), &none);
        assert!(
            check.errors.iter().any(|e| e
                .contains("holds 5 rows, but the manifests it replaced held 7 and it left out 1")),
            "{:?}",
            check.errors
        );

        // A run the control database does not record: a warning, unless it is running.
        let check = cross_check(&catalog(&[&r0, &r1]), &ledger[..1], &[], &none);
        assert!(check.errors.is_empty(), "{:?}", check.errors);
        assert!(check
            .warnings
            .iter()
            .any(|w| w
                .contains("1 manifest(s) of run run-2 are not in the control database's ledger")));
        let running: HashSet<String> = ["run-2".to_string()].into();
        let check = cross_check(
            &catalog(&[&r0, &r1]),
            &ledger[..1],
            &mirrored(&r0),
            &running,
        );
        assert!(check.warnings.is_empty(), "{:?}", check.warnings);
    }
}
