//! `view-agent verify`: compare views with the source at one consistent point, and repair
//! what differs.
//!
//! # The consistent point
//! The agent's apply position is fenced first (nothing new is applied), then the source is read
//! in a REPEATABLE READ transaction whose first statement reads `pg_current_wal_lsn()` = L.
//! The agent then applies every source transaction committed at or before L and stops before
//! the first one after it (the stream is in commit order), and the views are exported at that
//! point; the fence is lifted and the source rows are read in the same transaction. Both sides
//! are then the source as of L, except for a transaction that committed around the moment the
//! snapshot was taken (its commit record can precede L while it is not yet visible to the
//! snapshot). So every difference of the first pass is checked by a second pass at a new
//! point: only keys that differ in both, with the same view row and the same source row, are
//! reported (and repaired). A key that differs in one pass only, or differently in each (a row
//! that changed in between), is counted as transient.
//!
//! # Repair
//! The second pass keeps the fence until the repair is written: the views stay exactly at the
//! second point L2 while the source rows read at L2 are written (one atomic batch per view,
//! through [`crate::ViewStore::write_rows`]; the applied position does not move). Changes after
//! L2 are applied on top once the fence is lifted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use cdc::envelope::Row;
use cdc::pgconn::PgTarget;
use cdc::snapshot::{ChunkRows, TableShape, SESSION_SETTINGS};
use cdc::subject::{quote_ident, quote_table};
use cdc::value::TypeRegistry;
use cdc::Lsn;
use futures::TryStreamExt as _;
use serde_json::Value;

use crate::config::{AgentConfig, ViewConfig};
use crate::control::{AgentLink, ControlError};

/// Exit status of `view-agent verify` when differences were found and not repaired.
pub const EXIT_DIFFERENCES: u8 = 3;
/// How often a held fence's lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Errors of a verification.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The source could not be read.
    #[error("source: {0}")]
    Source(String),
    /// The agent could not be reached or refused.
    #[error("agent: {0}")]
    Agent(#[from] ControlError),
    /// The view and the source don't fit together.
    #[error("{0}")]
    Config(String),
}

impl From<tokio_postgres::Error> for VerifyError {
    fn from(e: tokio_postgres::Error) -> Self {
        let mut text = e.to_string();
        if let Some(db) = e.as_db_error() {
            text = format!("{text}: {}", db.message());
        }
        VerifyError::Source(text)
    }
}

/// What kind of difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DiffKind {
    /// In the source, not in the view.
    Missing,
    /// In the view, not in the source.
    Extra,
    /// In both, with other values.
    Differs,
}

/// One differing row, by source primary key.
#[derive(Clone, Debug, PartialEq)]
pub struct Diff {
    /// What differs.
    pub kind: DiffKind,
    /// The primary key.
    pub pk: Vec<Value>,
    /// The view's row (stored columns), if any.
    pub view_row: Option<Row>,
    /// The source's row (projected as the view stores it), if any.
    pub source_row: Option<Row>,
}

/// The comparison of one view.
#[derive(Clone, Debug, Default)]
pub struct ViewReport {
    /// The view.
    pub view: String,
    /// Rows at the source (projected).
    pub source_rows: usize,
    /// Rows in the view.
    pub view_rows: usize,
    /// Differences found in both passes, by primary key (JSON text).
    pub diffs: BTreeMap<String, Diff>,
    /// Differences seen in one pass only (changed in between).
    pub transient: usize,
}

impl ViewReport {
    /// Differences of `kind`.
    pub fn count(&self, kind: DiffKind) -> usize {
        self.diffs.values().filter(|d| d.kind == kind).count()
    }
}

/// The result of `verify`.
#[derive(Clone, Debug)]
pub struct Report {
    /// The source point of the (last) comparison.
    pub lsn: Lsn,
    /// Per view.
    pub views: Vec<ViewReport>,
    /// True when the differences were repaired.
    pub repaired: bool,
}

impl Report {
    /// Differences in all views.
    pub fn differences(&self) -> usize {
        self.views.iter().map(|v| v.diffs.len()).sum()
    }

