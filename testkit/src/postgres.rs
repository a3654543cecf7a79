//! A private Postgres cluster per test: `initdb` into a temp dir, `postgres` on a free loopback
//! port, run as the `postgres` OS user when the tests run as root (Postgres refuses to run as root).

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::hash::BuildHasher as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use tokio_postgres::config::SslMode;
use tokio_postgres::NoTls;

use crate::sys::{self, Signal};
use crate::{free_port, read_log, tail, temp_dir, READY_TIMEOUT};

/// Name of the bootstrap superuser of every cluster.
const SUPERUSER: &str = "postgres";
/// OS user the server runs as when the tests run as root.
const OS_USER: &str = "postgres";
/// Environment variable naming a directory holding `initdb` and `postgres`, overriding the search.
const BINDIR_ENV: &str = "TESTKIT_PG_BINDIR";
/// How long a fast shutdown may take before `stop` gives up.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Log lines quoted in error messages.
const LOG_TAIL_LINES: usize = 40;
/// Attempts to find a port nobody else grabbed between [`free_port`] and the server's bind.
const PORT_ATTEMPTS: usize = 3;

/// Counter making [`Postgres::create_database`] names unique within a process.
static DATABASE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How clients authenticate over TCP (`host` lines of `pg_hba.conf`). Unix-socket connections
/// are always `trust`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PgAuth {
    /// No password needed.
    #[default]
    Trust,
    /// `md5`; passwords are stored as MD5 hashes (`password_encryption = md5`).
    Md5,
    /// `scram-sha-256`; passwords are stored as SCRAM secrets.
    Scram,
}

impl PgAuth {
    fn hba_method(self) -> &'static str {
        match self {
            PgAuth::Trust => "trust",
            PgAuth::Md5 => "md5",
            PgAuth::Scram => "scram-sha-256",
        }
    }

    fn needs_password(self) -> bool {
        self != PgAuth::Trust
    }
}

/// Server certificate and key (PEM) for a cluster that accepts TLS.
#[derive(Debug, Clone)]
pub struct PgTls {
    /// Certificate chain, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

/// How to set up a [`Postgres`] cluster. `PgOptions::default()` is trust auth, no TLS,
/// `wal_level = logical`.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Authentication method for TCP connections.
    pub auth: PgAuth,
    /// When set, `ssl = on` with this certificate; both TLS and plain connections are accepted.
    pub tls: Option<PgTls>,
    /// `wal_level` (default `logical`; set `replica` to test the reader's error message).
    pub wal_level: String,
    /// Extra `postgresql.conf` lines, applied after the harness's own settings.
    pub extra_conf: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            auth: PgAuth::Trust,
            tls: None,
            wal_level: "logical".to_owned(),
            extra_conf: Vec::new(),
        }
    }
}

/// A private Postgres cluster in a temp dir, listening on `127.0.0.1:<free port>` with its unix
/// socket inside the temp dir. Killed and removed on drop.
#[derive(Debug)]
pub struct Postgres {
    /// Root of everything the cluster owns; removed on drop (after `Drop::drop` ran).
    dir: tempfile::TempDir,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    auth: PgAuth,
    tls: bool,
    password: String,
    /// `(uid, gid)` to run the server as; `None` when not running as root.
    run_as: Option<(u32, u32)>,
    postmaster: Option<Child>,
}

impl Postgres {
    /// Starts a cluster with the defaults: trust auth, no TLS, `wal_level = logical`.
    pub async fn start() -> Result<Postgres> {
        Self::start_with(PgOptions::default()).await
    }

