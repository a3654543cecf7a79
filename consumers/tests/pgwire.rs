//! The pgwire server with real clients: tokio-postgres (simple and extended protocol), psql,
//! pgbench (libpq) and a raw socket.

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use common::*;
use consumers::Agent;

async fn agent_with_rows(
    h: &Harness,
    name: &str,
    password: Option<&str>,
) -> Result<(Agent, Source)> {
    let mut cfg = h.agent_config(name, "127.0.0.1:0");
    cfg.pgwire.password = password.map(str::to_owned);
    let agent = Agent::start(cfg).await?;
    let mut src = Source::new();
    let tx = src.transaction(&[
        Change::Upsert(7, 70, "Acme".into(), 1),
        Change::Upsert(7, 71, "Beta".into(), 2),
        Change::Upsert(8, 80, "Gamma".into(), 1),
        Change::Upsert(9, 90, "Delta".into(), 1),
    ]);
    let last = publish_transaction(&h.js, &tx).await?;
    testkit::until(WAIT, "applied", || async {
        (agent.store().progress().applied_seq >= last).then_some(())
    })
    .await?;
    Ok((agent, src))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_simple_and_extended() -> Result<()> {
    let h = Harness::start().await?;
    let (agent, _src) = agent_with_rows(&h, "pg", None).await?;
    let pg = pg_connect(agent.pgwire_addr().expect("pgwire").port()).await?;

    // Extended protocol with typed parameters.
    let rows = pg
        .query(
            &format!("SELECT client_id, name, position FROM {VIEW} WHERE seller_id = $1"),
            &[&7i64],
        )
        .await?;
    let got: Vec<(i64, String, i32)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(got, vec![(70, "Acme".into(), 1), (71, "Beta".into(), 2)]);
    // IN lists, LIMIT, SELECT *.
    let rows = pg
        .query(
            &format!("SELECT * FROM {VIEW} WHERE seller_id IN ($1, $2) LIMIT 2"),
            &[&8i64, &9i64],
        )
        .await?;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].columns().len(), 4);
    let rows = pg
        .query(&format!("SELECT * FROM {VIEW} LIMIT 3"), &[])
        .await?;
    assert_eq!(rows.len(), 3);
    // Portals read in pieces (Execute with a row limit, as JDBC's fetch size does), and an
    // error in the middle of a pipeline of extended messages.
    let mut pg2 = pg_connect(agent.pgwire_addr().expect("pgwire").port()).await?;
    let tx = pg2.transaction().await?;
    let stmt = tx.prepare(&format!("SELECT client_id FROM {VIEW}")).await?;
    let portal = tx.bind(&stmt, &[]).await?;
    let first = tx.query_portal(&portal, 3).await?;
    let rest = tx.query_portal(&portal, 3).await?;
    let ids: Vec<i64> = first.iter().chain(&rest).map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![70, 71, 80, 90]);
    assert!(tx.query_portal(&portal, 3).await?.is_empty());
    tx.commit().await?;
    let err = pg2
        .query(
            &format!("SELECT nope FROM {VIEW} WHERE seller_id = $1"),
            &[&7i64],
        )
        .await
        .expect_err("unknown column");
    assert_eq!(err.code().map(|c| c.code()), Some("42703"));
    assert_eq!(
        pg2.query(
            &format!("SELECT name FROM {VIEW} WHERE seller_id = $1"),
            &[&8i64]
        )
        .await?
        .len(),
        1
    );
    // Simple protocol: text results.
    let msgs = pg
        .simple_query(&format!("SELECT name FROM {VIEW} WHERE seller_id = 7"))
        .await?;
    let names: Vec<String> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec!["Acme", "Beta"]);
    // cdc_status.
    let st = pg.query("SELECT * FROM cdc_status", &[]).await?;
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].get::<_, String>("view"), VIEW);
    assert!(!st[0].get::<_, bool>("stale"));
    assert!(st[0].get::<_, i64>("applied_seq") >= 1);
    // SQLSTATEs.
    for (sql, code) in [
        ("SELECT * FROM nope", "42P01"),
        ("INSERT INTO top_clients_by_seller VALUES (1)", "25006"),
        ("UPDATE top_clients_by_seller SET name = 'x'", "25006"),
        (
            "SELECT * FROM top_clients_by_seller WHERE name = 'x'",
            "0A000",
        ),
        ("SELECT nope FROM top_clients_by_seller", "42703"),
        ("SELEKT 1", "42601"),
        ("SET cdc.min_lsn = 'garbage'", "22023"),
    ] {
        let err = pg.simple_query(sql).await.expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some(code), "{sql}: {err}");
        let err = pg.query(sql, &[]).await.expect_err(sql);
        assert_eq!(
            err.code().map(|c| c.code()),
            Some(code),
            "{sql} (extended): {err}"
        );
    }
    // The connection is still usable after errors; health check.
    assert_eq!(pg.query_one("SELECT 1", &[]).await?.get::<_, i32>(0), 1);
    agent.shutdown().await?;
    Ok(())
}

