//! The pieces of the pipeline every row starts: the `cdc` and `view-agent` binaries found next
//! to this one, their config files, and the waits and meters the rows share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use cdc::envelope::{HEADER_COMMIT_LSN, HEADER_MSG_ID, HEADER_OP, HEADER_TABLE};
use futures::StreamExt as _;
use testkit::ChildProcess;

/// Subject prefix and stream name the rows use (the reader's defaults).
pub const STREAM: &str = "CDC";

/// The release binaries under test, found in the directory of `cdc-bench` itself.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The reader.
    pub cdc: PathBuf,
    /// The view agent.
    pub view_agent: PathBuf,
}

impl Binaries {
    /// Finds `cdc` and `view-agent` next to the running executable; a missing one is an error
    /// that says how to build it.
    pub fn next_to_me() -> Result<Binaries> {
        let exe = std::env::current_exe().context("locating cdc-bench itself")?;
        let dir = exe
            .parent()
            .context("cdc-bench has no parent directory")?
            .to_path_buf();
        let find = |name: &str| -> Result<PathBuf> {
            let bin = dir.join(name);
            anyhow::ensure!(
                bin.exists(),
                "{} is missing: build it with `cargo build --release --locked -p cdc -p consumers -p cdc-bench --bins` (scripts/bench.sh does)",
                bin.display()
            );
            Ok(bin)
        };
        Ok(Binaries {
            cdc: find("cdc")?,
            view_agent: find("view-agent")?,
        })
    }

    /// Starts `cdc run --config <config>` (logs at `warn`).
    pub fn spawn_reader(&self, config: &Path) -> Result<ChildProcess> {
        let mut cmd = Command::new(&self.cdc);
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn");
        testkit::spawn_logged(cmd, "cdc")
    }

    /// Starts `view-agent run --config <config>` and waits until it answers queries.
    pub async fn spawn_agent(&self, config: &Path, name: &str) -> Result<ChildProcess> {
        self.spawn_agent_logging(config, name, "warn").await
    }

    /// [`Binaries::spawn_agent`] with its log filtered by `rust_log`.
    pub async fn spawn_agent_logging(
        &self,
        config: &Path,
        name: &str,
        rust_log: &str,
    ) -> Result<ChildProcess> {
        let mut cmd = Command::new(&self.view_agent);
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log);
        let mut agent = testkit::spawn_logged(cmd, name)?;
        agent
            .wait_for_output("view-agent ready", Duration::from_secs(60))
            .await?;
        Ok(agent)
    }
}

/// Private servers, a database holding one table, and the `cdc` binary streaming it (no
/// initial snapshot).
pub struct Streaming {
    /// The Postgres cluster.
    pub pg: testkit::Postgres,
    /// The NATS server.
    pub nats: testkit::Nats,
    /// The database's name.
    pub db: String,
    /// A connection to it.
    pub sql: tokio_postgres::Client,
    /// Where the configs live.
    pub dir: tempfile::TempDir,
    /// The reader process.
    pub reader: ChildProcess,
    /// JetStream on the NATS server.
    pub js: async_nats::jetstream::Context,
}

/// Starts [`Streaming`]: database `db`, `public.<table>` created by `create_table`, and the
/// reader streaming it once it has created the stream.
pub async fn start_streaming(
    bins: &Binaries,
    db: &str,
    create_table: &str,
    table: &str,
) -> Result<Streaming> {
    let pg = testkit::Postgres::start().await?;
    let nats = testkit::Nats::start().await?;
    let db = pg.create_database(db).await?;
    let sql = pg.connect(&db).await?;
    sql.batch_execute(create_table).await?;
    let dir = tempfile::tempdir()?;
    let config = write_reader_config(
        dir.path(),
        &pg.url(&db),
        &nats.url(),
        table,
        "initial = false",
    )?;
    let reader = bins.spawn_reader(&config)?;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await?);
    testkit::until(Duration::from_secs(60), "the reader's stream", || async {
        js.get_stream(STREAM).await.ok()
    })
    .await
    .with_context(|| reader.describe())?;
    Ok(Streaming {
        pg,
        nats,
        db,
        sql,
        dir,
        reader,
        js,
    })
}

