//! The Top Clients demo (the seed's story, end to end):
//!
//! - [`service`]: the legacy Top Clients service. Sellers add, edit, remove and reorder their
//!   top clients with plain SQL; it knows nothing about change data capture.
//! - [`pages`]: the page services. The user page renders from its agent's full view, the gig
//!   page from an ids-only view plus a call to the service for sellers that have ids (the
//!   hybrid approach), and the self view reads with `SET cdc.min_lsn` (read-your-writes).
//! - [`stack`]: the processes the demo runs (private Postgres and NATS, `cdc run`, two
//!   `view-agent run`s) and their config files.
//! - [`scenario`]: the demo's phases and what each one checks.

pub mod pages;
pub mod scenario;
pub mod service;
pub mod stack;
