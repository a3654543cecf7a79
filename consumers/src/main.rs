//! `view-agent`: keeps sled views of source tables from the CDC stream and serves them over
//! the Postgres wire protocol.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use cdc::observe::{init_logging, LogFormat};
use clap::{Parser, Subcommand};
use consumers::agent::Agent;
use consumers::control::{AgentLink, ControlError, RemoteAgent};
use consumers::replay::{ReplayFrom, ReplayState};
use consumers::verify::{VerifyOptions, EXIT_DIFFERENCES};
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
    /// Log format (logs go to stderr; `RUST_LOG` filters them, default `info`).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
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
    /// Rebuild one view from the stream. A running agent (found over NATS) keeps serving the
    /// old view and swaps to the rebuilt one atomically once it has caught up; with no agent
    /// running, the store is opened here.
    Replay {
        /// The agent's TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// The view to rebuild.
        #[arg(long)]
        view: String,
        /// Rebuild from the first message of the stream.
        #[arg(long, conflicts_with_all = ["from_seq", "from_time"], required_unless_present_any = ["from_seq", "from_time"])]
        from_start: bool,
        /// Rebuild from this stream sequence.
        #[arg(long, conflicts_with = "from_time")]
        from_seq: Option<u64>,
        /// Rebuild from the first message stored at or after this time (RFC 3339).
        #[arg(long)]
        from_time: Option<String>,
        /// Start the rebuild and return without following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Compare views with the source at one consistent point; exit 0 when they are equal (or
    /// repaired), 3 when they differ, 1 on errors.
    Verify {
        /// The agent's TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// The source database (libpq-style URL, read with a REPEATABLE READ transaction);
        /// env `CDC_POSTGRES_URL`.
        #[arg(long, env = "CDC_POSTGRES_URL", hide_env_values = true)]
        source_url: String,
        /// Only this view (repeatable; default: every view).
        #[arg(long)]
        view: Vec<String>,
        /// Write the source's rows over the differing ones.
        #[arg(long)]
        repair: bool,
        /// Example rows printed per kind of difference.
        #[arg(long, default_value_t = 10)]
        examples: usize,
        /// How long the agent may take to reach the source's position, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Forget every row and the applied position (the agent must be stopped), so the next
    /// `run` rebuilds all views from the stream.
    Reset {
        /// The agent's TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Start again from this stream sequence (default 1).
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
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
    init_logging(cli.log_format);
    if let Err(e) = cdc::memory::disable_transparent_huge_pages() {
        tracing::debug!(error = %e, "transparent huge pages stay enabled for this process");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("view-agent: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("view-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { config } => {
            AgentConfig::load(&config)?;
            println!("config ok");
        }
        Command::Reset { config, from_seq } => {
            let config = AgentConfig::load(&config)?;
            let store = ViewStore::open(&config).map_err(in_use)?;
            store.reset(from_seq.max(1))?;
            println!(
                "views reset; the next run rebuilds them from stream sequence {}",
                from_seq.max(1)
            );
        }
        Command::Run { config } => serve(AgentConfig::load(&config)?).await?,
        Command::Replay {
            config,
            view,
            from_start,
            from_seq,
            from_time,
            no_wait,
        } => {
            let from = match (from_start, from_seq, from_time) {
                (_, Some(0), _) => anyhow::bail!("--from-seq must be at least 1"),
                (_, Some(n), _) => ReplayFrom::Seq(n),
                (_, None, Some(t)) => ReplayFrom::Time(t),
                _ => ReplayFrom::Start,
            };
            let config = AgentConfig::load(&config)?;
            let link = Link::open(config).await?;
            let r = replay(link.get(), &view, from, no_wait).await;
            link.close().await?;
            r?;
        }
        Command::Verify {
            config,
            source_url,
            view,
            repair,
            examples,
            timeout,
        } => {
            let config = AgentConfig::load(&config)?;
            let opts = VerifyOptions {
                views: view,
                repair,
                timeout: Duration::from_secs(timeout),
            };
            let link = Link::open(config.clone()).await?;
            let r = consumers::verify::verify(link.get(), &config, &source_url, &opts).await;
            link.close().await?;
            let report = r?;
            print!("{}", report.render(examples));
            if report.differences() == 0 {
                println!("views equal the source as of {}", report.lsn);
            } else if report.repaired {
                print!("{}", consumers::verify::render_repair(&report, 1_000));
            } else {
                println!(
                    "{} difference(s); run again with --repair to fix them",
                    report.differences()
                );
                return Ok(ExitCode::from(EXIT_DIFFERENCES));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A sled open failure, explained when another process holds the store.
fn in_use(e: consumers::StoreError) -> anyhow::Error {
    let text = e.to_string();
    if text.contains("lock") {
        anyhow::anyhow!("{text}: is a view-agent running with this data_dir? Stop it first")
    } else {
        e.into()
    }
}

/// How a command reaches the agent: over NATS when one runs, else in-process.
enum Link {
    Remote(RemoteAgent),
    Local(Agent),
}

impl Link {
    async fn open(config: AgentConfig) -> anyhow::Result<Link> {
        match RemoteAgent::connect(&config.nats.url, &config.nats.subject_prefix, &config.name)
            .await
        {
            Ok(remote) => {
                let st = remote.status().await?;
                eprintln!(
                    "using the running agent {:?} (pid {}, applied seq {})",
                    st.name, st.pid, st.applied_seq
                );
                Ok(Link::Remote(remote))
            }
            Err(ControlError::NoAgent(subject)) => {
                eprintln!("no agent answers on {subject}; opening the store here");
                let mut local = config;
                local.pgwire.listen = String::new();
                local.metrics.listen = String::new();
                let agent = Agent::start(local).await.map_err(|e| match e {
                    consumers::AgentError::Store(s) => in_use(s),
                    other => other.into(),
                })?;
                Ok(Link::Local(agent))
            }
            Err(e) => Err(anyhow::Error::new(e).context(
                "cannot reach the agent: the command needs the NATS the agent follows (nats.url)",
            )),
        }
    }

    fn get(&self) -> &dyn AgentLink {
        match self {
            Link::Remote(r) => r,
            Link::Local(a) => a.operations().as_ref(),
        }
    }

    async fn close(self) -> anyhow::Result<()> {
        if let Link::Local(agent) = self {
            agent.shutdown().await?;
        }
        Ok(())
    }
}

async fn replay(
    link: &dyn AgentLink,
    view: &str,
    from: ReplayFrom,
    no_wait: bool,
) -> anyhow::Result<()> {
    let started = link.replay_start(view, from).await?;
    let view = started.view.clone();
    if no_wait {
        println!(
            "replay of view {view} started in the agent; its log says when the rebuilt view is swapped in"
        );
        return Ok(());
    }
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = tty.then(|| {
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:40}] seq {pos}/{len} {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("replay {view}"));
        bar
    });
    let mut last_line = std::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let st = link
            .replay_status(&view)
            .await?
            .context("the agent lost track of the replay (restarted?)")?;
        match &bar {
            Some(bar) => {
                bar.set_length(st.target_seq.max(st.read_seq).max(1));
                bar.set_position(st.read_seq);
                bar.set_message(format!("{} events", st.events));
            }
            None if last_line.elapsed() >= Duration::from_secs(1)
                || st.state != ReplayState::Running =>
            {
                println!(
                    "replay {view}: read seq {} of {} ({} events)",
                    st.read_seq, st.target_seq, st.events
                );
                last_line = std::time::Instant::now();
            }
            None => {}
        }
        match st.state {
            ReplayState::Running => continue,
            ReplayState::Done => {
                if let Some(bar) = &bar {
                    bar.finish();
                }
                if let Some(w) = &st.warning {
                    eprintln!("warning: {w}");
                }
                println!(
                    "view {view} rebuilt from stream sequence {} to {} ({} events) and swapped in; {} old rows removed",
                    st.from_seq, st.read_seq, st.events, st.replaced_rows
                );
                return Ok(());
            }
            ReplayState::Failed => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                anyhow::bail!(
                    "replay of view {view} failed: {}; the old view still serves",
                    st.error.unwrap_or_default()
                );
            }
        }
    }
}

async fn serve(config: AgentConfig) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut agent = Agent::start(config).await.map_err(|e| match e {
        consumers::AgentError::Store(s) => in_use(s),
        other => other.into(),
    })?;
    match agent.pgwire_addr() {
        Some(addr) => println!("view-agent ready: pgwire on {addr}"),
        None => println!("view-agent ready: pgwire disabled"),
    }
    if let Some(addr) = agent.metrics_addr() {
        println!("view-agent metrics on http://{addr}/metrics");
    }
    tokio::select! {
        biased;
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        r = agent.stopped() => return r.map_err(Into::into),
    }
    let started = std::time::Instant::now();
    agent.shutdown().await?;
    tracing::info!(took = ?started.elapsed(), "stopped: last batch applied, store flushed");
    Ok(())
}
