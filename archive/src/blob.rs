//! BLOB objects: encrypted in fixed-size AES-256-GCM segments under a per-object data key.
//!
//! Layout: `STRATAB2` ‖ segment size (u32 LE) ‖ salt (16 random bytes) ‖ segments ‖ binding
//! (32 bytes). Segment `i` is encrypted with nonce `i (u64 BE) ‖ 0 0 0 ‖ final flag` and the
//! salt as associated data, so segments cannot be reordered, dropped, truncated or moved to
//! another object without failing authentication. The binding is a MAC (under a key derived
//! from the archive key) of the object id and the salt, so an object moved to another id is
//! refused even when both have the same size.
//!
//! The object's data key is derived from the archive key and the object's random salt: every
//! object has its own key, no key is stored beside it, and nothing per object calls the key
//! service. The archive key itself is wrapped by the KEK, so rotating the KEK re-wraps one
//! object and rewrites no BLOB.
//!
//! An object's id is a keyed HMAC-SHA-256 of its content's digest: identical content is
//! stored once, and the id reveals nothing about the content without the key. Content already
//! in memory is written with one `PUT` under its id. Streamed content is encrypted segment by
//! segment into a multipart upload under `blobs/tmp/{salt}` and renamed to its id once the
//! content (and so the id) is known; memory stays at a few segments plus the upload's part
//! buffer, whatever the document's size.

use crate::error::{ArchiveError, Result};
use crate::keys::KeyRing;
use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Plaintext bytes per encrypted segment.
pub const BLOB_SEGMENT_SIZE: usize = 64 * 1024;
const MAGIC: &[u8; 8] = b"STRATAB2";
const BINDING_LEN: usize = 32;
const TAG_LEN: usize = 16;
const SALT_LEN: usize = 16;
const HEADER_LEN: usize = 12 + SALT_LEN;

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

