//! Retention inside the archive, the destroying step: every `retain` destruction list a records
//! manager approved (see `strata_control::DestructionRequest`) is carried out by rewriting
//! each of its tables without the listed records (`strata_archive::rewrite_table`: a streaming
//! merge, then the catalog switch), recorded as destruction records, and certified (a signed
//! [`DestructionCertificate`]). A record a legal hold placed since the approval covers is kept
//! and counted. The files replaced, and their data keys, go with `gc` after its grace period;
//! so do BLOBs no record refers to any more.
//!
//! Filing the lists (finding the archived records past retention under the policy in force)
//! is the pass's first step, separate from this one.

use super::canonical::{RowDigest, Sum};
use super::certificate::{DestroyedTable, DestructionCertificate};
use crate::config::MigrationConfig;
use crate::error::{IngestError, Result};
use arrow::array::{Array, RecordBatch};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use strata_archive::{ArchivedBatch, Destroyer, TableWriterOptions};
use strata_control::{Control, DestructionRecord, DestructionRequest, RequestStatus};
use strata_cutoff_policies::LegalHold;

/// A `retain` list as the first step files it (the request's summary): per table, the record
/// keys to destroy, with the rules that found them past retention.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RetentionList {
    /// The day retention was reckoned from.
    pub as_of: String,
    /// The rules that destroy them (`table: retention`).
    #[serde(default)]
    pub rules: Vec<String>,
    /// Per table.
    pub tables: BTreeMap<String, ListedTable>,
}

/// One table's part of a list.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ListedTable {
    /// Records on the list.
    pub rows: u64,
    /// Their record keys (as archived: `_strata_key`).
    pub keys: Vec<String>,
}

/// What a list destroyed of one table, as the rewrite's manifest keeps it (`destructions`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct TableDestruction {
    destroyed: DestroyedTable,
    kept_by_holds: u64,
    files_replaced: Vec<String>,
}

/// Leaves out the current copies of the listed records, except those a hold covers now;
/// counts and checksums what it destroys.
struct Listed<'a> {
    request_id: &'a str,
    files_replaced: Vec<String>,
    table: &'a str,
    keys: HashSet<&'a str>,
    holds: &'a [LegalHold],
    blob_columns: &'a [String],
    destroyed: DestroyedTable,
    key_sum: Sum,
    value_sum: Sum,
    kept_by_holds: u64,
}

impl Destroyer for Listed<'_> {
    fn destroy(&mut self, batch: &RecordBatch, row: usize) -> bool {
        // (Asked of every current row of the table: the key is looked at first.)
        let keys = arrow::array::AsArray::as_string::<i32>(batch.column(2));
        if keys.is_null(row) || !self.keys.contains(keys.value(row)) {
            return false;
        }
        let b = ArchivedBatch::new(batch, self.blob_columns);
        let key = keys.value(row);
        let patient = b.patient(row).filter(|p| !p.is_empty());
        // A hold on a column the archived files do not hold under its name (renamed by a
        // mapping) cannot be told apart: it keeps every record of the table (fail closed).
        let held = self.holds.iter().any(|h| {
            let unknown_column = matches!(
                &h.scope,
                strata_cutoff_policies::HoldScope::Filter { table, column, .. }
                    if table == self.table
                        && !batch.schema().fields().iter().any(|f| f.name() == column)
            );
            unknown_column
                || h.covers(self.table, patient, |column| {
                    b.value(column, row)
                        .and_then(|c| c.to_text().map(|t| t.into_owned()))
                })
        });
        if held {
            self.kept_by_holds += 1;
            return false;
        }
        self.destroyed.rows += 1;
        if self.destroyed.key_min.as_deref().is_none_or(|m| key < m) {
            self.destroyed.key_min = Some(key.to_string());
        }
        if self.destroyed.key_max.as_deref().is_none_or(|m| key > m) {
            self.destroyed.key_max = Some(key.to_string());
        }
        self.key_sum.add(&Sha256::digest(key.as_bytes()).into());
        // The values as archived: data columns in the file's order, BLOBs by their hash.
        let mut digest = RowDigest::new();
        for (_, cell) in b.data(row) {
            digest.cell(&cell);
        }
        for (_, blob) in b.blobs(row) {
            digest.blob(Some(&blob.sha256));
        }
        self.value_sum.add(&digest.finish());
        true
    }

    fn record(&self) -> (String, serde_json::Value) {
        let record = TableDestruction {
            destroyed: DestroyedTable {
                key_checksum: self.key_sum.text(),
                value_checksum: self.value_sum.text(),
                ..self.destroyed.clone()
            },
            kept_by_holds: self.kept_by_holds,
            files_replaced: self.files_replaced.clone(),
        };
        (
            self.request_id.to_string(),
            serde_json::to_value(record).expect("a record serializes"),
        )
    }
}

