//! What the host knows about one store path ([`ValidPathInfo`]), and a batch of paths with their
//! NARs arriving from somewhere ([`UploadSource`]): what the content store checks and keeps, the
//! Nix protocols read and write, and the HTTP front-end makes from a narinfo.
//!
//! What is not here: encodings (`crate::nixproto::types`, narinfos in `nix_formats`), the checks
//! an upload goes through (`crate::store`).

use std::collections::BTreeSet;
use std::io::Read;

use nix_formats::StorePath;

/// What the host knows about one store path: Nix's `ValidPathInfo`. What it says about the
/// contents (NAR hash and size, references, content address) is a [`build_trace::PathInfo`],
/// the same record a job's input closure holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPathInfo {
    /// The path.
    pub path: StorePath,
    /// Its contents: NAR hash and size, references (itself included when self-referencing),
    /// and the content address it claims, if any.
    pub info: build_trace::PathInfo,
    /// The derivation that built it, if known.
    pub deriver: Option<StorePath>,
    /// When it was registered (seconds since the epoch; informational).
    pub registration_time: u64,
    /// Whether the sender built it itself (informational; we never trust it).
    pub ultimate: bool,
    /// Signatures `key:base64` (informational; uploads are checked by content, not by these).
    pub sigs: BTreeSet<String>,
}

/// Why an [`UploadSource`] could not give the next path (the wire broke, a file is missing).
pub type UploadError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The NARs of an upload (one path or a batch), read as the content store consumes them: from a
/// Nix protocol stream, an HTTP upload's staged file, or a build's output files.
pub trait UploadSource {
    /// The next path's info, or `None` after the last. After it, [`UploadSource::nar`] yields
    /// exactly `info.nar_size` bytes (the source enforces the bound).
    fn next_path(&mut self) -> Result<Option<ValidPathInfo>, UploadError>;
    /// The current path's NAR bytes.
    fn nar(&mut self) -> &mut dyn Read;
}
