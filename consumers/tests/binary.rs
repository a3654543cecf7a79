//! The `view-agent` binary: exactly-once apply across kill -9, clean shutdown on SIGTERM, one
//! clear line and a non-zero exit on bad config.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::*;

const KILLS: usize = 20;

/// Applied sequence as reported by `cdc_status`, or `None` while the agent is not answering.
async fn applied_seq(port: u16) -> Option<i64> {
    let pg = pg_connect(port).await.ok()?;
    let row = pg
        .query_one("SELECT applied_seq FROM cdc_status", &[])
        .await
        .ok()?;
    Some(row.get(0))
}

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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_twenty_times_applies_every_event_exactly_once() -> Result<()> {
    let h = Harness::start().await?;
    let port = testkit::free_port();
    let config = h.write_config("crash", port)?;
    let done = Arc::new(AtomicBool::new(false));
    // The workload: transactions of 1..8 changes over 20 sellers, inserts, updates, deletes and
    // key moves, published continuously until the kills are over.
    let writer = {
        let js = h.js.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut src = Source::new();
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            let mut last = 0;
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) || n < 2_000 {
                let changes: Vec<Change> = (0..1 + rng.below(8))
                    .map(|_| {
                        let seller = rng.below(20) as i64;
                        let client = rng.below(50) as i64;
                        match rng.below(10) {
                            0..=5 => Change::Upsert(
                                seller,
                                client,
                                format!("n{}", rng.below(1000)),
                                rng.below(10) as i64,
                            ),
                            6..=7 => Change::Delete(seller, client),
                            _ => Change::Move(seller, client, rng.below(20) as i64),
                        }
                    })
                    .collect();
                let tx = src.transaction(&changes);
                if !tx.is_empty() {
                    last = publish_transaction(&js, &tx).await?;
                }
                n += 1;
            }
            anyhow::Ok((last, src))
        })
    };
    let mut rng = Rng(42);
    let mut previous = 0i64;
    for kill in 0..KILLS {
        let mut agent = testkit::spawn_logged(agent_cmd(&config), &format!("view-agent#{kill}"))?;
        agent.wait_for_output("view-agent ready", WAIT).await?;
        // Kill at a random point of progress: after 1..150 more messages are applied.
        let target = previous + 1 + rng.below(150) as i64;
        let reached = testkit::until(WAIT, "agent progress", || async {
            applied_seq(port).await.filter(|s| *s >= target)
        })
        .await?;
        agent.kill9()?;
        previous = reached;
    }
    done.store(true, Ordering::Relaxed);
    let (last, src) = writer.await??;
    let mut agent = testkit::spawn_logged(agent_cmd(&config), "view-agent-final")?;
    agent.wait_for_output("view-agent ready", WAIT).await?;
    testkit::until(Duration::from_secs(60), "final catch-up", || async {
        applied_seq(port).await.filter(|s| *s >= last as i64)
    })
    .await?;
    let pg = pg_connect(port).await?;
    let got = pg_rows(&pg).await?;
    let want = expected_tuples(&src);
    assert_eq!(got.len(), want.len(), "row count");
    assert_eq!(got, want, "view differs from the source fold");
    stop_agent(&mut agent).await
}

/// SIGTERM and SIGINT while transactions stream in: exit 0 within 5 s, after finishing the
/// batch and flushing sled; the store reopens at the last applied position, with exactly the
/// rows of that position (and nothing the agent reported applied is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_stop_cleanly_at_the_last_applied_position() -> Result<()> {
    let h = Harness::start().await?;
    let mut src = Source::new();
    // Expected rows after each transaction, by its last sequence.
    let mut history: Vec<(u64, Vec<cdc::envelope::Row>)> = Vec::new();
    let mut rng = Rng(7);
    for (round, signal) in [testkit::Signal::Term, testkit::Signal::Int]
        .into_iter()
        .enumerate()
    {
        let port = testkit::free_port();
        let config = h.write_config("signals", port)?;
        let mut agent =
            testkit::spawn_logged(agent_cmd(&config), &format!("view-agent-signal{round}"))?;
        agent.wait_for_output("view-agent ready", WAIT).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let js = h.js.clone();
            let stop = stop.clone();
            let mut src = std::mem::take(&mut src);
            let mut history = std::mem::take(&mut history);
            let mut rng = Rng(rng.next());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let changes: Vec<Change> = (0..1 + rng.below(6))
                        .map(|_| {
                            let (s, c) = (rng.below(5) as i64, rng.below(5) as i64);
                            if rng.below(4) == 0 {
                                Change::Delete(s, c)
                            } else {
                                Change::Upsert(s, c, format!("n{}", rng.below(99)), 1)
                            }
                        })
                        .collect();
                    let tx = src.transaction(&changes);
                    if tx.is_empty() {
                        continue;
                    }
                    let last = publish_transaction(&js, &tx).await?;
                    history.push((last, src.expected()));
                }
                anyhow::Ok((src, history))
            })
        };
        let seen = testkit::until(WAIT, "agent progress", || async {
            applied_seq(port)
                .await
                .filter(|s| *s >= 50 * (round as i64 + 1))
        })
        .await?;
        agent.signal(signal)?;
        let sent = std::time::Instant::now();
        let status = agent.wait_with_timeout(Duration::from_secs(5)).await?;
        let took = sent.elapsed();
        assert!(status.success(), "exit after {signal:?}: {status}");
        assert!(took < Duration::from_secs(5), "{signal:?} took {took:?}");
        stop.store(true, Ordering::Relaxed);
        let (s, hist) = writer.await??;
        src = s;
        history = hist;
        rng = Rng(rng.next() | 1);
        // Reopen: the position is a transaction boundary the agent reached, at or after
        // what it reported, and the rows are exactly the source's at that position.
        let cfg = consumers::AgentConfig::load(&config)?;
        let store = consumers::ViewStore::open(&cfg)?;
        let at = store.progress().applied_seq;
        assert!(
            at as i64 >= seen,
            "reopened at {at}, but {seen} was reported applied"
        );
        let want = history
            .iter()
            .find(|(seq, _)| *seq == at)
            .map(|(_, rows)| rows.clone())
            .ok_or_else(|| anyhow::anyhow!("reopened at {at}, not a transaction boundary"))?;
        assert_eq!(view_rows(&store)?, want, "rows at the reopened position");
    }
    Ok(())
}

