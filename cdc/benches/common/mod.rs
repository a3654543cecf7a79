//! Shared pieces of the reader's benchmarks.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures::StreamExt;

/// Waits until the stream `CDC` holds more than `more_than` messages on `subject`; returns the
/// seconds since `started`. Fails with the reader's output after `timeout`.
pub async fn seconds_until_count(
    js: &async_nats::jetstream::Context,
    subject: &str,
    more_than: u64,
    started: Instant,
    timeout: Duration,
    reader: &testkit::ChildProcess,
) -> Result<f64> {
    testkit::until(timeout, "the stream to fill", || async move {
        let stream = js.get_stream("CDC").await.ok()?;
        let mut counts = stream.info_with_subjects(subject.to_string()).await.ok()?;
        let mut n = 0u64;
        while let Some(Ok((subj, count))) = counts.next().await {
            if subj == subject {
                n = count as u64;
            }
        }
        (n > more_than).then(|| started.elapsed().as_secs_f64())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", reader.describe()))
}
