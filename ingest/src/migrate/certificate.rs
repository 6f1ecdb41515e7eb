//! Destruction certificates: what a retention or tiering pass destroyed, under which policy
//! and rule, requested and approved by whom (two records managers), with per table the count,
//! key range and checksums of what was destroyed, and the data keys destroyed with the files
//! (so that copies outliving a delete, in object-store versions or backups, cannot be read).
//! Signed like verification reports ([`super::evidence`]), with the same key.

use super::evidence::{Evidence, Signature};
use serde::{Deserialize, Serialize};

/// The certificate format this version writes.
pub const CERTIFICATE_FORMAT: u32 = 1;

/// A signed record of one destruction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestructionCertificate {
    /// [`CERTIFICATE_FORMAT`].
    pub format: u32,
    /// The approved request it carried out.
    pub request_id: String,
    /// `retain` (archived records) or `tier` (operational records).
    pub kind: String,
    /// The policy version and hash that found the records past retention.
    pub policy_version: String,
    /// Its hash.
    pub policy_hash: String,
    /// The rules that destroyed them (`table: retention`), as the policy names them.
    pub rules: Vec<String>,
    /// The day retention was reckoned from.
    pub as_of: String,
    /// Who requested the pass, and when.
    pub requested_by: String,
    /// When.
    pub requested_at: String,
    /// The records manager who approved it (never the requester), and when.
    pub approved_by: String,
    /// When.
    pub approved_at: String,
    /// When the destruction was done (the catalog switched; RFC 3339).
    pub destroyed_at: String,
    /// Per table, what was destroyed.
    pub tables: Vec<DestroyedTable>,
    /// Records on the approved list kept: covered by a legal hold placed since; for `tier`, also
    /// those no longer past retention when carried out (activity since) or still referenced by
    /// another row (a foreign key).
    pub kept_by_holds: u64,
    /// The data files rewritten without the records, whose data keys (key material) are
    /// destroyed when `gc` deletes them after the grace period (`gc` then records them here
    /// as destroyed: see [`DestructionCertificate::keys_destroyed_at`]).
    pub files_replaced: Vec<String>,
    /// When the replaced files and their data keys were deleted, once they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_destroyed_at: Option<String>,
    /// BLOB objects no longer referenced by any record, deleted.
    pub blobs_deleted: u64,
    /// The Ed25519 signature over the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

/// What one table lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyedTable {
    /// The table.
    pub table: String,
    /// Records destroyed.
    pub rows: u64,
    /// Smallest and largest record key destroyed (text order).
    pub key_min: Option<String>,
    /// Largest.
    pub key_max: Option<String>,
    /// Order-independent checksums of the keys and of the values destroyed (as destruction
    /// records have them: `sum256:` and 64 hex digits).
    pub key_checksum: String,
    /// Of the values.
    pub value_checksum: String,
}

impl DestructionCertificate {
    /// The certificate of carrying out `request` (approved), whose list is `list`, not yet
    /// filled in (tables, counts, time) nor signed.
    pub(super) fn of_request(
        request: &strata_control::DestructionRequest,
        list: &super::retention::RetentionList,
    ) -> Self {
        let (approved_by, approved_at, _) = request.decision.clone().unwrap_or_default();
        DestructionCertificate {
            format: CERTIFICATE_FORMAT,
            request_id: request.request_id.clone(),
            kind: request.kind.clone(),
            policy_version: request.policy_version.clone(),
            policy_hash: request.policy_hash.clone(),
            rules: list.rules.clone(),
            as_of: list.as_of.clone(),
            requested_by: request.requested_by.clone(),
            requested_at: request.requested_at.clone(),
            approved_by,
            approved_at,
            destroyed_at: String::new(),
            tables: Vec::new(),
            kept_by_holds: 0,
            files_replaced: Vec::new(),
            keys_destroyed_at: None,
            blobs_deleted: 0,
            signature: None,
        }
    }
}

