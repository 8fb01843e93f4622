//! The host content store: store paths a client uploaded or a VM built, kept between builder
//! processes (Nix starts one per derivation).
//!
//! Layout under `<state dir>/store/`: `index.sqlite` (see [`db`]), `nar/<hash part>-<tag>.nar`
//! (one uncompressed NAR per valid path), `tmp/` (uploads being received, named after their
//! process so a dead process's leftovers are recognisable).
//!
//! Guarantees:
//! - **Checked before valid**: every NAR is received into `tmp/`, parsed, hashed, its content
//!   address (if claimed) recomputed ([`ingest`]), fsynced; its references must be valid or in the
//!   same batch. Only then, in one `BEGIN IMMEDIATE` transaction per batch, are the files renamed
//!   into `nar/` and the rows inserted. A half-received or rejected NAR is never visible; a crash
//!   between rename and commit leaves an orphan file that the next [`ContentStore::open`] removes.
//! - **Concurrency**: any number of processes share the store (SQLite WAL, busy timeout, writers
//!   serialised by immediate transactions; NAR file names are unique per writer, so a reader's
//!   open file is never replaced under it).
//! - **Size bound** ([`StoreConfig::max_bytes`]): before a batch commits, least recently used
//!   paths are evicted until it fits — never a path that a live process has **pinned** (a
//!   session pins what it uploaded, what it answered as valid, a build's input closure and
//!   outputs), nor one that a remaining path refers to. Pins die with their process ([`owner`]).
//!   If pinned paths leave no room, the batch is refused with an error saying so.
//! - **Sessions** ([`session`]): a client session reads and writes the store through a
//!   [`SessionStore`]: the shared store holds only paths vouch can certify (content-addressed,
//!   signed by a key the operator trusts, or built by vouch); a trusted client's other paths go
//!   to its private [`overlay`], under `sessions/`, removed when the session ends ([`view`]
//!   reads both as one store).
//!
//! What is not here: the records it keeps (`crate::core::path_info`), protocols
//! (`crate::nixproto`, `crate::serve`), builds (`crate::core::engine`).

pub mod db;
mod error;
pub mod files;
pub mod ingest;
pub mod overlay;
pub mod owner;
pub mod session;
pub mod view;

#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use nix_formats::ca::SelfRefRule;
use nix_formats::StorePath;
use rusqlite::{Connection, TransactionBehavior};

use crate::core::{UploadSource, ValidPathInfo};
use error::dbe;
pub use error::{StoreError, UploadProblem};
pub use files::{drv_contents, FileUploads, MAX_DRV_BYTES};
use ingest::Staged;
pub use overlay::Overlay;
use owner::ProcessId;
pub use session::{ClientTrust, SessionStore};
pub use view::StoreView;

/// The self-reference rules an uploaded path's content address may be checked under, the one of
/// current Nix releases first: an upload may come from any Nix release, and each rule is Nix's
/// own for some releases.
pub const UPLOAD_RULES: &[SelfRefRule] = &[SelfRefRule::ZeroOnly, SelfRefRule::ZeroAndPositions];

/// Default size bound: 20 GiB of NARs.
pub const DEFAULT_MAX_BYTES: u64 = 20 << 30;

/// Content store settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    /// Most NAR bytes kept (eviction beyond).
    pub max_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { max_bytes: DEFAULT_MAX_BYTES }
    }
}

/// Where a valid path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A client uploaded it.
    Upload,
    /// A VM built it (after the launcher checked the statement and evidence).
    Build,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Upload => "upload",
            Origin::Build => "build",
        }
    }
}

/// What eviction removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evicted {
    /// The paths.
    pub paths: Vec<String>,
    /// Their NAR bytes.
    pub bytes: u64,
}

/// What [`ContentStore::open`] removed of dead processes (see [`ContentStore::cleaned`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Pin owners (processes) that are gone, with their pins.
    pub dead_owners: usize,
    /// Half-received uploads in `tmp/` of processes that are gone.
    pub tmp_files: usize,
    /// Session overlays in `sessions/` of processes that are gone.
    pub session_overlays: usize,
    /// NAR files in `nar/` that no row names (a writer died between rename and commit).
    pub orphaned_nars: usize,
}

