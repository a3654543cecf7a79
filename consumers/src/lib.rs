//! `consumers`: view agents. Each agent reads the CDC stream from its own stored position and
//! keeps read-optimised views of source tables in an embedded sled store, applying every source
//! transaction atomically, and serves them in-process ([`ViewStore`], [`Agent`]) and over the
//! Postgres wire protocol ([`server`]).
//!
//! Modules, from the bottom up:
//! - [`config`]: the TOML configuration;
//! - [`keys`]: order-preserving encoding of key values into sled keys;
//! - [`store`]: the sled store, atomic apply, consistent reads, read-your-writes waits;

pub mod agent;
pub mod config;
pub mod control;
pub mod follow;
pub mod keys;
pub mod metrics;
pub mod replay;
pub mod row;
pub mod server;
pub mod sql;
pub mod store;
pub mod verify;

pub use agent::{Agent, AgentError};
pub use config::{AgentConfig, ViewConfig};
pub use store::{
    Progress, QueryError, RawRead, ReadResult, SourceTransaction, StoreError, ViewStatus, ViewStore,
};

/// Resolves once `shutdown` holds `true` (or its sender is gone).
pub(crate) async fn shutdown_requested(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, so callers' futures stay `Send`.
    let _ = shutdown.wait_for(|s| *s).await;
}
