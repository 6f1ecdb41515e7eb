//! A streaming k-way merge of archived files in the archive's order (patient key, record date
//! with missing dates first, record key), which compaction and retention rewrite with: memory
//! is bounded by the number of inputs open at once (each holds one decoded batch and the row
//! group being read), not by the table.
//!
//! Every archived file is one sorted sequence ([`crate::TableWriter::write`] takes batches in
//! that order, a file per sorted run); a merge input is a file, or several files that continue
//! one another (what an earlier pass of the merge wrote). An input found out of order fails the
//! merge, naming the file, rather than writing a file that one patient's reads would misread.

use crate::error::{ArchiveError, Result};
use crate::manifest::FileEntry;
use crate::reader::ArchiveReader;
use crate::writer::TableWriter;
use arrow::array::RecordBatch;
use arrow::compute::interleave_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::row::{OwnedRow, RowConverter, Rows, SortField};
use futures::stream::BoxStream;
use futures::StreamExt;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Rows per batch the merge writes.
const OUTPUT_ROWS: usize = 8192;
/// Input batches one output batch may take rows from: when few rows are kept (a rewrite that
/// destroys most), the batch is written early rather than holding many inputs' batches.
const OUTPUT_SOURCES: usize = 64;

/// One sorted input: files read in turn (each continuing the one before), all of one run's
/// rank (see [`crate::runs_of`]; what a copy's fate is decided by).
pub(crate) struct SortedInput {
    /// The files, in order.
    pub files: Vec<FileEntry>,
    /// The rank of the run that archived its rows.
    pub rank: usize,
}

/// Decides, row by row, what the merge keeps: `keep(rank, batch, row)` (the batch in the
/// merge's layout; its third column is the record key).
pub(crate) type Keep<'k> = dyn FnMut(usize, &RecordBatch, usize) -> bool + Send + 'k;

/// An input being read: its current batch, that batch's sort keys and the row reached.
struct Cursor {
    rank: usize,
    files: std::vec::IntoIter<FileEntry>,
    file: String,
    stream: Option<BoxStream<'static, Result<RecordBatch>>>,
    batch: RecordBatch,
    keys: Rows,
    row: usize,
    /// The last row's sort key, to check the input's order across batches.
    last: Option<OwnedRow>,
    /// Where its batch is in the output chunk being gathered, if it is there.
    in_chunk: Option<usize>,
}

/// The sort key columns of a batch (its first three columns: patient, date, key).
fn converter(schema: &SchemaRef) -> Result<RowConverter> {
    let fields = (0..3)
        .map(|i| SortField::new(schema.field(i).data_type().clone()))
        .collect();
    Ok(RowConverter::new(fields)?)
}

impl Cursor {
    /// Moves to the next non-empty batch; false at the input's end.
    async fn next_batch(
        &mut self,
        reader: &ArchiveReader,
        schema: &SchemaRef,
        converter: &RowConverter,
    ) -> Result<bool> {
        loop {
            if self.stream.is_none() {
                let Some(file) = self.files.next() else {
                    return Ok(false);
                };
                self.file = file.path.clone();
                self.stream = Some(reader.file_batches(&file, None).await?);
            }
            let stream = self.stream.as_mut().expect("opened above");
            match stream.next().await {
                None => self.stream = None,
                Some(batch) => {
                    let batch = crate::compact::conform(&batch?, schema)?;
                    if batch.num_rows() == 0 {
                        continue;
                    }
                    self.keys = converter.convert_columns(&batch.columns()[..3])?;
                    self.batch = batch;
                    self.row = 0;
                    self.in_chunk = None;
                    return Ok(true);
                }
            }
        }
    }

    /// The current row's sort key, checked against the one before it.
    fn key(&mut self) -> Result<OwnedRow> {
        let key = self.keys.row(self.row).owned();
        if self.last.as_ref().is_some_and(|last| *last > key) {
            return Err(ArchiveError::Integrity {
                object: self.file.clone(),
                detail: "rows are not in the archive's order (patient, record date, key): the merge stopped, nothing was published".into(),
            });
        }
        self.last = Some(key.clone());
        Ok(key)
    }
}

/// What a merge wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Merged {
    /// Rows read.
    pub read: u64,
    /// Rows written (those `keep` kept).
    pub written: u64,
}

/// Merges `inputs` into `out` in the archive's order, in `schema`'s layout, keeping the rows
/// `keep` keeps. Opens every input at once: callers bound how many.
pub(crate) async fn merge(
    reader: &ArchiveReader,
    inputs: Vec<SortedInput>,
    schema: &SchemaRef,
    keep: &mut Keep<'_>,
    out: &mut TableWriter,
) -> Result<Merged> {
    let converter = converter(schema)?;
    let mut cursors = Vec::with_capacity(inputs.len());
    let mut heap = BinaryHeap::new();
    for input in inputs {
        let mut cursor = Cursor {
            rank: input.rank,
            files: input.files.into_iter(),
            file: String::new(),
            stream: None,
            batch: RecordBatch::new_empty(schema.clone()),
            keys: converter.empty_rows(0, 0),
            row: 0,
            last: None,
            in_chunk: None,
        };
        if cursor.next_batch(reader, schema, &converter).await? {
            heap.push(Reverse((cursor.key()?, cursors.len())));
            cursors.push(cursor);
        }
    }
    let mut merged = Merged::default();
    let mut chunk: Vec<RecordBatch> = Vec::new();
    let mut picks: Vec<(usize, usize)> = Vec::with_capacity(OUTPUT_ROWS);
    while let Some(Reverse((_, c))) = heap.pop() {
        let cursor = &mut cursors[c];
        merged.read += 1;
        if keep(cursor.rank, &cursor.batch, cursor.row) {
            let at = *cursor.in_chunk.get_or_insert_with(|| {
                chunk.push(cursor.batch.clone());
                chunk.len() - 1
            });
            picks.push((at, cursor.row));
        }
        cursor.row += 1;
        if picks.len() == OUTPUT_ROWS || chunk.len() >= OUTPUT_SOURCES {
            merged.written += flush(&mut chunk, &mut picks, &mut cursors, out).await?;
        }
        let cursor = &mut cursors[c];
        if cursor.row == cursor.batch.num_rows()
            && !cursor.next_batch(reader, schema, &converter).await?
        {
            continue;
        }
        heap.push(Reverse((cursor.key()?, c)));
    }
    merged.written += flush(&mut chunk, &mut picks, &mut cursors, out).await?;
    Ok(merged)
}

/// Writes the rows picked so far; returns how many.
async fn flush(
    chunk: &mut Vec<RecordBatch>,
    picks: &mut Vec<(usize, usize)>,
    cursors: &mut [Cursor],
    out: &mut TableWriter,
) -> Result<u64> {
    let n = picks.len() as u64;
    if n > 0 {
        let refs: Vec<&RecordBatch> = chunk.iter().collect();
        out.write(&interleave_record_batch(&refs, picks)?).await?;
    }
    chunk.clear();
    picks.clear();
    for c in cursors {
        c.in_chunk = None;
    }
    Ok(n)
}
