//! Large source transactions: applied in parts with bounded memory, made visible at once.
//!
//! A transaction of more than `apply.max_tx_events_in_memory` events is never held in memory
//! whole. The follow loop hands it to the applier in parts. Each part is applied against the
//! views as the earlier parts left them (reads go through the staging tree first) and its
//! writes land in the sled tree `staging` — key: the views' key; value: [`PUT`] + the new
//! value, or [`DEL`] — where no query looks.
//!
//! The last part goes into staging in one batch together with the transaction's metadata
//! (applied sequence and LSN, key kinds, stale reasons, as entries for the views' meta keys)
//! and the [`MARKER`]. From that batch on, the transaction is durable as a whole. The store
//! flushes, then makes it visible at once: under the exclusive read gate it turns the overlay
//! on (queries read the views with staging laid over them, [`rows`]) and publishes the new
//! progress. It then moves staging into the views in bounded batches while queries go on:
//! each batch is written into the views, then its keys leave staging, so views + staging is
//! the new state throughout (staging holds final values) and the store never holds the
//! transaction twice ([`Moves`] covers queries that race a move). Then it turns the overlay
//! off under the gate, flushes and removes the marker.
//!
//! # Crash safety
//! - Staging without the marker holds an incomplete transaction that the stream still holds in
//!   full after the applied sequence: it is discarded on open, and when a new session starts
//!   the transaction over (its first part says so).
//! - Staging with the marker is moved on open, before anything is served: what a crash left
//!   in it (keys leave staging only after the views hold them) is copied again, which is
//!   idempotent because staging holds final values, and no later transaction was applied (the
//!   applier finishes one commit before it starts the next).
//!
//! The flush between the marker and the copy keeps a crash from leaving copied rows without a
//! durable marker; the flush after the copy keeps the marker's removal from outliving rows that
//! were not yet durable. Within the copy no flush is needed: sled recovers a prefix of its one
//! log, so the removal of keys from staging is never durable without the views' batch written
//! before it.

use std::cmp::Ordering;
use std::iter::Peekable;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Release, SeqCst};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use cdc::envelope::ChangeEvent;
use cdc::Lsn;

use super::pace::LogPace;
use super::{Pending, PendingError, Scratch, StoreError, ViewStore};

/// The sled tree holding staged writes.
pub(super) const TREE: &str = "staging";
/// Present (in the staging tree) once staging holds a whole transaction. Sorts after every
/// view key (`k…`, `p…`, `m…`).
const MARKER: &[u8] = b"\xffstaged";
/// Tag of a staged write.
const PUT: u8 = 1;
/// Tag of a staged delete.
const DEL: u8 = 0;
/// Entries per sled batch when staging is copied into the views.
const COPY_CHUNK: usize = 1_000;

/// Decodes a staged entry: `Some(value)` for a write, `None` for a delete.
pub(super) fn decode(entry: &[u8]) -> Result<Option<&[u8]>, PendingError> {
    match entry.split_first() {
        Some((&PUT, value)) => Ok(Some(value)),
        Some((&DEL, [])) => Ok(None),
        _ => Err(PendingError::Corrupt(format!(
            "staged entry of {} bytes with tag {:?}; delete the agent's data_dir and replay the stream",
            entry.len(),
            entry.first()
        ))),
    }
}

fn encode(value: Option<&[u8]>) -> Vec<u8> {
    match value {
        Some(v) => {
            let mut e = Vec::with_capacity(v.len() + 1);
            e.push(PUT);
            e.extend_from_slice(v);
            e
        }
        None => vec![DEL],
    }
}

/// A large source transaction being applied in parts: what its staged parts changed beyond
/// the rows (kept in memory; small).
#[derive(Debug, Default)]
pub struct StagedTx {
    events: usize,
    max_lsn: Lsn,
    last_ts: Option<i64>,
    /// Key kinds new to a view: (view index, key column, kind bit).
    kinds: Vec<(usize, usize, u8)>,
    new_stale: Vec<(usize, Option<String>)>,
}

impl StagedTx {
    /// Events staged so far.
    pub fn events(&self) -> usize {
        self.events
    }
}

/// The values under `prefix` in key order: `tree`'s, with `staged` (if any) laid over them —
/// a staged write replaces the tree's value of its key, a staged delete hides it.
pub(super) fn rows(tree: &sled::Tree, staged: Option<&sled::Tree>, prefix: &[u8]) -> Overlaid {
    Overlaid {
        main: tree.scan_prefix(prefix).peekable(),
        staged: staged.map(|s| s.scan_prefix(prefix).peekable()),
    }
}

