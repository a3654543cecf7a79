//! End to end with the real reader: Postgres → `cdc::reader::run` (in-process) → JetStream →
//! view agent (in-process or the `view-agent` binary) → sled → pgwire / Rust API.
//!
//! The source is the Top Clients schema; the workload runs multi-statement transactions of
//! inserts, updates, deletes, position swaps, moves between sellers (key-changing updates and
//! delete + insert), TOASTed logo updates, seller renames and a truncate. Every check compares
//! ALL rows of every view with the source, read from Postgres itself.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer::pull::OrderedConfig, consumer::DeliverPolicy};
use cdc::envelope::{ChangeEvent, Op, Row};
use cdc::Lsn;
use common::pg_connect;
use consumers::{Agent, AgentConfig, ViewStore};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::watch;

const STREAM: &str = "CDC";
const PREFIX: &str = "cdc";
const CATCH_UP: Duration = Duration::from_secs(90);
const SELLERS: i64 = 20;
const CLIENTS: i64 = 40;

const SCHEMA: &str = "
CREATE TABLE sellers (
    id bigint PRIMARY KEY,
    name text NOT NULL
);
CREATE TABLE top_clients (
    seller_id bigint NOT NULL REFERENCES sellers (id),
    client_id bigint NOT NULL,
    name text NOT NULL,
    logo_url text,
    position int NOT NULL,
    PRIMARY KEY (seller_id, client_id)
);
CREATE TABLE noise (id bigserial PRIMARY KEY, v int);
";

/// One view of the agent, with how to read its expected rows from the source.
struct ViewSpec {
    name: &'static str,
    toml: &'static str,
    /// A query returning the view's stored rows (key, primary key and projected columns) as
    /// JSON text, in view order (key, then primary key; text in byte order).
    expected_sql: &'static str,
    /// A key value to probe with a point query (JSON).
    probe: &'static str,
    key_column: &'static str,
}

const VIEWS: &[ViewSpec] = &[
    ViewSpec {
        name: "top_clients_by_seller",
        toml: r#"
[[views]]
name = "top_clients_by_seller"
source = "public.top_clients"
key = ["seller_id"]
primary_key = ["seller_id", "client_id"]
columns = ["client_id", "name", "logo_url", "position"]
column_types = { seller_id = "int8", client_id = "int8", position = "int4" }
"#,
        expected_sql:
            "SELECT json_build_object('seller_id', seller_id, 'client_id', client_id, 'name', name,
                              'logo_url', logo_url, 'position', position)::text
                       FROM top_clients ORDER BY seller_id, client_id",
        probe: "3",
        key_column: "seller_id",
    },
    // The seed's hybrid approach: ids only, keyed by client (which sellers list this client).
    ViewSpec {
        name: "sellers_of_client",
        toml: r#"
[[views]]
name = "sellers_of_client"
source = "public.top_clients"
key = ["client_id"]
primary_key = ["seller_id", "client_id"]
columns = ["seller_id"]
column_types = { seller_id = "int8", client_id = "int8" }
"#,
        expected_sql:
            "SELECT json_build_object('client_id', client_id, 'seller_id', seller_id)::text
                       FROM top_clients ORDER BY client_id, seller_id",
        probe: "5",
        key_column: "client_id",
    },
    // A key outside the primary key: rows move on renames (the `p…` index path).
    ViewSpec {
        name: "clients_by_name",
        toml: r#"
[[views]]
name = "clients_by_name"
source = "public.top_clients"
key = ["name"]
primary_key = ["seller_id", "client_id"]
columns = ["position"]
column_types = { seller_id = "int8", client_id = "int8", position = "int4" }
"#,
        expected_sql:
            "SELECT json_build_object('name', name, 'seller_id', seller_id, 'client_id', client_id,
                              'position', position)::text
                       FROM top_clients ORDER BY name COLLATE \"C\", seller_id, client_id",
        probe: "\"c7\"",
        key_column: "name",
    },
    // Whole rows (no projection).
    ViewSpec {
        name: "sellers",
        toml: r#"
[[views]]
name = "sellers"
source = "public.sellers"
key = ["id"]
primary_key = ["id"]
column_types = { id = "int8" }
"#,
        expected_sql: "SELECT row_to_json(s)::text FROM sellers s ORDER BY id",
        probe: "4",
        key_column: "id",
    },
];

