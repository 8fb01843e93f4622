//! The content store's SQLite index: schema and queries.
//!
//! ```sql
//! paths(id, path UNIQUE, nar_file, nar_hash BLOB(32), nar_size, deriver, ca, sigs JSON,
//!       self_ref, registered, last_used, origin)       -- a row = a valid path
//! refs(referrer → paths ON DELETE CASCADE, reference → paths ON DELETE RESTRICT)
//! owners(id, boot_id, pid, start_ticks, since)          -- processes holding pins
//! pins(owner → owners ON DELETE CASCADE, path)          -- paths eviction must keep
//! ```
//!
//! Invariants: a row exists only for a path whose NAR file is complete, fsynced and verified;
//! every reference of a valid path is valid (the `RESTRICT` makes SQLite enforce it, so eviction
//! can only remove paths nothing refers to). Self-references are the `self_ref` flag, not rows.
//! The database runs in WAL mode with `synchronous=FULL` and a busy timeout, so several builder
//! processes share it safely; writers use `BEGIN IMMEDIATE` transactions.
//!
//! What is not here: file handling and verification (`super`, `super::ingest`).

use std::collections::BTreeSet;
use std::time::Duration;

use nix_formats::StorePath;
use rusqlite::{params, Connection, OptionalExtension};

use super::owner::ProcessId;
use crate::core::ValidPathInfo;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS paths (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    nar_file TEXT NOT NULL,
    nar_hash BLOB NOT NULL,
    nar_size INTEGER NOT NULL,
    deriver TEXT,
    ca TEXT,
    sigs TEXT NOT NULL,
    self_ref INTEGER NOT NULL,
    registered INTEGER NOT NULL,
    last_used INTEGER NOT NULL,
    origin TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refs (
    referrer INTEGER NOT NULL REFERENCES paths(id) ON DELETE CASCADE,
    reference INTEGER NOT NULL REFERENCES paths(id) ON DELETE RESTRICT,
    PRIMARY KEY (referrer, reference)
);
CREATE INDEX IF NOT EXISTS refs_by_reference ON refs(reference);
CREATE TABLE IF NOT EXISTS owners (
    id INTEGER PRIMARY KEY,
    boot_id TEXT NOT NULL,
    pid INTEGER NOT NULL,
    start_ticks INTEGER NOT NULL,
    since INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pins (
    owner INTEGER NOT NULL REFERENCES owners(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    PRIMARY KEY (owner, path)
);
CREATE INDEX IF NOT EXISTS pins_by_path ON pins(path);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '1');
";

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How long an open or a statement waits for other processes' locks.
const BUSY_WAIT: Duration = Duration::from_secs(120);

/// Open (and create) the index with the settings the module docs describe.
pub fn open(path: &std::path::Path) -> rusqlite::Result<Connection> {
    open_with(path, SCHEMA)
}

/// Open (and create) a database the way the module docs describe — WAL, `synchronous=FULL`,
/// foreign keys, a busy timeout — and create `schema` in one `BEGIN IMMEDIATE` transaction.
///
/// Several processes may open the same file at once (Nix starts one builder per derivation).
/// Switching a new file to WAL takes an exclusive lock, and SQLite answers `SQLITE_BUSY` at
/// once, without waiting, where waiting could deadlock (a reader upgrading its lock). So the
/// whole sequence is retried on a fresh connection until it succeeds or two minutes pass.
pub fn open_with(path: &std::path::Path, schema: &str) -> rusqlite::Result<Connection> {
    let start = std::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        let opened = (|| {
            let conn = Connection::open(path)?;
            conn.busy_timeout(BUSY_WAIT)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.execute_batch(&format!("BEGIN IMMEDIATE; {schema} COMMIT;"))?;
            Ok(conn)
        })();
        match opened {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) && start.elapsed() < BUSY_WAIT =>
            {
                attempt += 1;
                // 1, 2, 4 … 64 ms, offset by the process id so contenders spread out.
                let ms = (1u64 << attempt.min(6)) + u64::from(std::process::id() % 7);
                std::thread::sleep(Duration::from_millis(ms));
            }
            other => return other,
        }
    }
}

/// A valid path's row.
#[derive(Debug, Clone)]
pub struct Row {
    /// Row id.
    pub id: i64,
    /// Path info (references include the path itself when self-referencing).
    pub info: ValidPathInfo,
    /// NAR file name (in the store's `nar/` directory).
    pub nar_file: String,
    /// `upload` or `build`.
    pub origin: String,
}

fn parse_path(s: &str) -> rusqlite::Result<StorePath> {
    StorePath::parse(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// The row of `path`, with its references.
pub fn get(conn: &Connection, path: &StorePath) -> rusqlite::Result<Option<Row>> {
    let row = conn
        .query_row(
            "SELECT id, nar_file, nar_hash, nar_size, deriver, ca, sigs, self_ref, registered, origin
             FROM paths WHERE path = ?1",
            params![path.to_string()],
            |r| {
                let hash: Vec<u8> = r.get(2)?;
                let sigs: String = r.get(6)?;
                let deriver: Option<String> = r.get(4)?;
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    hash,
                    r.get::<_, i64>(3)?,
                    deriver,
                    r.get::<_, Option<String>>(5)?,
                    sigs,
                    r.get::<_, bool>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, String>(9)?,
                ))
            },
        )
        .optional()?;
    let Some((id, nar_file, hash, size, deriver, ca, sigs, self_ref, registered, origin)) = row
    else {
        return Ok(None);
    };
    let mut references = BTreeSet::new();
    let mut stmt = conn.prepare_cached(
        "SELECT p.path FROM refs r JOIN paths p ON p.id = r.reference WHERE r.referrer = ?1",
    )?;
    for p in stmt.query_map(params![id], |r| r.get::<_, String>(0))? {
        references.insert(parse_path(&p?)?);
    }
    if self_ref {
        references.insert(path.clone());
    }
    let nar_hash = hash.try_into().map(build_trace::NarHash).map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            2,
            rusqlite::types::Type::Blob,
            "nar_hash is not 32 bytes".into(),
        )
    })?;
    let info = ValidPathInfo {
        path: path.clone(),
        info: build_trace::PathInfo { nar_hash, nar_size: size as u64, references, ca },
        deriver: deriver.as_deref().map(parse_path).transpose()?,
        registration_time: registered as u64,
        ultimate: origin == "build",
        sigs: serde_json::from_str(&sigs).unwrap_or_default(),
    };
    Ok(Some(Row { id, info, nar_file, origin }))
}

