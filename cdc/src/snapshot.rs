//! Snapshots while streaming (the DBLog method): each table is read in primary-key chunks, each
//! chunk bracketed by a low and a high watermark written into the WAL with
//! `pg_logical_emit_message`. The chunk's rows are published as `r` events at the high
//! watermark's position in the stream; a row is dropped when a transaction that the chunk's read
//! did not see has already changed its key in the stream before that position (the change is
//! newer than the row, and it is in the stream).
//!
//! "Did not see" is decided by the read's own MVCC snapshot (`pg_current_snapshot()` taken in
//! the chunk's REPEATABLE READ transaction), not by WAL order alone: a transaction's commit
//! record can precede the low watermark in the WAL while the transaction is still visible as
//! running to a snapshot taken just after (Postgres removes it from the proc array only after
//! writing and flushing its commit record). So the reader watches the table's changes
//! continuously from the start of its snapshot, groups them by transaction id, and at each high
//! watermark drops the keys of the transactions invisible to the chunk's snapshot.
//!
//! No transaction stays open longer than one chunk read, and progress (the last key of the last
//! finished chunk) lives in a JetStream key-value bucket, so a restarted reader resumes where it
//! stopped.
//!
//! When a table's last chunk is empty, an `e` (snapshot end) event follows, whose `source.lsn`
//! is where the table's snapshot began: a consumer deletes that table's rows it last wrote
//! before that LSN (rows deleted while it missed history).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::envelope::Op;
use crate::events::{now_ms, EncodedEvent};
use crate::lsn::Lsn;
use crate::subject::{quote_ident, quote_table, table_subject};
use crate::value::{write_json_str, TypeRegistry};

/// Logical message prefix of the watermarks.
pub const WATERMARK_PREFIX: &str = "cdc.snapshot";
/// Default rows per chunk.
pub const DEFAULT_CHUNK_ROWS: usize = 10_000;

/// Errors of the snapshot machinery.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The table can't be snapshotted as it is.
    #[error("cannot snapshot {table}: {reason}")]
    Table {
        /// schema.table.
        table: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A query failed.
    #[error("snapshot query failed: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// The progress bucket failed.
    #[error("snapshot progress bucket: {0}")]
    Progress(String),
}

/// The progress record of one table, as kept in the key-value bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// `pending`, `running` or `done`.
    pub state: String,
    /// Primary-key values (text) of the last row of the last finished chunk.
    pub last_key: Option<Vec<String>>,
    /// Rows published so far.
    pub rows: u64,
    /// Estimated rows in the table when the snapshot started.
    pub estimate: u64,
    /// Where the snapshot began (the first low watermark), once known.
    pub start_lsn: Option<Lsn>,
    /// When the snapshot was requested, ms since the epoch.
    pub requested_ms: i64,
}

/// The key-value bucket of snapshot progress.
#[derive(Clone)]
pub struct ProgressStore {
    kv: async_nats::jetstream::kv::Store,
}

