//! Rebuilding one view from the stream while the agent keeps serving the old one
//! (`view-agent replay`).
//!
//! The rebuilt rows go into a shadow view (a view id of its own, invisible to queries), fed by
//! an ordered consumer of its own from the chosen start. The rebuild never applies a message
//! the live view has not applied yet: when the next message is past the live position, the
//! shadow holds exactly what the live view holds minus the history it was rebuilt from, and the
//! swap happens: the applier is held (no batch in flight), the view is pointed at the shadow's
//! rows in one sled batch under the exclusive read gate, the applier is released. A query reads
//! either the old rows or the new ones, each as of one applied source transaction. The old rows
//! are deleted afterwards. A rebuild that fails or is interrupted leaves the old view in place
//! (its rows are dropped, on the next open at the latest).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use cdc::envelope::{ChangeEvent, HEADER_LARGE_REF};
use cdc::stall::{holds_message, Watchdog};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::NatsConfig;
use crate::store::{Shadow, ViewStore};

/// Events applied to the shadow per sled batch.
const SHADOW_BATCH: usize = 2_048;
/// With no message for this long, the rebuild checks whether it has caught up.
const IDLE: Duration = Duration::from_millis(200);
/// Idle waits in a row, while the stream holds messages past what the rebuild read, after
/// which its consumer counts as stalled and is re-created (see [`Watchdog`]): 2.4 s.
const STALL_IDLES: u32 = 12;
/// Timeout of one JetStream API request.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest sequence hole probed for skipped messages.
const MAX_GAP_PROBE: u64 = 256;

/// Where the rebuild starts reading the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayFrom {
    /// The stream's first message.
    Start,
    /// This stream sequence.
    Seq(u64),
    /// The first message stored at or after this time (RFC 3339).
    Time(String),
}

/// How a rebuild is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayState {
    /// Reading the stream into the shadow view.
    Running,
    /// Swapped in.
    Done,
    /// Gave up; the old view still serves.
    Failed,
}

/// Progress of one rebuild.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplayStatus {
    /// The view.
    pub view: String,
    /// Where it stands.
    pub state: ReplayState,
    /// First stream sequence read (0 until known).
    pub from_seq: u64,
    /// Last stream sequence applied to the rebuilt view.
    pub read_seq: u64,
    /// The live view's applied sequence (what the rebuild must reach).
    pub target_seq: u64,
    /// Change events of the view's table applied to the rebuilt view.
    pub events: u64,
    /// Rows of the old view deleted after the swap.
    pub replaced_rows: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// Something the operator should know (history the stream no longer has).
    pub warning: Option<String>,
}

/// Why a rebuild cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The view is not configured.
    #[error("view {0:?} does not exist in this agent's config")]
    UnknownView(String),
    /// One is already running.
    #[error("a replay of view {0:?} is already running")]
    Running(String),
    /// The agent has no NATS connection (bad URL).
    #[error("the agent has no NATS connection: {0}")]
    NoNats(String),
    /// The start time does not parse.
    #[error("--from-time {0:?} is not an RFC 3339 time like 2025-01-31T12:00:00Z")]
    BadTime(String),
    /// Store failure.
    #[error(transparent)]
    Store(#[from] crate::store::QueryError),
}

/// The rebuilds of one agent.
#[derive(Debug)]
pub struct Replays {
    store: Arc<ViewStore>,
    client: Result<async_nats::Client, String>,
    nats: NatsConfig,
    shutdown: watch::Receiver<bool>,
    status: Mutex<HashMap<String, Arc<Mutex<ReplayStatus>>>>,
}

