//! Exactly-once across failures: the reader killed with SIGKILL many times, NATS killed and
//! restarted, Postgres restarted, all while a workload commits. The workload's own log of what
//! it committed is compared with the stream, event by event.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use anyhow::{ensure, Result};
use cdc::envelope::Op;
use common::{Env, Received};

const SCHEMA: &str = "CREATE TABLE w (id bigint PRIMARY KEY, tx int NOT NULL, k int NOT NULL)";

/// Longest wait for the workload or the reader to make the progress a fault waits for.
const PROGRESS: Duration = Duration::from_secs(60);

/// One expected event: operation and row id.
type Expected = (Op, i64);

/// Transaction `i` (1-based) of the workload: two inserts, an update, and every tenth
/// transaction a delete of an older row. Returns its SQL and the events it must produce.
fn transaction(i: i64) -> (String, Vec<Expected>) {
    let (a, b) = (2 * i - 1, 2 * i);
    let mut sql = format!(
        "BEGIN; INSERT INTO w VALUES ({a}, {i}, 0), ({b}, {i}, 0); UPDATE w SET k = k + 1 WHERE id = {b};"
    );
    let mut events = vec![(Op::Create, a), (Op::Create, b), (Op::Update, b)];
    if i % 10 == 0 && i > 5 {
        let old = 2 * (i - 5) - 1;
        sql.push_str(&format!(" DELETE FROM w WHERE id = {old};"));
        events.push((Op::Delete, old));
    }
    sql.push_str(" COMMIT;");
    (sql, events)
}

/// Runs transactions `from..=to` on one connection; returns the events of those that committed.
async fn workload(sql: &tokio_postgres::Client, from: i64, to: i64) -> Result<Vec<Expected>> {
    workload_counted(sql, from, to, &AtomicI64::new(0)).await
}

