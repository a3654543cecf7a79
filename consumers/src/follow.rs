//! Following the stream: an ordered JetStream consumer from `applied_seq + 1`, whole source
//! transactions gathered and applied atomically, heartbeats turned into the read-your-writes
//! watermark, history gaps turned into stale views.
//!
//! Two stages run in parallel: this task reads and decodes messages and gathers whole source
//! transactions; an applier thread prepares and writes the sled batches (several waiting
//! transactions, and the heartbeats between them, go into one atomic batch). The queue between
//! them is bounded, so the reader runs at most a few batches ahead. A transaction larger than
//! `apply.max_tx_events_in_memory` is handed over in parts of that size, which the applier
//! stages and makes visible at once with the last part, so memory stays bounded whatever a
//! transaction's size.
//!
//! Why an ordered (ephemeral) consumer: the agent's position lives in sled, in the same batch as
//! the rows, so the server-side state of a durable consumer would be a second position that can
//! disagree with the first; an ordered consumer is created from the sled position on every
//! (re)start and needs no acks. The messages come through [`cdc::pull`], a pull consumer with
//! the settings of async-nats' ordered consumer on a connection of its own, at a tenth of the
//! client CPU per message (`cdc-bench` row 4); a consumer that loses its order (a skipped
//! delivery) ends the session, and the next one starts from the applied position.
//!
//! # When is a sequence gap history loss?
//! Heartbeats may be published with `Nats-Rollup: sub`, which purges older heartbeats, so
//! sequence numbers have holes in normal operation. Retention (`max_msgs`, `max_age`,
//! `max_bytes`) only ever removes messages from the front of the stream. So a hole starting at
//! sequence `s` is lost history exactly when the stream's first sequence, read after the hole is
//! seen, is greater than `s` (the front moved past a message the agent never applied); a hole
//! behind the front is a purged heartbeat. The agent records its position on heartbeats too, so a
//! tail of purged heartbeats is not mistaken for loss after a restart.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::stream::RawMessageErrorKind;
use cdc::envelope::{ChangeEvent, Heartbeat, HEADER_LARGE_REF};
use cdc::pull::{PullConfig, PullConsumer, PullError, StreamMessage};
use cdc::stall::{holds_message, Watchdog};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

use crate::config::{ApplyConfig, NatsConfig};
use crate::store::{SourceTransaction, StagedTx, StoreError, ViewStore, HISTORY_GAP_PREFIX};

/// How often the stream's last sequence is refreshed for `cdc_status`.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Largest sequence hole whose messages are probed one by one (a longer run of purged
/// heartbeats is only checked against the stream's front).
const MAX_GAP_PROBE: usize = 256;
/// Timeout of one JetStream API request (stream info, object get).
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Groups of transactions queued for the applier thread (backpressure beyond that).
const APPLY_QUEUE: usize = 4;
/// Parts of a large transaction handed to the applier and not yet staged. One lets the next
/// part be read and decoded while the applier stages the last; the queue's four would hold
/// four more parts' decoded events (about 1 MB per 1,024 events) for nothing.
const PARTS_AHEAD: usize = 1;
/// Status ticks in a row without a delivered message, while the stream holds messages at or
/// past the agent's position, that a consumer may be quiet; the next such tick counts it as
/// stalled (see [`Watchdog`]: a stall costs 2–3 s, not the 15 s of three missed heartbeats).
const STALL_TICKS: u32 = 2;

/// Errors of the follow loop. Only store errors stop the agent; NATS errors are retried.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The store failed; applying cannot continue.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A reason to drop the current NATS session and start a new one.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the consumer skipped stream message {0}")]
    Skipped(u64),
    #[error("{0}")]
    OutOfOrder(PullError),
    #[error(
        "the consumer delivered nothing for {STALL_TICKS}+ status intervals although the stream \
         holds messages from sequence {0} on"
    )]
    Stalled(u64),
}

fn nats_err(what: &str, e: impl std::fmt::Display) -> SessionError {
    SessionError::Nats(format!("{what}: {e}"))
}

/// A consumer that lost its order starts again at once; anything else waits for the backoff.
fn session_err(e: PullError) -> SessionError {
    match e {
        e @ PullError::Gap { .. } => SessionError::OutOfOrder(e),
        e => SessionError::Nats(format!("stream consumer: {e}")),
    }
}