    /// Creates (`initdb`) and starts a cluster set up as `opts` says, and waits until it accepts
    /// connections.
    pub async fn start_with(opts: PgOptions) -> Result<Postgres> {
        let bin_dir = find_bin_dir()?;
        let run_as = if sys::effective_uid() == 0 {
            let ids = sys::lookup_user(OS_USER)
                .context("looking up the `postgres` OS user")?
                .with_context(|| {
                    format!(
                        "running as root, but there is no `{OS_USER}` OS user to run the server \
                         as (Postgres refuses to run as root): install the Debian package \
                         `postgresql`"
                    )
                })?;
            Some(ids)
        } else {
            None
        };

        let dir = temp_dir("pg")?;
        let root = dir.path().to_path_buf();
        let data_dir = root.join("data");
        let socket_dir = root.join("sock");
        let log_path = root.join("postgres.log");
        fs::create_dir(&socket_dir).context("creating the socket dir")?;
        chown(&root, run_as)?;
        chown(&socket_dir, run_as)?;

        let password = new_password();
        let mut pg = Postgres {
            dir,
            data_dir,
            socket_dir,
            log_path,
            bin_dir,
            port: 0,
            auth: opts.auth,
            tls: opts.tls.is_some(),
            password,
            run_as,
            postmaster: None,
        };
        pg.initdb(&opts)?;

        for attempt in 1..=PORT_ATTEMPTS {
            pg.port = free_port();
            pg.write_conf(&opts)?;
            let log_start = fs::metadata(&pg.log_path).map(|m| m.len()).unwrap_or(0);
            match pg.start_again().await {
                Ok(()) => break,
                Err(e) => {
                    let log = read_log(&pg.log_path);
                    let this_run = log
                        .get(usize::try_from(log_start).unwrap_or(0)..)
                        .unwrap_or("");
                    let port_taken = this_run.contains("could not bind")
                        || this_run.contains("Address already in use");
                    if port_taken && attempt < PORT_ATTEMPTS {
                        pg.kill_postmaster();
                        continue;
                    }
                    return Err(e);
                }
            }
        }

        if pg.auth == PgAuth::Md5 {
            // initdb stored the password as a SCRAM secret (md5 auth accepts that, silently doing
            // SCRAM); store it again under `password_encryption = md5` so md5 is really exercised.
            let client = pg.connect("postgres").await?;
            client
                .batch_execute(&format!(
                    "ALTER ROLE {SUPERUSER} PASSWORD '{}'",
                    pg.password
                ))
                .await
                .context("storing the superuser password as md5")?;
        }
        Ok(pg)
    }

    /// The postmaster's process id while it runs (for a caller's own cleanup of last resort).
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// The bootstrap superuser: `postgres`.
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// The superuser's password (set for every auth method; only checked with md5/SCRAM).
    pub fn superuser_password(&self) -> &str {
        &self.password
    }

    /// The auth method this cluster was started with.
    pub fn auth(&self) -> PgAuth {
        self.auth
    }

    /// A libpq-style URL for the superuser:
    /// `postgres://postgres[:PW]@127.0.0.1:PORT/db?sslmode=disable` (the password only when the
    /// auth method needs it; `sslmode=require` when the cluster has TLS).
    pub fn url(&self, db: &str) -> String {
        let password = self.auth.needs_password().then_some(self.password.as_str());
        self.url_as(SUPERUSER, password, db)
    }

    /// A libpq-style URL for any user (user and password are percent-encoded).
    pub fn url_as(&self, user: &str, password: Option<&str>, db: &str) -> String {
        let mut url = format!("postgres://{}", percent_encode(user));
        if let Some(password) = password {
            let _ = write!(url, ":{}", percent_encode(password));
        }
        let sslmode = if self.tls { "require" } else { "disable" };
        let _ = write!(
            url,
            "@{}:{}/{}?sslmode={sslmode}",
            self.host(),
            self.port,
            percent_encode(db)
        );
        url
    }

