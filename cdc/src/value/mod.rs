//! Column values: pgoutput's text format → JSON, by type OID.
//!
//! pgoutput sends every non-NULL, non-TOASTed column value in the type's text output format.
//! The replication session sets `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`,
//! `extra_float_digits=3` and `bytea_output=hex`, and this module assumes them. The mapping
//! (DESIGN.md, "Reader" → "Values"):
//!
//! | Postgres type | JSON |
//! |---|---|
//! | `int2`, `int4`, `int8`, `oid` | number |
//! | `float4`, `float8` | number; `"NaN"`, `"Infinity"`, `"-Infinity"` as strings |
//! | `numeric` | string, exact (all digits kept; `"NaN"`, `"Infinity"` too) |
//! | `bool` | `true` / `false` |
//! | `text`, `varchar`, `bpchar` (padding kept), `name`, `"char"`, `citext`-like | string |
//! | `json`, `jsonb` | the embedded JSON value |
//! | `bytea` | base64 string (standard alphabet, padded) |
//! | `timestamp` | `"2024-01-02T03:04:05.123456"` |
//! | `timestamptz` | `"2024-01-02T03:04:05.123Z"`; a non-zero offset as `"+05:30"` |
//! | `date`, `time`, `interval` (ISO 8601 already) | string, as sent |
//! | `timetz` | string, offset normalised to `+HH:MM` (`+HH:MM:SS` if it has seconds) |
//! | `infinity`, `-infinity`, `… BC` dates/timestamps | string, as sent |
//! | `uuid`, `inet`, `cidr`, `macaddr`, `money`, `xml`, ranges, composites, unknown | string, as sent |
//! | enums | string |
//! | domains | by their base type |
//! | arrays | JSON arrays (nested for multi-dimensional ones) of the element mapping |
//!
//! [`TypeRegistry::to_json`] never fails: a text it can't parse for its type (which a server
//! with the settings above does not send) becomes a JSON string holding the text unchanged.

mod array;

use std::collections::{HashMap, HashSet};

use base64::Engine as _;
use serde_json::Value;

use array::Node;

/// How a Postgres type's text output is turned into JSON; see the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TypeKind {
    /// `bool`: `t`/`f` → `true`/`false`.
    Bool,
    /// `int2`, `int4`, `int8`, `oid` → JSON number.
    Integer,
    /// `float4`, `float8` → JSON number; `NaN` and the infinities → strings.
    Float,
    /// `numeric` → string (exact).
    Numeric,
    /// `text`, `varchar`, `bpchar`, `name`, `"char"` and other string-category types → string.
    Text,
    /// `json`, `jsonb` → the embedded JSON value.
    Json,
    /// `bytea` (hex output) → base64 string.
    Bytea,
    /// `timestamp` → ISO 8601 string without offset.
    Timestamp,
    /// `timestamptz` → ISO 8601 string with `Z` or `±HH:MM`.
    TimestampTz,
    /// `date` → string as sent.
    Date,
    /// `time` → string as sent.
    Time,
    /// `timetz` → string with the offset normalised to `±HH:MM`.
    TimeTz,
    /// `interval` (IntervalStyle `iso_8601`) → string as sent.
    Interval,
    /// An array type.
    Array {
        /// OID of the element type.
        element: u32,
        /// The element type's array delimiter (`b','` for nearly all types, `b';'` for `box`).
        delimiter: u8,
    },
    /// A user-defined enum → its label as a string.
    Enum,
    /// A domain → mapped as its base type.
    Domain {
        /// OID of the domain's base type (itself possibly a domain).
        base: u32,
    },
    /// Everything else (`uuid`, `inet`, `cidr`, `macaddr`, `money`, `xml`, geometric types,
    /// ranges, composites, unknown types) → the text as a string.
    Other,
}

