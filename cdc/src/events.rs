//! Layer 2 of decoding: pgoutput messages plus cached relation schemas → change events.
//!
//! The builder holds back one event so that it can set `transaction.last` on the final event
//! of a transaction when the Commit arrives: memory stays at one event, whatever the size of
//! the transaction.

use std::collections::HashMap;

use base64::Engine;
use serde_json::Value;

use crate::envelope::{ChangeEvent, Op, Row, Source, TransactionInfo};
use crate::lsn::Lsn;
use crate::pgoutput::{
    Column, LogicalDecodingMessage, LogicalMessage, OldTuple, Relation, RelationId, TupleData,
    TupleValue,
};
use crate::value::TypeRegistry;

/// What the reader must do after feeding a message to the [`ChangeBuilder`].
#[derive(Debug)]
pub enum Output {
    /// Publish this event.
    Event(Box<ChangeEvent>),
    /// The transaction whose commit record starts at `commit_lsn` is complete; once every
    /// event before this point is acknowledged, `end_lsn` may be confirmed to Postgres.
    TxEnd {
        /// Start of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: the position to confirm.
        end_lsn: Lsn,
        /// Events the transaction produced.
        events: u64,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message(LogicalDecodingMessage),
}

/// A change referenced a relation the stream never described.
#[derive(Debug, thiserror::Error)]
#[error("change for relation {0} arrived before its Relation message: the stream is out of protocol; restart the reader")]
pub struct UnknownRelation(pub u32);

struct Tx {
    xid: u32,
    commit_lsn: Lsn,
    ts_ms: i64,
    ordinal: u64,
    per_table: HashMap<RelationId, u64>,
}

/// Turns pgoutput messages into [`ChangeEvent`]s.
pub struct ChangeBuilder {
    db: String,
    relations: HashMap<RelationId, Relation>,
    types: TypeRegistry,
    tx: Option<Tx>,
    pending: Option<ChangeEvent>,
}

impl ChangeBuilder {
    /// A builder for events of database `db`.
    pub fn new(db: impl Into<String>) -> Self {
        ChangeBuilder {
            db: db.into(),
            relations: HashMap::new(),
            types: TypeRegistry::new(),
            tx: None,
            pending: None,
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
                let events = self.tx.as_ref().map_or(0, |t| t.ordinal);
                if let Some(mut ev) = self.pending.take() {
                    if let Some(t) = ev.transaction.as_mut() {
                        t.last = true;
                    }
                    out.push(Output::Event(Box::new(ev)));
                }
                self.tx = None;
                out.push(Output::TxEnd {
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    events,
                });
            }
            LogicalMessage::Relation(r) => {
                self.relations.insert(r.id, r);
            }
            LogicalMessage::Type(_) | LogicalMessage::Origin(_) => {}
            LogicalMessage::Insert(i) => {
                let rel = self.relation(i.relation_id)?;
                let (after, toast) = self.row(rel, &i.new, false);
                let ev = self.event(lsn, i.relation_id, Op::Create, None, Some(after), toast)?;
                self.push(ev, out);
            }
            LogicalMessage::Update(u) => {
                let rel = self.relation(u.relation_id)?;
                let (after, toast) = self.row(rel, &u.new, false);
                let before = match &u.old {
                    Some(old) => Some(self.old_row(rel, old)),
                    // No old tuple: the key did not change; carry it from the new row so that
                    // consumers always find the key in `before`.
                    None => Some(self.key_of(rel, &u.new)),
                };
                let ev = self.event(lsn, u.relation_id, Op::Update, before, Some(after), toast)?;
                self.push(ev, out);
            }
            LogicalMessage::Delete(d) => {
                let rel = self.relation(d.relation_id)?;
                let before = self.old_row(rel, &d.old);
                let ev = self.event(lsn, d.relation_id, Op::Delete, Some(before), None, vec![])?;
                self.push(ev, out);
            }
            LogicalMessage::Truncate(t) => {
                for id in t.relation_ids {
                    let ev = self.event(lsn, id, Op::Truncate, None, None, vec![])?;
                    self.push(ev, out);
                }
            }
            LogicalMessage::Message(m) => out.push(Output::Message(m)),
        }
        Ok(())
    }

    fn relation(&self, id: RelationId) -> Result<&Relation, UnknownRelation> {
        self.relations.get(&id).ok_or(UnknownRelation(id.0))
    }

    fn push(&mut self, ev: ChangeEvent, out: &mut Vec<Output>) {
        if let Some(prev) = self.pending.replace(ev) {
            out.push(Output::Event(Box::new(prev)));
        }
    }

    fn event(
        &mut self,
        lsn: Lsn,
        rel_id: RelationId,
        op: Op,
        before: Option<Row>,
        after: Option<Row>,
        unchanged_toast: Vec<String>,
    ) -> Result<ChangeEvent, UnknownRelation> {
        let rel = self
            .relations
            .get(&rel_id)
            .ok_or(UnknownRelation(rel_id.0))?;
        let (schema, table) = (rel.namespace.clone(), rel.name.clone());
        let (transaction, commit_lsn, tx_id, ts_ms) = match self.tx.as_mut() {
            Some(tx) => {
                tx.ordinal += 1;
                let per = tx.per_table.entry(rel_id).or_insert(0);
                *per += 1;
                (
                    Some(TransactionInfo {
                        id: format!("{}:{}", tx.xid, tx.commit_lsn),
                        total_order: tx.ordinal,
                        data_collection_order: *per,
                        last: false,
                    }),
                    tx.commit_lsn,
                    Some(tx.xid),
                    tx.ts_ms,
                )
            }
            None => (None, lsn, None, now_ms()),
        };
        Ok(ChangeEvent {
            op,
            before,
            after,
            unchanged_toast,
            source: Source {
                db: self.db.clone(),
                schema,
                table,
                lsn,
                commit_lsn,
                tx_id,
                ts_ms,
                snapshot: false,
            },
            transaction,
            ts_ms: now_ms(),
        })
    }

    /// A row from a tuple; unchanged TOAST columns are left out and listed.
    fn row(&self, rel: &Relation, tuple: &TupleData, keys_only: bool) -> (Row, Vec<String>) {
        let mut row = Row::new();
        let mut toast = Vec::new();
        for (col, val) in rel.columns.iter().zip(tuple.0.iter()) {
            if keys_only && !col.is_key {
                continue;
            }
            match val {
                TupleValue::UnchangedToast => toast.push(col.name.clone()),
                v => {
                    row.insert(col.name.clone(), self.value(col, v));
                }
            }
        }
        (row, toast)
    }

    fn old_row(&self, rel: &Relation, old: &OldTuple) -> Row {
        let keys_only = matches!(old.kind, crate::pgoutput::OldTupleKind::Key);
        self.row(rel, &old.tuple, keys_only).0
    }

    fn key_of(&self, rel: &Relation, tuple: &TupleData) -> Row {
        self.row(rel, tuple, true).0
    }

    fn value(&self, col: &Column, v: &TupleValue) -> Value {
        match v {
            TupleValue::Null | TupleValue::UnchangedToast => Value::Null,
            TupleValue::Text(b) => match std::str::from_utf8(b) {
                Ok(s) => self.types.to_json(col.type_oid, s),
                Err(_) => Value::String(String::from_utf8_lossy(b).into_owned()),
            },
            TupleValue::Binary(b) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
