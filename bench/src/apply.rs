//! Row 4, apply: a private stream pre-filled with change events, then in the same run (1) the
//! raw ordered-consumer rate of that stream (ceiling 1), (2) the agent's follow loop applying it
//! into sled (read, decode, fold, atomic batches + position; in this process, the library the
//! `view-agent` binary runs), and (3) the store alone applying the same transactions already
//! decoded, without NATS (ceiling 2). From the CPU time of (1) and (3) per event follows what
//! this machine's CPUs allow for both together, decoding free and overlap perfect (ceiling 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy, stream};
use async_nats::HeaderMap;
use cdc::envelope::{
    ChangeEvent, Op, Source, TransactionInfo, HEADER_COMMIT_LSN, HEADER_MSG_ID, HEADER_OP,
    HEADER_TABLE,
};
use cdc::pull::{PullConfig, PullConsumer};
use cdc::Lsn;
use consumers::config::{ApplyConfig, NatsConfig, ViewConfig};
use consumers::{SourceTransaction, ViewStore};
use futures::StreamExt as _;
use serde::Serialize;
use serde_json::json;

use crate::pipeline::{self, CpuMeter, ThreadMeter};
use crate::report::{self, Line, RowReport, Target};

/// Target: events/s applied.
const TARGET_EVENTS_PER_SEC: f64 = 100_000.0;
/// Events per source transaction.
const TX_SIZE: u64 = 5;
/// Distinct sellers the events spread over.
const SELLERS: u64 = 100_000;

/// The numbers of one run.
#[derive(Debug, Serialize)]
struct Outcome {
    events: u64,
    events_per_tx: u64,
    json_bytes: usize,
    fill_secs: f64,
    /// Raw consume with the agent's stream reader, `cdc::pull` (before 2026-12-05: async-nats'
    /// ordered consumer, which the agent used then).
    raw_consume_secs: f64,
    raw_consume_cpu_us_per_event: f64,
    raw_consume_nats_cpu_us_per_event: f64,
    /// Raw consume with async-nats' ordered consumer.
    async_nats_consume_secs: f64,
    async_nats_consume_cpu_us_per_event: f64,
    async_nats_consume_nats_cpu_us_per_event: f64,
    apply_secs: f64,
    apply_cpu_us_per_event: f64,
    apply_nats_cpu_us_per_event: f64,
    /// Atomic sled batches the apply took (the follow loop groups the transactions already
    /// delivered into one, up to `apply.max_batch_events`).
    apply_batches: u64,
    /// The agent's CPU per event during the apply, by thread (name without digits).
    apply_cpu_us_per_event_by_thread: std::collections::BTreeMap<String, f64>,
    store_alone_secs: f64,
    store_alone_cpu_us_per_event: f64,
    /// CPUs of this machine.
    cores: usize,
    /// [`report::cpu_bound`] of the parts above (decoding free).
    cpu_bound_events_per_sec: f64,
}

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

