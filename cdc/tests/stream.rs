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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toast_identity_full_and_schema_changes() -> anyhow::Result<()> {
    let env = Env::start(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         CREATE TABLE audit (id int PRIMARY KEY, note text);
         ALTER TABLE audit REPLICA IDENTITY FULL;",
        &["public.docs", "public.audit"],
    )
    .await?;
    let _reader = env.start_reader().await?;
    let sql = env.sql().await?;
    // 1 MB of text that does not compress: TOASTed out of line.
    let body: String = (0..1_000_000u32)
        .map(|i| char::from(b'a' + ((i.wrapping_mul(2_654_435_761) >> 13) % 26) as u8))
        .collect();
    sql.execute("INSERT INTO docs VALUES (1, 't', $1)", &[&body])
        .await?;
    sql.batch_execute(
        "UPDATE docs SET title = 't2' WHERE id = 1;
         INSERT INTO audit VALUES (1, 'a');",
    )
    .await?;
    sql.batch_execute("UPDATE audit SET note = 'b' WHERE id = 1")
        .await?;
    sql.batch_execute("ALTER TABLE audit ADD COLUMN extra int DEFAULT 7")
        .await?;
    sql.batch_execute("INSERT INTO audit (id, note) VALUES (2, 'c')")
        .await?;
    sql.batch_execute("ALTER TABLE audit DROP COLUMN note")
        .await?;
    sql.batch_execute("ALTER TABLE audit ALTER COLUMN extra TYPE text")
        .await?;
    sql.batch_execute("INSERT INTO audit VALUES (3, 'x')")
        .await?;
    let got = env.wait_for_events(6, WAIT).await?;
    // The TOASTed column is not re-sent on an update of another column.
    let upd = &got[1].event;
    assert_eq!(upd.op, Op::Update);
    assert_eq!(upd.unchanged_toast, vec!["body".to_string()]);
    assert!(!upd.after.as_ref().expect("after").contains_key("body"));
    assert_eq!(upd.after.as_ref().expect("after")["title"], json!("t2"));
    assert_eq!(
        got[0].event.after.as_ref().expect("after")["body"],
        json!(body)
    );
    // REPLICA IDENTITY FULL: the whole old row.
    let full = &got[3].event;
    assert_eq!(full.source.table, "audit");
    assert_eq!(
        full.before,
        json!({"id": 1, "note": "a"}).as_object().cloned()
    );
    // Later events carry the new shapes.
    assert_eq!(
        got[4].event.after,
        json!({"id": 2, "note": "c", "extra": 7})
            .as_object()
            .cloned()
    );
    assert_eq!(
        got[5].event.after,
        json!({"id": 3, "extra": "x"}).as_object().cloned()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_go_through_the_object_store() -> anyhow::Result<()> {
    // The test server keeps NATS' default max_payload of 1 MB.
    let env = Env::start(
        "CREATE TABLE blobs (id int PRIMARY KEY, v text)",
        &["public.blobs"],
    )
    .await?;
    let _reader = env.start_reader().await?;
    let big = "x".repeat(3 * 1024 * 1024);
    let sql = env.sql().await?;
    sql.execute("INSERT INTO blobs VALUES (1, $1)", &[&big])
        .await?;
    sql.execute("INSERT INTO blobs VALUES (2, 'small')", &[])
        .await?;
    let got = env.wait_for_events(2, WAIT).await?;
    assert!(got[0].headers.contains_key("Cdc-Large-Ref"));
    assert_eq!(got[0].event.after.as_ref().expect("after")["v"], json!(big));
    assert!(!got[1].headers.contains_key("Cdc-Large-Ref"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_need_escaping_map_to_one_subject() -> anyhow::Result<()> {
    let env = Env::start(
        "CREATE SCHEMA \"my.schema\";
         CREATE TABLE \"my.schema\".\"Grüße Tab\" (id int PRIMARY KEY);",
        &["\"my.schema\".\"Grüße Tab\""],
    )
    .await?;
    let _reader = env.start_reader().await?;
    env.sql()
        .await?
        .batch_execute("INSERT INTO \"my.schema\".\"Grüße Tab\" VALUES (1)")
        .await?;
    let got = env.wait_for_events(1, WAIT).await?;
    assert_eq!(got[0].subject, "cdc.my%2Eschema.Gr%C3%BC%C3%9Fe%20Tab");
    assert_eq!(
        cdc::subject::parse_table_subject("cdc", &got[0].subject),
        Some(("my.schema".to_string(), "Grüße Tab".to_string()))
    );
    assert_eq!(got[0].headers["Cdc-Table"], "my.schema.Grüße Tab");
    Ok(())
}
