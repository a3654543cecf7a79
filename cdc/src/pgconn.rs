//! Connections to the source database: the URL and its TLS settings, ordinary SQL sessions
//! (tokio-postgres) and the replication session (pgwire's client codec and auth).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{Sink, SinkExt, Stream};
use pgwire::api::client::auth::{DefaultStartupHandler, StartupHandler};
use pgwire::api::client::{ClientInfo, ServerInformation};
use pgwire::error::{PgWireClientError, PgWireClientResult, PgWireResult};
use pgwire::messages::response::ReadyForQuery;
use pgwire::messages::startup::{Authentication, BackendKeyData, Startup};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::tokio::client::PgWireClient;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How TLS is used, as libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Never.
    Disable,
    /// If the server offers it; the certificate is not checked.
    Prefer,
    /// Always; the certificate is not checked.
    Require,
    /// Always; the certificate must chain to a trusted root.
    VerifyCa,
    /// Always; the certificate must chain to a trusted root and name the host.
    VerifyFull,
}

/// Why a connection to Postgres could not be set up or was refused.
#[derive(Debug, thiserror::Error)]
pub enum PgConnError {
    /// The URL can't be parsed.
    #[error("invalid postgres.url: {0}")]
    Url(String),
    /// The TLS settings can't be used (root file missing, …).
    #[error("TLS setup for {target} failed: {message}")]
    TlsSetup {
        /// user@host:port/db, never with the password.
        target: String,
        /// What is wrong.
        message: String,
    },
    /// The server refused or the network failed.
    #[error("cannot connect to Postgres at {target}: {message}")]
    Connect {
        /// user@host:port/db.
        target: String,
        /// What happened and what to do.
        message: String,
        /// The SQLSTATE when the server answered with an error.
        code: Option<String>,
    },
}

impl PgConnError {
    /// The SQLSTATE of a server-side refusal, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            PgConnError::Connect { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// A parsed source URL with its TLS settings.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    tls: Option<Arc<ClientConfig>>,
    /// `sslrootcert`, for messages.
    root_cert: Option<String>,
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the password.
        write!(f, "PgTarget({self})")
    }
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = self.host();
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        write!(
            f,
            "{}@{host}:{port}/{}",
            self.user(),
            self.config.get_dbname().unwrap_or(self.user())
        )
    }
}

