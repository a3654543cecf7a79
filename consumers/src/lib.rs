//! `consumers`: view agents. Each agent reads the CDC stream from its own stored position and
//! keeps read-optimised views of source tables in an embedded sled store, applying every source
//! transaction atomically, and serves them in-process ([`ViewStore`], [`Agent`]) and over the
//! Postgres wire protocol ([`server`]).
//!
//! Modules, from the bottom up:
//! - [`config`]: the TOML configuration;
//! - [`keys`]: order-preserving encoding of key values into sled keys;
//! - [`store`]: the sled store, atomic apply, consistent reads, read-your-writes waits;

pub mod config;
pub mod keys;
pub mod store;

pub use config::{AgentConfig, ViewConfig};
pub use store::{
    Progress, QueryError, ReadResult, SourceTransaction, StoreError, ViewStatus, ViewStore,
};
