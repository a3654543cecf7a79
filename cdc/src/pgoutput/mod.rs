//! Layer 1 of decoding: pgoutput bytes → [`LogicalMessage`].
//!
//! This decodes the messages of Postgres' built-in `pgoutput` logical decoding plugin, protocol
//! version 1 (the reader asks for `proto_version '1'` with `messages 'true'`; see the Postgres
//! manual, "Logical Replication Message Formats"). Each call decodes one message: the payload of
//! one XLogData (see [`crate::wal`]) or one row of `pg_logical_slot_peek_binary_changes`.
//!
//! The decoder trusts nothing: it never panics, never reads out of bounds, and checks every
//! count against the bytes that remain before allocating, so a corrupt or hostile stream yields
//! a [`DecodeError`] that says what is wrong and where. Tuple values are zero-copy slices of the
//! input [`Bytes`]. Turning messages into change events, with the schemas from cached
//! [`Relation`] messages, is the next layer's job.

mod error;
pub(crate) mod reader;
#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

pub use self::error::{DecodeError, MessageKind, Protocol};
use self::reader::Reader;
use crate::lsn::Lsn;

/// The Postgres epoch, 2000-01-01 00:00:00 UTC, in microseconds since the Unix epoch.
pub const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A Postgres `TimestampTz` on the wire: microseconds since 2000-01-01 00:00:00 UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// The timestamp `micros` microseconds after the Unix epoch (saturating at the ends of the
    /// range, where Postgres keeps ±infinity).
    pub const fn from_unix_micros(micros: i64) -> PgTimestamp {
        PgTimestamp(micros.saturating_sub(POSTGRES_EPOCH_UNIX_MICROS))
    }

    /// The timestamp of a [`SystemTime`], to the microsecond.
    pub fn from_system_time(time: SystemTime) -> PgTimestamp {
        let micros = match time.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_micros()).unwrap_or(i64::MAX),
            Err(before) => i64::try_from(before.duration().as_micros())
                .map(|m| -m)
                .unwrap_or(i64::MIN),
        };
        PgTimestamp::from_unix_micros(micros)
    }

    /// Microseconds since the Unix epoch (saturating).
    pub const fn unix_micros(self) -> i64 {
        self.0.saturating_add(POSTGRES_EPOCH_UNIX_MICROS)
    }

    /// Milliseconds since the Unix epoch, rounded down (the envelope's `ts_ms`).
    pub const fn unix_millis(self) -> i64 {
        self.unix_micros().div_euclid(1000)
    }
}

/// Milliseconds since the Unix epoch of a Postgres timestamp, rounded down; the same as
/// [`PgTimestamp::unix_millis`].
pub const fn pg_timestamp_to_unix_ms(time: PgTimestamp) -> i64 {
    time.unix_millis()
}

/// The OID of a table, as pgoutput identifies it in every row message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelationId(pub u32);

impl fmt::Display for RelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One pgoutput (protocol version 1) message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogicalMessage {
    /// Start of a transaction.
    Begin(Begin),
    /// End of a transaction.
    Commit(Commit),
    /// The transaction was replicated from another node.
    Origin(Origin),
    /// The schema of a table, sent before its first row message and after every change to it.
    Relation(Relation),
    /// The name of a non-built-in type used by a following Relation.
    Type(TypeMessage),
    /// A row was inserted.
    Insert(Insert),
    /// A row was updated.
    Update(Update),
    /// A row was deleted.
    Delete(Delete),
    /// Tables were truncated.
    Truncate(Truncate),
    /// A message written with `pg_logical_emit_message`.
    Message(LogicalDecodingMessage),
}

impl LogicalMessage {
    /// The message's type, for logs and metrics.
    pub fn kind(&self) -> MessageKind {
        match self {
            LogicalMessage::Begin(_) => MessageKind::Begin,
            LogicalMessage::Commit(_) => MessageKind::Commit,
            LogicalMessage::Origin(_) => MessageKind::Origin,
            LogicalMessage::Relation(_) => MessageKind::Relation,
            LogicalMessage::Type(_) => MessageKind::Type,
            LogicalMessage::Insert(_) => MessageKind::Insert,
            LogicalMessage::Update(_) => MessageKind::Update,
            LogicalMessage::Delete(_) => MessageKind::Delete,
            LogicalMessage::Truncate(_) => MessageKind::Truncate,
            LogicalMessage::Message(_) => MessageKind::Message,
        }
    }
}

