//! The JetStream side: the stream (created if missing), the bucket for large events, ordered
//! publishing with de-duplication ids and a no-gap chain, and the resume position.
//!
//! Every message the reader publishes carries `Nats-Msg-Id` and `Nats-Expected-Last-Msg-Id`
//! (the id of the message published just before it). The server refuses a message whose
//! predecessor is not the stream's last message, so a publish lost in a NATS restart can never
//! leave a gap that a later message would paper over: the reader sees the refusal, restarts
//! from the slot, and re-publishes from the stream's true last position.
//!
//! The same chain makes one PubAck speak for every message before it: the server stores a
//! message only while its predecessor is the stream's last, so an acknowledged message proves
//! that the whole chain up to it is stored. The reader therefore asks for a PubAck only where
//! it needs one (the last event of a source transaction, heartbeats, the last row of a
//! snapshot chunk) and on every [`ACK_EVERY`]th message in between; the server spends less on
//! replies and the reader less on reading them.

use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue, IntoHeaderName as _};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;

use crate::config::NatsConfig;
use crate::envelope::{
    self, Heartbeat, HEADER_COMMIT_LSN, HEADER_LARGE_REF, HEADER_MSG_ID, HEADER_OP, HEADER_TABLE,
};
use crate::lsn::Lsn;
use crate::subject;

/// Room left under `max_payload` for headers and protocol framing.
const HEADER_ROOM: usize = 4096;
/// Inside a long run of messages that need no PubAck of their own, every this many asks for
/// one anyway, so that acknowledgements keep flowing (the publish window drains and the PubAck
/// deadline keeps meaning something).
pub const ACK_EVERY: u64 = 64;
/// How far back from the stream's end to look for the last message the reader wrote.
const RESUME_SCAN_LIMIT: u64 = 1000;

/// Errors on the NATS side.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The server can't be reached.
    #[error("NATS at {url} is unreachable: {message}")]
    Connect {
        /// The configured URL(s), without credentials.
        url: String,
        /// What happened.
        message: String,
    },
    /// The stream could not be created, read or updated.
    #[error("JetStream stream {stream}: {message}")]
    Stream {
        /// Stream name.
        stream: String,
        /// What happened and what to do.
        message: String,
    },
    /// A publish failed or its PubAck did not come.
    #[error("publish to {subject} failed: {message}")]
    Publish {
        /// The subject.
        subject: String,
        /// What happened.
        message: String,
    },
}

/// Where the stream ends, as far as this reader is concerned: what to skip on start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumePoint {
    /// Nothing of ours in the stream.
    Empty,
    /// The last message is the event `ordinal` of the transaction committed at `commit_lsn`.
    Event {
        /// Commit LSN of its transaction.
        commit_lsn: Lsn,
        /// Its `total_order`.
        ordinal: u64,
        /// Its `Nats-Msg-Id`.
        msg_id: String,
    },
    /// The last message is a heartbeat: every transaction committed at or before `lsn` is in.
    Heartbeat {
        /// The heartbeat's LSN.
        lsn: Lsn,
        /// Its `Nats-Msg-Id`.
        msg_id: String,
    },
}

impl ResumePoint {
    /// True when the event `ordinal` of the transaction committed at `commit_lsn` is already
    /// in the stream.
    pub fn covers(&self, commit_lsn: Lsn, ordinal: u64) -> bool {
        match self {
            ResumePoint::Empty => false,
            ResumePoint::Event {
                commit_lsn: c,
                ordinal: o,
                ..
            } => (commit_lsn, ordinal) <= (*c, *o),
            ResumePoint::Heartbeat { lsn, .. } => commit_lsn <= *lsn,
        }
    }

    /// The id the next publish must name as its predecessor.
    pub fn last_msg_id(&self) -> Option<&str> {
        match self {
            ResumePoint::Empty => None,
            ResumePoint::Event { msg_id, .. } | ResumePoint::Heartbeat { msg_id, .. } => {
                Some(msg_id)
            }
        }
    }

    /// Reads a position back from a message id the reader wrote.
    pub fn from_msg_id(id: &str) -> Option<ResumePoint> {
        if let Some(rest) = id.strip_prefix("hb:") {
            let lsn = rest.split(':').next()?.parse().ok()?;
            return Some(ResumePoint::Heartbeat {
                lsn,
                msg_id: id.to_string(),
            });
        }
        let (commit_lsn, ordinal) = envelope::parse_msg_id(id)?;
        Some(ResumePoint::Event {
            commit_lsn,
            ordinal,
            msg_id: id.to_string(),
        })
    }
}

