//! Agent configuration: the TOML file of `view-agent run --config agent.toml`.
//!
//! Unknown keys are rejected (`deny_unknown_fields`), every limit has a `DEFAULT_*` constant, and
//! [`AgentConfig::validate`] checks what serde cannot (names, duplicate views, key columns).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default JetStream stream name (same as the reader's).
pub const DEFAULT_STREAM: &str = "CDC";
/// Default subject prefix (same as the reader's).
pub const DEFAULT_SUBJECT_PREFIX: &str = "cdc";
/// Default NATS URL.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// Default pgwire listen address.
pub const DEFAULT_PGWIRE_LISTEN: &str = "127.0.0.1:6543";
/// Default cap on concurrent pgwire connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default wait of a query that carries `cdc.min_lsn`, in milliseconds.
pub const DEFAULT_MIN_LSN_TIMEOUT_MS: u64 = 5_000;
/// Default cap on the events gathered into one sled batch (several whole source transactions
/// may share a batch when they are already waiting in the stream; a transaction is never split).
/// Smaller batches cost sled less per event once the reader keeps them full: `cdc-bench` row 4,
/// seven interleaved pairs, 512 against 4,096: applier 5.6-6.4 against 6.1-8.1 µs per event.
pub const DEFAULT_MAX_BATCH_EVENTS: usize = 512;
/// Default `apply.max_tx_events_in_memory`. The part being read, the one waiting and the one
/// being staged are in memory together while a large transaction flows: with 512 instead of
/// 1,024 the agent's peak in `cdc-bench` row 6 (one transaction of 1,000,000 rows) was 89-92
/// against 92-101 MB in six interleaved pairs. The price: a transaction of 513-1,024 events now
/// goes through staging (two log flushes), about 11.5 against 4.1 µs per event in-process.
pub const DEFAULT_MAX_TX_EVENTS_IN_MEMORY: usize = 512;
/// Default `store.cache_mb` (see [`StoreConfig::cache_mb`]).
pub const DEFAULT_STORE_CACHE_MB: u64 = 16;
/// Default cap on rows one query may return.
pub const DEFAULT_MAX_RESULT_ROWS: usize = 100_000;
/// Default `store.read_cache_rows`.
pub const DEFAULT_READ_CACHE_ROWS: usize = 200_000;

/// Environment variable that overrides `nats.url`.
pub const ENV_NATS_URL: &str = "CDC_NATS_URL";
/// Environment variable that overrides `pgwire.password`.
pub const ENV_PGWIRE_PASSWORD: &str = "CDC_AGENT_PGWIRE_PASSWORD";

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema (unknown key, wrong type).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said, on one line.
        message: String,
    },
    /// The values are inconsistent.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole agent configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Name of this agent (used in logs and in `cdc_status`).
    pub name: String,
    /// Directory of the sled store; created if missing.
    pub data_dir: PathBuf,
    /// Where the stream is.
    #[serde(default)]
    pub nats: NatsConfig,
    /// The Postgres-wire query server.
    #[serde(default)]
    pub pgwire: PgwireConfig,
    /// Apply tuning.
    #[serde(default)]
    pub apply: ApplyConfig,
    /// Store tuning.
    #[serde(default)]
    pub store: StoreConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The views this agent keeps.
    #[serde(default)]
    pub views: Vec<ViewConfig>,
}

/// `[nats]`: where the stream is.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// NATS server URL(s), comma-separated. `CDC_NATS_URL` overrides it.
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// JetStream stream name.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Subject prefix of the stream's subjects.
    #[serde(default = "default_subject_prefix")]
    pub subject_prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: default_nats_url(),
            stream: default_stream(),
            subject_prefix: default_subject_prefix(),
        }
    }
}

