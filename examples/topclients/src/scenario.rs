//! The demo's story, phase by phase, against a running stack (Postgres, the reader, the two
//! agents): initial load, pages, the writer under load with commit → visible latency, a Postgres
//! outage, catch-up after it, and the seller's self view (read-your-writes).
//!
//! Every phase checks what it shows; a violated expectation ends the run with an error.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use tokio_postgres::NoTls;

use crate::pages::{ms, GigClients, GigPage, GigStats, SelfView, UserPage};
use crate::service::{ActionKind, ClientEdit, Committed, Rng, SellerActions, TopClientsService};

/// How long a committed change may take to show on a page before the demo calls it lost.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long views may take to equal the source after the writer stopped.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between two polls of a probe (the latency's resolution).
const PROBE_POLL: Duration = Duration::from_millis(1);

/// Where the running stack is.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// The Top Clients service's database URL (the tables' owner).
    pub service_url: String,
    /// The gig page agent's pgwire address.
    pub gig_addr: String,
    /// The user page agent's pgwire address.
    pub user_addr: String,
}

/// How long and how hard the demo runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long the writer runs in the latency phase.
    pub writer_time: Duration,
    /// Seller actions per second the writer aims at.
    pub rate: u32,
    /// Edits in the self-view phase.
    pub self_view_edits: usize,
    /// Seed of the writer's choices.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            writer_time: Duration::from_secs(15),
            rate: 40,
            self_view_edits: 200,
            seed: 42,
        }
    }
}

/// Durations with percentiles.
#[derive(Clone, Debug, Default)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    /// Adds one sample.
    pub fn push(&mut self, d: Duration) {
        self.0.push(d);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True without samples.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `q` quantile (0..=1), nearest rank.
    pub fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.0.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = (q * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    /// `n = …, p50 …, p99 …, max …`.
    pub fn summary(&self) -> String {
        format!(
            "n = {}, p50 {}, p99 {}, max {}",
            self.len(),
            ms(self.quantile(0.5)),
            ms(self.quantile(0.99)),
            ms(self.quantile(1.0))
        )
    }
}

/// What the run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Commit → visible on the user page (every action).
    pub user_latency: Latencies,
    /// Commit → visible on the gig page (actions that change the ids: add, remove).
    pub gig_latency: Latencies,
    /// Actions committed in the latency phase, by kind.
    pub actions: BTreeMap<ActionKind, u64>,
    /// The gig page's renders and service calls during the latency phase.
    pub gig_traffic: GigStats,
    /// Pages rendered with Postgres stopped: (user pages, gig pages).
    pub outage_renders: (usize, usize),
    /// Restart → first post-restart edit visible on both pages.
    pub catch_up: Duration,
    /// Self-view edits whose plain read right after the commit still showed the old value.
    pub plain_stale: usize,
    /// Self-view edits read with `cdc.min_lsn`, and their read time (wait included).
    pub self_view: Latencies,
}

