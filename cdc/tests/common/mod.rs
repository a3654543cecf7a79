//! Shared set-up for the reader's integration tests: private servers, a config file, the `cdc`
//! binary as a child process, and reading the stream back.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer};
use cdc::envelope::{ChangeEvent, HEADER_LARGE_REF};
use futures::StreamExt;
use testkit::{ChildProcess, Nats, Postgres};
use tokio::io::AsyncReadExt;

/// Servers, a fresh database and a config file for one test.
pub struct Env {
    pub pg: Postgres,
    pub nats: Nats,
    pub db: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub stream: String,
    pub prefix: String,
}

/// A message read back from the stream.
#[derive(Debug, Clone)]
pub struct Received {
    pub seq: u64,
    pub subject: String,
    pub headers: HashMap<String, String>,
    pub event: ChangeEvent,
}

impl Env {
    /// Starts Postgres and NATS, creates a database, runs `schema` in it and writes a config
    /// publishing `tables`.
    pub async fn start(schema: &str, tables: &[&str]) -> Result<Env> {
        let pg = Postgres::start().await?;
        let nats = Nats::start().await?;
        Self::with_servers(pg, nats, schema, tables).await
    }

    /// Like [`Env::start`] on given servers.
    pub async fn with_servers(
        pg: Postgres,
        nats: Nats,
        schema: &str,
        tables: &[&str],
    ) -> Result<Env> {
        let db = pg.create_database("cdc").await?;
        if !schema.is_empty() {
            pg.batch_execute(&db, schema).await?;
        }
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("cdc.toml");
        let env = Env {
            pg,
            nats,
            db,
            dir,
            config,
            stream: "CDC".into(),
            prefix: "cdc".into(),
        };
        env.write_config(tables, "")?;
        Ok(env)
    }

    /// (Re)writes the config file; `extra` is appended verbatim (e.g. a `[reader]` table).
    pub fn write_config(&self, tables: &[&str], extra: &str) -> Result<()> {
        let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
        let text = format!(
            "[postgres]\nurl = {url:?}\nslot = \"cdc_slot\"\npublication = \"cdc_pub\"\ntables = [{tables}]\n\n[nats]\nurl = {nats:?}\nstream = {stream:?}\nsubject_prefix = {prefix:?}\n{extra}\n",
            url = self.pg.url(&self.db),
            tables = tables.join(", "),
            nats = self.nats.url(),
            stream = self.stream,
            prefix = self.prefix,
        );
        std::fs::write(&self.config, text)?;
        Ok(())
    }

    /// Starts `cdc run --config …`.
    pub fn spawn_reader(&self) -> Result<ChildProcess> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdc"));
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,cdc=debug");
        testkit::spawn_logged(cmd, "cdc")
    }

    /// Starts the reader and waits until it streams.
    pub async fn start_reader(&self) -> Result<ChildProcess> {
        let mut reader = self.spawn_reader()?;
        reader
            .wait_for_output("streaming", Duration::from_secs(30))
            .await?;
        Ok(reader)
    }

    /// A SQL session on the test database.
    pub async fn sql(&self) -> Result<tokio_postgres::Client> {
        self.pg.connect(&self.db).await
    }

    /// A JetStream context on the test server.
    pub async fn jetstream(&self) -> Result<jetstream::Context> {
        // The URL may carry credentials, which async-nats only takes as options.
        let (options, servers) =
            cdc::nats_url::connect_options(async_nats::ConnectOptions::new(), &self.nats.url());
        let client = options.connect(servers.as_str()).await?;
        Ok(jetstream::new(client))
    }

    /// Waits until the stream holds at least `count` change events from the WAL, then returns
    /// all of them in stream order (heartbeats and snapshot events left out).
    pub async fn wait_for_events(&self, count: usize, timeout: Duration) -> Result<Vec<Received>> {
        self.wait_for(count, timeout, |r| !r.event.source.snapshot)
            .await
    }

    /// Like [`Env::wait_for_events`], counting and returning snapshot events (`r`, `e`) too.
    pub async fn wait_for_all_events(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Received>> {
        self.wait_for(count, timeout, |_| true).await
    }

    async fn wait_for(
        &self,
        count: usize,
        timeout: Duration,
        keep: impl Fn(&Received) -> bool,
    ) -> Result<Vec<Received>> {
        let js = self.jetstream().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = |have: usize| {
            anyhow::anyhow!("timed out after {timeout:?} waiting for {count} events; have {have}")
        };
        // The reader creates the stream when it starts.
        let stream = testkit::until(timeout, "the stream", || async {
            js.get_stream(&self.stream).await.ok()
        })
        .await?;
        let heartbeat = format!("{}._heartbeat", self.prefix);
        let mut events: Vec<Received> = Vec::new();
        let mut next_seq = 1;
        let mut drain_to: Option<u64> = None;
        // Follows the stream (messages arrive as they are published); a consumer that fails
        // (NATS restarted by a fault test) is created again from the next sequence.
        'consumer: loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let consumer = testkit::until_ok(remaining, "an ordered consumer", || {
                stream.create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: next_seq,
                    },
                    ..Default::default()
                })
            })
            .await
            .map_err(|e| timed_out(events.len()).context(e))?;
            let mut messages = consumer.messages().await?;
            loop {
                let msg = match tokio::time::timeout_at(deadline, messages.next()).await {
                    Err(_) => return Err(timed_out(events.len())),
                    Ok(Some(Ok(msg))) => msg,
                    Ok(_) => continue 'consumer,
                };
                let seq = msg
                    .info()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .stream_sequence;
                next_seq = seq + 1;
                if let Some(r) = received(&js, &self.stream, &heartbeat, seq, &msg).await? {
                    if keep(&r) {
                        events.push(r);
                    }
                }
                if events.len() >= count {
                    // Enough: return what the stream holds now, like a read of it would.
                    let end = match drain_to {
                        Some(end) => end,
                        None => {
                            let info = js.get_stream(&self.stream).await?;
                            *drain_to.insert(info.cached_info().state.last_sequence)
                        }
                    };
                    if next_seq > end {
                        return Ok(events);
                    }
                }
            }
        }
    }
}