/// An object's header: magic, segment size, salt.
fn header(salt: &[u8; SALT_LEN]) -> Vec<u8> {
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&(BLOB_SEGMENT_SIZE as u32).to_le_bytes());
    header.extend_from_slice(salt);
    header
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
    /// The content is in memory already, so its id is known before anything is written:
    /// content stored before costs one `HEAD`, new content one `PUT` straight to its place
    /// (no temporary object to rename, which object stores implement as copy and delete).
    ///
    /// The content is encrypted in place, segment by segment, and written as the segments and
    /// their tags in order (the object is one buffer plus the tags, never a second copy).
    pub async fn put(&self, content: impl Into<Vec<u8>>, content_type: &str) -> Result<BlobRef> {
        let mut content: Vec<u8> = content.into();
        let digest = Sha256::digest(&content);
        let object = self.object_id(&digest)?;
        let reference = BlobRef {
            object: object.clone(),
            length: content.len() as u64,
            sha256: hex::encode(digest),
            content_type: content_type.to_string(),
        };
        let path = Path::from(Self::object_path(&object));
        match self.store.head(&path).await {
            Ok(_) => return Ok(reference),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let mut salt = [0u8; SALT_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
        let cipher = self.cipher(&salt)?;
        let length = content.len();
        let segments = length.div_ceil(BLOB_SEGMENT_SIZE).max(1);
        let mut tags = Vec::with_capacity(segments * TAG_LEN);
        for index in 0..segments {
            let start = index * BLOB_SEGMENT_SIZE;
            let end = (start + BLOB_SEGMENT_SIZE).min(length);
            let tag = cipher
                .encrypt_inout_detached(
                    &nonce(index as u64, index + 1 == segments),
                    &salt,
                    (&mut content[start..end]).into(),
                )
                .expect("segment encrypts");
            tags.extend_from_slice(&tag);
        }
        let (sealed, tags) = (Bytes::from(content), Bytes::from(tags));
        let mut parts = Vec::with_capacity(2 * segments + 2);
        parts.push(Bytes::copy_from_slice(&header(&salt)));
        for index in 0..segments {
            let start = index * BLOB_SEGMENT_SIZE;
            parts.push(sealed.slice(start..(start + BLOB_SEGMENT_SIZE).min(length)));
            parts.push(tags.slice(index * TAG_LEN..(index + 1) * TAG_LEN));
        }
        parts.push(Bytes::copy_from_slice(&self.binding(&object, &salt)?));
        self.store
            .put(&path, parts.into_iter().collect::<PutPayload>())
            .await?;
        Ok(reference)
    }

    /// The object id of content with this SHA-256: keyed (it reveals nothing about the
    /// content to whoever lacks the archive key) and content-determined (identical content is
    /// stored once).
    fn object_id(&self, digest: &[u8]) -> Result<String> {
        let id_key = self.keys.derive("strata blob id v2")?;
        let mut id_mac = <Hmac<Sha256> as Mac>::new_from_slice(&id_key).expect("any key length");
        id_mac.update(digest);
        Ok(hex::encode(id_mac.finalize().into_bytes()))
    }

    /// Encrypts and stores a stream of bytes, never holding it whole: see the module doc.
    pub async fn put_stream<S>(&self, content: S, content_type: &str) -> Result<BlobRef>
    where
        S: futures::Stream<Item = std::io::Result<Bytes>> + Unpin,
    {
        use futures::StreamExt;
        let mut sha = Sha256::new();
        let mut salt = [0u8; SALT_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
        let cipher = self.cipher(&salt)?;
        let tmp = Path::from(format!("blobs/tmp/{}", hex::encode(salt)));
        let mut upload = WriteMultipart::new(self.store.put_multipart(&tmp).await?);
        upload.write(&header(&salt));
        // A full segment is encrypted only once more data shows it is not the last one.
        let mut pending: Vec<u8> = Vec::with_capacity(BLOB_SEGMENT_SIZE);
        let (mut index, mut length) = (0u64, 0u64);
        let mut content = content;
        while let Some(chunk) = content.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = upload.abort().await;
                    return Err(ArchiveError::Io(e));
                }
            };
            sha.update(&chunk);
            length += chunk.len() as u64;
            let mut rest: &[u8] = &chunk;
            while !rest.is_empty() {
                if pending.len() == BLOB_SEGMENT_SIZE {
                    let ct = cipher
                        .encrypt(
                            &nonce(index, false),
                            Payload {
                                msg: &pending,
                                aad: &salt,
                            },
                        )
                        .expect("segment encrypts");
                    upload.wait_for_capacity(4).await?;
                    upload.write(&ct);
                    index += 1;
                    pending.clear();
                }
                let take = (BLOB_SEGMENT_SIZE - pending.len()).min(rest.len());
                pending.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
            }
        }
        let ct = cipher
            .encrypt(
                &nonce(index, true),
                Payload {
                    msg: &pending,
                    aad: &salt,
                },
            )
            .expect("segment encrypts");
        upload.write(&ct);
        let digest = sha.finalize();
        let object = self.object_id(&digest)?;
        upload.write(&self.binding(&object, &salt)?);
        upload.finish().await?;
        let reference = BlobRef {
            object: object.clone(),
            length,
            sha256: hex::encode(digest),
            content_type: content_type.to_string(),
        };
        let path = Path::from(Self::object_path(&object));
        match self.store.head(&path).await {
            Ok(_) => {
                // Stored before: keep the existing object, drop this copy.
                self.store.delete(&tmp).await?;
                return Ok(reference);
            }
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.store.rename(&tmp, &path).await?;
        Ok(reference)
    }

    /// MAC of an object id and its salt under a key derived from the archive key.
    fn binding(&self, object: &str, salt: &[u8]) -> Result<[u8; BINDING_LEN]> {
        let key = self.keys.derive("strata blob binding v2")?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("any key length");
        mac.update(object.as_bytes());
        mac.update(salt);
        Ok(mac.finalize().into_bytes().into())
    }

    /// The cipher of the object with this salt: its data key is derived from the archive key.
    fn cipher(&self, salt: &[u8]) -> Result<Aes256Gcm> {
        let key = self.keys.derive("strata blob data key v2")?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("any key length");
        mac.update(salt);
        Ok(Aes256Gcm::new_from_slice(&mac.finalize().into_bytes()).expect("32-byte key"))
    }

    /// Checks that an object's binding names this id and salt.
    fn check_binding(&self, object: &str, salt: &[u8], binding: &[u8]) -> Result<()> {
        let expected = self.binding(object, salt)?;
        if binding != expected.as_slice() {
            return Err(ArchiveError::Integrity {
                object: Self::object_path(object),
                detail: "the object does not belong to this id (swapped or edited)".into(),
            });
        }
        Ok(())
    }

    /// Reads, decrypts and verifies a BLOB against its reference. Any mismatch is an
    /// [`ArchiveError::Integrity`] naming the object; no partial data is returned.
    pub async fn get(&self, reference: &BlobRef) -> Result<Bytes> {
        self.get_range(reference, 0..reference.length).await
    }

    /// Reads bytes `range` of a BLOB, fetching and decrypting only the segments that hold them
    /// (see [`BlobStore::stream_range`]), collected.
    pub async fn get_range(
        &self,
        reference: &BlobRef,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes> {
        let mut stream = std::pin::pin!(self.stream_range(reference, range).await?);
        let mut plain = Vec::new();
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            plain.extend_from_slice(&chunk?);
        }
        Ok(Bytes::from(plain))
    }

    /// Streams bytes `range` of a BLOB, fetching and decrypting a few segments at a time: memory
    /// stays at [`SEGMENTS_PER_FETCH`] segments whatever the document's size.
    ///
    /// Before the first byte: the object must exist, its size must match the catalogued length
    /// and its binding must name this id. Then every segment is authenticated before any of its
    /// bytes is yielded (its index, whether it is the last, and the object's salt are bound in),
    /// so only authentic bytes of this object, at their position, are ever handed out. A whole
    /// read (`0..length`) also checks the catalogued SHA-256 at the end. Any failure is an
    /// [`ArchiveError::Integrity`] naming the object, and ends the stream.
    pub async fn stream_range(
        &self,
        reference: &BlobRef,
        range: std::ops::Range<u64>,
    ) -> Result<impl futures::Stream<Item = Result<Bytes>> + Send + 'static> {
        let path_text = Self::object_path(&reference.object);
        let integrity = |detail: &str| ArchiveError::Integrity {
            object: path_text.clone(),
            detail: detail.to_string(),
        };
        if range.start > range.end || range.end > reference.length {
            return Err(ArchiveError::Location {
                location: path_text.clone(),
                detail: format!(
                    "range {}..{} is outside the object's {} bytes",
                    range.start, range.end, reference.length
                ),
            });
        }
        let path = Path::from(path_text.as_str());
        let size = match self.store.head(&path).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(integrity("object is missing"))
            }
            Err(e) => return Err(e.into()),
        };
        let head = self
            .store
            .get_range(&path, 0..size.min(HEADER_LEN as u64))
            .await?;
        let (segment_size, salt, _) =
            parse_header(&head).ok_or_else(|| integrity("malformed header"))?;
        let salt = salt.to_vec();
        let seg = segment_size as u64;
        let segments = reference.length.div_ceil(seg).max(1);
        let sealed_len = HEADER_LEN as u64 + reference.length + segments * TAG_LEN as u64;
        if size != sealed_len + BINDING_LEN as u64 {
            return Err(integrity("size differs from the catalogued length"));
        }
        let binding = self.store.get_range(&path, sealed_len..size).await?;
        self.check_binding(&reference.object, &salt, &binding)?;
        let whole = range.start == 0 && range.end == reference.length;
        let state = SegmentReader {
            store: self.store.clone(),
            path,
            path_text,
            cipher: self.cipher(&salt)?,
            salt,
            seg,
            segments,
            sealed_len,
            // An empty range reads no segment, except the whole of an empty object: its one
            // (empty) segment is still authenticated.
            next: if range.is_empty() && !whole {
                segments
            } else {
                range.start / seg
            },
            last: range.end.saturating_sub(1) / seg,
            range,
            digest: whole.then(|| (Sha256::new(), reference.sha256.clone())),
        };
        Ok(futures::stream::try_unfold(state, |mut s| async move {
            let chunk = s.next_chunk().await?;
            Ok(chunk.map(|c| (c, s)))
        }))
    }
}