impl ProgressStore {
    /// Opens (creating if missing) `<stream>_SNAPSHOTS`.
    pub async fn open(
        js: &async_nats::jetstream::Context,
        stream: &str,
        replicas: usize,
    ) -> Result<ProgressStore, SnapshotError> {
        let bucket = format!("{stream}_SNAPSHOTS");
        let kv = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => {
                // The bucket's backing stream, created directly: async-nats 0.51's
                // `create_key_value` sends settings nats-server 2.9 can't answer.
                js.create_stream(async_nats::jetstream::stream::Config {
                    name: format!("KV_{bucket}"),
                    description: Some(format!(
                        "snapshot progress of the tables of stream {stream}"
                    )),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: 1,
                    num_replicas: replicas,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: async_nats::jetstream::stream::DiscardPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(|e| SnapshotError::Progress(format!("creating {bucket}: {e}")))?;
                js.get_key_value(&bucket)
                    .await
                    .map_err(|e| SnapshotError::Progress(format!("opening {bucket}: {e}")))?
            }
        };
        Ok(ProgressStore { kv })
    }

    /// The key of a table: hex of `schema.table` (bucket keys allow few characters).
    pub fn key(schema: &str, table: &str) -> String {
        let name = format!("{schema}.{table}");
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        format!("t_{hex}")
    }

    /// Reads a table's progress.
    pub async fn get(&self, schema: &str, table: &str) -> Result<Option<Progress>, SnapshotError> {
        let value = self
            .kv
            .get(Self::key(schema, table))
            .await
            .map_err(|e| SnapshotError::Progress(e.to_string()))?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Writes a table's progress.
    pub async fn put(&self, schema: &str, table: &str, p: &Progress) -> Result<(), SnapshotError> {
        let body = serde_json::to_vec(p).map_err(|e| SnapshotError::Progress(e.to_string()))?;
        self.kv
            .put(Self::key(schema, table), Bytes::from(body))
            .await
            .map_err(|e| SnapshotError::Progress(e.to_string()))?;
        Ok(())
    }
}

/// The columns of a table as the snapshot reads them.
#[derive(Clone, Debug)]
pub struct TableShape {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Published columns in order: name and type OID.
    pub columns: Vec<(String, u32)>,
    /// Primary-key columns: name and SQL type (for casts).
    pub key: Vec<(String, String)>,
    /// Index of each key column in `columns`.
    pub key_index: Vec<usize>,
}

impl TableShape {
    /// Reads the shape from the catalog. Tables without a primary key are refused.
    pub async fn load(
        sql: &tokio_postgres::Client,
        schema: &str,
        table: &str,
    ) -> Result<TableShape, SnapshotError> {
        let qualified = quote_table(schema, table);
        let columns: Vec<(String, u32)> = sql
            .query(
                "SELECT a.attname::text, a.atttypid::oid FROM pg_attribute a
                  WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
                    AND a.attgenerated = '' ORDER BY a.attnum",
                &[&qualified],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, u32>(1)))
            .collect();
        let key: Vec<(String, String)> = sql
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
                   FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = $1::text::regclass AND i.indisprimary
                  ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&qualified],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
            .collect();
        if key.is_empty() {
            return Err(SnapshotError::Table {
                table: format!("{schema}.{table}"),
                reason: format!(
                    "it has no primary key, so it can't be read in resumable key chunks; add one (ALTER TABLE {qualified} ADD PRIMARY KEY (…))"
                ),
            });
        }
        let key_index = key
            .iter()
            .filter_map(|(k, _)| columns.iter().position(|(c, _)| c == k))
            .collect::<Vec<_>>();
        Ok(TableShape {
            schema: schema.to_string(),
            table: table.to_string(),
            columns,
            key,
            key_index,
        })
    }

