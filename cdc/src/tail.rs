//! `cdc tail`: the stream's events, one readable line each (or the raw envelope), filtered by
//! table and operation, from a sequence, a time or the last N, following live by default.
//!
//! It reads the stream through an ordered consumer (nothing durable is left behind).
//! Heartbeats are skipped. Large events (`Cdc-Large-Ref`) are read from the object store
//! `<stream>_LARGE`, as the agents do.

use std::collections::VecDeque;
use std::io::Write as _;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, object_store::ObjectStore};
use futures::StreamExt as _;
use serde_json::Value;
use tokio::io::AsyncReadExt as _;

use crate::config::CdcConfig;
use crate::envelope::{ChangeEvent, Op, HEADER_LARGE_REF, HEADER_OP, HEADER_TABLE};
use crate::stall::{holds_message, Watchdog};

/// Longest summary of a row on a readable line (characters).
const SUMMARY_CHARS: usize = 160;
/// How often a tail waiting for messages checks that its consumer still delivers.
const TICK: Duration = Duration::from_secs(1);
/// Quiet ticks in a row, while the stream holds messages for the tail, after which its
/// consumer counts as stalled and is re-created from the next sequence (see [`crate::stall`]).
const STALL_TICKS: u32 = 2;
/// Timeout of one JetStream API request made by the stall check.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// Events shown when no start is given (as `tail`).
pub const DEFAULT_LAST: u64 = 10;

/// Where `cdc tail` starts.
#[derive(Clone, Debug, PartialEq)]
pub enum Start {
    /// At this stream sequence.
    Seq(u64),
    /// At the first message stored at or after this time.
    Time(time::OffsetDateTime),
    /// At the N-th last matching event.
    Last(u64),
}

/// What `cdc tail` shows.
#[derive(Clone, Debug)]
pub struct TailOptions {
    /// Only these tables (`schema`, `table`); empty = all.
    pub tables: Vec<(String, String)>,
    /// Only these operations; empty = all.
    pub ops: Vec<Op>,
    /// Where to start.
    pub start: Start,
    /// Print the raw envelope (one JSON object per line) instead of a readable line.
    pub json: bool,
    /// Keep following new events; otherwise stop at the stream's end.
    pub follow: bool,
}

/// Errors of `cdc tail`, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// NATS can't be reached.
    #[error("{0}")]
    Connect(String),
    /// The stream is missing or can't be read.
    #[error("stream {stream}: {message}")]
    Stream {
        /// Stream name.
        stream: String,
        /// What happened.
        message: String,
    },
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
}

/// Parses `--from-time`: RFC 3339 (`2024-01-02T03:04:05Z`) or a duration ago (`90s`, `15m`,
/// `2h`, `1d`).
pub fn parse_time(text: &str) -> Result<time::OffsetDateTime, TailError> {
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Ok(t);
    }
    let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => 0,
    };
    match number.parse::<u64>() {
        Ok(n) if secs > 0 => {
            let ago = Duration::from_secs(n.saturating_mul(secs));
            Ok(time::OffsetDateTime::now_utc() - ago)
        }
        _ => Err(TailError::Usage(format!(
            "--from-time {text:?} is neither RFC 3339 (2024-01-02T03:04:05Z) nor a duration ago (90s, 15m, 2h, 1d)"
        ))),
    }
}

/// Parses `--op c,u,d,t,r`.
pub fn parse_ops(text: &str) -> Result<Vec<Op>, TailError> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|code| {
            Op::from_code(code).ok_or_else(|| {
                TailError::Usage(format!(
                    "--op {code:?} is not an operation: use c, u, d, t, r or e, comma-separated"
                ))
            })
        })
        .collect()
}

/// One message's headers as the filters see them.
struct Seen<'a> {
    subject: &'a str,
    table: Option<&'a str>,
    op: Option<&'a str>,
}

struct Filter {
    heartbeat: String,
    tables: Vec<String>,
    ops: Vec<&'static str>,
}

impl Filter {
    fn new(cfg: &CdcConfig, opts: &TailOptions) -> Filter {
        Filter {
            heartbeat: crate::subject::heartbeat_subject(&cfg.nats.subject_prefix),
            tables: opts
                .tables
                .iter()
                .map(|(s, t)| format!("{s}.{t}"))
                .collect(),
            ops: opts.ops.iter().map(|o| o.code()).collect(),
        }
    }

