//! The server side of the NATS client protocol, as far as a pull consumer reads it: operations
//! framed out of a byte buffer (`MSG`, `HMSG`, `PING`, `PONG`, `+OK`, `-ERR`, `INFO`), message
//! headers (`NATS/1.0 <status>` and `Name: value` lines) and JetStream's `$JS.ACK.…` reply
//! subjects, which carry a message's stream and consumer sequence.
//!
//! The parser never panics: every length is checked before it is used, a control line longer
//! than [`MAX_CONTROL_LINE`] or a message larger than [`MAX_MESSAGE`] is an error, and an
//! incomplete frame is `Ok(None)` (read more, then call again).

use bytes::{Buf, Bytes, BytesMut};

/// Longest control line accepted (nats-server's own `max_control_line` default is 4 KiB; an
/// `INFO` with many cluster URLs can be longer).
pub const MAX_CONTROL_LINE: usize = 64 * 1024;
/// Largest message accepted: nats-server's `max_payload` is at most 64 MiB, plus headers.
pub const MAX_MESSAGE: usize = 80 * 1024 * 1024;

/// A malformed frame from the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NATS protocol error: {0}")]
pub struct ProtocolError(pub String);

fn bad(what: impl Into<String>) -> ProtocolError {
    ProtocolError(what.into())
}

/// One operation sent by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOp {
    /// `MSG` or `HMSG`: a message delivered to one of our subscriptions.
    Msg(RawMsg),
    /// `PING`: answer with `PONG`.
    Ping,
    /// `PONG`: the answer to our `PING`.
    Pong,
    /// `+OK` (only in verbose mode).
    Ok,
    /// `-ERR '<text>'`.
    Err(String),
    /// `INFO {json}`.
    Info(Bytes),
}

/// A delivered message: subject, subscription id, reply subject, the raw header block
/// (`NATS/1.0…\r\n\r\n`, empty for `MSG`) and the payload. All of them share the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMsg {
    /// Subject the message was published to (or the inbox it was delivered to).
    pub subject: Bytes,
    /// Subscription id.
    pub sid: u64,
    /// Reply subject; for JetStream deliveries the `$JS.ACK.…` subject.
    pub reply: Option<Bytes>,
    /// Header block, empty when the message has none.
    pub headers: Bytes,
    /// Payload.
    pub payload: Bytes,
}

/// Takes the next complete operation off the front of `buf`: `Ok(None)` when `buf` holds only
/// part of one (nothing is consumed then).
pub fn parse(buf: &mut BytesMut) -> Result<Option<ServerOp>, ProtocolError> {
    let scan = buf.len().min(MAX_CONTROL_LINE + 2);
    let Some(eol) = find_crlf(&buf[..scan]) else {
        if buf.len() > MAX_CONTROL_LINE {
            return Err(bad(format!("no line end within {MAX_CONTROL_LINE} bytes")));
        }
        return Ok(None);
    };
    let line = &buf[..eol];
    let (op, rest) = match line.iter().position(|b| *b == b' ' || *b == b'\t') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &line[line.len()..]),
    };
    let op_is = |name: &[u8]| op.eq_ignore_ascii_case(name);
    if op_is(b"MSG") || op_is(b"HMSG") {
        return parse_msg(buf, eol, op_is(b"HMSG"));
    }
    let parsed = if op_is(b"PING") {
        ServerOp::Ping
    } else if op_is(b"PONG") {
        ServerOp::Pong
    } else if op_is(b"+OK") {
        ServerOp::Ok
    } else if op_is(b"-ERR") {
        let text = String::from_utf8_lossy(rest);
        ServerOp::Err(text.trim().trim_matches('\'').to_owned())
    } else if op_is(b"INFO") {
        let start = eol - rest.len();
        let info = buf.split_to(eol + 2).freeze().slice(start..eol);
        return Ok(Some(ServerOp::Info(info)));
    } else {
        return Err(bad(format!(
            "unknown operation {:?}",
            String::from_utf8_lossy(&op[..op.len().min(32)])
        )));
    };
    buf.advance(eol + 2);
    Ok(Some(parsed))
}

