use super::*;
use cdc::envelope::{Source, TransactionInfo};
use serde_json::json;

fn view_cfg() -> ViewConfig {
    ViewConfig {
        name: "top_clients_by_seller".into(),
        source: "public.top_clients".into(),
        key: vec!["seller_id".into()],
        primary_key: vec!["seller_id".into(), "client_id".into()],
        columns: Some(vec!["client_id".into(), "name".into(), "position".into()]),
        column_types: Default::default(),
    }
}

fn row(v: serde_json::Value) -> Row {
    match v {
        Value::Object(m) => m,
        _ => Row::new(),
    }
}

fn ev(op: Op, lsn: u64, before: Option<Value>, after: Option<Value>) -> ChangeEvent {
    ChangeEvent {
        op,
        before: before.map(row),
        after: after.map(row),
        unchanged_toast: vec![],
        source: Source {
            db: "db".into(),
            schema: "public".into(),
            table: "top_clients".into(),
            lsn: Lsn(lsn),
            commit_lsn: Lsn(lsn),
            tx_id: Some(1),
            ts_ms: 0,
            snapshot: op == Op::Read,
        },
        transaction: Some(TransactionInfo {
            id: format!("1:{lsn}"),
            total_order: 1,
            data_collection_order: 1,
            last: true,
        }),
        ts_ms: 0,
    }
}

fn tx(seq: u64, events: Vec<ChangeEvent>) -> SourceTransaction {
    SourceTransaction {
        last_seq: seq,
        events,
    }
}

fn open(dir: &Path) -> ViewStore {
    ViewStore::open_at(dir, &[view_cfg()]).expect("opens")
}

fn client(seller: i64, client: i64, name: &str, pos: i64) -> Value {
    json!({"seller_id": seller, "client_id": client, "name": name, "position": pos, "extra": 1})
}

#[test]
fn insert_update_delete_and_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    s.apply(&[tx(
        1,
        vec![
            ev(Op::Create, 10, None, Some(client(7, 70, "Acme", 1))),
            ev(Op::Create, 10, None, Some(client(7, 71, "Beta", 2))),
            ev(Op::Create, 10, None, Some(client(8, 80, "Gamma", 1))),
        ],
    )])
    .expect("apply");
    let rows = s.get("top_clients_by_seller", &[json!(7)]).expect("get");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["name"], "Acme");
    assert!(!rows[0].contains_key("extra"), "projection drops columns");
    // Text parameters find numeric keys.
    assert_eq!(
        s.get("TOP_CLIENTS_BY_SELLER", &[json!("7")])
            .expect("get")
            .len(),
        2
    );
    s.apply(&[tx(
        2,
        vec![
            ev(Op::Update, 20, None, Some(client(7, 70, "Acme2", 1))),
            ev(
                Op::Delete,
                20,
                Some(json!({"seller_id": 7, "client_id": 71})),
                None,
            ),
        ],
    )])
    .expect("apply");
    let rows = s.get("top_clients_by_seller", &[json!(7)]).expect("get");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["name"], "Acme2");
    let p = s.progress();
    assert_eq!((p.applied_seq, p.applied_lsn), (2, Lsn(20)));
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.progress().applied_seq, 2);
    assert_eq!(s.progress().watermark, Lsn(20));
    assert_eq!(
        s.get("top_clients_by_seller", &[json!(7)])
            .expect("get")
            .len(),
        1
    );
}

