//! The Top Clients service: the seed's legacy write service. Sellers add, edit, remove and
//! reorder their top clients; every action is one plain SQL transaction on the service's own
//! database, and the service answers reads of its data (the "API call" of the synchronous and
//! hybrid approaches).
//!
//! It knows nothing about change data capture: no outbox table, no publishing, no LSNs. The
//! reader picks its commits up from the WAL.

use std::fmt;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls, Row};

/// How long connecting to the service's database may take before an action fails (the pages
/// that call the service must not hang when it is down).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Most clients a seller may list.
pub const MAX_TOP_CLIENTS: usize = 10;

/// Columns of a top client, in [`TopClient::from_row`] order.
const CLIENT_COLUMNS: &str = "client_id, position, name, logo_url, industry, description";

/// What went wrong in the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The URL does not parse.
    #[error("bad Top Clients database URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    /// The database can't be reached or the statement failed.
    #[error("Top Clients database: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// The seller has no such client (another edit removed it first).
    #[error("seller {seller_id} has no top client {client_id}")]
    NoSuchClient {
        /// The seller.
        seller_id: i64,
        /// The client asked for.
        client_id: i64,
    },
    /// The seller already lists [`MAX_TOP_CLIENTS`] clients, or this one.
    #[error("seller {seller_id} cannot add client {client_id}: {reason}")]
    Refused {
        /// The seller.
        seller_id: i64,
        /// The client.
        client_id: i64,
        /// Why.
        reason: &'static str,
    },
}

/// One of a seller's top clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopClient {
    /// The client's account id.
    pub client_id: i64,
    /// 1 = shown first.
    pub position: i32,
    /// Display name.
    pub name: String,
    /// Logo image URL.
    pub logo_url: Option<String>,
    /// Industry label.
    pub industry: Option<String>,
    /// Long text (a few kB, stored out of line by TOAST).
    pub description: Option<String>,
}

impl TopClient {
    /// Reads a row selected with `client_id, position, name, logo_url, industry, description`.
    pub fn from_row(row: &Row) -> Result<TopClient, tokio_postgres::Error> {
        Ok(TopClient {
            client_id: row.try_get(0)?,
            position: row.try_get(1)?,
            name: row.try_get(2)?,
            logo_url: row.try_get(3)?,
            industry: row.try_get(4)?,
            description: row.try_get(5)?,
        })
    }
}

/// A client to add.
#[derive(Clone, Debug)]
pub struct NewClient {
    /// The client's account id.
    pub client_id: i64,
    /// Display name.
    pub name: String,
    /// Logo image URL.
    pub logo_url: Option<String>,
    /// Industry label.
    pub industry: Option<String>,
    /// Long text.
    pub description: Option<String>,
}

/// An edit of a client's details; `None` fields keep their value.
#[derive(Clone, Debug, Default)]
pub struct ClientEdit {
    /// New display name.
    pub name: Option<String>,
    /// New logo URL.
    pub logo_url: Option<String>,
    /// New industry.
    pub industry: Option<String>,
    /// New long text. Edits without it leave the stored (TOASTed) value untouched, so the
    /// change reaches the stream as "unchanged TOAST".
    pub description: Option<String>,
}

/// The Top Clients service, on one connection to its database, reconnecting after the database
/// went away.
pub struct TopClientsService {
    config: tokio_postgres::Config,
    client: Option<Client>,
}

impl fmt::Debug for TopClientsService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TopClientsService")
            .field("connected", &self.client.is_some())
            .finish()
    }
}

