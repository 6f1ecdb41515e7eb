//! Reports as evidence (verification reports, destruction certificates): signed with Ed25519
//! over their canonical JSON (the document without its signature, fields in their fixed
//! order), and checked offline against the public key the config names, never against a key
//! the document carries.

use super::verify::VerifyReport;
use crate::config::MigrationConfig;
use crate::error::{IngestError, Result};
use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// A report's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// `Ed25519`.
    pub algorithm: String,
    /// The signer's public key (hex), for the reader's information: checking uses the
    /// configured one.
    pub public_key: String,
    /// The signature (hex) over the report's canonical JSON without this field.
    pub value: String,
}

fn config_problem(p: String) -> IngestError {
    IngestError::Config { problems: vec![p] }
}

/// Reads a key of 32 bytes written as hex, from a file relative to the config or from an
/// environment variable.
fn hex_key(
    config: &MigrationConfig,
    file: Option<&str>,
    env: Option<&str>,
    what: &str,
) -> Result<Option<[u8; 32]>> {
    let text = match (file, env) {
        (Some(f), _) => std::fs::read_to_string(config.base_dir.join(f))
            .map_err(|e| config_problem(format!("[verify] {what}_file {f}: {e}")))?,
        (None, Some(v)) => std::env::var(v)
            .map_err(|_| config_problem(format!("[verify] {what}_env: {v} is not set")))?,
        (None, None) => return Ok(None),
    };
    hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(Some)
        .ok_or_else(|| config_problem(format!("[verify] {what}: not 64 hex digits")))
}

/// A document Strata signs: its signature is part of it, left out of what it covers.
pub trait Evidence: Serialize + serde::de::DeserializeOwned + Clone {
    /// What the document is, in words ("verification report", "destruction certificate").
    const WHAT: &'static str;
    /// Its signature, if signed.
    fn signature(&self) -> Option<&Signature>;
    /// Sets (or removes) its signature.
    fn set_signature(&mut self, signature: Option<Signature>);
}

impl Evidence for VerifyReport {
    const WHAT: &'static str = "verification report";
    fn signature(&self) -> Option<&Signature> {
        self.signature.as_ref()
    }
    fn set_signature(&mut self, signature: Option<Signature>) {
        self.signature = signature;
    }
}

/// The canonical bytes a signature covers: the document as JSON, without its signature.
fn signed_bytes<E: Evidence>(document: &E) -> Vec<u8> {
    let mut unsigned = document.clone();
    unsigned.set_signature(None);
    serde_json::to_vec(&unsigned).expect("a signed document serializes")
}

/// A signing key as `--new-signing-key --wrapped` writes it: its seed wrapped by the archive's
/// key service.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedSigningKey {
    /// The KEK that wraps it.
    pub kek_id: String,
    /// The wrapped seed.
    pub wrapped: String,
}

/// The configured signing key's seed: in clear from a file or a variable, or unwrapped by the
/// archive's key service.
fn signing_seed(config: &MigrationConfig) -> Result<Option<[u8; 32]>> {
    let Some(v) = &config.verify else {
        return Ok(None);
    };
    let clear = v.signing_key_file.is_some() || v.signing_key_env.is_some();
    if clear && v.signing_key_wrapped_file.is_some() {
        return Err(config_problem(
            "[verify]: name one signing key: signing_key_file, signing_key_env or signing_key_wrapped_file".into(),
        ));
    }
    let Some(f) = &v.signing_key_wrapped_file else {
        return hex_key(
            config,
            v.signing_key_file.as_deref(),
            v.signing_key_env.as_deref(),
            "signing_key",
        );
    };
    let problem = |e: String| config_problem(format!("[verify] signing_key_wrapped_file {f}: {e}"));
    let text =
        std::fs::read_to_string(config.base_dir.join(f)).map_err(|e| problem(e.to_string()))?;
    let key: WrappedSigningKey = serde_json::from_str(&text).map_err(|e| problem(e.to_string()))?;
    let seed = config
        .archive
        .key_ring(&config.base_dir)
        .and_then(|keys| keys.unwrap_secret(&key.kek_id, &key.wrapped))
        .map_err(|e| problem(e.to_string()))?;
    <[u8; 32]>::try_from(seed.as_slice())
        .map(Some)
        .map_err(|_| problem("not an Ed25519 seed".into()))
}