/// A small deterministic PRNG (xorshift), so runs are reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn int(&mut self, n: i64) -> i64 {
        self.below(n as u64) as i64
    }
    /// Incompressible text of `len` hex digits (stored out of line by TOAST above ~2 kB).
    fn hex(&mut self, len: usize) -> String {
        let mut s = String::with_capacity(len + 16);
        while s.len() < len {
            s.push_str(&format!("{:016x}", self.next()));
        }
        s.truncate(len);
        s
    }
}

/// Postgres, NATS and the reader running in-process.
struct Env {
    pg: testkit::Postgres,
    nats: testkit::Nats,
    db: String,
    dir: tempfile::TempDir,
    reader_stop: watch::Sender<bool>,
    /// The reader runs on a thread of its own with a current-thread runtime: the future of
    /// `cdc::reader::run` is not `Send` (it holds a watch guard across an await), so it cannot
    /// be a task of the multi-threaded test runtime.
    reader: std::thread::JoinHandle<Result<()>>,
}

impl Env {
    /// Starts the servers, creates the schema, starts the reader and waits until its slot is
    /// active (changes from then on reach the stream), then inserts the sellers.
    async fn start() -> Result<Env> {
        let pg = testkit::Postgres::start().await?;
        let nats = testkit::Nats::start().await?;
        let db = pg.create_database("e2e").await?;
        pg.batch_execute(&db, SCHEMA).await?;
        let text = format!(
            "[postgres]\nurl = {url:?}\nslot = \"cdc_slot\"\npublication = \"cdc_pub\"\n\
             tables = [\"public.sellers\", \"public.top_clients\"]\n\n\
             [nats]\nurl = {nats:?}\nstream = {STREAM:?}\nsubject_prefix = {PREFIX:?}\n",
            url = pg.url(&db),
            nats = nats.url(),
        );
        let cfg = cdc::config::CdcConfig::parse(&text)?;
        cfg.validate()?;
        let (reader_stop, rx) = watch::channel(false);
        let reader = std::thread::Builder::new()
            .name("cdc-reader".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(cdc::reader::run(cfg, rx))
                    .map_err(anyhow::Error::from)
            })?;
        let sql = pg.connect(&db).await?;
        testkit::until(
            Duration::from_secs(60),
            "the reader's slot to be active",
            || async {
                let row = sql
                .query_opt(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'cdc_slot' AND active",
                    &[],
                )
                .await
                .ok()?;
                row.map(|_| ())
            },
        )
        .await?;
        sql.batch_execute(&format!(
            "INSERT INTO sellers SELECT s, 'seller ' || s FROM generate_series(0, {}) s",
            SELLERS - 1
        ))
        .await?;
        Ok(Env {
            pg,
            nats,
            db,
            dir: tempfile::tempdir()?,
            reader_stop,
            reader,
        })
    }

    async fn sql(&self) -> Result<tokio_postgres::Client> {
        self.pg.connect(&self.db).await
    }

    /// The agent's TOML config (all views), data in `dir/<name>`.
    fn agent_toml(&self, name: &str, listen: &str) -> String {
        let mut text = format!(
            "name = {name:?}\ndata_dir = {data:?}\n\n[nats]\nurl = {url:?}\nstream = {STREAM:?}\n\
             subject_prefix = {PREFIX:?}\n\n[pgwire]\nlisten = {listen:?}\nmin_lsn_timeout_ms = 60000\n",
            data = self.dir.path().join(name).display().to_string(),
            url = self.nats.url(),
        );
        for v in VIEWS {
            text.push_str(v.toml);
        }
        text
    }

    fn agent_config(&self, name: &str) -> Result<AgentConfig> {
        let cfg = AgentConfig::parse(&self.agent_toml(name, "127.0.0.1:0"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Stops the reader and checks it ended cleanly.
    async fn stop_reader(self) -> Result<()> {
        let _ = self.reader_stop.send(true);
        let reader = self.reader;
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || reader.join()),
        )
        .await
        .context("reader shutdown")??
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
        Ok(())
    }
}

