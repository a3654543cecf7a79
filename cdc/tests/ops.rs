//! Operations: the idle-slot guard, the metrics endpoint, `cdc status`, `cdc tail`, and no
//! secret in any output.

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use common::Env;
use testkit::{PgOptions, Postgres, Signal};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const TABLE: &str = "CREATE TABLE items (id bigint PRIMARY KEY, v text)";
const WAIT: Duration = Duration::from_secs(60);
const MB: i64 = 1024 * 1024;

/// WAL retained behind `slot`: `pg_current_wal_lsn() - restart_lsn`, bytes.
async fn retained(sql: &tokio_postgres::Client, slot: &str) -> Result<i64> {
    let row = sql
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .with_context(|| format!("reading slot {slot}"))?;
    Ok(row.get(0))
}

/// The published tables stay idle while another database of the cluster writes ≥ 200 MB of
/// WAL. Within 60 s of that writer stopping, the reader's slot retains < 64 MB, while an unread
/// logical slot of the same cluster (no guard) still retains ≥ 200 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_does_not_retain_wal_written_by_other_databases() -> Result<()> {
    // Checkpoints triggered by WAL volume would only add WAL; keep them out of the measurement.
    let pg = Postgres::start_with(PgOptions {
        extra_conf: vec![
            "max_wal_size = '4GB'".into(),
            "checkpoint_timeout = '1h'".into(),
        ],
        ..PgOptions::default()
    })
    .await?;
    let env =
        Env::with_servers(pg, testkit::Nats::start().await?, TABLE, &["public.items"]).await?;
    let _reader = env.start_reader().await?;
    let sql = env.sql().await?;
    sql.batch_execute("SELECT pg_create_logical_replication_slot('control_unread', 'pgoutput')")
        .await?;

    let other = env.pg.create_database("other").await?;
    let writer = env.pg.connect(&other).await?;
    writer
        .batch_execute("CREATE TABLE filler (id bigint, pad text)")
        .await?;
    let start_lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let started = Instant::now();
    let mut written = 0;
    let mut next_id = 0i64;
    while written < 210 * MB {
        // ~25 MB of WAL per statement: 1 KiB rows (below the TOAST threshold, so uncompressed).
        writer
            .execute(
                "INSERT INTO filler SELECT g, repeat(md5(g::text), 32) \
                 FROM generate_series($1::bigint, $1::bigint + 24999) g",
                &[&next_id],
            )
            .await?;
        next_id += 25_000;
        written = sql
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
                &[&start_lsn],
            )
            .await?
            .get(0);
    }
    let wrote_in = started.elapsed();
    let stopped = Instant::now();

    let reader_retained = testkit::until_ok(
        WAIT,
        "the reader's slot to retain less than 64 MB",
        || async {
            let r = retained(&sql, "cdc_slot").await?;
            if r < 64 * MB {
                Ok(r)
            } else {
                Err(anyhow::anyhow!("retains {} MB", r / MB))
            }
        },
    )
    .await?;
    let took = stopped.elapsed();
    let control = retained(&sql, "control_unread").await?;
    eprintln!(
        "wrote {} MB of WAL in {wrote_in:?}; the reader's slot retained {} KB {took:?} later; the unread slot {} MB",
        written / MB,
        reader_retained / 1024,
        control / MB
    );
    ensure!(
        control >= 200 * MB,
        "the unread control slot retains only {} MB: the test did not write enough WAL",
        control / MB
    );
    // The published table was really idle: nothing but heartbeats in the stream.
    let events: Vec<_> = common::read_from(&env.jetstream().await?, &env.stream, &env.prefix, 1)
        .await?
        .events
        .into_iter()
        .filter(|r| !r.event.source.snapshot)
        .collect();
    ensure!(
        events.is_empty(),
        "the published table was not idle: {events:?}"
    );
    sql.batch_execute("SELECT pg_drop_replication_slot('control_unread')")
        .await?;
    Ok(())
}

