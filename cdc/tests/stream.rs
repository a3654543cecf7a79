//! The reader against real Postgres and NATS: what reaches the stream, and in which order.

mod common;

use std::time::Duration;

use cdc::envelope::Op;
use common::Env;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_the_stream_once_in_commit_order() -> anyhow::Result<()> {
    let env = Env::start(
        "CREATE TABLE sellers (id int PRIMARY KEY, name text NOT NULL);
         CREATE TABLE top_clients (seller_id int, client_id int, name text, position int,
                                   PRIMARY KEY (seller_id, client_id));",
        &["public.sellers", "public.top_clients"],
    )
    .await?;
    let _reader = env.start_reader().await?;
    let sql = env.sql().await?;
    sql.batch_execute(
        "BEGIN;
         INSERT INTO sellers VALUES (1, 'ann'), (2, 'bob');
         INSERT INTO top_clients VALUES (1, 10, 'Acme', 1), (1, 11, 'Globex', 2);
         COMMIT;
         BEGIN;
         UPDATE top_clients SET position = 3 WHERE client_id = 10;
         UPDATE sellers SET name = 'robert' WHERE id = 2;
         DELETE FROM top_clients WHERE client_id = 11;
         COMMIT;
         UPDATE top_clients SET client_id = 12 WHERE client_id = 10;
         TRUNCATE sellers, top_clients;", // one implicit transaction
    )
    .await?;
    let got = env.wait_for_events(10, WAIT).await?;
    let summary: Vec<(Op, String, bool)> = got
        .iter()
        .map(|r| {
            let t = r.event.transaction.as_ref().expect("transaction info");
            (r.event.op, r.event.source.table.clone(), t.last)
        })
        .collect();
    use Op::*;
    let want: Vec<(Op, String, bool)> = [
        (Create, "sellers", false),
        (Create, "sellers", false),
        (Create, "top_clients", false),
        (Create, "top_clients", true),
        (Update, "top_clients", false),
        (Update, "sellers", false),
        (Delete, "top_clients", true),
        (Update, "top_clients", false),
        (Truncate, "sellers", false),
        (Truncate, "top_clients", true),
    ]
    .into_iter()
    .map(|(o, t, l)| (o, t.to_string(), l))
    .collect();
    assert_eq!(summary[..10], want[..], "events: {summary:?}");
    assert_eq!(got.len(), 10, "no extra events");

    // Envelope contents.
    let first = &got[0].event;
    assert_eq!(first.after.as_ref().expect("after")["name"], json!("ann"));
    assert_eq!(first.source.db, env.db);
    assert_eq!(first.source.schema, "public");
    let moved = &got[7].event;
    assert_eq!(
        moved.before.as_ref().expect("old key")["client_id"],
        json!(10)
    );
    assert_eq!(moved.after.as_ref().expect("after")["client_id"], json!(12));
    let deleted = &got[6].event;
    assert_eq!(
        deleted.before.as_ref().expect("key"),
        &json!({"seller_id": 1, "client_id": 11})
            .as_object()
            .cloned()
            .expect("obj")
    );
    // Order and ids: commit LSNs ascend, ordinals count 1.. within a transaction.
    for w in got.windows(2) {
        let (a, b) = (&w[0].event, &w[1].event);
        let (ta, tb) = (
            a.transaction.as_ref().expect("tx"),
            b.transaction.as_ref().expect("tx"),
        );
        if a.source.commit_lsn == b.source.commit_lsn {
            assert_eq!(tb.total_order, ta.total_order + 1);
        } else {
            assert!(a.source.commit_lsn < b.source.commit_lsn);
            assert!(ta.last);
            assert_eq!(tb.total_order, 1);
        }
    }
    for r in &got {
        assert_eq!(r.headers["Nats-Msg-Id"], r.event.msg_id());
        assert_eq!(r.headers["Cdc-Op"], r.event.op.code());
        assert_eq!(r.headers["Cdc-Table"], r.event.table_name());
        assert_eq!(
            r.headers["Cdc-Commit-Lsn"],
            r.event.source.commit_lsn.to_string()
        );
        assert_eq!(r.subject, format!("cdc.public.{}", r.event.source.table));
    }
    Ok(())
}
