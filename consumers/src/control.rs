//! The operations an agent answers for `view-agent replay` and `view-agent verify`, in-process
//! ([`Operations`]) and over NATS request/reply ([`serve`], [`RemoteAgent`]).
//!
//! sled allows one process per data directory, so these commands do not open the store of a
//! running agent: they send requests to it on `_CDC_CONTROL.<prefix>.agent.<name>` (outside the
//! stream's `<prefix>.>`, so the stream never captures them). When nothing answers there (no
//! agent runs), the command starts the agent in-process instead (no pgwire, no metrics) and
//! calls the same [`Operations`] directly. Agent names must be unique per NATS.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cdc::envelope::Row;
use cdc::Lsn;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::replay::{ReplayFrom, ReplayStatus, Replays};
use crate::store::{FenceError, ViewStore};

/// How long a verify may hold the apply position without renewing its lease.
pub const FENCE_LEASE: Duration = Duration::from_secs(30);
/// Exports not read for this long are dropped.
const EXPORT_TTL: Duration = Duration::from_secs(300);
/// Requests answered at once.
const MAX_INFLIGHT: usize = 8;
/// Default wait of a NATS request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The control subject of agent `name`.
pub fn control_subject(prefix: &str, name: &str) -> String {
    format!(
        "_CDC_CONTROL.{prefix}.agent.{}",
        cdc::subject::encode_token(name)
    )
}

/// Errors of a control operation.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No agent answers on the control subject.
    #[error("no view-agent answers on {0}")]
    NoAgent(String),
    /// NATS could not be reached or failed.
    #[error("NATS: {0}")]
    Nats(String),
    /// The agent refused or failed the operation.
    #[error("{0}")]
    Refused(String),
}

impl From<FenceError> for ControlError {
    fn from(e: FenceError) -> Self {
        ControlError::Refused(e.to_string())
    }
}

/// What `status` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Agent name.
    pub name: String,
    /// Last applied stream sequence.
    pub applied_seq: u64,
    /// Applied commit LSN.
    pub applied_lsn: Lsn,
    /// Read-your-writes watermark.
    pub watermark: Lsn,
    /// The stream's last sequence, as last seen.
    pub stream_last_seq: u64,
    /// Process id of the agent.
    pub pid: u32,
}

/// The operations the CLI commands need from an agent, wherever it runs.
#[async_trait]
pub trait AgentLink: Send + Sync {
    /// Where the agent is.
    async fn status(&self) -> Result<AgentStatus, ControlError>;
    /// Holds the applied position where it is (nothing new is applied); returns a fence id.
    async fn fence(&self) -> Result<u64, ControlError>;
    /// Lets the agent apply every source transaction committed at or before `lsn` and none
    /// after; returns once the views are exactly as of `lsn`.
    async fn fence_advance(&self, id: u64, lsn: Lsn, timeout: Duration)
        -> Result<(), ControlError>;
    /// Renews the fence's lease.
    async fn fence_renew(&self, id: u64) -> Result<(), ControlError>;
    /// Lifts the fence.
    async fn fence_lift(&self, id: u64) -> Result<(), ControlError>;
    /// Every row of `view` (stored columns), read at one applied point.
    async fn export(&self, view: &str) -> Result<Vec<Row>, ControlError>;
    /// [`ViewStore::write_rows`]: one atomic batch.
    async fn write_rows(
        &self,
        view: &str,
        put: Vec<Row>,
        delete: Vec<Vec<Value>>,
        lsn: Lsn,
    ) -> Result<(), ControlError>;
    /// Starts rebuilding `view`.
    async fn replay_start(
        &self,
        view: &str,
        from: ReplayFrom,
    ) -> Result<ReplayStatus, ControlError>;
    /// Progress of the rebuild of `view`.
    async fn replay_status(&self, view: &str) -> Result<Option<ReplayStatus>, ControlError>;
}

struct Export {
    pages: Vec<String>,
    touched: Instant,
}

struct Staged {
    view: String,
    lsn: Lsn,
    put: Vec<Row>,
    delete: Vec<Vec<Value>>,
}