/// Connects to NATS in the background (retrying forever), as the agent does.
pub async fn connect(nats: &NatsConfig) -> Result<async_nats::Client, String> {
    let (options, servers) =
        cdc::nats_url::connect_options(async_nats::ConnectOptions::new(), &nats.url);
    options
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .name("view-agent")
        .connect(servers.as_str())
        .await
        .map_err(|e| {
            // Only a malformed URL fails here (connecting is retried in the background).
            format!(
                "cannot use nats.url {}: {e}",
                cdc::publish::redact_url(&nats.url)
            )
        })
}

/// Follows the stream until `shutdown` turns true. NATS being unreachable is not an error: the
/// loop retries with backoff while the views keep answering queries.
pub async fn follow(
    store: Arc<ViewStore>,
    client: async_nats::Client,
    nats: NatsConfig,
    apply: ApplyConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), FollowError> {
    let mut applier = Applier::spawn(store.clone(), apply.max_batch_events);
    let result = follow_sessions(&store, &client, &nats, &apply, &mut applier, &mut shutdown).await;
    // Whatever was handed over is applied before returning (a clean stop at a transaction
    // boundary); an applier failure wins over a clean exit.
    match (applier.finish().await, result) {
        (Err(e), _) => Err(e.into()),
        (Ok(()), r) => r,
    }
}

