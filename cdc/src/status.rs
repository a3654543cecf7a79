//! `cdc status`: the reader's position as Postgres and NATS see it, read from both (the
//! reader need not run): the slot (active pid, confirmed and restart LSN, WAL retained behind
//! it), the stream (last sequence, size, age of the last heartbeat), the lag of each durable
//! consumer and the snapshot state of each published table.
//!
//! A side that can't be reached is reported as unavailable with one line saying why; the rest
//! is still shown.

use std::fmt::Write as _;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;
use serde::Serialize;

use crate::config::CdcConfig;
use crate::envelope::Heartbeat;
use crate::lsn::Lsn;
use crate::pgconn::PgTarget;
use crate::snapshot::{Progress, ProgressStore};

/// How long each side gets to answer.
const SIDE_TIMEOUT: Duration = Duration::from_secs(10);

/// What `cdc status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The source database and the slot.
    pub postgres: Side<SlotStatus>,
    /// The stream.
    pub nats: Side<StreamStatus>,
}

/// One side: where it is and what it said, or why it could not be read.
#[derive(Debug, Serialize)]
pub struct Side<T> {
    /// The server, without credentials.
    pub target: String,
    /// What was read.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub status: Option<T>,
    /// Why nothing could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl<T> Side<T> {
    fn from_result(target: String, result: Result<T, String>) -> Side<T> {
        match result {
            Ok(status) => Side {
                target,
                status: Some(status),
                error: None,
            },
            Err(error) => Side {
                target,
                status: None,
                error: Some(error),
            },
        }
    }
}

/// The replication slot.
#[derive(Debug, Serialize)]
pub struct SlotStatus {
    /// Slot name.
    pub slot: String,
    /// False when the slot does not exist (the reader never ran); the other fields are empty.
    pub exists: bool,
    /// A walsender uses it.
    pub active: bool,
    /// PID of that walsender.
    pub active_pid: Option<i32>,
    /// What the reader confirmed (every change before it is in the stream).
    pub confirmed_flush_lsn: Option<Lsn>,
    /// Oldest WAL the slot needs.
    pub restart_lsn: Option<Lsn>,
    /// `pg_current_wal_lsn()`.
    pub server_wal_lsn: Option<Lsn>,
    /// `pg_current_wal_lsn() - restart_lsn`: WAL kept on the server for the slot.
    pub retained_wal_bytes: Option<i64>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`: WAL not yet confirmed.
    pub confirmed_lag_bytes: Option<i64>,
    /// `pg_replication_slots.wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
}

/// The stream.
#[derive(Debug, Serialize)]
pub struct StreamStatus {
    /// Stream name.
    pub stream: String,
    /// False when the stream does not exist (the reader never ran); the other fields are empty.
    pub exists: bool,
    /// Messages held.
    pub messages: u64,
    /// Bytes held.
    pub bytes: u64,
    /// First sequence held.
    pub first_seq: u64,
    /// Last sequence.
    pub last_seq: u64,
    /// The newest heartbeat, if any.
    pub heartbeat: Option<HeartbeatStatus>,
    /// Durable consumers of the stream and their lag.
    pub consumers: Vec<ConsumerStatus>,
    /// Snapshot state of each published table (from `<stream>_SNAPSHOTS`).
    pub snapshots: Vec<SnapshotStatus>,
}

/// The newest message on `<prefix>._heartbeat`.
#[derive(Debug, Serialize)]
pub struct HeartbeatStatus {
    /// Its stream sequence.
    pub seq: u64,
    /// The LSN it vouches for.
    pub lsn: Option<Lsn>,
    /// When the server stored it (RFC 3339).
    pub time: String,
    /// Seconds since then.
    pub age_secs: f64,
}

/// A durable consumer's lag.
#[derive(Debug, Serialize)]
pub struct ConsumerStatus {
    /// Durable name.
    pub name: String,
    /// Messages matching its filter not yet delivered.
    pub num_pending: u64,
    /// Delivered, not yet acknowledged.
    pub num_ack_pending: usize,
    /// Stream sequence of its ack floor (everything at or below is acknowledged).
    pub ack_floor_seq: u64,
    /// Stream sequence last delivered.
    pub delivered_seq: u64,
}