/// Writes a reader config for one table `public.<table>` into `dir`; returns its path.
pub fn write_reader_config(
    dir: &Path,
    pg_url: &str,
    nats_url: &str,
    table: &str,
    snapshot: &str,
) -> Result<PathBuf> {
    let path = dir.join("cdc.toml");
    std::fs::write(
        &path,
        format!(
            "[postgres]\nurl = {pg_url:?}\nslot = \"cdc_slot\"\npublication = \"cdc_pub\"\ntables = [\"public.{table}\"]\n\n\
             [nats]\nurl = {nats_url:?}\nstream = \"{STREAM}\"\n\n[snapshot]\n{snapshot}\n"
        ),
    )
    .context("writing cdc.toml")?;
    Ok(path)
}

/// A view of `public.<table>` served by a `view-agent`.
#[derive(Debug, Clone)]
pub struct AgentView<'a> {
    /// View name.
    pub name: &'a str,
    /// Source table in `public`.
    pub table: &'a str,
    /// Lookup key columns.
    pub key: &'a [&'a str],
    /// Source primary key.
    pub primary_key: &'a [&'a str],
    /// Projected columns.
    pub columns: &'a [&'a str],
    /// `column = "type"` pairs for pgwire.
    pub column_types: &'a [(&'a str, &'a str)],
}

/// Writes an agent config into `dir/<name>.toml` with its store in `dir/<name>`; returns its
/// path. `extra` is appended at the top level (e.g. a `[store]` table).
pub fn write_agent_config(
    dir: &Path,
    name: &str,
    nats_url: &str,
    pgwire_port: u16,
    view: &AgentView<'_>,
    extra: &str,
) -> Result<PathBuf> {
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let types = view
        .column_types
        .iter()
        .map(|(c, t)| format!("{c} = {t:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = {name:?}\ndata_dir = {data:?}\n{extra}\n[nats]\nurl = {nats_url:?}\nstream = \"{STREAM}\"\n\n\
             [pgwire]\nlisten = \"127.0.0.1:{pgwire_port}\"\n\n\
             [[views]]\nname = {view_name:?}\nsource = \"public.{table}\"\nkey = [{key}]\nprimary_key = [{pk}]\n\
             columns = [{columns}]\ncolumn_types = {{ {types} }}\n",
            data = dir.join(name).display().to_string(),
            view_name = view.name,
            table = view.table,
            key = list(view.key),
            pk = list(view.primary_key),
            columns = list(view.columns),
        ),
    )
    .context("writing the agent config")?;
    Ok(path)
}

