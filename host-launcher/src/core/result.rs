//! What the engine answers a [`super::BuildRequest`] with: a [`BuildResult`], either the step
//! as built, checked and published ([`Built`]: the attester kind of its checked evidence, and
//! for each output the records the publish step signed), or a [`Failure`] with Nix's status
//! and a message naming the cause. Each front-end turns it into its own answer: the Nix
//! protocols' wire `BuildResult`, the CI service's build JSON, `vouch build`'s summary.
//!
//! What is not here: those encodings (`crate::nixproto::action`, `crate::serve::builds`,
//! `crate::cli::build`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use channel::messages::AttesterKind;
use nix_formats::StorePath;

use crate::build::Timings;
use crate::vm::Mode;

/// The answer to a build.
#[derive(Debug, Clone)]
pub enum BuildResult {
    /// Built in a fresh VM, checked, and published.
    Built(Box<Built>),
    /// Not built; nothing of it was registered or published.
    Failed(Failure),
}

impl BuildResult {
    /// A failure.
    pub fn failed(status: FailureStatus, message: impl Into<String>) -> Self {
        BuildResult::Failed(Failure { status, message: message.into() })
    }
}

/// A step built, checked and published.
#[derive(Debug, Clone)]
pub struct Built {
    /// Start (seconds since the epoch).
    pub start_time: u64,
    /// Stop (seconds since the epoch).
    pub stop_time: u64,
    /// Who attested, as the checked evidence says (its root: AMD's, or this host's simulated
    /// one); never inferred from anything else.
    pub attester: AttesterKind,
    /// What verified the evidence (AMD's pinned root, or this host's simulated one, which
    /// proves nothing about hardware), for humans.
    pub evidence_root: String,
    /// The verified MEASUREMENT (hex).
    pub measurement: String,
    /// The mode the VM ran in.
    pub mode: Mode,
    /// Where the step's time went.
    pub timings: Timings,
    /// What the publish step wrote and signed.
    pub published: Published,
}

/// What the publish step wrote: the step's entry in the trace store, and each output with the
/// records signed for it (signed once, by the publish step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The name of the key that signed the records.
    pub key_name: String,
    /// The step's entry directory in the trace store.
    pub step_dir: PathBuf,
    /// The outputs by name (each this build's own, diverged or not).
    pub outputs: BTreeMap<String, PublishedOutput>,
}

/// One output as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedOutput {
    /// The output path.
    pub path: StorePath,
    /// NAR hash and size, references and content address, as the statement says.
    pub info: build_trace::PathInfo,
    /// The signatures of its narinfo (`key:base64`).
    pub narinfo_sigs: BTreeSet<String>,
    /// Signatures over the Nix ≥ 2.35 build-trace fingerprint (content-addressed steps).
    pub signatures: BTreeSet<String>,
    /// The Nix ≤ 2.34 realisation (content-addressed steps).
    pub legacy: Option<LegacyRealisation>,
    /// Set when an entry already published for this output differs from this build (an
    /// input-addressed build that is not reproducible, or a content-addressed one that gave
    /// another path): that entry stays what the cache serves, and the fields above are still
    /// this build's own.
    pub diverged: Option<Diverged>,
}

/// What the cache kept for an output that this build produced differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diverged {
    /// The NAR hash the cache serves for the output's path (its kept narinfo, or the bytes the
    /// content store holds), where that differs from this build's.
    pub published_nar_hash: Option<build_trace::NarHash>,
    /// The output path the kept realisation names (content-addressed steps).
    pub published_path: Option<StorePath>,
}

/// A realisation in the format of Nix ≤ 2.34: its id and its JSON (with signatures).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyRealisation {
    /// `sha256:<hex hash modulo>!<output>`.
    pub id: String,
    /// The realisation JSON as the client stores it.
    pub json: String,
}

/// Why a build was not built: Nix's status and a message naming the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// The status, in Nix's terms.
    pub status: FailureStatus,
    /// What went wrong.
    pub message: String,
}

/// The failure statuses of Nix's `BuildResult` that vouch answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureStatus {
    /// The builder failed.
    PermanentFailure,
    /// An input was rejected.
    InputRejected,
    /// An output was rejected (e.g. a fixed-output hash mismatch, a result that failed the
    /// host's checks).
    OutputRejected,
    /// A failure that may go away on retry (the builder was shutting down).
    TransientFailure,
    /// The build hit a time limit.
    TimedOut,
    /// Anything else.
    MiscFailure,
    /// The log limit was hit.
    LogLimitExceeded,
}

impl FailureStatus {
    /// Nix's name of the status (`PermanentFailure` …).
    pub fn name(self) -> &'static str {
        match self {
            FailureStatus::PermanentFailure => "PermanentFailure",
            FailureStatus::InputRejected => "InputRejected",
            FailureStatus::OutputRejected => "OutputRejected",
            FailureStatus::TransientFailure => "TransientFailure",
            FailureStatus::TimedOut => "TimedOut",
            FailureStatus::MiscFailure => "MiscFailure",
            FailureStatus::LogLimitExceeded => "LogLimitExceeded",
        }
    }
}