/// Type OIDs of the built-in types the registry knows without asking the server, with their
/// kinds. Each was checked against `pg_type` of a PostgreSQL 15 server (see the test module).
const BUILTIN: &[(u32, TypeKind)] = &[
    (16, TypeKind::Bool),          // bool
    (17, TypeKind::Bytea),         // bytea
    (18, TypeKind::Text),          // "char"
    (19, TypeKind::Text),          // name
    (20, TypeKind::Integer),       // int8
    (21, TypeKind::Integer),       // int2
    (22, TypeKind::Other),         // int2vector (space-separated, not an array literal)
    (23, TypeKind::Integer),       // int4
    (25, TypeKind::Text),          // text
    (26, TypeKind::Integer),       // oid
    (30, TypeKind::Other),         // oidvector (space-separated, not an array literal)
    (114, TypeKind::Json),         // json
    (142, TypeKind::Other),        // xml
    (603, TypeKind::Other),        // box
    (650, TypeKind::Other),        // cidr
    (700, TypeKind::Float),        // float4
    (701, TypeKind::Float),        // float8
    (790, TypeKind::Other),        // money
    (829, TypeKind::Other),        // macaddr
    (869, TypeKind::Other),        // inet
    (1042, TypeKind::Text),        // bpchar
    (1043, TypeKind::Text),        // varchar
    (1082, TypeKind::Date),        // date
    (1083, TypeKind::Time),        // time
    (1114, TypeKind::Timestamp),   // timestamp
    (1184, TypeKind::TimestampTz), // timestamptz
    (1186, TypeKind::Interval),    // interval
    (1266, TypeKind::TimeTz),      // timetz
    (1700, TypeKind::Numeric),     // numeric
    (2950, TypeKind::Other),       // uuid
    (3802, TypeKind::Json),        // jsonb
    (1000, array(16)),             // _bool
    (1001, array(17)),             // _bytea
    (1002, array(18)),             // _char
    (1003, array(19)),             // _name
    (1005, array(21)),             // _int2
    (1007, array(23)),             // _int4
    (1009, array(25)),             // _text
    (1014, array(1042)),           // _bpchar
    (1015, array(1043)),           // _varchar
    (1016, array(20)),             // _int8
    (
        1020,
        TypeKind::Array {
            element: 603,
            delimiter: b';',
        },
    ), // _box
    (1021, array(700)),            // _float4
    (1022, array(701)),            // _float8
    (1028, array(26)),             // _oid
    (1040, array(829)),            // _macaddr
    (1041, array(869)),            // _inet
    (1115, array(1114)),           // _timestamp
    (1182, array(1082)),           // _date
    (1183, array(1083)),           // _time
    (1185, array(1184)),           // _timestamptz
    (1187, array(1186)),           // _interval
    (1231, array(1700)),           // _numeric
    (1270, array(1266)),           // _timetz
    (143, array(142)),             // _xml
    (199, array(114)),             // _json
    (651, array(650)),             // _cidr
    (791, array(790)),             // _money
    (2951, array(2950)),           // _uuid
    (3807, array(3802)),           // _jsonb
];

/// An array of `element` with the usual `,` delimiter.
const fn array(element: u32) -> TypeKind {
    TypeKind::Array {
        element,
        delimiter: b',',
    }
}

/// The kind of a built-in type, if it is one of [`BUILTIN`].
fn builtin(oid: u32) -> Option<TypeKind> {
    BUILTIN.iter().find(|(o, _)| *o == oid).map(|(_, k)| *k)
}

/// How many domain / array-element hops [`TypeRegistry::to_json`] follows before it gives up
/// and returns the text (guards against cycles in a corrupt or hand-built registry).
const MAX_TYPE_DEPTH: usize = 32;

/// The query [`TypeRegistry::load`] runs: the requested OIDs and, recursively, every element
/// and base type they mention, with what is needed to classify them. An array's delimiter is
/// its element type's `typdelim`, which is what `array_out` uses.
const LOAD_QUERY: &str = "\
WITH RECURSIVE wanted(oid) AS (
    SELECT unnest($1::oid[])
  UNION
    SELECT x.oid
      FROM pg_catalog.pg_type p
      JOIN wanted w ON p.oid = w.oid
     CROSS JOIN LATERAL (VALUES (p.typelem), (p.typbasetype)) AS x(oid)
     WHERE x.oid <> 0
)
SELECT p.oid, p.typtype, p.typcategory, p.typelem, p.typbasetype,
       COALESCE(e.typdelim, p.typdelim) AS typdelim
  FROM pg_catalog.pg_type p
  JOIN wanted w ON p.oid = w.oid
  LEFT JOIN pg_catalog.pg_type e ON e.oid = p.typelem";

