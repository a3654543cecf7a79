//! SQL accepted by the pgwire server, parsed with sqlparser into a [`Plan`].
//!
//! Supported: `SELECT * | cols FROM view [WHERE key_col = v [AND …] | key_col IN (…)] [LIMIT n]`
//! where the constrained columns are a prefix of the view's key; `SELECT … FROM cdc_status`;
//! `SELECT <literals>` (health checks); `SET`/`SHOW` of session settings (`cdc.min_lsn`,
//! `cdc.min_lsn_timeout`, `cdc.allow_stale`; other settings are accepted and ignored);
//! `BEGIN`/`COMMIT`/`ROLLBACK` as no-ops (every statement already reads one applied point).
//! Anything that writes is refused with SQLSTATE 25006.

use serde_json::Value;
use sqlparser::ast::{
    self, BinaryOperator, Expr, LimitClause, ObjectName, ObjectNamePart, SelectItem, SetExpr,
    Statement, TableFactor, UnaryOperator,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use crate::store::{ViewStore, STATUS_TABLE, WHOLE_ROW_COLUMN};

/// Columns of `cdc_status`, with their Postgres type names.
pub const STATUS_COLUMNS: &[(&str, &str)] = &[
    ("view", "text"),
    ("source", "text"),
    ("applied_lsn", "text"),
    ("watermark_lsn", "text"),
    ("applied_seq", "int8"),
    ("stream_last_seq", "int8"),
    ("lag", "int8"),
    ("stale", "bool"),
    ("stale_reason", "text"),
];

/// Why a statement is refused; each maps to a SQLSTATE.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SqlError {
    /// Not parseable SQL.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// The table is not a configured view.
    #[error("relation {0:?} does not exist (configured views and cdc_status only)")]
    UnknownView(String),
    /// The column is not in the view.
    #[error("column {column:?} does not exist in view {view:?}")]
    UnknownColumn {
        /// The view.
        view: String,
        /// The column.
        column: String,
    },
    /// A statement that would write.
    #[error("cannot execute {0} in a read-only view agent; write to the source database instead")]
    ReadOnly(String),
    /// Valid SQL this server does not answer.
    #[error("not supported by the view agent: {0}")]
    Unsupported(String),
    /// A bad setting value.
    #[error("invalid value for {name}: {message}")]
    InvalidValue {
        /// The setting.
        name: String,
        /// Why.
        message: String,
    },
}

impl SqlError {
    /// The SQLSTATE of this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            SqlError::Syntax(_) => "42601",
            SqlError::UnknownView(_) => "42P01",
            SqlError::UnknownColumn { .. } => "42703",
            SqlError::ReadOnly(_) => "25006",
            SqlError::Unsupported(_) => "0A000",
            SqlError::InvalidValue { .. } => "22023",
        }
    }
}

/// A value in a statement: a literal or a `$n` parameter (0-based index).
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A literal.
    Value(Value),
    /// `$n`, stored as `n - 1`.
    Param(usize),
}

/// A planned `SELECT` on a view.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectPlan {
    /// The view's configured name.
    pub view: String,
    /// Output columns: names in the stored row.
    pub columns: Vec<String>,
    /// Postgres type names of the output columns.
    pub types: Vec<String>,
    /// Per key column (a prefix of the key), the values it may equal.
    pub key_values: Vec<Vec<Operand>>,
    /// `LIMIT`.
    pub limit: Option<Operand>,
    /// Type name of each parameter, by index.
    pub param_types: Vec<String>,
}

/// What to do for one statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Read a view.
    Select(SelectPlan),
    /// Read `cdc_status`; indexes into [`STATUS_COLUMNS`].
    Status(Vec<usize>),
    /// `SELECT <literals>`: one row of constants (name, value).
    Constants(Vec<(String, Value)>),
    /// `SET name = value` (`None` = `DEFAULT`).
    Set {
        /// Lower-cased setting name.
        name: String,
        /// The value as text.
        value: Option<String>,
    },
    /// `SHOW name`.
    Show(String),
    /// A statement answered with just a command tag.
    Ack(&'static str),
}

impl Plan {
    /// Postgres type names of the parameters.
    pub fn param_types(&self) -> Vec<String> {
        match self {
            Plan::Select(s) => s.param_types.clone(),
            _ => Vec::new(),
        }
    }
}