/// The operations of one agent, in-process.
pub struct Operations {
    store: Arc<ViewStore>,
    name: String,
    replays: Replays,
    exports: Mutex<HashMap<u64, Export>>,
    staged: Mutex<HashMap<u64, Staged>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Operations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operations")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Operations {
    /// The operations of the agent `name` over `store`.
    pub fn new(store: Arc<ViewStore>, name: String, replays: Replays) -> Operations {
        Operations {
            store,
            name,
            replays,
            exports: Mutex::new(HashMap::new()),
            staged: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    fn rows_of(&self, view: &str) -> Result<Vec<Row>, ControlError> {
        let store = self.store.clone();
        let r = store
            .scan(view, usize::MAX, true)
            .map_err(|e| ControlError::Refused(e.to_string()))?;
        Ok(r.rows)
    }

    /// Exports `view` as JSON pages of at most `page_bytes` each; returns (id, pages, rows).
    fn export_pages(
        &self,
        view: &str,
        page_bytes: usize,
    ) -> Result<(u64, usize, usize), ControlError> {
        let rows = self.rows_of(view)?;
        let n = rows.len();
        let mut pages = Vec::new();
        let mut page = String::from("[");
        for row in rows {
            let text =
                serde_json::to_string(&row).map_err(|e| ControlError::Refused(e.to_string()))?;
            if page.len() > 1 && page.len() + text.len() + 2 > page_bytes {
                page.push(']');
                pages.push(std::mem::replace(&mut page, String::from("[")));
            }
            if page.len() > 1 {
                page.push(',');
            }
            page.push_str(&text);
        }
        page.push(']');
        pages.push(page);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let count = pages.len();
        let mut exports = self.exports.lock().unwrap_or_else(PoisonError::into_inner);
        exports.retain(|_, e| e.touched.elapsed() < EXPORT_TTL);
        exports.insert(
            id,
            Export {
                pages,
                touched: Instant::now(),
            },
        );
        Ok((id, count, n))
    }

    fn export_page(&self, id: u64, page: usize) -> Result<String, ControlError> {
        let mut exports = self.exports.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(e) = exports.get_mut(&id) else {
            return Err(ControlError::Refused(format!(
                "export {id} is gone (expired?); run the command again"
            )));
        };
        e.touched = Instant::now();
        let text = e
            .pages
            .get(page)
            .cloned()
            .ok_or_else(|| ControlError::Refused(format!("export {id} has no page {page}")))?;
        if page + 1 == e.pages.len() {
            exports.remove(&id);
        }
        Ok(text)
    }

    fn stage(&self, req: StageRequest) -> Result<Option<Staged>, ControlError> {
        let mut staged = self.staged.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = staged.entry(req.stage).or_insert_with(|| Staged {
            view: req.view.clone(),
            lsn: req.lsn,
            put: Vec::new(),
            delete: Vec::new(),
        });
        entry.put.extend(req.put);
        entry.delete.extend(req.delete);
        if req.commit {
            Ok(staged.remove(&req.stage))
        } else {
            Ok(None)
        }
    }
}

#[async_trait]
impl AgentLink for Operations {
    async fn status(&self) -> Result<AgentStatus, ControlError> {
        let p = self.store.progress();
        Ok(AgentStatus {
            name: self.name.clone(),
            applied_seq: p.applied_seq,
            applied_lsn: p.applied_lsn,
            watermark: p.watermark,
            stream_last_seq: p.stream_last_seq,
            pid: std::process::id(),
        })
    }

    async fn fence(&self) -> Result<u64, ControlError> {
        let at = self.store.progress().applied_lsn;
        Ok(self.store.fence().set_limit(at, FENCE_LEASE)?)
    }

    async fn fence_advance(
        &self,
        id: u64,
        lsn: Lsn,
        timeout: Duration,
    ) -> Result<(), ControlError> {
        let fence = self.store.fence();
        fence.advance(id, lsn, FENCE_LEASE)?;
        let mut ticks = fence.subscribe();
        let mut progress = self.store.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if fence.limit_of(id) != Some(lsn) {
                return Err(FenceError::Lost.into());
            }
            if fence.at_limit() || self.store.progress().watermark >= lsn {
                return Ok(());
            }
            tokio::select! {
                _ = ticks.changed() => {}
                _ = progress.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let p = self.store.progress();
                    return Err(ControlError::Refused(format!(
                        "the agent did not reach {lsn} within {timeout:?} (applied {}, watermark {}); \
                         is the reader running and the agent connected to NATS?",
                        p.applied_lsn, p.watermark
                    )));
                }
            }
            fence.renew(id, FENCE_LEASE)?;
        }
    }