impl TopClientsService {
    /// A service for the database at `url` (libpq-style); connects on first use.
    pub fn new(url: &str) -> Result<TopClientsService, ServiceError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(ServiceError::Url)?;
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .application_name("topclients-service");
        Ok(TopClientsService {
            config,
            client: None,
        })
    }

    async fn client(&mut self) -> Result<&mut Client, ServiceError> {
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => {
                let (client, connection) = self.config.connect(NoTls).await?;
                tokio::spawn(async move {
                    // The database going away ends this task; the next action reconnects.
                    let _ = connection.await;
                });
                client
            }
        };
        Ok(self.client.insert(client))
    }

    /// Forgets a connection that failed, so the next action reconnects.
    fn after<T>(&mut self, result: Result<T, ServiceError>) -> Result<T, ServiceError> {
        if result.is_err() && self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        result
    }

    /// The ids of all sellers.
    pub async fn seller_ids(&mut self) -> Result<Vec<i64>, ServiceError> {
        let result = async {
            let rows = self
                .client()
                .await?
                .query("SELECT id FROM sellers ORDER BY id", &[])
                .await?;
            rows.iter()
                .map(|r| r.try_get(0).map_err(ServiceError::from))
                .collect()
        }
        .await;
        self.after(result)
    }

    /// A seller's top clients, in position order (the service's read API).
    pub async fn top_clients(&mut self, seller_id: i64) -> Result<Vec<TopClient>, ServiceError> {
        let result = async {
            let client = self.client().await?;
            read_clients(client, seller_id).await
        }
        .await;
        self.after(result)
    }

    /// The given clients of a seller, in position order: the hybrid page's enrichment call.
    pub async fn clients_by_ids(
        &mut self,
        seller_id: i64,
        client_ids: &[i64],
    ) -> Result<Vec<TopClient>, ServiceError> {
        let result = async {
            let rows = self
                .client()
                .await?
                .query(
                    &format!(
                        "SELECT {CLIENT_COLUMNS} FROM top_clients
                         WHERE seller_id = $1 AND client_id = ANY($2) ORDER BY position"
                    ),
                    &[&seller_id, &client_ids],
                )
                .await?;
            rows.iter()
                .map(|r| TopClient::from_row(r).map_err(ServiceError::from))
                .collect()
        }
        .await;
        self.after(result)
    }

    /// Adds a client at the end of the seller's list; returns the list as committed.
    pub async fn add_client(
        &mut self,
        seller_id: i64,
        new: &NewClient,
    ) -> Result<Vec<TopClient>, ServiceError> {
        let result = async {
            let client = self.client().await?;
            let tx = client.transaction().await?;
            lock_seller(&tx, seller_id).await?;
            let count: i64 = tx
                .query_one(
                    "SELECT count(*) FROM top_clients WHERE seller_id = $1",
                    &[&seller_id],
                )
                .await?
                .try_get(0)?;
            if usize::try_from(count).unwrap_or(usize::MAX) >= MAX_TOP_CLIENTS {
                return Err(ServiceError::Refused {
                    seller_id,
                    client_id: new.client_id,
                    reason: "the list is full",
                });
            }
            let inserted = tx
                .execute(
                    "INSERT INTO top_clients
                         (seller_id, client_id, position, name, logo_url, industry, description)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (seller_id, client_id) DO NOTHING",
                    &[
                        &seller_id,
                        &new.client_id,
                        &(i32::try_from(count).unwrap_or(i32::MAX) + 1),
                        &new.name,
                        &new.logo_url,
                        &new.industry,
                        &new.description,
                    ],
                )
                .await?;
            if inserted == 0 {
                return Err(ServiceError::Refused {
                    seller_id,
                    client_id: new.client_id,
                    reason: "already listed",
                });
            }
            let clients = read_clients(&tx, seller_id).await?;
            tx.commit().await?;
            Ok(clients)
        }
        .await;
        self.after(result)
    }

    /// Changes a client's details; returns the list as committed.
    pub async fn edit_client(
        &mut self,
        seller_id: i64,
        client_id: i64,
        edit: &ClientEdit,
    ) -> Result<Vec<TopClient>, ServiceError> {
        let result = async {
            let client = self.client().await?;
            let tx = client.transaction().await?;
            lock_seller(&tx, seller_id).await?;
            // Plain SQL, one statement per changed field set: only the columns named change,
            // so an edit without a description leaves the TOASTed value alone.
            let mut sets = Vec::new();
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                vec![&seller_id, &client_id];
            for (column, value) in [
                ("name", &edit.name),
                ("logo_url", &edit.logo_url),
                ("industry", &edit.industry),
                ("description", &edit.description),
            ] {
                if let Some(value) = value {
                    params.push(value);
                    sets.push(format!("{column} = ${}", params.len()));
                }
            }
            sets.push("updated_at = now()".to_owned());
            let updated = tx
                .execute(
                    &format!(
                        "UPDATE top_clients SET {} WHERE seller_id = $1 AND client_id = $2",
                        sets.join(", ")
                    ),
                    &params,
                )
                .await?;
            if updated == 0 {
                return Err(ServiceError::NoSuchClient {
                    seller_id,
                    client_id,
                });
            }
            let clients = read_clients(&tx, seller_id).await?;
            tx.commit().await?;
            Ok(clients)
        }
        .await;
        self.after(result)
    }

    /// Removes a client and closes the gap in the positions; returns the list as committed.
    pub async fn remove_client(
        &mut self,
        seller_id: i64,
        client_id: i64,
    ) -> Result<Vec<TopClient>, ServiceError> {
        let result = async {
            let client = self.client().await?;
            let tx = client.transaction().await?;
            lock_seller(&tx, seller_id).await?;
            let removed = tx
                .query_opt(
                    "DELETE FROM top_clients WHERE seller_id = $1 AND client_id = $2
                     RETURNING position",
                    &[&seller_id, &client_id],
                )
                .await?
                .ok_or(ServiceError::NoSuchClient {
                    seller_id,
                    client_id,
                })?;
            let position: i32 = removed.try_get(0)?;
            tx.execute(
                "UPDATE top_clients SET position = position - 1, updated_at = now()
                 WHERE seller_id = $1 AND position > $2",
                &[&seller_id, &position],
            )
            .await?;
            let clients = read_clients(&tx, seller_id).await?;
            tx.commit().await?;
            Ok(clients)
        }
        .await;
        self.after(result)
    }

    /// Moves a client to `to_position` (1 = first), shifting the others; returns the list as
    /// committed.
    pub async fn move_client(
        &mut self,
        seller_id: i64,
        client_id: i64,
        to_position: i32,
    ) -> Result<Vec<TopClient>, ServiceError> {
        let result = async {
            let client = self.client().await?;
            let tx = client.transaction().await?;
            lock_seller(&tx, seller_id).await?;
            let from: i32 = tx
                .query_opt(
                    "SELECT position FROM top_clients WHERE seller_id = $1 AND client_id = $2",
                    &[&seller_id, &client_id],
                )
                .await?
                .ok_or(ServiceError::NoSuchClient {
                    seller_id,
                    client_id,
                })?
                .try_get(0)?;
            let count: i64 = tx
                .query_one(
                    "SELECT count(*) FROM top_clients WHERE seller_id = $1",
                    &[&seller_id],
                )
                .await?
                .try_get(0)?;
            let to = to_position.clamp(1, i32::try_from(count).unwrap_or(i32::MAX).max(1));
            if to < from {
                tx.execute(
                    "UPDATE top_clients SET position = position + 1, updated_at = now()
                     WHERE seller_id = $1 AND position >= $2 AND position < $3",
                    &[&seller_id, &to, &from],
                )
                .await?;
            } else if to > from {
                tx.execute(
                    "UPDATE top_clients SET position = position - 1, updated_at = now()
                     WHERE seller_id = $1 AND position > $2 AND position <= $3",
                    &[&seller_id, &from, &to],
                )
                .await?;
            }
            tx.execute(
                "UPDATE top_clients SET position = $3, updated_at = now()
                 WHERE seller_id = $1 AND client_id = $2",
                &[&seller_id, &client_id, &to],
            )
            .await?;
            let clients = read_clients(&tx, seller_id).await?;
            tx.commit().await?;
            Ok(clients)
        }
        .await;
        self.after(result)
    }
}

