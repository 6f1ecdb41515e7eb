//! Turns archived rows into Arrow record batches in the archive's layout (which the archive
//! crate owns: [`strata_archive::table_schema`]), sorted as the archive keeps them.

use crate::decimal::Decimal;
use crate::layout::TableLayout;
use crate::value::{ColumnType, Value};
use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float64Builder,
    Int64Builder, RecordBatch, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::SchemaRef;
use chrono::NaiveDate;
use std::sync::Arc;
use strata_archive::{table_schema, ArchivedColumn, BlobRef, ValueType};

/// One row bound for the archive.
#[derive(Debug, Clone)]
pub struct ArchivedRow {
    /// Patient key ("" when the row has none).
    pub patient: String,
    /// Record date.
    pub date: Option<NaiveDate>,
    /// The record's key (see `strata_archive::KEY_COLUMN`).
    pub key: String,
    /// Values, coerced to the column types; BLOB columns are `Null` here.
    pub values: Vec<Value>,
    /// References of the row's BLOB columns, in the layout's BLOB order.
    pub blobs: Vec<Option<BlobRef>>,
}

/// The type a column of `t` is archived as: an exact decimal as a decimal.
fn archived_type(t: ColumnType, decimal: Option<Decimal>) -> ValueType {
    match decimal {
        Some(Decimal::Fixed { precision, scale }) => {
            return ValueType::Decimal { precision, scale }
        }
        Some(Decimal::Text) => return ValueType::DecimalText,
        None => {}
    }
    match t {
        ColumnType::Int => ValueType::Int,
        ColumnType::Float => ValueType::Float,
        ColumnType::Bool => ValueType::Bool,
        ColumnType::Bytes => ValueType::Bytes,
        ColumnType::Date => ValueType::Date,
        ColumnType::Timestamp => ValueType::Timestamp,
        ColumnType::TimestampTz => ValueType::TimestampUtc,
        ColumnType::Text | ColumnType::Other => ValueType::Text,
    }
}

/// How a run's or a tier batch's archive writer writes `layout`'s rows: a one-column key is
/// distinct (its Parquet statistics say so); columns of a composite key are not.
pub fn writer_options(layout: &TableLayout) -> strata_archive::TableWriterOptions {
    strata_archive::TableWriterOptions {
        distinct_columns: match layout.key[..] {
            [k] => vec![layout.target_names[k].clone()],
            _ => Vec::new(),
        },
        ..Default::default()
    }
}

/// The archive schema of a table (the layout is the archive crate's: [`table_schema`]).
pub fn archive_schema(layout: &TableLayout) -> SchemaRef {
    let columns: Vec<ArchivedColumn> = layout
        .columns()
        .iter()
        .enumerate()
        .map(|(i, c)| ArchivedColumn {
            name: layout.target_names[i].clone(),
            value: (!layout.blobs.iter().any(|b| b.column == i))
                .then(|| archived_type(c.col_type, layout.decimals[i])),
        })
        .collect();
    table_schema(&columns)
}

const EPOCH: NaiveDate = match NaiveDate::from_ymd_opt(1970, 1, 1) {
    Some(d) => d,
    None => panic!(),
};

fn days(d: NaiveDate) -> i32 {
    (d - EPOCH).num_days() as i32
}

/// Archived rows held until they are sorted into the archive's order (patient key, record
/// date, record key) and written as one file. Each row is packed into one byte arena (about
/// the size of its values, a fraction of what a `Vec<Value>` or Arrow builders take), the
/// order is sorted as (8-byte patient prefix, offset) pairs, and Arrow batches are built once,
/// straight from the arena in sorted order: sorting costs a fraction of an `ORDER BY` in the
/// source and needs no second copy of the rows.
pub struct ArchiveRun {
    arena: Vec<u8>,
    rows: Vec<(u64, u32)>,
    limit: usize,
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// Reads the packed fields of one row.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.take(4).try_into().expect("4 bytes"))
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.take(8).try_into().expect("8 bytes"))
    }
    fn bytes(&mut self) -> &'a [u8] {
        let n = u32::from_le_bytes(self.take(4).try_into().expect("4 bytes")) as usize;
        self.take(n)
    }
    fn text(&mut self) -> &'a str {
        let bytes = self.bytes();
        // SAFETY: the arena is private to `ArchiveRun`, and every field read as text was
        // packed by `ArchiveRun::push` from a `&str`, whole: it is valid UTF-8. (Checking it
        // again cost 3 % of an archiving run.)
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
    /// The row header: patient key, record date, record key.
    fn header(&mut self) -> (&'a [u8], Option<i32>, &'a [u8]) {
        let patient = self.bytes();
        let date = (self.u8() == 1).then(|| self.i32());
        let key = self.bytes();
        (patient, date, key)
    }
}

