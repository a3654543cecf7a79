//! The reader's configuration file (`cdc.toml`), with defaults, environment overrides and
//! validation. Every key is documented in the README's configuration reference.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Default JetStream stream name.
pub const DEFAULT_STREAM: &str = "CDC";
/// Default subject prefix: events go to `<prefix>.<schema>.<table>`.
pub const DEFAULT_SUBJECT_PREFIX: &str = "cdc";
/// Default number of publishes awaiting their PubAck at once.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4096;
/// Default stream de-duplication window, seconds.
pub const DEFAULT_DUPLICATE_WINDOW_SECS: u64 = 120;
/// Default heartbeat interval when idle, milliseconds.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 1000;
/// Default minimum spacing of heartbeats while the safe LSN moves, milliseconds.
pub const DEFAULT_HEARTBEAT_MIN_INTERVAL_MS: u64 = 10;
/// Default interval of standby status updates to Postgres, milliseconds.
pub const DEFAULT_STATUS_INTERVAL_MS: u64 = 1000;
/// Default interval of `pg_logical_emit_message` on an idle database, seconds.
pub const DEFAULT_IDLE_MESSAGE_INTERVAL_SECS: u64 = 10;
/// Default PubAck timeout, milliseconds.
pub const DEFAULT_ACK_TIMEOUT_MS: u64 = 10_000;
/// Environment variable that overrides `postgres.url`.
pub const ENV_POSTGRES_URL: &str = "CDC_POSTGRES_URL";
/// Environment variable that overrides `nats.url`.
pub const ENV_NATS_URL: &str = "CDC_NATS_URL";

/// Why a configuration can't be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, …).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The path given.
        path: String,
        /// What serde/toml said, which names the key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole `cdc.toml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdcConfig {
    /// The source database.
    pub postgres: PostgresConfig,
    /// The JetStream destination.
    pub nats: NatsConfig,
    /// Timing of heartbeats and status updates.
    #[serde(default)]
    pub reader: ReaderTuning,
    /// Snapshots of existing rows.
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`: the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to listen on; empty (the default) = no endpoint.
    #[serde(default)]
    pub listen: String,
}

/// `[snapshot]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Snapshot every published table that has no snapshot record yet (first start, tables
    /// added later).
    #[serde(default = "default_true")]
    pub initial: bool,
    /// Rows per chunk (one short read between two watermarks).
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            initial: true,
            chunk_rows: crate::snapshot::DEFAULT_CHUNK_ROWS,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_chunk_rows() -> usize {
    crate::snapshot::DEFAULT_CHUNK_ROWS
}

/// `[postgres]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq-style URL; `sslmode` (disable, prefer, require, verify-ca, verify-full) and
    /// `sslrootcert` are honoured. Overridden by `CDC_POSTGRES_URL`.
    #[serde(default)]
    pub url: String,
    /// Logical replication slot name (created if missing).
    pub slot: String,
    /// Publication name (created if missing, with `publish_via_partition_root = true`).
    pub publication: String,
    /// Published tables as `schema.table`.
    pub tables: Vec<String>,
}

/// `[nats]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. Overridden by `CDC_NATS_URL`.
    #[serde(default)]
    pub url: String,
    /// Stream name.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Subject prefix.
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
    /// Stream replicas (1 on a single server, 3 on a cluster).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Stream retention by age in seconds; 0 = unlimited.
    #[serde(default)]
    pub max_age_secs: u64,
    /// Stream retention by size in bytes; -1 = unlimited.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: i64,
    /// Stream retention by message count; -1 = unlimited.
    #[serde(default = "default_max_bytes")]
    pub max_msgs: i64,
    /// De-duplication window of the stream, seconds.
    #[serde(default = "default_duplicate_window")]
    pub duplicate_window_secs: u64,
    /// Publishes awaiting their PubAck at once (the publish window).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// How long to wait for a PubAck before treating the publish as failed, milliseconds.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
}

/// `[reader]`: timings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReaderTuning {
    /// A heartbeat at least this often, ms.
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval_ms: u64,
    /// At most one heartbeat per this many ms while the safe LSN moves.
    #[serde(default = "default_heartbeat_min_interval")]
    pub heartbeat_min_interval_ms: u64,
    /// Standby status updates to Postgres this often, ms.
    #[serde(default = "default_status_interval")]
    pub status_interval_ms: u64,
    /// On an idle database, write a `pg_logical_emit_message` this often (s; 0 = never) so the
    /// slot can advance past WAL written by other databases.
    #[serde(default = "default_idle_message_interval")]
    pub idle_message_interval_secs: u64,
}

impl Default for ReaderTuning {
    fn default() -> Self {
        ReaderTuning {
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            heartbeat_min_interval_ms: DEFAULT_HEARTBEAT_MIN_INTERVAL_MS,
            status_interval_ms: DEFAULT_STATUS_INTERVAL_MS,
            idle_message_interval_secs: DEFAULT_IDLE_MESSAGE_INTERVAL_SECS,
        }
    }
}

fn default_stream() -> String {
    DEFAULT_STREAM.to_string()
}
fn default_subject_prefix() -> String {
    DEFAULT_SUBJECT_PREFIX.to_string()
}
fn default_replicas() -> usize {
    1
}
fn default_max_bytes() -> i64 {
    -1
}
fn default_duplicate_window() -> u64 {
    DEFAULT_DUPLICATE_WINDOW_SECS
}
fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT
}
fn default_ack_timeout() -> u64 {
    DEFAULT_ACK_TIMEOUT_MS
}
fn default_heartbeat_interval() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_MS
}
fn default_heartbeat_min_interval() -> u64 {
    DEFAULT_HEARTBEAT_MIN_INTERVAL_MS
}
fn default_status_interval() -> u64 {
    DEFAULT_STATUS_INTERVAL_MS
}
fn default_idle_message_interval() -> u64 {
    DEFAULT_IDLE_MESSAGE_INTERVAL_SECS
}