#[test]
fn key_change_moves_the_row_and_toast_is_merged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    s.apply(&[tx(
        1,
        vec![ev(Op::Create, 10, None, Some(client(7, 70, "Acme", 1)))],
    )])
    .expect("apply");
    // Move client 70 from seller 7 to seller 9 (primary key and view key change).
    let mut e = ev(
        Op::Update,
        20,
        Some(json!({"seller_id": 7, "client_id": 70})),
        Some(json!({"seller_id": 9, "client_id": 70, "position": 3})),
    );
    e.unchanged_toast = vec!["name".into()];
    s.apply(&[tx(2, vec![e])]).expect("apply");
    assert!(s
        .get("top_clients_by_seller", &[json!(7)])
        .expect("get")
        .is_empty());
    let rows = s.get("top_clients_by_seller", &[json!(9)]).expect("get");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["name"], "Acme", "unchanged TOAST value kept");
    assert_eq!(rows[0]["position"], 3);
    // The old identity is gone: deleting it is a no-op, deleting the new one works.
    s.apply(&[tx(
        3,
        vec![ev(
            Op::Delete,
            30,
            Some(json!({"seller_id": 9, "client_id": 70})),
            None,
        )],
    )])
    .expect("apply");
    assert!(s
        .scan("top_clients_by_seller", 100, false)
        .expect("scan")
        .rows
        .is_empty());
}

#[test]
fn truncate_and_snapshot_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    s.apply(&[tx(
        1,
        vec![
            ev(Op::Create, 10, None, Some(client(1, 1, "a", 1))),
            ev(Op::Create, 10, None, Some(client(1, 2, "b", 2))),
        ],
    )])
    .expect("apply");
    // Truncate and insert in the same batch.
    s.apply(&[
        tx(2, vec![ev(Op::Truncate, 20, None, None)]),
        tx(
            3,
            vec![ev(Op::Create, 30, None, Some(client(2, 5, "c", 1)))],
        ),
    ])
    .expect("apply");
    let all = s
        .scan("top_clients_by_seller", 100, false)
        .expect("scan")
        .rows;
    assert_eq!(all.len(), 1);
    // A snapshot beginning at 40 confirms (2,6) only; (2,5) was written before it began.
    let mut r = ev(Op::Read, 45, None, Some(client(2, 6, "d", 2)));
    r.transaction = None;
    let mut e = ev(Op::SnapshotEnd, 40, None, None);
    e.source.commit_lsn = Lsn(50);
    s.apply(&[tx(4, vec![r]), tx(5, vec![e])]).expect("apply");
    let all = s
        .scan("top_clients_by_seller", 100, false)
        .expect("scan")
        .rows;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["client_id"], 6);
}

#[test]
fn dropped_column_makes_the_view_stale() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    s.apply(&[tx(
        1,
        vec![ev(
            Op::Create,
            10,
            None,
            Some(json!({"seller_id": 1, "client_id": 1, "position": 1})),
        )],
    )])
    .expect("apply");
    let err = s
        .get("top_clients_by_seller", &[json!(1)])
        .expect_err("stale");
    assert!(err.to_string().contains("\"name\""), "{err}");
    assert!(s.status()[0].stale.is_some());
    drop(s);
    let s = open(dir.path());
    assert!(s.status()[0].stale.is_some(), "stale survives restart");
    assert!(s
        .scan("top_clients_by_seller", 10, true)
        .expect("allowed")
        .stale
        .is_some());
}

#[test]
fn heartbeat_moves_the_watermark_and_wait_for_lsn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    s.record_heartbeat(5, Lsn(100)).expect("hb");
    assert_eq!(s.progress().watermark, Lsn(100));
    assert_eq!(s.progress().applied_seq, 5);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        assert_eq!(
            s.wait_for_lsn(Lsn(50), Duration::from_millis(10))
                .await
                .ok(),
            Some(Lsn(100))
        );
        assert!(matches!(
            s.wait_for_lsn(Lsn(101), Duration::from_millis(10)).await,
            Err(QueryError::LsnTimeout { .. })
        ));
    });
    drop(s);
    assert_eq!(open(dir.path()).progress().watermark, Lsn(100));
}

#[test]
fn changed_definition_is_stale_until_reset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    s.apply(&[tx(
        1,
        vec![ev(Op::Create, 10, None, Some(client(1, 1, "a", 1)))],
    )])
    .expect("apply");
    drop(s);
    let mut cfg = view_cfg();
    cfg.columns = Some(vec!["name".into()]);
    let s = ViewStore::open_at(dir.path(), &[cfg]).expect("opens");
    assert!(s.status()[0]
        .stale
        .as_deref()
        .is_some_and(|r| r.contains("replay")));
    s.reset(1).expect("reset");
    assert!(s.status()[0].stale.is_none());
    assert_eq!(s.progress().applied_seq, 0);
    assert!(s
        .scan("top_clients_by_seller", 10, false)
        .expect("scan")
        .rows
        .is_empty());
}