impl Replays {
    /// Rebuilds for `store`, reading the stream through `client`.
    pub fn new(
        store: Arc<ViewStore>,
        client: Result<async_nats::Client, String>,
        nats: NatsConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Replays {
        Replays {
            store,
            client,
            nats,
            shutdown,
            status: Mutex::new(HashMap::new()),
        }
    }

    /// Starts rebuilding `view` in the background.
    pub fn start(&self, view: &str, from: ReplayFrom) -> Result<ReplayStatus, ReplayError> {
        let name = self
            .store
            .view(view)
            .map(|v| v.name().to_owned())
            .ok_or_else(|| ReplayError::UnknownView(view.to_owned()))?;
        let client = self.client.clone().map_err(ReplayError::NoNats)?;
        let start_time = match &from {
            ReplayFrom::Time(t) => Some(
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| ReplayError::BadTime(t.clone()))?,
            ),
            _ => None,
        };
        let mut all = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = all.get(&name) {
            if s.lock().unwrap_or_else(PoisonError::into_inner).state == ReplayState::Running {
                return Err(ReplayError::Running(name));
            }
        }
        let shadow = Arc::new(self.store.begin_shadow(&name)?);
        let status = Arc::new(Mutex::new(ReplayStatus {
            view: name.clone(),
            state: ReplayState::Running,
            from_seq: 0,
            read_seq: 0,
            target_seq: self.store.progress().applied_seq,
            events: 0,
            replaced_rows: 0,
            error: None,
            warning: None,
        }));
        all.insert(name.clone(), status.clone());
        let snapshot = status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut rebuild = Rebuild {
            store: self.store.clone(),
            js: jetstream::new(client),
            nats: self.nats.clone(),
            status,
            shutdown: self.shutdown.clone(),
            large: None,
        };
        tokio::spawn(async move {
            tracing::info!(view = %name, from = ?from, "replay started");
            let outcome = rebuild.run(shadow, from, start_time).await;
            let mut st = rebuild.lock();
            match outcome {
                Ok(replaced) => {
                    st.state = ReplayState::Done;
                    st.replaced_rows = replaced as u64;
                    tracing::info!(view = %name, seq = st.read_seq, events = st.events, "replay done: the rebuilt view is live");
                }
                Err(e) => {
                    st.state = ReplayState::Failed;
                    tracing::error!(view = %name, error = %e, "replay failed; the old view still serves");
                    st.error = Some(e);
                }
            }
        });
        Ok(snapshot)
    }