/// A table's snapshot record.
#[derive(Debug, Serialize)]
pub struct SnapshotStatus {
    /// `schema.table`.
    pub table: String,
    /// `none` (never snapshotted), `pending`, `running`, `done` or `failed: …`.
    pub state: String,
    /// Rows published.
    pub rows: u64,
    /// Estimated rows.
    pub estimate: u64,
}

impl Status {
    /// True when both sides could be read.
    pub fn complete(&self) -> bool {
        self.postgres.error.is_none() && self.nats.error.is_none()
    }

    /// Reads both sides (concurrently; each bounded by a timeout).
    pub async fn gather(cfg: &CdcConfig) -> Status {
        let pg_target = PgTarget::parse(&cfg.postgres.url);
        let pg_shown = match &pg_target {
            Ok(t) => t.to_string(),
            Err(_) => "postgres.url".to_string(),
        };
        let nats_shown = crate::publish::redact_url(&cfg.nats.url);
        let pg = async {
            let target = pg_target.map_err(|e| e.to_string())?;
            bounded(slot_status(cfg, &target), "Postgres", &pg_shown).await
        };
        let nats = bounded(stream_status(cfg), "NATS", &nats_shown);
        let (pg, nats) = tokio::join!(pg, nats);
        Status {
            postgres: Side::from_result(pg_shown, pg),
            nats: Side::from_result(nats_shown, nats),
        }
    }

    /// The human-readable table.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let row = |out: &mut String, key: &str, value: &str| {
            let _ = writeln!(out, "  {key:<22}{value}");
        };
        let _ = writeln!(out, "Postgres  {}", self.postgres.target);
        match (&self.postgres.status, &self.postgres.error) {
            (_, Some(e)) => row(&mut out, "unavailable", e),
            (Some(s), None) if !s.exists => {
                row(&mut out, "slot", &format!("{} (missing)", s.slot));
            }
            (Some(s), None) => {
                let state = match (s.active, s.active_pid) {
                    (true, Some(pid)) => format!("active, pid {pid}"),
                    _ => "inactive".to_string(),
                };
                row(&mut out, "slot", &format!("{} ({state})", s.slot));
                row(&mut out, "confirmed_flush_lsn", &opt(s.confirmed_flush_lsn));
                row(&mut out, "restart_lsn", &opt(s.restart_lsn));
                row(&mut out, "server WAL", &opt(s.server_wal_lsn));
                row(
                    &mut out,
                    "WAL retained",
                    &s.retained_wal_bytes.map_or("-".into(), bytes),
                );
                row(
                    &mut out,
                    "not yet confirmed",
                    &s.confirmed_lag_bytes.map_or("-".into(), bytes),
                );
                if let Some(w) = &s.wal_status {
                    row(&mut out, "wal_status", w);
                }
            }
            (None, None) => {}
        }
        let _ = writeln!(out, "NATS      {}", self.nats.target);
        match (&self.nats.status, &self.nats.error) {
            (_, Some(e)) => row(&mut out, "unavailable", e),
            (Some(s), None) if !s.exists => {
                row(&mut out, "stream", &format!("{} (missing)", s.stream));
            }
            (Some(s), None) => {
                row(&mut out, "stream", &s.stream);
                row(&mut out, "last sequence", &s.last_seq.to_string());
                row(
                    &mut out,
                    "messages",
                    &format!(
                        "{} (seq {}..{}), {}",
                        s.messages,
                        s.first_seq,
                        s.last_seq,
                        bytes(i64::try_from(s.bytes).unwrap_or(i64::MAX))
                    ),
                );
                let hb = match &s.heartbeat {
                    None => "none".to_string(),
                    Some(h) => format!(
                        "{:.1} s ago (lsn {}, seq {})",
                        h.age_secs,
                        opt(h.lsn),
                        h.seq
                    ),
                };
                row(&mut out, "last heartbeat", &hb);
                if s.consumers.is_empty() {
                    row(&mut out, "durable consumers", "none");
                } else {
                    row(
                        &mut out,
                        "durable consumers",
                        &format!(
                            "{:<24} {:>12} {:>12} {:>12}",
                            "NAME", "PENDING", "ACK_PENDING", "ACK_FLOOR"
                        ),
                    );
                    for c in &s.consumers {
                        row(
                            &mut out,
                            "",
                            &format!(
                                "{:<24} {:>12} {:>12} {:>12}",
                                c.name, c.num_pending, c.num_ack_pending, c.ack_floor_seq
                            ),
                        );
                    }
                }
                for (i, snap) in s.snapshots.iter().enumerate() {
                    let key = if i == 0 { "snapshots" } else { "" };
                    let detail = if snap.state == "none" {
                        "none".to_string()
                    } else {
                        format!("{}, {} rows of ~{}", snap.state, snap.rows, snap.estimate)
                    };
                    row(&mut out, key, &format!("{}: {detail}", snap.table));
                }
            }
            (None, None) => {}
        }
        out
    }
}