/// Begin (`B`): the start of a transaction's changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record (equals [`Commit::commit_lsn`]).
    pub final_lsn: Lsn,
    /// When the transaction committed.
    pub commit_time: PgTimestamp,
    /// The transaction id.
    pub xid: u32,
}

/// Commit (`C`): the end of a transaction's changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Flags; unused by Postgres so far (0).
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record: the position to confirm once the transaction is
    /// durable downstream.
    pub end_lsn: Lsn,
    /// When the transaction committed.
    pub commit_time: PgTimestamp,
}

/// Origin (`O`): the transaction was applied from another node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The commit LSN on the origin server.
    pub commit_lsn: Lsn,
    /// The replication origin's name.
    pub name: String,
}

/// A table's replica identity (`pg_class.relreplident`): which old values updates and deletes
/// carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key columns (none if there is no primary key).
    Default,
    /// `n`: nothing; updates and deletes cannot be published.
    Nothing,
    /// `f`: all columns.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    /// The setting's byte on the wire (as in `pg_class.relreplident`).
    pub const fn as_byte(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }

    /// The setting with this byte, if any.
    pub const fn from_byte(byte: u8) -> Option<ReplicaIdentity> {
        Some(match byte {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => return None,
        })
    }
}

/// Relation (`R`): the schema of a published table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID, used by row messages to refer to it.
    pub id: RelationId,
    /// The table's schema; pgoutput sends an empty string for `pg_catalog`.
    pub namespace: String,
    /// The table's name.
    pub name: String,
    /// What old values updates and deletes carry.
    pub replica_identity: ReplicaIdentity,
    /// The columns, in the order of every tuple of this table (generated columns excluded).
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Whether the column is part of the replica identity (flag bit 1); under
    /// [`ReplicaIdentity::Full`] every column is.
    pub is_key: bool,
    /// The column's name.
    pub name: String,
    /// The OID of the column's type.
    pub type_oid: u32,
    /// The type modifier (`pg_attribute.atttypmod`), -1 if none.
    pub type_modifier: i32,
}

/// Type (`Y`): the name of a type that is not built in, sent before a Relation that uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeMessage {
    /// The type's OID.
    pub id: u32,
    /// The type's schema; empty for `pg_catalog`.
    pub namespace: String,
    /// The type's name.
    pub name: String,
}

/// Insert (`I`): a new row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    /// The table, as announced by a Relation message.
    pub relation_id: RelationId,
    /// The inserted row.
    pub new: TupleData,
}

/// Which old values an update or delete carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OldTupleKind {
    /// `K`: the replica identity columns only; the other values are [`TupleValue::Null`].
    Key,
    /// `O`: the whole old row (replica identity FULL).
    Full,
}

impl OldTupleKind {
    /// The marker byte on the wire.
    pub const fn as_byte(self) -> u8 {
        match self {
            OldTupleKind::Key => b'K',
            OldTupleKind::Full => b'O',
        }
    }
}

/// The old values of an updated or deleted row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OldTuple {
    /// Key columns only, or the whole row.
    pub kind: OldTupleKind,
    /// The values, one per column of the relation.
    pub tuple: TupleData,
}

/// Update (`U`): a changed row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    /// The table, as announced by a Relation message.
    pub relation_id: RelationId,
    /// The old row under replica identity FULL, or the old key when the update changed it;
    /// `None` otherwise.
    pub old: Option<OldTuple>,
    /// The new row; unchanged TOASTed values are [`TupleValue::UnchangedToast`].
    pub new: TupleData,
}

/// Delete (`D`): a removed row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delete {
    /// The table, as announced by a Relation message.
    pub relation_id: RelationId,
    /// The old key, or the whole old row under replica identity FULL.
    pub old: OldTuple,
}