/// Serialises a seller's edits (two browser tabs of one seller can't interleave their renumbering).
async fn lock_seller(
    tx: &tokio_postgres::Transaction<'_>,
    seller_id: i64,
) -> Result<(), ServiceError> {
    tx.execute(
        "SELECT 1 FROM sellers WHERE id = $1 FOR UPDATE",
        &[&seller_id],
    )
    .await?;
    Ok(())
}

async fn read_clients(
    client: &impl tokio_postgres::GenericClient,
    seller_id: i64,
) -> Result<Vec<TopClient>, ServiceError> {
    let rows = client
        .query(
            &format!(
                "SELECT {CLIENT_COLUMNS} FROM top_clients WHERE seller_id = $1 ORDER BY position"
            ),
            &[&seller_id],
        )
        .await?;
    rows.iter()
        .map(|r| TopClient::from_row(r).map_err(ServiceError::from))
        .collect()
}

/// An error with its causes, each once: `Top Clients database: error connecting to server:
/// Connection refused (os error 111)`.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text.lines().next().unwrap_or_default().to_owned()
}

/// What a seller did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActionKind {
    /// Added a client.
    Add,
    /// Changed a client's name, logo or industry (description untouched).
    Edit,
    /// Rewrote a client's long description.
    EditDescription,
    /// Removed a client.
    Remove,
    /// Moved a client to another position.
    Reorder,
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ActionKind::Add => "add",
            ActionKind::Edit => "edit",
            ActionKind::EditDescription => "edit description",
            ActionKind::Remove => "remove",
            ActionKind::Reorder => "reorder",
        })
    }
}

