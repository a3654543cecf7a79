//! `view-agent verify` with the real reader: a view damaged on purpose through the library
//! (rows deleted, rows altered, stray rows added) is reported exactly, `--repair` restores
//! equality, and a second verify is clean; all while a workload changes other rows.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use cdc::envelope::Row;
use cdc::Lsn;
use consumers::control::RemoteAgent;
use consumers::verify::{verify, DiffKind, VerifyOptions};
use consumers::{Agent, AgentConfig};
use serde_json::{json, Value};
use tokio::sync::watch;

const STREAM: &str = "CDC";
const PREFIX: &str = "cdc";

const SCHEMA: &str = "
CREATE TABLE sellers (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE top_clients (
    seller_id bigint NOT NULL,
    client_id bigint NOT NULL,
    name text NOT NULL,
    position int NOT NULL,
    PRIMARY KEY (seller_id, client_id)
);
INSERT INTO sellers SELECT s, 'seller ' || s FROM generate_series(0, 19) s;
INSERT INTO top_clients SELECT s, c, 'c' || c, c FROM generate_series(0, 19) s, generate_series(0, 9) c;
";

const VIEWS: &str = r#"
[[views]]
name = "by_seller"
source = "public.top_clients"
key = ["seller_id"]
primary_key = ["seller_id", "client_id"]
columns = ["client_id", "name", "position"]

[[views]]
name = "by_name"
source = "public.top_clients"
key = ["name"]
primary_key = ["seller_id", "client_id"]
columns = ["position"]

[[views]]
name = "sellers"
source = "public.sellers"
key = ["id"]
primary_key = ["id"]
"#;

fn row(v: Value) -> Row {
    match v {
        Value::Object(m) => m,
        _ => Row::new(),
    }
}

fn pks(report: &consumers::verify::Report, view: &str, kind: DiffKind) -> BTreeSet<String> {
    report
        .views
        .iter()
        .find(|v| v.view == view)
        .map(|v| {
            v.diffs
                .values()
                .filter(|d| d.kind == kind)
                .map(|d| Value::Array(d.pk.clone()).to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_exactly_the_damage_and_repair_restores_equality() -> Result<()> {
    let pg = testkit::Postgres::start().await?;
    let nats = testkit::Nats::start().await?;
    let db = pg.create_database("verify").await?;
    pg.batch_execute(&db, SCHEMA).await?;
    let source_url = pg.url(&db);
    let text = format!(
        "[postgres]\nurl = {source_url:?}\nslot = \"cdc_slot\"\npublication = \"cdc_pub\"\n\
         tables = [\"public.sellers\", \"public.top_clients\"]\n\n\
         [nats]\nurl = {nats:?}\nstream = {STREAM:?}\nsubject_prefix = {PREFIX:?}\n",
        nats = nats.url(),
    );
    let cfg = cdc::config::CdcConfig::parse(&text)?;
    let (reader_stop, rx) = watch::channel(false);
    // The reader's future is not Send: it runs on a thread of its own.
    let reader = std::thread::spawn(move || -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(cdc::reader::run(cfg, rx))?)
    });
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("agent.toml");
    std::fs::write(
        &config_path,
        format!(
            "name = \"verified\"\ndata_dir = {data:?}\n[nats]\nurl = {url:?}\n[pgwire]\nlisten = \"\"\n{VIEWS}",
            data = dir.path().join("data").display().to_string(),
            url = nats.url(),
        ),
    )?;
    let config = AgentConfig::load(&config_path)?;
    let agent = Agent::start(config.clone()).await?;
    let sql = pg.connect(&db).await?;
    // The initial snapshot, then everything up to now.
    let now: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let now: Lsn = now.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    agent.wait_for_lsn(now, Duration::from_secs(90)).await?;
    testkit::until(Duration::from_secs(90), "snapshot rows", || async {
        let n = agent.scan("by_seller", usize::MAX).ok()?.rows.len();
        (n == 200).then_some(())
    })
    .await?;

    // A workload on sellers 10..19 while verifying (the damage is on sellers 0..9).
    let stop = Arc::new(AtomicBool::new(false));
    let workload = {
        let stop = stop.clone();
        let sql = pg.connect(&db).await?;
        tokio::spawn(async move {
            let mut i = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let s = 10 + i % 10;
                sql.batch_execute(&format!(
                    "BEGIN;
                     UPDATE top_clients SET position = position + 1, name = 'w{i}' WHERE seller_id = {s} AND client_id = {c};
                     UPDATE sellers SET name = 'seller {s} v{i}' WHERE id = {s};
                     COMMIT;",
                    c = i % 10
                ))
                .await?;
                i += 1;
            }
            anyhow::Ok(i)
        })
    };

    // The damage, through the library.
    let store = agent.store();
    let lsn = store.progress().applied_lsn;
    let pk = |s: i64, c: i64| vec![json!(s), json!(c)];
    store.write_rows(
        "by_seller",
        &[
            row(json!({"seller_id": 2, "client_id": 4, "name": "WRONG", "position": 4})),
            row(json!({"seller_id": 3, "client_id": 5, "name": "c5", "position": 99})),
            row(json!({"seller_id": 0, "client_id": 500, "name": "stray", "position": 1})),
            row(json!({"seller_id": 5, "client_id": 501, "name": "stray", "position": 2})),
        ],
        &[pk(0, 1), pk(0, 2), pk(1, 3)],
        lsn,
    )?;
    store.write_rows(
        "by_name",
        &[row(
            json!({"name": "c7", "seller_id": 2, "client_id": 7, "position": 77}),
        )],
        &[],
        lsn,
    )?;
    store.write_rows(
        "sellers",
        &[row(json!({"id": 999, "name": "stray seller"}))],
        &[vec![json!(4)]],
        lsn,
    )?;

    // Over NATS, as the command does: exactly the damage.
    let link = RemoteAgent::connect(&nats.url(), PREFIX, &config.name).await?;
    let opts = VerifyOptions {
        views: Vec::new(),
        repair: false,
        timeout: Duration::from_secs(60),
    };
    let report = verify(&link, &config, &source_url, &opts).await?;
    assert_eq!(
        pks(&report, "by_seller", DiffKind::Missing),
        set(&["[0,1]", "[0,2]", "[1,3]"])
    );
    assert_eq!(
        pks(&report, "by_seller", DiffKind::Extra),
        set(&["[0,500]", "[5,501]"])
    );
    assert_eq!(
        pks(&report, "by_seller", DiffKind::Differs),
        set(&["[2,4]", "[3,5]"])
    );
    assert_eq!(pks(&report, "by_name", DiffKind::Differs), set(&["[2,7]"]));
    assert_eq!(report.views[1].diffs.len(), 1, "{}", report.render(20));
    assert_eq!(pks(&report, "sellers", DiffKind::Missing), set(&["[4]"]));
    assert_eq!(pks(&report, "sellers", DiffKind::Extra), set(&["[999]"]));
    assert_eq!(report.differences(), 10, "{}", report.render(20));

    // The binary: exit 3 with the counts, then --repair, then clean.
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_view-agent"));
        cmd.args(["verify", "--config"])
            .arg(&config_path)
            .args(["--source-url", &source_url])
            .args(extra)
            .env("RUST_LOG", "warn");
        cmd.output()
    };
    let out = run(&[])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("3 missing, 2 extra, 2 differing"),
        "{stdout}"
    );
    assert!(stdout.contains("missing  pk=[0,1]"), "{stdout}");
    let out = run(&["--repair"])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("repaired view by_seller") && stdout.contains("deleted  pk=[0,500]"),
        "{stdout}"
    );
    let out = run(&[])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("views equal the source"), "{stdout}");

    // The applied position never moved back; after the workload the views equal the source.
    stop.store(true, Ordering::Relaxed);
    let transactions = workload.await??;
    assert!(
        transactions > 10,
        "only {transactions} workload transactions"
    );
    assert!(store.progress().applied_lsn >= lsn);
    let report = verify(&link, &config, &source_url, &opts).await?;
    assert_eq!(report.differences(), 0, "{}", report.render(20));
    let by_seller = agent.scan("by_seller", usize::MAX)?.rows;
    assert_eq!(by_seller.len(), 200);
    agent.shutdown().await?;
    let _ = reader_stop.send(true);
    tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow::anyhow!("reader panicked"))?
        .context("reader")?;
    Ok(())
}