/// Parses a query string into plans (one per statement).
pub fn plan_all(sql: &str, store: &ViewStore) -> Result<Vec<Plan>, SqlError> {
    let stmts = Parser::parse_sql(&PostgreSqlDialect {}, sql)
        .map_err(|e| SqlError::Syntax(e.to_string()))?;
    stmts.iter().map(|s| plan_statement(s, store)).collect()
}

/// Parses a query string that must hold exactly one statement (extended protocol).
pub fn plan_one(sql: &str, store: &ViewStore) -> Result<Option<Plan>, SqlError> {
    let mut plans = plan_all(sql, store)?;
    match plans.len() {
        0 => Ok(None),
        1 => Ok(plans.pop()),
        _ => Err(SqlError::Syntax(
            "cannot insert multiple commands into a prepared statement".into(),
        )),
    }
}

fn unsupported(what: impl Into<String>) -> SqlError {
    SqlError::Unsupported(what.into())
}

fn last_ident(name: &ObjectName) -> Option<String> {
    match name.0.last()? {
        ObjectNamePart::Identifier(id) => Some(ident_name(id)),
        ObjectNamePart::Function(_) => None,
    }
}

fn ident_name(id: &ast::Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_ascii_lowercase()
    }
}

fn object_name(name: &ObjectName) -> String {
    name.0
        .iter()
        .filter_map(|p| match p {
            ObjectNamePart::Identifier(id) => Some(ident_name(id)),
            ObjectNamePart::Function(_) => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn plan_statement(stmt: &Statement, store: &ViewStore) -> Result<Plan, SqlError> {
    match stmt {
        Statement::Query(q) => plan_query(q, store),
        Statement::Set(ast::Set::SingleAssignment {
            variable, values, ..
        }) => {
            let name = object_name(variable);
            let value = match values.as_slice() {
                [Expr::Identifier(id)] if id.value.eq_ignore_ascii_case("default") => None,
                [e] => Some(setting_text(e)?),
                _ => {
                    return Err(SqlError::InvalidValue {
                        name,
                        message: "expected one value".into(),
                    })
                }
            };
            Ok(Plan::Set { name, value })
        }
        Statement::Set(_) => Ok(Plan::Ack("SET")),
        Statement::ShowVariable { variable } => Ok(Plan::Show(
            variable
                .iter()
                .map(ident_name)
                .collect::<Vec<_>>()
                .join(" "),
        )),
        Statement::StartTransaction { .. } => Ok(Plan::Ack("BEGIN")),
        Statement::Commit { .. } => Ok(Plan::Ack("COMMIT")),
        Statement::Rollback { .. } => Ok(Plan::Ack("ROLLBACK")),
        Statement::Insert(_) => Err(SqlError::ReadOnly("INSERT".into())),
        Statement::Update { .. } => Err(SqlError::ReadOnly("UPDATE".into())),
        Statement::Delete(_) => Err(SqlError::ReadOnly("DELETE".into())),
        Statement::Merge { .. } => Err(SqlError::ReadOnly("MERGE".into())),
        Statement::Truncate { .. } => Err(SqlError::ReadOnly("TRUNCATE".into())),
        Statement::CreateTable(_)
        | Statement::CreateView { .. }
        | Statement::CreateIndex(_)
        | Statement::AlterTable { .. }
        | Statement::Drop { .. }
        | Statement::Copy { .. }
        | Statement::Grant { .. }
        | Statement::Revoke { .. } => Err(SqlError::ReadOnly(
            stmt.to_string()
                .split_whitespace()
                .next()
                .unwrap_or("statement")
                .to_ascii_uppercase(),
        )),
        other => Err(unsupported(format!(
            "statement {:?}",
            other.to_string().chars().take(60).collect::<String>()
        ))),
    }
}

fn setting_text(e: &Expr) -> Result<String, SqlError> {
    match e {
        Expr::Value(v) => match &v.value {
            ast::Value::SingleQuotedString(s) | ast::Value::DoubleQuotedString(s) => Ok(s.clone()),
            ast::Value::Number(n, _) => Ok(n.clone()),
            ast::Value::Boolean(b) => Ok(b.to_string()),
            other => Ok(other.to_string()),
        },
        Expr::Identifier(id) => Ok(id.value.clone()),
        other => Ok(other.to_string()),
    }
}

fn plan_query(q: &ast::Query, store: &ViewStore) -> Result<Plan, SqlError> {
    if q.with.is_some() {
        return Err(unsupported("WITH"));
    }
    if q.order_by.is_some() {
        return Err(unsupported(
            "ORDER BY (rows come ordered by the view key, then the source primary key)",
        ));
    }
    if q.fetch.is_some() || !q.locks.is_empty() {
        return Err(unsupported("FETCH / FOR UPDATE"));
    }
    let mut param_types: Vec<String> = Vec::new();
    let limit = match &q.limit_clause {
        None => None,
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) => {
            if offset.is_some() || !limit_by.is_empty() {
                return Err(unsupported("OFFSET"));
            }
            match limit {
                None => None,
                Some(e) => {
                    let op = operand(e)?;
                    if let Operand::Param(i) = op {
                        set_param_type(&mut param_types, i, "int8");
                    }
                    Some(op)
                }
            }
        }
        Some(LimitClause::OffsetCommaLimit { .. }) => return Err(unsupported("LIMIT a, b")),
    };
    let SetExpr::Select(select) = q.body.as_ref() else {
        return Err(unsupported("UNION / VALUES / nested queries"));
    };
    if select.distinct.is_some()
        || select.having.is_some()
        || !matches!(&select.group_by, ast::GroupByExpr::Expressions(e, _) if e.is_empty())
    {
        return Err(unsupported("DISTINCT / GROUP BY / HAVING"));
    }
    if select.from.is_empty() {
        let mut consts = Vec::new();
        for item in &select.projection {
            let (e, name) = match item {
                SelectItem::UnnamedExpr(e) => (e, "?column?".to_owned()),
                SelectItem::ExprWithAlias { expr, alias } => (expr, ident_name(alias)),
                _ => return Err(unsupported("SELECT * without FROM")),
            };
            match operand(e)? {
                Operand::Value(v) => consts.push((name, v)),
                Operand::Param(_) => return Err(unsupported("parameters without FROM")),
            }
        }
        return Ok(Plan::Constants(consts));
    }
    let [from] = select.from.as_slice() else {
        return Err(unsupported("more than one table (joins)"));
    };
    if !from.joins.is_empty() {
        return Err(unsupported("JOIN"));
    }
    let TableFactor::Table { name, .. } = &from.relation else {
        return Err(unsupported("FROM a subquery or function"));
    };
    let table = last_ident(name).ok_or_else(|| unsupported("FROM a function"))?;
    if table == STATUS_TABLE {
        if select.selection.is_some() || limit.is_some() {
            return Err(unsupported("WHERE/LIMIT on cdc_status"));
        }
        let mut cols = Vec::new();
        for item in &select.projection {
            match item {
                SelectItem::Wildcard(_) => cols.extend(0..STATUS_COLUMNS.len()),
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    let c = column_name(e)?;
                    let i = STATUS_COLUMNS
                        .iter()
                        .position(|(n, _)| *n == c)
                        .ok_or_else(|| SqlError::UnknownColumn {
                            view: STATUS_TABLE.into(),
                            column: c,
                        })?;
                    cols.push(i);
                }
                _ => return Err(unsupported("qualified wildcard")),
            }
        }
        return Ok(Plan::Status(cols));
    }
    let view = store
        .view(&table)
        .ok_or_else(|| SqlError::UnknownView(table.clone()))?;
    let cfg = &view.config;
    let output = view.output_columns();
    let whole_row = cfg.columns.is_none();
    let known = |c: &str| {
        output.iter().any(|o| o == c) || cfg.primary_key.iter().any(|p| p == c) || whole_row
    };
    let mut columns = Vec::new();
    for item in &select.projection {
        match item {
            SelectItem::Wildcard(_) => columns.extend(output.iter().cloned()),
            SelectItem::QualifiedWildcard(..) => columns.extend(output.iter().cloned()),
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                let c = column_name(e)?;
                if !known(&c) {
                    return Err(SqlError::UnknownColumn {
                        view: cfg.name.clone(),
                        column: c,
                    });
                }
                columns.push(c);
            }
        }
    }
    let type_of = |c: &str| -> String {
        if c == WHOLE_ROW_COLUMN && whole_row {
            return "text".into();
        }
        cfg.column_types
            .get(c)
            .map(|t| canonical_type(t).to_owned())
            .unwrap_or_else(|| "text".into())
    };
    let types = columns.iter().map(|c| type_of(c)).collect();
    // WHERE: a conjunction of `key_col = v` / `key_col IN (…)` over a prefix of the key.
    let mut per_column: Vec<Option<Vec<Operand>>> = vec![None; cfg.key.len()];
    if let Some(sel) = &select.selection {
        let mut terms = Vec::new();
        conjuncts(sel, &mut terms);
        for t in terms {
            let (col, ops) = match t {
                Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } => match (column_name(left), column_name(right)) {
                    (Ok(c), _) => (c, vec![operand(right)?]),
                    (_, Ok(c)) => (c, vec![operand(left)?]),
                    _ => return Err(unsupported("comparison without a column")),
                },
                Expr::InList {
                    expr,
                    list,
                    negated: false,
                } => (
                    column_name(expr)?,
                    list.iter().map(operand).collect::<Result<Vec<_>, _>>()?,
                ),
                other => {
                    return Err(unsupported(format!(
                        "WHERE {other} (only equality and IN on key columns joined by AND)"
                    )))
                }
            };
            let Some(i) = cfg.key.iter().position(|k| *k == col) else {
                if known(&col) {
                    return Err(unsupported(format!(
                        "filtering on {col:?}: only the key columns ({}) can be filtered",
                        cfg.key.join(", ")
                    )));
                }
                return Err(SqlError::UnknownColumn {
                    view: cfg.name.clone(),
                    column: col,
                });
            };
            if per_column[i].is_some() {
                return Err(unsupported(format!("{col:?} constrained twice")));
            }
            for o in &ops {
                if let Operand::Param(p) = o {
                    set_param_type(&mut param_types, *p, &type_of(&col));
                }
            }
            per_column[i] = Some(ops);
        }
    }
    let mut key_values = Vec::new();
    let mut gap: Option<String> = None;
    for (i, c) in per_column.into_iter().enumerate() {
        match (c, &gap) {
            (Some(ops), None) => key_values.push(ops),
            (Some(_), Some(missing)) => {
                return Err(unsupported(format!(
                    "filtering on {:?} without {:?}: constrain key columns from the first one",
                    cfg.key[i], missing
                )))
            }
            (None, _) => gap = gap.or_else(|| Some(cfg.key[i].clone())),
        }
    }
    for t in param_types.iter_mut() {
        if t.is_empty() {
            *t = "text".into();
        }
    }
    Ok(Plan::Select(SelectPlan {
        view: cfg.name.clone(),
        columns,
        types,
        key_values,
        limit,
        param_types,
    }))
}

