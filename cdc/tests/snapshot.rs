//! Snapshots while streaming: the initial load of existing rows is exact under concurrent
//! writes, resumes after a crash from its last finished chunk, and can be requested again.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use cdc::envelope::Op;
use cdc::Lsn;
use common::{Env, Received};
use serde_json::Value;

const ROWS: i64 = 200_000;

/// Folds the stream into the table it describes: key → (row, LSN of its last write).
fn fold(events: &[Received], table: &str) -> BTreeMap<i64, (Value, Lsn)> {
    let mut rows: BTreeMap<i64, (Value, Lsn)> = BTreeMap::new();
    let id =
        |row: &serde_json::Map<String, Value>| row.get("id").and_then(Value::as_i64).unwrap_or(-1);
    for r in events.iter().filter(|r| r.event.source.table == table) {
        let ev = &r.event;
        let at = ev.source.commit_lsn;
        match ev.op {
            Op::Create | Op::Read => {
                let after = ev.after.clone().unwrap_or_default();
                rows.insert(id(&after), (Value::Object(after), at));
            }
            Op::Update => {
                if let Some(before) = &ev.before {
                    rows.remove(&id(before));
                }
                let after = ev.after.clone().unwrap_or_default();
                rows.insert(id(&after), (Value::Object(after), at));
            }
            Op::Delete => {
                if let Some(before) = &ev.before {
                    rows.remove(&id(before));
                }
            }
            Op::Truncate => rows.clear(),
            Op::SnapshotEnd => {
                let start = ev.source.lsn;
                rows.retain(|_, (_, written)| *written >= start);
            }
        }
    }
    rows
}

async fn table_rows(env: &Env) -> Result<BTreeMap<i64, Value>> {
    let sql = env.sql().await?;
    let mut out = BTreeMap::new();
    for row in sql
        .query("SELECT id, k, name FROM items ORDER BY id", &[])
        .await?
    {
        let id: i64 = row.get(0);
        let k: i32 = row.get(1);
        let name: String = row.get(2);
        out.insert(id, serde_json::json!({"id": id, "k": k, "name": name}));
    }
    Ok(out)
}

/// Inserts a marker row (`id`) and returns the whole stream once the marker's insert is in
/// it: WAL order puts every change committed before it ahead of it.
async fn through_marker(env: &Env, id: i64) -> Result<Vec<Received>> {
    env.sql()
        .await?
        .execute("INSERT INTO items VALUES ($1, 0, 'marker')", &[&id])
        .await?;
    let js = env.jetstream().await?;
    testkit::until(
        Duration::from_secs(120),
        "the marker row in the stream",
        || {
            let js = js.clone();
            async move {
                let stream = js.get_stream("CDC").await.ok()?;
                let last = stream
                    .get_last_raw_message_by_subject("cdc.public.items")
                    .await
                    .ok()?;
                let ev: cdc::ChangeEvent = serde_json::from_slice(&last.payload).ok()?;
                let seen = ev.op == Op::Create
                    && ev.after.as_ref().and_then(|a| a.get("id")) == Some(&Value::from(id));
                seen.then_some(())
            }
        },
    )
    .await?;
    let last = js
        .get_stream("CDC")
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    let all = env.wait_for_all_events(1, Duration::from_secs(30)).await?;
    ensure!(
        all.last().is_some_and(|r| r.seq + 10 >= last),
        "stream read ended before the marker"
    );
    Ok(all)
}

/// Runs `cdc snapshot --table TABLE` (asks the running reader, follows to the end) on a
/// blocking thread.
fn snapshot_command(
    env: &Env,
    table: &'static str,
) -> tokio::task::JoinHandle<std::io::Result<std::process::Output>> {
    let config = env.config.clone();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_cdc"))
            .args(["snapshot", "--table", table, "--config"])
            .arg(config)
            .output()
    })
}

/// Waits until the newest message on the table's subject is a snapshot end (the tests stop
/// writing before the snapshot can end).
async fn wait_for_snapshot_end(env: &Env, timeout: Duration) -> Result<()> {
    let js = env.jetstream().await?;
    testkit::until(timeout, "the snapshot end event", || {
        let js = js.clone();
        async move {
            let stream = js.get_stream("CDC").await.ok()?;
            let last = stream
                .get_last_raw_message_by_subject("cdc.public.items")
                .await
                .ok()?;
            let ev: cdc::ChangeEvent = serde_json::from_slice(&last.payload).ok()?;
            (ev.op == Op::SnapshotEnd).then_some(())
        }
    })
    .await
}

