//! The agent in-process against a private NATS: apply, restart, large events, read-your-writes,
//! stale detection and availability with NATS down.

mod common;

use std::time::Duration;

use anyhow::Result;
use cdc::Lsn;
use common::*;
use consumers::Agent;
use serde_json::json;

async fn wait_applied(agent: &Agent, seq: u64) -> Result<()> {
    testkit::until(WAIT, &format!("applied_seq >= {seq}"), || async {
        (agent.store().progress().applied_seq >= seq).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_transactions_restarts_exactly_and_serves_them() -> Result<()> {
    let h = Harness::start().await?;
    let mut src = Source::new();
    let mut last = 0;
    for i in 0..20i64 {
        let tx = src.transaction(&[
            Change::Upsert(i % 4, i, format!("c{i}"), i),
            Change::Upsert(i % 4, 100 + i, format!("d{i}"), i),
        ]);
        last = publish_transaction(&h.js, &tx).await?;
        last = last.max(publish_heartbeat(&h.js, Lsn(src.lsn)).await?);
    }
    let agent = Agent::start(h.agent_config("a", "127.0.0.1:0")).await?;
    wait_applied(&agent, last).await?;
    assert_eq!(view_rows(agent.store())?, src.expected());
    // Updates, deletes, key moves, a large event.
    let tx = src.transaction(&[
        Change::Move(1, 1, 9),
        Change::Delete(2, 2),
        Change::Upsert(3, 3, "renamed".into(), 42),
    ]);
    publish_transaction(&h.js, &tx).await?;
    let big_name = "x".repeat(2000);
    let tx = src.transaction(&[Change::Upsert(5, 5, big_name.clone(), 1)]);
    let last = publish_large(&h.js, &tx[0]).await?;
    wait_applied(&agent, last).await?;
    assert_eq!(view_rows(agent.store())?, src.expected());
    assert_eq!(agent.get(VIEW, &[json!(5)])?[0]["name"], json!(big_name));
    assert_eq!(agent.get(VIEW, &[json!(9)])?.len(), 1);
    let addr = agent.pgwire_addr().expect("pgwire on");
    let pg = pg_connect(addr.port()).await?;
    assert_eq!(pg_rows(&pg).await?, expected_tuples(&src));
    let status = agent.store().progress();
    agent.shutdown().await?;

    // Restart: the position is where it was; nothing is applied twice.
    let agent = Agent::start(h.agent_config("a", "127.0.0.1:0")).await?;
    assert_eq!(agent.store().progress().applied_seq, status.applied_seq);
    assert_eq!(agent.store().progress().watermark, status.watermark);
    let tx = src.transaction(&[Change::Upsert(7, 70, "after restart".into(), 1)]);
    let last = publish_transaction(&h.js, &tx).await?;
    wait_applied(&agent, last).await?;
    assert_eq!(view_rows(agent.store())?, src.expected());
    assert!(agent.store().status().iter().all(|s| s.stale.is_none()));
    agent.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_via_heartbeats_has_zero_misses() -> Result<()> {
    let h = Harness::start().await?;
    let agent = Agent::start(h.agent_config("ryw", "127.0.0.1:0")).await?;
    let pg = pg_connect(agent.pgwire_addr().expect("pgwire").port()).await?;
    let stmt = pg
        .prepare(&format!("SELECT name FROM {VIEW} WHERE seller_id = $1"))
        .await?;
    let mut src = Source::new();
    let mut misses = 0;
    for i in 0..1000i64 {
        // "Write, then pg_current_wal_lsn()": the LSN after the commit, reached by a heartbeat.
        let name = format!("v{i}");
        let tx = src.transaction(&[Change::Upsert(1, i % 10, name.clone(), i)]);
        let after_commit = Lsn(src.lsn + 0x10);
        let js = h.js.clone();
        let publisher = tokio::spawn(async move {
            publish_transaction(&js, &tx).await?;
            publish_heartbeat(&js, after_commit).await
        });
        pg.batch_execute(&format!("SET cdc.min_lsn = '{after_commit}'"))
            .await?;
        let rows = pg.query(&stmt, &[&1i64]).await?;
        if !rows.iter().any(|r| r.get::<_, String>(0) == name) {
            eprintln!(
                "miss {i}: wanted {name} at {after_commit}, progress {:?}, got {:?}",
                agent.store().progress(),
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
            );
            misses += 1;
        }
        publisher.await??;
    }
    assert_eq!(misses, 0, "read-your-writes misses");
    // An LSN nobody reaches: the query fails with query_canceled after the timeout.
    pg.batch_execute("SET cdc.min_lsn = 'FF/0'; SET cdc.min_lsn_timeout = '50ms'")
        .await?;
    let err = pg.query(&stmt, &[&1i64]).await.expect_err("times out");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    // The Rust API does the same.
    assert!(agent
        .wait_for_lsn(Lsn(src.lsn), Duration::from_millis(10))
        .await
        .is_ok());
    agent.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_history_marks_views_stale() -> Result<()> {
    let h = Harness::start_with(|c| c.max_messages = 10).await?;
    let mut src = Source::new();
    let agent = Agent::start(h.agent_config("stale", "127.0.0.1:0")).await?;
    let mut last = 0;
    for i in 0..5 {
        let tx = src.transaction(&[Change::Upsert(1, i, "x".into(), i)]);
        last = publish_transaction(&h.js, &tx).await?;
        // Rolled-up heartbeats leave holes in the sequence; they are not loss.
        publish_heartbeat(&h.js, Lsn(src.lsn)).await?;
        publish_heartbeat(&h.js, Lsn(src.lsn + 1)).await?;
    }
    wait_applied(&agent, last).await?;
    assert!(agent.store().status()[0].stale.is_none());
    agent.shutdown().await?;
    // While the agent is down, retention drops history it never saw.
    for i in 5..40 {
        let tx = src.transaction(&[Change::Upsert(2, i, "y".into(), i)]);
        publish_transaction(&h.js, &tx).await?;
    }
    let agent = Agent::start(h.agent_config("stale", "127.0.0.1:0")).await?;
    testkit::until(WAIT, "view marked stale", || async {
        agent.store().status()[0].stale.clone()
    })
    .await?;
    let pg = pg_connect(agent.pgwire_addr().expect("pgwire").port()).await?;
    let err = pg
        .query(&format!("SELECT * FROM {VIEW} WHERE seller_id = 1"), &[])
        .await
        .expect_err("stale");
    assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err}");
    let rows = pg
        .query("SELECT view, stale, stale_reason FROM cdc_status", &[])
        .await?;
    assert!(rows[0].get::<_, bool>(1));
    assert!(rows[0].get::<_, String>(2).contains("retention"));
    pg.batch_execute("SET cdc.allow_stale = on").await?;
    assert!(!pg
        .query(&format!("SELECT * FROM {VIEW} WHERE seller_id = 1"), &[])
        .await?
        .is_empty());
    agent.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_answer_while_nats_is_down() -> Result<()> {
    let mut h = Harness::start().await?;
    let mut src = Source::new();
    let tx = src.transaction(&[
        Change::Upsert(1, 1, "a".into(), 1),
        Change::Upsert(1, 2, "b".into(), 2),
    ]);
    let last = publish_transaction(&h.js, &tx).await?;
    let agent = Agent::start(h.agent_config("avail", "127.0.0.1:0")).await?;
    wait_applied(&agent, last).await?;
    agent.shutdown().await?;
    h.nats.stop().await?;
    // Start with NATS down: the agent comes up and answers from its store.
    let agent = Agent::start(h.agent_config("avail", "127.0.0.1:0")).await?;
    let pg = pg_connect(agent.pgwire_addr().expect("pgwire").port()).await?;
    for _ in 0..50 {
        assert_eq!(pg_rows(&pg).await?, expected_tuples(&src));
    }
    // NATS comes back: the agent catches up on its own.
    h.nats.start_again().await?;
    let client = async_nats::connect(h.nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let tx = src.transaction(&[Change::Upsert(1, 3, "c".into(), 3)]);
    let last = publish_transaction(&js, &tx).await?;
    wait_applied(&agent, last).await?;
    assert_eq!(pg_rows(&pg).await?, expected_tuples(&src));
    agent.shutdown().await?;
    Ok(())
}