/// Classifies a `pg_type` row (`typtype`, `typcategory`, `typelem`, `typbasetype`, element
/// `typdelim`). Well-known built-in OIDs keep their fixed kind.
fn classify(oid: u32, typtype: u8, category: u8, elem: u32, base: u32, delim: u8) -> TypeKind {
    if let Some(kind) = builtin(oid) {
        return kind;
    }
    match (typtype, category) {
        (b'e', _) => TypeKind::Enum,
        (b'd', _) if base != 0 => TypeKind::Domain { base },
        (_, b'A') if elem != 0 => TypeKind::Array {
            element: elem,
            delimiter: delim,
        },
        // Base types of the string category (citext and the like).
        (b'b', b'S') => TypeKind::Text,
        _ => TypeKind::Other,
    }
}

/// Type OID → [`TypeKind`], pre-seeded with the built-in types and extended from the
/// server's catalog ([`TypeRegistry::load`]) for everything else.
#[derive(Debug, Clone)]
pub struct TypeRegistry {
    kinds: HashMap<u32, TypeKind>,
}

impl Default for TypeRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl TypeRegistry {
    /// A registry that knows the built-in types (scalars and their arrays).
    pub fn new() -> Self {
        Self {
            kinds: BUILTIN.iter().copied().collect(),
        }
    }

    /// The kind registered for `oid`, if any.
    pub fn kind(&self, oid: u32) -> Option<&TypeKind> {
        self.kinds.get(&oid)
    }

    /// Registers (or replaces) the kind of `oid`.
    pub fn insert(&mut self, oid: u32, kind: TypeKind) {
        self.kinds.insert(oid, kind);
    }

    /// The OIDs among `oids` the registry doesn't know yet, each once, in first-seen order;
    /// pass them to [`TypeRegistry::load`].
    pub fn unknown(&self, oids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        let mut seen = HashSet::new();
        oids.into_iter()
            .filter(|oid| !self.kinds.contains_key(oid) && seen.insert(*oid))
            .collect()
    }

    /// Looks `oids` up in `pg_type` with one query, together with (recursively) the element
    /// types of arrays and the base types of domains they mention, and registers them:
    /// `typtype 'e'` → [`TypeKind::Enum`], `'d'` → [`TypeKind::Domain`], `typcategory 'A'`
    /// with an element → [`TypeKind::Array`], string-category base types →
    /// [`TypeKind::Text`], anything else → the built-in kind for well-known OIDs or
    /// [`TypeKind::Other`]. A requested OID the catalog doesn't have (a dropped type) is
    /// registered as [`TypeKind::Other`], so it isn't looked up again.
    pub async fn load(
        &mut self,
        client: &tokio_postgres::Client,
        oids: &[u32],
    ) -> Result<(), tokio_postgres::Error> {
        if oids.is_empty() {
            return Ok(());
        }
        let rows = client.query(LOAD_QUERY, &[&oids]).await?;
        for row in rows {
            let oid: u32 = row.try_get(0)?;
            let typtype: i8 = row.try_get(1)?;
            let category: i8 = row.try_get(2)?;
            let elem: u32 = row.try_get(3)?;
            let base: u32 = row.try_get(4)?;
            let delim: i8 = row.try_get(5)?;
            let kind = classify(
                oid,
                typtype.to_ne_bytes()[0],
                category.to_ne_bytes()[0],
                elem,
                base,
                delim.to_ne_bytes()[0],
            );
            self.kinds.insert(oid, kind);
        }
        for oid in oids {
            self.kinds.entry(*oid).or_insert(TypeKind::Other);
        }
        Ok(())
    }

    /// Converts one value in pgoutput's text format to JSON according to the type `oid`.
    ///
    /// Never panics and never fails: an unknown OID, or a text that doesn't parse as its
    /// type, gives the text itself as a JSON string. (SQL NULL never reaches this function;
    /// the caller maps it to `null`.)
    pub fn to_json(&self, oid: u32, text: &str) -> Value {
        self.convert(oid, text, 0)
    }

    /// Appends the JSON of one value to `out`: the same JSON as [`TypeRegistry::to_json`], but
    /// the common kinds (integers, booleans, text-like values) are written without building a
    /// [`Value`] (the reader's hot path).
    pub fn write_json(&self, oid: u32, text: &str, out: &mut Vec<u8>) {
        match self.resolve(oid) {
            TypeKind::Bool if text == "t" || text == "true" => out.extend_from_slice(b"true"),
            TypeKind::Bool if text == "f" || text == "false" => out.extend_from_slice(b"false"),
            TypeKind::Integer if is_canonical_integer(text) => {
                out.extend_from_slice(text.as_bytes())
            }
            TypeKind::Bool
            | TypeKind::Numeric
            | TypeKind::Text
            | TypeKind::Date
            | TypeKind::Time
            | TypeKind::Interval
            | TypeKind::Enum
            | TypeKind::Domain { .. }
            | TypeKind::Other => write_json_str(out, text),
            _ => {
                // Writing into a Vec can't fail.
                let _ = serde_json::to_writer(&mut *out, &self.to_json(oid, text));
            }
        }
    }