    /// The report as text, with up to `examples` rows per kind and view.
    pub fn render(&self, examples: usize) -> String {
        let mut out = String::new();
        for v in &self.views {
            let _ = writeln!(
                out,
                "view {}: {} rows at the source, {} in the view, as of {}: {} missing, {} extra, {} differing{}",
                v.view,
                v.source_rows,
                v.view_rows,
                self.lsn,
                v.count(DiffKind::Missing),
                v.count(DiffKind::Extra),
                v.count(DiffKind::Differs),
                if v.transient > 0 {
                    format!(" ({} more changed while verifying, not counted)", v.transient)
                } else {
                    String::new()
                }
            );
            for kind in [DiffKind::Missing, DiffKind::Extra, DiffKind::Differs] {
                let all: Vec<&Diff> = v.diffs.values().filter(|d| d.kind == kind).collect();
                for d in all.iter().take(examples) {
                    let pk = Value::Array(d.pk.clone());
                    let row = |r: &Option<Row>| {
                        r.as_ref()
                            .map(|r| Value::Object(r.clone()).to_string())
                            .unwrap_or_default()
                    };
                    let _ = match kind {
                        DiffKind::Missing => {
                            writeln!(out, "  missing  pk={pk}  source {}", row(&d.source_row))
                        }
                        DiffKind::Extra => {
                            writeln!(out, "  extra    pk={pk}  view {}", row(&d.view_row))
                        }
                        DiffKind::Differs => writeln!(
                            out,
                            "  differs  pk={pk}  view {}  source {}",
                            row(&d.view_row),
                            row(&d.source_row)
                        ),
                    };
                }
                if all.len() > examples {
                    let _ = writeln!(out, "  … and {} more {kind:?}", all.len() - examples);
                }
            }
        }
        out
    }
}

/// What to verify.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Views to verify (empty = all).
    pub views: Vec<String>,
    /// Repair the differences.
    pub repair: bool,
    /// How long the agent may take to reach the source point.
    pub timeout: Duration,
}

/// The columns a view stores (key, primary key, projection), or `None` for whole rows.
fn stored_columns(v: &ViewConfig) -> Option<Vec<String>> {
    let cols = v.columns.as_ref()?;
    let mut all: Vec<String> = Vec::new();
    for c in v.key.iter().chain(&v.primary_key).chain(cols) {
        if !all.contains(c) {
            all.push(c.clone());
        }
    }
    Some(all)
}

fn pk_of(v: &ViewConfig, row: &Row) -> Option<Vec<Value>> {
    v.primary_key.iter().map(|c| row.get(c).cloned()).collect()
}

/// One pass: both sides at one source point.
struct Pass {
    lsn: Lsn,
    /// Per view: primary key (JSON text) → difference.
    diffs: Vec<BTreeMap<String, Diff>>,
    counts: Vec<(usize, usize)>,
}

/// Reads every row of the views' source tables in the current transaction, as the reader
/// would publish them (same text settings, same JSON mapping).
async fn read_source(
    sql: &tokio_postgres::Client,
    views: &[&ViewConfig],
) -> Result<HashMap<String, Vec<Row>>, VerifyError> {
    let mut tables: Vec<&str> = views.iter().map(|v| v.source.as_str()).collect();
    tables.sort_unstable();
    tables.dedup();
    let mut out = HashMap::new();
    let mut types = TypeRegistry::new();
    for t in tables {
        let (schema, table) = t
            .split_once('.')
            .ok_or_else(|| VerifyError::Config(format!("source {t:?} is not schema.table")))?;
        let shape = TableShape::load(sql, schema, table)
            .await
            .map_err(|e| VerifyError::Source(format!("table {t}: {e}")))?;
        let unknown = types.unknown(shape.columns.iter().map(|(_, oid)| *oid));
        types.load(sql, &unknown).await?;
        let cols = shape
            .columns
            .iter()
            .map(|(c, _)| quote_ident(c))
            .collect::<Vec<_>>()
            .join(", ");
        let copy = format!(
            "COPY (SELECT {cols} FROM {}) TO STDOUT",
            quote_table(schema, table)
        );
        let data: Vec<bytes::Bytes> = sql.copy_out(copy.as_str()).await?.try_collect().await?;
        let chunk = ChunkRows::from_copy_text(&data.concat(), shape.columns.len())
            .map_err(|e| VerifyError::Source(format!("table {t}: {e}")))?;
        let rows = (0..chunk.len())
            .map(|i| {
                shape
                    .columns
                    .iter()
                    .zip(chunk.row(i))
                    .map(|((name, oid), v)| {
                        let value = v.map_or(Value::Null, |text| types.to_json(*oid, text));
                        (name.clone(), value)
                    })
                    .collect::<Row>()
            })
            .collect();
        out.insert(t.to_owned(), rows);
    }
    Ok(out)
}

