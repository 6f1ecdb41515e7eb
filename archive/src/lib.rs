//! Strata's archive format, shared by the writer (ingest) and the reader (archive API).
//!
//! An archive is a prefix in any `object_store` backend (a local directory by default, an
//! S3-compatible bucket in production) holding:
//!
//! - `tables/{table}/{run}-{seq}.parquet`: archived rows as zstd-compressed Parquet with Parquet
//!   modular encryption (AES-GCM, encrypted footer, every column encrypted). Each file has its
//!   own data key, wrapped by a key-encryption key (KEK); the wrapped key sits in the file's key
//!   metadata in the Parquet key-management JSON format, so other Parquet readers given a KMS
//!   client can open it. Rows are sorted by patient key, with a bloom filter on it.
//! - `tables/{table}/_KEY_MATERIAL_FOR_{file}.json`: each file's data key wrapped by the KEK
//!   (Parquet's external key material), so a KEK rotation ([`rotate_keys`]) rewrites only these.
//! - `blobs/{id[0..2]}/{id}`: BLOBs encrypted in fixed-size AES-256-GCM segments ([`BlobStore`])
//!   under per-object data keys derived from the archive key and each object's salt.
//! - `tombstones/{table}/{run}-{seq}.parquet`: records the source deleted after they were
//!   archived (written by `strata sync`), encrypted the same way ([`Tombstone`]); with
//!   corrections (a record archived again by a newer run) they decide which copy of a record
//!   is current ([`Successors`]).
//! - `keys/archive-key.json`: the archive's own key, wrapped by the KEK; manifest seals, BLOB
//!   data keys and BLOB object ids are derived from it, so they stay stable when the KEK rotates. KEKs are reached
//!   through the [`KeyService`] trait ([`LocalKeks`] for key files and environment variables).
//! - `manifests/{table}/{run}.json`: the catalog ([`TableManifest`]): which files hold which
//!   patient-key range, with row counts and SHA-256 of every file, so one patient's history opens
//!   only the files that can hold it, and the archive can be verified on its own.
//!
//! Key decision: encoding and encryption are synchronous and work in memory a row group at a
//! time (files stream to the store in parts); only the object-store calls are async. That keeps the format code testable without IO and
//! puts every backend behind one path.
#![deny(missing_docs)]

mod blob;
mod blob_gc;
mod catalog;
mod compact;
mod config;
mod error;
mod keys;
mod layout;
mod manifest;
mod merge;
mod reader;
mod rotate;
mod secret;
mod store;
#[cfg(test)]
mod test_support;
mod tombstone;
mod writer;

pub use blob::{BlobRef, BlobStore, BLOB_SEGMENT_SIZE};
pub use catalog::{runs_of, Catalog, LiveArchive, Refreshed};
pub use compact::{
    compact_table, gc, gc_sweeping, rewrite_table, CompactionReport, Destroyer, MERGE_FAN_IN,
};
pub use config::{ArchiveConfig, PreviousKek};
pub use error::{ArchiveError, Result};
pub use keys::{key_material_path, Kek, KeyRing, KeyService, LocalKeks};
pub use layout::{
    cell, decimal_json, table_schema, ArchivedBatch, ArchivedColumn, Cell, ValueType,
    DECIMAL_TEXT_METADATA,
};
pub use manifest::{
    compacted_since, manifest_run_ids, run_of_writer, withdraw_manifests, FileEntry, TableManifest,
    MANIFEST_FORMAT,
};
pub use reader::{blob_ref, blob_refs, ArchiveReader, VerifyReport};
pub use rotate::{rotate_keys, RotationReport};
pub use secret::SecretSource;
pub use store::{open_store, ArchiveLocation};
pub use tombstone::{tombstone_schema, Fate, Successors, Tombstone, HELD_COLUMN};
pub use writer::{TableWriter, TableWriterOptions};

/// An archive's object store (local disk, S3-compatible, ...).
pub type Store = std::sync::Arc<dyn object_store::ObjectStore>;

/// Name of the column every archived file starts with: the patient key, as text.
pub const PATIENT_COLUMN: &str = "_strata_patient";
/// Name of the second column of every archived file: the record's date (nullable).
pub const RECORD_DATE_COLUMN: &str = "_strata_record_date";
/// Name of the third column: the record's key (its primary key as `col=value`, or a digest of
/// its values for a table without one). A record archived again later (a correction)
/// supersedes the earlier copy with the same key: readers return the newest.
pub const KEY_COLUMN: &str = "_strata_key";

/// The first 8 bytes of a patient key as a big-endian number (zero-padded): comparing these
/// orders patient keys as their bytes do, up to the eighth, so sorting into the archive's
/// order can settle most comparisons without touching the keys.
pub fn patient_sort_prefix(patient: &str) -> u64 {
    let mut prefix = [0u8; 8];
    let p = patient.as_bytes();
    let n = p.len().min(8);
    prefix[..n].copy_from_slice(&p[..n]);
    u64::from_be_bytes(prefix)
}

/// The suffixes of the four columns that replace a BLOB column `c` in archived rows:
/// `c__object` (object id), `c__length`, `c__sha256`, `c__content_type`.
pub const BLOB_REF_SUFFIXES: [&str; 4] = ["__object", "__length", "__sha256", "__content_type"];
