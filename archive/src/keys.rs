//! Envelope keys: a random data key per object, wrapped by a named key-encryption key (KEK).
//!
//! Wrapping is AES-256-GCM under the KEK with the KEK id as associated data; the wrapped form is
//! `base64(nonce ‖ ciphertext ‖ tag)`. Parquet files carry it in the key-management JSON that
//! the Parquet ecosystem (pyarrow's `CryptoFactory`) understands:
//! `{"keyMaterialType":"PKMT1","internalStorage":true,"isFooterKey":true,"kmsInstanceID":
//! "DEFAULT","kmsInstanceURL":"DEFAULT","masterKeyID":ID,"wrappedDEK":...,"doubleWrapping":false}`.

use crate::error::{ArchiveError, Result};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A key-encryption key: an id and 32 bytes. `Debug` never prints the key.
#[derive(Clone)]
pub struct Kek {
    id: String,
    key: [u8; 32],
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Kek {
    /// A KEK from its id and 64 hex characters.
    pub fn from_hex(id: &str, hex_key: &str) -> Result<Self> {
        let bytes = hex::decode(hex_key.trim())
            .map_err(|_| ArchiveError::Key(format!("KEK {id:?} is not hex")))?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| {
            ArchiveError::Key(format!("KEK {id:?} must be 32 bytes (64 hex characters)"))
        })?;
        if id.is_empty() {
            return Err(ArchiveError::Key("KEK id must not be empty".into()));
        }
        Ok(Kek {
            id: id.to_string(),
            key,
        })
    }

    /// A fresh random KEK, as hex (for `strata demo` and tests; production keys come from a KMS).
    pub fn generate_hex() -> String {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        hex::encode(key)
    }

    /// The KEK's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(&self.key).expect("32-byte key")
    }

    /// Wraps a data key.
    pub fn wrap(&self, data_key: &[u8]) -> String {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher()
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: data_key,
                    aad: self.id.as_bytes(),
                },
            )
            .expect("AES-GCM encryption does not fail for small inputs");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// Unwraps a data key; fails on a wrong KEK or a modified wrapped key.
    pub fn unwrap_key(&self, wrapped: &str) -> Result<Vec<u8>> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(wrapped)
            .map_err(|_| ArchiveError::Key("wrapped data key is not base64".into()))?;
        if raw.len() < 12 + 16 {
            return Err(ArchiveError::Key("wrapped data key is too short".into()));
        }
        let nonce: [u8; 12] = raw[..12].try_into().expect("12 bytes");
        self.cipher()
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &raw[12..],
                    aad: self.id.as_bytes(),
                },
            )
            .map_err(|_| {
                ArchiveError::Key(format!("data key does not unwrap with KEK {:?}", self.id))
            })
    }

    pub(crate) fn derive(&self, purpose: &str) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        let mut mac =
            <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.key).expect("any key length");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// The KEKs an archive may use: the current one wraps new data keys; older ones still unwrap.
#[derive(Debug, Clone)]
pub struct KeyRing {
    current: String,
    keys: Arc<BTreeMap<String, Kek>>,
}

impl KeyRing {
    /// A key ring whose current KEK is `current`.
    pub fn new(current: Kek, older: impl IntoIterator<Item = Kek>) -> Self {
        let mut keys: BTreeMap<String, Kek> =
            older.into_iter().map(|k| (k.id.clone(), k)).collect();
        let id = current.id.clone();
        keys.insert(id.clone(), current);
        KeyRing {
            current: id,
            keys: Arc::new(keys),
        }
    }

    /// The KEK new data keys are wrapped with.
    pub fn current(&self) -> &Kek {
        &self.keys[&self.current]
    }

    /// A KEK by id.
    pub fn get(&self, id: &str) -> Result<&Kek> {
        self.keys
            .get(id)
            .ok_or_else(|| ArchiveError::Key(format!("KEK {id:?} is not in the key ring")))
    }

    /// A fresh random data key.
    pub(crate) fn new_data_key() -> Vec<u8> {
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        key
    }

