//! Appending to the log (producer side): the algorithm is in the parent module's docs.
//!
//! Files in the log directory besides the C2SP resources: `index/<entry id>` (the leaf index of
//! a statement's entry, decimal, so a verifier finds its entry without scanning the log; it
//! counts only below the checkpoint's size and is checked against the leaf) and `.lock` (the
//! writers' lock, never served). Several processes may append to one log: the lock makes each
//! append, from reading the checkpoint to renaming the new one into place, exclusive.
//!
//! Durability: tiles, bundles and index files are renamed into place unsynced, then one
//! `syncfs` makes them durable, then the checkpoint is written (fsynced, renamed, directory
//! fsynced). A crash before that leaves files no checkpoint refers to.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use tlog_tiles::{Hash, HashReader, Tile};

use super::entry::LogEntry;
use super::note::{Checkpoint, LogKey, NoteVerifierKey};
use super::tiles::{
    bundle_path, encode_bundle, indexed, path_of, read_bundle, DirTiles, TileSource, TreeHashes,
    CHECKPOINT, TILE_HEIGHT, TILE_WIDTH,
};
use super::{io_err, TlogError};

/// Where one entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// Its leaf index.
    pub index: u64,
    /// The log's size after the append.
    pub size: u64,
    /// Whether this append added it (false: it was logged before).
    pub appended: bool,
}

/// A log directory and the key that signs its checkpoints.
#[derive(Debug, Clone)]
pub struct LogWriter {
    dir: PathBuf,
    key: LogKey,
}

struct Grown<'a> {
    old: &'a TreeHashes<'a>,
    new: HashMap<u64, Hash>,
}

impl HashReader for Grown<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|x| match self.new.get(x) {
                Some(h) => Ok(*h),
                None => self.old.read_hashes(&[*x]).map(|h| h[0]),
            })
            .collect()
    }
}

fn merkle_err(what: &str) -> impl FnOnce(tlog_tiles::Error) -> TlogError + '_ {
    move |e| TlogError::Proof { what: what.into(), problem: e.to_string() }
}

/// Resources of the log to write: (path relative to the log, bytes).
pub type Resources = Vec<(String, Vec<u8>)>;

/// The resources (path, bytes) that adding `leaves` to the tree of `old_size` entries in `src`
/// writes (new full tiles and bundles, and the new partial ones), and the new root. `old_root`
/// is checked against the tiles first.
pub fn grow(
    src: &dyn TileSource,
    old_size: u64,
    old_root: &Hash,
    leaves: &[Vec<u8>],
) -> Result<(Resources, Hash), TlogError> {
    let old = TreeHashes::new(src, old_size);
    let found = tlog_tiles::tree_hash(old_size, &old).map_err(merkle_err("the log's tiles"))?;
    if found != *old_root {
        return Err(TlogError::Corrupt {
            path: src.describe(),
            problem: format!("the tiles give root {found}, the checkpoint says {old_root}"),
        });
    }
    let mut g = Grown { old: &old, new: HashMap::new() };
    for (k, leaf) in leaves.iter().enumerate() {
        let n = old_size + k as u64;
        let hashes = tlog_tiles::stored_hashes(n, leaf, &g).map_err(merkle_err("appending"))?;
        let base = tlog_tiles::stored_hash_index(0, n);
        g.new.extend(hashes.into_iter().enumerate().map(|(j, h)| (base + j as u64, h)));
    }
    let new_size = old_size + leaves.len() as u64;
    let root = tlog_tiles::tree_hash(new_size, &g).map_err(merkle_err("the new root"))?;
    let mut out = Vec::new();
    for t in Tile::new_tiles(TILE_HEIGHT, old_size, new_size) {
        out.push((path_of(&t), t.read_data(&g).map_err(merkle_err("a new tile"))?));
        if t.level() == 0 {
            let n = t.level_index();
            let start = n * TILE_WIDTH;
            let mut entries = Vec::new();
            if old_size > start {
                entries = read_bundle(src, n, old_size)?;
            }
            let first_new = (start + entries.len() as u64 - old_size) as usize;
            let end = (start + u64::from(t.width()) - old_size) as usize;
            entries.extend(leaves[first_new..end].iter().cloned());
            let bytes = encode_bundle(entries.iter().map(Vec::as_slice));
            out.push((bundle_path(n, u64::from(t.width())), bytes));
        }
    }
    Ok((out, root))
}

