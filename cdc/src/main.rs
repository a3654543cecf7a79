//! `cdc`: the reader's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use cdc::observe::{init_logging, LogFormat};
use clap::{Parser, Subcommand};

// Events are small and many: glibc malloc showed up as a quarter of the reader's CPU profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cdc",
    version,
    about = "Stream Postgres changes into NATS JetStream"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the reader: stream every committed change of the published tables to JetStream.
    Run {
        /// The config file (see the README's configuration reference).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Ask the running reader to (re-)snapshot one table while streaming, and follow its
    /// progress until it is done.
    Snapshot {
        /// The reader's config file (for the NATS URL, stream and subject prefix).
        #[arg(long, short)]
        config: PathBuf,
        /// The table, as `schema.table`.
        #[arg(long)]
        table: String,
        /// Return once the reader accepted the request, without following progress.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show the reader's position: the slot (confirmed and restart LSN, WAL retained), the
    /// stream (last sequence, size, last heartbeat), durable consumers' lag and snapshots.
    /// Exits 1 when Postgres or NATS can't be read (after showing the rest).
    Status {
        /// The reader's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the stream's events, one line each (or the raw envelope with --json), starting
    /// with the last 10 unless told otherwise, and follow new ones until Ctrl-C.
    Tail {
        /// The reader's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Only this table (`schema.table`); repeat for several.
        #[arg(long = "table", value_name = "SCHEMA.TABLE")]
        tables: Vec<String>,
        /// Only these operations, comma-separated (c insert, u update, d delete, t truncate,
        /// r snapshot read, e snapshot end).
        #[arg(long, value_name = "c,u,d,t,r")]
        op: Option<String>,
        /// Start at this stream sequence.
        #[arg(long, value_name = "N", group = "start")]
        from_seq: Option<u64>,
        /// Start at the first event stored at or after this time: RFC 3339
        /// (2024-01-02T03:04:05Z) or a duration ago (90s, 15m, 2h, 1d).
        #[arg(long, value_name = "T", group = "start")]
        from_time: Option<String>,
        /// Start with the last N matching events (default 10).
        #[arg(long, value_name = "N", group = "start")]
        last: Option<u64>,
        /// Print each event's raw envelope (JSON, one per line).
        #[arg(long)]
        json: bool,
        /// Stop at the end of the stream instead of following new events.
        #[arg(long)]
        no_follow: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(e) = cdc::memory::disable_transparent_huge_pages() {
        tracing::debug!(error = %e, "transparent huge pages stay enabled for this process");
    }
    // One thread: the reader is one pipeline task plus the NATS and Postgres connection tasks
    // it hands messages to. On a multi-threaded runtime every hand-over wakes another thread
    // (futex, context switch, cache lines moving between cores): the reader bench measured
    // 10-12 µs of CPU per event that way against 4 µs on one thread, and nats-server spent less
    // too (7-8 µs instead of 10-12 µs per event) because the writes arrive in larger batches.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cdc: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(async_main(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cdc: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let cfg = cdc::config::CdcConfig::load(&config)?;
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("signal received: shutting down");
                let _ = tx.send(true);
            });
            cdc::reader::run(cfg, rx).await?;
            Ok(())
        }
        Command::Snapshot {
            config,
            table,
            no_wait,
        } => snapshot(&config, &table, no_wait).await,
        Command::Status { config, json } => status(&config, json).await,
        Command::Tail {
            config,
            tables,
            op,
            from_seq,
            from_time,
            last,
            json,
            no_follow,
        } => {
            let cfg = cdc::config::CdcConfig::load(&config)?;
            let tables = tables
                .iter()
                .map(|t| {
                    cdc::subject::split_table_name(t)
                        .ok_or_else(|| anyhow::anyhow!("--table {t:?} must be schema.table"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let ops = match op {
                Some(text) => cdc::tail::parse_ops(&text)?,
                None => Vec::new(),
            };
            let start = match (from_seq, from_time, last) {
                (Some(seq), _, _) => cdc::tail::Start::Seq(seq),
                (_, Some(t), _) => cdc::tail::Start::Time(cdc::tail::parse_time(&t)?),
                (_, _, Some(n)) => cdc::tail::Start::Last(n),
                _ => cdc::tail::Start::Last(cdc::tail::DEFAULT_LAST),
            };
            let opts = cdc::tail::TailOptions {
                tables,
                ops,
                start,
                json,
                follow: !no_follow,
            };
            cdc::tail::run(&cfg, &opts, wait_for_signal()).await?;
            Ok(())
        }
    }
}

async fn status(config: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let cfg = cdc::config::CdcConfig::load(config)?;
    let status = cdc::status::Status::gather(&cfg).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", status.render());
    }
    let unavailable: Vec<&str> = [&status.postgres.error, &status.nats.error]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if !unavailable.is_empty() {
        anyhow::bail!("status incomplete: {}", unavailable.join("; "));
    }
    Ok(())
}

async fn snapshot(config: &std::path::Path, table: &str, no_wait: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cfg = cdc::config::CdcConfig::load(config)?;
    let (schema, name) = cdc::subject::split_table_name(table)
        .with_context(|| format!("--table {table:?} must be schema.table"))?;
    let client = cdc::status::connect_nats(&cfg.nats.url)
        .await
        .map_err(anyhow::Error::msg)?;
    let request = serde_json::to_vec(&cdc::reader::SnapshotRequest {
        table: table.to_string(),
    })?;
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.request(
            cdc::reader::control_subject(&cfg.nats.subject_prefix),
            request.into(),
        ),
    )
    .await
    .context("the reader did not answer within 10 s")?
    .map_err(|e| {
        anyhow::anyhow!("no reader answers on NATS ({e}): is `cdc run` running with this config?")
    })?;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload)?;
    if let Some(err) = answer.get("error") {
        anyhow::bail!("the reader refused: {}", err.as_str().unwrap_or_default());
    }
    println!("snapshot of {table} requested");
    if no_wait {
        return Ok(());
    }
    let js = async_nats::jetstream::new(client);
    let store =
        cdc::snapshot::ProgressStore::open(&js, &cfg.nats.stream, cfg.nats.replicas).await?;
    let mut view = ProgressView::new(table);
    loop {
        if let Some(p) = store.get(&schema, &name).await? {
            view.show(&p);
            if p.state == "done" {
                view.finish(&p);
                return Ok(());
            }
            if let Some(reason) = p.state.strip_prefix("failed: ") {
                view.abandon();
                anyhow::bail!("{reason}");
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// How `cdc snapshot` shows progress: a bar on a terminal, a line per change otherwise.
enum ProgressView {
    Bar {
        bar: indicatif::ProgressBar,
    },
    Lines {
        table: String,
        last_rows: Option<u64>,
        started: std::time::Instant,
        rows_at_start: Option<u64>,
    },
}

impl ProgressView {
    fn new(table: &str) -> ProgressView {
        if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            return ProgressView::Lines {
                table: table.to_string(),
                last_rows: None,
                started: std::time::Instant::now(),
                rows_at_start: None,
            };
        }
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] [{wide_bar}] {human_pos}/~{human_len} rows, {per_sec} ({eta} left) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(table.to_string());
        ProgressView::Bar { bar }
    }

    fn show(&mut self, p: &cdc::snapshot::Progress) {
        match self {
            ProgressView::Bar { bar } => {
                // The estimate (pg_class.reltuples) may be below the rows really there.
                bar.set_length(p.estimate.max(p.rows));
                bar.set_position(p.rows);
                bar.set_message(format!("[{}]", p.state));
            }
            ProgressView::Lines {
                table,
                last_rows,
                started,
                rows_at_start,
            } => {
                if *last_rows == Some(p.rows) && p.state != "done" {
                    return;
                }
                let base = *rows_at_start.get_or_insert(p.rows);
                let rate =
                    p.rows.saturating_sub(base) as f64 / started.elapsed().as_secs_f64().max(0.001);
                println!(
                    "{table}: {} rows of ~{} ({rate:.0} rows/s) [{}]",
                    p.rows, p.estimate, p.state
                );
                *last_rows = Some(p.rows);
            }
        }
    }

    fn finish(&mut self, p: &cdc::snapshot::Progress) {
        if let ProgressView::Bar { bar } = self {
            bar.set_length(p.rows);
            bar.finish_with_message("[done]");
        }
    }

    fn abandon(&mut self) {
        if let ProgressView::Bar { bar } = self {
            bar.abandon_with_message("[failed]");
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can still be stopped; just never shut down cleanly.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
