//! The archive's catalog: every published manifest by table, as loaded from the store, and a
//! live view of it for a long-running reader (the API server), re-read every few seconds so that
//! a new run, a compaction or a gc shows without a restart while each read sees one catalog.

use crate::error::{ArchiveError, Result};
use crate::keys::KeyRing;
use crate::manifest::TableManifest;
use crate::reader::ArchiveReader;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

/// The manifests listed in the store, by object path (superseded ones included): what a
/// refresh compares with and reuses (a manifest never changes under its name).
pub(crate) type Listed = HashMap<String, TableManifest>;

/// Every published manifest, by table.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Manifests per table, oldest first (by creation time): later ones supersede earlier ones
    /// record by record.
    pub tables: BTreeMap<String, Vec<TableManifest>>,
    /// Every manifest listed, superseded ones included.
    listed: Arc<Listed>,
    /// 0 for a catalog loaded at open; a [`LiveArchive`] numbers the ones it swaps in.
    generation: u64,
}

impl Catalog {
    /// This catalog's number: 0 when loaded at open, then one more at each change a
    /// [`LiveArchive`] saw. What was read through one catalog can be kept under its number.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Lists the manifests in `store`, reads and checks the seal of those not in `known`
    /// (reused as they are), and drops the ones a compaction's manifest supersedes. Also
    /// returns whether the listing differs from `known`'s.
    pub(crate) async fn load(
        store: &dyn ObjectStore,
        keys: &KeyRing,
        known: &Listed,
    ) -> Result<(Catalog, bool)> {
        let listed = list_manifests(store, keys, known).await?;
        let changed = listed.len() != known.len() || listed.keys().any(|k| !known.contains_key(k));
        let mut catalog = Catalog::default();
        for manifest in listed.values() {
            catalog
                .tables
                .entry(manifest.table.clone())
                .or_default()
                .push(manifest.clone());
        }
        // A compaction's manifest replaces the ones it lists: the switch happens the moment it is
        // written (a single object put), so a reader sees either the old set or the new one.
        let superseded = superseded(&listed);
        for manifests in catalog.tables.values_mut() {
            manifests.retain(|m| !superseded.contains(&TableManifest::path(&m.table, &m.run_id)));
            manifests.sort_by(|a, b| (&a.created_at, &a.run_id).cmp(&(&b.created_at, &b.run_id)));
        }
        catalog.tables.retain(|_, ms| !ms.is_empty());
        catalog.listed = Arc::new(listed);
        Ok((catalog, changed))
    }

    /// The BLOB columns recorded for `table`.
    pub fn blob_columns(&self, table: &str) -> Vec<String> {
        let mut cols: Vec<String> = self
            .tables
            .get(table)
            .into_iter()
            .flatten()
            .flat_map(|m| m.blob_columns.iter().cloned())
            .collect();
        cols.sort();
        cols.dedup();
        cols
    }

    /// Archived rows per table.
    pub fn rows_per_table(&self) -> BTreeMap<String, u64> {
        self.tables
            .iter()
            .map(|(t, ms)| (t.clone(), ms.iter().map(|m| m.rows()).sum()))
            .collect()
    }
}

/// Groups manifests by the run that wrote them (see [`TableManifest::run`]), oldest run first:
/// runs are ordered by their newest manifest's [`TableManifest::ranks_at`] (then by run id), so
/// a run resumed after an interruption counts as one run, and a compaction ranks as of the
/// newest manifest it read: after every manifest it replaced, before a run published while it
/// worked.
pub fn runs_of<'a>(
    manifests: impl IntoIterator<Item = &'a TableManifest>,
) -> Vec<Vec<&'a TableManifest>> {
    let mut by_run: BTreeMap<&str, (&str, Vec<&TableManifest>)> = BTreeMap::new();
    for m in manifests {
        let entry = by_run.entry(m.run()).or_insert((m.ranks_at(), Vec::new()));
        entry.0 = entry.0.max(m.ranks_at());
        entry.1.push(m);
    }
    let mut runs: Vec<(&str, &str, Vec<&TableManifest>)> = by_run
        .into_iter()
        .map(|(run, (newest, ms))| (newest, run, ms))
        .collect();
    runs.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    runs.into_iter().map(|(_, _, ms)| ms).collect()
}

