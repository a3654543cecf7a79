//! Row 6, memory: peak resident memory (`VmHWM`) of the `cdc` reader and of a `view-agent`
//! while one transaction of many rows flows through both, beside their resident memory before
//! it.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use serde::Serialize;

use cdc::envelope::{ChangeEvent, Op, Source, TransactionInfo};
use cdc::Lsn;
use consumers::config::ViewConfig;
use consumers::{SourceTransaction, ViewStore};

use crate::pipeline::{self, AgentView, Binaries};
use crate::report::{self, Line, RowReport, Target};

/// Target: peak RSS of each process, MB (10^6 bytes).
const TARGET_MB: f64 = 100.0;

/// The numbers of one run.
#[derive(Debug, Serialize)]
struct Outcome {
    rows: u64,
    insert_secs: f64,
    /// Commit → the last event in the stream.
    reader_secs: f64,
    /// Commit → the transaction visible in the view.
    agent_secs: f64,
    reader_rss_before_kib: u64,
    reader_peak_kib: u64,
    agent_rss_before_kib: u64,
    agent_peak_kib: u64,
    /// How long the agent's queries waited while the transaction was made visible.
    queries_waited_secs: f64,
    /// How long the copy from staging into the views took (queries answered meanwhile).
    copy_secs: f64,
    /// The ceiling beside the agent: peak RSS of a process holding only the agent's store,
    /// with the same rows written in transactions of 1,000 rows.
    store_alone_peak_kib: u64,
}

/// Rows per transaction when the store alone is filled.
const FLOOR_TX_ROWS: u64 = 1_000;

/// The memory row's view as the agent's store sees it (the agent's config says the same).
fn floor_view() -> ViewConfig {
    ViewConfig {
        name: "big_by_id".into(),
        source: "public.big".into(),
        key: vec!["id".into()],
        primary_key: vec!["id".into()],
        columns: Some(vec!["seller_id".into(), "name".into(), "position".into()]),
        column_types: Default::default(),
    }
}

/// Row `g` of the memory row's table, as the reader publishes it (the insert's shape).
fn floor_event(g: u64) -> ChangeEvent {
    let tx = g / FLOOR_TX_ROWS;
    let ord = g % FLOOR_TX_ROWS + 1;
    let commit = Lsn(0x1_0000 + tx * 0x1_0000);
    let after = serde_json::json!({"id": g, "seller_id": g % 1000, "name": format!("client {g}"),
        "logo_url": format!("https://cdn.example/{g}.png"), "position": g % 10,
        "updated_at": "2026-12-01T12:00:00.000000Z"});
    ChangeEvent {
        op: Op::Create,
        before: None,
        after: after.as_object().cloned(),
        unchanged_toast: vec![],
        source: Source {
            db: "memory".into(),
            schema: "public".into(),
            table: "big".into(),
            lsn: Lsn(commit.0 - 0x8000 + ord),
            commit_lsn: commit,
            tx_id: Some(tx as u32),
            ts_ms: 1_764_590_400_000,
            snapshot: false,
        },
        transaction: Some(TransactionInfo {
            id: format!("{tx}:{commit}"),
            total_order: ord,
            data_collection_order: ord,
            last: ord == FLOOR_TX_ROWS,
        }),
        ts_ms: 1_764_590_400_003,
    }
}

/// `cdc-bench --store-floor ROWS` (a process of its own): writes `rows` rows into a fresh
/// agent store with the default `[store]` options, in transactions of 1,000, and prints its
/// peak RSS in KiB.
pub fn store_floor(rows: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = ViewStore::open_at(dir.path(), &[floor_view()])?;
    let mut g = 1;
    while g <= rows {
        let end = (g + FLOOR_TX_ROWS).min(rows + 1);
        let events: Vec<ChangeEvent> = (g..end).map(floor_event).collect();
        let last_seq = end - 1;
        store.apply(&[SourceTransaction { last_seq, events }])?;
        g = end;
    }
    store.flush()?;
    let peak = testkit::peak_rss_kib(std::process::id()).context("reading VmHWM")?;
    println!("{peak}");
    Ok(())
}

