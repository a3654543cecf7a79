//! Order-preserving, self-delimiting encoding of JSON key values into sled keys.
//!
//! A view row lives under `k <view> 0x00 enc(key cols…) enc(pk cols…)`, so a prefix scan over
//! `enc(key cols…)` returns the rows of one lookup key ordered by the source primary key, and a
//! prefix of the key columns is itself a valid scan prefix. Every encoded value starts with a
//! type tag and is self-delimiting, so tuples concatenate without ambiguity:
//!
//! | JSON value         | encoding                                                |
//! |--------------------|---------------------------------------------------------|
//! | null               | `0x01`                                                  |
//! | false / true       | `0x02 0x00` / `0x02 0x01`                               |
//! | integer (i64)      | `0x03` + 8 bytes big-endian of `v ^ i64::MIN` (sorts numerically) |
//! | other number       | `0x04` + 8 bytes of the order-preserving f64 bits       |
//! | string             | `0x05` + bytes, `0x00` escaped as `0x00 0xFF`, then `0x00 0x00` |
//! | array / object     | `0x06` + JSON text, escaped and terminated like a string |

use serde_json::Value;

const TAG_NULL: u8 = 0x01;
const TAG_BOOL: u8 = 0x02;
const TAG_INT: u8 = 0x03;
const TAG_FLOAT: u8 = 0x04;
const TAG_STR: u8 = 0x05;
const TAG_JSON: u8 = 0x06;

/// Appends the encoding of one value.
pub fn encode_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(TAG_NULL),
        Value::Bool(b) => {
            out.push(TAG_BOOL);
            out.push(u8::from(*b));
        }
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push(TAG_INT);
                out.extend_from_slice(&((i as u64) ^ (1 << 63)).to_be_bytes());
            } else if let Some(u) = n.as_u64() {
                // Above i64::MAX: keep it exact as text (bigint never gets here; numeric is a string).
                escaped(out, TAG_STR, u.to_string().as_bytes());
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                let bits = f.to_bits();
                let ordered = if f.is_sign_negative() {
                    !bits
                } else {
                    bits | (1 << 63)
                };
                out.push(TAG_FLOAT);
                out.extend_from_slice(&ordered.to_be_bytes());
            }
        }
        Value::String(s) => escaped(out, TAG_STR, s.as_bytes()),
        Value::Array(_) | Value::Object(_) => escaped(out, TAG_JSON, v.to_string().as_bytes()),
    }
}

fn escaped(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    for &b in bytes {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 0]);
}

/// Encodes a tuple of values (the columns of a key).
pub fn encode_tuple<'a>(out: &mut Vec<u8>, values: impl IntoIterator<Item = &'a Value>) {
    for v in values {
        encode_value(out, v);
    }
}

/// The values a lookup value may be stored as. A query parameter arrives as text (`'7'`) or as a
/// typed value, while the envelope stores a `bigint` as a JSON number and a `numeric` as a string;
/// a source column holds one JSON kind only, so probing both spellings finds the rows without
/// ever matching rows of another column type.
pub fn lookup_candidates(v: &Value) -> Vec<Value> {
    match v {
        Value::String(s) => {
            let mut c = vec![v.clone()];
            if let Ok(i) = s.trim().parse::<i64>() {
                if i.to_string() == s.trim() {
                    c.push(Value::from(i));
                }
            }
            match s.as_str() {
                "t" | "true" => c.push(Value::Bool(true)),
                "f" | "false" => c.push(Value::Bool(false)),
                _ => {}
            }
            c
        }
        Value::Number(n) => vec![v.clone(), Value::String(n.to_string())],
        Value::Bool(b) => vec![v.clone(), Value::String(b.to_string())],
        _ => vec![v.clone()],
    }
}

/// The smallest key greater than every key starting with `prefix` (for range scans), or `None`
/// when no such key exists (all 0xFF).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn enc(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        encode_value(&mut out, v);
        out
    }

    #[test]
    fn integers_sort_numerically() {
        let vals = [-1000i64, -1, 0, 1, 9, 10, 1_000_000, i64::MAX];
        for w in vals.windows(2) {
            assert!(enc(&json!(w[0])) < enc(&json!(w[1])), "{w:?}");
        }
    }

    #[test]
    fn tuples_do_not_collide() {
        let mut a = Vec::new();
        encode_tuple(&mut a, &[json!("a\u{0}b"), json!("c")]);
        let mut b = Vec::new();
        encode_tuple(&mut b, &[json!("a"), json!("b\u{0}c")]);
        assert_ne!(a, b);
    }

    #[test]
    fn candidates_cover_text_parameters() {
        assert!(lookup_candidates(&json!("7")).contains(&json!(7)));
        assert!(!lookup_candidates(&json!("07")).contains(&json!(7)));
        assert!(lookup_candidates(&json!(7)).contains(&json!("7")));
    }

    #[test]
    fn prefix_end_bounds_prefix() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xFF]), None);
    }

    proptest! {
        #[test]
        fn integer_order_is_preserved(a in any::<i64>(), b in any::<i64>()) {
            prop_assert_eq!(a.cmp(&b), enc(&json!(a)).cmp(&enc(&json!(b))));
        }

        #[test]
        fn string_order_is_preserved(a in ".{0,12}", b in ".{0,12}") {
            prop_assert_eq!(a.as_bytes().cmp(b.as_bytes()), enc(&json!(a)).cmp(&enc(&json!(b))));
        }

        #[test]
        fn string_is_not_a_prefix_of_another(a in ".{0,8}", b in ".{0,8}") {
            prop_assume!(a != b);
            let (ea, eb) = (enc(&json!(a)), enc(&json!(b)));
            prop_assert!(!eb.starts_with(&ea));
        }
    }
}
