//! The reader's Prometheus metrics and readiness, served by [`crate::observe`] on
//! `[metrics] listen`.
//!
//! Every name is a constant here and listed in the README ("Operations"). The hot path only
//! touches atomics: one relaxed add per published event (count and bytes, by operation, into
//! counters resolved once at start), one histogram observation per PubAck, one store per
//! transaction. Lag is computed when scraped.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::envelope::Op;
use crate::lsn::Lsn;
use crate::observe::{Health, HealthSource};
use crate::snapshot::Progress;

/// Counter (`_total`), label `op`: change events published (acknowledged or not).
pub const EVENTS_PUBLISHED: &str = "cdc_reader_events_published";
/// Counter (`_total`), label `op`: bytes of the events' JSON bodies published.
pub const EVENT_BYTES_PUBLISHED: &str = "cdc_reader_event_bytes_published";
/// Counter (`_total`): heartbeats published.
pub const HEARTBEATS_PUBLISHED: &str = "cdc_reader_heartbeats_published";
/// Histogram: publish → PubAck, seconds (events and heartbeats).
pub const PUBLISH_LATENCY: &str = "cdc_reader_publish_latency_seconds";
/// Gauge: the server's end of WAL (last keepalive or `pg_current_wal_lsn()` probe) minus the
/// confirmed position, bytes.
pub const REPLICATION_LAG_BYTES: &str = "cdc_reader_replication_lag_bytes";
/// Gauge: now minus the commit time of the last published transaction, seconds, as of its
/// publication; 0 once a keepalive shows the reader has everything and nothing is in flight.
pub const REPLICATION_LAG_SECONDS: &str = "cdc_reader_replication_lag_seconds";
/// Gauge: the server's end of WAL as last seen, as a number (the LSN's 64 bits).
pub const SERVER_WAL_END_LSN: &str = "cdc_reader_server_wal_end_lsn";
/// Gauge: the highest LSN whose every change has its PubAck, as a number.
pub const CONFIRMED_LSN: &str = "cdc_reader_confirmed_lsn";
/// Gauge: commit LSN of the last transaction seen in the replication stream, as a number.
pub const LAST_COMMIT_LSN: &str = "cdc_reader_last_commit_lsn";
/// Gauge: commit time of the last transaction seen, seconds since the Unix epoch.
pub const LAST_COMMIT_TIMESTAMP: &str = "cdc_reader_last_commit_timestamp_seconds";
/// Counter (`_total`): replication sessions started (more than one: the reader reconnected).
pub const SESSIONS_STARTED: &str = "cdc_reader_sessions_started";
/// Counter (`_total`): attempts that failed and were retried.
pub const ATTEMPT_FAILURES: &str = "cdc_reader_attempt_failures";
/// Gauge: 1 while a replication session streams, else 0.
pub const STREAMING: &str = "cdc_reader_streaming";
/// Gauge, label `table`: rows a table's current (or last) snapshot has published.
pub const SNAPSHOT_ROWS: &str = "cdc_snapshot_rows";
/// Gauge, label `table`: the table's estimated row count when its snapshot started.
pub const SNAPSHOT_ROWS_ESTIMATE: &str = "cdc_snapshot_rows_estimate";
/// Gauge, label `table`: rows per second of the table's snapshot in this process.
pub const SNAPSHOT_ROWS_PER_SECOND: &str = "cdc_snapshot_rows_per_second";
/// Gauge, labels `table`, `state` (`pending`, `running`, `done`, `failed`): 1 for the table's
/// current state, 0 for the others.
pub const SNAPSHOT_STATE: &str = "cdc_snapshot_state";

/// Snapshot states exposed in [`SNAPSHOT_STATE`].
const SNAPSHOT_STATES: [&str; 4] = ["pending", "running", "done", "failed"];
/// Operations with their own series, in [`op_index`] order.
const OPS: [Op; 6] = [
    Op::Create,
    Op::Update,
    Op::Delete,
    Op::Read,
    Op::Truncate,
    Op::SnapshotEnd,
];