/// Segments fetched and decrypted per read of a streamed BLOB (1 MiB of plaintext).
pub const SEGMENTS_PER_FETCH: u64 = 16;

/// The state of [`BlobStore::stream_range`].
struct SegmentReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    path_text: String,
    cipher: Aes256Gcm,
    salt: Vec<u8>,
    seg: u64,
    segments: u64,
    sealed_len: u64,
    /// The next segment to read, and the last one the range needs.
    next: u64,
    last: u64,
    range: std::ops::Range<u64>,
    /// For a whole read: the running digest and the catalogued one.
    digest: Option<(Sha256, String)>,
}

impl SegmentReader {
    /// The next piece of plaintext, or None after the range's last byte.
    async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        let integrity = |detail: String| ArchiveError::Integrity {
            object: self.path_text.clone(),
            detail,
        };
        if self.next > self.last || self.next >= self.segments {
            if let Some((digest, expected)) = self.digest.take() {
                if hex::encode(digest.finalize()) != expected {
                    return Err(integrity(
                        "SHA-256 differs from the catalogued digest".into(),
                    ));
                }
            }
            return Ok(None);
        }
        let stride = self.seg + TAG_LEN as u64;
        let upto = (self.next + SEGMENTS_PER_FETCH - 1).min(self.last);
        let start = HEADER_LEN as u64 + self.next * stride;
        let end = (HEADER_LEN as u64 + (upto + 1) * stride).min(self.sealed_len);
        let body = self.store.get_range(&self.path, start..end).await?;
        let mut plain = Vec::with_capacity(body.len());
        for (n, chunk) in body.chunks(stride as usize).enumerate() {
            let i = self.next + n as u64;
            let pt = self
                .cipher
                .decrypt(
                    &nonce(i, i + 1 == self.segments),
                    Payload {
                        msg: chunk,
                        aad: &self.salt,
                    },
                )
                .map_err(|_| integrity(format!("segment {i} fails authentication")))?;
            let seg_start = i * self.seg;
            let from = self.range.start.saturating_sub(seg_start) as usize;
            let to = ((self.range.end - seg_start) as usize).min(pt.len());
            plain.extend_from_slice(&pt[from.min(to)..to]);
        }
        self.next = upto + 1;
        if let Some((digest, _)) = &mut self.digest {
            digest.update(&plain);
        }
        Ok(Some(Bytes::from(plain)))
    }
}

