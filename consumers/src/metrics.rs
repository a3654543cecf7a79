//! The agent's metrics (Prometheus text on `[metrics] listen`, served by `cdc::observe`) and
//! its health for `/healthz` and `/readyz`.
//!
//! The hot paths only touch atomics: the applier adds one observation per sled batch (not per
//! event), a query adds one counter increment and one histogram observation, both lock-free
//! ([`AtomicHistogram`]). Gauges (position, lag, stale views) are read from the store when
//! scraped ([`AgentCollector`]), so they cost nothing between scrapes.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use cdc::observe::prometheus_client::collector::Collector;
use cdc::observe::prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use cdc::observe::prometheus_client::metrics::counter::ConstCounter;
use cdc::observe::prometheus_client::metrics::gauge::ConstGauge;
use cdc::observe::prometheus_client::metrics::MetricType;
use cdc::observe::prometheus_client::registry::Registry;
use cdc::observe::Health;

use crate::store::ViewStore;

/// Metric names, in one place (documented in consumers/README.md).
pub mod names {
    /// Gauge: stream sequence of the last applied message (event or heartbeat).
    pub const APPLIED_SEQ: &str = "view_agent_applied_seq";
    /// Gauge: commit LSN of the last applied source transaction, as a number.
    pub const APPLIED_LSN: &str = "view_agent_applied_lsn";
    /// Gauge: read-your-writes watermark LSN (events and heartbeats), as a number.
    pub const WATERMARK_LSN: &str = "view_agent_watermark_lsn";
    /// Gauge: last sequence of the stream, as last seen (refreshed every second).
    pub const STREAM_LAST_SEQ: &str = "view_agent_stream_last_seq";
    /// Gauge: stream messages not applied yet (stream last seq - applied seq).
    pub const LAG_MESSAGES: &str = "view_agent_lag_messages";
    /// Gauge: seconds between the source commit of the last applied event and now; 0 when
    /// nothing in the stream is waiting.
    pub const LAG_SECONDS: &str = "view_agent_lag_seconds";
    /// Histogram: time to apply one sled batch (preparing and writing it), seconds.
    pub const APPLY_SECONDS: &str = "view_agent_apply_batch_seconds";
    /// Counter: change events applied (`_total`).
    pub const EVENTS_APPLIED: &str = "view_agent_events_applied";
    /// Counter: sled batches applied (`_total`).
    pub const BATCHES_APPLIED: &str = "view_agent_batches_applied";
    /// Counter: view reads, label `interface` = `pgwire` or `api` (`_total`).
    pub const QUERIES: &str = "view_agent_queries";
    /// Histogram: time of one view read in the store, seconds, label `interface`.
    pub const QUERY_SECONDS: &str = "view_agent_query_seconds";
    /// Gauge: views that are stale (queries fail with 55000 until rebuilt).
    pub const VIEWS_STALE: &str = "view_agent_views_stale";
    /// Gauge: 1 when `/readyz` answers 200.
    pub const READY: &str = "view_agent_ready";
}

/// `/readyz` answers 503 while more stream messages than this wait to be applied.
pub const READY_MAX_LAG_MESSAGES: u64 = 1_000;

/// Upper bounds (seconds) of the latency histograms: 10 µs to ~2.6 s, ×2 each.
const BUCKETS: [f64; 19] = [
    0.000_01, 0.000_02, 0.000_04, 0.000_08, 0.000_16, 0.000_32, 0.000_64, 0.001_28, 0.002_56,
    0.005_12, 0.010_24, 0.020_48, 0.040_96, 0.081_92, 0.163_84, 0.327_68, 0.655_36, 1.310_72,
    2.621_44,
];

/// A latency histogram whose observation is a few relaxed atomic adds (no lock), for the
/// query path. Fixed buckets ([`BUCKETS`] and +Inf).
#[derive(Debug, Default)]
pub struct AtomicHistogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of observations in nanoseconds.
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn buckets(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, count, buckets)
    }
}

/// Where a query came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    /// The pgwire server.
    Pgwire,
    /// The in-process Rust API.
    Api,
}

/// Counters the store updates on its hot paths.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    /// Events applied.
    pub events_applied: AtomicU64,
    /// Batches applied.
    pub batches_applied: AtomicU64,
    /// Per-batch apply time.
    pub apply_seconds: AtomicHistogram,
    /// Queries over pgwire.
    pub pgwire_queries: AtomicHistogram,
    /// Queries through the Rust API.
    pub api_queries: AtomicHistogram,
    /// Source commit time (ms since the epoch) of the last applied event; 0 = none yet.
    pub last_commit_ms: AtomicI64,
    /// The follow loop has read the stream's state at least once.
    pub stream_seen: std::sync::atomic::AtomicBool,
}