/// The source's current WAL position.
async fn current_lsn(sql: &tokio_postgres::Client) -> Result<Lsn> {
    let row = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?;
    let text: String = row.get(0);
    text.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

/// The expected rows of every view, read from the source.
async fn expected_rows(sql: &tokio_postgres::Client) -> Result<BTreeMap<&'static str, Vec<Row>>> {
    let mut out = BTreeMap::new();
    for v in VIEWS {
        let rows = sql.query(v.expected_sql, &[]).await?;
        let rows = rows
            .iter()
            .map(|r| {
                let text: String = r.get(0);
                serde_json::from_str::<Row>(&text).map_err(anyhow::Error::from)
            })
            .collect::<Result<Vec<Row>>>()?;
        out.insert(v.name, rows);
    }
    Ok(out)
}

/// Every view through the Rust API equals the source, row for row and in order.
fn assert_views_equal(store: &ViewStore, want: &BTreeMap<&'static str, Vec<Row>>) -> Result<()> {
    for v in VIEWS {
        let got = store.scan(v.name, usize::MAX, false)?.rows;
        let want = &want[v.name];
        if got != *want {
            let first = got
                .iter()
                .zip(want.iter())
                .position(|(g, w)| g != w)
                .unwrap_or(got.len().min(want.len()));
            anyhow::bail!(
                "view {} differs from the source: {} rows vs {} expected; first difference at row {first}:\n got  {:?}\n want {:?}",
                v.name,
                got.len(),
                want.len(),
                got.get(first),
                want.get(first)
            );
        }
    }
    Ok(())
}

type ClientRow = (i64, i64, String, Option<String>, i32);

/// The main view over pgwire, all rows, typed.
async fn pgwire_rows(pg: &tokio_postgres::Client) -> Result<Vec<ClientRow>> {
    let rows = pg
        .query(
            "SELECT seller_id, client_id, name, logo_url, position FROM top_clients_by_seller",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect())
}

