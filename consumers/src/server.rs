//! The read-only Postgres-wire server: each view is a table, plus `cdc_status`.
//!
//! Simple and extended query protocols share one executor ([`QueryService::execute`]). Session
//! settings live in the connection's metadata: `cdc.min_lsn` (queries wait until the applied
//! watermark reaches it), `cdc.min_lsn_timeout` (how long; `500ms`, `5s` or milliseconds),
//! `cdc.allow_stale` (`on`: a stale view answers, with a NOTICE, instead of failing).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Interface;
use async_trait::async_trait;
use cdc::Lsn;
use futures::{stream, Sink, SinkExt, StreamExt};
use pgwire::api::auth::md5pass::{hash_md5_password, Md5PasswordAuthStartupHandler};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::{
    AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler,
};
use pgwire::api::portal::{Format, Portal, PortalExecutionState};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeResponse, DescribeStatementResponse, FieldInfo,
    QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::{Entry, PortalStore};
use pgwire::api::{
    ClientInfo, ClientPortalStore, PgWireConnectionState, PgWireServerHandlers, Type, DEFAULT_NAME,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::{NoData, ParameterDescription, RowDescription};
use pgwire::messages::extendedquery::{
    Bind, BindComplete, Describe, Execute, Parse, ParseComplete, TARGET_TYPE_BYTE_PORTAL,
    TARGET_TYPE_BYTE_STATEMENT,
};
use pgwire::messages::response::NoticeResponse;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::PgwireConfig;
use crate::row::Field;
use crate::sql::{self, Operand, Plan, SelectPlan, SqlError, STATUS_COLUMNS};
use crate::store::{QueryError, ViewStore};

const SET_MIN_LSN: &str = "cdc.min_lsn";
const SET_MIN_LSN_TIMEOUT: &str = "cdc.min_lsn_timeout";
const SET_ALLOW_STALE: &str = "cdc.allow_stale";

fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_owned(),
        code.to_owned(),
        message.into(),
    )))
}

impl From<SqlError> for PgWireError {
    fn from(e: SqlError) -> Self {
        user_error(e.sqlstate(), e.to_string())
    }
}

fn query_error(e: QueryError) -> PgWireError {
    let code = match &e {
        QueryError::UnknownView(_) => "42P01",
        QueryError::KeyArity { .. } => "42601",
        QueryError::Stale { .. } => "55000",
        QueryError::LsnTimeout { .. } => "57014",
        QueryError::BadRow { .. } => "22023",
        QueryError::Store(_) => "58030",
    };
    user_error(code, e.to_string())
}

fn pg_type(name: &str) -> Type {
    match name {
        "int8" => Type::INT8,
        "int4" => Type::INT4,
        "int2" => Type::INT2,
        "float8" => Type::FLOAT8,
        "bool" => Type::BOOL,
        _ => Type::TEXT,
    }
}

/// Parses `500ms`, `5s`, `1min` or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    match unit.trim() {
        "" | "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "min" => Some(Duration::from_secs(n.checked_mul(60)?)),
        _ => None,
    }
}

/// Turns SQL text into plans for the extended protocol.
#[derive(Debug)]
pub struct PlanParser {
    store: Arc<ViewStore>,
    plans: PlanCache,
}

/// Statements this agent has planned, by their text: most drivers (libpq's `PQexecParams`,
/// JDBC and psycopg below their prepare thresholds, node-postgres) send Parse with the same
/// text for every execution, and parsing and planning cost more than the lookup they end in
/// (about a fifth of the agent's CPU per query under `pgbench -M extended`). Plans depend only
/// on the configured views, which do not change while the agent runs. Bounded: when
/// [`PLAN_CACHE_ENTRIES`] texts are held, the next new one starts it over.
#[derive(Debug, Default)]
struct PlanCache {
    plans: std::sync::Mutex<std::collections::HashMap<String, Option<Plan>>>,
}

/// Statement texts a [`PlanCache`] holds at most.
const PLAN_CACHE_ENTRIES: usize = 256;

impl PlanCache {
    fn get(&self, sql: &str) -> Option<Option<Plan>> {
        self.lock().get(sql).cloned()
    }

