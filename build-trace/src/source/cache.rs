//! The local cache of fetched files, by content hash.
//!
//! Layout under its directory (`<state dir>/trace-cache` for the CLI):
//! ```text
//! sha256/<hex SHA-256 of the bytes>       the bytes, once per content
//! url/<hex SHA-256 of the URL>            symlink to ../sha256/<digest> of what that URL answered: a hint
//! ```
//! The URL index is only a hint: a hit is the blob its digest names, re-hashed on every read,
//! so a damaged or edited blob is a miss (fetched again), never an answer. Only files whose URL
//! always names the same bytes are cached (the caller decides: statements under their entry id,
//! `.drv` files under their path, …); nothing read from here is trusted more than what the
//! server sent, because the verifier checks everything either way.
//!
//! Writes are best effort (a failed write is a warning: the cache is an optimisation) and atomic
//! (a temporary name in the same directory, then a rename), so concurrent writers are safe. The
//! fetcher writes on a thread of its own, off the fetching path ([`CacheWriter`]).
//! What is not here: expiry (`rm -r` the directory to empty it), HTTP.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use sha2::{Digest, Sha256};

/// A cache directory.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

/// Distinguishes temporary names of one process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl BlobCache {
    /// The cache in `dir` (created on first write).
    pub fn new(dir: &Path) -> BlobCache {
        BlobCache { dir: dir.to_path_buf() }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("sha256").join(digest)
    }

    fn url_path(&self, url: &str) -> PathBuf {
        self.dir.join("url").join(hex::encode(Sha256::digest(url.as_bytes())))
    }

    /// What `url` answered before, if the index names a blob that still hashes to its name.
    pub fn get(&self, url: &str) -> Option<Vec<u8>> {
        let target = fs::read_link(self.url_path(url)).ok()?;
        let digest = digest_of_link(&target)?;
        let bytes = fs::read(self.blob_path(digest)).ok()?;
        (hex::encode(Sha256::digest(&bytes)) == digest).then_some(bytes)
    }

    /// Remember that `url` answered `bytes` (best effort).
    pub fn put(&self, url: &str, bytes: &[u8]) {
        let digest = hex::encode(Sha256::digest(bytes));
        let blob = self.blob_path(&digest);
        let link = Path::new("..").join("sha256").join(&digest);
        let done = (if blob.exists() { Ok(()) } else { write_atomic(&blob, bytes) })
            .and_then(|()| link_atomic(&self.url_path(url), &link));
        if let Err(e) = done {
            tracing::warn!("trace cache {}: cannot keep {url}: {e}", self.dir.display());
        }
    }
}

/// The digest a URL index link names: its last component, if that is 64 hex digits (so the
/// blob read is always `sha256/<digest>` in this cache, wherever the link points).
pub(crate) fn digest_of_link(target: &Path) -> Option<&str> {
    let digest = target.file_name()?.to_str()?;
    (digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())).then_some(digest)
}

/// Write `bytes` to `path` through a temporary name in its directory (made if missing).
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace(path, |tmp| fs::write(tmp, bytes))
}

/// Make `path` a symlink to `target`, replacing what is there.
fn link_atomic(path: &Path, target: &Path) -> io::Result<()> {
    replace(path, |tmp| std::os::unix::fs::symlink(target, tmp))
}

/// `make` a temporary name in `path`'s directory (made if missing), then rename it to `path`.
fn replace(path: &Path, make: impl Fn(&Path) -> io::Result<()>) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    match make(&tmp) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir)?;
            make(&tmp)?;
        }
        other => other?,
    }
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Writes to a [`BlobCache`] on a thread of its own, so that fetching never waits for the disk;
/// dropping it waits until everything queued is written.
#[derive(Debug)]
pub(super) struct CacheWriter {
    tx: Option<mpsc::Sender<(String, Vec<u8>)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CacheWriter {
    pub(super) fn new(cache: BlobCache) -> CacheWriter {
        let (tx, rx) = mpsc::channel::<(String, Vec<u8>)>();
        let thread = std::thread::spawn(move || {
            for (url, bytes) in rx {
                cache.put(&url, &bytes);
            }
        });
        CacheWriter { tx: Some(tx), thread: Some(thread) }
    }

    /// Queue `bytes` as what `url` answered.
    pub(super) fn put(&self, url: &str, bytes: &[u8]) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((url.to_owned(), bytes.to_vec()));
        }
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hit_is_rehashed_and_a_damaged_blob_is_a_miss() {
        let d = tempfile::tempdir().unwrap();
        let c = BlobCache::new(d.path());
        assert_eq!(c.get("http://h/a"), None);
        c.put("http://h/a", b"hello");
        assert_eq!(c.get("http://h/a").as_deref(), Some(&b"hello"[..]));
        assert_eq!(c.get("http://h/b"), None);
        let blob = c.blob_path(&hex::encode(Sha256::digest(b"hello")));
        fs::write(&blob, b"hellO").unwrap();
        assert_eq!(c.get("http://h/a"), None, "a blob that no longer hashes to its name");
        // The index is a hint: pointing it at another blob gives that blob's own bytes only
        // if they hash to the name it points at.
        c.put("http://h/c", b"other");
        let other = hex::encode(Sha256::digest(b"other"));
        link_atomic(&c.url_path("http://h/a"), Path::new(&other)).unwrap();
        assert_eq!(c.get("http://h/a").as_deref(), Some(&b"other"[..]));
        link_atomic(&c.url_path("http://h/a"), Path::new("/etc/passwd")).unwrap();
        assert_eq!(c.get("http://h/a"), None);
    }
}