impl CdcConfig {
    /// Reads, parses, applies environment overrides and validates a config file.
    pub fn load(path: &Path) -> Result<CdcConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })?;
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment, no validation).
    pub fn parse(text: &str) -> Result<CdcConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            message: e.message().to_string(),
        })
    }

    /// Applies `CDC_POSTGRES_URL` / `CDC_NATS_URL` overrides from `env`.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(url) = env(ENV_POSTGRES_URL).filter(|v| !v.is_empty()) {
            self.postgres.url = url;
        }
        if let Some(url) = env(ENV_NATS_URL).filter(|v| !v.is_empty()) {
            self.nats.url = url;
        }
    }

    /// Checks values that serde can't.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.postgres.url.is_empty() {
            return bad(format!(
                "postgres.url is empty: set it in the file or in {ENV_POSTGRES_URL}"
            ));
        }
        if self.nats.url.is_empty() {
            return bad(format!(
                "nats.url is empty: set it in the file or in {ENV_NATS_URL}"
            ));
        }
        if !is_identifier(&self.postgres.slot) {
            return bad(format!(
                "postgres.slot {:?} must be lower-case letters, digits and underscores",
                self.postgres.slot
            ));
        }
        if self.postgres.publication.is_empty() {
            return bad("postgres.publication is empty".into());
        }
        if self.postgres.tables.is_empty() {
            return bad(
                "postgres.tables is empty: list the tables to publish as schema.table".into(),
            );
        }
        for t in &self.postgres.tables {
            if crate::subject::split_table_name(t).is_none() {
                return bad(format!(
                    "postgres.tables entry {t:?} must be schema.table (quote names with dots: \"\\\"my.schema\\\".t\")"
                ));
            }
        }
        if self.nats.stream.is_empty()
            || self
                .nats
                .stream
                .chars()
                .any(|c| c == '.' || c == '*' || c == '>' || c.is_whitespace())
        {
            return bad(format!(
                "nats.stream {:?} must be non-empty without '.', '*', '>' or spaces",
                self.nats.stream
            ));
        }
        if self.nats.subject_prefix.is_empty()
            || self
                .nats
                .subject_prefix
                .split('.')
                .any(|t| t.is_empty() || t.contains(['*', '>']) || t.contains(char::is_whitespace))
        {
            return bad(format!(
                "nats.subject_prefix {:?} must be dot-separated tokens without '*', '>' or spaces",
                self.nats.subject_prefix
            ));
        }
        if self.nats.max_in_flight == 0 || self.nats.max_in_flight > 1_000_000 {
            return bad("nats.max_in_flight must be between 1 and 1000000".into());
        }
        if self.nats.replicas == 0 || self.nats.replicas > 5 {
            return bad("nats.replicas must be between 1 and 5".into());
        }
        if self.snapshot.chunk_rows == 0 || self.snapshot.chunk_rows > 50_000 {
            return bad("snapshot.chunk_rows must be between 1 and 50000".into());
        }
        let listen = &self.metrics.listen;
        if !listen.is_empty()
            && !listen
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        {
            return bad(format!(
                "metrics.listen {:?} must be host:port, e.g. \"127.0.0.1:9187\" (or empty for no endpoint)",
                self.metrics.listen
            ));
        }
        if self.reader.heartbeat_interval_ms == 0 || self.reader.status_interval_ms == 0 {
            return bad(
                "reader.heartbeat_interval_ms and reader.status_interval_ms must be > 0".into(),
            );
        }
        Ok(())
    }

    /// The PubAck timeout.
    pub fn ack_timeout(&self) -> Duration {
        Duration::from_millis(self.nats.ack_timeout_ms.max(1))
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[postgres]
url = "postgres://cdc@127.0.0.1:5432/topclients"
slot = "cdc_topclients"
publication = "cdc_topclients"
tables = ["public.sellers", "public.top_clients"]

[nats]
url = "nats://127.0.0.1:4222"
stream = "CDC"
subject_prefix = "cdc"
"#;

    #[test]
    fn design_example_parses_with_defaults() {
        let cfg = CdcConfig::parse(MINIMAL).expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.nats.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(cfg.reader.heartbeat_interval_ms, 1000);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let text = MINIMAL.replace("stream = \"CDC\"", "stream = \"CDC\"\nstraem = 1");
        let err = CdcConfig::parse(&text).expect_err("rejected").to_string();
        assert!(err.contains("straem"), "{err}");
    }

    #[test]
    fn env_overrides_urls() {
        let mut cfg = CdcConfig::parse(MINIMAL).expect("parses");
        cfg.apply_env(|k| (k == ENV_POSTGRES_URL).then(|| "postgres://x@h/db".to_string()));
        assert_eq!(cfg.postgres.url, "postgres://x@h/db");
        assert_eq!(cfg.nats.url, "nats://127.0.0.1:4222");
    }

    #[test]
    fn bad_values_say_what_to_fix() {
        let cfg = CdcConfig::parse(&MINIMAL.replace("public.sellers", "sellers")).expect("parses");
        let err = cfg.validate().expect_err("invalid").to_string();
        assert!(err.contains("schema.table"), "{err}");
    }
}