    /// The chunk query after `last_key` (text values), `limit` rows, in key order. Values are
    /// rendered by each type's output function (COPY's text format), exactly as pgoutput
    /// renders them.
    pub fn chunk_query(&self, last_key: Option<&[String]>, limit: usize) -> String {
        let cols = self
            .columns
            .iter()
            .map(|(c, _)| format!("s.{}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let keys = self
            .key
            .iter()
            .map(|(k, _)| format!("s.{}", quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let mut q = format!(
            "SELECT {cols} FROM {} AS s",
            quote_table(&self.schema, &self.table)
        );
        if let Some(last) = last_key {
            let values = last
                .iter()
                .zip(&self.key)
                .map(|(v, (_, ty))| format!("{}::{ty}", quote_literal(v)))
                .collect::<Vec<_>>()
                .join(", ");
            q.push_str(&format!(" WHERE ({keys}) > ({values})"));
        }
        q.push_str(&format!(" ORDER BY {keys} LIMIT {limit}"));
        q
    }
}

/// A SQL string literal.
pub fn quote_literal(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

/// The MVCC snapshot a chunk was read in (`pg_current_snapshot()`): which transactions the
/// read saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotXids {
    /// Every transaction below this one had finished.
    pub xmin: u64,
    /// This one and every later transaction had not started (or not taken an id).
    pub xmax: u64,
    /// Transactions in `[xmin, xmax)` still running.
    pub xip: HashSet<u64>,
}

impl SnapshotXids {
    /// Parses the text form of `pg_snapshot` (`xmin:xmax:xip,…`).
    pub fn parse(text: &str) -> Option<SnapshotXids> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => HashSet::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<HashSet<u64>>>()?,
        };
        (xmin <= xmax).then_some(SnapshotXids { xmin, xmax, xip })
    }

    /// True when the committed transaction `xid` (the 32-bit id pgoutput carries) was visible
    /// to the snapshot. Its epoch is taken as the one that puts it nearest `xmax` (within
    /// 2^31 either side, as Postgres compares xids): transactions in the stream around a
    /// chunk read are that close.
    pub fn saw(&self, xid: u32) -> bool {
        if xid == 0 {
            // InvalidTransactionId: a change outside any transaction; never treat it as seen.
            return false;
        }
        // Truncation to the low 32 bits is the point: that is what pgoutput carries.
        let distance = xid.wrapping_sub(self.xmax as u32) as i32;
        if distance >= 0 {
            return false;
        }
        match self.xmax.checked_sub(u64::from(distance.unsigned_abs())) {
            Some(full) => !self.xip.contains(&full),
            None => false,
        }
    }
}

/// Errors in a chunk's COPY data.
#[derive(Debug, thiserror::Error)]
pub enum CopyDataError {
    /// A row had another number of fields than the table has columns.
    #[error("COPY row {row} has {got} fields, expected {expected}")]
    FieldCount {
        /// 0-based row.
        row: usize,
        /// Fields found.
        got: usize,
        /// Columns of the shape.
        expected: usize,
    },
    /// The data is not UTF-8 (the session's client_encoding is UTF8).
    #[error("COPY data is not UTF-8")]
    Utf8,
    /// The last row has no line end.
    #[error("COPY data ends inside a row")]
    Truncated,
}

/// One chunk read in one snapshot: the rows' values, unescaped, in one buffer.
#[derive(Debug, Default)]
pub struct ChunkRows {
    /// Columns per row.
    ncols: usize,
    /// Every value, back to back.
    text: String,
    /// Per row and column: the value's byte range in `text`, or `None` for NULL.
    fields: Vec<Option<(u32, u32)>>,
    /// The snapshot the rows were read in.
    pub snapshot: SnapshotXids,
}

impl ChunkRows {
    /// Parses COPY's text format (tab-separated fields, `\N` for NULL, backslash escapes,
    /// one row per line) of rows with `ncols` columns.
    pub fn from_copy_text(data: &[u8], ncols: usize) -> Result<ChunkRows, CopyDataError> {
        let data = std::str::from_utf8(data).map_err(|_| CopyDataError::Utf8)?;
        if !data.is_empty() && !data.ends_with('\n') {
            return Err(CopyDataError::Truncated);
        }
        let mut rows = ChunkRows {
            ncols,
            text: String::with_capacity(data.len()),
            fields: Vec::new(),
            snapshot: SnapshotXids::default(),
        };
        for (row, line) in data.split_terminator('\n').enumerate() {
            let before = rows.fields.len();
            for field in line.split('\t') {
                if field == "\\N" {
                    rows.fields.push(None);
                    continue;
                }
                let start = rows.text.len();
                unescape_copy(field, &mut rows.text);
                // Chunks hold far fewer than 4 GiB of text (at most 50,000 rows of a table
                // whose values are bounded by the publish path); saturate rather than wrap.
                let as_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                rows.fields
                    .push(Some((as_u32(start), as_u32(rows.text.len()))));
            }
            let got = rows.fields.len() - before;
            if got != ncols {
                return Err(CopyDataError::FieldCount {
                    row,
                    got,
                    expected: ncols,
                });
            }
        }
        Ok(rows)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.fields.len().checked_div(self.ncols).unwrap_or(0)
    }

    /// True when the chunk has no rows (the table is done).
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Value `col` of row `row` (`None` for NULL or out of range).
    pub fn value(&self, row: usize, col: usize) -> Option<&str> {
        let (a, b) = (*self.fields.get(row * self.ncols + col)?)?;
        self.text.get(a as usize..b as usize)
    }

    /// The values of row `row`.
    pub fn row(&self, row: usize) -> impl Iterator<Item = Option<&str>> + '_ {
        (0..self.ncols).map(move |c| self.value(row, c))
    }

    /// The text values of `columns` in row `row` (NULL as empty).
    pub fn key(&self, row: usize, columns: &[usize]) -> Vec<String> {
        columns
            .iter()
            .map(|&c| self.value(row, c).unwrap_or_default().to_string())
            .collect()
    }
}

/// Appends `field` with COPY's text-format escapes resolved.
fn unescape_copy(field: &str, out: &mut String) {
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let mut chars = rest[i + 1..].chars();
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some('v') => out.push('\u{b}'),
            Some(c) => out.push(c),
            None => {}
        }
        rest = chars.as_str();
    }
    out.push_str(rest);
}

/// Longest pause between two looks at transactions that committed but are not visible yet.
const INVISIBLE_COMMIT_POLL: Duration = Duration::from_millis(200);
/// How often a chunk that keeps waiting for such transactions says so.
const INVISIBLE_COMMIT_WARN: Duration = Duration::from_secs(5);