async fn source_rows(sql: &tokio_postgres::Client) -> Result<Vec<ClientRow>> {
    let rows = sql
        .query(
            "SELECT seller_id, client_id, name, logo_url, position FROM top_clients ORDER BY seller_id, client_id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect())
}

/// What a workload did, for checking that the test covers what it claims.
#[derive(Default, Debug)]
struct Counts {
    transactions: u64,
    statements: u64,
}

/// Random Top Clients transactions.
struct Workload {
    rng: Rng,
    counts: Counts,
}

impl Workload {
    fn new(seed: u64) -> Workload {
        Workload {
            rng: Rng(seed),
            counts: Counts::default(),
        }
    }

    /// One transaction of 1..6 statements.
    async fn transaction(&mut self, sql: &mut tokio_postgres::Client) -> Result<()> {
        let n = 1 + self.rng.below(6);
        let tx = sql.transaction().await?;
        for _ in 0..n {
            let rng = &mut self.rng;
            let seller = rng.int(SELLERS);
            let client = rng.int(CLIENTS);
            match rng.below(100) {
                // Insert, or update name and position (logo_url untouched: TOAST stays).
                0..=34 => {
                    let logo = match rng.below(10) {
                        0 => None,
                        1 => Some(rng.hex(6000)),
                        _ => Some(format!("https://logos.example/{}.png", rng.below(1000))),
                    };
                    tx.execute(
                        "INSERT INTO top_clients VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (seller_id, client_id)
                         DO UPDATE SET name = excluded.name, position = excluded.position",
                        &[
                            &seller,
                            &client,
                            &format!("c{}", rng.below(30)),
                            &logo,
                            &(rng.below(10) as i32),
                        ],
                    )
                    .await?;
                }
                // Rename (moves the row in clients_by_name).
                35..=49 => {
                    tx.execute(
                        "UPDATE top_clients SET name = $3 WHERE seller_id = $1 AND client_id = $2",
                        &[&seller, &client, &format!("c{}", rng.below(30))],
                    )
                    .await?;
                }
                50..=61 => {
                    tx.execute(
                        "DELETE FROM top_clients WHERE seller_id = $1 AND client_id = $2",
                        &[&seller, &client],
                    )
                    .await?;
                }
                // Swap the positions of two clients of one seller.
                62..=74 => {
                    let other = rng.int(CLIENTS);
                    let rows = tx
                        .query(
                            "SELECT client_id, position FROM top_clients
                             WHERE seller_id = $1 AND client_id IN ($2, $3) FOR UPDATE",
                            &[&seller, &client, &other],
                        )
                        .await?;
                    if rows.len() == 2 {
                        let (a, pa): (i64, i32) = (rows[0].get(0), rows[0].get(1));
                        let (b, pb): (i64, i32) = (rows[1].get(0), rows[1].get(1));
                        for (c, p) in [(a, pb), (b, pa)] {
                            tx.execute(
                                "UPDATE top_clients SET position = $3 WHERE seller_id = $1 AND client_id = $2",
                                &[&seller, &c, &p],
                            )
                            .await?;
                        }
                    }
                }
                // Move to another seller with a key-changing update.
                75..=84 => {
                    let to = rng.int(SELLERS);
                    tx.execute(
                        "UPDATE top_clients SET seller_id = $3 WHERE seller_id = $1 AND client_id = $2
                         AND NOT EXISTS (SELECT 1 FROM top_clients WHERE seller_id = $3 AND client_id = $2)",
                        &[&seller, &client, &to],
                    )
                    .await?;
                }
                // Move to another seller as delete + insert.
                85..=91 => {
                    let to = rng.int(SELLERS);
                    tx.execute(
                        "WITH d AS (DELETE FROM top_clients WHERE seller_id = $1 AND client_id = $2
                                    AND NOT EXISTS (SELECT 1 FROM top_clients WHERE seller_id = $3 AND client_id = $2)
                                    RETURNING *)
                         INSERT INTO top_clients SELECT $3, client_id, name, logo_url, position FROM d",
                        &[&seller, &client, &to],
                    )
                    .await?;
                }
                // A large (TOASTed) or removed logo.
                92..=95 => {
                    let logo = (rng.below(3) != 0).then(|| rng.hex(8000));
                    tx.execute(
                        "UPDATE top_clients SET logo_url = $3 WHERE seller_id = $1 AND client_id = $2",
                        &[&seller, &client, &logo],
                    )
                    .await?;
                }
                _ => {
                    tx.execute(
                        "UPDATE sellers SET name = $2 WHERE id = $1",
                        &[&seller, &format!("seller {seller} v{}", rng.below(1000))],
                    )
                    .await?;
                }
            }
            self.counts.statements += 1;
        }
        tx.commit().await?;
        self.counts.transactions += 1;
        Ok(())
    }
}

