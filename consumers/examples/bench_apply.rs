//! Apply benchmark: pre-fills a private JetStream stream with ≥ 500k change events, then measures
//! in the same run (1) the raw ordered-consumer rate of that stream, (2) the agent's apply rate
//! into sled (read, decode, fold, atomic batches + position) from the same stream, and (3) the
//! store alone applying the same transactions already decoded (no NATS): the two ceilings of
//! (2). For (1) and (2) it prints the CPU time per event of this process and of nats-server,
//! which on a small machine shows where the cores go.
//!
//! `cargo run --release -p consumers --example bench_apply [-- EVENTS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy, stream};
use async_nats::HeaderMap;
use cdc::envelope::{
    ChangeEvent, Op, Source, TransactionInfo, HEADER_COMMIT_LSN, HEADER_MSG_ID, HEADER_OP,
    HEADER_TABLE,
};
use cdc::Lsn;
use consumers::config::{ApplyConfig, NatsConfig, ViewConfig};
use consumers::{SourceTransaction, ViewStore};
use futures::StreamExt;
use serde_json::json;

/// The allocator of the `view-agent` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TX_SIZE: u64 = 5;

fn view() -> ViewConfig {
    ViewConfig {
        name: "top_clients_by_seller".into(),
        source: "public.top_clients".into(),
        key: vec!["seller_id".into()],
        primary_key: vec!["seller_id".into(), "client_id".into()],
        columns: Some(vec!["client_id".into(), "name".into(), "position".into()]),
        column_types: Default::default(),
    }
}

fn event(i: u64) -> ChangeEvent {
    let tx = i / TX_SIZE;
    let ord = i % TX_SIZE + 1;
    let commit = Lsn(0x1_0000 + tx * 0x100);
    let seller = (i * 7919) % 100_000;
    let after = json!({"seller_id": seller, "client_id": i % 1000, "name": format!("client {i}"),
                       "logo_url": "https://example.com/logo.png", "position": ord});
    ChangeEvent {
        op: if i % 10 == 9 { Op::Update } else { Op::Create },
        before: None,
        after: after.as_object().cloned(),
        unchanged_toast: vec![],
        source: Source {
            db: "topclients".into(),
            schema: "public".into(),
            table: "top_clients".into(),
            lsn: Lsn(commit.0 - 0x80 + ord),
            commit_lsn: commit,
            tx_id: Some(tx as u32),
            ts_ms: 1_764_230_400_000,
            snapshot: false,
        },
        transaction: Some(TransactionInfo {
            id: format!("{tx}:{commit}"),
            total_order: ord,
            data_collection_order: ord,
            last: ord == TX_SIZE,
        }),
        ts_ms: 1_764_230_400_003,
    }
}

/// CPU time (user + system) of a process so far.
fn cpu_of(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// The nats-server started by this process.
fn nats_pid() -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (name, rest) = stat.split_once(") ")?;
        let ppid = rest.split_whitespace().nth(1)?;
        (name.ends_with("nats-server") && ppid == me).then_some(pid)
    })
}

/// CPU per event (µs) of this process and of nats-server over a phase.
struct CpuMeter {
    nats: Option<u32>,
    start: (Duration, Duration),
}