/// [`workload`], counting committed transactions in `done` as it goes.
async fn workload_counted(
    sql: &tokio_postgres::Client,
    from: i64,
    to: i64,
    done: &AtomicI64,
) -> Result<Vec<Expected>> {
    let mut committed = Vec::new();
    for i in from..=to {
        let (text, events) = transaction(i);
        sql.batch_execute(&text).await?;
        committed.extend(events);
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(committed)
}

/// The stream's last sequence (`None` while it cannot be read).
async fn last_seq(js: &async_nats::jetstream::Context, stream: &str) -> Option<u64> {
    let mut s = js.get_stream(stream).await.ok()?;
    Some(s.info().await.ok()?.state.last_sequence)
}

fn row_id(r: &Received) -> i64 {
    let row = r.event.after.as_ref().or(r.event.before.as_ref());
    row.and_then(|row| row.get("id"))
        .and_then(|v| v.as_i64())
        .unwrap_or(-1)
}

/// The stream must hold exactly `expected`, in order, each message id once.
fn check_exactly_once(got: &[Received], expected: &[Expected]) -> Result<()> {
    let mut ids = std::collections::HashSet::new();
    let mut first_seen = std::collections::HashMap::new();
    for r in got {
        if let Some(prev) = first_seen.insert(r.event.msg_id(), r.seq) {
            anyhow::bail!(
                "duplicate message id {} at stream seqs {prev} and {}: {:?}",
                r.event.msg_id(),
                r.seq,
                got.iter()
                    .filter(|x| x.seq + 3 >= prev && x.seq <= r.seq + 1)
                    .map(|x| (
                        x.seq,
                        x.headers.get("Nats-Msg-Id").cloned(),
                        x.event.op,
                        row_id(x)
                    ))
                    .collect::<Vec<_>>()
            );
        }
        ids.insert(r.event.msg_id());
    }
    let actual: Vec<Expected> = got.iter().map(|r| (r.event.op, row_id(r))).collect();
    if let Some(pos) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        anyhow::bail!(
            "stream differs from the workload at event {pos}: stream {:?}, workload {:?}",
            &actual[pos..(pos + 5).min(actual.len())],
            &expected[pos..(pos + 5).min(expected.len())]
        );
    }
    ensure!(
        actual.len() == expected.len(),
        "stream has {} events, the workload committed {}",
        actual.len(),
        expected.len()
    );
    for w in got.windows(2) {
        ensure!(
            w[0].event.source.commit_lsn <= w[1].event.source.commit_lsn,
            "commit order broken"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reader_killed_20_times_loses_and_duplicates_nothing() -> Result<()> {
    const TRANSACTIONS: i64 = 20_000;
    const KILLS: usize = 20;
    let env = Env::start(SCHEMA, &["public.w"]).await?;
    let mut reader = env.start_reader().await?;
    let sql = env.sql().await?;
    let work = workload(&sql, 1, TRANSACTIONS);
    let js = env.jetstream().await?;
    let chaos = async {
        // Deterministic pseudo-random kill moments: after each start, once the reader has
        // published 1..=600 more messages (so every restart makes progress before the next kill).
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut seen = last_seq(&js, &env.stream).await.unwrap_or(0);
        for _ in 0..KILLS {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let target = seen + 1 + seed % 600;
            seen = testkit::until(PROGRESS, "the reader to publish more", || async {
                last_seq(&js, &env.stream).await.filter(|s| *s >= target)
            })
            .await?;
            reader.kill9()?;
            reader = env.start_reader().await?;
        }
        anyhow::Ok(reader)
    };
    let (expected, reader) = tokio::join!(work, chaos);
    let (expected, _reader) = (expected?, reader?);
    let got = env
        .wait_for_events(expected.len(), Duration::from_secs(180))
        .await?;
    check_exactly_once(&got, &expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_and_postgres_restarts_lose_and_duplicate_nothing() -> Result<()> {
    let mut env = Env::start(SCHEMA, &["public.w"]).await?;
    let mut reader = env.start_reader().await?;
    let mut expected = Vec::new();

    // NATS killed mid-workload, restarted while the workload goes on.
    let sql = env.sql().await?;
    let nats = &mut env.nats;
    let committed = AtomicI64::new(0);
    let nats_fault = async {
        // The kill lands after 300 transactions, and NATS stays down while 500 more commit.
        let at_least = |n: i64| {
            let committed = &committed;
            testkit::until(PROGRESS, "workload progress", move || async move {
                (committed.load(Ordering::Relaxed) >= n).then_some(())
            })
        };
        at_least(300).await?;
        nats.kill9()?;
        at_least(800).await?;
        nats.start_again().await
    };
    let (done, restarted) = tokio::join!(workload_counted(&sql, 1, 3000, &committed), nats_fault);
    expected.extend(done?);
    restarted?;

    // Postgres restarted (fast) while the reader still streams the backlog.
    env.pg.restart_fast().await?;
    let sql = env.sql().await?;
    expected.extend(workload(&sql, 3001, 6000).await?);

    let got = match env
        .wait_for_events(expected.len(), Duration::from_secs(120))
        .await
    {
        Ok(got) => got,
        Err(e) => anyhow::bail!(
            "{e}\n{}\npostgres log tail:\n{}",
            reader.describe(),
            env.pg
                .log()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        ),
    };
    let result = check_exactly_once(&got, &expected);
    if result.is_err() {
        eprintln!("{}", reader.describe());
    }
    ensure!(reader.is_running(), "reader exited: {}", reader.describe());
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreachable_at_start_is_retried_and_logged() -> Result<()> {
    let mut env = Env::start(SCHEMA, &["public.w"]).await?;
    env.nats.stop().await?;
    let mut reader = env.spawn_reader()?;
    reader
        .wait_for_output("is unreachable", Duration::from_secs(30))
        .await?;
    ensure!(reader.is_running(), "reader gave up: {}", reader.describe());
    let sql = env.sql().await?;
    let expected = workload(&sql, 1, 50).await?;
    env.nats.start_again().await?;
    reader
        .wait_for_output("streaming", Duration::from_secs(60))
        .await?;
    let got = env
        .wait_for_events(expected.len(), Duration::from_secs(60))
        .await?;
    check_exactly_once(&got, &expected)
}
