//! The demo's stack: a private Postgres (the Top Clients database, set up from `sql/`), a
//! private NATS JetStream server, `cdc run` and two `view-agent run`s (gig page, user page), each
//! agent with its own config file, sled directory and pgwire port.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};
use testkit::ChildProcess;

/// The Top Clients schema (`sql/schema.sql`).
pub const SCHEMA_SQL: &str = include_str!("../../../sql/schema.sql");
/// The reader's least-privilege role (`sql/roles.sql`).
pub const ROLES_SQL: &str = include_str!("../../../sql/roles.sql");
/// The publication (`sql/publication.sql`).
pub const PUBLICATION_SQL: &str = include_str!("../../../sql/publication.sql");
/// The sample data (`sql/sample_data.sql`).
pub const SAMPLE_DATA_SQL: &str = include_str!("../../../sql/sample_data.sql");

/// The reader's role, created by `sql/roles.sql`.
pub const READER_ROLE: &str = "cdc_reader";
/// The slot the reader creates.
pub const SLOT: &str = "cdc_topclients";
/// The publication `sql/publication.sql` creates.
pub const PUBLICATION: &str = "cdc_topclients";
/// The JetStream stream.
pub const STREAM: &str = "CDC";
/// The subject prefix.
pub const SUBJECT_PREFIX: &str = "cdc";

/// How long a process gets to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The gig page agent's views: the hybrid approach, client ids only.
pub const GIG_VIEWS: &str = r#"
# The seed's hybrid approach: only the ids; the gig page asks the Top Clients service for the
# details, and only for sellers that have ids.
[[views]]
name = "top_client_ids"
source = "public.top_clients"
key = ["seller_id"]
primary_key = ["seller_id", "client_id"]
columns = ["client_id"]
column_types = { seller_id = "int8", client_id = "int8" }
"#;

/// The user page agent's views: full top clients (with the TOASTed description) and profiles.
pub const USER_VIEWS: &str = r#"
# The asynchronous approach: everything the user page shows, kept locally.
[[views]]
name = "top_clients"
source = "public.top_clients"
key = ["seller_id"]
primary_key = ["seller_id", "client_id"]
columns = ["client_id", "position", "name", "logo_url", "industry", "description"]
column_types = { seller_id = "int8", client_id = "int8", position = "int4" }

[[views]]
name = "sellers"
source = "public.sellers"
key = ["id"]
primary_key = ["id"]
columns = ["username", "display_name", "country"]
column_types = { id = "int8" }
"#;

/// The reader's `cdc.toml` for the Top Clients database at `postgres_url`.
pub fn reader_toml(postgres_url: &str, nats_url: &str) -> String {
    format!(
        "# The reader: Top Clients database → JetStream.\n\
         [postgres]\n\
         url = {postgres_url:?}\n\
         slot = {SLOT:?}\n\
         publication = {PUBLICATION:?}\n\
         tables = [\"public.sellers\", \"public.top_clients\"]\n\
         \n\
         [nats]\n\
         url = {nats_url:?}\n\
         stream = {STREAM:?}\n\
         subject_prefix = {SUBJECT_PREFIX:?}\n"
    )
}

/// An agent's config: `name`, its sled directory, where the stream is, its pgwire address and
/// its views.
pub fn agent_toml(
    name: &str,
    data_dir: &Path,
    nats_url: &str,
    listen: &str,
    views: &str,
) -> String {
    let mut text = String::new();
    let _ = write!(
        text,
        "name = {name:?}\n\
         data_dir = {data:?}\n\
         \n\
         [nats]\n\
         url = {nats_url:?}\n\
         stream = {STREAM:?}\n\
         subject_prefix = {SUBJECT_PREFIX:?}\n\
         \n\
         [pgwire]\n\
         listen = {listen:?}\n",
        data = data_dir.display().to_string(),
    );
    text.push_str(views);
    text
}

/// Creates the Top Clients database on `pg` and runs `sql/` on it as the superuser (the tables'
/// owner): schema, the reader's role, the publication, the sample data. Returns its name.
pub async fn create_source(pg: &testkit::Postgres) -> Result<String> {
    let db = pg.create_database("topclients").await?;
    let client = pg.connect(&db).await?;
    for (file, sql) in [
        ("sql/schema.sql", SCHEMA_SQL),
        ("sql/roles.sql", ROLES_SQL),
        ("sql/publication.sql", PUBLICATION_SQL),
        ("sql/sample_data.sql", SAMPLE_DATA_SQL),
    ] {
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("running {file}"))?;
    }
    Ok(db)
}

/// The server version of `pg`, e.g. `15.14 (Debian 15.14-0+deb12u1)`.
pub async fn postgres_version(pg: &testkit::Postgres) -> Result<String> {
    let client = pg.connect("postgres").await?;
    let row = client.query_one("SHOW server_version", &[]).await?;
    Ok(row.try_get(0)?)
}

