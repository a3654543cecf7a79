//! Reader throughput on a backlog, beside its ceilings measured in the same run:
//! `pg_recvlogical` draining an identical backlog from a second slot, and raw async-nats
//! JetStream publishing of messages of the same size.
//!
//! `cargo bench -p cdc --bench reader` (env `BENCH_TX`, default 100000 transactions of
//! `BENCH_ROWS`, default 5, rows each).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_nats::jetstream;
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use testkit::{Nats, Postgres};

mod common;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let txs = env_num("BENCH_TX", 100_000);
    let rows = env_num("BENCH_ROWS", 5);
    let events = txs * rows;
    let pg = Postgres::start().await?;
    let nats = Nats::start().await?;
    let db = pg.create_database("bench").await?;
    let sql = pg.connect(&db).await?;
    sql.batch_execute(
        "CREATE TABLE top_clients (id bigint PRIMARY KEY, seller_id int NOT NULL, name text NOT NULL,
                                   logo_url text, position int NOT NULL, updated_at timestamptz NOT NULL);
         CREATE PUBLICATION cdc_pub FOR TABLE top_clients WITH (publish_via_partition_root = true);
         CREATE PROCEDURE backlog(txs bigint, per bigint) LANGUAGE plpgsql AS $$
         BEGIN
           FOR t IN 0..txs - 1 LOOP
             INSERT INTO top_clients
               SELECT t * per + g, (t % 1000)::int, 'client ' || (t * per + g), 'https://cdn.example/' || g || '.png', g::int, now()
               FROM generate_series(1, per) g;
             COMMIT;
           END LOOP;
         END $$;",
    )
    .await?;
    // Both slots exist before the backlog, so both see the same changes.
    for slot in ["cdc_slot", "recv_slot"] {
        sql.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await?;
    }
    eprintln!("writing a backlog of {txs} transactions × {rows} rows …");
    let t = Instant::now();
    sql.batch_execute(&format!("CALL backlog({txs}, {rows})"))
        .await?;
    eprintln!("backlog written in {:.1?}", t.elapsed());
    let end_lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);

    // Ceiling 1: pg_recvlogical drains the same backlog from its own slot.
    let recv = testkit::find_binary("pg_recvlogical")?;
    let t = Instant::now();
    let status = Command::new(recv)
        .args([
            "-d",
            &pg.url(&db),
            "--slot",
            "recv_slot",
            "--start",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=cdc_pub",
            "--endpos",
            &end_lsn,
            "--no-loop",
            "-f",
            "/dev/null",
        ])
        .status()
        .context("running pg_recvlogical")?;
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    let recv_secs = t.elapsed().as_secs_f64();

    // The reader (no initial snapshot: the backlog is the measurement).
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = {:?}\nslot = \"cdc_slot\"\npublication = \"cdc_pub\"\ntables = [\"public.top_clients\"]\n\n[nats]\nurl = {:?}\n\n[snapshot]\ninitial = false\n",
            pg.url(&db),
            nats.url()
        ),
    )?;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdc"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn");
    let t = Instant::now();
    let mut reader = testkit::spawn_logged(cmd, "cdc")?;
    let subject = "cdc.public.top_clients".to_string();
    let nats_cpu0 = nats.pid().and_then(testkit::cpu_time).unwrap_or_default();
    let reader_secs = common::seconds_until_count(
        &js,
        &subject,
        events - 1,
        t,
        Duration::from_secs(900),
        &reader,
    )
    .await?;
    let sample = js
        .get_stream("CDC")
        .await?
        .get_last_raw_message_by_subject(&subject)
        .await?;
    let reader_cpu = reader.cpu_time().unwrap_or_default();
    let nats_cpu = nats
        .pid()
        .and_then(testkit::cpu_time)
        .unwrap_or_default()
        .saturating_sub(nats_cpu0);
    reader.signal(testkit::Signal::Term)?;
    reader.wait_with_timeout(Duration::from_secs(10)).await?;

    // Ceiling 2: raw JetStream publishing of messages of the same size, same window.
    js.create_stream(jetstream::stream::Config {
        name: "RAW".into(),
        subjects: vec!["raw.>".into()],
        ..Default::default()
    })
    .await?;
    let body = Bytes::from(sample.payload.to_vec());
    let t = Instant::now();
    let mut window = FuturesOrdered::new();
    for i in 0..events {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("0/{i:X}:1").as_str());
        headers.insert("Cdc-Op", "c");
        headers.insert("Cdc-Table", "public.top_clients");
        headers.insert("Cdc-Commit-Lsn", "0/0");
        let ack = js
            .publish_with_headers("raw.public.top_clients", headers, body.clone())
            .await?;
        window.push_back(std::future::IntoFuture::into_future(ack));
        if window.len() >= 4096 {
            if let Some(r) = window.next().await {
                r?;
            }
        }
    }
    while let Some(r) = window.next().await {
        r?;
    }
    let raw_secs = t.elapsed().as_secs_f64();

    // Ceiling 3: the same messages as plain publishes whose PubAcks come back on one
    // subscription (what a pipelined JetStream publisher can do).
    js.create_stream(jetstream::stream::Config {
        name: "RAW2".into(),
        subjects: vec!["raw2.>".into()],
        ..Default::default()
    })
    .await?;
    let inbox = client.new_inbox();
    let mut acks = client.subscribe(format!("{inbox}.*")).await?;
    let t = Instant::now();
    let mut outstanding = 0u64;
    for i in 0..events {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("0/{i:X}:1").as_str());
        headers.insert("Cdc-Op", "c");
        headers.insert("Cdc-Table", "public.top_clients");
        headers.insert("Cdc-Commit-Lsn", "0/0");
        client
            .publish_with_reply_and_headers(
                "raw2.public.top_clients",
                format!("{inbox}.{i}"),
                headers,
                body.clone(),
            )
            .await?;
        outstanding += 1;
        while outstanding >= 4096 {
            acks.next().await.context("ack subscription ended")?;
            outstanding -= 1;
        }
    }
    while outstanding > 0 {
        acks.next().await.context("ack subscription ended")?;
        outstanding -= 1;
    }
    let raw2_secs = t.elapsed().as_secs_f64();

    let rate = |secs: f64| events as f64 / secs;
    println!();
    println!("| path ({events} row events, {txs} transactions, {} B events) | seconds | events/s | vs pg_recvlogical |", body.len());
    println!("|---|---:|---:|---:|");
    println!(
        "| pg_recvlogical → /dev/null (ceiling: decoding) | {recv_secs:.2} | {:.0} | 100% |",
        rate(recv_secs)
    );
    println!("| raw async-nats JetStream publish, window 4096 (ceiling: NATS) | {raw_secs:.2} | {:.0} | {:.0}% |", rate(raw_secs), 100.0 * recv_secs / raw_secs);
    println!("| raw publish, PubAcks on one subscription, window 4096 | {raw2_secs:.2} | {:.0} | {:.0}% |", rate(raw2_secs), 100.0 * recv_secs / raw2_secs);
    println!(
        "| cdc reader: commit → PubAck, end to end | {reader_secs:.2} | {:.0} | {:.0}% |",
        rate(reader_secs),
        100.0 * recv_secs / reader_secs
    );
    let per_event = |cpu: Duration| cpu.as_secs_f64() * 1e6 / events as f64;
    println!();
    println!(
        "CPU per event during the reader's run: reader {:.1} µs, nats-server {:.1} µs",
        per_event(reader_cpu),
        per_event(nats_cpu)
    );
    Ok(())
}
