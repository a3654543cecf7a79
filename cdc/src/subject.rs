//! Mapping between tables and NATS subjects.
//!
//! A schema or table name is used as a subject token as it is when it consists of
//! `[A-Za-z0-9_-]`; every other byte (a dot, space, `*`, `>`, `%`, non-ASCII) is
//! percent-encoded (`%2E`), so every table maps to exactly one subject and back.

/// Subject token used for heartbeats: `<prefix>._heartbeat`.
pub const HEARTBEAT_TOKEN: &str = "_heartbeat";

/// Encodes one name as a subject token.
pub fn encode_token(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(hex_digit(b >> 4));
            out.push(hex_digit(b & 0xF));
        }
    }
    out
}

fn hex_digit(n: u8) -> char {
    char::from(b"0123456789ABCDEF"[usize::from(n & 0xF)])
}

/// Decodes a subject token back into the name; `None` if it is not a valid encoding.
pub fn decode_token(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = token.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// `<prefix>.<schema>.<table>` with both names encoded.
pub fn table_subject(prefix: &str, schema: &str, table: &str) -> String {
    format!("{prefix}.{}.{}", encode_token(schema), encode_token(table))
}

/// `<prefix>._heartbeat`.
pub fn heartbeat_subject(prefix: &str) -> String {
    format!("{prefix}.{HEARTBEAT_TOKEN}")
}

/// Splits a subject under `prefix` back into `(schema, table)`; `None` for heartbeats and
/// subjects that are not table subjects.
pub fn parse_table_subject(prefix: &str, subject: &str) -> Option<(String, String)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (schema, table) = rest.split_once('.')?;
    if table.contains('.') {
        return None;
    }
    Some((decode_token(schema)?, decode_token(table)?))
}

/// Splits a configured `schema.table` name. Either part may be double-quoted (with `""` for a
/// quote inside) to hold dots; unquoted parts are taken as written.
pub fn split_table_name(name: &str) -> Option<(String, String)> {
    let (schema, rest) = take_ident(name)?;
    let rest = rest.strip_prefix('.')?;
    let (table, rest) = take_ident(rest)?;
    if !rest.is_empty() || schema.is_empty() || table.is_empty() {
        return None;
    }
    Some((schema, table))
}

fn take_ident(s: &str) -> Option<(String, &str)> {
    if let Some(mut rest) = s.strip_prefix('"') {
        let mut out = String::new();
        loop {
            let end = rest.find('"')?;
            out.push_str(&rest[..end]);
            rest = &rest[end + 1..];
            if let Some(r) = rest.strip_prefix('"') {
                out.push('"');
                rest = r;
            } else {
                return Some((out, rest));
            }
        }
    }
    let end = s.find('.').unwrap_or(s.len());
    Some((s[..end].to_string(), &s[end..]))
}

/// Quotes an identifier for SQL (`"a""b"`).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"schema"."table"` for SQL.
pub fn quote_table(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_names_pass_through() {
        assert_eq!(
            table_subject("cdc", "public", "top_clients"),
            "cdc.public.top_clients"
        );
    }

    #[test]
    fn special_bytes_are_percent_encoded() {
        assert_eq!(encode_token("my.schema"), "my%2Eschema");
        assert_eq!(encode_token("a b*>"), "a%20b%2A%3E");
        assert_eq!(encode_token("é"), "%C3%A9");
        assert_eq!(encode_token("100%"), "100%25");
        assert_eq!(
            parse_table_subject("cdc", &table_subject("cdc", "my.schema", "Tabelle ü")),
            Some(("my.schema".into(), "Tabelle ü".into()))
        );
    }

    #[test]
    fn heartbeats_are_not_tables() {
        assert_eq!(parse_table_subject("cdc", &heartbeat_subject("cdc")), None);
    }

    #[test]
    fn configured_names_split() {
        assert_eq!(
            split_table_name("public.t"),
            Some(("public".into(), "t".into()))
        );
        assert_eq!(
            split_table_name("\"my.schema\".\"a\"\"b\""),
            Some(("my.schema".into(), "a\"b".into()))
        );
        assert_eq!(split_table_name("t"), None);
        assert_eq!(split_table_name("a.b.c"), None);
        assert_eq!(split_table_name("\"unterminated.t"), None);
    }

    proptest! {
        #[test]
        fn tokens_round_trip(name in "\\PC{0,24}") {
            let token = encode_token(&name);
            prop_assert!(!token.contains(['.', '*', '>', ' ']));
            prop_assert_eq!(decode_token(&token), Some(name));
        }

        #[test]
        fn decode_never_panics(s in "\\PC{0,24}") {
            let _ = decode_token(&s);
            let _ = split_table_name(&s);
        }
    }
}
