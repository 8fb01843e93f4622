//! Store paths unpacked where a `unix://` client reads them (`vouch nix-builder --listen`).
//!
//! A Nix client of a `unix://` store does not fetch NARs over the socket: its `UDSRemoteStore`
//! takes `narFromPath` from `LocalFSStore`, which dumps `<real>/<hash>-<name>` from the client's
//! own file system, `real` being the store URI's `real=` parameter (default `/nix/store`). Every
//! Nix release does this, so a server on a socket must put the paths its clients copy from it
//! (a build's outputs, `nix copy --from`) into a directory, and the clients name it:
//! `unix:///run/vouch/builder.sock?real=/run/vouch/builder.sock.store`.
//!
//! What is put there: a valid path of the session's view of the content store (its overlay
//! included), unpacked from its NAR when a session asks for its info (`QueryPathInfo`, which
//! Nix does right before reading a path), and removed when the last session that asked for it
//! ends. One path name has one tree: a session that needs other contents (another NAR hash)
//! under a name another session holds is refused, naming the conflict, rather than shown
//! either session's bytes. A tree is unpacked under a temporary name and
//! renamed into place, so a client never sees half of one. The client hashes what it reads and
//! compares it with the NAR hash the session answered, so a tree changed on disk is caught, not
//! trusted. The directory belongs to one server: [`RealStore::open`] empties it (what a crashed
//! server left).
//!
//! What is not here: the content store (`crate::store`), the socket (`crate::nixproto::listen`).

use std::collections::{BTreeSet, HashMap};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix_formats::nar::{unpack, UnpackOptions};
use nix_formats::StorePath;

use build_trace::NarHash;

use crate::store::{StoreError, StoreView};

/// Why a path could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum RealStoreError {
    /// A file operation on the directory.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The content store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another session holds other contents under the same name.
    #[error("{path} is unpacked for another session with other contents; try again when it ends")]
    Conflict {
        /// The path.
        path: StorePath,
    },
    /// Unpacking the NAR.
    #[error("unpacking {path} for the client")]
    Unpack {
        /// The path.
        path: StorePath,
        /// The cause.
        #[source]
        source: nix_formats::nar::UnpackError,
    },
}

fn io_err<'p>(
    what: &'static str,
    path: &'p Path,
) -> impl FnOnce(std::io::Error) -> RealStoreError + 'p {
    move |source| RealStoreError::Io { what, path: path.to_owned(), source }
}

/// The directory of unpacked paths, shared by a server's sessions.
#[derive(Debug)]
pub struct RealStore {
    dir: PathBuf,
    /// How many sessions hold each unpacked path, and its NAR hash.
    held: Mutex<HashMap<StorePath, (usize, NarHash)>>,
    counter: AtomicU64,
}

impl RealStore {
    /// Create `dir` if needed and empty it.
    pub fn open(dir: &Path) -> Result<RealStore, RealStoreError> {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        for entry in std::fs::read_dir(dir).map_err(io_err("reading", dir))? {
            let p = entry.map_err(io_err("reading", dir))?.path();
            remove_tree(&p)?;
        }
        Ok(RealStore { dir: dir.to_owned(), held: Mutex::default(), counter: AtomicU64::new(0) })
    }

    /// The directory (what clients pass as `real=`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `path` is unpacked.
    pub fn location(&self, path: &StorePath) -> PathBuf {
        self.dir.join(path.base_name())
    }

    fn acquire(&self, store: StoreView<'_>, path: &StorePath) -> Result<(), RealStoreError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some((info, nar)) = store.open_nar(path)? else {
            return Err(StoreError::Missing { path: path.clone() }.into());
        };
        if let Some((n, hash)) = held.get_mut(path) {
            if *hash != info.info.nar_hash {
                return Err(RealStoreError::Conflict { path: path.clone() });
            }
            *n += 1;
            return Ok(());
        }
        let dest = self.location(path);
        let tmp = self.dir.join(format!(".tmp-{}", self.counter.fetch_add(1, Ordering::Relaxed)));
        let opts = UnpackOptions::default();
        unpack(BufReader::with_capacity(1 << 16, nar), &tmp, &opts)
            .map_err(|source| RealStoreError::Unpack { path: path.clone(), source })?;
        if dest.symlink_metadata().is_ok() {
            remove_tree(&dest)?; // not ours: nobody holds it
        }
        std::fs::rename(&tmp, &dest).map_err(io_err("moving into place", &dest))?;
        held.insert(path.clone(), (1, info.info.nar_hash));
        tracing::debug!(path = %path, "unpacked for the client");
        Ok(())
    }

    fn release(&self, path: &StorePath) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some((n, _)) = held.get_mut(path) else { return };
        *n -= 1;
        if *n == 0 {
            held.remove(path);
            if let Err(e) = remove_tree(&self.location(path)) {
                tracing::warn!("{}", build_trace::error_chain(&e));
            }
        }
    }
}

