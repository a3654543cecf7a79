//! `docker/` without a Docker engine: what can be checked is checked. The compose file parses
//! and holds the stack (Postgres with `wal_level=logical`, NATS with JetStream, the reader, the
//! two agents); every file it mounts or builds from exists; every config it mounts parses and
//! validates with the real loaders, and agrees with the stack around it (ports, data volumes,
//! the demo's views); the Dockerfile is multi-stage, ends as a non-root user, COPYs paths that
//! exist and builds and copies binaries that the workspace really has.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context as _, Result};
use yaml_rust2::{Yaml, YamlLoader};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn docker_dir() -> PathBuf {
    repo_root().join("docker")
}

fn compose() -> Result<Yaml> {
    let path = docker_dir().join("compose.yml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = YamlLoader::load_from_str(&text).context("compose.yml is not valid YAML")?;
    ensure!(
        docs.len() == 1,
        "compose.yml holds {} documents",
        docs.len()
    );
    Ok(docs.remove(0))
}

fn services(doc: &Yaml) -> Result<BTreeMap<String, Yaml>> {
    let hash = doc["services"]
        .as_hash()
        .context("compose.yml has no services mapping")?;
    hash.iter()
        .map(|(k, v)| Ok((k.as_str().context("service name")?.to_owned(), v.clone())))
        .collect()
}

/// A service's `command` as a list of words (list or string form).
fn command(service: &Yaml) -> Vec<String> {
    match service["command"].clone() {
        Yaml::Array(items) => items
            .iter()
            .filter_map(|i| match i {
                Yaml::String(s) => Some(s.clone()),
                Yaml::Integer(n) => Some(n.to_string()),
                _ => None,
            })
            .collect(),
        Yaml::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// A volume entry `source:target[:mode]`.
struct Mount {
    source: String,
    target: String,
}

fn mounts(service: &Yaml) -> Result<Vec<Mount>> {
    let Some(items) = service["volumes"].as_vec() else {
        return Ok(Vec::new());
    };
    items
        .iter()
        .map(|v| {
            let text = v
                .as_str()
                .context("volume entries are short-syntax strings")?;
            let mut parts = text.split(':');
            let source = parts.next().context("volume source")?.to_owned();
            let target = parts
                .next()
                .with_context(|| format!("volume {text:?} has no target"))?
                .to_owned();
            Ok(Mount { source, target })
        })
        .collect()
}

fn is_bind(source: &str) -> bool {
    source.starts_with('.') || source.starts_with('/')
}

/// The config file a service's `--config PATH` names, on the host.
fn mounted_config(name: &str, service: &Yaml) -> Result<PathBuf> {
    let cmd = command(service);
    let at = cmd
        .iter()
        .position(|w| w == "--config")
        .with_context(|| format!("service {name} has no --config"))?;
    let inside = cmd
        .get(at + 1)
        .with_context(|| format!("service {name}: --config without a path"))?;
    let mount = mounts(service)?
        .into_iter()
        .find(|m| &m.target == inside)
        .with_context(|| format!("service {name}: {inside} is not mounted"))?;
    Ok(docker_dir().join(mount.source))
}

#[test]
fn compose_holds_the_stack() -> Result<()> {
    let doc = compose()?;
    let services = services(&doc)?;
    for wanted in [
        "postgres",
        "nats",
        "reader",
        "gig-page-agent",
        "user-page-agent",
    ] {
        ensure!(
            services.contains_key(wanted),
            "compose.yml lacks service {wanted}"
        );
    }
    let pg = command(&services["postgres"]);
    ensure!(
        pg.iter().any(|w| w == "wal_level=logical"),
        "postgres must run with -c wal_level=logical: {pg:?}"
    );
    let nats = command(&services["nats"]);
    ensure!(
        nats.iter().any(|w| w == "-js" || w == "--jetstream"),
        "nats must run with JetStream (-js): {nats:?}"
    );
    ensure!(command(&services["reader"]).starts_with(&["cdc".into(), "run".into()]));
    for agent in ["gig-page-agent", "user-page-agent"] {
        ensure!(
            command(&services[agent]).starts_with(&["view-agent".into(), "run".into()]),
            "{agent} must run view-agent run"
        );
    }
    // Named volumes used by services are declared.
    let declared: BTreeSet<String> = doc["volumes"]
        .as_hash()
        .map(|h| {
            h.keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for (name, service) in &services {
        for m in mounts(service)? {
            if !is_bind(&m.source) {
                ensure!(
                    declared.contains(&m.source),
                    "service {name} uses volume {} that is not declared",
                    m.source
                );
            }
        }
    }
    Ok(())
}

#[test]
fn every_referenced_file_exists() -> Result<()> {
    let doc = compose()?;
    let mut checked = 0;
    for (name, service) in services(&doc)? {
        for m in mounts(&service)? {
            if is_bind(&m.source) {
                let path = docker_dir().join(&m.source);
                ensure!(
                    path.is_file(),
                    "service {name} mounts {} which does not exist",
                    m.source
                );
                checked += 1;
            }
        }
        if let Some(build) = service["build"].as_hash().map(|_| &service["build"]) {
            let context = docker_dir().join(build["context"].as_str().unwrap_or("."));
            ensure!(context.is_dir(), "service {name}: build context missing");
            let dockerfile = context.join(build["dockerfile"].as_str().unwrap_or("Dockerfile"));
            ensure!(
                dockerfile.is_file(),
                "service {name}: {} missing",
                dockerfile.display()
            );
            checked += 1;
        }
    }
    // Every sql/ file reaches the database's init directory.
    let doc_text = std::fs::read_to_string(docker_dir().join("compose.yml"))?;
    for file in [
        "schema.sql",
        "roles.sql",
        "publication.sql",
        "sample_data.sql",
    ] {
        ensure!(
            doc_text.contains(&format!("../sql/{file}:/docker-entrypoint-initdb.d/")),
            "sql/{file} is not mounted into postgres' init dir"
        );
    }
    ensure!(checked >= 10, "only {checked} references checked");
    Ok(())
}

#[test]
fn mounted_configs_load_with_the_real_loaders() -> Result<()> {
    let doc = compose()?;
    let services = services(&doc)?;

    let reader_path = mounted_config("reader", &services["reader"])?;
    let text = std::fs::read_to_string(&reader_path)?;
    let reader = cdc::config::CdcConfig::parse(&text)
        .with_context(|| format!("{}", reader_path.display()))?;
    reader.validate()?;
    ensure!(
        reader.nats.url.contains("nats:4222"),
        "the reader must use the nats service"
    );
    ensure!(reader.postgres.url.contains("@postgres:5432/topclients"));
    ensure!(
        reader.postgres.publication == topclients::stack::PUBLICATION,
        "the reader's publication must be the one sql/publication.sql creates"
    );
    ensure!(
        std::fs::read_to_string(repo_root().join("sql/publication.sql"))?
            .contains(&reader.postgres.publication)
    );
    let env = &services["reader"]["environment"]["CDC_POSTGRES_URL"];
    ensure!(
        env.as_str().is_some_and(|u| u.contains("cdc_reader")),
        "the reader connects as the least-privilege role cdc_reader"
    );

    for (agent, views) in [
        ("gig-page-agent", topclients::stack::GIG_VIEWS),
        ("user-page-agent", topclients::stack::USER_VIEWS),
    ] {
        let service = &services[agent];
        let path = mounted_config(agent, service)?;
        let text = std::fs::read_to_string(&path)?;
        let config =
            consumers::AgentConfig::parse(&text).with_context(|| format!("{}", path.display()))?;
        config.validate()?;
        ensure!(
            config.nats.stream == reader.nats.stream
                && config.nats.subject_prefix == reader.nats.subject_prefix,
            "{agent} must read the reader's stream"
        );
        // The data dir is a volume, so the views survive the container.
        let data = config.data_dir.display().to_string();
        ensure!(
            mounts(service)?
                .iter()
                .any(|m| m.target == data && !is_bind(&m.source)),
            "{agent}: data_dir {data} is not on a named volume"
        );
        // The pgwire port is published.
        let port = config
            .pgwire
            .listen
            .rsplit_once(':')
            .map(|(_, p)| p.to_owned())
            .context("pgwire.listen has no port")?;
        ensure!(
            config.pgwire.listen.starts_with("0.0.0.0:"),
            "{agent} must listen on all interfaces inside its container"
        );
        let published = service["ports"].as_vec().cloned().unwrap_or_default();
        ensure!(
            published
                .iter()
                .filter_map(Yaml::as_str)
                .any(|p| p.ends_with(&format!(":{port}"))),
            "{agent}: container port {port} is not published"
        );
        // Same views as the demo.
        let demo = consumers::AgentConfig::parse(&topclients::stack::agent_toml(
            agent,
            Path::new("/tmp/x"),
            "nats://127.0.0.1:4222",
            "127.0.0.1:6543",
            views,
        ))?;
        ensure!(
            format!("{:?}", config.views) == format!("{:?}", demo.views),
            "{agent}'s views differ from the demo's (examples/topclients/src/stack.rs)"
        );
    }
    Ok(())
}

/// One Dockerfile instruction: keyword and the rest of its (joined) line.
fn dockerfile() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(docker_dir().join("Dockerfile"))?;
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current
            .split_once(char::is_whitespace)
            .unwrap_or((current.as_str(), ""));
        out.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    Ok(out)
}

/// Workspace members and, per member, its package name and `[[bin]]` names.
fn workspace() -> Result<Vec<(String, String, Vec<String>)>> {
    let root: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo_root().join("Cargo.toml"))?)?;
    let members = root["workspace"]["members"]
        .as_array()
        .context("workspace.members")?;
    members
        .iter()
        .map(|m| {
            let dir = m.as_str().context("member")?.to_owned();
            let manifest: toml::Value = toml::from_str(&std::fs::read_to_string(
                repo_root().join(&dir).join("Cargo.toml"),
            )?)?;
            let package = manifest["package"]["name"]
                .as_str()
                .context("package.name")?
                .to_owned();
            let bins = manifest
                .get("bin")
                .and_then(toml::Value::as_array)
                .map(|bins| {
                    bins.iter()
                        .filter_map(|b| b.get("name").and_then(toml::Value::as_str))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            Ok((dir, package, bins))
        })
        .collect()
}

#[test]
fn dockerfile_matches_the_workspace() -> Result<()> {
    let steps = dockerfile()?;
    let members = workspace()?;
    let stages: Vec<&String> = steps
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, r)| r)
        .collect();
    ensure!(
        stages.len() >= 2,
        "the Dockerfile must be multi-stage: {stages:?}"
    );
    let build_stage = stages[0]
        .split_whitespace()
        .last()
        .context("first stage name")?
        .to_owned();
    ensure!(
        stages[0].to_ascii_lowercase().contains(" as "),
        "the build stage must be named"
    );

    // COPY sources from the build context exist; every workspace member is copied (cargo
    // needs every member to resolve the workspace).
    let mut copied_from_context = BTreeSet::new();
    let mut copied_binaries = BTreeSet::new();
    for (keyword, rest) in &steps {
        if keyword != "COPY" {
            continue;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        let (flags, paths): (Vec<&str>, Vec<&str>) =
            words.iter().partition(|w| w.starts_with("--"));
        ensure!(paths.len() >= 2, "COPY {rest}: source and destination");
        let sources = &paths[..paths.len() - 1];
        match flags.iter().find_map(|f| f.strip_prefix("--from=")) {
            None => {
                for s in sources {
                    ensure!(
                        repo_root().join(s).exists(),
                        "COPY {s}: not in the repository (the build context)"
                    );
                    copied_from_context
                        .insert(s.trim_start_matches("./").trim_end_matches('/').to_owned());
                }
            }
            Some(stage) => {
                ensure!(stage == build_stage, "COPY --from={stage}: no such stage");
                for s in sources {
                    let bin = s.strip_prefix("/src/target/release/").with_context(|| {
                        format!("COPY --from={stage} {s}: not a release binary")
                    })?;
                    copied_binaries.insert(bin.to_owned());
                }
            }
        }
    }
    for file in ["Cargo.toml", "Cargo.lock"] {
        ensure!(
            copied_from_context.contains(file),
            "the Dockerfile must COPY {file}"
        );
    }
    for (dir, _, _) in &members {
        ensure!(
            copied_from_context.contains(dir.split('/').next().unwrap_or(dir)),
            "workspace member {dir} is not copied into the build stage"
        );
    }
    ensure!(
        copied_from_context.contains("sql"),
        "examples/topclients embeds sql/: COPY it"
    );

    // The build step builds packages that exist, and every copied binary is a [[bin]] of one
    // of them.
    let build = steps
        .iter()
        .find(|(k, r)| k == "RUN" && r.contains("cargo build"))
        .context("no RUN cargo build")?;
    ensure!(build.1.contains("--release") && build.1.contains("--locked"));
    let words: Vec<&str> = build.1.split_whitespace().collect();
    let packages: Vec<&str> = words
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1])
        .collect();
    ensure!(!packages.is_empty(), "cargo build without -p");
    let mut buildable = BTreeSet::new();
    for p in &packages {
        let (_, _, bins) = members
            .iter()
            .find(|(_, name, _)| name == p)
            .with_context(|| format!("cargo build -p {p}: no such workspace package"))?;
        buildable.extend(bins.iter().cloned());
    }
    for bin in &copied_binaries {
        ensure!(
            buildable.contains(bin),
            "the Dockerfile copies {bin}, which is not a [[bin]] of {packages:?}"
        );
    }
    // The binaries compose runs are in the image.
    let doc = compose()?;
    for (name, service) in services(&doc)? {
        if service["build"].is_badvalue() {
            continue;
        }
        let cmd = command(&service);
        let program = cmd.first().with_context(|| format!("{name}: no command"))?;
        ensure!(
            copied_binaries.contains(program),
            "service {name} runs {program}, which the image does not contain"
        );
    }

    // The runtime stage ends as a non-root user.
    let last_from = steps
        .iter()
        .rposition(|(k, _)| k == "FROM")
        .context("FROM")?;
    let user = steps[last_from..]
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, r)| r.clone());
    match user {
        None => bail!("the runtime stage has no USER: it would run as root"),
        Some(u) => {
            let name = u.split(':').next().unwrap_or_default();
            ensure!(
                name != "root" && name != "0",
                "the runtime stage runs as {u}"
            );
        }
    }
    Ok(())
}