type Labels = Vec<(&'static str, String)>;

/// The reader's metrics and health, shared by its tasks and the metrics endpoint.
#[derive(Debug)]
pub struct ReaderMetrics {
    events: [Counter; 6],
    bytes: [Counter; 6],
    heartbeats: Counter,
    publish_latency: Histogram,
    sessions: Counter,
    failures: Counter,
    last_commit_lsn: Gauge,
    last_commit_ts_ms: AtomicI64,
    snapshot_rows: Family<Labels, Gauge>,
    snapshot_estimate: Family<Labels, Gauge>,
    snapshot_rate: Family<Labels, Gauge<f64, AtomicU64>>,
    snapshot_state: Family<Labels, Gauge>,
    live: Arc<LiveState>,
}

/// What the scrape computes from (lag) and what readiness looks at.
#[derive(Debug, Default)]
struct LiveState {
    server_wal_end: AtomicU64,
    confirmed: AtomicU64,
    lag_ms: AtomicI64,
    streaming: AtomicBool,
    wal_probe_busy: AtomicBool,
    nats: Mutex<Option<async_nats::Client>>,
}

impl Collector for LiveState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let end = self.server_wal_end.load(Ordering::Relaxed);
        let confirmed = self.confirmed.load(Ordering::Relaxed);
        let gauges: [(&str, &str, f64); 5] = [
            (
                REPLICATION_LAG_BYTES,
                "WAL on the server not yet confirmed by the reader (server end of WAL minus confirmed LSN)",
                end.saturating_sub(confirmed) as f64,
            ),
            (
                REPLICATION_LAG_SECONDS,
                "Now minus the commit time of the last published transaction, as of its publication (0 when caught up)",
                self.lag_ms.load(Ordering::Relaxed).max(0) as f64 / 1000.0,
            ),
            (
                SERVER_WAL_END_LSN,
                "The server's end of WAL as last seen, as a number",
                end as f64,
            ),
            (
                CONFIRMED_LSN,
                "Highest LSN whose every change has its PubAck, as a number",
                confirmed as f64,
            ),
            (
                STREAMING,
                "1 while a replication session streams",
                if self.streaming.load(Ordering::Relaxed) {
                    1.0
                } else {
                    0.0
                },
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// Index of `op` in the per-operation counters.
fn op_index(op: Op) -> usize {
    match op {
        Op::Create => 0,
        Op::Update => 1,
        Op::Delete => 2,
        Op::Read => 3,
        Op::Truncate => 4,
        Op::SnapshotEnd => 5,
    }
}

/// An LSN as a gauge value.
fn lsn_value(lsn: Lsn) -> i64 {
    i64::try_from(lsn.0).unwrap_or(i64::MAX)
}

impl ReaderMetrics {
    /// New metrics, registered in a fresh registry (returned for the endpoint).
    pub fn new() -> (Arc<ReaderMetrics>, Registry) {
        let mut registry = Registry::default();
        let events_family: Family<Labels, Counter> = Family::default();
        let bytes_family: Family<Labels, Counter> = Family::default();
        let by_op = |family: &Family<Labels, Counter>| {
            OPS.map(|op| family.get_or_create_owned(&vec![("op", op.code().to_string())]))
        };
        let events = by_op(&events_family);
        let bytes = by_op(&bytes_family);
        registry.register(
            EVENTS_PUBLISHED,
            "Change events published, by operation",
            events_family,
        );
        registry.register(
            EVENT_BYTES_PUBLISHED,
            "Bytes of change event bodies published, by operation",
            bytes_family,
        );
        let heartbeats = Counter::default();
        registry.register(
            HEARTBEATS_PUBLISHED,
            "Heartbeats published",
            heartbeats.clone(),
        );
        // 100 µs to ~6.5 s.
        let publish_latency = Histogram::new(crate::observe::seconds_buckets(0.0001, 2.0, 17));
        registry.register(
            PUBLISH_LATENCY,
            "Publish to PubAck, seconds",
            publish_latency.clone(),
        );
        let sessions = Counter::default();
        registry.register(
            SESSIONS_STARTED,
            "Replication sessions started (more than one: the reader reconnected)",
            sessions.clone(),
        );
        let failures = Counter::default();
        registry.register(
            ATTEMPT_FAILURES,
            "Reader attempts that failed and were retried",
            failures.clone(),
        );
        let last_commit_lsn = Gauge::default();
        registry.register(
            LAST_COMMIT_LSN,
            "Commit LSN of the last transaction seen, as a number",
            last_commit_lsn.clone(),
        );
        let snapshot_rows = Family::<Labels, Gauge>::default();
        registry.register(
            SNAPSHOT_ROWS,
            "Rows the table's snapshot has published",
            snapshot_rows.clone(),
        );
        let snapshot_estimate = Family::<Labels, Gauge>::default();
        registry.register(
            SNAPSHOT_ROWS_ESTIMATE,
            "Estimated rows of the table when its snapshot started",
            snapshot_estimate.clone(),
        );
        let snapshot_rate = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            SNAPSHOT_ROWS_PER_SECOND,
            "Rows per second of the table's snapshot",
            snapshot_rate.clone(),
        );
        let snapshot_state = Family::<Labels, Gauge>::default();
        registry.register(
            SNAPSHOT_STATE,
            "1 for the table's current snapshot state",
            snapshot_state.clone(),
        );
        let live = Arc::new(LiveState::default());
        registry.register_collector(Box::new(Arc::clone(&live)));
        let metrics = Arc::new(ReaderMetrics {
            events,
            bytes,
            heartbeats,
            publish_latency,
            sessions,
            failures,
            last_commit_lsn,
            last_commit_ts_ms: AtomicI64::new(0),
            snapshot_rows,
            snapshot_estimate,
            snapshot_rate,
            snapshot_state,
            live,
        });
        registry.register_collector(Box::new(CommitTime(Arc::clone(&metrics))));
        (metrics, registry)
    }

    /// One change event handed to NATS.
    #[inline]
    pub fn event_published(&self, op: Op, body_len: usize) {
        let i = op_index(op);
        self.events[i].inc();
        self.bytes[i].inc_by(body_len as u64);
    }

    /// One heartbeat handed to NATS.
    pub fn heartbeat_published(&self) {
        self.heartbeats.inc();
    }

    /// A PubAck arrived `latency` after its publish.
    #[inline]
    pub fn acked(&self, latency: Duration) {
        self.publish_latency.observe(latency.as_secs_f64());
    }

    /// A transaction committed at `commit_lsn`, at `commit_ts_ms`, was seen; `published` when
    /// it produced events (then the lag is measured from it).
    #[inline]
    pub fn commit_seen(&self, commit_lsn: Lsn, commit_ts_ms: i64, published: bool) {
        self.last_commit_lsn.set(lsn_value(commit_lsn));
        self.last_commit_ts_ms
            .store(commit_ts_ms, Ordering::Relaxed);
        if published {
            let lag = crate::events::now_ms() - commit_ts_ms;
            self.live.lag_ms.store(lag, Ordering::Relaxed);
        }
    }

    /// The server reported its end of WAL (a keepalive or a probe).
    #[inline]
    pub fn server_wal_end(&self, lsn: Lsn) {
        self.live.server_wal_end.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// Everything at or below `lsn` has its PubAck.
    #[inline]
    pub fn confirmed(&self, lsn: Lsn) {
        self.live.confirmed.store(lsn.0, Ordering::Relaxed);
    }

    /// The walsender sent everything and nothing is in flight: no lag.
    pub fn caught_up(&self) {
        self.live.lag_ms.store(0, Ordering::Relaxed);
    }

    /// Starts a look at `pg_current_wal_lsn()` (unless one is running) so that the lag in bytes
    /// is current while the walsender is too busy to send keepalives.
    pub fn probe_wal_end(self: &Arc<Self>, sql: &Arc<tokio_postgres::Client>) {
        if self.live.wal_probe_busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let (metrics, sql) = (Arc::clone(self), Arc::clone(sql));
        tokio::spawn(async move {
            if let Ok(row) = sql
                .query_one("SELECT pg_current_wal_lsn()::text", &[])
                .await
            {
                if let Some(lsn) = row.get::<_, Option<String>>(0).and_then(|t| t.parse().ok()) {
                    metrics.server_wal_end(lsn);
                }
            }
            metrics.live.wal_probe_busy.store(false, Ordering::Release);
        });
    }

    /// An attempt failed and will be retried.
    pub fn attempt_failed(&self) {
        self.failures.inc();
    }

    /// A replication session streams, on `nats`, until the guard is dropped.
    pub fn streaming(&self, nats: async_nats::Client) -> StreamingGuard {
        self.sessions.inc();
        if let Ok(mut slot) = self.live.nats.lock() {
            *slot = Some(nats);
        }
        self.live.streaming.store(true, Ordering::Relaxed);
        StreamingGuard {
            live: Arc::clone(&self.live),
        }
    }

    /// Records a table's snapshot progress (`rows_per_sec` of this process, if known).
    pub fn snapshot_progress(&self, table: &str, progress: &Progress, rows_per_sec: Option<f64>) {
        let labels: Labels = vec![("table", table.to_string())];
        self.snapshot_rows
            .get_or_create(&labels)
            .set(i64::try_from(progress.rows).unwrap_or(i64::MAX));
        self.snapshot_estimate
            .get_or_create(&labels)
            .set(i64::try_from(progress.estimate).unwrap_or(i64::MAX));
        if let Some(rate) = rows_per_sec {
            self.snapshot_rate.get_or_create(&labels).set(rate);
        }
        let current = progress
            .state
            .split(':')
            .next()
            .unwrap_or(progress.state.as_str());
        for state in SNAPSHOT_STATES {
            let labels: Labels = vec![("table", table.to_string()), ("state", state.to_string())];
            self.snapshot_state
                .get_or_create(&labels)
                .set(i64::from(state == current));
        }
    }

    /// Liveness and readiness: ready while a replication session streams and NATS is connected.
    pub fn health(&self) -> Health {
        let streaming = self.live.streaming.load(Ordering::Relaxed);
        let nats = self
            .live
            .nats
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c.connection_state()));
        let connected = nats == Some(async_nats::connection::State::Connected);
        let detail = match (streaming, connected) {
            (true, true) => "streaming".to_string(),
            (false, _) => "not streaming: no replication session (connecting or retrying)".into(),
            (true, false) => "not streaming: NATS is disconnected".into(),
        };
        Health {
            live: true,
            ready: streaming && connected,
            detail,
        }
    }
}

/// Serves `metrics` readiness to the endpoint.
impl HealthSource for ReaderMetrics {
    fn health(&self) -> Health {
        ReaderMetrics::health(self)
    }
}

/// Marks the end of a replication session when dropped.
#[derive(Debug)]
pub struct StreamingGuard {
    live: Arc<LiveState>,
}

impl Drop for StreamingGuard {
    fn drop(&mut self) {
        self.live.streaming.store(false, Ordering::Relaxed);
        if let Ok(mut slot) = self.live.nats.lock() {
            *slot = None;
        }
    }
}

/// Encodes the last commit time as seconds (kept in ms on the hot path).
#[derive(Debug)]
struct CommitTime(Arc<ReaderMetrics>);

impl Collector for CommitTime {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ms = self.0.last_commit_ts_ms.load(Ordering::Relaxed);
        let gauge = ConstGauge::new(ms as f64 / 1000.0);
        let metric = encoder.encode_descriptor(
            LAST_COMMIT_TIMESTAMP,
            "Commit time of the last transaction seen, seconds since the Unix epoch",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_documented_name() {
        let (m, registry) = ReaderMetrics::new();
        m.event_published(Op::Create, 100);
        m.event_published(Op::Create, 50);
        m.heartbeat_published();
        m.acked(Duration::from_millis(3));
        m.server_wal_end(Lsn(5000));
        m.confirmed(Lsn(4000));
        m.commit_seen(Lsn(3900), crate::events::now_ms() - 2000, true);
        m.snapshot_progress(
            "public.t",
            &Progress {
                state: "running".into(),
                rows: 10,
                estimate: 20,
                ..Default::default()
            },
            Some(5.0),
        );
        let text = crate::observe::render(&registry);
        for needle in [
            "cdc_reader_events_published_total{op=\"c\"} 2",
            "cdc_reader_event_bytes_published_total{op=\"c\"} 150",
            "cdc_reader_events_published_total{op=\"d\"} 0",
            "cdc_reader_heartbeats_published_total 1",
            "cdc_reader_publish_latency_seconds_count 1",
            "cdc_reader_replication_lag_bytes 1000",
            "cdc_reader_confirmed_lsn 4000",
            "cdc_reader_last_commit_lsn 3900",
            "cdc_reader_last_commit_timestamp_seconds ",
            "cdc_reader_streaming 0",
            "cdc_reader_sessions_started_total 0",
            "cdc_reader_attempt_failures_total 0",
            "cdc_snapshot_rows{table=\"public.t\"} 10",
            "cdc_snapshot_rows_estimate{table=\"public.t\"} 20",
            "cdc_snapshot_rows_per_second{table=\"public.t\"} 5",
            "cdc_snapshot_state{table=\"public.t\",state=\"running\"} 1",
            "cdc_snapshot_state{table=\"public.t\",state=\"done\"} 0",
        ] {
            assert!(text.contains(needle), "{needle:?} missing:\n{text}");
        }
        let lag = text
            .lines()
            .find_map(|l| l.strip_prefix("cdc_reader_replication_lag_seconds "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("lag seconds");
        assert!((1.9..10.0).contains(&lag), "{lag}");
        m.caught_up();
        assert!(crate::observe::render(&registry).contains("cdc_reader_replication_lag_seconds 0"));
        assert!(!m.health().ready);
    }
}
