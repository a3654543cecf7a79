//! Row 2, latency at a fixed offered load: writer connections commit one-row transactions on a
//! fixed schedule (2,000/s by default) while the `cdc` binary streams them and a `view-agent`
//! binary applies them. This process records when each commit returned, when each event
//! arrives through a JetStream ordered consumer (commit → in stream), and, for a sample of the
//! transactions, when the row is first visible over the agent's pgwire port (commit → visible).
//! Beside them, in the same run: the writer's own commit round trip, and JetStream alone
//! (publish → ordered consumer at the same rate, messages of the same size), the floor under
//! the stream latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use bytes::Bytes;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::pipeline::{self, AgentView, Binaries, CpuMeter, MachineMeter};
use crate::report::{self, Line, RowReport, Target};

/// Target: p99 commit → in stream, ms.
pub const TARGET_STREAM_P99_MS: f64 = 10.0;
/// Target: p99 commit → visible in the view, ms.
pub const TARGET_VIEW_P99_MS: f64 = 25.0;
/// pgwire connections the probes share (queries pipeline on each).
const PROBE_CONNECTIONS: usize = 4;
/// A probe reads again as soon as a read returns without the row for this long after the row
/// reached the stream (a pgwire round trip is ~0.1–0.2 ms, so the visible time is that
/// precise), then pauses [`PROBE_INTERVAL`] between reads.
const PROBE_EAGER: Duration = Duration::from_millis(30);
/// Pause between two reads of a probe past [`PROBE_EAGER`].
const PROBE_INTERVAL: Duration = Duration::from_millis(1);
/// A probe that has not seen its row after this long counts as missed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the last commit the stream may take to deliver the rest.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The offered load.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Settings {
    /// Transactions per second, over all writers.
    pub rate: u64,
    /// Seconds of load, warm-up included.
    pub secs: f64,
    /// The first seconds, left out of the percentiles.
    pub warmup_secs: f64,
    /// Writer connections sharing the schedule.
    pub writers: usize,
    /// Every this many transactions is probed in the view.
    pub probe_every: u64,
    /// Seconds of JetStream alone.
    pub floor_secs: f64,
}

impl Settings {
    /// 2,000 tx/s for 30 s from 4 connections (`--quick`: 5 s).
    pub fn new(quick: bool) -> Settings {
        Settings {
            rate: 2000,
            secs: if quick { 5.0 } else { 30.0 },
            warmup_secs: 1.0,
            writers: 4,
            probe_every: 10,
            floor_secs: if quick { 2.0 } else { 5.0 },
        }
    }
}

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    /// What it measures.
    pub label: String,
    /// Samples.
    pub n: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// `(quantile, ms)` points of the percentile curve, for the chart.
    pub curve: Vec<(f64, f64)>,
}

impl Series {
    fn of(label: &str, h: &Histogram<u64>) -> Series {
        let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        // Evenly spaced on the chart's axis: x = log10(1 / (1 - q)), 0 ..= 3 (0% … 99.9%).
        let curve = (0..=60)
            .map(|i| {
                let x = f64::from(i) * 0.05;
                let quantile = 1.0 - 10f64.powf(-x);
                (quantile, q(quantile))
            })
            .collect();
        Series {
            label: label.to_owned(),
            n: h.len(),
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p95_ms: q(0.95),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: h.max() as f64 / 1000.0,
            curve,
        }
    }

    /// `p50 1.20 ms · p95 … · p99 …`.
    fn summary(&self) -> String {
        format!(
            "p50 {} · p95 {} · p99 {}",
            report::ms(self.p50_ms),
            report::ms(self.p95_ms),
            report::ms(self.p99_ms)
        )
    }
}

/// The numbers of one run.
#[derive(Debug, Serialize)]
pub struct Outcome {
    settings: Settings,
    transactions: u64,
    /// Transactions/s actually committed over the measured part.
    achieved_rate: f64,
    /// The latest any commit started after its scheduled time, ms.
    max_writer_lag_ms: f64,
    /// Events that arrived before their writer saw the commit return (counted as 0 ms).
    arrived_before_commit_returned: u64,
    /// Sampled transactions never seen in the view within the probe timeout.
    probes_missed: u64,
    /// How busy the machine's CPUs were during the load (every process), percent.
    machine_busy_percent: f64,
    /// The part of it this row's processes used (this one, Postgres, NATS, reader, agent).
    own_busy_percent: f64,
    /// CPU time per transaction during the load, µs: reader, agent, nats-server.
    cpu_us_per_tx: CpuPerTx,
    /// Commit → in stream for each second of the load (by commit time): where the tail is.
    stream_by_second: Vec<Second>,
    /// The writer's commit round trip, commit → in stream, commit → visible, JetStream alone.
    pub series: Vec<Series>,
}

