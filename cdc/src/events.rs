//! Layer 2 of decoding: pgoutput messages plus cached relation schemas → change events, encoded
//! straight into the envelope's JSON (see [`crate::envelope::ChangeEvent`] for its shape).
//!
//! Each event is encoded as it arrives except for its tail (`"last":…},"ts_ms":…}`): the builder
//! holds the one latest event back until it knows whether the transaction ends with it, so
//! memory stays at one event whatever the size of the transaction.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;

use crate::envelope::Op;
use crate::lsn::Lsn;
use crate::pgoutput::{
    LogicalDecodingMessage, LogicalMessage, OldTuple, OldTupleKind, Relation, RelationId,
    TupleData, TupleValue,
};
use crate::snapshot::WatchedChanges;
use crate::subject;
use crate::value::{write_json_str, TypeRegistry};

/// One change event, encoded.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// What happened.
    pub op: Op,
    /// The table's subject.
    pub subject: async_nats::Subject,
    /// `schema.table`.
    pub table: Arc<str>,
    /// Commit LSN of the source transaction.
    pub commit_lsn: Lsn,
    /// `transaction.total_order`: 1-based position in the transaction.
    pub ordinal: u64,
    /// The envelope JSON.
    pub body: Vec<u8>,
    /// The last event of its source transaction (or snapshot chunk): the reader asks for its
    /// PubAck.
    pub last: bool,
}

/// What the reader must do after feeding a message to the [`ChangeBuilder`].
#[derive(Debug)]
pub enum Output {
    /// Publish this event.
    Event(EncodedEvent),
    /// The transaction whose commit record starts at `commit_lsn` is complete; once every
    /// event before this point is acknowledged, `end_lsn` may be confirmed to Postgres.
    TxEnd {
        /// Start of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: the position to confirm.
        end_lsn: Lsn,
        /// Events the transaction produced.
        events: u64,
        /// Its transaction id.
        xid: u32,
        /// Its commit time, ms since the Unix epoch.
        commit_ts_ms: i64,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message(LogicalDecodingMessage),
}

/// A change referenced a relation the stream never described.
#[derive(Debug, thiserror::Error)]
#[error("change for relation {0} arrived before its Relation message: the stream is out of protocol; restart the reader")]
pub struct UnknownRelation(pub u32);

/// A relation with the pieces of its events that never change, pre-encoded.
struct CachedRelation {
    rel: Relation,
    subject: async_nats::Subject,
    table: Arc<str>,
    /// `"db":…,"schema":…,"table":…,`
    source_names: Vec<u8>,
    /// `"col":` for each column.
    column_keys: Vec<Vec<u8>>,
}

struct Tx {
    xid: u32,
    commit_lsn: Lsn,
    ts_ms: i64,
    ordinal: u64,
    per_table: HashMap<RelationId, u64>,
}

/// Turns pgoutput messages into encoded change events.
pub struct ChangeBuilder {
    db: String,
    prefix: String,
    relations: HashMap<RelationId, CachedRelation>,
    types: TypeRegistry,
    tx: Option<Tx>,
    pending: Option<EncodedEvent>,
    watch: Option<Watch>,
}

/// Keys of one table to collect from the stream, by transaction (while it is snapshotted).
struct Watch {
    schema: String,
    table: String,
    key_columns: Vec<String>,
    seen: WatchedChanges,
}

impl ChangeBuilder {
    /// A builder for events of database `db`, published under `subject_prefix`.
    pub fn new(db: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        ChangeBuilder {
            db: db.into(),
            prefix: subject_prefix.into(),
            relations: HashMap::new(),
            types: TypeRegistry::new(),
            tx: None,
            pending: None,
            watch: None,
        }
    }

    /// Starts collecting the keys (`key_columns`, text values) of every change to
    /// `schema.table`, by transaction id.
    pub fn start_watch(&mut self, schema: &str, table: &str, key_columns: Vec<String>) {
        self.watch = Some(Watch {
            schema: schema.to_string(),
            table: table.to_string(),
            key_columns,
            seen: WatchedChanges::default(),
        });
    }