async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, String>>,
    side: &str,
    shown: &str,
) -> Result<T, String> {
    match tokio::time::timeout(SIDE_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "{side} at {shown} did not answer within {SIDE_TIMEOUT:?}"
        )),
    }
}

fn opt(lsn: Option<Lsn>) -> String {
    lsn.map_or("-".into(), |l| l.to_string())
}

/// `12345` → `12.1 KiB (12345 bytes)`.
fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v.abs() >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {} ({n} bytes)", UNITS[unit])
    }
}

async fn slot_status(cfg: &CdcConfig, target: &PgTarget) -> Result<SlotStatus, String> {
    let sql = target.connect_sql().await.map_err(|e| e.to_string())?;
    let slot = &cfg.postgres.slot;
    let row = sql
        .query_opt(
            "SELECT active, active_pid, confirmed_flush_lsn::text, restart_lsn::text, \
                    pg_current_wal_lsn()::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, \
                    wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[slot],
        )
        .await
        .map_err(|e| format!("reading pg_replication_slots on {target}: {e}"))?;
    let lsn = |v: Option<String>| v.and_then(|t| t.parse::<Lsn>().ok());
    Ok(match row {
        None => SlotStatus {
            slot: slot.clone(),
            exists: false,
            active: false,
            active_pid: None,
            confirmed_flush_lsn: None,
            restart_lsn: None,
            server_wal_lsn: None,
            retained_wal_bytes: None,
            confirmed_lag_bytes: None,
            wal_status: None,
        },
        Some(r) => SlotStatus {
            slot: slot.clone(),
            exists: true,
            active: r.get(0),
            active_pid: r.get(1),
            confirmed_flush_lsn: lsn(r.get(2)),
            restart_lsn: lsn(r.get(3)),
            server_wal_lsn: lsn(r.get(4)),
            retained_wal_bytes: r.get(5),
            confirmed_lag_bytes: r.get(6),
            wal_status: r.get(7),
        },
    })
}

/// Connects to NATS for a command-line tool: no retry, a short connect timeout.
pub async fn connect_nats(url: &str) -> Result<async_nats::Client, String> {
    let (options, servers) = crate::nats_url::connect_options(
        async_nats::ConnectOptions::new()
            .name("cdc-cli")
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(10))),
        url,
    );
    options.connect(servers.as_str()).await.map_err(|e| {
        format!(
            "NATS at {} is unreachable: {e}",
            crate::publish::redact_url(url)
        )
    })
}