/// One Arrow builder per archived column.
// A handful exist per batch: the BLOB variant's size does not matter.
#[allow(clippy::large_enum_variant)]
enum ColumnBuilder {
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
    Bytes(BinaryBuilder),
    Date(Date32Builder),
    Timestamp(TimestampMicrosecondBuilder),
    Text(StringBuilder),
    Decimal(Decimal128Builder),
    Blob(StringBuilder, Int64Builder, StringBuilder, StringBuilder),
}

impl ArchiveRun {
    /// A run that is full ([`ArchiveRun::is_full`]) at about `limit` bytes. Its memory is
    /// taken once, at the first row, and reused after each drain.
    pub fn new(limit: usize) -> Self {
        ArchiveRun {
            arena: Vec::new(),
            rows: Vec::new(),
            limit,
        }
    }

    /// Whether the run should be drained before the next row: the memory it holds (packed rows
    /// and sort entries) has reached its limit.
    pub fn is_full(&self) -> bool {
        self.arena.len() + self.rows.len() * std::mem::size_of::<(u64, u32)>() >= self.limit
    }

    /// True when no row is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds a row; `values` coerced to the layout's column types (a value of another type is
    /// archived as NULL), `blobs` the references of its BLOB columns in the layout's BLOB order.
    pub fn push(
        &mut self,
        layout: &TableLayout,
        patient: &str,
        date: Option<NaiveDate>,
        key: &str,
        values: &[Value],
        blobs: &[Option<BlobRef>],
    ) {
        if self.arena.capacity() == 0 {
            // Room for the limit plus the row that crosses it, so the arena never grows by
            // doubling (and copying).
            self.arena.reserve_exact(self.limit + (1 << 20));
        }
        let offset = u32::try_from(self.arena.len()).expect("a run stays under 4 GiB");
        self.rows
            .push((strata_archive::patient_sort_prefix(patient), offset));
        let out = &mut self.arena;
        put_bytes(out, patient.as_bytes());
        match date {
            Some(d) => {
                out.push(1);
                out.extend_from_slice(&days(d).to_le_bytes());
            }
            None => out.push(0),
        }
        put_bytes(out, key.as_bytes());
        for (i, c) in layout.columns().iter().enumerate() {
            if let Some(b) = layout.blobs.iter().position(|b| b.column == i) {
                match blobs.get(b).and_then(Option::as_ref) {
                    Some(r) => {
                        out.push(1);
                        put_bytes(out, r.object.as_bytes());
                        out.extend_from_slice(&(r.length as i64).to_le_bytes());
                        put_bytes(out, r.sha256.as_bytes());
                        put_bytes(out, r.content_type.as_bytes());
                    }
                    None => out.push(0),
                }
                continue;
            }
            if let Some(d @ Decimal::Fixed { .. }) = layout.decimals[i] {
                // Checked before the row was routed here (`TableLayout::archive_problem`).
                match d.units(&values[i]) {
                    Some(units) => {
                        out.push(1);
                        out.extend_from_slice(&units.to_le_bytes());
                    }
                    None => out.push(0),
                }
                continue;
            }
            match (c.col_type, &values[i]) {
                (ColumnType::Int, Value::Int(x)) => {
                    out.push(1);
                    out.extend_from_slice(&x.to_le_bytes());
                }
                (ColumnType::Float, Value::Float(x)) => {
                    out.push(1);
                    out.extend_from_slice(&x.to_le_bytes());
                }
                (ColumnType::Bool, Value::Bool(x)) => out.extend_from_slice(&[1, *x as u8]),
                (ColumnType::Bytes, Value::Bytes(x)) => {
                    out.push(1);
                    put_bytes(out, x);
                }
                (ColumnType::Date, Value::Date(x)) => {
                    out.push(1);
                    out.extend_from_slice(&days(*x).to_le_bytes());
                }
                (ColumnType::Timestamp, Value::Timestamp(x)) => {
                    out.push(1);
                    out.extend_from_slice(&x.and_utc().timestamp_micros().to_le_bytes());
                }
                (ColumnType::TimestampTz, Value::TimestampTz(x)) => {
                    out.push(1);
                    out.extend_from_slice(&x.timestamp_micros().to_le_bytes());
                }
                (ColumnType::Text | ColumnType::Other, Value::Text(x)) => {
                    out.push(1);
                    put_bytes(out, x.as_bytes());
                }
                _ => out.push(0),
            }
        }
    }

