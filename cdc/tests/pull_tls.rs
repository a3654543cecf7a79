//! The agents' stream reader (`cdc::pull`) against a nats-server that requires TLS, with a CA
//! generated here. The reader trusts the system's roots, as async-nats does; `SSL_CERT_FILE`
//! names this test's CA instead (a test binary of its own, since it sets the variable for the
//! whole process).

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use async_nats::jetstream::{self, stream};
use cdc::pull::{PullConfig, PullConsumer, PullError};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use testkit::{Nats, NatsOptions};

#[tokio::test]
async fn reads_over_tls_and_checks_the_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A CA and a server certificate for 127.0.0.1 signed by it.
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pull test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    let (ca_path, cert_path, key_path) = (
        dir.path().join("ca.pem"),
        dir.path().join("server.pem"),
        dir.path().join("server.key"),
    );
    std::fs::write(&ca_path, ca.pem())?;
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;

    let nats = Nats::start_with(NatsOptions {
        extra_conf: vec![format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n}}",
            cert_path.display().to_string(),
            key_path.display().to_string()
        )],
        ..NatsOptions::default()
    })
    .await?;
    let tls_url = format!("tls://127.0.0.1:{}", nats.port());
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(ca_path.clone())
        .require_tls(true)
        .connect(tls_url.as_str())
        .await?;
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: "CDC".into(),
        subjects: vec!["cdc.>".into()],
        ..Default::default()
    })
    .await?;
    for i in 0..3 {
        js.publish("cdc.public.items", format!("{{\"n\":{i}}}").into())
            .await?
            .await?;
    }

    std::env::set_var("SSL_CERT_FILE", &ca_path);
    // `tls://`, and `nats://` to a server that requires TLS: both upgrade.
    for url in [tls_url.clone(), nats.url()] {
        let mut reader = PullConsumer::start(&url, PullConfig::new("CDC", 1, "test")).await?;
        for seq in 1..=3u64 {
            let m = tokio::time::timeout(Duration::from_secs(10), reader.next())
                .await
                .context("no message")??;
            ensure!(
                m.stream_seq() == seq,
                "{url}: {} instead of {seq}",
                m.stream_seq()
            );
        }
    }
    // A name the certificate does not carry is refused.
    let wrong_name = format!("tls://localhost:{}", nats.port());
    let refused = PullConsumer::start(&wrong_name, PullConfig::new("CDC", 1, "test")).await;
    ensure!(matches!(refused, Err(PullError::Tls(_))), "{refused:?}");
    Ok(())
}