    fn keeps(&self, m: &Seen<'_>) -> bool {
        if m.subject == self.heartbeat {
            return false;
        }
        if !self.tables.is_empty() && !m.table.is_some_and(|t| self.tables.iter().any(|x| x == t)) {
            return false;
        }
        self.ops.is_empty() || m.op.is_some_and(|o| self.ops.contains(&o))
    }
}

fn seen(msg: &async_nats::Message) -> Seen<'_> {
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    };
    Seen {
        subject: msg.subject.as_str(),
        table: header(HEADER_TABLE),
        op: header(HEADER_OP),
    }
}

/// Runs `cdc tail`, writing to stdout until the stream's end (`follow = false`), `stop`
/// resolves, or stdout is closed.
pub async fn run(
    cfg: &CdcConfig,
    opts: &TailOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), TailError> {
    let client = crate::status::connect_nats(&cfg.nats.url)
        .await
        .map_err(TailError::Connect)?;
    let js = jetstream::new(client);
    let name = cfg.nats.stream.clone();
    let stream_err = |message: String| TailError::Stream {
        stream: name.clone(),
        message,
    };
    let mut stream = js.get_stream(&name).await.map_err(|e| {
        stream_err(format!(
            "{e}: is nats.stream right, and has the reader run?"
        ))
    })?;
    // One table: the server filters. Several: the client filters by the Cdc-Table header
    // (nats-server 2.9 takes one filter subject).
    let filter_subject = match opts.tables.as_slice() {
        [(schema, table)] => crate::subject::table_subject(&cfg.nats.subject_prefix, schema, table),
        _ => String::new(),
    };
    let filter = Filter::new(cfg, opts);
    let start_seq = match &opts.start {
        Start::Seq(seq) => Some((*seq).max(1)),
        Start::Time(_) => None,
        Start::Last(n) => Some(
            start_of_last(&stream, &filter_subject, &filter, *n)
                .await
                .map_err(stream_err)?,
        ),
    };
    let deliver_policy = match (&opts.start, start_seq) {
        (Start::Time(t), _) => consumer::DeliverPolicy::ByStartTime { start_time: *t },
        (_, Some(seq)) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq,
        },
        (_, None) => consumer::DeliverPolicy::New,
    };
    let (mut messages, pending, mut next_seq) =
        open_consumer(&stream, &filter_subject, deliver_policy)
            .await
            .map_err(&stream_err)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if !opts.follow && pending == 0 {
        return Ok(());
    }
    let mut large: Option<ObjectStore> = None;
    let mut watchdog = Watchdog::allowing(STALL_TICKS);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        // Priorities: stop; a message; the stall check.
        let next = tokio::select! {
            biased;
            _ = &mut stop => return Ok(()),
            next = messages.next() => next,
            _ = tick.tick() => {
                if stalled(&mut stream, &filter_subject, &mut watchdog, next_seq).await {
                    eprintln!(
                        "cdc: the consumer delivered nothing for {STALL_TICKS} s although the stream holds more; reading again from sequence {next_seq}"
                    );
                    let policy = consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: next_seq,
                    };
                    (messages, _, _) = open_consumer(&stream, &filter_subject, policy)
                        .await
                        .map_err(&stream_err)?;
                    watchdog.delivered();
                }
                continue;
            }
        };
        let Some(msg) = next else {
            return Ok(());
        };
        let msg = msg.map_err(|e| stream_err(format!("reading: {e}")))?;
        watchdog.delivered();
        let (seq, left) = msg
            .info()
            .map(|i| (i.stream_sequence, i.pending))
            .unwrap_or((0, 1));
        next_seq = next_seq.max(seq + 1);
        if filter.keeps(&seen(&msg)) {
            let body = match msg
                .headers
                .as_ref()
                .and_then(|h| h.get(HEADER_LARGE_REF))
                .map(|v| v.as_str().to_string())
            {
                Some(object) => read_large(&js, &name, &mut large, &object)
                    .await
                    .map_err(|e| format!("large event {object}: {e}")),
                None => Ok(msg.payload.to_vec()),
            };
            let line = match body {
                Ok(body) if opts.json => Ok(String::from_utf8_lossy(&body).into_owned()),
                Ok(body) => serde_json::from_slice::<ChangeEvent>(&body)
                    .map(|ev| readable_line(seq, &ev))
                    .map_err(|e| format!("not an event envelope: {e}")),
                Err(e) => Err(e),
            };
            let written = match line {
                Ok(line) => writeln!(out, "{line}"),
                Err(e) => {
                    let _ = out.flush();
                    eprintln!("cdc: message {seq} skipped: {e}");
                    Ok(())
                }
            };
            // A closed stdout (`cdc tail | head`) ends the tail quietly.
            if written.is_err() {
                return Ok(());
            }
        }
        if left == 0 {
            if out.flush().is_err() {
                return Ok(());
            }
            if !opts.follow {
                return Ok(());
            }
        }
    }
}