/// The row id of `path`, if valid.
pub fn id_of(conn: &Connection, path: &StorePath) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT id FROM paths WHERE path = ?1", params![path.to_string()], |r| r.get(0))
        .optional()
}

/// Insert a valid path (its references, other than itself, must already have rows).
pub fn insert(
    conn: &Connection,
    info: &ValidPathInfo,
    nar_file: &str,
    origin: &str,
) -> rusqlite::Result<i64> {
    let t = now();
    conn.execute(
        "INSERT INTO paths (path, nar_file, nar_hash, nar_size, deriver, ca, sigs, self_ref,
                            registered, last_used, origin)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)",
        params![
            info.path.to_string(),
            nar_file,
            &info.info.nar_hash.0[..],
            info.info.nar_size as i64,
            info.deriver.as_ref().map(|d| d.to_string()),
            info.info.ca,
            serde_json::to_string(&info.sigs).unwrap_or_else(|_| "[]".into()),
            info.info.references.contains(&info.path),
            t,
            origin,
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Insert the reference rows of `referrer` (self-references excluded; they are a flag).
pub fn insert_refs(conn: &Connection, referrer: i64, info: &ValidPathInfo) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO refs (referrer, reference) SELECT ?1, id FROM paths WHERE path = ?2",
    )?;
    for r in info.info.references.iter().filter(|r| **r != info.path) {
        if stmt.execute(params![referrer, r.to_string()])? != 1 {
            return Err(rusqlite::Error::QueryReturnedNoRows);
        }
    }
    Ok(())
}

/// Mark paths as used now (for LRU eviction).
pub fn touch(conn: &Connection, paths: &[i64]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached("UPDATE paths SET last_used = ?1 WHERE id = ?2")?;
    let t = now();
    for id in paths {
        stmt.execute(params![t, id])?;
    }
    Ok(())
}

/// Register this process as a pin owner.
pub fn add_owner(conn: &Connection, me: &ProcessId) -> rusqlite::Result<i64> {
    conn.execute(
        "INSERT INTO owners (boot_id, pid, start_ticks, since) VALUES (?1, ?2, ?3, ?4)",
        params![me.boot_id, me.pid, me.start_ticks as i64, now()],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Remove owners whose process is gone (their pins go with them). Returns how many.
pub fn drop_dead_owners(conn: &Connection) -> rusqlite::Result<usize> {
    let mut dead = Vec::new();
    {
        let mut stmt = conn.prepare("SELECT id, boot_id, pid, start_ticks FROM owners")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                ProcessId {
                    boot_id: r.get(1)?,
                    pid: r.get(2)?,
                    start_ticks: r.get::<_, i64>(3)? as u64,
                },
            ))
        })?;
        for row in rows {
            let (id, p) = row?;
            if !p.is_alive() {
                dead.push(id);
            }
        }
    }
    for id in &dead {
        conn.execute("DELETE FROM owners WHERE id = ?1", params![id])?;
    }
    Ok(dead.len())
}

/// Pin `path` for `owner`.
pub fn pin(conn: &Connection, owner: i64, path: &StorePath) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO pins (owner, path) VALUES (?1, ?2)")?
        .execute(params![owner, path.to_string()])?;
    Ok(())
}

/// Total NAR bytes of valid paths.
pub fn total_size(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("SELECT COALESCE(SUM(nar_size), 0) FROM paths", [], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

/// The least recently used path that is neither pinned nor referenced by another valid path.
pub fn eviction_candidate(
    conn: &Connection,
) -> rusqlite::Result<Option<(i64, String, u64, String)>> {
    conn.query_row(
        "SELECT id, path, nar_size, nar_file FROM paths p
         WHERE NOT EXISTS (SELECT 1 FROM pins WHERE pins.path = p.path)
           AND NOT EXISTS (SELECT 1 FROM refs WHERE refs.reference = p.id)
         ORDER BY last_used, id LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get(3)?)),
    )
    .optional()
}

/// Remove a valid path's row (its reference rows go with it).
pub fn delete(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM paths WHERE id = ?1", params![id])?;
    Ok(())
}

/// Every NAR file name in use.
pub fn nar_files(conn: &Connection) -> rusqlite::Result<BTreeSet<String>> {
    let mut stmt = conn.prepare("SELECT nar_file FROM paths")?;
    let files = stmt.query_map([], |r| r.get::<_, String>(0))?.collect();
    files
}

/// Bytes held by pinned valid paths.
pub fn pinned_size(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COALESCE(SUM(nar_size), 0) FROM paths p
         WHERE EXISTS (SELECT 1 FROM pins WHERE pins.path = p.path)",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}
