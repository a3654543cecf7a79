//! The replication session: IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, START_REPLICATION and
//! the CopyBoth stream of XLogData and keepalives, with standby status updates going back.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use pgwire::api::client::query::{DefaultSimpleQueryHandler, Response};
use pgwire::error::PgWireClientError;
use pgwire::messages::copy::{CopyData, CopyDone};
use pgwire::messages::data::DataRow;
use pgwire::messages::simplequery::Query;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::tokio::client::PgWireClient;

use crate::lsn::Lsn;
use crate::pgconn::describe_client_error;
use crate::subject::quote_ident;
use crate::wal::{self, ReplicationMessage};

/// What went wrong on the replication session.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The server answered a command with an error.
    #[error("{command} failed: {message} (SQLSTATE {code})")]
    Server {
        /// The command, without arguments that could hold secrets.
        command: &'static str,
        /// The server's message.
        message: String,
        /// SQLSTATE.
        code: String,
    },
    /// The connection broke or the server sent something out of protocol.
    #[error("replication connection: {0}")]
    Protocol(String),
    /// A CopyData payload could not be decoded.
    #[error("replication stream: {0}")]
    Decode(#[from] crate::pgoutput::DecodeError),
}

impl ReplicationError {
    /// The SQLSTATE when the server refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn client_error(command: &'static str, e: PgWireClientError) -> ReplicationError {
    match e {
        PgWireClientError::RemoteError(info) => ReplicationError::Server {
            command,
            message: info.message.clone(),
            code: info.code.clone(),
        },
        other => {
            ReplicationError::Protocol(format!("{command}: {}", describe_client_error(&other)))
        }
    }
}

/// Result of IDENTIFY_SYSTEM.
#[derive(Clone, Debug)]
pub struct SystemIdentity {
    /// Cluster system identifier.
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlog_pos: Lsn,
    /// Database the session is connected to.
    pub dbname: String,
}

/// A replication session before START_REPLICATION.
pub struct ReplicationSession {
    client: PgWireClient,
}

impl ReplicationSession {
    /// Wraps a client opened with `replication=database`.
    pub fn new(client: PgWireClient) -> Self {
        ReplicationSession { client }
    }

    async fn simple(
        &mut self,
        command: &'static str,
        sql: &str,
    ) -> Result<Vec<Response>, ReplicationError> {
        self.client
            .simple_query(DefaultSimpleQueryHandler::new(), sql)
            .await
            .map_err(|e| client_error(command, e))
    }

    /// IDENTIFY_SYSTEM.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = first_rows(self.simple("IDENTIFY_SYSTEM", "IDENTIFY_SYSTEM").await?);
        let row = rows
            .first()
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemIdentity {
            system_id: field(0),
            timeline: field(1).parse().unwrap_or(0),
            xlog_pos: field(2).parse().unwrap_or_default(),
            dbname: field(3),
        })
    }

    /// CREATE_REPLICATION_SLOT … LOGICAL pgoutput NOEXPORT_SNAPSHOT; returns the consistent point.
    pub async fn create_slot(&mut self, slot: &str) -> Result<Lsn, ReplicationError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(slot)
        );
        let rows = first_rows(self.simple("CREATE_REPLICATION_SLOT", &sql).await?);
        Ok(rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|s| s.parse().ok())
            .unwrap_or_default())
    }

    /// START_REPLICATION with pgoutput protocol 1, the publication and logical messages on.
    pub async fn start(
        mut self,
        slot: &str,
        publication: &str,
        start: Lsn,
    ) -> Result<ReplicationStream, ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (\"proto_version\" '1', \"publication_names\" '{}', \"messages\" 'true')",
            quote_ident(slot),
            quote_ident(publication).replace('\'', "''"),
        );
        self.client
            .send(PgWireFrontendMessage::Query(Query::new(sql)))
            .await
            .map_err(|e| client_error("START_REPLICATION", e.into()))?;
        match next_message_of(&mut self.client, "START_REPLICATION").await? {
            PgWireBackendMessage::CopyBothResponse(_) => Ok(ReplicationStream {
                client: self.client,
                done: false,
            }),
            other => Err(ReplicationError::Protocol(format!(
                "START_REPLICATION: unexpected {other:?}"
            ))),
        }
    }
}

