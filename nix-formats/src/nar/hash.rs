//! The NAR hashing sink: SHA-256 and size of a NAR while it streams past.
//!
//! [`NarHasher`] is an `impl Write` (compose it with a tee or a rewriter); [`hash_nar`] hashes a
//! NAR stream as is, [`hash_path`] serialises a tree and hashes it (`nix-store -q --hash` /
//! `nix hash path`). What is not here: other algorithms (see the crate's hash module) and the
//! self-reference-modulo hash of content-addressed outputs (see the `ca` module).

use std::io::{self, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::dump::{DumpError, NarDump, STREAM_BUFFER};

/// SHA-256 and size of a NAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NarDigest {
    /// SHA-256 of the NAR bytes.
    pub sha256: [u8; 32],
    /// NAR size in bytes.
    pub size: u64,
}

/// A sink that hashes what is written to it.
#[derive(Clone, Debug, Default)]
pub struct NarHasher {
    sha: Sha256,
    size: u64,
}

impl NarHasher {
    /// An empty hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.size += data.len() as u64;
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest of everything fed.
    pub fn finish(self) -> NarDigest {
        NarDigest { sha256: self.sha.finalize().into(), size: self.size }
    }
}

impl Write for NarHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hashes a byte stream (a NAR, not validated) to its end.
pub fn hash_nar(mut r: impl Read) -> io::Result<NarDigest> {
    let mut h = NarHasher::new();
    let mut buf = vec![0u8; STREAM_BUFFER];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(h.finish()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
    }
}

/// Serialises `path` as a NAR and hashes it: what `nix-store -q --hash` reports for a store path.
pub fn hash_path(path: impl AsRef<Path>) -> Result<NarDigest, DumpError> {
    hash_nar(NarDump::new(path.as_ref())).map_err(DumpError::from_io)
}
