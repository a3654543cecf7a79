//! The sled store of an agent's views: apply whole source transactions atomically, read at one
//! applied point.
//!
//! # Layout (sled tree `views2`, one `apply_batch` per group of source transactions)
//! - `m\0seq`, `m\0lsn`, `m\0hb`: applied stream sequence, applied commit LSN, last heartbeat LSN
//!   (u64 big-endian). Written in the same batch as the rows they describe, so a crash at any
//!   point resumes exactly where the durable state says.
//! - `m\0stale\0<view>`: why a view is stale (UTF-8); `m\0def\0<view>`: the view definition the
//!   rows were built with; `m\0vid\0<view>`: the view's 2-byte id used in row keys;
//!   `m\0kinds\0<view>`: per key column, the JSON kinds its values have had (see
//!   [`kind_bit`]): a lookup only probes the spellings of a value (`7` and `'7'`) whose kind
//!   the column has actually held.
//! - `k <id> enc(key…) enc(pk…)` → 8-byte write LSN + the row. When every key column is part of
//!   the primary key, only the primary-key columns not already in the key follow it (they order
//!   rows of one key exactly as the whole primary key would), which keeps typical keys within
//!   sled's 22-byte inline limit. The row is the compact encoding of the view's stored columns
//!   (key, primary key, projection; see [`crate::row`]), or JSON for views that keep whole rows.
//!   A lookup is a prefix scan; rows of one key come ordered by primary key.
//! - `p <id> enc(pk…)` → the `k…` key of that row, to find a row by its source identity; only
//!   kept when the key is not part of the primary key.
//!
//! Stores written by earlier versions (tree `views`, view names in keys, JSON rows) are dropped
//! on open; the agent then rebuilds its views from the stream (or marks them stale if retention
//! removed the history).
//!
//! # Isolation
//! sled has no snapshots, so a [`RwLock`] gates the store: the apply step takes it exclusively
//! only around `apply_batch` (the batch is prepared before), a query takes it shared around its key
//! range reads (JSON decoding happens after). A query therefore sees either none or all of a
//! source transaction.
//!
//! # Large transactions
//! A source transaction of more than `apply.max_tx_events_in_memory` events is applied in
//! parts into a second tree, `staging`, and copied into `views2` once its last part is in. It
//! becomes visible at once, before the copy (one flag flipped under the exclusive gate):
//! queries read the views with staging laid over them until the copy is done, and never see a
//! part. A marker makes the copy crash-safe; see [`staging`].
//!
//! # Read cache
//! Lookups of a whole key (every key column given) are cached in memory: key prefix → the
//! stored values of its rows, at most `store.read_cache_rows` rows in all. A miss fills the
//! entry under the shared gate, and the apply step invalidates the entries of every key it
//! writes while it holds the gate exclusively, right after `apply_batch` and before the new
//! progress is published; so a cached result is as of one applied source transaction exactly
//! like a sled read. A lookup of one key that hits the cache skips the gate (the entry alone is
//! a consistent state of that key); lookups of several keys read them all under the gate.
//!
//! # Snapshot end (`e`)
//! Every row carries the commit LSN of the event that last wrote it (for snapshot reads, the
//! chunk's watermark). An `e` event for table T means "the snapshot that began at
//! `source.lsn` is complete": rows of T last written before that LSN were neither confirmed by
//! the snapshot nor touched by a live change since it began, so they no longer exist at the source
//! and are removed.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use cdc::envelope::{ChangeEvent, Op, Row};
use cdc::Lsn;
use serde_json::Value;
use tokio::sync::watch;

use crate::config::{AgentConfig, StoreConfig, ViewConfig};
use crate::keys;
use crate::metrics::{Interface, StoreMetrics};
use pace::LogPace;

mod fence;
mod pace;
mod staging;
pub use fence::{Fence, FenceError};
pub use staging::StagedTx;

/// Name of the status table over pgwire.
pub const STATUS_TABLE: &str = "cdc_status";

const META_SEQ: &[u8] = b"m\0seq";
const META_LSN: &[u8] = b"m\0lsn";
const META_HB: &[u8] = b"m\0hb";
const META_STALE: &[u8] = b"m\0stale\0";
const META_DEF: &[u8] = b"m\0def\0";
const META_VID: &[u8] = b"m\0vid\0";
const META_KINDS: &[u8] = b"m\0kinds\0";
/// `m\0shadow\0<view>` → 2-byte id of a rebuild in progress (its rows are dropped on open).
const META_SHADOW: &[u8] = b"m\0shadow\0";
/// `m\0gc\0<2-byte id>`: rows of a replaced view still to delete.
const META_GC: &[u8] = b"m\0gc\0";
/// Rows deleted per batch when a replaced or abandoned view's rows are dropped.
const DROP_CHUNK: usize = 10_000;
/// The sled tree of this store format.
const TREE: &str = "views2";
/// Trees of earlier formats, dropped on open.
const OLD_TREES: &[&str] = &["views"];

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (disk full, permissions, corruption).
    #[error("sled store at {path}: {source}; check the disk and permissions of data_dir")]
    Sled {
        /// The data directory.
        path: String,
        /// sled's error.
        source: sled::Error,
    },
    /// Another process (or another store in this one) has the directory open.
    #[error("sled store at {path} is in use by another process (another view-agent with this data_dir?); stop it or choose another data_dir")]
    Locked {
        /// The data directory.
        path: String,
    },
    /// A stored value does not decode: the store is damaged or from an incompatible version.
    #[error("sled store is damaged ({0}); move data_dir away and let the agent rebuild it")]
    Corrupt(String),
}

/// Errors of a query against the store.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No view of that name is configured.
    #[error("view {0:?} does not exist")]
    UnknownView(String),
    /// The key tuple has more values than the view has key columns.
    #[error("view {view:?} has {expected} key column(s), got {got} value(s)")]
    KeyArity {
        /// The view.
        view: String,
        /// Key columns of the view.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// The view cannot be trusted until it is rebuilt.
    #[error("view {view:?} is stale: {reason}")]
    Stale {
        /// The view.
        view: String,
        /// Why.
        reason: String,
    },
    /// The applied watermark did not reach the requested LSN in time.
    #[error("view agent has applied up to {applied}, not yet {wanted}, after waiting {waited:?}")]
    LsnTimeout {
        /// Wanted LSN.
        wanted: Lsn,
        /// The watermark when the wait ended.
        applied: Lsn,
        /// How long it waited.
        waited: Duration,
    },
    /// A row given to [`ViewStore::write_rows`] does not fit the view.
    #[error("a row does not fit view {view:?}: {reason}")]
    BadRow {
        /// The view.
        view: String,
        /// Why.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How far the agent has applied the stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Stream sequence of the last applied message (event or heartbeat).
    pub applied_seq: u64,
    /// Highest commit LSN applied.
    pub applied_lsn: Lsn,
    /// Read-your-writes watermark: every source change committed at or before it is applied
    /// (max of `applied_lsn` and the last heartbeat seen with everything before it applied).
    pub watermark: Lsn,
    /// Last sequence of the stream, as last seen (0 = unknown).
    pub stream_last_seq: u64,
}

/// One row of `cdc_status`.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewStatus {
    /// View name.
    pub view: String,
    /// Source table.
    pub source: String,
    /// Progress of the agent.
    pub progress: Progress,
    /// Why the view is stale, when it is.
    pub stale: Option<String>,
}

/// The result of a read: rows and the applied point they are as of.
#[derive(Clone, Debug)]
pub struct ReadResult {
    /// Rows, ordered by (key, primary key).
    pub rows: Vec<Row>,
    /// The applied point of the read.
    pub as_of: Progress,
    /// Set when the view is stale (only returned by reads that allow stale data).
    pub stale: Option<String>,
    /// True when the row cap cut the result.
    pub truncated: bool,
}

/// The result of a read as stored values (8-byte LSN + row), for callers that encode rows
/// themselves (the pgwire server); [`RawRead::rows`] decodes them.
#[derive(Debug)]
pub struct RawRead<'s> {
    /// The view read.
    pub view: &'s View,
    /// Stored values, ordered by (key, primary key).
    pub values: Vec<sled::IVec>,
    /// The applied point of the read.
    pub as_of: Progress,
    /// Set when the view is stale (only returned by reads that allow stale data).
    pub stale: Option<String>,
    /// True when the row cap cut the result.
    pub truncated: bool,
}

impl RawRead<'_> {
    /// The rows as JSON objects.
    pub fn rows(&self) -> Result<Vec<Row>, StoreError> {
        self.values
            .iter()
            .map(|v| self.view.decode(v).map(|(_, r)| r))
            .collect()
    }
}

/// A whole source transaction (or a lone snapshot row) read from the stream.
#[derive(Clone, Debug)]
pub struct SourceTransaction {
    /// Stream sequence of its last message.
    pub last_seq: u64,
    /// Its events in stream order.
    pub events: Vec<ChangeEvent>,
}