    /// Sorts the held rows into the archive's order and returns them as record batches of at
    /// most `batch_rows` rows, built one at a time; the run is empty afterwards.
    pub fn drain_sorted<'r>(
        &'r mut self,
        layout: &'r TableLayout,
        schema: &SchemaRef,
        batch_rows: usize,
    ) -> SortedRows<'r> {
        let arena = &self.arena;
        self.rows.sort_unstable_by(|&(pa, oa), &(pb, ob)| {
            pa.cmp(&pb).then_with(|| {
                let a = Cursor(&arena[oa as usize..]).header();
                let b = Cursor(&arena[ob as usize..]).header();
                a.cmp(&b)
            })
        });
        SortedRows {
            run: self,
            layout,
            schema: schema.clone(),
            batch_rows,
            next: 0,
        }
    }
}

/// The rows of an [`ArchiveRun`] in the archive's order, as record batches.
pub struct SortedRows<'r> {
    run: &'r mut ArchiveRun,
    layout: &'r TableLayout,
    schema: SchemaRef,
    batch_rows: usize,
    next: usize,
}

impl SortedRows<'_> {
    /// The next batch, or `None` (and the run emptied) after the last.
    pub fn next_batch(&mut self) -> Option<arrow::error::Result<RecordBatch>> {
        let rows = &self.run.rows;
        if self.next >= rows.len() {
            self.run.rows.clear();
            self.run.arena.clear();
            return None;
        }
        let end = (self.next + self.batch_rows).min(rows.len());
        let chunk = &rows[self.next..end];
        self.next = end;
        Some(build_batch(
            self.layout,
            &self.schema,
            &self.run.arena,
            chunk,
        ))
    }
}

/// How far ahead of the row being built [`build_batch`] prefetches.
const PREFETCH_ROWS_AHEAD: usize = 8;

/// Hints the CPU to load the first two cache lines of `bytes`.
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = bytes.as_ptr() as *const i8;
        // SAFETY: prefetching is a hint; it never faults, whatever the address.
        unsafe {
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p.wrapping_add(64), _MM_HINT_T0);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

