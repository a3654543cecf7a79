//! `cdc-bench`: one command that measures the pipeline against this machine's ceilings. It
//! starts private Postgres and NATS servers (testkit) for each row, runs the release `cdc` and
//! `view-agent` binaries found next to itself, and prints one markdown table in which every
//! result stands beside the ceilings measured in the same run, with its target and whether it
//! is met. The numbers also land as JSON in the results folder, with a PNG chart of the latency
//! percentiles next to it.
//!
//! Rows (see the README's "Benchmarks"): 1 throughput, 2 latency, 3 snapshot, 4 apply,
//! 5 read path, 6 memory.

mod apply;
mod chart;
mod latency;
mod memory;
mod pipeline;
mod read;
mod report;
mod snapshot;
mod throughput;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, Result};
use clap::Parser;

use crate::report::{Line, Machine, RowReport};

/// The allocator of the `view-agent` binary, for the rows that run the agent's library here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measures throughput, latency, snapshot, apply, read path and memory of the pipeline beside
/// this machine's ceilings, in one run, and prints one markdown table.
#[derive(Debug, Parser)]
#[command(name = "cdc-bench", version)]
struct Cli {
    /// Smaller backlogs and shorter phases (a minute or two instead of several): for checking
    /// that the benchmark works, not for numbers to quote.
    #[arg(long)]
    quick: bool,
    /// Run only these rows: numbers 1–6 or names (throughput, latency, snapshot, apply, read,
    /// memory), comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_row)]
    only: Vec<Row>,
    /// Where the JSON results and the latency chart go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    results: PathBuf,
    /// Measure nothing: draw the latency chart of this results file again, next to it
    /// (`X.json` → `X-latency.png`).
    #[arg(long, value_name = "JSON", conflicts_with_all = ["quick", "only"])]
    chart_from: Option<PathBuf>,
    /// Internal (row 6's ceiling): fill a fresh agent store with this many rows and print the
    /// process's peak RSS in KiB.
    #[arg(long, hide = true, value_name = "ROWS")]
    store_floor: Option<u64>,
}

/// The rows of the table, in the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Row {
    Throughput = 1,
    Latency = 2,
    Snapshot = 3,
    Apply = 4,
    Read = 5,
    Memory = 6,
}

const ROWS: [Row; 6] = [
    Row::Throughput,
    Row::Latency,
    Row::Snapshot,
    Row::Apply,
    Row::Read,
    Row::Memory,
];

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Throughput => "throughput",
            Row::Latency => "latency",
            Row::Snapshot => "snapshot",
            Row::Apply => "apply",
            Row::Read => "read",
            Row::Memory => "memory",
        }
    }
}

fn parse_row(s: &str) -> Result<Row, String> {
    let s = s.trim().to_ascii_lowercase();
    ROWS.into_iter()
        .find(|r| s == r.name() || s == (*r as u8).to_string())
        .ok_or_else(|| {
            format!(
                "unknown row {s:?}: use 1–6 or throughput, latency, snapshot, apply, read, memory"
            )
        })
}

/// Everything a run produced, as written to the JSON file.
#[derive(Debug, serde::Serialize)]
struct Results<'a> {
    started_at: String,
    finished_at: String,
    seconds: f64,
    quick: bool,
    git: String,
    machine: &'a Machine,
    rows: &'a [RowReport],
    failures: &'a [String],
    table: &'a str,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The in-process agent's and clients' log lines, when asked for (`RUST_LOG=warn`, …).
    if std::env::var_os("RUST_LOG").is_some() {
        cdc::observe::init_logging(cdc::observe::LogFormat::Text);
    }
    if let Some(rows) = cli.store_floor {
        // As the agent does. Only here: the flag is inherited by child processes, and the
        // servers and ceilings the other rows start must run as the machine has them.
        let _ = cdc::memory::disable_transparent_huge_pages();
        return match memory::store_floor(rows) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cdc-bench --store-floor: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => Err(anyhow::anyhow!("starting the tokio runtime: {e}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cdc-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one row.
async fn run_row(
    row: Row,
    bins: &pipeline::Binaries,
    quick: bool,
    latency_series: &mut Option<Vec<latency::Series>>,
) -> Result<RowReport> {
    match row {
        Row::Throughput => throughput::run(bins, throughput::Settings::new(quick)).await,
        Row::Latency => {
            let (report, series) = latency::run(bins, latency::Settings::new(quick)).await?;
            *latency_series = Some(series);
            Ok(report)
        }
        Row::Snapshot => snapshot::run(bins, if quick { 200_000 } else { 1_000_000 }).await,
        Row::Apply => apply::run(if quick { 100_000 } else { 500_000 }).await,
        Row::Read => read::run(bins, if quick { 1.0 } else { 4.0 }).await,
        Row::Memory => memory::run(bins, if quick { 200_000 } else { 1_000_000 }).await,
    }
}

/// Resolves on SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "interrupted",
            _ = term.recv() => "terminated",
        },
        // Without signal handlers the run can only end by itself.
        _ => std::future::pending().await,
    }
}

