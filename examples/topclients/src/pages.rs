//! The page services. Each one reads its own view agent over the Postgres wire protocol
//! (tokio-postgres, as any Postgres client would):
//!
//! - the **user page** renders a seller's full top-clients list from its local view (the
//!   asynchronous approach: no call to the Top Clients service at all);
//! - the **gig page** keeps only the client ids (the seed's hybrid approach) and calls the Top
//!   Clients service for the details, and only for sellers that have ids;
//! - the **self view** (the seller looking at their own profile) reads the user page's view with
//!   `SET cdc.min_lsn`, so a seller's edit is on the very next read.

use std::fmt;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls, Statement};

use crate::service::{ServiceError, TopClient, TopClientsService};

/// The user page's view of top clients (all columns).
pub const USER_VIEW: &str = "top_clients";
/// The user page's view of seller profiles.
pub const SELLERS_VIEW: &str = "sellers";
/// The gig page's ids-only view.
pub const GIG_VIEW: &str = "top_client_ids";

/// How long connecting to an agent may take.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong rendering a page.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The page's own view agent did not answer (it runs beside the page service).
    #[error("view agent at {addr}: {source}")]
    Agent {
        /// The agent's pgwire address.
        addr: String,
        /// What the client said.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The source database (for the self view's LSN) did not answer.
    #[error("source database: {0}")]
    Source(#[source] tokio_postgres::Error),
    /// An LSN that does not look like `X/Y`.
    #[error("{0:?} is not an LSN (X/Y in hex)")]
    BadLsn(String),
}

/// Connects to a view agent's pgwire server at `addr` (`host:port`).
pub async fn connect_agent(addr: &str, application: &str) -> Result<Client, PageError> {
    let err = |source| PageError::Agent {
        addr: addr.to_owned(),
        source,
    };
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "6543"));
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port.parse().unwrap_or(6543))
        .user(application)
        .dbname("views")
        .application_name(application)
        .connect_timeout(AGENT_CONNECT_TIMEOUT);
    let (client, connection) = config.connect(NoTls).await.map_err(err)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A seller's profile header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SellerProfile {
    /// `@username`.
    pub username: String,
    /// Display name.
    pub display_name: String,
    /// Country code.
    pub country: Option<String>,
}

/// The user page service: everything from its local view.
#[derive(Debug)]
pub struct UserPage {
    addr: String,
    agent: Client,
    clients: Statement,
    profile: Statement,
    all: Statement,
}

/// What the user page renders for a seller.
#[derive(Clone, Debug)]
pub struct UserPageView {
    /// The seller.
    pub seller_id: i64,
    /// The header, if the seller exists in the view.
    pub profile: Option<SellerProfile>,
    /// Top clients in position order.
    pub clients: Vec<TopClient>,
    /// Time to render (both view reads).
    pub took: Duration,
}

impl UserPage {
    /// Connects to the user page's agent.
    pub async fn connect(addr: &str) -> Result<UserPage, PageError> {
        let agent = connect_agent(addr, "user-page").await?;
        let err = |source| PageError::Agent {
            addr: addr.to_owned(),
            source,
        };
        let clients = agent
            .prepare(&format!(
                "SELECT client_id, position, name, logo_url, industry, description \
                 FROM {USER_VIEW} WHERE seller_id = $1"
            ))
            .await
            .map_err(err)?;
        let profile = agent
            .prepare(&format!(
                "SELECT username, display_name, country FROM {SELLERS_VIEW} WHERE id = $1"
            ))
            .await
            .map_err(err)?;
        let all = agent
            .prepare(&format!(
                "SELECT seller_id, client_id, position, name, logo_url, industry, description \
                 FROM {USER_VIEW}"
            ))
            .await
            .map_err(err)?;
        Ok(UserPage {
            addr: addr.to_owned(),
            agent,
            clients,
            profile,
            all,
        })
    }