    /// The status of the latest rebuild of `view`, if any ran since the agent started.
    pub fn status(&self, view: &str) -> Option<ReplayStatus> {
        let name = self.store.view(view)?.name().to_owned();
        let all = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        all.get(&name)
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

struct Rebuild {
    store: Arc<ViewStore>,
    js: jetstream::Context,
    nats: NatsConfig,
    status: Arc<Mutex<ReplayStatus>>,
    shutdown: watch::Receiver<bool>,
    large: Option<jetstream::object_store::ObjectStore>,
}

/// What to do with the next message.
enum Next {
    Message(Box<jetstream::Message>),
    Idle,
}

impl Rebuild {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReplayStatus> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn run(
        &mut self,
        shadow: Arc<Shadow>,
        from: ReplayFrom,
        start_time: Option<time::OffsetDateTime>,
    ) -> Result<usize, String> {
        let result = self.rebuild(&shadow, from, start_time).await;
        match result {
            Ok(()) => {
                let store = self.store.clone();
                // The swap itself is one small batch; the applier is released right after it,
                // and deleting the old rows (which may take a while) happens after that.
                let swapped = tokio::task::spawn_blocking(move || {
                    let old = store.swap_shadow(&shadow);
                    store.fence().release();
                    store.drop_replaced(old?)
                })
                .await
                .map_err(|e| format!("swap task: {e}"))?;
                swapped.map_err(|e| e.to_string())
            }
            Err(e) => {
                let store = self.store.clone();
                let _ = tokio::task::spawn_blocking(move || store.abandon_shadow(&shadow)).await;
                Err(e)
            }
        }
    }

    /// Reads the stream into the shadow until it has caught up with the live view; returns
    /// with the fence held (the caller swaps and releases it).
    async fn rebuild(
        &mut self,
        shadow: &Arc<Shadow>,
        from: ReplayFrom,
        start_time: Option<time::OffsetDateTime>,
    ) -> Result<(), String> {
        let mut stream = tokio::time::timeout(API_TIMEOUT, self.js.get_stream(&self.nats.stream))
            .await
            .map_err(|_| "NATS did not answer within 5 s".to_string())?
            .map_err(|e| format!("stream {:?}: {e}", self.nats.stream))?;
        let state = tokio::time::timeout(API_TIMEOUT, stream.info())
            .await
            .map_err(|_| "stream info timed out".to_string())?
            .map_err(|e| format!("stream info: {e}"))?
            .state
            .clone();
        let first = state.first_sequence.max(1);
        let (policy, mut read_seq) = match (&from, start_time) {
            (ReplayFrom::Start, _) => {
                if first > 1 {
                    self.lock().warning = Some(format!(
                        "the stream starts at sequence {first}: retention removed earlier messages, so the rebuilt \
                         view holds only what the stream still has (complete if a snapshot of the table is in it)"
                    ));
                }
                (
                    DeliverPolicy::ByStartSequence {
                        start_sequence: first,
                    },
                    Some(first - 1),
                )
            }
            (ReplayFrom::Seq(n), _) => {
                if *n < first {
                    return Err(format!(
                        "the stream starts at sequence {first}; sequence {n} was removed by retention (use --from-start)"
                    ));
                }
                (
                    DeliverPolicy::ByStartSequence { start_sequence: *n },
                    Some(n - 1),
                )
            }
            (ReplayFrom::Time(_), Some(t)) => (DeliverPolicy::ByStartTime { start_time: t }, None),
            (ReplayFrom::Time(t), None) => return Err(format!("bad time {t:?}")),
        };
        let heartbeat = cdc::subject::heartbeat_subject(&self.nats.subject_prefix);
        let (schema, table) = shadow.source();
        let table_subject = cdc::subject::table_subject(&self.nats.subject_prefix, schema, table);
        let mut buf: Vec<ChangeEvent> = Vec::new();
        let mut watchdog = Watchdog::allowing(STALL_IDLES);
        'session: loop {
            watchdog.delivered();
            let policy = match read_seq {
                Some(s) => DeliverPolicy::ByStartSequence {
                    start_sequence: s + 1,
                },
                None => policy,
            };
            let consumer = stream
                .create_consumer(OrderedConfig {
                    deliver_policy: policy,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("create ordered consumer: {e}"))?;
            let mut messages = consumer
                .messages()
                .await
                .map_err(|e| format!("start ordered consumer: {e}"))?;
            if let Some(s) = read_seq {
                let mut st = self.lock();
                if st.from_seq == 0 {
                    st.from_seq = s + 1;
                }
            }
            loop {
                let next = tokio::select! {
                    biased;
                    _ = crate::shutdown_requested(&mut self.shutdown) => {
                        return Err("the agent is shutting down".into())
                    }
                    next = tokio::time::timeout(IDLE, messages.next()) => match next {
                        Ok(Some(Ok(m))) => Next::Message(Box::new(m)),
                        Ok(Some(Err(e))) => return Err(format!("ordered consumer: {e}")),
                        Ok(None) => return Err("ordered consumer ended".into()),
                        Err(_) => Next::Idle,
                    },
                };
                match next {
                    Next::Idle => {
                        self.flush(shadow, &mut buf).await?;
                        let Some(read) = read_seq else {
                            // Nothing at or after the start time yet: the rebuilt view is empty
                            // up to the stream's end.
                            let last = tokio::time::timeout(API_TIMEOUT, stream.info())
                                .await
                                .map_err(|_| "stream info timed out".to_string())?
                                .map_err(|e| format!("stream info: {e}"))?
                                .state
                                .last_sequence;
                            read_seq = Some(last);
                            continue 'session;
                        };
                        if self.store.progress().applied_seq == read {
                            self.store.fence().hold().await;
                            if self.store.progress().applied_seq == read {
                                return Ok(());
                            }
                            self.store.fence().release();
                        }
                        // Not done, and nothing came: a consumer that stopped delivering
                        // what the stream holds is replaced (from what the rebuild read).
                        if let Ok(Ok(info)) = tokio::time::timeout(API_TIMEOUT, stream.info()).await
                        {
                            let (messages, last) = (info.state.messages, info.state.last_sequence);
                            if watchdog.quiet_tick(messages, last, read + 1)
                                && holds_message(&stream, last, API_TIMEOUT).await
                            {
                                tracing::warn!(
                                    seq = read + 1,
                                    "the replay consumer delivered nothing for 2 s although the stream holds more; re-creating it"
                                );
                                continue 'session;
                            }
                        }
                    }
                    Next::Message(msg) => {
                        watchdog.delivered();
                        let seq = msg
                            .info()
                            .map_err(|e| format!("message without JetStream info: {e}"))?
                            .stream_sequence;
                        let read = match read_seq {
                            Some(r) if seq <= r => continue,
                            Some(r) => r,
                            None => {
                                let mut st = self.lock();
                                st.from_seq = seq;
                                seq - 1
                            }
                        };
                        if seq > read + 1 && self.skipped(&stream, read + 1, seq).await? {
                            tracing::warn!(
                                seq = read + 1,
                                "the replay consumer skipped a stored message; re-reading"
                            );
                            continue 'session;
                        }
                        // Never ahead of the live view: a message it has not applied means
                        // the rebuild has everything the live view has.
                        loop {
                            let live = self.store.progress().applied_seq;
                            if seq <= live {
                                break;
                            }
                            self.flush(shadow, &mut buf).await?;
                            if live >= read {
                                self.store.fence().hold().await;
                                let held = self.store.progress().applied_seq;
                                if held >= read && held < seq {
                                    return Ok(());
                                }
                                self.store.fence().release();
                                if held >= seq {
                                    break;
                                }
                            }
                            // The live view is behind the rebuild's start: wait for it.
                            let mut rx = self.store.subscribe();
                            tokio::select! {
                                biased;
                                _ = crate::shutdown_requested(&mut self.shutdown) => {
                                    return Err("the agent is shutting down".into())
                                }
                                _ = tokio::time::timeout(IDLE, rx.changed()) => {}
                            }
                        }
                        if msg.subject.as_str() == table_subject {
                            buf.push(self.decode(&msg, seq).await?);
                        } else if msg.subject.as_str() != heartbeat {
                            // Other tables' events: nothing to do.
                        }
                        read_seq = Some(seq);
                        {
                            let mut st = self.lock();
                            st.read_seq = seq;
                            st.target_seq = self.store.progress().applied_seq;
                        }
                        if buf.len() >= SHADOW_BATCH {
                            self.flush(shadow, &mut buf).await?;
                        }
                    }
                }
            }
        }
    }

    async fn decode(&mut self, msg: &jetstream::Message, seq: u64) -> Result<ChangeEvent, String> {
        let large = match msg
            .headers
            .as_ref()
            .and_then(|h| h.get(HEADER_LARGE_REF))
            .map(|v| v.as_str().to_owned())
        {
            Some(name) => Some(
                crate::follow::fetch_large(&self.js, &self.nats.stream, &mut self.large, &name)
                    .await?,
            ),
            None => None,
        };
        let body: &[u8] = large.as_deref().unwrap_or(&msg.payload);
        serde_json::from_slice(body).map_err(|e| {
            format!(
                "undecodable event at stream sequence {seq} on {} ({e})",
                msg.subject
            )
        })
    }

    /// True when a message in `[from, to)` is still stored (the consumer skipped it; see
    /// `follow.rs` on nats-server 2.9 rollups); heartbeats and removed messages are fine.
    async fn skipped(
        &self,
        stream: &jetstream::stream::Stream,
        from: u64,
        to: u64,
    ) -> Result<bool, String> {
        let heartbeat = cdc::subject::heartbeat_subject(&self.nats.subject_prefix);
        for s in from..to.min(from + MAX_GAP_PROBE) {
            match tokio::time::timeout(API_TIMEOUT, stream.get_raw_message(s)).await {
                Ok(Ok(m)) if m.subject.as_str() == heartbeat => {}
                Ok(Ok(_)) => return Ok(true),
                Ok(Err(e)) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                Ok(Err(e)) => return Err(format!("checking a sequence gap: {e}")),
                Err(_) => return Err("checking a sequence gap timed out".into()),
            }
        }
        Ok(false)
    }

    async fn flush(&self, shadow: &Arc<Shadow>, buf: &mut Vec<ChangeEvent>) -> Result<(), String> {
        if buf.is_empty() {
            return Ok(());
        }
        let events = std::mem::take(buf);
        let n = events.len() as u64;
        let (store, sh) = (self.store.clone(), shadow.clone());
        let applied = tokio::task::spawn_blocking(move || store.apply_shadow(&sh, &events))
            .await
            .map_err(|e| format!("shadow apply task: {e}"))?
            .map_err(|e| e.to_string())?;
        if let Err(reason) = applied {
            return Err(format!(
                "the view cannot be rebuilt from the stream: {reason}"
            ));
        }
        self.lock().events += n;
        Ok(())
    }
}