pub struct Batch {
    pub events: Vec<Received>,
    pub last_seq: Option<u64>,
}

/// Reads every message from `start_seq` to the stream's current end.
pub async fn read_from(
    js: &jetstream::Context,
    stream: &str,
    prefix: &str,
    start_seq: u64,
) -> Result<Batch> {
    let mut s = js.get_stream(stream).await.context("stream missing")?;
    let last = s.info().await?.state.last_sequence;
    if last < start_seq {
        return Ok(Batch {
            events: vec![],
            last_seq: None,
        });
    }
    let consumer = s
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start_seq,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let heartbeat = format!("{prefix}._heartbeat");
    let mut events = Vec::new();
    let mut last_seq = None;
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .context("stream read stalled")?
    {
        let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
        let seq = msg
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        last_seq = Some(seq);
        if let Some(r) = received(js, stream, &heartbeat, seq, &msg).await? {
            events.push(r);
        }
        if seq >= last {
            break;
        }
    }
    Ok(Batch { events, last_seq })
}

/// The event of the message at `seq` (fetched from the object store when it was too large to
/// publish inline); `None` for a heartbeat.
async fn received(
    js: &jetstream::Context,
    stream: &str,
    heartbeat: &str,
    seq: u64,
    msg: &jetstream::Message,
) -> Result<Option<Received>> {
    if msg.subject.as_str() == heartbeat {
        return Ok(None);
    }
    let headers: HashMap<String, String> = msg
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(k, v)| {
            (
                k.to_string(),
                v.first()
                    .map(|x| x.as_str().to_string())
                    .unwrap_or_default(),
            )
        })
        .collect();
    let body = match headers.get(HEADER_LARGE_REF) {
        Some(name) => {
            let store = js.get_object_store(format!("{stream}_LARGE")).await?;
            let mut obj = store.get(name).await?;
            let mut buf = Vec::new();
            obj.read_to_end(&mut buf).await?;
            buf
        }
        None => msg.payload.to_vec(),
    };
    let event: ChangeEvent = serde_json::from_slice(&body)
        .with_context(|| format!("event at seq {seq} does not parse"))?;
    Ok(Some(Received {
        seq,
        subject: msg.subject.to_string(),
        headers,
        event,
    }))
}

// ---- Helpers for the error, TLS and type tests -------------------------------------------

/// How long a reader that must refuse to start gets to exit.
pub const FAIL_TIMEOUT: Duration = Duration::from_secs(20);

impl Env {
    /// Like [`Env::write_config`] with `url` as `postgres.url` (may be empty).
    pub fn write_config_with_url(&self, url: &str, tables: &[&str], extra: &str) -> Result<()> {
        let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
        let text = format!(
            "[postgres]\nurl = {url:?}\nslot = \"cdc_slot\"\npublication = \"cdc_pub\"\ntables = [{tables}]\n\n[nats]\nurl = {nats:?}\nstream = {stream:?}\nsubject_prefix = {prefix:?}\n{extra}\n",
            tables = tables.join(", "),
            nats = self.nats.url(),
            stream = self.stream,
            prefix = self.prefix,
        );
        std::fs::write(&self.config, text)?;
        Ok(())
    }

    /// Starts `cdc run --config …` with extra environment variables.
    pub fn spawn_reader_with_env(&self, vars: &[(&str, &str)]) -> Result<ChildProcess> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cdc"));
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,cdc=debug");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        testkit::spawn_logged(cmd, "cdc")
    }

    /// Inserts a row through Postgres and waits until the stream holds at least one event:
    /// proof that a reader really streams.
    pub async fn expect_streaming(&self, insert: &str) -> Result<Vec<Received>> {
        self.sql().await?.batch_execute(insert).await?;
        self.wait_for_events(1, Duration::from_secs(30)).await
    }
}

/// The last non-empty line of `text`.
pub fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
}

/// Waits (bounded) for a reader that must refuse to run: it has to exit non-zero, and the last
/// line of its stderr has to be main.rs's `cdc: …` line. Returns that line.
pub async fn expect_refusal(reader: &mut ChildProcess) -> Result<String> {
    let status = reader.wait_with_timeout(FAIL_TIMEOUT).await?;
    anyhow::ensure!(
        !status.success(),
        "the reader exited successfully but should have refused\n{}",
        reader.describe()
    );
    let stderr = reader.stderr();
    let line = last_line(&stderr).to_string();
    anyhow::ensure!(
        line.starts_with("cdc: "),
        "the last stderr line is not the `cdc: …` error line: {line:?}\n{}",
        reader.describe()
    );
    Ok(line)
}