impl PgTarget {
    /// Parses a libpq-style URL (`postgres://user:pw@host:port/db?sslmode=…&sslrootcert=…`).
    pub fn parse(url: &str) -> Result<PgTarget, PgConnError> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut ssl_mode = SslMode::Prefer;
        let mut root_cert: Option<String> = None;
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => {
                    ssl_mode = match v {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(PgConnError::Url(format!(
                                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                            )))
                        }
                    }
                }
                "sslrootcert" => root_cert = Some(percent_decode(v)),
                _ => kept.push(pair),
            }
        }
        let rebuilt = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config: tokio_postgres::Config =
            rebuilt.parse().map_err(|e: tokio_postgres::Error| {
                PgConnError::Url(format!(
                    "{e} (expected postgres://user:password@host:port/dbname)"
                ))
            })?;
        if config.get_user().is_none() {
            return Err(PgConnError::Url("no user name in the URL".into()));
        }
        if config.get_application_name().is_none() {
            config.application_name("cdc");
        }
        let mut target = PgTarget {
            config,
            ssl_mode,
            tls: None,
            root_cert: root_cert.clone(),
        };
        target.tls = match ssl_mode {
            SslMode::Disable => None,
            mode => Some(Arc::new(build_tls(mode, root_cert.as_deref()).map_err(
                |message| PgConnError::TlsSetup {
                    target: target.to_string(),
                    message,
                },
            )?)),
        };
        Ok(target)
    }

    /// The (first) host name, address or socket directory.
    pub fn host(&self) -> String {
        match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        }
    }

    /// What to do about a refused server certificate, from the text of a TLS handshake error
    /// (rustls' `invalid peer certificate: …`); `None` for other errors.
    fn certificate_hint(&self, text: &str) -> Option<String> {
        let (_, reason) = text.split_once("invalid peer certificate")?;
        // rustls shows some reasons by name (`UnknownIssuer`), others as prose.
        let reason = reason.to_ascii_lowercase().replace(' ', "");
        let hint = if reason.contains("notvalidforname") {
            format!(
                "the server's certificate is not valid for host {:?}: connect with a host name \
                 the certificate lists, or use sslmode=verify-ca to skip the host name check",
                self.host()
            )
        } else if reason.contains("unknownissuer") || reason.contains("badsignature") {
            match &self.root_cert {
                Some(path) => format!(
                    "the server's certificate is not signed by the CA in sslrootcert={path}: \
                     point sslrootcert at the CA that signed it"
                ),
                None => "the server's certificate is not signed by a public CA: set \
                         sslrootcert=<CA file> in postgres.url"
                    .to_string(),
            }
        } else if reason.contains("expired") || reason.contains("notvalidyet") {
            "the server's certificate is outside its validity period: renew it or check the \
             clock"
                .to_string()
        } else {
            "the server's certificate was refused: check it and sslrootcert".to_string()
        };
        Some(format!("{text}; {hint}"))
    }

    /// The role name.
    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or("postgres")
    }

    /// The database name.
    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or(self.user())
    }

    /// The TLS mode.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// Opens an ordinary SQL session; the connection task runs in the background.
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, PgConnError> {
        let mut config = self.config.clone();
        let result = match &self.tls {
            None => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map(|(c, conn)| (c, tokio::spawn(conn)))
            }
            Some(tls) => {
                config.ssl_mode(if self.ssl_mode == SslMode::Prefer {
                    tokio_postgres::config::SslMode::Prefer
                } else {
                    tokio_postgres::config::SslMode::Require
                });
                let connector = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                config
                    .connect(connector)
                    .await
                    .map(|(c, conn)| (c, tokio::spawn(conn)))
            }
        };
        match result {
            Ok((client, _task)) => Ok(client),
            Err(e) => Err(self.sql_connect_error(&e)),
        }
    }

    fn sql_connect_error(&self, e: &tokio_postgres::Error) -> PgConnError {
        let code = e.code().map(|c| c.code().to_string());
        let message = match e.as_db_error() {
            Some(db) => explain_refusal(db.code().code(), db.message(), self.user()),
            None => {
                let mut text = e.to_string();
                let mut src = std::error::Error::source(e);
                while let Some(s) = src {
                    text = format!("{text}: {s}");
                    src = s.source();
                }
                self.certificate_hint(&text).unwrap_or(text)
            }
        };
        PgConnError::Connect {
            target: self.to_string(),
            message,
            code,
        }
    }

    /// Opens a replication session (`replication=database`) over pgwire's client, with the
    /// session settings that make pgoutput's text values predictable.
    pub async fn connect_replication(&self) -> Result<PgWireClient, PgConnError> {
        // pgwire does not export its SslMode type: set the mode through its key-value parser.
        let mode = match self.ssl_mode {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            _ => "require",
        };
        let mut cfg: pgwire::api::client::Config =
            format!("sslmode={mode}")
                .parse()
                .map_err(|e: PgWireClientError| {
                    PgConnError::Url(format!("replication connection settings: {e}"))
                })?;
        for host in self.config.get_hosts() {
            match host {
                tokio_postgres::config::Host::Tcp(h) => {
                    cfg.host(h.as_str());
                }
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(p) => {
                    cfg.host_path(p);
                }
            }
        }
        if let Some(port) = self.config.get_ports().first() {
            cfg.port(*port);
        }
        cfg.user(self.user());
        if let Some(pw) = self.config.get_password() {
            cfg.password(pw);
        }
        cfg.dbname(self.dbname());
        let connector = self
            .tls
            .as_ref()
            .map(|tls| pgwire::tokio::TlsConnector::from(Arc::clone(tls)));
        let handler = ReplicationStartup {
            inner: DefaultStartupHandler::new(),
            application_name: self
                .config
                .get_application_name()
                .unwrap_or("cdc")
                .to_string(),
        };
        PgWireClient::connect(Arc::new(cfg), handler, connector)
            .await
            .map_err(|e| self.replication_connect_error(e))
    }

    fn replication_connect_error(&self, e: PgWireClientError) -> PgConnError {
        match e {
            PgWireClientError::RemoteError(info) => PgConnError::Connect {
                target: self.to_string(),
                message: explain_refusal(&info.code, &info.message, self.user()),
                code: Some(info.code.clone()),
            },
            other => {
                let text = describe_client_error(&other);
                PgConnError::Connect {
                    target: self.to_string(),
                    message: self.certificate_hint(&text).unwrap_or(text),
                    code: None,
                }
            }
        }
    }
}