/// An open content store (one per process; it is `Sync`).
#[derive(Debug)]
pub struct ContentStore {
    dir: PathBuf,
    db: Mutex<Connection>,
    me: ProcessId,
    owner: i64,
    cfg: StoreConfig,
    counter: AtomicU64,
    cleaned: Cleanup,
}

impl ContentStore {
    /// Open (creating if needed) the store in `dir`, register this process as a pin owner, and
    /// clean up after dead processes (their pins, temporary files and orphaned NAR files).
    pub fn open(dir: &Path, cfg: StoreConfig) -> Result<ContentStore, StoreError> {
        for sub in ["nar", "tmp"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(|source| StoreError::Io {
                op: "create",
                path: d,
                source,
            })?;
        }
        let conn = db::open(&dir.join("index.sqlite")).map_err(dbe("open"))?;
        let me = ProcessId::current();
        let owner = db::add_owner(&conn, &me).map_err(dbe("register owner"))?;
        let mut store = ContentStore {
            dir: dir.to_path_buf(),
            db: Mutex::new(conn),
            me,
            owner,
            cfg,
            counter: AtomicU64::new(0),
            cleaned: Cleanup::default(),
        };
        store.cleaned = store.clean_up()?;
        Ok(store)
    }

    /// What opening removed of dead processes.
    pub fn cleaned(&self) -> Cleanup {
        self.cleaned
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The settings.
    pub fn config(&self) -> StoreConfig {
        self.cfg
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn nar_path(&self, file: &str) -> PathBuf {
        self.dir.join("nar").join(file)
    }

    /// Remove dead owners, their temporary files, and NAR files no row names.
    fn clean_up(&self) -> Result<Cleanup, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(dbe("clean up"))?;
        let mut cleaned = Cleanup {
            dead_owners: db::drop_dead_owners(&tx).map_err(dbe("drop dead owners"))?,
            ..Cleanup::default()
        };
        let used = db::nar_files(&tx).map_err(dbe("list NAR files"))?;
        let nar_dir = self.dir.join("nar");
        if let Ok(entries) = fs::read_dir(&nar_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !used.contains(&name) && fs::remove_file(e.path()).is_ok() {
                    tracing::debug!(file = %name, "removed an orphaned NAR file (a writer died before committing)");
                    cleaned.orphaned_nars += 1;
                }
            }
        }
        for sub in ["tmp", "sessions"] {
            let Ok(entries) = fs::read_dir(self.dir.join(sub)) else { continue };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // `<pid>-<start ticks>-<owner>-<n>`
                let mut parts = name.splitn(3, '-');
                let tag = format!("{}-{}", parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if ProcessId::from_tag(&tag).is_none_or(|p| !p.is_alive()) {
                    let p = e.path();
                    let (gone, count) = if sub == "tmp" {
                        (fs::remove_file(p).is_ok(), &mut cleaned.tmp_files)
                    } else {
                        (fs::remove_dir_all(p).is_ok(), &mut cleaned.session_overlays)
                    };
                    *count += usize::from(gone);
                }
            }
        }
        tx.commit().map_err(dbe("clean up"))?;
        Ok(cleaned)
    }

    /// A new private overlay for a session of this process (`sessions/<owner tag>-<n>`).
    pub fn new_overlay(&self) -> Result<Overlay, StoreError> {
        let sessions = self.dir.join("sessions");
        fs::create_dir_all(&sessions).map_err(|source| StoreError::Io {
            op: "create",
            path: sessions.clone(),
            source,
        })?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let dir = sessions.join(format!("{}-{}-{n}", self.me.tag(), self.owner));
        Overlay::create(dir, self.cfg.max_bytes)
    }

    /// Whether `path` is valid.
    pub fn is_valid(&self, path: &StorePath) -> Result<bool, StoreError> {
        Ok(db::id_of(&self.conn(), path).map_err(dbe("query"))?.is_some())
    }