/// A configured view, resolved.
#[derive(Debug)]
pub struct View {
    /// The configuration.
    pub config: ViewConfig,
    /// The 2-byte id in row keys. Changes only when a rebuilt view is swapped in (under the
    /// exclusive gate, with applying held), so a read under the gate sees one id.
    id: std::sync::atomic::AtomicU16,
    /// Columns of the stored row (key, primary key, projection) or `None` = whole row (JSON).
    stored: Option<Vec<String>>,
    /// Positions of the key and primary-key columns in `stored`.
    key_pos: Vec<usize>,
    pk_pos: Vec<usize>,
    /// Positions of the key columns inside the primary key, when every key column is part of
    /// it: then a row's sled key follows from its primary key and no `p…` index is kept.
    key_in_pk: Option<Vec<usize>>,
    /// With `key_in_pk`: the primary-key positions not in the key (what follows the key).
    pk_rest: Vec<usize>,
    /// Per key column, the [`kind_bit`]s of the values stored so far. Only grows; updated under
    /// the exclusive gate before the progress that depends on it is published.
    key_kinds: Vec<std::sync::atomic::AtomicU8>,
}

impl View {
    fn new(config: ViewConfig, id: u16) -> View {
        let stored = config.columns.as_ref().map(|cols| {
            let mut all: Vec<String> = Vec::new();
            for c in config.key.iter().chain(&config.primary_key).chain(cols) {
                if !all.contains(c) {
                    all.push(c.clone());
                }
            }
            all
        });
        let position = |c: &String| {
            stored
                .as_ref()
                .and_then(|s| s.iter().position(|x| x == c))
                .unwrap_or(0)
        };
        let key_pos = config.key.iter().map(position).collect();
        let pk_pos = config.primary_key.iter().map(position).collect();
        let key_in_pk = config
            .key
            .iter()
            .map(|k| config.primary_key.iter().position(|p| p == k))
            .collect::<Option<Vec<usize>>>();
        let pk_rest = match &key_in_pk {
            Some(pos) => (0..config.primary_key.len())
                .filter(|i| !pos.contains(i))
                .collect(),
            None => Vec::new(),
        };
        let key_kinds = config
            .key
            .iter()
            .map(|_| std::sync::atomic::AtomicU8::new(0))
            .collect();
        View {
            config,
            id: std::sync::atomic::AtomicU16::new(id),
            stored,
            key_pos,
            pk_pos,
            key_in_pk,
            pk_rest,
            key_kinds,
        }
    }

    fn id(&self) -> u16 {
        self.id.load(std::sync::atomic::Ordering::Acquire)
    }

    fn row_prefix(&self) -> [u8; 3] {
        id_prefix(b'k', self.id())
    }

    fn pk_prefix(&self) -> [u8; 3] {
        id_prefix(b'p', self.id())
    }

    /// The columns a stored row holds (key, primary key, projection), or `None` when the view
    /// keeps whole source rows.
    pub fn stored_columns(&self) -> Option<&[String]> {
        self.stored.as_deref()
    }

    fn kinds(&self) -> Vec<u8> {
        self.key_kinds
            .iter()
            .map(|k| k.load(std::sync::atomic::Ordering::Acquire))
            .collect()
    }

    fn set_kinds(&self, kinds: &[u8]) {
        for (k, &b) in self.key_kinds.iter().zip(kinds) {
            k.fetch_or(b, std::sync::atomic::Ordering::Release);
        }
    }

    /// The scan prefixes of a lookup by `keys` (each all key columns or a prefix of them):
    /// every spelling of each value whose kind the column has held, sorted, with prefixes
    /// covered by a shorter one dropped, so the ranges are disjoint and in key order.
    fn lookup_prefixes(&self, keys: &[Vec<Value>]) -> Result<Vec<Vec<u8>>, QueryError> {
        let kinds = self.kinds();
        let mut prefixes: Vec<Vec<u8>> = Vec::with_capacity(keys.len());
        for key in keys {
            if key.len() > self.config.key.len() {
                return Err(QueryError::KeyArity {
                    view: self.config.name.clone(),
                    expected: self.config.key.len(),
                    got: key.len(),
                });
            }
            let mut partial: Vec<Vec<u8>> = vec![self.row_prefix().to_vec()];
            for (col, val) in key.iter().enumerate() {
                // The common case, a column that has held one kind only, given that kind.
                let cands: Vec<Value> = if kinds[col] == kind_bit(val) {
                    vec![val.clone()]
                } else {
                    keys::lookup_candidates(val)
                        .into_iter()
                        .filter(|c| kinds[col] & kind_bit(c) != 0)
                        .collect()
                };
                let mut next = Vec::with_capacity(partial.len() * cands.len());
                for p in &partial {
                    for c in &cands {
                        let mut q = Vec::with_capacity(p.len() + 9);
                        q.extend_from_slice(p);
                        keys::encode_value(&mut q, c);
                        next.push(q);
                    }
                }
                partial = next;
            }
            prefixes.extend(partial);
        }
        prefixes.sort();
        prefixes.dedup();
        let mut disjoint: Vec<Vec<u8>> = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            if !disjoint.last().is_some_and(|q| p.starts_with(q)) {
                disjoint.push(p);
            }
        }
        Ok(disjoint)
    }

    /// The view's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// True when the view keeps whole source rows (as JSON) rather than a projection.
    pub fn whole_row(&self) -> bool {
        self.stored.is_none()
    }

    /// The position of `column` in the compact stored row (projection views only).
    pub fn stored_position(&self, column: &str) -> Option<usize> {
        self.stored.as_ref()?.iter().position(|c| c == column)
    }

    /// Decodes the fields of a stored value (8-byte LSN + compact row) of a projection view
    /// into `out`, in stored-column order.
    pub fn fields<'a>(
        &self,
        value: &'a [u8],
        out: &mut Vec<crate::row::Field<'a>>,
    ) -> Result<(), StoreError> {
        let n = self.stored.as_ref().map_or(0, Vec::len);
        let body = value
            .get(8..)
            .ok_or_else(|| StoreError::Corrupt("row value shorter than 8 bytes".into()))?;
        crate::row::decode_into(body, n, out).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// Decodes a stored value into its write LSN and the row as a JSON object.
    pub fn decode(&self, value: &[u8]) -> Result<(Lsn, Row), StoreError> {
        if value.len() < 8 {
            return Err(StoreError::Corrupt("row value shorter than 8 bytes".into()));
        }
        let lsn = Lsn(u64_of(&value[..8])?);
        let row = match &self.stored {
            None => serde_json::from_slice(&value[8..])
                .map_err(|e| StoreError::Corrupt(format!("row value is not JSON: {e}")))?,
            Some(cols) => {
                let mut fields = Vec::with_capacity(cols.len());
                self.fields(value, &mut fields)?;
                cols.iter()
                    .zip(fields)
                    .map(|(c, f)| (c.clone(), f.to_value()))
                    .collect()
            }
        };
        Ok((lsn, row))
    }

    /// Columns a `SELECT *` returns: key columns, then the projection (or `row`, the whole row
    /// as JSON, when the view keeps all columns).
    pub fn output_columns(&self) -> Vec<String> {
        let mut out: Vec<String> = self.config.key.clone();
        match &self.config.columns {
            Some(cols) => {
                for c in cols {
                    if !out.contains(c) {
                        out.push(c.clone());
                    }
                }
            }
            None => out.push(WHOLE_ROW_COLUMN.to_owned()),
        }
        out
    }

    fn definition(&self) -> Vec<u8> {
        let c = &self.config;
        serde_json::json!({
            "source": c.source, "key": c.key, "primary_key": c.primary_key, "columns": c.columns,
        })
        .to_string()
        .into_bytes()
    }

    fn pk_key(&self, pk: &[&Value]) -> Vec<u8> {
        let mut k = Vec::with_capacity(3 + 9 * pk.len());
        k.extend_from_slice(&self.pk_prefix());
        keys::encode_tuple(&mut k, pk.iter().copied());
        k
    }

    /// The sled key of the row with primary key `pk`, when it follows from the primary key.
    fn derived_row_key(&self, pk: &[&Value]) -> Option<Vec<u8>> {
        let pos = self.key_in_pk.as_ref()?;
        let key: Vec<&Value> = pos.iter().map(|&i| pk[i]).collect();
        Some(self.row_key(&key, pk))
    }

    /// The stored row with primary key `pk`: its sled key and value.
    fn locate(
        &self,
        pending: &Pending<'_>,
        pk: &[&Value],
    ) -> Result<Option<KeyValue>, PendingError> {
        let row_key = match self.derived_row_key(pk) {
            Some(rk) => rk,
            None => match pending.get(&self.pk_key(pk))? {
                Some(rk) => rk,
                None => return Ok(None),
            },
        };
        Ok(pending.get(&row_key)?.map(|v| (row_key, v)))
    }

    fn row_key(&self, key: &[&Value], pk: &[&Value]) -> Vec<u8> {
        let mut k = Vec::with_capacity(3 + 9 * (key.len() + pk.len()));
        k.extend_from_slice(&self.row_prefix());
        keys::encode_tuple(&mut k, key.iter().copied());
        match &self.key_in_pk {
            Some(_) => keys::encode_tuple(&mut k, self.pk_rest.iter().map(|&i| pk[i])),
            None => keys::encode_tuple(&mut k, pk.iter().copied()),
        }
        k
    }

    /// The full-key prefix (`k <id> enc(key…)`) of the row key `rk` of a row with primary key
    /// `pk`: `rk` without the primary-key part that follows the key.
    fn key_prefix_of(&self, rk: &[u8], pk: &[&Value]) -> Vec<u8> {
        let mut tail = Vec::with_capacity(9 * pk.len());
        match &self.key_in_pk {
            Some(_) => keys::encode_tuple(&mut tail, self.pk_rest.iter().map(|&i| pk[i])),
            None => keys::encode_tuple(&mut tail, pk.iter().copied()),
        }
        rk[..rk.len().saturating_sub(tail.len())].to_vec()
    }

    /// The primary key of a stored row (for index maintenance).
    fn stored_pk(&self, value: &[u8]) -> Result<Option<Vec<Value>>, StoreError> {
        match &self.stored {
            Some(_) => {
                let mut fields = Vec::new();
                self.fields(value, &mut fields)?;
                Ok(Some(
                    self.pk_pos.iter().map(|&i| fields[i].to_value()).collect(),
                ))
            }
            None => {
                let (_, row) = self.decode(value)?;
                Ok(values_of(&row, &self.config.primary_key)
                    .ok()
                    .map(|v| v.into_iter().cloned().collect()))
            }
        }
    }
}