/// See [`rows`].
pub(super) struct Overlaid {
    main: Peekable<sled::Iter>,
    staged: Option<Peekable<sled::Iter>>,
}

/// Which side [`Overlaid`] takes next.
enum Next {
    Main,
    Staged { shadows_main: bool },
    Done,
}

fn value_of(item: sled::Result<(sled::IVec, sled::IVec)>) -> Result<sled::IVec, PendingError> {
    item.map(|(_, v)| v).map_err(PendingError::from)
}

impl Iterator for Overlaid {
    type Item = Result<sled::IVec, PendingError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let Some(staged) = self.staged.as_mut() else {
                return self.main.next().map(value_of);
            };
            // An error on either side is returned as it comes up.
            let next = match (self.main.peek(), staged.peek()) {
                (None, None) => Next::Done,
                (Some(Err(_)), _) | (Some(Ok(_)), None) => Next::Main,
                (_, Some(Err(_))) | (None, Some(Ok(_))) => Next::Staged {
                    shadows_main: false,
                },
                (Some(Ok((a, _))), Some(Ok((b, _)))) => match a.cmp(b) {
                    Ordering::Less => Next::Main,
                    Ordering::Equal => Next::Staged { shadows_main: true },
                    Ordering::Greater => Next::Staged {
                        shadows_main: false,
                    },
                },
            };
            match next {
                Next::Done => return None,
                Next::Main => return self.main.next().map(value_of),
                Next::Staged { shadows_main } => {
                    if shadows_main {
                        self.main.next();
                    }
                    let entry = match staged.next().map(value_of)? {
                        Ok(entry) => entry,
                        Err(e) => return Some(Err(e)),
                    };
                    match decode(&entry) {
                        Ok(Some(_)) => return Some(Ok(entry.subslice(1, entry.len() - 1))),
                        // Deleted by the transaction.
                        Ok(None) => continue,
                        Err(e) => return Some(Err(e)),
                    }
                }
            }
        }
    }
}

/// What a marked (complete) staged transaction makes visible beyond its rows.
struct MarkedTx {
    new_seq: u64,
    max_lsn: Lsn,
    new_kinds: Vec<(usize, Vec<u8>)>,
    watermark: Lsn,
}

/// Moves every staged entry into `tree` in batches of [`COPY_CHUNK`]; returns how many, and
/// the longest one move of keys out of staging took (what a query that raced it waited).
///
/// Each batch goes into the views first, then the same keys leave staging, so staging shrinks
/// while the views grow: the store never holds the transaction twice (sled's resident memory
/// grows with the entries it holds, not only with its page cache). Views + staging stays the
/// new state at every point: a key is in staging until the views hold its final value, and a
/// crash between the two batches leaves keys that the next open moves again (idempotent).
///
/// `moves`: when queries are being answered through the overlay (see [`Moves`]).
fn copy(
    staging: &sled::Tree,
    tree: &sled::Tree,
    pace: &LogPace,
    moves: Option<&Moves>,
) -> Result<(usize, Duration), PendingError> {
    let mut chunk = Chunk::default();
    let (mut copied, mut longest_move) = (0, Duration::ZERO);
    for item in staging.range(..MARKER) {
        let (k, entry) = item?;
        // Written twice: into the views, out of staging.
        chunk.bytes += 2 * k.len() + entry.len();
        match decode(&entry)? {
            Some(v) => chunk.into_views.insert(k.clone(), v),
            None => chunk.into_views.remove(k.clone()),
        }
        chunk.out_of_staging.remove(k);
        chunk.len += 1;
        copied += 1;
        if chunk.len == COPY_CHUNK {
            let waited = std::mem::take(&mut chunk).apply(staging, tree, pace, moves)?;
            longest_move = longest_move.max(waited);
        }
    }
    longest_move = longest_move.max(chunk.apply(staging, tree, pace, moves)?);
    Ok((copied, longest_move))
}

/// Moves of staged keys into the views, as seen by queries reading through the overlay.
///
/// A query merges a scan of the views with a scan of staging. If a key's value reached the
/// views after the query's scan of the views passed it, and left staging before its scan of
/// staging got there, the query would miss the new value. Every move (removal of a batch of
/// keys from staging, after the views hold them) is counted when it starts, so a query that
/// saw the count change while it read may have raced one: it reads again with moves held off.
/// Queries that raced nothing (nearly all: a move starts every few milliseconds, a query
/// takes microseconds) never wait.
#[derive(Debug, Default)]
pub(super) struct Moves {
    started: AtomicU64,
    lock: RwLock<()>,
}

impl Moves {
    /// How many moves have started.
    pub(super) fn started(&self) -> u64 {
        self.started.load(SeqCst)
    }