    fn insert(&self, sql: &str, plan: &Option<Plan>) {
        let mut plans = self.lock();
        if plans.len() >= PLAN_CACHE_ENTRIES {
            plans.clear();
        }
        plans.insert(sql.to_owned(), plan.clone());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Option<Plan>>> {
        self.plans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl QueryParser for PlanParser {
    type Statement = Plan;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Plan>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        if let Some(plan) = self.plans.get(sql) {
            return Ok(plan);
        }
        let plan = sql::plan_one(sql, &self.store)?;
        self.plans.insert(sql, &plan);
        Ok(plan)
    }

    fn get_parameter_types(&self, stmt: &Plan) -> PgWireResult<Vec<Type>> {
        Ok(stmt.param_types().iter().map(|t| pg_type(t)).collect())
    }

    fn get_result_schema(
        &self,
        stmt: &Plan,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(schema(
            stmt,
            column_format.unwrap_or(&Format::UnifiedBinary),
        ))
    }
}

fn field(name: &str, ty: &str, format: &Format, idx: usize) -> FieldInfo {
    FieldInfo::new(
        name.to_owned(),
        None,
        None,
        pg_type(ty),
        format.format_for(idx),
    )
}

/// The result columns of a plan (empty for statements that return no rows).
fn schema(plan: &Plan, format: &Format) -> Vec<FieldInfo> {
    match plan {
        Plan::Select(s) => s
            .columns
            .iter()
            .zip(&s.types)
            .enumerate()
            .map(|(i, (c, t))| field(c, t, format, i))
            .collect(),
        Plan::Status(cols) => cols
            .iter()
            .enumerate()
            .map(|(i, &c)| field(STATUS_COLUMNS[c].0, STATUS_COLUMNS[c].1, format, i))
            .collect(),
        Plan::Constants(cs) => cs
            .iter()
            .enumerate()
            .map(|(i, (n, v))| {
                let ty = match v {
                    Value::Number(n) if n.is_i64() => "int4",
                    Value::Bool(_) => "bool",
                    _ => "text",
                };
                field(n, ty, format, i)
            })
            .collect(),
        Plan::Show(name) => vec![field(name, "text", format, 0)],
        Plan::Set { .. } | Plan::Ack(_) => Vec::new(),
    }
}

/// Encodes one JSON value as a field of Postgres type `ty`.
fn encode(enc: &mut DataRowEncoder, ty: &str, col: &str, v: Option<&Value>) -> PgWireResult<()> {
    let v = v.filter(|v| !v.is_null());
    let mismatch = |v: &Value| {
        user_error(
            "22P02",
            format!("column {col:?} holds {v}, which is not {ty}; fix the view's column_types"),
        )
    };
    match ty {
        "int8" | "int4" | "int2" => {
            let i = match v {
                None => None,
                Some(Value::Number(n)) => Some(
                    n.as_i64()
                        .ok_or_else(|| mismatch(&Value::Number(n.clone())))?,
                ),
                Some(Value::String(s)) => Some(
                    s.parse::<i64>()
                        .map_err(|_| mismatch(&Value::String(s.clone())))?,
                ),
                Some(other) => return Err(mismatch(other)),
            };
            match ty {
                "int8" => enc.encode_field(&i),
                "int4" => enc.encode_field(
                    &i.map(i32::try_from)
                        .transpose()
                        .map_err(|_| mismatch(v.unwrap_or(&Value::Null)))?,
                ),
                _ => enc.encode_field(
                    &i.map(i16::try_from)
                        .transpose()
                        .map_err(|_| mismatch(v.unwrap_or(&Value::Null)))?,
                ),
            }
        }
        "float8" => {
            let f = match v {
                None => None,
                Some(Value::Number(n)) => n.as_f64(),
                Some(Value::String(s)) => Some(
                    s.parse::<f64>()
                        .map_err(|_| mismatch(&Value::String(s.clone())))?,
                ),
                Some(other) => return Err(mismatch(other)),
            };
            enc.encode_field(&f)
        }
        "bool" => {
            let b = match v {
                None => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(Value::String(s)) if s == "t" || s == "true" => Some(true),
                Some(Value::String(s)) if s == "f" || s == "false" => Some(false),
                Some(other) => return Err(mismatch(other)),
            };
            enc.encode_field(&b)
        }
        _ => {
            let s = match v {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(other.to_string()),
            };
            enc.encode_field(&s)
        }
    }
}

/// Encodes one stored field as a field of Postgres type `ty` (the fast path of [`encode`]).
fn encode_stored(enc: &mut DataRowEncoder, ty: &str, col: &str, f: Field<'_>) -> PgWireResult<()> {
    let mismatch = || {
        user_error(
            "22P02",
            format!(
                "column {col:?} holds {}, which is not {ty}; fix the view's column_types",
                f.to_value()
            ),
        )
    };
    match (ty, f) {
        (_, Field::Null) => enc.encode_field(&None::<&str>),
        ("int8", Field::Int(i)) => enc.encode_field(&i),
        ("int4", Field::Int(i)) => enc.encode_field(&i32::try_from(i).map_err(|_| mismatch())?),
        ("int2", Field::Int(i)) => enc.encode_field(&i16::try_from(i).map_err(|_| mismatch())?),
        ("float8", Field::Float(x)) => enc.encode_field(&x),
        ("float8", Field::Int(i)) => enc.encode_field(&(i as f64)),
        ("float8", Field::UInt(u)) => enc.encode_field(&(u as f64)),
        ("bool", Field::Bool(b)) => enc.encode_field(&b),
        ("int8" | "int4" | "int2" | "float8" | "bool", Field::Str(_)) => {
            encode(enc, ty, col, Some(&f.to_value()))
        }
        ("int8" | "int4" | "int2" | "float8" | "bool", _) => Err(mismatch()),
        (_, Field::Str(s) | Field::Json(s)) => enc.encode_field(&s),
        (_, Field::Int(i)) => enc.encode_field(&i.to_string()),
        (_, Field::Bool(b)) => enc.encode_field(&if b { "true" } else { "false" }),
        (_, Field::UInt(_) | Field::Float(_)) => enc.encode_field(&f.to_value().to_string()),
    }
}

/// Executes plans against a [`ViewStore`]; shared by both query protocols.
#[derive(Debug)]
pub struct QueryService {
    store: Arc<ViewStore>,
    parser: Arc<PlanParser>,
    default_min_lsn_timeout: Duration,
    max_rows: usize,
}

impl QueryService {
    /// A service over `store` with the `[pgwire]` settings.
    pub fn new(store: Arc<ViewStore>, cfg: &PgwireConfig) -> Self {
        QueryService {
            parser: Arc::new(PlanParser {
                store: store.clone(),
                plans: PlanCache::default(),
            }),
            store,
            default_min_lsn_timeout: Duration::from_millis(cfg.min_lsn_timeout_ms),
            max_rows: cfg.max_result_rows,
        }
    }

    /// Runs one plan with bound parameters.
    pub async fn execute<C>(
        &self,
        client: &mut C,
        plan: &Plan,
        params: &[Value],
        format: &Format,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match plan {
            Plan::Set { name, value } => {
                self.set(client, name, value.as_deref())?;
                Ok(Response::Execution(Tag::new("SET")))
            }
            Plan::Ack(tag) => Ok(Response::Execution(Tag::new(tag))),
            Plan::Show(name) => {
                let v =
                    client
                        .metadata()
                        .get(name.as_str())
                        .cloned()
                        .or_else(|| match name.as_str() {
                            SET_MIN_LSN => Some("0/0".into()),
                            SET_MIN_LSN_TIMEOUT => {
                                Some(format!("{}ms", self.default_min_lsn_timeout.as_millis()))
                            }
                            SET_ALLOW_STALE => Some("off".into()),
                            _ => None,
                        });
                let Some(v) = v else {
                    return Err(user_error(
                        "42704",
                        format!("unrecognized configuration parameter {name:?}"),
                    ));
                };
                let fields = Arc::new(schema(plan, format));
                let mut enc = DataRowEncoder::new(fields.clone());
                enc.encode_field(&Some(v))?;
                Ok(Response::Query(QueryResponse::new(
                    fields,
                    stream::iter(vec![Ok(enc.take_row())]),
                )))
            }
            Plan::Constants(cs) => {
                let fields = Arc::new(schema(plan, format));
                let mut enc = DataRowEncoder::new(fields.clone());
                for (f, (n, v)) in fields.iter().zip(cs) {
                    let ty = match *f.datatype() {
                        Type::INT4 => "int4",
                        Type::BOOL => "bool",
                        _ => "text",
                    };
                    encode(&mut enc, ty, n, Some(v))?;
                }
                Ok(Response::Query(QueryResponse::new(
                    fields,
                    stream::iter(vec![Ok(enc.take_row())]),
                )))
            }
            Plan::Status(cols) => {
                self.wait_min_lsn(client).await?;
                let fields = Arc::new(schema(plan, format));
                let mut enc = DataRowEncoder::new(fields.clone());
                let mut rows = Vec::new();
                for st in self.store.status() {
                    let p = st.progress;
                    let lag = p.stream_last_seq.saturating_sub(p.applied_seq);
                    for &c in cols {
                        let v = match STATUS_COLUMNS[c].0 {
                            "view" => Value::from(st.view.clone()),
                            "source" => Value::from(st.source.clone()),
                            "applied_lsn" => Value::from(p.applied_lsn.to_string()),
                            "watermark_lsn" => Value::from(p.watermark.to_string()),
                            "applied_seq" => Value::from(p.applied_seq),
                            "stream_last_seq" => Value::from(p.stream_last_seq),
                            "lag" => Value::from(lag),
                            "stale" => Value::from(st.stale.is_some()),
                            _ => st.stale.clone().map(Value::from).unwrap_or(Value::Null),
                        };
                        encode(&mut enc, STATUS_COLUMNS[c].1, STATUS_COLUMNS[c].0, Some(&v))?;
                    }
                    rows.push(Ok(enc.take_row()));
                }
                Ok(Response::Query(QueryResponse::new(
                    fields,
                    stream::iter(rows),
                )))
            }
            Plan::Select(s) => self.select(client, plan, s, params, format).await,
        }
    }

    async fn select<C>(
        &self,
        client: &mut C,
        plan: &Plan,
        s: &SelectPlan,
        params: &[Value],
        format: &Format,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let resolve = |o: &Operand| -> PgWireResult<Value> {
            match o {
                Operand::Value(v) => Ok(v.clone()),
                Operand::Param(i) => params.get(*i).cloned().ok_or_else(|| {
                    user_error("08P01", format!("parameter ${} was not bound", i + 1))
                }),
            }
        };
        let mut keys: Vec<Vec<Value>> = vec![Vec::new()];
        for alternatives in &s.key_values {
            let vals = alternatives
                .iter()
                .map(resolve)
                .collect::<PgWireResult<Vec<_>>>()?;
            keys = keys
                .iter()
                .flat_map(|k| {
                    vals.iter().map(move |v| {
                        let mut k = k.clone();
                        k.push(v.clone());
                        k
                    })
                })
                .collect();
        }
        let limit = match &s.limit {
            None => self.max_rows,
            Some(o) => match resolve(o)? {
                Value::Null => self.max_rows,
                v => v
                    .as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| user_error("2201W", format!("LIMIT must not be negative: {v}")))?
                    .min(self.max_rows as u64) as usize,
            },
        };
        self.wait_min_lsn(client).await?;
        let allow_stale = client
            .metadata()
            .get(SET_ALLOW_STALE)
            .is_some_and(|v| matches!(v.as_str(), "on" | "true" | "1" | "yes"));
        let result = self
            .store
            .read_via(Interface::Pgwire, &s.view, &keys, limit, allow_stale)
            .map_err(query_error)?;
        if let Some(reason) = &result.stale {
            let notice = ErrorInfo::new(
                "WARNING".into(),
                "01000".into(),
                format!("view {:?} is stale: {reason}", s.view),
            );
            client
                .feed(PgWireBackendMessage::NoticeResponse(NoticeResponse::from(
                    notice,
                )))
                .await?;
        }
        let fields = Arc::new(schema(plan, format));
        let mut enc = DataRowEncoder::new(fields.clone());
        let view = result.view;
        let corrupt = |e: crate::store::StoreError| query_error(QueryError::Store(e));
        let mut rows = Vec::with_capacity(result.values.len());
        if view.whole_row() {
            for value in &result.values {
                let (_, row) = view.decode(value).map_err(corrupt)?;
                for (c, t) in s.columns.iter().zip(&s.types) {
                    if c == crate::store::WHOLE_ROW_COLUMN {
                        encode(&mut enc, t, c, Some(&Value::Object(row.clone())))?;
                    } else {
                        encode(&mut enc, t, c, row.get(c))?;
                    }
                }
                rows.push(Ok(enc.take_row()));
            }
        } else {
            // Straight from the stored bytes: no JSON, no maps.
            let positions = s
                .columns
                .iter()
                .map(|c| {
                    view.stored_position(c).ok_or_else(|| {
                        user_error(
                            "42703",
                            format!("column {c:?} does not exist in view {:?}", s.view),
                        )
                    })
                })
                .collect::<PgWireResult<Vec<usize>>>()?;
            let mut stored = Vec::new();
            for value in &result.values {
                view.fields(value, &mut stored).map_err(corrupt)?;
                for ((&pos, c), t) in positions.iter().zip(&s.columns).zip(&s.types) {
                    encode_stored(&mut enc, t, c, stored[pos])?;
                }
                rows.push(Ok(enc.take_row()));
            }
        }
        Ok(Response::Query(QueryResponse::new(
            fields,
            stream::iter(rows),
        )))
    }

    fn set<C: ClientInfo>(
        &self,
        client: &mut C,
        name: &str,
        value: Option<&str>,
    ) -> PgWireResult<()> {
        let invalid = |m: &str| {
            PgWireError::from(SqlError::InvalidValue {
                name: name.to_owned(),
                message: m.to_owned(),
            })
        };
        match (name, value) {
            (SET_MIN_LSN | SET_MIN_LSN_TIMEOUT | SET_ALLOW_STALE, None) => {
                client.metadata_mut().remove(name);
            }
            (SET_MIN_LSN, Some(v)) => {
                v.parse::<Lsn>()
                    .map_err(|e| invalid(&e.to_string()))?;
                client.metadata_mut().insert(name.to_owned(), v.to_owned());
            }
            (SET_MIN_LSN_TIMEOUT, Some(v)) => {
                parse_duration(v).ok_or_else(|| invalid("expected e.g. 500ms, 5s or 1min"))?;
                client.metadata_mut().insert(name.to_owned(), v.to_owned());
            }
            (SET_ALLOW_STALE, Some(v)) => {
                let v = v.to_ascii_lowercase();
                if !matches!(v.as_str(), "on" | "off" | "true" | "false" | "1" | "0" | "yes" | "no") {
                    return Err(invalid("expected on or off"));
                }
                client.metadata_mut().insert(name.to_owned(), v);
            }
            (other, _) if other.starts_with("cdc.") => {
                return Err(user_error(
                    "42704",
                    format!("unrecognized configuration parameter {other:?} (cdc.min_lsn, cdc.min_lsn_timeout, cdc.allow_stale)"),
                ))
            }
            // Client drivers set session parameters (extra_float_digits, application_name,
            // DateStyle…); they do not change what a view returns.
            _ => {}
        }
        Ok(())
    }

    async fn wait_min_lsn<C: ClientInfo>(&self, client: &C) -> PgWireResult<()> {
        let Some(lsn) = client
            .metadata()
            .get(SET_MIN_LSN)
            .and_then(|v| v.parse::<Lsn>().ok())
        else {
            return Ok(());
        };
        let timeout = client
            .metadata()
            .get(SET_MIN_LSN_TIMEOUT)
            .and_then(|v| parse_duration(v))
            .unwrap_or(self.default_min_lsn_timeout);
        self.store
            .wait_for_lsn(lsn, timeout)
            .await
            .map(|_| ())
            .map_err(query_error)
    }
}

#[async_trait]
impl SimpleQueryHandler for QueryService {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let plans = sql::plan_all(query, &self.store)?;
        let mut out = Vec::with_capacity(plans.len());
        for plan in &plans {
            match self.execute(client, plan, &[], &Format::UnifiedText).await {
                Ok(r) => out.push(r),
                // Like Postgres: an error ends the query string, earlier results stand.
                Err(PgWireError::UserError(info)) => {
                    out.push(Response::Error(info));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

fn response_kind(r: &Response) -> &'static str {
    match r {
        Response::EmptyQuery => "empty",
        Response::Query(_) => "query",
        Response::Execution(_) => "execution",
        Response::TransactionStart(_) => "transaction start",
        Response::TransactionEnd(_) => "transaction end",
        Response::Error(_) => "error",
        Response::CopyIn(_) => "copy in",
        Response::CopyOut(_) => "copy out",
        Response::CopyBoth(_) => "copy both",
    }
}

fn bind_params(portal: &Portal<Plan>) -> PgWireResult<Vec<Value>> {
    let server_types = portal.statement.statement.param_types();
    (0..portal.parameter_len())
        .map(|i| {
            let ty = portal
                .statement
                .parameter_types
                .get(i)
                .cloned()
                .flatten()
                .filter(|t| *t != Type::UNKNOWN)
                .unwrap_or_else(|| pg_type(server_types.get(i).map_or("text", |s| s.as_str())));
            let v = match ty {
                Type::INT8 => portal.parameter::<i64>(i, &ty)?.map(Value::from),
                Type::INT4 => portal.parameter::<i32>(i, &ty)?.map(Value::from),
                Type::INT2 => portal.parameter::<i16>(i, &ty)?.map(Value::from),
                Type::BOOL => portal.parameter::<bool>(i, &ty)?.map(Value::from),
                Type::FLOAT8 => portal.parameter::<f64>(i, &ty)?.map(Value::from),
                Type::FLOAT4 => portal.parameter::<f32>(i, &ty)?.map(Value::from),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                    portal.parameter::<String>(i, &ty)?.map(Value::from)
                }
                other => {
                    return Err(user_error(
                        "42804",
                        format!("parameter ${} of type {other} is not supported; send int8, int4, int2, bool, float8 or text", i + 1),
                    ))
                }
            };
            Ok(v.unwrap_or(Value::Null))
        })
        .collect()
}

/// Buffers the reply to a Describe (see [`QueryService::on_describe`]): the parameter types of
/// a statement, then its row description, or NoData; the same messages as pgwire's default.
async fn feed_description<C, D>(client: &mut C, described: &D) -> PgWireResult<()>
where
    C: Sink<PgWireBackendMessage> + Unpin,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    D: DescribeResponse,
{
    if let Some(types) = described.parameters() {
        let oids = types.iter().map(Type::oid).collect();
        client
            .feed(PgWireBackendMessage::ParameterDescription(
                ParameterDescription::new(oids),
            ))
            .await?;
    }
    let reply = if described.is_no_data() {
        PgWireBackendMessage::NoData(NoData::new())
    } else {
        PgWireBackendMessage::RowDescription(RowDescription::new(
            described.fields().iter().map(Into::into).collect(),
        ))
    };
    client.feed(reply).await?;
    Ok(())
}

#[async_trait]
impl ExtendedQueryHandler for QueryService {
    type Statement = Plan;
    type QueryParser = PlanParser;

    fn query_parser(&self) -> Arc<PlanParser> {
        self.parser.clone()
    }

    /// Like pgwire's default, but `ParseComplete` is only buffered (see [`Self::on_describe`]).
    async fn on_parse<C>(&self, client: &mut C, message: Parse) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match StoredStatement::parse(client, &message, self.query_parser()).await? {
            Some(stmt) => client.portal_store().put_statement(Arc::new(stmt)),
            None => client
                .portal_store()
                .put_empty_statement(message.name.as_deref().unwrap_or(DEFAULT_NAME)),
        }
        client
            .feed(PgWireBackendMessage::ParseComplete(ParseComplete::new()))
            .await?;
        Ok(())
    }

    /// Like pgwire's default, but the description is only buffered, as Postgres does: the
    /// reply leaves at the client's Sync (or Flush) in one write. pgwire flushes after each
    /// message, and libpq (psql, pgbench, psycopg, JDBC alike) sends Bind/Describe/Execute/Sync
    /// for every execution: two writes per query before, and twice the client's kernel work.
    async fn on_describe<C>(&self, client: &mut C, message: Describe) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        match message.target_type {
            TARGET_TYPE_BYTE_STATEMENT => match client.portal_store().get_statement(name) {
                Some(Entry::Value(stmt)) => {
                    let described = self.do_describe_statement(client, &stmt).await?;
                    feed_description(client, &described).await
                }
                Some(Entry::Empty) => {
                    feed_description(client, &DescribeStatementResponse::no_data()).await
                }
                None => Err(PgWireError::StatementNotFound(name.to_owned())),
            },
            TARGET_TYPE_BYTE_PORTAL => match client.portal_store().get_portal(name) {
                Some(Entry::Value(portal)) => {
                    let described = self.do_describe_portal(client, &portal).await?;
                    feed_description(client, &described).await
                }
                Some(Entry::Empty) => {
                    feed_description(client, &DescribePortalResponse::no_data()).await
                }
                None => Err(PgWireError::PortalNotFound(name.to_owned())),
            },
            other => Err(PgWireError::InvalidTargetType(other)),
        }
    }

