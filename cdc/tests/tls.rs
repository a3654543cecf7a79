//! TLS and password authentication of the reader's connections (ordinary SQL and replication)
//! against private clusters: a CA generated here with rcgen, `sslmode` verify-full / verify-ca /
//! require, SCRAM and md5. Every success case streams at least one event; every failure is one
//! clear line and a non-zero exit.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::{expect_refusal, Env};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use testkit::{Nats, PgAuth, PgOptions, PgTls, Postgres};

const TABLE: &str = "CREATE TABLE items (id int PRIMARY KEY, v text)";
const INSERT: &str = "INSERT INTO items VALUES (1, 'over TLS')";

/// A certificate authority made for one test.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Result<Ca> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca { cert, key })
    }

    /// A server certificate for `names` (DNS names or IP addresses) signed by this CA.
    fn server_cert(&self, names: &[&str]) -> Result<PgTls> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(PgTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes the CA certificate into the test's dir; returns the path.
    fn write(&self, env: &Env, file: &str) -> Result<String> {
        let path = env.dir.path().join(file);
        std::fs::write(&path, self.cert.pem())?;
        Ok(path.display().to_string())
    }
}

/// A SCRAM cluster that accepts TLS with `tls`, a NATS server, and the `items` table.
async fn tls_env(tls: PgTls) -> Result<Env> {
    let pg = Postgres::start_with(PgOptions {
        auth: PgAuth::Scram,
        tls: Some(tls),
        ..PgOptions::default()
    })
    .await?;
    Env::with_servers(pg, Nats::start().await?, TABLE, &["public.items"]).await
}

/// The superuser's URL with `params` in place of the harness's `sslmode=require`.
fn url_with(env: &Env, params: &str) -> String {
    let url = env.pg.url(&env.db);
    assert!(url.contains("sslmode=require"), "{url}");
    url.replace("sslmode=require", params)
}

/// Runs the reader with `url` and checks that it streams, over TLS on both connections.
async fn streams_over_tls(env: &Env, url: &str) -> Result<()> {
    env.write_config_with_url(url, &["public.items"], "")?;
    let _reader = env.start_reader().await?;
    env.expect_streaming(INSERT).await?;
    // Both of the reader's sessions (SQL and walsender) are encrypted.
    let sql = env.sql().await?;
    let (sessions, all_tls) = testkit::until(
        Duration::from_secs(10),
        "the reader's SQL and replication sessions",
        || async {
            let row = sql
                .query_one(
                    "SELECT count(*) FILTER (WHERE a.backend_type = 'walsender'),
                            count(*) FILTER (WHERE a.backend_type = 'client backend'),
                            coalesce(bool_and(s.ssl), false)
                       FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                      WHERE a.application_name = 'cdc'",
                    &[],
                )
                .await
                .ok()?;
            let (walsenders, backends, all_tls): (i64, i64, bool) =
                (row.get(0), row.get(1), row.get(2));
            (walsenders == 1 && backends >= 1).then_some((walsenders + backends, all_tls))
        },
    )
    .await?;
    ensure!(
        all_tls,
        "not all of the reader's {sessions} sessions use TLS"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_ca_streams() -> Result<()> {
    let ca = Ca::new("cdc test CA")?;
    let env = tls_env(ca.server_cert(&["localhost", "127.0.0.1"])?).await?;
    let root = ca.write(&env, "ca.pem")?;
    let url = url_with(&env, &format!("sslmode=verify-full&sslrootcert={root}"));
    streams_over_tls(&env, &url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_a_wrong_ca_fails_clearly() -> Result<()> {
    let ca = Ca::new("cdc test CA")?;
    let other = Ca::new("some other CA")?;
    let env = tls_env(ca.server_cert(&["localhost", "127.0.0.1"])?).await?;
    let root = other.write(&env, "other-ca.pem")?;
    let url = url_with(&env, &format!("sslmode=verify-full&sslrootcert={root}"));
    env.write_config_with_url(&url, &["public.items"], "")?;
    let mut reader = env.spawn_reader()?;
    let line = expect_refusal(&mut reader).await?;
    ensure!(
        line.contains("invalid peer certificate")
            && line.contains(&format!("not signed by the CA in sslrootcert={root}")),
        "the line should say what is wrong and what to check: {line}"
    );
    ensure!(!line.contains(env.pg.superuser_password()), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_name_mismatch_fails_with_verify_full_but_passes_verify_ca() -> Result<()> {
    let ca = Ca::new("cdc test CA")?;
    let env = tls_env(ca.server_cert(&["db.example"])?).await?;
    let root = ca.write(&env, "ca.pem")?;

    let url = url_with(&env, &format!("sslmode=verify-full&sslrootcert={root}"));
    env.write_config_with_url(&url, &["public.items"], "")?;
    let mut reader = env.spawn_reader()?;
    let line = expect_refusal(&mut reader).await?;
    ensure!(
        line.contains("certificate is not valid for host \"127.0.0.1\"")
            && line.contains("sslmode=verify-ca"),
        "the line should say what is wrong and what to do: {line}"
    );

    let url = url_with(&env, &format!("sslmode=verify-ca&sslrootcert={root}"));
    streams_over_tls(&env, &url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_without_a_root_streams() -> Result<()> {
    let ca = Ca::new("cdc test CA")?;
    let env = tls_env(ca.server_cert(&["db.example"])?).await?;
    let url = url_with(&env, "sslmode=require");
    streams_over_tls(&env, &url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_without_tls_streams() -> Result<()> {
    let pg = Postgres::start_with(PgOptions {
        auth: PgAuth::Scram,
        ..PgOptions::default()
    })
    .await?;
    let env = Env::with_servers(pg, Nats::start().await?, TABLE, &["public.items"]).await?;
    let _reader = env.start_reader().await?;
    env.expect_streaming(INSERT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_auth_streams() -> Result<()> {
    let pg = Postgres::start_with(PgOptions {
        auth: PgAuth::Md5,
        ..PgOptions::default()
    })
    .await?;
    let env = Env::with_servers(pg, Nats::start().await?, TABLE, &["public.items"]).await?;
    // A non-superuser with REPLICATION, so the password really is checked by md5 for it too.
    env.sql()
        .await?
        .batch_execute(
            "CREATE ROLE md5_reader LOGIN REPLICATION PASSWORD 'md5-Secret!';
             GRANT SELECT ON items TO md5_reader;
             CREATE PUBLICATION cdc_pub FOR TABLE items;",
        )
        .await?;
    let url = env.pg.url_as("md5_reader", Some("md5-Secret!"), &env.db);
    env.write_config_with_url(&url, &["public.items"], "")?;
    let _reader = env.start_reader().await?;
    env.expect_streaming(INSERT).await?;
    Ok(())
}