fn build_batch(
    layout: &TableLayout,
    schema: &SchemaRef,
    arena: &[u8],
    rows: &[(u64, u32)],
) -> arrow::error::Result<RecordBatch> {
    let n = rows.len();
    let mut patients = StringBuilder::with_capacity(n, n * 8);
    let mut dates = Date32Builder::with_capacity(n);
    let mut keys = StringBuilder::with_capacity(n, n * 16);
    let mut columns: Vec<ColumnBuilder> = layout
        .columns()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if layout.blobs.iter().any(|b| b.column == i) {
                return ColumnBuilder::Blob(
                    StringBuilder::with_capacity(n, n * 64),
                    Int64Builder::with_capacity(n),
                    StringBuilder::with_capacity(n, n * 64),
                    StringBuilder::with_capacity(n, n * 16),
                );
            }
            if let Some(Decimal::Fixed { precision, scale }) = layout.decimals[i] {
                return ColumnBuilder::Decimal(
                    Decimal128Builder::with_capacity(n)
                        .with_precision_and_scale(precision, scale)
                        .expect("a precision of 1 to 38 and a scale within it"),
                );
            }
            match c.col_type {
                ColumnType::Int => ColumnBuilder::Int(Int64Builder::with_capacity(n)),
                ColumnType::Float => ColumnBuilder::Float(Float64Builder::with_capacity(n)),
                ColumnType::Bool => ColumnBuilder::Bool(BooleanBuilder::with_capacity(n)),
                ColumnType::Bytes => ColumnBuilder::Bytes(BinaryBuilder::with_capacity(n, n * 16)),
                ColumnType::Date => ColumnBuilder::Date(Date32Builder::with_capacity(n)),
                ColumnType::Timestamp => {
                    ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::with_capacity(n))
                }
                ColumnType::TimestampTz => ColumnBuilder::Timestamp(
                    TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC"),
                ),
                ColumnType::Text | ColumnType::Other => {
                    ColumnBuilder::Text(StringBuilder::with_capacity(n, n * 8))
                }
            }
        })
        .collect();
    for (i, &(_, offset)) in rows.iter().enumerate() {
        // Rows are visited in sorted order, scattered over the arena: ask for a row a few
        // steps ahead so that its bytes are in cache when it is reached.
        if let Some(&(_, ahead)) = rows.get(i + PREFETCH_ROWS_AHEAD) {
            prefetch(&arena[ahead as usize..]);
        }
        let mut cur = Cursor(&arena[offset as usize..]);
        patients.append_value(cur.text());
        dates.append_option((cur.u8() == 1).then(|| cur.i32()));
        keys.append_value(cur.text());
        for column in &mut columns {
            let present = cur.u8() == 1;
            match column {
                ColumnBuilder::Int(b) => b.append_option(present.then(|| cur.i64())),
                ColumnBuilder::Float(b) => {
                    b.append_option(present.then(|| f64::from_le_bytes(cur.i64().to_le_bytes())))
                }
                ColumnBuilder::Bool(b) => b.append_option(present.then(|| cur.u8() == 1)),
                ColumnBuilder::Bytes(b) => b.append_option(present.then(|| cur.bytes())),
                ColumnBuilder::Date(b) => b.append_option(present.then(|| cur.i32())),
                ColumnBuilder::Timestamp(b) => b.append_option(present.then(|| cur.i64())),
                ColumnBuilder::Text(b) => b.append_option(present.then(|| cur.text())),
                ColumnBuilder::Decimal(b) => b.append_option(
                    present
                        .then(|| i128::from_le_bytes(cur.take(16).try_into().expect("16 bytes"))),
                ),
                ColumnBuilder::Blob(object, length, sha256, content_type) => {
                    if present {
                        object.append_value(cur.text());
                        length.append_value(cur.i64());
                        sha256.append_value(cur.text());
                        content_type.append_value(cur.text());
                    } else {
                        object.append_null();
                        length.append_null();
                        sha256.append_null();
                        content_type.append_null();
                    }
                }
            }
        }
    }
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(patients.finish()),
        Arc::new(dates.finish()),
        Arc::new(keys.finish()),
    ];
    for column in columns {
        match column {
            ColumnBuilder::Int(mut b) => arrays.push(Arc::new(b.finish())),
            ColumnBuilder::Float(mut b) => arrays.push(Arc::new(b.finish())),
            ColumnBuilder::Bool(mut b) => arrays.push(Arc::new(b.finish())),
            ColumnBuilder::Bytes(mut b) => arrays.push(Arc::new(b.finish())),
            ColumnBuilder::Date(mut b) => arrays.push(Arc::new(b.finish())),
            ColumnBuilder::Timestamp(mut b) => arrays.push(Arc::new(b.finish())),
            ColumnBuilder::Text(mut b) => arrays.push(Arc::new(b.finish())),
            ColumnBuilder::Decimal(mut b) => arrays.push(Arc::new(b.finish())),
            ColumnBuilder::Blob(mut o, mut l, mut s, mut c) => {
                arrays.push(Arc::new(o.finish()));
                arrays.push(Arc::new(l.finish()));
                arrays.push(Arc::new(s.finish()));
                arrays.push(Arc::new(c.finish()));
            }
        }
    }
    RecordBatch::try_new(schema.clone(), arrays)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Date32Type, Float64Type, Int64Type};

    fn layout() -> TableLayout {
        crate::layout::test_layout(
            "notes",
            "primary_key = [\"id\"]\npatient_key = \"patient\"\nrecord_date = \"written\"\nblobs = [{ column = \"body\" }]",
            &[
                ("id", ColumnType::Int),
                ("patient", ColumnType::Text),
                ("written", ColumnType::Date),
                ("score", ColumnType::Float),
                ("body", ColumnType::Bytes),
            ],
        )
    }

    #[test]
    fn rows_come_out_sorted_by_patient_date_and_key_with_their_values() {
        let layout = layout();
        let schema = archive_schema(&layout);
        let mut run = ArchiveRun::new(1 << 20);
        let date = |d: u32| NaiveDate::from_ymd_opt(2020, 1, d);
        // Patients longer than the 8-byte prefix and sharing it, a missing date, equal dates.
        let rows = [
            ("patient-0002", date(3), "id=5", 5, Some(0.5)),
            ("patient-0001", date(9), "id=4", 4, None),
            ("patient-0002", None, "id=3", 3, Some(1.5)),
            ("patient-0001", date(1), "id=2", 2, Some(2.5)),
            ("p9", date(1), "id=1", 1, Some(3.5)),
            ("patient-0001", date(1), "id=10", 10, Some(4.5)),
        ];
        for pass in 0..2 {
            for (patient, d, key, id, score) in rows {
                let values = vec![
                    Value::Int(id),
                    Value::Text(patient.into()),
                    d.map_or(Value::Null, Value::Date),
                    score.map_or(Value::Null, Value::Float),
                    Value::Null,
                ];
                let blob = (id == 2).then(|| BlobRef {
                    object: "ab".repeat(32),
                    length: 7,
                    sha256: "cd".repeat(32),
                    content_type: "text/plain".into(),
                });
                run.push(&layout, patient, d, key, &values, &[blob]);
            }
            assert!(!run.is_full());
            let mut sorted = run.drain_sorted(&layout, &schema, 4);
            let mut batches = Vec::new();
            while let Some(b) = sorted.next_batch() {
                batches.push(b.unwrap());
            }
            assert_eq!(
                batches.iter().map(|b| b.num_rows()).collect::<Vec<_>>(),
                [4, 2],
                "pass {pass}"
            );
            let batch = arrow::compute::concat_batches(&schema, &batches).unwrap();
            let keys: Vec<&str> = batch
                .column(2)
                .as_string::<i32>()
                .iter()
                .flatten()
                .collect();
            assert_eq!(keys, ["id=1", "id=10", "id=2", "id=4", "id=3", "id=5"]);
            let dates = batch.column(1).as_primitive::<Date32Type>();
            assert!(dates.is_null(4) && dates.is_valid(5));
            let ids = batch.column(3).as_primitive::<Int64Type>();
            assert_eq!(ids.values().to_vec(), [1, 10, 2, 4, 3, 5]);
            let scores = batch.column(6).as_primitive::<Float64Type>();
            assert_eq!(scores.value(0), 3.5);
            assert!(scores.is_null(3));
            let objects = batch.column(7).as_string::<i32>();
            let lengths = batch.column(8).as_primitive::<Int64Type>();
            assert_eq!(
                (
                    objects.null_count(),
                    objects.value(2).len(),
                    lengths.value(2)
                ),
                (5, 64, 7)
            );
            assert_eq!(batch.column(10).as_string::<i32>().value(2), "text/plain");
            assert!(
                run.is_empty(),
                "a drained run is empty and takes rows again"
            );
        }
    }
}
