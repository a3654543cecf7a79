//! A lean JetStream pull consumer: reads a stream in order from a given sequence, as fast as
//! the server delivers, on a connection of its own.
//!
//! # Why not async-nats' ordered consumer
//! The agents read every message of the stream, and async-nats spent about 4.4 µs of CPU per
//! message doing it (header maps hashed with SipHash, a `String` per header, the JetStream
//! reply parsed into a struct with a timestamp, a channel hop per message, the ordered
//! consumer's bookkeeping), more than decoding the event. This consumer frames deliveries
//! straight out of its read buffer (the subject, header block and payload of a message are
//! slices of it) and hands them over in chunks: about 0.4 µs per message on the same machine
//! (`cdc-bench` row 4 measures both). Everything else — stream info, the object store of large
//! events, requests to the reader — still goes through async-nats.
//!
//! # What it does
//! One connection ([`conn`]), one inbox subscription, one ephemeral consumer created through
//! the JetStream API with the settings of an ordered consumer (no acks, one delivery, memory
//! storage, one replica, removed by the server 30 s after its last pull request), and pull
//! requests that keep between half of and a whole `batch` of messages asked for (at most
//! `max_bytes` at a time, so the server never has more than that on its way to us). Pull
//! requests carry an idle heartbeat: a connection that sends nothing for three heartbeat
//! intervals is dead.
//!
//! Ordering: every delivery's consumer sequence must follow the one before. A gap (the server
//! dropped a delivery, or a heartbeat says it sent more than arrived) ends the consumer with
//! [`PullError::Gap`]; the caller starts a new one from its own position, as async-nats'
//! ordered consumer would.
//!
//! # The task
//! One task owns the connection. Its loop: frame everything buffered, top up the pull
//! requests, hand the chunk of deliveries over, then wait — in this order of priority — for
//! (1) the receiver to go away (the consumer is deleted and the connection closed), (2) bytes
//! from the server, (3) the liveness deadline. The channel to the receiver holds
//! [`CHUNKS_AHEAD`] chunks, so the task reads at most that far ahead of its reader.

mod conn;
pub mod proto;

use std::borrow::Cow;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use conn::Connection;
use proto::{RawMsg, ServerOp};

/// Chunks of deliveries (one per read from the socket) the task may have handed over and the
/// receiver not taken yet: backpressure beyond that.
pub const CHUNKS_AHEAD: usize = 4;
/// Default number of messages a consumer keeps asked for.
pub const DEFAULT_BATCH: u64 = 2048;
/// Default idle heartbeat of pull requests.
pub const DEFAULT_IDLE_HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a pull request waits on the server before it expires (and is renewed).
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// Bound on the JetStream API request that creates the consumer.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// The server removes the consumer this long after its last pull request.
const INACTIVE_THRESHOLD: Duration = Duration::from_secs(30);
/// Least number of bytes a pull request may bring (the server's `max_payload` doubled when
/// that is more, so that any single message fits).
const MIN_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Heartbeat intervals without a byte from the server after which the connection is dead.
const MISSED_HEARTBEATS: u32 = 3;

/// Errors of a pull consumer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PullError {
    /// `nats.url` or the stream name cannot be used.
    #[error("{0}")]
    Config(String),
    /// Connecting, reading or writing failed.
    #[error("NATS connection: {0}")]
    Io(String),
    /// The TLS handshake failed.
    #[error("NATS TLS: {0}")]
    Tls(String),
    /// The server refused us (credentials, missing features).
    #[error("{0}")]
    Refused(String),
    /// The server sent something that is not the NATS protocol.
    #[error(transparent)]
    Protocol(#[from] proto::ProtocolError),
    /// The server sent `-ERR`.
    #[error("NATS server error: {0}")]
    Server(String),
    /// The JetStream API refused a request (e.g. the stream does not exist).
    #[error("JetStream API: {description} (code {code})")]
    Api {
        /// HTTP-like status code.
        code: u16,
        /// The server's description.
        description: String,
    },
    /// A pull request ended with a status this consumer cannot continue after.
    #[error("pull request ended with status {code} {description}")]
    Status {
        /// Status code.
        code: u16,
        /// Its description.
        description: String,
    },
    /// A message of the stream is larger than a pull request may bring.
    #[error("a message of the stream is larger than {max_bytes} bytes, more than a pull request may bring")]
    TooLarge {
        /// The pull requests' byte limit.
        max_bytes: usize,
    },
    /// Deliveries are missing: start a new consumer from the last sequence processed.
    #[error("the consumer skipped deliveries (expected consumer sequence {expected}, the server is at {got})")]
    Gap {
        /// The consumer sequence expected next.
        expected: u64,
        /// The consumer sequence the server delivered or reported.
        got: u64,
    },
    /// Nothing, not even a heartbeat, arrived for too long.
    #[error("no message and no heartbeat from NATS for {0:?}; the connection is presumed dead")]
    NoHeartbeat(Duration),
    /// The consumer's task ended.
    #[error("the stream consumer stopped")]
    Stopped,
}

