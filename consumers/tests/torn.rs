//! No torn transactions: while transactions stream in, concurrent pgwire readers never see half
//! of one.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use common::*;
use consumers::Agent;

const READERS: usize = 4;
const QUERIES_PER_READER: usize = 1_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_never_see_half_a_transaction() -> Result<()> {
    let h = Harness::start().await?;
    let agent = Agent::start(h.agent_config("torn", "127.0.0.1:0")).await?;
    let port = agent.pgwire_addr().expect("pgwire").port();
    let mut src = Source::new();
    // Seller 1: clients 10 and 11 at positions 1 and 2 (shape a).
    // Client 50 belongs to seller 2 or 3 (shape b).
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
    let start_seq = last;

    let done = Arc::new(AtomicBool::new(false));
    let writer = spawn_swap_and_move_writer(h.js.clone(), src, last, done.clone());
    let mut readers = Vec::new();
    for r in 0..READERS {
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
            for q in 0..QUERIES_PER_READER {
                if (q + r).is_multiple_of(2) {
                    let rows = pg.query(&by_seller, &[&1i64]).await?;
                    let mut pos: Vec<i32> = rows.iter().map(|row| row.get(1)).collect();
                    pos.sort_unstable();
                    anyhow::ensure!(pos == vec![1, 2], "seller 1 positions torn: {pos:?}");
                } else {
                    let rows = pg.query(&moved, &[&2i64, &3i64]).await?;
                    let n = rows.iter().filter(|row| row.get::<_, i64>(1) == 50).count();
                    anyhow::ensure!(n == 1, "client 50 seen {n} times across sellers 2 and 3");
                }
            }
            anyhow::Ok(())
        }));
    }
    for r in readers {
        r.await??;
    }
    done.store(true, Ordering::Relaxed);
    let (last, src) = writer.await??;
    testkit::until(WAIT, "all applied", || async {
        (agent.store().progress().applied_seq >= last).then_some(())
    })
    .await?;
    let applied_during = last - start_seq;
    assert!(
        applied_during > 100,
        "only {applied_during} messages were applied while reading"
    );
    assert_eq!(view_rows(agent.store())?, src.expected());
    agent.shutdown().await?;
    Ok(())
}
