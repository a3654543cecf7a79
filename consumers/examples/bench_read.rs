//! Read-path benchmark: a point query (`WHERE seller_id = $1`, prepared, 5 rows) from 8
//! concurrent tokio-postgres clients against the `view-agent` binary over pgwire, and the same
//! query against Postgres directly (the seed's synchronous approach), measured in the same run.
//! Besides queries/s and latency it prints the CPU time each server spent per query (the agent
//! process; the 8 Postgres backends), which is what the servers cost independently of the
//! clients sharing the machine.
//!
//! ```sh
//! cargo build --release -p consumers --bins --examples
//! ./target/release/examples/bench_read [SECONDS]   # per target and round; BENCH_ONLY=agent|postgres
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, stream};
use cdc::envelope::{ChangeEvent, Op, Source, TransactionInfo};
use cdc::Lsn;
use hdrhistogram::Histogram;
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CLIENTS: usize = 8;
const SELLERS: i64 = 10_000;
const PER_SELLER: i64 = 5;
/// Rounds of the three targets, interleaved.
const ROUNDS: usize = 3;

async fn connect(conn: &str) -> Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(conn, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

/// CPU time (user + system) of a process so far.
fn cpu_of(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY-free: sysconf(_SC_CLK_TCK) is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// What one target did, summed over rounds.
struct Outcome {
    hist: Histogram<u64>,
    elapsed: Duration,
    /// CPU of the server.
    server: Duration,
    /// CPU of this (client) process.
    client: Duration,
    /// queries/s of each round.
    rounds: Vec<f64>,
}

impl Outcome {
    fn new() -> Result<Outcome> {
        Ok(Outcome {
            hist: Histogram::new(3)?,
            elapsed: Duration::ZERO,
            server: Duration::ZERO,
            client: Duration::ZERO,
            rounds: Vec::new(),
        })
    }
    fn qps(&self) -> f64 {
        self.hist.len() as f64 / self.elapsed.as_secs_f64()
    }
    fn per_query_us(&self, d: Duration) -> f64 {
        d.as_micros() as f64 / self.hist.len().max(1) as f64
    }
}

/// Runs the point query from `CLIENTS` connections for `secs` and adds to `out`.
/// `server_pids` returns the processes serving the given connections.
async fn run(
    conn: &str,
    sql: &str,
    secs: u64,
    server_pids: impl AsyncFnOnce(&[tokio_postgres::Client]) -> Result<Vec<u32>>,
    out: &mut Outcome,
) -> Result<()> {
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(connect(conn).await?);
    }
    let pids = server_pids(&clients).await?;
    let server_cpu = || pids.iter().map(|&p| cpu_of(p)).sum::<Duration>();
    let (server0, client0) = (server_cpu(), cpu_of(std::process::id()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let sql = sql.to_owned();
        tasks.push(tokio::spawn(async move {
            let stmt = client.prepare(&sql).await?;
            let mut h = Histogram::<u64>::new(3)?;
            let mut seller = c as i64 * 7 + start.elapsed().subsec_nanos() as i64 % 997;
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
            // The connection stays open until the CPU is read (a backend that exits takes its
            // CPU time with it).
            anyhow::Ok((h, client))
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let mut open = Vec::new();
    for t in tasks {
        let (h, client) = t.await??;
        hist.add(h)?;
        open.push(client);
    }
    let elapsed = start.elapsed();
    out.server += server_cpu().saturating_sub(server0);
    out.client += cpu_of(std::process::id()).saturating_sub(client0);
    drop(open);
    out.rounds.push(hist.len() as f64 / elapsed.as_secs_f64());
    out.hist.add(hist)?;
    out.elapsed += elapsed;
    Ok(())
}

fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(|examples| examples.parent())
        .map(|dir| dir.join("view-agent"))
        .context("locating the view-agent binary")?;
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p consumers --bins --examples` first",
        bin.display()
    );
    Ok(bin)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let agent_bin = agent_binary()?;
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
    client.batch_execute("VACUUM top_clients").await?;

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
    // Two agents on the same stream: the default (read cache on) and one with the cache off,
    // which shows what sled reads alone cost.
    let dir = tempfile::tempdir()?;
    let mut agents = Vec::new();
    for (name, cache_rows) in [("cache", 200_000), ("nocache", 0)] {
        let port = testkit::free_port();
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"name = "{name}"
data_dir = "{data}"
[nats]
url = "{url}"
[pgwire]
listen = "127.0.0.1:{port}"
[store]
read_cache_rows = {cache_rows}
[[views]]
name = "top_clients_by_seller"
source = "public.top_clients"
key = ["seller_id"]
primary_key = ["seller_id", "client_id"]
columns = ["client_id", "name", "position"]
column_types = {{ seller_id = "int8", client_id = "int8", position = "int4" }}
"#,
                data = dir.path().join(name).display(),
                url = nats.url(),
            ),
        )?;
        let mut cmd = Command::new(&agent_bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn");
        let mut agent = testkit::spawn_logged(cmd, &format!("view-agent-{name}"))?;
        agent
            .wait_for_output("view-agent ready", Duration::from_secs(30))
            .await?;
        let conn = format!("host=127.0.0.1 port={port} user=bench dbname=views");
        let status = connect(&conn).await?;
        testkit::until(
            Duration::from_secs(120),
            "the agent to apply the rows",
            || async {
                let row = status
                    .query_one("SELECT applied_seq FROM cdc_status", &[])
                    .await
                    .ok()?;
                (row.get::<_, i64>(0) as u64 >= last).then_some(())
            },
        )
        .await?;
        agents.push((agent, conn));
    }

    let pg_url = pg.url(&db);
    let sql_agent =
        "SELECT client_id, name, position FROM top_clients_by_seller WHERE seller_id = $1";
    let sql_pg =
        "SELECT client_id, name, position FROM top_clients WHERE seller_id = $1 ORDER BY client_id";
    // Rounds alternate the targets, so that load from elsewhere on the machine hits them alike.
    let labels = [
        "view-agent over pgwire",
        "view-agent over pgwire, read cache off (sled reads)",
        "Postgres directly (synchronous approach)",
    ];
    let mut outcomes = [Outcome::new()?, Outcome::new()?, Outcome::new()?];
    for _ in 0..ROUNDS {
        for (i, (agent, conn)) in agents.iter().enumerate() {
            if only != "postgres" {
                let pid = agent.pid();
                run(
                    conn,
                    sql_agent,
                    secs,
                    async |_| Ok(vec![pid]),
                    &mut outcomes[i],
                )
                .await?;
            }
        }
        if only != "agent" {
            let pg_pids = async |clients: &[tokio_postgres::Client]| {
                let mut pids = Vec::new();
                for c in clients {
                    let row = c.query_one("SELECT pg_backend_pid()", &[]).await?;
                    pids.push(row.get::<_, i32>(0) as u32);
                }
                Ok(pids)
            };
            run(&pg_url, sql_pg, secs, pg_pids, &mut outcomes[2]).await?;
        }
    }
    println!(
        "point query, {CLIENTS} concurrent clients, {ROUNDS} rounds of {secs} s per target, {PER_SELLER} rows/query, {SELLERS} sellers"
    );
    println!("| target | queries/s | p50 | p99 | server CPU/query | client CPU/query |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, o) in labels.iter().zip(&outcomes) {
        if o.hist.is_empty() {
            continue;
        }
        println!(
            "| {name} | {:.0} | {} µs | {} µs | {:.1} µs | {:.1} µs |",
            o.qps(),
            o.hist.value_at_quantile(0.5),
            o.hist.value_at_quantile(0.99),
            o.per_query_us(o.server),
            o.per_query_us(o.client)
        );
    }
    if !outcomes[0].hist.is_empty() && !outcomes[2].hist.is_empty() {
        let per_round: Vec<String> = outcomes[0]
            .rounds
            .iter()
            .zip(&outcomes[2].rounds)
            .map(|(a, p)| format!("{:.2}x", a / p))
            .collect();
        println!(
            "| ratio view-agent / Postgres | {:.2}x (rounds: {}) | | | | |",
            outcomes[0].qps() / outcomes[2].qps(),
            per_round.join(", ")
        );
    }
    for (agent, _) in &mut agents {
        agent.signal(testkit::Signal::Term)?;
        agent.wait_with_timeout(Duration::from_secs(10)).await?;
    }
    Ok(())
}