    /// The kind `oid` maps by: domains resolved to their base, unknown OIDs and domain
    /// chains longer than [`MAX_TYPE_DEPTH`] (cycles) to [`TypeKind::Other`].
    fn resolve(&self, oid: u32) -> TypeKind {
        let mut oid = oid;
        for _ in 0..MAX_TYPE_DEPTH {
            match self.kinds.get(&oid) {
                Some(TypeKind::Domain { base }) => oid = *base,
                Some(kind) => return *kind,
                None => return TypeKind::Other,
            }
        }
        TypeKind::Other
    }

    fn convert(&self, oid: u32, text: &str, depth: usize) -> Value {
        let fallback = || Value::String(text.to_owned());
        if depth >= MAX_TYPE_DEPTH {
            return fallback();
        }
        let converted = match self.resolve(oid) {
            TypeKind::Bool => bool_value(text),
            TypeKind::Integer => integer(text),
            TypeKind::Float => float(text),
            TypeKind::Json => serde_json::from_str(text).ok(),
            TypeKind::Bytea => bytea(text)
                .map(|b| Value::String(base64::engine::general_purpose::STANDARD.encode(b))),
            TypeKind::Timestamp => timestamp(text).map(Value::String),
            TypeKind::TimestampTz => timestamptz(text).map(Value::String),
            TypeKind::TimeTz => timetz(text).map(Value::String),
            TypeKind::Array { element, delimiter } => {
                array::parse(text, delimiter).map(|node| self.array_value(element, node, depth + 1))
            }
            TypeKind::Numeric
            | TypeKind::Text
            | TypeKind::Date
            | TypeKind::Time
            | TypeKind::Interval
            | TypeKind::Enum
            | TypeKind::Domain { .. }
            | TypeKind::Other => None,
        };
        converted.unwrap_or_else(fallback)
    }

    fn array_value(&self, element: u32, node: Node, depth: usize) -> Value {
        match node {
            Node::Null => Value::Null,
            Node::Text(text) => self.convert(element, &text, depth),
            Node::List(items) => Value::Array(
                items
                    .into_iter()
                    .map(|item| self.array_value(element, item, depth))
                    .collect(),
            ),
        }
    }
}

/// Appends `text` as a JSON string.
pub fn write_json_str(out: &mut Vec<u8>, text: &str) {
    // Serializing a str into a Vec can't fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// True when `text` is an integer exactly as JSON (and serde_json) would print it: an optional
/// minus, no leading zeros, within i64 or u64.
fn is_canonical_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0"
        && (text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok())
}

fn bool_value(text: &str) -> Option<Value> {
    match text {
        "t" | "true" => Some(Value::Bool(true)),
        "f" | "false" => Some(Value::Bool(false)),
        _ => None,
    }
}

fn integer(text: &str) -> Option<Value> {
    if let Ok(i) = text.parse::<i64>() {
        return Some(Value::from(i));
    }
    text.parse::<u64>().ok().map(Value::from)
}

fn float(text: &str) -> Option<Value> {
    match text {
        "NaN" | "Infinity" | "-Infinity" => None,
        // `f64::from_str` accepts "inf"/"nan" too; `from_f64` rejects the non-finite results.
        _ => text
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number),
    }
}

/// Decodes `bytea` output: hex (`\x0a0b`) or, for robustness, the legacy escape format.
fn bytea(text: &str) -> Option<Vec<u8>> {
    if let Some(hex) = text.strip_prefix("\\x") {
        let digits = hex.as_bytes();
        if digits.len() % 2 != 0 {
            return None;
        }
        return digits
            .chunks_exact(2)
            .map(|pair| Some((hex_digit(pair[0])? << 4) | hex_digit(pair[1])?))
            .collect();
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b != b'\\' {
            out.push(b);
            i += 1;
        } else if bytes.get(i + 1) == Some(&b'\\') {
            out.push(b'\\');
            i += 2;
        } else {
            let octal = bytes.get(i + 1..i + 4)?;
            let mut value: u16 = 0;
            for &d in octal {
                if !(b'0'..=b'7').contains(&d) {
                    return None;
                }
                value = value * 8 + u16::from(d - b'0');
            }
            out.push(u8::try_from(value).ok()?);
            i += 4;
        }
    }
    Some(out)
}