/// Runs the selected rows; exit status 1 when a row failed (the others are still reported).
async fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(json) = &cli.chart_from {
        return redraw_chart(json);
    }
    let rows: Vec<Row> = if cli.only.is_empty() {
        ROWS.to_vec()
    } else {
        let mut r = cli.only.clone();
        r.sort();
        r.dedup();
        r
    };
    // Everything that can be checked before minutes of measuring is checked first.
    let bins = pipeline::Binaries::next_to_me()?;
    testkit::find_binary("postgres")?;
    testkit::find_binary("nats-server")?;
    testkit::find_binary("pg_recvlogical")?;
    testkit::find_binary("psql")?;
    let font = if rows.contains(&Row::Latency) {
        Some(chart::load_font()?)
    } else {
        None
    };
    std::fs::create_dir_all(&cli.results)
        .with_context(|| format!("creating the results folder {}", cli.results.display()))?;

    let started_at = now_rfc3339();
    let started = Instant::now();
    let mut machine = Machine::describe();
    let mut reports = Vec::new();
    let mut failures = Vec::new();
    let mut latency_series = None;
    for row in rows {
        eprintln!("== {} {} ==", row as u8, row.name());
        let t = Instant::now();
        let busy = pipeline::MachineMeter::start();
        // An interrupted row is dropped, which stops the servers and processes it started.
        let result = tokio::select! {
            r = run_row(row, &bins, cli.quick, &mut latency_series) => r,
            signal = interrupted() => {
                eprintln!("cdc-bench: {signal}: stopped the servers of row {} and exits", row as u8);
                return Ok(ExitCode::from(130));
            }
        };
        match result {
            Ok(mut report) => {
                report.machine_busy_percent = busy.busy_percent();
                eprintln!(
                    "   done in {:.0} s (the machine's CPUs {:.0}% busy)",
                    t.elapsed().as_secs_f64(),
                    report.machine_busy_percent
                );
                reports.push(report);
            }
            Err(e) => {
                let why = format!("{e:#}");
                eprintln!("   {} failed: {why}", row.name());
                let first = why.lines().next().unwrap_or_default().replace('|', "/");
                reports.push(RowReport {
                    name: row.name(),
                    lines: vec![Line {
                        row: row as u8,
                        measurement: row.name().to_owned(),
                        result: format!("failed: {first}"),
                        beside: String::new(),
                        targets: Vec::new(),
                    }],
                    data: serde_json::Value::Null,
                    machine_busy_percent: busy.busy_percent(),
                });
                failures.push(format!("{}: {why}", row.name()));
            }
        }
    }
    machine.load_end = report::load_average();

    let lines: Vec<Line> = reports.iter().flat_map(|r| r.lines.clone()).collect();
    let table = report::table(&lines);
    let header = format!(
        "cdc-bench{}, {started_at}, {:.0} s — {}",
        if cli.quick { " --quick" } else { "" },
        started.elapsed().as_secs_f64(),
        machine.summary()
    );
    println!("\n{header}\n\n{table}");

    let stamp = started_at.replace(':', "-");
    let json_path = cli.results.join(format!("cdc-bench-{stamp}.json"));
    let results = Results {
        started_at: started_at.clone(),
        finished_at: now_rfc3339(),
        seconds: started.elapsed().as_secs_f64(),
        quick: cli.quick,
        git: git_describe(),
        machine: &machine,
        rows: &reports,
        failures: &failures,
        table: &table,
    };
    let json = serde_json::to_string_pretty(&results)?;
    write_both(
        &json_path,
        &cli.results.join("latest.json"),
        json.as_bytes(),
    )?;
    println!("results: {}", json_path.display());
    if let (Some(font), Some(series)) = (font, latency_series) {
        let settings = latency::Settings::new(cli.quick);
        let subtitle = chart::subtitle(settings.rate, settings.secs, &started_at, &machine);
        let png = chart::latency_png(font, &series, &subtitle)?;
        let png_path = chart_path(&json_path);
        write_both(&png_path, &cli.results.join("latest-latency.png"), &png)?;
        println!("latency chart: {}", png_path.display());
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The chart next to a results file: `X.json` → `X-latency.png`.
fn chart_path(json: &Path) -> PathBuf {
    let stem = json
        .file_stem()
        .map_or("cdc-bench".into(), |s| s.to_string_lossy().into_owned());
    json.with_file_name(format!("{stem}-latency.png"))
}

/// `--chart-from`: draws the latency chart of a results file again, next to it.
fn redraw_chart(json_path: &Path) -> Result<ExitCode> {
    let font = chart::load_font()?;
    let text = std::fs::read_to_string(json_path)
        .with_context(|| format!("reading {}", json_path.display()))?;
    let results: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a cdc-bench results file", json_path.display()))?;
    let data = results["rows"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["name"] == "latency"))
        .map(|r| &r["data"])
        .filter(|d| !d.is_null())
        .with_context(|| format!("{} has no results of row 2 (latency)", json_path.display()))?;
    let series: Vec<latency::Series> = serde_json::from_value(data["series"].clone())
        .context("reading the latency distributions")?;
    let settings: latency::Settings =
        serde_json::from_value(data["settings"].clone()).context("reading the latency settings")?;
    let machine: Machine =
        serde_json::from_value(results["machine"].clone()).context("reading the machine")?;
    let started_at = results["started_at"].as_str().unwrap_or("unknown time");
    let subtitle = chart::subtitle(settings.rate, settings.secs, started_at, &machine);
    let png = chart::latency_png(font, &series, &subtitle)?;
    let png_path = chart_path(json_path);
    std::fs::write(&png_path, png).with_context(|| format!("writing {}", png_path.display()))?;
    println!("latency chart: {}", png_path.display());
    Ok(ExitCode::SUCCESS)
}

/// Writes `bytes` to `path` and to `latest`.
fn write_both(path: &Path, latest: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    std::fs::write(latest, bytes).with_context(|| format!("writing {}", latest.display()))?;
    Ok(())
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc().replace_nanosecond(0);
    now.ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "unknown-time".to_owned())
}

/// `git describe --always --dirty` of the source tree, or `unknown`.
fn git_describe() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}
