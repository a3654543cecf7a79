//! The reader: streams the slot's changes into JetStream and confirms progress to Postgres only
//! after the PubAck of everything at or below it.
//!
//! One task, one `select!` loop ([`Pipeline::run`]). Its branches, in priority order:
//! 1. shutdown: stop reading, drain in-flight publishes, confirm, end the stream;
//! 2. the oldest in-flight PubAck (acks resolve in publish order): advances the confirmable LSN;
//! 3. the status-update timer: tells Postgres the confirmable LSN;
//! 4. the heartbeat timer: publishes `<prefix>._heartbeat` when the safe LSN moved;
//! 5. the idle timer: `pg_logical_emit_message` so the slot can move on an idle database;
//! 6. the progress log;
//! 7. the next replication message, only while the publish window has room (backpressure).
//!
//! Any failure ends the attempt without confirming anything more; the outer loop reconnects
//! with backoff and resumes from the slot, skipping what the stream already holds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use crate::config::CdcConfig;
use crate::envelope::msg_id;
use crate::events::{ChangeBuilder, EncodedEvent, Output, UnknownRelation};
use crate::lsn::Lsn;
use crate::metrics::ReaderMetrics;
use crate::observe::{HealthSource, MetricsServer};
use crate::pgconn::{PgConnError, PgTarget};
use crate::pgoutput::{self, LogicalMessage};
use crate::publish::{EventHeaders, Outgoing, PublishError, ResumePoint, StreamSink, Ticket};
use crate::replication::{ReplicationError, ReplicationSession, ReplicationStream};
use crate::setup::{self, SetupError, SlotState};
use crate::snapshot::{
    self, ChunkRequest, ChunkRows, CommittedXids, Progress, ProgressStore, SnapshotError,
    SnapshotXids, TableShape,
};
use crate::wal::ReplicationMessage;

/// How long a fresh process waits for a slot held by another walsender (e.g. the session of a
/// predecessor that was just killed) before giving up.
const SLOT_BUSY_GRACE: Duration = Duration::from_secs(10);
/// Replication messages handled in one turn of the loop when they are already buffered.
const MAX_BURST: usize = 256;
/// How often the loop looks for a table to snapshot.
const SNAPSHOT_POLL: Duration = Duration::from_millis(50);
/// Longest wait for a chunk read whose high watermark already arrived.
const CHUNK_WAIT: Duration = Duration::from_secs(60);
/// Committed transaction ids remembered for snapshot reads (see [`CommittedXids`]); ~20 bytes
/// each. Pruned every status interval by the oldest running transaction, so only a transaction
/// open for longer than this many commits lets it fill.
const COMMITTED_XIDS_CAP: usize = 1 << 18;
/// How often the loop logs its progress (debug level).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long shutdown waits for in-flight PubAcks.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);
/// Logical message prefix of the reader's own messages (not published).
pub const MESSAGE_PREFIX: &str = "cdc.";