    /// Returns what was collected since the last call (or the start) and goes on collecting.
    pub fn take_watched(&mut self) -> WatchedChanges {
        self.watch
            .as_mut()
            .map(|w| std::mem::take(&mut w.seen))
            .unwrap_or_default()
    }

    /// Puts back what [`ChangeBuilder::take_watched`] returned (a chunk read again needs it).
    pub fn restore_watched(&mut self, earlier: WatchedChanges) {
        if let Some(w) = self.watch.as_mut() {
            w.seen.merge(earlier);
        }
    }

    /// Stops collecting.
    pub fn stop_watch(&mut self) {
        self.watch = None;
    }

    /// Commit LSN of the transaction being decoded.
    pub fn current_commit_lsn(&self) -> Option<Lsn> {
        self.tx.as_ref().map(|t| t.commit_lsn)
    }

    /// The database name events carry.
    pub fn db(&self) -> &str {
        &self.db
    }

    /// The type registry.
    pub fn types(&self) -> &TypeRegistry {
        &self.types
    }

    fn record_watched(&mut self, rel_id: RelationId, op: Op, tuples: &[&TupleData]) {
        let Some(watch) = self.watch.as_mut() else {
            return;
        };
        let Some(cached) = self.relations.get(&rel_id) else {
            return;
        };
        if cached.rel.namespace != watch.schema || cached.rel.name != watch.table {
            return;
        }
        // Row changes come inside a transaction; xid 0 (never assigned) is never visible to
        // a snapshot, so a change outside one is always treated as racing.
        let xid = self.tx.as_ref().map_or(0, |t| t.xid);
        let seen = watch.seen.by_xid.entry(xid).or_default();
        if op == Op::Truncate {
            seen.whole_table = true;
            return;
        }
        let positions: Option<Vec<usize>> = watch
            .key_columns
            .iter()
            .map(|k| cached.rel.columns.iter().position(|c| &c.name == k))
            .collect();
        let Some(positions) = positions else {
            // The key column is gone from the stream's shape: be safe, drop the chunk.
            seen.whole_table = true;
            return;
        };
        for tuple in tuples {
            let key: Option<Vec<String>> = positions
                .iter()
                .map(|&i| match tuple.0.get(i) {
                    Some(TupleValue::Text(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                    _ => None,
                })
                .collect();
            if let Some(key) = key {
                seen.keys.push(key);
            }
        }
    }

    /// The type registry, to load OIDs that a Relation message mentions.
    pub fn types_mut(&mut self) -> &mut TypeRegistry {
        &mut self.types
    }

    /// True between Begin and Commit.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Type OIDs of a relation that the registry does not know yet.
    pub fn unknown_types(&self, relation: &Relation) -> Vec<u32> {
        self.types
            .unknown(relation.columns.iter().map(|c| c.type_oid))
    }

    /// Feeds one message; `lsn` is the XLogData start position it came with.
    pub fn on_message(
        &mut self,
        lsn: Lsn,
        msg: LogicalMessage,
        out: &mut Vec<Output>,
    ) -> Result<(), UnknownRelation> {
        match msg {
            LogicalMessage::Begin(b) => {
                self.tx = Some(Tx {
                    xid: b.xid,
                    commit_lsn: b.final_lsn,
                    ts_ms: b.commit_time.unix_millis(),
                    ordinal: 0,
                    per_table: HashMap::new(),
                });
            }
            LogicalMessage::Commit(c) => {
                let (events, xid, commit_ts_ms) = self
                    .tx
                    .as_ref()
                    .map_or((0, 0, 0), |t| (t.ordinal, t.xid, t.ts_ms));
                self.flush_pending(true, out);
                self.tx = None;
                out.push(Output::TxEnd {
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    events,
                    xid,
                    commit_ts_ms,
                });
            }
            LogicalMessage::Relation(r) => {
                let cached = self.cache(r);
                self.relations.insert(cached.rel.id, cached);
            }
            LogicalMessage::Type(_) | LogicalMessage::Origin(_) => {}
            LogicalMessage::Insert(i) => {
                self.change(lsn, i.relation_id, Op::Create, None, Some(&i.new), out)?;
            }
            LogicalMessage::Update(u) => {
                let before = match &u.old {
                    Some(old) => Before::Old(old),
                    // No old tuple: the key did not change; carry it from the new row so that
                    // consumers always find the key in `before`.
                    None => Before::KeyOf(&u.new),
                };
                self.change(
                    lsn,
                    u.relation_id,
                    Op::Update,
                    Some(before),
                    Some(&u.new),
                    out,
                )?;
            }
            LogicalMessage::Delete(d) => {
                self.change(
                    lsn,
                    d.relation_id,
                    Op::Delete,
                    Some(Before::Old(&d.old)),
                    None,
                    out,
                )?;
            }
            LogicalMessage::Truncate(t) => {
                for id in t.relation_ids {
                    self.change(lsn, id, Op::Truncate, None, None, out)?;
                }
            }
            LogicalMessage::Message(m) => out.push(Output::Message(m)),
        }
        Ok(())
    }

    fn cache(&self, rel: Relation) -> CachedRelation {
        let mut source_names = Vec::new();
        source_names.extend_from_slice(b"\"db\":");
        write_json_str(&mut source_names, &self.db);
        source_names.extend_from_slice(b",\"schema\":");
        write_json_str(&mut source_names, &rel.namespace);
        source_names.extend_from_slice(b",\"table\":");
        write_json_str(&mut source_names, &rel.name);
        source_names.push(b',');
        let column_keys = rel
            .columns
            .iter()
            .map(|c| {
                let mut k = Vec::with_capacity(c.name.len() + 3);
                write_json_str(&mut k, &c.name);
                k.push(b':');
                k
            })
            .collect();
        CachedRelation {
            subject: async_nats::Subject::from(subject::table_subject(
                &self.prefix,
                &rel.namespace,
                &rel.name,
            )),
            table: Arc::from(format!("{}.{}", rel.namespace, rel.name)),
            source_names,
            column_keys,
            rel,
        }
    }

    fn flush_pending(&mut self, last: bool, out: &mut Vec<Output>) {
        if let Some(mut ev) = self.pending.take() {
            ev.last = last;
            // The tail left open by `change`.
            ev.body
                .extend_from_slice(if last { b"true}," } else { b"false}," });
            ev.body.extend_from_slice(b"\"ts_ms\":");
            push_int(&mut ev.body, now_ms());
            ev.body.push(b'}');
            out.push(Output::Event(ev));
        }
    }

    fn change(
        &mut self,
        lsn: Lsn,
        rel_id: RelationId,
        op: Op,
        before: Option<Before<'_>>,
        after: Option<&TupleData>,
        out: &mut Vec<Output>,
    ) -> Result<(), UnknownRelation> {
        if !self.relations.contains_key(&rel_id) {
            return Err(UnknownRelation(rel_id.0));
        }
        if self.watch.is_some() {
            let mut tuples: Vec<&TupleData> = Vec::with_capacity(2);
            match &before {
                Some(Before::Old(old)) => tuples.push(&old.tuple),
                Some(Before::KeyOf(t)) => tuples.push(t),
                None => {}
            }
            if let Some(t) = after {
                tuples.push(t);
            }
            self.record_watched(rel_id, op, &tuples);
        }
        self.flush_pending(false, out);
        let (xid, commit_lsn, tx_ts, ordinal, per_table) = match self.tx.as_mut() {
            Some(tx) => {
                tx.ordinal += 1;
                let per = tx.per_table.entry(rel_id).or_insert(0);
                *per += 1;
                (Some(tx.xid), tx.commit_lsn, tx.ts_ms, tx.ordinal, *per)
            }
            None => (None, lsn, now_ms(), 0, 0),
        };
        let Some(cached) = self.relations.get(&rel_id) else {
            return Err(UnknownRelation(rel_id.0));
        };
        let mut body = Vec::with_capacity(256);
        body.extend_from_slice(b"{\"op\":\"");
        body.extend_from_slice(op.code().as_bytes());
        body.extend_from_slice(b"\",\"before\":");
        match before {
            None => body.extend_from_slice(b"null"),
            Some(Before::Old(old)) => {
                let keys_only = matches!(old.kind, OldTupleKind::Key);
                self.write_row(cached, &old.tuple, keys_only, &mut body, None);
            }
            Some(Before::KeyOf(tuple)) => self.write_row(cached, tuple, true, &mut body, None),
        }
        body.extend_from_slice(b",\"after\":");
        let mut toast = Vec::new();
        match after {
            None => body.extend_from_slice(b"null"),
            Some(tuple) => self.write_row(cached, tuple, false, &mut body, Some(&mut toast)),
        }
        body.extend_from_slice(b",\"unchanged_toast\":[");
        for (i, col) in toast.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            write_json_str(&mut body, col);
        }
        body.extend_from_slice(b"],\"source\":{");
        body.extend_from_slice(&cached.source_names);
        body.extend_from_slice(b"\"lsn\":\"");
        body.extend_from_slice(lsn.text().as_bytes());
        body.extend_from_slice(b"\",\"commit_lsn\":\"");
        body.extend_from_slice(commit_lsn.text().as_bytes());
        body.extend_from_slice(b"\",\"txId\":");
        match xid {
            Some(x) => push_int(&mut body, x),
            None => body.extend_from_slice(b"null"),
        }
        body.extend_from_slice(b",\"ts_ms\":");
        push_int(&mut body, tx_ts);
        body.extend_from_slice(b",\"snapshot\":false},\"transaction\":");
        let ev = EncodedEvent {
            op,
            subject: cached.subject.clone(),
            table: Arc::clone(&cached.table),
            commit_lsn,
            ordinal,
            body,
            last: true,
        };
        match xid {
            Some(x) => {
                let mut ev = ev;
                let b = &mut ev.body;
                b.extend_from_slice(b"{\"id\":\"");
                push_int(b, x);
                b.push(b':');
                b.extend_from_slice(commit_lsn.text().as_bytes());
                b.extend_from_slice(b"\",\"total_order\":");
                push_int(b, ordinal);
                b.extend_from_slice(b",\"data_collection_order\":");
                push_int(b, per_table);
                b.extend_from_slice(b",\"last\":");
                self.pending = Some(ev);
            }
            None => {
                // Outside a transaction (never for row changes in practice): no tail to wait for.
                let mut ev = ev;
                ev.body.extend_from_slice(b"null,\"ts_ms\":");
                push_int(&mut ev.body, now_ms());
                ev.body.push(b'}');
                out.push(Output::Event(ev));
            }
        }
        Ok(())
    }

    /// Writes a row object; unchanged TOAST columns are left out and, when `toast` is given,
    /// listed there.
    fn write_row(
        &self,
        cached: &CachedRelation,
        tuple: &TupleData,
        keys_only: bool,
        out: &mut Vec<u8>,
        mut toast: Option<&mut Vec<String>>,
    ) {
        out.push(b'{');
        let mut first = true;
        for ((col, key), val) in cached
            .rel
            .columns
            .iter()
            .zip(&cached.column_keys)
            .zip(tuple.0.iter())
        {
            if keys_only && !col.is_key {
                continue;
            }
            if let TupleValue::UnchangedToast = val {
                if let Some(t) = toast.as_deref_mut() {
                    t.push(col.name.clone());
                }
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(key);
            match val {
                TupleValue::Null | TupleValue::UnchangedToast => out.extend_from_slice(b"null"),
                TupleValue::Text(b) => match std::str::from_utf8(b) {
                    Ok(s) => self.types.write_json(col.type_oid, s, out),
                    Err(_) => write_json_str(out, &String::from_utf8_lossy(b)),
                },
                TupleValue::Binary(b) => {
                    write_json_str(out, &base64::engine::general_purpose::STANDARD.encode(b))
                }
            }
        }
        out.push(b'}');
    }
}

enum Before<'a> {
    Old(&'a OldTuple),
    KeyOf(&'a TupleData),
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Appends `v` in decimal (the envelope's numbers are written per event; `write!` costs more).
fn push_int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::ChangeEvent;
    use crate::pgoutput::{Begin, Column, Commit, Insert, PgTimestamp, ReplicaIdentity, Update};
    use bytes::Bytes;
    use serde_json::json;

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn events(out: &[Output]) -> Vec<ChangeEvent> {
        out.iter()
            .filter_map(|o| match o {
                Output::Event(e) => Some(serde_json::from_slice(&e.body).expect("valid envelope")),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_transaction_becomes_envelopes_with_last_on_the_final_event() {
        let mut b = ChangeBuilder::new("shop \"db\"", "cdc");
        let mut out = Vec::new();
        let rel = Relation {
            id: RelationId(7),
            namespace: "public".into(),
            name: "t\u{e9}".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    is_key: true,
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                },
                Column {
                    is_key: false,
                    name: "doc".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
                Column {
                    is_key: false,
                    name: "n".into(),
                    type_oid: 1700,
                    type_modifier: -1,
                },
            ],
        };
        let commit = Lsn(0x500);
        let msgs = vec![
            LogicalMessage::Relation(rel),
            LogicalMessage::Begin(Begin {
                final_lsn: commit,
                commit_time: PgTimestamp(0),
                xid: 9,
            }),
            LogicalMessage::Insert(Insert {
                relation_id: RelationId(7),
                new: TupleData(vec![text("1"), text("a \"quote\"\n"), TupleValue::Null]),
            }),
            LogicalMessage::Update(Update {
                relation_id: RelationId(7),
                old: None,
                new: TupleData(vec![text("1"), TupleValue::UnchangedToast, text("1.50")]),
            }),
            LogicalMessage::Commit(Commit {
                flags: 0,
                commit_lsn: commit,
                end_lsn: Lsn(0x530),
                commit_time: PgTimestamp(0),
            }),
        ];
        for m in msgs {
            b.on_message(Lsn(0x400), m, &mut out)
                .expect("known relation");
        }
        let evs = events(&out);
        assert_eq!(evs.len(), 2);
        assert_eq!(
            evs[0].after,
            json!({"id": 1, "doc": "a \"quote\"\n", "n": null})
                .as_object()
                .cloned()
        );
        assert_eq!(evs[0].source.db, "shop \"db\"");
        assert_eq!(evs[0].source.table, "t\u{e9}");
        assert_eq!(evs[0].source.commit_lsn, commit);
        assert_eq!(evs[0].source.lsn, Lsn(0x400));
        assert!(!evs[0].source.snapshot);
        assert_eq!(evs[0].source.tx_id, Some(9));
        assert_eq!(evs[0].source.ts_ms, 946_684_800_000);
        let t0 = evs[0].transaction.as_ref().expect("tx");
        assert_eq!(
            (t0.total_order, t0.data_collection_order, t0.last),
            (1, 1, false)
        );
        assert_eq!(t0.id, "9:0/500");
        assert_eq!(evs[1].op, Op::Update);
        assert_eq!(evs[1].before, json!({"id": 1}).as_object().cloned());
        assert_eq!(
            evs[1].after,
            json!({"id": 1, "n": "1.50"}).as_object().cloned()
        );
        assert_eq!(evs[1].unchanged_toast, vec!["doc".to_string()]);
        let t1 = evs[1].transaction.as_ref().expect("tx");
        assert_eq!(
            (t1.total_order, t1.data_collection_order, t1.last),
            (2, 2, true)
        );
        assert_eq!(evs[1].msg_id(), "0/500:2");
        assert!(evs[1].ts_ms > 0);
        assert!(matches!(
            out.last(),
            Some(Output::TxEnd {
                end_lsn: Lsn(0x530),
                events: 2,
                ..
            })
        ));
        match &out[0] {
            Output::Event(e) => {
                assert_eq!(e.subject.as_str(), "cdc.public.t%C3%A9");
                assert_eq!(&*e.table, "public.t\u{e9}");
                assert_eq!(e.ordinal, 1);
            }
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[test]
    fn changes_before_their_relation_are_refused() {
        let mut b = ChangeBuilder::new("db", "cdc");
        let mut out = Vec::new();
        let err = b
            .on_message(
                Lsn(1),
                LogicalMessage::Insert(Insert {
                    relation_id: RelationId(3),
                    new: TupleData(vec![]),
                }),
                &mut out,
            )
            .expect_err("unknown relation");
        assert_eq!(err.0, 3);
    }
}
