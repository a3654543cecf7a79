//! Row 1, throughput: the `cdc` binary draining a backlog (commit → PubAck, end to end), beside
//! `pg_recvlogical` draining an identical backlog from a second slot (the decoding ceiling) and
//! raw async-nats publishing of messages like the reader's (the NATS ceiling), all on the same
//! servers in the same run.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_nats::jetstream;
use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::StreamExt as _;
use serde::Serialize;
use testkit::{Nats, Postgres};

use crate::pipeline::{self, Binaries, CpuMeter};
use crate::report::{self, Line, RowReport, Target};

/// Target: events/s end to end.
const TARGET_EVENTS_PER_SEC: f64 = 100_000.0;
/// Target: share of pg_recvlogical's rate.
const TARGET_SHARE_OF_RECVLOGICAL: f64 = 0.5;
/// Publishes awaiting a PubAck at once in the raw publishers: the reader's default
/// `nats.max_in_flight`.
const WINDOW: usize = cdc::config::DEFAULT_MAX_IN_FLIGHT;

/// Size of the backlog.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Transactions.
    pub transactions: u64,
    /// Rows per transaction.
    pub rows_per_tx: u64,
}

impl Settings {
    /// 100,000 transactions × 5 rows; `--quick`: 20,000 × 5.
    pub fn new(quick: bool) -> Settings {
        Settings {
            transactions: if quick { 20_000 } else { 100_000 },
            rows_per_tx: 5,
        }
    }
}

/// The numbers of one run.
#[derive(Debug, Serialize)]
struct Outcome {
    transactions: u64,
    events: u64,
    event_bytes: usize,
    backlog_write_secs: f64,
    recvlogical_secs: f64,
    reader_secs: f64,
    raw_ack_each_secs: f64,
    raw_ack_per_tx_secs: f64,
    reader_cpu_us_per_event: f64,
    nats_cpu_us_per_event: f64,
    walsender_cpu_us_per_event: Option<f64>,
    raw_ack_per_tx_nats_cpu_us_per_event: f64,
}

/// Runs row 1.
pub async fn run(bins: &Binaries, settings: Settings) -> Result<RowReport> {
    let Settings {
        transactions: txs,
        rows_per_tx: rows,
    } = settings;
    let events = txs * rows;
    let pg = Postgres::start().await?;
    let nats = Nats::start().await?;
    let db = pg.create_database("throughput").await?;
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
    eprintln!("  writing a backlog of {txs} transactions × {rows} rows …");
    let t = Instant::now();
    sql.batch_execute(&format!("CALL backlog({txs}, {rows})"))
        .await?;
    let backlog_write_secs = t.elapsed().as_secs_f64();
    let end_lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);

    // Ceiling 1: pg_recvlogical drains the same backlog from its own slot.
    eprintln!("  pg_recvlogical …");
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
    let recvlogical_secs = t.elapsed().as_secs_f64();

    // The reader, without an initial snapshot: the backlog is the measurement.
    eprintln!("  cdc reader …");
    let dir = tempfile::tempdir()?;
    let config = pipeline::write_reader_config(
        dir.path(),
        &pg.url(&db),
        &nats.url(),
        "top_clients",
        "initial = false",
    )?;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client.clone());
    let nats_pid = pipeline::pid_of(&nats)?;
    let nats_cpu = CpuMeter::start(&[nats_pid]);
    let t = Instant::now();
    let mut reader = bins.spawn_reader(&config)?;
    let subject = "cdc.public.top_clients";
    let reader_secs = pipeline::seconds_until_count(
        &js,
        subject,
        events - 1,
        t,
        Duration::from_secs(900),
        &mut reader,
    )
    .await?;
    let reader_cpu = reader.cpu_time().unwrap_or_default();
    let nats_cpu = nats_cpu.used()[0];
    // The walsender serving the reader: its whole life is this run.
    let walsender: Option<i32> = sql
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
            &[],
        )
        .await?
        .get(0);
    let walsender_cpu = walsender.and_then(|pid| testkit::cpu_time(pid as u32));
    let sample = js
        .get_stream(pipeline::STREAM)
        .await?
        .get_last_raw_message_by_subject(subject)
        .await?;
    pipeline::stop(&mut reader).await?;

    // Ceiling 2: the same messages (body of the reader's last event, the reader's headers)
    // published by async-nats, each awaiting its PubAck, in a window of the reader's size.
    eprintln!("  raw JetStream publishing …");
    let body = Bytes::from(sample.payload.to_vec());
    js.create_stream(jetstream::stream::Config {
        name: "RAW".into(),
        subjects: vec!["raw.>".into()],
        ..Default::default()
    })
    .await?;
    let t = Instant::now();
    let mut window = FuturesOrdered::new();
    for i in 0..events {
        let ack = js
            .publish_with_headers(
                "raw.public.top_clients",
                pipeline::reader_headers(i, rows, "c", "public.top_clients"),
                body.clone(),
            )
            .await?;
        window.push_back(std::future::IntoFuture::into_future(ack));
        if window.len() >= WINDOW {
            if let Some(r) = window.next().await {
                r?;
            }
        }
    }
    while let Some(r) = window.next().await {
        r?;
    }
    let raw_ack_each_secs = t.elapsed().as_secs_f64();

    // Ceiling 3: the reader's pattern: a PubAck asked for on the last message of each
    // transaction only (the chain header makes it speak for the messages before it).
    let (raw_ack_per_tx_secs, raw2_nats_cpu) = pipeline::publish_like_reader(
        &client,
        &js,
        "RAW2",
        nats_pid,
        events,
        |i| pipeline::reader_headers(i, rows, "c", "public.top_clients"),
        |i| (i + 1) % rows == 0,
        &body,
    )
    .await?;

    let outcome = Outcome {
        transactions: txs,
        events,
        event_bytes: body.len(),
        backlog_write_secs,
        recvlogical_secs,
        reader_secs,
        raw_ack_each_secs,
        raw_ack_per_tx_secs,
        reader_cpu_us_per_event: report::micros_per(reader_cpu, events),
        nats_cpu_us_per_event: report::micros_per(nats_cpu, events),
        walsender_cpu_us_per_event: walsender_cpu.map(|c| report::micros_per(c, events)),
        raw_ack_per_tx_nats_cpu_us_per_event: report::micros_per(raw2_nats_cpu, events),
    };
    Ok(RowReport {
        name: "throughput",
        lines: vec![line(&outcome)],
        data: serde_json::to_value(&outcome)?,
        machine_busy_percent: 0.0,
    })
}