/// A message ready to publish.
#[derive(Debug)]
pub struct Outgoing {
    /// Subject.
    pub subject: async_nats::Subject,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    /// The `Cdc-*` headers of a change event (none for heartbeats).
    pub event: Option<EventHeaders>,
    /// Body.
    pub body: Bytes,
    /// Ask for its PubAck (see the module docs; every [`ACK_EVERY`]th message asks anyway).
    pub want_ack: bool,
}

/// The headers of a change event besides the de-duplication id and the chain.
#[derive(Debug, Clone)]
pub struct EventHeaders {
    /// `Cdc-Op`.
    pub op: &'static str,
    /// `Cdc-Table` (`schema.table`).
    pub table: std::sync::Arc<str>,
    /// `Cdc-Commit-Lsn`.
    pub commit_lsn: Lsn,
}

/// Header names built once: names outside NATS' own set are otherwise validated and copied
/// on every insert.
#[derive(Debug)]
struct HeaderNames {
    msg_id: HeaderName,
    expected_last: HeaderName,
    op: HeaderName,
    table: HeaderName,
    commit_lsn: HeaderName,
    large_ref: HeaderName,
}

impl HeaderNames {
    fn new() -> Self {
        HeaderNames {
            msg_id: HEADER_MSG_ID.into_header_name(),
            expected_last: "Nats-Expected-Last-Msg-Id".into_header_name(),
            op: HEADER_OP.into_header_name(),
            table: HEADER_TABLE.into_header_name(),
            commit_lsn: HEADER_COMMIT_LSN.into_header_name(),
            large_ref: HEADER_LARGE_REF.into_header_name(),
        }
    }
}

/// The connected JetStream destination.
pub struct StreamSink {
    client: async_nats::Client,
    js: jetstream::Context,
    stream_name: String,
    prefix: String,
    max_age: Duration,
    replicas: usize,
    large: Option<jetstream::object_store::ObjectStore>,
    last_msg_id: Option<String>,
    heartbeat_seq: u64,
    /// PubAcks come back on `<inbox>.<ticket>`, one subscription for all publishes: no
    /// per-message inbox, channel or timer.
    inbox: String,
    acks: async_nats::Subscriber,
    next_ticket: u64,
    names: HeaderNames,
}

/// A publish whose PubAck is outstanding, identified by the order it was sent in.
pub type Ticket = u64;