    fn err(&self, source: tokio_postgres::Error) -> PageError {
        PageError::Agent {
            addr: self.addr.clone(),
            source,
        }
    }

    /// A seller's top clients as the view holds them (ordered by client id).
    pub async fn top_clients(&self, seller_id: i64) -> Result<Vec<TopClient>, PageError> {
        let rows = self
            .agent
            .query(&self.clients, &[&seller_id])
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| TopClient::from_row(r).map_err(|e| self.err(e)))
            .collect()
    }

    /// Every row of the view: `(seller_id, client)`, in key order.
    pub async fn all_rows(&self) -> Result<Vec<(i64, TopClient)>, PageError> {
        let rows = self
            .agent
            .query(&self.all, &[])
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                let seller: i64 = r.try_get(0).map_err(|e| self.err(e))?;
                let client = TopClient {
                    client_id: r.try_get(1).map_err(|e| self.err(e))?,
                    position: r.try_get(2).map_err(|e| self.err(e))?,
                    name: r.try_get(3).map_err(|e| self.err(e))?,
                    logo_url: r.try_get(4).map_err(|e| self.err(e))?,
                    industry: r.try_get(5).map_err(|e| self.err(e))?,
                    description: r.try_get(6).map_err(|e| self.err(e))?,
                };
                Ok((seller, client))
            })
            .collect()
    }

    /// Every profile in the view: `(id, profile)`, in id order.
    pub async fn all_profiles(&self) -> Result<Vec<(i64, SellerProfile)>, PageError> {
        let rows = self
            .agent
            .query(
                &format!("SELECT id, username, display_name, country FROM {SELLERS_VIEW}"),
                &[],
            )
            .await
            .map_err(|e| self.err(e))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(|e| self.err(e))?,
                    SellerProfile {
                        username: r.try_get(1).map_err(|e| self.err(e))?,
                        display_name: r.try_get(2).map_err(|e| self.err(e))?,
                        country: r.try_get(3).map_err(|e| self.err(e))?,
                    },
                ))
            })
            .collect()
    }

    /// Renders a seller's user page: profile and top clients, both from the local view.
    pub async fn render(&self, seller_id: i64) -> Result<UserPageView, PageError> {
        let start = Instant::now();
        let profile = self
            .agent
            .query_opt(&self.profile, &[&seller_id])
            .await
            .map_err(|e| self.err(e))?
            .map(|r| {
                Ok::<_, tokio_postgres::Error>(SellerProfile {
                    username: r.try_get(0)?,
                    display_name: r.try_get(1)?,
                    country: r.try_get(2)?,
                })
            })
            .transpose()
            .map_err(|e| self.err(e))?;
        let mut clients = self.top_clients(seller_id).await?;
        clients.sort_by_key(|c| (c.position, c.client_id));
        Ok(UserPageView {
            seller_id,
            profile,
            clients,
            took: start.elapsed(),
        })
    }
}

impl fmt::Display for UserPageView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.profile {
            Some(p) => write!(
                f,
                "user page · @{} ({}, {})",
                p.username,
                p.display_name,
                p.country.as_deref().unwrap_or("-")
            )?,
            None => write!(f, "user page · seller {} (no profile yet)", self.seller_id)?,
        }
        writeln!(
            f,
            " · {} · from the local view in {}",
            plural(self.clients.len(), "top client"),
            ms(self.took)
        )?;
        if self.clients.is_empty() {
            writeln!(f, "      (no top clients section)")?;
        }
        for c in &self.clients {
            writeln!(
                f,
                "   {:>2}. {:<34} {:<11} {}",
                c.position,
                c.name,
                c.industry.as_deref().unwrap_or("-"),
                c.logo_url.as_deref().unwrap_or("-")
            )?;
            if let Some(d) = &c.description {
                let head: String = d.chars().take(44).collect();
                writeln!(f, "       \"{head}…\" ({} chars)", d.len())?;
            }
        }
        Ok(())
    }
}