/// What to read and how.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// The stream.
    pub stream: String,
    /// First stream sequence to deliver (0 or 1: from the start).
    pub start_seq: u64,
    /// Client name the server shows for the connection.
    pub client_name: String,
    /// Messages kept asked for.
    pub batch: u64,
    /// Idle heartbeat of pull requests.
    pub idle_heartbeat: Duration,
}

impl PullConfig {
    /// Reads `stream` from `start_seq` with the default batch and heartbeat.
    pub fn new(stream: &str, start_seq: u64, client_name: &str) -> PullConfig {
        PullConfig {
            stream: stream.to_owned(),
            start_seq,
            client_name: client_name.to_owned(),
            batch: DEFAULT_BATCH,
            idle_heartbeat: DEFAULT_IDLE_HEARTBEAT,
        }
    }
}

/// A message of the stream.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    subject: Bytes,
    stream_seq: u64,
    headers: Bytes,
    payload: Bytes,
}

impl StreamMessage {
    /// A message from its parts (`headers`: a NATS header block, or empty).
    pub fn new(subject: Bytes, stream_seq: u64, headers: Bytes, payload: Bytes) -> Self {
        StreamMessage {
            subject,
            stream_seq,
            headers,
            payload,
        }
    }

    /// The subject it was published to.
    pub fn subject(&self) -> &[u8] {
        &self.subject
    }

    /// The subject as text (for messages).
    pub fn subject_text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.subject)
    }

    /// Its sequence in the stream.
    pub fn stream_seq(&self) -> u64 {
        self.stream_seq
    }

    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        proto::header(&self.headers, name)
    }

    /// The body.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
}

type Chunk = Result<Vec<StreamMessage>, PullError>;

/// A running pull consumer (see the module docs). Dropping it deletes the consumer.
#[derive(Debug)]
pub struct PullConsumer {
    rx: mpsc::Receiver<Chunk>,
    ready: VecDeque<StreamMessage>,
    ended: Option<PullError>,
}

impl PullConsumer {
    /// Connects to `url` (the `nats.url` of the configuration, credentials included), creates
    /// the consumer and starts reading.
    pub async fn start(url: &str, config: PullConfig) -> Result<PullConsumer, PullError> {
        if config.stream.is_empty()
            || config
                .stream
                .bytes()
                .any(|b| matches!(b, b'.' | b'*' | b'>' | b' ' | b'\t' | b'\r' | b'\n'))
        {
            return Err(PullError::Config(format!(
                "stream name {:?} is not a valid JetStream stream name",
                config.stream
            )));
        }
        let mut conn = Connection::open(url, &config.client_name).await?;
        let inbox = format!("_INBOX.{}", random_token());
        let api_reply = format!("{inbox}.api");
        let body = consumer_request(&config);
        let mut hello = format!(
            "SUB {inbox}.* 1\r\nPUB $JS.API.CONSUMER.CREATE.{} {api_reply} {}\r\n",
            config.stream,
            body.len()
        )
        .into_bytes();
        hello.extend_from_slice(body.as_bytes());
        hello.extend_from_slice(b"\r\n");
        conn.write(&hello).await?;
        let name = tokio::time::timeout(API_TIMEOUT, created_consumer(&mut conn, &api_reply))
            .await
            .map_err(|_| {
                PullError::Io(format!(
                    "{}: the JetStream API did not answer within {API_TIMEOUT:?}",
                    conn.server
                ))
            })??;
        let max_bytes = MIN_MAX_BYTES.max(conn.info.max_payload.saturating_mul(2));
        let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
        let task = Pulling {
            next_prefix: format!(
                "PUB $JS.API.CONSUMER.MSG.NEXT.{}.{name} {inbox}.pull ",
                config.stream
            )
            .into_bytes(),
            delete: format!(
                "PUB $JS.API.CONSUMER.DELETE.{}.{name} 0\r\n\r\n",
                config.stream
            )
            .into_bytes(),
            conn,
            window: Window::new(config.batch, max_bytes),
            idle_heartbeat: config.idle_heartbeat,
        };
        tokio::spawn(task.run(tx));
        Ok(PullConsumer {
            rx,
            ready: VecDeque::new(),
            ended: None,
        })
    }

