//! One client connection to a NATS server: the servers of a `nats.url`, TCP (TLS when the URL
//! says `tls://` or the server requires it, with the system's root certificates as async-nats
//! uses them), the `INFO`/`CONNECT`/`PING`/`PONG` handshake with the URL's credentials, and
//! buffered reads of server operations.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::proto::{self, ServerOp};
use super::PullError;
use crate::nats_url::{split_credentials, NatsCredentials};

/// Bound on connecting to one server and on the handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Size of each read from the socket.
pub(super) const READ_CHUNK: usize = 256 * 1024;
/// Port of a server named without one.
const DEFAULT_PORT: u16 = 4222;

/// A byte stream to the server: TCP or TLS over TCP.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What the server announced in `INFO`, as far as a pull consumer cares.
#[derive(Debug, Clone, Default, Deserialize)]
pub(super) struct ServerInfo {
    /// Largest message the server accepts.
    #[serde(default)]
    pub max_payload: usize,
    /// Clients must upgrade to TLS.
    #[serde(default)]
    pub tls_required: bool,
    /// The server supports headers (2.2+).
    #[serde(default)]
    pub headers: bool,
}

/// One server of a `nats.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Server {
    host: String,
    port: u16,
    tls: bool,
}

/// The servers of a comma-separated `nats.url` (`nats://`, `tls://` or bare `host:port`).
fn servers(addresses: &str) -> Result<Vec<Server>, PullError> {
    let mut out = Vec::new();
    for address in addresses
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let (tls, rest) = match address.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("nats") => (false, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("tls") => (true, rest),
            Some((scheme, _)) => {
                return Err(PullError::Config(format!(
                    "nats.url scheme {scheme:?} is not supported by the stream reader; use nats:// or tls://"
                )))
            }
            None => (false, address),
        };
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        let rest = rest.split('/').next().unwrap_or(rest);
        let bad_port = || PullError::Config(format!("nats.url has a bad port in {rest:?}"));
        let (host, port) = match rest.strip_prefix('[').and_then(|r| r.split_once(']')) {
            // [v6 address], optionally :port
            Some((host, "")) => (host, DEFAULT_PORT),
            Some((host, port)) => match port.strip_prefix(':').map(str::parse) {
                Some(Ok(port)) => (host, port),
                _ => return Err(bad_port()),
            },
            None => match rest.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| bad_port())?),
                None => (rest, DEFAULT_PORT),
            },
        };
        if host.is_empty() {
            return Err(PullError::Config(format!(
                "nats.url names no host in {rest:?}"
            )));
        }
        out.push(Server {
            host: host.to_owned(),
            port,
            tls,
        });
    }
    if out.is_empty() {
        return Err(PullError::Config("nats.url names no server".into()));
    }
    Ok(out)
}

/// A connected, authenticated client connection.
pub(super) struct Connection {
    io: Box<dyn Io>,
    /// Bytes read and not parsed yet.
    pub buf: BytesMut,
    /// The server's `INFO`.
    pub info: ServerInfo,
    /// Where it is connected (for messages; no credentials).
    pub server: String,
}

