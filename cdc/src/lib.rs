//! `cdc`: tails a Postgres database's write-ahead log through logical replication (pgoutput)
//! and publishes every committed row change to NATS JetStream, exactly once and in commit order.
//!
//! Layers, from the wire up:
//! - [`pgoutput`]: pgoutput bytes → [`pgoutput::LogicalMessage`] (never panics on bad input);
//! - [`value`]: pgoutput text values → JSON by type OID;
//! - [`envelope`]: the event envelope shared with the agents.

pub mod config;
pub mod envelope;
pub mod events;
pub mod lsn;
pub mod memory;
pub mod metrics;
pub mod nats_url;
pub mod observe;
pub mod pgconn;
pub mod publish;
pub mod pull;
pub mod reader;
pub mod replication;
pub mod setup;
pub mod snapshot;
pub mod stall;
pub mod status;
pub mod subject;
pub mod tail;

pub use envelope::{ChangeEvent, Op};
pub use lsn::Lsn;
pub mod pgoutput;
pub mod value;
pub mod wal;
