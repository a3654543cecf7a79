//! `view-agent replay`: a running agent rebuilds a view from the stream while it serves the old
//! one and readers query it; the swap is atomic (no query sees an empty, partial or torn view),
//! and afterwards the view equals the source. Without a running agent the command opens the
//! store itself.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use common::*;
use consumers::control::{AgentLink, RemoteAgent};
use consumers::replay::{ReplayFrom, ReplayState};
use consumers::{Agent, ViewStore};

const READERS: usize = 3;
/// Queries each reader still runs after the swap.
const QUERIES_AFTER_SWAP: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_swaps_atomically_while_readers_query_and_a_workload_runs() -> Result<()> {
    let h = Harness::start().await?;
    let config = h.agent_config("replay", "127.0.0.1:0");
    let agent = Agent::start(config.clone()).await?;
    let port = agent.pgwire_addr().expect("pgwire").port();
    let mut src = Source::new();
    // Background rows (so the rebuild has work to do), then the two shapes of torn.rs:
    // seller 1's clients 10 and 11 swap positions; client 50 moves between sellers 2 and 3.
    for s in 100..140 {
        let changes: Vec<Change> = (0..25)
            .map(|c| Change::Upsert(s, c, format!("c{c}"), c))
            .collect();
        publish_transaction(&h.js, &src.transaction(&changes)).await?;
    }
    let tx = src.transaction(&[
        Change::Upsert(1, 10, "a".into(), 1),
        Change::Upsert(1, 11, "b".into(), 2),
        Change::Upsert(2, 50, "m".into(), 1),
    ]);
    let last = publish_transaction(&h.js, &tx).await?;
    testkit::until(WAIT, "initial rows", || async {
        (agent.store().progress().applied_seq >= last).then_some(())
    })
    .await?;

    let done = Arc::new(AtomicBool::new(false));
    let writer = spawn_swap_and_move_writer(h.js.clone(), src, last, done.clone());
    // Readers: every result complete and consistent with one applied transaction.
    let swapped = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for r in 0..READERS {
        let swapped = swapped.clone();
        let queries = queries.clone();
        readers.push(tokio::spawn(async move {
            let pg = pg_connect(port).await?;
            let by_seller = pg
                .prepare(&format!(
                    "SELECT client_id, position FROM {VIEW} WHERE seller_id = $1"
                ))
                .await?;
            let moved = pg
                .prepare(&format!(
                    "SELECT seller_id, client_id FROM {VIEW} WHERE seller_id IN ($1, $2)"
                ))
                .await?;
            let background = pg
                .prepare(&format!(
                    "SELECT client_id FROM {VIEW} WHERE seller_id = $1"
                ))
                .await?;
            let mut after = 0;
            let mut q = r;
            while after < QUERIES_AFTER_SWAP {
                if swapped.load(Ordering::Relaxed) {
                    after += 1;
                }
                match q % 3 {
                    0 => {
                        let rows = pg.query(&by_seller, &[&1i64]).await?;
                        let mut pos: Vec<i32> = rows.iter().map(|row| row.get(1)).collect();
                        pos.sort_unstable();
                        anyhow::ensure!(pos == vec![1, 2], "seller 1 positions torn: {pos:?}");
                    }
                    1 => {
                        let rows = pg.query(&moved, &[&2i64, &3i64]).await?;
                        let n = rows.iter().filter(|row| row.get::<_, i64>(1) == 50).count();
                        anyhow::ensure!(n == 1, "client 50 seen {n} times across sellers 2 and 3");
                    }
                    _ => {
                        let seller = 100 + (q % 40) as i64;
                        let n = pg.query(&background, &[&seller]).await?.len();
                        anyhow::ensure!(n == 25, "seller {seller} has {n} rows, not 25");
                    }
                }
                q += 1;
                queries.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    testkit::until(WAIT, "readers running", || async {
        (queries.load(Ordering::Relaxed) > 200).then_some(())
    })
    .await?;

    // The replay, requested over NATS as `view-agent replay` does.
    let link = RemoteAgent::connect(&h.nats.url(), PREFIX, &config.name).await?;
    let started = link.replay_start(VIEW, ReplayFrom::Start).await?;
    assert_eq!(started.state, ReplayState::Running);
    assert!(
        link.replay_start(VIEW, ReplayFrom::Start).await.is_err(),
        "a second replay of the same view is refused while one runs"
    );
    let queries_at_start = queries.load(Ordering::Relaxed);
    let status = testkit::until(Duration::from_secs(120), "replay done", || async {
        let st = link.replay_status(VIEW).await.ok()??;
        (st.state != ReplayState::Running).then_some(st)
    })
    .await?;
    swapped.store(true, Ordering::Relaxed);
    assert_eq!(status.state, ReplayState::Done, "{status:?}");
    assert_eq!(status.from_seq, 1);
    assert!(status.events >= 1_000, "{status:?}");
    assert!(status.replaced_rows >= 1_000, "{status:?}");
    for r in readers {
        r.await??;
    }
    let during = queries.load(Ordering::Relaxed) - queries_at_start;
    assert!(during > 300, "only {during} queries ran during the replay");
    done.store(true, Ordering::Relaxed);
    let (last, src) = writer.await??;
    testkit::until(WAIT, "all applied", || async {
        (agent.store().progress().applied_seq >= last).then_some(())
    })
    .await?;
    assert_eq!(view_rows(agent.store())?, src.expected());
    agent.shutdown().await?;
    // The replaced rows are gone from the store: reopening finds exactly the view's rows.
    let store = ViewStore::open(&config)?;
    assert_eq!(view_rows(&store)?, src.expected());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_without_a_running_agent_opens_the_store_itself() -> Result<()> {
    let h = Harness::start().await?;
    let config_path = h.write_config("offline", testkit::free_port())?;
    let config = consumers::AgentConfig::load(&config_path)?;
    let mut src = Source::new();
    let mut last = 0;
    for s in 0..10 {
        let changes: Vec<Change> = (0..10)
            .map(|c| Change::Upsert(s, c, format!("c{c}"), c))
            .collect();
        last = publish_transaction(&h.js, &src.transaction(&changes)).await?;
    }
    {
        let agent = Agent::start(config.clone()).await?;
        testkit::until(WAIT, "applied", || async {
            (agent.store().progress().applied_seq >= last).then_some(())
        })
        .await?;
        agent.shutdown().await?;
    }
    // Damage the stopped agent's view: a row deleted, a stray row added.
    {
        let store = ViewStore::open(&config)?;
        let stray = row_of(99, 1, "stray", 1);
        store.write_rows(
            VIEW,
            &[stray],
            &[vec![serde_json::json!(3), serde_json::json!(4)]],
            store.progress().applied_lsn,
        )?;
        assert_ne!(view_rows(&store)?, src.expected());
    }
    let out = Command::new(env!("CARGO_BIN_EXE_view-agent"))
        .args(["replay", "--config"])
        .arg(&config_path)
        .args(["--view", VIEW, "--from-start"])
        .env("RUST_LOG", "warn")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("opening the store here"), "{stderr}");
    assert!(
        stdout.contains("rebuilt from stream sequence 1"),
        "{stdout}"
    );
    let store = ViewStore::open(&config)?;
    assert_eq!(view_rows(&store)?, src.expected());
    assert!(store.progress().applied_seq >= last);
    Ok(())
}