/// `GET path` on `addr`; returns the status code and the body.
async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the metrics endpoint {addr}"))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .context("metrics endpoint did not answer")??;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status line in {out:?}"))?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// The value of the sample `series` (name with labels, as rendered) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The reader with a metrics port: counters move with writes, /readyz is 200 while streaming
/// and turns 503 when NATS goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_writes_and_readiness_follows_nats() -> Result<()> {
    let mut env = Env::start(TABLE, &["public.items"]).await?;
    let addr = format!("127.0.0.1:{}", testkit::free_port());
    env.write_config(
        &["public.items"],
        &format!("\n[metrics]\nlisten = {addr:?}\n"),
    )?;
    let reader = env.start_reader().await?;

    let (status, body) = http_get(&addr, "/healthz").await?;
    ensure!(status == 200, "/healthz {status}: {body}");
    let sql = env.sql().await?;
    sql.batch_execute(
        "INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, 100) g;
         UPDATE items SET v = 'changed' WHERE id <= 10;
         DELETE FROM items WHERE id = 1;",
    )
    .await?;
    env.wait_for_events(111, WAIT).await?;
    let scrape = testkit::until_ok(WAIT, "the counters to show the writes", || async {
        let (status, text) = http_get(&addr, "/metrics").await?;
        ensure!(status == 200, "/metrics {status}");
        let c = sample(&text, "cdc_reader_events_published_total{op=\"c\"}");
        let u = sample(&text, "cdc_reader_events_published_total{op=\"u\"}");
        let d = sample(&text, "cdc_reader_events_published_total{op=\"d\"}");
        let acks = sample(&text, "cdc_reader_publish_latency_seconds_count");
        ensure!(
            // One latency sample per PubAck; a PubAck covers the messages before it, and the
            // reader asks for one at least at the end of each of the three transactions.
            c == Some(100.0) && u == Some(10.0) && d == Some(1.0) && acks >= Some(3.0),
            "c={c:?} u={u:?} d={d:?} acks={acks:?}"
        );
        Ok(text)
    })
    .await?;
    for (series, at_least) in [
        (
            "cdc_reader_event_bytes_published_total{op=\"c\"}",
            100.0 * 50.0,
        ),
        ("cdc_reader_heartbeats_published_total", 1.0),
        ("cdc_reader_sessions_started_total", 1.0),
        ("cdc_reader_streaming", 1.0),
        ("cdc_reader_last_commit_lsn", 1.0),
        ("cdc_reader_last_commit_timestamp_seconds", 1.7e9),
        ("cdc_reader_confirmed_lsn", 1.0),
    ] {
        let v = sample(&scrape, series).with_context(|| format!("{series} missing:\n{scrape}"))?;
        ensure!(v >= at_least, "{series} = {v}, expected ≥ {at_least}");
    }
    for series in [
        "cdc_reader_replication_lag_bytes",
        "cdc_reader_replication_lag_seconds",
        "cdc_reader_attempt_failures_total",
    ] {
        ensure!(
            sample(&scrape, series).is_some(),
            "{series} missing:\n{scrape}"
        );
    }
    // Caught up: the lag comes back to zero.
    testkit::until_ok(WAIT, "the lag to be zero once caught up", || async {
        let (_, text) = http_get(&addr, "/metrics").await?;
        let bytes = sample(&text, "cdc_reader_replication_lag_bytes");
        let secs = sample(&text, "cdc_reader_replication_lag_seconds");
        ensure!(
            bytes == Some(0.0) && secs == Some(0.0),
            "lag bytes {bytes:?}, seconds {secs:?}"
        );
        Ok(())
    })
    .await?;
    let (status, body) = http_get(&addr, "/readyz").await?;
    ensure!(status == 200, "/readyz {status}: {body}");

    env.nats.stop().await?;
    let body = testkit::until_ok(WAIT, "/readyz to answer 503", || async {
        let (status, body) = http_get(&addr, "/readyz").await?;
        ensure!(status == 503, "/readyz {status}: {body}");
        Ok(body)
    })
    .await?;
    ensure!(body.contains("not streaming"), "{body}");
    let (status, _) = http_get(&addr, "/healthz").await?;
    ensure!(status == 200, "/healthz {status} while NATS is down");

    // NATS back: ready again (the client reconnects by itself, or the reader starts a new
    // session), and streaming.
    env.nats.start_again().await?;
    testkit::until_ok(WAIT, "/readyz to answer 200 again", || async {
        let (status, body) = http_get(&addr, "/readyz").await?;
        ensure!(status == 200, "/readyz {status}: {body}");
        Ok(())
    })
    .await?;
    sql.batch_execute("INSERT INTO items VALUES (1000, 'after the outage')")
        .await?;
    env.wait_for_events(112, WAIT).await?;
    reader.signal(Signal::Term)?;
    Ok(())
}

