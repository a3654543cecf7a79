//! Snapshots while streaming (the DBLog method): each table is read in primary-key chunks, each
//! chunk bracketed by a low and a high watermark written into the WAL with
//! `pg_logical_emit_message`. Between the two watermarks the stream shows every change that
//! raced the chunk read; those keys are dropped from the chunk, and the rest are published as
//! `r` events at the high watermark's position in the stream. No transaction stays open longer
//! than one chunk read, and progress (the last key of the last finished chunk) lives in a
//! JetStream key-value bucket, so a restarted reader resumes where it stopped.
//!
//! When a table's last chunk is empty, an `e` (snapshot end) event follows, whose `source.lsn`
//! is where the table's snapshot began: a consumer deletes that table's rows it last wrote
//! before that LSN (rows deleted while it missed history).

use std::collections::{HashSet, VecDeque};
use std::io::Write as _;
use std::sync::Arc;

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

    /// The chunk query after `last_key` (text values), `limit` rows, in key order, every
    /// column as text.
    pub fn chunk_query(&self, last_key: Option<&[String]>, limit: usize) -> String {
        let cols = self
            .columns
            .iter()
            .map(|(c, _)| format!("s.{}::text", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ");
        // Qualified: a bare name in ORDER BY would mean the `::text` output column.
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

/// One chunk read between its watermarks.
#[derive(Debug, Default)]
pub struct ChunkRows {
    /// Rows: one text value (or NULL) per column of the shape.
    pub rows: Vec<Vec<Option<String>>>,
}

/// Reads one chunk: low watermark, the read, high watermark. Returns the rows; the watermark
/// contents are `low:<id>` and `high:<id>`.
pub async fn read_chunk(
    sql: &tokio_postgres::Client,
    shape: &TableShape,
    last_key: Option<&[String]>,
    limit: usize,
    id: u64,
) -> Result<ChunkRows, SnapshotError> {
    sql.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&WATERMARK_PREFIX, &format!("low:{id}")],
    )
    .await?;
    let messages = sql
        .simple_query(&shape.chunk_query(last_key, limit))
        .await?;
    let mut rows = Vec::new();
    for m in messages {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            rows.push(
                (0..shape.columns.len())
                    .map(|i| r.get(i).map(str::to_string))
                    .collect(),
            );
        }
    }
    sql.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[&WATERMARK_PREFIX, &format!("high:{id}")],
    )
    .await?;
    Ok(ChunkRows { rows })
}

/// Session settings that make `::text` output match pgoutput's (see pgconn.rs).
pub const SESSION_SETTINGS: &str = "SET DateStyle = ISO; SET TimeZone = 'UTC'; SET IntervalStyle = iso_8601; SET extra_float_digits = 3; SET bytea_output = hex";

/// Encodes snapshot rows as `r` events published at the high watermark `at`.
pub fn encode_rows(
    db: &str,
    prefix: &str,
    shape: &TableShape,
    types: &TypeRegistry,
    rows: &[Vec<Option<String>>],
    at: Lsn,
) -> Vec<EncodedEvent> {
    let subject = async_nats::Subject::from(table_subject(prefix, &shape.schema, &shape.table));
    let table: Arc<str> = Arc::from(format!("{}.{}", shape.schema, shape.table));
    let n = rows.len();
    let ts = now_ms();
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let mut body = Vec::with_capacity(256);
            body.extend_from_slice(b"{\"op\":\"r\",\"before\":null,\"after\":{");
            for (j, ((name, oid), value)) in shape.columns.iter().zip(row).enumerate() {
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
            let _ = write!(
                body,
                ",\"lsn\":\"{at}\",\"commit_lsn\":\"{at}\",\"txId\":null,\"ts_ms\":{ts},\"snapshot\":true}},\"transaction\":{{\"id\":\"snapshot:{at}\",\"total_order\":{ordinal},\"data_collection_order\":{ordinal},\"last\":{}}},\"ts_ms\":{ts}}}",
                ordinal == n as u64
            );
            EncodedEvent {
                op: Op::Read,
                subject: subject.clone(),
                table: Arc::clone(&table),
                commit_lsn: at,
                ordinal,
                body,
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
    }
}

/// Keys of one table changed in the stream between a chunk's watermarks.
#[derive(Debug, Default)]
pub struct RaceSet {
    /// Key values (text) seen in changes.
    pub keys: HashSet<Vec<String>>,
    /// A truncate was seen: drop the whole chunk.
    pub truncated: bool,
}

/// Tables waiting for or in a snapshot, in order.
#[derive(Debug, Default)]
pub struct SnapshotQueue {
    /// `(schema, table)` waiting.
    pub waiting: VecDeque<(String, String)>,
}
