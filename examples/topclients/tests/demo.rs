//! The demo's story as a test, short: a private Postgres set up from `sql/` (the reader connects
//! as the least-privilege role), NATS, the real reader and the two agents in-process (with
//! their pgwire servers), and the page services over pgwire. `scenario::run` checks each phase
//! itself (views equal the source, every commit becomes visible, pages render with Postgres
//! down, read-your-writes never misses); this test checks the report on top.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use topclients::scenario::{self, Endpoints, Options};
use topclients::stack;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_story_holds() -> Result<()> {
    let mut pg = testkit::Postgres::start().await?;
    let nats = testkit::Nats::start().await?;
    let db = stack::create_source(&pg).await?;

    // The reader's role is what sql/roles.sql promises: REPLICATION, not superuser, no owner.
    let sql = pg.connect(&db).await?;
    let role = sql
        .query_one(
            "SELECT rolsuper, rolreplication, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = $1",
            &[&stack::READER_ROLE],
        )
        .await?;
    ensure!(
        (
            role.get::<_, bool>(0),
            role.get::<_, bool>(1),
            role.get::<_, bool>(2),
            role.get::<_, bool>(3)
        ) == (false, true, false, false),
        "cdc_reader must be REPLICATION only"
    );
    let owns: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tableowner = $1",
            &[&stack::READER_ROLE],
        )
        .await?
        .get(0);
    ensure!(owns == 0, "cdc_reader must not own tables");
    let toasted: i64 = sql
        .query_one(
            "SELECT count(*) FROM top_clients WHERE pg_column_size(description) > 2000",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        toasted > 1000,
        "the sample descriptions must be long ({toasted})"
    );

    let reader_cfg = cdc::config::CdcConfig::parse(&stack::reader_toml(
        &pg.url_as(stack::READER_ROLE, None, &db),
        &nats.url(),
    ))?;
    reader_cfg.validate()?;
    let (stop_reader, stop_rx) = tokio::sync::watch::channel(false);
    // The reader's future is not Send: it runs on a thread with a runtime of its own.
    let reader = std::thread::Builder::new()
        .name("cdc-reader".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(cdc::reader::run(reader_cfg, stop_rx))
                .map_err(anyhow::Error::from)
        })?;

    let dir = tempfile::tempdir()?;
    let mut agents = Vec::new();
    for (name, views) in [
        ("gig-page", stack::GIG_VIEWS),
        ("user-page", stack::USER_VIEWS),
    ] {
        let config = consumers::AgentConfig::parse(&stack::agent_toml(
            name,
            &dir.path().join(name),
            &nats.url(),
            "127.0.0.1:0",
            views,
        ))?;
        config.validate()?;
        agents.push(consumers::Agent::start(config).await?);
    }
    let addr = |i: usize| -> Result<String> {
        Ok(agents[i]
            .pgwire_addr()
            .context("the agent serves pgwire")?
            .to_string())
    };
    let endpoints = Endpoints {
        service_url: pg.url(&db),
        gig_addr: addr(0)?,
        user_addr: addr(1)?,
    };
    let opts = Options {
        writer_time: Duration::from_secs(3),
        rate: 40,
        self_view_edits: 40,
        seed: 7,
    };
    let report = scenario::run(&mut pg, &endpoints, &opts).await?;

    ensure!(report.user_latency.len() >= 30, "{report:?}");
    ensure!(!report.gig_latency.is_empty(), "{report:?}");
    // The hybrid page called the service only for sellers with ids: about 40% of the sample
    // sellers have none.
    let t = report.gig_traffic;
    ensure!(
        t.renders > 0 && t.calls < t.renders && t.calls > 0 && t.failed_calls == 0,
        "{t:?}"
    );
    ensure!(report.outage_renders == (1000, 1000), "{report:?}");
    ensure!(report.self_view.len() == opts.self_view_edits, "{report:?}");

    for agent in agents {
        agent.shutdown().await?;
    }
    let _ = stop_reader.send(true);
    tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    Ok(())
}
