//! `topclients-service`: the legacy Top Clients service as a standalone writer. Sellers add,
//! edit, remove and reorder their top clients, one plain SQL transaction per action, at a given
//! rate; one line per action on stdout. It knows nothing about CDC.
//!
//! ```sh
//! topclients-service --url postgres://topclients@127.0.0.1:5432/topclients --rate 5
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use topclients::service::{SellerActions, ServiceError, TopClientsService};

#[derive(Parser, Debug)]
#[command(
    name = "topclients-service",
    version,
    about = "The legacy Top Clients service: random seller edits with plain SQL"
)]
struct Cli {
    /// The Top Clients database (libpq-style URL); env `TOPCLIENTS_URL`.
    #[arg(long, env = "TOPCLIENTS_URL", hide_env_values = true)]
    url: String,
    /// Seller actions per second.
    #[arg(long, default_value_t = 5)]
    rate: u32,
    /// Stop after this many actions (0 = run until SIGINT/SIGTERM).
    #[arg(long, default_value_t = 0)]
    actions: u64,
    /// Seed of the sellers' choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("topclients-service: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("topclients-service: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), ServiceError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut service = TopClientsService::new(&cli.url)?;
    // The database may still be starting (compose starts everything at once): wait for it.
    let sellers = loop {
        match service.seller_ids().await {
            Ok(s) if !s.is_empty() => break s,
            Ok(_) => eprintln!("topclients-service: no sellers yet; waiting"),
            Err(e) => eprintln!("topclients-service: {e}; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let mut actions = SellerActions::new(sellers, cli.seed);
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / cli.rate.max(1));
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return Ok(());
    };
    let mut done = 0u64;
    loop {
        // Priorities: a stop signal first, then the next action when its tick comes.
        tokio::select! {
            biased;
            _ = int.recv() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let Some(seller) = actions.pick_seller(|_| true) else {
            return Ok(());
        };
        match actions.act(&mut service, seller).await {
            Ok(c) => {
                let names: Vec<&str> = c.clients.iter().map(|c| c.name.as_str()).collect();
                println!(
                    "seller {} {} client {} → [{}]",
                    c.seller_id,
                    c.kind,
                    c.client_id,
                    names.join(", ")
                );
            }
            // The database going away is the service's own outage: report, keep trying.
            Err(e) => eprintln!(
                "topclients-service: seller {seller}: {}",
                topclients::service::describe(&e)
            ),
        }
        done += 1;
        if cli.actions > 0 && done >= cli.actions {
            return Ok(());
        }
    }
}
