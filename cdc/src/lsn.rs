//! Log sequence numbers: positions in the Postgres write-ahead log.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A position in the write-ahead log, printed and parsed in Postgres' `X/Y` form
/// (upper and lower 32 bits in hex).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The zero position (`0/0`), which Postgres uses for "none".
    pub const ZERO: Lsn = Lsn(0);

    /// The `X/Y` text in a buffer on the stack: what [`Display`](fmt::Display) prints, without
    /// the formatting machinery (the reader writes an LSN several times per event).
    pub fn text(self) -> LsnText {
        let mut text = LsnText {
            buf: [0; LsnText::MAX],
            len: 0,
        };
        text.push_hex((self.0 >> 32) as u32);
        text.buf[text.len] = b'/';
        text.len += 1;
        text.push_hex(self.0 as u32);
        text
    }
}

/// An LSN's `X/Y` text (see [`Lsn::text`]).
#[derive(Clone, Copy)]
pub struct LsnText {
    buf: [u8; LsnText::MAX],
    len: usize,
}

impl LsnText {
    /// Two 8-digit halves and the slash.
    const MAX: usize = 17;

    /// Appends `v` in upper-case hex without leading zeros (`0` for zero).
    fn push_hex(&mut self, v: u32) {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        let digits = (32 - v.leading_zeros()).div_ceil(4).max(1) as usize;
        for i in 0..digits {
            let nibble = (v >> (4 * (digits - 1 - i))) & 0xF;
            self.buf[self.len + i] = DIGITS[nibble as usize];
        }
        self.len += digits;
    }

    /// The text's bytes (ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits and '/' are ever written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("0/0")
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.text().as_str())
    }
}

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hex numbers separated by '/', like 0/16B3748")]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.chars().take(64).collect());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(LsnVisitor)
    }
}

/// Parses an LSN where the deserializer holds its text (through a `Cow<str>`, serde copies
/// it into a `String` first: two allocations per event envelope).
struct LsnVisitor;

impl serde::de::Visitor<'_> for LsnVisitor {
    type Value = Lsn;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an LSN like \"0/16B3748\"")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Lsn, E> {
        s.parse().map_err(E::custom)
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(v: Lsn) -> Self {
        v.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formats_like_postgres() {
        assert_eq!(Lsn(0x16B3748).to_string(), "0/16B3748");
        assert_eq!(Lsn(0x1_0000_00FF).to_string(), "1/FF");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(format!("{:>6}|", Lsn(0x10)), "  0/10|");
        assert_eq!("0/16B3748".parse::<Lsn>(), Ok(Lsn(0x16B3748)));
        assert_eq!("a/ff".parse::<Lsn>(), Ok(Lsn(0xA_0000_00FF)));
    }

    #[test]
    fn rejects_garbage() {
        for s in ["", "/", "0/", "/1", "x/1", "123456789/0", "0/1/2", "-1/0"] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?} parsed");
        }
    }

    #[test]
    fn reads_json_strings_borrowed_or_escaped() {
        let lsn = |json: &str| serde_json::from_str::<Lsn>(json).map_err(|e| e.to_string());
        assert_eq!(lsn(r#""0/16B3748""#), Ok(Lsn(0x16B3748)));
        // An escape makes serde_json hand over a copy instead of the input's bytes.
        assert_eq!(lsn(r#""1\/FF""#), Ok(Lsn(0x1_0000_00FF)));
        let from_value = serde_json::from_value::<Lsn>(serde_json::json!("0/10"));
        assert_eq!(from_value.map_err(|e| e.to_string()), Ok(Lsn(0x10)));
        let err = lsn("12").expect_err("a number is not an LSN");
        assert!(err.contains("expected an LSN like"), "{err}");
        let err = lsn(r#""0-1""#).expect_err("no slash");
        assert!(err.contains("invalid LSN \"0-1\""), "{err}");
        assert_eq!(
            serde_json::to_string(&Lsn(0x16B3748)).map_err(|e| e.to_string()),
            Ok(r#""0/16B3748""#.to_owned())
        );
    }

    proptest! {
        #[test]
        fn round_trips(v in any::<u64>()) {
            prop_assert_eq!(Lsn(v).to_string().parse::<Lsn>(), Ok(Lsn(v)));
        }

        #[test]
        fn text_is_what_format_prints(v in any::<u64>()) {
            let formatted = format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF);
            let text = Lsn(v).text();
            prop_assert_eq!(text.as_str(), formatted.as_str());
            prop_assert_eq!(text.as_bytes(), formatted.as_bytes());
        }

        #[test]
        fn never_panics(s in ".{0,40}") {
            let _ = s.parse::<Lsn>();
        }
    }
}