/// A committed seller action: the seller's list as the transaction left it.
#[derive(Clone, Debug)]
pub struct Committed {
    /// The seller.
    pub seller_id: i64,
    /// What they did.
    pub kind: ActionKind,
    /// The client it was about.
    pub client_id: i64,
    /// The seller's list after the commit, in position order.
    pub clients: Vec<TopClient>,
    /// When the commit returned.
    pub at: Instant,
}

/// A small deterministic PRNG (xorshift64), so a seed reproduces a run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced by a constant).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        let len = u64::try_from(items.len()).ok()?;
        if len == 0 {
            return None;
        }
        items.get(usize::try_from(self.below(len)).ok()?)
    }
}

const COMPANIES: &[&str] = &[
    "Acme",
    "Globex",
    "Initech",
    "Umbrella",
    "Hooli",
    "Stark",
    "Wayne",
    "Wonka",
    "Cyberdyne",
    "Soylent",
    "Tyrell",
    "Aperture",
    "Massive",
    "Vandelay",
    "Prestige",
    "Gringotts",
    "Oceanic",
    "Pied Piper",
    "Dunder Mifflin",
    "Monarch",
];
const SUFFIXES: &[&str] = &["Inc.", "Labs", "Group", "GmbH", "Ltd", "Studios", "Systems"];
const INDUSTRIES: &[&str] = &[
    "Fintech",
    "Retail",
    "Healthcare",
    "Gaming",
    "Media",
    "Logistics",
    "Education",
    "Energy",
];

/// Random seller actions against the service, the way sellers use it: mostly edits and
/// additions, some removals and reorders. One action at a time.
#[derive(Debug)]
pub struct SellerActions {
    rng: Rng,
    sellers: Vec<i64>,
    revision: u64,
}

impl SellerActions {
    /// Actions by the given sellers, reproducible from `seed`.
    pub fn new(sellers: Vec<i64>, seed: u64) -> SellerActions {
        SellerActions {
            rng: Rng::new(seed),
            sellers,
            revision: 0,
        }
    }

