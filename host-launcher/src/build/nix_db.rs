//! Path infos straight from the local Nix store's SQLite database, read-only: the input closure
//! of `vouch build` without a `nix path-info` process per step (a process costs tens of
//! milliseconds; the query below costs well under one).
//!
//! The database is Nix's `$NIX_STATE_DIR/db/db.sqlite` (default `/nix/var/nix/db/db.sqlite`),
//! schema 10 (`ValidPaths(id, path, hash, narSize, ca, …)`, `Refs(referrer, reference)`), which
//! Nix has kept since 2.0. It is opened read-only (Nix runs it in WAL mode: reading never blocks
//! a writing Nix, and a reader sees a consistent snapshot per transaction); the whole closure is
//! read in one transaction. A row of `ValidPaths` is a valid path, as `nix path-info` says.
//!
//! [`NixDb::open`] returns `None` whenever this is not the plain local store it describes: a
//! remote store (`NIX_REMOTE` other than empty, `daemon`, `local` or `auto`), another store
//! directory (`NIX_STORE_DIR`), a database that does not exist or cannot be opened (a user
//! without access), or another schema version. The caller then runs `nix path-info`
//! (`super::nix_store`), which is always right.
//!
//! What is not here: writing anything (Nix registers paths; vouch never touches its database).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use build_trace::job::PathInfo;
use nix_formats::StorePath;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::nix_store::parse_nar_hash;
use super::InputSourceError;

/// The schema version this reader knows (`$NIX_STATE_DIR/db/schema`).
const SCHEMA: &str = "10";

/// Errors reading the database (after it opened: these are real errors, not reasons to fall
/// back).
#[derive(Debug, thiserror::Error)]
pub enum NixDbError {
    /// SQLite.
    #[error("reading the Nix database {0}")]
    Sqlite(String, #[source] rusqlite::Error),
    /// A path that is not valid.
    #[error("{0} is not valid in the local Nix store")]
    NotValid(StorePath),
    /// A row that does not parse.
    #[error("the Nix database's row for {0}: {1}")]
    Row(String, String),
}

/// A read-only connection to the local Nix store's database.
#[derive(Debug)]
pub struct NixDb {
    file: PathBuf,
    conn: Connection,
}

impl NixDb {
    /// The local store's database, if this process may read it and it is the store `nix`
    /// would use (see the module docs); `None` otherwise.
    pub fn open() -> Option<NixDb> {
        let remote = std::env::var("NIX_REMOTE").unwrap_or_default();
        if !["", "daemon", "local", "auto"].contains(&remote.as_str()) {
            return None;
        }
        if std::env::var_os("NIX_STORE_DIR").is_some_and(|d| d != nix_formats::STORE_DIR) {
            return None;
        }
        let state =
            std::env::var_os("NIX_STATE_DIR").map_or(PathBuf::from("/nix/var/nix"), PathBuf::from);
        let schema = std::fs::read_to_string(state.join("db/schema")).ok()?;
        if schema.trim() != SCHEMA {
            return None;
        }
        NixDb::open_file(state.join("db/db.sqlite"))
    }

    /// Open `file` read-only, if it can be read.
    pub fn open_file(file: PathBuf) -> Option<NixDb> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&file, flags).ok()?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).ok()?;
        // Opening is lazy: make SQLite read the header (and the WAL index) now, so a database
        // this process cannot read falls back here rather than failing the query.
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())).ok()?;
        Some(NixDb { file, conn })
    }

    /// The path infos of `roots` (every one must be valid) and, with `recursive`, of their
    /// closure, read in one transaction.
    pub fn query(
        &mut self,
        roots: &BTreeSet<StorePath>,
        recursive: bool,
    ) -> Result<BTreeMap<StorePath, PathInfo>, NixDbError> {
        let file = self.file.display().to_string();
        let err = |e| NixDbError::Sqlite(file.clone(), e);
        let tx = self.conn.transaction().map_err(err)?;
        let mut info = tx
            .prepare_cached("SELECT id, hash, narSize, ca FROM ValidPaths WHERE path = ?1")
            .map_err(err)?;
        let mut refs = tx
            .prepare_cached(
                "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference \
                 WHERE r.referrer = ?1",
            )
            .map_err(err)?;
        let mut out = BTreeMap::new();
        let mut todo: Vec<StorePath> = roots.iter().cloned().collect();
        while let Some(path) = todo.pop() {
            if out.contains_key(&path) {
                continue;
            }
            let row = info
                .query_row([path.to_string()], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                })
                .optional()
                .map_err(err)?;
            let Some((id, hash, size, ca)) = row else {
                return Err(NixDbError::NotValid(path));
            };
            let bad = |m: String| NixDbError::Row(path.to_string(), m);
            let nar_hash = parse_nar_hash(&path, &hash).map_err(|e| bad(e.0))?;
            let nar_size =
                size.and_then(|s| u64::try_from(s).ok()).ok_or_else(|| bad("no narSize".into()))?;
            let mut references = BTreeSet::new();
            let rows = refs.query_map([id], |r| r.get::<_, String>(0)).map_err(err)?;
            for r in rows {
                let r = r.map_err(err)?;
                let p = StorePath::parse(&r).map_err(|e| bad(format!("reference {r:?}: {e}")))?;
                if recursive && !out.contains_key(&p) {
                    todo.push(p.clone());
                }
                references.insert(p);
            }
            let ca = ca.filter(|c| !c.is_empty());
            out.insert(path, PathInfo { nar_hash, nar_size, references, ca });
        }
        Ok(out)
    }
}

impl From<NixDbError> for InputSourceError {
    fn from(e: NixDbError) -> Self {
        let msg = match &e {
            NixDbError::NotValid(p) => format!("{p} is not valid in the local Nix store"),
            _ => "reading the local Nix store's database".into(),
        };
        InputSourceError(msg, Some(Box::new(e)))
    }
}

#[cfg(test)]
mod tests;