/// A tokio-postgres connection (no TLS) whose connection task runs in the background.
pub async fn connect(conn: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {conn}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// The libpq connection string of a `view-agent`'s pgwire port.
pub fn agent_conn(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=bench dbname=views")
}

/// Waits until the stream holds more than `more_than` messages on `subject`; returns the
/// seconds since `started`. Fails with the reader's output after `timeout` or when the reader
/// exits.
pub async fn seconds_until_count(
    js: &async_nats::jetstream::Context,
    subject: &str,
    more_than: u64,
    started: Instant,
    timeout: Duration,
    reader: &mut ChildProcess,
) -> Result<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(n) = subject_count(js, subject).await {
            if n > more_than {
                return Ok(started.elapsed().as_secs_f64());
            }
        }
        if !reader.is_running() {
            anyhow::bail!("the reader exited early\n{}", reader.describe());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "timed out after {timeout:?} waiting for {more_than} messages on {subject}\n{}",
                reader.describe()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Messages stored on `subject` in the stream, `None` while the stream does not exist.
pub async fn subject_count(js: &async_nats::jetstream::Context, subject: &str) -> Option<u64> {
    let stream = js.get_stream(STREAM).await.ok()?;
    let mut counts = stream.info_with_subjects(subject.to_string()).await.ok()?;
    let mut n = 0u64;
    while let Some(Ok((subj, count))) = counts.next().await {
        if subj == subject {
            n = count as u64;
        }
    }
    Some(n)
}

/// CPU time of a set of processes over a phase of the benchmark.
#[derive(Debug)]
pub struct CpuMeter {
    pids: Vec<u32>,
    start: Vec<Duration>,
}

impl CpuMeter {
    /// Starts measuring the CPU time of `pids` (a gone process counts zero).
    pub fn start(pids: &[u32]) -> CpuMeter {
        CpuMeter {
            pids: pids.to_vec(),
            start: pids.iter().map(|&p| cpu_of(p)).collect(),
        }
    }

    /// CPU time each process used since [`CpuMeter::start`], in the order given.
    pub fn used(&self) -> Vec<Duration> {
        self.pids
            .iter()
            .zip(&self.start)
            .map(|(&p, &s)| cpu_of(p).saturating_sub(s))
            .collect()
    }
}

/// Headers like the reader's for the `i`th event of a run of `per_tx`-event transactions (or
/// snapshot chunks): the de-duplication id `<commit_lsn>:<ordinal>`, the no-gap chain to the
/// event before, `op`, `table` and the commit LSN.
pub fn reader_headers(i: u64, per_tx: u64, op: &str, table: &str) -> async_nats::HeaderMap {
    let commit = |i: u64| format!("0/{:X}", 0x100_0000 + (i / per_tx) * 0x100);
    let id = |i: u64| format!("{}:{}", commit(i), i % per_tx + 1);
    let mut h = async_nats::HeaderMap::new();
    h.insert(HEADER_MSG_ID, id(i).as_str());
    if i > 0 {
        h.insert(
            async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID,
            id(i - 1).as_str(),
        );
    }
    h.insert(HEADER_OP, op);
    h.insert(HEADER_TABLE, table);
    h.insert(HEADER_COMMIT_LSN, commit(i).as_str());
    h
}

/// The NATS ceiling of a reader's publishing: `n` copies of `body` published by async-nats into
/// a fresh stream `name` on `<name lowercase>.public.top_clients` (a subject as long as the
/// reader's) with `headers(i)`, a PubAck asked for
/// only where `wants_ack(i)` (and on the last message) as the reader does, at most the reader's
/// window unacknowledged, the replies read from one subscription. Returns the seconds it took
/// and nats-server's CPU time meanwhile.
#[allow(clippy::too_many_arguments)]
pub async fn publish_like_reader(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    name: &str,
    nats_pid: u32,
    n: u64,
    headers: impl Fn(u64) -> async_nats::HeaderMap,
    wants_ack: impl Fn(u64) -> bool,
    body: &bytes::Bytes,
) -> Result<(f64, Duration)> {
    let subject = format!("{}.public.top_clients", name.to_lowercase());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![subject.clone()],
        ..Default::default()
    })
    .await?;
    let window = cdc::config::DEFAULT_MAX_IN_FLIGHT as u64;
    let inbox = client.new_inbox();
    let mut acks = client.subscribe(format!("{inbox}.*")).await?;
    let cpu = CpuMeter::start(&[nats_pid]);
    let t = Instant::now();
    let mut acked = 0u64;
    let next_ack = |acked: &mut u64, m: Option<async_nats::Message>| -> Result<()> {
        let m = m.context("the PubAck subscription ended")?;
        anyhow::ensure!(
            !m.payload.windows(7).any(|w| w == b"\"error\""),
            "raw publish refused: {}",
            String::from_utf8_lossy(&m.payload)
        );
        let i: u64 = m
            .subject
            .rsplit('.')
            .next()
            .and_then(|s| s.parse().ok())
            .context("PubAck on an unexpected subject")?;
        *acked = (*acked).max(i + 1);
        Ok(())
    };
    for i in 0..n {
        let h = headers(i);
        if wants_ack(i) || i + 1 == n {
            client
                .publish_with_reply_and_headers(
                    subject.clone(),
                    format!("{inbox}.{i}"),
                    h,
                    body.clone(),
                )
                .await?;
        } else {
            client
                .publish_with_headers(subject.clone(), h, body.clone())
                .await?;
        }
        while i + 1 - acked >= window {
            next_ack(&mut acked, acks.next().await)?;
        }
    }
    while acked < n {
        next_ack(&mut acked, acks.next().await)?;
    }
    Ok((t.elapsed().as_secs_f64(), cpu.used()[0]))
}

/// CPU time of this process's threads, summed by thread name (digits dropped, so that
/// `sled-io-1` … `sled-io-6` are one group, `sled-io`): where an in-process phase spent its CPU.
/// A thread that exits during the phase takes its CPU time with it.
pub struct ThreadMeter {
    start: BTreeMap<String, Duration>,
}

impl ThreadMeter {
    /// Starts measuring this process's threads.
    pub fn start() -> ThreadMeter {
        ThreadMeter {
            start: thread_cpu(),
        }
    }

    /// CPU time each thread group used since [`ThreadMeter::start`], groups that used none
    /// left out.
    pub fn used(&self) -> BTreeMap<String, Duration> {
        thread_cpu()
            .into_iter()
            .map(|(name, now)| {
                let before = self.start.get(&name).copied().unwrap_or_default();
                (name, now.saturating_sub(before))
            })
            .filter(|(_, used)| !used.is_zero())
            .collect()
    }
}

