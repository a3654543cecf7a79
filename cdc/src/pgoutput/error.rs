//! What can be wrong with a message on the wire, and where.

use std::fmt;

/// Which framing a message belongs to, for errors about its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// A pgoutput logical replication message (the payload of an XLogData).
    Pgoutput,
    /// A CopyData message of the streaming replication protocol.
    Replication,
}

impl Protocol {
    /// The tags this decoder understands, for the "unknown tag" error.
    fn expected_tags(self) -> &'static str {
        match self {
            // Streaming ('S', 'E', 'c', 'A') and two-phase ('b', 'P', 'K', 'r', 'p') messages
            // only exist in protocol versions 2 and 3, which the reader never asks for.
            Protocol::Pgoutput => {
                "one of 'B', 'C', 'O', 'R', 'Y', 'I', 'U', 'D', 'T', 'M' \
                 (pgoutput protocol version 1)"
            }
            Protocol::Replication => "'w' (XLogData) or 'k' (primary keepalive)",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Pgoutput => "pgoutput",
            Protocol::Replication => "replication CopyData",
        })
    }
}

/// The type of the message being decoded when an error occurred.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// pgoutput Begin (`B`).
    Begin,
    /// pgoutput Commit (`C`).
    Commit,
    /// pgoutput Origin (`O`).
    Origin,
    /// pgoutput Relation (`R`).
    Relation,
    /// pgoutput Type (`Y`).
    Type,
    /// pgoutput Insert (`I`).
    Insert,
    /// pgoutput Update (`U`).
    Update,
    /// pgoutput Delete (`D`).
    Delete,
    /// pgoutput Truncate (`T`).
    Truncate,
    /// pgoutput logical decoding Message (`M`).
    Message,
    /// Replication protocol XLogData (`w`).
    XLogData,
    /// Replication protocol primary keepalive (`k`).
    PrimaryKeepalive,
}

impl MessageKind {
    /// The message's one-byte tag on the wire.
    pub const fn tag(self) -> u8 {
        match self {
            MessageKind::Begin => b'B',
            MessageKind::Commit => b'C',
            MessageKind::Origin => b'O',
            MessageKind::Relation => b'R',
            MessageKind::Type => b'Y',
            MessageKind::Insert => b'I',
            MessageKind::Update => b'U',
            MessageKind::Delete => b'D',
            MessageKind::Truncate => b'T',
            MessageKind::Message => b'M',
            MessageKind::XLogData => b'w',
            MessageKind::PrimaryKeepalive => b'k',
        }
    }

    /// The pgoutput message type with this tag, if protocol version 1 has one.
    pub const fn from_pgoutput_tag(tag: u8) -> Option<MessageKind> {
        Some(match tag {
            b'B' => MessageKind::Begin,
            b'C' => MessageKind::Commit,
            b'O' => MessageKind::Origin,
            b'R' => MessageKind::Relation,
            b'Y' => MessageKind::Type,
            b'I' => MessageKind::Insert,
            b'U' => MessageKind::Update,
            b'D' => MessageKind::Delete,
            b'T' => MessageKind::Truncate,
            b'M' => MessageKind::Message,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            MessageKind::Begin => "Begin",
            MessageKind::Commit => "Commit",
            MessageKind::Origin => "Origin",
            MessageKind::Relation => "Relation",
            MessageKind::Type => "Type",
            MessageKind::Insert => "Insert",
            MessageKind::Update => "Update",
            MessageKind::Delete => "Delete",
            MessageKind::Truncate => "Truncate",
            MessageKind::Message => "Message",
            MessageKind::XLogData => "XLogData",
            MessageKind::PrimaryKeepalive => "primary keepalive",
        }
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ('{}')", self.name(), char::from(self.tag()))
    }
}

/// A byte shown as `'B' (0x42)` when printable, else as `0x00`.
struct ByteDisplay(u8);

impl fmt::Display for ByteDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' ({:#04x})", char::from(self.0), self.0)
        } else {
            write!(f, "{:#04x}", self.0)
        }
    }
}