/// Everything that can stop the reader.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// Connecting to Postgres failed.
    #[error(transparent)]
    Connect(#[from] PgConnError),
    /// A pre-flight check failed.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The replication session failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// NATS failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The change stream is inconsistent.
    #[error(transparent)]
    Decode(#[from] UnknownRelation),
    /// A SQL query failed.
    #[error("SQL on the source database failed: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] crate::observe::ObserveError),
}

impl ReaderError {
    /// True when the slot is held by another walsender.
    pub fn slot_busy(&self) -> bool {
        match self {
            ReaderError::Setup(SetupError::SlotActive { .. }) => true,
            ReaderError::Replication(e) => e.code() == Some("55006"),
            _ => false,
        }
    }

    /// True when retrying can't help: the operator must fix something. `first` is true when
    /// the reader has not streamed yet in this process (then an unreachable Postgres is fatal
    /// too: the configuration is probably wrong).
    pub fn is_fatal(&self, first: bool) -> bool {
        const REFUSALS: [&str; 4] = ["28P01", "28000", "42501", "3D000"];
        match self {
            ReaderError::Connect(e) => match e.code() {
                Some(code) => REFUSALS.contains(&code),
                None => first || matches!(e, PgConnError::Url(_) | PgConnError::TlsSetup { .. }),
            },
            ReaderError::Setup(SetupError::SlotActive { .. }) => first,
            ReaderError::Setup(SetupError::Sql(_)) => false,
            ReaderError::Setup(_) => true,
            ReaderError::Replication(e) => match e.code() {
                Some("55006") => first,
                Some(code) => REFUSALS.contains(&code),
                None => false,
            },
            ReaderError::Publish(_) | ReaderError::Decode(_) | ReaderError::Sql(_) => false,
            ReaderError::Metrics(_) => true,
        }
    }
}

/// Runs the reader until `shutdown` turns true, reconnecting after transient failures.
pub async fn run(cfg: CdcConfig, mut shutdown: watch::Receiver<bool>) -> Result<(), ReaderError> {
    let target = PgTarget::parse(&cfg.postgres.url)?;
    let (metrics, registry) = ReaderMetrics::new();
    if !cfg.metrics.listen.is_empty() {
        let server = MetricsServer::bind(&cfg.metrics.listen).await?;
        if let Some(addr) = server.local_addr() {
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        }
        let health: Arc<dyn HealthSource> = Arc::clone(&metrics) as Arc<dyn HealthSource>;
        tokio::spawn(server.serve(Arc::new(registry), health, shutdown.clone()));
    }
    let mut backoff = Duration::from_millis(100);
    let mut streamed_before = false;
    let started = Instant::now();
    loop {
        let mut streamed = false;
        let result = run_once(&cfg, &target, &metrics, &mut shutdown, &mut streamed).await;
        if result.is_err() {
            metrics.attempt_failed();
        }
        streamed_before |= streamed;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if e.slot_busy() && started.elapsed() < SLOT_BUSY_GRACE => {
                tracing::info!(error = %e, "slot busy; waiting for its previous holder to go away");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                }
            }
            Err(e) if e.is_fatal(!streamed_before) => return Err(e),
            Err(e) => {
                if streamed {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reader attempt failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn run_once(
    cfg: &CdcConfig,
    target: &PgTarget,
    metrics: &Arc<ReaderMetrics>,
    shutdown: &mut watch::Receiver<bool>,
    streamed: &mut bool,
) -> Result<(), ReaderError> {
    let pg = &cfg.postgres;
    let sql = target.connect_sql().await?;
    let slot_state = setup::prepare(&sql, &pg.tables, &pg.publication, &pg.slot).await?;
    // Snapshot reads render values as pgoutput does.
    sql.batch_execute(snapshot::SESSION_SETTINGS).await?;
    // The slot first: from here on Postgres keeps every change for us, even while NATS is
    // unreachable and this attempt fails below.
    let mut session = ReplicationSession::new(target.connect_replication().await?);
    let ident = session.identify_system().await?;
    if slot_state == SlotState::Missing {
        match session.create_slot(&pg.slot).await {
            Ok(at) => {
                tracing::info!(slot = %pg.slot, consistent_point = %at, "created replication slot")
            }
            // Created by a racing reader; START_REPLICATION will sort out who owns it.
            Err(e) if e.code() == Some("42710") => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut sink = StreamSink::connect(&cfg.nats, cfg.ack_timeout()).await?;
    let resume = sink.resume_point().await?;
    let progress = ProgressStore::open(sink.jetstream(), &cfg.nats.stream, cfg.nats.replicas)
        .await
        .map_err(|e| PublishError::Stream {
            stream: cfg.nats.stream.clone(),
            message: e.to_string(),
        })?;
    let control = sink
        .client()
        .subscribe(control_subject(&cfg.nats.subject_prefix))
        .await
        .map_err(|e| PublishError::Stream {
            stream: cfg.nats.stream.clone(),
            message: format!("subscribing to the control subject: {e}"),
        })?;
    let mut waiting = VecDeque::new();
    for t in &pg.tables {
        let Some((schema, table)) = crate::subject::split_table_name(t) else {
            continue;
        };
        let record = progress
            .get(&schema, &table)
            .await
            .map_err(|e| PublishError::Stream {
                stream: cfg.nats.stream.clone(),
                message: e.to_string(),
            })?;
        let wanted = match &record {
            None => cfg.snapshot.initial,
            Some(p) => p.state == "pending" || p.state == "running",
        };
        if wanted {
            waiting.push_back((schema, table));
        }
    }
    // Where this session's stream begins: every transaction it carries commits past the slot's
    // confirmed position (a lower bound for where a snapshot's watch begins).
    let stream_from: Option<String> = sql
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&pg.slot],
        )
        .await?
        .and_then(|r| r.get(0));
    let stream_from = stream_from
        .and_then(|t| t.parse().ok())
        .unwrap_or(Lsn::ZERO);
    let stream = session.start(&pg.slot, &pg.publication, Lsn::ZERO).await?;
    *streamed = true;
    let _streaming = metrics.streaming(sink.client().clone());
    tracing::info!(
        slot = %pg.slot,
        database = %ident.dbname,
        server_wal = %ident.xlog_pos,
        resume = ?resume,
        "streaming"
    );
    let mut pipeline = Pipeline::new(
        cfg,
        target,
        sink,
        Arc::new(sql),
        resume,
        target.dbname().to_string(),
        Arc::clone(metrics),
    );
    pipeline.stream_from = stream_from;
    pipeline.snapshots = Snapshots {
        store: Some(progress),
        reads: None,
        waiting,
        current: None,
        next_chunk_id: u64::try_from(crate::events::now_ms()).unwrap_or(0) * 1000,
    };
    pipeline.run(stream, control, shutdown).await
}

/// One entry of the publish window, in publish order: a publish awaiting its PubAck, or a
/// marker (an LSN that becomes confirmable once everything before it is acknowledged).
struct InFlight {
    ticket: Option<Ticket>,
    confirm: Option<Lsn>,
    /// Snapshot progress to record once everything up to here is acknowledged.
    progress: Option<(String, String, Progress)>,
    acked: bool,
    sent_at: Instant,
}

/// The subject the running reader answers control requests on. Outside `<prefix>.>` on
/// purpose: the stream must not capture (and acknowledge) the requests.
pub fn control_subject(prefix: &str) -> String {
    format!("_CDC_CONTROL.{prefix}.snapshot")
}

/// A snapshot request (`cdc snapshot`, or an agent with a stale view).
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct SnapshotRequest {
    /// `schema.table`.
    pub table: String,
}

/// Snapshot state of one attempt.
#[derive(Default)]
struct Snapshots {
    store: Option<ProgressStore>,
    /// The connection chunks are read on (their transactions span several statements, so
    /// they can't share the pipeline's connection), opened with the first snapshot.
    reads: Option<Arc<tokio_postgres::Client>>,
    waiting: VecDeque<(String, String)>,
    current: Option<CurrentSnapshot>,
    next_chunk_id: u64,
}

struct CurrentSnapshot {
    shape: TableShape,
    progress: Progress,
    chunk_id: u64,
    /// The chunk being read.
    chunk: Option<ChunkTask>,
    /// Its rows once read, until its high watermark arrives in the stream.
    read: Option<ChunkRows>,
    /// Where in commit order the table's watch began ([`CommittedXids::mark`]).
    watch_from: u64,
    started: Instant,
    rows_at_start: u64,
}

type ChunkTask = tokio::task::JoinHandle<Result<ChunkRows, SnapshotError>>;

impl Drop for CurrentSnapshot {
    fn drop(&mut self) {
        // A read of an abandoned snapshot (the attempt failed) must not go on by itself.
        if let Some(task) = &self.chunk {
            task.abort();
        }
    }
}

/// Waits for the current chunk read to finish (forever when none runs).
async fn chunk_finished(
    current: &mut Option<CurrentSnapshot>,
) -> Result<Result<ChunkRows, SnapshotError>, tokio::task::JoinError> {
    match current.as_mut().and_then(|c| c.chunk.as_mut()) {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// A finished chunk read as the reader's result.
fn chunk_outcome(
    done: Result<Result<ChunkRows, SnapshotError>, tokio::task::JoinError>,
) -> Result<ChunkRows, ReaderError> {
    match done {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(SnapshotError::Sql(e))) => Err(e.into()),
        Ok(Err(e)) => Err(ReplicationError::Protocol(format!("snapshot chunk: {e}")).into()),
        Err(e) => Err(ReplicationError::Protocol(format!("snapshot chunk task: {e}")).into()),
    }
}

/// The streaming state of one attempt.
struct Pipeline<'a> {
    cfg: &'a CdcConfig,
    target: &'a PgTarget,
    sink: StreamSink,
    sql: Arc<tokio_postgres::Client>,
    builder: ChangeBuilder,
    resume: ResumePoint,
    in_flight: VecDeque<InFlight>,
    /// The newest publish that asked for its own PubAck.
    last_ack_asked: Option<Ticket>,
    /// Highest LSN whose every change has its PubAck.
    confirmed: Lsn,
    /// What the next status update confirms: `confirmed` as of the previous update. Lagging
    /// one interval means every LSN confirmed to Postgres was acknowledged by NATS at least one
    /// status interval earlier, time enough for the server to have written it out, so a NATS
    /// crash that loses its newest acknowledged messages still finds them in the slot.
    confirm_next: Lsn,
    /// Last LSN sent to Postgres.
    reported: Lsn,
    /// Highest keepalive position seen outside a transaction.
    safe: Lsn,
    /// End of the last transaction seen: every later transaction commits past it.
    last_end: Lsn,
    /// The slot's confirmed position when this session started streaming.
    stream_from: Lsn,
    /// Transactions the stream showed committing that snapshots may still see as running.
    committed: CommittedXids,
    /// A look at the oldest running transaction, to prune `committed`.
    xmin_probe: Option<tokio::task::JoinHandle<Result<String, tokio_postgres::Error>>>,
    /// Highest safe LSN pushed into the window as a marker.
    marked: Lsn,
    /// LSN of the last heartbeat published (initially the resume point's LSN).
    heartbeat_lsn: Lsn,
    /// True once `heartbeat_lsn` may be published again as it is (it is a safe LSN).
    heartbeat_repeatable: bool,
    heartbeat_at: Instant,
    /// Replication messages since the idle timer last fired.
    activity: u64,
    outputs: Vec<Output>,
    published: u64,
    skipped: u64,
    snapshots: Snapshots,
    metrics: Arc<ReaderMetrics>,
}

impl<'a> Pipeline<'a> {
    fn new(
        cfg: &'a CdcConfig,
        target: &'a PgTarget,
        sink: StreamSink,
        sql: Arc<tokio_postgres::Client>,
        resume: ResumePoint,
        db: String,
        metrics: Arc<ReaderMetrics>,
    ) -> Self {
        // A heartbeat must never claim less than the stream already holds: the next start
        // resumes from the last message, and a low heartbeat there would make it re-publish
        // what lies between. So the first heartbeat of this attempt waits for a safe LSN past
        // the resume point (strictly past a commit LSN: that transaction may be partial).
        let (heartbeat_lsn, heartbeat_repeatable) = match &resume {
            ResumePoint::Heartbeat { lsn, .. } => (*lsn, true),
            ResumePoint::Event { commit_lsn, .. } => (*commit_lsn, false),
            ResumePoint::Empty => (Lsn::ZERO, false),
        };
        Pipeline {
            cfg,
            target,
            sink,
            sql,
            builder: ChangeBuilder::new(db, cfg.nats.subject_prefix.clone()),
            resume,
            in_flight: VecDeque::with_capacity(cfg.nats.max_in_flight),
            last_ack_asked: None,
            confirmed: Lsn::ZERO,
            confirm_next: Lsn::ZERO,
            reported: Lsn::ZERO,
            safe: Lsn::ZERO,
            last_end: Lsn::ZERO,
            stream_from: Lsn::ZERO,
            committed: CommittedXids::new(COMMITTED_XIDS_CAP),
            xmin_probe: None,
            marked: Lsn::ZERO,
            heartbeat_lsn,
            heartbeat_repeatable,
            heartbeat_at: Instant::now(),
            activity: 0,
            outputs: Vec::with_capacity(8),
            published: 0,
            skipped: 0,
            snapshots: Snapshots::default(),
            metrics,
        }
    }

    async fn run(
        mut self,
        mut stream: ReplicationStream,
        mut control: async_nats::Subscriber,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ReaderError> {
        let mut snapshot_timer = tokio::time::interval(SNAPSHOT_POLL);
        let tuning = &self.cfg.reader;
        let window = self.cfg.nats.max_in_flight;
        let mut status_timer =
            tokio::time::interval(Duration::from_millis(tuning.status_interval_ms));
        let mut heartbeat_timer = tokio::time::interval(Duration::from_millis(
            tuning.heartbeat_min_interval_ms.max(1),
        ));
        heartbeat_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let idle_every = Duration::from_secs(tuning.idle_message_interval_secs.max(1));
        let mut idle_timer =
            tokio::time::interval_at(tokio::time::Instant::now() + idle_every, idle_every);
        let idle_enabled = tuning.idle_message_interval_secs > 0;
        let mut progress_timer = tokio::time::interval(PROGRESS_INTERVAL);
        loop {
            tokio::select! {
                biased;
                // 1. Shutdown.
                seen = shutdown.wait_for(|s| *s) => {
                    // Release the watch's read guard before draining: held across the drain it
                    // would block a second signal and make this future non-Send.
                    drop(seen);
                    return self.drain_and_finish(stream).await;
                }
                // 2. PubAcks.
                ack = self.sink.next_ack(), if self.awaiting_ack() => {
                    self.on_ack(ack?);
                }
                // 3. Standby status update (and the PubAck deadline).
                _ = status_timer.tick() => {
                    self.check_ack_deadline()?;
                    self.probe_xmin();
                    stream.send_status(self.confirm_next, false).await?;
                    self.reported = self.confirm_next;
                    self.confirm_next = self.confirmed;
                    self.metrics.confirmed(self.confirmed);
                    self.metrics.probe_wal_end(&self.sql);
                }
                // 4. Heartbeat.
                _ = heartbeat_timer.tick() => {
                    self.maybe_heartbeat().await?;
                }
                // 5. Idle database: write a logical message so the slot can advance.
                _ = idle_timer.tick(), if idle_enabled => {
                    if self.activity == 0 {
                        let sql = Arc::clone(&self.sql);
                        tokio::spawn(async move {
                            if let Err(e) = sql
                                .execute("SELECT pg_logical_emit_message(false, 'cdc.idle', '')", &[])
                                .await
                            {
                                tracing::debug!(error = %e, "idle message failed");
                            }
                        });
                    }
                    self.activity = 0;
                }
                // 6a. Control requests (re-snapshot a table).
                Some(request) = control.next() => {
                    self.on_control(request).await;
                }
                // 6b. Start the next table's snapshot when none runs.
                _ = snapshot_timer.tick(), if self.snapshots.current.is_none() && !self.snapshots.waiting.is_empty() => {
                    self.start_next_snapshot().await?;
                }
                // 6c. Progress, for operators and for diagnosing stalls.
                _ = progress_timer.tick() => {
                    tracing::debug!(
                        published = self.published,
                        skipped = self.skipped,
                        in_flight = self.in_flight.len(),
                        confirmed = %self.confirmed,
                        reported = %self.reported,
                        safe = %self.safe,
                        heartbeat = %self.heartbeat_lsn,
                        in_transaction = self.builder.in_transaction(),
                        "progress"
                    );
                }
                // 6d. A chunk read finished: its rows wait for the high watermark; a failure
                // ends the attempt now rather than when the watermark never comes.
                done = chunk_finished(&mut self.snapshots.current), if self.snapshots.current.as_ref().is_some_and(|c| c.chunk.is_some()) => {
                    let rows = chunk_outcome(done)?;
                    if let Some(current) = self.snapshots.current.as_mut() {
                        current.chunk = None;
                        current.read = Some(rows);
                    }
                }
                // 7. The next replication message, while the window has room.
                msg = stream.next_message(), if self.in_flight.len() < window => {
                    let mut next = Some(msg);
                    let mut burst = 0;
                    // Take what is already buffered without going round the loop again (the
                    // other branches are timers and acks: a short burst delays them by
                    // microseconds), then give the other branches their turn.
                    while let Some(msg) = next.take() {
                        match msg? {
                            Some(m) => {
                                self.activity += 1;
                                self.on_replication_message(m, &mut stream).await?;
                            }
                            None => {
                                return Err(ReplicationError::Protocol(
                                    "the server ended the replication stream".into(),
                                )
                                .into())
                            }
                        }
                        burst += 1;
                        if burst < MAX_BURST && self.in_flight.len() < window {
                            next = stream.next_message().now_or_never();
                        }
                    }
                }
            }
        }
    }

    async fn on_replication_message(
        &mut self,
        msg: ReplicationMessage,
        stream: &mut ReplicationStream,
    ) -> Result<(), ReaderError> {
        match msg {
            ReplicationMessage::XLogData {
                wal_start, data, ..
            } => {
                let logical = pgoutput::decode(data).map_err(ReplicationError::from)?;
                if let LogicalMessage::Relation(rel) = &logical {
                    let unknown = self.builder.unknown_types(rel);
                    if !unknown.is_empty() {
                        self.builder.types_mut().load(&self.sql, &unknown).await?;
                    }
                }
                let mut outputs = std::mem::take(&mut self.outputs);
                self.builder.on_message(wal_start, logical, &mut outputs)?;
                for out in outputs.drain(..) {
                    self.on_output(out).await?;
                }
                self.outputs = outputs;
            }
            ReplicationMessage::PrimaryKeepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.metrics.server_wal_end(wal_end);
                // Mid-transaction the walsender's position may already be past the commit
                // being sent; only between transactions does it bound what we have.
                if !self.builder.in_transaction() && wal_end > self.safe {
                    self.safe = wal_end;
                    if wal_end > self.marked {
                        self.marked = wal_end;
                        self.push_marker(wal_end);
                    }
                    self.maybe_heartbeat().await?;
                }
                if self.in_flight.is_empty() {
                    self.metrics.confirmed(self.confirmed);
                    if !self.builder.in_transaction() {
                        self.metrics.caught_up();
                    }
                }
                if reply_requested {
                    stream.send_status(self.reported, false).await?;
                }
            }
        }
        Ok(())
    }

    async fn on_output(&mut self, out: Output) -> Result<(), ReaderError> {
        match out {
            Output::Event(ev) => self.publish_event(ev).await?,
            Output::TxEnd {
                commit_lsn,
                end_lsn,
                events,
                xid,
                commit_ts_ms,
            } => {
                self.metrics
                    .commit_seen(commit_lsn, commit_ts_ms, events > 0);
                if events > 0 {
                    self.committed.record(xid);
                }
                self.last_end = self.last_end.max(end_lsn);
                self.push_marker(end_lsn);
            }
            Output::Message(m) => {
                if m.prefix == snapshot::WATERMARK_PREFIX {
                    self.on_watermark(&m.content, m.lsn).await?;
                } else if !m.prefix.starts_with(MESSAGE_PREFIX) {
                    tracing::trace!(prefix = %m.prefix, "ignoring logical message");
                }
            }
        }
        Ok(())
    }

    async fn publish_event(&mut self, ev: EncodedEvent) -> Result<(), ReaderError> {
        if self.resume.covers(ev.commit_lsn, ev.ordinal) {
            self.skipped += 1;
            return Ok(());
        }
        let msg = Outgoing {
            subject: ev.subject,
            msg_id: msg_id(ev.commit_lsn, ev.ordinal),
            event: Some(EventHeaders {
                op: ev.op.code(),
                table: ev.table,
                commit_lsn: ev.commit_lsn,
            }),
            body: ev.body.into(),
            want_ack: ev.last,
        };
        let (op, body_len) = (ev.op, msg.body.len());
        let sent = self.sink.publish(msg).await?;
        self.metrics.event_published(op, body_len);
        self.published += 1;
        self.push_publish(sent, None);
        Ok(())
    }

    /// Publishes a heartbeat if the safe LSN moved (at most one per min interval) or the
    /// interval passed; never in the middle of a transaction.
    async fn maybe_heartbeat(&mut self) -> Result<(), ReaderError> {
        if self.builder.in_transaction() {
            return Ok(());
        }
        let tuning = &self.cfg.reader;
        let since = self.heartbeat_at.elapsed();
        let moved = self.safe > self.heartbeat_lsn
            && since >= Duration::from_millis(tuning.heartbeat_min_interval_ms);
        let due = self.heartbeat_repeatable
            && since >= Duration::from_millis(tuning.heartbeat_interval_ms);
        if !(moved || due) {
            return Ok(());
        }
        let lsn = self.safe.max(self.heartbeat_lsn);
        let sent = self.sink.publish_heartbeat(lsn).await?;
        self.metrics.heartbeat_published();
        self.heartbeat_lsn = lsn;
        self.heartbeat_repeatable = true;
        self.heartbeat_at = Instant::now();
        self.push_publish(sent, Some(lsn));
        Ok(())
    }

    /// Records a publish (its ticket, and whether its own PubAck was asked for).
    fn push_publish(&mut self, (ticket, acked_later): (Ticket, bool), confirm: Option<Lsn>) {
        if acked_later {
            self.last_ack_asked = Some(ticket);
        }
        self.in_flight.push_back(InFlight {
            ticket: Some(ticket),
            confirm,
            progress: None,
            acked: false,
            sent_at: Instant::now(),
        });
    }

    fn push_marker(&mut self, lsn: Lsn) {
        self.in_flight.push_back(InFlight {
            ticket: None,
            confirm: Some(lsn),
            progress: None,
            acked: true,
            sent_at: Instant::now(),
        });
        self.pop_acked();
    }

    /// Marks `ticket` and every earlier publish acknowledged (the no-gap chain: the server
    /// stored `ticket` only after all of them) and moves past the acknowledged front.
    fn on_ack(&mut self, ticket: Ticket) {
        let mut oldest = None;
        for entry in self.in_flight.iter_mut() {
            match entry.ticket {
                Some(t) if t > ticket => break,
                Some(_) if !entry.acked => {
                    entry.acked = true;
                    oldest.get_or_insert(entry.sent_at);
                }
                _ => entry.acked = true,
            }
        }
        // One sample per PubAck: the latency of the oldest publish it acknowledges (the
        // longest wait among those it covers).
        if let Some(sent_at) = oldest {
            self.metrics.acked(sent_at.elapsed());
        }
        self.pop_acked();
    }

    /// True while a publish whose PubAck was asked for (and so covers everything before it)
    /// is outstanding. Publishes after the last such one are acknowledged by a later one.
    fn awaiting_ack(&self) -> bool {
        let Some(last) = self.last_ack_asked else {
            return false;
        };
        self.in_flight
            .iter()
            .find(|e| !e.acked)
            .and_then(|e| e.ticket)
            .is_some_and(|t| t <= last)
    }

    fn pop_acked(&mut self) {
        while self.in_flight.front().is_some_and(|e| e.acked) {
            let Some(entry) = self.in_flight.pop_front() else {
                break;
            };
            if let Some(lsn) = entry.confirm {
                self.confirmed = self.confirmed.max(lsn);
            }
            let Some((schema, table, progress)) = entry.progress else {
                continue;
            };
            if let Some(store) = self.snapshots.store.clone() {
                // Durable in the stream: record it. Losing this write only repeats a chunk.
                tokio::spawn(async move {
                    if let Err(e) = store.put(&schema, &table, &progress).await {
                        tracing::warn!(error = %e, table = %table, "recording snapshot progress failed");
                    }
                });
            }
        }
    }

    fn push_progress(&mut self, schema: &str, table: &str, progress: Progress) {
        self.in_flight.push_back(InFlight {
            ticket: None,
            confirm: None,
            progress: Some((schema.to_string(), table.to_string(), progress)),
            acked: true,
            sent_at: Instant::now(),
        });
        self.pop_acked();
    }

    async fn on_control(&mut self, request: async_nats::Message) {
        let answer = match serde_json::from_slice::<SnapshotRequest>(&request.payload) {
            Err(e) => {
                serde_json::json!({"error": format!("bad request: {e}; send {{\"table\": \"schema.table\"}}")})
            }
            Ok(req) => match self.request_snapshot(&req.table).await {
                Ok(()) => serde_json::json!({"ok": true, "table": req.table}),
                Err(message) => serde_json::json!({"error": message}),
            },
        };
        if let Some(reply) = request.reply {
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = self.sink.client().publish(reply, body.into()).await {
                tracing::warn!(error = %e, "answering a control request failed");
            }
        }
    }

    /// Queues a (re-)snapshot of `name` (`schema.table`, one of the published tables).
    async fn request_snapshot(&mut self, name: &str) -> Result<(), String> {
        let (schema, table) = crate::subject::split_table_name(name)
            .ok_or_else(|| format!("{name:?} is not schema.table"))?;
        let published = self.cfg.postgres.tables.iter().any(|t| {
            crate::subject::split_table_name(t).as_ref() == Some(&(schema.clone(), table.clone()))
        });
        if !published {
            return Err(format!(
                "{name} is not one of the published tables (postgres.tables)"
            ));
        }
        let running = self
            .snapshots
            .current
            .as_ref()
            .is_some_and(|c| c.shape.schema == schema && c.shape.table == table);
        if running
            || self
                .snapshots
                .waiting
                .contains(&(schema.clone(), table.clone()))
        {
            return Ok(());
        }
        if let Some(store) = &self.snapshots.store {
            let progress = Progress {
                state: "pending".into(),
                requested_ms: crate::events::now_ms(),
                ..Default::default()
            };
            store
                .put(&schema, &table, &progress)
                .await
                .map_err(|e| e.to_string())?;
            self.metrics
                .snapshot_progress(&format!("{schema}.{table}"), &progress, None);
        }
        tracing::info!(table = %name, "snapshot requested");
        self.snapshots.waiting.push_back((schema, table));
        Ok(())
    }

    async fn start_next_snapshot(&mut self) -> Result<(), ReaderError> {
        let Some((schema, table)) = self.snapshots.waiting.pop_front() else {
            return Ok(());
        };
        let Some(store) = self.snapshots.store.clone() else {
            return Ok(());
        };
        let name = format!("{schema}.{table}");
        let shape = match TableShape::load(&self.sql, &schema, &table).await {
            Ok(shape) => shape,
            Err(SnapshotError::Sql(e)) => return Err(e.into()),
            Err(e) => {
                tracing::error!(error = %e, "snapshot refused");
                let failed = Progress {
                    state: format!("failed: {e}"),
                    ..Default::default()
                };
                let _ = store.put(&schema, &table, &failed).await;
                self.metrics.snapshot_progress(&name, &failed, None);
                return Ok(());
            }
        };
        let mut progress = store
            .get(&schema, &table)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        if progress.state != "running" {
            progress = Progress {
                state: "running".into(),
                requested_ms: progress.requested_ms,
                ..Default::default()
            };
        }
        if progress.estimate == 0 {
            let estimate: i64 = self
                .sql
                .query_one(
                    "SELECT GREATEST(reltuples, 0)::bigint FROM pg_class WHERE oid = $1::text::regclass",
                    &[&crate::subject::quote_table(&schema, &table)],
                )
                .await?
                .get(0);
            progress.estimate = u64::try_from(estimate).unwrap_or(0);
        }
        // Changes to the table are watched from here on; any transaction that commits later
        // commits past this position, so rows written before it and not confirmed by the
        // snapshot are the ones the snapshot end may remove.
        if progress.start_lsn.is_none() {
            progress.start_lsn = Some(self.safe.max(self.last_end).max(self.stream_from));
        }
        let unknown = self
            .builder
            .types()
            .unknown(shape.columns.iter().map(|(_, oid)| *oid));
        self.builder.types_mut().load(&self.sql, &unknown).await?;
        if self.snapshots.reads.is_none() {
            let reads = self.target.connect_sql().await?;
            reads.batch_execute(snapshot::SESSION_SETTINGS).await?;
            self.snapshots.reads = Some(Arc::new(reads));
        }
        let keys = shape.key.iter().map(|(k, _)| k.clone()).collect();
        self.builder.start_watch(&schema, &table, keys);
        tracing::info!(table = %name, resume_after = ?progress.last_key, estimate = progress.estimate, "snapshot starting");
        self.metrics.snapshot_progress(&name, &progress, None);
        let rows_at_start = progress.rows;
        self.snapshots.current = Some(CurrentSnapshot {
            shape,
            progress,
            chunk_id: 0,
            chunk: None,
            read: None,
            watch_from: self.committed.mark(),
            started: Instant::now(),
            rows_at_start,
        });
        self.next_chunk(Vec::new());
        Ok(())
    }

    /// Starts reading the current table's next chunk (low watermark, read, high watermark),
    /// once the transactions `wait_visible` are visible.
    fn next_chunk(&mut self, wait_visible: Vec<u32>) {
        self.snapshots.next_chunk_id += 1;
        let (Some(current), Some(sql)) = (
            self.snapshots.current.as_mut(),
            self.snapshots.reads.clone(),
        ) else {
            return;
        };
        let request = ChunkRequest {
            id: self.snapshots.next_chunk_id,
            after: current.progress.last_key.clone(),
            limit: self.cfg.snapshot.chunk_rows,
            wait_visible,
        };
        let shape = current.shape.clone();
        current.chunk_id = request.id;
        current.read = None;
        current.chunk = Some(tokio::spawn(async move {
            snapshot::read_chunk(&sql, &shape, &request).await
        }));
    }

    /// Prunes the committed transaction ids by the oldest running transaction: takes the
    /// result of the previous look, starts the next.
    fn probe_xmin(&mut self) {
        if self.xmin_probe.as_ref().is_some_and(|p| p.is_finished()) {
            if let Some(Ok(Ok(text))) = self.xmin_probe.take().and_then(|p| p.now_or_never()) {
                if let Some(snapshot) = SnapshotXids::parse(&text) {
                    self.committed.forget_before(&snapshot);
                }
            }
        }
        if self.xmin_probe.is_none() && !self.committed.is_empty() {
            let sql = Arc::clone(&self.sql);
            self.xmin_probe = Some(tokio::spawn(async move {
                let row = sql
                    .query_one("SELECT pg_current_snapshot()::text", &[])
                    .await?;
                Ok(row.get(0))
            }));
        }
    }

    async fn on_watermark(&mut self, content: &[u8], lsn: Lsn) -> Result<(), ReaderError> {
        let text = String::from_utf8_lossy(content);
        let Some((kind, id)) = text.split_once(':') else {
            return Ok(());
        };
        let id: u64 = id.parse().unwrap_or(0);
        let Some(current) = self.snapshots.current.as_ref() else {
            return Ok(());
        };
        if current.chunk_id != id {
            // A watermark of a chunk this attempt did not start (e.g. before a restart).
            return Ok(());
        }
        // The low watermark only marks where the chunk's read began in the WAL; which
        // changes race the read is decided by its snapshot (see the module docs of
        // `snapshot`), over everything watched since the previous high watermark.
        if kind == "high" {
            self.finish_chunk(lsn).await?;
        }
        Ok(())
    }

    /// At the high watermark: publish the chunk's rows that no change raced, record progress,
    /// start the next chunk (or end the table's snapshot).
    async fn finish_chunk(&mut self, high: Lsn) -> Result<(), ReaderError> {
        let watched = self.builder.take_watched();
        let at = self.builder.current_commit_lsn().unwrap_or(high);
        let Some(current) = self.snapshots.current.as_mut() else {
            return Ok(());
        };
        let rows = match (current.read.take(), current.chunk.take()) {
            (Some(rows), _) => rows,
            (None, Some(task)) => match tokio::time::timeout(CHUNK_WAIT, task).await {
                Ok(done) => chunk_outcome(done)?,
                Err(_) => {
                    return Err(ReplicationError::Protocol(
                        "snapshot chunk read did not finish after its high watermark arrived"
                            .into(),
                    )
                    .into())
                }
            },
            (None, None) => return Ok(()),
        };
        let shape = current.shape.clone();
        let table_name = format!("{}.{}", shape.schema, shape.table);
        self.committed.forget_before(&rows.snapshot);
        let unseen = self
            .committed
            .invisible_before(&rows.snapshot, current.watch_from);
        if !unseen.is_empty() {
            // Committed before the watch began, so their keys are unknown, and not visible to
            // the read: read the chunk again once they are.
            tracing::info!(table = %table_name, transactions = ?unseen, "snapshot chunk to be read again: committed transactions were not visible to its read");
            self.builder.restore_watched(watched);
            self.next_chunk(unseen);
            return Ok(());
        }
        if rows.is_empty() {
            // The table is done: close it.
            self.builder.stop_watch();
            let start = current.progress.start_lsn.unwrap_or(at);
            let end = snapshot::encode_end(
                self.builder.db(),
                &self.cfg.nats.subject_prefix,
                &shape,
                start,
                at,
            );
            let mut progress = current.progress.clone();
            progress.state = "done".into();
            let elapsed = current.started.elapsed().as_secs_f64().max(0.001);
            let rate = (progress.rows - current.rows_at_start) as f64 / elapsed;
            tracing::info!(table = %table_name, rows = progress.rows, rows_per_sec = rate as u64, "snapshot done");
            self.metrics
                .snapshot_progress(&table_name, &progress, Some(rate));
            self.snapshots.current = None;
            self.publish_event(end).await?;
            self.push_progress(&shape.schema, &shape.table, progress);
            return Ok(());
        }
        let last_key = rows.key(rows.len() - 1, &shape.key_index);
        let race = watched.races(&rows.snapshot);
        let kept: Vec<usize> = if race.truncated {
            Vec::new()
        } else if race.keys.is_empty() {
            (0..rows.len()).collect()
        } else {
            (0..rows.len())
                .filter(|&r| !race.keys.contains(&rows.key(r, &shape.key_index)))
                .collect()
        };
        let events = snapshot::encode_rows(
            self.builder.db(),
            &self.cfg.nats.subject_prefix,
            &shape,
            self.builder.types(),
            &rows,
            &kept,
            at,
        );
        let published = events.len() as u64;
        for ev in events {
            self.publish_event(ev).await?;
        }
        let Some(current) = self.snapshots.current.as_mut() else {
            return Ok(());
        };
        current.progress.last_key = Some(last_key);
        current.progress.rows += published;
        let progress = current.progress.clone();
        let elapsed = current.started.elapsed().as_secs_f64().max(0.001);
        let rate = (progress.rows - current.rows_at_start) as f64 / elapsed;
        tracing::info!(
            table = %table_name,
            rows = progress.rows,
            estimate = progress.estimate,
            rows_per_sec = rate as u64,
            "snapshot progress"
        );
        self.metrics
            .snapshot_progress(&table_name, &progress, Some(rate));
        self.push_progress(&shape.schema, &shape.table, progress);
        self.next_chunk(Vec::new());
        Ok(())
    }

    /// Fails the attempt when the oldest publish has waited longer than the PubAck timeout.
    fn check_ack_deadline(&self) -> Result<(), ReaderError> {
        let timeout = self.cfg.ack_timeout();
        // Only publishes an asked-for PubAck will cover: the ones after the last such wait,
        // without a deadline, for the next (their transaction has not ended yet).
        let Some(last) = self.last_ack_asked else {
            return Ok(());
        };
        match self.in_flight.iter().find(|e| !e.acked) {
            Some(oldest)
                if oldest.ticket.is_some_and(|t| t <= last)
                    && oldest.sent_at.elapsed() > timeout =>
            {
                Err(PublishError::Publish {
                    subject: self.cfg.nats.stream.clone(),
                    message: format!(
                        "no PubAck within {timeout:?} (NATS unreachable or overloaded)"
                    ),
                }
                .into())
            }
            _ => Ok(()),
        }
    }

    async fn drain_and_finish(mut self, stream: ReplicationStream) -> Result<(), ReaderError> {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while self.awaiting_ack() {
            match tokio::time::timeout_at(deadline, self.sink.next_ack()).await {
                Ok(Ok(ticket)) => self.on_ack(ticket),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "publish failed while draining; the rest will be re-sent on restart");
                    break;
                }
                Err(_) => {
                    tracing::warn!(
                        "PubAcks still missing at shutdown; the rest will be re-sent on restart"
                    );
                    break;
                }
            }
        }
        tracing::info!(confirmed = %self.confirmed, published = self.published, skipped = self.skipped, "stopping: confirming last acknowledged position");
        stream.finish(self.confirmed).await?;
        Ok(())
    }
}
