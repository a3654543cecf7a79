//! An agent: the store, the follow loop and the pgwire server, started and stopped together.
//! This is the in-process API for page services that embed the agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cdc::envelope::Row;
use cdc::Lsn;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{AgentConfig, ConfigError};
use crate::follow::{follow, FollowError};
use crate::store::{QueryError, ReadResult, StoreError, ViewStore};

/// Errors of starting and running an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The pgwire port is taken or not allowed.
    #[error("cannot listen on {addr} for pgwire: {source}; change pgwire.listen")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The follow loop stopped on a store error.
    #[error(transparent)]
    Follow(#[from] FollowError),
    /// A task panicked.
    #[error("agent task failed: {0}")]
    Task(String),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    store: Arc<ViewStore>,
    shutdown: watch::Sender<bool>,
    follow: JoinHandle<Result<(), FollowError>>,
    server: Option<JoinHandle<()>>,
    pgwire_addr: Option<SocketAddr>,
}

impl Agent {
    /// Opens the store, binds the pgwire port (unless disabled) and starts following the
    /// stream. Returns once the views answer queries; NATS need not be reachable.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        config.validate()?;
        let store = Arc::new(ViewStore::open(&config)?);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (server, pgwire_addr) = match config.pgwire_addr()? {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| AgentError::Bind { addr, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| AgentError::Bind { addr, source })?;
                let task = tokio::spawn(crate::server::serve(
                    listener,
                    store.clone(),
                    config.pgwire.clone(),
                    shutdown_rx.clone(),
                ));
                (Some(task), Some(local))
            }
            None => (None, None),
        };
        let follow = tokio::spawn(follow(
            store.clone(),
            config.nats.clone(),
            config.apply.clone(),
            shutdown_rx,
        ));
        Ok(Agent {
            store,
            shutdown,
            follow,
            server,
            pgwire_addr,
        })
    }

    /// The store, for reads.
    pub fn store(&self) -> &Arc<ViewStore> {
        &self.store
    }

    /// The address pgwire listens on (with the real port when configured as `:0`).
    pub fn pgwire_addr(&self) -> Option<SocketAddr> {
        self.pgwire_addr
    }

    /// Rows of `view` for one key (or key prefix). Errors when the view is stale.
    pub fn get(&self, view: &str, key: &[Value]) -> Result<Vec<Row>, QueryError> {
        self.store.get(view, key)
    }

    /// All rows of `view`, at most `limit`.
    pub fn scan(&self, view: &str, limit: usize) -> Result<ReadResult, QueryError> {
        self.store.scan(view, limit, false)
    }

    /// Waits until every source change committed at or before `lsn` is applied.
    pub async fn wait_for_lsn(&self, lsn: Lsn, timeout: Duration) -> Result<Lsn, QueryError> {
        self.store.wait_for_lsn(lsn, timeout).await
    }

    /// Resolves when the follow loop has stopped on its own (a store error).
    pub async fn stopped(&mut self) -> Result<(), AgentError> {
        match (&mut self.follow).await {
            Ok(r) => r.map_err(AgentError::from),
            Err(e) => Err(AgentError::Task(e.to_string())),
        }
    }

    /// Stops following and serving at a transaction boundary and flushes the store.
    pub async fn shutdown(self) -> Result<(), AgentError> {
        let _ = self.shutdown.send(true);
        let followed = match self.follow.await {
            Ok(r) => r.map_err(AgentError::from),
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(AgentError::Task(e.to_string())),
        };
        if let Some(server) = self.server {
            let _ = server.await;
        }
        self.store.flush()?;
        followed
    }
}
