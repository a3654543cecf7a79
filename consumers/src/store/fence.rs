//! The apply fence: holds the applier at a chosen point of the stream while an operator command
//! reads the views (`view-agent verify`) or swaps a rebuilt view in (`view-agent replay`).
//!
//! Two independent holds:
//! - a **limit** (verify): source transactions committed after an LSN wait; everything before
//!   them is applied. The stream is in commit order, so once the applier waits at the first
//!   transaction past the limit (or the watermark reached it), the views are exactly the
//!   source as of that LSN. A limit has a lease: the applier lifts it by itself when the lease
//!   runs out (an operator command that died cannot freeze the agent).
//! - a **hold** (replay swap): nothing at all is applied while it is held.
//!
//! The applier thread blocks on a condvar; async callers wait on a watch channel that ticks on
//! every change.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cdc::Lsn;
use tokio::sync::watch;

use crate::store::SourceTransaction;

/// How often a blocked applier re-checks the lease.
const RECHECK: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
struct State {
    /// Transactions committed after this LSN wait.
    limit: Option<Lsn>,
    /// Who owns the limit.
    owner: u64,
    lease_until: Option<Instant>,
    /// Nothing is applied while this is non-zero.
    holds: u32,
    /// A group is being applied right now.
    applying: bool,
    /// The applier waits at the limit (the next transaction is past it).
    at_limit: bool,
    next_owner: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct Fence {
    state: Mutex<State>,
    changed: Condvar,
    ticks: watch::Sender<u64>,
}

impl Default for Fence {
    fn default() -> Self {
        Fence {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            ticks: watch::Sender::new(0),
        }
    }
}

/// Why a fence request was refused.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// Another command holds the limit.
    #[error("another verify holds this agent's apply position; retry when it is done")]
    Busy,
    /// The id does not own the limit (it was lifted, or its lease ran out).
    #[error("the apply fence was lifted (its lease ran out?); run the command again")]
    Lost,
    /// The limit can only move forward.
    #[error("the fence can only move forward (at {at}, asked for {asked})")]
    Backwards {
        /// The current limit.
        at: Lsn,
        /// The requested one.
        asked: Lsn,
    },
}

fn commit_lsn(tx: &SourceTransaction) -> Lsn {
    tx.events
        .iter()
        .map(|e| e.source.commit_lsn)
        .max()
        .unwrap_or_default()
}

impl Fence {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn notify(&self) {
        self.changed.notify_all();
        self.ticks.send_modify(|t| *t = t.wrapping_add(1));
    }

    /// Blocks (applier thread) until some leading transactions of `txs` may be applied;
    /// returns how many, and marks a group as being applied ([`Fence::done`] ends it). With
    /// an empty `txs` (a heartbeat alone) it only waits for holds.
    pub(crate) fn admit(&self, txs: &[SourceTransaction]) -> usize {
        self.admit_by(txs.len(), |i| commit_lsn(&txs[i]))
    }

    /// Blocks (applier thread) until one transaction committed at `commit` may be applied, and
    /// marks it as being applied ([`Fence::done`] ends it).
    pub(crate) fn admit_commit(&self, commit: Lsn) {
        self.admit_by(1, |_| commit);
    }

    /// [`Fence::admit`] over `count` transactions whose commit LSNs `commit_of` gives.
    fn admit_by(&self, count: usize, commit_of: impl Fn(usize) -> Lsn) -> usize {
        let mut st = self.lock();
        loop {
            if let Some(until) = st.lease_until {
                if Instant::now() >= until && st.limit.is_some() {
                    tracing::warn!("the apply fence's lease ran out; applying again");
                    st.limit = None;
                    st.lease_until = None;
                    st.at_limit = false;
                    self.notify();
                }
            }
            if st.holds == 0 {
                let admitted = match st.limit {
                    None => count,
                    Some(limit) => (0..count).take_while(|&i| commit_of(i) <= limit).count(),
                };
                if admitted > 0 || count == 0 {
                    st.applying = true;
                    st.at_limit = false;
                    return admitted;
                }
                if !st.at_limit {
                    st.at_limit = true;
                    self.notify();
                }
            }
            st = self
                .changed
                .wait_timeout(st, RECHECK)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The group admitted last is applied (or failed).
    pub(crate) fn done(&self) {
        self.lock().applying = false;
        self.notify();
    }

    /// Sets a limit at `at` (normally the applied LSN: nothing new is applied) with a lease;
    /// returns its owner id.
    pub fn set_limit(&self, at: Lsn, lease: Duration) -> Result<u64, FenceError> {
        let mut st = self.lock();
        if st.limit.is_some() {
            return Err(FenceError::Busy);
        }
        st.next_owner += 1;
        st.owner = st.next_owner;
        st.limit = Some(at);
        st.lease_until = Some(Instant::now() + lease);
        st.at_limit = false;
        let owner = st.owner;
        drop(st);
        self.notify();
        Ok(owner)
    }

    /// Moves the limit of `owner` forward to `to` and renews its lease.
    pub fn advance(&self, owner: u64, to: Lsn, lease: Duration) -> Result<(), FenceError> {
        let mut st = self.lock();
        let Some(at) = st.limit.filter(|_| st.owner == owner) else {
            return Err(FenceError::Lost);
        };
        if to < at {
            return Err(FenceError::Backwards { at, asked: to });
        }
        if to > at {
            st.at_limit = false;
        }
        st.limit = Some(to);
        st.lease_until = Some(Instant::now() + lease);
        drop(st);
        self.notify();
        Ok(())
    }

    /// Renews the lease of `owner`.
    pub fn renew(&self, owner: u64, lease: Duration) -> Result<(), FenceError> {
        let mut st = self.lock();
        if st.limit.is_none() || st.owner != owner {
            return Err(FenceError::Lost);
        }
        st.lease_until = Some(Instant::now() + lease);
        Ok(())
    }

    /// The limit of `owner`, if it still holds.
    pub fn limit_of(&self, owner: u64) -> Option<Lsn> {
        let st = self.lock();
        st.limit.filter(|_| st.owner == owner)
    }

    /// True when the applier waits at the limit (a transaction past it is next).
    pub fn at_limit(&self) -> bool {
        self.lock().at_limit
    }

    /// Lifts the limit of `owner` (no-op when it no longer holds).
    pub fn lift(&self, owner: u64) {
        let mut st = self.lock();
        if st.owner == owner && st.limit.is_some() {
            st.limit = None;
            st.lease_until = None;
            st.at_limit = false;
            drop(st);
            self.notify();
        }
    }

    /// Lifts every limit and hold (shutdown).
    pub fn lift_all(&self) {
        let mut st = self.lock();
        st.limit = None;
        st.lease_until = None;
        st.at_limit = false;
        st.holds = 0;
        drop(st);
        self.notify();
    }

    /// Holds all applying; returns once no group is being applied, so the applied position
    /// stays where it is until [`Fence::release`].
    pub async fn hold(&self) {
        self.lock().holds += 1;
        self.notify();
        let mut ticks = self.ticks.subscribe();
        loop {
            if !self.lock().applying {
                return;
            }
            if ticks.changed().await.is_err() {
                return;
            }
        }
    }

    /// Ends one [`Fence::hold`].
    pub fn release(&self) {
        let mut st = self.lock();
        st.holds = st.holds.saturating_sub(1);
        drop(st);
        self.notify();
    }

    /// A receiver that ticks on every change of the fence.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.ticks.subscribe()
    }
}