/// Truncate (`T`): tables emptied by one `TRUNCATE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncate {
    /// `TRUNCATE … CASCADE` (option bit 1).
    pub cascade: bool,
    /// `TRUNCATE … RESTART IDENTITY` (option bit 2).
    pub restart_identity: bool,
    /// The truncated tables, including those reached by CASCADE.
    pub relation_ids: Vec<RelationId>,
}

/// Message (`M`): a message written with `pg_logical_emit_message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalDecodingMessage {
    /// Written as part of a transaction (flag bit 1), so it arrives between that transaction's
    /// Begin and Commit; a non-transactional message arrives on its own, immediately.
    pub transactional: bool,
    /// The LSN of the message's WAL record.
    pub lsn: Lsn,
    /// The prefix given by the writer, to tell message kinds apart.
    pub prefix: String,
    /// The content, as bytes.
    pub content: Bytes,
}

/// The values of one row, one per column of the relation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TupleData(pub Vec<TupleValue>);

/// One column value of a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL (also every non-key column of a [`OldTupleKind::Key`] tuple).
    Null,
    /// `u`: a TOASTed value the change did not touch; the value itself is not sent.
    UnchangedToast,
    /// `t`: the value in the type's text output format.
    Text(Bytes),
    /// `b`: the value in the type's binary send format (only with the `binary` option).
    Binary(Bytes),
}

/// Decodes one pgoutput protocol version 1 message. `buf` must hold exactly one message,
/// starting with its tag; the values in the result are slices of `buf`.
pub fn decode(buf: Bytes) -> Result<LogicalMessage, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError::Empty {
            protocol: Protocol::Pgoutput,
        });
    };
    let kind = MessageKind::from_pgoutput_tag(tag).ok_or(DecodeError::UnknownTag {
        protocol: Protocol::Pgoutput,
        tag,
    })?;
    let mut r = Reader::new(buf, 1, kind);
    let message = match kind {
        MessageKind::Begin => LogicalMessage::Begin(Begin {
            final_lsn: r.lsn("final LSN")?,
            commit_time: PgTimestamp(r.i64("commit timestamp")?),
            xid: r.u32("xid")?,
        }),
        MessageKind::Commit => LogicalMessage::Commit(Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_time: PgTimestamp(r.i64("commit timestamp")?),
        }),
        MessageKind::Origin => LogicalMessage::Origin(Origin {
            commit_lsn: r.lsn("origin commit LSN")?,
            name: r.cstring("origin name")?,
        }),
        MessageKind::Relation => LogicalMessage::Relation(relation(&mut r)?),
        MessageKind::Type => LogicalMessage::Type(TypeMessage {
            id: r.u32("type OID")?,
            namespace: r.cstring("type namespace")?,
            name: r.cstring("type name")?,
        }),
        MessageKind::Insert => {
            let relation_id = RelationId(r.u32("relation id")?);
            expect_new_tuple_marker(&mut r)?;
            LogicalMessage::Insert(Insert {
                relation_id,
                new: tuple(&mut r)?,
            })
        }
        MessageKind::Update => LogicalMessage::Update(update(&mut r)?),
        MessageKind::Delete => {
            let relation_id = RelationId(r.u32("relation id")?);
            let offset = r.offset();
            let kind = match r.u8("tuple marker")? {
                b'K' => OldTupleKind::Key,
                b'O' => OldTupleKind::Full,
                found => return Err(bad_tuple_kind(&r, offset, found, "'K' or 'O'")),
            };
            LogicalMessage::Delete(Delete {
                relation_id,
                old: OldTuple {
                    kind,
                    tuple: tuple(&mut r)?,
                },
            })
        }
        MessageKind::Truncate => LogicalMessage::Truncate(truncate(&mut r)?),
        MessageKind::Message => LogicalMessage::Message(LogicalDecodingMessage {
            transactional: r.u8("flags")? & 1 != 0,
            lsn: r.lsn("message LSN")?,
            prefix: r.cstring("prefix")?,
            content: r.sized_bytes("content length", "content")?,
        }),
        // Not pgoutput tags: from_pgoutput_tag never returns these.
        MessageKind::XLogData | MessageKind::PrimaryKeepalive => {
            return Err(DecodeError::UnknownTag {
                protocol: Protocol::Pgoutput,
                tag,
            })
        }
    };
    r.finish()?;
    Ok(message)
}

