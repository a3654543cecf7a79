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

fn agent_cmd(config: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_view-agent"));
    cmd.arg("run").arg("--config").arg(config);
    cmd.env("RUST_LOG", "warn");
    cmd
}

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
    // Clean shutdown on SIGTERM.
    agent.signal(testkit::Signal::Term)?;
    let status = agent.wait_with_timeout(WAIT).await?;
    assert!(status.success(), "exit after SIGTERM: {status}");
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