impl StreamSink {
    /// Connects (no retry; the caller backs off) and makes sure the stream exists.
    pub async fn connect(
        cfg: &NatsConfig,
        ack_timeout: Duration,
    ) -> Result<StreamSink, PublishError> {
        let shown_url = redact_url(&cfg.url);
        let (options, servers) = crate::nats_url::connect_options(
            async_nats::ConnectOptions::new()
                .name("cdc-reader")
                .connection_timeout(Duration::from_secs(5))
                .request_timeout(Some(Duration::from_secs(10))),
            &cfg.url,
        );
        let client =
            options
                .connect(servers.as_str())
                .await
                .map_err(|e| PublishError::Connect {
                    url: shown_url.clone(),
                    message: e.to_string(),
                })?;
        let js = jetstream::ContextBuilder::new()
            .ack_timeout(ack_timeout)
            .timeout(ack_timeout)
            .max_ack_inflight(cfg.max_in_flight + 64)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let stream_err = |message: String| PublishError::Stream {
            stream: cfg.stream.clone(),
            message,
        };
        let wanted_subject = format!("{}.>", cfg.subject_prefix);
        match js.get_stream(&cfg.stream).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| stream_err(e.to_string()))?;
                let config = &info.config;
                if !config.subjects.iter().any(|x| x == &wanted_subject) {
                    return Err(stream_err(format!(
                        "exists with subjects {:?}, not {wanted_subject:?}: use another nats.stream or nats.subject_prefix",
                        config.subjects
                    )));
                }
            }
            Err(_) => {
                let config = stream::Config {
                    name: cfg.stream.clone(),
                    subjects: vec![wanted_subject],
                    max_age: Duration::from_secs(cfg.max_age_secs),
                    max_bytes: cfg.max_bytes,
                    max_messages: cfg.max_msgs,
                    duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
                    num_replicas: cfg.replicas,
                    storage: stream::StorageType::File,
                    ..Default::default()
                };
                js.create_stream(config)
                    .await
                    .map_err(|e| stream_err(format!("cannot create it: {e}")))?;
                tracing::info!(stream = %cfg.stream, "created JetStream stream");
            }
        }
        let inbox = client.new_inbox();
        let acks =
            client
                .subscribe(format!("{inbox}.*"))
                .await
                .map_err(|e| PublishError::Connect {
                    url: shown_url.clone(),
                    message: format!("subscribing for PubAcks: {e}"),
                })?;
        Ok(StreamSink {
            inbox,
            acks,
            next_ticket: 0,
            names: HeaderNames::new(),
            client,
            js,
            stream_name: cfg.stream.clone(),
            prefix: cfg.subject_prefix.clone(),
            max_age: Duration::from_secs(cfg.max_age_secs),
            replicas: cfg.replicas,
            large: None,
            last_msg_id: None,
            heartbeat_seq: 0,
        })
    }

    /// The underlying client (for the control plane).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Finds where the stream ends: the last message written by a reader, scanning back past
    /// messages with foreign ids. Also arms the no-gap chain with that message's id.
    pub async fn resume_point(&mut self) -> Result<ResumePoint, PublishError> {
        let stream_err = |message: String| PublishError::Stream {
            stream: self.stream_name.clone(),
            message,
        };
        let mut s = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let state = s
            .info()
            .await
            .map_err(|e| stream_err(e.to_string()))?
            .state
            .clone();
        let mut point = ResumePoint::Empty;
        let mut chain: Option<String> = None;
        if state.messages > 0 {
            let lowest = state
                .first_sequence
                .max(state.last_sequence.saturating_sub(RESUME_SCAN_LIMIT));
            let mut seq = state.last_sequence;
            while seq >= lowest && seq > 0 {
                match s.get_raw_message(seq).await {
                    Ok(msg) => {
                        let id = msg
                            .headers
                            .get(HEADER_MSG_ID)
                            .map(|v| v.as_str().to_string());
                        if chain.is_none() {
                            // The server compares with the last message's id, whoever wrote it.
                            chain = Some(id.clone().unwrap_or_default());
                        }
                        if let Some(p) = id.as_deref().and_then(ResumePoint::from_msg_id) {
                            point = p;
                            break;
                        }
                    }
                    Err(e) => {
                        // Deleted (e.g. a rolled-up heartbeat) or retention raced us.
                        tracing::debug!(seq, error = %e, "stream message not readable");
                    }
                }
                seq -= 1;
            }
        }
        self.last_msg_id = chain.filter(|c| !c.is_empty());
        Ok(point)
    }

    /// Publishes one message in order and returns its ticket. When the message asks for a
    /// PubAck (or is an [`ACK_EVERY`]th one), the ack arrives later through
    /// [`StreamSink::next_ack`] with this ticket, and it covers every earlier ticket too.
    /// Returns whether an ack was asked for.
    pub async fn publish(&mut self, msg: Outgoing) -> Result<(Ticket, bool), PublishError> {
        let names = &self.names;
        let mut headers = HeaderMap::new();
        headers.insert(names.msg_id.clone(), HeaderValue::from(msg.msg_id.as_str()));
        if let Some(prev) = self.last_msg_id.take() {
            headers.insert(names.expected_last.clone(), HeaderValue::from(prev));
        }
        if let Some(ev) = &msg.event {
            headers.insert(names.op.clone(), HeaderValue::from(ev.op));
            headers.insert(names.table.clone(), HeaderValue::from(&*ev.table));
            headers.insert(
                names.commit_lsn.clone(),
                HeaderValue::from(ev.commit_lsn.text().as_str()),
            );
        }
        let limit = self.client.max_payload();
        let mut body = msg.body;
        if body.len() + HEADER_ROOM > limit {
            self.put_large(&msg.msg_id, &body).await?;
            headers.insert(
                self.names.large_ref.clone(),
                HeaderValue::from(msg.msg_id.as_str()),
            );
            body = Bytes::new();
        }
        let ticket = self.next_ticket;
        let want_ack = msg.want_ack || ticket % ACK_EVERY == ACK_EVERY - 1;
        let sent = if want_ack {
            let reply = format!("{}.{ticket}", self.inbox);
            self.client
                .publish_with_reply_and_headers(msg.subject.clone(), reply, headers, body)
                .await
        } else {
            self.client
                .publish_with_headers(msg.subject.clone(), headers, body)
                .await
        };
        sent.map_err(|e| PublishError::Publish {
            subject: msg.subject.to_string(),
            message: e.to_string(),
        })?;
        self.next_ticket += 1;
        self.last_msg_id = Some(msg.msg_id);
        Ok((ticket, want_ack))
    }

    /// The next PubAck: the ticket it answers, or the server's refusal. Cancel-safe.
    pub async fn next_ack(&mut self) -> Result<Ticket, PublishError> {
        let msg = self
            .acks
            .next()
            .await
            .ok_or_else(|| PublishError::Publish {
                subject: self.stream_name.clone(),
                message: "the PubAck subscription ended (connection closed)".into(),
            })?;
        let ticket = msg
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<Ticket>().ok())
            .ok_or_else(|| PublishError::Publish {
                subject: self.stream_name.clone(),
                message: format!("PubAck on an unexpected subject {}", msg.subject),
            })?;
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            return Err(PublishError::Stream {
                stream: self.stream_name.clone(),
                message: "no stream answers its subjects (deleted while running?)".into(),
            });
        }
        match serde_json::from_slice::<AckBody>(&msg.payload) {
            Ok(AckBody { error: None, .. }) => Ok(ticket),
            Ok(AckBody { error: Some(e), .. }) => Err(PublishError::Publish {
                subject: self.stream_name.clone(),
                message: format!("refused: {} (code {})", e.description, e.err_code),
            }),
            Err(e) => Err(PublishError::Publish {
                subject: self.stream_name.clone(),
                message: format!("unreadable PubAck: {e}"),
            }),
        }
    }

    /// Publishes a heartbeat for `lsn`. (Not with `Nats-Rollup`: on nats-server 2.9 a rollup
    /// makes active ordered consumers skip stored messages; stream retention bounds them.)
    pub async fn publish_heartbeat(&mut self, lsn: Lsn) -> Result<(Ticket, bool), PublishError> {
        self.heartbeat_seq += 1;
        let body = serde_json::to_vec(&Heartbeat { lsn }).unwrap_or_default();
        let msg = Outgoing {
            subject: subject::heartbeat_subject(&self.prefix).into(),
            msg_id: format!(
                "hb:{lsn}:{}:{}",
                crate::events::now_ms(),
                self.heartbeat_seq
            ),
            event: None,
            body: Bytes::from(body),
            want_ack: true,
        };
        self.publish(msg).await
    }

    async fn put_large(&mut self, name: &str, body: &Bytes) -> Result<(), PublishError> {
        let bucket = format!("{}_LARGE", self.stream_name);
        let err = |message: String| PublishError::Publish {
            subject: format!("object store {bucket}"),
            message,
        };
        if self.large.is_none() {
            let store = match self.js.get_object_store(&bucket).await {
                Ok(s) => s,
                Err(_) => self
                    .js
                    .create_object_store(jetstream::object_store::Config {
                        bucket: bucket.clone(),
                        description: Some(format!(
                            "bodies of events too large for a message of stream {}",
                            self.stream_name
                        )),
                        max_age: self.max_age,
                        num_replicas: self.replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| err(e.to_string()))?,
            };
            self.large = Some(store);
        }
        let store = self
            .large
            .as_ref()
            .ok_or_else(|| err("bucket missing".into()))?;
        let mut reader: &[u8] = body;
        store
            .put(name, &mut reader)
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(())
    }
}

#[derive(Deserialize)]
struct AckBody {
    #[serde(default)]
    error: Option<AckError>,
}

#[derive(Deserialize)]
struct AckError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// A URL with any `user:password@` removed, for messages.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(s), Some(at)) if at > s => format!("{}{}", &u[..s + 3], &u[at + 1..]),
            (None, Some(at)) => u[at + 1..].to_string(),
            _ => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_point_covers_what_is_in() {
        let p = ResumePoint::from_msg_id("0/100:3").expect("parses");
        assert!(p.covers(Lsn(0x100), 3));
        assert!(p.covers(Lsn(0x50), 99));
        assert!(!p.covers(Lsn(0x100), 4));
        assert!(!p.covers(Lsn(0x101), 1));
        let h = ResumePoint::from_msg_id("hb:0/200:1764230400000:1").expect("parses");
        assert!(h.covers(Lsn(0x200), 1));
        assert!(!h.covers(Lsn(0x201), 1));
        assert_eq!(ResumePoint::from_msg_id("foreign"), None);
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("nats://u:p@h:4222"), "nats://h:4222");
        assert_eq!(
            redact_url("nats://h:4222,nats://a:b@g:1"),
            "nats://h:4222,nats://g:1"
        );
    }
}