/// Wraps a signing key's seed (hex) with the archive's key service, as
/// `signing_key_wrapped_file` holds it (JSON).
pub fn wrap_signing_key(config: &MigrationConfig, seed_hex: &str) -> Result<String> {
    let seed = hex::decode(seed_hex).map_err(|e| IngestError::Run(e.to_string()))?;
    let (kek_id, wrapped) = config
        .archive
        .key_ring(&config.base_dir)
        .and_then(|keys| keys.wrap_secret(&seed))
        .map_err(|e| IngestError::Run(format!("archive keys: {e}")))?;
    Ok(serde_json::to_string_pretty(&WrappedSigningKey { kek_id, wrapped }).expect("JSON"))
}

/// Whether a signing key is configured (and readable).
pub(super) fn can_sign(config: &MigrationConfig) -> Result<bool> {
    Ok(signing_seed(config)?.is_some())
}

/// Signs `document` with the configured signing key, if one is configured.
pub fn sign<E: Evidence>(config: &MigrationConfig, document: &mut E) -> Result<bool> {
    let Some(seed) = signing_seed(config)? else {
        return Ok(false);
    };
    let key = SigningKey::from_bytes(&seed);
    let signature = key.sign(&signed_bytes(document));
    document.set_signature(Some(Signature {
        algorithm: "Ed25519".into(),
        public_key: hex::encode(key.verifying_key().to_bytes()),
        value: hex::encode(signature.to_bytes()),
    }));
    Ok(true)
}

/// Checks a verification report's text against the configured public key: Ok with the report
/// when its signature is that key's over exactly its contents, else what is wrong.
pub fn check(config: &MigrationConfig, text: &str) -> Result<VerifyReport> {
    check_evidence(config, text)
}

/// Checks a signed document's text against the configured public key: Ok with the document
/// when its signature is that key's over exactly its contents, else what is wrong.
pub fn check_evidence<E: Evidence>(config: &MigrationConfig, text: &str) -> Result<E> {
    let public = config
        .verify
        .as_ref()
        .map(|v| hex_key(config, v.public_key_file.as_deref(), v.public_key_env.as_deref(), "public_key"))
        .transpose()?
        .flatten()
        .ok_or_else(|| config_problem("[verify] public_key_file or public_key_env: no public key to check reports against".into()))?;
    let key = VerifyingKey::from_bytes(&public)
        .map_err(|_| config_problem("[verify] public_key: not an Ed25519 public key".into()))?;
    let report: E = serde_json::from_str(text)
        .map_err(|e| IngestError::Run(format!("not a {}: {e}", E::WHAT)))?;
    let Some(signature) = report.signature() else {
        return Err(IngestError::Run(format!("the {} is not signed", E::WHAT)));
    };
    let value = hex::decode(&signature.value)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| ed25519_dalek::Signature::from_bytes(&b))
        .ok_or_else(|| IngestError::Run(format!("the {}'s signature is malformed", E::WHAT)))?;
    key.verify(&signed_bytes(&report), &value).map_err(|_| {
        IngestError::Run(format!(
            "the {}'s signature does not match its contents under the configured public key: it was edited, or signed with another key",
            E::WHAT
        ))
    })?;
    Ok(report)
}

/// A new signing key: (the seed as hex, for `signing_key_file`; the public key as hex, for
/// `public_key_file`).
pub fn new_signing_key() -> (String, String) {
    let seed: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&seed);
    (
        hex::encode(seed),
        hex::encode(key.verifying_key().to_bytes()),
    )
}