    /// Like pgwire's default, but `BindComplete` is only buffered: the whole reply to
    /// Bind/Execute/Sync then leaves in one write at Sync (pgwire flushes after each message).
    async fn on_bind<C>(&self, client: &mut C, message: Bind) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statement_name = message.statement_name.as_deref().unwrap_or(DEFAULT_NAME);
        match client.portal_store().get_statement(statement_name) {
            Some(Entry::Value(statement)) => {
                let portal = Portal::try_new(&message, statement)?;
                client.portal_store().put_portal(Arc::new(portal));
            }
            Some(Entry::Empty) => {
                if !message.parameters.is_empty() {
                    return Err(user_error(
                        "08P01",
                        format!(
                            "bind message supplies {} parameters, but prepared statement {statement_name:?} requires 0",
                            message.parameters.len()
                        ),
                    ));
                }
                let portal_name = message.portal_name.as_deref().unwrap_or(DEFAULT_NAME);
                client.portal_store().put_empty_portal(portal_name);
            }
            None => return Err(PgWireError::StatementNotFound(statement_name.to_owned())),
        }
        client
            .feed(PgWireBackendMessage::BindComplete(BindComplete::new()))
            .await?;
        Ok(())
    }

    /// The common case, a fresh portal executed for all its rows, answers with buffered
    /// messages (flushed once at Sync); anything else takes pgwire's default path.
    async fn on_execute<C>(&self, client: &mut C, message: Execute) -> PgWireResult<()>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if message.max_rows != 0 || !matches!(client.state(), PgWireConnectionState::ReadyForQuery)
        {
            return self._on_execute(client, message).await;
        }
        let portal_name = message.name.as_deref().unwrap_or(DEFAULT_NAME);
        let portal = match client.portal_store().get_portal(portal_name) {
            Some(Entry::Value(portal)) => portal,
            _ => return self._on_execute(client, message).await,
        };
        {
            let state = portal.state();
            let mut state = state.lock().await;
            if !matches!(*state, PortalExecutionState::Initial) {
                drop(state);
                return self._on_execute(client, message).await;
            }
            // Executed for all its rows: a repeated Execute returns nothing, like Postgres.
            *state = PortalExecutionState::Finished;
        }
        client.set_state(PgWireConnectionState::QueryInProgress);
        let params = bind_params(&portal)?;
        let response = self
            .execute(
                client,
                &portal.statement.statement,
                &params,
                &portal.result_column_format,
            )
            .await?;
        match response {
            Response::Query(mut results) => {
                let tag = results.command_tag().to_owned();
                let mut rows = 0;
                let data_rows = results.data_rows();
                while let Some(row) = data_rows.next().await {
                    client.feed(PgWireBackendMessage::DataRow(row?)).await?;
                    rows += 1;
                }
                client
                    .feed(PgWireBackendMessage::CommandComplete(
                        Tag::new(&tag).with_rows(rows).into(),
                    ))
                    .await?;
            }
            Response::Execution(tag) => {
                client
                    .feed(PgWireBackendMessage::CommandComplete(tag.into()))
                    .await?;
            }
            Response::Error(e) => return Err(PgWireError::UserError(e)),
            other => {
                return Err(user_error(
                    "XX000",
                    format!("unexpected response kind {}", response_kind(&other)),
                ))
            }
        }
        client.set_state(PgWireConnectionState::ReadyForQuery);
        Ok(())
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Plan>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let params = bind_params(portal)?;
        self.execute(
            client,
            &portal.statement.statement,
            &params,
            &portal.result_column_format,
        )
        .await
    }
}