/// `MSG <subject> <sid> [reply] <size>` or `HMSG <subject> <sid> [reply] <header size> <size>`,
/// then the bytes and `\r\n`.
fn parse_msg(
    buf: &mut BytesMut,
    eol: usize,
    with_headers: bool,
) -> Result<Option<ServerOp>, ProtocolError> {
    let line = &buf[..eol];
    // Token positions within the line: at most 6 (op, subject, sid, reply, header size, size).
    let mut tokens: [(usize, usize); 6] = [(0, 0); 6];
    let mut count = 0;
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && (line[i] == b' ' || line[i] == b'\t') {
            i += 1;
        }
        if i == line.len() {
            break;
        }
        let start = i;
        while i < line.len() && line[i] != b' ' && line[i] != b'\t' {
            i += 1;
        }
        if count == tokens.len() {
            return Err(bad("too many fields in a MSG line"));
        }
        tokens[count] = (start, i);
        count += 1;
    }
    // op, subject, sid, [reply], then one size (MSG) or two (HMSG).
    let numbers = if with_headers { 2 } else { 1 };
    let has_reply = match count.checked_sub(numbers) {
        Some(3) => false,
        Some(4) => true,
        _ => {
            return Err(bad(format!(
                "a {} line with {count} fields",
                if with_headers { "HMSG" } else { "MSG" }
            )))
        }
    };
    let field = |n: usize| &line[tokens[n].0..tokens[n].1];
    let sid =
        parse_size(field(2)).ok_or_else(|| bad("a MSG line with a bad subscription id"))? as u64;
    let total = parse_size(field(count - 1)).ok_or_else(|| bad("a MSG line with a bad size"))?;
    let header_len = if with_headers {
        parse_size(field(count - 2)).ok_or_else(|| bad("an HMSG line with a bad header size"))?
    } else {
        0
    };
    if total > MAX_MESSAGE {
        return Err(bad(format!(
            "a message of {total} bytes (more than {MAX_MESSAGE})"
        )));
    }
    if header_len > total {
        return Err(bad("an HMSG line whose header size exceeds its size"));
    }
    let body_start = eol + 2;
    let frame_end = body_start + total + 2;
    if buf.len() < frame_end {
        // Room for the rest, so the next read can complete it.
        buf.reserve(frame_end - buf.len());
        return Ok(None);
    }
    if &buf[frame_end - 2..frame_end] != b"\r\n" {
        return Err(bad("a message not followed by CRLF"));
    }
    let (subject, reply) = (tokens[1], has_reply.then_some(tokens[3]));
    let frame = buf.split_to(frame_end).freeze();
    Ok(Some(ServerOp::Msg(RawMsg {
        subject: frame.slice(subject.0..subject.1),
        sid,
        reply: reply.map(|r| frame.slice(r.0..r.1)),
        headers: frame.slice(body_start..body_start + header_len),
        payload: frame.slice(body_start + header_len..body_start + total),
    })))
}

/// A decimal size or id: digits only, no sign, at most 12 digits (no overflow).
fn parse_size(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 12 {
        return None;
    }
    digits.iter().try_fold(0usize, |n, d| {
        d.is_ascii_digit().then(|| n * 10 + usize::from(d - b'0'))
    })
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = bytes[from..].iter().position(|b| *b == b'\n') {
        let nl = from + i;
        if nl > 0 && bytes[nl - 1] == b'\r' {
            return Some(nl - 1);
        }
        from = nl + 1;
    }
    None
}

/// The status line of a header block: `NATS/1.0 408 Request Timeout` → `(408, "Request
/// Timeout")`; `None` for an ordinary message's `NATS/1.0` or no headers.
pub fn status(headers: &[u8]) -> Option<(u16, &str)> {
    let first = headers.split(|b| *b == b'\n').next()?;
    let first = std::str::from_utf8(first).ok()?.trim_end_matches('\r');
    let rest = first.strip_prefix("NATS/1.0")?.trim_start();
    let (code, description) = rest.split_once(' ').unwrap_or((rest, ""));
    if code.len() != 3 {
        return None;
    }
    Some((code.parse().ok()?, description.trim()))
}

/// The value of header `name` (case-insensitive) in a header block, trimmed; the first one when
/// it appears more than once.
pub fn header<'h>(headers: &'h [u8], name: &str) -> Option<&'h str> {
    let mut lines = headers.split(|b| *b == b'\n');
    lines.next()?; // the NATS/1.0 line
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(name.as_bytes())
        {
            return std::str::from_utf8(line[colon + 1..].trim_ascii()).ok();
        }
    }
    None
}

