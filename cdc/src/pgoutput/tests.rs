//! Tests of the pgoutput decoder: real messages captured from Postgres 15 (see
//! `cdc/tests/fixtures/pgoutput/README.md`), targeted malformed inputs, and property tests
//! against an encoder that exists only here.

use proptest::prelude::*;

use super::*;

/// Messages of `capture.sql`, text format, in stream order (one hex message per line).
pub(crate) const STREAM_HEX: &str = include_str!("../../tests/fixtures/pgoutput/stream.hex");
/// The same messages with the `binary` option.
pub(crate) const BINARY_HEX: &str = include_str!("../../tests/fixtures/pgoutput/binary.hex");

/// Parses a fixture: one hex-encoded message per line, blank lines ignored.
pub(crate) fn hex_lines(text: &str) -> Vec<Bytes> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let nibble = |c: u8| match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => panic!("not a hex digit: {:?}", char::from(c)),
            };
            let digits = line.as_bytes();
            assert!(digits.len() % 2 == 0, "odd number of hex digits");
            digits
                .chunks(2)
                .map(|pair| (nibble(pair[0]) << 4) | nibble(pair[1]))
                .collect::<Vec<u8>>()
                .into()
        })
        .collect()
}

fn decode_all(text: &str) -> Vec<LogicalMessage> {
    hex_lines(text)
        .into_iter()
        .enumerate()
        .map(|(i, m)| decode(m).unwrap_or_else(|e| panic!("line {}: {e}", i + 1)))
        .collect()
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn texts(values: &[Option<&str>]) -> TupleData {
    TupleData(
        values
            .iter()
            .map(|v| v.map_or(TupleValue::Null, text))
            .collect(),
    )
}

fn begin(m: &LogicalMessage) -> &Begin {
    match m {
        LogicalMessage::Begin(b) => b,
        other => panic!("expected Begin, got {other:?}"),
    }
}

fn commit(m: &LogicalMessage) -> &Commit {
    match m {
        LogicalMessage::Commit(c) => c,
        other => panic!("expected Commit, got {other:?}"),
    }
}

fn relation(m: &LogicalMessage) -> &Relation {
    match m {
        LogicalMessage::Relation(r) => r,
        other => panic!("expected Relation, got {other:?}"),
    }
}

fn insert(m: &LogicalMessage) -> &Insert {
    match m {
        LogicalMessage::Insert(i) => i,
        other => panic!("expected Insert, got {other:?}"),
    }
}

fn update(m: &LogicalMessage) -> &Update {
    match m {
        LogicalMessage::Update(u) => u,
        other => panic!("expected Update, got {other:?}"),
    }
}

fn delete(m: &LogicalMessage) -> &Delete {
    match m {
        LogicalMessage::Delete(d) => d,
        other => panic!("expected Delete, got {other:?}"),
    }
}

fn logical_message(m: &LogicalMessage) -> &LogicalDecodingMessage {
    match m {
        LogicalMessage::Message(m) => m,
        other => panic!("expected Message, got {other:?}"),
    }
}

fn columns(r: &Relation) -> Vec<(&str, u32, bool)> {
    r.columns
        .iter()
        .map(|c| (c.name.as_str(), c.type_oid, c.is_key))
        .collect()
}

// Type OIDs of pg_catalog types used by the fixtures.
const INT2: u32 = 21;
const INT4: u32 = 23;
const INT8: u32 = 20;
const TEXT: u32 = 25;
const FLOAT4: u32 = 700;
const NUMERIC: u32 = 1700;
const BOOL: u32 = 16;
const JSONB: u32 = 3802;
const TIMESTAMPTZ: u32 = 1184;

// --- Real messages -----------------------------------------------------------------------------

#[test]
fn fixture_kinds_in_stream_order() {
    use MessageKind::*;
    let kinds: Vec<MessageKind> = decode_all(STREAM_HEX).iter().map(|m| m.kind()).collect();
    #[rustfmt::skip]
    let expected = [
        Begin, Type, Relation, Insert, Insert, Relation, Insert, Insert, Commit, // 1.
        Begin, Insert, Commit, Begin, Update, Commit,                            // 2.
        Begin, Update, Commit,                                                   // 3.
        Begin, Update, Commit,                                                   // 4.
        Begin, Relation, Insert, Update, Relation, Insert, Commit,               // 4b.
        Begin, Delete, Commit, Begin, Delete, Commit,                            // 5.
        Begin, Message, Relation, Insert, Commit, Message,                       // 6.
        Begin, Type, Relation, Insert, Commit,                                   // 7.
        Begin, Origin, Insert, Commit,                                           // 8.
        Begin, Type, Relation, Relation, Relation, Truncate, Commit,             // 9.
    ];
    assert_eq!(kinds, expected);
}

#[test]
fn fixture_transactions_are_framed() {
    let messages = decode_all(STREAM_HEX);
    let mut open: Option<&Begin> = None;
    let mut xids = Vec::new();
    let mut last_end = Lsn::ZERO;
    for m in &messages {
        match m {
            LogicalMessage::Begin(b) => {
                assert!(open.is_none(), "nested Begin");
                open = Some(b);
                xids.push(b.xid);
            }
            LogicalMessage::Commit(c) => {
                let b = open.take().expect("Commit without Begin");
                assert_eq!(c.flags, 0);
                assert_eq!(c.commit_lsn, b.final_lsn);
                assert_eq!(c.commit_time, b.commit_time);
                assert!(c.end_lsn > c.commit_lsn);
                assert!(c.commit_lsn > last_end, "commits out of order");
                last_end = c.end_lsn;
            }
            LogicalMessage::Message(msg) => {
                assert_eq!(msg.transactional, open.is_some());
            }
            _ => assert!(open.is_some(), "{m:?} outside a transaction"),
        }
    }
    assert!(open.is_none());
    assert_eq!(xids.len(), 12);
    assert!(xids.windows(2).all(|w| w[0] < w[1]), "{xids:?}");
}

#[test]
fn fixture_commit_times_are_recent_unix_times() {
    let messages = decode_all(STREAM_HEX);
    let b = begin(&messages[0]);
    // Captured after 2024-01-01 and before 2100-01-01 (Unix milliseconds).
    let ms = b.commit_time.unix_millis();
    assert!((1_704_067_200_000..4_102_444_800_000).contains(&ms), "{ms}");
    assert_eq!(
        b.commit_time.unix_micros(),
        b.commit_time.0 + POSTGRES_EPOCH_UNIX_MICROS
    );
}

#[test]
fn fixture_enum_type_and_first_relations() {
    let m = decode_all(STREAM_HEX);
    let LogicalMessage::Type(mood) = &m[1] else {
        panic!("{:?}", m[1])
    };
    assert_eq!(
        (mood.namespace.as_str(), mood.name.as_str()),
        ("public", "mood")
    );

    let sellers = relation(&m[2]);
    assert_eq!(
        (sellers.namespace.as_str(), sellers.name.as_str()),
        ("public", "sellers")
    );
    assert_eq!(sellers.replica_identity, ReplicaIdentity::Default);
    assert_eq!(
        columns(sellers),
        [
            ("id", INT4, true),
            ("name", TEXT, false),
            ("bio", TEXT, false),
            ("mood", mood.id, false)
        ]
    );
    assert!(sellers.columns.iter().all(|c| c.type_modifier == -1));

    // Under REPLICA IDENTITY FULL every column is flagged as key.
    let top = relation(&m[5]);
    assert_eq!(top.name, "top_clients");
    assert_eq!(top.replica_identity, ReplicaIdentity::Full);
    assert_eq!(
        columns(top),
        [
            ("seller_id", INT4, true),
            ("client_id", INT4, true),
            ("name", TEXT, true),
            ("position", INT2, true)
        ]
    );
}

#[test]
fn fixture_inserts_with_nulls_and_unicode() {
    let m = decode_all(STREAM_HEX);
    let sellers = relation(&m[2]).id;
    let top = relation(&m[5]).id;
    assert_eq!(insert(&m[3]).relation_id, sellers);
    assert_eq!(
        insert(&m[3]).new,
        texts(&[Some("1"), Some("Acme"), None, Some("happy")])
    );
    assert_eq!(
        insert(&m[4]).new,
        texts(&[Some("2"), Some("Ünïcødé 名前 🚀"), Some("short bio"), None])
    );
    assert_eq!(insert(&m[6]).relation_id, top);
    assert_eq!(
        insert(&m[6]).new,
        texts(&[Some("1"), Some("10"), Some("Client ten"), Some("1")])
    );
    assert_eq!(
        insert(&m[7]).new,
        texts(&[Some("1"), Some("11"), None, Some("2")])
    );
}

#[test]
fn fixture_toast_value_then_unchanged_toast() {
    let m = decode_all(STREAM_HEX);
    let bio = "0123456789".repeat(300);
    assert_eq!(
        insert(&m[10]).new,
        texts(&[Some("3"), Some("Big"), Some(&bio), Some("ok")])
    );
    let u = update(&m[13]);
    assert_eq!(
        u.old, None,
        "key unchanged under identity DEFAULT: no old tuple"
    );
    assert_eq!(
        u.new.0,
        [
            text("3"),
            text("Big Co"),
            TupleValue::UnchangedToast,
            text("ok")
        ]
    );
}

#[test]
fn fixture_update_of_primary_key_sends_old_key() {
    let m = decode_all(STREAM_HEX);
    let u = update(&m[16]);
    let old = u.old.as_ref().expect("old key");
    assert_eq!(old.kind, OldTupleKind::Key);
    assert_eq!(old.tuple, texts(&[Some("3"), None, None, None]));
    assert_eq!(
        u.new.0,
        [
            text("4"),
            text("Big Co"),
            TupleValue::UnchangedToast,
            text("ok")
        ]
    );
}

#[test]
fn fixture_update_under_identity_full_sends_old_row() {
    let m = decode_all(STREAM_HEX);
    let u = update(&m[19]);
    assert_eq!(u.relation_id, relation(&m[5]).id);
    let old = u.old.as_ref().expect("old row");
    assert_eq!(old.kind, OldTupleKind::Full);
    assert_eq!(old.tuple, texts(&[Some("1"), Some("11"), None, Some("2")]));
    assert_eq!(
        u.new,
        texts(&[Some("1"), Some("11"), Some("Client eleven"), Some("3")])
    );
}

#[test]
fn fixture_identity_using_index_and_nothing() {
    let m = decode_all(STREAM_HEX);
    let tags = relation(&m[22]);
    assert_eq!(tags.replica_identity, ReplicaIdentity::Index);
    assert_eq!(columns(tags), [("id", INT4, false), ("label", TEXT, true)]);
    assert_eq!(insert(&m[23]).new, texts(&[Some("1"), Some("blue")]));
    let u = update(&m[24]);
    let old = u.old.as_ref().expect("old key");
    assert_eq!(old.kind, OldTupleKind::Key);
    assert_eq!(old.tuple, texts(&[None, Some("blue")]));
    assert_eq!(u.new, texts(&[Some("1"), Some("navy")]));

    let audit = relation(&m[25]);
    assert_eq!(audit.replica_identity, ReplicaIdentity::Nothing);
    assert_eq!(
        columns(audit),
        [("at", TIMESTAMPTZ, false), ("note", TEXT, false)]
    );
    assert_eq!(
        insert(&m[26]).new,
        texts(&[Some("2024-02-29 12:34:56.789+00"), Some("tagged")])
    );
}

#[test]
fn fixture_deletes() {
    let m = decode_all(STREAM_HEX);
    let d = delete(&m[29]);
    assert_eq!(d.relation_id, relation(&m[5]).id);
    assert_eq!(d.old.kind, OldTupleKind::Full);
    assert_eq!(
        d.old.tuple,
        texts(&[Some("1"), Some("10"), Some("Client ten"), Some("1")])
    );
    let d = delete(&m[32]);
    assert_eq!(d.relation_id, relation(&m[2]).id);
    assert_eq!(d.old.kind, OldTupleKind::Key);
    assert_eq!(d.old.tuple, texts(&[Some("4"), None, None, None]));
}

#[test]
fn fixture_logical_decoding_messages() {
    let m = decode_all(STREAM_HEX);
    let tx = logical_message(&m[35]);
    assert!(tx.transactional);
    assert_eq!((tx.prefix.as_str(), &tx.content[..]), ("p", &b"x"[..]));
    // Written inside the transaction, before its commit record.
    assert!(tx.lsn < commit(&m[38]).commit_lsn);

    let grusse = relation(&m[36]);
    assert_eq!(
        (grusse.namespace.as_str(), grusse.name.as_str()),
        ("shop", "Grüße")
    );
    assert_eq!(
        columns(grusse),
        [
            ("id", INT8, true),
            ("payload", JSONB, false),
            ("price", NUMERIC, false),
            ("ok", BOOL, false)
        ]
    );
    // numeric(10, 2): ((10 << 16) | 2) + VARHDRSZ.
    assert_eq!(grusse.columns[2].type_modifier, ((10 << 16) | 2) + 4);
    assert_eq!(
        insert(&m[37]).new,
        texts(&[
            Some("1"),
            Some(r#"{"a": [1, 2]}"#),
            Some("12.50"),
            Some("t")
        ])
    );

    let watermark = logical_message(&m[39]);
    assert!(!watermark.transactional);
    assert_eq!(watermark.prefix, "cdc.watermark");
    assert_eq!(&watermark.content[..], br#"{"chunk": 7}"#);
    assert!(watermark.lsn > commit(&m[38]).end_lsn);
}

#[test]
fn fixture_relation_after_add_column() {
    let m = decode_all(STREAM_HEX);
    let before = relation(&m[2]);
    let after = relation(&m[42]);
    assert_eq!(after.id, before.id);
    assert_eq!(after.columns.len(), 5);
    assert_eq!(after.columns[..4], before.columns[..]);
    assert_eq!(columns(after)[4], ("rating", FLOAT4, false));
    assert_eq!(
        insert(&m[43]).new,
        texts(&[Some("5"), Some("Rated"), None, Some("sad"), Some("4.5")])
    );
}

#[test]
fn fixture_origin() {
    let m = decode_all(STREAM_HEX);
    let LogicalMessage::Origin(origin) = &m[46] else {
        panic!("{:?}", m[46])
    };
    assert_eq!(origin.name, "upstream_a");
    assert_eq!(origin.commit_lsn, "0/ABCDEF".parse().expect("lsn"));
    // pg_replication_origin_xact_setup('0/ABCDEF', '2024-01-01 00:00:00+00') sets the commit time.
    assert_eq!(begin(&m[45]).commit_time.unix_millis(), 1_704_067_200_000);
    assert_eq!(
        insert(&m[47]).new,
        texts(&[Some("6"), Some("From upstream"), None, None, None])
    );
}

#[test]
fn fixture_truncate_cascade_restart_identity() {
    let m = decode_all(STREAM_HEX);
    let LogicalMessage::Truncate(t) = &m[54] else {
        panic!("{:?}", m[54])
    };
    assert!(t.cascade);
    assert!(t.restart_identity);
    let ids = [
        relation(&m[51]).id,
        relation(&m[52]).id,
        relation(&m[53]).id,
    ];
    assert_eq!(t.relation_ids, ids);
    assert_eq!(relation(&m[51]).name, "sellers");
    assert_eq!(relation(&m[52]).name, "Grüße");
    assert_eq!(relation(&m[53]).name, "top_clients");
}

#[test]
fn fixture_binary_values() {
    let text_stream = decode_all(STREAM_HEX);
    let binary = decode_all(BINARY_HEX);
    assert_eq!(binary.len(), text_stream.len());
    let Insert { new, .. } = insert(&binary[3]);
    assert_eq!(
        new.0,
        [
            TupleValue::Binary(Bytes::from_static(&[0, 0, 0, 1])),
            TupleValue::Binary(Bytes::from_static(b"Acme")),
            TupleValue::Null,
            TupleValue::Binary(Bytes::from_static(b"happy")),
        ]
    );
    // timestamptz is sent as microseconds since 2000-01-01.
    let Some(TupleValue::Binary(at)) = insert(&binary[26]).new.0.first().cloned() else {
        panic!("{:?}", binary[26])
    };
    let at = PgTimestamp(i64::from_be_bytes(at[..].try_into().expect("8 bytes")));
    assert_eq!(at.unix_micros(), 1_709_210_096_789_000); // 2024-02-29T12:34:56.789Z
    assert_eq!(at.unix_millis(), 1_709_210_096_789);
    // Everything but the values is the same as in text mode.
    for (b, t) in binary.iter().zip(&text_stream) {
        assert_eq!(b.kind(), t.kind());
        if let (LogicalMessage::Relation(b), LogicalMessage::Relation(t)) = (b, t) {
            assert_eq!(b, t);
        }
    }
}

#[test]
fn tuple_values_are_slices_of_the_input() {
    let buf = hex_lines(STREAM_HEX).swap_remove(10); // the insert with the 3000-byte value
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let LogicalMessage::Insert(i) = decode(buf.clone()).expect("insert") else {
        panic!("not an insert")
    };
    for value in &i.new.0 {
        let TupleValue::Text(v) = value else {
            panic!("{value:?}")
        };
        assert!(range.contains(&(v.as_ptr() as usize)), "value was copied");
    }
}

#[test]
fn every_fixture_round_trips_through_the_test_encoder() {
    for text in [STREAM_HEX, BINARY_HEX] {
        for buf in hex_lines(text) {
            let m = decode(buf.clone()).expect("decodes");
            assert_eq!(encode(&m), &buf[..], "{m:?}");
        }
    }
}

// --- Malformed input ---------------------------------------------------------------------------

#[test]
fn every_strict_prefix_of_every_fixture_is_an_error() {
    for text in [STREAM_HEX, BINARY_HEX] {
        for buf in hex_lines(text) {
            for len in 0..buf.len() {
                let result = decode(buf.slice(..len));
                assert!(
                    result.is_err(),
                    "prefix {len} of {buf:?} decoded: {result:?}"
                );
            }
        }
    }
}

#[test]
fn every_fixture_with_a_trailing_byte_is_an_error() {
    for buf in hex_lines(STREAM_HEX) {
        let mut longer = buf.to_vec();
        longer.push(0);
        assert_eq!(
            decode(longer.into()),
            Err(DecodeError::TrailingBytes {
                message: MessageKind::from_pgoutput_tag(buf[0]).expect("tag"),
                offset: buf.len(),
                remaining: 1,
            })
        );
    }
}

#[test]
fn empty_and_unknown_tags() {
    assert_eq!(
        decode(Bytes::new()),
        Err(DecodeError::Empty {
            protocol: Protocol::Pgoutput
        })
    );
    // 'S' is Stream Start, protocol version 2 only.
    let err = decode(Bytes::from_static(b"S\0\0\0\x01\x01")).expect_err("v2 message");
    assert_eq!(
        err,
        DecodeError::UnknownTag {
            protocol: Protocol::Pgoutput,
            tag: b'S'
        }
    );
    assert!(err.to_string().contains("'S' (0x53)"), "{err}");
    assert!(
        decode(Bytes::from_static(&[0xff])).is_err_and(|e| e.to_string().contains("0xff")),
        "non-printable tag"
    );
}

#[test]
fn truncated_field_says_where() {
    // A Begin cut inside its xid.
    let err = decode(Bytes::from_static(&[
        b'B', 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0,
    ]))
    .expect_err("truncated");
    assert_eq!(
        err,
        DecodeError::Truncated {
            message: MessageKind::Begin,
            field: "xid",
            offset: 17,
            needed: 4,
            remaining: 1
        }
    );
    assert_eq!(
        err.to_string(),
        "Begin ('B') message truncated: xid at byte 17 needs 4 bytes, only 1 left"
    );
}

#[test]
fn bad_tuple_kinds() {
    // Insert whose tuple marker is 'K' instead of 'N'.
    let err = decode(Bytes::from_static(b"I\0\0\0\x01K\0\0")).expect_err("bad marker");
    assert_eq!(
        err,
        DecodeError::BadTupleKind {
            message: MessageKind::Insert,
            offset: 5,
            found: b'K',
            expected: "'N'"
        }
    );
    // Update whose old tuple is followed by 'O' instead of 'N'.
    let err = decode(Bytes::from_static(b"U\0\0\0\x01K\0\0O\0\0")).expect_err("bad marker");
    assert!(
        matches!(
            err,
            DecodeError::BadTupleKind {
                offset: 8,
                found: b'O',
                ..
            }
        ),
        "{err:?}"
    );
    // Delete without an old tuple.
    let err = decode(Bytes::from_static(b"D\0\0\0\x01N\0\0")).expect_err("no old tuple");
    assert!(
        matches!(
            err,
            DecodeError::BadTupleKind {
                offset: 5,
                found: b'N',
                ..
            }
        ),
        "{err:?}"
    );
    // Value kind 'x'.
    let err = decode(Bytes::from_static(b"I\0\0\0\x01N\0\x02nx")).expect_err("bad value kind");
    assert_eq!(
        err,
        DecodeError::BadTupleKind {
            message: MessageKind::Insert,
            offset: 9,
            found: b'x',
            expected: "'n', 'u', 't' or 'b'"
        }
    );
    assert!(
        err.to_string()
            .contains("bad tuple kind 'x' (0x78) at byte 9"),
        "{err}"
    );
}

#[test]
fn bad_replica_identity() {
    let err = decode(Bytes::from_static(b"R\0\0\0\x01public\0t\0z\0\0")).expect_err("identity");
    assert_eq!(
        err,
        DecodeError::BadReplicaIdentity {
            offset: 14,
            found: b'z'
        }
    );
}

#[test]
fn invalid_utf8_and_missing_nul_in_names() {
    let err = decode(Bytes::from_static(b"R\0\0\0\x01public\0t\xff\xfe\0d\0\0")).expect_err("utf8");
    let DecodeError::InvalidUtf8 {
        message,
        field,
        offset,
        source,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(
        (*message, *field, *offset),
        (MessageKind::Relation, "relation name", 12)
    );
    assert_eq!(source.valid_up_to(), 1);
    assert!(
        err.to_string()
            .contains("relation name at byte 12 is not valid UTF-8"),
        "{err}"
    );

    let err = decode(Bytes::from_static(b"O\0\0\0\0\0\0\0\x01upstream")).expect_err("no NUL");
    assert_eq!(
        err,
        DecodeError::UnterminatedString {
            message: MessageKind::Origin,
            field: "origin name",
            offset: 9
        }
    );
}

#[test]
fn negative_and_oversized_lengths() {
    let err = decode(Bytes::from_static(b"I\0\0\0\x01N\0\x01t\xff\xff\xff\xff")).expect_err("neg");
    assert_eq!(
        err,
        DecodeError::NegativeLength {
            message: MessageKind::Insert,
            field: "value length",
            offset: 9,
            length: -1
        }
    );
    let err = decode(Bytes::from_static(
        b"I\0\0\0\x01N\0\x01t\x7f\xff\xff\xffabc",
    ))
    .expect_err("big");
    assert_eq!(
        err,
        DecodeError::Truncated {
            message: MessageKind::Insert,
            field: "text value",
            offset: 13,
            needed: i32::MAX as usize,
            remaining: 3
        }
    );
    let mut m = vec![b'M', 1];
    m.extend_from_slice(&[0; 8]);
    m.extend_from_slice(b"p\0\x80\0\0\0");
    assert!(matches!(
        decode(m.into()),
        Err(DecodeError::NegativeLength {
            field: "content length",
            offset: 12,
            ..
        })
    ));
}

#[test]
fn huge_counts_fail_before_allocating() {
    // A Relation announcing 65535 columns with 3 bytes left.
    let err = decode(Bytes::from_static(b"R\0\0\0\x01public\0t\0d\xff\xffabc")).expect_err("count");
    assert_eq!(
        err,
        DecodeError::CountTooLarge {
            message: MessageKind::Relation,
            field: "column count",
            offset: 15,
            count: 65535,
            needed: 65535 * MIN_RELATION_COLUMN_BYTES,
            remaining: 3
        }
    );
    assert_eq!(
        err.to_string(),
        "Relation ('R') message: column count 65535 at byte 15 needs at least 655350 bytes, \
         only 3 left"
    );
    // A Truncate of 4 billion relations.
    let err = decode(Bytes::from_static(b"T\xff\xff\xff\xff\x03\0\0\0\x01")).expect_err("count");
    assert!(
        matches!(
            err,
            DecodeError::CountTooLarge {
                count: 0xffff_ffff,
                remaining: 4,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn timestamps_convert_to_unix_time() {
    assert_eq!(PgTimestamp(0).unix_micros(), POSTGRES_EPOCH_UNIX_MICROS);
    assert_eq!(PgTimestamp(0).unix_millis(), 946_684_800_000);
    assert_eq!(
        PgTimestamp(-1).unix_millis(),
        946_684_799_999,
        "rounds down"
    );
    assert_eq!(pg_timestamp_to_unix_ms(PgTimestamp(1_000)), 946_684_800_001);
    assert_eq!(
        PgTimestamp::from_unix_micros(0),
        PgTimestamp(-POSTGRES_EPOCH_UNIX_MICROS)
    );
    // ±infinity saturate instead of overflowing.
    assert_eq!(PgTimestamp(i64::MAX).unix_micros(), i64::MAX);
    assert_eq!(
        PgTimestamp(i64::MIN).unix_micros(),
        i64::MIN + POSTGRES_EPOCH_UNIX_MICROS
    );
    assert_eq!(
        PgTimestamp::from_unix_micros(i64::MAX).unix_micros(),
        i64::MAX
    );
    assert_eq!(
        PgTimestamp::from_unix_micros(i64::MIN),
        PgTimestamp(i64::MIN)
    );
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_709_210_096_789_000);
    assert_eq!(
        PgTimestamp::from_system_time(t).unix_micros(),
        1_709_210_096_789_000
    );
    let before = std::time::UNIX_EPOCH - std::time::Duration::from_micros(5);
    assert_eq!(PgTimestamp::from_system_time(before).unix_micros(), -5);
}

// --- Test-only encoder -------------------------------------------------------------------------

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn put_tuple(out: &mut Vec<u8>, t: &TupleData) {
    out.extend_from_slice(&u16::try_from(t.0.len()).expect("count").to_be_bytes());
    for v in &t.0 {
        match v {
            TupleValue::Null => out.push(b'n'),
            TupleValue::UnchangedToast => out.push(b'u'),
            TupleValue::Text(b) | TupleValue::Binary(b) => {
                out.push(if matches!(v, TupleValue::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                out.extend_from_slice(&i32::try_from(b.len()).expect("len").to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
}

/// Encodes a message the way pgoutput (protocol version 1) does.
pub(crate) fn encode(m: &LogicalMessage) -> Vec<u8> {
    let mut out = vec![m.kind().tag()];
    match m {
        LogicalMessage::Begin(b) => {
            out.extend_from_slice(&b.final_lsn.0.to_be_bytes());
            out.extend_from_slice(&b.commit_time.0.to_be_bytes());
            out.extend_from_slice(&b.xid.to_be_bytes());
        }
        LogicalMessage::Commit(c) => {
            out.push(c.flags);
            out.extend_from_slice(&c.commit_lsn.0.to_be_bytes());
            out.extend_from_slice(&c.end_lsn.0.to_be_bytes());
            out.extend_from_slice(&c.commit_time.0.to_be_bytes());
        }
        LogicalMessage::Origin(o) => {
            out.extend_from_slice(&o.commit_lsn.0.to_be_bytes());
            put_str(&mut out, &o.name);
        }
        LogicalMessage::Relation(r) => {
            out.extend_from_slice(&r.id.0.to_be_bytes());
            put_str(&mut out, &r.namespace);
            put_str(&mut out, &r.name);
            out.push(r.replica_identity.as_byte());
            out.extend_from_slice(&u16::try_from(r.columns.len()).expect("count").to_be_bytes());
            for c in &r.columns {
                out.push(u8::from(c.is_key));
                put_str(&mut out, &c.name);
                out.extend_from_slice(&c.type_oid.to_be_bytes());
                out.extend_from_slice(&c.type_modifier.to_be_bytes());
            }
        }
        LogicalMessage::Type(t) => {
            out.extend_from_slice(&t.id.to_be_bytes());
            put_str(&mut out, &t.namespace);
            put_str(&mut out, &t.name);
        }
        LogicalMessage::Insert(i) => {
            out.extend_from_slice(&i.relation_id.0.to_be_bytes());
            out.push(b'N');
            put_tuple(&mut out, &i.new);
        }
        LogicalMessage::Update(u) => {
            out.extend_from_slice(&u.relation_id.0.to_be_bytes());
            if let Some(old) = &u.old {
                out.push(old.kind.as_byte());
                put_tuple(&mut out, &old.tuple);
            }
            out.push(b'N');
            put_tuple(&mut out, &u.new);
        }
        LogicalMessage::Delete(d) => {
            out.extend_from_slice(&d.relation_id.0.to_be_bytes());
            out.push(d.old.kind.as_byte());
            put_tuple(&mut out, &d.old.tuple);
        }
        LogicalMessage::Truncate(t) => {
            out.extend_from_slice(
                &u32::try_from(t.relation_ids.len())
                    .expect("n")
                    .to_be_bytes(),
            );
            out.push(u8::from(t.cascade) | (u8::from(t.restart_identity) << 1));
            for id in &t.relation_ids {
                out.extend_from_slice(&id.0.to_be_bytes());
            }
        }
        LogicalMessage::Message(msg) => {
            out.push(u8::from(msg.transactional));
            out.extend_from_slice(&msg.lsn.0.to_be_bytes());
            put_str(&mut out, &msg.prefix);
            out.extend_from_slice(&i32::try_from(msg.content.len()).expect("len").to_be_bytes());
            out.extend_from_slice(&msg.content);
        }
    }
    out
}

// --- Property tests ----------------------------------------------------------------------------

fn arb_name() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>().prop_filter("no NUL", |c| *c != '\0'), 0..12)
        .prop_map(String::from_iter)
}

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn arb_lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn arb_time() -> impl Strategy<Value = PgTimestamp> {
    any::<i64>().prop_map(PgTimestamp)
}

fn arb_tuple() -> impl Strategy<Value = TupleData> {
    let value = prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        arb_bytes().prop_map(TupleValue::Text),
        arb_bytes().prop_map(TupleValue::Binary),
    ];
    prop::collection::vec(value, 0..10).prop_map(TupleData)
}

fn arb_old_tuple() -> impl Strategy<Value = OldTuple> {
    (
        prop_oneof![Just(OldTupleKind::Key), Just(OldTupleKind::Full)],
        arb_tuple(),
    )
        .prop_map(|(kind, tuple)| OldTuple { kind, tuple })
}

fn arb_relation_id() -> impl Strategy<Value = RelationId> {
    any::<u32>().prop_map(RelationId)
}

fn arb_message() -> impl Strategy<Value = LogicalMessage> {
    let identity = prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ];
    let column = (any::<bool>(), arb_name(), any::<u32>(), any::<i32>()).prop_map(
        |(is_key, name, type_oid, type_modifier)| Column {
            is_key,
            name,
            type_oid,
            type_modifier,
        },
    );
    prop_oneof![
        (arb_lsn(), arb_time(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            LogicalMessage::Begin(Begin {
                final_lsn,
                commit_time,
                xid,
            })
        }),
        (any::<u8>(), arb_lsn(), arb_lsn(), arb_time()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| LogicalMessage::Commit(Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            })
        ),
        (arb_lsn(), arb_name())
            .prop_map(|(commit_lsn, name)| LogicalMessage::Origin(Origin { commit_lsn, name })),
        (
            arb_relation_id(),
            arb_name(),
            arb_name(),
            identity,
            prop::collection::vec(column, 0..8)
        )
            .prop_map(|(id, namespace, name, replica_identity, columns)| {
                LogicalMessage::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }),
        (any::<u32>(), arb_name(), arb_name()).prop_map(|(id, namespace, name)| {
            LogicalMessage::Type(TypeMessage {
                id,
                namespace,
                name,
            })
        }),
        (arb_relation_id(), arb_tuple())
            .prop_map(|(relation_id, new)| LogicalMessage::Insert(Insert { relation_id, new })),
        (
            arb_relation_id(),
            prop::option::of(arb_old_tuple()),
            arb_tuple()
        )
            .prop_map(|(relation_id, old, new)| LogicalMessage::Update(Update {
                relation_id,
                old,
                new,
            })),
        (arb_relation_id(), arb_old_tuple())
            .prop_map(|(relation_id, old)| LogicalMessage::Delete(Delete { relation_id, old })),
        (
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(arb_relation_id(), 0..8)
        )
            .prop_map(|(cascade, restart_identity, relation_ids)| {
                LogicalMessage::Truncate(Truncate {
                    cascade,
                    restart_identity,
                    relation_ids,
                })
            }),
        (any::<bool>(), arb_lsn(), arb_name(), arb_bytes()).prop_map(
            |(transactional, lsn, prefix, content)| {
                LogicalMessage::Message(LogicalDecodingMessage {
                    transactional,
                    lsn,
                    prefix,
                    content,
                })
            }
        ),
    ]
}

/// The tags of pgoutput v1, to aim random bodies at every decoder branch.
const TAGS: &[u8] = b"BCORYIUDTM";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(bytes.into());
    }

    #[test]
    fn random_bodies_after_a_valid_tag_never_panic(
        tag in prop::sample::select(TAGS),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut buf = vec![tag];
        buf.extend(body);
        let _ = decode(buf.into());
    }

    #[test]
    fn mutated_fixtures_never_panic(
        line in 0..56usize,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut buf = hex_lines(STREAM_HEX)[line].to_vec();
        for (at, byte) in edits {
            let i = at.index(buf.len());
            buf[i] = byte;
        }
        let _ = decode(buf.into());
    }

    #[test]
    fn generated_messages_round_trip(m in arb_message()) {
        let bytes = Bytes::from(encode(&m));
        prop_assert_eq!(decode(bytes.clone()), Ok(m));
        // And every strict prefix of them is an error.
        for len in 0..bytes.len() {
            prop_assert!(decode(bytes.slice(..len)).is_err());
        }
    }

    #[test]
    fn huge_tuple_counts_fail_fast(
        count in 16u16..,
        header in prop_oneof![
            Just(&b"I\0\0\0\x01N"[..]),
            Just(&b"U\0\0\0\x01O"[..]),
            Just(&b"U\0\0\0\x01N"[..]),
            Just(&b"D\0\0\0\x01K"[..]),
        ],
        tail in prop::collection::vec(prop::sample::select(&b"nu"[..]), 0..15),
    ) {
        let mut buf = header.to_vec();
        buf.extend_from_slice(&count.to_be_bytes());
        buf.extend_from_slice(&tail);
        let err = decode(buf.into());
        let is_count_error = matches!(
            err,
            Err(DecodeError::CountTooLarge { field: "tuple column count", offset: 6, .. })
        );
        prop_assert!(is_count_error, "{:?}", err);
    }

    #[test]
    fn huge_relation_and_truncate_counts_fail_fast(
        columns in 2u16..,
        relations in 3u32..,
        tail in prop::collection::vec(any::<u8>(), 0..12),
    ) {
        let mut relation = b"R\0\0\0\x01s\0t\0f".to_vec();
        relation.extend_from_slice(&columns.to_be_bytes());
        relation.extend_from_slice(&tail[..tail.len().min(usize::from(columns) * 10 - 1)]);
        let err = decode(relation.into());
        prop_assert!(matches!(err, Err(DecodeError::CountTooLarge { offset: 10, .. })), "{:?}", err);

        let mut truncate = b"T".to_vec();
        truncate.extend_from_slice(&relations.to_be_bytes());
        truncate.push(0);
        truncate.extend_from_slice(&tail[..tail.len().min(relations as usize * 4 - 1)]);
        let err = decode(truncate.into());
        prop_assert!(matches!(err, Err(DecodeError::CountTooLarge { offset: 1, .. })), "{:?}", err);
    }
}
