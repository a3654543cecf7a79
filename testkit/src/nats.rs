//! A private `nats-server` with JetStream per test, on free loopback ports with a temp store dir.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use crate::sys::{self, Signal};
use crate::{free_port, read_log, tail, temp_dir, READY_TIMEOUT};

/// Environment variable naming the `nats-server` binary to use instead of searching `$PATH`
/// (e.g. a newer server for compatibility runs).
const BINARY_ENV: &str = "TESTKIT_NATS_SERVER";
/// How long a graceful shutdown may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on each readiness probe (connect + read), so a half-started server cannot hang us.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Log lines quoted in error messages.
const LOG_TAIL_LINES: usize = 40;
/// Attempts to find ports nobody else grabbed between [`free_port`] and the server's bind.
const PORT_ATTEMPTS: usize = 3;

/// How to set up a [`Nats`] server. `NatsOptions::default()` is the server's defaults.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// `max_payload` in bytes (server default 1 MiB, at most 64 MiB).
    pub max_payload: Option<u32>,
    /// Extra top-level lines for the server's config file.
    pub extra_conf: Vec<String>,
    /// When set, clients must authenticate; [`Nats::url`] then carries the credentials.
    pub auth: Option<NatsAuth>,
}

/// How clients authenticate to a [`Nats`] server (`authorization { … }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    /// A user and password: `nats://user:password@host:port`.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// A token: `nats://token@host:port`.
    Token(String),
}

/// A private `nats-server` with JetStream on `127.0.0.1:<free port>`, its store in a temp dir and
/// HTTP monitoring on a second free port. Killed and removed on drop.
#[derive(Debug)]
pub struct Nats {
    /// Root of everything the server owns; removed on drop (after `Drop::drop` ran).
    dir: tempfile::TempDir,
    binary: PathBuf,
    conf_path: PathBuf,
    log_path: PathBuf,
    store_dir: PathBuf,
    port: u16,
    monitor_port: u16,
    auth: Option<NatsAuth>,
    child: Option<Child>,
}

impl Nats {
    /// Starts a server with default options and waits until JetStream is ready.
    pub async fn start() -> Result<Nats> {
        Self::start_with(NatsOptions::default()).await
    }