/// Concurrent writes while the snapshot runs: updates of rows read and not yet read, deletes
/// ahead of the cursor, inserts, and primary-key changes.
async fn churn(env: &Env, rounds: i64) -> Result<()> {
    let sql = env.sql().await?;
    for i in 0..rounds {
        let a = (i * 7919) % ROWS + 1;
        let b = (i * 104_729) % ROWS + 1;
        sql.batch_execute(&format!(
            "BEGIN;
             UPDATE items SET k = k + 1, name = 'u{i}' WHERE id = {a};
             DELETE FROM items WHERE id = {b};
             INSERT INTO items VALUES ({new}, {i}, 'new{i}') ON CONFLICT (id) DO NOTHING;
             UPDATE items SET id = {moved} WHERE id = {c};
             COMMIT;",
            new = ROWS + 1 + i,
            moved = 10 * ROWS + i,
            c = (i * 3571) % ROWS + 1,
        ))
        .await?;
    }
    Ok(())
}

fn compare(folded: &BTreeMap<i64, (Value, Lsn)>, table: &BTreeMap<i64, Value>) -> Result<()> {
    let missing: Vec<_> = table
        .keys()
        .filter(|k| !folded.contains_key(k))
        .take(5)
        .collect();
    let extra: Vec<_> = folded
        .keys()
        .filter(|k| !table.contains_key(k))
        .take(5)
        .collect();
    let differ: Vec<_> = table
        .iter()
        .filter(|(k, v)| folded.get(k).is_some_and(|(f, _)| f != *v))
        .take(5)
        .collect();
    ensure!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "stream ≠ table ({} vs {} rows): missing {missing:?}, extra {extra:?}, differing {differ:?}",
        folded.len(),
        table.len()
    );
    Ok(())
}

