//! The agent's `[metrics]` endpoint: Prometheus text while a workload runs, `/readyz` 200 when
//! caught up and 503 while a view is stale.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use cdc::envelope::Op;
use common::*;
use consumers::metrics::names;
use consumers::Agent;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// GET `path`: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("status line")?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((code, body))
}

/// The value of the sample `name` (with its labels, as written) in Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_while_a_workload_runs_and_readiness_follows_staleness() -> Result<()> {
    let h = Harness::start().await?;
    let mut config = h.agent_config("metrics", "127.0.0.1:0");
    config.metrics.listen = "127.0.0.1:0".into();
    let agent = Agent::start(config).await?;
    let addr = agent.metrics_addr().context("metrics address")?;
    let port = agent.pgwire_addr().context("pgwire")?.port();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let js = h.js.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut src = Source::new();
            let mut last = 0;
            let mut i = 0i64;
            while !done.load(Ordering::Relaxed) || i < 200 {
                let tx = src.transaction(&[
                    Change::Upsert(i % 10, i % 7, format!("n{i}"), i % 5),
                    Change::Upsert(i % 10, 100, "x".into(), 1),
                ]);
                last = publish_transaction(&js, &tx).await?;
                i += 1;
            }
            anyhow::Ok((last, src))
        })
    };
    let pg = pg_connect(port).await?;
    // Scrape while the workload runs.
    let mut scrapes = 0;
    let mut last_applied = 0.0;
    while scrapes < 10 {
        pg.query(&format!("SELECT * FROM {VIEW} WHERE seller_id = 1"), &[])
            .await?;
        agent.get(VIEW, &[serde_json::json!(2)])?;
        let (code, text) = get(addr, "/metrics").await?;
        assert_eq!(code, 200);
        let applied = sample(&text, names::APPLIED_SEQ).context("applied seq")?;
        assert!(applied >= last_applied, "applied seq went back");
        last_applied = applied;
        for name in [
            names::APPLIED_LSN,
            names::STREAM_LAST_SEQ,
            names::LAG_MESSAGES,
            names::LAG_SECONDS,
            names::VIEWS_STALE,
            names::READY,
        ] {
            assert!(sample(&text, name).is_some(), "{name} missing:\n{text}");
        }
        for name in [
            format!("{}_total", names::EVENTS_APPLIED),
            format!("{}_count", names::APPLY_SECONDS),
            format!("{}_total{{interface=\"pgwire\"}}", names::QUERIES),
            format!("{}_total{{interface=\"api\"}}", names::QUERIES),
            format!("{}_count{{interface=\"pgwire\"}}", names::QUERY_SECONDS),
        ] {
            assert!(sample(&text, &name).is_some(), "{name} missing:\n{text}");
        }
        scrapes += 1;
    }
    done.store(true, Ordering::Relaxed);
    let (last, _src) = writer.await??;
    testkit::until(WAIT, "caught up", || async {
        (agent.store().progress().applied_seq >= last).then_some(())
    })
    .await?;
    // Caught up: ready, lag 0, every counter consistent with the workload.
    let (code, body) = testkit::until(WAIT, "readyz 200", || async {
        let r = get(addr, "/readyz").await.ok()?;
        (r.0 == 200).then_some(r)
    })
    .await?;
    assert_eq!(code, 200);
    assert!(body.contains("caught up"), "{body}");
    let (_, text) = get(addr, "/metrics").await?;
    assert_eq!(sample(&text, names::APPLIED_SEQ), Some(last as f64));
    assert_eq!(sample(&text, names::LAG_MESSAGES), Some(0.0));
    assert_eq!(sample(&text, names::READY), Some(1.0));
    let events = sample(&text, &format!("{}_total", names::EVENTS_APPLIED)).unwrap_or(0.0);
    assert!(events >= 400.0, "events applied {events}");
    let pgwire = sample(
        &text,
        &format!("{}_total{{interface=\"pgwire\"}}", names::QUERIES),
    );
    assert!(pgwire >= Some(10.0), "{pgwire:?}");
    assert_eq!(get(addr, "/healthz").await?.0, 200);

    // A projected column disappears at the source: the view goes stale, readiness drops.
    let mut bad = Source::new();
    bad.lsn = 0xF000_0000;
    let mut tx = bad.transaction(&[Change::Upsert(5, 5, "x".into(), 1)]);
    if let Some(after) = tx[0].after.as_mut() {
        after.remove("position");
    }
    assert_eq!(tx[0].op, Op::Create);
    let seq = publish_transaction(&h.js, &tx).await?;
    testkit::until(WAIT, "stale applied", || async {
        (agent.store().progress().applied_seq >= seq).then_some(())
    })
    .await?;
    let (code, body) = get(addr, "/readyz").await?;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("stale"), "{body}");
    let (_, text) = get(addr, "/metrics").await?;
    assert_eq!(sample(&text, names::VIEWS_STALE), Some(1.0));
    assert_eq!(sample(&text, names::READY), Some(0.0));
    assert_eq!(get(addr, "/healthz").await?.0, 200, "still live");
    agent.shutdown().await?;
    Ok(())
}
