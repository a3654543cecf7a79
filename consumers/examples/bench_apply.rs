//! Apply benchmark: pre-fills a private JetStream stream with ≥ 500k change events, then measures
//! in the same run (1) the raw ordered-consumer rate of that stream and (2) the agent's apply
//! rate into sled (decode + fold + atomic batches + position), from the same stream.
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
use consumers::ViewStore;
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
    let stream = js.get_stream("CDC").await?;
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
    drop(msgs);

    // (2) Apply into sled through the agent's follow loop.
    let dir = tempfile::tempdir()?;
    let store = Arc::new(ViewStore::open_at(dir.path(), &[view()])?);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let t = Instant::now();
    let task = tokio::spawn(consumers::follow::follow(
        store.clone(),
        NatsConfig {
            url: nats.url(),
            stream: "CDC".into(),
            subject_prefix: "cdc".into(),
        },
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
    let _ = tx.send(true);
    task.await??;
    store.flush()?;

    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    println!();
    println!("| measurement (same stream, {events} events, {TX_SIZE}/tx) | events/s | time |");
    println!("|---|---:|---:|");
    println!(
        "| raw JetStream ordered consumer (ceiling) | {:>10.0} | {:>8.2?} |",
        rate(n, raw),
        raw
    );
    println!(
        "| view-agent apply into sled (decode, fold, atomic batch + position) | {:>10.0} | {:>8.2?} |",
        rate(events, apply),
        apply
    );
    println!(
        "| apply / raw | {:.0}% | |",
        100.0 * rate(events, apply) / rate(n, raw)
    );
    Ok(())
}