/// `k`/`p` + a 2-byte view id.
fn id_prefix(kind: u8, id: u16) -> [u8; 3] {
    let [hi, lo] = id.to_be_bytes();
    [kind, hi, lo]
}

/// Name of the JSON column of views that keep whole rows.
pub const WHOLE_ROW_COLUMN: &str = "row";

/// The store of one agent: every configured view, its applied position and the read gate.
pub struct ViewStore {
    /// The applied LSN when the store was opened.
    opened_at: Lsn,
    db: sled::Db,
    tree: sled::Tree,
    /// Parts of a large transaction not yet visible (see [`staging`]).
    staging: sled::Tree,
    path: String,
    views: Vec<View>,
    by_name: HashMap<String, usize>,
    /// schema → table → views of that source table.
    by_table: HashMap<String, HashMap<String, Vec<usize>>>,
    /// Exclusive around `apply_batch`, shared around a query's reads (see module docs).
    read_gate: RwLock<()>,
    /// Staging is laid over the views for readers: a large transaction that is visible while
    /// it is copied in (see [`staging`]). Changed only under the exclusive gate.
    overlay: std::sync::atomic::AtomicBool,
    /// Moves of a large transaction's keys from staging into the views, for readers.
    moves: staging::Moves,
    /// Paces writes to what sled's log writer and reclamation keep up with (see [`pace`]).
    pace: LogPace,
    cache: ReadCache,
    stale: Mutex<Vec<Option<String>>>,
    progress: watch::Sender<Progress>,
    metrics: StoreMetrics,
    fence: Fence,
    /// Serialises view id allocation (rebuilds).
    ids: Mutex<()>,
}

impl std::fmt::Debug for ViewStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewStore")
            .field("path", &self.path)
            .field("progress", &*self.progress.borrow())
            .finish_non_exhaustive()
    }
}

fn u64_of(v: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("meta value of {} bytes", v.len())))?;
    Ok(u64::from_be_bytes(b))
}

fn meta_key(prefix: &[u8], view: &str) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(view.as_bytes());
    k
}

impl ViewStore {
    /// Opens (or creates) the store in `config.data_dir` for the configured views.
    pub fn open(config: &AgentConfig) -> Result<ViewStore, StoreError> {
        Self::open_with(&config.data_dir, &config.views, &config.store)
    }

    /// Opens (or creates) the store at `path` for `views`, with the default `[store]` options.
    pub fn open_at(path: &Path, views: &[ViewConfig]) -> Result<ViewStore, StoreError> {
        Self::open_with(path, views, &StoreConfig::default())
    }

    /// Opens (or creates) the store at `path` for `views`.
    pub fn open_with(
        path: &Path,
        views: &[ViewConfig],
        options: &StoreConfig,
    ) -> Result<ViewStore, StoreError> {
        let spath = path.display().to_string();
        let sled_err = |source| StoreError::Sled {
            path: spath.clone(),
            source,
        };
        let db = open_sled(path, options.cache_mb).map_err(|source| match source {
            sled::Error::Io(ref e) if e.to_string().contains("could not acquire lock") => {
                StoreError::Locked {
                    path: spath.clone(),
                }
            }
            source => sled_err(source),
        })?;
        for old in OLD_TREES {
            if db.tree_names().iter().any(|n| n.as_ref() == old.as_bytes()) {
                tracing::warn!(
                    path = %spath,
                    "the store was written by an earlier view-agent version; its views are rebuilt from the stream"
                );
                db.drop_tree(old).map_err(sled_err)?;
            }
        }
        let tree = db.open_tree(TREE).map_err(sled_err)?;
        let staging = db.open_tree(staging::TREE).map_err(sled_err)?;
        // A large transaction interrupted while it was made visible is finished first.
        let pace = LogPace::new(&db);
        staging::recover(&db, &tree, &staging, &pace).map_err(|e| match e {
            PendingError::Sled(source) => sled_err(source),
            PendingError::Corrupt(m) => StoreError::Corrupt(m),
        })?;
        drop_leftovers(&tree, &pace).map_err(sled_err)?;
        let mut batch = sled::Batch::default();
        // View ids: stable across restarts and config reordering.
        let mut used: Vec<u16> = Vec::new();
        let mut ids: Vec<Option<u16>> = Vec::with_capacity(views.len());
        for v in views {
            let id = match tree.get(meta_key(META_VID, &v.name)).map_err(sled_err)? {
                Some(b) if b.len() == 2 => Some(u16::from_be_bytes([b[0], b[1]])),
                Some(_) => return Err(StoreError::Corrupt(format!("id of view {:?}", v.name))),
                None => None,
            };
            ids.push(id);
        }
        for item in tree.scan_prefix(META_VID) {
            let (_, b) = item.map_err(sled_err)?;
            if b.len() == 2 {
                used.push(u16::from_be_bytes([b[0], b[1]]));
            }
        }
        let mut next_id = used.iter().max().map_or(0, |m| m.saturating_add(1));
        let mut resolved = Vec::with_capacity(views.len());
        for (v, id) in views.iter().zip(ids) {
            let id = match id {
                Some(id) => id,
                None => {
                    if next_id == u16::MAX {
                        return Err(StoreError::Corrupt("more than 65535 view ids".into()));
                    }
                    let id = next_id;
                    next_id += 1;
                    batch.insert(meta_key(META_VID, &v.name), &id.to_be_bytes());
                    id
                }
            };
            resolved.push(View::new(v.clone(), id));
        }
        let views = resolved;
        let mut by_name = HashMap::new();
        let mut by_table: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        for (i, v) in views.iter().enumerate() {
            by_name.insert(v.config.name.to_ascii_lowercase(), i);
            let (schema, table) = v
                .config
                .source_parts()
                .unwrap_or(("", v.config.source.as_str()));
            by_table
                .entry(schema.to_owned())
                .or_default()
                .entry(table.to_owned())
                .or_default()
                .push(i);
        }
        let get_u64 = |k: &[u8]| -> Result<u64, StoreError> {
            match tree.get(k).map_err(sled_err)? {
                Some(v) => u64_of(&v),
                None => Ok(0),
            }
        };
        let applied_seq = get_u64(META_SEQ)?;
        let applied_lsn = Lsn(get_u64(META_LSN)?);
        let hb = Lsn(get_u64(META_HB)?);
        for v in &views {
            match tree.get(meta_key(META_KINDS, v.name())).map_err(sled_err)? {
                Some(k) if k.len() == v.config.key.len() => v.set_kinds(&k),
                // Rows written without a record of their kinds: probe every spelling.
                _ if applied_seq > 0 => v.set_kinds(&vec![u8::MAX; v.config.key.len()]),
                _ => {}
            }
        }
        let mut stale = Vec::with_capacity(views.len());
        for v in &views {
            let mut reason = tree
                .get(meta_key(META_STALE, v.name()))
                .map_err(sled_err)?
                .map(|r| String::from_utf8_lossy(&r).into_owned());
            let def_key = meta_key(META_DEF, v.name());
            let stored_def = tree.get(&def_key).map_err(sled_err)?;
            if stored_def.as_deref() != Some(v.definition().as_slice()) {
                if applied_seq > 0 && reason.is_none() {
                    let r = if stored_def.is_none() {
                        // New in the config: its rows come from a snapshot of its source
                        // table, which the agent requests (follow.rs); the snapshot's end
                        // event makes it fresh.
                        format!(
                            "{AWAITING_SNAPSHOT_PREFIX} of {}: the view is new in this agent's config and the store \
                             already follows the stream (sequence {applied_seq}); the agent asked the reader for one \
                             (or run `cdc snapshot --table {}`, or `view-agent replay --view {} --from-start`)",
                            v.config.source,
                            v.config.source,
                            v.name()
                        )
                    } else {
                        format!(
                            "the view's definition changed since the store was built at \
                             stream sequence {applied_seq}; rebuild it with `view-agent replay --view {} --from-start`",
                            v.name()
                        )
                    };
                    batch.insert(meta_key(META_STALE, v.name()), r.as_bytes());
                    reason = Some(r);
                }
                batch.insert(def_key, v.definition());
            }
            stale.push(reason);
        }
        tree.apply_batch(batch).map_err(sled_err)?;
        let progress = Progress {
            applied_seq,
            applied_lsn,
            watermark: applied_lsn.max(hb),
            stream_last_seq: 0,
        };
        Ok(ViewStore {
            opened_at: applied_lsn,
            db,
            tree,
            staging,
            path: spath,
            views,
            by_name,
            by_table,
            read_gate: RwLock::new(()),
            overlay: std::sync::atomic::AtomicBool::new(false),
            moves: staging::Moves::default(),
            pace,
            cache: ReadCache::new(options.read_cache_rows),
            stale: Mutex::new(stale),
            progress: watch::Sender::new(progress),
            metrics: StoreMetrics::default(),
            fence: Fence::default(),
            ids: Mutex::new(()),
        })
    }