    /// Starts a server configured as `opts` says and waits until JetStream is ready.
    pub async fn start_with(opts: NatsOptions) -> Result<Nats> {
        let binary = match std::env::var_os(BINARY_ENV) {
            Some(path) => PathBuf::from(path),
            None => crate::find_binary("nats-server")?,
        };
        let dir = temp_dir("nats")?;
        let root = dir.path().to_path_buf();
        let mut nats = Nats {
            conf_path: root.join("nats.conf"),
            log_path: root.join("nats.log"),
            store_dir: root.join("js"),
            dir,
            binary,
            port: 0,
            monitor_port: 0,
            auth: opts.auth.clone(),
            child: None,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            nats.port = free_port();
            nats.monitor_port = free_port();
            nats.write_conf(&opts)?;
            let log_start = fs::metadata(&nats.log_path).map(|m| m.len()).unwrap_or(0);
            match nats.start_again().await {
                Ok(()) => return Ok(nats),
                Err(e) => {
                    let log = read_log(&nats.log_path);
                    let this_run = log
                        .get(usize::try_from(log_start).unwrap_or(0)..)
                        .unwrap_or("");
                    if this_run.contains("address already in use") && attempt < PORT_ATTEMPTS {
                        nats.kill_server();
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        bail!("could not start nats-server on a free port after {PORT_ATTEMPTS} attempts")
    }

    /// The client URL: `nats://127.0.0.1:PORT`, with the credentials when the server
    /// requires them (`nats://user:password@…` or `nats://token@…`).
    pub fn url(&self) -> String {
        match &self.auth {
            None => format!("nats://127.0.0.1:{}", self.port),
            Some(NatsAuth::UserPassword { user, password }) => {
                format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
            }
            Some(NatsAuth::Token(token)) => format!("nats://{token}@127.0.0.1:{}", self.port),
        }
    }

    /// The client URL without credentials.
    pub fn public_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring base URL: `http://127.0.0.1:MONITOR_PORT`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The HTTP monitoring port.
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The JetStream store dir (kept across restarts).
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server log so far (every start appends to it), for failure messages.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// True while the server process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `signal` to the server (e.g. [`Signal::Stop`] to freeze it, [`Signal::Cont`] to
    /// let it go on).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("nats-server is not running")?;
        sys::send(pid, signal).with_context(|| format!("sending {signal:?} to nats-server"))
    }

    /// Crashes the server with SIGKILL and reaps it; the port is free afterwards.
    pub fn kill9(&mut self) -> Result<()> {
        ensure!(self.child.is_some(), "nats-server is not running");
        self.kill_server();
        Ok(())
    }

    /// Graceful stop, then start on the same ports and store dir; returns once JetStream is
    /// ready again.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// Graceful shutdown (SIGTERM), waiting up to 30 s for the process to exit.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("nats-server is not running");
        };
        sys::send(child.id(), Signal::Term).context("sending SIGTERM to nats-server")?;
        let start = Instant::now();
        let mut delay = Duration::from_millis(2);
        loop {
            if child
                .try_wait()
                .context("waiting for nats-server")?
                .is_some()
            {
                self.child = None;
                return Ok(());
            }
            if start.elapsed() > STOP_TIMEOUT {
                bail!(
                    "nats-server did not exit within {STOP_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                    tail(&self.log(), LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Starts the stopped (or killed) server again on the same ports and store dir and waits
    /// until it accepts clients and JetStream is ready.
    pub async fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("nats-server is already running");
        }
        self.child = None;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the nats-server log")?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.conf_path)
            .current_dir(self.dir.path())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    fn write_conf(&self, opts: &NatsOptions) -> Result<()> {
        let mut conf = String::from("# written by testkit\n");
        let _ = writeln!(conf, "listen: \"127.0.0.1:{}\"", self.port);
        let _ = writeln!(conf, "http: \"127.0.0.1:{}\"", self.monitor_port);
        let _ = writeln!(conf, "server_name: \"testkit-{}\"", self.port);
        let _ = writeln!(
            conf,
            "jetstream {{\n  store_dir: \"{}\"\n}}",
            self.store_dir.display()
        );
        if let Some(max_payload) = opts.max_payload {
            let _ = writeln!(conf, "max_payload: {max_payload}");
        }
        match &opts.auth {
            None => {}
            Some(NatsAuth::UserPassword { user, password }) => {
                let _ = writeln!(
                    conf,
                    "authorization {{\n  user: {user:?}\n  password: {password:?}\n}}"
                );
            }
            Some(NatsAuth::Token(token)) => {
                let _ = writeln!(conf, "authorization {{\n  token: {token:?}\n}}");
            }
        }
        for line in &opts.extra_conf {
            let _ = writeln!(conf, "{line}");
        }
        fs::write(&self.conf_path, conf).context("writing nats.conf")
    }

    /// Polls until the client port sends `INFO` and `/healthz` (which covers JetStream) answers
    /// 200; fails early with the log tail if the process exits.
    async fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(2);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("checking nats-server")? {
                    self.child = None;
                    bail!(
                        "nats-server exited during startup ({status}); log tail:\n{}",
                        tail(&self.log(), LOG_TAIL_LINES)
                    );
                }
            }
            let probe = async {
                read_info(self.port).await?;
                healthz(self.monitor_port).await
            };
            let last_error = match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e,
                Err(_) => anyhow::anyhow!("probe timed out after {PROBE_TIMEOUT:?}"),
            };
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "timed out after {READY_TIMEOUT:?} waiting for nats-server on port {} to be \
                     ready (last error: {last_error:#}); log tail:\n{}",
                    self.port,
                    tail(&self.log(), LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    fn kill_server(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = sys::send(child.id(), Signal::Kill);
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "testkit: nats-server on port {} log tail:\n{}",
                self.port,
                tail(&self.log(), LOG_TAIL_LINES)
            );
        }
        self.kill_server();
    }
}

/// Connects to a NATS client port and reads the server's greeting line (`INFO {…}`).
pub(crate) async fn read_info(port: u16) -> Result<String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .await
        .context("reading INFO")?;
    ensure!(line.starts_with("INFO "), "unexpected greeting: {line:?}");
    Ok(line)
}

/// `GET /healthz` on the monitoring port; Ok when it answers 200.
async fn healthz(monitor_port: u16) -> Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", monitor_port))
        .await
        .with_context(|| format!("connecting to monitoring port {monitor_port}"))?;
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .context("sending GET /healthz")?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .context("reading /healthz")?;
    let status = response.lines().next().unwrap_or_default();
    ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "/healthz answered {status:?}: {}",
        response.lines().last().unwrap_or_default()
    );
    Ok(())
}