async fn stream_status(cfg: &CdcConfig) -> Result<StreamStatus, String> {
    let client = connect_nats(&cfg.nats.url).await?;
    let js = jetstream::new(client);
    let name = &cfg.nats.stream;
    let mut stream = match js.get_stream(name).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            return Ok(StreamStatus {
                stream: name.clone(),
                exists: false,
                messages: 0,
                bytes: 0,
                first_seq: 0,
                last_seq: 0,
                heartbeat: None,
                consumers: Vec::new(),
                snapshots: Vec::new(),
            });
        }
        Err(e) => return Err(format!("reading stream {name}: {e}")),
    };
    let state = stream
        .info()
        .await
        .map_err(|e| format!("reading stream {name}: {e}"))?
        .state
        .clone();
    let heartbeat_subject = crate::subject::heartbeat_subject(&cfg.nats.subject_prefix);
    let heartbeat = match stream
        .get_last_raw_message_by_subject(&heartbeat_subject)
        .await
    {
        Ok(msg) => {
            let age = time::OffsetDateTime::now_utc() - msg.time;
            Some(HeartbeatStatus {
                seq: msg.sequence,
                lsn: serde_json::from_slice::<Heartbeat>(&msg.payload)
                    .ok()
                    .map(|h| h.lsn),
                time: msg
                    .time
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                age_secs: age.as_seconds_f64().max(0.0),
            })
        }
        Err(_) => None,
    };
    let mut consumers = Vec::new();
    let mut list = stream.consumers();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| format!("listing consumers of {name}: {e}"))?;
        let Some(durable) = info.config.durable_name.clone() else {
            continue;
        };
        consumers.push(ConsumerStatus {
            name: durable,
            num_pending: info.num_pending,
            num_ack_pending: info.num_ack_pending,
            ack_floor_seq: info.ack_floor.stream_sequence,
            delivered_seq: info.delivered.stream_sequence,
        });
    }
    consumers.sort_by(|a, b| a.name.cmp(&b.name));
    let snapshots = snapshot_states(&js, cfg).await;
    Ok(StreamStatus {
        stream: name.clone(),
        exists: true,
        messages: state.messages,
        bytes: state.bytes,
        first_seq: state.first_sequence,
        last_seq: state.last_sequence,
        heartbeat,
        consumers,
        snapshots,
    })
}

/// Snapshot records of the published tables; empty when the bucket does not exist (read only:
/// `cdc status` creates nothing).
async fn snapshot_states(js: &jetstream::Context, cfg: &CdcConfig) -> Vec<SnapshotStatus> {
    let Ok(kv) = js
        .get_key_value(format!("{}_SNAPSHOTS", cfg.nats.stream))
        .await
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in &cfg.postgres.tables {
        let Some((schema, table)) = crate::subject::split_table_name(t) else {
            continue;
        };
        let progress = kv
            .get(ProgressStore::key(&schema, &table))
            .await
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice::<Progress>(&v).ok());
        out.push(match progress {
            Some(p) => SnapshotStatus {
                table: format!("{schema}.{table}"),
                state: p.state,
                rows: p.rows,
                estimate: p.estimate,
            },
            None => SnapshotStatus {
                table: format!("{schema}.{table}"),
                state: "none".into(),
                rows: 0,
                estimate: 0,
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(12_345), "12.1 KiB (12345 bytes)");
        assert_eq!(bytes(300 * 1024 * 1024), "300.0 MiB (314572800 bytes)");
    }

    #[test]
    fn an_unreachable_side_is_shown_with_its_reason() {
        let status = Status {
            postgres: Side::from_result(
                "cdc@db:5432/x".into(),
                Err("cannot connect to Postgres at cdc@db:5432/x: refused".into()),
            ),
            nats: Side::from_result(
                "nats://h:4222".into(),
                Ok(StreamStatus {
                    stream: "CDC".into(),
                    exists: false,
                    messages: 0,
                    bytes: 0,
                    first_seq: 0,
                    last_seq: 0,
                    heartbeat: None,
                    consumers: Vec::new(),
                    snapshots: Vec::new(),
                }),
            ),
        };
        assert!(!status.complete());
        let text = status.render();
        assert!(
            text.contains("unavailable           cannot connect"),
            "{text}"
        );
        assert!(text.contains("CDC (missing)"), "{text}");
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(json["postgres"]["target"], "cdc@db:5432/x");
        assert!(json["postgres"]["error"].is_string());
        assert_eq!(json["nats"]["exists"], false);
    }
}
