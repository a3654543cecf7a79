//! Row 5, read path: the prepared point query `WHERE seller_id = $1` (5 rows) from 8 concurrent
//! clients against the `view-agent` binary over pgwire (read cache on, its default; and off, to
//! show what sled reads alone cost), against the same view in-process (`ViewStore::get` from 8
//! threads), and the same query against Postgres directly (the seed's synchronous approach).
//! The targets run in interleaved rounds so that load from elsewhere on the machine hits them
//! alike. Besides queries/s and latency it records the CPU each server spent per query (the
//! agent process; the 8 Postgres backends) and the client process's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, stream};
use cdc::envelope::{ChangeEvent, Op, Source, TransactionInfo};
use cdc::Lsn;
use consumers::config::ViewConfig;
use consumers::{SourceTransaction, ViewStore};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;

use crate::pipeline::{self, AgentView, Binaries};
use crate::report::{self, Line, RowReport, Target};

/// Concurrent clients.
const CLIENTS: usize = 8;
/// Sellers in the table.
const SELLERS: i64 = 10_000;
/// Rows per seller (the query's result).
const PER_SELLER: i64 = 5;
/// Rounds of the targets, interleaved.
const ROUNDS: usize = 3;
/// Target: pgwire p99.
const TARGET_P99_US: f64 = 1000.0;
/// Target: pgwire queries/s over Postgres' queries/s.
const TARGET_RATIO: f64 = 2.0;

const VIEW: &str = "top_clients_by_seller";

/// What one target did, summed over rounds.
#[derive(Debug, Serialize)]
struct TargetOutcome {
    label: &'static str,
    queries: u64,
    qps: f64,
    p50_us: f64,
    p99_us: f64,
    server_cpu_us_per_query: Option<f64>,
    client_cpu_us_per_query: f64,
    rounds_qps: Vec<f64>,
}

/// Latencies (ns) and CPU of one target over its rounds.
struct Tally {
    hist: Histogram<u64>,
    elapsed: Duration,
    server: Duration,
    client: Duration,
    rounds: Vec<f64>,
}

impl Tally {
    fn new() -> Result<Tally> {
        Ok(Tally {
            hist: Histogram::new(3)?,
            elapsed: Duration::ZERO,
            server: Duration::ZERO,
            client: Duration::ZERO,
            rounds: Vec::new(),
        })
    }

    fn add_round(&mut self, hist: &Histogram<u64>, elapsed: Duration) -> Result<()> {
        self.rounds.push(hist.len() as f64 / elapsed.as_secs_f64());
        self.hist.add(hist)?;
        self.elapsed += elapsed;
        Ok(())
    }

    fn outcome(&self, label: &'static str, has_server: bool) -> TargetOutcome {
        let n = self.hist.len();
        TargetOutcome {
            label,
            queries: n,
            qps: n as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
            p50_us: self.hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99_us: self.hist.value_at_quantile(0.99) as f64 / 1000.0,
            server_cpu_us_per_query: has_server.then(|| report::micros_per(self.server, n)),
            client_cpu_us_per_query: report::micros_per(self.client, n),
            rounds_qps: self.rounds.clone(),
        }
    }
}