fn hex_digit(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

/// `n` ASCII digits at the start of `s`, and the rest.
fn digits(s: &str, n: usize) -> Option<(&str, &str)> {
    let head = s.get(..n)?;
    let rest = s.get(n..)?;
    head.bytes()
        .all(|b| b.is_ascii_digit())
        .then_some((head, rest))
}

/// ISO date `YYYY-MM-DD` (four or more year digits): `Some` if `s` is exactly one.
fn check_date(s: &str) -> Option<()> {
    let year_len = s.bytes().take_while(u8::is_ascii_digit).count();
    if year_len < 4 {
        return None;
    }
    let rest = s.get(year_len..)?.strip_prefix('-')?;
    let (_, rest) = digits(rest, 2)?;
    let rest = rest.strip_prefix('-')?;
    let (_, rest) = digits(rest, 2)?;
    rest.is_empty().then_some(())
}

/// ISO time `HH:MM:SS[.ffffff]`: `Some` if `s` is exactly one.
fn check_time(s: &str) -> Option<()> {
    let (_, rest) = digits(s, 2)?;
    let rest = rest.strip_prefix(':')?;
    let (_, rest) = digits(rest, 2)?;
    let rest = rest.strip_prefix(':')?;
    let (_, rest) = digits(rest, 2)?;
    match rest.strip_prefix('.') {
        None => rest.is_empty().then_some(()),
        Some(frac) => (!frac.is_empty() && frac.bytes().all(|b| b.is_ascii_digit())).then_some(()),
    }
}

/// Splits `HH:MM:SS[.f]±HH[:MM[:SS]]` into the time and the offset normalised to `±HH:MM`
/// (`±HH:MM:SS` when the offset has seconds); `utc_as_z` turns a zero offset into `Z`.
fn time_and_offset(s: &str, utc_as_z: bool) -> Option<(&str, String)> {
    let at = s.rfind(['+', '-'])?;
    let (time, offset) = s.split_at(at);
    check_time(time)?;
    let sign = offset.get(..1)?;
    let (hh, rest) = digits(offset.get(1..)?, 2)?;
    let (mm, rest) = match rest.strip_prefix(':') {
        Some(rest) => digits(rest, 2)?,
        None if rest.is_empty() => ("00", rest),
        None => return None,
    };
    let ss = match rest.strip_prefix(':') {
        Some(rest) => {
            let (ss, rest) = digits(rest, 2)?;
            if !rest.is_empty() {
                return None;
            }
            Some(ss)
        }
        None if rest.is_empty() => None,
        None => return None,
    };
    let ss = ss.filter(|ss| *ss != "00");
    let normalised = if utc_as_z && hh == "00" && mm == "00" && ss.is_none() {
        "Z".to_owned()
    } else {
        match ss {
            Some(ss) => format!("{sign}{hh}:{mm}:{ss}"),
            None => format!("{sign}{hh}:{mm}"),
        }
    };
    Some((time, normalised))
}

/// `2024-01-02 03:04:05.123456` → `2024-01-02T03:04:05.123456`.
fn timestamp(text: &str) -> Option<String> {
    let (date, time) = text.split_once(' ')?;
    check_date(date)?;
    check_time(time)?;
    Some(format!("{date}T{time}"))
}

/// `2024-01-02 03:04:05.123+00` → `2024-01-02T03:04:05.123Z`, `…+05:30` kept as `+05:30`.
fn timestamptz(text: &str) -> Option<String> {
    let (date, rest) = text.split_once(' ')?;
    check_date(date)?;
    let (time, offset) = time_and_offset(rest, true)?;
    Some(format!("{date}T{time}{offset}"))
}

/// `03:04:05+00` → `03:04:05+00:00`, `03:04:05-08` → `03:04:05-08:00`.
fn timetz(text: &str) -> Option<String> {
    let (time, offset) = time_and_offset(text, false)?;
    Some(format!("{time}{offset}"))
}

#[cfg(test)]
mod tests;