    /// Deletes every row and the applied position, so that the next start replays the stream
    /// from `from_seq` (1 = the beginning).
    pub fn reset(&self, from_seq: u64) -> Result<(), StoreError> {
        let _gate = self
            .read_gate
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.tree.clear().map_err(|e| self.sled_err(e))?;
        self.staging.clear().map_err(|e| self.sled_err(e))?;
        self.cache.clear();
        let mut batch = sled::Batch::default();
        batch.insert(META_SEQ, &from_seq.saturating_sub(1).to_be_bytes());
        for v in &self.views {
            batch.insert(meta_key(META_DEF, v.name()), v.definition());
            batch.insert(meta_key(META_VID, v.name()), &v.id().to_be_bytes());
            let none = vec![0u8; v.config.key.len()];
            batch.insert(meta_key(META_KINDS, v.name()), none.as_slice());
            for k in &v.key_kinds {
                k.store(0, std::sync::atomic::Ordering::Release);
            }
        }
        self.tree.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.tree.flush().map_err(|e| self.sled_err(e))?;
        let mut stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
        stale.iter_mut().for_each(|s| *s = None);
        self.progress.send_modify(|p| {
            *p = Progress {
                applied_seq: from_seq.saturating_sub(1),
                ..Progress::default()
            }
        });
        Ok(())
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// The configured views.
    pub fn views(&self) -> &[View] {
        &self.views
    }

    /// A view by name (case-insensitive, like unquoted SQL identifiers).
    pub fn view(&self, name: &str) -> Option<&View> {
        self.by_name
            .get(&name.to_ascii_lowercase())
            .map(|&i| &self.views[i])
    }

    /// The current progress.
    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// A receiver that sees every progress change.
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// True once the follow loop has read the stream's state (since the store was opened).
    pub fn stream_seen(&self) -> bool {
        self.metrics
            .stream_seen
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records the stream's last sequence (for lag in `cdc_status`).
    pub fn set_stream_last_seq(&self, last: u64) {
        self.metrics
            .stream_seen
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.progress.send_if_modified(|p| {
            let changed = p.stream_last_seq != last;
            p.stream_last_seq = last;
            changed
        });
    }

    /// Status of every view.
    pub fn status(&self) -> Vec<ViewStatus> {
        let progress = self.progress();
        let stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
        self.views
            .iter()
            .zip(stale.iter())
            .map(|(v, s)| ViewStatus {
                view: v.config.name.clone(),
                source: v.config.source.clone(),
                progress,
                stale: s.clone(),
            })
            .collect()
    }

    /// Source tables (`schema.table`) of views waiting for a snapshot (see
    /// [`AWAITING_SNAPSHOT_PREFIX`]), each once.
    pub fn tables_awaiting_snapshot(&self) -> Vec<String> {
        let mut tables: Vec<String> = (0..self.views.len())
            .filter(|&i| {
                self.stale_reason(i)
                    .is_some_and(|r| r.starts_with(AWAITING_SNAPSHOT_PREFIX))
            })
            .map(|i| self.views[i].config.source.clone())
            .collect();
        tables.sort_unstable();
        tables.dedup();
        tables
    }

    fn stale_reason(&self, idx: usize) -> Option<String> {
        let stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
        stale.get(idx).cloned().flatten()
    }

    /// Marks every view stale (history lost) and persists it.
    pub fn mark_all_stale(&self, reason: &str) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let mut stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
        for (v, s) in self.views.iter().zip(stale.iter_mut()) {
            if s.is_none() {
                batch.insert(meta_key(META_STALE, v.name()), reason.as_bytes());
                *s = Some(reason.to_owned());
            }
        }
        self.tree.apply_batch(batch).map_err(|e| self.sled_err(e))
    }

    /// Waits until the watermark reaches `lsn`; returns the watermark.
    pub async fn wait_for_lsn(&self, lsn: Lsn, timeout: Duration) -> Result<Lsn, QueryError> {
        let mut rx = self.progress.subscribe();
        let wait = rx.wait_for(|p| p.watermark >= lsn);
        let outcome = match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(p)) => Ok(p.watermark),
            // The sender lives as long as `self`; treat a closed channel like a timeout.
            Ok(Err(_)) | Err(_) => Err(QueryError::LsnTimeout {
                wanted: lsn,
                applied: self.progress().watermark,
                waited: timeout,
            }),
        };
        outcome
    }

    /// Records a heartbeat at stream sequence `seq`: everything committed at or before `lsn`
    /// has been applied (the caller has applied every message before it).
    pub fn record_heartbeat(&self, seq: u64, lsn: Lsn) -> Result<(), StoreError> {
        self.apply_group(&[], Some((seq, lsn)))
    }

    /// Flushes sled to disk (on shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.sled_err(e))
    }

    /// Applies whole source transactions as one atomic sled batch, together with the applied
    /// sequence (the last transaction's `last_seq`) and LSN.
    pub fn apply(&self, txs: &[SourceTransaction]) -> Result<(), StoreError> {
        self.apply_group(txs, None)
    }

    /// Applies whole source transactions and, optionally, a heartbeat `(seq, lsn)` read after
    /// them, as one atomic sled batch together with the applied sequence, LSN and watermark.
    ///
    /// Blocks while the apply [`Fence`] holds: transactions past a verify limit wait (those
    /// before it are applied first, in their own batch).
    pub fn apply_group(
        &self,
        txs: &[SourceTransaction],
        heartbeat: Option<(u64, Lsn)>,
    ) -> Result<(), StoreError> {
        let mut rest = txs;
        loop {
            let admitted = self.fence.admit(rest);
            let all = admitted == rest.len();
            let started = std::time::Instant::now();
            let result = self.apply_admitted(&rest[..admitted], heartbeat.filter(|_| all));
            self.fence.done();
            result?;
            let events: usize = rest[..admitted].iter().map(|t| t.events.len()).sum();
            let last_ts = rest[..admitted]
                .last()
                .and_then(|t| t.events.last())
                .map(|e| e.source.ts_ms);
            self.record_applied(started, events, last_ts);
            if all {
                return Ok(());
            }
            rest = &rest[admitted..];
        }
    }

    /// Counts one applied batch in the metrics.
    fn record_applied(&self, started: std::time::Instant, events: usize, last_ts: Option<i64>) {
        use std::sync::atomic::Ordering::Relaxed;
        let m = &self.metrics;
        m.apply_seconds.observe(started.elapsed());
        m.batches_applied.fetch_add(1, Relaxed);
        m.events_applied.fetch_add(events as u64, Relaxed);
        if let Some(ts) = last_ts {
            m.last_commit_ms.store(ts, Relaxed);
        }
    }

    fn pending_err(&self, e: PendingError) -> StoreError {
        match e {
            PendingError::Sled(s) => self.sled_err(s),
            PendingError::Corrupt(m) => StoreError::Corrupt(m),
        }
    }

    fn apply_admitted(
        &self,
        txs: &[SourceTransaction],
        heartbeat: Option<(u64, Lsn)>,
    ) -> Result<(), StoreError> {
        let before = self.progress();
        let Some(new_seq) = txs
            .iter()
            .map(|t| t.last_seq)
            .chain(heartbeat.map(|(s, _)| s))
            .max()
        else {
            return Ok(());
        };
        let new_seq = new_seq.max(before.applied_seq);
        let mut pending = Pending::over(&self.tree);
        let mut new_stale: Vec<(usize, Option<String>)> = Vec::new();
        let mut max_lsn = before.applied_lsn;
        let mut scratch = Scratch::default();
        for tx in txs {
            for ev in &tx.events {
                max_lsn = max_lsn.max(ev.source.commit_lsn);
                self.apply_event(&mut pending, ev, &mut new_stale, &mut scratch)
                    .map_err(|e| self.pending_err(e))?;
            }
        }
        let (mut batch, writes, bytes) = pending.batch();
        let (touched, touched_all) = (pending.touched, pending.touched_all);
        let new_kinds = self.merge_kinds(&pending.kinds);
        let lsn = (!txs.is_empty()).then_some(max_lsn);
        for (k, v) in self.meta_writes(new_seq, lsn, &new_kinds, &new_stale) {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        let mut watermark = before.watermark.max(max_lsn);
        if let Some((_, hb)) = heartbeat {
            if hb > watermark {
                batch.insert(META_HB, &hb.0.to_be_bytes());
                watermark = hb;
            }
        }
        {
            let _gate = self
                .read_gate
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let applied = self.tree.apply_batch(batch);
            // Invalidate even when sled failed: the batch may be partly visible.
            if touched_all || applied.is_err() {
                self.cache.clear();
            } else {
                self.cache.invalidate(&touched);
            }
            applied.map_err(|e| self.sled_err(e))?;
            self.publish_applied(new_kinds, new_stale, new_seq, max_lsn, watermark);
        }
        self.pace
            .after_batch(writes, bytes)
            .map_err(|e| self.sled_err(e))
    }

    /// The key kinds of each view after `kinds` (view index, key column, kind bit) were seen.
    fn merge_kinds(&self, kinds: &[(usize, usize, u8)]) -> Vec<(usize, Vec<u8>)> {
        let mut merged: Vec<(usize, Vec<u8>)> = Vec::new();
        for &(vi, col, bit) in kinds {
            let p = match merged.iter().position(|(i, _)| *i == vi) {
                Some(p) => p,
                None => {
                    merged.push((vi, self.views[vi].kinds()));
                    merged.len() - 1
                }
            };
            merged[p].1[col] |= bit;
        }
        merged
    }

    /// The metadata writes that go with applied rows: sequence, LSN (when transactions were
    /// applied), new key kinds and stale reasons (`None` = delete the key).
    fn meta_writes(
        &self,
        new_seq: u64,
        lsn: Option<Lsn>,
        new_kinds: &[(usize, Vec<u8>)],
        new_stale: &[(usize, Option<String>)],
    ) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut writes = vec![(META_SEQ.to_vec(), Some(new_seq.to_be_bytes().to_vec()))];
        if let Some(lsn) = lsn {
            writes.push((META_LSN.to_vec(), Some(lsn.0.to_be_bytes().to_vec())));
        }
        for (vi, kinds) in new_kinds {
            writes.push((
                meta_key(META_KINDS, self.views[*vi].name()),
                Some(kinds.clone()),
            ));
        }
        for (idx, reason) in new_stale {
            writes.push((
                meta_key(META_STALE, self.views[*idx].name()),
                reason.as_ref().map(|r| r.as_bytes().to_vec()),
            ));
        }
        writes
    }

    /// Publishes what a batch applied to readers (the caller holds the gate exclusively):
    /// key kinds, stale reasons, then the new progress.
    fn publish_applied(
        &self,
        new_kinds: Vec<(usize, Vec<u8>)>,
        new_stale: Vec<(usize, Option<String>)>,
        new_seq: u64,
        max_lsn: Lsn,
        watermark: Lsn,
    ) {
        // Before the progress: a reader that sees the new progress sees the new kinds.
        for (vi, kinds) in &new_kinds {
            self.views[*vi].set_kinds(kinds);
        }
        if !new_stale.is_empty() {
            let mut stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
            for (idx, reason) in new_stale {
                stale[idx] = reason;
            }
        }
        self.progress.send_if_modified(|p| {
            let changed =
                (p.applied_seq, p.applied_lsn, p.watermark) != (new_seq, max_lsn, watermark);
            p.applied_seq = new_seq;
            p.applied_lsn = max_lsn;
            p.watermark = watermark;
            changed
        });
    }

    fn apply_event(
        &self,
        pending: &mut Pending<'_>,
        ev: &ChangeEvent,
        new_stale: &mut Vec<(usize, Option<String>)>,
        scratch: &mut Scratch,
    ) -> Result<(), PendingError> {
        let Some(idxs) = self
            .by_table
            .get(&ev.source.schema)
            .and_then(|t| t.get(&ev.source.table))
        else {
            return Ok(());
        };
        for &i in idxs {
            let view = &self.views[i];
            if let Err(reason) = apply_to_view(view, i, pending, ev, scratch)? {
                tracing::error!(view = view.name(), %reason, "view is now stale");
                if self.stale_reason(i).is_none() && !new_stale.iter().any(|(j, _)| *j == i) {
                    new_stale.push((i, Some(reason)));
                }
            } else if ev.op == Op::SnapshotEnd {
                // A snapshot that began after this store was opened was applied whole: it
                // fills a view that waited for one. (One that began earlier may have rows
                // this view never saw; the agent asks for another.)
                let gap_stale = self.stale_reason(i).is_some_and(|r| {
                    r.starts_with(HISTORY_GAP_PREFIX)
                        || (r.starts_with(AWAITING_SNAPSHOT_PREFIX)
                            && ev.source.lsn >= self.opened_at)
                });
                if gap_stale {
                    new_stale.push((i, None));
                }
            }
        }
        Ok(())
    }

    fn gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.read_gate
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn view_index(&self, view: &str) -> Result<usize, QueryError> {
        self.by_name
            .get(&view.to_ascii_lowercase())
            .copied()
            .ok_or_else(|| QueryError::UnknownView(view.to_owned()))
    }

    /// Rows of `view` whose key columns equal `key` (all key columns, or a prefix of them),
    /// ordered by primary key. Errors when the view is stale.
    pub fn get(&self, view: &str, key: &[Value]) -> Result<Vec<Row>, QueryError> {
        let r = self.lookup(view, &[key.to_vec()], usize::MAX, false)?;
        Ok(r.rows)
    }

    /// Rows of `view` for several keys (an `IN` list), read at one applied point, at most
    /// `limit`. With `allow_stale`, a stale view answers and the result says why it is stale.
    pub fn lookup(
        &self,
        view: &str,
        keys: &[Vec<Value>],
        limit: usize,
        allow_stale: bool,
    ) -> Result<ReadResult, QueryError> {
        let raw = self.read(view, keys, limit, allow_stale)?;
        Ok(ReadResult {
            rows: raw.rows()?,
            as_of: raw.as_of,
            stale: raw.stale,
            truncated: raw.truncated,
        })
    }

    /// Like [`ViewStore::lookup`], returning the stored values undecoded.
    pub fn read(
        &self,
        view: &str,
        keys: &[Vec<Value>],
        limit: usize,
        allow_stale: bool,
    ) -> Result<RawRead<'_>, QueryError> {
        self.read_via(Interface::Api, view, keys, limit, allow_stale)
    }

    /// [`ViewStore::read`] on behalf of `interface` (for the query metrics).
    pub fn read_via(
        &self,
        interface: Interface,
        view: &str,
        keys: &[Vec<Value>],
        limit: usize,
        allow_stale: bool,
    ) -> Result<RawRead<'_>, QueryError> {
        let started = std::time::Instant::now();
        let r = self.read_at(view, keys, limit, allow_stale);
        self.metrics.queries(interface).observe(started.elapsed());
        r
    }

    fn read_at(
        &self,
        view: &str,
        keys: &[Vec<Value>],
        limit: usize,
        allow_stale: bool,
    ) -> Result<RawRead<'_>, QueryError> {
        let idx = self.view_index(view)?;
        let v = &self.views[idx];
        let stale = self.check_stale(idx, allow_stale)?;
        let full_key = keys.iter().all(|k| k.len() == v.config.key.len());
        let use_cache = full_key && self.cache.enabled();
        // Fast path: one whole key found in the cache needs no gate. The entry was filled
        // under the gate and is dropped (under the exclusive gate) before the progress that
        // changes it is published, so it is the key's rows as of `as_of`, read first (and the
        // key kinds, which also change before the progress, are read after it).
        if use_cache {
            let as_of = self.progress();
            let prefixes = v.lookup_prefixes(keys)?;
            let hit = match prefixes.as_slice() {
                [] => Some(std::sync::Arc::from(Vec::new())),
                [one] => self.cache.get(one),
                _ => None,
            };
            if let Some(hit) = hit {
                let truncated = hit.len() > limit;
                let values = hit.iter().take(limit).cloned().collect();
                return Ok(RawRead {
                    view: v,
                    values,
                    as_of,
                    stale,
                    truncated,
                });
            }
        }
        let mut values = Vec::new();
        let (as_of, truncated) = {
            let _gate = self.gate();
            // Through the overlay (a large transaction being copied in), the cache is neither
            // filled nor read (it was emptied when the transaction became visible), and a read
            // that raced a move of keys from staging into the views is read again with moves
            // held off (see `staging::Moves`).
            let overlaid = self.overlay.load(std::sync::atomic::Ordering::Acquire);
            let moves_before = overlaid.then(|| self.moves.started());
            let staged = overlaid.then_some(&self.staging);
            let cache = use_cache && !overlaid;
            let mut truncated = self.read_prefixes(v, keys, limit, cache, staged, &mut values)?;
            if moves_before.is_some_and(|before| self.moves.started() != before) {
                let _no_moves = self.moves.hold_off();
                values.clear();
                truncated = self.read_prefixes(v, keys, limit, cache, staged, &mut values)?;
            }
            (self.progress(), truncated)
        };
        Ok(RawRead {
            view: v,
            values,
            as_of,
            stale,
            truncated,
        })
    }

    /// The stored values of `view`'s rows under `keys` (see [`ViewStore::read`]) into `values`,
    /// at most `limit`; whether there were more. Called under the read gate. `cache`: read and
    /// fill the read cache; `staged`: lay this staging tree over the views.
    fn read_prefixes(
        &self,
        v: &View,
        keys: &[Vec<Value>],
        limit: usize,
        cache: bool,
        staged: Option<&sled::Tree>,
        values: &mut Vec<sled::IVec>,
    ) -> Result<bool, QueryError> {
        // Under the gate: the key kinds match the rows being read.
        for p in &v.lookup_prefixes(keys)? {
            if cache {
                if let Some(hit) = self.cache.get(p) {
                    for val in hit.iter() {
                        if values.len() >= limit {
                            return Ok(true);
                        }
                        values.push(val.clone());
                    }
                    continue;
                }
            }
            let first = values.len();
            for item in staging::rows(&self.tree, staged, p) {
                let val = item.map_err(|e| self.pending_err(e))?;
                if values.len() >= limit {
                    return Ok(true);
                }
                values.push(val);
            }
            if cache {
                self.cache.insert(p.clone(), &values[first..]);
            }
        }
        Ok(false)
    }

    /// All rows of `view` in key order, at most `limit`, read at one applied point.
    pub fn scan(
        &self,
        view: &str,
        limit: usize,
        allow_stale: bool,
    ) -> Result<ReadResult, QueryError> {
        self.lookup(view, &[Vec::new()], limit, allow_stale)
    }

    fn check_stale(&self, idx: usize, allow_stale: bool) -> Result<Option<String>, QueryError> {
        match self.stale_reason(idx) {
            Some(reason) if !allow_stale => Err(QueryError::Stale {
                view: self.views[idx].config.name.clone(),
                reason,
            }),
            other => Ok(other),
        }
    }
}