/// An ordered consumer of `stream` (filtered by `filter_subject` unless empty) with its
/// messages, the number pending at its start, and the first stream sequence it will deliver.
async fn open_consumer(
    stream: &jetstream::stream::Stream,
    filter_subject: &str,
    deliver_policy: consumer::DeliverPolicy,
) -> Result<(consumer::pull::Ordered, u64, u64), String> {
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter_subject.to_owned(),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("creating a consumer: {e}"))?;
    let info = consumer.cached_info();
    let (pending, first) = (info.num_pending, info.delivered.stream_sequence + 1);
    let messages = consumer
        .messages()
        .await
        .map_err(|e| format!("reading: {e}"))?;
    Ok((messages, pending, first))
}

/// One tick of the stall check: whether the consumer, quiet since the last message, counts as
/// stalled while the stream holds messages at or past `next_seq` for this tail (by the last
/// message of `filter_subject` when it filters). Unanswered requests count as "holds none".
async fn stalled(
    stream: &mut jetstream::stream::Stream,
    filter_subject: &str,
    watchdog: &mut Watchdog,
    next_seq: u64,
) -> bool {
    let (messages, last) = if filter_subject.is_empty() {
        match tokio::time::timeout(API_TIMEOUT, stream.info()).await {
            Ok(Ok(info)) => (info.state.messages, info.state.last_sequence),
            _ => (0, 0),
        }
    } else {
        let last = stream.get_last_raw_message_by_subject(filter_subject);
        match tokio::time::timeout(API_TIMEOUT, last).await {
            Ok(Ok(m)) => (1, m.sequence),
            _ => (0, 0),
        }
    };
    watchdog.quiet_tick(messages, last, next_seq) && holds_message(stream, last, API_TIMEOUT).await
}