#[test]
fn in_lists_read_at_one_point_and_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    let events = (0..10)
        .map(|i| ev(Op::Create, 10, None, Some(client(i % 3, i, "x", 1))))
        .collect();
    s.apply(&[tx(1, events)]).expect("apply");
    let r = s
        .lookup(
            "top_clients_by_seller",
            &[vec![json!(0)], vec![json!(2)], vec![json!(0)]],
            100,
            false,
        )
        .expect("lookup");
    assert_eq!(r.rows.len(), 4 + 3);
    let r = s.scan("top_clients_by_seller", 5, false).expect("scan");
    assert_eq!(r.rows.len(), 5);
    assert!(r.truncated);
    assert!(matches!(
        s.get("nope", &[json!(1)]),
        Err(QueryError::UnknownView(_))
    ));
}

#[test]
fn key_outside_the_primary_key_uses_the_identity_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = view_cfg();
    cfg.name = "by_name".into();
    cfg.key = vec!["name".into()];
    let s = ViewStore::open_at(dir.path(), &[cfg]).expect("opens");
    s.apply(&[tx(
        1,
        vec![ev(Op::Create, 10, None, Some(client(7, 70, "Acme", 1)))],
    )])
    .expect("apply");
    // The name (the view key) changes without a key change at the source: the row moves.
    let mut e = ev(
        Op::Update,
        20,
        None,
        Some(json!({"seller_id": 7, "client_id": 70, "position": 2})),
    );
    e.unchanged_toast = vec!["name".into()];
    s.apply(&[tx(2, vec![e])]).expect("apply");
    assert_eq!(
        s.get("by_name", &[json!("Acme")]).expect("get")[0]["position"],
        2
    );
    s.apply(&[tx(
        3,
        vec![ev(Op::Update, 30, None, Some(client(7, 70, "Zeta", 3)))],
    )])
    .expect("apply");
    assert!(s.get("by_name", &[json!("Acme")]).expect("get").is_empty());
    assert_eq!(s.get("by_name", &[json!("Zeta")]).expect("get").len(), 1);
    s.apply(&[tx(
        4,
        vec![ev(
            Op::Delete,
            40,
            Some(json!({"seller_id": 7, "client_id": 70})),
            None,
        )],
    )])
    .expect("apply");
    assert!(s.scan("by_name", 10, false).expect("scan").rows.is_empty());
    assert!(
        s.tree.scan_prefix(b"p").next().is_none(),
        "identity index cleaned up"
    );
}

#[test]
fn every_value_kind_is_stored_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = view_cfg();
    cfg.columns = Some(vec![
        "name".into(),
        "f".into(),
        "b".into(),
        "j".into(),
        "u".into(),
        "n".into(),
    ]);
    let s = ViewStore::open_at(dir.path(), &[cfg]).expect("opens");
    let row = json!({"seller_id": -7, "client_id": 70, "name": "Acme \u{0} ü", "f": 1.5, "b": true,
                     "j": {"a": [1, null, "x"]}, "u": u64::MAX, "n": null});
    s.apply(&[tx(1, vec![ev(Op::Create, 10, None, Some(row.clone()))])])
        .expect("apply");
    let got = s.get("top_clients_by_seller", &[json!(-7)]).expect("get");
    assert_eq!(got, vec![super::tests::row(row)]);
}