/// CPU time of this process's threads so far, by thread name without digits.
fn thread_cpu() -> BTreeMap<String, Duration> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some((name, cpu)) = parse_thread_stat(&stat) {
            let group: String = name.chars().filter(|c| !c.is_ascii_digit()).collect();
            *out.entry(group.trim_end_matches('-').to_owned())
                .or_default() += cpu;
        }
    }
    out
}

/// The name and CPU time of a `/proc/…/task/<tid>/stat` line.
fn parse_thread_stat(stat: &str) -> Option<(&str, Duration)> {
    let name = stat.rsplit_once(')')?.0.split_once('(')?.1;
    Some((name, testkit::stat_cpu_time(stat)?))
}

/// CPU time of a process so far (zero once it is gone).
pub fn cpu_of(pid: u32) -> Duration {
    testkit::cpu_time(pid).unwrap_or_default()
}

/// The pid of a server that must be running.
pub fn pid_of(nats: &testkit::Nats) -> Result<u32> {
    nats.pid().context("nats-server is not running")
}

/// Stops a child with SIGTERM and waits for it (bounded).
pub async fn stop(child: &mut ChildProcess) -> Result<()> {
    if child.is_running() {
        child.signal(testkit::Signal::Term)?;
        child.wait_with_timeout(Duration::from_secs(15)).await?;
    }
    Ok(())
}

/// How busy the whole machine's CPUs were over a phase (every process, this benchmark's and
/// its neighbours'), from `/proc/stat`.
#[derive(Debug, Clone, Copy)]
pub struct MachineMeter {
    start: (u64, u64),
}

impl MachineMeter {
    /// Starts measuring.
    pub fn start() -> MachineMeter {
        MachineMeter { start: cpu_ticks() }
    }

    /// Percent of the machine's CPU time that was busy since [`MachineMeter::start`] (100 = every
    /// CPU busy all the time).
    pub fn busy_percent(&self) -> f64 {
        let (busy, total) = cpu_ticks();
        let (busy, total) = (busy - self.start.0, total - self.start.1);
        if total == 0 {
            0.0
        } else {
            100.0 * busy as f64 / total as f64
        }
    }
}

/// `(busy, total)` clock ticks of all CPUs since boot.
fn cpu_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    (busy, busy + at(3) + at(4))
}

/// `(ppid, utime + stime + cutime + cstime)` of a process, in clock ticks.
fn ticks_of(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command: state, ppid, …; utime, stime, cutime, cstime are fields
    // 14–17 of the whole line.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let sum = fields
        .get(11..15)?
        .iter()
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    Some((ppid, sum))
}

/// CPU time of a process so far, with that of its children: those it has waited for, and its
/// live children (a Postgres postmaster's backends).
pub fn tree_cpu(pid: u32) -> Duration {
    Duration::from_millis(ticks_of(pid).map_or(0, |(_, t)| t) * 10) + children_cpu(pid)
}

/// CPU time of the live children of a process (and of their waited-for children).
pub fn children_cpu(parent: u32) -> Duration {
    let ticks: u64 = std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| ticks_of(pid).and_then(|(ppid, t)| (ppid == parent).then_some(t)))
                .sum()
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_stat_lines_parse() {
        // A line of /proc/<pid>/task/<tid>/stat (a thread name with a space and a parenthesis).
        let line = "4242 (log flusher) S 1 4242 4242 0 -1 4194368 120 0 0 0 37 5 0 0 20 0 9 0 \
                    1000 50000000 3000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_thread_stat(line),
            Some(("log flusher", Duration::from_millis(420)))
        );
        let odd = "7 (a) b) R 1 7 7 0 -1 0 0 0 0 0 1 2 0 0";
        assert_eq!(
            parse_thread_stat(odd),
            Some(("a) b", Duration::from_millis(30)))
        );
        assert_eq!(parse_thread_stat("7 (x) R 1"), None);
        assert_eq!(parse_thread_stat(""), None);
    }

    #[test]
    fn this_process_has_named_threads() {
        std::thread::Builder::new()
            .name("meter-probe-3".into())
            .spawn(|| {
                let t = std::time::Instant::now();
                while t.elapsed() < Duration::from_millis(30) {
                    std::hint::spin_loop();
                }
                let groups = thread_cpu();
                assert!(groups.contains_key("meter-probe"), "{groups:?}");
            })
            .expect("spawns")
            .join()
            .expect("joins");
    }
}