/// Operation counts in the stream (op code → events), and events with unchanged TOAST columns.
async fn stream_ops(nats_url: &str) -> Result<(BTreeMap<&'static str, u64>, u64)> {
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    let mut stream = js.get_stream(STREAM).await?;
    let last = stream.info().await?.state.last_sequence;
    let mut msgs = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let mut ops = BTreeMap::new();
    let mut toast = 0;
    while let Some(m) = tokio::time::timeout(Duration::from_secs(10), msgs.next()).await? {
        let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
        let seq = m
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        if m.subject.as_str() != format!("{PREFIX}._heartbeat") && !m.payload.is_empty() {
            let ev: ChangeEvent = serde_json::from_slice(&m.payload)?;
            *ops.entry(ev.op.code()).or_default() += 1;
            if !ev.unchanged_toast.is_empty() {
                toast += 1;
            }
            let moved = |c: &str| {
                ev.before.as_ref().and_then(|b| b.get(c))
                    != ev.after.as_ref().and_then(|a| a.get(c))
            };
            if ev.op == Op::Update && moved("seller_id") {
                *ops.entry("u+key").or_default() += 1;
            }
        }
        if seq >= last {
            break;
        }
    }
    Ok((ops, toast))
}

/// (a) A workload through the real reader; the agent's views equal the source row for row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_equal_the_source_after_a_real_workload() -> Result<()> {
    let env = Env::start().await?;
    let agent = Agent::start(env.agent_config("a")?).await?;
    let mut sql = env.sql().await?;
    let mut work = Workload::new(0x5EED_0001);
    for i in 0..1_500 {
        work.transaction(&mut sql).await?;
        if i == 700 {
            // Mid-way: wait until the agent has caught up and compare, then truncate.
            let lsn = current_lsn(&sql).await?;
            agent.wait_for_lsn(lsn, CATCH_UP).await?;
            assert_views_equal(agent.store(), &expected_rows(&sql).await?)?;
            sql.batch_execute("TRUNCATE top_clients").await?;
        }
    }
    let lsn = current_lsn(&sql).await?;
    agent.wait_for_lsn(lsn, CATCH_UP).await?;
    let want = expected_rows(&sql).await?;
    assert!(
        want["top_clients_by_seller"].len() > 100,
        "the workload left too few rows to mean much"
    );
    assert_views_equal(agent.store(), &want)?;
    // The same over pgwire.
    let port = agent.pgwire_addr().context("pgwire")?.port();
    let pg = pg_connect(port).await?;
    assert_eq!(pgwire_rows(&pg).await?, source_rows(&sql).await?);
    // The workload really exercised key moves, deletes, truncate and unchanged TOAST values.
    let (ops, toast) = stream_ops(&env.nats.url()).await?;
    for op in ["c", "u", "d", "t", "u+key"] {
        assert!(
            ops.get(op).copied().unwrap_or(0) > 0,
            "no {op:?} events: {ops:?}"
        );
    }
    assert!(toast > 0, "no event with unchanged TOAST columns: {ops:?}");
    println!(
        "workload {:?}; stream {ops:?}, {toast} with unchanged TOAST",
        work.counts
    );
    agent.shutdown().await?;
    env.stop_reader().await
}

/// Applied sequence as reported by `cdc_status`, or `None` while the agent is not answering.
async fn applied_seq(port: u16) -> Option<i64> {
    let pg = pg_connect(port).await.ok()?;
    let rows = pg
        .query("SELECT applied_seq FROM cdc_status", &[])
        .await
        .ok()?;
    rows.first().map(|r| r.get(0))
}