#[test]
fn view_ids_survive_reordering_and_a_new_view() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = view_cfg();
    let mut b = view_cfg();
    b.name = "ids_only".into();
    b.columns = Some(vec!["client_id".into()]);
    {
        let s = ViewStore::open_at(dir.path(), &[a.clone(), b.clone()]).expect("opens");
        s.apply(&[tx(
            1,
            vec![ev(Op::Create, 10, None, Some(client(7, 70, "Acme", 1)))],
        )])
        .expect("apply");
        s.flush().expect("flush");
    }
    let mut c = view_cfg();
    c.name = "newcomer".into();
    let s = ViewStore::open_at(dir.path(), &[c, b, a]).expect("reopens");
    assert_eq!(
        s.get("top_clients_by_seller", &[json!(7)]).expect("get")[0]["name"],
        "Acme"
    );
    assert_eq!(
        s.get("ids_only", &[json!(7)]).expect("get")[0]["client_id"],
        70
    );
    // The new view has its own id: no rows of the others show through it (and it is stale
    // until rebuilt, because the store was built without it).
    assert!(s
        .lookup("newcomer", &[vec![json!(7)]], 10, true)
        .expect("lookup")
        .rows
        .is_empty());
}

#[test]
fn a_store_of_the_earlier_format_is_dropped_and_rebuilt() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = sled::open(dir.path()).expect("sled");
        let old = db.open_tree("views").expect("tree");
        old.insert(b"m\0seq", &42u64.to_be_bytes()).expect("insert");
        old.insert(b"ktop_clients_by_seller\0x", b"........{}")
            .expect("insert");
        db.flush().expect("flush");
    }
    let s = open(dir.path());
    assert_eq!(
        s.progress().applied_seq,
        0,
        "replays the stream from the start"
    );
    assert!(!s.db.tree_names().iter().any(|n| n.as_ref() == b"views"));
    assert!(s
        .scan("top_clients_by_seller", 10, false)
        .expect("scan")
        .rows
        .is_empty());
}

#[test]
fn overlapping_lookup_keys_return_each_row_once_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = view_cfg();
    cfg.key = vec!["seller_id".into(), "client_id".into()];
    let s = ViewStore::open_at(dir.path(), &[cfg]).expect("opens");
    let events = (0..6)
        .map(|i| ev(Op::Create, 10, None, Some(client(i % 2, i, "x", 1))))
        .collect();
    s.apply(&[tx(1, events)]).expect("apply");
    let r = s
        .lookup(
            "top_clients_by_seller",
            &[
                vec![json!(1), json!(3)],
                vec![json!(1)],
                vec![json!(0), json!(2)],
            ],
            100,
            false,
        )
        .expect("lookup");
    let ids: Vec<i64> = r
        .rows
        .iter()
        .map(|r| r["client_id"].as_i64().unwrap_or(-1))
        .collect();
    assert_eq!(ids, vec![2, 1, 3, 5]);
}

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// One random change of `top_clients` over 5 sellers × 6 clients: inserts, deletes,
/// key-changing updates, TOAST-merging updates and (rarely) truncates.
fn random_event(next: &mut impl FnMut(u64) -> i64, lsn: u64) -> ChangeEvent {
    let (s, c) = (next(5), next(6));
    match next(10) {
        0..=4 => ev(
            Op::Create,
            lsn,
            None,
            Some(client(s, c, NAMES[next(4) as usize], next(3))),
        ),
        5 | 6 => ev(
            Op::Delete,
            lsn,
            Some(json!({"seller_id": s, "client_id": c})),
            None,
        ),
        7 => {
            let to = next(5);
            ev(
                Op::Update,
                lsn,
                Some(json!({"seller_id": s, "client_id": c})),
                Some(client(to, c, NAMES[next(4) as usize], next(3))),
            )
        }
        8 => {
            // Position change with the name unchanged (TOAST merge).
            let mut e = ev(
                Op::Update,
                lsn,
                None,
                Some(json!({"seller_id": s, "client_id": c, "position": next(3)})),
            );
            e.unchanged_toast = vec!["name".into()];
            e
        }
        _ if next(20) == 0 => ev(Op::Truncate, lsn, None, None),
        _ => ev(Op::Create, lsn, None, Some(client(s, c, "a", 0))),
    }
}

/// A xorshift generator of numbers below `n`.
fn rng(mut state: u64) -> impl FnMut(u64) -> i64 {
    move |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n) as i64
    }
}

