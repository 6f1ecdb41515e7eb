//! The catalog: one manifest per table per run, stored inside the archive itself.

use crate::error::{ArchiveError, Result};
use crate::keys::KeyRing;
use serde::{Deserialize, Serialize};

/// The manifest format version written by this crate.
pub const MANIFEST_FORMAT: u32 = 1;

/// What one run archived for one table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableManifest {
    /// Always [`MANIFEST_FORMAT`] for manifests this version writes.
    pub format: u32,
    /// The source table.
    pub table: String,
    /// The run that wrote it.
    pub run_id: String,
    /// The version of the cutoff policy that decided the rows.
    pub policy_version: String,
    /// When the manifest was written (RFC 3339).
    pub created_at: String,
    /// The source columns that were BLOBs (each stored as four reference columns).
    pub blob_columns: Vec<String>,
    /// The data files, sorted by patient key range.
    pub files: Vec<FileEntry>,
    /// Manifests this one replaces (a compaction): once it is written, readers ignore them. Their
    /// files stay until a retention-safe `gc`. A compaction lists, besides the manifests it
    /// read, every manifest those replaced, so that the list stays complete after `gc`.
    #[serde(default)]
    pub supersedes: Vec<String>,
    /// Of a compaction: the rows of every run manifest it replaces (directly or through an
    /// earlier compaction), by path. With `superseded_copies` it accounts for every row the
    /// runs archived: `archive verify` checks both against the control database's ledger.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub replaced_rows: std::collections::BTreeMap<String, u64>,
    /// Of a compaction: the copies it left out because a later run archived the same record
    /// again (a correction) or deleted it (a tombstone or truncate), over it and the
    /// compactions it replaces. The only rows a
    /// compaction may drop: `rows()` equals the sum of `replaced_rows` minus these.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub superseded_copies: u64,
    /// Of a rewrite for retention (`strata archive retain`): the copies of records destroyed
    /// past retention it left out, over it and the compactions it replaces (their destruction
    /// certified apart). `rows()` equals the sum of `replaced_rows` minus these and the
    /// superseded copies.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub destroyed_copies: u64,
    /// The destruction lists carried out on this table by this rewrite or one it replaced, by
    /// request id, with what each destroyed here (counts, key range, checksums: the pass's own
    /// record). Written with the catalog switch, so that a pass interrupted after it neither
    /// destroys twice nor certifies nothing.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub destructions: std::collections::BTreeMap<String, serde_json::Value>,
    /// Of a compaction: the creation time of the newest manifest it read (RFC 3339). Its copies
    /// are as new as that, not as its own `created_at`: a run that published while the
    /// compaction worked (change sync's corrections and tombstones) ranks after it
    /// ([`TableManifest::ranks_at`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ranks_as_of: String,
    /// Records deleted at the source after earlier runs archived them (written by `strata
    /// sync`): encrypted Parquet files under `tombstones/{table}/` with the patient (empty
    /// when the change did not carry it), record date and key of each, and whether a legal hold
    /// kept the record (see [`crate::Tombstone`]). A tombstone hides the copies of its key that
    /// earlier runs archived; a held one hides nothing and records the deletion.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tombstones: Vec<FileEntry>,
    /// Whether the source table was emptied (`TRUNCATE`) before this manifest's rows: every
    /// copy an earlier run archived is deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// The KEK current when the manifest was sealed (for information: the seal's key is derived
    /// from the archive key, which KEK rotations do not change).
    #[serde(default)]
    pub sealed_by: String,
    /// HMAC-SHA-256 of the manifest (with this field empty) under a key derived from the archive
    /// key, hex: an edited manifest is detected.
    #[serde(default)]
    pub mac: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One encrypted Parquet file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Path inside the archive.
    pub path: String,
    /// Rows in the file.
    pub rows: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the whole file, hex.
    pub sha256: String,
    /// SHA-256 of the file's footer (its encrypted metadata, length and magic), hex. A reader
    /// that reads only some pages checks this instead of the whole file: the footer names the
    /// file's key and per-file AAD, and AES-GCM authenticates every page against them, so a
    /// replaced, swapped or altered file still fails. Empty in manifests written before it was
    /// recorded (those files are checked whole).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub footer_sha256: String,
    /// Smallest patient key in the file (text order).
    pub min_patient: String,
    /// Largest patient key in the file (text order).
    pub max_patient: String,
    /// The KEK that wraps the file's data key.
    pub kek_id: String,
}

impl TableManifest {
    /// An empty manifest for `table` in run `run_id`, to hand to a `TableWriter`.
    pub fn new(table: &str, run_id: &str, policy_version: &str, blob_columns: Vec<String>) -> Self {
        TableManifest {
            format: MANIFEST_FORMAT,
            table: table.to_string(),
            run_id: run_id.to_string(),
            policy_version: policy_version.to_string(),
            created_at: String::new(),
            blob_columns,
            files: Vec::new(),
            supersedes: Vec::new(),
            replaced_rows: Default::default(),
            superseded_copies: 0,
            destroyed_copies: 0,
            destructions: Default::default(),
            ranks_as_of: String::new(),
            tombstones: Vec::new(),
            truncated: false,
            sealed_by: String::new(),
            mac: String::new(),
        }
    }

    fn compute_mac(&self, keys: &KeyRing) -> Result<String> {
        use hmac::{Hmac, Mac};
        let mut unsealed = self.clone();
        unsealed.mac = String::new();
        let key = keys.derive("strata manifest v1")?;
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("any key length");
        mac.update(&serde_json::to_vec(&unsealed).expect("manifest serializes"));
        Ok(hex::encode(mac.finalize().into_bytes()))
    }