async fn follow_sessions(
    store: &Arc<ViewStore>,
    client: &async_nats::Client,
    nats: &NatsConfig,
    apply: &ApplyConfig,
    applier: &mut Applier,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), FollowError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        // The next session starts from what is applied: wait for the applier to catch up.
        applier.barrier().await?;
        let mut session = Session::new(store, client, nats, apply, applier);
        match session.run(shutdown).await {
            Ok(()) => return Ok(()),
            Err(SessionError::Store(e)) => return Err(e.into()),
            Err(SessionError::Skipped(_)) => {
                backoff = Duration::from_millis(100);
                continue;
            }
            Err(e @ SessionError::OutOfOrder(_)) => {
                tracing::warn!(error = %e, "re-creating the stream consumer");
                backoff = Duration::from_millis(100);
                continue;
            }
            Err(e @ SessionError::Stalled(_)) => {
                tracing::warn!(error = %e, "re-creating the stream consumer");
                backoff = Duration::from_millis(100);
                continue;
            }
            Err(SessionError::Nats(e)) => {
                if session.applied_any {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "stream unavailable; views keep answering");
            }
        }
        tokio::select! {
            biased;
            _ = crate::shutdown_requested(shutdown) => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Work for the applier thread, in stream order.
enum Work {
    /// Whole transactions.
    Txs(Vec<SourceTransaction>),
    /// A heartbeat `(seq, lsn)` read with every message before it handed over.
    Heartbeat(u64, cdc::Lsn),
    /// A part of a large transaction, staged until its last part (`first`: the transaction
    /// starts here; whatever an earlier session staged is discarded).
    Part {
        first: bool,
        events: Vec<ChangeEvent>,
        /// Held until the part is staged (see [`Applier::send_part`]).
        _room: tokio::sync::OwnedSemaphorePermit,
    },
    /// The last part of a large transaction: staged, then the whole transaction made visible.
    LastPart(SourceTransaction),
    /// Answered once everything before it is applied.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The applier thread: takes everything queued (up to a batch size), applies it as one atomic
/// sled batch, repeats. Parts of a large transaction are staged in order between batches.
struct Applier {
    tx: Option<tokio::sync::mpsc::Sender<Work>>,
    thread: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
    /// Parts of a large transaction handed over and not yet staged: at most [`PARTS_AHEAD`].
    parts: Arc<tokio::sync::Semaphore>,
}

impl Applier {
    fn spawn(store: Arc<ViewStore>, max_batch_events: usize) -> Applier {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Work>(APPLY_QUEUE);
        let body = move || -> Result<(), StoreError> {
            let mut txs: Vec<SourceTransaction> = Vec::new();
            let mut barriers = Vec::new();
            let mut staged: Option<StagedTx> = None;
            while let Some(first) = rx.blocking_recv() {
                let mut events = 0;
                let mut heartbeat = None;
                let mut large = None;
                let mut next = Some(first);
                while let Some(work) = next.take() {
                    match work {
                        w @ (Work::Part { .. } | Work::LastPart(_)) => {
                            // What came before it is applied first.
                            large = Some(w);
                            break;
                        }
                        Work::Txs(mut t) => {
                            events += t.iter().map(|t| t.events.len()).sum::<usize>();
                            txs.append(&mut t);
                        }
                        Work::Heartbeat(seq, lsn) => {
                            let lsn = heartbeat.map_or(lsn, |(_, l): (u64, cdc::Lsn)| l.max(lsn));
                            heartbeat = Some((seq, lsn));
                        }
                        Work::Barrier(b) => barriers.push(b),
                    }
                    if events < max_batch_events && barriers.is_empty() {
                        next = rx.try_recv().ok();
                    }
                }
                // A heartbeat followed by more transactions still holds: the batch applies all
                // of them atomically.
                if large.is_none() || !txs.is_empty() || heartbeat.is_some() {
                    store.apply_group(&txs, heartbeat)?;
                }
                txs.clear();
                match large {
                    Some(Work::Part { first, events, .. }) => {
                        if first || staged.is_none() {
                            store.discard_staged()?;
                            staged = Some(StagedTx::default());
                        }
                        if let Some(s) = staged.as_mut() {
                            store.stage(s, &events)?;
                        }
                    }
                    Some(Work::LastPart(tx)) => {
                        let s = match staged.take() {
                            Some(s) => s,
                            None => {
                                store.discard_staged()?;
                                StagedTx::default()
                            }
                        };
                        tracing::debug!(
                            events = s.events() + tx.events.len(),
                            "applying a large transaction"
                        );
                        store.commit_staged(s, &tx.events, tx.last_seq)?;
                    }
                    _ => {}
                }
                for b in barriers.drain(..) {
                    let _ = b.send(());
                }
            }
            Ok(())
        };
        let thread = std::thread::Builder::new()
            .name("view-apply".into())
            .spawn(body);
        match thread {
            Ok(t) => Applier {
                tx: Some(tx),
                thread: Some(t),
                parts: Arc::new(tokio::sync::Semaphore::new(PARTS_AHEAD)),
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the applier thread");
                Applier {
                    tx: None,
                    thread: None,
                    parts: Arc::new(tokio::sync::Semaphore::new(PARTS_AHEAD)),
                }
            }
        }
    }

    /// Hands work over (waits while the queue is full). Fails when the applier stopped.
    async fn send(&mut self, work: Work) -> Result<(), StoreError> {
        let sent = match &self.tx {
            Some(tx) => tx.send(work).await.is_ok(),
            None => false,
        };
        if sent {
            return Ok(());
        }
        self.finish().await?;
        Err(StoreError::Corrupt("the applier thread stopped".into()))
    }

    /// Hands a part of a large transaction over once fewer than [`PARTS_AHEAD`] earlier parts
    /// are still waiting to be staged: the parts in memory are the one being staged and the one
    /// being read, not a full queue of them.
    async fn send_part(&mut self, first: bool, events: Vec<ChangeEvent>) -> Result<(), StoreError> {
        let room = match self.parts.clone().acquire_owned().await {
            Ok(room) => room,
            // Never closed; treated as a stopped applier all the same.
            Err(_) => return Err(StoreError::Corrupt("the applier thread stopped".into())),
        };
        self.send(Work::Part {
            first,
            events,
            _room: room,
        })
        .await?;
        // The earlier parts were decoded on this thread and freed by the applier; a large
        // transaction frees faster than it takes memory again, so return it now (see
        // `cdc::memory`).
        cdc::memory::return_freed_memory();
        Ok(())
    }

    /// Waits until everything handed over is applied.
    async fn barrier(&mut self) -> Result<(), StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Work::Barrier(tx)).await?;
        if rx.await.is_err() {
            self.finish().await?;
            return Err(StoreError::Corrupt("the applier thread stopped".into()));
        }
        Ok(())
    }

    /// Stops the thread after it applied what it was given; its error, if it failed.
    async fn finish(&mut self) -> Result<(), StoreError> {
        self.tx = None;
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(r)) => r,
            _ => Err(StoreError::Corrupt("the applier thread panicked".into())),
        }
    }
}