/// Startup without authentication.
#[derive(Debug)]
pub struct OpenStartup;

impl NoopStartupHandler for OpenStartup {}

/// The configured password as an auth source (any user name).
#[derive(Debug)]
pub struct FixedPassword(String);

#[async_trait]
impl AuthSource for FixedPassword {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let salt: [u8; 4] = rand_salt();
        let user = login.user().unwrap_or("");
        let hash = hash_md5_password(user, &self.0, &salt);
        Ok(Password::new(Some(salt.to_vec()), hash.into_bytes()))
    }
}

fn rand_salt() -> [u8; 4] {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos ^ std::process::id().rotate_left(16)).to_le_bytes()
}

/// Startup: open, or an MD5 password exchange when `pgwire.password` is set.
pub enum AgentStartup {
    /// No authentication.
    Open(OpenStartup),
    /// MD5 password.
    Password(Box<Md5PasswordAuthStartupHandler<FixedPassword, DefaultServerParameterProvider>>),
}

impl Debug for AgentStartup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentStartup::Open(_) => "AgentStartup::Open",
            AgentStartup::Password(_) => "AgentStartup::Password",
        })
    }
}

#[async_trait]
impl StartupHandler for AgentStartup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            AgentStartup::Open(h) => h.on_startup(client, message).await,
            AgentStartup::Password(h) => h.on_startup(client, message).await,
        }
    }
}