    /// No move starts while this is held.
    pub(super) fn hold_off(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Held while a move runs.
    fn begin(&self) -> RwLockWriteGuard<'_, ()> {
        let held = self.lock.write().unwrap_or_else(PoisonError::into_inner);
        self.started.fetch_add(1, SeqCst);
        held
    }
}

/// One batch of [`copy`].
#[derive(Default)]
struct Chunk {
    into_views: sled::Batch,
    out_of_staging: sled::Batch,
    len: usize,
    bytes: usize,
}

impl Chunk {
    fn apply(
        self,
        staging: &sled::Tree,
        tree: &sled::Tree,
        pace: &LogPace,
        moves: Option<&Moves>,
    ) -> Result<Duration, PendingError> {
        tree.apply_batch(self.into_views)?;
        let held = {
            let _move = moves.map(Moves::begin);
            let held = Instant::now();
            staging.apply_batch(self.out_of_staging)?;
            held.elapsed()
        };
        pace.after_large_tx_batch(2 * self.len, self.bytes)?;
        Ok(held)
    }
}

/// Ends staging after a copy: the copy durable first, then the marker gone, then the rest.
fn finish(db: &sled::Db, staging: &sled::Tree) -> Result<(), PendingError> {
    db.flush()?;
    staging.remove(MARKER)?;
    staging.clear()?;
    Ok(())
}

/// On open: finishes a transaction whose staging was complete, discards an incomplete one.
pub(super) fn recover(
    db: &sled::Db,
    tree: &sled::Tree,
    staging: &sled::Tree,
    pace: &LogPace,
) -> Result<(), PendingError> {
    if staging.contains_key(MARKER)? {
        let (copied, _) = copy(staging, tree, pace, None)?;
        tracing::info!(
            entries = copied,
            "finished making a large transaction visible (interrupted by a crash)"
        );
        finish(db, staging)
    } else if !staging.is_empty() {
        tracing::info!(
            "discarding the staged parts of an incomplete large transaction (the stream holds it)"
        );
        staging.clear()?;
        Ok(())
    } else {
        Ok(())
    }
}

impl ViewStore {
    /// Discards what is staged (a large transaction that will be read again from its start).
    pub fn discard_staged(&self) -> Result<(), StoreError> {
        self.staging.clear().map_err(|e| self.sled_err(e))
    }

    /// Applies `events`, a part of a large transaction, into staging: invisible to queries
    /// until [`ViewStore::commit_staged`].
    pub fn stage(&self, staged: &mut StagedTx, events: &[ChangeEvent]) -> Result<(), StoreError> {
        let (batch, writes, bytes) = self.stage_part(staged, events)?;
        self.staging
            .apply_batch(batch)
            .map_err(|e| self.sled_err(e))?;
        self.pace
            .after_large_tx_batch(writes, bytes)
            .map_err(|e| self.sled_err(e))
    }

    /// Applies the last part of a large transaction (`last_seq`: its last stream sequence)
    /// and makes the whole transaction visible at once (see the module docs).
    pub fn commit_staged(
        &self,
        mut staged: StagedTx,
        events: &[ChangeEvent],
        last_seq: u64,
    ) -> Result<(), StoreError> {
        let (mut batch, _, _) = self.stage_part(&mut staged, events)?;
        self.fence.admit_commit(staged.max_lsn);
        let started = std::time::Instant::now();
        let result = self.commit_admitted(&mut batch, &staged, last_seq);
        self.fence.done();
        result?;
        self.record_applied(started, staged.events, staged.last_ts);
        Ok(())
    }

    fn stage_part(
        &self,
        staged: &mut StagedTx,
        events: &[ChangeEvent],
    ) -> Result<(sled::Batch, usize, usize), StoreError> {
        let mut pending = Pending {
            staged: Some(&self.staging),
            // Kinds already seen by earlier parts are not recorded again.
            kinds: std::mem::take(&mut staged.kinds),
            ..Pending::over(&self.tree)
        };
        let mut scratch = Scratch::default();
        for ev in events {
            staged.max_lsn = staged.max_lsn.max(ev.source.commit_lsn);
            self.apply_event(&mut pending, ev, &mut staged.new_stale, &mut scratch)
                .map_err(|e| self.pending_err(e))?;
        }
        staged.events += events.len();
        if let Some(ev) = events.last() {
            staged.last_ts = Some(ev.source.ts_ms);
        }
        staged.kinds = pending.kinds;
        let (writes, mut bytes) = (pending.writes.len(), 0);
        let mut batch = sled::Batch::default();
        for (k, v) in pending.writes {
            bytes += k.len() + v.as_ref().map_or(0, Vec::len);
            batch.insert(k, encode(v.as_deref()));
        }
        Ok((batch, writes, bytes))
    }