impl Connection {
    /// Connects to the first server of `url` that answers and completes the handshake.
    pub async fn open(url: &str, client_name: &str) -> Result<Connection, PullError> {
        let (addresses, credentials) = split_credentials(url);
        let mut last = None;
        for server in servers(&addresses)? {
            let attempt = tokio::time::timeout(
                CONNECT_TIMEOUT,
                Self::open_one(&server, client_name, &credentials),
            )
            .await;
            match attempt {
                Ok(Ok(conn)) => return Ok(conn),
                Ok(Err(e @ PullError::Refused(_))) => return Err(e),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(PullError::Io(format!(
                        "{}:{}: no answer within {CONNECT_TIMEOUT:?}",
                        server.host, server.port
                    )))
                }
            }
        }
        Err(last.unwrap_or_else(|| PullError::Config("nats.url names no server".into())))
    }

    async fn open_one(
        server: &Server,
        client_name: &str,
        credentials: &Option<NatsCredentials>,
    ) -> Result<Connection, PullError> {
        let name = format!("{}:{}", server.host, server.port);
        let io_err = |e: std::io::Error| PullError::Io(format!("{name}: {e}"));
        let tcp = TcpStream::connect((server.host.as_str(), server.port))
            .await
            .map_err(io_err)?;
        tcp.set_nodelay(true).map_err(io_err)?;
        let mut conn = Connection {
            io: Box::new(tcp),
            buf: BytesMut::with_capacity(READ_CHUNK),
            info: ServerInfo::default(),
            server: name.clone(),
        };
        let info = match conn.read_op().await? {
            ServerOp::Info(json) => json,
            other => {
                return Err(PullError::Protocol(super::proto::ProtocolError(format!(
                    "{name} greeted with {other:?} instead of INFO"
                ))))
            }
        };
        conn.info = serde_json::from_slice(&info).map_err(|e| {
            PullError::Protocol(super::proto::ProtocolError(format!(
                "{name} sent an unreadable INFO: {e}"
            )))
        })?;
        if !conn.info.headers {
            return Err(PullError::Refused(format!(
                "{name} does not support message headers; use nats-server 2.9 or newer"
            )));
        }
        if server.tls || conn.info.tls_required {
            conn = conn.upgrade(&server.host).await?;
        }
        let mut connect = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "lang": "rust",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
            "headers": true,
            "no_responders": true,
            "echo": false,
            "name": client_name,
            "tls_required": server.tls || conn.info.tls_required,
        });
        match credentials {
            Some(NatsCredentials::UserPassword { user, password }) => {
                connect["user"] = user.as_str().into();
                connect["pass"] = password.as_str().into();
            }
            Some(NatsCredentials::Token(token)) => connect["auth_token"] = token.as_str().into(),
            None => {}
        }
        let mut hello = b"CONNECT ".to_vec();
        hello.extend_from_slice(connect.to_string().as_bytes());
        hello.extend_from_slice(b"\r\nPING\r\n");
        conn.write(&hello).await?;
        loop {
            match conn.read_op().await? {
                ServerOp::Pong => return Ok(conn),
                ServerOp::Err(text) => {
                    return Err(PullError::Refused(format!(
                        "{name} refused the connection: {text}; check the credentials in nats.url"
                    )))
                }
                ServerOp::Ping => conn.write(b"PONG\r\n").await?,
                ServerOp::Ok | ServerOp::Info(_) => {}
                ServerOp::Msg(_) => {
                    return Err(PullError::Protocol(super::proto::ProtocolError(format!(
                        "{name} sent a message before the handshake ended"
                    ))))
                }
            }
        }
    }

    /// Wraps the TCP stream in TLS (the server's certificate checked against the system's roots,
    /// as async-nats does; `SSL_CERT_FILE` and `SSL_CERT_DIR` name other roots).
    async fn upgrade(self, host: &str) -> Result<Connection, PullError> {
        let roots = tls_roots().map_err(PullError::Tls)?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| PullError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let server_name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| PullError::Tls(format!("{host}: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tls = connector
            .connect(server_name, self.io)
            .await
            .map_err(|e| PullError::Tls(format!("{}: {e}", self.server)))?;
        Ok(Connection {
            io: Box::new(tls),
            ..self
        })
    }

    /// Writes `bytes` and flushes.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), PullError> {
        self.io
            .write_all(bytes)
            .await
            .map_err(|e| PullError::Io(format!("{}: {e}", self.server)))?;
        self.io
            .flush()
            .await
            .map_err(|e| PullError::Io(format!("{}: {e}", self.server)))
    }

    /// Reads more bytes into [`Connection::buf`]; an error when the server closed the connection.
    /// Cancel-safe: a read either completes or leaves the buffer as it was.
    pub async fn fill(&mut self) -> Result<usize, PullError> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        match self.io.read_buf(&mut self.buf).await {
            Ok(0) => Err(PullError::Io(format!(
                "{} closed the connection",
                self.server
            ))),
            Ok(n) => Ok(n),
            Err(e) => Err(PullError::Io(format!("{}: {e}", self.server))),
        }
    }

    /// The next operation, reading as needed.
    pub async fn read_op(&mut self) -> Result<ServerOp, PullError> {
        loop {
            if let Some(op) = proto::parse(&mut self.buf)? {
                return Ok(op);
            }
            self.fill().await?;
        }
    }
}

fn tls_roots() -> Result<rustls::RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(format!(
            "no usable root certificates for NATS over TLS ({why}); install ca-certificates or set SSL_CERT_FILE"
        ));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_servers_of_a_url() {
        let got =
            servers("nats://a:1, tls://b:2,c, nats://u:p@d:4223,[::1]:5,[::2]").expect("parses");
        let want = [
            ("a", 1, false),
            ("b", 2, true),
            ("c", 4222, false),
            ("d", 4223, false),
            ("::1", 5, false),
            ("::2", 4222, false),
        ];
        assert_eq!(got.len(), want.len());
        for (s, (host, port, tls)) in got.iter().zip(want) {
            assert_eq!((s.host.as_str(), s.port, s.tls), (host, port, tls));
        }
        assert!(servers("ws://a:1").is_err());
        assert!(servers("nats://a:port").is_err());
        assert!(servers(" , ").is_err());
    }

    #[test]
    fn reads_a_captured_info() {
        let mut buf = BytesMut::from(&include_bytes!("../../tests/fixtures/nats/greeting.bin")[..]);
        let Ok(Some(ServerOp::Info(json))) = proto::parse(&mut buf) else {
            panic!("no INFO")
        };
        let info: ServerInfo = serde_json::from_slice(&json).expect("json");
        assert_eq!(info.max_payload, 1024 * 1024);
        assert!(info.headers);
        assert!(!info.tls_required);
    }
}