/// CPU time per transaction of the processes on the path, µs.
#[derive(Debug, Serialize)]
struct CpuPerTx {
    reader: f64,
    agent: f64,
    nats_server: f64,
    /// Every backend (writers, walsender, …).
    postgres: f64,
    /// The writers' client side, the stream consumer and the probes.
    bench_process: f64,
}

/// Commit → in stream of the transactions committed in one second of the load.
#[derive(Debug, Serialize)]
struct Second {
    second: u64,
    n: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Deserialize)]
struct EventId {
    after: Option<RowId>,
}

#[derive(Deserialize)]
struct RowId {
    id: i64,
}

/// Runs row 2. Returns the report and the latency distributions (for the chart).
pub async fn run(bins: &Binaries, settings: Settings) -> Result<(RowReport, Vec<Series>)> {
    let pipeline::Streaming {
        pg,
        nats,
        db,
        sql,
        dir,
        mut reader,
        js,
    } = pipeline::start_streaming(
        bins,
        "latency",
        "CREATE TABLE lat (id bigint PRIMARY KEY, seller_id int NOT NULL, name text NOT NULL, position int NOT NULL)",
        "lat",
    )
    .await?;
    let stream = js.get_stream(pipeline::STREAM).await?;
    let port = testkit::free_port();
    let agent_config = pipeline::write_agent_config(
        dir.path(),
        "latency",
        &nats.url(),
        port,
        &AgentView {
            name: "lat_by_id",
            table: "lat",
            key: &["id"],
            primary_key: &["id"],
            columns: &["seller_id", "name", "position"],
            column_types: &[("id", "int8"), ("seller_id", "int4"), ("position", "int4")],
        },
        "",
    )?;
    let mut agent = bins.spawn_agent(&agent_config, "view-agent").await?;

    let total = (settings.rate as f64 * settings.secs) as u64;
    let origin = Instant::now();
    let since = move |t: Instant| t.saturating_duration_since(origin).as_nanos() as u64;

    // The view side: pgwire connections shared by the probes.
    let mut probes = Vec::new();
    for _ in 0..PROBE_CONNECTIONS {
        let c = pipeline::connect(&pipeline::agent_conn(port)).await?;
        let stmt = c
            .prepare("SELECT seller_id FROM lat_by_id WHERE id = $1")
            .await?;
        probes.push((c, stmt));
    }
    let probes = Arc::new(probes);

    // The stream side: an ordered consumer from now on, recording each row's arrival and
    // starting the view probe of every `probe_every`th row once it is in the stream (the view
    // is fed by the stream, so reading it earlier only costs CPU).
    let mut messages = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::New,
            filter_subject: "cdc.public.lat".into(),
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let consumer_probes = probes.clone();
    let arrivals: JoinHandle<Result<Arrivals>> = tokio::spawn(async move {
        // Index = row id; 0 = not arrived. Row 0 is the warm-up transaction.
        let mut arrived = vec![0u64; total as usize + 1];
        let mut view_probes = Vec::new();
        let mut missing = total + 1;
        let mut sample = None;
        while missing > 0 {
            let m = tokio::time::timeout(
                DRAIN_TIMEOUT + Duration::from_secs_f64(settings.secs),
                messages.next(),
            )
            .await
            .context("the stream stopped delivering events")?
            .context("the ordered consumer ended")?
            .map_err(|e| anyhow::anyhow!("ordered consumer: {e}"))?;
            let now = since(Instant::now());
            let ev: EventId = serde_json::from_slice(&m.payload)?;
            let id = ev.after.context("an event without `after`")?.id;
            let slot = usize::try_from(id)
                .ok()
                .and_then(|i| arrived.get_mut(i))
                .with_context(|| format!("unexpected row id {id}"))?;
            if *slot == 0 {
                *slot = now.max(1);
                missing -= 1;
                if id > 0 && (id as u64 - 1).is_multiple_of(settings.probe_every) {
                    let visible = tokio::spawn(probe(consumer_probes.clone(), id, Instant::now()));
                    view_probes.push((id as u64 - 1, visible));
                }
            }
            if sample.is_none() {
                sample = Some(m.payload.clone());
            }
        }
        Ok(Arrivals {
            arrived,
            view_probes,
            sample,
        })
    });

    // Warm-up transaction (row 0): the whole path is live before the schedule starts.
    let insert = "INSERT INTO lat (id, seller_id, name, position) VALUES ($1, $2, $3, $4)";
    sql.execute(insert, &[&0i64, &0i32, &"warm-up", &0i32])
        .await?;
    let warm = probe(probes.clone(), 0, Instant::now()).await;
    anyhow::ensure!(
        warm.is_some(),
        "the warm-up row never became visible in the view\n{}\n{}",
        reader.describe(),
        agent.describe()
    );

    eprintln!(
        "  {} tx/s for {} s from {} writer connections …",
        settings.rate, settings.secs, settings.writers
    );
    let commits: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let cpu = CpuMeter::start(&[reader.pid(), agent.pid(), pipeline::pid_of(&nats)?]);
    let machine = MachineMeter::start();
    // Everything this row runs: this process (writers, consumer, probes) and its children
    // (nats-server, the reader, the agent, the postmaster), and Postgres' backends.
    let pg_pid = pg.pid().context("postgres is not running")?;
    let own = || pipeline::tree_cpu(std::process::id()) + pipeline::children_cpu(pg_pid);
    let own_start = own();
    let pg_cpu = pipeline::children_cpu(pg_pid);
    let me_cpu = pipeline::cpu_of(std::process::id());
    let load_start = Instant::now();
    let start = Instant::now() + Duration::from_millis(100);
    let mut writers = Vec::new();
    for w in 0..settings.writers {
        let conn = pipeline::connect(&pg.url(&db)).await?;
        let commits = commits.clone();
        writers.push(tokio::spawn(async move {
            let stmt = conn.prepare(insert).await?;
            let mut commit_hist = Histogram::<u64>::new(3)?;
            let mut max_lag = Duration::ZERO;
            for k in (w as u64..total).step_by(settings.writers) {
                let due = start + Duration::from_secs_f64(k as f64 / settings.rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let t0 = Instant::now();
                max_lag = max_lag.max(t0.saturating_duration_since(due));
                let id = k as i64 + 1;
                conn.execute(
                    &stmt,
                    &[
                        &id,
                        &((k % 1000) as i32),
                        &format!("client {id}"),
                        &((k % 10) as i32),
                    ],
                )
                .await?;
                let done = Instant::now();
                commits[k as usize].store(since(done).max(1), Ordering::Relaxed);
                commit_hist.record((done - t0).as_micros() as u64)?;
            }
            anyhow::Ok((commit_hist, max_lag))
        }));
    }
    let warmup = (settings.rate as f64 * settings.warmup_secs) as u64;
    let mut commit_hist = Histogram::<u64>::new(3)?;
    let mut view_hist = Histogram::<u64>::new(3)?;
    let mut max_writer_lag = Duration::ZERO;
    let mut probes_missed = 0u64;
    for w in writers {
        let (h, lag) = w.await??;
        commit_hist.add(h)?;
        max_writer_lag = max_writer_lag.max(lag);
    }
    let load_end = Instant::now();
    let cpu = cpu.used();
    let machine_busy_percent = machine.busy_percent();
    let cpus = report::cores() as f64;
    let own_busy_percent = 100.0 * own().saturating_sub(own_start).as_secs_f64()
        / (load_start.elapsed().as_secs_f64() * cpus);
    let pg_cpu = pipeline::children_cpu(pg_pid).saturating_sub(pg_cpu);
    let me_cpu = pipeline::cpu_of(std::process::id()).saturating_sub(me_cpu);
    let Arrivals {
        arrived,
        view_probes,
        sample,
    } = arrivals.await??;
    for (k, p) in view_probes {
        match p.await? {
            Some(visible) if k >= warmup => {
                let committed = commits[k as usize].load(Ordering::Relaxed);
                view_hist.record(since(visible).saturating_sub(committed) / 1000)?;
            }
            Some(_) => {}
            None => probes_missed += 1,
        }
    }
    let mut stream_hist = Histogram::<u64>::new(3)?;
    let mut early = 0u64;
    let mut seconds: Vec<Histogram<u64>> = Vec::new();
    let start_ns = since(start);
    for k in warmup..total {
        let committed = commits[k as usize].load(Ordering::Relaxed);
        let arrival = arrived[k as usize + 1];
        if arrival < committed {
            early += 1;
        }
        let us = arrival.saturating_sub(committed) / 1000;
        stream_hist.record(us)?;
        let second = (committed.saturating_sub(start_ns) / 1_000_000_000) as usize;
        while seconds.len() <= second {
            seconds.push(Histogram::new(3)?);
        }
        seconds[second].record(us)?;
    }
    let stream_by_second = seconds
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.is_empty())
        .map(|(i, h)| Second {
            second: i as u64,
            n: h.len(),
            p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: h.value_at_quantile(0.99) as f64 / 1000.0,
            max_ms: h.max() as f64 / 1000.0,
        })
        .collect();
    let measured_start = start + Duration::from_secs_f64(settings.warmup_secs);
    let achieved_rate = (total - warmup) as f64
        / load_end
            .saturating_duration_since(measured_start)
            .as_secs_f64();
    pipeline::stop(&mut agent).await?;
    pipeline::stop(&mut reader).await?;

    // JetStream alone at the same rate, messages of the same size.
    eprintln!("  JetStream alone for {} s …", settings.floor_secs);
    let body = sample.unwrap_or_else(|| Bytes::from(vec![b'x'; 200]));
    let floor_hist = jetstream_floor(&js, settings, body).await?;

    let series = vec![
        Series::of("commit → in stream", &stream_hist),
        Series::of("commit → visible in the view", &view_hist),
        Series::of("JetStream alone: publish → ordered consumer", &floor_hist),
        Series::of("writer's commit round trip", &commit_hist),
    ];
    let outcome = Outcome {
        settings,
        transactions: total,
        achieved_rate,
        max_writer_lag_ms: max_writer_lag.as_secs_f64() * 1000.0,
        arrived_before_commit_returned: early,
        probes_missed,
        machine_busy_percent,
        own_busy_percent,
        cpu_us_per_tx: CpuPerTx {
            reader: report::micros_per(cpu[0], total),
            agent: report::micros_per(cpu[1], total),
            nats_server: report::micros_per(cpu[2], total),
            postgres: report::micros_per(pg_cpu, total),
            bench_process: report::micros_per(me_cpu, total),
        },
        stream_by_second,
        series: series.clone(),
    };
    let report = RowReport {
        name: "latency",
        lines: lines(&outcome),
        data: serde_json::to_value(&outcome)?,
        machine_busy_percent: 0.0,
    };
    Ok((report, series))
}