impl Evidence for DestructionCertificate {
    const WHAT: &'static str = "destruction certificate";
    fn signature(&self) -> Option<&Signature> {
        self.signature.as_ref()
    }
    fn set_signature(&mut self, signature: Option<Signature>) {
        self.signature = signature;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MigrationConfig;

    /// A config whose `[verify]` section names the signing key and public key in `dir`.
    fn config(dir: &std::path::Path) -> MigrationConfig {
        let text = "[source]\nurl = \"sqlite://unused.db\"\n[operational]\nurl = \"sqlite://unused-target.db\"\n\
                    [archive]\nlocation = \"archive\"\nkek_id = \"test\"\n[policy]\nfile = \"policy.toml\"\n\
                    [verify]\nsigning_key_file = \"signing.key\"\npublic_key_file = \"public.key\"\n\
                    [tables.visits]\nprimary_key = [\"id\"]\npatient_key = \"patient\"\nrecord_date = \"seen\"\n";
        MigrationConfig::parse(toml::from_str(text).unwrap(), dir).unwrap()
    }

    fn certificate() -> DestructionCertificate {
        DestructionCertificate {
            format: CERTIFICATE_FORMAT,
            request_id: "destroy-20261129T000000Z-00000001".into(),
            kind: "retain".into(),
            policy_version: "7".into(),
            policy_hash: "abc".into(),
            rules: vec!["visits: retain 10y".into()],
            as_of: "2026-11-29".into(),
            requested_by: "rm-alice".into(),
            requested_at: "2026-11-29T08:00:00Z".into(),
            approved_by: "rm-bob".into(),
            approved_at: "2026-11-29T09:00:00Z".into(),
            destroyed_at: "2026-11-29T09:05:00Z".into(),
            tables: vec![DestroyedTable {
                table: "visits".into(),
                rows: 3,
                key_min: Some("id=1".into()),
                key_max: Some("id=9".into()),
                key_checksum: format!("sum256:{}", "0".repeat(64)),
                value_checksum: format!("sum256:{}", "1".repeat(64)),
            }],
            kept_by_holds: 1,
            files_replaced: vec!["tables/visits/run-1-r00000-0a01-00000.parquet".into()],
            keys_destroyed_at: None,
            blobs_deleted: 2,
            signature: None,
        }
    }

    /// Signed with the configured key, a certificate checks; edited, or signed with another
    /// key, it is refused.
    #[test]
    fn a_certificate_holds_only_as_signed_by_the_configured_key() {
        let dir = tempfile::tempdir().unwrap();
        let (seed, public) = super::super::evidence::new_signing_key();
        std::fs::write(dir.path().join("signing.key"), &seed).unwrap();
        std::fs::write(dir.path().join("public.key"), &public).unwrap();
        let config = config(dir.path());
        let mut signed = certificate();
        assert!(super::super::evidence::sign(&config, &mut signed).unwrap());
        let text = serde_json::to_string_pretty(&signed).unwrap();
        let checked: DestructionCertificate =
            super::super::evidence::check_evidence(&config, &text).unwrap();
        assert_eq!(checked, signed);

        let edited = text.replace("\"rows\": 3", "\"rows\": 2");
        assert_ne!(edited, text);
        let err =
            super::super::evidence::check_evidence::<DestructionCertificate>(&config, &edited)
                .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");

        // Re-signed with another key (which it names): still refused.
        let other = tempfile::tempdir().unwrap();
        let (seed, _) = super::super::evidence::new_signing_key();
        std::fs::write(other.path().join("signing.key"), &seed).unwrap();
        std::fs::write(other.path().join("public.key"), &public).unwrap();
        let mut forged: DestructionCertificate = serde_json::from_str(&edited).unwrap();
        assert!(super::super::evidence::sign(&self::config(other.path()), &mut forged).unwrap());
        let forged = serde_json::to_string(&forged).unwrap();
        let err =
            super::super::evidence::check_evidence::<DestructionCertificate>(&config, &forged)
                .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");

        let mut unsigned = certificate();
        unsigned.signature = None;
        let err = super::super::evidence::check_evidence::<DestructionCertificate>(
            &config,
            &serde_json::to_string(&unsigned).unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("not signed"), "{err}");
    }
}