const SCHEMA: &str =
    "CREATE TABLE items (id bigint PRIMARY KEY, k int NOT NULL, name text NOT NULL);
    INSERT INTO items SELECT g, 0, 'row ' || g FROM generate_series(1, 200000) g;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_snapshot_is_exact_under_concurrent_writes() -> Result<()> {
    let env = Env::start(SCHEMA, &["public.items"]).await?;
    env.write_config(&["public.items"], "[snapshot]\nchunk_rows = 5000\n")?;
    let _reader = env.start_reader().await?;
    churn(&env, 1500).await?;
    wait_for_snapshot_end(&env, Duration::from_secs(300)).await?;
    let all = through_marker(&env, -1).await?;
    let settled = (fold(&all, "items"), table_rows(&env).await?);
    if let Err(e) = compare(&settled.0, &settled.1) {
        let reads: Vec<_> = all.iter().filter(|r| r.event.op == Op::Read).collect();
        let mut ats: Vec<_> = reads.iter().map(|r| r.event.source.commit_lsn).collect();
        ats.dedup();
        anyhow::bail!(
            "{e}\nreads {} in {} chunks; first ids {:?}\n{}",
            reads.len(),
            ats.len(),
            reads
                .iter()
                .take(3)
                .map(|r| (
                    r.seq,
                    r.headers.get("Nats-Msg-Id").cloned(),
                    r.event.after.clone()
                ))
                .collect::<Vec<_>>(),
            _reader
                .stderr()
                .lines()
                .filter(|l| l.contains("snapshot"))
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let reads = all.iter().filter(|r| r.event.op == Op::Read).count();
    ensure!(reads > 150_000, "only {reads} snapshot rows");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_resumes_after_kill_and_can_be_requested_again() -> Result<()> {
    let env = Env::start(SCHEMA, &["public.items"]).await?;
    env.write_config(&["public.items"], "[snapshot]\nchunk_rows = 2000\n")?;
    let mut reader = env.start_reader().await?;
    reader
        .wait_for_output("snapshot progress", Duration::from_secs(120))
        .await?;
    // Let a few chunks land, then crash in the middle.
    testkit::until(Duration::from_secs(120), "20000 snapshot rows", || async {
        let all = env
            .wait_for_all_events(1, Duration::from_secs(10))
            .await
            .ok()?;
        (all.len() >= 20_000).then_some(())
    })
    .await?;
    reader.kill9()?;
    let mut reader = env.start_reader().await?;
    reader
        .wait_for_output("resume_after=Some", Duration::from_secs(60))
        .await
        .context("the restarted reader did not resume from a finished chunk")?;
    churn(&env, 200).await?;
    wait_for_snapshot_end(&env, Duration::from_secs(300)).await?;
    let all = through_marker(&env, -1).await?;
    let reads = all.iter().filter(|r| r.event.op == Op::Read).count() as i64;
    ensure!(
        reads < 2 * ROWS,
        "{reads} snapshot rows: the snapshot restarted from zero"
    );
    let settled = env
        .wait_for_all_events(all.len(), Duration::from_secs(30))
        .await?;
    compare(&fold(&settled, "items"), &table_rows(&env).await?)?;

    // On demand: `cdc snapshot --table` asks the running reader and follows to the end.
    let before = settled
        .iter()
        .filter(|r| r.event.op == Op::SnapshotEnd)
        .count();
    let status = snapshot_command(&env, "public.items").await??;
    ensure!(
        status.status.success(),
        "cdc snapshot failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    ensure!(String::from_utf8_lossy(&status.stdout).contains("[done]"));
    let again = env
        .wait_for_all_events(settled.len() + 1, Duration::from_secs(60))
        .await?;
    let ends = again
        .iter()
        .filter(|r| r.event.op == Op::SnapshotEnd)
        .count();
    ensure!(ends > before, "no second snapshot end");
    compare(&fold(&again, "items"), &table_rows(&env).await?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_without_primary_key_are_refused_clearly_and_still_stream() -> Result<()> {
    let env = Env::start(
        "CREATE TABLE logs (at timestamptz, line text);
         ALTER TABLE logs REPLICA IDENTITY FULL;
         INSERT INTO logs VALUES (now(), 'before');",
        &["public.logs"],
    )
    .await?;
    let mut reader = env.start_reader().await?;
    reader
        .wait_for_output("has no primary key", Duration::from_secs(60))
        .await?;
    let out = snapshot_command(&env, "public.logs").await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "cdc snapshot succeeded on a table without a key"
    );
    ensure!(
        stderr.contains("ADD PRIMARY KEY"),
        "unclear refusal: {stderr}"
    );
    env.sql()
        .await?
        .batch_execute("INSERT INTO logs VALUES (now(), 'after')")
        .await?;
    let got = env.wait_for_events(1, Duration::from_secs(60)).await?;
    ensure!(got[0].event.after.as_ref().and_then(|a| a.get("line")) == Some(&Value::from("after")));
    Ok(())
}

/// A transaction whose commit record is in the WAL (and its change in the stream) but which
/// snapshots still see as running: synchronous replication keeps it so while no standby
/// confirms it. A chunk read then must not publish the row it changed as it was before: the
/// read waits until the transaction is visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_but_invisible_change_is_not_overwritten_by_a_snapshot_read() -> Result<()> {
    let env = Env::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, k int NOT NULL, name text NOT NULL);
         INSERT INTO items SELECT g, 0, 'row ' || g FROM generate_series(1, 2000) g;",
        &["public.items"],
    )
    .await?;
    env.write_config(
        &["public.items"],
        "[snapshot]\ninitial = false\nchunk_rows = 500\n",
    )?;
    // Every session of the test database commits without waiting for a standby, except the
    // one below that asks for it.
    env.pg
        .batch_execute(
            "postgres",
            &format!("ALTER DATABASE {} SET synchronous_commit = local", env.db),
        )
        .await?;
    let mut reader = env.start_reader().await?;
    env.pg
        .batch_execute(
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = 'absent_standby'",
        )
        .await?;
    env.pg
        .batch_execute("postgres", "SELECT pg_reload_conf()")
        .await?;
    // Delete rows with synchronous_commit = on until one delete is stuck waiting for the
    // (absent) standby: the checkpointer applies the setting shortly after the reload.
    let observer = env.sql().await?;
    let mut stuck = None;
    for id in 1..=50_i64 {
        let session = env.sql().await?;
        let delete = tokio::spawn(async move {
            session
                .batch_execute(&format!(
                    "SET synchronous_commit = on; DELETE FROM items WHERE id = {id}"
                ))
                .await
        });
        let waiting = testkit::until(Duration::from_secs(2), "a SyncRep wait", || {
            let observer = &observer;
            let delete = &delete;
            async move {
                if delete.is_finished() {
                    return Some(false);
                }
                let n: i64 = observer
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                        &[],
                    )
                    .await
                    .ok()?
                    .get(0);
                (n > 0).then_some(true)
            }
        })
        .await?;
        if waiting {
            stuck = Some((id, delete));
            break;
        }
    }
    let (stuck_id, delete) = stuck.context("no delete ever waited for the standby")?;
    // Its change is in the stream already.
    testkit::until(
        Duration::from_secs(60),
        "the stuck delete in the stream",
        || async {
            let got = env.wait_for_events(1, Duration::from_secs(5)).await.ok()?;
            got.iter()
                .any(|r| {
                    r.event.op == Op::Delete
                        && r.event.before.as_ref().and_then(|b| b.get("id"))
                            == Some(&Value::from(stuck_id))
                })
                .then_some(())
        },
    )
    .await?;
    // Snapshot the table while the delete is still invisible to every snapshot.
    let snapshot = snapshot_command(&env, "public.items");
    reader
        .wait_for_output("committed but are not visible yet", Duration::from_secs(60))
        .await?;
    env.pg
        .batch_execute("postgres", "ALTER SYSTEM RESET synchronous_standby_names")
        .await?;
    env.pg
        .batch_execute("postgres", "SELECT pg_reload_conf()")
        .await?;
    delete.await??;
    let out = snapshot.await??;
    ensure!(
        out.status.success(),
        "cdc snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let all = through_marker(&env, -1).await?;
    let folded = fold(&all, "items");
    ensure!(
        !folded.contains_key(&stuck_id),
        "row {stuck_id}, deleted before the snapshot read, came back from the snapshot"
    );
    compare(&folded, &table_rows(&env).await?)?;
    Ok(())
}