/// The two views of the differential tests: keyed inside the primary key (blind writes) and
/// outside it (reads before writes, through the `p` index).
fn two_views() -> [ViewConfig; 2] {
    let by_seller = view_cfg();
    let mut by_name = view_cfg();
    by_name.name = "by_name".into();
    by_name.key = vec!["name".into()];
    [by_seller, by_name]
}

fn all_rows(s: &ViewStore) -> Vec<Vec<Row>> {
    ["top_clients_by_seller", "by_name"]
        .iter()
        .map(|v| s.scan(v, usize::MAX, false).expect("scan").rows)
        .collect()
}

/// A large transaction applied in parts through staging ends exactly where the same
/// transaction applied as one batch does, and no part is visible before the last one.
#[test]
fn staged_parts_equal_one_batch_and_stay_invisible_until_the_last() {
    let views = two_views();
    let (d1, d2) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let whole = ViewStore::open_at(d1.path(), &views).expect("opens");
    let parts = ViewStore::open_at(d2.path(), &views).expect("opens");
    let mut next = rng(0x9E37_79B9_7F4A_7C15);
    for seq in 1..40u64 {
        let lsn = seq * 10;
        // Small transactions between large ones, so large ones start from varied states.
        let small: Vec<ChangeEvent> = (0..1 + next(3))
            .map(|_| random_event(&mut next, lsn))
            .collect();
        let small = tx(seq * 2, small);
        whole.apply(std::slice::from_ref(&small)).expect("apply");
        parts.apply(&[small]).expect("apply");
        let events: Vec<ChangeEvent> = (0..50 + next(200))
            .map(|_| random_event(&mut next, lsn + 5))
            .collect();
        let before = all_rows(&parts);
        let progress = parts.progress();
        let part_len = 1 + next(20) as usize;
        let mut staged = StagedTx::default();
        let last_len = (1 + next(part_len as u64) as usize).min(events.len());
        let (head, last) = events.split_at(events.len() - last_len);
        for part in head.chunks(part_len) {
            parts.stage(&mut staged, part).expect("stage");
            assert_eq!(all_rows(&parts), before, "a staged part is visible");
            assert_eq!(parts.progress(), progress, "progress moved with a part");
        }
        whole
            .apply(&[tx(seq * 2 + 1, events.clone())])
            .expect("apply");
        if seq % 2 == 0 {
            parts
                .commit_staged(staged, last, seq * 2 + 1)
                .expect("commit");
        } else {
            // Visible before the copy: the views read through staging.
            parts
                .stage_visible(staged, last, seq * 2 + 1)
                .expect("visible");
            assert!(parts.overlaid());
            assert_eq!(
                all_rows(&parts),
                all_rows(&whole),
                "overlaid, large tx {seq}"
            );
            assert_eq!(parts.progress(), whole.progress());
            parts.finish_visible().expect("copy");
        }
        assert!(!parts.overlaid());
        assert_eq!(all_rows(&parts), all_rows(&whole), "after large tx {seq}");
        assert_eq!(parts.progress(), whole.progress());
        assert_eq!(
            parts.views().iter().map(View::kinds).collect::<Vec<_>>(),
            whole.views().iter().map(View::kinds).collect::<Vec<_>>()
        );
    }
    assert!(
        parts.staging.is_empty(),
        "staging is cleared after a commit"
    );
}

