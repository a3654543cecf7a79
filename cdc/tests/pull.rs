//! The agents' stream reader (`cdc::pull`) against a real nats-server: order and position,
//! headers, credentials, API errors, pull requests that end at their byte limit, a frozen
//! server, a restarted server, and the consumer removed when the reader goes away.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use cdc::pull::{PullConfig, PullConsumer, PullError};
use testkit::{Nats, NatsAuth, NatsOptions, Signal};

const STREAM: &str = "CDC";

/// A JetStream context on `nats` with the stream `CDC` (`cdc.>`).
async fn stream_on(nats: &Nats) -> Result<jetstream::Context> {
    // async-nats takes credentials as options, not from the URL.
    let (options, servers) =
        cdc::nats_url::connect_options(async_nats::ConnectOptions::new(), &nats.url());
    let js = jetstream::new(options.connect(servers.as_str()).await?);
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["cdc.>".into()],
        ..Default::default()
    })
    .await?;
    Ok(js)
}

/// Publishes messages `from..to` (body `{"n": i}`, header `Cdc-Op: c`, `N: i`) and waits for
/// their acks.
async fn publish(js: &jetstream::Context, from: u64, to: u64, body_bytes: usize) -> Result<()> {
    let mut acks = Vec::new();
    for i in from..to {
        let mut headers = HeaderMap::new();
        headers.insert("Cdc-Op", "c");
        headers.insert("N", i.to_string().as_str());
        let mut body = format!("{{\"n\":{i}}}").into_bytes();
        body.resize(body_bytes.max(body.len()), b' ');
        acks.push(
            js.publish_with_headers("cdc.public.items", headers, body.into())
                .await?,
        );
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

async fn next(reader: &mut PullConsumer) -> Result<cdc::pull::StreamMessage> {
    Ok(tokio::time::timeout(Duration::from_secs(10), reader.next())
        .await
        .context("no message within 10 s")??)
}

#[tokio::test]
async fn reads_in_order_from_a_sequence_then_live() -> Result<()> {
    let nats = Nats::start().await?;
    let js = stream_on(&nats).await?;
    publish(&js, 1, 3001, 0).await?;
    let mut reader =
        PullConsumer::start(&nats.url(), PullConfig::new(STREAM, 1000, "test")).await?;
    for seq in 1000..=3000u64 {
        let m = next(&mut reader).await?;
        ensure!(
            m.stream_seq() == seq,
            "got {} instead of {seq}",
            m.stream_seq()
        );
        ensure!(m.subject() == b"cdc.public.items");
        ensure!(
            m.header("N") == Some(seq.to_string().as_str()),
            "{:?}",
            m.header("N")
        );
        ensure!(m.header("cdc-op") == Some("c"));
        let body: serde_json::Value = serde_json::from_slice(m.payload())?;
        ensure!(body["n"] == seq, "{body}");
    }
    ensure!(reader.try_next().is_none(), "nothing more is in the stream");
    // Messages published now arrive too.
    publish(&js, 3001, 3011, 0).await?;
    for seq in 3001..3011u64 {
        ensure!(next(&mut reader).await?.stream_seq() == seq);
    }
    Ok(())
}

#[tokio::test]
async fn credentials_come_from_the_url() -> Result<()> {
    for auth in [
        NatsAuth::UserPassword {
            user: "agent".into(),
            password: "s3cret pass".into(),
        },
        NatsAuth::Token("t0ken".into()),
    ] {
        let nats = Nats::start_with(NatsOptions {
            auth: Some(auth.clone()),
            ..NatsOptions::default()
        })
        .await?;
        let js = stream_on(&nats).await?;
        publish(&js, 1, 4, 0).await?;
        let mut reader =
            PullConsumer::start(&nats.url(), PullConfig::new(STREAM, 1, "test")).await?;
        ensure!(next(&mut reader).await?.stream_seq() == 1, "{auth:?}");

        let wrong = match &auth {
            NatsAuth::UserPassword { .. } => {
                format!("nats://agent:wrong@127.0.0.1:{}", nats.port())
            }
            NatsAuth::Token(_) => format!("nats://wrong@127.0.0.1:{}", nats.port()),
        };
        let refused = PullConsumer::start(&wrong, PullConfig::new(STREAM, 1, "test"))
            .await
            .err()
            .context("wrong credentials must be refused")?;
        let text = refused.to_string();
        ensure!(matches!(refused, PullError::Refused(_)), "{refused:?}");
        ensure!(text.contains("check the credentials in nats.url"), "{text}");
        ensure!(!text.contains("wrong"), "the secret is printed: {text}");
    }
    Ok(())
}

#[tokio::test]
async fn a_missing_stream_is_an_api_error() -> Result<()> {
    let nats = Nats::start().await?;
    let error = PullConsumer::start(&nats.url(), PullConfig::new("NOPE", 1, "test"))
        .await
        .err()
        .context("a missing stream must be an error")?;
    ensure!(
        matches!(&error, PullError::Api { code: 404, description } if description.contains("not found")),
        "{error:?}"
    );
    let bad_name = PullConsumer::start(&nats.url(), PullConfig::new("a.b", 1, "test")).await;
    ensure!(
        matches!(bad_name, Err(PullError::Config(_))),
        "{bad_name:?}"
    );
    let unreachable = PullConsumer::start(
        &format!("nats://127.0.0.1:{}", testkit::free_port()),
        PullConfig::new(STREAM, 1, "test"),
    )
    .await;
    ensure!(
        matches!(unreachable, Err(PullError::Io(_))),
        "{unreachable:?}"
    );
    Ok(())
}

#[tokio::test]
async fn large_messages_cross_the_byte_limit_of_pull_requests() -> Result<()> {
    // 900 KB each: a pull request (at most 4 MiB here) brings four, then ends at its byte limit.
    let nats = Nats::start().await?;
    let js = stream_on(&nats).await?;
    publish(&js, 1, 21, 900_000).await?;
    let mut reader = PullConsumer::start(&nats.url(), PullConfig::new(STREAM, 1, "test")).await?;
    for seq in 1..=20u64 {
        let m = next(&mut reader).await?;
        ensure!(m.stream_seq() == seq && m.payload().len() == 900_000);
    }
    Ok(())
}

#[tokio::test]
async fn a_frozen_server_is_noticed_by_its_missing_heartbeats() -> Result<()> {
    let nats = Nats::start().await?;
    let js = stream_on(&nats).await?;
    publish(&js, 1, 2, 0).await?;
    let mut config = PullConfig::new(STREAM, 1, "test");
    config.idle_heartbeat = Duration::from_millis(200);
    let mut reader = PullConsumer::start(&nats.url(), config).await?;
    ensure!(next(&mut reader).await?.stream_seq() == 1);
    // Heartbeats keep an idle reader alive …
    let idle = tokio::time::timeout(Duration::from_millis(1500), reader.next()).await;
    ensure!(
        idle.is_err(),
        "an idle stream must not end the reader: {idle:?}"
    );
    // … and their absence ends it (three intervals, 600 ms).
    nats.signal(Signal::Stop)?;
    let ended = tokio::time::timeout(Duration::from_secs(5), reader.next()).await;
    nats.signal(Signal::Cont)?;
    match ended {
        Ok(Err(PullError::NoHeartbeat(d))) => ensure!(d == Duration::from_millis(600)),
        other => anyhow::bail!("expected NoHeartbeat, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_restarted_server_ends_the_reader_and_a_new_one_goes_on() -> Result<()> {
    let mut nats = Nats::start().await?;
    let js = stream_on(&nats).await?;
    publish(&js, 1, 11, 0).await?;
    let mut reader = PullConsumer::start(&nats.url(), PullConfig::new(STREAM, 1, "test")).await?;
    for seq in 1..=10u64 {
        ensure!(next(&mut reader).await?.stream_seq() == seq);
    }
    nats.restart().await?;
    let ended = tokio::time::timeout(Duration::from_secs(10), reader.next()).await;
    ensure!(matches!(ended, Ok(Err(PullError::Io(_)))), "{ended:?}");
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    publish(&js, 11, 13, 0).await?;
    let mut reader = PullConsumer::start(&nats.url(), PullConfig::new(STREAM, 11, "test")).await?;
    ensure!(next(&mut reader).await?.stream_seq() == 11);
    ensure!(next(&mut reader).await?.stream_seq() == 12);
    Ok(())
}

#[tokio::test]
async fn dropping_the_reader_removes_its_consumer() -> Result<()> {
    let nats = Nats::start().await?;
    let js = stream_on(&nats).await?;
    publish(&js, 1, 3, 0).await?;
    let mut reader = PullConsumer::start(&nats.url(), PullConfig::new(STREAM, 1, "test")).await?;
    ensure!(next(&mut reader).await?.stream_seq() == 1);
    let mut stream = js.get_stream(STREAM).await?;
    ensure!(stream.info().await?.state.consumer_count == 1);
    drop(reader);
    testkit::until(Duration::from_secs(5), "the consumer to be removed", || {
        let mut stream = stream.clone();
        async move { (stream.info().await.ok()?.state.consumer_count == 0).then_some(()) }
    })
    .await?;
    Ok(())
}
