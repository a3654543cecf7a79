//! Snapshot throughput: the reader's initial load of a table into the stream, beside
//! `COPY … TO STDOUT` of the same table (to /dev/null) measured in the same run.
//!
//! `cargo bench -p cdc --bench snapshot` (env `BENCH_ROWS`, default 1000000).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use testkit::{Nats, Postgres};

mod common;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let rows: u64 = std::env::var("BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let pg = Postgres::start().await?;
    let nats = Nats::start().await?;
    let db = pg.create_database("snapbench").await?;
    let sql = pg.connect(&db).await?;
    sql.batch_execute(&format!(
        "CREATE TABLE top_clients (id bigint PRIMARY KEY, seller_id int NOT NULL, name text NOT NULL,
                                   logo_url text, position int NOT NULL, updated_at timestamptz NOT NULL);
         INSERT INTO top_clients SELECT g, (g % 1000)::int, 'client ' || g, 'https://cdn.example/' || g || '.png',
                                        (g % 10)::int, now() FROM generate_series(1, {rows}) g;"
    ))
    .await?;
    sql.batch_execute("VACUUM ANALYZE top_clients").await?;

    // Ceiling: COPY of the same table to /dev/null through psql.
    let psql = testkit::find_binary("psql")?;
    let t = Instant::now();
    let status = Command::new(psql)
        .args([&pg.url(&db), "-q", "-c", "COPY top_clients TO STDOUT"])
        .stdout(Stdio::null())
        .status()
        .context("running psql")?;
    anyhow::ensure!(status.success(), "psql COPY failed");
    let copy_secs = t.elapsed().as_secs_f64();

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "[postgres]\nurl = {:?}\nslot = \"cdc_slot\"\npublication = \"cdc_pub\"\ntables = [\"public.top_clients\"]\n\n[nats]\nurl = {:?}\n\n[snapshot]\nchunk_rows = 20000\n",
            pg.url(&db),
            nats.url()
        ),
    )?;
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdc"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn");
    let t = Instant::now();
    let mut reader = testkit::spawn_logged(cmd, "cdc")?;
    let subject = "cdc.public.top_clients".to_string();
    let nats_cpu0 = nats.pid().and_then(testkit::cpu_time).unwrap_or_default();
    let snap_secs =
        common::seconds_until_count(&js, &subject, rows, t, Duration::from_secs(900), &reader)
            .await?;
    let reader_cpu = reader.cpu_time().unwrap_or_default();
    let nats_cpu = nats
        .pid()
        .and_then(testkit::cpu_time)
        .unwrap_or_default()
        .saturating_sub(nats_cpu0);
    reader.signal(testkit::Signal::Term)?;
    reader.wait_with_timeout(Duration::from_secs(10)).await?;

    let rate = |secs: f64| rows as f64 / secs;
    println!();
    println!("| path ({rows} rows) | seconds | rows/s | vs COPY |");
    println!("|---|---:|---:|---:|");
    println!(
        "| COPY … TO STDOUT → /dev/null (ceiling) | {copy_secs:.2} | {:.0} | 100% |",
        rate(copy_secs)
    );
    println!("| cdc snapshot → JetStream (PubAck), from process start | {snap_secs:.2} | {:.0} | {:.0}% |", rate(snap_secs), 100.0 * copy_secs / snap_secs);
    let per_row = |cpu: Duration| cpu.as_secs_f64() * 1e6 / rows as f64;
    println!();
    println!(
        "CPU per row during the snapshot: reader {:.1} µs, nats-server {:.1} µs",
        per_row(reader_cpu),
        per_row(nats_cpu)
    );
    Ok(())
}
