//! Integration-test harness: private Postgres clusters and NATS JetStream servers started from the
//! machine's binaries on free loopback ports in temp dirs, plus logged child processes for the
//! binaries under test.
//!
//! A missing server binary is an error (and so a failed test) whose message says which Debian
//! package to install; tests never pass by skipping.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let pg = testkit::Postgres::start().await?;
//! let db = pg.create_database("demo").await?;
//! let client = pg.connect(&db).await?;
//! client.batch_execute("CREATE TABLE t (id int primary key)").await?;
//! let nats = testkit::Nats::start().await?;
//! println!("{} {}", pg.url(&db), nats.url());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod nats;
mod postgres;
mod process;
mod sys;

use std::collections::HashSet;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

pub use nats::{Nats, NatsAuth, NatsOptions};
pub use postgres::{PgAuth, PgOptions, PgTls, Postgres};
pub use process::{cpu_time, peak_rss_kib, rss_kib, spawn_logged, stat_cpu_time, ChildProcess};
pub use sys::Signal;

/// How long servers get to become ready after a (re)start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// First delay between two polls of [`until`].
const POLL_START: Duration = Duration::from_millis(2);
/// Largest delay between two polls of [`until`].
const POLL_CAP: Duration = Duration::from_millis(50);

/// Ports handed out by [`free_port`] in this process, so that two tests running in parallel never
/// get the same one (the kernel may hand a just-released port out again).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Returns a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read the port,
/// release it). Never returns the same port twice within one process.
///
/// # Panics
/// Panics if no loopback port can be bound at all (the machine is unusable for tests).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = TcpListener::bind(("127.0.0.1", 0))
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .unwrap_or_else(|e| panic!("cannot bind a free port on 127.0.0.1: {e}"));
        let mut guard = HANDED_OUT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no fresh free port on 127.0.0.1 after 1000 attempts");
}

/// Polls `f` until it returns `Some`, sleeping between attempts with a short backoff (2 ms
/// doubling up to 50 ms). Fails with "timed out after … waiting for {what}" once `timeout` has
/// passed. `f` is always called at least once.
pub async fn until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut delay = POLL_START;
    loop {
        if let Some(value) = f().await {
            return Ok(value);
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(POLL_CAP);
    }
}

/// Like [`until`], for attempts that fail with an error: polls `f` until it returns `Ok`, and on
/// timeout includes the last error in the message.
pub async fn until_ok<T, E, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, E>>,
{
    let start = Instant::now();
    let mut delay = POLL_START;
    loop {
        match f().await {
            Ok(value) => return Ok(value),
            Err(e) if start.elapsed() >= timeout => {
                bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
            }
            Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(POLL_CAP);
    }
}

/// Finds an executable: `$PATH` first, then `/usr/lib/postgresql/<version>/bin` (highest
/// version first). A missing binary is an error naming the Debian package to install.
pub fn find_binary(name: &str) -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let pg_dirs = postgres_bin_dirs();
    on_path
        .iter()
        .chain(pg_dirs.iter())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            let package = match name {
                "nats-server" => "nats-server",
                "initdb" | "postgres" | "pg_ctl" | "psql" | "pg_recvlogical" | "pg_dump"
                | "pgbench" => "postgresql",
                _ => name,
            };
            anyhow::anyhow!(
                "`{name}` not found on PATH or in /usr/lib/postgresql/*/bin: install the Debian \
                 package `{package}` (`apt-get install {package}`)"
            )
        })
}

/// `/usr/lib/postgresql/<version>/bin` directories, highest version first.
fn postgres_bin_dirs() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Reads a log file as text (lossy UTF-8); empty when it does not exist.
fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Creates a private temp dir with a descriptive prefix.
fn temp_dir(prefix: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("testkit-{prefix}-"))
        .tempdir()
        .with_context(|| format!("creating a temp dir for {prefix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::ensure;

    #[test]
    fn free_ports_are_distinct() {
        let a = free_port();
        let b = free_port();
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn until_times_out_with_the_subject_in_the_message() -> Result<()> {
        let result = until(Duration::from_millis(20), "the moon", || async {
            None::<()>
        })
        .await;
        let err = result.err().context("expected a timeout")?;
        ensure!(err.to_string().contains("waiting for the moon"), "{err}");
        Ok(())
    }

    #[tokio::test]
    async fn until_returns_the_value() -> Result<()> {
        let mut n = 0;
        let got = until(Duration::from_secs(5), "three polls", || {
            n += 1;
            let n = n;
            async move { (n >= 3).then_some(n) }
        })
        .await?;
        ensure!(got == 3);
        Ok(())
    }

    #[tokio::test]
    async fn until_ok_reports_the_last_error() -> Result<()> {
        let result = until_ok(Duration::from_millis(20), "a miracle", || async {
            Err::<(), _>("still nothing")
        })
        .await;
        let err = result.err().context("expected a timeout")?.to_string();
        ensure!(
            err.contains("a miracle") && err.contains("still nothing"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn missing_binary_names_the_package() -> Result<()> {
        let err = find_binary("no-such-binary-xyz")
            .err()
            .context("expected an error")?;
        ensure!(
            err.to_string().contains("install the Debian package"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