    /// Seals the manifest with a key derived from the archive key.
    pub(crate) fn seal(&mut self, keys: &KeyRing) -> Result<()> {
        self.sealed_by = keys.current_kek_id();
        self.mac = self.compute_mac(keys)?;
        Ok(())
    }

    /// Checks the seal; `object` names the manifest in the error.
    pub(crate) fn check_seal(&self, keys: &KeyRing, object: &str) -> Result<()> {
        let integrity = |detail: &str| ArchiveError::Integrity {
            object: object.to_string(),
            detail: detail.to_string(),
        };
        let expected = self.compute_mac(keys)?;
        if expected != self.mac {
            return Err(integrity("manifest was modified (its seal does not match)"));
        }
        Ok(())
    }

    /// When the manifest's copies were made, for ranking runs ([`crate::catalog::runs_of`]):
    /// a compaction's newest input's creation, else its own.
    pub fn ranks_at(&self) -> &str {
        if self.ranks_as_of.is_empty() {
            &self.created_at
        } else {
            &self.ranks_as_of
        }
    }

    /// The manifest's path inside the archive.
    pub fn path(table: &str, run_id: &str) -> String {
        format!("manifests/{table}/{run_id}.json")
    }

    /// The run (or compaction) that wrote the manifest: its writer id without the range and
    /// attempt a bulk migration adds (`{run}-r{range}-{attempt}`). A record archived again by a
    /// later run supersedes its copies of earlier runs; rows of the same run never supersede
    /// one another (two identical rows are two records).
    pub fn run(&self) -> &str {
        run_of_writer(&self.run_id)
    }

    /// Total rows over all files.
    pub fn rows(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum()
    }
}

/// The run of a manifest's writer id: the id without the range and attempt a bulk migration
/// adds (`{run}-r{range}-{attempt}`); any other id is a run of its own (a compaction).
pub fn run_of_writer(id: &str) -> &str {
    let mut parts = id.rsplitn(3, '-');
    let (attempt, range, run) = (parts.next(), parts.next(), parts.next());
    match (attempt, range, run) {
        (Some(a), Some(r), Some(run))
            if a.len() == 4
                && a.bytes().all(|b| b.is_ascii_hexdigit())
                && r.len() > 1
                && r.starts_with('r')
                && r[1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            run
        }
        _ => id,
    }
}

/// Deletes `table`'s manifests whose writer id starts with `prefix`: the manifests of an
/// attempt that did not finish (a range copied again after a crash). Their files are then named
/// by no manifest, so they are not part of the archive, and `gc` removes them (when no run is
/// in progress). Returns how many
/// manifests were deleted.
pub async fn withdraw_manifests(
    store: &dyn object_store::ObjectStore,
    table: &str,
    prefix: &str,
) -> crate::Result<u64> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let dir = object_store::path::Path::from(format!("manifests/{table}"));
    let listed: Vec<_> = store.list(Some(&dir)).try_collect().await?;
    let mut deleted = 0;
    for meta in listed {
        if meta
            .location
            .filename()
            .is_some_and(|name| name.starts_with(prefix))
        {
            store.delete(&meta.location).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// The runs of `table` whose manifest's name starts with `prefix` (published or not yet
/// withdrawn), e.g. the batches a `strata tier` pass wrote, to withdraw those it never
/// committed.
pub async fn manifest_run_ids(
    store: &dyn object_store::ObjectStore,
    table: &str,
    prefix: &str,
) -> crate::Result<Vec<String>> {
    use futures::TryStreamExt;
    let dir = object_store::path::Path::from(format!("manifests/{table}"));
    let listed: Vec<_> = store.list(Some(&dir)).try_collect().await?;
    Ok(listed
        .into_iter()
        .filter_map(|meta| {
            let name = meta.location.filename()?;
            let run = name.strip_suffix(".json")?;
            run.starts_with(prefix).then(|| run.to_string())
        })
        .collect())
}

/// Whether a compaction of `table` superseded manifests of `run_id` (whose records then sit
/// in the compaction's files).
pub async fn compacted_since(
    store: &dyn object_store::ObjectStore,
    table: &str,
    run_id: &str,
) -> crate::Result<bool> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let dir = object_store::path::Path::from(format!("manifests/{table}"));
    let listed: Vec<_> = store.list(Some(&dir)).try_collect().await?;
    let of_run = format!("manifests/{table}/{run_id}");
    for meta in listed {
        if !meta
            .location
            .filename()
            .is_some_and(|n| n.starts_with("compact-"))
        {
            continue;
        }
        let bytes = store.get(&meta.location).await?.bytes().await?;
        let manifest: TableManifest =
            serde_json::from_slice(&bytes).map_err(|e| crate::ArchiveError::Integrity {
                object: meta.location.to_string(),
                detail: format!("not a manifest: {e}"),
            })?;
        if manifest.supersedes.iter().any(|p| p.starts_with(&of_run)) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifests_run_drops_the_range_and_attempt() {
        let m = |id: &str| TableManifest::new("t", id, "p", vec![]);
        assert_eq!(
            m("run-20261128T1200Z-r00003-0a1f").run(),
            "run-20261128T1200Z"
        );
        assert_eq!(
            m("compact-20261128T120000.000001Z").run(),
            "compact-20261128T120000.000001Z"
        );
        assert_eq!(m("r1").run(), "r1");
    }
}
