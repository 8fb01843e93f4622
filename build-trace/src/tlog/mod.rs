//! A transparency log of published build steps: C2SP tlog-tiles with a C2SP tlog-checkpoint
//! signed by a dedicated log key, cosigned by C2SP tlog-witness witnesses (`docs/transparency-log.md`
//! is the reference).
//!
//! # Algorithm
//!
//! - **Entry** ([`entry`]): one per statement entry id, a strict line format naming the step's
//!   derivation, each output's path, NAR hash and size, and the SHA-256 of the statement, the
//!   evidence and the publisher's JWS. Leaf hash = RFC 6962 `SHA-256(0x00 || entry)`.
//! - **Append** ([`writer`], producer side), under an exclusive lock on `<log>/.lock`: read the
//!   current checkpoint (size N, root R), skip entries already logged (`index/<entry id>` names a
//!   leaf below N holding exactly that entry), compute the new stored hashes from the tiles of
//!   (N, R) and the new leaves, write every new or grown tile and entry bundle (each to a
//!   temporary name, fsynced, renamed), the `index/` files, then the new checkpoint signed with
//!   the log key, renamed into place last. A crash before that rename leaves the log at N: what
//!   was written for sizes above N is unreferenced and is overwritten by the next append. Files
//!   for sizes up to a published checkpoint are never changed (full tiles are immutable).
//! - **Check** ([`proof`], verifier side): a checkpoint is accepted with a valid signature by a
//!   trusted log key and a quorum of valid cosignatures by trusted witness keys; it must be
//!   consistent (RFC 6962 consistency proof, computed from the log's tiles) with the checkpoint of
//!   the same origin the verifier accepted before, which it then replaces (consistency is
//!   transitive, so the latest one stands for all). An entry is included when the leaf at its
//!   index has its hash and an RFC 6962 inclusion proof from that leaf to the checkpoint's root
//!   checks. Tiles are read unauthenticated; every proof is checked against the signed root.
//! - **Witness** ([`witness`]): C2SP tlog-witness `add-checkpoint` — the log signature, then the
//!   old size must equal the last size cosigned (409 with that size otherwise), then the
//!   consistency proof (422), and the record is updated atomically before a cosignature/v1
//!   (C2SP tlog-cosignature, Ed25519, timestamped) is returned. No rollback: a smaller size, or
//!   the same size with another root, is refused.
//! - **Monitor** ([`monitor`]): from the last checkpoint it accepted, read the new entries from
//!   the entry bundles, check each against the authenticated level-0 tiles, report it, and report
//!   two entries of one derivation with different outputs.
//!
//! Merkle math (stored hashes, tile coordinates, record and tree proofs) is the `tlog_tiles`
//! crate's, a port of Go's `golang.org/x/mod/sumdb/tlog`; signed notes are `signed_note`'s.
//! C2SP tile paths, entry bundles, cosignatures and the witness rules are here.
//!
//! What is not here: HTTP (the host launcher fetches and serves), the trust policy's syntax
//! ([`crate::trust::LogPolicy`]).

pub mod entry;
pub mod monitor;
pub mod note;
pub mod proof;
pub mod source;
pub mod tiles;
#[cfg(feature = "producer")]
pub mod witness;
#[cfg(feature = "producer")]
pub mod writer;

use std::path::PathBuf;

pub use entry::LogEntry;
pub use note::{Checkpoint, CosignerKey, LogKey, NoteVerifierKey};
pub use proof::{CheckpointHistory, LogView};
pub use tiles::{DirTiles, TileSource};
pub use tlog_tiles::Hash;
#[cfg(feature = "producer")]
pub use writer::{AppendResult, LogWriter};

/// The directory of the log inside a trace store (its URL prefix under `vouch serve`).
pub const LOG_DIR: &str = "log";

/// Why the transparency log could not be read, written or trusted.
#[derive(Debug, thiserror::Error)]
pub enum TlogError {
    /// A file system operation failed.
    #[error("transparency log: {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A resource of the log is missing.
    #[error("transparency log: {0} is missing")]
    Missing(String),
    /// A log entry is malformed or too large.
    #[error("log entry: {0}")]
    Entry(String),
    /// A key is malformed or does not match.
    #[error("transparency log key: {0}")]
    Key(String),
    /// A checkpoint is malformed or its signatures do not satisfy the policy.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// A proof does not check, or the tiles do not produce one.
    #[error("{what}: {problem}")]
    Proof {
        /// Which proof.
        what: String,
        /// What is wrong.
        problem: String,
    },
    /// Two checkpoints of one log cannot both be true: a split view or a rollback.
    #[error("inconsistent checkpoints of {origin}: {problem}")]
    Inconsistent {
        /// The log.
        origin: String,
        /// The two views.
        problem: String,
    },
    /// Something else is malformed.
    #[error("transparency log {path}: {problem}")]
    Corrupt {
        /// The resource.
        path: String,
        /// What is wrong.
        problem: String,
    },
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> TlogError + 'a {
    move |source| TlogError::Io { op, path: path.to_path_buf(), source }
}

/// Hold an exclusive lock on `path` (created if missing) until the returned guard drops: how
/// writers of one log, witnesses and verifiers in several processes take turns.
pub(crate) fn lock_file(
    path: &std::path::Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, TlogError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io_err("lock", path)(e.into()))
}

/// A file name for an origin (state directories keep one file per log): characters other than
/// ASCII alphanumerics, `.`, `-` and `_` become `%XX`, so distinct origins get distinct names.
pub fn origin_file_name(origin: &str) -> String {
    let mut s = String::new();
    for b in origin.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && !s.is_empty()) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_file_names_are_plain_and_distinct() {
        assert_eq!(origin_file_name("ci.example/vouch"), "ci.example%2Fvouch");
        assert_eq!(origin_file_name(".."), "%2E.");
        assert_ne!(origin_file_name("a/b"), origin_file_name("a%2Fb"));
    }
}