/// Carries out every approved `retain` list: see the module's docs. Returns the certificates,
/// each signed with the `[verify]` signing key (required: a destruction is not carried out
/// without its certificate).
pub async fn carry_out_retention(
    config: &MigrationConfig,
    control: &Control,
) -> Result<Vec<DestructionCertificate>> {
    if !super::evidence::can_sign(config)? {
        return Err(IngestError::Config {
            problems: vec![
                "[verify]: a destruction is certified with a signing key (signing_key_file, signing_key_env or signing_key_wrapped_file): none is configured, so nothing is destroyed".into(),
            ],
        });
    }
    let approved: Vec<DestructionRequest> = control
        .destruction_requests()
        .await?
        .into_iter()
        .filter(|r| r.kind == "retain" && r.status == RequestStatus::Approved)
        .collect();
    let mut certificates = Vec::new();
    if approved.is_empty() {
        return Ok(certificates);
    }
    let holds = super::holds_in_force(control).await?;
    let (store, keys) = config
        .archive
        .open(&config.base_dir)
        .map_err(IngestError::Archive)?;
    for request in approved {
        let list: RetentionList = serde_json::from_value(request.summary.clone()).map_err(|e| {
            IngestError::Run(format!(
                "destruction request {}: not a retention list: {e}",
                request.request_id
            ))
        })?;
        let mut certificate = DestructionCertificate::of_request(&request, &list);
        for (table, listed) in &list.tables {
            let done = table_destruction(&store, &keys, table, &request.request_id, listed, &holds)
                .await?;
            certificate.kept_by_holds += done.kept_by_holds;
            certificate.files_replaced.extend(done.files_replaced);
            let destroyed = done.destroyed;
            control
                .record_destruction(&DestructionRecord {
                    run_id: request.request_id.clone(),
                    table: table.clone(),
                    rows: destroyed.rows,
                    key_min: destroyed.key_min.clone(),
                    key_max: destroyed.key_max.clone(),
                    key_checksum: destroyed.key_checksum.clone(),
                    value_checksum: Some(destroyed.value_checksum.clone()),
                    policy_version: request.policy_version.clone(),
                    policy_hash: request.policy_hash.clone(),
                    void: None,
                })
                .await?;
            certificate.tables.push(destroyed);
        }
        certificate.destroyed_at = chrono::Utc::now().to_rfc3339();
        super::evidence::sign(config, &mut certificate)?;
        let json = serde_json::to_value(&certificate).expect("a certificate serializes");
        control
            .complete_destruction(&request.request_id, &json)
            .await?;
        certificates.push(certificate);
    }
    Ok(certificates)
}

