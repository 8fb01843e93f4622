//! The content store's errors: [`StoreError`] for an operation, [`UploadProblem`] for what was
//! wrong with one uploaded path.

use std::path::PathBuf;

use build_trace::NarHash;
use nix_formats::StorePath;

use crate::core::UploadError;

/// What was wrong with one uploaded path.
#[derive(Debug, thiserror::Error)]
pub enum UploadProblem {
    /// Declared larger than the whole store may be.
    #[error("its NAR ({size} bytes) is larger than the content store's bound ({max} bytes)")]
    TooLarge {
        /// Declared size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// Not a valid NAR within its declared size.
    #[error("its NAR is not valid within the declared size of {declared_size} bytes (received {received})")]
    BadNar {
        /// Declared size.
        declared_size: u64,
        /// Bytes received.
        received: u64,
        /// The parser's complaint.
        #[source]
        source: nix_formats::nar::NarError,
    },
    /// Fewer bytes than declared.
    #[error("its NAR has {actual} bytes, the client declared {declared}")]
    SizeMismatch {
        /// Declared.
        declared: u64,
        /// Received.
        actual: u64,
    },
    /// Wrong NAR hash.
    #[error("NAR hash mismatch: the client declared {declared}, the NAR it sent has {actual}")]
    HashMismatch {
        /// Declared.
        declared: NarHash,
        /// Computed.
        actual: NarHash,
    },
    /// The `ca` field does not parse.
    #[error("its content address does not parse")]
    BadContentAddress(#[source] nix_formats::content_address::ContentAddressParseError),
    /// The contents or path do not match the claimed content address.
    #[error("it claims content address `{ca}`, which its contents do not reproduce")]
    ContentAddress {
        /// The claim.
        ca: String,
        /// Why.
        #[source]
        source: nix_formats::content_address::VerifyError,
    },
    /// A reference that is neither valid here nor in the same upload.
    #[error("it references {reference}, which is neither in vouch's content store nor in the same upload")]
    MissingReference {
        /// The reference.
        reference: StorePath,
    },
    /// Neither content-addressed nor signed by a trusted key, from a client the operator does
    /// not trust (`session`'s rule).
    #[error(
        "it has neither a content address nor a signature by a key this builder trusts \
         (--trusted-public-key), and this client is not trusted (--trusted-user, --trusted): an \
         untrusted client may upload only paths whose content address vouch recomputes or that a \
         trusted key signed, so that no client can place other bytes under a path that another \
         client's build uses"
    )]
    NotTrusted,
    /// Meant for a session's private overlay, in a session that has none.
    #[error("it cannot be registered privately: this session has no overlay (its client is not trusted)")]
    NoPrivateLayer,
}

/// Why a content store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The index.
    #[error("content store index ({context})")]
    Db {
        /// What was being done.
        context: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A file operation.
    #[error("content store: {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An upload was refused (nothing of its batch was registered).
    #[error("upload of {path} refused (nothing of this upload was registered)")]
    Upload {
        /// The path.
        path: StorePath,
        /// What was wrong.
        #[source]
        problem: Box<UploadProblem>,
    },
    /// Reading the upload from the client failed.
    #[error("receiving the upload; nothing of it was registered")]
    Source(#[source] UploadError),
    /// Pinned paths leave no room.
    #[error("the content store is full: {needed} more bytes do not fit in {max} ({used} used, {pinned} pinned by running builds and sessions); nothing was registered")]
    Full {
        /// Bytes wanted.
        needed: u64,
        /// The bound.
        max: u64,
        /// Bytes in use.
        used: u64,
        /// Bytes pinned.
        pinned: u64,
    },
    /// A path that should be valid is not.
    #[error("{path} is not in vouch's content store")]
    Missing {
        /// The path.
        path: StorePath,
    },
    /// A session's overlay has no room.
    #[error("this session's private uploads would exceed {max} bytes ({used} used, {needed} more); nothing was registered")]
    OverlayFull {
        /// Bytes wanted.
        needed: u64,
        /// Bytes in the overlay.
        used: u64,
        /// The bound.
        max: u64,
    },
}

pub(super) fn dbe(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Db { context, source }
}
