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
}

/// Where key-encryption keys live. Strata never needs a KEK's bytes, only these three
/// operations, so a production deployment implements this trait over its key service (cloud
/// KMS, HSM, Vault); [`LocalKeks`] is the development implementation (key files, environment).
/// Calls are synchronous because Parquet asks for keys while decoding: implementations that go
/// over the network should cache unwrapped keys briefly.
pub trait KeyService: Send + Sync + fmt::Debug {
    /// The id of the KEK that wraps new data keys.
    fn current_kek_id(&self) -> String;
    /// Wraps a data key with the current KEK.
    fn wrap(&self, data_key: &[u8]) -> Result<String>;
    /// Unwraps a data key wrapped by KEK `kek_id`.
    fn unwrap(&self, kek_id: &str, wrapped: &str) -> Result<Vec<u8>>;
}

/// KEKs held in memory (from key files or environment variables): the current one wraps new data
/// keys; older ones still unwrap, until a rotation has re-wrapped everything.
#[derive(Debug, Clone)]
pub struct LocalKeks {
    current: String,
    keks: BTreeMap<String, Kek>,
}

impl LocalKeks {
    /// Local KEKs whose current one is `current`.
    pub fn new(current: Kek, older: impl IntoIterator<Item = Kek>) -> Self {
        let mut keks: BTreeMap<String, Kek> =
            older.into_iter().map(|k| (k.id.clone(), k)).collect();
        let id = current.id.clone();
        keks.insert(id.clone(), current);
        LocalKeks { current: id, keks }
    }
}

impl KeyService for LocalKeks {
    fn current_kek_id(&self) -> String {
        self.current.clone()
    }

    fn wrap(&self, data_key: &[u8]) -> Result<String> {
        Ok(self.keks[&self.current].wrap(data_key))
    }

    fn unwrap(&self, kek_id: &str, wrapped: &str) -> Result<Vec<u8>> {
        self.keks
            .get(kek_id)
            .ok_or_else(|| ArchiveError::Key(format!("KEK {kek_id:?} is not in the key ring")))?
            .unwrap_key(wrapped)
    }
}

/// Where the archive's own key lives: a random key, wrapped by the KEK like any data key, from
/// which the keys that seal manifests and name BLOB objects are derived. It survives KEK
/// rotations (only its wrapping changes), so object ids and seals stay stable.
pub(crate) const ARCHIVE_KEY_PATH: &str = "keys/archive-key.json";

