//! `topclients-demo`: the Top Clients demo. Starts a private Postgres (set up from `sql/`) and a
//! private NATS JetStream server, runs `cdc run` and two `view-agent run`s, and plays the seed's
//! story against them: pages rendered from local views, commit → visible latency under a
//! writer, a Postgres outage the pages survive, catch-up, and the seller's self view.
//! Everything it started is stopped and removed when it ends, also on Ctrl-C or SIGTERM.
//!
//! Usually started by `scripts/demo.sh`, which installs the servers and builds the binaries.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use topclients::scenario::{self, Endpoints, Options};
use topclients::stack::ProcessStack;

#[derive(Parser, Debug)]
#[command(
    name = "topclients-demo",
    version,
    about = "The Top Clients demo in one command"
)]
struct Cli {
    /// Directory holding the `cdc` and `view-agent` binaries (default: this binary's own).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Directory for the config files and sled directories (default: a temp dir, removed at
    /// the end).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// File to which the ids of started server processes are appended (for the demo script's
    /// cleanup of last resort).
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Seconds the writer runs in the latency phase.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Seller actions per second.
    #[arg(long, default_value_t = 40)]
    rate: u32,
    /// Edits in the self-view phase.
    #[arg(long, default_value_t = 200)]
    self_view_edits: usize,
    /// A short run (5 s of writes, 50 self-view edits).
    #[arg(long)]
    quick: bool,
    /// After the story, keep the stack running (and print how to query it) until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("topclients-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = demo(cli) => r.map(|()| ExitCode::SUCCESS),
            signal = interrupted() => {
                eprintln!("\ntopclients-demo: {signal}: stopping everything it started");
                Ok(ExitCode::from(130))
            }
        }
    });
    // Leaving `block_on` dropped the stack: processes killed, temp dirs removed.
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("topclients-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "interrupted",
        _ = term.recv() => "terminated",
        _ = hup.recv() => "hung up",
    }
}

async fn demo(cli: Cli) -> anyhow::Result<()> {
    let bin_dir = match cli.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no directory")?
            .to_path_buf(),
    };
    let temp;
    let work_dir = match cli.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            dir
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("topclients-demo-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let opts = if cli.quick {
        Options {
            writer_time: Duration::from_secs(5),
            self_view_edits: 50,
            rate: cli.rate,
            ..Options::default()
        }
    } else {
        Options {
            writer_time: Duration::from_secs(cli.seconds.max(1)),
            rate: cli.rate,
            self_view_edits: cli.self_view_edits.max(1),
            ..Options::default()
        }
    };

    println!("== 0. Starting the stack (work dir {})", work_dir.display());
    let mut stack = ProcessStack::start(&bin_dir, &work_dir, cli.pid_file.as_deref()).await?;
    let endpoints = Endpoints {
        service_url: stack.service_url(),
        gig_addr: stack.gig_addr.clone(),
        user_addr: stack.user_addr.clone(),
    };
    let report = match scenario::run(&mut stack.pg, &endpoints, &opts).await {
        Ok(report) => report,
        Err(e) => {
            eprintln!("{}", stack.describe());
            return Err(e);
        }
    };

    println!("\n== Summary");
    println!(
        "  commit → visible: user page {}; gig page {}",
        report.user_latency.summary(),
        report.gig_latency.summary()
    );
    println!(
        "  gig page: {} of {} renders called the Top Clients service; the rest had no ids and needed no call",
        report.gig_traffic.calls, report.gig_traffic.renders
    );
    println!(
        "  Postgres down: {} user pages and {} gig pages rendered; caught up {:.2} s after it was back",
        report.outage_renders.0,
        report.outage_renders.1,
        report.catch_up.as_secs_f64()
    );
    println!(
        "  self view: {}/{} edits visible on the very next read with SET cdc.min_lsn (a plain read missed {})",
        report.self_view.len(),
        opts.self_view_edits,
        report.plain_stale
    );

    if cli.keep {
        println!("\n== The stack keeps running until Ctrl-C");
        println!("  psql 'host={} port={} user=me dbname=views' -c 'SELECT * FROM top_clients WHERE seller_id = 2'",
            host(&stack.user_addr), port(&stack.user_addr));
        println!(
            "  psql 'host={} port={} user=me dbname=views' -c 'SELECT * FROM cdc_status'",
            host(&stack.gig_addr),
            port(&stack.gig_addr)
        );
        println!(
            "  psql '{}'   (the Top Clients database)",
            stack.service_url()
        );
        std::future::pending::<()>().await;
    }
    stack.shutdown().await?;
    println!("\ndemo finished: everything it started is stopped");
    Ok(())
}

fn host(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

fn port(addr: &str) -> &str {
    addr.rsplit_once(':').map_or("", |(_, p)| p)
}
