//! Pre-flight checks and set-up on the source database: wal_level, privileges, replica
//! identity of every published table, the publication and the slot. Each refusal says what to
//! run to fix it.

use tokio_postgres::Client;

use crate::subject::{quote_table, split_table_name};

/// A check failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `wal_level` is not `logical`.
    #[error("wal_level is '{0}'; set wal_level = logical in postgresql.conf and restart Postgres")]
    WalLevel(String),
    /// The role may not replicate.
    #[error(
        "role {0:?} lacks the REPLICATION attribute; run ALTER ROLE {0} REPLICATION as a superuser"
    )]
    NoReplication(String),
    /// A configured table does not exist.
    #[error(
        "table {0} does not exist (or the role can't see it); create it or fix postgres.tables"
    )]
    NoTable(String),
    /// A table's changes can't be captured with its replica identity.
    #[error("table {table} {problem}; {fix}")]
    ReplicaIdentity {
        /// schema.table.
        table: String,
        /// What is wrong.
        problem: String,
        /// What to run.
        fix: String,
    },
    /// The publication is missing and could not be created.
    #[error("publication {name:?} is missing and could not be created ({cause}); as an owner of the tables run: {sql}")]
    Publication {
        /// Its name.
        name: String,
        /// The server's error.
        cause: String,
        /// The statement to run.
        sql: String,
    },
    /// The slot is in use by another process.
    #[error("replication slot {slot:?} is active for PID {pid}: another reader is running; stop it first (or SELECT pg_terminate_backend({pid}))")]
    SlotActive {
        /// Slot name.
        slot: String,
        /// The walsender holding it.
        pid: i32,
    },
    /// The slot exists but is not a pgoutput slot of this database.
    #[error("replication slot {slot:?} exists but {problem}; drop it (SELECT pg_drop_replication_slot('{slot}')) or choose another postgres.slot")]
    SlotMismatch {
        /// Slot name.
        slot: String,
        /// What is wrong.
        problem: String,
    },
    /// Postgres removed WAL the slot still needed (`max_slot_wal_keep_size`): changes are
    /// lost and the slot can't stream again.
    #[error("replication slot {slot:?} is invalidated: Postgres removed WAL it still needed (max_slot_wal_keep_size), so changes made while the reader was behind are lost; drop the slot (SELECT pg_drop_replication_slot('{slot}')), start the reader again (it creates a new slot) and re-snapshot every published table with `cdc snapshot --table schema.table`")]
    SlotLost {
        /// Slot name.
        slot: String,
    },
    /// A catalog query failed.
    #[error("checking the source database: {0}")]
    Sql(#[from] tokio_postgres::Error),
}

/// What the checks found about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotState {
    /// It must be created.
    Missing,
    /// It exists and is free.
    Ready,
}

