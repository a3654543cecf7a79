//! Keeping sled's memory bounded while it writes faster than it frees: the two queues behind
//! every batch, paced by the thread that applies.
//!
//! A write to sled leaves two things behind that outlive it in memory:
//! - the node it replaced, handed to crossbeam's epoch-based reclamation ([`reclaim`]);
//! - its share of sled's log buffer. sled appends every write to an in-memory buffer of one
//!   segment (512 KiB); a full buffer is sealed, handed to a background thread that writes it to
//!   the file, and a fresh one is allocated at once. Nothing slows the writers down when those
//!   writes lag: on a disk busy with other work, sealed buffers piled up by the dozen while
//!   a 1,000,000-row transaction was staged and copied (21 MB of them at the peak of one run;
//!   the store's peak moved between 82 and 181 MB with the disk's load).
//!
//! [`LogPace::after_batch`] does both after each batch: it frees the replaced nodes, and once
//! [`WAIT_EVERY_WRITES`] writes or [`WAIT_EVERY_BYTES`] bytes have gone into sled since it last
//! waited, it waits for the log to be on disk (`flush`). Measured on that transaction: peaks of
//! 79-81 MB in every run instead of 82-181, at the same speed. While the disk keeps up, the
//! wait finds what sled's own flusher (every 200 ms) already wrote. After every batch of a large
//! transaction ([`LogPace::after_large_tx_batch`]) the memory the applying thread freed goes
//! back to the OS at once rather than after mimalloc's delay: it is freed faster than it is
//! taken again (see [`cdc::memory`]). Ordinary batches take it again at once, so they leave it
//! to mimalloc: returning it after each of their waits for the log cost the apply row 5% (page
//! faults on the memory taken back). The agent's peak in the memory row: 95 and 98 MB leaving
//! it, 95 and 95 MB returning it (two runs each).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Writes (inserts and removes) between two waits for the log.
pub(super) const WAIT_EVERY_WRITES: usize = 8_192;
/// Bytes of keys and values written between two waits for the log (for large rows, which
/// reach it before [`WAIT_EVERY_WRITES`] does).
pub(super) const WAIT_EVERY_BYTES: usize = 4 << 20;

/// The pace of one store's writes (see the module docs).
#[derive(Debug)]
pub(super) struct LogPace {
    db: sled::Db,
    writes: AtomicUsize,
    bytes: AtomicUsize,
}

impl LogPace {
    pub(super) fn new(db: &sled::Db) -> LogPace {
        LogPace {
            db: db.clone(),
            writes: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Call right after a batch of `writes` writes with `bytes` bytes of keys and values was
    /// applied, outside the read gate, on the thread that applied it: frees what it replaced
    /// and waits for sled's log when enough went in since the last wait.
    pub(super) fn after_batch(&self, writes: usize, bytes: usize) -> Result<(), sled::Error> {
        self.pace(writes, bytes, false)
    }

    /// [`LogPace::after_batch`] for a batch that stages or copies a large transaction, which
    /// also returns the memory the thread freed (a few thousand writes' worth each time).
    pub(super) fn after_large_tx_batch(
        &self,
        writes: usize,
        bytes: usize,
    ) -> Result<(), sled::Error> {
        self.pace(writes, bytes, true)
    }

    /// Both of the above: `return_freed` returns the memory this thread freed.
    fn pace(&self, writes: usize, bytes: usize, return_freed: bool) -> Result<(), sled::Error> {
        reclaim(writes);
        let writes = self.writes.fetch_add(writes, Relaxed) + writes;
        let bytes = self.bytes.fetch_add(bytes, Relaxed) + bytes;
        let wait = writes >= WAIT_EVERY_WRITES || bytes >= WAIT_EVERY_BYTES;
        if wait {
            self.writes.store(0, Relaxed);
            self.bytes.store(0, Relaxed);
            self.db.flush()?;
        }
        if return_freed {
            cdc::memory::return_freed_memory();
        }
        Ok(())
    }
}

/// Frees the memory of what sled's last batch of about `writes` writes replaced.
///
/// sled copies a node on every write and hands the old one to crossbeam's epoch-based
/// reclamation, which frees it only after the epoch has advanced twice, and only a few bags
/// (8 × 64 objects) per 128 pins of a thread. `apply_batch` pins once for its whole batch, so
/// a store applying batches of thousands of writes produced garbage far faster than it was
/// collected: a 1,000,000-row fill held 250-1,400 MB (the more so the faster it wrote), and what
/// bounded it was only other threads' reads and sled's flusher. Each flush here advances the
/// epoch when no other thread is pinned in an older one and frees up to 8 bags; one per 64
/// writes leaves room for the node, page and evicted pages each write can retire. Called
/// outside the read gate, right after the batch, on the thread that applied it (its bag of
/// garbage is the one that is pushed).
fn reclaim(writes: usize) {
    for _ in 0..(2 + writes / 64).min(RECLAIM_MAX_FLUSHES) {
        crossbeam_epoch::pin().flush();
    }
}

/// Upper bound of the flushes of one [`reclaim`] (a batch of 65,000 writes).
const RECLAIM_MAX_FLUSHES: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_the_log_once_enough_went_in() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .expect("sled");
        let pace = LogPace::new(&db);
        db.insert(b"k", b"v").expect("insert");
        pace.after_batch(WAIT_EVERY_WRITES - 1, 10).expect("pace");
        assert_eq!(
            pace.writes.load(Relaxed),
            WAIT_EVERY_WRITES - 1,
            "no wait yet"
        );
        pace.after_batch(1, 10).expect("pace");
        assert_eq!(
            pace.writes.load(Relaxed),
            0,
            "waited: the count starts over"
        );
        // Large rows reach the byte bound first.
        pace.after_batch(2, WAIT_EVERY_BYTES).expect("pace");
        assert_eq!(pace.bytes.load(Relaxed), 0);
        assert_eq!(pace.writes.load(Relaxed), 0);
    }
}
