//! Observability shared by the reader and the agents: a Prometheus registry and the HTTP
//! endpoint that serves it (`/metrics`), with liveness (`/healthz`) and readiness (`/readyz`).
//!
//! The endpoint is deliberately small: it answers `GET` of those three paths over HTTP/1.1
//! and closes the connection after each answer. Scrapers (Prometheus, curl, Kubernetes
//! probes) need nothing more, and it keeps an HTTP framework out of the dependency tree.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub use prometheus_client;

/// Longest time a client may take to send its request line and headers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read; scrapers send a few hundred bytes.
const MAX_REQUEST: usize = 8 * 1024;
/// Connections answered at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 32;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The listen address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}; choose a free port (metrics.listen)")]
    Bind {
        /// The configured address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What `/healthz` and `/readyz` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The process works (`/healthz` 200, else 503).
    pub live: bool,
    /// It does its job right now (`/readyz` 200, else 503): the reader streams, an agent is
    /// caught up and none of its views is stale.
    pub ready: bool,
    /// One line saying why (the response body).
    pub detail: String,
}

/// Something that can say how it is.
pub trait HealthSource: Send + Sync + 'static {
    /// The current health.
    fn health(&self) -> Health;
}

impl<F> HealthSource for F
where
    F: Fn() -> Health + Send + Sync + 'static,
{
    fn health(&self) -> Health {
        self()
    }
}

/// How the binaries write their log lines (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global log subscriber: lines on stderr, filtered by `RUST_LOG` (default
/// `info`), in `format`.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Renders `registry` in the Prometheus text exposition format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Encoding into a String only fails on a formatting error, which a String never gives.
    let _ = encode(&mut out, registry);
    out
}

/// The metrics endpoint: binds `addr` and serves until `shutdown` turns true.
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds the listen address (`host:port`; port 0 picks a free one).
    pub async fn bind(addr: &str) -> Result<MetricsServer, ObserveError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ObserveError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        Ok(MetricsServer { listener })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` turns true.
    pub async fn serve(
        self,
        registry: Arc<Registry>,
        health: Arc<dyn HealthSource>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            // The select only picks the branch; the work happens after it, so that the watch
            // guard of the shutdown branch is never held across an await (the future stays Send).
            let accepted = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => None,
                accepted = self.listener.accept() => Some(accepted),
            };
            let stream = match accepted {
                None => return,
                Some(Ok((stream, _))) => stream,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let registry = Arc::clone(&registry);
            let health = Arc::clone(&health);
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = answer(stream, &registry, health.as_ref()).await {
                    tracing::debug!(error = %e, "metrics request failed");
                }
            });
        }
    }
}

/// Reads one request head and answers it.
async fn answer(
    mut stream: TcpStream,
    registry: &Registry,
    health: &dyn HealthSource,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<(), std::io::Error>(())
    };
    if tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .is_err()
    {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(registry),
        ),
        ("GET", "/healthz") => {
            let h = health.health();
            (
                status_of(h.live),
                "text/plain; charset=utf-8",
                h.detail + "\n",
            )
        }
        ("GET", "/readyz") => {
            let h = health.health();
            (
                status_of(h.ready),
                "text/plain; charset=utf-8",
                h.detail + "\n",
            )
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "try /metrics, /healthz or /readyz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn status_of(ok: bool) -> &'static str {
    if ok {
        "200 OK"
    } else {
        "503 Service Unavailable"
    }
}

/// Exponential histogram buckets from `start` seconds, `count` of them, each `factor` wider.
pub fn seconds_buckets(start: f64, factor: f64, count: u16) -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(start, factor, count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let mut registry = Registry::default();
        let events: Counter = Counter::default();
        registry.register("cdc_test_events", "Events seen", events.clone());
        events.inc_by(7);
        let server = MetricsServer::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        let (tx, rx) = watch::channel(false);
        let health = Arc::new(|| Health {
            live: true,
            ready: false,
            detail: "catching up".into(),
        });
        let task = tokio::spawn(server.serve(Arc::new(registry), health, rx));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
        assert!(metrics.contains("cdc_test_events_total 7"), "{metrics}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200 OK"));
        let ready = get(addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.ends_with("catching up\n"), "{ready}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        tx.send(true).expect("send");
        task.await.expect("stops");
    }

    #[tokio::test]
    async fn bind_failure_names_the_address() {
        let first = MetricsServer::bind("127.0.0.1:0").await.expect("bind");
        let addr = first.local_addr().expect("addr").to_string();
        let Err(e) = MetricsServer::bind(&addr).await else {
            panic!("second bind succeeded");
        };
        assert!(e.to_string().contains(&addr), "{e}");
    }
}