    /// Which of `paths` are valid; with `pin`, those are pinned for this process in the same
    /// transaction (so they cannot be evicted before the session uses them).
    pub fn query_valid(
        &self,
        paths: &BTreeSet<StorePath>,
        pin: bool,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        let mut conn = self.conn();
        let tx =
            conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(dbe("query"))?;
        let mut valid = BTreeSet::new();
        let mut ids = Vec::new();
        for p in paths {
            if let Some(row) = db::get(&tx, p).map_err(dbe("query"))? {
                if self.nar_path(&row.nar_file).is_file() {
                    ids.push(row.id);
                    valid.insert(p.clone());
                    if pin {
                        db::pin(&tx, self.owner, p).map_err(dbe("pin"))?;
                    }
                } else {
                    tracing::error!(path = %p, file = %row.nar_file, "NAR file missing; treating the path as invalid");
                }
            }
        }
        db::touch(&tx, &ids).map_err(dbe("touch"))?;
        tx.commit().map_err(dbe("query"))?;
        Ok(valid)
    }

    /// The info of a valid path.
    pub fn path_info(&self, path: &StorePath) -> Result<Option<ValidPathInfo>, StoreError> {
        Ok(db::get(&self.conn(), path).map_err(dbe("query path info"))?.map(|r| r.info))
    }

    /// A valid path's info and its NAR file, opened.
    pub fn open_nar(&self, path: &StorePath) -> Result<Option<(ValidPathInfo, File)>, StoreError> {
        let Some(row) = db::get(&self.conn(), path).map_err(dbe("query path info"))? else {
            return Ok(None);
        };
        let p = self.nar_path(&row.nar_file);
        let f = File::open(&p).map_err(|source| StoreError::Io { op: "open", path: p, source })?;
        Ok(Some((row.info, f)))
    }