impl CpuMeter {
    fn start(nats: Option<u32>) -> CpuMeter {
        let now = (
            cpu_of(std::process::id()),
            nats.map_or(Duration::ZERO, cpu_of),
        );
        CpuMeter { nats, start: now }
    }
    fn per_event(&self, n: u64) -> (f64, f64) {
        let me = cpu_of(std::process::id()).saturating_sub(self.start.0);
        let nats = self
            .nats
            .map_or(Duration::ZERO, cpu_of)
            .saturating_sub(self.start.1);
        let us = |d: Duration| d.as_micros() as f64 / n.max(1) as f64;
        (us(me), us(nats))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let events: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500_000);
    let nats = testkit::Nats::start().await?;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "CDC".into(),
        subjects: vec!["cdc.>".into()],
        ..Default::default()
    })
    .await?;

    // Pre-fill with a bounded window of in-flight publishes.
    let t = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    let mut bytes = 0usize;
    for i in 0..events {
        let ev = event(i);
        let body = serde_json::to_vec(&ev)?;
        bytes += body.len();
        let mut h = HeaderMap::new();
        h.insert(HEADER_MSG_ID, ev.msg_id().as_str());
        h.insert(HEADER_OP, ev.op.code());
        h.insert(HEADER_TABLE, "public.top_clients");
        h.insert(HEADER_COMMIT_LSN, ev.source.commit_lsn.to_string().as_str());
        inflight.push_back(
            js.publish_with_headers("cdc.public.top_clients", h, body.into())
                .await?,
        );
        if inflight.len() >= 4096 {
            if let Some(a) = inflight.pop_front() {
                a.await?;
            }
        }
    }
    let mut last_seq = 0;
    for a in inflight {
        last_seq = a.await?.sequence;
    }
    let fill = t.elapsed();
    println!(
        "pre-filled {events} events ({:.0} MB of JSON) in {:.1?}",
        bytes as f64 / 1e6,
        fill
    );

    // (1) Raw consume: ordered consumer, no decoding.
    let nats_pid = nats_pid();
    let stream = js.get_stream("CDC").await?;
    let cpu = CpuMeter::start(nats_pid);
    let t = Instant::now();
    let mut msgs = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let mut n = 0u64;
    while let Some(m) = msgs.next().await {
        let m = m?;
        n += 1;
        if m.info().map(|i| i.stream_sequence).unwrap_or(0) >= last_seq {
            break;
        }
    }
    let raw = t.elapsed();
    let raw_cpu = cpu.per_event(n);
    drop(msgs);

    // (2) Apply into sled through the agent's follow loop.
    let dir = tempfile::tempdir()?;
    let store = Arc::new(ViewStore::open_at(dir.path(), &[view()])?);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let cpu = CpuMeter::start(nats_pid);
    let t = Instant::now();
    let nats_config = NatsConfig {
        url: nats.url(),
        stream: "CDC".into(),
        subject_prefix: "cdc".into(),
    };
    let client = consumers::follow::connect(&nats_config)
        .await
        .map_err(anyhow::Error::msg)?;
    let task = tokio::spawn(consumers::follow::follow(
        store.clone(),
        client,
        nats_config,
        ApplyConfig::default(),
        rx,
    ));
    let mut progress = store.subscribe();
    tokio::time::timeout(
        Duration::from_secs(600),
        progress.wait_for(|p| p.applied_seq >= last_seq),
    )
    .await??;
    let apply = t.elapsed();
    let apply_cpu = cpu.per_event(events);
    let _ = tx.send(true);
    task.await??;
    store.flush()?;
    drop(store);

    // (3) The store alone: the same transactions, decoded beforehand, applied in batches of
    // the agent's default size.
    let dir = tempfile::tempdir()?;
    let store = ViewStore::open_at(dir.path(), &[view()])?;
    let batch = ApplyConfig::default().max_batch_events as u64;
    let mut store_alone = Duration::ZERO;
    let mut applied = 0u64;
    let mut seq = 0u64;
    while applied < events {
        let end = (applied + batch).min(events);
        let txs: Vec<SourceTransaction> = (applied..end)
            .collect::<Vec<_>>()
            .chunks(TX_SIZE as usize)
            .map(|c| {
                seq += c.len() as u64;
                SourceTransaction {
                    last_seq: seq,
                    events: c.iter().map(|&i| event(i)).collect(),
                }
            })
            .collect();
        // Only the apply counts, not building the events.
        let t0 = Instant::now();
        store.apply(&txs)?;
        store_alone += t0.elapsed();
        applied = end;
    }

    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    println!();
    println!(
        "| measurement (same stream, {events} events, {TX_SIZE}/tx) | events/s | time | CPU/event: this process | nats-server |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| raw JetStream ordered consumer (ceiling 1) | {:.0} | {:.2?} | {:.1} µs | {:.1} µs |",
        rate(n, raw),
        raw,
        raw_cpu.0,
        raw_cpu.1
    );
    println!(
        "| store alone: the same transactions, pre-decoded, into sled (ceiling 2) | {:.0} | {:.2?} | | |",
        rate(events, store_alone),
        store_alone
    );
    println!(
        "| view-agent apply: stream → decode → fold → atomic sled batches + position | {:.0} | {:.2?} | {:.1} µs | {:.1} µs |",
        rate(events, apply),
        apply,
        apply_cpu.0,
        apply_cpu.1
    );
    println!(
        "| apply / raw consume | {:.0}% | | | |",
        100.0 * rate(events, apply) / rate(n, raw)
    );
    Ok(())
}