/// The `i`th event: 5 per transaction, random sellers, 10% updates.
fn event(i: u64) -> ChangeEvent {
    let tx = i / TX_SIZE;
    let ord = i % TX_SIZE + 1;
    let commit = Lsn(0x1_0000 + tx * 0x100);
    let seller = (i * 7919) % SELLERS;
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

/// Runs row 4 on `events` events.
pub async fn run(events: u64) -> Result<RowReport> {
    let nats = testkit::Nats::start().await?;
    let nats_pid = pipeline::pid_of(&nats)?;
    let me = std::process::id();
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: pipeline::STREAM.into(),
        subjects: vec!["cdc.>".into()],
        ..Default::default()
    })
    .await?;

    // Pre-fill with a bounded window of in-flight publishes.
    eprintln!("  pre-filling a stream with {events} events …");
    let t = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    let mut json_bytes = 0usize;
    for i in 0..events {
        let ev = event(i);
        let body = serde_json::to_vec(&ev)?;
        json_bytes += body.len();
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
    let fill_secs = t.elapsed().as_secs_f64();

    // (1) Raw consume with the agent's stream reader (`cdc::pull`), no decoding.
    eprintln!("  raw consume (the agent's stream reader) …");
    let cpu = CpuMeter::start(&[me, nats_pid]);
    let t = Instant::now();
    let mut reader = PullConsumer::start(
        &nats.url(),
        PullConfig::new(pipeline::STREAM, 1, "cdc-bench"),
    )
    .await?;
    let mut consumed = 0u64;
    loop {
        let m = reader.next().await?;
        consumed += 1;
        if m.stream_seq() >= last_seq {
            break;
        }
    }
    let raw_consume_secs = t.elapsed().as_secs_f64();
    let raw_cpu = cpu.used();
    drop(reader);

    // (1b) The same with async-nats' ordered consumer (what the agent read with before).
    eprintln!("  raw consume (async-nats ordered consumer) …");
    let stream = js.get_stream(pipeline::STREAM).await?;
    let cpu = CpuMeter::start(&[me, nats_pid]);
    let t = Instant::now();
    let mut msgs = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let mut async_nats_consumed = 0u64;
    while let Some(m) = msgs.next().await {
        let m = m?;
        async_nats_consumed += 1;
        if m.info().map(|i| i.stream_sequence).unwrap_or(0) >= last_seq {
            break;
        }
    }
    let async_nats_consume_secs = t.elapsed().as_secs_f64();
    let async_nats_cpu = cpu.used();
    drop(msgs);

    // (2) Apply into sled through the agent's follow loop.
    eprintln!("  view-agent apply …");
    let dir = tempfile::tempdir()?;
    let store = Arc::new(ViewStore::open_at(dir.path(), &[view()])?);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let cpu = CpuMeter::start(&[me, nats_pid]);
    let threads = ThreadMeter::start();
    let t = Instant::now();
    let nats_config = NatsConfig {
        url: nats.url(),
        stream: pipeline::STREAM.into(),
        subject_prefix: "cdc".into(),
    };
    let follow_client = consumers::follow::connect(&nats_config)
        .await
        .map_err(anyhow::Error::msg)?;
    let task = tokio::spawn(consumers::follow::follow(
        store.clone(),
        follow_client,
        nats_config,
        ApplyConfig::default(),
        stop_rx,
    ));
    let mut progress = store.subscribe();
    tokio::time::timeout(
        Duration::from_secs(900),
        progress.wait_for(|p| p.applied_seq >= last_seq),
    )
    .await??;
    let apply_secs = t.elapsed().as_secs_f64();
    let apply_cpu = cpu.used();
    let apply_threads = threads.used();
    let apply_batches = store
        .metrics()
        .batches_applied
        .load(std::sync::atomic::Ordering::Relaxed);
    let _ = stop.send(true);
    task.await??;
    store.flush()?;
    drop(store);

    // (3) The store alone: the same transactions, decoded beforehand (all of them, so that
    // the CPU time of this process during the applies is the store's own: applier and sled's
    // threads), applied in batches of the agent's default size.
    eprintln!("  store alone …");
    let dir = tempfile::tempdir()?;
    let store = ViewStore::open_at(dir.path(), &[view()])?;
    let batch = ApplyConfig::default().max_batch_events as u64;
    let mut seq = 0u64;
    let batches: Vec<Vec<SourceTransaction>> = (0..events)
        .step_by(batch as usize)
        .map(|start| {
            let end = (start + batch).min(events);
            (start..end)
                .collect::<Vec<_>>()
                .chunks(TX_SIZE as usize)
                .map(|c| {
                    seq += c.len() as u64;
                    SourceTransaction {
                        last_seq: seq,
                        events: c.iter().map(|&i| event(i)).collect(),
                    }
                })
                .collect()
        })
        .collect();
    let cpu = CpuMeter::start(&[me]);
    let t0 = Instant::now();
    for txs in &batches {
        store.apply(txs)?;
    }
    let store_alone = t0.elapsed();
    let store_cpu = cpu.used();
    drop(batches);

    let (raw_us, raw_nats_us) = (
        report::micros_per(raw_cpu[0], consumed),
        report::micros_per(raw_cpu[1], consumed),
    );
    let store_us = report::micros_per(store_cpu[0], events);
    let cores = report::cores();
    let outcome = Outcome {
        events,
        events_per_tx: TX_SIZE,
        json_bytes,
        fill_secs,
        raw_consume_secs,
        raw_consume_cpu_us_per_event: raw_us,
        raw_consume_nats_cpu_us_per_event: raw_nats_us,
        async_nats_consume_secs,
        async_nats_consume_cpu_us_per_event: report::micros_per(
            async_nats_cpu[0],
            async_nats_consumed,
        ),
        async_nats_consume_nats_cpu_us_per_event: report::micros_per(
            async_nats_cpu[1],
            async_nats_consumed,
        ),
        apply_secs,
        apply_cpu_us_per_event: report::micros_per(apply_cpu[0], events),
        apply_nats_cpu_us_per_event: report::micros_per(apply_cpu[1], events),
        apply_batches,
        apply_cpu_us_per_event_by_thread: apply_threads
            .into_iter()
            .map(|(name, cpu)| (name, report::micros_per(cpu, events)))
            .collect(),
        store_alone_secs: store_alone.as_secs_f64(),
        store_alone_cpu_us_per_event: store_us,
        cores,
        cpu_bound_events_per_sec: report::cpu_bound(cores, &[raw_us, raw_nats_us, store_us]),
    };
    Ok(RowReport {
        name: "apply",
        lines: vec![line(&outcome)],
        data: serde_json::to_value(&outcome)?,
        machine_busy_percent: 0.0,
    })
}