/// A view being rebuilt beside the live one (`view-agent replay`): its rows live under a view
/// id of their own until [`ViewStore::swap_shadow`] makes them the view's rows.
#[derive(Debug)]
pub struct Shadow {
    index: usize,
    view: View,
}

impl Shadow {
    /// The view's name.
    pub fn name(&self) -> &str {
        self.view.name()
    }

    /// The source table, `(schema, table)`.
    pub fn source(&self) -> (&str, &str) {
        self.view
            .config
            .source_parts()
            .unwrap_or(("", self.view.config.source.as_str()))
    }
}

fn sled_scan_ids(tree: &sled::Tree, prefix: &[u8]) -> Result<Vec<(Vec<u8>, u16)>, sled::Error> {
    let mut out = Vec::new();
    for item in tree.scan_prefix(prefix) {
        let (k, v) = item?;
        if v.len() == 2 {
            out.push((k.to_vec(), u16::from_be_bytes([v[0], v[1]])));
        } else if k.len() == prefix.len() + 2 {
            out.push((
                k.to_vec(),
                u16::from_be_bytes([k[prefix.len()], k[prefix.len() + 1]]),
            ));
        }
    }
    Ok(out)
}

/// Deletes every row (and primary-key index entry) of view id `id`, in chunks.
fn drop_id_rows(tree: &sled::Tree, pace: &LogPace, id: u16) -> Result<usize, sled::Error> {
    let mut dropped = 0;
    for kind in [b'k', b'p'] {
        loop {
            let mut batch = sled::Batch::default();
            let (mut n, mut bytes) = (0, 0);
            for k in tree
                .scan_prefix(id_prefix(kind, id))
                .keys()
                .take(DROP_CHUNK)
            {
                let k = k?;
                bytes += k.len();
                batch.remove(k);
                n += 1;
            }
            if n == 0 {
                break;
            }
            tree.apply_batch(batch)?;
            pace.after_batch(n, bytes)?;
            if kind == b'k' {
                dropped += n;
            }
        }
    }
    Ok(dropped)
}