/// Waits until every transaction of `xids` (committed: the stream carried their commits) is
/// visible to new snapshots.
///
/// A committed transaction can stay invisible: Postgres takes it out of the proc array only
/// after its commit record is flushed, and with synchronous replication only once a standby
/// confirmed it, which lasts as long as the standby is away. Its changes are in the stream
/// then, and a chunk read before it is visible would publish rows older than those changes.
async fn wait_until_visible(
    sql: &tokio_postgres::Client,
    table: &str,
    xids: &[u32],
) -> Result<(), SnapshotError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    let mut warned_at: Option<Instant> = None;
    loop {
        let text: String = sql
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await?
            .get(0);
        let snapshot = SnapshotXids::parse(&text).ok_or_else(|| SnapshotError::Table {
            table: table.to_string(),
            reason: format!("pg_current_snapshot() gave {text:?}, which does not parse"),
        })?;
        let waiting: Vec<u32> = xids.iter().copied().filter(|x| !snapshot.saw(*x)).collect();
        if waiting.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= INVISIBLE_COMMIT_WARN
            && warned_at.is_none_or(|at| at.elapsed() >= INVISIBLE_COMMIT_WARN)
        {
            tracing::warn!(
                table,
                transactions = ?waiting,
                waited_ms = started.elapsed().as_millis() as u64,
                "snapshot chunk waits for transactions that committed but are not visible yet (a synchronous standby not answering?)"
            );
            warned_at = Some(Instant::now());
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(INVISIBLE_COMMIT_POLL);
    }
}

/// One chunk to read: where, how many rows, and which committed transactions must be visible
/// to its read first.
#[derive(Debug, Clone)]
pub struct ChunkRequest {
    /// Watermark id.
    pub id: u64,
    /// Primary-key values (text) after which the chunk starts.
    pub after: Option<Vec<String>>,
    /// Rows at most.
    pub limit: usize,
    /// Transactions (committed in the stream) to wait for.
    pub wait_visible: Vec<u32>,
}

/// Reads one chunk: the low watermark, then the rows in a REPEATABLE READ transaction that
/// also returns its snapshot, then the high watermark (contents `low:<id>` and `high:<id>`).
/// `sql` must be a connection of its own: the transaction spans several statements.
pub async fn read_chunk(
    sql: &tokio_postgres::Client,
    shape: &TableShape,
    chunk: &ChunkRequest,
) -> Result<ChunkRows, SnapshotError> {
    use futures::TryStreamExt as _;
    let table = format!("{}.{}", shape.schema, shape.table);
    if !chunk.wait_visible.is_empty() {
        wait_until_visible(sql, &table, &chunk.wait_visible).await?;
    }
    sql.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&WATERMARK_PREFIX, &format!("low:{}", chunk.id)],
    )
    .await?;
    sql.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?;
    let snap: String = sql
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await?
        .get(0);
    let copy = format!(
        "COPY ({}) TO STDOUT",
        shape.chunk_query(chunk.after.as_deref(), chunk.limit)
    );
    let data: Vec<bytes::Bytes> = sql.copy_out(copy.as_str()).await?.try_collect().await?;
    sql.batch_execute("COMMIT").await?;
    let snapshot = SnapshotXids::parse(&snap).ok_or_else(|| SnapshotError::Table {
        table: table.clone(),
        reason: format!("pg_current_snapshot() gave {snap:?}, which does not parse"),
    })?;
    let mut rows = ChunkRows::from_copy_text(&data.concat(), shape.columns.len()).map_err(|e| {
        SnapshotError::Table {
            table,
            reason: e.to_string(),
        }
    })?;
    rows.snapshot = snapshot;
    sql.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&WATERMARK_PREFIX, &format!("high:{}", chunk.id)],
    )
    .await?;
    Ok(rows)
}

/// Ids of transactions the stream has shown committing (with published changes) that a
/// snapshot might still show as running, each with its place in commit order. Pruned by the
/// oldest running transaction ([`CommittedXids::forget_before`]) and capped, oldest first.
#[derive(Debug)]
pub struct CommittedXids {
    seq: HashMap<u32, u64>,
    order: VecDeque<u32>,
    next: u64,
    cap: usize,
}

impl CommittedXids {
    /// An empty set holding at most `cap` ids.
    pub fn new(cap: usize) -> Self {
        CommittedXids {
            seq: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            cap,
        }
    }