/// `[pgwire]`: the read-only Postgres-wire server.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgwireConfig {
    /// Listen address; `""` disables the server (in-process use only).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// If set, clients must authenticate with this password (MD5 exchange); any user name.
    /// `CDC_AGENT_PGWIRE_PASSWORD` overrides it.
    #[serde(default)]
    pub password: Option<String>,
    /// Cap on concurrent connections; more wait in the accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Default wait of a query when the connection has `SET cdc.min_lsn`, in milliseconds
    /// (a connection may change it with `SET cdc.min_lsn_timeout`).
    #[serde(default = "default_min_lsn_timeout_ms")]
    pub min_lsn_timeout_ms: u64,
    /// Cap on rows one query returns (a full scan without LIMIT stops there, with a notice).
    #[serde(default = "default_max_result_rows")]
    pub max_result_rows: usize,
}

impl Default for PgwireConfig {
    fn default() -> Self {
        PgwireConfig {
            listen: default_listen(),
            password: None,
            max_connections: default_max_connections(),
            min_lsn_timeout_ms: default_min_lsn_timeout_ms(),
            max_result_rows: default_max_result_rows(),
        }
    }
}

/// `[apply]`: tuning of the apply loop.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Cap on events per sled batch (whole transactions only; a larger transaction is one batch).
    #[serde(default = "default_max_batch_events")]
    pub max_batch_events: usize,
    /// A source transaction with more events than this is applied in parts of this size into a
    /// staging area and made visible at once when its last part is in (memory stays bounded
    /// whatever the transaction's size; see the store's "Large transactions").
    #[serde(default = "default_max_tx_events_in_memory")]
    pub max_tx_events_in_memory: usize,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            max_batch_events: default_max_batch_events(),
            max_tx_events_in_memory: default_max_tx_events_in_memory(),
        }
    }
}

/// `[store]`: tuning of the sled store and its read cache.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Rows kept in the in-memory cache of full-key lookups (0 disables it). Entries are
    /// invalidated in the same critical section that applies a batch, so cached reads are as
    /// consistent as sled reads.
    #[serde(default = "default_read_cache_rows")]
    pub read_cache_rows: usize,
    /// sled's page cache, in MB (10^6 bytes), as sled counts it: the decoded nodes it keeps in
    /// memory take about three times this. Nodes outside it are read from the store's file
    /// (the OS page cache) and decoded again: point lookups barely notice, writes do (the
    /// benchmark's apply row ran at about 60% of its rate with 4 MB instead of 16).
    #[serde(default = "default_store_cache_mb")]
    pub cache_mb: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            read_cache_rows: default_read_cache_rows(),
            cache_mb: default_store_cache_mb(),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint (`/metrics`, `/healthz`, `/readyz`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to serve on; empty (the default) = no endpoint.
    #[serde(default)]
    pub listen: String,
}

/// `[[views]]`: one projection of one source table.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    /// View name: the table name over pgwire. `[A-Za-z_][A-Za-z0-9_]*`.
    pub name: String,
    /// Source table, `schema.table`.
    pub source: String,
    /// Lookup key columns (rows with equal keys are returned together).
    pub key: Vec<String>,
    /// The source table's primary key columns: the identity of a row. Required, because the
    /// envelope names key columns only on updates and deletes.
    pub primary_key: Vec<String>,
    /// Projected columns; omitted = the whole row (exposed over pgwire as a JSON `row` column).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Postgres types of columns as seen over pgwire (`int8`, `int4`, `int2`, `float8`, `bool`,
    /// `text`); undeclared columns are `text`.
    #[serde(default)]
    pub column_types: BTreeMap<String, String>,
}

