//! BLOB objects: encrypted in fixed-size AES-256-GCM segments under a per-object data key.
//!
//! Layout: `STRATAB1` ‖ segment size (u32 LE) ‖ KEK id (u16 LE length + bytes) ‖ wrapped data
//! key (u16 LE length + bytes) ‖ segments. Segment `i` is encrypted with nonce
//! `i (u64 BE) ‖ 0 0 0 ‖ final flag` and the object id as associated data, so segments cannot be
//! reordered, dropped, truncated or moved to another object without failing authentication.
//! An object's id is a keyed HMAC-SHA-256 of its content: identical content is stored once, and
//! the id reveals nothing about the content to someone without the key.

use crate::error::{ArchiveError, Result};
use crate::keys::KeyRing;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Plaintext bytes per encrypted segment.
pub const BLOB_SEGMENT_SIZE: usize = 64 * 1024;
const MAGIC: &[u8; 8] = b"STRATAB1";
const TAG_LEN: usize = 16;

/// What an archived row keeps of a BLOB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// The object id (64 hex characters).
    pub object: String,
    /// Plaintext length in bytes.
    pub length: u64,
    /// SHA-256 of the plaintext, hex.
    pub sha256: String,
    /// MIME type.
    pub content_type: String,
}

/// Stores and reads encrypted BLOB objects.
#[derive(Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    keys: KeyRing,
}

fn nonce(index: u64, last: bool) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&index.to_be_bytes());
    n[11] = last as u8;
    Nonce::from(n)
}

impl BlobStore {
    /// A BLOB store over an archive's object store.
    pub fn new(store: Arc<dyn ObjectStore>, keys: KeyRing) -> Self {
        BlobStore { store, keys }
    }

    /// The object's path inside the archive.
    pub fn object_path(object: &str) -> String {
        format!("blobs/{}/{}", &object[..2.min(object.len())], object)
    }

    /// Encrypts and stores `content` (once per distinct content) and returns its reference.
    pub async fn put(&self, content: &[u8], content_type: &str) -> Result<BlobRef> {
        let dedup_key = self.keys.current().derive("strata blob id v1");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&dedup_key).expect("any key length");
        mac.update(content);
        let object = hex::encode(mac.finalize().into_bytes());
        let reference = BlobRef {
            object: object.clone(),
            length: content.len() as u64,
            sha256: hex::encode(Sha256::digest(content)),
            content_type: content_type.to_string(),
        };
        let path = Path::from(Self::object_path(&object));
        match self.store.head(&path).await {
            Ok(_) => return Ok(reference),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let data_key = KeyRing::new_data_key();
        let kek = self.keys.current();
        let wrapped = kek.wrap(&data_key);
        let segments = content.len().div_ceil(BLOB_SEGMENT_SIZE).max(1);
        let mut out = Vec::with_capacity(64 + content.len() + segments * TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(BLOB_SEGMENT_SIZE as u32).to_le_bytes());
        for field in [kek.id().as_bytes(), wrapped.as_bytes()] {
            out.extend_from_slice(&(field.len() as u16).to_le_bytes());
            out.extend_from_slice(field);
        }
        let cipher = Aes256Gcm::new_from_slice(&data_key).expect("32-byte key");
        for i in 0..segments {
            let start = i * BLOB_SEGMENT_SIZE;
            let end = (start + BLOB_SEGMENT_SIZE).min(content.len());
            let ct = cipher
                .encrypt(
                    &nonce(i as u64, i + 1 == segments),
                    Payload {
                        msg: &content[start..end],
                        aad: object.as_bytes(),
                    },
                )
                .expect("segment encrypts");
            out.extend_from_slice(&ct);
        }
        self.store.put(&path, PutPayload::from(out)).await?;
        Ok(reference)
    }