    /// Writes the last part with the transaction's metadata and the marker, durably: from
    /// here on the transaction is complete in staging. Returns the new (seq, LSN, kinds).
    fn mark_complete(
        &self,
        batch: &mut sled::Batch,
        staged: &StagedTx,
        last_seq: u64,
    ) -> Result<MarkedTx, StoreError> {
        let before = self.progress();
        let new_seq = last_seq.max(before.applied_seq);
        let max_lsn = staged.max_lsn.max(before.applied_lsn);
        let new_kinds = self.merge_kinds(&staged.kinds);
        for (k, v) in self.meta_writes(new_seq, Some(max_lsn), &new_kinds, &staged.new_stale) {
            batch.insert(k, encode(v.as_deref()));
        }
        batch.insert(MARKER, &[]);
        let sled_err = |e: sled::Error| self.sled_err(e);
        self.staging
            .apply_batch(std::mem::take(batch))
            .map_err(sled_err)?;
        // No pacing here: the flush below waits for the log, and the copy that follows frees
        // what was replaced after every chunk, with room to spare for this last part.
        self.db.flush().map_err(sled_err)?;
        Ok(MarkedTx {
            new_seq,
            max_lsn,
            new_kinds,
            watermark: before.watermark.max(max_lsn),
        })
    }

    /// Test hook: the last part staged and marked, the copy not begun (a crash right there).
    #[cfg(test)]
    pub(super) fn stage_marked(
        &self,
        mut staged: StagedTx,
        events: &[ChangeEvent],
        last_seq: u64,
    ) -> Result<(), StoreError> {
        let (mut batch, _, _) = self.stage_part(&mut staged, events)?;
        self.mark_complete(&mut batch, &staged, last_seq).map(drop)
    }

    fn commit_admitted(
        &self,
        batch: &mut sled::Batch,
        staged: &StagedTx,
        last_seq: u64,
    ) -> Result<(), StoreError> {
        let marked = self.mark_complete(batch, staged, last_seq)?;
        self.show_staged(marked, staged);
        self.copy_in(staged.events)
    }

    /// Makes the marked transaction visible at once: the overlay on and the new progress
    /// published, under the exclusive gate (queries wait only for this).
    fn show_staged(&self, marked: MarkedTx, staged: &StagedTx) {
        let _gate = self
            .read_gate
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        self.overlay.store(true, Release);
        // The views changed wholesale.
        self.cache.clear();
        self.publish_applied(
            marked.new_kinds,
            staged.new_stale.clone(),
            marked.new_seq,
            marked.max_lsn,
            marked.watermark,
        );
        tracing::info!(
            events = staged.events,
            queries_waited = ?started.elapsed(),
            "large transaction visible"
        );
    }

    /// Copies staging into the views while queries read through the overlay, then turns the
    /// overlay off and clears staging. A failed copy leaves the overlay on (the state readers
    /// see stays whole) and is finished on the next open.
    fn copy_in(&self, events: usize) -> Result<(), StoreError> {
        let started = Instant::now();
        let (copied, longest_move) = copy(&self.staging, &self.tree, &self.pace, Some(&self.moves))
            .map_err(|e| self.pending_err(e))?;
        {
            let _gate = self
                .read_gate
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            // Cached entries filled meanwhile hold the new rows: still right.
            self.overlay.store(false, Release);
        }
        finish(&self.db, &self.staging).map_err(|e| self.pending_err(e))?;
        tracing::info!(
            events,
            entries = copied,
            copy = ?started.elapsed(),
            longest_move = ?longest_move,
            "large transaction copied into the views"
        );
        Ok(())
    }

    /// Test hook: the last part staged, marked and made visible, the copy not begun.
    #[cfg(test)]
    pub(super) fn stage_visible(
        &self,
        mut staged: StagedTx,
        events: &[ChangeEvent],
        last_seq: u64,
    ) -> Result<(), StoreError> {
        let (mut batch, _, _) = self.stage_part(&mut staged, events)?;
        let marked = self.mark_complete(&mut batch, &staged, last_seq)?;
        self.show_staged(marked, &staged);
        Ok(())
    }

    /// Test hook: the copy of a transaction made visible by [`ViewStore::stage_visible`].
    #[cfg(test)]
    pub(super) fn finish_visible(&self) -> Result<(), StoreError> {
        self.copy_in(0)
    }

    /// Test hook: whether readers see the views through staging.
    #[cfg(test)]
    pub(super) fn overlaid(&self) -> bool {
        self.overlay.load(std::sync::atomic::Ordering::Acquire)
    }
}
