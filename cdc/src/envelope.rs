//! The event envelope: the JSON body of every stream message, shared by the reader and the agents.
//!
//! Field names follow Debezium's so that existing tooling can read the stream. See DESIGN.md,
//! "Event envelope".

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::lsn::Lsn;

/// Header carrying the JetStream de-duplication id, `<commit_lsn>:<ordinal>`.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// Header carrying the operation letter (`c`, `u`, `d`, `r`, `t`, `e`).
pub const HEADER_OP: &str = "Cdc-Op";
/// Header carrying `schema.table` (unescaped).
pub const HEADER_TABLE: &str = "Cdc-Table";
/// Header carrying the commit LSN of the source transaction.
pub const HEADER_COMMIT_LSN: &str = "Cdc-Commit-Lsn";
/// Header naming the object-store object that holds the body of a large event.
pub const HEADER_LARGE_REF: &str = "Cdc-Large-Ref";

/// A row as a JSON object: column name → value.
pub type Row = Map<String, Value>;

/// What happened to a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Insert.
    #[serde(rename = "c")]
    Create,
    /// Update.
    #[serde(rename = "u")]
    Update,
    /// Delete.
    #[serde(rename = "d")]
    Delete,
    /// A row read by a snapshot (an upsert for consumers).
    #[serde(rename = "r")]
    Read,
    /// Truncate of the whole table.
    #[serde(rename = "t")]
    Truncate,
    /// End of a table's snapshot: rows of that table that the snapshot did not confirm are gone.
    #[serde(rename = "e")]
    SnapshotEnd,
}

impl Op {
    /// The one-letter code used in the envelope and the `Cdc-Op` header.
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
            Op::SnapshotEnd => "e",
        }
    }

    /// Parses a one-letter code.
    pub fn from_code(code: &str) -> Option<Op> {
        Some(match code {
            "c" => Op::Create,
            "u" => Op::Update,
            "d" => Op::Delete,
            "r" => Op::Read,
            "t" => Op::Truncate,
            "e" => Op::SnapshotEnd,
            _ => return None,
        })
    }
}

/// Where an event came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// Source database name.
    pub db: String,
    /// Schema of the table.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// LSN of the change itself (for snapshot reads: the high watermark of the chunk).
    pub lsn: Lsn,
    /// LSN of the commit record of the source transaction (for snapshot reads: the chunk's watermark).
    pub commit_lsn: Lsn,
    /// Source transaction id (absent for snapshot reads).
    #[serde(rename = "txId")]
    pub tx_id: Option<u32>,
    /// Commit time of the source transaction, ms since the Unix epoch.
    pub ts_ms: i64,
    /// True for rows emitted by a snapshot.
    pub snapshot: bool,
}

/// Position of an event inside its source transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionInfo {
    /// `<txId>:<commit_lsn>`.
    pub id: String,
    /// 1-based position of the event among all events of the transaction.
    pub total_order: u64,
    /// 1-based position of the event among the transaction's events for the same table.
    pub data_collection_order: u64,
    /// True on the final event of the transaction: a consumer may apply the transaction now.
    pub last: bool,
}

/// One change to one row (or, for truncate, one table), as published to the stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// What happened.
    pub op: Op,
    /// Updates and deletes: the old row (replica identity FULL) or its key columns.
    pub before: Option<Row>,
    /// Inserts, updates and snapshot reads: the new row, without unchanged TOAST columns.
    pub after: Option<Row>,
    /// Columns of the table that this event does not carry because they did not change (TOAST).
    #[serde(default)]
    pub unchanged_toast: Vec<String>,
    /// Provenance.
    pub source: Source,
    /// Position inside the source transaction.
    pub transaction: Option<TransactionInfo>,
    /// When the reader produced the event, ms since the Unix epoch.
    pub ts_ms: i64,
}

impl ChangeEvent {
    /// The de-duplication id: `<commit_lsn>:<total_order>`.
    pub fn msg_id(&self) -> String {
        msg_id(
            self.source.commit_lsn,
            self.transaction.as_ref().map_or(0, |t| t.total_order),
        )
    }

    /// `schema.table` of the source table.
    pub fn table_name(&self) -> String {
        format!("{}.{}", self.source.schema, self.source.table)
    }

    /// True when a consumer may apply everything it has buffered: the event closes its
    /// source transaction, or it stands alone (snapshot rows).
    pub fn ends_transaction(&self) -> bool {
        self.transaction.as_ref().is_none_or(|t| t.last)
    }
}

/// Formats a de-duplication id, `<commit_lsn>:<ordinal>`.
pub fn msg_id(commit_lsn: Lsn, ordinal: u64) -> String {
    let lsn = commit_lsn.text();
    let mut digits = itoa::Buffer::new();
    let ordinal = digits.format(ordinal);
    let mut id = String::with_capacity(lsn.as_str().len() + 1 + ordinal.len());
    id.push_str(lsn.as_str());
    id.push(':');
    id.push_str(ordinal);
    id
}

/// Parses a de-duplication id back into its commit LSN and ordinal.
pub fn parse_msg_id(id: &str) -> Option<(Lsn, u64)> {
    let (lsn, ord) = id.rsplit_once(':')?;
    Some((lsn.parse().ok()?, ord.parse().ok()?))
}

/// Body of a `<prefix>._heartbeat` message: every change committed at or before `lsn` to a
/// published table is in the stream before this message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The safe LSN.
    pub lsn: Lsn,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn envelope_matches_design_example() {
        let json = r#"{
          "op": "c", "before": null,
          "after": {"seller_id": 7, "client_id": 70, "name": "Acme", "position": 1},
          "unchanged_toast": [],
          "source": {"db": "topclients", "schema": "public", "table": "top_clients",
                     "lsn": "0/16B3748", "commit_lsn": "0/16B37A0", "txId": 745,
                     "ts_ms": 1764230400000, "snapshot": false},
          "transaction": {"id": "745:0/16B37A0", "total_order": 3, "data_collection_order": 2, "last": true},
          "ts_ms": 1764230400003
        }"#;
        let ev: ChangeEvent = serde_json::from_str(json).expect("parses");
        assert_eq!(ev.op, Op::Create);
        assert_eq!(ev.source.commit_lsn, Lsn(0x16B37A0));
        assert_eq!(ev.msg_id(), "0/16B37A0:3");
        assert!(ev.ends_transaction());
        let again: ChangeEvent =
            serde_json::from_slice(&serde_json::to_vec(&ev).expect("encodes")).expect("parses");
        assert_eq!(again, ev);
    }

    #[test]
    fn msg_id_round_trips() {
        assert_eq!(parse_msg_id(&msg_id(Lsn(42), 7)), Some((Lsn(42), 7)));
        assert_eq!(parse_msg_id("garbage"), None);
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = serde_json::from_slice::<ChangeEvent>(&b);
        }
    }
}
