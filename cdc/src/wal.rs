//! The CopyData framing of the streaming replication protocol, after `START_REPLICATION`.
//!
//! In a replication connection's CopyBoth mode the server sends XLogData (`w`, carrying one
//! pgoutput message, decoded by [`crate::pgoutput::decode`]) and primary keepalives (`k`); the
//! client answers with standby status updates (`r`) that report how far it has written,
//! flushed and applied. See the Postgres manual, "Streaming Replication Protocol".
//! Like the pgoutput decoder, [`decode_copy_data`] never panics on bad input.

use bytes::{BufMut, Bytes, BytesMut};

use crate::lsn::Lsn;
use crate::pgoutput::reader::Reader;
use crate::pgoutput::{DecodeError, MessageKind, PgTimestamp, Protocol};

/// A message the server sends inside CopyData during logical replication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`: WAL data, here one pgoutput message.
    XLogData {
        /// The WAL position of the data. For logical replication Postgres (15) sends the LSN
        /// of the WAL record being decoded, but 0/0 for messages written ahead of the one that
        /// carries the position (Type and Relation messages, a Begin followed by an Origin),
        /// so positions are better taken from the pgoutput messages themselves.
        wal_start: Lsn,
        /// The end of WAL on the server; for logical replication, the same as `wal_start`.
        wal_end: Lsn,
        /// The server's clock when it sent the message.
        send_time: PgTimestamp,
        /// The pgoutput message, a zero-copy slice of the CopyData payload.
        data: Bytes,
    },
    /// `k`: a keepalive. Once the walsender has sent everything and waits for new WAL, every
    /// change before `wal_end` has been delivered.
    PrimaryKeepalive {
        /// The end of WAL on the server.
        wal_end: Lsn,
        /// The server's clock when it sent the message.
        send_time: PgTimestamp,
        /// The server asks for a standby status update now, or it will drop the connection
        /// after `wal_sender_timeout`.
        reply_requested: bool,
    },
}

/// The size of a standby status update: tag, three LSNs, a timestamp and the reply flag.
pub const STANDBY_STATUS_UPDATE_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

/// Decodes the payload of one CopyData message sent by the server.
pub fn decode_copy_data(buf: Bytes) -> Result<ReplicationMessage, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError::Empty {
            protocol: Protocol::Replication,
        });
    };
    match tag {
        b'w' => {
            let mut r = Reader::new(buf, 1, MessageKind::XLogData);
            Ok(ReplicationMessage::XLogData {
                wal_start: r.lsn("WAL start")?,
                wal_end: r.lsn("WAL end")?,
                send_time: PgTimestamp(r.i64("send time")?),
                data: r.take_rest(),
            })
        }
        b'k' => {
            let mut r = Reader::new(buf, 1, MessageKind::PrimaryKeepalive);
            let message = ReplicationMessage::PrimaryKeepalive {
                wal_end: r.lsn("WAL end")?,
                send_time: PgTimestamp(r.i64("send time")?),
                reply_requested: r.u8("reply requested")? != 0,
            };
            r.finish()?;
            Ok(message)
        }
        tag => Err(DecodeError::UnknownTag {
            protocol: Protocol::Replication,
            tag,
        }),
    }
}

/// Encodes a standby status update (`r`), the payload of a CopyData message to the server.
///
/// `flush` is what the server may recycle WAL up to and where a restarted stream resumes, so it
/// must only cover changes that are durable downstream. `now` is the client's clock
/// ([`pg_now`]); `reply_requested` asks the server to answer with a keepalive at once.
pub fn encode_standby_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now: PgTimestamp,
    reply_requested: bool,
) -> Bytes {
    let mut buf = BytesMut::with_capacity(STANDBY_STATUS_UPDATE_LEN);
    buf.put_u8(b'r');
    buf.put_u64(write.0);
    buf.put_u64(flush.0);
    buf.put_u64(apply.0);
    buf.put_i64(now.0);
    buf.put_u8(u8::from(reply_requested));
    buf.freeze()
}