/// What the stream consumer saw.
struct Arrivals {
    /// Arrival time of each row (ns since the origin), by row id.
    arrived: Vec<u64>,
    /// `(transaction index, probe)` of the sampled rows.
    view_probes: Vec<(u64, JoinHandle<Option<Instant>>)>,
    /// One event's body (for JetStream alone).
    sample: Option<Bytes>,
}

/// Reads row `id` from the view until it is there; the instant the first read that saw it
/// returned, `None` after [`PROBE_TIMEOUT`] or on an error. `from` is when it started.
async fn probe(
    probes: Arc<Vec<(tokio_postgres::Client, tokio_postgres::Statement)>>,
    id: i64,
    from: Instant,
) -> Option<Instant> {
    let (client, stmt) = &probes[id as usize % probes.len()];
    loop {
        let row = client.query_opt(stmt, &[&id]).await.ok()?;
        if row.is_some() {
            return Some(Instant::now());
        }
        let waited = from.elapsed();
        if waited > PROBE_TIMEOUT {
            return None;
        }
        if waited > PROBE_EAGER {
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }
}

/// Publishes `body` at `settings.rate` for `settings.floor_secs` to a stream of its own and
/// measures publish → arrival at an ordered consumer, in µs.
async fn jetstream_floor(
    js: &jetstream::Context,
    settings: Settings,
    body: Bytes,
) -> Result<Histogram<u64>> {
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "FLOOR".into(),
            subjects: vec!["floor.>".into()],
            ..Default::default()
        })
        .await?;
    let total = (settings.rate as f64 * settings.floor_secs) as u64;
    let origin = Instant::now();
    let since = move |t: Instant| t.saturating_duration_since(origin).as_nanos() as u64;
    let mut messages = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let arrivals: JoinHandle<Result<Vec<u64>>> = tokio::spawn(async move {
        let mut arrived = vec![0u64; total as usize];
        for _ in 0..total {
            let m = tokio::time::timeout(DRAIN_TIMEOUT, messages.next())
                .await
                .context("JetStream stopped delivering")?
                .context("the ordered consumer ended")?
                .map_err(|e| anyhow::anyhow!("ordered consumer: {e}"))?;
            let now = since(Instant::now());
            let seq = m
                .info()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .stream_sequence;
            if let Some(slot) = arrived.get_mut(seq as usize - 1) {
                *slot = now;
            }
        }
        Ok(arrived)
    });
    let start = Instant::now() + Duration::from_millis(100);
    let mut sent = vec![0u64; total as usize];
    let mut acks = Vec::new();
    for (k, slot) in sent.iter_mut().enumerate() {
        let due = start + Duration::from_secs_f64(k as f64 / settings.rate as f64);
        tokio::time::sleep_until(due.into()).await;
        *slot = since(Instant::now());
        let ack = js.publish("floor.x", body.clone()).await?;
        acks.push(tokio::spawn(std::future::IntoFuture::into_future(ack)));
    }
    for a in acks {
        a.await??;
    }
    let arrived = arrivals.await??;
    let mut h = Histogram::<u64>::new(3)?;
    for (s, a) in sent.iter().zip(&arrived) {
        h.record(a.saturating_sub(*s) / 1000)?;
    }
    Ok(h)
}