/// One consumer lifetime: from the stored position until an error or shutdown.
struct Session<'a> {
    store: &'a ViewStore,
    client: &'a async_nats::Client,
    js: jetstream::Context,
    nats: &'a NatsConfig,
    apply: &'a ApplyConfig,
    heartbeat_subject: String,
    /// Events of the source transaction being read (not yet complete).
    open_tx: Vec<ChangeEvent>,
    /// The transaction being read is large: its earlier parts went to the applier already.
    staging: bool,
    /// Complete transactions waiting for the next batch.
    ready: Vec<SourceTransaction>,
    ready_events: usize,
    /// Stream sequence expected next (for gap detection).
    expected_seq: u64,
    large: Option<jetstream::object_store::ObjectStore>,
    stream: Option<jetstream::stream::Stream>,
    applied_any: bool,
    applier: &'a mut Applier,
    watchdog: Watchdog,
}

impl<'a> Session<'a> {
    fn new(
        store: &'a ViewStore,
        client: &'a async_nats::Client,
        nats: &'a NatsConfig,
        apply: &'a ApplyConfig,
        applier: &'a mut Applier,
    ) -> Self {
        Session {
            store,
            client,
            js: jetstream::new(client.clone()),
            nats,
            apply,
            heartbeat_subject: format!("{}._heartbeat", nats.subject_prefix),
            open_tx: Vec::new(),
            staging: false,
            ready: Vec::new(),
            ready_events: 0,
            expected_seq: 0,
            large: None,
            stream: None,
            applied_any: false,
            applier,
            watchdog: Watchdog::allowing(STALL_TICKS),
        }
    }

    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), SessionError> {
        let mut stream = tokio::time::timeout(API_TIMEOUT, self.js.get_stream(&self.nats.stream))
            .await
            .map_err(|e| nats_err("get stream", e))?
            .map_err(|e| nats_err(&format!("get stream {:?}", self.nats.stream), e))?;
        self.stream = Some(stream.clone());
        let start = self.store.progress().applied_seq + 1;
        self.expected_seq = start;
        let info = stream.cached_info().state.clone();
        self.store.set_stream_last_seq(info.last_sequence);
        self.check_front(info.first_sequence, info.last_sequence, start)
            .await?;
        let awaiting = self.store.tables_awaiting_snapshot();
        if !awaiting.is_empty() {
            self.request_snapshots(&awaiting).await;
        }
        let mut messages = PullConsumer::start(
            &self.nats.url,
            PullConfig::new(&self.nats.stream, start, "view-agent"),
        )
        .await
        .map_err(session_err)?;
        tracing::info!(stream = %self.nats.stream, from_seq = start, "following the stream");
        let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Group commit: while complete transactions wait, take more only if a message is
            // already here; otherwise apply now, so that latency stays one batch.
            if !self.ready.is_empty() {
                if self.ready_events < self.apply.max_batch_events {
                    match messages.try_next() {
                        Some(Ok(msg)) => {
                            self.handle(msg).await?;
                            continue;
                        }
                        Some(Err(e)) => {
                            self.apply_ready().await?;
                            return Err(session_err(e));
                        }
                        None => {}
                    }
                }
                self.apply_ready().await?;
            }
            tokio::select! {
                biased;
                // 1. Shutdown: stop at a transaction boundary (nothing half-applied exists:
                //    incomplete transactions are only in memory and are read again next start).
                _ = crate::shutdown_requested(shutdown) => return Ok(()),
                // 2. Status: refresh the stream's last sequence for lag reporting, and check
                //    that the consumer delivers what the stream holds.
                _ = status_tick.tick() => {
                    match tokio::time::timeout(API_TIMEOUT, stream.info()).await {
                        Ok(Ok(info)) => {
                            let (messages, last) = (info.state.messages, info.state.last_sequence);
                            self.store.set_stream_last_seq(last);
                            if self.watchdog.quiet_tick(messages, last, self.expected_seq)
                                && holds_message(&stream, last, API_TIMEOUT).await
                            {
                                self.apply_ready().await?;
                                return Err(SessionError::Stalled(self.expected_seq));
                            }
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "stream info"),
                        Err(_) => tracing::debug!("stream info timed out"),
                    }
                }
                // 3. The next message.
                next = messages.next() => match next {
                    Ok(msg) => self.handle(msg).await?,
                    Err(e) => return Err(session_err(e)),
                },
            }
        }
    }

    /// Marks the views stale when the stream's front is past `expected` (see module docs).
    async fn check_front(
        &mut self,
        first_seq: u64,
        last_seq: u64,
        expected: u64,
    ) -> Result<(), SessionError> {
        // An empty stream reports first = last + 1 (or 0/0 when new): nothing was lost unless
        // its front is past what we expect.
        if first_seq <= expected || (first_seq == 0 && last_seq == 0) {
            return Ok(());
        }
        let reason = format!(
            "{HISTORY_GAP_PREFIX}: stream {} starts at sequence {first_seq} but this agent has applied only up to {}; \
             retention removed changes the view never saw. A re-snapshot of the source tables was requested; \
             if no snapshot arrives, run `cdc snapshot --table` and then `view-agent replay --view <view> --from-seq <its first sequence>`",
            self.nats.stream,
            expected - 1
        );
        tracing::error!(%reason, "views are stale");
        self.store.mark_all_stale(&reason)?;
        self.request_resnapshot().await;
        Ok(())
    }

    /// Asks the reader to re-snapshot every source table of this agent's views (best effort).
    async fn request_resnapshot(&self) {
        let mut tables: Vec<String> = self
            .store
            .views()
            .iter()
            .map(|v| v.config.source.clone())
            .collect();
        tables.sort_unstable();
        tables.dedup();
        self.request_snapshots(&tables).await;
    }

    /// Asks the reader to snapshot `tables` (best effort: a reader that does not answer is
    /// logged with the command to run).
    async fn request_snapshots(&self, tables: &[String]) {
        let subject = cdc::reader::control_subject(&self.nats.subject_prefix);
        for table in tables {
            let body = serde_json::json!({ "table": table }).to_string();
            let req = self.client.request(subject.clone(), body.into());
            match tokio::time::timeout(Duration::from_secs(2), req).await {
                Ok(Ok(reply)) => {
                    tracing::info!(table, reply = %String::from_utf8_lossy(&reply.payload), "snapshot requested")
                }
                Ok(Err(e)) => {
                    tracing::warn!(table, error = %e, "snapshot request not answered; run `cdc snapshot --table {table}`")
                }
                Err(_) => tracing::warn!(
                    table,
                    "snapshot request timed out; run `cdc snapshot --table {table}`"
                ),
            }
        }
    }

    async fn handle(&mut self, msg: StreamMessage) -> Result<(), SessionError> {
        self.watchdog.delivered();
        let seq = msg.stream_seq();
        if seq < self.expected_seq {
            // Already applied (redelivery after a consumer reset).
            return Ok(());
        }
        if seq > self.expected_seq {
            self.check_gap(self.expected_seq, seq).await?;
        }
        self.expected_seq = seq + 1;
        if msg.subject() == self.heartbeat_subject.as_bytes() {
            let hb: Heartbeat = match serde_json::from_slice(msg.payload()) {
                Ok(hb) => hb,
                Err(e) => {
                    tracing::warn!(seq, error = %e, "ignoring an undecodable heartbeat");
                    return Ok(());
                }
            };
            if self.open_tx.is_empty() && !self.staging {
                self.apply_ready().await?;
                self.applier.send(Work::Heartbeat(seq, hb.lsn)).await?;
                self.applied_any = true;
            }
            return Ok(());
        }
        let large = match msg.header(HEADER_LARGE_REF) {
            Some(name) => Some(self.fetch_large(name).await?),
            None => None,
        };
        let body: &[u8] = large.as_deref().unwrap_or(msg.payload());
        let event: ChangeEvent = match serde_json::from_slice(body) {
            Ok(ev) => ev,
            Err(e) => {
                let reason = format!(
                    "undecodable event at stream sequence {seq} on {} ({e}); the reader and agent versions may differ",
                    msg.subject_text()
                );
                tracing::error!(%reason, "views are stale");
                self.store.mark_all_stale(&reason)?;
                return Ok(());
            }
        };
        let ends = event.ends_transaction();
        self.open_tx.push(event);
        if ends {
            let events = std::mem::take(&mut self.open_tx);
            let tx = SourceTransaction {
                last_seq: seq,
                events,
            };
            if self.staging {
                self.staging = false;
                self.apply_ready().await?;
                self.applier.send(Work::LastPart(tx)).await?;
                self.applied_any = true;
            } else {
                self.ready_events += tx.events.len();
                self.ready.push(tx);
            }
        } else if self.open_tx.len() >= self.apply.max_tx_events_in_memory {
            // A large transaction: hand it over in parts (bounded memory), complete
            // transactions before it first.
            self.apply_ready().await?;
            let first = !self.staging;
            self.staging = true;
            let events = std::mem::take(&mut self.open_tx);
            self.applier.send_part(first, events).await?;
        }
        Ok(())
    }

    /// Classifies the hole `[from, to)` in delivered sequences (see module docs): a message
    /// still in the stream was skipped by the consumer (nats-server 2.9 advances consumers past
    /// non-purged messages when a `Nats-Rollup: sub` purge happens) and the session restarts
    /// from the stored position; a removed message behind the front is a purged heartbeat; a
    /// front past `from` is lost history.
    async fn check_gap(&mut self, from: u64, to: u64) -> Result<(), SessionError> {
        let Some(stream) = self.stream.clone() else {
            return Err(SessionError::Nats("no stream handle".into()));
        };
        for s in (from..to).take(MAX_GAP_PROBE) {
            match tokio::time::timeout(API_TIMEOUT, stream.get_raw_message(s)).await {
                Ok(Ok(m)) if m.subject.as_str() == self.heartbeat_subject => {}
                Ok(Ok(_)) => {
                    tracing::warn!(seq = s, "the consumer skipped a stored message; re-reading from the applied position");
                    self.apply_ready().await?;
                    return Err(SessionError::Skipped(s));
                }
                Ok(Err(e)) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
                Ok(Err(e)) => return Err(nats_err("checking a sequence gap", e)),
                Err(e) => return Err(nats_err("checking a sequence gap", e)),
            }
        }
        let mut stream = stream;
        let state = tokio::time::timeout(API_TIMEOUT, stream.info())
            .await
            .map_err(|e| nats_err("stream info", e))?
            .map_err(|e| nats_err("stream info", e))?
            .state
            .clone();
        self.check_front(state.first_sequence, state.last_sequence, from)
            .await
    }

    async fn fetch_large(&mut self, name: &str) -> Result<Vec<u8>, SessionError> {
        fetch_large(&self.js, &self.nats.stream, &mut self.large, name)
            .await
            .map_err(SessionError::Nats)
    }

    /// Hands the complete transactions gathered so far to the applier.
    async fn apply_ready(&mut self) -> Result<(), SessionError> {
        if self.ready.is_empty() {
            return Ok(());
        }
        let ready = std::mem::take(&mut self.ready);
        self.ready_events = 0;
        self.applier.send(Work::Txs(ready)).await?;
        self.applied_any = true;
        Ok(())
    }
}

/// Reads the body of a large event from the `<stream>_LARGE` object store (`cache` keeps the
/// bucket handle between calls).
pub(crate) async fn fetch_large(
    js: &jetstream::Context,
    stream: &str,
    cache: &mut Option<jetstream::object_store::ObjectStore>,
    name: &str,
) -> Result<Vec<u8>, String> {
    if cache.is_none() {
        let bucket = format!("{stream}_LARGE");
        let os = js
            .get_object_store(&bucket)
            .await
            .map_err(|e| format!("object store {bucket}: {e}"))?;
        *cache = Some(os);
    }
    let Some(os) = cache.as_ref() else {
        return Err("object store unavailable".into());
    };
    let fetch = async {
        let mut obj = os
            .get(name)
            .await
            .map_err(|e| format!("large event object {name}: {e}"))?;
        let mut buf = Vec::new();
        obj.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("reading large event object {name}: {e}"))?;
        Ok::<_, String>(buf)
    };
    tokio::time::timeout(API_TIMEOUT * 12, fetch)
        .await
        .map_err(|e| format!("large event object {name}: {e}"))?
}