    async fn fence_renew(&self, id: u64) -> Result<(), ControlError> {
        Ok(self.store.fence().renew(id, FENCE_LEASE)?)
    }

    async fn fence_lift(&self, id: u64) -> Result<(), ControlError> {
        self.store.fence().lift(id);
        Ok(())
    }

    async fn export(&self, view: &str) -> Result<Vec<Row>, ControlError> {
        self.rows_of(view)
    }

    async fn write_rows(
        &self,
        view: &str,
        put: Vec<Row>,
        delete: Vec<Vec<Value>>,
        lsn: Lsn,
    ) -> Result<(), ControlError> {
        let store = self.store.clone();
        let view = view.to_owned();
        tokio::task::spawn_blocking(move || store.write_rows(&view, &put, &delete, lsn))
            .await
            .map_err(|e| ControlError::Refused(e.to_string()))?
            .map_err(|e| ControlError::Refused(e.to_string()))
    }

    async fn replay_start(
        &self,
        view: &str,
        from: ReplayFrom,
    ) -> Result<ReplayStatus, ControlError> {
        self.replays
            .start(view, from)
            .map_err(|e| ControlError::Refused(e.to_string()))
    }

    async fn replay_status(&self, view: &str) -> Result<Option<ReplayStatus>, ControlError> {
        Ok(self.replays.status(view))
    }
}

/// A request on the control subject.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Status,
    Fence,
    FenceAdvance { id: u64, lsn: Lsn, timeout_ms: u64 },
    FenceRenew { id: u64 },
    FenceLift { id: u64 },
    Export { view: String, page_bytes: usize },
    ExportPage { id: u64, page: usize },
    WriteRows(StageRequest),
    ReplayStart { view: String, from: ReplayFrom },
    ReplayStatus { view: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct StageRequest {
    stage: u64,
    view: String,
    lsn: Lsn,
    put: Vec<Row>,
    delete: Vec<Vec<Value>>,
    commit: bool,
}

/// A reply: `{"ok": …}` or `{"error": "…"}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    Ok(Value),
    Error(String),
}

fn json<T: Serialize>(v: Result<T, ControlError>) -> Reply {
    match v.and_then(|v| serde_json::to_value(v).map_err(|e| ControlError::Refused(e.to_string())))
    {
        Ok(v) => Reply::Ok(v),
        Err(e) => Reply::Error(e.to_string()),
    }
}

async fn answer(ops: &Operations, body: &[u8]) -> Reply {
    let request: Request = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Reply::Error(format!("bad control request: {e}")),
    };
    match request {
        Request::Status => json(ops.status().await),
        Request::Fence => json(ops.fence().await),
        Request::FenceAdvance {
            id,
            lsn,
            timeout_ms,
        } => json(
            ops.fence_advance(id, lsn, Duration::from_millis(timeout_ms))
                .await,
        ),
        Request::FenceRenew { id } => json(ops.fence_renew(id).await),
        Request::FenceLift { id } => json(ops.fence_lift(id).await),
        Request::Export { view, page_bytes } => json(ops.export_pages(&view, page_bytes.max(1024))),
        Request::ExportPage { id, page } => match ops.export_page(id, page) {
            // Pages are JSON already: send them as they are.
            Ok(text) => match serde_json::from_str(&text) {
                Ok(v) => Reply::Ok(v),
                Err(e) => Reply::Error(e.to_string()),
            },
            Err(e) => Reply::Error(e.to_string()),
        },
        Request::WriteRows(req) => match ops.stage(req) {
            Ok(Some(st)) => json(ops.write_rows(&st.view, st.put, st.delete, st.lsn).await),
            Ok(None) => Reply::Ok(Value::Null),
            Err(e) => Reply::Error(e.to_string()),
        },
        Request::ReplayStart { view, from } => json(ops.replay_start(&view, from).await),
        Request::ReplayStatus { view } => json(ops.replay_status(&view).await),
    }
}