/// (b) The `view-agent` binary killed -9 twenty times while the real reader streams a
/// workload; at the end every view equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_killed_twenty_times_with_the_real_reader() -> Result<()> {
    const KILLS: usize = 20;
    let env = Env::start().await?;
    let port = testkit::free_port();
    let config = env.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        env.agent_toml("crash", &format!("127.0.0.1:{port}")),
    )?;
    let agent_cmd = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_view-agent"));
        cmd.arg("run").arg("--config").arg(&config);
        cmd.env("RUST_LOG", "warn");
        cmd
    };
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut sql = env.sql().await?;
        let done = done.clone();
        tokio::spawn(async move {
            let mut work = Workload::new(0x5EED_0002);
            while !done.load(Ordering::Relaxed) || work.counts.transactions < 1_000 {
                work.transaction(&mut sql).await?;
            }
            anyhow::Ok(work.counts)
        })
    };
    let mut rng = Rng(7);
    let mut previous = 0i64;
    for kill in 0..KILLS {
        let mut agent = testkit::spawn_logged(agent_cmd(), &format!("view-agent#{kill}"))?;
        agent.wait_for_output("view-agent ready", CATCH_UP).await?;
        // Kill after 1..150 more messages are applied, at a random point of progress.
        let target = previous + 1 + rng.below(150) as i64;
        let reached = testkit::until(CATCH_UP, "agent progress", || async {
            applied_seq(port).await.filter(|s| *s >= target)
        })
        .await
        .with_context(|| agent.describe())?;
        agent.kill9()?;
        previous = reached;
    }
    done.store(true, Ordering::Relaxed);
    let counts = writer.await??;
    let sql = env.sql().await?;
    let lsn = current_lsn(&sql).await?;
    let mut agent = testkit::spawn_logged(agent_cmd(), "view-agent-final")?;
    agent.wait_for_output("view-agent ready", CATCH_UP).await?;
    let pg = pg_connect(port).await?;
    pg.batch_execute(&format!(
        "SET cdc.min_lsn = '{lsn}'; SET cdc.min_lsn_timeout = '90s'"
    ))
    .await?;
    let got = pgwire_rows(&pg).await?;
    let want = source_rows(&sql).await?;
    assert_eq!(got.len(), want.len(), "row count");
    assert_eq!(got, want, "view differs from the source");
    // The other views, compared as JSON rows over pgwire.
    let expected = expected_rows(&sql).await?;
    for v in VIEWS.iter().skip(1) {
        let rows = pg
            .simple_query(&format!("SELECT * FROM {}", v.name))
            .await?;
        let n = rows
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        assert_eq!(n, expected[v.name].len(), "row count of {}", v.name);
    }
    println!("{KILLS} kills during {counts:?}");
    agent.signal(testkit::Signal::Term)?;
    let status = agent.wait_with_timeout(Duration::from_secs(30)).await?;
    assert!(status.success(), "exit after SIGTERM: {status}");
    // Reopen the store: every view equals the source row for row.
    let store = ViewStore::open(&AgentConfig::load(&config)?)?;
    assert_views_equal(&store, &expected)?;
    drop(store);
    env.stop_reader().await
}