/// How the gig page shows a seller's top clients.
#[derive(Clone, Debug)]
pub enum GigClients {
    /// The ids view has nothing for the seller: no section, and no call to the service.
    NoClients,
    /// Ids from the view, details from the Top Clients service (in position order).
    Enriched {
        /// The ids the view holds.
        ids: Vec<i64>,
        /// What the service returned for them.
        clients: Vec<TopClient>,
    },
    /// The service call failed: the page renders without the details.
    DetailsUnavailable {
        /// The ids the view holds.
        ids: Vec<i64>,
        /// The service's error.
        reason: String,
    },
}

/// What the gig page renders for a seller.
#[derive(Clone, Debug)]
pub struct GigPageView {
    /// The seller.
    pub seller_id: i64,
    /// The top clients section.
    pub clients: GigClients,
    /// Time to render (view read plus the service call, if any).
    pub took: Duration,
}

/// Counts of the gig page's renders and service calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GigStats {
    /// Pages rendered.
    pub renders: u64,
    /// Renders that called the Top Clients service (the seller had ids).
    pub calls: u64,
    /// Calls that failed (the page rendered without details).
    pub failed_calls: u64,
}

/// The gig page service: the hybrid approach (ids locally, details from the service).
#[derive(Debug)]
pub struct GigPage {
    addr: String,
    agent: Client,
    ids: Statement,
    service: TopClientsService,
    stats: GigStats,
}

impl GigPage {
    /// Connects to the gig page's agent; `service` is the Top Clients service it calls.
    pub async fn connect(addr: &str, service: TopClientsService) -> Result<GigPage, PageError> {
        let agent = connect_agent(addr, "gig-page").await?;
        let ids = agent
            .prepare(&format!(
                "SELECT client_id FROM {GIG_VIEW} WHERE seller_id = $1"
            ))
            .await
            .map_err(|source| PageError::Agent {
                addr: addr.to_owned(),
                source,
            })?;
        Ok(GigPage {
            addr: addr.to_owned(),
            agent,
            ids,
            service,
            stats: GigStats::default(),
        })
    }

    /// The client ids the view holds for a seller, ascending.
    pub async fn client_ids(&self, seller_id: i64) -> Result<Vec<i64>, PageError> {
        let err = |source| PageError::Agent {
            addr: self.addr.clone(),
            source,
        };
        let rows = self
            .agent
            .query(&self.ids, &[&seller_id])
            .await
            .map_err(err)?;
        rows.iter().map(|r| r.try_get(0).map_err(err)).collect()
    }

    /// Every row of the ids view: `(seller_id, client_id)`, in key order.
    pub async fn all_ids(&self) -> Result<Vec<(i64, i64)>, PageError> {
        let err = |source| PageError::Agent {
            addr: self.addr.clone(),
            source,
        };
        let rows = self
            .agent
            .query(&format!("SELECT seller_id, client_id FROM {GIG_VIEW}"), &[])
            .await
            .map_err(err)?;
        rows.iter()
            .map(|r| Ok((r.try_get(0).map_err(err)?, r.try_get(1).map_err(err)?)))
            .collect()
    }

    /// Renders a seller's gig page: ids from the local view; for a seller that has some, one
    /// call to the Top Clients service for the details. A failed call degrades the section,
    /// never the page.
    pub async fn render(&mut self, seller_id: i64) -> Result<GigPageView, PageError> {
        let start = Instant::now();
        let ids = self.client_ids(seller_id).await?;
        self.stats.renders += 1;
        let clients = if ids.is_empty() {
            GigClients::NoClients
        } else {
            self.stats.calls += 1;
            match self.service.clients_by_ids(seller_id, &ids).await {
                Ok(clients) => GigClients::Enriched { ids, clients },
                Err(e) => {
                    self.stats.failed_calls += 1;
                    GigClients::DetailsUnavailable {
                        ids,
                        reason: short_reason(&e),
                    }
                }
            }
        };
        Ok(GigPageView {
            seller_id,
            clients,
            took: start.elapsed(),
        })
    }