/// Drops the rows of rebuilds that did not finish and of views replaced by a rebuild.
fn drop_leftovers(tree: &sled::Tree, pace: &LogPace) -> Result<(), sled::Error> {
    for prefix in [META_SHADOW, META_GC] {
        for (key, id) in sled_scan_ids(tree, prefix)? {
            let n = drop_id_rows(tree, pace, id)?;
            tree.remove(key)?;
            if n > 0 {
                tracing::info!(
                    id,
                    rows = n,
                    "dropped the rows of an unfinished or replaced view rebuild"
                );
            }
        }
    }
    Ok(())
}

impl ViewStore {
    /// The store's hot-path counters.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.metrics
    }

    /// The apply fence (see [`Fence`]).
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Starts rebuilding `view`: an empty shadow view under a fresh view id. A shadow left by
    /// an earlier attempt is dropped first.
    pub fn begin_shadow(&self, view: &str) -> Result<Shadow, QueryError> {
        let index = self.view_index(view)?;
        let live = &self.views[index];
        let _ids = self.ids.lock().unwrap_or_else(PoisonError::into_inner);
        let shadow_key = meta_key(META_SHADOW, live.name());
        if let Some(old) = self.tree.get(&shadow_key).map_err(|e| self.sled_err(e))? {
            if old.len() == 2 {
                drop_id_rows(&self.tree, &self.pace, u16::from_be_bytes([old[0], old[1]]))
                    .map_err(|e| self.sled_err(e))?;
            }
        }
        let mut max = 0u16;
        for prefix in [META_VID, META_SHADOW, META_GC] {
            for (_, id) in sled_scan_ids(&self.tree, prefix).map_err(|e| self.sled_err(e))? {
                max = max.max(id);
            }
        }
        for v in &self.views {
            max = max.max(v.id());
        }
        let id = max
            .checked_add(1)
            .filter(|id| *id < u16::MAX)
            .ok_or_else(|| StoreError::Corrupt("more than 65535 view ids".into()))?;
        self.tree
            .insert(&shadow_key, &id.to_be_bytes())
            .map_err(|e| self.sled_err(e))?;
        Ok(Shadow {
            index,
            view: View::new(live.config.clone(), id),
        })
    }

    /// Applies stream events to a shadow view (events of other tables are skipped), in one
    /// sled batch. `Ok(Err(reason))`: the view cannot follow an event (it would be stale).
    pub fn apply_shadow(
        &self,
        shadow: &Shadow,
        events: &[ChangeEvent],
    ) -> Result<Result<(), String>, StoreError> {
        let (schema, table) = shadow.source();
        let mut pending = Pending::over(&self.tree);
        let mut scratch = Scratch::default();
        for ev in events {
            if ev.source.schema != schema || ev.source.table != table {
                continue;
            }
            if let Err(reason) =
                apply_to_view(&shadow.view, usize::MAX, &mut pending, ev, &mut scratch)
                    .map_err(|e| self.pending_err(e))?
            {
                return Ok(Err(reason));
            }
        }
        let mut kinds = shadow.view.kinds();
        for (_, col, bit) in &pending.kinds {
            kinds[*col] |= bit;
        }
        let (batch, writes, bytes) = pending.batch();
        self.tree.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.pace
            .after_batch(writes, bytes)
            .map_err(|e| self.sled_err(e))?;
        shadow.view.set_kinds(&kinds);
        Ok(Ok(()))
    }

    /// Makes the shadow's rows the view's rows, atomically: one sled batch points the view at
    /// the shadow's id, and readers switch under the exclusive gate (a query reads the old rows
    /// or the new ones, never a mix). The caller holds the fence ([`Fence::hold`]) and has
    /// applied to the shadow every message up to the applied sequence. The replaced rows are
    /// deleted afterwards by [`ViewStore::drop_replaced`] with the id this returns (on the
    /// next open if the process dies first).
    pub fn swap_shadow(&self, shadow: &Shadow) -> Result<u16, StoreError> {
        let live = &self.views[shadow.index];
        let old = live.id();
        let new = shadow.view.id();
        let mut kinds = live.kinds();
        for (k, s) in kinds.iter_mut().zip(shadow.view.kinds()) {
            *k |= s;
        }
        let mut batch = sled::Batch::default();
        batch.insert(meta_key(META_VID, live.name()), &new.to_be_bytes());
        batch.remove(meta_key(META_SHADOW, live.name()));
        let mut gc = META_GC.to_vec();
        gc.extend_from_slice(&old.to_be_bytes());
        batch.insert(gc, &[][..]);
        batch.insert(meta_key(META_KINDS, live.name()), kinds.as_slice());
        batch.remove(meta_key(META_STALE, live.name()));
        {
            let _gate = self
                .read_gate
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            self.tree.apply_batch(batch).map_err(|e| self.sled_err(e))?;
            live.id.store(new, std::sync::atomic::Ordering::Release);
            live.set_kinds(&kinds);
            self.cache.clear();
            let mut stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
            stale[shadow.index] = None;
        }
        Ok(old)
    }

    /// Deletes the rows of the view id a swap replaced; returns how many.
    pub fn drop_replaced(&self, old: u16) -> Result<usize, StoreError> {
        let dropped = drop_id_rows(&self.tree, &self.pace, old).map_err(|e| self.sled_err(e))?;
        let mut gc = META_GC.to_vec();
        gc.extend_from_slice(&old.to_be_bytes());
        self.tree.remove(gc).map_err(|e| self.sled_err(e))?;
        Ok(dropped)
    }

    /// Gives a rebuild up: drops the shadow's rows.
    pub fn abandon_shadow(&self, shadow: &Shadow) -> Result<(), StoreError> {
        drop_id_rows(&self.tree, &self.pace, shadow.view.id()).map_err(|e| self.sled_err(e))?;
        self.tree
            .remove(meta_key(META_SHADOW, shadow.name()))
            .map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    /// Writes rows of one view outside the stream (what `view-agent verify --repair` uses, and
    /// how a test damages a view): each row of `put` (a source row: at least the view's stored
    /// columns) replaces the row with its primary key, each primary key in `delete` is removed.
    /// One atomic batch, invisible to readers until complete; the applied position does not
    /// move. Written rows carry `lsn` as their write LSN (the source point they were read at).
    pub fn write_rows(
        &self,
        view: &str,
        put: &[Row],
        delete: &[Vec<Value>],
        lsn: Lsn,
    ) -> Result<(), QueryError> {
        let index = self.view_index(view)?;
        let v = &self.views[index];
        let (schema, table) = v
            .config
            .source_parts()
            .unwrap_or(("", v.config.source.as_str()));
        let event = |op: Op, before: Option<Row>, after: Option<Row>| ChangeEvent {
            op,
            before,
            after,
            unchanged_toast: Vec::new(),
            source: cdc::envelope::Source {
                db: String::new(),
                schema: schema.to_owned(),
                table: table.to_owned(),
                lsn,
                commit_lsn: lsn,
                tx_id: None,
                ts_ms: 0,
                snapshot: false,
            },
            transaction: None,
            ts_ms: 0,
        };
        let mut events: Vec<ChangeEvent> = Vec::with_capacity(put.len() + delete.len());
        for pk in delete {
            if pk.len() != v.config.primary_key.len() {
                return Err(QueryError::KeyArity {
                    view: v.name().to_owned(),
                    expected: v.config.primary_key.len(),
                    got: pk.len(),
                });
            }
            let before: Row = v
                .config
                .primary_key
                .iter()
                .cloned()
                .zip(pk.iter().cloned())
                .collect();
            events.push(event(Op::Delete, Some(before), None));
        }
        for row in put {
            events.push(event(Op::Read, None, Some(row.clone())));
        }
        let mut pending = Pending::over(&self.tree);
        let mut scratch = Scratch::default();
        for ev in &events {
            let applied = apply_to_view(v, index, &mut pending, ev, &mut scratch)
                .map_err(|e| self.pending_err(e))?;
            if let Err(reason) = applied {
                return Err(QueryError::BadRow {
                    view: v.name().to_owned(),
                    reason,
                });
            }
        }
        let mut kinds = v.kinds();
        for (_, col, bit) in &pending.kinds {
            kinds[*col] |= bit;
        }
        let (mut batch, writes, bytes) = pending.batch();
        batch.insert(meta_key(META_KINDS, v.name()), kinds.as_slice());
        {
            let _gate = self
                .read_gate
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let applied = self.tree.apply_batch(batch);
            self.cache.clear();
            applied.map_err(|e| self.sled_err(e))?;
        }
        self.pace
            .after_batch(writes, bytes)
            .map_err(|e| self.sled_err(e))?;
        v.set_kinds(&kinds);
        Ok(())
    }
}