/// (c) Read-your-writes through pgwire, 1,000 iterations: write → `pg_current_wal_lsn()` →
/// `SET cdc.min_lsn` → query. The second half runs beside a writer on an unpublished table, so
/// keepalives between transactions are rarer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_through_pgwire_never_misses() -> Result<()> {
    const ITERATIONS: usize = 1_000;
    let env = Env::start().await?;
    let agent = Agent::start(env.agent_config("ryw")?).await?;
    let port = agent.pgwire_addr().context("pgwire")?.port();
    let sql = env.sql().await?;
    sql.batch_execute(
        "INSERT INTO top_clients SELECT s, 1, 'c', NULL, 1 FROM generate_series(0, 19) s",
    )
    .await?;
    let pg = pg_connect(port).await?;
    pg.batch_execute("SET cdc.min_lsn_timeout = '5s'").await?;
    let query = pg
        .prepare("SELECT name FROM top_clients_by_seller WHERE seller_id = $1")
        .await?;
    let noise_stop = Arc::new(AtomicBool::new(false));
    let mut noise = None;
    let mut misses = Vec::new();
    let mut waits = Vec::with_capacity(ITERATIONS);
    for i in 0..ITERATIONS {
        if i == ITERATIONS / 2 {
            let noise_sql = env.sql().await?;
            let stop = noise_stop.clone();
            noise = Some(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    noise_sql
                        .execute("INSERT INTO noise (v) VALUES (1)", &[])
                        .await?;
                    n += 1;
                }
                anyhow::Ok(n)
            }));
        }
        let seller = (i % 20) as i64;
        let name = format!("ryw {i}");
        sql.execute(
            "UPDATE top_clients SET name = $2 WHERE seller_id = $1 AND client_id = 1",
            &[&seller, &name],
        )
        .await?;
        let lsn = current_lsn(&sql).await?;
        let t = Instant::now();
        pg.batch_execute(&format!("SET cdc.min_lsn = '{lsn}'"))
            .await?;
        match pg.query(&query, &[&seller]).await {
            Ok(rows) => {
                waits.push(t.elapsed());
                let got: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                if got != [name.clone()] {
                    misses.push(format!(
                        "iteration {i}: wanted {name:?} at {lsn}, got {got:?}"
                    ));
                }
            }
            Err(e) => misses.push(format!(
                "iteration {i}: {lsn}: {} (agent progress {:?})",
                e.as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_owned()),
                agent.store().progress()
            )),
        }
    }
    noise_stop.store(true, Ordering::Relaxed);
    let noise_writes = match noise {
        Some(n) => n.await??,
        None => 0,
    };
    waits.sort();
    println!(
        "read-your-writes: {ITERATIONS} iterations ({noise_writes} concurrent noise writes), {} misses; wait p50 {:?} p99 {:?} max {:?}",
        misses.len(),
        waits.get(waits.len() / 2),
        waits.get(waits.len() * 99 / 100),
        waits.last()
    );
    assert!(
        misses.is_empty(),
        "{} misses:\n{}",
        misses.len(),
        misses.join("\n")
    );
    agent.shutdown().await?;
    env.stop_reader().await
}

/// (d) With Postgres AND NATS stopped, every view answers over pgwire and through the Rust
/// API, as of the last applied transaction; once both are back the agent catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_answer_with_postgres_and_nats_down() -> Result<()> {
    let mut env = Env::start().await?;
    let agent = Agent::start(env.agent_config("avail")?).await?;
    let port = agent.pgwire_addr().context("pgwire")?.port();
    let mut sql = env.sql().await?;
    let mut work = Workload::new(0x5EED_0004);
    for _ in 0..300 {
        work.transaction(&mut sql).await?;
    }
    let lsn = current_lsn(&sql).await?;
    agent.wait_for_lsn(lsn, CATCH_UP).await?;
    let want = expected_rows(&sql).await?;
    let want_pg = source_rows(&sql).await?;
    let pg_before = pg_connect(port).await?;
    drop(sql);

    env.pg.stop().await?;
    env.nats.stop().await?;
    // The agent has noticed: its views answer while it is cut off, not before.
    testkit::until(CATCH_UP, "the agent to see NATS gone", || async {
        (!agent.nats_connected()).then_some(())
    })
    .await?;

    assert_views_equal(agent.store(), &want)?;
    for v in VIEWS {
        let probe: Value = serde_json::from_str(v.probe)?;
        // Rust API: a point lookup equals the expected rows of that key.
        let key_rows: Vec<&Row> = want[v.name]
            .iter()
            .filter(|r| r.get(v.key_column) == Some(&probe))
            .collect();
        let got = agent.get(v.name, std::slice::from_ref(&probe))?;
        assert_eq!(
            got.iter().collect::<Vec<_>>(),
            key_rows,
            "get on {}",
            v.name
        );
        // pgwire: a new connection and the old one, point query and full scan.
        let pg = pg_connect(port).await?;
        for client in [&pg, &pg_before] {
            let rows = client
                .simple_query(&format!(
                    "SELECT * FROM {} WHERE {} = {}",
                    v.name,
                    v.key_column,
                    match &probe {
                        Value::String(s) => format!("'{s}'"),
                        other => other.to_string(),
                    }
                ))
                .await?;
            let n = rows
                .iter()
                .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                .count();
            assert_eq!(n, key_rows.len(), "pgwire point query on {}", v.name);
            let all = client
                .simple_query(&format!("SELECT * FROM {}", v.name))
                .await?;
            let n = all
                .iter()
                .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
                .count();
            assert_eq!(n, want[v.name].len(), "pgwire scan of {}", v.name);
        }
    }
    assert_eq!(pgwire_rows(&pg_before).await?, want_pg);
    let status = pg_before
        .query("SELECT view, stale FROM cdc_status", &[])
        .await?;
    assert_eq!(status.len(), VIEWS.len());
    assert!(status.iter().all(|r| !r.get::<_, bool>(1)));

    // Both back: new writes arrive.
    env.nats.start_again().await?;
    env.pg.start_again().await?;
    let mut sql = env.sql().await?;
    for _ in 0..100 {
        work.transaction(&mut sql).await?;
    }
    let lsn = current_lsn(&sql).await?;
    agent.wait_for_lsn(lsn, CATCH_UP).await?;
    assert_views_equal(agent.store(), &expected_rows(&sql).await?)?;
    agent.shutdown().await?;
    env.stop_reader().await
}

