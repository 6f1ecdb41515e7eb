//! Decoding PostgreSQL's `pgoutput` logical replication messages (protocol version 1), as a
//! replication stream carries them after `Begin`: relations, inserts, updates, deletes and
//! truncates, each column's value as text in its type's output format, or NULL, or "unchanged"
//! (a TOASTed value the update did not touch: never to be written over). Pure: bytes in,
//! messages out; the stream and the apply are elsewhere.
//!
//! The format: <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>.

use std::fmt;

/// A malformed message: what was expected where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pgoutput: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

type Result<T> = std::result::Result<T, DecodeError>;

/// A column of a relation as the stream describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Its name.
    pub name: String,
    /// Its type's OID.
    pub type_oid: u32,
    /// Its type modifier (-1 when none).
    pub type_modifier: i32,
    /// Whether it is part of the replica identity (the key an update or delete names).
    pub in_key: bool,
}

/// A relation (table) as the stream describes it before its first change, and again after
/// its definition changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Its OID: changes name it by this.
    pub oid: u32,
    /// Its schema.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its replica identity: `d` default (the primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Its columns, in order.
    pub columns: Vec<RelationColumn>,
}

/// One column's value in a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// NULL.
    Null,
    /// A TOASTed value the change did not touch: keep the one there.
    Unchanged,
    /// The value as text, in its type's output format.
    Text(String),
}

/// A row of a change: one datum per column of the relation.
pub type Tuple = Vec<Datum>;

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A relation's description.
    Relation(Relation),
    /// A new row.
    Insert {
        /// The relation's OID.
        relation: u32,
        /// The row.
        new: Tuple,
    },
    /// A changed row.
    Update {
        /// The relation's OID.
        relation: u32,
        /// The old row's key columns (`K`) or whole old row (`O`, replica identity full), when
        /// the key changed or the identity is full; else None (the key is in `new`).
        old: Option<Tuple>,
        /// The new row.
        new: Tuple,
    },
    /// A deleted row: its key columns, or its whole row under replica identity full.
    Delete {
        /// The relation's OID.
        relation: u32,
        /// The old row (only its key columns are set unless the identity is full).
        old: Tuple,
    },
    /// Tables emptied.
    Truncate {
        /// Their OIDs.
        relations: Vec<u32>,
        /// `TRUNCATE ... CASCADE`.
        cascade: bool,
    },
    /// Anything else the stream may carry (types, origins): not needed to apply changes.
    Other(u8),
}

/// Reads big-endian fields off a message.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(DecodeError(format!("truncated {what}")));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &str) -> Result<i16> {
        Ok(i16::from_be_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }

    fn i32(&mut self, what: &str) -> Result<i32> {
        Ok(i32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }

    /// A NUL-terminated string.
    fn string(&mut self, what: &str) -> Result<String> {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError(format!("unterminated {what}")))?;
        let s = std::str::from_utf8(&self.bytes[..end])
            .map_err(|_| DecodeError(format!("{what} is not UTF-8")))?
            .to_string();
        self.bytes = &self.bytes[end + 1..];
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple> {
        let n = self.i16("tuple column count")?;
        let mut tuple = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            tuple.push(match self.u8("tuple column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.i32("value length")?;
                    let bytes = self.take(len.max(0) as usize, "value")?;
                    Datum::Text(
                        String::from_utf8(bytes.to_vec())
                            .map_err(|_| DecodeError("a text value is not UTF-8".into()))?,
                    )
                }
                other => {
                    return Err(DecodeError(format!(
                        "column kind {:?} (binary values are not requested)",
                        other as char
                    )))
                }
            });
        }
        Ok(tuple)
    }
}