/// The duration logged as `field=…` on the first log line that contains `needle`, in seconds
/// (`None` until it is logged).
fn logged_secs(log: &str, needle: &str, field: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let value = line
        .split(&format!("{field}="))
        .nth(1)?
        .split_whitespace()
        .next()?;
    let (number, scale) = if let Some(n) = value.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = value.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = value.strip_suffix("ns") {
        (n, 1e-9)
    } else {
        (value.strip_suffix('s')?, 1.0)
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

/// Runs [`store_floor`] in a child process; its peak RSS in KiB.
async fn measure_store_floor(rows: u64) -> Result<u64> {
    let exe = std::env::current_exe().context("locating cdc-bench")?;
    let out = tokio::process::Command::new(exe)
        .arg("--store-floor")
        .arg(rows.to_string())
        .output()
        .await
        .context("running cdc-bench --store-floor")?;
    anyhow::ensure!(
        out.status.success(),
        "cdc-bench --store-floor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("the output of cdc-bench --store-floor")
}

/// Runs row 6 with one transaction of `rows` rows.
pub async fn run(bins: &Binaries, rows: u64) -> Result<RowReport> {
    // Every field bound: the servers stop when their handles drop.
    let pipeline::Streaming {
        pg: _pg,
        nats,
        db: _db,
        sql,
        dir,
        mut reader,
        js,
    } = pipeline::start_streaming(
        bins,
        "memory",
        "CREATE TABLE big (id bigint PRIMARY KEY, seller_id int NOT NULL, name text NOT NULL,
                           logo_url text, position int NOT NULL, updated_at timestamptz NOT NULL)",
        "big",
    )
    .await?;
    let port = testkit::free_port();
    let agent_config = pipeline::write_agent_config(
        dir.path(),
        "memory",
        &nats.url(),
        port,
        &AgentView {
            name: "big_by_id",
            table: "big",
            key: &["id"],
            primary_key: &["id"],
            columns: &["seller_id", "name", "position"],
            column_types: &[("id", "int8"), ("seller_id", "int4"), ("position", "int4")],
        },
        "",
    )?;
    // The store logs how long queries waited while a large transaction was made visible, and
    // how long its copy from staging took.
    let mut agent = bins
        .spawn_agent_logging(
            &agent_config,
            "view-agent",
            "warn,consumers::store::staging=info",
        )
        .await?;
    let reader_rss_before_kib = reader.rss_kib().unwrap_or_default();
    let agent_rss_before_kib = agent.rss_kib().unwrap_or_default();

    eprintln!("  one transaction of {rows} rows …");
    let t = Instant::now();
    sql.batch_execute(&format!(
        "INSERT INTO big SELECT g, (g % 1000)::int, 'client ' || g, 'https://cdn.example/' || g || '.png',
                                (g % 10)::int, now() FROM generate_series(1, {rows}) g"
    ))
    .await?;
    let insert_secs = t.elapsed().as_secs_f64();
    let committed = Instant::now();
    let reader_secs = pipeline::seconds_until_count(
        &js,
        "cdc.public.big",
        rows - 1,
        committed,
        Duration::from_secs(1800),
        &mut reader,
    )
    .await?;
    let view = pipeline::connect(&pipeline::agent_conn(port)).await?;
    let probe = view
        .prepare("SELECT seller_id FROM big_by_id WHERE id = $1")
        .await?;
    let last = rows as i64;
    // The transaction applies atomically: its last row visible means all of it is.
    let agent_secs = loop {
        if view.query_opt(&probe, &[&last]).await?.is_some() {
            break committed.elapsed().as_secs_f64();
        }
        anyhow::ensure!(
            agent.is_running(),
            "the view-agent exited while applying\n{}",
            agent.describe()
        );
        anyhow::ensure!(
            committed.elapsed() < Duration::from_secs(1800),
            "the view-agent did not apply the transaction within 30 min\n{}",
            agent.describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reader_peak_kib = reader
        .peak_rss_kib()
        .context("reading the reader's VmHWM")?;
    let (queries_waited_secs, copy_secs) = testkit::until(
        Duration::from_secs(60),
        "the agent's log lines of the large transaction",
        || async {
            let log = format!("{}{}", agent.stdout(), agent.stderr());
            Some((
                logged_secs(&log, "large transaction visible", "queries_waited")?,
                logged_secs(&log, "large transaction copied", "copy")?,
            ))
        },
    )
    .await?;
    // Read after the copy from staging: the transaction is visible before it, and the copy
    // is part of its flow (both trees hold parts of it meanwhile).
    let agent_peak_kib = agent.peak_rss_kib().context("reading the agent's VmHWM")?;
    pipeline::stop(&mut agent).await?;
    pipeline::stop(&mut reader).await?;
    eprintln!("  the agent's store alone holding the same rows …");
    let store_alone_peak_kib = measure_store_floor(rows).await?;

    let outcome = Outcome {
        rows,
        insert_secs,
        reader_secs,
        agent_secs,
        reader_rss_before_kib,
        reader_peak_kib,
        agent_rss_before_kib,
        agent_peak_kib,
        queries_waited_secs,
        copy_secs,
        store_alone_peak_kib,
    };
    let mb = |kib: u64| kib as f64 * 1024.0 / 1e6;
    let line = |who: &str, peak: u64, before: u64, secs: f64, what: &str, extra: String| Line {
        row: 6,
        measurement: format!(
            "Memory: peak RSS (VmHWM) of the {who} while one transaction of {} rows flows through",
            report::thousands(rows)
        ),
        result: format!("**{:.0} MB**", mb(peak)),
        beside: format!(
            "{:.0} MB before the transaction; {what} {secs:.1} s after its commit{extra}",
            mb(before)
        ),
        targets: vec![Target::new(
            format!("≤ {TARGET_MB:.0} MB"),
            mb(peak) <= TARGET_MB,
        )],
    };
    Ok(RowReport {
        name: "memory",
        lines: vec![
            line(
                "`cdc` reader",
                reader_peak_kib,
                reader_rss_before_kib,
                reader_secs,
                "all of it in the stream",
                String::new(),
            ),
            line(
                "`view-agent`",
                agent_peak_kib,
                agent_rss_before_kib,
                agent_secs,
                "all of it visible in the view",
                format!(
                    " (queries waited {:.2} ms while it was made visible, then were answered from \
                     views + staging during the {copy_secs:.1} s copy); the agent's store alone holding the same rows (written in transactions of \
                     1,000, in a process of its own): {:.0} MB",
                    queries_waited_secs * 1e3,
                    mb(store_alone_peak_kib)
                ),
            ),
        ],
        data: serde_json::to_value(&outcome)?,
        machine_busy_percent: 0.0,
    })
}