/// What a JetStream delivery's reply subject says about the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckInfo {
    /// The message's sequence in the stream.
    pub stream_seq: u64,
    /// Its sequence among this consumer's deliveries (1, 2, 3, … for an ordered consumer).
    pub consumer_seq: u64,
    /// Messages still pending for the consumer after this one.
    pub pending: u64,
}

/// Parses `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>` or the form
/// with domain and account hash in front (ADR-15: 9 or more tokens after the prefix).
pub fn ack_info(reply: &[u8]) -> Option<AckInfo> {
    let rest = reply.strip_prefix(b"$JS.ACK.")?;
    let mut tokens: [&[u8]; 9] = [&[]; 9];
    let mut count = 0;
    for token in rest.split(|b| *b == b'.') {
        if count < tokens.len() {
            tokens[count] = token;
        }
        count += 1;
    }
    // Index of <delivered>.
    let at = match count {
        7 => 2,
        n if n >= 9 => 4,
        _ => return None,
    };
    let number = |t: &[u8]| -> Option<u64> { std::str::from_utf8(t).ok()?.parse().ok() };
    Some(AckInfo {
        stream_seq: number(tokens[at + 1])?,
        consumer_seq: number(tokens[at + 2])?,
        pending: number(tokens[at + 4])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn all(mut buf: BytesMut) -> Result<Vec<ServerOp>, ProtocolError> {
        let mut ops = Vec::new();
        while let Some(op) = parse(&mut buf)? {
            ops.push(op);
        }
        assert!(
            buf.is_empty(),
            "left over: {:?}",
            String::from_utf8_lossy(&buf)
        );
        Ok(ops)
    }

    #[test]
    fn frames_every_operation() {
        let bytes = b"INFO {\"max_payload\":1048576}\r\nPING\r\nPONG\r\n+OK\r\n-ERR 'Authorization Violation'\r\nMSG a.b 1 5\r\nhello\r\nMSG a.b 2 r.s 0\r\n\r\nHMSG in.x 1 $JS.ACK.S.C.1.7.1.1700000000000000000.0 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";
        let ops = all(BytesMut::from(&bytes[..])).expect("parses");
        assert_eq!(ops.len(), 8);
        assert_eq!(
            ops[0],
            ServerOp::Info(Bytes::from_static(b"{\"max_payload\":1048576}"))
        );
        assert_eq!(ops[1], ServerOp::Ping);
        assert_eq!(ops[2], ServerOp::Pong);
        assert_eq!(ops[3], ServerOp::Ok);
        assert_eq!(ops[4], ServerOp::Err("Authorization Violation".into()));
        let ServerOp::Msg(m) = &ops[5] else {
            panic!("{:?}", ops[5])
        };
        assert_eq!(
            (&m.subject[..], m.sid, m.reply.is_none(), &m.payload[..]),
            (&b"a.b"[..], 1, true, &b"hello"[..])
        );
        let ServerOp::Msg(m) = &ops[6] else {
            panic!("{:?}", ops[6])
        };
        assert_eq!(
            (m.reply.as_deref(), m.payload.len()),
            (Some(&b"r.s"[..]), 0)
        );
        let ServerOp::Msg(m) = &ops[7] else {
            panic!("{:?}", ops[7])
        };
        assert_eq!(&m.headers[..], b"NATS/1.0\r\n\r\n");
        assert_eq!(&m.payload[..], b"hi");
        let info = ack_info(m.reply.as_deref().expect("reply")).expect("ack info");
        assert_eq!(
            info,
            AckInfo {
                stream_seq: 7,
                consumer_seq: 1,
                pending: 0
            }
        );
    }

    #[test]
    fn incomplete_frames_wait_for_more() {
        let whole = b"HMSG in.x 1 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(parse(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed at {cut}");
        }
    }

    #[test]
    fn refuses_malformed_frames() {
        for bytes in [
            &b"MSG a 1\r\n"[..],
            b"MSG a 1 b c 5\r\n",
            b"MSG a x 5\r\nhello\r\n",
            b"MSG a 1 -5\r\n",
            b"HMSG a 1 9 5\r\n",
            b"MSG a 1 5\r\nhelloXX",
            b"WHAT\r\n",
            b"MSG a 1 999999999999\r\n",
        ] {
            assert!(
                parse(&mut BytesMut::from(bytes)).is_err(),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let mut long = BytesMut::from(&b"MSG "[..]);
        long.extend_from_slice(&vec![b'a'; MAX_CONTROL_LINE + 8]);
        assert!(parse(&mut long).is_err());
    }

    #[test]
    fn reads_status_and_headers() {
        let block = b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 12\r\nnats-pending-bytes:  300 \r\n\r\n";
        assert_eq!(status(block), Some((408, "Request Timeout")));
        assert_eq!(header(block, "Nats-Pending-Messages"), Some("12"));
        assert_eq!(header(block, "Nats-Pending-Bytes"), Some("300"));
        assert_eq!(header(block, "Cdc-Large-Ref"), None);
        assert_eq!(
            status(b"NATS/1.0 100 Idle Heartbeat\r\n\r\n"),
            Some((100, "Idle Heartbeat"))
        );
        assert_eq!(status(b"NATS/1.0 404\r\n\r\n"), Some((404, "")));
        assert_eq!(status(b"NATS/1.0\r\nCdc-Op: c\r\n\r\n"), None);
        assert_eq!(
            header(b"NATS/1.0\r\nCdc-Op: c\r\n\r\n", "cdc-op"),
            Some("c")
        );
        assert_eq!(status(b""), None);
    }

    #[test]
    fn reads_both_ack_subject_forms() {
        let old = b"$JS.ACK.CDC.c1.1.42.3.1700000000000000000.9";
        assert_eq!(
            ack_info(old),
            Some(AckInfo {
                stream_seq: 42,
                consumer_seq: 3,
                pending: 9
            })
        );
        let new = b"$JS.ACK.hub.ACCHASH.CDC.c1.1.42.3.1700000000000000000.9.tok";
        assert_eq!(
            ack_info(new),
            Some(AckInfo {
                stream_seq: 42,
                consumer_seq: 3,
                pending: 9
            })
        );
        let new9 = b"$JS.ACK._.ACCHASH.CDC.c1.1.42.3.1700000000000000000.9";
        assert_eq!(ack_info(new9).map(|i| i.stream_seq), Some(42));
        for bad in [
            &b"$JS.ACK.CDC.c1.1.x.3.1.9"[..],
            b"$JS.ACK.CDC.c1.1.42",
            b"_INBOX.x",
            b"",
        ] {
            assert_eq!(ack_info(bad), None);
        }
    }

    proptest! {
        #[test]
        fn never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = parse(&mut buf) {}
            let _ = status(&bytes);
            let _ = header(&bytes, "Nats-Pending-Messages");
            let _ = ack_info(&bytes);
        }

        #[test]
        fn never_panics_on_mangled_frames(cut in 0usize..80, flip in 0usize..80, byte in any::<u8>()) {
            let mut bytes = b"HMSG in.x 1 $JS.ACK.S.C.1.7.1.1.0 12 14\r\nNATS/1.0\r\n\r\nhi\r\nPING\r\n".to_vec();
            let flip = flip % bytes.len();
            bytes[flip] = byte;
            bytes.truncate(cut.min(bytes.len()));
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = parse(&mut buf) {}
        }

        #[test]
        fn any_split_frames_the_same(split in 0usize..200) {
            let stream = b"PING\r\nHMSG in.x 1 $JS.ACK.S.C.1.7.1.1.0 12 14\r\nNATS/1.0\r\n\r\nhi\r\nMSG a 2 3\r\nabc\r\nINFO {}\r\n";
            let expected = all(BytesMut::from(&stream[..])).expect("parses");
            let split = split % stream.len();
            let mut buf = BytesMut::from(&stream[..split]);
            let mut ops = Vec::new();
            while let Some(op) = parse(&mut buf).expect("parses") { ops.push(op); }
            buf.extend_from_slice(&stream[split..]);
            while let Some(op) = parse(&mut buf).expect("parses") { ops.push(op); }
            prop_assert_eq!(ops, expected);
        }
    }
}