/// Why bytes from the replication connection are not a valid message.
///
/// Offsets count from the message's first byte (its tag), so an error can be matched against a
/// hex dump of the message. Any of these means the stream is corrupt or was produced by a protocol
/// version this decoder does not speak; the reader cannot skip the message safely.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message has no bytes at all, not even a tag.
    #[error("empty {protocol} message: expected at least a one-byte tag")]
    Empty {
        /// The framing that was expected.
        protocol: Protocol,
    },

    /// The first byte is not a message type this decoder knows.
    #[error("unknown {protocol} message tag {} at byte 0; expected {}",
        ByteDisplay(*tag), protocol.expected_tags())]
    UnknownTag {
        /// The framing that was expected.
        protocol: Protocol,
        /// The byte found.
        tag: u8,
    },

    /// The message ends before a field does.
    #[error(
        "{message} message truncated: {field} at byte {offset} needs {needed} bytes, \
             only {remaining} left"
    )]
    Truncated {
        /// The message being decoded.
        message: MessageKind,
        /// The field that does not fit.
        field: &'static str,
        /// Where the field starts.
        offset: usize,
        /// The field's size in bytes.
        needed: usize,
        /// Bytes left in the message at `offset`.
        remaining: usize,
    },

    /// A NUL-terminated string runs to the end of the message without its NUL.
    #[error("{message} message truncated: {field} at byte {offset} has no terminating NUL")]
    UnterminatedString {
        /// The message being decoded.
        message: MessageKind,
        /// The string field.
        field: &'static str,
        /// Where the string starts.
        offset: usize,
    },

    /// A name is not valid UTF-8 (the database encoding should be UTF8; the reader asks for
    /// `client_encoding=UTF8`, so this means corruption).
    #[error("{message} message: {field} at byte {offset} is not valid UTF-8: {source}")]
    InvalidUtf8 {
        /// The message being decoded.
        message: MessageKind,
        /// The string field.
        field: &'static str,
        /// Where the string starts.
        offset: usize,
        /// The position of the first invalid byte, relative to `offset`.
        source: std::str::Utf8Error,
    },

    /// A count says more elements follow than the remaining bytes can hold. Checked before
    /// anything is allocated, so a corrupt count cannot make the reader allocate gigabytes.
    #[error(
        "{message} message: {field} {count} at byte {offset} needs at least {needed} bytes, \
             only {remaining} left"
    )]
    CountTooLarge {
        /// The message being decoded.
        message: MessageKind,
        /// The count field.
        field: &'static str,
        /// Where the count starts.
        offset: usize,
        /// The count read.
        count: u64,
        /// The fewest bytes `count` elements can take.
        needed: u64,
        /// Bytes left after the count.
        remaining: usize,
    },

    /// A length field is negative.
    #[error("{message} message: {field} at byte {offset} is negative ({length})")]
    NegativeLength {
        /// The message being decoded.
        message: MessageKind,
        /// The length field.
        field: &'static str,
        /// Where the length starts.
        offset: usize,
        /// The value read.
        length: i32,
    },

    /// A tuple marker (`N`, `K`, `O`) or a column value kind (`n`, `u`, `t`, `b`) is not one
    /// the message allows at that point.
    #[error("{message} message: bad tuple kind {} at byte {offset}; expected {expected}",
        ByteDisplay(*found))]
    BadTupleKind {
        /// The message being decoded.
        message: MessageKind,
        /// Where the byte is.
        offset: usize,
        /// The byte found.
        found: u8,
        /// The bytes allowed there.
        expected: &'static str,
    },

    /// A Relation message's replica identity is not one of `d`, `n`, `f`, `i`.
    #[error("Relation ('R') message: unknown replica identity {} at byte {offset}; \
             expected 'd', 'n', 'f' or 'i'", ByteDisplay(*found))]
    BadReplicaIdentity {
        /// Where the byte is.
        offset: usize,
        /// The byte found.
        found: u8,
    },

    /// Bytes are left over after the last field of the message.
    #[error("{message} message: {remaining} unexpected trailing bytes at byte {offset}")]
    TrailingBytes {
        /// The message being decoded.
        message: MessageKind,
        /// Where the first unexpected byte is.
        offset: usize,
        /// How many bytes are left over.
        remaining: usize,
    },
}