fn line(o: &Outcome) -> Line {
    let per_sec = |secs: f64| o.events as f64 / secs;
    let apply = per_sec(o.apply_secs);
    let raw = per_sec(o.raw_consume_secs);
    let alone = per_sec(o.store_alone_secs);
    Line {
        row: 4,
        measurement: format!(
            "Apply: {} events ({} per tx) from a pre-filled stream into sled (agent's follow loop in-process: decode, fold, atomic batches + position)",
            report::thousands(o.events),
            o.events_per_tx
        ),
        result: format!(
            "**{} events/s** ({:.2} s, {} batches of {:.0} events on average); CPU per event: agent {:.1} µs ({}), nats-server {:.1} µs",
            report::rate(apply),
            o.apply_secs,
            report::thousands(o.apply_batches),
            o.events as f64 / o.apply_batches.max(1) as f64,
            o.apply_cpu_us_per_event,
            by_thread(&o.apply_cpu_us_per_event_by_thread),
            o.apply_nats_cpu_us_per_event
        ),
        beside: format!(
            "raw consume with the agent's stream reader {}/s (apply = {}; CPU {:.1} + {:.1} µs nats-server), with async-nats' ordered consumer {}/s (CPU {:.1} + {:.1} µs); store alone, pre-decoded, no NATS {}/s ({}; CPU {:.1} µs); the {} CPUs' bound for stream reader, nats-server and store together {}/s ({})",
            report::rate(raw),
            report::percent(apply, raw),
            o.raw_consume_cpu_us_per_event,
            o.raw_consume_nats_cpu_us_per_event,
            report::rate(per_sec(o.async_nats_consume_secs)),
            o.async_nats_consume_cpu_us_per_event,
            o.async_nats_consume_nats_cpu_us_per_event,
            report::rate(alone),
            report::percent(apply, alone),
            o.store_alone_cpu_us_per_event,
            o.cores,
            report::rate(o.cpu_bound_events_per_sec),
            report::percent(apply, o.cpu_bound_events_per_sec),
        ),
        targets: vec![Target::new(
            format!("≥ {} events/s", report::rate(TARGET_EVENTS_PER_SEC)),
            apply >= TARGET_EVENTS_PER_SEC,
        )],
    }
}

/// `follow/decode 5.6 · applier 6.9 · sled I/O 1.2 · other 0.1`: the agent's threads that
/// matter, named for what they do (tokio's workers run the follow loop: NATS client, decoding,
/// folding; the applier thread writes sled batches; sled's own threads write its log).
fn by_thread(cpu: &std::collections::BTreeMap<String, f64>) -> String {
    let sum = |pred: &dyn Fn(&str) -> bool| -> f64 {
        cpu.iter().filter(|(n, _)| pred(n)).map(|(_, v)| v).sum()
    };
    let follow = sum(&|n| n.starts_with("tokio"));
    let applier = sum(&|n| n == "view-apply");
    let sled = sum(&|n| n.starts_with("sled") || n == "log flusher");
    let other = sum(&|_| true) - follow - applier - sled;
    format!(
        "follow/decode {follow:.1} · applier {applier:.1} · sled I/O {sled:.1} · other {other:.1}"
    )
}
