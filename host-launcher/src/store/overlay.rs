//! A session's private layer over the shared content store: where a **trusted** client's paths
//! that vouch cannot verify go (unsigned uploads without a content address, outputs of builds
//! that used them or whose input-addressed paths vouch did not compute).
//!
//! - **Private**: one [`Overlay`] belongs to one session (one client connection; for `vouch
//!   serve`, one trusted client's token, for the service's life); nothing else reads it.
//!   Another session, and the shared store, never see its paths.
//! - **Checked as the shared store checks**: a path enters only after `super::ingest` received
//!   and checked its NAR (size, canonical NAR, NAR hash, a claimed content address); its
//!   references must be in the overlay, in the shared store (where the session pins them), or in
//!   the same batch. Nothing else is checked: the session's client is trusted with the rest.
//! - **Short-lived**: its files live in `<store>/sessions/<owner tag>-<n>/` and are removed when
//!   the session ends (the overlay is dropped); a crashed process's directories go at the next
//!   [`super::ContentStore::open`], like its temporary files. The index is in memory.
//! - **Bounded**: at most the store's `max_bytes` of NARs; beyond, an upload is refused.
//!
//! What is not here: which paths go where (`super::session`), reading across both layers
//! (`super::view`).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use nix_formats::StorePath;

use super::ingest::Staged;
use super::StoreError;
use crate::core::ValidPathInfo;

/// A session's private paths (see the module docs). Removed from disk when dropped.
#[derive(Debug)]
pub struct Overlay {
    dir: PathBuf,
    paths: Mutex<BTreeMap<StorePath, (ValidPathInfo, PathBuf)>>,
    max_bytes: u64,
    counter: AtomicU64,
}

impl Overlay {
    /// A new, empty overlay in `dir` (created; it must not exist).
    pub(super) fn create(dir: PathBuf, max_bytes: u64) -> Result<Overlay, StoreError> {
        fs::create_dir(&dir).map_err(|source| StoreError::Io {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(Overlay { dir, paths: Mutex::default(), max_bytes, counter: AtomicU64::new(0) })
    }

    fn paths(&self) -> MutexGuard<'_, BTreeMap<StorePath, (ValidPathInfo, PathBuf)>> {
        self.paths.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The info of a path in the overlay.
    pub fn get(&self, path: &StorePath) -> Option<ValidPathInfo> {
        self.paths().get(path).map(|(i, _)| i.clone())
    }

    /// Whether `path` is in the overlay.
    pub fn contains(&self, path: &StorePath) -> bool {
        self.paths().contains_key(path)
    }

    /// A path's info and its NAR file, opened.
    pub fn open_nar(&self, path: &StorePath) -> Result<Option<(ValidPathInfo, File)>, StoreError> {
        let Some((info, file)) = self.paths().get(path).cloned() else { return Ok(None) };
        let f = File::open(&file).map_err(|source| StoreError::Io {
            op: "open",
            path: file.clone(),
            source,
        })?;
        Ok(Some((info, f)))
    }

    /// NAR bytes held.
    pub fn used_bytes(&self) -> u64 {
        self.paths().values().map(|(i, _)| i.info.nar_size).sum()
    }

    /// A fresh temporary file name for a NAR being received.
    pub(super) fn tmp_file(&self) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!(".tmp-{n}"))
    }

    /// Register received, checked NARs (their references already checked by the caller).
    pub(super) fn commit(&self, staged: Vec<Staged>) -> Result<(), StoreError> {
        let mut paths = self.paths();
        let fresh: Vec<Staged> =
            staged.into_iter().filter(|s| !paths.contains_key(&s.info.path)).collect();
        let needed: u64 = fresh.iter().map(|s| s.info.info.nar_size).sum();
        let used: u64 = paths.values().map(|(i, _)| i.info.nar_size).sum();
        if used.saturating_add(needed) > self.max_bytes {
            return Err(StoreError::OverlayFull { needed, used, max: self.max_bytes });
        }
        for mut s in fresh {
            let n = self.counter.fetch_add(1, Ordering::Relaxed);
            let dest = self.dir.join(format!("{}-{n}.nar", s.info.path.hash_part()));
            s.commit_to(&dest)?;
            paths.insert(s.info.path.clone(), (s.info.clone(), dest));
        }
        Ok(())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => tracing::debug!(dir = %self.dir.display(), "session overlay removed"),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "removing the session overlay: {e}")
            }
        }
    }
}