/// A crash before the last part leaves staging without the marker: reopening discards it and
/// the views are as before the transaction. A crash after the marker (before or during the
/// copy) is finished on open: the whole transaction is visible, with its position.
#[test]
fn reopening_discards_incomplete_staging_and_finishes_a_complete_one() {
    let views = two_views();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut next = rng(7);
    let events: Vec<ChangeEvent> = (0..300).map(|_| random_event(&mut next, 20)).collect();
    let reference = tempfile::tempdir().expect("tempdir");
    let (empty, full) = {
        let r = ViewStore::open_at(reference.path(), &views).expect("opens");
        let empty = all_rows(&r);
        r.apply(&[tx(9, events.clone())]).expect("apply");
        (empty, (all_rows(&r), r.progress()))
    };
    {
        let s = ViewStore::open_at(dir.path(), &views).expect("opens");
        let mut staged = StagedTx::default();
        s.stage(&mut staged, &events[..200]).expect("stage");
        // Dropped here: a crash before the last part.
    }
    {
        let s = ViewStore::open_at(dir.path(), &views).expect("reopens");
        assert!(s.staging.is_empty(), "incomplete staging discarded");
        assert_eq!(all_rows(&s), empty);
        assert_eq!(s.progress().applied_seq, 0);
        let mut staged = StagedTx::default();
        s.stage(&mut staged, &events[..200]).expect("stage");
        // A crash right after the marker, before the copy.
        s.stage_marked(staged, &events[200..], 9).expect("marked");
        assert_eq!(all_rows(&s), empty, "nothing copied yet");
    }
    let s = ViewStore::open_at(dir.path(), &views).expect("reopens");
    assert!(s.staging.is_empty(), "finished staging cleared");
    assert_eq!((all_rows(&s), s.progress()), full);
}