impl LogWriter {
    /// The log in `dir`, signed by `key`.
    pub fn open(dir: &Path, key: LogKey) -> Result<LogWriter, TlogError> {
        for d in [dir.to_path_buf(), dir.join("tile"), dir.join("index")] {
            fs::create_dir_all(&d).map_err(io_err("create", &d))?;
        }
        Ok(LogWriter { dir: dir.to_path_buf(), key })
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The signing key.
    pub fn key(&self) -> &LogKey {
        &self.key
    }

    /// Run `f` holding the log's lock.
    pub fn locked<T>(&self, f: impl FnOnce() -> Result<T, TlogError>) -> Result<T, TlogError> {
        let _lock = super::lock_file(&self.dir.join(".lock"))?;
        f()
    }

    /// The current checkpoint as this log signed it (none before the first append).
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>, TlogError> {
        let src = DirTiles::new(&self.dir);
        let Some(note) = src.get(CHECKPOINT)? else { return Ok(None) };
        let own = [NoteVerifierKey::parse(self.key.vkey())?];
        Checkpoint::verify(&note, &own, &[], 0).map(Some)
    }

    /// Append the entries not logged yet (by statement entry id), in order, under the lock,
    /// then sign and publish the new checkpoint. Returns where each entry is.
    pub fn append(&self, entries: &[LogEntry]) -> Result<Vec<AppendResult>, TlogError> {
        self.locked(|| self.append_locked(entries))
    }

    fn append_locked(&self, entries: &[LogEntry]) -> Result<Vec<AppendResult>, TlogError> {
        let src = DirTiles::new(&self.dir);
        let (size, root) = match self.checkpoint()? {
            Some(cp) => (cp.size, cp.root_hash()),
            None => (0, tlog_tiles::tree_hash(0, &TreeHashes::new(&src, 0)).expect("empty tree")),
        };
        let mut placed: Vec<Option<u64>> = Vec::new();
        let mut new: Vec<(String, Vec<u8>)> = Vec::new();
        for e in entries {
            let id = e.entry_id();
            let bytes = e.to_bytes()?;
            let known = match indexed(&src, &id)? {
                Some(i) if i < size => Some(self.check_logged(&src, size, i, e)?),
                _ => new.iter().position(|(n, _)| *n == id).map(|k| size + k as u64),
            };
            if known.is_none() {
                new.push((id, bytes));
            }
            placed.push(known);
        }
        let new_size = size + new.len() as u64;
        if !new.is_empty() {
            let leaves: Vec<Vec<u8>> = new.iter().map(|(_, b)| b.clone()).collect();
            let (resources, new_root) = grow(&src, size, &root, &leaves)?;
            // Nothing below refers to these files until the checkpoint does: write them all,
            // then make them durable with one syncfs before the checkpoint's rename.
            for (path, bytes) in &resources {
                self.write_unsynced(path, bytes)?;
            }
            for (k, (id, _)) in new.iter().enumerate() {
                let index = format!("{}\n", size + k as u64);
                self.write_unsynced(&format!("index/{id}"), index.as_bytes())?;
            }
            let d = fs::File::open(&self.dir).map_err(io_err("open", &self.dir))?;
            nix::unistd::syncfs(&d).map_err(|e| io_err("sync", &self.dir)(e.into()))?;
            let note = self.key.sign_checkpoint(new_size, &new_root)?;
            self.write(CHECKPOINT, &note)?;
            self.prune_partials(size, new_size);
            tracing::info!(origin = self.key.origin(), size = new_size, "log checkpoint");
        }
        let mut next = size;
        Ok(placed
            .into_iter()
            .map(|p| match p {
                Some(index) => AppendResult { index, size: new_size, appended: index >= size },
                None => {
                    next += 1;
                    AppendResult { index: next - 1, size: new_size, appended: true }
                }
            })
            .collect())
    }

    /// Add witnesses' cosignature lines to the checkpoint, if it is still the one of `size` and
    /// `root` (a newer checkpoint needs its own cosignatures); whether it was.
    pub fn add_cosignatures(
        &self,
        size: u64,
        root: &[u8; 32],
        lines: &str,
    ) -> Result<bool, TlogError> {
        self.locked(|| {
            let Some(cp) = self.checkpoint()? else { return Ok(false) };
            if cp.size != size || cp.root != *root {
                return Ok(false);
            }
            let note = super::note::add_signatures(&cp.note, lines)?;
            self.write(CHECKPOINT, &note)?;
            Ok(true)
        })
    }

    /// An entry whose index file names leaf `i`: that leaf must be an entry of the same
    /// statement.
    fn check_logged(
        &self,
        src: &DirTiles,
        size: u64,
        i: u64,
        e: &LogEntry,
    ) -> Result<u64, TlogError> {
        let bundle = read_bundle(src, i / TILE_WIDTH, size)?;
        let leaf = LogEntry::parse(&bundle[(i % TILE_WIDTH) as usize])?;
        if leaf.statement != e.statement {
            return Err(TlogError::Corrupt {
                path: format!("{}/index/{}", self.dir.display(), e.entry_id()),
                problem: format!("leaf {i} is the entry of another statement"),
            });
        }
        Ok(i)
    }

    fn write(&self, rel: &str, bytes: &[u8]) -> Result<(), TlogError> {
        let path = self.dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        crate::store::write_atomic(&path, bytes).map_err(io_err("write", &path))
    }

    /// Write a file by renaming a temporary one into place, without syncing it (the caller
    /// syncs the file system before anything refers to it).
    fn write_unsynced(&self, rel: &str, bytes: &[u8]) -> Result<(), TlogError> {
        use std::io::Write;
        let path = self.dir.join(rel);
        let parent = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&crate::store::tmp_prefix())
            .tempfile_in(parent)
            .map_err(io_err("create", parent))?;
        tmp.write_all(bytes).map_err(io_err("write", &path))?;
        tmp.persist(&path).map_err(|e| io_err("rename", &path)(e.error))?;
        Ok(())
    }

    /// Partial tiles and bundles of tiles that became full are no longer needed (C2SP allows
    /// deleting them; readers fall back to the full tile). Failure to delete is harmless.
    fn prune_partials(&self, old_size: u64, new_size: u64) {
        for t in Tile::new_tiles(TILE_HEIGHT, old_size, new_size) {
            if u64::from(t.width()) != TILE_WIDTH {
                continue;
            }
            let mut dirs = vec![format!("{}.p", path_of(&t))];
            if t.level() == 0 {
                dirs.push(format!("{}.p", bundle_path(t.level_index(), TILE_WIDTH)));
            }
            for d in dirs {
                let _ = fs::remove_dir_all(self.dir.join(d));
            }
        }
    }
}