/// Answers control requests on the agent's control subject until `shutdown`.
pub async fn serve(
    ops: Arc<Operations>,
    client: async_nats::Client,
    subject: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut sub = loop {
        match client.subscribe(subject.clone()).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::debug!(error = %e, "control subscription");
                tokio::select! {
                    _ = crate::shutdown_requested(&mut shutdown) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_INFLIGHT));
    loop {
        // 1. Shutdown; 2. the next request (each answered on a task of its own, at most
        //    MAX_INFLIGHT at once: a fence wait must not hold up a status request).
        let msg = tokio::select! {
            biased;
            _ = crate::shutdown_requested(&mut shutdown) => return,
            msg = sub.next() => msg,
        };
        let Some(msg) = msg else { return };
        let Some(reply_to) = msg.reply.clone() else {
            continue;
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (ops, client) = (ops.clone(), client.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let reply = answer(&ops, &msg.payload).await;
            let body = serde_json::to_vec(&reply).unwrap_or_default();
            if let Err(e) = client.publish(reply_to, body.into()).await {
                tracing::debug!(error = %e, "control reply");
            }
        });
    }
}

/// An agent reached over NATS.
#[derive(Debug, Clone)]
pub struct RemoteAgent {
    client: async_nats::Client,
    subject: String,
    stage: Arc<AtomicU64>,
}

impl RemoteAgent {
    /// Connects to NATS and checks that the agent answers. `Err(NoAgent)` when nothing does.
    pub async fn connect(url: &str, prefix: &str, name: &str) -> Result<RemoteAgent, ControlError> {
        let shown = cdc::publish::redact_url(url);
        let (options, servers) =
            cdc::nats_url::connect_options(async_nats::ConnectOptions::new(), url);
        let client = tokio::time::timeout(
            Duration::from_secs(5),
            options.name("view-agent-cli").connect(servers.as_str()),
        )
        .await
        .map_err(|_| ControlError::Nats(format!("NATS at {shown} did not answer within 5 s")))?
        .map_err(|e| ControlError::Nats(format!("NATS at {shown}: {e}")))?;
        let agent = RemoteAgent {
            client,
            subject: control_subject(prefix, name),
            stage: Arc::new(AtomicU64::new(1)),
        };
        agent.status().await?;
        Ok(agent)
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<T, ControlError> {
        let body = serde_json::to_vec(request).map_err(|e| ControlError::Refused(e.to_string()))?;
        let reply = tokio::time::timeout(
            timeout,
            self.client.request(self.subject.clone(), body.into()),
        )
        .await
        .map_err(|_| {
            ControlError::Nats(format!(
                "the agent did not answer on {} within {timeout:?}",
                self.subject
            ))
        })?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => {
                ControlError::NoAgent(self.subject.clone())
            }
            _ => ControlError::Nats(e.to_string()),
        })?;
        match serde_json::from_slice::<Reply>(&reply.payload) {
            Ok(Reply::Ok(v)) => {
                serde_json::from_value(v).map_err(|e| ControlError::Refused(e.to_string()))
            }
            Ok(Reply::Error(e)) => Err(ControlError::Refused(e)),
            Err(e) => Err(ControlError::Refused(format!(
                "bad reply from the agent: {e}"
            ))),
        }
    }

    /// Bytes of JSON per message (half the server's limit, leaving room for headers).
    fn page_bytes(&self) -> usize {
        (self.client.server_info().max_payload / 2).max(16 * 1024)
    }
}