    /// A tokio-postgres config for `user` on `db` over TCP without TLS.
    pub fn config_as(
        &self,
        user: &str,
        password: Option<&str>,
        db: &str,
    ) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(self.host())
            .port(self.port)
            .user(user)
            .dbname(db)
            .ssl_mode(SslMode::Disable)
            .application_name("testkit")
            .connect_timeout(Duration::from_secs(5));
        if let Some(password) = password {
            config.password(password);
        }
        config
    }

    /// Connects to `db` as the superuser over TCP without TLS; the connection task is spawned
    /// on the current tokio runtime.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client> {
        self.connect_as(SUPERUSER, Some(&self.password), db).await
    }

    /// Connects to `db` as `user` over TCP without TLS; the connection task is spawned on the
    /// current tokio runtime.
    pub async fn connect_as(
        &self,
        user: &str,
        password: Option<&str>,
        db: &str,
    ) -> Result<tokio_postgres::Client> {
        let (client, connection) = self
            .config_as(user, password, db)
            .connect(NoTls)
            .await
            .with_context(|| {
                format!(
                    "connecting to database `{db}` as `{user}` on 127.0.0.1:{}",
                    self.port
                )
            })?;
        tokio::spawn(async move {
            // The server going away under a test (kill9, restart) ends the connection; that is
            // the test's business, so this is only a hint in the captured output.
            if let Err(e) = connection.await {
                eprintln!("testkit: postgres connection closed: {e}");
            }
        });
        Ok(client)
    }

    /// Runs `sql` (one or more statements, no parameters) on `db` as the superuser.
    pub async fn batch_execute(&self, db: &str, sql: &str) -> Result<()> {
        let client = self.connect(db).await?;
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("running on `{db}`: {sql}"))
    }

    /// Creates a database with a fresh name (`<prefix>_<counter>_<pid>`) and returns the name.
    pub async fn create_database(&self, prefix: &str) -> Result<String> {
        let n = DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut clean: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        clean.truncate(40);
        let name = format!("{clean}_{n}_{}", std::process::id());
        self.batch_execute("postgres", &format!("CREATE DATABASE \"{name}\""))
            .await?;
        Ok(name)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the server's unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The directory of the Postgres binaries in use (`initdb`, `postgres`, and usually `psql`,
    /// `pg_recvlogical`, …).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// True while the postmaster process is running.
    pub fn is_running(&mut self) -> bool {
        match self.postmaster.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Crashes the server: SIGKILL to the postmaster and every process it forked, as a power
    /// cut would. Returns once all are gone (port released, shared memory detached), so
    /// [`Postgres::start_again`] can run crash recovery on the same data dir and port.
    pub fn kill9(&mut self) -> Result<()> {
        ensure!(self.postmaster.is_some(), "postgres is not running");
        let survivors = self.kill_postmaster();
        ensure!(
            survivors.is_empty(),
            "postgres processes {survivors:?} survived SIGKILL"
        );
        Ok(())
    }

    /// `pg_ctl restart -m fast`: fast shutdown, then start on the same port and data dir and wait
    /// until it accepts connections.
    pub async fn restart_fast(&mut self) -> Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// Fast shutdown (SIGINT: roll back open transactions, disconnect clients, checkpoint), waiting
    /// up to a minute for the postmaster to exit.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(child) = self.postmaster.as_mut() else {
            bail!("postgres is not running");
        };
        sys::send(child.id(), Signal::Int).context("sending SIGINT to the postmaster")?;
        let start = Instant::now();
        let mut delay = Duration::from_millis(2);
        loop {
            if child
                .try_wait()
                .context("waiting for the postmaster")?
                .is_some()
            {
                self.postmaster = None;
                return Ok(());
            }
            if start.elapsed() > STOP_TIMEOUT {
                bail!(
                    "postgres did not finish a fast shutdown within {STOP_TIMEOUT:?}; log tail:\n{}",
                    tail(&self.log(), LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// Starts the stopped (or killed) server again on the same port and data dir and waits until
    /// it accepts connections (after crash recovery, if it was killed).
    pub async fn start_again(&mut self) -> Result<()> {
        if self.is_running() {
            bail!("postgres is already running");
        }
        self.postmaster = None;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening the postgres log")?;
        let mut cmd = Command::new(self.bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log handle")?)
            .stderr(log);
        self.prepare(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin_dir.join("postgres").display()))?;
        self.postmaster = Some(child);
        self.wait_ready().await
    }

    /// The server log so far (every start appends to it), for failure messages.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Path of the server log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Runs `initdb` as the server's OS user.
    fn initdb(&self, opts: &PgOptions) -> Result<()> {
        let root = self.dir.path();
        let pwfile = root.join("pwfile");
        fs::write(&pwfile, format!("{}\n", self.password)).context("writing the pwfile")?;
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600))?;
        chown(&pwfile, self.run_as)?;

        let mut cmd = Command::new(self.bin_dir.join("initdb"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg(format!("--username={SUPERUSER}"))
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("--auth-local=trust")
            .arg(format!("--auth-host={}", opts.auth.hba_method()))
            .arg("--encoding=UTF8")
            .arg("--no-locale")
            .arg("--no-sync")
            .stdin(Stdio::null());
        self.prepare(&mut cmd);
        let out = cmd
            .output()
            .with_context(|| format!("running {}", self.bin_dir.join("initdb").display()))?;
        let _ = fs::remove_file(&pwfile);
        if !out.status.success() {
            bail!(
                "initdb failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let method = opts.auth.hba_method();
        let mut hba = String::from(
            "# written by testkit\nlocal all all trust\nlocal replication all trust\n",
        );
        if opts.tls.is_some() {
            let _ = writeln!(hba, "hostssl all all 127.0.0.1/32 {method}");
            let _ = writeln!(hba, "hostssl replication all 127.0.0.1/32 {method}");
        }
        let _ = writeln!(hba, "host all all 127.0.0.1/32 {method}");
        let _ = writeln!(hba, "host replication all 127.0.0.1/32 {method}");
        self.write_owned(&self.data_dir.join("pg_hba.conf"), &hba)?;

        if let Some(tls) = &opts.tls {
            self.write_owned(&self.data_dir.join("server.crt"), &tls.cert_pem)?;
            self.write_owned(&self.data_dir.join("server.key"), &tls.key_pem)?;
        }

        let conf = self.data_dir.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).context("reading postgresql.conf")?;
        text.push_str("\n# testkit settings (port etc.) live here, rewritten on every start\ninclude 'testkit.conf'\n");
        self.write_owned(&conf, &text)?;
        Ok(())
    }

    /// Writes `testkit.conf`, included from `postgresql.conf`.
    fn write_conf(&self, opts: &PgOptions) -> Result<()> {
        let mut conf = String::from("# written by testkit\n");
        let mut set = |key: &str, value: &str| {
            let _ = writeln!(conf, "{key} = {value}");
        };
        set("listen_addresses", "'127.0.0.1'");
        set("port", &self.port.to_string());
        set(
            "unix_socket_directories",
            &quote(&self.socket_dir.to_string_lossy()),
        );
        set("wal_level", &quote(&opts.wal_level));
        set("max_replication_slots", "32");
        set("max_wal_senders", "32");
        // Tests don't survive an OS crash anyway; skipping fsync makes them much faster.
        set("fsync", "off");
        set("full_page_writes", "off");
        // But `synchronous_commit` stays on: with it off, a commit returns before its WAL is even
        // written to the OS, so `kill9` loses acknowledged transactions, and walsenders only send
        // WAL once the WAL writer flushed it (up to `wal_writer_delay` = 200 ms later). With
        // fsync off, "on" costs one write(2) per commit.
        set("synchronous_commit", "on");
        set("shared_buffers", "128MB");
        set("max_connections", "200");
        set("wal_sender_timeout", "60s");
        // Dynamic shared memory as files in the data dir, so a killed cluster leaves nothing in
        // /dev/shm.
        set("dynamic_shared_memory_type", "mmap");
        set("logging_collector", "off");
        set("log_destination", "'stderr'");
        set("log_line_prefix", "'%m [%p] %q%u@%d '");
        set("lc_messages", "'C'");
        match opts.auth {
            PgAuth::Trust => {}
            PgAuth::Md5 => set("password_encryption", "md5"),
            PgAuth::Scram => set("password_encryption", "'scram-sha-256'"),
        }
        if opts.tls.is_some() {
            set("ssl", "on");
            set("ssl_cert_file", "'server.crt'");
            set("ssl_key_file", "'server.key'");
        }
        for line in &opts.extra_conf {
            let _ = writeln!(conf, "{line}");
        }
        self.write_owned(&self.data_dir.join("testkit.conf"), &conf)
    }

    /// Writes a file readable only by the server's OS user.
    fn write_owned(&self, path: &Path, contents: &str) -> Result<()> {
        fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", path.display()))?;
        chown(path, self.run_as)
    }

    /// Sets the OS user, working dir, process group and environment for a server command.
    fn prepare(&self, cmd: &mut Command) {
        cmd.current_dir(self.dir.path())
            // Its own process group: a Ctrl-C meant for the test runner does not reach it.
            .process_group(0)
            .env("LC_ALL", "C")
            .env("LANG", "C");
        for var in [
            "PGDATA",
            "PGHOST",
            "PGPORT",
            "PGUSER",
            "PGPASSWORD",
            "PGDATABASE",
            "PGOPTIONS",
        ] {
            cmd.env_remove(var);
        }
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
    }

    /// Polls until the server accepts a TCP connection from the superuser; fails early (with the
    /// log tail) if the postmaster exits.
    async fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(2);
        let password = self.password.clone();
        let config = self.config_as(SUPERUSER, Some(&password), "postgres");
        loop {
            if let Some(child) = self.postmaster.as_mut() {
                if let Some(status) = child.try_wait().context("checking the postmaster")? {
                    self.postmaster = None;
                    bail!(
                        "postgres exited during startup ({status}); log tail:\n{}",
                        tail(&self.log(), LOG_TAIL_LINES)
                    );
                }
            }
            let last_error = match config.connect(NoTls).await {
                Ok((client, connection)) => {
                    drop(client);
                    let _ = connection.await;
                    return Ok(());
                }
                Err(e) => e,
            };
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "timed out after {READY_TIMEOUT:?} waiting for postgres on port {} to accept \
                     connections (last error: {last_error}); log tail:\n{}",
                    self.port,
                    tail(&self.log(), LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the postmaster and its children and reaps the postmaster; returns the pids that
    /// are still alive after a bounded wait (normally none).
    fn kill_postmaster(&mut self) -> Vec<u32> {
        let Some(mut child) = self.postmaster.take() else {
            return Vec::new();
        };
        let pid = child.id();
        if let Ok(Some(_)) = child.try_wait() {
            return Vec::new();
        }
        // Freeze the postmaster first so it cannot fork (or restart crashed children) while its
        // children are collected; they are session leaders, so a process-group kill would miss
        // them.
        let _ = sys::send(pid, Signal::Stop);
        sys::wait_stopped(pid, Duration::from_secs(2));
        let children = sys::children_of(pid);
        let _ = sys::send(pid, Signal::Kill);
        for &child_pid in &children {
            let _ = sys::send(child_pid, Signal::Kill);
        }
        let _ = child.wait();
        sys::wait_all_dead(&children, Duration::from_secs(10))
    }

    /// Removes the SysV shared memory segment a killed postmaster left behind (a clean shutdown,
    /// or the next start, removes it otherwise). Its key and id are on line 7 of
    /// `postmaster.pid`.
    fn remove_stale_shared_memory(&self) {
        let Ok(text) = fs::read_to_string(self.data_dir.join("postmaster.pid")) else {
            return;
        };
        let Some(line) = text.lines().nth(6) else {
            return;
        };
        let mut fields = line.split_whitespace();
        let (Some(_key), Some(id)) = (fields.next(), fields.next()) else {
            return;
        };
        if let Ok(id) = id.parse::<i32>() {
            sys::remove_shm_segment(id);
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "testkit: postgres on port {} log tail:\n{}",
                self.port,
                tail(&self.log(), LOG_TAIL_LINES)
            );
        }
        self.kill_postmaster();
        // postmaster.pid survives only an unclean end (our kill, or an earlier kill9).
        self.remove_stale_shared_memory();
    }
}

/// Finds the directory holding both `initdb` and `postgres` (both from the same installation).
fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        ensure!(
            dir.join("initdb").is_file() && dir.join("postgres").is_file(),
            "{BINDIR_ENV}={} does not hold `initdb` and `postgres`",
            dir.display()
        );
        return Ok(dir);
    }
    let initdb = crate::find_binary("initdb")?;
    let initdb = fs::canonicalize(&initdb).unwrap_or(initdb);
    let dir = initdb
        .parent()
        .context("initdb has no parent directory")?
        .to_path_buf();
    ensure!(
        dir.join("postgres").is_file(),
        "found {} but no `postgres` next to it: install the Debian package `postgresql`",
        initdb.display()
    );
    Ok(dir)
}

/// Hands `path` to the server's OS user (no-op when not running as root).
fn chown(path: &Path, run_as: Option<(u32, u32)>) -> Result<()> {
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {} to the postgres user", path.display()))?;
    }
    Ok(())
}

/// A random alphanumeric password (no quoting or URL encoding needed).
fn new_password() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = (nanos, std::process::id());
    let a = std::collections::hash_map::RandomState::new().hash_one(seed);
    let b = std::collections::hash_map::RandomState::new().hash_one(seed);
    format!("pw{a:016x}{b:016x}")
}

/// A `postgresql.conf` string literal.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_unreserved() {
        assert_eq!(percent_encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(percent_encode("p@ss:w/rd"), "p%40ss%3Aw%2Frd");
    }

    #[test]
    fn conf_quotes_are_doubled() {
        assert_eq!(quote("it's"), "'it''s'");
    }
}