/// Shards of the read cache (fewer lock collisions between query threads).
const CACHE_SHARDS: usize = 16;
/// Keys with more rows than this are not cached.
const CACHE_MAX_ENTRY_ROWS: usize = 1024;

/// The cache of full-key lookups (see module docs).
struct ReadCache {
    shards: Vec<Padded<Mutex<CacheShard>>>,
    rows_per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

/// Keeps each shard's lock on its own cache lines (no false sharing between shards).
#[derive(Default)]
#[repr(align(128))]
struct Padded<T>(T);

#[derive(Default)]
struct CacheShard {
    entries: HashMap<Vec<u8>, std::sync::Arc<[sled::IVec]>>,
    rows: usize,
}

impl ReadCache {
    fn new(rows: usize) -> ReadCache {
        let shards = if rows == 0 { 0 } else { CACHE_SHARDS };
        ReadCache {
            shards: (0..shards).map(|_| Padded::default()).collect(),
            rows_per_shard: rows.div_ceil(CACHE_SHARDS),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn enabled(&self) -> bool {
        !self.shards.is_empty()
    }

    fn shard(&self, key: &[u8]) -> Option<std::sync::MutexGuard<'_, CacheShard>> {
        use std::hash::BuildHasher;
        if self.shards.is_empty() {
            return None;
        }
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        Some(
            self.shards[i]
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    fn get(&self, key: &[u8]) -> Option<std::sync::Arc<[sled::IVec]>> {
        self.shard(key)?.entries.get(key).cloned()
    }

    fn insert(&self, key: Vec<u8>, values: &[sled::IVec]) {
        if values.len() > CACHE_MAX_ENTRY_ROWS || values.len() > self.rows_per_shard {
            return;
        }
        let cost = values.len().max(1);
        let Some(mut shard) = self.shard(&key) else {
            return;
        };
        // Make room: drop arbitrary entries (hash order) until the new one fits.
        while shard.rows + cost > self.rows_per_shard {
            let Some(victim) = shard.entries.keys().next().cloned() else {
                break;
            };
            if let Some(v) = shard.entries.remove(&victim) {
                shard.rows -= v.len().max(1);
            }
        }
        if let Some(old) = shard.entries.insert(key, values.into()) {
            shard.rows -= old.len().max(1);
        }
        shard.rows += cost;
    }

    fn invalidate(&self, keys: &[Vec<u8>]) {
        for k in keys {
            if let Some(mut shard) = self.shard(k) {
                if let Some(v) = shard.entries.remove(k) {
                    shard.rows -= v.len().max(1);
                }
            }
        }
    }

    fn clear(&self) {
        for s in &self.shards {
            let mut s = s.0.lock().unwrap_or_else(PoisonError::into_inner);
            s.entries.clear();
            s.rows = 0;
        }
    }
}

/// Prefix of the stale reason set when stream history was lost; cleared by a snapshot end.
pub const HISTORY_GAP_PREFIX: &str = "stream history removed";
/// How long opening waits for the directory's lock: a store just dropped in this process (its
/// flusher thread lets go a moment later) or a process that was just killed releases it soon.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Opens the sled database at `path`, waiting up to [`LOCK_WAIT`] for its lock.
fn open_sled(path: &Path, cache_mb: u64) -> Result<sled::Db, sled::Error> {
    let started = std::time::Instant::now();
    loop {
        let opened = sled::Config::new()
            .path(path)
            .cache_capacity(cache_mb.saturating_mul(1_000_000))
            .flush_every_ms(Some(200))
            .mode(sled::Mode::HighThroughput)
            .open();
        match opened {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Start of the stale reason of a view added to the config of an agent that already follows
/// the stream: it waits for a snapshot of its source table.
pub const AWAITING_SNAPSHOT_PREFIX: &str = "waiting for a snapshot";

enum PendingError {
    Sled(sled::Error),
    Corrupt(String),
}

impl From<sled::Error> for PendingError {
    fn from(e: sled::Error) -> Self {
        PendingError::Sled(e)
    }
}

impl From<StoreError> for PendingError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Sled { source, .. } => PendingError::Sled(source),
            StoreError::Corrupt(m) => PendingError::Corrupt(m),
            e @ StoreError::Locked { .. } => PendingError::Corrupt(e.to_string()),
        }
    }
}

/// A sled key and value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// Writes of the batch being prepared, read through before the tree (a transaction may write
/// the same row twice).
struct Pending<'a> {
    tree: &'a sled::Tree,
    /// The staging tree of a large transaction being applied in parts (its earlier parts'
    /// writes, read through before `tree`; see [`staging`]).
    staged: Option<&'a sled::Tree>,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Key prefixes (`k <id> enc(key…)`) of rows written or deleted: cache entries to drop.
    touched: Vec<Vec<u8>>,
    /// A whole view changed (truncate, snapshot end): drop every cache entry.
    touched_all: bool,
    /// Key kinds new to a view: (view index, key column, kind bit).
    kinds: Vec<(usize, usize, u8)>,
}

impl<'a> Pending<'a> {
    /// Nothing pending yet, reading through to `tree`.
    fn over(tree: &'a sled::Tree) -> Pending<'a> {
        Pending {
            tree,
            staged: None,
            writes: BTreeMap::new(),
            touched: Vec::new(),
            touched_all: false,
            kinds: Vec::new(),
        }
    }

    /// The pending writes as a sled batch for the views' tree (the rest stays), with their
    /// number and the bytes of their keys and values (for [`LogPace::after_batch`]).
    fn batch(&mut self) -> (sled::Batch, usize, usize) {
        let mut batch = sled::Batch::default();
        let (writes, mut bytes) = (self.writes.len(), 0);
        for (k, v) in std::mem::take(&mut self.writes) {
            bytes += k.len() + v.as_ref().map_or(0, Vec::len);
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        (batch, writes, bytes)
    }

    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>, PendingError> {
        if let Some(v) = self.writes.get(k) {
            return Ok(v.clone());
        }
        if let Some(staged) = self.staged {
            if let Some(entry) = staged.get(k)? {
                return staging::decode(&entry).map(|v| v.map(<[u8]>::to_vec));
            }
        }
        Ok(self.tree.get(k)?.map(|v| v.to_vec()))
    }

    fn put(&mut self, k: Vec<u8>, v: Vec<u8>) {
        self.writes.insert(k, Some(v));
    }

    fn del(&mut self, k: Vec<u8>) {
        self.writes.insert(k, None);
    }

    /// Every live key/value under `prefix`, tree and pending writes merged.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, PendingError> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for item in self.tree.scan_prefix(prefix) {
            let (k, v) = item?;
            merged.insert(k.to_vec(), Some(v.to_vec()));
        }
        if let Some(staged) = self.staged {
            for item in staged.scan_prefix(prefix) {
                let (k, entry) = item?;
                merged.insert(k.to_vec(), staging::decode(&entry)?.map(<[u8]>::to_vec));
            }
        }
        let upper = keys::prefix_end(prefix);
        let range = match &upper {
            Some(u) => self.writes.range(prefix.to_vec()..u.clone()),
            None => self.writes.range(prefix.to_vec()..),
        };
        for (k, v) in range {
            merged.insert(k.clone(), v.clone());
        }
        Ok(merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect())
    }
}

/// Buffers reused across the events of one batch.
#[derive(Default)]
struct Scratch {
    value: Vec<u8>,
}

/// The kind of a JSON value as one bit: null, bool, number, string, array/object.
pub fn kind_bit(v: &Value) -> u8 {
    match v {
        Value::Null => 1,
        Value::Bool(_) => 2,
        Value::Number(_) => 4,
        Value::String(_) => 8,
        Value::Array(_) | Value::Object(_) => 16,
    }
}

/// Collects the values of `cols` from `row`; `Err(col)` names the first missing one.
fn values_of<'r>(row: &'r Row, cols: &'r [String]) -> Result<Vec<&'r Value>, &'r str> {
    cols.iter().map(|c| row.get(c).ok_or(c.as_str())).collect()
}

/// The new stored row of an insert/update/snapshot read: the values of the stored columns (or
/// the whole row), with unchanged TOAST columns taken from the old stored value.
enum NewRow<'e> {
    Projected(Vec<Cow<'e, Value>>),
    Whole(Row),
}

/// Applies one event to one view. `Ok(Err(reason))`: the view cannot follow this event and
/// becomes stale.
fn apply_to_view(
    view: &View,
    view_index: usize,
    pending: &mut Pending<'_>,
    ev: &ChangeEvent,
    scratch: &mut Scratch,
) -> Result<Result<(), String>, PendingError> {
    let cfg = &view.config;
    let table = || format!("{}.{}", ev.source.schema, ev.source.table);
    match ev.op {
        Op::Create | Op::Update | Op::Read => {
            let Some(after) = &ev.after else {
                return Ok(Err(format!(
                    "a '{}' event of {} carries no new row (at {})",
                    ev.op.code(),
                    table(),
                    ev.msg_id()
                )));
            };
            // The row's old identity: `before` carries the key columns when the key changed.
            let old_pk_src = match &ev.before {
                Some(b) if cfg.primary_key.iter().all(|c| b.contains_key(c)) => b,
                _ => after,
            };
            let old_pk = match values_of(old_pk_src, &cfg.primary_key) {
                Ok(v) => v,
                Err(c) => {
                    return Ok(Err(format!(
                        "primary key column {c:?} is missing from events of {}; \
                         check the view's primary_key",
                        table()
                    )))
                }
            };
            // Where the row was, and its value when TOAST columns must be merged. A view whose
            // key is part of the primary key knows where without reading (blind writes).
            let need_old = !ev.unchanged_toast.is_empty();
            let old: Option<(Vec<u8>, Option<Vec<u8>>)> = match view.derived_row_key(&old_pk) {
                Some(rk) => {
                    let v = if need_old { pending.get(&rk)? } else { None };
                    Some((rk, v))
                }
                None => view.locate(pending, &old_pk)?.map(|(rk, v)| (rk, Some(v))),
            };
            let old_value = match old.as_ref().and_then(|(_, v)| v.as_deref()) {
                Some(v) if need_old => Some(v),
                _ => None,
            };
            // The new row: projection, unchanged TOAST columns from the stored row.
            let new_row = match &view.stored {
                Some(cols) => {
                    let mut old_fields = Vec::new();
                    if let Some(v) = old_value {
                        view.fields(v, &mut old_fields)?;
                    }
                    let mut vals: Vec<Cow<'_, Value>> = Vec::with_capacity(cols.len());
                    for (i, c) in cols.iter().enumerate() {
                        match after.get(c) {
                            Some(v) => vals.push(Cow::Borrowed(v)),
                            None if ev.unchanged_toast.iter().any(|t| t == c) => vals.push(
                                Cow::Owned(old_fields.get(i).map_or(Value::Null, |f| f.to_value())),
                            ),
                            None => {
                                return Ok(Err(format!(
                                    "column {c:?} is no longer in source table {} \
                                     (dropped or renamed at {}); fix the view's columns and \
                                     rebuild it with `view-agent replay --view {} --from-start`",
                                    table(),
                                    ev.source.commit_lsn,
                                    cfg.name
                                )))
                            }
                        }
                    }
                    NewRow::Projected(vals)
                }
                None => {
                    let mut row = after.clone();
                    if let Some(v) = old_value {
                        let (_, old_row) = view.decode(v)?;
                        for c in &ev.unchanged_toast {
                            if let Some(v) = old_row.get(c) {
                                row.insert(c.clone(), v.clone());
                            }
                        }
                    }
                    NewRow::Whole(row)
                }
            };
            let (key, pk): (Vec<&Value>, Vec<&Value>) = match &new_row {
                NewRow::Projected(vals) => (
                    view.key_pos.iter().map(|&i| vals[i].as_ref()).collect(),
                    view.pk_pos.iter().map(|&i| vals[i].as_ref()).collect(),
                ),
                NewRow::Whole(row) => {
                    match (values_of(row, &cfg.key), values_of(row, &cfg.primary_key)) {
                        (Ok(k), Ok(p)) => (k, p),
                        (Err(c), _) | (_, Err(c)) => {
                            return Ok(Err(format!(
                                "column {c:?} is missing from a new row of {}",
                                table()
                            )))
                        }
                    }
                }
            };
            for (col, k) in key.iter().enumerate() {
                let bit = kind_bit(k);
                let known = view.key_kinds[col].load(std::sync::atomic::Ordering::Relaxed);
                if known & bit == 0 && !pending.kinds.contains(&(view_index, col, bit)) {
                    pending.kinds.push((view_index, col, bit));
                }
            }
            let row_key = view.row_key(&key, &pk);
            let pk_moved = old_pk != pk;
            let found_by_old_pk = old.is_some();
            let old_row_key = match old {
                Some((rk, _)) => Some(rk),
                // An insert or snapshot row may find its identity stored under another key.
                None if pk_moved => view.locate(pending, &pk)?.map(|(rk, _)| rk),
                None => None,
            };
            if let Some(old_rk) = old_row_key {
                if old_rk != row_key {
                    // Found by its old identity, or (moved in) by its new one.
                    let id = if found_by_old_pk { &old_pk } else { &pk };
                    pending.touched.push(view.key_prefix_of(&old_rk, id));
                    pending.del(old_rk);
                }
            }
            pending.touched.push(view.key_prefix_of(&row_key, &pk));
            let value = &mut scratch.value;
            value.clear();
            value.extend_from_slice(&ev.source.commit_lsn.0.to_be_bytes());
            match &new_row {
                NewRow::Projected(vals) => {
                    for v in vals {
                        crate::row::encode(value, Some(v.as_ref()));
                    }
                }
                // Serializing a map of JSON values cannot fail.
                NewRow::Whole(row) => {
                    let _ = serde_json::to_writer(&mut *value, row);
                }
            }
            if view.key_in_pk.is_none() {
                if pk_moved {
                    pending.del(view.pk_key(&old_pk));
                }
                pending.put(view.pk_key(&pk), row_key.clone());
            }
            pending.put(row_key, value.clone());
        }
        Op::Delete => {
            let Some(before) = &ev.before else {
                return Ok(Err(format!(
                    "a delete of {} carries no old key (at {}); set a replica identity",
                    table(),
                    ev.msg_id()
                )));
            };
            let pk = match values_of(before, &cfg.primary_key) {
                Ok(v) => v,
                Err(c) => {
                    return Ok(Err(format!(
                        "primary key column {c:?} is missing from deletes of {}; \
                         check the view's primary_key",
                        table()
                    )))
                }
            };
            match view.derived_row_key(&pk) {
                Some(rk) => {
                    pending.touched.push(view.key_prefix_of(&rk, &pk));
                    pending.del(rk);
                }
                None => {
                    if let Some((rk, _)) = view.locate(pending, &pk)? {
                        pending.touched.push(view.key_prefix_of(&rk, &pk));
                        pending.del(rk);
                        pending.del(view.pk_key(&pk));
                    }
                }
            }
        }
        Op::Truncate => {
            pending.touched_all = true;
            for prefix in [view.row_prefix(), view.pk_prefix()] {
                for (k, _) in pending.scan(&prefix)? {
                    pending.del(k);
                }
            }
        }
        Op::SnapshotEnd => {
            pending.touched_all = true;
            let began = ev.source.lsn;
            for (k, v) in pending.scan(&view.row_prefix())? {
                let (written, _) = view.decode(&v)?;
                if written < began {
                    if view.key_in_pk.is_none() {
                        if let Some(pk) = view.stored_pk(&v)? {
                            let refs: Vec<&Value> = pk.iter().collect();
                            pending.del(view.pk_key(&refs));
                        }
                    }
                    pending.del(k);
                }
            }
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests;