    /// Records a commit seen in the stream.
    pub fn record(&mut self, xid: u32) {
        if xid == 0 || self.seq.contains_key(&xid) {
            return;
        }
        self.seq.insert(xid, self.next);
        self.next += 1;
        self.order.push_back(xid);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.seq.remove(&old);
            }
        }
    }

    /// A mark of "now" in commit order, for [`CommittedXids::invisible_before`].
    pub fn mark(&self) -> u64 {
        self.next
    }

    /// Forgets the ids visible to every snapshot from now on: those before `snapshot`'s
    /// xmin.
    pub fn forget_before(&mut self, snapshot: &SnapshotXids) {
        // Truncation is the point: pgoutput's xids are the low 32 bits.
        let xmin = snapshot.xmin as u32;
        // Postgres' modular comparison: `x` precedes `xmin` when the difference is negative.
        let keep = |x: &u32| (x.wrapping_sub(xmin) as i32) >= 0;
        self.seq.retain(|x, _| keep(x));
        self.order.retain(keep);
    }

    /// The transactions that committed in the stream before `mark` and that `snapshot` still
    /// shows as running.
    pub fn invisible_before(&self, snapshot: &SnapshotXids, mark: u64) -> Vec<u32> {
        let mut xids: Vec<u32> = snapshot
            .xip
            .iter()
            .map(|x| *x as u32)
            .filter(|x| self.seq.get(x).is_some_and(|s| *s < mark))
            .collect();
        xids.sort_unstable();
        xids
    }

    /// How many ids are held.
    pub fn len(&self) -> usize {
        self.seq.len()
    }

    /// True when none is held.
    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }
}

/// Session settings that make `::text` output match pgoutput's (see pgconn.rs).
pub const SESSION_SETTINGS: &str = "SET DateStyle = ISO; SET TimeZone = 'UTC'; SET IntervalStyle = iso_8601; SET extra_float_digits = 3; SET bytea_output = hex";

/// Encodes snapshot rows as `r` events published at the high watermark `at`.
pub fn encode_rows(
    db: &str,
    prefix: &str,
    shape: &TableShape,
    types: &TypeRegistry,
    rows: &ChunkRows,
    keep: &[usize],
    at: Lsn,
) -> Vec<EncodedEvent> {
    let subject = async_nats::Subject::from(table_subject(prefix, &shape.schema, &shape.table));
    let table: Arc<str> = Arc::from(format!("{}.{}", shape.schema, shape.table));
    let n = keep.len();
    let ts = now_ms();
    // The same for every row of the chunk: written once, copied per row.
    let (at_text, mut ts_digits) = (at.text(), itoa::Buffer::new());
    let (at_text, ts_text) = (at_text.as_bytes(), ts_digits.format(ts).as_bytes());
    keep.iter()
        .enumerate()
        .map(|(i, &row)| {
            let mut body = Vec::with_capacity(256);
            body.extend_from_slice(b"{\"op\":\"r\",\"before\":null,\"after\":{");
            for (j, ((name, oid), value)) in shape.columns.iter().zip(rows.row(row)).enumerate() {
                if j > 0 {
                    body.push(b',');
                }
                write_json_str(&mut body, name);
                body.push(b':');
                match value {
                    Some(v) => types.write_json(*oid, v, &mut body),
                    None => body.extend_from_slice(b"null"),
                }
            }
            body.extend_from_slice(b"},\"unchanged_toast\":[],\"source\":{\"db\":");
            write_json_str(&mut body, db);
            body.extend_from_slice(b",\"schema\":");
            write_json_str(&mut body, &shape.schema);
            body.extend_from_slice(b",\"table\":");
            write_json_str(&mut body, &shape.table);
            let ordinal = i as u64 + 1;
            let mut digits = itoa::Buffer::new();
            let ordinal_text = digits.format(ordinal).as_bytes();
            let last = ordinal == n as u64;
            for part in [
                &b",\"lsn\":\""[..],
                at_text,
                b"\",\"commit_lsn\":\"",
                at_text,
                b"\",\"txId\":null,\"ts_ms\":",
                ts_text,
                b",\"snapshot\":true},\"transaction\":{\"id\":\"snapshot:",
                at_text,
                b"\",\"total_order\":",
                ordinal_text,
                b",\"data_collection_order\":",
                ordinal_text,
                if last {
                    b",\"last\":true},\"ts_ms\":"
                } else {
                    b",\"last\":false},\"ts_ms\":"
                },
                ts_text,
                b"}",
            ] {
                body.extend_from_slice(part);
            }
            EncodedEvent {
                op: Op::Read,
                subject: subject.clone(),
                table: Arc::clone(&table),
                commit_lsn: at,
                ordinal,
                body,
                last,
            }
        })
        .collect()
}