/// Runs every check and creates or extends the publication. Does not create the slot (that
/// needs the replication session).
pub async fn prepare(
    sql: &Client,
    tables: &[String],
    publication: &str,
    slot: &str,
) -> Result<SlotState, SetupError> {
    let wal_level: String = sql.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(SetupError::WalLevel(wal_level));
    }
    let row = sql
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await?;
    let (user, can_replicate): (String, bool) = (row.get(0), row.get(1));
    if !can_replicate {
        return Err(SetupError::NoReplication(user));
    }
    let mut quoted = Vec::new();
    for t in tables {
        let (schema, table) = split_table_name(t).ok_or_else(|| SetupError::NoTable(t.clone()))?;
        let shown = quote_table(&schema, &table);
        let row = sql
            .query_opt(
                "SELECT c.relreplident::text,
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&schema, &table],
            )
            .await?
            .ok_or_else(|| SetupError::NoTable(shown.clone()))?;
        let (ident, has_pk, has_ident_index): (String, bool, bool) =
            (row.get(0), row.get(1), row.get(2));
        match ident.as_str() {
            "n" => {
                return Err(SetupError::ReplicaIdentity {
                    table: shown.clone(),
                    problem: "has REPLICA IDENTITY NOTHING, so its updates and deletes can't be captured".into(),
                    fix: format!("run ALTER TABLE {shown} REPLICA IDENTITY DEFAULT (with a primary key) or ALTER TABLE {shown} REPLICA IDENTITY FULL"),
                })
            }
            "d" if !has_pk => {
                return Err(SetupError::ReplicaIdentity {
                    table: shown.clone(),
                    problem: "has no primary key, so its updates and deletes can't be captured".into(),
                    fix: format!("add one (ALTER TABLE {shown} ADD PRIMARY KEY (…)) or run ALTER TABLE {shown} REPLICA IDENTITY FULL"),
                })
            }
            "i" if !has_ident_index => {
                return Err(SetupError::ReplicaIdentity {
                    table: shown.clone(),
                    problem: "uses REPLICA IDENTITY USING INDEX but the index is gone".into(),
                    fix: format!("run ALTER TABLE {shown} REPLICA IDENTITY DEFAULT or FULL"),
                })
            }
            _ => {}
        }
        quoted.push(shown);
    }
    ensure_publication(sql, publication, tables, &quoted).await?;
    let slot_row = sql
        .query_opt(
            "SELECT active_pid, plugin::text, database::text, wal_status::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(row) = slot_row else {
        return Ok(SlotState::Missing);
    };
    let (pid, plugin, db, wal_status): (
        Option<i32>,
        Option<String>,
        Option<String>,
        Option<String>,
    ) = (row.get(0), row.get(1), row.get(2), row.get(3));
    let current_db: String = sql
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    if plugin.as_deref() != Some("pgoutput") {
        return Err(SetupError::SlotMismatch {
            slot: slot.into(),
            problem: format!("uses plugin {:?}, not pgoutput", plugin.unwrap_or_default()),
        });
    }
    if db.as_deref() != Some(current_db.as_str()) {
        return Err(SetupError::SlotMismatch {
            slot: slot.into(),
            problem: format!("belongs to database {:?}", db.unwrap_or_default()),
        });
    }
    if wal_status.as_deref() == Some("lost") {
        return Err(SetupError::SlotLost { slot: slot.into() });
    }
    if let Some(pid) = pid {
        return Err(SetupError::SlotActive {
            slot: slot.into(),
            pid,
        });
    }
    Ok(SlotState::Ready)
}

async fn ensure_publication(
    sql: &Client,
    name: &str,
    tables: &[String],
    quoted: &[String],
) -> Result<(), SetupError> {
    let exists = sql
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?;
    let pub_ident = crate::subject::quote_ident(name);
    match exists {
        None => {
            let stmt = format!(
                "CREATE PUBLICATION {pub_ident} FOR TABLE {} WITH (publish_via_partition_root = true)",
                quoted.join(", ")
            );
            if let Err(e) = sql.batch_execute(&stmt).await {
                return Err(SetupError::Publication {
                    name: name.into(),
                    cause: e
                        .as_db_error()
                        .map_or_else(|| e.to_string(), |d| d.message().to_string()),
                    sql: stmt,
                });
            }
            tracing::info!(publication = name, "created publication");
        }
        Some(row) => {
            let all: bool = row.get(0);
            if all {
                return Ok(());
            }
            let present: Vec<(String, String)> = sql
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[&name],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let missing: Vec<&String> = tables
                .iter()
                .zip(quoted)
                .filter(|(t, _)| split_table_name(t).is_some_and(|st| !present.contains(&st)))
                .map(|(_, q)| q)
                .collect();
            if !missing.is_empty() {
                let stmt = format!(
                    "ALTER PUBLICATION {pub_ident} ADD TABLE {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if let Err(e) = sql.batch_execute(&stmt).await {
                    return Err(SetupError::Publication {
                        name: name.into(),
                        cause: e
                            .as_db_error()
                            .map_or_else(|| e.to_string(), |d| d.message().to_string()),
                        sql: stmt,
                    });
                }
                tracing::info!(publication = name, added = ?missing, "added tables to publication");
            }
        }
    }
    Ok(())
}
