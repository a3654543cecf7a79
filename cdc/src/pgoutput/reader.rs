//! A bounds-checked cursor over one message, shared by the pgoutput and CopyData decoders.
//!
//! Every read checks the remaining length first and reports what it was reading and where, so
//! the decoders above it contain no indexing and no arithmetic that could overflow.

use bytes::Bytes;

use super::error::{DecodeError, MessageKind};
use crate::lsn::Lsn;

/// Reads big-endian fields from one message, front to back.
pub(crate) struct Reader {
    buf: Bytes,
    pos: usize,
    message: MessageKind,
}

impl Reader {
    /// A reader over `buf` (a whole message, tag included) positioned at `pos`.
    pub(crate) fn new(buf: Bytes, pos: usize, message: MessageKind) -> Self {
        Reader { buf, pos, message }
    }

    /// The message being decoded.
    pub(crate) fn message(&self) -> MessageKind {
        self.message
    }

    /// The offset of the next byte, from the start of the message.
    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    /// Bytes not yet read.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn truncated(&self, field: &'static str, needed: usize) -> DecodeError {
        DecodeError::Truncated {
            message: self.message,
            field,
            offset: self.pos,
            needed,
            remaining: self.remaining(),
        }
    }

    /// The next `n` bytes as a zero-copy slice of the message.
    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        if n > self.remaining() {
            return Err(self.truncated(field, n));
        }
        let start = self.pos;
        // Cannot overflow: n <= len - pos.
        self.pos = start + n;
        Ok(self.buf.slice(start..self.pos))
    }

    /// Everything left in the message as a zero-copy slice.
    pub(crate) fn take_rest(&mut self) -> Bytes {
        let start = self.pos.min(self.buf.len());
        self.pos = self.buf.len();
        self.buf.slice(start..)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let array: [u8; N] = self
            .rest()
            .get(..N)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| self.truncated(field, N))?;
        self.pos += N;
        Ok(array)
    }

    /// A `Byte1` / `Int8`.
    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(field).map(|[b]| b)
    }

    /// An `Int16` read as unsigned (counts).
    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    /// An `Int32` read as unsigned (OIDs, xids, counts).
    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    /// A signed `Int32`.
    pub(crate) fn i32(&mut self, field: &'static str) -> Result<i32, DecodeError> {
        self.array(field).map(i32::from_be_bytes)
    }

    /// A signed `Int64`.
    pub(crate) fn i64(&mut self, field: &'static str) -> Result<i64, DecodeError> {
        self.array(field).map(i64::from_be_bytes)
    }

    /// An `Int64` WAL position.
    pub(crate) fn lsn(&mut self, field: &'static str) -> Result<Lsn, DecodeError> {
        self.array(field).map(|b| Lsn(u64::from_be_bytes(b)))
    }

    /// A NUL-terminated UTF-8 string, copied out (names are short and get cached).
    pub(crate) fn cstring(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let offset = self.pos;
        let rest = self.rest();
        let (text, consumed) = match rest.iter().position(|&b| b == 0) {
            Some(nul) => (rest.get(..nul).unwrap_or_default(), nul + 1),
            None => {
                return Err(DecodeError::UnterminatedString {
                    message: self.message,
                    field,
                    offset,
                })
            }
        };
        let text = std::str::from_utf8(text)
            .map_err(|source| DecodeError::InvalidUtf8 {
                message: self.message,
                field,
                offset,
                source,
            })?
            .to_owned();
        self.pos += consumed;
        Ok(text)
    }

    /// An `Int32` length followed by that many bytes, as a zero-copy slice.
    pub(crate) fn sized_bytes(
        &mut self,
        length_field: &'static str,
        field: &'static str,
    ) -> Result<Bytes, DecodeError> {
        let offset = self.pos;
        let length = self.i32(length_field)?;
        let n = usize::try_from(length).map_err(|_| DecodeError::NegativeLength {
            message: self.message,
            field: length_field,
            offset,
            length,
        })?;
        self.bytes(n, field)
    }

    /// Checks that `count` elements of at least `min_each` bytes fit in what is left, before
    /// the caller allocates room for them. `offset` is where the count was read.
    pub(crate) fn check_count(
        &self,
        field: &'static str,
        offset: usize,
        count: u64,
        min_each: u64,
    ) -> Result<usize, DecodeError> {
        let remaining = self.remaining();
        let needed = count.saturating_mul(min_each);
        match usize::try_from(count) {
            Ok(n) if needed <= u64::try_from(remaining).unwrap_or(u64::MAX) => Ok(n),
            _ => Err(DecodeError::CountTooLarge {
                message: self.message,
                field,
                offset,
                count,
                needed,
                remaining,
            }),
        }
    }

    /// Ends decoding: the whole message must have been read.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            remaining => Err(DecodeError::TrailingBytes {
                message: self.message,
                offset: self.pos,
                remaining,
            }),
        }
    }
}