    /// The next message. Cancel-safe: a message is either returned or stays for the next call.
    pub async fn next(&mut self) -> Result<StreamMessage, PullError> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Ok(m);
            }
            if let Some(e) = &self.ended {
                return Err(e.clone());
            }
            let chunk = self.rx.recv().await;
            self.take(chunk);
        }
    }

    /// The next message if one is already here.
    pub fn try_next(&mut self) -> Option<Result<StreamMessage, PullError>> {
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Some(Ok(m));
            }
            if let Some(e) = &self.ended {
                return Some(Err(e.clone()));
            }
            match self.rx.try_recv() {
                Ok(chunk) => self.take(Some(chunk)),
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => self.take(None),
            }
        }
    }

    fn take(&mut self, chunk: Option<Chunk>) {
        match chunk {
            Some(Ok(messages)) => self.ready.extend(messages),
            Some(Err(e)) => self.ended = Some(e),
            None => self.ended = Some(PullError::Stopped),
        }
    }
}

/// The `$JS.API.CONSUMER.CREATE` request: an ephemeral consumer with ordered-consumer settings.
fn consumer_request(config: &PullConfig) -> String {
    let mut consumer = serde_json::json!({
        "deliver_policy": "all",
        "ack_policy": "none",
        "max_deliver": 1,
        "replay_policy": "instant",
        "mem_storage": true,
        "num_replicas": 1,
        "inactive_threshold": duration_nanos(INACTIVE_THRESHOLD),
    });
    if config.start_seq > 1 {
        consumer["deliver_policy"] = "by_start_sequence".into();
        consumer["opt_start_seq"] = config.start_seq.into();
    }
    serde_json::json!({ "stream_name": config.stream, "config": consumer }).to_string()
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Reads until the consumer-create reply arrives; the consumer's name.
async fn created_consumer(conn: &mut Connection, api_reply: &str) -> Result<String, PullError> {
    loop {
        match conn.read_op().await? {
            ServerOp::Msg(m) if &m.subject[..] == api_reply.as_bytes() => {
                if let Some((code, description)) = proto::status(&m.headers) {
                    let description = if code == 503 {
                        "no responders: JetStream is not enabled on this server".to_owned()
                    } else {
                        description.to_owned()
                    };
                    return Err(PullError::Api { code, description });
                }
                return consumer_name(&m.payload);
            }
            ServerOp::Msg(_) | ServerOp::Ok | ServerOp::Pong | ServerOp::Info(_) => {}
            ServerOp::Ping => conn.write(b"PONG\r\n").await?,
            ServerOp::Err(text) => return Err(PullError::Server(text)),
        }
    }
}

/// The consumer name in a consumer-create reply, or the API error it carries.
fn consumer_name(reply: &[u8]) -> Result<String, PullError> {
    #[derive(serde::Deserialize)]
    struct ApiError {
        #[serde(default)]
        code: u16,
        #[serde(default)]
        description: String,
    }
    #[derive(serde::Deserialize)]
    struct Reply {
        error: Option<ApiError>,
        name: Option<String>,
    }
    let reply: Reply = serde_json::from_slice(reply).map_err(|e| {
        PullError::Protocol(proto::ProtocolError(format!(
            "unreadable consumer-create reply: {e}"
        )))
    })?;
    match (reply.error, reply.name) {
        (Some(e), _) => Err(PullError::Api {
            code: e.code,
            description: e.description,
        }),
        (None, Some(name)) if !name.is_empty() && !name.contains([' ', '.']) => Ok(name),
        (None, _) => Err(PullError::Protocol(proto::ProtocolError(
            "consumer-create reply without a usable name".into(),
        ))),
    }
}

/// 32 random hex digits (the process's random hash keys; no RNG crate needed).
fn random_token() -> String {
    let state = std::collections::hash_map::RandomState::new();
    let mut a = state.build_hasher();
    a.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    a.write_u32(std::process::id());
    let mut b = state.build_hasher();
    b.write_u64(a.finish());
    format!("{:016x}{:016x}", a.finish(), b.finish())
}

/// The task's state (see the module docs).
struct Pulling {
    conn: Connection,
    /// `PUB $JS.API.CONSUMER.MSG.NEXT.<stream>.<name> <inbox>.pull ` (size and body follow).
    next_prefix: Vec<u8>,
    /// The request that deletes the consumer.
    delete: Vec<u8>,
    window: Window,
    idle_heartbeat: Duration,
}

/// What the consumer has asked for and received: the pull requests' accounting and the order
/// of deliveries. No I/O, so that it can be tested on captured bytes.
#[derive(Debug)]
struct Window {
    batch: u64,
    max_bytes: usize,
    /// Messages asked for and not delivered yet (pull requests still open on the server).
    requested: u64,
    /// Consumer sequence of the last delivery.
    consumer_seq: u64,
    /// Pull requests in a row that ended at the byte limit without delivering anything.
    ends_without_delivery: u32,
    delivered_since_end: bool,
}

impl Window {
    fn new(batch: u64, max_bytes: usize) -> Window {
        Window {
            batch: batch.max(2),
            max_bytes,
            requested: 0,
            consumer_seq: 0,
            ends_without_delivery: 0,
            delivered_since_end: false,
        }
    }

    /// How many messages to ask for now: once fewer than half a batch are still asked for,
    /// what tops it up to a whole batch.
    fn to_ask(&self) -> Option<u64> {
        (self.requested <= self.batch / 2).then(|| self.batch - self.requested)
    }

    fn asked(&mut self, messages: u64) {
        self.requested += messages;
    }

    /// A delivery (`Some`), or a status of a pull request (`None`).
    fn on_message(&mut self, m: RawMsg) -> Result<Option<StreamMessage>, PullError> {
        if let Some(info) = m.reply.as_deref().and_then(proto::ack_info) {
            if info.consumer_seq != self.consumer_seq + 1 {
                return Err(PullError::Gap {
                    expected: self.consumer_seq + 1,
                    got: info.consumer_seq,
                });
            }
            self.consumer_seq = info.consumer_seq;
            self.requested = self.requested.saturating_sub(1);
            self.delivered_since_end = true;
            return Ok(Some(StreamMessage {
                subject: m.subject,
                stream_seq: info.stream_seq,
                headers: m.headers,
                payload: m.payload,
            }));
        }
        let Some((code, description)) = proto::status(&m.headers) else {
            // Not ours to read (a late API reply): nothing to do.
            return Ok(None);
        };
        let number = |name: &str| -> Option<u64> { proto::header(&m.headers, name)?.parse().ok() };
        let pending = number("Nats-Pending-Messages");
        match (code, pending) {
            // Idle heartbeat: nothing to deliver, the connection lives. It names the last
            // delivery the server made; one we never saw is a gap.
            (100, _) => {
                if let Some(last) = number("Nats-Last-Consumer") {
                    if last > self.consumer_seq {
                        return Err(PullError::Gap {
                            expected: self.consumer_seq + 1,
                            got: last,
                        });
                    }
                }
            }
            // No messages (only for no-wait requests, which this consumer does not send).
            (404, _) => {}
            // A request expired, or was completed by its byte limit or batch: what it still
            // owed will not come.
            (408 | 409, Some(pending)) => {
                self.requested = self.requested.saturating_sub(pending);
                if code == 409 && description.contains("MaxBytes") {
                    if self.delivered_since_end {
                        self.ends_without_delivery = 0;
                    } else {
                        self.ends_without_delivery += 1;
                        if self.ends_without_delivery >= 2 {
                            return Err(PullError::TooLarge {
                                max_bytes: self.max_bytes,
                            });
                        }
                    }
                }
                self.delivered_since_end = false;
            }
            _ => {
                return Err(PullError::Status {
                    code,
                    description: description.to_owned(),
                })
            }
        }
        Ok(None)
    }
}

impl Pulling {
    async fn run(mut self, tx: mpsc::Sender<Chunk>) {
        let liveness = self.idle_heartbeat * MISSED_HEARTBEATS;
        let mut deadline = Instant::now() + liveness;
        let failure = loop {
            let mut chunk = Vec::new();
            if let Err(e) = self.drain(&mut chunk).await {
                break e;
            }
            if let Err(e) = self.top_up().await {
                break e;
            }
            if !chunk.is_empty() {
                if tx.send(Ok(chunk)).await.is_err() {
                    self.close().await;
                    return;
                }
                // Waiting for the receiver is not the server's silence.
                deadline = Instant::now() + liveness;
            }
            tokio::select! {
                biased;
                // 1. The receiver is gone: delete the consumer, close.
                _ = tx.closed() => {
                    self.close().await;
                    return;
                }
                // 2. Bytes from the server.
                read = self.conn.fill() => match read {
                    Ok(_) => deadline = Instant::now() + liveness,
                    Err(e) => break e,
                },
                // 3. Nothing for three heartbeat intervals.
                _ = tokio::time::sleep_until(deadline) => break PullError::NoHeartbeat(liveness),
            }
        };
        let _ = tx.send(Err(failure)).await;
        self.close().await;
    }

    /// Deletes the consumer (best effort) and lets the connection go.
    async fn close(mut self) {
        let delete = std::mem::take(&mut self.delete);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.conn.write(&delete)).await;
    }

    /// Frames every complete operation in the buffer; deliveries go into `chunk`.
    async fn drain(&mut self, chunk: &mut Vec<StreamMessage>) -> Result<(), PullError> {
        while let Some(op) = proto::parse(&mut self.conn.buf)? {
            match op {
                ServerOp::Msg(m) => {
                    if let Some(message) = self.window.on_message(m)? {
                        chunk.push(message);
                    }
                }
                ServerOp::Ping => self.conn.write(b"PONG\r\n").await?,
                ServerOp::Pong | ServerOp::Ok | ServerOp::Info(_) => {}
                ServerOp::Err(text) => return Err(PullError::Server(text)),
            }
        }
        Ok(())
    }

    /// Asks for more when [`Window::to_ask`] says so.
    async fn top_up(&mut self) -> Result<(), PullError> {
        let Some(more) = self.window.to_ask() else {
            return Ok(());
        };
        let body = format!(
            "{{\"batch\":{more},\"max_bytes\":{},\"expires\":{},\"idle_heartbeat\":{}}}",
            self.window.max_bytes,
            duration_nanos(PULL_EXPIRES),
            duration_nanos(self.idle_heartbeat)
        );
        let mut request = self.next_prefix.clone();
        request.extend_from_slice(format!("{}\r\n{body}\r\n", body.len()).as_bytes());
        self.conn.write(&request).await?;
        self.window.asked(more);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_for_an_ephemeral_ordered_consumer() {
        let from_start: serde_json::Value =
            serde_json::from_str(&consumer_request(&PullConfig::new("CDC", 1, "t"))).expect("json");
        assert_eq!(from_start["stream_name"], "CDC");
        assert_eq!(from_start["config"]["deliver_policy"], "all");
        assert_eq!(from_start["config"]["ack_policy"], "none");
        assert!(from_start["config"].get("durable_name").is_none());
        let later: serde_json::Value =
            serde_json::from_str(&consumer_request(&PullConfig::new("CDC", 42, "t")))
                .expect("json");
        assert_eq!(later["config"]["deliver_policy"], "by_start_sequence");
        assert_eq!(later["config"]["opt_start_seq"], 42);
    }

    #[test]
    fn reads_consumer_create_replies() {
        assert_eq!(
            consumer_name(br#"{"type":"x","name":"abc123","config":{}}"#),
            Ok("abc123".into())
        );
        assert_eq!(
            consumer_name(
                br#"{"error":{"code":404,"err_code":10059,"description":"stream not found"}}"#
            ),
            Err(PullError::Api {
                code: 404,
                description: "stream not found".into()
            })
        );
        assert!(consumer_name(b"{}").is_err());
        assert!(consumer_name(b"not json").is_err());
    }

    /// Every operation in a captured byte stream (see `cdc/tests/fixtures/nats/README.md`).
    fn captured(bytes: &[u8]) -> Vec<ServerOp> {
        let mut buf = bytes::BytesMut::from(bytes);
        let mut ops = Vec::new();
        while let Some(op) = proto::parse(&mut buf).expect("frames") {
            ops.push(op);
        }
        assert!(buf.is_empty());
        ops
    }

    /// Feeds the messages of `ops` to `window`; the deliveries, or the first error.
    fn feed(window: &mut Window, ops: Vec<ServerOp>) -> Result<Vec<StreamMessage>, PullError> {
        let mut out = Vec::new();
        for op in ops {
            if let ServerOp::Msg(m) = op {
                out.extend(window.on_message(m)?);
            }
        }
        Ok(out)
    }

    const PULL: &[u8] = include_bytes!("../../tests/fixtures/nats/pull.bin");
    const MAX_BYTES: &[u8] = include_bytes!("../../tests/fixtures/nats/maxbytes.bin");

    #[test]
    fn follows_a_captured_pull_request() {
        let ops = captured(PULL);
        assert!(ops.contains(&ServerOp::Ping));
        let mut window = Window::new(5, 4 << 20);
        assert_eq!(window.to_ask(), Some(5));
        window.asked(5);
        let got = feed(&mut window, ops).expect("in order");
        let seqs: Vec<u64> = got.iter().map(StreamMessage::stream_seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(got[0].subject(), b"cdc.public.top_clients");
        assert_eq!(got[0].header("Nats-Msg-Id"), Some("0/16B37A0:2"));
        assert_eq!(got[1].header("cdc-op"), Some("c"));
        let body: serde_json::Value = serde_json::from_slice(got[1].payload()).expect("json");
        assert_eq!(body["after"]["client_id"], 3);
        // Two delivered, the 408 said 3 were still owed: nothing is asked for any more.
        assert_eq!(window.requested, 0);
        assert_eq!(window.to_ask(), Some(5));
    }

    #[test]
    fn a_missing_delivery_is_a_gap() {
        // The first delivery of a new consumer must be its sequence 1.
        let mut late = Window::new(5, 4 << 20);
        late.consumer_seq = 1;
        assert_eq!(
            feed(&mut late, captured(PULL)).map(|m| m.len()),
            Err(PullError::Gap {
                expected: 2,
                got: 1
            })
        );
        // A heartbeat that names a delivery that never arrived.
        let mut ops = captured(PULL);
        let second = ops
            .iter()
            .position(|op| matches!(op, ServerOp::Msg(m) if m.reply.is_some()))
            .map(|first| first + 1)
            .expect("deliveries");
        ops.remove(second);
        let mut window = Window::new(5, 4 << 20);
        assert_eq!(
            feed(&mut window, ops).map(|m| m.len()),
            Err(PullError::Gap {
                expected: 2,
                got: 2
            })
        );
    }

    #[test]
    fn a_byte_limit_ends_a_request() {
        let mut window = Window::new(5, 300);
        window.asked(5);
        let got = feed(&mut window, captured(MAX_BYTES)).expect("fine");
        assert_eq!(got.len(), 1);
        assert_eq!(window.requested, 0);
        // The same end again and again with nothing delivered: a message too large to bring.
        let status = || {
            captured(MAX_BYTES)
                .into_iter()
                .filter(|op| matches!(op, ServerOp::Msg(m) if m.reply.is_none()))
                .collect::<Vec<_>>()
        };
        assert!(feed(&mut window, status()).is_ok());
        assert_eq!(
            feed(&mut window, status()).map(|m| m.len()),
            Err(PullError::TooLarge { max_bytes: 300 })
        );
    }

    #[test]
    fn reads_a_captured_api_error() {
        let ops = captured(include_bytes!("../../tests/fixtures/nats/api-error.bin"));
        let [ServerOp::Msg(reply)] = &ops[..] else {
            panic!("{ops:?}")
        };
        assert_eq!(
            consumer_name(&reply.payload),
            Err(PullError::Api {
                code: 404,
                description: "stream not found".into()
            })
        );
    }

    #[test]
    fn other_statuses_end_the_consumer() {
        let mut buf = bytes::BytesMut::from(
            &b"HMSG _INBOX.x.pull 1  33 33\r\nNATS/1.0 409 Consumer Deleted\r\n\r\n\r\n"[..],
        );
        let Some(ServerOp::Msg(m)) = proto::parse(&mut buf).expect("frames") else {
            panic!("not a message")
        };
        let mut window = Window::new(5, 300);
        assert_eq!(
            window.on_message(m).map(|m| m.is_some()),
            Err(PullError::Status {
                code: 409,
                description: "Consumer Deleted".into()
            })
        );
    }

    #[test]
    fn tokens_differ() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
