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
use crate::control::Operations;
use crate::follow::{follow, FollowError};
use crate::replay::Replays;
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
    /// The metrics port is taken or not allowed.
    #[error(transparent)]
    Metrics(#[from] cdc::observe::ObserveError),
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
    /// pgwire, metrics and control tasks: stopped by `shutdown`.
    tasks: Vec<JoinHandle<()>>,
    pgwire_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    ops: Arc<Operations>,
    nats: Option<async_nats::Client>,
}

impl Agent {
    /// Opens the store, binds the pgwire port (unless disabled) and starts following the
    /// stream. Returns once the views answer queries; NATS need not be reachable.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        config.validate()?;
        let store = Arc::new(ViewStore::open(&config)?);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let metrics_addr = if config.metrics.listen.is_empty() {
            None
        } else {
            let server = cdc::observe::MetricsServer::bind(&config.metrics.listen).await?;
            let addr = server.local_addr();
            let registry = Arc::new(crate::metrics::registry(store.clone()));
            let health_store = store.clone();
            let health = Arc::new(move || {
                let following = health_store.stream_seen();
                crate::metrics::health(&health_store, following)
            });
            tasks.push(tokio::spawn(server.serve(
                registry,
                health,
                shutdown_rx.clone(),
            )));
            addr
        };
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
        tasks.extend(server);
        let client = crate::follow::connect(&config.nats).await;
        let follow = match &client {
            Ok(client) => tokio::spawn(follow(
                store.clone(),
                client.clone(),
                config.nats.clone(),
                config.apply.clone(),
                shutdown_rx.clone(),
            )),
            Err(e) => {
                tracing::error!(error = %e, "views are served, nothing is applied");
                let mut rx = shutdown_rx.clone();
                tokio::spawn(async move {
                    crate::shutdown_requested(&mut rx).await;
                    Ok(())
                })
            }
        };
        let replays = Replays::new(
            store.clone(),
            client.clone(),
            config.nats.clone(),
            shutdown_rx.clone(),
        );
        let ops = Arc::new(Operations::new(store.clone(), config.name.clone(), replays));
        let nats = client.as_ref().ok().cloned();
        if let Ok(client) = client {
            let subject =
                crate::control::control_subject(&config.nats.subject_prefix, &config.name);
            tasks.push(tokio::spawn(crate::control::serve(
                ops.clone(),
                client,
                subject,
                shutdown_rx,
            )));
        }
        Ok(Agent {
            store,
            shutdown,
            follow,
            tasks,
            pgwire_addr,
            metrics_addr,
            ops,
            nats,
        })
    }

    /// True while the agent's NATS connection is up (it reconnects by itself).
    pub fn nats_connected(&self) -> bool {
        self.nats
            .as_ref()
            .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
    }

    /// The store, for reads.
    pub fn store(&self) -> &Arc<ViewStore> {
        &self.store
    }

    /// The operations `view-agent replay` and `verify` use (in-process).
    pub fn operations(&self) -> &Arc<Operations> {
        &self.ops
    }

    /// The address the metrics endpoint listens on, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
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
        // A verify or replay holding the applier must not keep it from finishing its batch.
        self.store.fence().lift_all();
        let followed = match self.follow.await {
            Ok(r) => r.map_err(AgentError::from),
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(AgentError::Task(e.to_string())),
        };
        for task in self.tasks {
            let _ = task.await;
        }
        self.store.flush()?;
        followed
    }
}