fn default_nats_url() -> String {
    DEFAULT_NATS_URL.to_owned()
}
fn default_stream() -> String {
    DEFAULT_STREAM.to_owned()
}
fn default_subject_prefix() -> String {
    DEFAULT_SUBJECT_PREFIX.to_owned()
}
fn default_listen() -> String {
    DEFAULT_PGWIRE_LISTEN.to_owned()
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_min_lsn_timeout_ms() -> u64 {
    DEFAULT_MIN_LSN_TIMEOUT_MS
}
fn default_max_result_rows() -> usize {
    DEFAULT_MAX_RESULT_ROWS
}
fn default_read_cache_rows() -> usize {
    DEFAULT_READ_CACHE_ROWS
}
fn default_max_batch_events() -> usize {
    DEFAULT_MAX_BATCH_EVENTS
}
fn default_max_tx_events_in_memory() -> usize {
    DEFAULT_MAX_TX_EVENTS_IN_MEMORY
}
fn default_store_cache_mb() -> u64 {
    DEFAULT_STORE_CACHE_MB
}

/// Types a view column may declare, by the names accepted in `column_types`.
pub const COLUMN_TYPES: &[&str] = &[
    "int8",
    "bigint",
    "int4",
    "integer",
    "int",
    "int2",
    "smallint",
    "float8",
    "double precision",
    "bool",
    "boolean",
    "text",
    "varchar",
];

impl AgentConfig {
    /// Reads, parses, applies environment overrides and validates a config file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = AgentConfig::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        config.apply_env();
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no environment overrides, no validation).
    pub fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string().replace('\n', " ").trim().to_owned(),
        })
    }

    /// Applies `CDC_NATS_URL` and `CDC_AGENT_PGWIRE_PASSWORD` when set.
    pub fn apply_env(&mut self) {
        if let Ok(url) = std::env::var(ENV_NATS_URL) {
            if !url.is_empty() {
                self.nats.url = url;
            }
        }
        if let Ok(pw) = std::env::var(ENV_PGWIRE_PASSWORD) {
            if !pw.is_empty() {
                self.pgwire.password = Some(pw);
            }
        }
    }

    /// The wait of a `min_lsn` query when the connection did not set its own.
    pub fn min_lsn_timeout(&self) -> Duration {
        Duration::from_millis(self.pgwire.min_lsn_timeout_ms)
    }

    /// The pgwire listen address, or `None` when the server is disabled.
    pub fn pgwire_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.pgwire.listen.is_empty() {
            return Ok(None);
        }
        self.pgwire.listen.parse().map(Some).map_err(|_| {
            ConfigError::Invalid(format!(
                "pgwire.listen = {:?} is not an address like 127.0.0.1:6543",
                self.pgwire.listen
            ))
        })
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.name.trim().is_empty() {
            return bad("name must not be empty".into());
        }
        if self.nats.stream.is_empty() || self.nats.stream.contains(['.', '*', '>', ' ']) {
            return bad(format!(
                "nats.stream = {:?} is not a valid stream name",
                self.nats.stream
            ));
        }
        if self.nats.subject_prefix.is_empty() || self.nats.subject_prefix.contains(['*', '>', ' '])
        {
            return bad(format!(
                "nats.subject_prefix = {:?} is not a valid subject prefix",
                self.nats.subject_prefix
            ));
        }
        self.pgwire_addr()?;
        if self.pgwire.max_connections == 0 {
            return bad("pgwire.max_connections must be at least 1".into());
        }
        if self.apply.max_batch_events == 0 {
            return bad("apply.max_batch_events must be at least 1".into());
        }
        if self.apply.max_tx_events_in_memory == 0 {
            return bad("apply.max_tx_events_in_memory must be at least 1".into());
        }
        if self.store.cache_mb == 0 {
            return bad("store.cache_mb must be at least 1".into());
        }
        if self.views.is_empty() {
            return bad("no [[views]] configured; add at least one".into());
        }
        let mut names = HashSet::new();
        for v in &self.views {
            v.validate()?;
            if !names.insert(v.name.to_ascii_lowercase()) {
                return bad(format!("view {:?} is configured twice", v.name));
            }
            if v.name.eq_ignore_ascii_case(crate::store::STATUS_TABLE) {
                return bad(format!("view name {:?} is reserved", v.name));
            }
        }
        Ok(())
    }
}