/// Runs the point query from `CLIENTS` connections for `secs` and adds to `out`. `server_pids`
/// gives the processes serving the connections.
async fn round_over_sql(
    conn: &str,
    sql: &str,
    secs: f64,
    server_pids: impl AsyncFnOnce(&[tokio_postgres::Client]) -> Result<Vec<u32>>,
    out: &mut Tally,
) -> Result<()> {
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(pipeline::connect(conn).await?);
    }
    let pids = server_pids(&clients).await?;
    let server_cpu = || pids.iter().map(|&p| pipeline::cpu_of(p)).sum::<Duration>();
    let me = std::process::id();
    let (server0, client0) = (server_cpu(), pipeline::cpu_of(me));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        let sql = sql.to_owned();
        tasks.push(tokio::spawn(async move {
            let stmt = client.prepare(&sql).await?;
            let mut h = Histogram::<u64>::new(3)?;
            let mut seller = c as i64 * 7 + i64::from(start.elapsed().subsec_nanos()) % 997;
            while Instant::now() < deadline {
                seller = (seller * 31 + 17) % SELLERS;
                let t = Instant::now();
                let rows = client.query(&stmt, &[&seller]).await?;
                h.record(t.elapsed().as_nanos() as u64)?;
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
    out.client += pipeline::cpu_of(me).saturating_sub(client0);
    drop(open);
    out.add_round(&hist, elapsed)
}

/// The same query in-process: `ViewStore::get` from `CLIENTS` threads for `secs`.
async fn round_in_process(store: &Arc<ViewStore>, secs: f64, out: &mut Tally) -> Result<()> {
    let me = std::process::id();
    let client0 = pipeline::cpu_of(me);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let store = store.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut h = Histogram::<u64>::new(3)?;
            let mut seller = c as i64 * 7 + i64::from(start.elapsed().subsec_nanos()) % 997;
            while Instant::now() < deadline {
                seller = (seller * 31 + 17) % SELLERS;
                let t = Instant::now();
                let rows = store.get(VIEW, &[json!(seller)])?;
                h.record(t.elapsed().as_nanos() as u64)?;
                anyhow::ensure!(
                    rows.len() == PER_SELLER as usize,
                    "seller {seller}: {} rows",
                    rows.len()
                );
            }
            anyhow::Ok(h)
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await??)?;
    }
    let elapsed = start.elapsed();
    out.client += pipeline::cpu_of(me).saturating_sub(client0);
    out.add_round(&hist, elapsed)
}

/// The events that fill the views: one transaction per seller.
fn events() -> Vec<SourceTransaction> {
    let mut txs = Vec::new();
    let mut seq = 0u64;
    for s in 0..SELLERS {
        let tx_no = s as u64 + 1;
        let commit = Lsn(0x10_000 + tx_no * 0x100);
        let events = (1..=PER_SELLER)
            .map(|c| ChangeEvent {
                op: Op::Create,
                before: None,
                after: json!({"seller_id": s, "client_id": c, "name": format!("client {c}"), "position": c})
                    .as_object()
                    .cloned(),
                unchanged_toast: vec![],
                source: Source {
                    db: "read".into(),
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
            })
            .collect::<Vec<_>>();
        seq += events.len() as u64;
        txs.push(SourceTransaction {
            last_seq: seq,
            events,
        });
    }
    txs
}

/// Runs row 5 with rounds of `secs` seconds per target.
pub async fn run(bins: &Binaries, secs: f64) -> Result<RowReport> {
    // Postgres with the source table.
    let pg = testkit::Postgres::start().await?;
    let db = pg.create_database("read").await?;
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

    // The agents with the same rows, fed through the stream.
    eprintln!("  filling the views …");
    let txs = events();
    let nats = testkit::Nats::start().await?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    js.create_stream(stream::Config {
        name: pipeline::STREAM.into(),
        subjects: vec!["cdc.>".into()],
        ..Default::default()
    })
    .await?;
    let mut acks = Vec::new();
    let mut last = 0;
    for ev in txs.iter().flat_map(|tx| &tx.events) {
        acks.push(
            js.publish("cdc.public.top_clients", serde_json::to_vec(ev)?.into())
                .await?,
        );
        if acks.len() >= 4096 {
            for a in acks.drain(..) {
                last = a.await?.sequence;
            }
        }
    }
    for a in acks {
        last = a.await?.sequence;
    }
    let dir = tempfile::tempdir()?;
    let mut agents = Vec::new();
    for (name, cache_rows) in [("cache", 200_000), ("nocache", 0)] {
        let port = testkit::free_port();
        let config = pipeline::write_agent_config(
            dir.path(),
            name,
            &nats.url(),
            port,
            &AgentView {
                name: VIEW,
                table: "top_clients",
                key: &["seller_id"],
                primary_key: &["seller_id", "client_id"],
                columns: &["client_id", "name", "position"],
                column_types: &[
                    ("seller_id", "int8"),
                    ("client_id", "int8"),
                    ("position", "int4"),
                ],
            },
            &format!("[store]\nread_cache_rows = {cache_rows}\n"),
        )?;
        let agent = bins
            .spawn_agent(&config, &format!("view-agent-{name}"))
            .await?;
        let conn = pipeline::agent_conn(port);
        let status = pipeline::connect(&conn).await?;
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
        .await
        .with_context(|| agent.describe())?;
        agents.push((agent, conn));
    }
    // The same view in this process, filled without NATS.
    let store_dir = tempfile::tempdir()?;
    let store = Arc::new(ViewStore::open_at(
        store_dir.path(),
        &[ViewConfig {
            name: VIEW.into(),
            source: "public.top_clients".into(),
            key: vec!["seller_id".into()],
            primary_key: vec!["seller_id".into(), "client_id".into()],
            columns: Some(vec!["client_id".into(), "name".into(), "position".into()]),
            column_types: Default::default(),
        }],
    )?);
    for chunk in txs.chunks(512) {
        store.apply(chunk)?;
    }

    eprintln!("  {ROUNDS} rounds of {secs} s per target …");
    let pg_url = pg.url(&db);
    let sql_agent = format!("SELECT client_id, name, position FROM {VIEW} WHERE seller_id = $1");
    let sql_pg =
        "SELECT client_id, name, position FROM top_clients WHERE seller_id = $1 ORDER BY client_id";
    let mut pgwire = Tally::new()?;
    let mut pgwire_nocache = Tally::new()?;
    let mut in_process = Tally::new()?;
    let mut postgres = Tally::new()?;
    for _ in 0..ROUNDS {
        for ((agent, conn), tally) in agents.iter().zip([&mut pgwire, &mut pgwire_nocache]) {
            let pid = agent.pid();
            round_over_sql(conn, &sql_agent, secs, async |_| Ok(vec![pid]), tally).await?;
        }
        round_in_process(&store, secs, &mut in_process).await?;
        let pg_pids = async |clients: &[tokio_postgres::Client]| {
            let mut pids = Vec::new();
            for c in clients {
                let row = c.query_one("SELECT pg_backend_pid()", &[]).await?;
                pids.push(row.get::<_, i32>(0) as u32);
            }
            Ok(pids)
        };
        round_over_sql(&pg_url, sql_pg, secs, pg_pids, &mut postgres).await?;
    }
    for (agent, _) in &mut agents {
        pipeline::stop(agent).await?;
    }

    let outcomes = [
        pgwire.outcome("view-agent over pgwire", true),
        in_process.outcome("view in-process (ViewStore::get)", false),
        postgres.outcome("Postgres directly", true),
        pgwire_nocache.outcome("view-agent over pgwire, read cache off", true),
    ];
    let data = serde_json::json!({
        "clients": CLIENTS,
        "rounds": ROUNDS,
        "round_secs": secs,
        "rows_per_query": PER_SELLER,
        "sellers": SELLERS,
        "targets": &outcomes,
    });
    Ok(RowReport {
        name: "read",
        lines: vec![line(&outcomes, secs)],
        data,
        machine_busy_percent: 0.0,
    })
}

fn line(o: &[TargetOutcome; 4], secs: f64) -> Line {
    let [pgwire, in_process, postgres, nocache] = o;
    let ratio = pgwire.qps / postgres.qps.max(f64::MIN_POSITIVE);
    let round_ratios = pgwire
        .rounds_qps
        .iter()
        .zip(&postgres.rounds_qps)
        .map(|(a, p)| format!("{:.2}", a / p))
        .collect::<Vec<_>>()
        .join(", ");
    let cpu = |t: &TargetOutcome| {
        t.server_cpu_us_per_query
            .map(|s| format!("; server CPU {s:.1} µs/query"))
            .unwrap_or_default()
    };
    let us = |v: f64| {
        if v < 10.0 {
            format!("{v:.1} µs")
        } else {
            format!("{v:.0} µs")
        }
    };
    Line {
        row: 5,
        measurement: format!(
            "Read path: prepared point query `WHERE seller_id = $1` (5 rows), {CLIENTS} concurrent clients, {ROUNDS} interleaved rounds × {secs} s per target"
        ),
        result: format!(
            "pgwire (`view-agent` binary): **{} q/s**, p50 {}, p99 {}{}",
            report::rate(pgwire.qps),
            us(pgwire.p50_us),
            us(pgwire.p99_us),
            cpu(pgwire)
        ),
        beside: format!(
            "in-process `ViewStore::get`, {CLIENTS} threads: {} q/s, p50 {}, p99 {}; Postgres directly: {} q/s, p50 {}, p99 {}{} (pgwire = **{ratio:.2}×** Postgres; rounds {round_ratios}); pgwire with the read cache off: {} q/s, p99 {}",
            report::rate(in_process.qps),
            us(in_process.p50_us),
            us(in_process.p99_us),
            report::rate(postgres.qps),
            us(postgres.p50_us),
            us(postgres.p99_us),
            cpu(postgres),
            report::rate(nocache.qps),
            us(nocache.p99_us),
        ),
        targets: vec![
            Target::new("pgwire p99 ≤ 1 ms", pgwire.p99_us <= TARGET_P99_US),
            Target::new(
                format!("≥ {TARGET_RATIO:.0}× Postgres' q/s"),
                ratio >= TARGET_RATIO,
            ),
        ],
    }
}