/// What a finished `cdc` command printed.
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cdc <args>` to completion (bounded), with `RUST_LOG=debug`.
async fn cdc(args: &[&str]) -> Result<Output> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdc"));
    cmd.args(args)
        .env("RUST_LOG", "debug")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .with_context(|| format!("cdc {args:?} did not finish within 60 s"))??;
    Ok(Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `cdc status` before and while the reader runs, as a table and as JSON, with a durable
/// consumer's lag; and with NATS down: the Postgres part still shown, one line saying what
/// is unavailable, exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_slot_stream_heartbeat_and_consumer_lag() -> Result<()> {
    let mut env = Env::start(TABLE, &["public.items"]).await?;
    let config = env.config.to_string_lossy().into_owned();

    // Nothing yet: the slot and the stream are missing, which is a state, not a failure.
    let before = cdc(&["status", "--config", &config, "--json"]).await?;
    ensure!(
        before.code == Some(0),
        "exit {:?}\n{}",
        before.code,
        before.all()
    );
    let json: serde_json::Value = serde_json::from_str(&before.stdout)?;
    ensure!(json["postgres"]["exists"] == false, "{json}");
    ensure!(json["nats"]["exists"] == false, "{json}");

    let _reader = env.start_reader().await?;
    // The (empty) table's snapshot ends first, so the stream holds its end event and 5 inserts.
    env.wait_for_all_events(1, WAIT).await?;
    let sql = env.sql().await?;
    sql.batch_execute("INSERT INTO items SELECT g, 'v' FROM generate_series(1, 5) g")
        .await?;
    env.wait_for_events(5, WAIT).await?;
    let js = env.jetstream().await?;
    js.get_stream(&env.stream)
        .await?
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("page_agent".into()),
            filter_subject: "cdc.public.items".into(),
            ..Default::default()
        })
        .await?;
    let pid: i32 = sql
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'cdc_slot'",
            &[],
        )
        .await?
        .get(0);
    // Wait for a heartbeat after the events, so the stream's state is settled enough to check.
    let out = testkit::until_ok(WAIT, "status to show a recent heartbeat", || async {
        let out = cdc(&["status", "--config", &config, "--json"]).await?;
        let json: serde_json::Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("not JSON: {}", out.all()))?;
        ensure!(
            json["nats"]["heartbeat"]["age_secs"].as_f64() < Some(5.0),
            "{json}"
        );
        Ok((out, json))
    })
    .await?;
    let (out, json) = out;
    ensure!(out.code == Some(0), "exit {:?}\n{}", out.code, out.all());
    let pg = &json["postgres"];
    ensure!(pg["slot"] == "cdc_slot" && pg["active"] == true, "{json}");
    ensure!(pg["active_pid"] == pid, "{json}");
    for key in ["confirmed_flush_lsn", "restart_lsn", "server_wal_lsn"] {
        let text = pg[key]
            .as_str()
            .with_context(|| format!("{key} missing: {json}"))?;
        text.parse::<cdc::Lsn>()
            .map_err(|e| anyhow::anyhow!("{key} {text:?}: {e:?}"))?;
    }
    ensure!(pg["retained_wal_bytes"].as_i64() >= Some(0), "{json}");
    let nats = &json["nats"];
    let info = js.get_stream(&env.stream).await?.get_info().await?;
    ensure!(nats["stream"] == "CDC", "{json}");
    ensure!(
        nats["last_seq"].as_u64() <= Some(info.state.last_sequence)
            && nats["last_seq"].as_u64() >= Some(6),
        "{json}"
    );
    ensure!(nats["bytes"].as_u64() > Some(0), "{json}");
    let consumers = nats["consumers"].as_array().context("consumers")?;
    ensure!(consumers.len() == 1, "{json}");
    ensure!(consumers[0]["name"] == "page_agent", "{json}");
    ensure!(consumers[0]["num_pending"].as_u64() == Some(6), "{json}");
    ensure!(consumers[0]["ack_floor_seq"].as_u64() == Some(0), "{json}");
    ensure!(nats["snapshots"][0]["table"] == "public.items", "{json}");
    ensure!(nats["snapshots"][0]["state"] == "done", "{json}");

    let table = cdc(&["status", "--config", &config]).await?;
    ensure!(table.code == Some(0), "{}", table.all());
    for needle in [
        format!("cdc_slot (active, pid {pid})").as_str(),
        "confirmed_flush_lsn",
        "WAL retained",
        "last heartbeat",
        "page_agent",
        "public.items: done",
    ] {
        ensure!(
            table.stdout.contains(needle),
            "{needle:?} missing:\n{}",
            table.stdout
        );
    }

    env.nats.stop().await?;
    let down = cdc(&["status", "--config", &config]).await?;
    ensure!(down.code == Some(1), "exit {:?}\n{}", down.code, down.all());
    ensure!(down.stdout.contains("cdc_slot (active"), "{}", down.stdout);
    let nats_url = env.nats.public_url();
    let line = common::last_line(&down.stderr);
    ensure!(
        line.starts_with("cdc: status incomplete: NATS at ")
            && line.contains(&nats_url)
            && line.contains("unreachable"),
        "{line:?}"
    );
    let down_json = cdc(&["status", "--config", &config, "--json"]).await?;
    ensure!(down_json.code == Some(1), "{}", down_json.all());
    let json: serde_json::Value = serde_json::from_str(&down_json.stdout)?;
    ensure!(
        json["nats"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("unreachable")),
        "{json}"
    );
    ensure!(json["postgres"]["active"] == true, "{json}");
    Ok(())
}

/// Non-empty lines of `text`.
fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// `cdc tail`: readable lines and raw envelopes, filters by table and op, the three starts,
/// a large event resolved from the object store, and following live until SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_filters_and_follows() -> Result<()> {
    let env = Env::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text);
         CREATE TABLE other (id int PRIMARY KEY);",
        &["public.items", "public.other"],
    )
    .await?;
    let config = env.config.to_string_lossy().into_owned();
    let _reader = env.start_reader().await?;
    // Both (empty) tables' snapshots end before the writes.
    env.wait_for_all_events(2, WAIT).await?;
    let sql = env.sql().await?;
    let big = "L".repeat(1536 * 1024);
    sql.batch_execute(
        "INSERT INTO items VALUES (1, 'one'), (2, 'two'), (3, 'three');
         INSERT INTO other VALUES (10);
         UPDATE items SET v = 'deux' WHERE id = 2;
         DELETE FROM items WHERE id = 3;",
    )
    .await?;
    sql.execute("INSERT INTO items VALUES (4, $1)", &[&big])
        .await?;
    let events = env.wait_for_events(7, WAIT).await?;
    ensure!(
        events[6].headers.contains_key("Cdc-Large-Ref"),
        "not a large event: {:?}",
        events[6].headers
    );
    let large_seq = events[6].seq;

    // Everything, readable: the two snapshot ends and seven changes; no heartbeats.
    let all = cdc(&[
        "tail",
        "--config",
        &config,
        "--from-seq",
        "1",
        "--no-follow",
    ])
    .await?;
    ensure!(all.code == Some(0), "{}", all.all());
    let got = lines(&all.stdout);
    ensure!(got.len() == 9, "{}", all.stdout);
    let first_insert = got
        .iter()
        .find(|l| l.contains("  c  public.items  id=1 v=\"one\""))
        .with_context(|| format!("no readable insert line:\n{}", all.stdout))?;
    ensure!(
        first_insert.starts_with(&format!("#{} ", events[0].seq))
            && first_insert.ends_with(&format!("lsn={}", events[0].event.source.commit_lsn)),
        "{first_insert}"
    );
    ensure!(
        got.iter().any(|l| l.contains("  d  public.items  id=3")),
        "{}",
        all.stdout
    );
    ensure!(
        got.iter()
            .any(|l| l.contains("  e  public.other  (end of the table's snapshot)")),
        "{}",
        all.stdout
    );
    let large_line = got.last().copied().unwrap_or_default();
    ensure!(
        large_line.starts_with(&format!("#{large_seq} ")) && large_line.contains("id=4 v=\"LLLL"),
        "{large_line:.300}"
    );

    // One table, some operations.
    let filtered = cdc(&[
        "tail",
        "--config",
        &config,
        "--from-seq",
        "1",
        "--no-follow",
        "--table",
        "public.items",
        "--op",
        "u,d",
    ])
    .await?;
    let got = lines(&filtered.stdout);
    ensure!(got.len() == 2, "{}", filtered.stdout);
    ensure!(
        got[0].contains("  u  public.items  id=2 v=\"deux\""),
        "{}",
        filtered.stdout
    );
    ensure!(
        got[1].contains("  d  public.items  id=3"),
        "{}",
        filtered.stdout
    );
    let other = cdc(&[
        "tail",
        "--config",
        &config,
        "--last",
        "5",
        "--no-follow",
        "--table",
        "public.other",
    ])
    .await?;
    let got = lines(&other.stdout);
    ensure!(
        got.len() == 2 && got.iter().all(|l| l.contains("public.other")),
        "{}",
        other.stdout
    );

    // --last N: exactly the last N events.
    let last = cdc(&["tail", "--config", &config, "--last", "2", "--no-follow"]).await?;
    let got = lines(&last.stdout);
    ensure!(got.len() == 2, "{}", last.stdout);
    ensure!(
        got[0].starts_with(&format!("#{} ", events[5].seq)),
        "{}",
        last.stdout
    );
    ensure!(
        got[1].starts_with(&format!("#{large_seq} ")),
        "{:.300}",
        last.stdout
    );

    // --json: the raw envelopes, the large one resolved.
    let raw = cdc(&[
        "tail",
        "--config",
        &config,
        "--from-seq",
        &large_seq.to_string(),
        "--no-follow",
        "--json",
    ])
    .await?;
    let got = lines(&raw.stdout);
    ensure!(got.len() == 1, "{:.300}", raw.stdout);
    let ev: cdc::ChangeEvent = serde_json::from_str(got[0])?;
    ensure!(ev.after.as_ref().and_then(|a| a["v"].as_str()) == Some(big.as_str()));
    ensure!(
        ev == events[6].event,
        "the envelope differs from the stream's"
    );

    // --from-time: an hour ago is everything, an hour ahead nothing.
    let hour = cdc(&[
        "tail",
        "--config",
        &config,
        "--from-time",
        "1h",
        "--no-follow",
    ])
    .await?;
    ensure!(lines(&hour.stdout).len() == 9, "{}", hour.all());
    let ahead = (time::OffsetDateTime::now_utc() + Duration::from_secs(3600))
        .format(&time::format_description::well_known::Rfc3339)?;
    let none = cdc(&[
        "tail",
        "--config",
        &config,
        "--from-time",
        &ahead,
        "--no-follow",
    ])
    .await?;
    ensure!(
        none.code == Some(0) && lines(&none.stdout).is_empty(),
        "{}",
        none.all()
    );
    let bad = cdc(&["tail", "--config", &config, "--from-time", "yesterday"]).await?;
    ensure!(bad.code == Some(1), "{}", bad.all());
    ensure!(
        common::last_line(&bad.stderr).contains("neither RFC 3339"),
        "{}",
        bad.stderr
    );

    // Following: the last events, then a new one as it commits; SIGINT ends it with 0.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdc"));
    cmd.args([
        "tail",
        "--config",
        &config,
        "--table",
        "public.items",
        "--last",
        "1",
    ]);
    let mut follow = testkit::spawn_logged(cmd, "cdc tail")?;
    follow
        .wait_for_output(&format!("#{large_seq} "), WAIT)
        .await?;
    sql.batch_execute("INSERT INTO items VALUES (5, 'live')")
        .await?;
    follow.wait_for_output("id=5 v=\"live\"", WAIT).await?;
    // Quiet while the stream's newest message is another table's: the stall check (a tick a
    // second, a stall after 2 quiet ones while the stream holds more for this tail) must not
    // take that for a stalled consumer: a re-read would say so on stderr within 3 s, so the
    // test waits 4 s for that line (returning early if it comes) and expects none.
    sql.batch_execute("INSERT INTO other VALUES (11)").await?;
    env.wait_for_events(9, WAIT).await?;
    ensure!(
        follow
            .wait_for_output("reading again", Duration::from_secs(4))
            .await
            .is_err(),
        "a quiet tail was taken for a stalled one:\n{}",
        follow.describe()
    );
    sql.batch_execute("INSERT INTO items VALUES (6, 'after a quiet while')")
        .await?;
    follow
        .wait_for_output("id=6 v=\"after a quiet while\"", WAIT)
        .await?;
    follow.signal(Signal::Int)?;
    let status = follow.wait_with_timeout(Duration::from_secs(5)).await?;
    ensure!(status.success(), "{status}\n{}", follow.describe());
    let out = follow.describe();
    ensure!(
        out.matches("id=5 v=\"live\"").count() == 1
            && !out.contains("public.other")
            && !out.contains("reading again"),
        "{out}"
    );
    Ok(())
}

/// The reader, `cdc status` and `cdc tail` at debug level, through failures (NATS down at
/// start, a Postgres restart, NATS and Postgres down for the CLI) and successes, with a
/// password in the Postgres URL (SCRAM) and a user:password in the NATS URL: neither secret
/// appears in any output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_printed_at_debug_level() -> Result<()> {
    const NATS_PASSWORD: &str = "NatsS3cretPw0rd9k2";
    let pg = Postgres::start_with(PgOptions {
        auth: testkit::PgAuth::Scram,
        ..PgOptions::default()
    })
    .await?;
    let nats = testkit::Nats::start_with(testkit::NatsOptions {
        auth: Some(testkit::NatsAuth::UserPassword {
            user: "cdc_user".into(),
            password: NATS_PASSWORD.into(),
        }),
        ..Default::default()
    })
    .await?;
    let mut env = Env::with_servers(pg, nats, TABLE, &["public.items"]).await?;
    let pg_password = env.pg.superuser_password().to_string();
    let config_text = std::fs::read_to_string(&env.config)?;
    ensure!(
        config_text.contains(&pg_password) && config_text.contains(NATS_PASSWORD),
        "the config does not carry both secrets:\n{config_text}"
    );
    let config = env.config.to_string_lossy().into_owned();
    let mut outputs: Vec<(String, String)> = Vec::new();

    // The reader: NATS down at start (retried), then up; a Postgres restart; writes.
    env.nats.stop().await?;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdc"));
    cmd.args(["run", "--config", &config])
        .env("RUST_LOG", "debug");
    let mut reader = testkit::spawn_logged(cmd, "cdc")?;
    reader
        .wait_for_output("reader attempt failed; retrying", WAIT)
        .await?;
    env.nats.start_again().await?;
    reader.wait_for_output("streaming", WAIT).await?;
    env.expect_streaming("INSERT INTO items VALUES (1, 'before the restart')")
        .await?;
    env.pg.restart_fast().await?;
    env.sql()
        .await?
        .batch_execute("INSERT INTO items VALUES (2, 'after the restart')")
        .await?;
    env.wait_for_events(2, WAIT).await?;

    // The CLI, working.
    for args in [
        vec!["status", "--config", &config],
        vec!["status", "--config", &config, "--json"],
        vec![
            "tail",
            "--config",
            &config,
            "--no-follow",
            "--from-seq",
            "1",
        ],
        vec!["tail", "--config", &config, "--no-follow", "--json"],
    ] {
        let out = cdc(&args).await?;
        ensure!(out.code == Some(0), "cdc {args:?}: {}", out.all());
        outputs.push((format!("cdc {args:?}"), out.all()));
    }
    reader.signal(Signal::Term)?;
    ensure!(
        reader
            .wait_with_timeout(Duration::from_secs(5))
            .await?
            .success(),
        "{}",
        reader.describe()
    );
    outputs.push((
        "cdc run".into(),
        format!("{}\n{}", reader.stdout(), reader.stderr()),
    ));

    // The CLI, failing: NATS down, then Postgres down too.
    env.nats.stop().await?;
    for args in [
        vec!["status", "--config", &config],
        vec!["tail", "--config", &config, "--no-follow"],
    ] {
        let out = cdc(&args).await?;
        ensure!(out.code == Some(1), "cdc {args:?}: {}", out.all());
        outputs.push((format!("cdc {args:?} without NATS"), out.all()));
    }
    env.pg.stop().await?;
    let out = cdc(&["status", "--config", &config, "--json"]).await?;
    ensure!(out.code == Some(1), "{}", out.all());
    ensure!(
        out.stdout.contains("cannot connect to Postgres"),
        "{}",
        out.all()
    );
    outputs.push(("cdc status without servers".into(), out.all()));

    for (what, text) in &outputs {
        ensure!(
            !text.contains(&pg_password),
            "{what} printed the Postgres password:\n{text}"
        );
        ensure!(
            !text.contains(NATS_PASSWORD),
            "{what} printed the NATS password:\n{text}"
        );
    }
    // The run really logged at debug level, including the failures.
    let run = &outputs
        .iter()
        .find(|(w, _)| w == "cdc run")
        .context("run")?
        .1;
    ensure!(run.contains("DEBUG"), "no debug output:\n{run}");
    ensure!(run.contains("NATS at nats://127.0.0.1:"), "{run}");
    Ok(())
}

/// `cdc snapshot` on a terminal (a pseudo-terminal from `script`, util-linux) draws a progress
/// bar with rows done of the estimate and the rate; elsewhere it prints plain lines (tested in
/// snapshot.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_progress_is_a_bar_on_a_terminal() -> Result<()> {
    let env = Env::start(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'row' FROM generate_series(1, 20000) g;
         ANALYZE items;",
        &["public.items"],
    )
    .await?;
    env.write_config(
        &["public.items"],
        "\n[snapshot]\ninitial = false\nchunk_rows = 500\n",
    )?;
    let _reader = env.start_reader().await?;
    let script = testkit::find_binary("script")
        .context("`script` gives the command a terminal: install the Debian package bsdutils")?;
    let command = format!(
        "{} snapshot --config {} --table public.items",
        env!("CARGO_BIN_EXE_cdc"),
        env.config.display()
    );
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(script)
            .args(["-qec", &command, "/dev/null"])
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .context("cdc snapshot did not finish")??;
    let screen = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "{screen}");
    // The final frame: the table, a full bar, rows of the estimate, the rate, the state.
    let last = screen
        .rsplit(['\r', '\n'])
        .find(|l| l.contains("public.items ["))
        .with_context(|| format!("no progress bar drawn:\n{screen}"))?;
    ensure!(
        last.contains("20,000/~20,000 rows")
            && last.contains("/s")
            && last.contains("[done]")
            && last.contains("=="),
        "{last:?}"
    );
    Ok(())
}

/// A metrics port that is taken stops the reader at start with one line naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_is_refused() -> Result<()> {
    let env = Env::start(TABLE, &["public.items"]).await?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = taken.local_addr()?.to_string();
    env.write_config(
        &["public.items"],
        &format!("\n[metrics]\nlisten = {addr:?}\n"),
    )?;
    let mut reader = env.spawn_reader()?;
    let line = common::expect_refusal(&mut reader).await?;
    ensure!(
        line.contains(&format!("cannot listen for metrics on {addr}"))
            && line.contains("metrics.listen"),
        "{line}"
    );
    Ok(())
}

/// `--log-format json` makes every log line a JSON object; `RUST_LOG` decides what is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_on_request_and_filtered_by_rust_log() -> Result<()> {
    let env = Env::start(TABLE, &["public.items"]).await?;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cdc"));
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(&env.config)
        .env("RUST_LOG", "warn,cdc::reader=info");
    let mut reader = testkit::spawn_logged(cmd, "cdc")?;
    reader.wait_for_output("\"streaming\"", WAIT).await?;
    env.expect_streaming("INSERT INTO items VALUES (1, 'x')")
        .await?;
    reader.signal(Signal::Term)?;
    ensure!(reader
        .wait_with_timeout(Duration::from_secs(5))
        .await?
        .success());
    let stderr = reader.stderr();
    let mut targets = std::collections::BTreeSet::new();
    for line in lines(&stderr) {
        let entry: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not a JSON log line: {line:?}"))?;
        let level = entry["level"].as_str().unwrap_or_default();
        let target = entry["target"].as_str().unwrap_or_default().to_string();
        ensure!(
            level != "DEBUG" && level != "TRACE",
            "filtered out by RUST_LOG: {line}"
        );
        ensure!(
            target == "cdc::reader" || level == "WARN" || level == "ERROR",
            "{target} at {level} should be filtered out: {line}"
        );
        targets.insert(target);
    }
    ensure!(targets.contains("cdc::reader"), "{stderr}");
    Ok(())
}
