//! Shared test fixtures: a private NATS with the CDC stream, a simulated source table that emits
//! exactly what the reader publishes, and agent configs.
//!
//! `publish_transaction` is the seam for the real reader: once `cdc` runs in tests, the same
//! checks can drive Postgres writes through it instead.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use cdc::envelope::{
    ChangeEvent, Op, Row, TransactionInfo, HEADER_COMMIT_LSN, HEADER_LARGE_REF, HEADER_MSG_ID,
    HEADER_OP, HEADER_TABLE,
};
use cdc::Lsn;
use consumers::config::{AgentConfig, ApplyConfig, NatsConfig, PgwireConfig, ViewConfig};
use serde_json::{json, Value};

pub const STREAM: &str = "CDC";
pub const PREFIX: &str = "cdc";
pub const VIEW: &str = "top_clients_by_seller";
pub const WAIT: Duration = Duration::from_secs(20);

/// A private NATS server with the stream created.
pub struct Harness {
    pub nats: testkit::Nats,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub async fn start() -> Result<Harness> {
        Self::start_with(|_| {}).await
    }

    /// Starts NATS and creates the stream, letting `tweak` change its config (e.g. `max_messages`).
    pub async fn start_with(tweak: impl FnOnce(&mut stream::Config)) -> Result<Harness> {
        let nats = testkit::Nats::start().await?;
        let client = async_nats::connect(nats.url()).await?;
        let js = jetstream::new(client.clone());
        let mut cfg = stream::Config {
            name: STREAM.into(),
            subjects: vec![format!("{PREFIX}.>")],
            allow_rollup: true,
            ..Default::default()
        };
        tweak(&mut cfg);
        js.create_stream(cfg).await?;
        Ok(Harness {
            nats,
            client,
            js,
            dir: tempfile::tempdir()?,
        })
    }

    /// An agent config with the standard view, data in `dir/<name>`, pgwire on `listen`.
    pub fn agent_config(&self, name: &str, listen: &str) -> AgentConfig {
        AgentConfig {
            name: name.into(),
            data_dir: self.dir.path().join(name),
            nats: NatsConfig {
                url: self.nats.url(),
                stream: STREAM.into(),
                subject_prefix: PREFIX.into(),
            },
            pgwire: PgwireConfig {
                listen: listen.into(),
                min_lsn_timeout_ms: 5_000,
                ..PgwireConfig::default()
            },
            apply: ApplyConfig::default(),
            store: Default::default(),
            metrics: Default::default(),
            views: vec![standard_view()],
        }
    }

    /// Writes the TOML config for the `view-agent` binary.
    pub fn write_config(&self, name: &str, port: u16) -> Result<PathBuf> {
        self.write_config_with(name, port, "")
    }