fn parse_header(raw: &[u8]) -> Option<(usize, &[u8], &[u8])> {
    let rest = raw.strip_prefix(MAGIC.as_slice())?;
    let segment_size = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let salt = rest.get(4..4 + SALT_LEN)?;
    (segment_size > 0).then_some((segment_size, salt, &rest[4 + SALT_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Kek;
    use object_store::memory::InMemory;

    async fn store() -> (Arc<dyn ObjectStore>, BlobStore) {
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let keys = KeyRing::new(Kek::from_hex("k1", &Kek::generate_hex()).unwrap(), [])
            .for_archive(mem.as_ref(), true)
            .await
            .unwrap();
        (mem.clone(), BlobStore::new(mem, keys))
    }

    #[tokio::test]
    async fn round_trips_and_dedups() {
        let (_, blobs) = store().await;
        for len in [
            0,
            1,
            BLOB_SEGMENT_SIZE - 1,
            BLOB_SEGMENT_SIZE,
            3 * BLOB_SEGMENT_SIZE + 7,
        ] {
            let content: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let r = blobs
                .put(content.as_slice(), "application/octet-stream")
                .await
                .unwrap();
            assert_eq!(
                r,
                blobs
                    .put(content.as_slice(), "application/octet-stream")
                    .await
                    .unwrap()
            );
            assert_eq!(blobs.get(&r).await.unwrap().as_ref(), content.as_slice());
        }
    }

    #[tokio::test]
    async fn streams_in_small_chunks_and_binds_keys_to_objects() {
        let (mem, blobs) = store().await;
        let content: Vec<u8> = (0..5 * BLOB_SEGMENT_SIZE + 999)
            .map(|i| (i * 13 % 251) as u8)
            .collect();
        let chunks: Vec<std::io::Result<Bytes>> = content
            .chunks(1000)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let streamed = blobs
            .put_stream(futures::stream::iter(chunks), "application/dicom")
            .await
            .unwrap();
        // Another document of the same size, so only the key binding can tell them apart.
        let different: Vec<u8> = content.iter().map(|b| b ^ 0xff).collect();
        let other = blobs
            .put(different.as_slice(), "application/dicom")
            .await
            .unwrap();
        assert_eq!(
            blobs.get(&streamed).await.unwrap().as_ref(),
            content.as_slice()
        );
        // Same content, one object (and no temporary objects left).
        assert_eq!(
            blobs
                .put(content.as_slice(), "application/dicom")
                .await
                .unwrap()
                .object,
            streamed.object
        );
        let listed: Vec<_> =
            futures::TryStreamExt::try_collect::<Vec<_>>(mem.list(Some(&Path::from("blobs/tmp"))))
                .await
                .unwrap();
        assert!(listed.is_empty(), "{listed:?}");
        // Swapping two objects of the same size is detected, by range reads too.
        let (a, b) = (
            BlobStore::object_path(&streamed.object),
            BlobStore::object_path(&other.object),
        );
        {
            let (x, y) = (a.clone(), b.clone());
            let bx = mem
                .get(&Path::from(x.as_str()))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let by = mem
                .get(&Path::from(y.as_str()))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            mem.put(&Path::from(x.as_str()), PutPayload::from(by))
                .await
                .unwrap();
            mem.put(&Path::from(y.as_str()), PutPayload::from(bx))
                .await
                .unwrap();
        }
        for err in [
            blobs.get_range(&streamed, 0..10).await.unwrap_err(),
            blobs.get(&other).await.unwrap_err(),
        ] {
            assert!(
                err.to_string().contains("does not belong to this id"),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn range_reads_decrypt_only_what_they_need() {
        let (_, blobs) = store().await;
        let content: Vec<u8> = (0..3 * BLOB_SEGMENT_SIZE + 123)
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let r = blobs
            .put(content.as_slice(), "application/dicom")
            .await
            .unwrap();
        let n = content.len() as u64;
        let seg = BLOB_SEGMENT_SIZE as u64;
        for range in [
            0..0,
            0..1,
            0..n,
            5..seg,
            seg - 1..seg + 1,
            seg..2 * seg,
            2 * seg + 7..n,
            n - 1..n,
            n..n,
        ] {
            let got = blobs.get_range(&r, range.clone()).await.unwrap();
            assert_eq!(
                got.as_ref(),
                &content[range.start as usize..range.end as usize],
                "{range:?}"
            );
        }
        assert!(blobs.get_range(&r, 0..n + 1).await.is_err());
    }

    #[tokio::test]
    async fn detects_flips_and_truncation() {
        let (mem, blobs) = store().await;
        let content = vec![7u8; 2 * BLOB_SEGMENT_SIZE + 10];
        let r = blobs.put(content.as_slice(), "text/plain").await.unwrap();
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
            let last = content.len() as u64 - 5;
            let err = blobs.get_range(&r, last..last + 5).await.unwrap_err();
            assert!(matches!(err, ArchiveError::Integrity { .. }), "{err}");
        }
    }

    /// A document streams in pieces of at most SEGMENTS_PER_FETCH segments; a flipped byte in
    /// one segment ends the stream with an integrity error before any byte of that segment.
    #[tokio::test]
    async fn streams_in_pieces_and_stops_at_a_bad_segment() {
        let (mem, blobs) = store().await;
        let content: Vec<u8> = (0..5 * 1024 * 1024 + 123)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let r = blobs
            .put(content.clone(), "application/dicom")
            .await
            .unwrap();
        let stream = blobs.stream_range(&r, 0..r.length).await.unwrap();
        let pieces: Vec<Bytes> = futures::TryStreamExt::try_collect(stream).await.unwrap();
        let piece = BLOB_SEGMENT_SIZE * SEGMENTS_PER_FETCH as usize;
        assert_eq!(pieces.len(), content.len().div_ceil(piece));
        assert!(pieces.iter().all(|p| p.len() <= piece));
        assert_eq!(pieces.concat(), content);

        let path = Path::from(BlobStore::object_path(&r.object));
        let mut raw = mem
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let bad_segment = 40;
        raw[HEADER_LEN + bad_segment * (BLOB_SEGMENT_SIZE + TAG_LEN) + 7] ^= 1;
        mem.put(&path, raw.into()).await.unwrap();
        let mut stream = std::pin::pin!(blobs.stream_range(&r, 0..r.length).await.unwrap());
        let mut good = 0;
        let err = loop {
            match futures::StreamExt::next(&mut stream).await.unwrap() {
                Ok(p) => good += p.len(),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, ArchiveError::Integrity { .. }), "{err}");
        assert!(err.to_string().contains("segment 40"), "{err}");
        assert_eq!(
            good,
            2 * piece,
            "the pieces before the bad one, nothing of it"
        );
        assert!(
            blobs.get_range(&r, 0..1000).await.is_ok(),
            "ranges before it still read"
        );
    }
}