impl ViewConfig {
    /// `(schema, table)` of the source.
    pub fn source_parts(&self) -> Option<(&str, &str)> {
        self.source.split_once('.')
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("view {:?}: {m}", self.name)));
        let ident = |s: &str| {
            let mut c = s.chars();
            c.next()
                .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        };
        if !ident(&self.name) {
            return bad("name must match [A-Za-z_][A-Za-z0-9_]*".into());
        }
        match self.source_parts() {
            Some((s, t)) if !s.is_empty() && !t.is_empty() => {}
            _ => return bad(format!("source = {:?} must be schema.table", self.source)),
        }
        if self.key.is_empty() {
            return bad("key must name at least one column".into());
        }
        if self.primary_key.is_empty() {
            return bad("primary_key must list the source table's primary key columns".into());
        }
        let mut seen = HashSet::new();
        for c in &self.key {
            if !seen.insert(c) {
                return bad(format!("key column {c:?} listed twice"));
            }
        }
        let mut seen = HashSet::new();
        for c in &self.primary_key {
            if !seen.insert(c) {
                return bad(format!("primary_key column {c:?} listed twice"));
            }
        }
        if let Some(cols) = &self.columns {
            let mut seen = HashSet::new();
            for c in cols {
                if !seen.insert(c) {
                    return bad(format!("column {c:?} listed twice"));
                }
            }
        }
        for (col, ty) in &self.column_types {
            if !COLUMN_TYPES.contains(&ty.to_ascii_lowercase().as_str()) {
                return bad(format!(
                    "column_types.{col} = {ty:?}: supported types are {}",
                    COLUMN_TYPES.join(", ")
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "user-page"
data_dir = "./data/user-page"

[nats]
url = "nats://127.0.0.1:4222"
stream = "CDC"
subject_prefix = "cdc"

[pgwire]
listen = "127.0.0.1:6543"

[[views]]
name = "top_clients_by_seller"
source = "public.top_clients"
key = ["seller_id"]
primary_key = ["seller_id", "client_id"]
columns = ["client_id", "name", "logo_url", "position"]
column_types = { seller_id = "int8", client_id = "int8", position = "int4" }
"#;

    #[test]
    fn design_example_parses_and_validates() {
        let c = AgentConfig::parse(MINIMAL).expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.views[0].key, vec!["seller_id"]);
        assert_eq!(c.nats.stream, "CDC");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let text = MINIMAL.replace("stream = \"CDC\"", "stream = \"CDC\"\nstreem = \"x\"");
        let err = AgentConfig::parse(&text).expect_err("unknown key");
        assert!(err.to_string().contains("streem"), "{err}");
        let text = MINIMAL.replace("key = [\"seller_id\"]", "key = [\"seller_id\"]\nkeys = []");
        assert!(AgentConfig::parse(&text).is_err());
    }

    #[test]
    fn missing_primary_key_is_explained() {
        let text = MINIMAL.replace("primary_key = [\"seller_id\", \"client_id\"]\n", "");
        let err = AgentConfig::parse(&text).expect_err("required");
        assert!(err.to_string().contains("primary_key"), "{err}");
    }

    #[test]
    fn bad_values_are_explained() {
        let mut c = AgentConfig::parse(MINIMAL).expect("parses");
        c.views[0].source = "top_clients".into();
        assert!(c
            .validate()
            .expect_err("bad")
            .to_string()
            .contains("schema.table"));
        let mut c = AgentConfig::parse(MINIMAL).expect("parses");
        c.views.push(c.views[0].clone());
        assert!(c.validate().expect_err("dup").to_string().contains("twice"));
        let mut c = AgentConfig::parse(MINIMAL).expect("parses");
        c.views[0]
            .column_types
            .insert("name".into(), "geometry".into());
        assert!(c
            .validate()
            .expect_err("type")
            .to_string()
            .contains("supported"));
        let mut c = AgentConfig::parse(MINIMAL).expect("parses");
        c.pgwire.listen = "nowhere".into();
        assert!(c.validate().is_err());
    }
}