    /// Like [`Harness::write_config`], with `extra` TOML tables (e.g. `[apply]`) added.
    pub fn write_config_with(&self, name: &str, port: u16, extra: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.toml"));
        let text = format!(
            r#"
name = "{name}"
data_dir = "{data}"

[nats]
url = "{url}"
stream = "{STREAM}"
subject_prefix = "{PREFIX}"

[pgwire]
listen = "127.0.0.1:{port}"
{extra}
[[views]]
name = "{VIEW}"
source = "public.top_clients"
key = ["seller_id"]
primary_key = ["seller_id", "client_id"]
columns = ["client_id", "name", "position"]
column_types = {{ seller_id = "int8", client_id = "int8", position = "int4" }}
"#,
            data = self.dir.path().join(name).display(),
            url = self.nats.url(),
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// Publishes transactions until `done`: even ones swap the positions of seller 1's clients 10
/// and 11, odd ones move client 50 between sellers 2 and 3 (delete + insert). Returns the last
/// sequence published (`last` if none) and the model.
pub fn spawn_swap_and_move_writer(
    js: jetstream::Context,
    mut src: Source,
    mut last: u64,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Result<(u64, Source)>> {
    tokio::spawn(async move {
        let mut i = 0u64;
        let mut seller = 2;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            let tx = if i.is_multiple_of(2) {
                let (p10, p11) = if (i / 2).is_multiple_of(2) {
                    (2, 1)
                } else {
                    (1, 2)
                };
                src.transaction(&[
                    Change::Upsert(1, 10, "a".into(), p10),
                    Change::Upsert(1, 11, "b".into(), p11),
                ])
            } else {
                let to = if seller == 2 { 3 } else { 2 };
                let tx = src.transaction(&[
                    Change::Delete(seller, 50),
                    Change::Upsert(to, 50, "m".into(), 1),
                ]);
                seller = to;
                tx
            };
            last = publish_transaction(&js, &tx).await?;
            i += 1;
        }
        anyhow::Ok((last, src))
    })
}

/// `view-agent run --config <config>` with warnings logged.
pub fn agent_cmd(config: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_view-agent"));
    cmd.arg("run").arg("--config").arg(config);
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Sends SIGTERM to an agent process and checks it exits 0 within [`WAIT`].
pub async fn stop_agent(agent: &mut testkit::ChildProcess) -> Result<()> {
    agent.signal(testkit::Signal::Term)?;
    let status = agent.wait_with_timeout(WAIT).await?;
    anyhow::ensure!(status.success(), "exit after SIGTERM: {status}");
    Ok(())
}

pub fn standard_view() -> ViewConfig {
    ViewConfig {
        name: VIEW.into(),
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
    }
}

/// Percent-encodes a subject token the way the reader does.
pub fn subject_token(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn headers(ev: &ChangeEvent) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HEADER_MSG_ID, ev.msg_id().as_str());
    h.insert(HEADER_OP, ev.op.code());
    h.insert(HEADER_TABLE, ev.table_name().as_str());
    h.insert(HEADER_COMMIT_LSN, ev.source.commit_lsn.to_string().as_str());
    h
}

fn subject(ev: &ChangeEvent) -> String {
    format!(
        "{PREFIX}.{}.{}",
        subject_token(&ev.source.schema),
        subject_token(&ev.source.table)
    )
}

/// Publishes one source transaction exactly as the reader does; returns the last sequence.
pub async fn publish_transaction(js: &jetstream::Context, events: &[ChangeEvent]) -> Result<u64> {
    // A bounded window of unacknowledged publishes: async-nats caps acks in flight, and a
    // publish past the cap waits for one to be awaited.
    const WINDOW: usize = 1_000;
    let mut acks: std::collections::VecDeque<jetstream::context::PublishAckFuture> =
        std::collections::VecDeque::with_capacity(WINDOW);
    let mut last = 0;
    for ev in events {
        let body = serde_json::to_vec(ev)?;
        if acks.len() == WINDOW {
            if let Some(a) = acks.pop_front() {
                last = a.await?.sequence;
            }
        }
        acks.push_back(
            js.publish_with_headers(subject(ev), headers(ev), body.into())
                .await?,
        );
    }
    for a in acks {
        last = a.await?.sequence;
    }
    Ok(last)
}

/// Publishes an event whose body lives in the `<stream>_LARGE` object store.
pub async fn publish_large(js: &jetstream::Context, ev: &ChangeEvent) -> Result<u64> {
    let bucket = format!("{STREAM}_LARGE");
    let os = match js.get_object_store(&bucket).await {
        Ok(os) => os,
        Err(_) => {
            js.create_object_store(jetstream::object_store::Config {
                bucket: bucket.clone(),
                ..Default::default()
            })
            .await?
        }
    };
    let name = ev.msg_id();
    let body = serde_json::to_vec(ev)?;
    os.put(name.as_str(), &mut body.as_slice()).await?;
    let mut h = headers(ev);
    h.insert(HEADER_LARGE_REF, name.as_str());
    Ok(js
        .publish_with_headers(subject(ev), h, bytes::Bytes::new())
        .await?
        .await?
        .sequence)
}

/// Publishes a heartbeat (with `Nats-Rollup: sub`, as the reader may).
pub async fn publish_heartbeat(js: &jetstream::Context, lsn: Lsn) -> Result<u64> {
    let mut h = HeaderMap::new();
    if std::env::var_os("NO_ROLLUP").is_none() {
        h.insert("Nats-Rollup", "sub");
    }
    let body = serde_json::to_vec(&json!({ "lsn": lsn.to_string() }))?;
    Ok(js
        .publish_with_headers(format!("{PREFIX}._heartbeat"), h, body.into())
        .await?
        .await?
        .sequence)
}

/// A simulated `public.top_clients (seller_id, client_id, name, position)` table with primary
/// key (seller_id, client_id). Each method returns one transaction's events and updates the
/// model, so `rows` is always the expected view.
#[derive(Default)]
pub struct Source {
    pub rows: BTreeMap<(i64, i64), Row>,
    pub lsn: u64,
    pub tx_id: u32,
}

pub enum Change {
    Upsert(i64, i64, String, i64),
    Delete(i64, i64),
    /// (old seller, client, new seller): a key-changing update.
    Move(i64, i64, i64),
}

pub fn row_of(seller: i64, client: i64, name: &str, position: i64) -> Row {
    match json!({"seller_id": seller, "client_id": client, "name": name, "position": position}) {
        Value::Object(m) => m,
        _ => Row::new(),
    }
}

impl Source {
    pub fn new() -> Self {
        Source {
            lsn: 0x1000,
            ..Default::default()
        }
    }

    /// Applies changes to the model as one transaction and returns its events.
    pub fn transaction(&mut self, changes: &[Change]) -> Vec<ChangeEvent> {
        self.tx_id += 1;
        self.lsn += 0x100;
        let commit = Lsn(self.lsn);
        let mut events = Vec::new();
        for c in changes {
            let (op, before, after) = match c {
                Change::Upsert(s, cl, name, pos) => {
                    let row = row_of(*s, *cl, name, *pos);
                    let op = if self.rows.contains_key(&(*s, *cl)) {
                        Op::Update
                    } else {
                        Op::Create
                    };
                    self.rows.insert((*s, *cl), row.clone());
                    (op, None, Some(row))
                }
                Change::Delete(s, cl) => {
                    if self.rows.remove(&(*s, *cl)).is_none() {
                        continue;
                    }
                    (Op::Delete, Some(key(*s, *cl)), None)
                }
                Change::Move(s, cl, to) => {
                    let Some(mut row) = self.rows.remove(&(*s, *cl)) else {
                        continue;
                    };
                    row.insert("seller_id".into(), json!(*to));
                    self.rows.insert((*to, *cl), row.clone());
                    (Op::Update, Some(key(*s, *cl)), Some(row))
                }
            };
            events.push((op, before, after));
        }
        let n = events.len() as u64;
        events
            .into_iter()
            .enumerate()
            .map(|(i, (op, before, after))| ChangeEvent {
                op,
                before,
                after,
                unchanged_toast: vec![],
                source: Source_ {
                    db: "topclients".into(),
                    schema: "public".into(),
                    table: "top_clients".into(),
                    lsn: Lsn(commit.0 - 0x80 + i as u64),
                    commit_lsn: commit,
                    tx_id: Some(self.tx_id),
                    ts_ms: 0,
                    snapshot: false,
                },
                transaction: Some(TransactionInfo {
                    id: format!("{}:{commit}", self.tx_id),
                    total_order: i as u64 + 1,
                    data_collection_order: i as u64 + 1,
                    last: i as u64 + 1 == n,
                }),
                ts_ms: 0,
            })
            .collect()
    }

    /// The expected view rows (projection of the model), in (seller, client) order.
    pub fn expected(&self) -> Vec<Row> {
        self.rows.values().cloned().collect()
    }
}

use cdc::envelope::Source as Source_;

fn key(s: i64, c: i64) -> Row {
    match json!({"seller_id": s, "client_id": c}) {
        Value::Object(m) => m,
        _ => Row::new(),
    }
}

/// All rows of the standard view through the Rust API of a store.
pub fn view_rows(store: &consumers::ViewStore) -> Result<Vec<Row>> {
    Ok(store.scan(VIEW, usize::MAX, false).context("scan")?.rows)
}

/// All rows of the standard view over pgwire, as (seller, client, name, position).
pub async fn pg_rows(client: &tokio_postgres::Client) -> Result<Vec<(i64, i64, String, i32)>> {
    let rows = client
        .query(
            &format!("SELECT seller_id, client_id, name, position FROM {VIEW}"),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

pub fn expected_tuples(src: &Source) -> Vec<(i64, i64, String, i32)> {
    src.rows
        .values()
        .map(|r| {
            (
                r["seller_id"].as_i64().unwrap_or_default(),
                r["client_id"].as_i64().unwrap_or_default(),
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["position"].as_i64().unwrap_or_default() as i32,
            )
        })
        .collect()
}

/// Connects tokio-postgres to an agent's pgwire port.
pub async fn pg_connect(port: u16) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=test dbname=views"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}