/// A readable chain of a pgwire client error.
pub fn describe_client_error(e: &PgWireClientError) -> String {
    let mut text = match e {
        PgWireClientError::RemoteError(info) => {
            format!("{} (SQLSTATE {})", info.message, info.code)
        }
        PgWireClientError::UnexpectedMessage(m) => {
            format!("unexpected message from the server: {m:?}")
        }
        other => other.to_string(),
    };
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text = format!("{text}: {s}");
        src = s.source();
    }
    text
}

/// Turns a server refusal into a line that says what to do.
fn explain_refusal(code: &str, message: &str, user: &str) -> String {
    match code {
        "28P01" | "28000" if message.contains("password") => format!(
            "{message}: check the password of role {user:?} in postgres.url or CDC_POSTGRES_URL"
        ),
        "28000" if message.contains("replication") => format!(
            "{message}: add a `host replication {user} …` line to pg_hba.conf, or grant the role REPLICATION"
        ),
        "42501" if message.contains("replication") => format!(
            "{message}: run ALTER ROLE {user} REPLICATION (as a superuser), or use a role that has it"
        ),
        "3D000" => format!("{message}: create the database or fix the name in postgres.url"),
        _ => format!("{message} (SQLSTATE {code})"),
    }
}

struct ReplicationStartup {
    inner: DefaultStartupHandler,
    application_name: String,
}

#[async_trait]
impl StartupHandler for ReplicationStartup {
    async fn startup<C>(&mut self, client: &mut C) -> PgWireClientResult<()>
    where
        C: ClientInfo + Sink<PgWireFrontendMessage> + Unpin + Send,
        PgWireClientError: From<<C as Sink<PgWireFrontendMessage>>::Error>,
    {
        let mut startup = Startup::new();
        let config = client.config();
        let mut params = BTreeMap::new();
        if let Some(user) = config.get_user() {
            params.insert("user".to_string(), user.to_string());
        }
        if let Some(db) = config.get_dbname() {
            params.insert("database".to_string(), db.to_string());
        }
        params.insert("replication".into(), "database".into());
        params.insert("application_name".into(), self.application_name.clone());
        // pgoutput renders values with the walsender's settings: pin them so that the value
        // mapping sees one format (see value.rs).
        for (k, v) in [
            ("DateStyle", "ISO"),
            ("TimeZone", "UTC"),
            ("IntervalStyle", "iso_8601"),
            ("extra_float_digits", "3"),
            ("bytea_output", "hex"),
            ("client_encoding", "UTF8"),
        ] {
            params.insert(k.into(), v.into());
        }
        startup.parameters = params;
        client.send(PgWireFrontendMessage::Startup(startup)).await?;
        Ok(())
    }

