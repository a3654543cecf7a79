//! Read-path benchmark: a point query (`WHERE seller_id = $1`, prepared) from 8 concurrent
//! tokio-postgres clients against the view agent over pgwire, and the same query against
//! Postgres directly (the seed's synchronous approach), measured in the same run.
//!
//! `cargo run --release -p consumers --example bench_read [-- SECONDS]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use async_nats::jetstream::{self, stream};
use cdc::envelope::{ChangeEvent, Op, Source, TransactionInfo};
use cdc::Lsn;
use consumers::config::{AgentConfig, ApplyConfig, NatsConfig, PgwireConfig, ViewConfig};
use consumers::Agent;
use hdrhistogram::Histogram;
use serde_json::json;

const CLIENTS: usize = 8;
const SELLERS: i64 = 10_000;
const PER_SELLER: i64 = 5;

async fn connect(conn: &str) -> Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// Runs the point query from `CLIENTS` connections for `secs`; returns (qps, p50 µs, p99 µs).
async fn run(conn: &str, sql: &str, secs: u64) -> Result<(f64, u64, u64)> {
    let mut tasks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(secs);
    for c in 0..CLIENTS {
        let conn = conn.to_owned();
        let sql = sql.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = connect(&conn).await?;
            let stmt = client.prepare(&sql).await?;
            let mut h = Histogram::<u64>::new(3)?;
            let mut seller = c as i64 * 7;
            while Instant::now() < deadline {
                seller = (seller * 31 + 17) % SELLERS;
                let t = Instant::now();
                let rows = client.query(&stmt, &[&seller]).await?;
                h.record(t.elapsed().as_micros() as u64)?;
                anyhow::ensure!(
                    rows.len() == PER_SELLER as usize,
                    "seller {seller}: {} rows",
                    rows.len()
                );
            }
            anyhow::Ok(h)
        }));
    }
    let mut all = Histogram::<u64>::new(3)?;
    for t in tasks {
        all.add(t.await??)?;
    }
    Ok((
        all.len() as f64 / secs as f64,
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.99),
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    // Postgres with the source table.
    let pg = testkit::Postgres::start().await?;
    let db = pg.create_database("bench").await?;
    let client = pg.connect(&db).await?;
    client
        .batch_execute(&format!(
            "CREATE TABLE top_clients (seller_id bigint, client_id bigint, name text, position int,
                                       PRIMARY KEY (seller_id, client_id));
             INSERT INTO top_clients SELECT s, c, 'client ' || c, c FROM generate_series(0, {}) s,
                                            generate_series(1, {PER_SELLER}) c;
             ANALYZE top_clients;",
            SELLERS - 1
        ))
        .await?;

    // The agent with the same rows, fed through the stream.
    let nats = testkit::Nats::start().await?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    js.create_stream(stream::Config {
        name: "CDC".into(),
        subjects: vec!["cdc.>".into()],
        ..Default::default()
    })
    .await?;
    let mut acks = Vec::new();
    let mut tx_no = 0u64;
    for s in 0..SELLERS {
        tx_no += 1;
        let commit = Lsn(0x10_000 + tx_no * 0x100);
        for c in 1..=PER_SELLER {
            let ev = ChangeEvent {
                op: Op::Create,
                before: None,
                after: json!({"seller_id": s, "client_id": c, "name": format!("client {c}"), "position": c})
                    .as_object()
                    .cloned(),
                unchanged_toast: vec![],
                source: Source {
                    db: db.clone(),
                    schema: "public".into(),
                    table: "top_clients".into(),
                    lsn: commit,
                    commit_lsn: commit,
                    tx_id: Some(tx_no as u32),
                    ts_ms: 0,
                    snapshot: false,
                },
                transaction: Some(TransactionInfo {
                    id: format!("{tx_no}:{commit}"),
                    total_order: c as u64,
                    data_collection_order: c as u64,
                    last: c == PER_SELLER,
                }),
                ts_ms: 0,
            };
            acks.push(
                js.publish("cdc.public.top_clients", serde_json::to_vec(&ev)?.into())
                    .await?,
            );
        }
        if acks.len() > 4096 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    let mut last = 0;
    for a in acks {
        last = a.await?.sequence;
    }
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(AgentConfig {
        name: "bench".into(),
        data_dir: dir.path().join("agent"),
        nats: NatsConfig {
            url: nats.url(),
            stream: "CDC".into(),
            subject_prefix: "cdc".into(),
        },
        pgwire: PgwireConfig {
            listen: "127.0.0.1:0".into(),
            ..PgwireConfig::default()
        },
        apply: ApplyConfig::default(),
        views: vec![ViewConfig {
            name: "top_clients_by_seller".into(),
            source: "public.top_clients".into(),
            key: vec!["seller_id".into()],
            primary_key: vec!["seller_id".into(), "client_id".into()],
            columns: Some(vec!["client_id".into(), "name".into(), "position".into()]),
            column_types: [
                ("seller_id".to_owned(), "int8".to_owned()),
                ("client_id".to_owned(), "int8".to_owned()),
                ("position".to_owned(), "int4".to_owned()),
            ]
            .into(),
        }],
    })
    .await?;
    let store = Arc::clone(agent.store());
    let mut progress = store.subscribe();
    progress.wait_for(|p| p.applied_seq >= last).await?;
    let port = agent.pgwire_addr().map(|a| a.port()).unwrap_or_default();

    let agent_conn = format!("host=127.0.0.1 port={port} user=bench dbname=views");
    let pg_url = pg.url(&db);
    let sql_agent =
        "SELECT client_id, name, position FROM top_clients_by_seller WHERE seller_id = $1";
    let sql_pg =
        "SELECT client_id, name, position FROM top_clients WHERE seller_id = $1 ORDER BY client_id";
    let (aq, a50, a99) = run(&agent_conn, sql_agent, secs).await?;
    let (pq, p50, p99) = run(&pg_url, sql_pg, secs).await?;
    println!("point query, {CLIENTS} concurrent clients, {secs} s each, {} rows/query, {SELLERS} sellers", PER_SELLER);
    println!("| target | queries/s | p50 | p99 |");
    println!("|---|---:|---:|---:|");
    println!("| view-agent over pgwire | {aq:>9.0} | {a50} µs | {a99} µs |");
    println!("| Postgres directly (synchronous approach) | {pq:>9.0} | {p50} µs | {p99} µs |");
    println!("| ratio | {:.2}x | | |", aq / pq);
    agent.shutdown().await?;
    Ok(())
}