/// The next message that is not a notice or a parameter report; errors and a closed
/// connection become [`ReplicationError`]s naming `command`. Cancel-safe.
async fn next_message_of(
    client: &mut PgWireClient,
    command: &'static str,
) -> Result<PgWireBackendMessage, ReplicationError> {
    loop {
        match client.next().await {
            Some(Ok(PgWireBackendMessage::ErrorResponse(e))) => {
                let info = pgwire::error::ErrorInfo::from(e);
                return Err(ReplicationError::Server {
                    command,
                    message: info.message,
                    code: info.code,
                });
            }
            Some(Ok(PgWireBackendMessage::NoticeResponse(n))) => {
                tracing::info!(notice = ?n, "notice from Postgres");
            }
            Some(Ok(PgWireBackendMessage::ParameterStatus(_))) => {}
            Some(Ok(other)) => return Ok(other),
            Some(Err(e)) => return Err(ReplicationError::Protocol(e.to_string())),
            None => {
                return Err(ReplicationError::Protocol(format!(
                    "the server closed the connection during {command}"
                )))
            }
        }
    }
}

/// Rows of the first result set, as text (NULL → None).
fn first_rows(responses: Vec<Response>) -> Vec<Vec<Option<String>>> {
    for r in responses {
        if let Response::Query((_, _, rows)) = r {
            return rows.iter().map(data_row_text).collect();
        }
    }
    Vec::new()
}

fn data_row_text(row: &DataRow) -> Vec<Option<String>> {
    let mut out = Vec::new();
    let mut buf: &[u8] = &row.data;
    for _ in 0..row.field_count.max(0) {
        let Some((len, rest)) = buf.split_first_chunk::<4>() else {
            break;
        };
        let len = i32::from_be_bytes(*len);
        buf = rest;
        if len < 0 {
            out.push(None);
            continue;
        }
        let n = usize::try_from(len).unwrap_or(usize::MAX).min(buf.len());
        out.push(Some(String::from_utf8_lossy(&buf[..n]).into_owned()));
        buf = &buf[n..];
    }
    out
}

/// The CopyBoth stream after START_REPLICATION.
pub struct ReplicationStream {
    client: PgWireClient,
    done: bool,
}

impl ReplicationStream {
    /// The next XLogData or keepalive; `Ok(None)` when the server ended the stream.
    pub async fn next_message(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        match next_message_of(&mut self.client, "replication stream").await? {
            PgWireBackendMessage::CopyData(data) => Ok(Some(wal::decode_copy_data(data.data)?)),
            PgWireBackendMessage::CopyDone(_) => {
                self.done = true;
                Ok(None)
            }
            other => Err(ReplicationError::Protocol(format!("unexpected {other:?}"))),
        }
    }

    /// Sends a standby status update: everything up to `flushed` is durable downstream.
    pub async fn send_status(
        &mut self,
        flushed: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let msg = wal::encode_standby_status_update(
            flushed,
            flushed,
            flushed,
            wal::pg_now(),
            reply_requested,
        );
        self.client
            .send(PgWireFrontendMessage::CopyData(CopyData::new(msg)))
            .await
            .map_err(|e| ReplicationError::Protocol(format!("sending status update: {e}")))
    }

    /// Ends the stream cleanly: a final status update, CopyDone, then waits (bounded) for the
    /// server to finish.
    pub async fn finish(mut self, flushed: Lsn) -> Result<(), ReplicationError> {
        self.send_status(flushed, false).await?;
        self.client
            .send(PgWireFrontendMessage::CopyDone(CopyDone::new()))
            .await
            .map_err(|e| ReplicationError::Protocol(format!("sending CopyDone: {e}")))?;
        let drain = async {
            while let Some(msg) = self.client.next().await {
                match msg {
                    Ok(PgWireBackendMessage::ReadyForQuery(_)) => break,
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        let _ = self
            .client
            .send(PgWireFrontendMessage::Terminate(
                pgwire::messages::terminate::Terminate::new(),
            ))
            .await;
        Ok(())
    }
}

/// Keeps `Bytes` in the public signature docs honest: XLogData payloads are zero-copy slices.
pub type Payload = Bytes;