/// A view added to the config of an agent that already follows the stream has none of the
/// rows written before: the agent marks it stale, asks the reader for a snapshot of its source
/// table, and the snapshot (while writes go on) makes it equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_added_later_is_filled_by_the_snapshot_it_requests() -> Result<()> {
    let env = Env::start().await?;
    let header = |listen: &str| {
        format!(
            "name = \"late\"\ndata_dir = {data:?}\n\n[nats]\nurl = {url:?}\nstream = {STREAM:?}\n\
             subject_prefix = {PREFIX:?}\n\n[pgwire]\nlisten = {listen:?}\n",
            data = env.dir.path().join("late").display().to_string(),
            url = env.nats.url(),
        )
    };
    let (first, added) = (&VIEWS[0], &VIEWS[1]);
    let config = |views: &[&ViewSpec]| -> Result<AgentConfig> {
        let mut text = header("");
        for v in views {
            text.push_str(v.toml);
        }
        let cfg = AgentConfig::parse(&text)?;
        cfg.validate()?;
        Ok(cfg)
    };
    let mut sql = env.sql().await?;
    let mut work = Workload::new(0x5EED_0005);
    let agent = Agent::start(config(&[first])?).await?;
    for _ in 0..300 {
        work.transaction(&mut sql).await?;
    }
    agent
        .wait_for_lsn(current_lsn(&sql).await?, CATCH_UP)
        .await?;
    agent.shutdown().await?;

    let agent = Agent::start(config(&[first, added])?).await?;
    let status = |agent: &Agent| {
        agent
            .store()
            .status()
            .into_iter()
            .find(|s| s.view == added.name)
            .and_then(|s| s.stale)
    };
    let stale = status(&agent).context("the added view is not stale at first")?;
    assert!(
        stale.starts_with(consumers::store::AWAITING_SNAPSHOT_PREFIX),
        "{stale}"
    );
    // Writes go on while the snapshot runs.
    for _ in 0..150 {
        work.transaction(&mut sql).await?;
    }
    testkit::until(CATCH_UP, "the added view to be filled", || async {
        status(&agent).is_none().then_some(())
    })
    .await?;
    agent
        .wait_for_lsn(current_lsn(&sql).await?, CATCH_UP)
        .await?;
    for v in [first, added] {
        let want: Vec<Row> = sql
            .query(v.expected_sql, &[])
            .await?
            .iter()
            .map(|r| serde_json::from_str::<Row>(&r.get::<_, String>(0)))
            .collect::<Result<_, _>>()?;
        let got = agent.store().scan(v.name, usize::MAX, false)?.rows;
        assert!(want.len() > 20, "too few rows in {}", v.name);
        assert_eq!(got, want, "view {} differs from the source", v.name);
    }
    agent.shutdown().await?;
    env.stop_reader().await
}