fn set_param_type(types: &mut Vec<String>, i: usize, ty: &str) {
    if types.len() <= i {
        types.resize(i + 1, String::new());
    }
    types[i] = ty.to_owned();
}

/// The canonical Postgres name of a configured column type.
pub fn canonical_type(t: &str) -> &'static str {
    match t.to_ascii_lowercase().as_str() {
        "int8" | "bigint" => "int8",
        "int4" | "integer" | "int" => "int4",
        "int2" | "smallint" => "int2",
        "float8" | "double precision" => "float8",
        "bool" | "boolean" => "bool",
        _ => "text",
    }
}

fn conjuncts<'e>(e: &'e Expr, out: &mut Vec<&'e Expr>) {
    match e {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            conjuncts(left, out);
            conjuncts(right, out);
        }
        Expr::Nested(inner) => conjuncts(inner, out),
        other => out.push(other),
    }
}

fn column_name(e: &Expr) -> Result<String, SqlError> {
    match e {
        Expr::Identifier(id) => Ok(ident_name(id)),
        Expr::CompoundIdentifier(ids) => ids
            .last()
            .map(ident_name)
            .ok_or_else(|| unsupported("empty identifier")),
        Expr::Nested(inner) => column_name(inner),
        other => Err(unsupported(format!(
            "expression {other} (only plain column names)"
        ))),
    }
}

