//! The `cdc` binary refusing to run: each case exits non-zero within a bounded time, and the last
//! line of stderr (main.rs's `cdc: …` line) says what is wrong and what to do. Plus the clean
//! shutdown on SIGTERM / SIGINT, and secrets from the environment.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use cdc::lsn::Lsn;
use common::{expect_refusal, Env};
use testkit::{Nats, PgAuth, PgOptions, Postgres, Signal};

const TABLE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v text)";
const WAIT: Duration = Duration::from_secs(60);

fn ensure_contains(line: &str, needles: &[&str]) -> Result<()> {
    for needle in needles {
        ensure!(line.contains(needle), "{needle:?} missing from {line:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused() -> Result<()> {
    let pg = Postgres::start_with(PgOptions {
        wal_level: "replica".into(),
        ..PgOptions::default()
    })
    .await?;
    let env = Env::with_servers(pg, Nats::start().await?, TABLE, &["public.items"]).await?;
    let mut reader = env.spawn_reader()?;
    let line = expect_refusal(&mut reader).await?;
    ensure_contains(
        &line,
        &[
            "wal_level is 'replica'",
            "set wal_level = logical",
            "restart",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_without_replication_is_refused() -> Result<()> {
    let env = Env::start(TABLE, &["public.items"]).await?;
    env.sql()
        .await?
        .batch_execute("CREATE ROLE plain_reader LOGIN; GRANT SELECT ON items TO plain_reader;")
        .await?;
    let url = env.pg.url_as("plain_reader", None, &env.db);
    env.write_config_with_url(&url, &["public.items"], "")?;
    let mut reader = env.spawn_reader()?;
    let line = expect_refusal(&mut reader).await?;
    ensure_contains(
        &line,
        &[
            "\"plain_reader\" lacks the REPLICATION attribute",
            "ALTER ROLE plain_reader REPLICATION",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_without_showing_it() -> Result<()> {
    const WRONG: &str = "Wr0ng-Pa55word-7f3a";
    let pg = Postgres::start_with(PgOptions {
        auth: PgAuth::Scram,
        ..PgOptions::default()
    })
    .await?;
    let env = Env::with_servers(pg, Nats::start().await?, TABLE, &["public.items"]).await?;
    let url = env.pg.url_as("postgres", Some(WRONG), &env.db);
    env.write_config_with_url(&url, &["public.items"], "")?;
    let mut reader = env.spawn_reader()?;
    let line = expect_refusal(&mut reader).await?;
    ensure_contains(
        &line,
        &[
            "password authentication failed",
            "check the password of role \"postgres\"",
        ],
    )?;
    let output = format!("{}\n{}", reader.stdout(), reader.stderr());
    ensure!(
        !output.contains(WRONG),
        "the password leaked into the output:\n{output}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reader_on_an_active_slot_is_refused() -> Result<()> {
    let env = Env::start(TABLE, &["public.items"]).await?;
    let mut first = env.start_reader().await?;
    let sql = env.sql().await?;
    let pid: i32 = testkit::until(Duration::from_secs(10), "the slot to be active", || async {
        sql.query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
            &[],
        )
        .await
        .ok()??
        .get::<_, Option<i32>>(0)
    })
    .await?;
    let mut second = env.spawn_reader()?;
    let line = expect_refusal(&mut second).await?;
    ensure_contains(
        &line,
        &[
            &format!("\"cdc_slot\" is active for PID {pid}"),
            "another reader is running",
        ],
    )?;
    ensure!(
        first.is_running(),
        "the first reader stopped\n{}",
        first.describe()
    );
    env.expect_streaming("INSERT INTO items VALUES (1, 'still streaming')")
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_nothing_is_refused_with_the_fix() -> Result<()> {
    let env = Env::start(
        "CREATE TABLE good (id int PRIMARY KEY);
         CREATE TABLE nothing (id int PRIMARY KEY, v text);
         ALTER TABLE nothing REPLICA IDENTITY NOTHING;",
        &["public.good", "public.nothing"],
    )
    .await?;
    let mut reader = env.spawn_reader()?;
    let line = expect_refusal(&mut reader).await?;
    ensure_contains(
        &line,
        &[
            "\"public\".\"nothing\" has REPLICA IDENTITY NOTHING",
            "ALTER TABLE \"public\".\"nothing\" REPLICA IDENTITY FULL",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_without_primary_key_is_refused_with_the_fix() -> Result<()> {
    let env = Env::start("CREATE TABLE nokey (id int, v text)", &["public.nokey"]).await?;
    let mut reader = env.spawn_reader()?;
    let line = expect_refusal(&mut reader).await?;
    ensure_contains(
        &line,
        &[
            "\"public\".\"nokey\" has no primary key",
            "ALTER TABLE \"public\".\"nokey\" ADD PRIMARY KEY",
            "ALTER TABLE \"public\".\"nokey\" REPLICA IDENTITY FULL",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_key_is_named() -> Result<()> {
    // No server is contacted: the file is rejected before anything else.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("cdc.toml");
    std::fs::write(
        &config,
        "[postgres]\nurl = \"postgres://cdc@127.0.0.1:1/db\"\nslot = \"s\"\npublication = \"p\"\n\
         tables = [\"public.t\"]\n\n[nats]\nurl = \"nats://127.0.0.1:1\"\nmax_in_flihgt = 10\n",
    )?;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdc"));
    cmd.arg("run").arg("--config").arg(&config);
    let mut reader = testkit::spawn_logged(cmd, "cdc")?;
    let line = expect_refusal(&mut reader).await?;
    ensure_contains(
        &line,
        &[
            "invalid config file",
            "unknown field `max_in_flihgt`",
            "max_in_flight",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_url_comes_from_the_environment() -> Result<()> {
    let env = Env::start(TABLE, &["public.items"]).await?;
    let url = env.pg.url(&env.db);

    // Empty in the file and no variable: refused, naming both places.
    env.write_config_with_url("", &["public.items"], "")?;
    let mut reader = env.spawn_reader_with_env(&[])?;
    let line = expect_refusal(&mut reader).await?;
    ensure_contains(&line, &["postgres.url is empty", "CDC_POSTGRES_URL"])?;

    // Empty in the file, set in the environment: streams.
    let mut reader = env.spawn_reader_with_env(&[("CDC_POSTGRES_URL", &url)])?;
    reader
        .wait_for_output("streaming", Duration::from_secs(30))
        .await?;
    env.expect_streaming("INSERT INTO items VALUES (1, 'from env')")
        .await?;
    reader.signal(Signal::Term)?;
    ensure!(reader
        .wait_with_timeout(Duration::from_secs(5))
        .await?
        .success());

    // Garbage in the file, overridden by the environment: streams too.
    env.write_config_with_url(
        "postgres://nobody:garbage@127.0.0.1:1/nowhere",
        &["public.items"],
        "",
    )?;
    let mut reader = env.spawn_reader_with_env(&[("CDC_POSTGRES_URL", &url)])?;
    reader
        .wait_for_output("streaming", Duration::from_secs(30))
        .await?;
    env.sql()
        .await?
        .batch_execute("INSERT INTO items VALUES (2, 'from env again')")
        .await?;
    let got = env.wait_for_events(2, WAIT).await?;
    ensure!(got.len() == 2, "{got:?}");
    ensure!(!reader.stderr().contains("garbage"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_confirms_and_exits_zero() -> Result<()> {
    stops_cleanly_on(Signal::Term).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_confirms_and_exits_zero() -> Result<()> {
    stops_cleanly_on(Signal::Int).await
}

/// With a workload running (so publishes are in flight), `signal` makes the reader exit 0 within
/// 5 s, logging the position it confirmed; the slot then holds exactly that position, and a
/// restarted reader completes the stream with no change lost or repeated.
async fn stops_cleanly_on(signal: Signal) -> Result<()> {
    let env = Env::start(TABLE, &["public.items"]).await?;
    let mut reader = env.start_reader().await?;

    // One-row transactions until told to stop; `committed` counts them.
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicI64::new(0));
    let workload = {
        let (stop, committed) = (Arc::clone(&stop), Arc::clone(&committed));
        let sql = env.sql().await?;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let first = committed.load(Ordering::Relaxed) + 1;
                sql.execute("INSERT INTO items VALUES ($1, 'row')", &[&first])
                    .await?;
                committed.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        })
    };

    env.wait_for_events(50, WAIT).await?;
    ensure!(!workload.is_finished(), "the workload stopped early");
    reader.signal(signal)?;
    let status = reader.wait_with_timeout(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    workload.await??;
    let status = status?;
    ensure!(
        status.success(),
        "exit status {status}\n{}",
        reader.describe()
    );
    let stderr = reader.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("confirming last acknowledged position"))
        .with_context(|| format!("no confirmation logged:\n{}", reader.describe()))?;
    let confirmed: Lsn = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("confirmed="))
        .with_context(|| format!("no confirmed= in {line:?}"))?
        .parse()
        .map_err(|e| anyhow::anyhow!("bad LSN in {line:?}: {e:?}"))?;
    ensure!(confirmed > Lsn::ZERO, "nothing confirmed: {line}");

    // The walsender is gone and the slot holds the logged position.
    let sql = env.sql().await?;
    let slot_lsn: String = testkit::until(Duration::from_secs(10), "the slot to be released", || async {
        let row = sql
            .query_one(
                "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
                &[],
            )
            .await
            .ok()?;
        (!row.get::<_, bool>(0)).then(|| row.get(1))
    })
    .await?;
    let slot_lsn: Lsn = slot_lsn.parse()?;
    ensure!(
        slot_lsn == confirmed,
        "slot confirmed_flush_lsn {slot_lsn} != logged {confirmed}"
    );

    // What was confirmed is what was acknowledged: every event in the stream (each one has its
    // PubAck) lies below the confirmed position, so a restart re-sends nothing it holds.
    let stored = common::read_from(&env.jetstream().await?, &env.stream, &env.prefix, 1)
        .await?
        .events;
    let last_commit = stored
        .iter()
        .map(|r| r.event.source.commit_lsn)
        .max()
        .context("no event in the stream")?;
    ensure!(
        last_commit < confirmed,
        "the stream holds an event committed at {last_commit}, past the confirmed {confirmed}"
    );

    // Restart: every committed row reaches the stream exactly once.
    let _reader = env.start_reader().await?;
    let total = usize::try_from(committed.load(Ordering::Relaxed))?;
    let got = env.wait_for_events(total, WAIT).await?;
    let ids: HashSet<i64> = got
        .iter()
        .filter_map(|r| r.event.after.as_ref()?.get("id")?.as_i64())
        .collect();
    let msg_ids: HashSet<String> = got.iter().map(|r| r.event.msg_id()).collect();
    ensure!(
        got.len() == total && ids.len() == total && msg_ids.len() == total,
        "{total} rows committed, {} events, {} distinct rows, {} distinct ids",
        got.len(),
        ids.len(),
        msg_ids.len()
    );
    Ok(())
}

/// A slot whose WAL Postgres removed (`max_slot_wal_keep_size`) can't stream the changes it
/// missed: the reader says so and what to do, instead of streaming on as if nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_slot_is_refused_with_the_fix() -> Result<()> {
    let env = Env::start(TABLE, &["public.items"]).await?;
    let mut reader = env.start_reader().await?;
    reader.signal(Signal::Term)?;
    reader.wait_with_timeout(Duration::from_secs(10)).await?;
    env.pg
        .batch_execute(
            "postgres",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'",
        )
        .await?;
    env.pg
        .batch_execute("postgres", "SELECT pg_reload_conf()")
        .await?;
    let sql = env.sql().await?;
    sql.batch_execute(
        "CREATE TABLE junk AS SELECT g, repeat('x', 500) AS pad FROM generate_series(1, 20000) g",
    )
    .await?;
    testkit::until(Duration::from_secs(60), "the slot to be invalidated", || {
        let pg = &env.pg;
        let sql = &sql;
        async move {
            pg.batch_execute("postgres", "SELECT pg_switch_wal(); CHECKPOINT")
                .await
                .ok()?;
            sql.batch_execute("INSERT INTO junk SELECT g, repeat('y', 500) FROM generate_series(1, 3000) g")
                .await
                .ok()?;
            let status: Option<String> = sql
                .query_one(
                    "SELECT wal_status::text FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            (status.as_deref() == Some("lost")).then_some(())
        }
    })
    .await?;
    let mut reader = env.spawn_reader()?;
    let line = expect_refusal(&mut reader).await?;
    ensure_contains(
        &line,
        &[
            "invalidated",
            "max_slot_wal_keep_size",
            "pg_drop_replication_slot('cdc_slot')",
            "cdc snapshot --table",
        ],
    )
}