/// Runs the whole story. `pg` is the Top Clients database's server (stopped and started again
/// for the outage).
pub async fn run(pg: &mut testkit::Postgres, ep: &Endpoints, opts: &Options) -> Result<Report> {
    let mut report = Report::default();
    let mut service = TopClientsService::new(&ep.service_url)?;
    let sellers = service.seller_ids().await?;
    let user = UserPage::connect(&ep.user_addr).await?;
    let mut gig = GigPage::connect(&ep.gig_addr, TopClientsService::new(&ep.service_url)?).await?;

    section("1. Initial load: the reader snapshots the existing rows, the agents apply them");
    let start = Instant::now();
    let rows = converge(&ep.service_url, &user, &gig).await?;
    println!(
        "  both views equal the source ({} sellers, {rows} top clients) {:.1} s after the agents started",
        sellers.len(),
        start.elapsed().as_secs_f64()
    );

    section("2. What the pages render (from their local views)");
    let shown = shown_sellers(&mut service, &sellers).await?;
    show_pages(&user, &mut gig, &shown).await?;

    section(&format!(
        "3. The Top Clients service under load: sellers edit for {} s at ~{} actions/s",
        opts.writer_time.as_secs(),
        opts.rate
    ));
    let live = write_and_measure(ep, &sellers, opts.writer_time, opts.rate, opts.seed).await?;
    report.user_latency = live.user;
    report.gig_latency = live.gig;
    report.actions = live.actions;
    report.gig_traffic = live.traffic;
    let total: u64 = report.actions.values().sum();
    let kinds: Vec<String> = report
        .actions
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    println!(
        "  {total} seller actions committed ({}), plain SQL, the service unchanged",
        kinds.join(", ")
    );
    println!(
        "  commit → visible on the user page: {}",
        report.user_latency.summary()
    );
    println!(
        "  commit → visible on the gig page:  {} (adds and removes: the ids change)",
        report.gig_latency.summary()
    );
    let t = report.gig_traffic;
    println!(
        "  gig page traffic meanwhile: {} renders, {} called the Top Clients service, {} needed no call (seller without clients)",
        t.renders,
        t.calls,
        t.renders - t.calls
    );
    let rows = converge(&ep.service_url, &user, &gig).await?;
    println!("  writer stopped: both views equal the source again ({rows} top clients)");
    show_pages(&user, &mut gig, &shown).await?;

    section("4. Outage: Postgres (the Top Clients database) stops");
    let before = user.all_rows().await?;
    let before_ids = gig.all_ids().await?;
    pg.stop().await.context("stopping Postgres")?;
    println!("  postgres stopped (fast shutdown)");
    let probe_seller = shown.first().copied().unwrap_or(1);
    match service.top_clients(probe_seller).await {
        Ok(_) => bail!("the Top Clients service answered with its database stopped"),
        Err(e) => println!(
            "  Top Clients service: seller {probe_seller}'s request fails: {}",
            first_line(&e)
        ),
    }
    show_pages(&user, &mut gig, &shown).await?;
    report.outage_renders =
        render_all_during_outage(&user, &mut gig, &sellers, &before, &before_ids).await?;

    section("5. Postgres is back: the reader reconnects, new edits flow again");
    pg.start_again().await.context("starting Postgres again")?;
    let up = Instant::now();
    println!("  postgres accepts connections again");
    // An addition, so that both pages have something new to show.
    let mut actions = SellerActions::new(sellers.clone(), opts.seed ^ 0xC0FFEE);
    let seller = probe_seller;
    let committed = loop {
        let new = actions.new_client();
        match service.add_client(seller, &new).await {
            Ok(clients) => {
                break Committed {
                    seller_id: seller,
                    kind: ActionKind::Add,
                    client_id: new.client_id,
                    clients,
                    at: Instant::now(),
                }
            }
            // A full list: make room first (that change is measured along with the addition).
            Err(crate::service::ServiceError::Refused { .. }) => {
                let first = service.top_clients(seller).await?;
                if let Some(c) = first.first() {
                    service.remove_client(seller, c.client_id).await?;
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    let (user_seen, gig_seen) = wait_visible(&user, &gig, &committed).await?;
    report.catch_up = up.elapsed();
    println!(
        "  seller {seller} adds client {} right after the restart: visible on the user page {} after its commit, on the gig page {}; {:.2} s after Postgres was back",
        committed.client_id,
        ms(user_seen),
        ms(gig_seen),
        report.catch_up.as_secs_f64()
    );
    let burst = write_and_measure(
        ep,
        &sellers,
        Duration::from_secs(2),
        opts.rate,
        opts.seed ^ 7,
    )
    .await?;
    println!(
        "  2 s more of edits: commit → visible on the user page {}",
        burst.user.summary()
    );
    let rows = converge(&ep.service_url, &user, &gig).await?;
    println!("  both views equal the source ({rows} top clients)");
    show_pages(&user, &mut gig, &shown[..1.min(shown.len())]).await?;

    section("6. Self view: a seller sees their own edit on the very next read (SET cdc.min_lsn)");
    let (stale, self_view) = self_view(ep, &user, &mut service, &sellers, opts).await?;
    report.plain_stale = stale;
    report.self_view = self_view;
    println!(
        "  plain read right after the commit: old value in {stale} of {} edits (eventual consistency)",
        opts.self_view_edits
    );
    println!(
        "  self view with SET cdc.min_lsn: the edit in {} of {} very next reads; read incl. wait: {}",
        report.self_view.len(),
        opts.self_view_edits,
        report.self_view.summary()
    );
    Ok(report)
}

fn section(title: &str) {
    println!("\n== {title}");
}

/// An error's message with its causes, on one line.
fn first_line(e: &dyn std::error::Error) -> String {
    crate::service::describe(e)
}

/// Two sellers with clients and one without.
async fn shown_sellers(service: &mut TopClientsService, sellers: &[i64]) -> Result<Vec<i64>> {
    let mut with = Vec::new();
    let mut without = None;
    for &s in sellers.iter().take(50) {
        let clients = service.top_clients(s).await?;
        if clients.len() >= 2 && with.len() < 2 {
            with.push(s);
        } else if clients.is_empty() && without.is_none() {
            without = Some(s);
        }
    }
    with.extend(without);
    Ok(with)
}

async fn show_pages(user: &UserPage, gig: &mut GigPage, sellers: &[i64]) -> Result<()> {
    for &s in sellers {
        println!();
        print!("{}", indent(&user.render(s).await?.to_string()));
        print!("{}", indent(&gig.render(s).await?.to_string()));
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// Waits until both views equal the source, row for row; returns the number of top clients.
async fn converge(service_url: &str, user: &UserPage, gig: &GigPage) -> Result<usize> {
    let (source, connection) = service_url
        .parse::<tokio_postgres::Config>()?
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let start = Instant::now();
    loop {
        let rows = source
            .query(
                "SELECT seller_id, client_id, position, name, logo_url, industry, description
                 FROM top_clients ORDER BY seller_id, client_id",
                &[],
            )
            .await?;
        let want: Vec<(i64, crate::service::TopClient)> = rows
            .iter()
            .map(|r| {
                Ok((
                    r.try_get(0)?,
                    crate::service::TopClient {
                        client_id: r.try_get(1)?,
                        position: r.try_get(2)?,
                        name: r.try_get(3)?,
                        logo_url: r.try_get(4)?,
                        industry: r.try_get(5)?,
                        description: r.try_get(6)?,
                    },
                ))
            })
            .collect::<Result<_, tokio_postgres::Error>>()?;
        let profiles = source
            .query(
                "SELECT id, username, display_name, country FROM sellers ORDER BY id",
                &[],
            )
            .await?;
        let got_user = user.all_rows().await?;
        let got_ids = gig.all_ids().await?;
        let got_profiles = user.all_profiles().await?;
        let want_ids: Vec<(i64, i64)> = want.iter().map(|(s, c)| (*s, c.client_id)).collect();
        let profiles_equal = got_profiles.len() == profiles.len()
            && got_profiles.iter().zip(&profiles).all(|((id, p), r)| {
                r.try_get::<_, i64>(0).ok() == Some(*id)
                    && r.try_get::<_, String>(1).ok().as_deref() == Some(p.username.as_str())
                    && r.try_get::<_, String>(2).ok().as_deref() == Some(p.display_name.as_str())
                    && r.try_get::<_, Option<String>>(3).ok() == Some(p.country.clone())
            });
        if got_user == want && got_ids == want_ids && profiles_equal {
            return Ok(want.len());
        }
        let last = format!(
            "user view {} rows (source {}), gig view {} ids, profiles {} (source {})",
            got_user.len(),
            want.len(),
            got_ids.len(),
            got_profiles.len(),
            profiles.len()
        );
        if start.elapsed() > CONVERGE_TIMEOUT {
            bail!("the views did not reach the source within {CONVERGE_TIMEOUT:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Live {
    user: Latencies,
    gig: Latencies,
    actions: BTreeMap<ActionKind, u64>,
    traffic: GigStats,
}

/// Runs the writer for `time` at `rate` actions/s and, beside it, gig page traffic; measures
/// every action's commit → visible time on both pages.
async fn write_and_measure(
    ep: &Endpoints,
    sellers: &[i64],
    time: Duration,
    rate: u32,
    seed: u64,
) -> Result<Live> {
    let deadline = Instant::now() + time;
    let probe_user = Arc::new(UserPage::connect(&ep.user_addr).await?);
    let probe_gig =
        Arc::new(GigPage::connect(&ep.gig_addr, TopClientsService::new(&ep.service_url)?).await?);
    let in_flight: Arc<Mutex<HashSet<i64>>> = Arc::default();

    // Gig page traffic: random sellers, as fast as a modest page service would render them.
    let mut traffic_page =
        GigPage::connect(&ep.gig_addr, TopClientsService::new(&ep.service_url)?).await?;
    let traffic_sellers = sellers.to_vec();
    let traffic = tokio::spawn(async move {
        let mut rng = Rng::new(seed ^ 0x5EED);
        while Instant::now() < deadline {
            if let Some(&s) = rng.pick(&traffic_sellers) {
                traffic_page.render(s).await?;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok::<_, anyhow::Error>(traffic_page.stats())
    });

    let mut service = TopClientsService::new(&ep.service_url)?;
    let mut actions = SellerActions::new(sellers.to_vec(), seed);
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probes = Vec::new();
    let mut counts = BTreeMap::new();
    while Instant::now() < deadline {
        ticker.tick().await;
        let seller = {
            let busy = in_flight
                .lock()
                .map_err(|_| anyhow::anyhow!("probe panicked"))?;
            actions.pick_seller(|s| !busy.contains(&s))
        };
        let Some(seller) = seller else { continue };
        in_flight
            .lock()
            .map_err(|_| anyhow::anyhow!("probe panicked"))?
            .insert(seller);
        let committed = actions.act(&mut service, seller).await?;
        *counts.entry(committed.kind).or_insert(0) += 1;
        let (user, gig, in_flight) = (probe_user.clone(), probe_gig.clone(), in_flight.clone());
        probes.push(tokio::spawn(async move {
            let seen = wait_visible(&user, &gig, &committed).await;
            if let Ok(mut busy) = in_flight.lock() {
                busy.remove(&committed.seller_id);
            }
            seen.map(|(u, g)| (committed.kind, u, g))
        }));
    }
    let mut live = Live {
        user: Latencies::default(),
        gig: Latencies::default(),
        actions: counts,
        traffic: GigStats::default(),
    };
    for probe in probes {
        let (kind, u, g) = probe.await??;
        live.user.push(u);
        if matches!(kind, ActionKind::Add | ActionKind::Remove) {
            live.gig.push(g);
        }
    }
    live.traffic = traffic.await??;
    ensure!(!live.user.is_empty(), "the writer committed nothing");
    Ok(live)
}

/// Polls both pages until they show the committed state of the seller; returns the time from
/// the commit to each page showing it.
async fn wait_visible(
    user: &UserPage,
    gig: &GigPage,
    committed: &Committed,
) -> Result<(Duration, Duration)> {
    let mut want = committed.clients.clone();
    want.sort_by_key(|c| c.client_id);
    let want_ids: Vec<i64> = want.iter().map(|c| c.client_id).collect();
    let (mut user_seen, mut gig_seen) = (None, None);
    loop {
        if user_seen.is_none() && user.top_clients(committed.seller_id).await? == want {
            user_seen = Some(committed.at.elapsed());
        }
        if gig_seen.is_none() && gig.client_ids(committed.seller_id).await? == want_ids {
            gig_seen = Some(committed.at.elapsed());
        }
        if let (Some(u), Some(g)) = (user_seen, gig_seen) {
            return Ok((u, g));
        }
        if committed.at.elapsed() > VISIBLE_TIMEOUT {
            bail!(
                "seller {}'s {} of client {} is not visible after {VISIBLE_TIMEOUT:?} (user page: {}, gig page: {})",
                committed.seller_id,
                committed.kind,
                committed.client_id,
                if user_seen.is_some() { "seen" } else { "not seen" },
                if gig_seen.is_some() { "seen" } else { "not seen" },
            );
        }
        tokio::time::sleep(PROBE_POLL).await;
    }
}

/// With Postgres stopped, renders every seller's user and gig page; every user page must equal
/// what the view held before the outage, every gig page must render (details or not).
async fn render_all_during_outage(
    user: &UserPage,
    gig: &mut GigPage,
    sellers: &[i64],
    before: &[(i64, crate::service::TopClient)],
    before_ids: &[(i64, i64)],
) -> Result<(usize, usize)> {
    let mut by_seller: BTreeMap<i64, Vec<crate::service::TopClient>> = BTreeMap::new();
    for (s, c) in before {
        by_seller.entry(*s).or_default().push(c.clone());
    }
    let mut ids_by_seller: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (s, c) in before_ids {
        ids_by_seller.entry(*s).or_default().push(*c);
    }
    let start = Instant::now();
    let (mut user_ok, mut gig_ok, mut degraded, mut no_call) = (0, 0, 0, 0);
    for &s in sellers {
        let page = user.render(s).await?;
        let mut got = page.clients.clone();
        got.sort_by_key(|c| c.client_id);
        ensure!(
            got == by_seller.get(&s).cloned().unwrap_or_default(),
            "seller {s}'s user page changed during the outage"
        );
        ensure!(page.profile.is_some(), "seller {s}'s profile is missing");
        user_ok += 1;
        let page = gig.render(s).await?;
        match &page.clients {
            GigClients::NoClients => no_call += 1,
            GigClients::DetailsUnavailable { ids, .. } => {
                ensure!(
                    Some(ids) == ids_by_seller.get(&s),
                    "seller {s}'s gig page ids changed during the outage"
                );
                degraded += 1;
            }
            GigClients::Enriched { .. } => {
                bail!("the Top Clients service answered for seller {s} with its database stopped")
            }
        }
        gig_ok += 1;
    }
    println!(
        "  rendered every seller's pages with Postgres down in {:.2} s:",
        start.elapsed().as_secs_f64()
    );
    println!(
        "    user page: {user_ok}/{} complete, identical to before the outage (local view)",
        sellers.len()
    );
    println!(
        "    gig page:  {gig_ok}/{} rendered: {no_call} sellers without clients need no call and render as always, {degraded} show their client ids without details",
        sellers.len()
    );
    Ok((user_ok, gig_ok))
}

/// Seller edits followed at once by a plain read and by a self-view read with `cdc.min_lsn`.
async fn self_view(
    ep: &Endpoints,
    user: &UserPage,
    service: &mut TopClientsService,
    sellers: &[i64],
    opts: &Options,
) -> Result<(usize, Latencies)> {
    let me = SelfView::connect(&ep.user_addr, &ep.service_url).await?;
    let mut actions = SellerActions::new(sellers.to_vec(), opts.seed ^ 0x5E1F);
    let mut rng = Rng::new(opts.seed ^ 0xAB);
    let mut stale = 0;
    let mut reads = Latencies::default();
    let mut shown_example = false;
    let mut done = 0;
    while done < opts.self_view_edits {
        let Some(seller) = actions.pick_seller(|_| true) else {
            bail!("no sellers")
        };
        let clients = service.top_clients(seller).await?;
        let Some(target) = rng.pick(&clients).cloned() else {
            continue;
        };
        let new_name = actions.rename(&target);
        let edit = ClientEdit {
            name: Some(new_name.clone()),
            ..ClientEdit::default()
        };
        service.edit_client(seller, target.client_id, &edit).await?;
        let committed = Instant::now();
        let name_of = |rows: &[crate::service::TopClient]| {
            rows.iter()
                .find(|c| c.client_id == target.client_id)
                .map(|c| c.name.clone())
        };
        // What a page without read-your-writes shows on the next read.
        let plain = name_of(&user.top_clients(seller).await?);
        let plain_old = plain.as_deref() != Some(new_name.as_str());
        if plain_old {
            stale += 1;
        }
        // The self view: the source's LSN after the commit, then the read that waits for it.
        let lsn = me.source_lsn().await?;
        let own = name_of(&me.read_after(seller, &lsn).await?);
        let took = committed.elapsed();
        ensure!(
            own.as_deref() == Some(new_name.as_str()),
            "self view after SET cdc.min_lsn = '{lsn}' showed {own:?} instead of {new_name:?} for seller {seller}"
        );
        reads.push(took);
        if !shown_example && plain_old {
            shown_example = true;
            println!(
                "  seller {seller} renames {:?} to {new_name:?}, commit returns; the very next reads:",
                target.name
            );
            println!(
                "    plain read of the user page view:  {:?}  (not applied yet)",
                plain.unwrap_or_default()
            );
            println!(
                "    self view, SET cdc.min_lsn = '{lsn}':  {:?}  ({} after the commit)",
                own.unwrap_or_default(),
                ms(took)
            );
        }
        done += 1;
    }
    Ok((stale, reads))
}
