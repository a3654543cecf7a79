//! `cdc`: the reader's command line.

use std::path::PathBuf;
use std::process::ExitCode;

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

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
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
    }
}

async fn snapshot(config: &std::path::Path, table: &str, no_wait: bool) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cfg = cdc::config::CdcConfig::load(config)?;
    let (schema, name) = cdc::subject::split_table_name(table)
        .with_context(|| format!("--table {table:?} must be schema.table"))?;
    let shown = cdc::publish::redact_url(&cfg.nats.url);
    let client = async_nats::connect(cfg.nats.url.as_str())
        .await
        .with_context(|| format!("NATS at {shown} is unreachable"))?;
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
    let started = std::time::Instant::now();
    let mut last_rows = u64::MAX;
    loop {
        if let Some(p) = store.get(&schema, &name).await? {
            if p.rows != last_rows || p.state == "done" {
                let rate = p.rows as f64 / started.elapsed().as_secs_f64().max(0.001);
                println!(
                    "{table}: {} rows of ~{} ({:.0} rows/s) [{}]",
                    p.rows, p.estimate, rate, p.state
                );
                last_rows = p.rows;
            }
            if p.state == "done" {
                return Ok(());
            }
            if let Some(reason) = p.state.strip_prefix("failed: ") {
                anyhow::bail!("{reason}");
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
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