/// The fewest bytes one column of a Relation can take: flags, an empty name's NUL, type OID
/// and type modifier.
const MIN_RELATION_COLUMN_BYTES: u64 = 1 + 1 + 4 + 4;

fn relation(r: &mut Reader) -> Result<Relation, DecodeError> {
    let id = RelationId(r.u32("relation id")?);
    let namespace = r.cstring("namespace")?;
    let name = r.cstring("relation name")?;
    let offset = r.offset();
    let identity = r.u8("replica identity")?;
    let replica_identity =
        ReplicaIdentity::from_byte(identity).ok_or(DecodeError::BadReplicaIdentity {
            offset,
            found: identity,
        })?;
    let offset = r.offset();
    let count = r.u16("column count")?;
    let count = r.check_count(
        "column count",
        offset,
        count.into(),
        MIN_RELATION_COLUMN_BYTES,
    )?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        columns.push(Column {
            is_key: r.u8("column flags")? & 1 != 0,
            name: r.cstring("column name")?,
            type_oid: r.u32("column type OID")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn update(r: &mut Reader) -> Result<Update, DecodeError> {
    let relation_id = RelationId(r.u32("relation id")?);
    let offset = r.offset();
    let old_kind = match r.u8("tuple marker")? {
        b'K' => Some(OldTupleKind::Key),
        b'O' => Some(OldTupleKind::Full),
        b'N' => None,
        found => return Err(bad_tuple_kind(r, offset, found, "'K', 'O' or 'N'")),
    };
    let old = match old_kind {
        Some(kind) => {
            let tuple = tuple(r)?;
            expect_new_tuple_marker(r)?;
            Some(OldTuple { kind, tuple })
        }
        None => None,
    };
    Ok(Update {
        relation_id,
        old,
        new: tuple(r)?,
    })
}

fn truncate(r: &mut Reader) -> Result<Truncate, DecodeError> {
    let offset = r.offset();
    let count = r.u32("relation count")?;
    let options = r.u8("options")?;
    let count = r.check_count("relation count", offset, count.into(), 4)?;
    let mut relation_ids = Vec::with_capacity(count);
    for _ in 0..count {
        relation_ids.push(RelationId(r.u32("relation id")?));
    }
    Ok(Truncate {
        cascade: options & 1 != 0,
        restart_identity: options & 2 != 0,
        relation_ids,
    })
}

fn expect_new_tuple_marker(r: &mut Reader) -> Result<(), DecodeError> {
    let offset = r.offset();
    match r.u8("tuple marker")? {
        b'N' => Ok(()),
        found => Err(bad_tuple_kind(r, offset, found, "'N'")),
    }
}

fn bad_tuple_kind(r: &Reader, offset: usize, found: u8, expected: &'static str) -> DecodeError {
    DecodeError::BadTupleKind {
        message: r.message(),
        offset,
        found,
        expected,
    }
}

/// TupleData: an `Int16` column count, then per column a kind byte and, for `t` and `b`, an
/// `Int32` length and the value.
fn tuple(r: &mut Reader) -> Result<TupleData, DecodeError> {
    let offset = r.offset();
    let count = r.u16("tuple column count")?;
    // Every value takes at least its kind byte.
    let count = r.check_count("tuple column count", offset, count.into(), 1)?;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let offset = r.offset();
        values.push(match r.u8("value kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => TupleValue::Text(r.sized_bytes("value length", "text value")?),
            b'b' => TupleValue::Binary(r.sized_bytes("value length", "binary value")?),
            found => return Err(bad_tuple_kind(r, offset, found, "'n', 'u', 't' or 'b'")),
        });
    }
    Ok(TupleData(values))
}