async fn read_large(
    js: &jetstream::Context,
    stream: &str,
    store: &mut Option<ObjectStore>,
    object: &str,
) -> Result<Vec<u8>, String> {
    if store.is_none() {
        let bucket = format!("{stream}_LARGE");
        *store = Some(
            js.get_object_store(&bucket)
                .await
                .map_err(|e| format!("opening {bucket}: {e}"))?,
        );
    }
    let Some(store) = store.as_ref() else {
        return Err("no object store".into());
    };
    let mut obj = store.get(object).await.map_err(|e| e.to_string())?;
    let mut body = Vec::new();
    obj.read_to_end(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(body)
}

/// The stream sequence of the `n`-th last message that `filter` keeps (the first sequence
/// when there are fewer). Reads backwards in doubling windows, so a dense filter reads about
/// `n` messages and a sparse one at most the whole stream once.
async fn start_of_last(
    stream: &jetstream::stream::Stream,
    filter_subject: &str,
    filter: &Filter,
    n: u64,
) -> Result<u64, String> {
    let state = stream.get_info().await.map_err(|e| e.to_string())?.state;
    let (first, last) = (state.first_sequence.max(1), state.last_sequence);
    if n == 0 || last < first {
        return Ok(last + 1);
    }
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    // Sequences of the newest matches, oldest first, at most n.
    let mut found: VecDeque<u64> = VecDeque::new();
    let mut hi = last;
    let mut window = (n as u64).saturating_mul(2).max(256);
    loop {
        let lo = hi.saturating_sub(window - 1).max(first);
        let mut in_window = Vec::new();
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter_subject.to_string(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: lo },
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        if consumer.cached_info().num_pending > 0 {
            let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
            while let Some(msg) = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .map_err(|_| "reading the stream stalled".to_string())?
            {
                let msg = msg.map_err(|e| e.to_string())?;
                let Ok(info) = msg.info() else { break };
                let (seq, left) = (info.stream_sequence, info.pending);
                if seq > hi {
                    break;
                }
                if filter.keeps(&seen(&msg)) {
                    in_window.push(seq);
                }
                if left == 0 || seq == hi {
                    break;
                }
            }
        }
        for seq in in_window.into_iter().rev() {
            if found.len() >= n {
                break;
            }
            found.push_front(seq);
        }
        if found.len() >= n {
            return Ok(found.front().copied().unwrap_or(first));
        }
        if lo == first {
            // Fewer than n in the whole stream: all of them.
            return Ok(first);
        }
        hi = lo - 1;
        window = window.saturating_mul(2);
    }
}

/// `#seq  time  op  schema.table  row summary  lsn=…`.
pub fn readable_line(seq: u64, ev: &ChangeEvent) -> String {
    // Fixed width (milliseconds always shown), so the columns line up.
    let time =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ev.source.ts_ms) * 1_000_000)
            .map(|t| {
                format!(
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second(),
                    t.millisecond()
                )
            })
            .unwrap_or_else(|_| ev.source.ts_ms.to_string());
    let summary = match ev.op {
        Op::Create | Op::Read => row_summary(ev.after.as_ref()),
        Op::Update => {
            let mut s = row_summary(ev.after.as_ref());
            // A key change shows where the row came from.
            if let (Some(before), Some(after)) = (&ev.before, &ev.after) {
                if before
                    .iter()
                    .any(|(k, v)| after.get(k).is_some_and(|a| a != v))
                {
                    s = format!("{s} (was {})", row_summary(Some(before)));
                }
            }
            s
        }
        Op::Delete => row_summary(ev.before.as_ref()),
        Op::Truncate => "(table truncated)".to_string(),
        Op::SnapshotEnd => "(end of the table's snapshot)".to_string(),
    };
    let toast = if ev.unchanged_toast.is_empty() {
        String::new()
    } else {
        format!(" [unchanged: {}]", ev.unchanged_toast.join(","))
    };
    format!(
        "#{seq}  {time}  {}  {}.{}  {summary}{toast}  lsn={}",
        ev.op.code(),
        ev.source.schema,
        ev.source.table,
        ev.source.commit_lsn
    )
}