/// `nats-server --version`, e.g. `nats-server: v2.9.10`.
pub fn nats_version() -> Result<String> {
    let binary = testkit::find_binary("nats-server")?;
    let out = Command::new(binary).arg("--version").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Everything the demo runs, as separate processes.
#[derive(Debug)]
pub struct ProcessStack {
    /// The Top Clients database's server.
    pub pg: testkit::Postgres,
    /// The JetStream server.
    pub nats: testkit::Nats,
    /// The Top Clients database.
    pub db: String,
    /// `cdc run`.
    pub reader: ChildProcess,
    /// `view-agent run` for the gig page.
    pub gig_agent: ChildProcess,
    /// `view-agent run` for the user page.
    pub user_agent: ChildProcess,
    /// The gig page agent's pgwire address.
    pub gig_addr: String,
    /// The user page agent's pgwire address.
    pub user_addr: String,
}

impl ProcessStack {
    /// Starts the stack: Postgres (set up from `sql/`), NATS, the reader (as the least-privilege
    /// role) and the two agents. The binaries `cdc` and `view-agent` are taken from `bin_dir`;
    /// configs and sled directories go under `work_dir`. Each started process's id is appended
    /// to `pids` (if given), for the demo script's cleanup of last resort.
    pub async fn start(bin_dir: &Path, work_dir: &Path, pids: Option<&Path>) -> Result<Self> {
        let record = |pid: Option<u32>| -> Result<()> {
            if let (Some(path), Some(pid)) = (pids, pid) {
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {}", path.display()))?;
                writeln!(file, "{pid}")?;
            }
            Ok(())
        };
        let binary = |name: &str| -> Result<PathBuf> {
            let path = bin_dir.join(name);
            anyhow::ensure!(
                path.is_file(),
                "{} is missing: build it first (`cargo build -p cdc -p consumers --bins`)",
                path.display()
            );
            Ok(path)
        };
        let cdc_bin = binary("cdc")?;
        let agent_bin = binary("view-agent")?;

        let pg = testkit::Postgres::start().await?;
        record(pg.pid())?;
        let version = postgres_version(&pg).await?;
        println!(
            "  postgres   {version} · private cluster on 127.0.0.1:{} · wal_level = logical",
            pg.port()
        );
        let db = create_source(&pg).await?;
        println!(
            "             database {db}: sql/schema.sql, sql/roles.sql (role {READER_ROLE}: LOGIN REPLICATION, SELECT only), sql/publication.sql, sql/sample_data.sql"
        );

        let nats = testkit::Nats::start().await?;
        record(nats.pid())?;
        println!(
            "  nats       {} · JetStream on {}",
            nats_version().unwrap_or_else(|_| "nats-server".to_owned()),
            nats.url()
        );

        let cdc_toml = work_dir.join("cdc.toml");
        std::fs::write(
            &cdc_toml,
            reader_toml(&pg.url_as(READER_ROLE, None, &db), &nats.url()),
        )
        .with_context(|| format!("writing {}", cdc_toml.display()))?;
        let mut cmd = Command::new(&cdc_bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&cdc_toml)
            .env("RUST_LOG", "info");
        let mut reader = testkit::spawn_logged(cmd, "cdc")?;
        record(Some(reader.pid()))?;
        reader.wait_for_output("streaming", READY_TIMEOUT).await?;
        println!(
            "  reader     cdc run --config {} · slot {SLOT}, stream {STREAM}",
            cdc_toml.display()
        );

        let mut agents = Vec::new();
        for (name, views) in [("gig-page", GIG_VIEWS), ("user-page", USER_VIEWS)] {
            let listen = format!("127.0.0.1:{}", testkit::free_port());
            let path = work_dir.join(format!("{name}-agent.toml"));
            let data_dir = work_dir.join("data").join(name);
            std::fs::write(
                &path,
                agent_toml(name, &data_dir, &nats.url(), &listen, views),
            )
            .with_context(|| format!("writing {}", path.display()))?;
            let mut cmd = Command::new(&agent_bin);
            cmd.arg("run")
                .arg("--config")
                .arg(&path)
                .env("RUST_LOG", "info");
            let mut agent = testkit::spawn_logged(cmd, &format!("view-agent {name}"))?;
            record(Some(agent.pid()))?;
            agent
                .wait_for_output("view-agent ready", READY_TIMEOUT)
                .await?;
            println!(
                "  agent      view-agent run --config {} · pgwire {listen} · sled {}",
                path.display(),
                data_dir.display()
            );
            agents.push((agent, listen));
        }
        let mut agents = agents.into_iter();
        let (gig_agent, gig_addr) = agents.next().context("gig-page agent")?;
        let (user_agent, user_addr) = agents.next().context("user-page agent")?;
        Ok(ProcessStack {
            pg,
            nats,
            db,
            reader,
            gig_agent,
            user_agent,
            gig_addr,
            user_addr,
        })
    }

    /// The Top Clients service's URL (the tables' owner).
    pub fn service_url(&self) -> String {
        self.pg.url(&self.db)
    }

    /// Output tails of the three processes, for a failure message.
    pub fn describe(&self) -> String {
        format!(
            "{}\n{}\n{}",
            self.reader.describe(),
            self.gig_agent.describe(),
            self.user_agent.describe()
        )
    }

    /// Stops the reader and the agents with SIGTERM (they exit 0 after a clean shutdown), then
    /// the servers.
    pub async fn shutdown(mut self) -> Result<()> {
        for process in [&self.reader, &self.gig_agent, &self.user_agent] {
            process.signal(testkit::Signal::Term)?;
        }
        for process in [&mut self.reader, &mut self.gig_agent, &mut self.user_agent] {
            let status = process.wait_with_timeout(Duration::from_secs(20)).await?;
            anyhow::ensure!(
                status.success(),
                "{} exited with {status} on SIGTERM\n{}",
                process.name(),
                process.describe()
            );
        }
        self.nats.stop().await?;
        self.pg.stop().await?;
        Ok(())
    }
}