/// The `e` event closing a table's snapshot, published at `at`; `start` is where the snapshot
/// began.
pub fn encode_end(db: &str, prefix: &str, shape: &TableShape, start: Lsn, at: Lsn) -> EncodedEvent {
    let mut body = Vec::with_capacity(256);
    let ts = now_ms();
    body.extend_from_slice(
        b"{\"op\":\"e\",\"before\":null,\"after\":null,\"unchanged_toast\":[],\"source\":{\"db\":",
    );
    write_json_str(&mut body, db);
    body.extend_from_slice(b",\"schema\":");
    write_json_str(&mut body, &shape.schema);
    body.extend_from_slice(b",\"table\":");
    write_json_str(&mut body, &shape.table);
    let _ = write!(
        body,
        ",\"lsn\":\"{start}\",\"commit_lsn\":\"{at}\",\"txId\":null,\"ts_ms\":{ts},\"snapshot\":true}},\"transaction\":{{\"id\":\"snapshot:{at}\",\"total_order\":1,\"data_collection_order\":1,\"last\":true}},\"ts_ms\":{ts}}}"
    );
    EncodedEvent {
        op: Op::SnapshotEnd,
        subject: async_nats::Subject::from(table_subject(prefix, &shape.schema, &shape.table)),
        table: Arc::from(format!("{}.{}", shape.schema, shape.table)),
        commit_lsn: at,
        ordinal: 1,
        body,
        last: true,
    }
}

/// The changes of one transaction to the table being snapshotted.
#[derive(Debug, Default)]
pub struct TxChanges {
    /// Key values (text) of the rows it changed (old and new keys).
    pub keys: Vec<Vec<String>>,
    /// It truncated the table (or changed it so that keys can't be told): no row of a chunk
    /// it raced can be kept.
    pub whole_table: bool,
}

/// Changes to the table being snapshotted, seen in the stream since the previous chunk's high
/// watermark (or the start of the table's snapshot), by transaction id.
#[derive(Debug, Default)]
pub struct WatchedChanges {
    /// By the transaction's 32-bit id.
    pub by_xid: HashMap<u32, TxChanges>,
}

impl WatchedChanges {
    /// Adds `other`'s changes to these.
    pub fn merge(&mut self, other: WatchedChanges) {
        for (xid, tx) in other.by_xid {
            let mine = self.by_xid.entry(xid).or_default();
            mine.keys.extend(tx.keys);
            mine.whole_table |= tx.whole_table;
        }
    }

    /// The keys that a chunk read in `snapshot` must drop: those changed by transactions the
    /// read did not see. Transactions it saw are in the chunk's rows already.
    pub fn races(self, snapshot: &SnapshotXids) -> RaceSet {
        let mut race = RaceSet::default();
        for (xid, tx) in self.by_xid {
            if snapshot.saw(xid) {
                continue;
            }
            race.truncated |= tx.whole_table;
            race.keys.extend(tx.keys);
        }
        race
    }
}

/// Keys that a chunk must drop.
#[derive(Debug, Default)]
pub struct RaceSet {
    /// Key values (text).
    pub keys: HashSet<Vec<String>>,
    /// Drop the whole chunk.
    pub truncated: bool,
}

/// Tables waiting for or in a snapshot, in order.
#[derive(Debug, Default)]
pub struct SnapshotQueue {
    /// `(schema, table)` waiting.
    pub waiting: VecDeque<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::ChangeEvent;
    use proptest::prelude::*;

    /// `COPY (SELECT …) TO STDOUT` from Postgres 15 of two rows: tabs, newlines, backslashes,
    /// a literal `\N` string, NULL, non-ASCII text, control characters, an empty string.
    const CAPTURED: &str = "31097461625c74686572655c6e6e65775c5c6c696e65205c5c4e095c4e09c3bc6ec3af20f09f8e8909740931302e302e302e31095c5c7830306666097b22612062222c4e554c4c2c22785c5c2279227d095c725c625c66760a3209095c5c4e09706c61696e0966093a3a31095c5c78097b7d09780a";