/// The current time as a Postgres timestamp, for standby status updates.
pub fn pg_now() -> PgTimestamp {
    PgTimestamp::from_system_time(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::pgoutput::tests::{hex_lines, STREAM_HEX};
    use crate::pgoutput::{decode, LogicalMessage};

    /// The CopyData payloads of a real `START_REPLICATION` session over the workload of
    /// `stream.hex` (see `cdc/tests/fixtures/pgoutput/README.md`).
    const COPYDATA_HEX: &str = include_str!("../tests/fixtures/pgoutput/copydata.hex");

    fn encode_xlog_data(
        wal_start: Lsn,
        wal_end: Lsn,
        send_time: PgTimestamp,
        data: &[u8],
    ) -> Vec<u8> {
        let mut out = vec![b'w'];
        out.extend_from_slice(&wal_start.0.to_be_bytes());
        out.extend_from_slice(&wal_end.0.to_be_bytes());
        out.extend_from_slice(&send_time.0.to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    fn encode_keepalive(wal_end: Lsn, send_time: PgTimestamp, reply_requested: bool) -> Vec<u8> {
        let mut out = vec![b'k'];
        out.extend_from_slice(&wal_end.0.to_be_bytes());
        out.extend_from_slice(&send_time.0.to_be_bytes());
        out.push(u8::from(reply_requested));
        out
    }

    #[test]
    fn captured_session_carries_the_captured_stream() {
        let frames: Vec<ReplicationMessage> = hex_lines(COPYDATA_HEX)
            .into_iter()
            .map(|f| decode_copy_data(f).expect("decodes"))
            .collect();
        let mut data = Vec::new();
        let mut keepalives = Vec::new();
        let mut last_send_time = PgTimestamp(i64::MIN);
        for frame in &frames {
            match frame {
                ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    send_time,
                    data: d,
                } => {
                    assert_eq!(wal_start, wal_end);
                    assert!(*send_time >= last_send_time);
                    last_send_time = *send_time;
                    data.push(d.clone());
                }
                ReplicationMessage::PrimaryKeepalive { send_time, .. } => {
                    assert!(*send_time >= last_send_time);
                    last_send_time = *send_time;
                    keepalives.push(frame.clone());
                }
            }
        }
        // Every pgoutput message of the session, byte for byte the same as the SQL interface's.
        assert_eq!(data, hex_lines(STREAM_HEX));
        // The walsender's clock is the commit clock of the same machine, a moment later.
        let Ok(LogicalMessage::Begin(first)) = decode(data[0].clone()) else {
            panic!("first message is not a Begin")
        };
        assert!(last_send_time > first.commit_time);
        assert!(last_send_time.unix_millis() - first.commit_time.unix_millis() < 600_000);

        // Caught up, the walsender reports the end of the last commit; asked to reply, it says so.
        let Ok(LogicalMessage::Commit(last)) = decode(data[data.len() - 1].clone()) else {
            panic!("last message is not a Commit")
        };
        assert_eq!(keepalives.len(), 4);
        assert_eq!(
            keepalives.last(),
            Some(&ReplicationMessage::PrimaryKeepalive {
                wal_end: last.end_lsn,
                send_time: last_send_time,
                reply_requested: true,
            })
        );
        assert!(keepalives[..3].iter().all(|k| matches!(
            k,
            ReplicationMessage::PrimaryKeepalive {
                reply_requested: false,
                ..
            }
        )));
    }

    #[test]
    fn xlog_data_is_a_slice_of_the_frame() {
        let frame = hex_lines(COPYDATA_HEX).swap_remove(1);
        let Ok(ReplicationMessage::XLogData { data, .. }) = decode_copy_data(frame.clone()) else {
            panic!("not XLogData")
        };
        assert_eq!(data.as_ptr(), frame[25..].as_ptr());
    }

    #[test]
    fn standby_status_update_layout() {
        let bytes = encode_standby_status_update(
            Lsn(0x0102_0304_0506_0708),
            Lsn(0x1112_1314_1516_1718),
            Lsn(0x2122_2324_2526_2728),
            PgTimestamp(0x3132_3334_3536_3738),
            true,
        );
        let mut expected = vec![b'r'];
        for word in [
            0x0102_0304_0506_0708u64,
            0x1112_1314_1516_1718,
            0x2122_2324_2526_2728,
            0x3132_3334_3536_3738,
        ] {
            expected.extend_from_slice(&word.to_be_bytes());
        }
        expected.push(1);
        assert_eq!(&bytes[..], &expected[..]);
        assert_eq!(bytes.len(), 34);
        assert_eq!(STANDBY_STATUS_UPDATE_LEN, 34);
        let off = encode_standby_status_update(Lsn(1), Lsn(1), Lsn(1), PgTimestamp(0), false);
        assert_eq!(off.last(), Some(&0));
    }

    #[test]
    fn pg_now_is_now() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_micros();
        let now = pg_now();
        let after = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_micros();
        let now = u128::try_from(now.unix_micros()).expect("after 1970");
        assert!(
            before <= now && now <= after,
            "{before} <= {now} <= {after}"
        );
    }

    #[test]
    fn malformed_frames() {
        assert_eq!(
            decode_copy_data(Bytes::new()),
            Err(DecodeError::Empty {
                protocol: Protocol::Replication
            })
        );
        let err = decode_copy_data(Bytes::from_static(b"d")).expect_err("tag");
        assert_eq!(
            err,
            DecodeError::UnknownTag {
                protocol: Protocol::Replication,
                tag: b'd'
            }
        );
        assert!(
            err.to_string()
                .contains("'w' (XLogData) or 'k' (primary keepalive)"),
            "{err}"
        );

        let keepalive = encode_keepalive(Lsn(7), PgTimestamp(8), false);
        for len in 0..keepalive.len() {
            assert!(decode_copy_data(Bytes::copy_from_slice(&keepalive[..len])).is_err());
        }
        let mut longer = keepalive.clone();
        longer.push(0);
        assert_eq!(
            decode_copy_data(longer.into()),
            Err(DecodeError::TrailingBytes {
                message: MessageKind::PrimaryKeepalive,
                offset: 18,
                remaining: 1
            })
        );
        let header = encode_xlog_data(Lsn(1), Lsn(2), PgTimestamp(3), b"");
        for len in 0..header.len() {
            let err = decode_copy_data(Bytes::copy_from_slice(&header[..len])).expect_err("short");
            assert!(
                len == 0
                    || matches!(
                        err,
                        DecodeError::Truncated {
                            message: MessageKind::XLogData,
                            ..
                        }
                    )
            );
        }
        assert_eq!(
            decode_copy_data(header.into()),
            Ok(ReplicationMessage::XLogData {
                wal_start: Lsn(1),
                wal_end: Lsn(2),
                send_time: PgTimestamp(3),
                data: Bytes::new()
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn random_bytes_never_panic(
            tag in prop::sample::select(&b"wkrd"[..]),
            body in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut buf = vec![tag];
            buf.extend(body);
            let _ = decode_copy_data(buf.into());
        }

        #[test]
        fn frames_round_trip(
            start in any::<u64>(),
            end in any::<u64>(),
            time in any::<i64>(),
            reply in any::<bool>(),
            data in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let frame = encode_xlog_data(Lsn(start), Lsn(end), PgTimestamp(time), &data);
            prop_assert_eq!(
                decode_copy_data(frame.into()),
                Ok(ReplicationMessage::XLogData {
                    wal_start: Lsn(start),
                    wal_end: Lsn(end),
                    send_time: PgTimestamp(time),
                    data: data.into(),
                })
            );
            let frame = encode_keepalive(Lsn(end), PgTimestamp(time), reply);
            prop_assert_eq!(
                decode_copy_data(frame.into()),
                Ok(ReplicationMessage::PrimaryKeepalive {
                    wal_end: Lsn(end),
                    send_time: PgTimestamp(time),
                    reply_requested: reply,
                })
            );
        }
    }
}