    /// Reads, decrypts and verifies a BLOB against its reference. Any mismatch is an
    /// [`ArchiveError::Integrity`] naming the object; no partial data is returned.
    pub async fn get(&self, reference: &BlobRef) -> Result<Bytes> {
        let path_text = Self::object_path(&reference.object);
        let integrity = |detail: &str| ArchiveError::Integrity {
            object: path_text.clone(),
            detail: detail.to_string(),
        };
        let raw = match self.store.get(&Path::from(path_text.as_str())).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(integrity("object is missing"))
            }
            Err(e) => return Err(e.into()),
        };
        let (segment_size, kek_id, wrapped, body) =
            parse_header(&raw).ok_or_else(|| integrity("malformed header"))?;
        let data_key = self
            .keys
            .get(kek_id)?
            .unwrap_key(wrapped)
            .map_err(|_| integrity("data key does not unwrap"))?;
        let cipher = Aes256Gcm::new_from_slice(&data_key)
            .map_err(|_| integrity("data key has the wrong length"))?;
        let stride = segment_size + TAG_LEN;
        let segments = body.len().div_ceil(stride).max(1);
        let mut plain = Vec::with_capacity(body.len());
        for i in 0..segments {
            let start = i * stride;
            let end = (start + stride).min(body.len());
            let pt = cipher
                .decrypt(
                    &nonce(i as u64, i + 1 == segments),
                    Payload {
                        msg: &body[start..end],
                        aad: reference.object.as_bytes(),
                    },
                )
                .map_err(|_| integrity(&format!("segment {i} fails authentication")))?;
            plain.extend_from_slice(&pt);
        }
        if plain.len() as u64 != reference.length {
            return Err(integrity("length differs from the catalogued length"));
        }
        if hex::encode(Sha256::digest(&plain)) != reference.sha256 {
            return Err(integrity("SHA-256 differs from the catalogued digest"));
        }
        Ok(Bytes::from(plain))
    }
}

fn parse_header(raw: &[u8]) -> Option<(usize, &str, &str, &[u8])> {
    let rest = raw.strip_prefix(MAGIC.as_slice())?;
    let segment_size = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let mut rest = &rest[4..];
    let mut fields = [""; 2];
    for field in &mut fields {
        let len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        *field = std::str::from_utf8(rest.get(2..2 + len)?).ok()?;
        rest = &rest[2 + len..];
    }
    (segment_size > 0).then_some((segment_size, fields[0], fields[1], rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Kek;
    use object_store::memory::InMemory;

    fn store() -> (Arc<dyn ObjectStore>, BlobStore) {
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let keys = KeyRing::new(Kek::from_hex("k1", &Kek::generate_hex()).unwrap(), []);
        (mem.clone(), BlobStore::new(mem, keys))
    }

    #[tokio::test]
    async fn round_trips_and_dedups() {
        let (_, blobs) = store();
        for len in [
            0,
            1,
            BLOB_SEGMENT_SIZE - 1,
            BLOB_SEGMENT_SIZE,
            3 * BLOB_SEGMENT_SIZE + 7,
        ] {
            let content: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let r = blobs
                .put(&content, "application/octet-stream")
                .await
                .unwrap();
            assert_eq!(
                r,
                blobs
                    .put(&content, "application/octet-stream")
                    .await
                    .unwrap()
            );
            assert_eq!(blobs.get(&r).await.unwrap().as_ref(), content.as_slice());
        }
    }

    #[tokio::test]
    async fn detects_flips_and_truncation() {
        let (mem, blobs) = store();
        let content = vec![7u8; 2 * BLOB_SEGMENT_SIZE + 10];
        let r = blobs.put(&content, "text/plain").await.unwrap();
        let path = Path::from(BlobStore::object_path(&r.object));
        let good = mem
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        // Dropping the whole final segment leaves a valid-looking but truncated object.
        let truncated = good[..good.len() - (10 + TAG_LEN)].to_vec();
        for bad in [flipped, truncated] {
            mem.put(&path, PutPayload::from(bad)).await.unwrap();
            let err = blobs.get(&r).await.unwrap_err();
            assert!(matches!(err, ArchiveError::Integrity { .. }), "{err}");
        }
    }
}