    /// A random seller for which `available` holds (tried a bounded number of times).
    pub fn pick_seller(&mut self, available: impl Fn(i64) -> bool) -> Option<i64> {
        for _ in 0..64 {
            let seller = *self.rng.pick(&self.sellers)?;
            if available(seller) {
                return Some(seller);
            }
        }
        None
    }

    /// A client the seller might add.
    pub fn new_client(&mut self) -> NewClient {
        let client_id = 100_000 + i64::try_from(self.rng.below(5000)).unwrap_or(0);
        let index = usize::try_from(client_id).unwrap_or(0);
        let hex = self.long_text();
        NewClient {
            client_id,
            name: format!(
                "{} {}",
                COMPANIES[index % COMPANIES.len()],
                SUFFIXES[(index / COMPANIES.len()) % SUFFIXES.len()]
            ),
            logo_url: Some(format!("https://logos.example/{client_id}.png")),
            industry: Some(INDUSTRIES[index % INDUSTRIES.len()].to_owned()),
            description: Some(format!("Added by the seller. {hex}")),
        }
    }

    /// 3,200 random hex digits: like the sample data's descriptions, long enough to be stored
    /// out of line.
    fn long_text(&mut self) -> String {
        (0..200)
            .map(|_| format!("{:016x}", self.rng.next_u64()))
            .collect()
    }

    /// A fresh display name for an existing client (unique within this run).
    pub fn rename(&mut self, client: &TopClient) -> String {
        self.revision += 1;
        let base = client
            .name
            .split(" (rev ")
            .next()
            .unwrap_or(&client.name)
            .to_owned();
        format!("{base} (rev {})", self.revision)
    }

    /// One action by `seller_id`: reads the seller's list, chooses what to do with it, does it.
    pub async fn act(
        &mut self,
        service: &mut TopClientsService,
        seller_id: i64,
    ) -> Result<Committed, ServiceError> {
        let current = service.top_clients(seller_id).await?;
        let roll = self.rng.below(100);
        let kind = if current.is_empty() || (roll < 30 && current.len() < MAX_TOP_CLIENTS) {
            ActionKind::Add
        } else if roll < 55 {
            ActionKind::Edit
        } else if roll < 65 {
            ActionKind::EditDescription
        } else if roll < 80 && current.len() > 1 {
            ActionKind::Reorder
        } else {
            ActionKind::Remove
        };
        let target = self.rng.pick(&current).cloned();
        let (client_id, clients) = match (kind, target) {
            (ActionKind::Add, _) | (_, None) => {
                let mut new = self.new_client();
                while current.iter().any(|c| c.client_id == new.client_id) {
                    new = self.new_client();
                }
                (new.client_id, service.add_client(seller_id, &new).await?)
            }
            (ActionKind::Edit, Some(c)) => {
                let edit = ClientEdit {
                    name: Some(self.rename(&c)),
                    industry: self
                        .rng
                        .pick(INDUSTRIES)
                        .map(|s| (*s).to_owned())
                        .filter(|_| self.rng.below(3) == 0),
                    ..ClientEdit::default()
                };
                (
                    c.client_id,
                    service.edit_client(seller_id, c.client_id, &edit).await?,
                )
            }
            (ActionKind::EditDescription, Some(c)) => {
                let hex = self.long_text();
                let edit = ClientEdit {
                    description: Some(format!("Rewritten by the seller. {hex}")),
                    ..ClientEdit::default()
                };
                (
                    c.client_id,
                    service.edit_client(seller_id, c.client_id, &edit).await?,
                )
            }
            (ActionKind::Reorder, Some(c)) => {
                let to = 1 + i32::try_from(self.rng.below(current.len() as u64)).unwrap_or(0);
                (
                    c.client_id,
                    service.move_client(seller_id, c.client_id, to).await?,
                )
            }
            (ActionKind::Remove, Some(c)) => (
                c.client_id,
                service.remove_client(seller_id, c.client_id).await?,
            ),
        };
        Ok(Committed {
            seller_id,
            kind,
            client_id,
            clients,
            at: Instant::now(),
        })
    }
}
