//! The harness against the real servers: each test starts its own.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use testkit::{Nats, PgAuth, PgOptions, Postgres};
use tokio::io::AsyncBufReadExt as _;

#[tokio::test]
async fn postgres_trust_database_and_query() -> Result<()> {
    let pg = Postgres::start().await?;
    ensure!(
        pg.url("x").ends_with("/x?sslmode=disable"),
        "{}",
        pg.url("x")
    );
    ensure!(!pg.url("x").contains(pg.superuser_password()));

    let db = pg.create_database("trust test").await?;
    let other = pg.create_database("trust test").await?;
    ensure!(db != other, "database names must be fresh: {db}");

    let client = pg.connect(&db).await?;
    let row = client
        .query_one(
            "SELECT current_database(), current_setting('wal_level')",
            &[],
        )
        .await?;
    ensure!(row.get::<_, String>(0) == db);
    ensure!(row.get::<_, String>(1) == "logical");
    ensure!(
        pg.log().contains("database system is ready"),
        "{}",
        pg.log()
    );
    Ok(())
}

#[tokio::test]
async fn postgres_scram_needs_the_password() -> Result<()> {
    let pg = Postgres::start_with(PgOptions {
        auth: PgAuth::Scram,
        ..PgOptions::default()
    })
    .await?;
    ensure!(pg.url("postgres").contains(pg.superuser_password()));

    let client = pg.connect("postgres").await?;
    let stored: String = client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'",
            &[],
        )
        .await?
        .get(0);
    ensure!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");

    let without = pg.connect_as("postgres", None, "postgres").await;
    ensure!(without.is_err(), "connecting without a password must fail");
    let wrong = pg.connect_as("postgres", Some("wrong"), "postgres").await;
    let err = format!("{:#}", wrong.err().context("a wrong password must fail")?);
    ensure!(err.contains("password authentication failed"), "{err}");
    Ok(())
}

#[tokio::test]
async fn postgres_md5_stores_md5_passwords() -> Result<()> {
    let pg = Postgres::start_with(PgOptions {
        auth: PgAuth::Md5,
        ..PgOptions::default()
    })
    .await?;
    let client = pg.connect("postgres").await?;
    let stored: String = client
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'",
            &[],
        )
        .await?
        .get(0);
    ensure!(stored.starts_with("md5"), "{stored}");
    ensure!(pg.connect_as("postgres", None, "postgres").await.is_err());
    Ok(())
}

#[tokio::test]
async fn postgres_kill9_then_start_again_and_restart_fast() -> Result<()> {
    let mut pg = Postgres::start().await?;
    let port = pg.port();
    let db = pg.create_database("crash").await?;
    pg.batch_execute(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2);",
    )
    .await?;
    let client = pg.connect(&db).await?;

    pg.kill9()?;
    ensure!(!pg.is_running());
    ensure!(client.simple_query("SELECT 1").await.is_err());
    ensure!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the port must be released after kill9"
    );

    pg.start_again().await?;
    ensure!(pg.port() == port);
    let count: i64 = pg
        .connect(&db)
        .await?
        .query_one("SELECT count(*) FROM t", &[])
        .await?
        .get(0);
    ensure!(count == 2, "committed rows must survive the crash: {count}");
    ensure!(
        pg.log().contains("database system was interrupted"),
        "expected crash recovery in the log:\n{}",
        pg.log()
    );

    pg.restart_fast().await?;
    pg.batch_execute(&db, "INSERT INTO t VALUES (3)").await?;

    // A cluster dropped after a crash leaves no SysV shared memory segment behind.
    pg.kill9()?;
    let pid_file = std::fs::read_to_string(pg.data_dir().join("postmaster.pid"))?;
    let shmid = pid_file
        .lines()
        .nth(6)
        .and_then(|line| line.split_whitespace().nth(1))
        .context("no shared memory id in postmaster.pid")?
        .to_owned();
    let listed = |id: &str| -> Result<bool> {
        let table = std::fs::read_to_string("/proc/sysvipc/shm")?;
        Ok(table
            .lines()
            .any(|line| line.split_whitespace().nth(1) == Some(id)))
    };
    ensure!(listed(&shmid)?, "segment {shmid} should exist after kill9");
    drop(pg);
    ensure!(!listed(&shmid)?, "segment {shmid} leaked");
    Ok(())
}

#[tokio::test]
async fn nats_restart_keeps_the_port() -> Result<()> {
    let mut nats = Nats::start().await?;
    let port = nats.port();
    ensure!(nats.url() == format!("nats://127.0.0.1:{port}"));
    let info = read_info(port).await?;
    ensure!(info.contains("\"jetstream\":true"), "{info}");

    nats.restart().await?;
    ensure!(nats.port() == port);
    read_info(port).await?;

    nats.kill9()?;
    ensure!(read_info(port).await.is_err(), "the server must be gone");
    nats.start_again().await?;
    read_info(port).await?;
    Ok(())
}

/// Reads the `INFO {…}` greeting a NATS server sends on connect.
async fn read_info(port: u16) -> Result<String> {
    let read = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut line = String::new();
        tokio::io::BufReader::new(stream)
            .read_line(&mut line)
            .await?;
        ensure!(line.starts_with("INFO {"), "unexpected greeting {line:?}");
        Ok(line)
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .context("no INFO within 5 s")?
}