fn remove_tree(p: &Path) -> Result<(), RealStoreError> {
    let r = match p.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    r.map_err(io_err("removing", p))
}

impl Drop for RealStore {
    fn drop(&mut self) {
        // Only if empty: trees a session still holds stay.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// One session's hold on unpacked paths; released when dropped (the session ended).
#[derive(Debug)]
pub struct RealStoreSession {
    shared: Arc<RealStore>,
    held: BTreeSet<StorePath>,
}

impl RealStoreSession {
    /// A session of `shared`.
    pub fn new(shared: Arc<RealStore>) -> Self {
        RealStoreSession { shared, held: BTreeSet::new() }
    }

    /// Make sure `path` (valid in `store`) is unpacked until this session ends.
    pub fn provide(
        &mut self,
        store: StoreView<'_>,
        path: &StorePath,
    ) -> Result<(), RealStoreError> {
        if !self.held.contains(path) {
            self.shared.acquire(store, path)?;
            self.held.insert(path.clone());
        }
        Ok(())
    }
}

impl Drop for RealStoreSession {
    fn drop(&mut self) {
        for p in std::mem::take(&mut self.held) {
            self.shared.release(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use nix_formats::nar::NarWriter;

    use super::*;
    use crate::core::ValidPathInfo;
    use crate::store::{ContentStore, FileUploads, Origin, StoreConfig};

    /// A content store holding one path: a directory with an executable file and a symlink.
    fn store_with_a_tree(dir: &Path) -> (ContentStore, StorePath, Vec<u8>) {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.dir_start().unwrap();
        w.entry(b"bin").unwrap();
        w.regular(true, b"#!/bin/sh\necho hi\n").unwrap();
        w.entry_end().unwrap();
        w.entry(b"link").unwrap();
        w.symlink(b"bin").unwrap();
        w.entry_end().unwrap();
        w.dir_end().unwrap();
        let nar = w.into_inner();
        let path = StorePath::from_parts([7; 20], "tree").unwrap();
        let file = dir.join("tree.nar");
        std::fs::write(&file, &nar).unwrap();
        let info = ValidPathInfo {
            path: path.clone(),
            info: build_trace::PathInfo {
                nar_hash: build_trace::NarHash::of(&nar),
                nar_size: nar.len() as u64,
                references: BTreeSet::new(),
                ca: None,
            },
            deriver: None,
            registration_time: 0,
            ultimate: false,
            sigs: BTreeSet::new(),
        };
        let store = ContentStore::open(&dir.join("store"), StoreConfig::default()).unwrap();
        let rules = crate::store::UPLOAD_RULES;
        store.add(&mut FileUploads::new(vec![(info, file)]), rules, Origin::Upload).unwrap();
        (store, path, nar)
    }

    #[test]
    fn paths_are_unpacked_while_a_session_holds_them() {
        let d = tempfile::tempdir().unwrap();
        let (store, path, nar) = store_with_a_tree(d.path());
        let dir = d.path().join("real");
        std::fs::create_dir_all(dir.join("leftover-of-a-crash")).unwrap();
        let real = Arc::new(RealStore::open(&dir).unwrap());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "emptied at start");

        let (mut a, mut b) =
            (RealStoreSession::new(real.clone()), RealStoreSession::new(real.clone()));
        a.provide((&store).into(), &path).unwrap();
        a.provide((&store).into(), &path).unwrap();
        b.provide((&store).into(), &path).unwrap();
        let tree = real.location(&path);
        assert_eq!(tree, dir.join(path.base_name()));
        // What the client dumps from there is the path's NAR, byte for byte.
        let mut dumped = Vec::new();
        nix_formats::nar::dump_path(&tree, &mut dumped).unwrap();
        assert_eq!(dumped, nar);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary names left");

        drop(a);
        assert!(tree.exists(), "another session still holds it");
        drop(b);
        assert!(!tree.exists(), "the last session released it");

        let missing = StorePath::from_parts([8; 20], "missing").unwrap();
        let e = RealStoreSession::new(real.clone()).provide((&store).into(), &missing).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        drop(real);
        assert!(!dir.exists(), "an empty directory goes with the server");
    }
}