fn psql(port: u16, sql: &str, password: Option<&str>) -> Result<std::process::Output> {
    let mut cmd = Command::new(testkit::find_binary("psql")?);
    cmd.args([
        "-X",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
    ])
    .arg(port.to_string())
    .args(["-U", "page", "-d", "views", "-c", sql]);
    match password {
        Some(p) => cmd.env("PGPASSWORD", p),
        None => cmd.env_remove("PGPASSWORD"),
    };
    cmd.env("PGCONNECT_TIMEOUT", "5");
    Ok(cmd.output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_password_auth() -> Result<()> {
    let h = Harness::start().await?;
    let (agent, _src) = agent_with_rows(&h, "psql", Some("s3cret")).await?;
    let port = agent.pgwire_addr().expect("pgwire").port();
    let port2 = port;
    let out = tokio::task::spawn_blocking(move || {
        psql(
            port2,
            &format!("SELECT client_id, name FROM {VIEW} WHERE seller_id = 7"),
            Some("s3cret"),
        )
    })
    .await??;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "70|Acme\n71|Beta\n");
    let out = tokio::task::spawn_blocking(move || {
        psql(port, "SELECT view, stale FROM cdc_status", Some("s3cret"))
    })
    .await??;
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{VIEW}|f\n"));
    let out = tokio::task::spawn_blocking(move || psql(port, "SELECT 1", Some("wrong"))).await??;
    assert!(!out.status.success(), "wrong password accepted");
    // tokio-postgres with and without the password.
    let bad = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=page dbname=views password=nope"),
        tokio_postgres::NoTls,
    )
    .await;
    assert!(bad.is_err());
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=page dbname=views password=s3cret"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    assert_eq!(
        client
            .query(&format!("SELECT * FROM {VIEW}"), &[])
            .await?
            .len(),
        4
    );
    agent.shutdown().await?;
    Ok(())
}

/// libpq's flows through pgbench, a real libpq client: `prepared` (Parse/Describe once, then
/// Bind/Describe/Execute/Sync per query), `extended` (Parse/Bind/Describe/Execute/Sync per
/// query) and `simple` (Query), every query answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_protocol_modes() -> Result<()> {
    let h = Harness::start().await?;
    let (agent, _src) = agent_with_rows(&h, "pgbench", None).await?;
    let port = agent.pgwire_addr().expect("pgwire").port();
    let script = h.dir.path().join("point.sql");
    std::fs::write(
        &script,
        format!(
            "\\set seller random(7, 9)\nSELECT client_id, name, position FROM {VIEW} WHERE seller_id = :seller;\n"
        ),
    )?;
    let pgbench = testkit::find_binary("pgbench")?;
    for mode in ["prepared", "extended", "simple"] {
        let mut cmd = Command::new(&pgbench);
        cmd.args([
            "-n",
            "-M",
            mode,
            "-c",
            "2",
            "-t",
            "25",
            "-h",
            "127.0.0.1",
            "-p",
        ])
        .arg(port.to_string())
        .args(["-U", "page", "-f"])
        .arg(&script)
        .arg("views")
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "5");
        let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "pgbench -M {mode}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("number of transactions actually processed: 50/50")
                && stdout.contains("number of failed transactions: 0 "),
            "pgbench -M {mode}: {stdout}"
        );
    }
    agent.shutdown().await?;
    Ok(())
}

/// One frontend message: type byte, length, body.
fn frontend(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Reads backend messages until ReadyForQuery; returns their type bytes.
async fn read_until_ready(sock: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut kinds = Vec::new();
    loop {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let kind = buf[0];
            buf.drain(..1 + len);
            kinds.push(kind);
            if kind == b'Z' {
                return Ok(kinds);
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, sock.read(&mut chunk)).await??;
        anyhow::ensure!(n > 0, "server closed the connection after {kinds:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Like Postgres, the server holds the replies to Parse, Bind, Describe and Execute until
/// Sync, which sends them all in one write (pgwire's own handlers flush after each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_replies_wait_for_sync() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await?;
    let (agent, _src) = agent_with_rows(&h, "raw", None).await?;
    let port = agent.pgwire_addr().expect("pgwire").port();
    let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut startup = 196_608u32.to_be_bytes().to_vec();
    startup.extend_from_slice(b"user\0page\0database\0views\0\0");
    let mut msg = (startup.len() as u32 + 4).to_be_bytes().to_vec();
    msg.extend_from_slice(&startup);
    sock.write_all(&msg).await?;
    let mut buf = Vec::new();
    let kinds = read_until_ready(&mut sock, &mut buf).await?;
    assert_eq!(kinds.first(), Some(&b'R'), "startup: {kinds:?}");

    let sql = format!("SELECT client_id, name FROM {VIEW} WHERE seller_id = $1\0");
    let mut parse = b"\0".to_vec();
    parse.extend_from_slice(sql.as_bytes());
    parse.extend_from_slice(&0u16.to_be_bytes());
    // Bind: unnamed portal and statement, no parameter formats (text), one parameter "7",
    // no result formats (text).
    let mut bind = b"\0\0".to_vec();
    bind.extend_from_slice(&0u16.to_be_bytes());
    bind.extend_from_slice(&1u16.to_be_bytes());
    bind.extend_from_slice(&1u32.to_be_bytes());
    bind.push(b'7');
    bind.extend_from_slice(&0u16.to_be_bytes());
    let mut execute = b"\0".to_vec();
    execute.extend_from_slice(&0u32.to_be_bytes());
    let mut request = frontend(b'P', &parse);
    request.extend(frontend(b'B', &bind));
    request.extend(frontend(b'D', b"P\0"));
    request.extend(frontend(b'E', &execute));
    sock.write_all(&request).await?;
    // Nothing may arrive before Sync; absence can only be checked for a while.
    let mut early = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_millis(300), sock.read(&mut early)).await;
    assert!(
        read.is_err(),
        "the server answered before Sync: {read:?} {:?}",
        &early[..]
    );
    sock.write_all(&frontend(b'S', b"")).await?;
    let kinds = read_until_ready(&mut sock, &mut buf).await?;
    // ParseComplete, BindComplete, RowDescription, two rows, CommandComplete, ReadyForQuery.
    assert_eq!(String::from_utf8_lossy(&kinds), "12TDDCZ");
    agent.shutdown().await?;
    Ok(())
}
