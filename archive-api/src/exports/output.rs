//! Export files as they are written: streamed to the export location in parts, their SHA-256
//! and size computed on the way (never read back whole).

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use object_store::path::Path;
use object_store::ObjectStore;
use parquet::arrow::AsyncArrowWriter;
use sha2::{Digest, Sha256};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Rows per row group of an exported Parquet file: bounds what the writer buffers.
const ROW_GROUP_ROWS: usize = 128 * 1024;

/// An upload that hashes what passes through it.
pub(crate) struct HashingWrite {
    inner: object_store::buffered::BufWriter,
    sha: Sha256,
    bytes: u64,
}

impl HashingWrite {
    fn new(store: &Arc<dyn ObjectStore>, path: &str) -> Self {
        HashingWrite {
            inner: object_store::buffered::BufWriter::new(store.clone(), Path::from(path)),
            sha: Sha256::new(),
            bytes: 0,
        }
    }

    /// Size and SHA-256 (hex) of what was written.
    fn summary(&self) -> (u64, String) {
        (self.bytes, hex::encode(self.sha.clone().finalize()))
    }
}

impl AsyncWrite for HashingWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.sha.update(&buf[..n]);
                this.bytes += n as u64;
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A file written: its size and SHA-256.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Written {
    /// Bytes.
    pub bytes: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// One exported table as a zstd Parquet file.
pub(crate) struct ParquetOut {
    writer: AsyncArrowWriter<HashingWrite>,
}

impl ParquetOut {
    /// Starts `path` with `schema`.
    pub fn new(
        store: &Arc<dyn ObjectStore>,
        path: &str,
        schema: SchemaRef,
    ) -> Result<Self, String> {
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let writer = AsyncArrowWriter::try_new(HashingWrite::new(store, path), schema, Some(props))
            .map_err(|e| e.to_string())?;
        Ok(ParquetOut { writer })
    }

    /// Appends rows.
    pub async fn write(&mut self, batch: &RecordBatch) -> Result<(), String> {
        self.writer.write(batch).await.map_err(|e| e.to_string())
    }

    /// Ends the file.
    pub async fn finish(mut self) -> Result<Written, String> {
        self.writer.finish().await.map_err(|e| e.to_string())?;
        let (bytes, sha256) = self.writer.into_inner().summary();
        Ok(Written { bytes, sha256 })
    }
}

/// One NDJSON file (one FHIR resource per line).
pub(crate) struct NdjsonOut {
    out: HashingWrite,
    buffer: Vec<u8>,
    /// Lines written.
    pub lines: u64,
}

impl NdjsonOut {
    /// Starts `path`.
    pub fn new(store: &Arc<dyn ObjectStore>, path: &str) -> Self {
        NdjsonOut {
            out: HashingWrite::new(store, path),
            buffer: Vec::with_capacity(1 << 20),
            lines: 0,
        }
    }

    /// Appends one line.
    pub async fn line(&mut self, value: &serde_json::Value) -> Result<(), String> {
        let mut line = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.lines(&line, 1).await
    }

    /// Appends `n` lines already serialized (each ending with a newline).
    pub async fn lines(&mut self, bytes: &[u8], n: u64) -> Result<(), String> {
        self.buffer.extend_from_slice(bytes);
        self.lines += n;
        if self.buffer.len() >= 1 << 20 {
            self.out
                .write_all(&self.buffer)
                .await
                .map_err(|e| e.to_string())?;
            self.buffer.clear();
        }
        Ok(())
    }

    /// Ends the file.
    pub async fn finish(mut self) -> Result<Written, String> {
        self.out
            .write_all(&self.buffer)
            .await
            .map_err(|e| e.to_string())?;
        self.out.shutdown().await.map_err(|e| e.to_string())?;
        let (bytes, sha256) = self.out.summary();
        Ok(Written { bytes, sha256 })
    }
}