/// The keys an archive is read and written with: a [`KeyService`] for KEKs and, once
/// [`KeyRing::for_archive`] has loaded it, the archive's own key.
#[derive(Clone)]
pub struct KeyRing {
    service: Arc<dyn KeyService>,
    archive_key: Option<Arc<[u8; 32]>>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl KeyRing {
    /// A key ring over local KEKs whose current one is `current`.
    pub fn new(current: Kek, older: impl IntoIterator<Item = Kek>) -> Self {
        Self::from_service(Arc::new(LocalKeks::new(current, older)))
    }

    /// A key ring over any key service.
    pub fn from_service(service: Arc<dyn KeyService>) -> Self {
        KeyRing {
            service,
            archive_key: None,
        }
    }

    /// Wraps a secret of Strata's own (the signing key of verification reports) with the key
    /// service's current KEK, so that it is kept only wrapped, as data keys are; with a KMS
    /// behind the service, only the KMS can unwrap it. Returns (KEK id, wrapped).
    pub fn wrap_secret(&self, secret: &[u8]) -> Result<(String, String)> {
        Ok((self.service.current_kek_id(), self.service.wrap(secret)?))
    }

    /// Unwraps a secret wrapped by [`KeyRing::wrap_secret`] under KEK `kek_id`.
    pub fn unwrap_secret(&self, kek_id: &str, wrapped: &str) -> Result<Vec<u8>> {
        self.service.unwrap(kek_id, wrapped)
    }

    /// Loads the archive's key from `store`. A writer passes `create` to make it on first use; a
    /// reader never writes, and on an archive without a key (an empty one) stays without.
    pub async fn for_archive(
        mut self,
        store: &dyn object_store::ObjectStore,
        create: bool,
    ) -> Result<Self> {
        use object_store::{path::Path, ObjectStoreExt, PutMode, PutOptions, PutPayload};
        let path = Path::from(ARCHIVE_KEY_PATH);
        let material = match store.get(&path).await {
            Ok(r) => String::from_utf8_lossy(&r.bytes().await?).to_string(),
            Err(object_store::Error::NotFound { .. }) if !create => return Ok(self),
            Err(object_store::Error::NotFound { .. }) => {
                let created = self.key_material(&Self::new_data_key())?;
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                match store
                    .put_opts(&path, PutPayload::from(created.clone().into_bytes()), opts)
                    .await
                {
                    Ok(_) => created,
                    // Another writer created it first: use theirs.
                    Err(object_store::Error::AlreadyExists { .. }) => {
                        String::from_utf8_lossy(&store.get(&path).await?.bytes().await?).to_string()
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let key = self
            .unwrap_key_material(&material)
            .map_err(|e| ArchiveError::Integrity {
                object: ARCHIVE_KEY_PATH.into(),
                detail: format!("the archive key does not unwrap: {e}"),
            })?;
        let key: [u8; 32] = key.try_into().map_err(|_| ArchiveError::Integrity {
            object: ARCHIVE_KEY_PATH.into(),
            detail: "the archive key has the wrong length".into(),
        })?;
        self.archive_key = Some(Arc::new(key));
        Ok(self)
    }

    /// The id of the KEK new data keys are wrapped with.
    pub fn current_kek_id(&self) -> String {
        self.service.current_kek_id()
    }

    /// A key derived from the archive's key for one purpose.
    pub(crate) fn derive(&self, purpose: &str) -> Result<[u8; 32]> {
        use hmac::{Hmac, Mac};
        let key = self.archive_key.as_ref().ok_or_else(|| {
            ArchiveError::Key("the archive key is not loaded (KeyRing::for_archive)".into())
        })?;
        let mut mac =
            <Hmac<sha2::Sha256> as Mac>::new_from_slice(key.as_slice()).expect("any key length");
        mac.update(purpose.as_bytes());
        Ok(mac.finalize().into_bytes().into())
    }

    /// A fresh random data key.
    pub(crate) fn new_data_key() -> Vec<u8> {
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        key
    }

    /// The Parquet key material (PKMT1 JSON) of a data key wrapped by the current KEK.
    pub(crate) fn key_material(&self, data_key: &[u8]) -> Result<String> {
        Ok(serde_json::json!({
            "keyMaterialType": "PKMT1",
            "isFooterKey": true,
            "kmsInstanceID": "DEFAULT",
            "kmsInstanceURL": "DEFAULT",
            "masterKeyID": self.service.current_kek_id(),
            "wrappedDEK": self.service.wrap(data_key)?,
            "doubleWrapping": false,
        })
        .to_string())
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
        self.service
            .unwrap(field("masterKeyID")?, field("wrappedDEK")?)
    }

    /// Re-wraps PKMT1 key material with the current KEK (the data key itself is unchanged).
    pub(crate) fn rewrap_key_material(&self, material: &str) -> Result<String> {
        self.key_material(&self.unwrap_key_material(material)?)
    }
}

/// What a Parquet file carries in its footer key metadata: a reference to key material stored
/// beside it (Parquet's external key material, as pyarrow writes with
/// `internal_key_material=False`), so rotating the KEK rewrites only that small object.
pub(crate) const EXTERNAL_FOOTER_KEY: &str =
    r#"{"keyMaterialType":"PKMT1","internalStorage":false,"keyReference":"footerKey"}"#;

/// The key-material object beside a Parquet file: `_KEY_MATERIAL_FOR_{file name}.json`.
pub fn key_material_path(file_path: &str) -> String {
    match file_path.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/_KEY_MATERIAL_FOR_{name}.json"),
        None => format!("_KEY_MATERIAL_FOR_{file_path}.json"),
    }
}

/// The data file an object belongs to: itself, or for a key-material object
/// ([`key_material_path`]) the file whose key it holds.
pub(crate) fn data_file_of(object: &str) -> String {
    object
        .rsplit_once('/')
        .and_then(|(dir, name)| {
            let name = name
                .strip_prefix("_KEY_MATERIAL_FOR_")?
                .strip_suffix(".json")?;
            Some(format!("{dir}/{name}"))
        })
        .unwrap_or_else(|| object.to_string())
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