impl StoreMetrics {
    /// The query histogram of `interface`.
    pub fn queries(&self, interface: Interface) -> &AtomicHistogram {
        match interface {
            Interface::Pgwire => &self.pgwire_queries,
            Interface::Api => &self.api_queries,
        }
    }
}

/// Reads the store's state on every scrape.
#[derive(Debug)]
pub struct AgentCollector {
    store: Arc<ViewStore>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Lag of the agent: messages not applied, and seconds since the commit of the last applied
/// event (0 when nothing waits).
pub fn lag(store: &ViewStore) -> (u64, f64) {
    let p = store.progress();
    let messages = p.stream_last_seq.saturating_sub(p.applied_seq);
    let last = store.metrics().last_commit_ms.load(Ordering::Relaxed);
    let seconds = if messages == 0 || last == 0 {
        0.0
    } else {
        (now_ms() - last).max(0) as f64 / 1000.0
    };
    (messages, seconds)
}

/// The agent's health: live while the store works; ready when caught up (fewer than
/// [`READY_MAX_LAG_MESSAGES`] messages waiting, and the stream's last sequence known) and no
/// view is stale.
pub fn health(store: &ViewStore, following: bool) -> Health {
    let p = store.progress();
    let stale: Vec<String> = store
        .status()
        .into_iter()
        .filter_map(|s| s.stale.map(|r| format!("{}: {r}", s.view)))
        .collect();
    let (lag_messages, _) = lag(store);
    let (ready, detail) = if !stale.is_empty() {
        (false, format!("stale view(s): {}", stale.join("; ")))
    } else if !following {
        (false, "not connected to the stream yet".to_string())
    } else if lag_messages >= READY_MAX_LAG_MESSAGES {
        (
            false,
            format!(
                "catching up: {lag_messages} messages behind (applied {}, stream {})",
                p.applied_seq, p.stream_last_seq
            ),
        )
    } else {
        (
            true,
            format!(
                "caught up: applied seq {}, lsn {}, {lag_messages} behind",
                p.applied_seq, p.applied_lsn
            ),
        )
    };
    Health {
        live: true,
        ready,
        detail,
    }
}

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = self.store.progress();
        let (lag_messages, lag_seconds) = lag(&self.store);
        let stale = self
            .store
            .status()
            .iter()
            .filter(|s| s.stale.is_some())
            .count();
        let ready = health(&self.store, self.store.stream_seen()).ready;
        let gauges: [(&str, &str, f64); 8] = [
            (
                names::APPLIED_SEQ,
                "Stream sequence of the last applied message",
                p.applied_seq as f64,
            ),
            (
                names::APPLIED_LSN,
                "Commit LSN of the last applied source transaction",
                p.applied_lsn.0 as f64,
            ),
            (
                names::WATERMARK_LSN,
                "Read-your-writes watermark LSN",
                p.watermark.0 as f64,
            ),
            (
                names::STREAM_LAST_SEQ,
                "Last sequence of the stream, as last seen",
                p.stream_last_seq as f64,
            ),
            (
                names::LAG_MESSAGES,
                "Stream messages not applied yet",
                lag_messages as f64,
            ),
            (
                names::LAG_SECONDS,
                "Seconds since the source commit of the last applied event (0 when caught up)",
                lag_seconds,
            ),
            (names::VIEWS_STALE, "Views that are stale", stale as f64),
            (
                names::READY,
                "1 when the agent is caught up and no view is stale",
                if ready { 1.0 } else { 0.0 },
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let m = self.store.metrics();
        for (name, help, value) in [
            (
                names::EVENTS_APPLIED,
                "Change events applied",
                m.events_applied.load(Ordering::Relaxed),
            ),
            (
                names::BATCHES_APPLIED,
                "Sled batches applied",
                m.batches_applied.load(Ordering::Relaxed),
            ),
        ] {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let (sum, count, buckets) = m.apply_seconds.buckets();
        encoder
            .encode_descriptor(
                names::APPLY_SECONDS,
                "Time to apply one sled batch",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        let by_interface = [("pgwire", &m.pgwire_queries), ("api", &m.api_queries)];
        {
            let mut enc = encoder.encode_descriptor(
                names::QUERIES,
                "View reads",
                None,
                MetricType::Counter,
            )?;
            for (label, h) in by_interface {
                let c = ConstCounter::new(h.count());
                c.encode(enc.encode_family(&[("interface", label)])?)?;
            }
        }
        let mut enc = encoder.encode_descriptor(
            names::QUERY_SECONDS,
            "Time of one view read in the store",
            None,
            MetricType::Histogram,
        )?;
        for (label, h) in by_interface {
            let (sum, count, buckets) = h.buckets();
            enc.encode_family(&[("interface", label)])?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

/// A registry with the agent's metrics.
pub fn registry(store: Arc<ViewStore>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AgentCollector { store }));
    registry
}