/// Decodes one message (its first byte its kind).
pub fn decode(bytes: &[u8]) -> Result<Message> {
    let mut r = Reader { bytes };
    let kind = r.u8("message kind")?;
    Ok(match kind {
        b'R' => {
            let oid = r.u32("relation OID")?;
            let namespace = r.string("namespace")?;
            let name = r.string("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("column count")?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(RelationColumn {
                    name: r.string("column name")?,
                    type_oid: r.u32("type OID")?,
                    type_modifier: r.i32("type modifier")?,
                    in_key: flags & 1 == 1,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let relation = r.u32("relation OID")?;
            expect(&mut r, b'N')?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32("relation OID")?;
            let mut old = None;
            let mut marker = r.u8("tuple marker")?;
            if marker == b'K' || marker == b'O' {
                old = Some(r.tuple()?);
                marker = r.u8("tuple marker")?;
            }
            if marker != b'N' {
                return Err(DecodeError(format!(
                    "update: tuple marker {:?}, expected 'N'",
                    marker as char
                )));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation OID")?;
            let marker = r.u8("tuple marker")?;
            if marker != b'K' && marker != b'O' {
                return Err(DecodeError(format!(
                    "delete: tuple marker {:?}, expected 'K' or 'O'",
                    marker as char
                )));
            }
            Message::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.i32("relation count")?;
            let options = r.u8("truncate options")?;
            let relations = (0..n)
                .map(|_| r.u32("relation OID"))
                .collect::<Result<Vec<_>>>()?;
            Message::Truncate {
                relations,
                cascade: options & 1 == 1,
            }
        }
        other => Message::Other(other),
    })
}

fn expect(r: &mut Reader<'_>, marker: u8) -> Result<()> {
    let got = r.u8("tuple marker")?;
    if got == marker {
        Ok(())
    } else {
        Err(DecodeError(format!(
            "tuple marker {:?}, expected {:?}",
            got as char, marker as char
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds messages as PostgreSQL writes them.
    #[derive(Default)]
    struct Writer(Vec<u8>);

    impl Writer {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn string(mut self, s: &str) -> Self {
            self.0.extend(s.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, s: &str) -> Self {
            let mut w = self.u8(b't').i32(s.len() as i32);
            w.0.extend(s.as_bytes());
            w
        }
    }

    #[test]
    fn relations_and_changes_decode_as_written() {
        let relation = Writer::default()
            .u8(b'R')
            .i32(16390)
            .string("public")
            .string("visits")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .string("id")
            .i32(20)
            .i32(-1)
            .u8(0)
            .string("note")
            .i32(25)
            .i32(-1);
        assert_eq!(
            decode(&relation.0).unwrap(),
            Message::Relation(Relation {
                oid: 16390,
                namespace: "public".into(),
                name: "visits".into(),
                replica_identity: b'd',
                columns: vec![
                    RelationColumn {
                        name: "id".into(),
                        type_oid: 20,
                        type_modifier: -1,
                        in_key: true
                    },
                    RelationColumn {
                        name: "note".into(),
                        type_oid: 25,
                        type_modifier: -1,
                        in_key: false
                    },
                ],
            })
        );
        let insert = Writer::default()
            .u8(b'I')
            .i32(16390)
            .u8(b'N')
            .i16(2)
            .text("7")
            .u8(b'n');
        assert_eq!(
            decode(&insert.0).unwrap(),
            Message::Insert {
                relation: 16390,
                new: vec![Datum::Text("7".into()), Datum::Null]
            }
        );
        // An update whose key changed carries the old key; a TOASTed value left alone is
        // "unchanged", never a value.
        let update = Writer::default()
            .u8(b'U')
            .i32(16390)
            .u8(b'K')
            .i16(2)
            .text("7")
            .u8(b'n')
            .u8(b'N')
            .i16(2)
            .text("8")
            .u8(b'u');
        assert_eq!(
            decode(&update.0).unwrap(),
            Message::Update {
                relation: 16390,
                old: Some(vec![Datum::Text("7".into()), Datum::Null]),
                new: vec![Datum::Text("8".into()), Datum::Unchanged]
            }
        );
        let delete = Writer::default()
            .u8(b'D')
            .i32(16390)
            .u8(b'O')
            .i16(2)
            .text("8")
            .text("é");
        assert_eq!(
            decode(&delete.0).unwrap(),
            Message::Delete {
                relation: 16390,
                old: vec![Datum::Text("8".into()), Datum::Text("é".into())]
            }
        );
        let truncate = Writer::default()
            .u8(b'T')
            .i32(2)
            .u8(1)
            .i32(16390)
            .i32(16400);
        assert_eq!(
            decode(&truncate.0).unwrap(),
            Message::Truncate {
                relations: vec![16390, 16400],
                cascade: true
            }
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        for bytes in [
            &b""[..],
            &b"I\x00\x00"[..],
            &b"I\x00\x00\x40\x06X"[..],
            &b"I\x00\x00\x40\x06N\x00\x01t\x00\x00\x00\x09ab"[..],
            &b"D\x00\x00\x40\x06N\x00\x00"[..],
            &b"R\x00\x00\x40\x06public"[..],
        ] {
            assert!(decode(bytes).is_err(), "{bytes:?}");
        }
        assert_eq!(decode(b"Y").unwrap(), Message::Other(b'Y'));
    }
}
