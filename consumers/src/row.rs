//! Compact encoding of stored view rows: the values of a view's stored columns, in the view's
//! column order, without column names. Decoding needs no JSON parsing and no map: the pgwire
//! server encodes result fields straight from the stored bytes.
//!
//! | value              | encoding                                  |
//! |--------------------|-------------------------------------------|
//! | null               | `0`                                       |
//! | false / true       | `1` / `2`                                 |
//! | integer (i64)      | `3` + 8 bytes little-endian               |
//! | integer above i64  | `4` + 8 bytes little-endian (u64)         |
//! | other number       | `5` + 8 bytes little-endian (f64 bits)    |
//! | string             | `6` + u32 LE length + UTF-8 bytes         |
//! | array / object     | `7` + u32 LE length + JSON text           |

use serde_json::Value;

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const INT: u8 = 3;
const UINT: u8 = 4;
const FLOAT: u8 = 5;
const STR: u8 = 6;
const JSON: u8 = 7;

/// One decoded value, borrowing from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Field<'a> {
    /// SQL NULL / JSON null.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer that fits i64.
    Int(i64),
    /// An integer above `i64::MAX`.
    UInt(u64),
    /// Any other number.
    Float(f64),
    /// A string.
    Str(&'a str),
    /// An array or object, as JSON text.
    Json(&'a str),
}

impl Field<'_> {
    /// The value as JSON.
    pub fn to_value(self) -> Value {
        match self {
            Field::Null => Value::Null,
            Field::Bool(b) => Value::Bool(b),
            Field::Int(i) => Value::from(i),
            Field::UInt(u) => Value::from(u),
            Field::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
            Field::Str(s) => Value::String(s.to_owned()),
            Field::Json(j) => serde_json::from_str(j).unwrap_or(Value::Null),
        }
    }
}

/// Appends the encoding of one value (`None`, a missing value, is stored as null).
pub fn encode(out: &mut Vec<u8>, v: Option<&Value>) {
    match v {
        None | Some(Value::Null) => out.push(NULL),
        Some(Value::Bool(b)) => out.push(if *b { TRUE } else { FALSE }),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                out.push(INT);
                out.extend_from_slice(&i.to_le_bytes());
            } else if let Some(u) = n.as_u64() {
                out.push(UINT);
                out.extend_from_slice(&u.to_le_bytes());
            } else {
                out.push(FLOAT);
                out.extend_from_slice(&n.as_f64().unwrap_or(0.0).to_bits().to_le_bytes());
            }
        }
        Some(Value::String(s)) => {
            out.push(STR);
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Some(v @ (Value::Array(_) | Value::Object(_))) => {
            out.push(JSON);
            let len_at = out.len();
            out.extend_from_slice(&[0; 4]);
            // Serializing a JSON value into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, v);
            let len = (out.len() - len_at - 4) as u32;
            out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        }
    }
}

/// Why stored bytes do not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored row does not decode: {0}")]
pub struct DecodeError(pub &'static str);

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if buf.len() < n {
        return Err(DecodeError("truncated"));
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn u32_at(buf: &mut &[u8]) -> Result<usize, DecodeError> {
    let b = take(buf, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

fn u64_at(buf: &mut &[u8]) -> Result<[u8; 8], DecodeError> {
    let b = take(buf, 8)?;
    let mut a = [0; 8];
    a.copy_from_slice(b);
    Ok(a)
}

/// Decodes the next value from `buf`, advancing it.
pub fn next<'a>(buf: &mut &'a [u8]) -> Result<Field<'a>, DecodeError> {
    let tag = take(buf, 1)?[0];
    Ok(match tag {
        NULL => Field::Null,
        FALSE => Field::Bool(false),
        TRUE => Field::Bool(true),
        INT => Field::Int(i64::from_le_bytes(u64_at(buf)?)),
        UINT => Field::UInt(u64::from_le_bytes(u64_at(buf)?)),
        FLOAT => Field::Float(f64::from_bits(u64::from_le_bytes(u64_at(buf)?))),
        STR | JSON => {
            let len = u32_at(buf)?;
            let s = std::str::from_utf8(take(buf, len)?).map_err(|_| DecodeError("not UTF-8"))?;
            if tag == STR {
                Field::Str(s)
            } else {
                Field::Json(s)
            }
        }
        _ => return Err(DecodeError("unknown tag")),
    })
}

/// Decodes exactly `n` values into `out` (cleared first).
pub fn decode_into<'a>(
    mut buf: &'a [u8],
    n: usize,
    out: &mut Vec<Field<'a>>,
) -> Result<(), DecodeError> {
    out.clear();
    for _ in 0..n {
        out.push(next(&mut buf)?);
    }
    if !buf.is_empty() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn roundtrip(values: &[Value]) -> Vec<Value> {
        let mut buf = Vec::new();
        for v in values {
            encode(&mut buf, Some(v));
        }
        let mut fields = Vec::new();
        decode_into(&buf, values.len(), &mut fields).expect("decodes");
        fields.into_iter().map(Field::to_value).collect()
    }

    #[test]
    fn every_kind_roundtrips() {
        let values = vec![
            json!(null),
            json!(true),
            json!(false),
            json!(-7),
            json!(i64::MIN),
            json!(u64::MAX),
            json!(1.5),
            json!(""),
            json!("Acme \u{0} ü"),
            json!([1, "a", null]),
            json!({"a": {"b": [1.25]}}),
        ];
        assert_eq!(roundtrip(&values), values);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut f = Vec::new();
        assert!(decode_into(&[9], 1, &mut f).is_err());
        assert!(decode_into(&[3, 1, 2], 1, &mut f).is_err());
        assert!(decode_into(&[6, 9, 0, 0, 0, b'a'], 1, &mut f).is_err());
        assert!(decode_into(&[0, 0], 1, &mut f).is_err());
        assert!(decode_into(&[6, 1, 0, 0, 0, 0xFF], 1, &mut f).is_err());
    }

    proptest! {
        #[test]
        fn strings_and_integers_roundtrip(s in ".*", i in any::<i64>(), f in -1e300f64..1e300) {
            let values = vec![json!(s), json!(i), json!(f)];
            prop_assert_eq!(roundtrip(&values), values);
        }
    }
}