fn operand(e: &Expr) -> Result<Operand, SqlError> {
    match e {
        Expr::Value(v) => match &v.value {
            ast::Value::Number(n, _) => Ok(Operand::Value(number(n)?)),
            ast::Value::SingleQuotedString(s) | ast::Value::EscapedStringLiteral(s) => {
                Ok(Operand::Value(Value::String(s.clone())))
            }
            ast::Value::Boolean(b) => Ok(Operand::Value(Value::Bool(*b))),
            ast::Value::Null => Ok(Operand::Value(Value::Null)),
            ast::Value::Placeholder(p) => p
                .strip_prefix('$')
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| *n >= 1)
                .map(|n| Operand::Param(n - 1))
                .ok_or_else(|| unsupported(format!("placeholder {p}"))),
            other => Err(unsupported(format!("literal {other}"))),
        },
        Expr::Cast { expr, .. } => operand(expr),
        Expr::Nested(inner) => operand(inner),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match operand(expr)? {
            Operand::Value(Value::Number(n)) => match n.as_i64() {
                Some(i) => Ok(Operand::Value(Value::from(-i))),
                None => Ok(Operand::Value(
                    n.as_f64().map(|f| Value::from(-f)).unwrap_or(Value::Null),
                )),
            },
            _ => Err(unsupported("minus on a non-number")),
        },
        other => Err(unsupported(format!(
            "expression {other} (only literals and $n parameters)"
        ))),
    }
}

