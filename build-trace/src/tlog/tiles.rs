//! C2SP tlog-tiles resources: paths, entry bundles, and reading them from a [`TileSource`].
//!
//! Paths, relative to the log prefix: `checkpoint`; `tile/<L>/<N>[.p/<W>]` (hash tiles, height
//! 8: 256 hashes of 32 bytes when full); `tile/entries/<N>[.p/<W>]` (entry bundles: each entry
//! prefixed by its length as a big-endian u16). `<N>` is written in 3-digit groups, all but the
//! last prefixed by `x` (`x001/x234/067`). (Go's sumdb writes the same tiles at
//! `tile/8/<L>/<N>`.)
//!
//! [`TreeHashes`] reads the stored hashes of a tree of a given size from its tiles, without
//! authenticating them: every use checks a proof against a signed root afterwards.
//! [`AuthTiles`] is the `tlog_tiles` tile reader, whose [`tlog_tiles::TileHashReader`] checks
//! every tile against the tree's root before using it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tlog_tiles::{Hash, HashReader, Tile, HASH_SIZE};

use super::{io_err, TlogError};

/// Tile height (C2SP tlog-tiles fixes it).
pub const TILE_HEIGHT: u8 = 8;
/// Hashes or entries in a full tile or bundle.
pub const TILE_WIDTH: u64 = 1 << TILE_HEIGHT;
/// The checkpoint's path.
pub const CHECKPOINT: &str = "checkpoint";

fn index_path(n: u64) -> String {
    let mut s = format!("{:03}", n % 1000);
    let mut rest = n / 1000;
    while rest > 0 {
        s = format!("x{:03}/{s}", rest % 1000);
        rest /= 1000;
    }
    s
}

fn width_suffix(w: u64) -> String {
    if w == TILE_WIDTH {
        String::new()
    } else {
        format!(".p/{w}")
    }
}

/// `tile/<L>/<N>[.p/<W>]`.
pub fn tile_path(level: u8, n: u64, width: u64) -> String {
    format!("tile/{level}/{}{}", index_path(n), width_suffix(width))
}

/// `tile/entries/<N>[.p/<W>]`.
pub fn bundle_path(n: u64, width: u64) -> String {
    format!("tile/entries/{}{}", index_path(n), width_suffix(width))
}

/// The path of a `tlog_tiles` hash tile.
pub fn path_of(t: &Tile) -> String {
    tile_path(t.level(), t.level_index(), u64::from(t.width()))
}

/// The width of bundle `n` (or level-0 tile `n`) in a tree of `size` entries (0: none).
pub fn width_in(n: u64, size: u64) -> u64 {
    size.saturating_sub(n * TILE_WIDTH).min(TILE_WIDTH)
}

/// Entries as an entry bundle.
pub fn encode_bundle<'a>(entries: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let len = u16::try_from(e.len()).expect("entries are checked to fit a bundle");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// The entries of a bundle.
pub fn decode_bundle(path: &str, mut b: &[u8]) -> Result<Vec<Vec<u8>>, TlogError> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let bad = || TlogError::Corrupt { path: path.into(), problem: "truncated entry".into() };
        let len = b.get(..2).ok_or_else(bad)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let entry = b.get(2..2 + len).ok_or_else(bad)?;
        out.push(entry.to_vec());
        b = &b[2 + len..];
    }
    Ok(out)
}

/// Where a log's resources are read from: a directory or an HTTP prefix.
pub trait TileSource: std::fmt::Debug + Sync {
    /// The resource at `path` (relative to the log prefix); `None` when it does not exist.
    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, TlogError>;
    /// Where it is, for messages.
    fn describe(&self) -> String;

    /// The resource at `path`, which must exist.
    fn need(&self, path: &str) -> Result<Vec<u8>, TlogError> {
        self.get(path)?.ok_or_else(|| TlogError::Missing(format!("{}/{path}", self.describe())))
    }
}

/// A log directory.
#[derive(Debug, Clone)]
pub struct DirTiles {
    root: PathBuf,
}

impl DirTiles {
    /// The log in `root` (`<trace store>/log`).
    pub fn new(root: &Path) -> DirTiles {
        DirTiles { root: root.to_path_buf() }
    }

    /// Its directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl TileSource for DirTiles {
    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, TlogError> {
        let p = self.root.join(path);
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &p)(e)),
        }
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// The stored hashes of the tree of `size` entries, read from its tiles (cached, not
/// authenticated: check what is computed from them against a signed root).
#[derive(Debug)]
pub struct TreeHashes<'a> {
    src: &'a dyn TileSource,
    size: u64,
    cache: Mutex<HashMap<String, Arc<[u8]>>>,
    hashes: Mutex<HashMap<u64, Hash>>,
}

