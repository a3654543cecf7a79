//! Noticing an ordered consumer that stopped delivering while the stream holds messages for it.
//!
//! The benchmark's apply row paused for exactly 60 s twice in about forty runs on a busy
//! two-core machine: what async-nats' ordered consumer waits, when nothing arrives, before it
//! re-creates itself (two missed-heartbeat timeouts of 30 s). The likely cause: its pull
//! consumer counts the messages it asked for and asks again only when fewer than half of a
//! batch remain outstanding, and under load that count can run ahead of what the server
//! still owes; the server, its requests fulfilled, then sends nothing, not even heartbeats.
//!
//! A reader of the stream counts its ticks without a delivered message while the stream holds
//! a message at or past the next one it expects, and after the ticks its [`Watchdog`] allows
//! starts a new consumer from there: a stall costs seconds instead of a minute, and nothing is
//! read twice or skipped. The agent's follow loop (its status ticks), `view-agent replay` (its
//! idle waits) and `cdc tail` (its ticks) do this. The follow loop reads with [`crate::pull`],
//! which takes its pull requests' accounting from the server's own statuses (a request that
//! expires or ends at its byte limit says how many messages it still owed) and ends on three
//! missed heartbeats; the watchdog stays as the second line.

use std::time::Duration;

use async_nats::jetstream;

/// Counts quiet ticks of one consumer (see the module docs).
#[derive(Debug)]
pub struct Watchdog {
    quiet_ticks: u32,
    /// Quiet ticks allowed; the next one is a stall.
    allowed: u32,
}

impl Watchdog {
    /// A watchdog that allows `ticks` quiet ticks in a row.
    pub fn allowing(ticks: u32) -> Self {
        Watchdog {
            quiet_ticks: 0,
            allowed: ticks,
        }
    }

    /// A message arrived.
    pub fn delivered(&mut self) {
        self.quiet_ticks = 0;
    }

    /// A tick without a message: the stream holds `messages` up to `last_seq`; `expected` is
    /// the next sequence the consumer owes. True when the consumer counts as stalled.
    pub fn quiet_tick(&mut self, messages: u64, last_seq: u64, expected: u64) -> bool {
        let holds_more = messages > 0 && last_seq >= expected;
        if !holds_more {
            self.quiet_ticks = 0;
            return false;
        }
        self.quiet_ticks += 1;
        self.quiet_ticks > self.allowed
    }
}

/// Whether `stream` still holds its message `seq` (a stream whose last message was deleted
/// has nothing left to deliver; a probe unanswered within `timeout` counts as "no").
pub async fn holds_message(
    stream: &jetstream::stream::Stream,
    seq: u64,
    timeout: Duration,
) -> bool {
    matches!(
        tokio::time::timeout(timeout, stream.get_raw_message(seq)).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::Watchdog;

    const TICKS: u32 = 2;

    #[test]
    fn a_consumer_is_stalled_after_quiet_ticks_while_the_stream_holds_more() {
        let mut w = Watchdog::allowing(TICKS);
        // The stream holds 1..=10; the reader wants 5.
        for _ in 0..TICKS {
            assert!(!w.quiet_tick(10, 10, 5));
        }
        assert!(w.quiet_tick(10, 10, 5));
    }

    #[test]
    fn a_delivered_message_or_a_caught_up_reader_resets_the_count() {
        let mut w = Watchdog::allowing(TICKS);
        for _ in 0..TICKS {
            assert!(!w.quiet_tick(10, 10, 5));
        }
        w.delivered();
        for _ in 0..TICKS {
            assert!(!w.quiet_tick(10, 10, 6));
        }
        // Caught up (wants 11 of a stream ending at 10): never stalled, and the count restarts.
        assert!(!w.quiet_tick(10, 10, 11));
        for _ in 0..TICKS {
            assert!(!w.quiet_tick(11, 11, 11));
        }
        assert!(w.quiet_tick(11, 11, 11));
    }

    #[test]
    fn an_empty_stream_never_stalls() {
        let mut w = Watchdog::allowing(TICKS);
        for _ in 0..10 {
            // Purged: first = last + 1, no messages.
            assert!(!w.quiet_tick(0, 10, 5));
        }
    }
}