fn compare(
    v: &ViewConfig,
    view_rows: Vec<Row>,
    source_rows: &[Row],
) -> Result<(BTreeMap<String, Diff>, usize, usize), VerifyError> {
    let stored = stored_columns(v);
    let mut expected: HashMap<String, (Vec<Value>, Row)> = HashMap::new();
    for r in source_rows {
        let projected: Row = match &stored {
            Some(cols) => cols
                .iter()
                .map(|c| {
                    r.get(c).cloned().map(|x| (c.clone(), x)).ok_or_else(|| {
                        VerifyError::Config(format!(
                            "view {}: column {c:?} is not in source table {}",
                            v.name, v.source
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
            None => r.clone(),
        };
        let pk = pk_of(v, &projected).ok_or_else(|| {
            VerifyError::Config(format!(
                "view {}: primary_key {:?} is not in source table {}",
                v.name, v.primary_key, v.source
            ))
        })?;
        expected.insert(Value::Array(pk.clone()).to_string(), (pk, projected));
    }
    let source_count = expected.len();
    let view_count = view_rows.len();
    let mut diffs = BTreeMap::new();
    for row in view_rows {
        let Some(pk) = pk_of(v, &row) else {
            return Err(VerifyError::Config(format!(
                "view {}: a stored row lacks the primary key {:?}",
                v.name, v.primary_key
            )));
        };
        let key = Value::Array(pk.clone()).to_string();
        match expected.remove(&key) {
            None => {
                diffs.insert(
                    key,
                    Diff {
                        kind: DiffKind::Extra,
                        pk,
                        view_row: Some(row),
                        source_row: None,
                    },
                );
            }
            Some((_, want)) if want != row => {
                diffs.insert(
                    key,
                    Diff {
                        kind: DiffKind::Differs,
                        pk,
                        view_row: Some(row),
                        source_row: Some(want),
                    },
                );
            }
            Some(_) => {}
        }
    }
    for (key, (pk, want)) in expected {
        diffs.insert(
            key,
            Diff {
                kind: DiffKind::Missing,
                pk,
                view_row: None,
                source_row: Some(want),
            },
        );
    }
    Ok((diffs, source_count, view_count))
}

/// Keeps renewing the fence's lease (never returns).
async fn renew(link: &dyn AgentLink, fence: u64) {
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        if let Err(e) = link.fence_renew(fence).await {
            tracing::warn!(error = %e, "renewing the apply fence");
        }
    }
}

/// One pass; with `hold`, returns with the fence still held (its id).
async fn pass(
    link: &dyn AgentLink,
    source: &PgTarget,
    views: &[&ViewConfig],
    hold: bool,
    timeout: Duration,
) -> Result<(Pass, Option<u64>), VerifyError> {
    let sql = source
        .connect_sql()
        .await
        .map_err(|e| VerifyError::Source(e.to_string()))?;
    sql.batch_execute(SESSION_SETTINGS).await?;
    let fence = link.fence().await?;
    let work = async {
        sql.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
        // The transaction's snapshot is taken by its first statement: this one. The simple
        // protocol takes it and reads the LSN in one go; the extended protocol would take it
        // at Parse and read the LSN only at Execute, a round trip later, and transactions
        // committed in between would be applied by the agent but invisible to the snapshot.
        let lsn = sql
            .simple_query("SELECT pg_current_wal_lsn()::text")
            .await?
            .into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap_or_default();
        let lsn: Lsn = lsn
            .parse()
            .map_err(|_| VerifyError::Source(format!("pg_current_wal_lsn() gave {lsn:?}")))?;
        link.fence_advance(fence, lsn, timeout).await?;
        let mut exported = Vec::with_capacity(views.len());
        for v in views {
            exported.push(link.export(&v.name).await?);
        }
        if !hold {
            link.fence_lift(fence).await?;
        }
        let source_rows = tokio::select! {
            rows = read_source(&sql, views) => rows?,
            _ = renew(link, fence), if hold => unreachable!("renew never returns"),
        };
        sql.batch_execute("COMMIT").await?;
        let mut diffs = Vec::with_capacity(views.len());
        let mut counts = Vec::with_capacity(views.len());
        for (v, rows) in views.iter().zip(exported) {
            let src = source_rows.get(&v.source).map_or(&[][..], Vec::as_slice);
            let (d, s, n) = compare(v, rows, src)?;
            diffs.push(d);
            counts.push((s, n));
        }
        Ok::<_, VerifyError>(Pass { lsn, diffs, counts })
    };
    match work.await {
        Ok(p) => Ok((p, hold.then_some(fence))),
        Err(e) => {
            let _ = link.fence_lift(fence).await;
            Err(e)
        }
    }
}

/// Compares the views with the source (see the module docs) and, with `repair`, fixes the
/// differences. The report lists the differences found (before any repair).
pub async fn verify(
    link: &dyn AgentLink,
    config: &AgentConfig,
    source_url: &str,
    opts: &VerifyOptions,
) -> Result<Report, VerifyError> {
    let source = PgTarget::parse(source_url).map_err(|e| VerifyError::Source(e.to_string()))?;
    let views: Vec<&ViewConfig> = if opts.views.is_empty() {
        config.views.iter().collect()
    } else {
        opts.views
            .iter()
            .map(|name| {
                config
                    .views
                    .iter()
                    .find(|v| v.name.eq_ignore_ascii_case(name))
                    .ok_or_else(|| {
                        VerifyError::Config(format!(
                            "view {name:?} is not in the config; configured: {}",
                            config
                                .views
                                .iter()
                                .map(|v| v.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ))
                    })
            })
            .collect::<Result<_, _>>()?
    };
    let (first, _) = pass(link, &source, &views, false, opts.timeout).await?;
    let clean = first.diffs.iter().all(BTreeMap::is_empty);
    if clean {
        return Ok(Report {
            lsn: first.lsn,
            views: views
                .iter()
                .zip(&first.counts)
                .map(|(v, (s, n))| ViewReport {
                    view: v.name.clone(),
                    source_rows: *s,
                    view_rows: *n,
                    ..ViewReport::default()
                })
                .collect(),
            repaired: false,
        });
    }
    let (second, fence) = pass(link, &source, &views, opts.repair, opts.timeout).await?;
    let mut reports = Vec::with_capacity(views.len());
    for (i, v) in views.iter().enumerate() {
        let (one, two) = (&first.diffs[i], &second.diffs[i]);
        let confirmed: BTreeMap<String, Diff> = two
            .iter()
            // The same discrepancy in both passes: a row that changed in between (a racing
            // transaction shows up as a different pair of rows each time) is transient.
            .filter(|(k, d)| one.get(*k) == Some(*d))
            .map(|(k, d)| (k.clone(), d.clone()))
            .collect();
        let seen: BTreeSet<&String> = one.keys().chain(two.keys()).collect();
        reports.push(ViewReport {
            view: v.name.clone(),
            source_rows: second.counts[i].0,
            view_rows: second.counts[i].1,
            transient: seen.len() - confirmed.len(),
            diffs: confirmed,
        });
    }
    let mut report = Report {
        lsn: second.lsn,
        views: reports,
        repaired: false,
    };
    if let Some(fence) = fence {
        let repaired = repair(link, &report, second.lsn).await;
        let _ = link.fence_lift(fence).await;
        repaired?;
        report.repaired = true;
    }
    Ok(report)
}

async fn repair(link: &dyn AgentLink, report: &Report, lsn: Lsn) -> Result<(), VerifyError> {
    for v in &report.views {
        if v.diffs.is_empty() {
            continue;
        }
        let mut put = Vec::new();
        let mut delete = Vec::new();
        for d in v.diffs.values() {
            match (&d.kind, &d.source_row) {
                (DiffKind::Extra, _) => delete.push(d.pk.clone()),
                (_, Some(row)) => put.push(row.clone()),
                (_, None) => {}
            }
        }
        link.write_rows(&v.view, put, delete, lsn).await?;
    }
    Ok(())
}

/// What a repair changed, as text (one line per row, at most `max_lines`).
pub fn render_repair(report: &Report, max_lines: usize) -> String {
    let mut out = String::new();
    let mut lines = 0;
    for v in &report.views {
        if v.diffs.is_empty() {
            continue;
        }
        let written = v.count(DiffKind::Missing) + v.count(DiffKind::Differs);
        let deleted = v.count(DiffKind::Extra);
        let _ = writeln!(
            out,
            "repaired view {} as of {}: {written} rows written ({} inserted, {} replaced), {deleted} deleted",
            v.view,
            report.lsn,
            v.count(DiffKind::Missing),
            v.count(DiffKind::Differs)
        );
        for d in v.diffs.values() {
            if lines >= max_lines {
                continue;
            }
            lines += 1;
            let pk = Value::Array(d.pk.clone());
            let row = d
                .source_row
                .as_ref()
                .map(|r| Value::Object(r.clone()).to_string())
                .unwrap_or_default();
            let _ = match d.kind {
                DiffKind::Missing => writeln!(out, "  inserted pk={pk} {row}"),
                DiffKind::Differs => writeln!(out, "  replaced pk={pk} {row}"),
                DiffKind::Extra => writeln!(out, "  deleted  pk={pk}"),
            };
        }
    }
    let total = report.differences();
    if total > lines {
        let _ = writeln!(out, "  … and {} more", total - lines);
    }
    out
}