    /// The Parquet key material (PKMT1 JSON) of a data key wrapped by the current KEK.
    pub(crate) fn key_material(&self, data_key: &[u8]) -> String {
        let kek = self.current();
        serde_json::json!({
            "keyMaterialType": "PKMT1",
            "isFooterKey": true,
            "kmsInstanceID": "DEFAULT",
            "kmsInstanceURL": "DEFAULT",
            "masterKeyID": kek.id(),
            "wrappedDEK": kek.wrap(data_key),
            "doubleWrapping": false,
        })
        .to_string()
    }

    /// Unwraps the data key in PKMT1 key material.
    pub(crate) fn unwrap_key_material(&self, material: &str) -> Result<Vec<u8>> {
        let json: serde_json::Value = serde_json::from_str(material).map_err(|_| {
            ArchiveError::Key("key material is not Parquet key-management JSON".into())
        })?;
        let field = |name: &str| {
            json.get(name)
                .and_then(|v| v.as_str())
                .ok_or_else(|| ArchiveError::Key(format!("key material has no {name:?}")))
        };
        self.get(field("masterKeyID")?)?
            .unwrap_key(field("wrappedDEK")?)
    }

    /// Re-wraps PKMT1 key material with the current KEK (the data key itself is unchanged).
    pub(crate) fn rewrap_key_material(&self, material: &str) -> Result<String> {
        Ok(self.key_material(&self.unwrap_key_material(material)?))
    }
}

/// What a Parquet file carries in its footer key metadata: a reference to key material stored
/// beside it (Parquet's external key material, as pyarrow writes with
/// `internal_key_material=False`), so rotating the KEK rewrites only that small object.
pub(crate) const EXTERNAL_FOOTER_KEY: &str =
    r#"{"keyMaterialType":"PKMT1","internalStorage":false,"keyReference":"footerKey"}"#;

/// The key-material object beside a Parquet file: `_KEY_MATERIAL_FOR_{file name}.json`.
pub(crate) fn key_material_path(file_path: &str) -> String {
    match file_path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/_KEY_MATERIAL_FOR_{name}.json"),
        None => format!("_KEY_MATERIAL_FOR_{file_path}.json"),
    }
}

/// Gives the parquet crate one file's data key, from its external key material.
pub(crate) struct ParquetKeyRetriever {
    pub keys: KeyRing,
    /// The key-material object's map: key reference → PKMT1 JSON.
    pub materials: serde_json::Map<String, serde_json::Value>,
}

impl parquet::encryption::decrypt::KeyRetriever for ParquetKeyRetriever {
    fn retrieve_key(&self, key_metadata: &[u8]) -> parquet::errors::Result<Vec<u8>> {
        let general = |m: String| parquet::errors::ParquetError::General(m);
        let meta: serde_json::Value = serde_json::from_slice(key_metadata)
            .map_err(|_| general("key metadata is not JSON".into()))?;
        let material = match meta.get("keyReference").and_then(|r| r.as_str()) {
            Some(reference) => self
                .materials
                .get(reference)
                .and_then(|m| m.as_str())
                .ok_or_else(|| general(format!("no key material for {reference:?}")))?
                .to_string(),
            None => String::from_utf8_lossy(key_metadata).to_string(),
        };
        self.keys
            .unwrap_key_material(&material)
            .map_err(|e| general(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_unwrap_and_wrong_key() {
        let a = Kek::from_hex("a", &Kek::generate_hex()).unwrap();
        let b = Kek::from_hex("b", &Kek::generate_hex()).unwrap();
        let dk = KeyRing::new_data_key();
        let wrapped = a.wrap(&dk);
        assert_eq!(a.unwrap_key(&wrapped).unwrap(), dk);
        assert!(b.unwrap_key(&wrapped).is_err());
        assert!(!format!("{a:?}").contains(&hex::encode(a.key)));
        assert!(Kek::from_hex("x", "abcd").is_err());
    }
}
