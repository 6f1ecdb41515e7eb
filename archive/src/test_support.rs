//! What the crate's tests share: an empty in-memory archive with its keys.

use crate::keys::{Kek, KeyRing};
use crate::{KEY_COLUMN, PATIENT_COLUMN, RECORD_DATE_COLUMN};
use arrow::datatypes::{DataType, Field, Schema};
use object_store::memory::InMemory;
use object_store::ObjectStore;
use std::sync::Arc;

/// An empty in-memory archive under a fresh KEK, and a table schema: the three archive columns
/// (patient, record date, record key) and one Int64 column named `value_column`.
pub(crate) async fn test_archive(
    value_column: &str,
) -> (Arc<dyn ObjectStore>, KeyRing, Arc<Schema>) {
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let keys = KeyRing::new(Kek::from_hex("k1", &Kek::generate_hex()).unwrap(), [])
        .for_archive(store.as_ref(), true)
        .await
        .unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new(PATIENT_COLUMN, DataType::Utf8, false),
        Field::new(RECORD_DATE_COLUMN, DataType::Date32, true),
        Field::new(KEY_COLUMN, DataType::Utf8, false),
        Field::new(value_column, DataType::Int64, false),
    ]));
    (store, keys, schema)
}