/// Every manifest in `store` by object path: those in `known` reused as they are (a manifest
/// never changes under its name), the others read and their seals checked.
pub(crate) async fn list_manifests(
    store: &dyn ObjectStore,
    keys: &KeyRing,
    known: &Listed,
) -> Result<Listed> {
    let metas: Vec<_> = store
        .list(Some(&Path::from("manifests")))
        .try_collect()
        .await?;
    let mut listed = Listed::with_capacity(metas.len());
    for meta in metas {
        let object = meta.location.to_string();
        let manifest = match known.get(&object) {
            Some(m) => m.clone(),
            None => {
                let bytes = store.get(&meta.location).await?.bytes().await?;
                let manifest: TableManifest =
                    serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Manifest {
                        object: object.clone(),
                        detail: e.to_string(),
                    })?;
                manifest.check_seal(keys, &object)?;
                manifest
            }
        };
        listed.insert(object, manifest);
    }
    Ok(listed)
}

/// The manifest paths that a compaction's manifest in `listed` supersedes.
fn superseded(listed: &Listed) -> HashSet<String> {
    listed
        .values()
        .flat_map(|m| m.supersedes.iter().cloned())
        .collect()
}

/// An archive whose catalog follows the store: [`LiveArchive::view`] is the reader to use for
/// one request (one catalog throughout), [`LiveArchive::refresh`] re-reads the manifests.
pub struct LiveArchive {
    current: RwLock<ArchiveReader>,
    /// One refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
}

/// What a refresh changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Refreshed {
    /// The new view's [`Catalog::generation`].
    pub generation: u64,
    /// Manifests gone from the store that no compaction superseded (withdrawn by `strata
    /// migrate --abandon`, or deleted by hand: `strata archive verify` says which): their
    /// records are no longer served.
    pub vanished: Vec<String>,
}

impl LiveArchive {
    /// Follows the archive `reader` opened.
    pub fn new(reader: ArchiveReader) -> Self {
        LiveArchive {
            current: RwLock::new(reader),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// The reader to use now (a few reference counts: cheap).
    pub fn view(&self) -> ArchiveReader {
        self.current.read().expect("archive view lock").clone()
    }

    /// The current view's generation (see [`Catalog::generation`]).
    pub fn generation(&self) -> u64 {
        self.current
            .read()
            .expect("archive view lock")
            .catalog()
            .generation
    }

    /// Re-reads the manifests (only new ones are fetched and checked) and, if the listing
    /// changed, makes the new catalog the current view: None when nothing changed.
    pub async fn refresh(&self) -> Result<Option<Refreshed>> {
        let _one = self.refreshing.lock().await;
        let old = self.view();
        let (mut catalog, changed) = {
            let (store, keys) = old.parts();
            Catalog::load(store, keys, &old.catalog().listed).await?
        };
        if !changed {
            return Ok(None);
        }
        let now_superseded = superseded(&catalog.listed);
        let vanished = old
            .catalog()
            .tables
            .values()
            .flatten()
            .map(|m| TableManifest::path(&m.table, &m.run_id))
            .filter(|p| !catalog.listed.contains_key(p) && !now_superseded.contains(p))
            .collect();
        let generation = old.catalog().generation + 1;
        catalog.generation = generation;
        *self.current.write().expect("archive view lock") = old.with_catalog(catalog);
        Ok(Some(Refreshed {
            generation,
            vanished,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(run_id: &str, created_at: &str, ranks_as_of: &str) -> TableManifest {
        let mut m = TableManifest::new("visits", run_id, "1", Vec::new());
        m.created_at = created_at.into();
        m.ranks_as_of = ranks_as_of.into();
        m
    }

    /// A compaction ranks as of the newest manifest it read (here a run of 10:00, which it
    /// replaces): a run published while it worked (change sync's corrections, at 10:03) stays
    /// newer, though the compaction finished after it; one published after the compaction,
    /// newer still.
    #[test]
    fn a_compaction_ranks_as_of_what_it_read() {
        let compaction = manifest(
            "compact-1",
            "2026-11-28T10:05:00+00:00",
            "2026-11-28T10:00:00+00:00",
        );
        let synced = manifest("sync-1-0_1", "2026-11-28T10:03:00+00:00", "");
        let later = manifest("sync-1-0_2", "2026-11-28T10:06:00+00:00", "");
        let order: Vec<Vec<&str>> = runs_of([&later, &synced, &compaction])
            .iter()
            .map(|run| run.iter().map(|m| m.run_id.as_str()).collect())
            .collect();
        assert_eq!(order, [["compact-1"], ["sync-1-0_1"], ["sync-1-0_2"]]);
    }
}
