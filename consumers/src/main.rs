//! `view-agent`: keeps sled views of source tables from the CDC stream and serves them over
//! the Postgres wire protocol.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use consumers::agent::Agent;
use consumers::{AgentConfig, ViewStore};

/// mimalloc: the apply and query paths allocate many small, short-lived buffers, where glibc's
/// malloc showed up as about a third of the CPU profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "view-agent",
    version,
    about = "CDC view agent: sled views served over pgwire"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Follow the stream, apply it to the views and serve them over pgwire.
    Run {
        /// The agent's TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Forget the applied position and the rows, so the next `run` replays the stream.
    Replay {
        /// The agent's TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Replay from the first message of the stream.
        #[arg(long, conflicts_with = "from_seq")]
        from_start: bool,
        /// Replay from this stream sequence.
        #[arg(long)]
        from_seq: Option<u64>,
    },
    /// Check the config and exit.
    CheckConfig {
        /// The agent's TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("view-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { config } => {
            AgentConfig::load(&config)?;
            println!("config ok");
            Ok(())
        }
        Command::Replay {
            config,
            from_start,
            from_seq,
        } => {
            let config = AgentConfig::load(&config)?;
            let from = match (from_start, from_seq) {
                (_, Some(n)) if n >= 1 => n,
                (true, None) => 1,
                _ => anyhow::bail!("give --from-start or --from-seq N (N >= 1)"),
            };
            let store = ViewStore::open(&config)?;
            store.reset(from)?;
            println!("views reset; the next run replays from stream sequence {from}");
            Ok(())
        }
        Command::Run { config } => {
            let config = AgentConfig::load(&config)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(serve(config))
        }
    }
}

async fn serve(config: AgentConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut agent = Agent::start(config).await?;
    match agent.pgwire_addr() {
        Some(addr) => println!("view-agent ready: pgwire on {addr}"),
        None => println!("view-agent ready: pgwire disabled"),
    }
    tokio::select! {
        biased;
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        r = agent.stopped() => return r.map_err(Into::into),
    }
    agent.shutdown().await?;
    Ok(())
}