impl<'a> TreeHashes<'a> {
    /// Hashes of the tree of `size` entries in `src`.
    pub fn new(src: &'a dyn TileSource, size: u64) -> TreeHashes<'a> {
        TreeHashes { src, size, cache: Mutex::default(), hashes: Mutex::default() }
    }

    fn tile_data(&self, t: &Tile) -> Result<Arc<[u8]>, tlog_tiles::Error> {
        let path = path_of(t);
        if let Some(d) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&path) {
            return Ok(Arc::clone(d));
        }
        let get = |p: &str| {
            self.src.get(p).map_err(|e| tlog_tiles::Error::InvalidInput(crate::error_chain(&e)))
        };
        let want = t.width() as usize * HASH_SIZE;
        // A partial tile may be gone once the full one exists (C2SP): its prefix is the same.
        let full = || tile_path(t.level(), t.level_index(), TILE_WIDTH);
        let data = match get(&path)? {
            Some(d) => d,
            None if u64::from(t.width()) < TILE_WIDTH => get(&full())?
                .map(|mut d| {
                    d.truncate(want);
                    d
                })
                .ok_or_else(|| {
                    let msg = format!("{}/{path} is missing", self.src.describe());
                    tlog_tiles::Error::InvalidInput(msg)
                })?,
            None => {
                let msg = format!("{}/{path} is missing", self.src.describe());
                return Err(tlog_tiles::Error::InvalidInput(msg));
            }
        };
        if data.len() != want {
            return Err(tlog_tiles::Error::InvalidInput(format!(
                "{}/{path} has {} bytes, not {}",
                self.src.describe(),
                data.len(),
                t.width() as usize * HASH_SIZE
            )));
        }
        let data: Arc<[u8]> = data.into();
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(path, Arc::clone(&data));
        Ok(data)
    }
}

impl HashReader for TreeHashes<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        indexes
            .iter()
            .map(|&x| {
                // Hashes inside a tile are recomputed from its leaves: remember them, as proofs
                // of neighbouring leaves share most of theirs.
                if let Some(h) = self.hashes.lock().unwrap_or_else(|e| e.into_inner()).get(&x) {
                    return Ok(*h);
                }
                let t = Tile::from_index(TILE_HEIGHT, x)
                    .parent(0, self.size)
                    .ok_or(tlog_tiles::Error::IndexesNotInTree)?;
                let h = t.hash_at_index(&self.tile_data(&t)?, x)?;
                self.hashes.lock().unwrap_or_else(|e| e.into_inner()).insert(x, h);
                Ok(h)
            })
            .collect()
    }
}

/// The `tlog_tiles` tile reader over a [`TileSource`] (C2SP paths).
#[derive(Debug)]
pub struct AuthTiles<'a>(pub &'a dyn TileSource);

impl tlog_tiles::TileReader for AuthTiles<'_> {
    fn height(&self) -> u8 {
        TILE_HEIGHT
    }

    fn read_tiles(&self, tiles: &[Tile]) -> Result<Vec<Vec<u8>>, tlog_tiles::Error> {
        tiles
            .iter()
            .map(|t| {
                let path = path_of(t);
                self.0
                    .get(&path)
                    .map_err(|e| tlog_tiles::Error::InvalidInput(crate::error_chain(&e)))?
                    .ok_or_else(|| tlog_tiles::Error::InvalidInput(format!("{path} is missing")))
            })
            .collect()
    }

    fn save_tiles(&self, _tiles: &[Tile], _data: &[Vec<u8>]) {}
}

/// The entries of bundle `n` of the tree of `size` entries (its partial bundle, or the prefix
/// of the full one when the partial one was deleted).
pub fn read_bundle(src: &dyn TileSource, n: u64, size: u64) -> Result<Vec<Vec<u8>>, TlogError> {
    let w = width_in(n, size);
    let path = bundle_path(n, w);
    let (path, bytes) = match src.get(&path)? {
        Some(b) => (path, b),
        None => {
            let full = bundle_path(n, TILE_WIDTH);
            let b = src.need(&full)?;
            (full, b)
        }
    };
    let mut entries = decode_bundle(&path, &bytes)?;
    if (entries.len() as u64) < w {
        return Err(TlogError::Corrupt {
            path,
            problem: format!("{} entries, the tree needs {w}", entries.len()),
        });
    }
    entries.truncate(w as usize);
    Ok(entries)
}

/// The leaf index `index/<entry id>` names, if any.
pub fn indexed(src: &dyn TileSource, entry_id: &str) -> Result<Option<u64>, TlogError> {
    let path = format!("index/{entry_id}");
    match src.get(&path)? {
        None => Ok(None),
        Some(b) => {
            let text = String::from_utf8_lossy(&b);
            let i = text.trim_end().parse().map_err(|_| TlogError::Corrupt {
                path,
                problem: "not a decimal leaf index".into(),
            })?;
            Ok(Some(i))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_c2sp() {
        assert_eq!(tile_path(0, 0, 256), "tile/0/000");
        assert_eq!(tile_path(1, 1234067, 256), "tile/1/x001/x234/067");
        assert_eq!(tile_path(2, 5, 17), "tile/2/005.p/17");
        assert_eq!(bundle_path(1000, 3), "tile/entries/x001/000.p/3");
        assert_eq!(
            (width_in(0, 70_000), width_in(273, 70_000), width_in(274, 70_000)),
            (256, 112, 0)
        );
    }

    #[test]
    fn bundles_round_trip_and_refuse_truncation() {
        let b = encode_bundle([b"ab".as_slice(), b"", b"xyz"]);
        assert_eq!(b, b"\x00\x02ab\x00\x00\x00\x03xyz");
        assert_eq!(decode_bundle("b", &b).unwrap(), vec![b"ab".to_vec(), vec![], b"xyz".to_vec()]);
        assert!(decode_bundle("b", &b[..b.len() - 1]).is_err());
        assert!(decode_bundle("b", &[0]).is_err());
    }
}