fn number(n: &str) -> Result<Value, SqlError> {
    if let Ok(i) = n.parse::<i64>() {
        return Ok(Value::from(i));
    }
    n.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .ok_or_else(|| SqlError::Syntax(format!("bad number {n}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ViewConfig;
    use serde_json::json;

    fn store() -> (tempfile::TempDir, ViewStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = ViewConfig {
            name: "top_clients".into(),
            source: "public.top_clients".into(),
            key: vec!["seller_id".into(), "client_id".into()],
            primary_key: vec!["seller_id".into(), "client_id".into()],
            columns: Some(vec!["name".into(), "position".into()]),
            column_types: [("seller_id".to_owned(), "bigint".to_owned())].into(),
        };
        let s = ViewStore::open_at(dir.path(), &[v]).expect("open");
        (dir, s)
    }

    fn one(sql: &str, s: &ViewStore) -> Result<Plan, SqlError> {
        plan_one(sql, s).map(|p| p.expect("a statement"))
    }

    #[test]
    fn selects_by_key_prefix_and_in_lists() {
        let (_d, s) = store();
        let Plan::Select(p) = one(
            "SELECT * FROM top_clients WHERE seller_id = $1 LIMIT 10",
            &s,
        )
        .expect("plan") else {
            panic!("not a select")
        };
        assert_eq!(
            p.columns,
            vec!["seller_id", "client_id", "name", "position"]
        );
        assert_eq!(p.key_values, vec![vec![Operand::Param(0)]]);
        assert_eq!(p.param_types, vec!["int8"]);
        assert_eq!(p.types[0], "int8");
        assert_eq!(p.limit, Some(Operand::Value(json!(10))));
        let Plan::Select(p) = one(
            "select name from public.TOP_CLIENTS where (seller_id in (1, 2)) and client_id = '3'",
            &s,
        )
        .expect("plan") else {
            panic!("not a select")
        };
        assert_eq!(p.key_values.len(), 2);
        assert_eq!(p.key_values[0].len(), 2);
    }

    #[test]
    fn errors_carry_sqlstates() {
        let (_d, s) = store();
        let code = |sql: &str| one(sql, &s).expect_err(sql).sqlstate();
        assert_eq!(code("SELECT * FROM nope"), "42P01");
        assert_eq!(code("SELECT nope FROM top_clients"), "42703");
        assert_eq!(code("INSERT INTO top_clients VALUES (1)"), "25006");
        assert_eq!(code("DELETE FROM top_clients"), "25006");
        assert_eq!(code("SELECT * FROM top_clients WHERE name = 'x'"), "0A000");
        assert_eq!(
            code("SELECT * FROM top_clients WHERE client_id = 1"),
            "0A000"
        );
        assert_eq!(code("SELEC 1"), "42601");
    }

    #[test]
    fn settings_status_and_constants() {
        let (_d, s) = store();
        assert_eq!(
            one("SET cdc.min_lsn = '0/16B37A0'", &s).expect("set"),
            Plan::Set {
                name: "cdc.min_lsn".into(),
                value: Some("0/16B37A0".into())
            }
        );
        assert!(
            matches!(one("SELECT * FROM cdc_status", &s), Ok(Plan::Status(c)) if c.len() == STATUS_COLUMNS.len())
        );
        assert!(matches!(one("SELECT 1", &s), Ok(Plan::Constants(c)) if c[0].1 == json!(1)));
        assert_eq!(
            plan_all("BEGIN; SELECT 1; COMMIT", &s)
                .expect("plans")
                .len(),
            3
        );
    }
}