    /// Pin paths for this process (they stay until it exits or [`ContentStore::unpin_all`]).
    pub fn pin(&self, paths: &BTreeSet<StorePath>) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx =
            conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(dbe("pin"))?;
        for p in paths {
            db::pin(&tx, self.owner, p).map_err(dbe("pin"))?;
        }
        tx.commit().map_err(dbe("pin"))
    }

    /// Release this process's pins.
    pub fn unpin_all(&self) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM pins WHERE owner = ?1", [self.owner])
            .map(drop)
            .map_err(dbe("unpin"))
    }

    /// The closure of `roots` (every path must be valid), with infos.
    pub fn closure(
        &self,
        roots: &BTreeSet<StorePath>,
    ) -> Result<BTreeMap<StorePath, ValidPathInfo>, StoreError> {
        StoreView::from(self).closure(roots)
    }

    /// NAR bytes of all valid paths.
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        db::total_size(&self.conn()).map_err(dbe("size"))
    }

    fn tmp_file(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir.join("tmp").join(format!("{}-{}-{n}", self.me.tag(), self.owner))
    }

    /// Receive, check and register a batch in this (shared) store (see the module docs).
    /// `rules` are the self-reference rules a claimed content address may be checked under,
    /// preferred first. Returns the paths the batch contained (already valid ones included);
    /// they are pinned for this process. Sessions add through their [`SessionStore`].
    pub fn add(
        &self,
        uploads: &mut dyn UploadSource,
        rules: &[SelfRefRule],
        origin: Origin,
    ) -> Result<Vec<StorePath>, StoreError> {
        view::add_to_layers(self, None, uploads, rules, origin, &mut |_, _| Ok(view::Layer::Shared))
    }

    /// Pin `path` if it is valid (one transaction); whether it was.
    fn pin_if_valid(&self, path: &StorePath) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx =
            conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(dbe("pin"))?;
        let valid = db::id_of(&tx, path).map_err(dbe("query"))?.is_some();
        if valid {
            db::pin(&tx, self.owner, path).map_err(dbe("pin"))?;
        }
        tx.commit().map_err(dbe("pin"))?;
        Ok(valid)
    }

    /// Register checked NARs in one transaction (references checked, room made by eviction).
    fn commit(&self, mut staged: Vec<Staged>, origin: Origin) -> Result<(), StoreError> {
        if staged.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(dbe("commit"))?;
        let batch: BTreeSet<&StorePath> = staged.iter().map(|s| &s.info.path).collect();
        let mut fresh = Vec::new();
        for (i, s) in staged.iter().enumerate() {
            // Pinned in this transaction, so eviction by others cannot take them before the
            // session uses them.
            db::pin(&tx, self.owner, &s.info.path).map_err(dbe("pin"))?;
            if db::id_of(&tx, &s.info.path).map_err(dbe("commit"))?.is_some() {
                continue; // another process registered it meanwhile
            }
            for r in s.info.info.references.iter().filter(|r| **r != s.info.path) {
                if !batch.contains(r) && db::id_of(&tx, r).map_err(dbe("commit"))?.is_none() {
                    return Err(StoreError::Upload {
                        path: s.info.path.clone(),
                        problem: Box::new(UploadProblem::MissingReference { reference: r.clone() }),
                    });
                }
            }
            fresh.push(i);
        }
        let needed: u64 = fresh.iter().map(|&i| staged[i].info.info.nar_size).sum();
        let evicted = self.evict_in(&tx, needed)?;

        let mut renamed: Vec<PathBuf> = Vec::new();
        let result = (|| -> Result<(), StoreError> {
            let mut ids = Vec::new();
            for &i in &fresh {
                let s = &mut staged[i];
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                let file =
                    format!("{}-{}-{}-{n}.nar", s.info.path.hash_part(), self.me.tag(), self.owner);
                let dest = self.nar_path(&file);
                s.commit_to(&dest)?;
                renamed.push(dest);
                ids.push((
                    db::insert(&tx, &s.info, &file, origin.as_str()).map_err(dbe("insert"))?,
                    i,
                ));
            }
            let nar_dir = self.dir.join("nar");
            File::open(&nar_dir).and_then(|d| d.sync_all()).map_err(|source| StoreError::Io {
                op: "fsync",
                path: nar_dir,
                source,
            })?;
            for (id, i) in ids {
                db::insert_refs(&tx, id, &staged[i].info).map_err(dbe("insert references"))?;
            }
            Ok(())
        })();
        let result = result.and_then(|()| tx.commit().map_err(dbe("commit")));
        if let Err(e) = result {
            for f in renamed {
                let _ = fs::remove_file(f);
            }
            return Err(e);
        }
        for f in &evicted.1 {
            let _ = fs::remove_file(f);
        }
        if !evicted.0.paths.is_empty() {
            tracing::info!(
                count = evicted.0.paths.len(),
                bytes = evicted.0.bytes,
                "evicted paths to make room"
            );
        }
        Ok(())
    }

    /// Within a write transaction: evict until `needed` more bytes fit. Returns what was removed
    /// and the files to delete after the commit.
    fn evict_in(
        &self,
        tx: &Connection,
        needed: u64,
    ) -> Result<(Evicted, Vec<PathBuf>), StoreError> {
        let max = self.cfg.max_bytes;
        db::drop_dead_owners(tx).map_err(dbe("drop dead owners"))?;
        let mut used = db::total_size(tx).map_err(dbe("size"))?;
        let mut out = Evicted::default();
        let mut files = Vec::new();
        while used.saturating_add(needed) > max {
            let Some((id, path, size, file)) = db::eviction_candidate(tx).map_err(dbe("evict"))?
            else {
                let pinned = db::pinned_size(tx).map_err(dbe("size"))?;
                return Err(StoreError::Full { needed, max, used, pinned });
            };
            db::delete(tx, id).map_err(dbe("evict"))?;
            used -= size;
            out.bytes += size;
            out.paths.push(path);
            files.push(self.nar_path(&file));
        }
        Ok((out, files))
    }

    /// Evict until `needed` more bytes would fit (also what a commit does first).
    pub fn evict(&self, needed: u64) -> Result<Evicted, StoreError> {
        let mut conn = self.conn();
        let tx =
            conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(dbe("evict"))?;
        let (ev, files) = self.evict_in(&tx, needed)?;
        tx.commit().map_err(dbe("evict"))?;
        for f in files {
            let _ = fs::remove_file(f);
        }
        Ok(ev)
    }
}

impl Drop for ContentStore {
    fn drop(&mut self) {
        let _ = self.conn().execute("DELETE FROM owners WHERE id = ?1", [self.owner]);
    }
}