/// A run at debug level with a pgwire password and a NATS token in the URL, in both log
/// formats, plus a `replay` command against it: neither secret appears in any output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_debug_logs() -> Result<()> {
    const TOKEN: &str = "natsTok3nS3cr3t";
    const PASSWORD: &str = "pgwPassS3cr3t";
    let nats = testkit::Nats::start_with(testkit::NatsOptions {
        extra_conf: vec![format!("authorization {{ token: \"{TOKEN}\" }}")],
        ..Default::default()
    })
    .await?;
    let client = async_nats::ConnectOptions::with_token(TOKEN.into())
        .connect(nats.url())
        .await?;
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec![format!("{PREFIX}.>")],
        ..Default::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let url = format!("nats://{TOKEN}@127.0.0.1:{}", nats.port());
    let mut src = Source::new();
    for (round, format) in ["text", "json"].into_iter().enumerate() {
        let port = testkit::free_port();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"
name = "secrets"
data_dir = "{data}"
[nats]
url = "{url}"
[pgwire]
listen = "127.0.0.1:{port}"
password = "{PASSWORD}"
[[views]]
name = "{VIEW}"
source = "public.top_clients"
key = ["seller_id"]
primary_key = ["seller_id", "client_id"]
columns = ["client_id", "name", "position"]
column_types = {{ seller_id = "int8", client_id = "int8", position = "int4" }}
"#,
                data = dir.path().join("data").display()
            ),
        )?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_view-agent"));
        cmd.args(["--log-format", format, "run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "debug");
        let mut agent = testkit::spawn_logged(cmd, &format!("view-agent-secrets-{format}"))?;
        agent.wait_for_output("view-agent ready", WAIT).await?;
        let last = publish_transaction(
            &js,
            &src.transaction(&[Change::Upsert(round as i64, 1, "x".into(), 1)]),
        )
        .await?;
        let connect = |pw: &'static str| {
            let mut c = tokio_postgres::Config::new();
            c.host("127.0.0.1")
                .port(port)
                .user("page")
                .dbname("views")
                .password(pw);
            c
        };
        // A wrong password is refused (and logged without either password).
        assert!(connect("wrong-password")
            .connect(tokio_postgres::NoTls)
            .await
            .is_err());
        let (pg, conn) = connect(PASSWORD).connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        testkit::until(WAIT, "applied", || async {
            let row = pg
                .query_one("SELECT applied_seq FROM cdc_status", &[])
                .await
                .ok()?;
            (row.get::<_, i64>(0) >= last as i64).then_some(())
        })
        .await?;
        let replay = Command::new(env!("CARGO_BIN_EXE_view-agent"))
            .args(["--log-format", format, "replay", "--config"])
            .arg(&config)
            .args(["--view", VIEW, "--from-start"])
            .env("RUST_LOG", "debug")
            .output()?;
        assert!(
            replay.status.success(),
            "{}",
            String::from_utf8_lossy(&replay.stderr)
        );
        agent.signal(testkit::Signal::Term)?;
        assert!(agent.wait_with_timeout(WAIT).await?.success());
        let logs = format!(
            "{}{}{}{}",
            agent.stdout(),
            agent.stderr(),
            String::from_utf8_lossy(&replay.stdout),
            String::from_utf8_lossy(&replay.stderr)
        );
        assert!(logs.contains("DEBUG"), "debug logging was not on");
        if format == "json" {
            for line in agent.stderr().lines().filter(|l| !l.trim().is_empty()) {
                serde_json::from_str::<serde_json::Value>(line)
                    .map_err(|e| anyhow::anyhow!("not a JSON log line ({e}): {line}"))?;
            }
        }
        for secret in [TOKEN, PASSWORD] {
            if let Some(line) = logs.lines().find(|l| l.contains(secret)) {
                panic!("a secret appears in the {format} logs: {line}");
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn bad_config_exits_with_one_clear_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "name = \"x\"\ndata_dir = \"/tmp/x\"\nbogus = 1\n[[views]]\nname = \"v\"\nsource = \"public.t\"\nkey = [\"id\"]\nprimary_key = [\"id\"]\n",
    )?;
    let out = agent_cmd(&path).output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("bogus"), "{err}");
    let out = agent_cmd(&dir.path().join("missing.toml")).output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));
    Ok(())
}