/// `k=v k=v …`, values as JSON, cut at [`SUMMARY_CHARS`].
fn row_summary(row: Option<&serde_json::Map<String, Value>>) -> String {
    let Some(row) = row else {
        return "-".to_string();
    };
    let mut s = String::new();
    for (k, v) in row {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(k);
        s.push('=');
        match v {
            Value::String(text) => s.push_str(&serde_json::to_string(text).unwrap_or_default()),
            other => s.push_str(&other.to_string()),
        }
        if s.chars().count() > SUMMARY_CHARS {
            break;
        }
    }
    if s.chars().count() > SUMMARY_CHARS {
        s = s.chars().take(SUMMARY_CHARS).collect::<String>() + "…";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private NATS server with stream `T` (`t.>`) holding one message per subject given.
    async fn stream_holding(
        subjects: &[&'static str],
    ) -> anyhow::Result<(testkit::Nats, jetstream::stream::Stream)> {
        let nats = testkit::Nats::start().await?;
        let js = jetstream::new(async_nats::connect(nats.url()).await?);
        let stream = js
            .create_stream(jetstream::stream::Config {
                name: "T".into(),
                subjects: vec!["t.>".into()],
                ..Default::default()
            })
            .await?;
        for &subject in subjects {
            js.publish(subject, "{}".into()).await?.await?;
        }
        Ok((nats, stream))
    }

    /// The stall check against a real stream: the quiet ticks it allows, then a stall while
    /// the stream holds messages past the next expected one; never for a caught-up tail, nor
    /// for a filtered one whose subject has nothing past it (other subjects may).
    #[tokio::test]
    async fn the_stall_check_counts_only_messages_this_tail_would_get() -> anyhow::Result<()> {
        let (_nats, mut stream) = stream_holding(&["t.a", "t.a", "t.b"]).await?;
        // Unfiltered, expecting 2 of 1..=3: quiet ticks, then a stall.
        let mut w = Watchdog::allowing(STALL_TICKS);
        for _ in 0..STALL_TICKS {
            assert!(!stalled(&mut stream, "", &mut w, 2).await);
        }
        assert!(stalled(&mut stream, "", &mut w, 2).await);
        // Caught up.
        let mut w = Watchdog::allowing(STALL_TICKS);
        for _ in 0..=STALL_TICKS {
            assert!(!stalled(&mut stream, "", &mut w, 4).await);
        }
        // Filtered by t.a, whose last message is 2: expecting 3, nothing is owed (3 is t.b's).
        let mut w = Watchdog::allowing(STALL_TICKS);
        for _ in 0..=STALL_TICKS {
            assert!(!stalled(&mut stream, "t.a", &mut w, 3).await);
        }
        // Expecting 2 of t.a: owed.
        for _ in 0..STALL_TICKS {
            assert!(!stalled(&mut stream, "t.a", &mut w, 2).await);
        }
        assert!(stalled(&mut stream, "t.a", &mut w, 2).await);
        // A subject without messages owes nothing.
        let mut w = Watchdog::allowing(STALL_TICKS);
        for _ in 0..=STALL_TICKS {
            assert!(!stalled(&mut stream, "t.none", &mut w, 1).await);
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_new_consumer_reports_the_first_sequence_it_delivers() -> anyhow::Result<()> {
        let (_nats, stream) = stream_holding(&["t.a", "t.b", "t.a"]).await?;
        let from = |s| consumer::DeliverPolicy::ByStartSequence { start_sequence: s };
        let (_, pending, first) = open_consumer(&stream, "", from(2))
            .await
            .map_err(anyhow::Error::msg)?;
        assert_eq!((pending, first), (2, 2));
        let (_, pending, first) = open_consumer(&stream, "t.a", from(1))
            .await
            .map_err(anyhow::Error::msg)?;
        assert_eq!((pending, first), (2, 1));
        let (_, pending, first) = open_consumer(&stream, "", consumer::DeliverPolicy::New)
            .await
            .map_err(anyhow::Error::msg)?;
        assert_eq!((pending, first), (0, 4));
        Ok(())
    }

    fn event(json: &str) -> ChangeEvent {
        serde_json::from_str(json).expect("event")
    }

    #[test]
    fn lines_read_well() {
        let ev = event(
            r#"{"op":"u","before":{"id":1},"after":{"id":2,"name":"Acme"},"unchanged_toast":["doc"],
            "source":{"db":"d","schema":"public","table":"t","lsn":"0/10","commit_lsn":"0/20","txId":5,"ts_ms":1704164645120,"snapshot":false},
            "transaction":null,"ts_ms":0}"#,
        );
        assert_eq!(
            readable_line(7, &ev),
            "#7  2024-01-02T03:04:05.120Z  u  public.t  id=2 name=\"Acme\" (was id=1) [unchanged: doc]  lsn=0/20"
        );
    }

    #[test]
    fn long_rows_are_cut() {
        let mut row = serde_json::Map::new();
        row.insert("pad".into(), Value::String("x".repeat(1000)));
        let s = row_summary(Some(&row));
        assert_eq!(s.chars().count(), SUMMARY_CHARS + 1);
        assert!(s.ends_with('…'));
    }

    #[test]
    fn arguments_parse_or_say_what_is_accepted() {
        assert_eq!(
            parse_ops("c, u,d").expect("ops"),
            vec![Op::Create, Op::Update, Op::Delete]
        );
        assert!(parse_ops("x")
            .expect_err("bad")
            .to_string()
            .contains("use c, u, d"));
        let t = parse_time("2024-01-02T03:04:05Z").expect("rfc3339");
        assert_eq!(t.unix_timestamp(), 1_704_164_645);
        let ago = parse_time("15m").expect("ago");
        let d = time::OffsetDateTime::now_utc() - ago;
        assert!((899..=901).contains(&d.whole_seconds()), "{d}");
        assert!(parse_time("yesterday").is_err());
    }
}