/// The handler set of one server.
#[derive(Debug)]
pub struct Handlers {
    service: Arc<QueryService>,
    startup: Arc<AgentStartup>,
}

impl Handlers {
    /// Handlers over `store` with the `[pgwire]` settings.
    pub fn new(store: Arc<ViewStore>, cfg: &PgwireConfig) -> Handlers {
        let startup = match &cfg.password {
            Some(pw) => {
                let mut params = DefaultServerParameterProvider::default();
                params.server_version = SERVER_VERSION.to_owned();
                AgentStartup::Password(Box::new(Md5PasswordAuthStartupHandler::new(
                    Arc::new(FixedPassword(pw.clone())),
                    Arc::new(params),
                )))
            }
            None => AgentStartup::Open(OpenStartup),
        };
        Handlers {
            service: Arc::new(QueryService::new(store, cfg)),
            startup: Arc::new(startup),
        }
    }
}

/// `server_version` reported to clients.
pub const SERVER_VERSION: &str = "15.0 (cdc view-agent)";

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.service.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.service.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }
}

/// Serves pgwire on `listener` until `shutdown` turns true. At most `max_connections` clients
/// are served at once; the next ones wait in the accept queue (the bound protects the apply
/// loop's share of the CPU).
pub async fn serve(
    listener: TcpListener,
    store: Arc<ViewStore>,
    cfg: PgwireConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let handlers = Arc::new(Handlers::new(store, &cfg));
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            // 1. Shutdown: stop accepting and drop open connections.
            _ = crate::shutdown_requested(&mut shutdown) => break,
            // 2. Reap finished connections so the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            // 3. Accept, once a connection slot is free.
            accepted = async {
                let permit = permits.clone().acquire_owned().await;
                (permit, listener.accept().await)
            } => {
                let (Ok(permit), accepted) = accepted else { break };
                match accepted {
                    Ok((socket, _)) => {
                        let _ = socket.set_nodelay(true);
                        let handlers = handlers.clone();
                        connections.spawn(async move {
                            if let Err(e) = pgwire::tokio::process_socket(socket, None, handlers).await {
                                tracing::debug!(error = %e, "pgwire connection ended");
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }
    connections.abort_all();
    // Wait for the aborted connections to drop their handles on the store.
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("250"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn the_plan_cache_returns_what_was_planned_and_stays_bounded() {
        let cache = PlanCache::default();
        let show = |n: usize| Some(Plan::Show(format!("setting_{n}")));
        assert_eq!(cache.get("SHOW a"), None);
        cache.insert("SHOW a", &show(0));
        cache.insert("", &None);
        assert_eq!(cache.get("SHOW a"), Some(show(0)));
        assert_eq!(cache.get(""), Some(None));
        for n in 0..PLAN_CACHE_ENTRIES * 2 {
            cache.insert(&format!("SHOW s{n}"), &show(n));
            assert!(cache.lock().len() <= PLAN_CACHE_ENTRIES);
        }
        let last = PLAN_CACHE_ENTRIES * 2 - 1;
        assert_eq!(cache.get(&format!("SHOW s{last}")), Some(show(last)));
    }
}