fn line(o: &Outcome) -> Line {
    let per_sec = |secs: f64| o.events as f64 / secs;
    let reader = per_sec(o.reader_secs);
    let recv = per_sec(o.recvlogical_secs);
    let walsender = o
        .walsender_cpu_us_per_event
        .map(|us| format!(", walsender {us:.1} µs"))
        .unwrap_or_default();
    Line {
        row: 1,
        measurement: format!(
            "Throughput: backlog of {} tx / {} row events ({} B), commit → PubAck, `cdc` binary",
            report::thousands(o.transactions),
            report::thousands(o.events),
            o.event_bytes
        ),
        result: format!(
            "**{} events/s** ({:.2} s); CPU per event: reader {:.1} µs, nats-server {:.1} µs{walsender}",
            report::rate(reader),
            o.reader_secs,
            o.reader_cpu_us_per_event,
            o.nats_cpu_us_per_event,
        ),
        beside: format!(
            "pg_recvlogical → /dev/null {}/s (cdc = {}); raw async-nats publish, PubAck each {}/s ({}); raw, PubAck per tx like the reader {}/s ({}, nats-server {:.1} µs/event)",
            report::rate(recv),
            report::percent(reader, recv),
            report::rate(per_sec(o.raw_ack_each_secs)),
            report::percent(reader, per_sec(o.raw_ack_each_secs)),
            report::rate(per_sec(o.raw_ack_per_tx_secs)),
            report::percent(reader, per_sec(o.raw_ack_per_tx_secs)),
            o.raw_ack_per_tx_nats_cpu_us_per_event,
        ),
        targets: vec![
            Target::new(
                format!("≥ {} events/s", report::rate(TARGET_EVENTS_PER_SEC)),
                reader >= TARGET_EVENTS_PER_SEC,
            ),
            Target::new(
                format!(
                    "≥ {:.0}% of pg_recvlogical",
                    TARGET_SHARE_OF_RECVLOGICAL * 100.0
                ),
                reader >= TARGET_SHARE_OF_RECVLOGICAL * recv,
            ),
        ],
    }
}