fn lines(o: &Outcome) -> Vec<Line> {
    let [stream, view, floor, commit] = &o.series[..] else {
        return Vec::new();
    };
    let load = format!(
        "{} tx/s offered ({:.0} achieved) for {} s, {} writer connections, 1 row per tx, synchronous_commit on",
        report::thousands(o.settings.rate),
        o.achieved_rate,
        o.settings.secs,
        o.settings.writers
    );
    vec![
        Line {
            row: 2,
            measurement: format!("Latency, commit → in stream (JetStream ordered consumer): {load}"),
            result: format!("**{}** (n = {})", stream.summary(), report::thousands(stream.n)),
            beside: format!(
                "JetStream alone, publish → ordered consumer at the same rate: {}; the writer's commit round trip: {}; CPU per tx: reader {:.0} µs, agent {:.0} µs, nats-server {:.0} µs, Postgres {:.0} µs, writers + consumer + probes {:.0} µs; the machine's CPUs {:.0}% busy during the load, {:.0}% of them by this row's processes",
                floor.summary(),
                commit.summary(),
                o.cpu_us_per_tx.reader,
                o.cpu_us_per_tx.agent,
                o.cpu_us_per_tx.nats_server,
                o.cpu_us_per_tx.postgres,
                o.cpu_us_per_tx.bench_process,
                o.machine_busy_percent,
                o.own_busy_percent,
            ),
            targets: vec![Target::new(
                format!("p99 ≤ {TARGET_STREAM_P99_MS:.0} ms"),
                stream.p99_ms <= TARGET_STREAM_P99_MS,
            )],
        },
        Line {
            row: 2,
            measurement: format!(
                "Latency, commit → visible in the view (`view-agent` binary, read over pgwire, every {}th tx probed)",
                o.settings.probe_every
            ),
            result: format!(
                "**{}** (n = {}{})",
                view.summary(),
                report::thousands(view.n),
                if o.probes_missed > 0 {
                    format!(", {} never seen", o.probes_missed)
                } else {
                    String::new()
                }
            ),
            beside: format!("commit → in stream: {}", stream.summary()),
            targets: vec![Target::new(
                format!("p99 ≤ {TARGET_VIEW_P99_MS:.0} ms"),
                view.p99_ms <= TARGET_VIEW_P99_MS && o.probes_missed == 0,
            )],
        },
    ]
}