#[async_trait]
impl AgentLink for RemoteAgent {
    async fn status(&self) -> Result<AgentStatus, ControlError> {
        self.call(&Request::Status, REQUEST_TIMEOUT).await
    }

    async fn fence(&self) -> Result<u64, ControlError> {
        self.call(&Request::Fence, REQUEST_TIMEOUT).await
    }

    async fn fence_advance(
        &self,
        id: u64,
        lsn: Lsn,
        timeout: Duration,
    ) -> Result<(), ControlError> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        self.call(
            &Request::FenceAdvance {
                id,
                lsn,
                timeout_ms,
            },
            timeout + REQUEST_TIMEOUT,
        )
        .await
    }

    async fn fence_renew(&self, id: u64) -> Result<(), ControlError> {
        self.call(&Request::FenceRenew { id }, REQUEST_TIMEOUT)
            .await
    }

    async fn fence_lift(&self, id: u64) -> Result<(), ControlError> {
        self.call(&Request::FenceLift { id }, REQUEST_TIMEOUT).await
    }

    async fn export(&self, view: &str) -> Result<Vec<Row>, ControlError> {
        let (id, pages, count): (u64, usize, usize) = self
            .call(
                &Request::Export {
                    view: view.to_owned(),
                    page_bytes: self.page_bytes(),
                },
                REQUEST_TIMEOUT * 6,
            )
            .await?;
        let mut rows = Vec::with_capacity(count);
        for page in 0..pages {
            let mut part: Vec<Row> = self
                .call(&Request::ExportPage { id, page }, REQUEST_TIMEOUT)
                .await?;
            rows.append(&mut part);
        }
        Ok(rows)
    }

    async fn write_rows(
        &self,
        view: &str,
        put: Vec<Row>,
        delete: Vec<Vec<Value>>,
        lsn: Lsn,
    ) -> Result<(), ControlError> {
        // Staged in pieces that fit a message, applied as one batch with the last one.
        let stage =
            self.stage.fetch_add(1, Ordering::Relaxed) ^ (u64::from(std::process::id()) << 32);
        let budget = self.page_bytes();
        let mut pending_put: Vec<Row> = Vec::new();
        let mut pending_delete: Vec<Vec<Value>> = Vec::new();
        let mut size = 0usize;
        let mut items: Vec<Result<Row, Vec<Value>>> = put.into_iter().map(Ok).collect();
        items.extend(delete.into_iter().map(Err));
        for item in items {
            let n = match &item {
                Ok(r) => serde_json::to_string(r).map_or(0, |s| s.len()),
                Err(k) => serde_json::to_string(k).map_or(0, |s| s.len()),
            };
            if size > 0 && size + n > budget {
                let req = Request::WriteRows(StageRequest {
                    stage,
                    view: view.to_owned(),
                    lsn,
                    put: std::mem::take(&mut pending_put),
                    delete: std::mem::take(&mut pending_delete),
                    commit: false,
                });
                self.call::<Value>(&req, REQUEST_TIMEOUT).await?;
                size = 0;
            }
            size += n;
            match item {
                Ok(r) => pending_put.push(r),
                Err(k) => pending_delete.push(k),
            }
        }
        let req = Request::WriteRows(StageRequest {
            stage,
            view: view.to_owned(),
            lsn,
            put: pending_put,
            delete: pending_delete,
            commit: true,
        });
        self.call::<Value>(&req, REQUEST_TIMEOUT * 6)
            .await
            .map(|_| ())
    }

    async fn replay_start(
        &self,
        view: &str,
        from: ReplayFrom,
    ) -> Result<ReplayStatus, ControlError> {
        self.call(
            &Request::ReplayStart {
                view: view.to_owned(),
                from,
            },
            REQUEST_TIMEOUT,
        )
        .await
    }

    async fn replay_status(&self, view: &str) -> Result<Option<ReplayStatus>, ControlError> {
        self.call(
            &Request::ReplayStatus {
                view: view.to_owned(),
            },
            REQUEST_TIMEOUT,
        )
        .await
    }
}