/// While a visible large transaction is moved from staging into the views, queries (lookups
/// and scans, from two threads) read its rows and never a row it replaced: a key leaves
/// staging only after the views hold its new value, and a query that raced a move reads again.
#[test]
fn queries_during_the_copy_read_the_transaction_never_what_it_replaced() {
    const SELLERS: i64 = 2_000;
    const CLIENTS: i64 = 10;
    let dir = tempfile::tempdir().expect("tempdir");
    let s = open(dir.path());
    let rows = |name: &str| -> Vec<ChangeEvent> {
        (0..SELLERS)
            .flat_map(|seller| (0..CLIENTS).map(move |c| (seller, c)))
            .map(|(seller, c)| {
                ev(
                    if name == "old" {
                        Op::Create
                    } else {
                        Op::Update
                    },
                    if name == "old" { 10 } else { 20 },
                    None,
                    Some(client(seller, c, name, 1)),
                )
            })
            .collect()
    };
    s.apply(&[tx(1, rows("old"))]).expect("apply");
    let new = rows("new");
    let mut staged = StagedTx::default();
    let (head, last) = new.split_at(new.len() - 100);
    for part in head.chunks(1_000) {
        s.stage(&mut staged, part).expect("stage");
    }
    s.stage_visible(staged, last, 2).expect("visible");
    let copying = std::sync::atomic::AtomicBool::new(true);
    let all_new = |rows: &[Row]| rows.iter().all(|r| r.get("name") == Some(&json!("new")));
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..2)
            .map(|t| {
                let (s, copying) = (&s, &copying);
                scope.spawn(move || {
                    let mut reads = 0u64;
                    let mut seller = t;
                    while copying.load(std::sync::atomic::Ordering::Acquire) || reads < 100 {
                        seller = (seller * 31 + 7) % SELLERS;
                        let got = s
                            .get("top_clients_by_seller", &[json!(seller)])
                            .expect("get");
                        assert_eq!(got.len(), CLIENTS as usize, "seller {seller}");
                        assert!(
                            all_new(&got),
                            "seller {seller} read a replaced row: {got:?}"
                        );
                        if reads.is_multiple_of(500) {
                            let all = s.scan("top_clients_by_seller", usize::MAX, false);
                            let all = all.expect("scan").rows;
                            assert_eq!(all.len(), (SELLERS * CLIENTS) as usize);
                            assert!(all_new(&all), "a scan read a replaced row");
                        }
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        s.finish_visible().expect("copy");
        copying.store(false, std::sync::atomic::Ordering::Release);
        for r in readers {
            assert!(r.join().expect("reader") > 0);
        }
    });
    assert!(!s.overlaid());
    assert!(
        s.staging.iter().next().is_none(),
        "staging is empty after the copy"
    );
    let all = s
        .scan("top_clients_by_seller", usize::MAX, false)
        .expect("scan")
        .rows;
    assert_eq!(all.len(), (SELLERS * CLIENTS) as usize);
    assert!(all_new(&all));
}

/// The read cache never changes an answer: the same random workload applied to a store with
/// the cache and one without, with lookups between batches (filling the cache), always reads
/// the same, for a key inside the primary key and a key outside it.
#[test]
fn cached_reads_equal_uncached_reads() {
    let mut by_seller = view_cfg();
    by_seller.columns = Some(vec!["client_id".into(), "name".into(), "position".into()]);
    let mut by_name = view_cfg();
    by_name.name = "by_name".into();
    by_name.key = vec!["name".into()];
    let views = [by_seller, by_name];
    let (d1, d2) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let cached = ViewStore::open_with(
        d1.path(),
        &views,
        &StoreConfig {
            read_cache_rows: 50,
            ..StoreConfig::default()
        },
    )
    .expect("opens");
    let plain = ViewStore::open_with(
        d2.path(),
        &views,
        &StoreConfig {
            read_cache_rows: 0,
            ..StoreConfig::default()
        },
    )
    .expect("opens");
    let mut next = rng(0x2545_F491_4F6C_DD1D);
    let names = NAMES;
    for seq in 1..400u64 {
        let lsn = seq * 10;
        let mut events = Vec::new();
        for _ in 0..1 + next(4) {
            events.push(random_event(&mut next, lsn));
        }
        let t = tx(seq, events);
        cached.apply(std::slice::from_ref(&t)).expect("apply");
        plain.apply(&[t]).expect("apply");
        for _ in 0..4 {
            let keys = vec![vec![json!(next(5))], vec![json!(next(5))]];
            let a = cached
                .lookup("top_clients_by_seller", &keys, 100, false)
                .expect("lookup");
            let b = plain
                .lookup("top_clients_by_seller", &keys, 100, false)
                .expect("lookup");
            assert_eq!(a.rows, b.rows, "seq {seq}, keys {keys:?}");
            let name = json!(names[next(4) as usize]);
            assert_eq!(
                cached
                    .get("by_name", std::slice::from_ref(&name))
                    .expect("get"),
                plain.get("by_name", &[name]).expect("get"),
                "seq {seq}"
            );
        }
    }
    assert_eq!(
        cached.scan("by_name", 1000, false).expect("scan").rows,
        plain.scan("by_name", 1000, false).expect("scan").rows
    );
}

/// Lookups probe only the spellings of a value whose kind the key column has held (a number
/// key is not also looked up as text), and a kind seen later, or after a restart, is probed.
#[test]
fn key_kinds_limit_probes_without_losing_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = open(dir.path());
        s.apply(&[tx(
            1,
            vec![ev(Op::Create, 10, None, Some(client(7, 70, "Acme", 1)))],
        )])
        .expect("apply");
        assert_eq!(s.views()[0].kinds(), vec![kind_bit(&json!(7))]);
        // A text parameter finds the number key.
        assert_eq!(
            s.get("top_clients_by_seller", &[json!("7")])
                .expect("get")
                .len(),
            1
        );
        let prefixes = s.views()[0]
            .lookup_prefixes(&[vec![json!(7)]])
            .expect("prefixes");
        assert_eq!(prefixes.len(), 1, "only the number spelling is probed");
        // A text key arrives (a numeric source column, say): both spellings now.
        s.apply(&[tx(
            2,
            vec![
                ev(Op::Create, 20, None, Some(client(0, 71, "Beta", 2))).tap(|e| {
                    if let Some(a) = e.after.as_mut() {
                        a.insert("seller_id".into(), json!("7"));
                    }
                }),
            ],
        )])
        .expect("apply");
        assert_eq!(
            s.get("top_clients_by_seller", &[json!(7)])
                .expect("get")
                .len(),
            2
        );
        s.flush().expect("flush");
    }
    let s = open(dir.path());
    assert_eq!(
        s.get("top_clients_by_seller", &[json!("7")])
            .expect("get")
            .len(),
        2
    );
    s.reset(1).expect("reset");
    assert_eq!(s.views()[0].kinds(), vec![0]);
    assert!(s
        .get("top_clients_by_seller", &[json!(7)])
        .expect("get")
        .is_empty());
}

trait Tap: Sized {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}
impl Tap for ChangeEvent {}
