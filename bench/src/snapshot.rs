//! Row 3, snapshot: the `cdc` binary's initial snapshot of a table into the stream (from process
//! start until every row has its PubAck), beside `COPY … TO STDOUT` of the same table through
//! psql to /dev/null, in the same run. From the CPU the reader and nats-server spent per row,
//! and COPY's time per row as Postgres' part, follows what this machine's CPUs allow for the
//! three together, overlap perfect (the second ceiling). The third is NATS' own: the same
//! number of messages like the snapshot's (a row's body, the reader's headers, a PubAck asked
//! for where the reader asks) published by async-nats into a stream of their own.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;
use testkit::{Nats, Postgres};

use crate::pipeline::{self, Binaries, CpuMeter};
use crate::report::{self, Line, RowReport, Target};

/// Target: rows/s.
const TARGET_ROWS_PER_SEC: f64 = 150_000.0;

/// The numbers of one run.
#[derive(Debug, Serialize)]
struct Outcome {
    rows: u64,
    chunk_rows: usize,
    copy_secs: f64,
    snapshot_secs: f64,
    reader_cpu_us_per_row: f64,
    nats_cpu_us_per_row: f64,
    /// Bytes of the sampled row event the raw publisher sent.
    event_bytes: usize,
    raw_publish_secs: f64,
    raw_publish_nats_cpu_us_per_row: f64,
    /// CPUs of this machine.
    cores: usize,
    /// [`report::cpu_bound`] of reader, nats-server and COPY (its wall time per row).
    cpu_bound_rows_per_sec: f64,
}

/// Runs row 3 on a table of `rows` rows.
pub async fn run(bins: &Binaries, rows: u64) -> Result<RowReport> {
    let pg = Postgres::start().await?;
    let nats = Nats::start().await?;
    let db = pg.create_database("snapshot").await?;
    let sql = pg.connect(&db).await?;
    eprintln!("  filling a table of {rows} rows …");
    sql.batch_execute(&format!(
        "CREATE TABLE top_clients (id bigint PRIMARY KEY, seller_id int NOT NULL, name text NOT NULL,
                                   logo_url text, position int NOT NULL, updated_at timestamptz NOT NULL);
         INSERT INTO top_clients SELECT g, (g % 1000)::int, 'client ' || g, 'https://cdn.example/' || g || '.png',
                                        (g % 10)::int, now() FROM generate_series(1, {rows}) g;"
    ))
    .await?;
    sql.batch_execute("VACUUM ANALYZE top_clients").await?;

    // Ceiling: COPY of the same table to /dev/null through psql.
    eprintln!("  COPY … TO STDOUT …");
    let psql = testkit::find_binary("psql")?;
    let t = Instant::now();
    let status = Command::new(psql)
        .args([&pg.url(&db), "-q", "-c", "COPY top_clients TO STDOUT"])
        .stdout(Stdio::null())
        .status()
        .context("running psql")?;
    anyhow::ensure!(status.success(), "psql COPY failed: {status}");
    let copy_secs = t.elapsed().as_secs_f64();

    // The reader's initial snapshot, with the default chunk size.
    eprintln!("  cdc snapshot …");
    let chunk_rows = cdc::snapshot::DEFAULT_CHUNK_ROWS;
    let dir = tempfile::tempdir()?;
    let config = pipeline::write_reader_config(
        dir.path(),
        &pg.url(&db),
        &nats.url(),
        "top_clients",
        "initial = true",
    )?;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    let nats_cpu = CpuMeter::start(&[pipeline::pid_of(&nats)?]);
    let t = Instant::now();
    let mut reader = bins.spawn_reader(&config)?;
    // The rows, then the snapshot's end event on the same subject.
    let snapshot_secs = pipeline::seconds_until_count(
        &js,
        "cdc.public.top_clients",
        rows,
        t,
        Duration::from_secs(900),
        &mut reader,
    )
    .await?;
    let reader_cpu = reader.cpu_time().unwrap_or_default();
    let nats_cpu = nats_cpu.used()[0];
    pipeline::stop(&mut reader).await?;

    // Ceiling 3: JetStream taking the same messages from async-nats.
    eprintln!("  raw JetStream publishing …");
    let sample = js
        .get_stream(pipeline::STREAM)
        .await?
        .get_first_raw_message_by_subject("cdc.public.top_clients", 1)
        .await?;
    let body = bytes::Bytes::from(sample.payload.to_vec());
    let chunk = chunk_rows as u64;
    let every = cdc::publish::ACK_EVERY;
    let (raw_secs, raw_nats_cpu) = pipeline::publish_like_reader(
        &js.client(),
        &js,
        "RAW",
        pipeline::pid_of(&nats)?,
        rows,
        |i| pipeline::reader_headers(i, chunk, "r", "public.top_clients"),
        |i| (i + 1) % chunk == 0 || i % every == every - 1,
        &body,
    )
    .await?;

    let reader_us = report::micros_per(reader_cpu, rows);
    let nats_us = report::micros_per(nats_cpu, rows);
    let copy_us = copy_secs * 1e6 / rows.max(1) as f64;
    let cores = report::cores();
    let outcome = Outcome {
        rows,
        chunk_rows,
        copy_secs,
        snapshot_secs,
        reader_cpu_us_per_row: reader_us,
        nats_cpu_us_per_row: nats_us,
        event_bytes: body.len(),
        raw_publish_secs: raw_secs,
        raw_publish_nats_cpu_us_per_row: report::micros_per(raw_nats_cpu, rows),
        cores,
        cpu_bound_rows_per_sec: report::cpu_bound(cores, &[reader_us, nats_us, copy_us]),
    };
    Ok(RowReport {
        name: "snapshot",
        lines: vec![line(&outcome)],
        data: serde_json::to_value(&outcome)?,
        machine_busy_percent: 0.0,
    })
}

fn line(o: &Outcome) -> Line {
    let snap = o.rows as f64 / o.snapshot_secs;
    let copy = o.rows as f64 / o.copy_secs;
    let raw = o.rows as f64 / o.raw_publish_secs;
    Line {
        row: 3,
        measurement: format!(
            "Snapshot: initial snapshot of a {}-row table into the stream (chunks of {}), from process start to the last PubAck",
            report::thousands(o.rows),
            report::thousands(o.chunk_rows as u64)
        ),
        result: format!(
            "**{} rows/s** ({:.2} s); CPU per row: reader {:.1} µs, nats-server {:.1} µs",
            report::rate(snap),
            o.snapshot_secs,
            o.reader_cpu_us_per_row,
            o.nats_cpu_us_per_row
        ),
        beside: format!(
            "COPY … TO STDOUT → /dev/null {} rows/s ({:.2} s; snapshot = {}); the {} CPUs' bound for reader, nats-server and COPY together {}/s ({}); raw async-nats publish of as many messages like the snapshot's ({} B, PubAck where the reader asks) {}/s ({}, nats-server {:.1} µs/row)",
            report::rate(copy),
            o.copy_secs,
            report::percent(snap, copy),
            o.cores,
            report::rate(o.cpu_bound_rows_per_sec),
            report::percent(snap, o.cpu_bound_rows_per_sec),
            o.event_bytes,
            report::rate(raw),
            report::percent(snap, raw),
            o.raw_publish_nats_cpu_us_per_row,
        ),
        targets: vec![Target::new(
            format!("≥ {} rows/s", report::rate(TARGET_ROWS_PER_SEC)),
            snap >= TARGET_ROWS_PER_SEC,
        )],
    }
}