    /// Renders and service calls so far.
    pub fn stats(&self) -> GigStats {
        self.stats
    }
}

/// The first line of a service error (its message already includes the cause).
fn short_reason(e: &ServiceError) -> String {
    crate::service::describe(e)
}

impl fmt::Display for GigPageView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gig page  · seller {} · ", self.seller_id)?;
        match &self.clients {
            GigClients::NoClients => writeln!(
                f,
                "no ids in the local view → no top clients section, no call to the Top Clients service ({})",
                ms(self.took)
            ),
            GigClients::Enriched { ids, clients } => {
                writeln!(
                    f,
                    "ids {ids:?} from the local view + 1 call to the Top Clients service ({})",
                    ms(self.took)
                )?;
                let names: Vec<&str> = clients.iter().map(|c| c.name.as_str()).collect();
                writeln!(f, "      Worked with: {}", names.join(" · "))
            }
            GigClients::DetailsUnavailable { ids, reason } => {
                writeln!(
                    f,
                    "ids {ids:?} from the local view; the Top Clients service failed ({})",
                    ms(self.took)
                )?;
                writeln!(
                    f,
                    "      Worked with {} (details unavailable: {reason})",
                    plural(ids.len(), "client")
                )
            }
        }
    }
}

/// The seller's own profile page: the user page's view, read with `SET cdc.min_lsn` so the
/// seller's edit is visible on the very next read.
#[derive(Debug)]
pub struct SelfView {
    addr: String,
    agent: Client,
    clients: Statement,
    source: Client,
}

impl SelfView {
    /// Connects to the user page's agent and to the source database (for its WAL position).
    pub async fn connect(agent_addr: &str, source_url: &str) -> Result<SelfView, PageError> {
        let agent = connect_agent(agent_addr, "self-view").await?;
        let clients = agent
            .prepare(&format!(
                "SELECT client_id, position, name, logo_url, industry, description \
                 FROM {USER_VIEW} WHERE seller_id = $1"
            ))
            .await
            .map_err(|source| PageError::Agent {
                addr: agent_addr.to_owned(),
                source,
            })?;
        let config: tokio_postgres::Config = source_url.parse().map_err(PageError::Source)?;
        let (source, connection) = config.connect(NoTls).await.map_err(PageError::Source)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(SelfView {
            addr: agent_addr.to_owned(),
            agent,
            clients,
            source,
        })
    }

    /// The source's current WAL position (`pg_current_wal_lsn()`): taken after the seller's
    /// commit returned, it is at or past that commit.
    pub async fn source_lsn(&self) -> Result<String, PageError> {
        self.source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .and_then(|r| r.try_get(0))
            .map_err(PageError::Source)
    }

    /// The seller's top clients as of at least `lsn` (ordered by client id): the agent answers
    /// once it has applied everything committed up to there.
    pub async fn read_after(&self, seller_id: i64, lsn: &str) -> Result<Vec<TopClient>, PageError> {
        let valid = lsn.split_once('/').is_some_and(|(hi, lo)| {
            !hi.is_empty()
                && !lo.is_empty()
                && hi.chars().chain(lo.chars()).all(|c| c.is_ascii_hexdigit())
        });
        if !valid {
            return Err(PageError::BadLsn(lsn.to_owned()));
        }
        let err = |source| PageError::Agent {
            addr: self.addr.clone(),
            source,
        };
        self.agent
            .batch_execute(&format!("SET cdc.min_lsn = '{lsn}'"))
            .await
            .map_err(err)?;
        let rows = self
            .agent
            .query(&self.clients, &[&seller_id])
            .await
            .map_err(err)?;
        rows.iter()
            .map(|r| TopClient::from_row(r).map_err(err))
            .collect()
    }
}

/// `1 client`, `3 clients`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A duration as milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