    async fn on_authentication<C>(
        &mut self,
        client: &mut C,
        message: Authentication,
    ) -> PgWireClientResult<()>
    where
        C: ClientInfo
            + Stream<Item = PgWireResult<PgWireBackendMessage>>
            + Sink<PgWireFrontendMessage>
            + Unpin
            + Send,
        PgWireClientError: From<<C as Sink<PgWireFrontendMessage>>::Error>,
    {
        self.inner.on_authentication(client, message).await
    }

    async fn on_backend_key<C>(
        &mut self,
        client: &mut C,
        message: BackendKeyData,
    ) -> PgWireClientResult<()>
    where
        C: ClientInfo + Sink<PgWireFrontendMessage> + Unpin + Send,
        PgWireClientError: From<<C as Sink<PgWireFrontendMessage>>::Error>,
    {
        self.inner.on_backend_key(client, message).await
    }

    async fn on_ready_for_query<C>(
        &mut self,
        client: &mut C,
        message: ReadyForQuery,
    ) -> PgWireClientResult<ServerInformation>
    where
        C: ClientInfo + Sink<PgWireFrontendMessage> + Unpin + Send,
        PgWireClientError: From<<C as Sink<PgWireFrontendMessage>>::Error>,
    {
        self.inner.on_ready_for_query(client, message).await
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build_tls(mode: SslMode, root_cert: Option<&str>) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider())))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let mut roots = RootCertStore::empty();
            match root_cert {
                Some(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?;
                    let certs: Vec<CertificateDer<'static>> =
                        rustls_pemfile::certs(&mut pem.as_slice())
                            .collect::<Result<_, _>>()
                            .map_err(|e| format!("sslrootcert {path} is not PEM: {e}"))?;
                    if certs.is_empty() {
                        return Err(format!("sslrootcert {path} holds no certificate"));
                    }
                    roots.add_parsable_certificates(certs);
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| e.to_string())?;
            let verifier: Arc<dyn ServerCertVerifier> = if mode == SslMode::VerifyCa {
                Arc::new(IgnoreHostName(webpki))
            } else {
                webpki
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    Ok(config)
}

/// `sslmode=prefer/require`: encrypt, but (as libpq) do not check the certificate.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must be trusted; the host name is not checked.
#[derive(Debug)]
struct IgnoreHostName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_certificates_say_what_to_do() {
        let t = PgTarget::parse("postgres://u@db.internal/x?sslmode=require").expect("parses");
        let e = "error performing TLS handshake: invalid peer certificate: UnknownIssuer";
        let hint = t.certificate_hint(e).expect("a hint");
        assert!(
            hint.starts_with(e) && hint.contains("set sslrootcert"),
            "{hint}"
        );
        let hint = t
            .certificate_hint("invalid peer certificate: certificate not valid for name \"x\"")
            .expect("a hint");
        assert!(
            hint.contains("not valid for host \"db.internal\"") && hint.contains("verify-ca"),
            "{hint}"
        );
        assert!(t.certificate_hint("connection refused").is_none());
    }

    #[test]
    fn display_never_shows_the_password() {
        let t = PgTarget::parse("postgres://cdc:s3cret@127.0.0.1:5433/topclients?sslmode=disable")
            .expect("parses");
        let shown = format!("{t} {t:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert_eq!(t.to_string(), "cdc@127.0.0.1:5433/topclients");
        assert_eq!(t.ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn sslmodes_parse() {
        for (m, want) in [
            ("require", SslMode::Require),
            ("prefer", SslMode::Prefer),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let t = PgTarget::parse(&format!("postgres://u@h/db?sslmode={m}")).expect("parses");
            assert_eq!(t.ssl_mode(), want);
        }
        let err = PgTarget::parse("postgres://u@h/db?sslmode=bogus").expect_err("rejected");
        assert!(err.to_string().contains("sslmode=bogus"));
        let err = PgTarget::parse("postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent")
            .expect_err("rejected");
        assert!(err.to_string().contains("/nonexistent"), "{err}");
    }
}