    fn captured() -> Vec<u8> {
        (0..CAPTURED.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&CAPTURED[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn copy_text_from_a_real_server_unescapes() {
        let rows = ChunkRows::from_copy_text(&captured(), 9).expect("parses");
        assert_eq!(rows.len(), 2);
        let row0: Vec<Option<&str>> = rows.row(0).collect();
        assert_eq!(
            row0,
            vec![
                Some("1"),
                Some("tab\there\nnew\\line \\N"),
                None,
                Some("ünï 🎉"),
                Some("t"),
                Some("10.0.0.1"),
                Some("\\x00ff"),
                Some("{\"a b\",NULL,\"x\\\"y\"}"),
                Some("\r\u{8}\u{c}v"),
            ]
        );
        let row1: Vec<Option<&str>> = rows.row(1).collect();
        assert_eq!(
            row1,
            vec![
                Some("2"),
                Some(""),
                Some("\\N"),
                Some("plain"),
                Some("f"),
                Some("::1"),
                Some("\\x"),
                Some("{}"),
                Some("x"),
            ]
        );
        assert_eq!(rows.key(1, &[0, 3]), vec!["2".to_string(), "plain".into()]);
    }

    #[test]
    fn encoded_rows_are_envelopes_of_one_snapshot_read() {
        let shape = TableShape {
            schema: "public".into(),
            table: "top_clients".into(),
            columns: vec![("id".into(), 20), ("name".into(), 25)],
            key: vec![("id".into(), "bigint".into())],
            key_index: vec![0],
        };
        let rows = ChunkRows::from_copy_text(b"7\tclient \"7\"\n8\t\\N\n", 2).expect("parses");
        let at = Lsn(0x1_0000_00AB);
        let events = encode_rows(
            "shop",
            "cdc",
            &shape,
            &TypeRegistry::new(),
            &rows,
            &[0, 1],
            at,
        );
        assert_eq!(events.len(), 2);
        for (i, encoded) in events.iter().enumerate() {
            let ev: ChangeEvent = serde_json::from_slice(&encoded.body).expect("an envelope");
            assert_eq!(ev.op, Op::Read);
            assert_eq!((ev.source.lsn, ev.source.commit_lsn), (at, at));
            assert!(ev.source.snapshot);
            assert_eq!(ev.source.table, "top_clients");
            assert_eq!(ev.ts_ms, ev.source.ts_ms);
            assert_eq!(ev.msg_id(), format!("1/AB:{}", i + 1));
            let tx = ev.transaction.expect("transaction block");
            assert_eq!(tx.id, "snapshot:1/AB");
            assert_eq!(
                (tx.total_order, tx.data_collection_order),
                (i as u64 + 1, i as u64 + 1)
            );
            assert_eq!(tx.last, i == 1);
            assert_eq!(encoded.last, i == 1);
        }
        let first: ChangeEvent = serde_json::from_slice(&events[0].body).expect("an envelope");
        let after = first.after.expect("after");
        assert_eq!(after["id"], serde_json::json!(7));
        assert_eq!(after["name"], serde_json::json!("client \"7\""));
    }

    #[test]
    fn copy_text_refuses_bad_shapes() {
        assert!(matches!(
            ChunkRows::from_copy_text(b"1\t2\n", 3),
            Err(CopyDataError::FieldCount {
                row: 0,
                got: 2,
                expected: 3
            })
        ));
        assert!(matches!(
            ChunkRows::from_copy_text(b"1\t2", 2),
            Err(CopyDataError::Truncated)
        ));
        assert!(matches!(
            ChunkRows::from_copy_text(b"\xff\n", 1),
            Err(CopyDataError::Utf8)
        ));
        let empty = ChunkRows::from_copy_text(b"", 4).expect("empty");
        assert!(empty.is_empty());
        assert_eq!(empty.len(), 0);
    }

    #[test]
    fn snapshot_text_parses() {
        let s = SnapshotXids::parse("745:750:745,748").expect("parses");
        assert_eq!((s.xmin, s.xmax), (745, 750));
        assert!(s.xip.contains(&745) && s.xip.contains(&748));
        assert_eq!(
            SnapshotXids::parse("10:10:"),
            Some(SnapshotXids {
                xmin: 10,
                xmax: 10,
                xip: HashSet::new()
            })
        );
        for bad in ["", "1", "1:2", "2:1:", "a:b:", "1:5:x"] {
            assert_eq!(SnapshotXids::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn visibility_follows_xmin_xmax_and_the_running_list() {
        let s = SnapshotXids::parse("745:750:745,748").expect("parses");
        assert!(s.saw(700));
        assert!(!s.saw(745));
        assert!(s.saw(746));
        assert!(!s.saw(748));
        assert!(s.saw(749));
        assert!(!s.saw(750));
        assert!(!s.saw(9000));
        assert!(!s.saw(0));
        // Across an xid epoch: xmax just past 2^32.
        let e = SnapshotXids::parse("4294967290:4294967306:4294967300").expect("parses");
        assert!(e.saw(4_294_967_295)); // epoch 0, below xmax
        assert!(e.saw(3)); // epoch 1: 4294967299
        assert!(!e.saw(4)); // 4294967300 is running
        assert!(!e.saw(10)); // 4294967306 = xmax
    }

    #[test]
    fn races_are_the_keys_of_transactions_the_read_did_not_see() {
        let snapshot = SnapshotXids::parse("100:110:105").expect("parses");
        let mut watched = WatchedChanges::default();
        let key = |k: &str| vec![k.to_string()];
        watched.by_xid.insert(
            99,
            TxChanges {
                keys: vec![key("a")],
                whole_table: false,
            },
        );
        watched.by_xid.insert(
            105,
            TxChanges {
                keys: vec![key("b"), key("c")],
                whole_table: false,
            },
        );
        watched.by_xid.insert(
            111,
            TxChanges {
                keys: vec![key("d")],
                whole_table: false,
            },
        );
        let race = watched.races(&snapshot);
        assert!(!race.truncated);
        let mut keys: Vec<_> = race.keys.into_iter().collect();
        keys.sort();
        assert_eq!(keys, vec![key("b"), key("c"), key("d")]);

        let mut truncating = WatchedChanges::default();
        truncating.by_xid.insert(
            104,
            TxChanges {
                keys: vec![],
                whole_table: true,
            },
        );
        assert!(
            !truncating.races(&snapshot).truncated,
            "seen truncate is in the rows"
        );
        let mut late = WatchedChanges::default();
        late.by_xid.insert(
            120,
            TxChanges {
                keys: vec![],
                whole_table: true,
            },
        );
        assert!(late.races(&snapshot).truncated);
    }

    #[test]
    fn committed_xids_remember_order_prune_by_xmin_and_cap() {
        let mut c = CommittedXids::new(3);
        c.record(100);
        c.record(102);
        let mark = c.mark();
        c.record(101);
        let s = SnapshotXids::parse("100:110:100,101,102,105").expect("parses");
        // 101 committed after the mark; 105 never committed in the stream.
        assert_eq!(c.invisible_before(&s, mark), vec![100, 102]);
        c.forget_before(&SnapshotXids::parse("102:110:").expect("parses"));
        assert_eq!(c.len(), 1);
        assert_eq!(c.invisible_before(&s, u64::MAX), vec![102]);
        for x in 200..210 {
            c.record(x);
        }
        assert_eq!(c.len(), 3, "capped");
        c.record(0);
        assert_eq!(c.len(), 3, "xid 0 is not a transaction");
    }

    proptest! {
        #[test]
        fn copy_text_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512), ncols in 0usize..6) {
            if let Ok(rows) = ChunkRows::from_copy_text(&data, ncols) {
                for r in 0..rows.len() {
                    prop_assert_eq!(rows.row(r).count(), ncols);
                }
            }
        }

        #[test]
        fn copy_text_round_trips(values in proptest::collection::vec(proptest::option::of(".{0,12}"), 1..5), nrows in 1usize..4) {
            // Escape as COPY does, then parse back.
            let mut data = String::new();
            for _ in 0..nrows {
                let fields: Vec<String> = values.iter().map(|v| match v {
                    None => "\\N".to_string(),
                    Some(s) => s.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n").replace('\r', "\\r"),
                }).collect();
                data.push_str(&fields.join("\t"));
                data.push('\n');
            }
            let rows = ChunkRows::from_copy_text(data.as_bytes(), values.len()).expect("parses");
            prop_assert_eq!(rows.len(), nrows);
            for r in 0..nrows {
                let got: Vec<Option<String>> = rows.row(r).map(|v| v.map(str::to_string)).collect();
                prop_assert_eq!(&got, &values);
            }
        }

        #[test]
        fn snapshot_text_never_panics(text in ".{0,40}", xid in any::<u32>()) {
            if let Some(s) = SnapshotXids::parse(&text) {
                let _ = s.saw(xid);
            }
        }
    }
}
