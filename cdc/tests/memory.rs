//! Bounded memory: a single 1,000,000-row transaction streams through the reader with its
//! peak RSS under 100 MB.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn million_row_transaction_streams_in_bounded_memory() -> Result<()> {
    const ROWS: i64 = 1_000_000;
    let env = Env::start(
        "CREATE TABLE big (id bigint PRIMARY KEY, seller_id int, name text, position int)",
        &["public.big"],
    )
    .await?;
    let reader = env.start_reader().await?;
    env.sql()
        .await?
        .execute(
            "INSERT INTO big SELECT g, g % 1000, 'client ' || g, (g % 10)::int FROM generate_series(1, $1::bigint) g",
            &[&ROWS],
        )
        .await?;
    let js = env.jetstream().await?;
    let subject = "cdc.public.big".to_string();
    let last_id = testkit::until(
        Duration::from_secs(900),
        "the whole transaction in the stream",
        || {
            let js = js.clone();
            let subject = subject.clone();
            async move {
                let stream = js.get_stream("CDC").await.ok()?;
                let last = stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                    .ok()?;
                let id = last.headers.get("Nats-Msg-Id")?.as_str().to_string();
                id.ends_with(&format!(":{ROWS}")).then_some(id)
            }
        },
    )
    .await?;
    let peak_kib = reader.peak_rss_kib().unwrap_or(u64::MAX);
    eprintln!(
        "last event {last_id}; reader peak RSS {} MiB",
        peak_kib / 1024
    );
    ensure!(
        peak_kib < 100 * 1024,
        "reader peak RSS {} MiB ≥ 100 MiB",
        peak_kib / 1024
    );
    let info = js.get_stream("CDC").await?.info().await?.state.clone();
    ensure!(
        info.messages >= ROWS as u64,
        "stream holds {} messages",
        info.messages
    );
    Ok(())
}