/// Destroys the listed records of `table` (a rewrite, then the catalog switch), or, when a
/// rewrite for this request was already published (a pass interrupted after it), reads back
/// what it destroyed from the table's manifest.
async fn table_destruction(
    store: &strata_archive::Store,
    keys: &strata_archive::KeyRing,
    table: &str,
    request_id: &str,
    listed: &ListedTable,
    holds: &[LegalHold],
) -> Result<TableDestruction> {
    let reader = strata_archive::ArchiveReader::open(store.clone(), keys.clone()).await?;
    let published = reader
        .catalog()
        .tables
        .get(table)
        .into_iter()
        .flatten()
        .find_map(|m| m.destructions.get(request_id));
    if let Some(record) = published {
        return serde_json::from_value(record.clone()).map_err(|e| {
            IngestError::Run(format!(
                "table {table}: the record of destruction {request_id} in its manifest is unreadable: {e}"
            ))
        });
    }
    let blob_columns = reader.catalog().blob_columns(table);
    let mut destroyer = Listed {
        request_id,
        files_replaced: reader
            .ranked_files(table)
            .into_iter()
            .map(|(_, _, f)| f.path.clone())
            .collect(),
        table,
        keys: listed.keys.iter().map(String::as_str).collect(),
        holds,
        blob_columns: &blob_columns,
        destroyed: DestroyedTable {
            table: table.to_string(),
            rows: 0,
            key_min: None,
            key_max: None,
            key_checksum: String::new(),
            value_checksum: String::new(),
        },
        key_sum: Sum::default(),
        value_sum: Sum::default(),
        kept_by_holds: 0,
    };
    strata_archive::rewrite_table(
        store.clone(),
        keys.clone(),
        table,
        TableWriterOptions::default(),
        Some(&mut destroyer),
    )
    .await?;
    let (_, record) = destroyer.record();
    Ok(serde_json::from_value(record).expect("a record reads back"))
}

/// After `strata archive gc` deleted `deleted` (object paths): completes the certificate of
/// every carried-out `retain` list whose replaced files, and their data keys (key material),
/// are all gone now. It gets `keys_destroyed_at` (copies of the files that outlive the delete,
/// in object-store versions or backups, can no longer be read) and `blobs_deleted` (the BLOB
/// objects this gc deleted, no record referring to them any more), and is signed again.
/// Returns the lists completed. Without a signing key, nothing is changed.
pub async fn certify_keys_destroyed(
    config: &MigrationConfig,
    control: &Control,
    deleted: &[String],
) -> Result<Vec<String>> {
    if !super::evidence::can_sign(config)? {
        return Ok(Vec::new());
    }
    let (store, _) = config
        .archive
        .open(&config.base_dir)
        .map_err(IngestError::Archive)?;
    let blobs_deleted = deleted.iter().filter(|p| p.starts_with("blobs/")).count() as u64;
    let mut completed = Vec::new();
    for r in control.destruction_requests().await? {
        if r.kind != "retain" || r.status != RequestStatus::Done {
            continue;
        }
        let Some(json) = &r.certificate else { continue };
        let mut certificate: DestructionCertificate = serde_json::from_value(json.clone())
            .map_err(|e| {
                IngestError::Run(format!(
                    "destruction request {}: its certificate is unreadable: {e}",
                    r.request_id
                ))
            })?;
        if certificate.keys_destroyed_at.is_some() || certificate.files_replaced.is_empty() {
            continue;
        }
        let mut all_gone = true;
        for file in &certificate.files_replaced {
            for path in [file.clone(), strata_archive::key_material_path(file)] {
                match object_store::ObjectStoreExt::head(
                    store.as_ref(),
                    &object_store::path::Path::from(path),
                )
                .await
                {
                    Err(object_store::Error::NotFound { .. }) => {}
                    Ok(_) => all_gone = false,
                    Err(e) => return Err(IngestError::Archive(e.into())),
                }
            }
        }
        if !all_gone {
            continue;
        }
        certificate.keys_destroyed_at = Some(chrono::Utc::now().to_rfc3339());
        certificate.blobs_deleted = blobs_deleted;
        certificate.signature = None;
        super::evidence::sign(config, &mut certificate)?;
        let json = serde_json::to_value(&certificate).expect("a certificate serializes");
        control.complete_destruction(&r.request_id, &json).await?;
        completed.push(r.request_id);
    }
    Ok(completed)
}
