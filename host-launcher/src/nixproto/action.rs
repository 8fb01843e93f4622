//! What a Nix client asks of a remote builder, independent of the wire: the [`Action`] enum the
//! front-ends (`worker`, `serve`) parse requests into, the [`Reply`] the session returns, and the
//! [`Handler`] trait the session (`crate::nixbuilder`) implements. The session never sees the
//! wire.
//!
//! What is here: the actions and replies and the Nix records only the protocols have
//! ([`BuildDerivation`], [`BuildOptions`], [`ClientOptions`], the wire [`BuildResult`] and the
//! conversion of the core's result into it). The host's own records (path infos, uploads, build
//! requests and results, the build log) are `crate::core`'s.
//!
//! What is not here: encodings (`types`), handshakes and loops (`worker`, `serve`), the session
//! itself (`crate::nixbuilder`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use nix_formats::StorePath;

use super::version::ClientProfile;
use crate::core::{self, BuildLog, LegacyRealisation, UploadSource, ValidPathInfo};

/// The build options of the serve protocol (`BuildDerivation`, `BuildPaths`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuildOptions {
    /// Seconds without log output before the build is killed (0 = none).
    pub max_silent_time: u64,
    /// Wall-clock seconds before the build is killed (0 = none).
    pub build_timeout: u64,
    /// Most log bytes (0 = none; serve ≥ 2.2).
    pub max_log_size: u64,
    /// Extra rounds for determinism checks (serve ≥ 2.3; we build once).
    pub nr_repeats: u64,
    /// Whether to fail on non-determinism (serve ≥ 2.3).
    pub enforce_determinism: bool,
    /// Keep the build directory of a failed build (serve ≥ 2.7; a VM keeps nothing).
    pub keep_failed: bool,
}

/// The settings a worker-protocol client sends with `SetOptions` (op 19).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientOptions {
    /// `keep-failed`.
    pub keep_failed: bool,
    /// `keep-going`.
    pub keep_going: bool,
    /// `fallback`.
    pub try_fallback: bool,
    /// Client verbosity (0 error … 7 vomit).
    pub verbosity: u64,
    /// `max-jobs`.
    pub max_build_jobs: u64,
    /// `max-silent-time` in seconds.
    pub max_silent_time: u64,
    /// `print-build-logs`.
    pub verbose_build: bool,
    /// `cores`.
    pub build_cores: u64,
    /// `substitute`.
    pub use_substitutes: bool,
    /// Every other setting the client overrides, by name.
    pub overrides: BTreeMap<String, String>,
}

/// Nix's build mode (worker `BuildDerivation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    /// Build.
    Normal,
    /// Rebuild and repair.
    Repair,
    /// Rebuild and compare.
    Check,
}

/// The arguments of `BuildDerivation` (worker 36, serve 8), and what the handshake established
/// about the client that sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildDerivation {
    /// The derivation path the client named (resolved for content-addressed derivations).
    pub drv_path: StorePath,
    /// The basic derivation it sent.
    pub drv: build_trace::BasicDerivation,
    /// The build mode (serve: always normal).
    pub mode: BuildMode,
    /// Per-build options (serve protocol); `None` over the worker protocol, where the session's
    /// `SetOptions` (if any) and vouch's defaults apply.
    pub options: Option<BuildOptions>,
    /// What the handshake established about the client (its realisation format and the
    /// self-reference rule it will re-check our output paths with).
    pub client: ClientProfile,
}

/// What a client asks `BuildPaths` for (Nix's `DerivedPath`, as the worker protocol writes it:
/// `PATH`, or `DRV!OUTPUTS` with `^` accepted for `!`, OUTPUTS being `*` or names joined by
/// `,`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivedPath {
    /// A store path that must be valid.
    Opaque(StorePath),
    /// Outputs of a derivation (`None`: all of them).
    Built {
        /// The `.drv`.
        drv: StorePath,
        /// The outputs wanted; `None` for `*`.
        outputs: Option<BTreeSet<String>>,
    },
}

impl DerivedPath {
    /// Parse one derived path; the error says what is wrong.
    pub fn parse(s: &str) -> Result<DerivedPath, String> {
        let bad = |e: nix_formats::store_path::StorePathError| format!("`{s}`: {e}");
        match s.split_once(['!', '^']) {
            None => StorePath::parse(s).map(DerivedPath::Opaque).map_err(bad),
            Some((drv, outs)) => {
                let drv = StorePath::parse(drv).map_err(bad)?;
                if !drv.name().ends_with(".drv") {
                    return Err(format!("`{s}`: {drv} is not a derivation"));
                }
                let outputs = match outs {
                    "*" => None,
                    "" => return Err(format!("`{s}` names no outputs")),
                    names => Some(names.split(',').map(str::to_owned).collect()),
                };
                Ok(DerivedPath::Built { drv, outputs })
            }
        }
    }
}

/// Nix's `BuildResult::Status` codes (same numbers in both protocols).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u64)]
pub enum BuildStatus {
    /// Built now.
    Built = 0,
    /// Substituted.
    Substituted = 1,
    /// Already valid.
    AlreadyValid = 2,
    /// The builder failed.
    PermanentFailure = 3,
    /// An input was rejected.
    InputRejected = 4,
    /// An output was rejected (e.g. a fixed-output hash mismatch).
    OutputRejected = 5,
    /// A failure that may go away on retry.
    TransientFailure = 6,
    /// A cached failure.
    CachedFailure = 7,
    /// The build hit a time limit.
    TimedOut = 8,
    /// Anything else.
    MiscFailure = 9,
    /// A dependency failed.
    DependencyFailed = 10,
    /// The log limit was hit.
    LogLimitExceeded = 11,
    /// Rebuilds differed.
    NotDeterministic = 12,
    /// Resolved to an already valid derivation.
    ResolvesToAlreadyValid = 13,
    /// No substituters.
    NoSubstituters = 14,
}

impl BuildStatus {
    /// The status for a wire code.
    pub fn from_code(code: u64) -> Option<Self> {
        use BuildStatus::*;
        Some(match code {
            0 => Built,
            1 => Substituted,
            2 => AlreadyValid,
            3 => PermanentFailure,
            4 => InputRejected,
            5 => OutputRejected,
            6 => TransientFailure,
            7 => CachedFailure,
            8 => TimedOut,
            9 => MiscFailure,
            10 => DependencyFailed,
            11 => LogLimitExceeded,
            12 => NotDeterministic,
            13 => ResolvesToAlreadyValid,
            14 => NoSubstituters,
            _ => return None,
        })
    }

    /// Whether this is a success.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// One built output as a `BuildResult` carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltOutput {
    /// The output path.
    pub out_path: StorePath,
    /// Signatures over the Nix ≥ 2.35 fingerprint (`key:base64`).
    pub signatures: BTreeSet<String>,
    /// The Nix ≤ 2.34 record, for clients that read that format.
    pub legacy: Option<LegacyRealisation>,
}

/// The answer to a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// Outcome.
    pub status: BuildStatus,
    /// Why it failed (empty on success).
    pub error_msg: String,
    /// How often it was built.
    pub times_built: u64,
    /// Whether rebuilds differed.
    pub is_non_deterministic: bool,
    /// Start (seconds since the epoch).
    pub start_time: u64,
    /// Stop (seconds since the epoch).
    pub stop_time: u64,
    /// User CPU time in µs (worker ≥ 1.37).
    pub cpu_user: Option<i64>,
    /// System CPU time in µs (worker ≥ 1.37).
    pub cpu_system: Option<i64>,
    /// Built outputs by output name.
    pub built_outputs: BTreeMap<String, BuiltOutput>,
}

impl From<core::FailureStatus> for BuildStatus {
    fn from(s: core::FailureStatus) -> Self {
        use core::FailureStatus as F;
        match s {
            F::PermanentFailure => BuildStatus::PermanentFailure,
            F::InputRejected => BuildStatus::InputRejected,
            F::OutputRejected => BuildStatus::OutputRejected,
            F::TransientFailure => BuildStatus::TransientFailure,
            F::TimedOut => BuildStatus::TimedOut,
            F::MiscFailure => BuildStatus::MiscFailure,
            F::LogLimitExceeded => BuildStatus::LogLimitExceeded,
        }
    }
}

/// The wire result of a core result: built once, by the time the step took, with each output's
/// signed records (both realisation formats; the encoder picks the client's).
impl From<&core::BuildResult> for BuildResult {
    fn from(r: &core::BuildResult) -> Self {
        match r {
            core::BuildResult::Failed(f) => BuildResult::failure(f.status.into(), &f.message),
            core::BuildResult::Built(b) => BuildResult {
                status: BuildStatus::Built,
                error_msg: String::new(),
                times_built: 1,
                // An output differs from the entry already published for its path.
                is_non_deterministic: b.published.outputs.values().any(|o| o.diverged.is_some()),
                start_time: b.start_time,
                stop_time: b.stop_time,
                cpu_user: None,
                cpu_system: None,
                built_outputs: b
                    .published
                    .outputs
                    .iter()
                    .map(|(name, o)| {
                        let out = BuiltOutput {
                            out_path: o.path.clone(),
                            signatures: o.signatures.clone(),
                            legacy: o.legacy.clone(),
                        };
                        (name.clone(), out)
                    })
                    .collect(),
            },
        }
    }
}

impl BuildResult {
    /// A failure with a message and nothing built.
    pub fn failure(status: BuildStatus, msg: impl Into<String>) -> Self {
        BuildResult {
            status,
            error_msg: msg.into(),
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            cpu_user: None,
            cpu_system: None,
            built_outputs: BTreeMap::new(),
        }
    }
}

/// A NAR the session hands back for `NarFromPath` / `DumpStorePath`.
pub struct NarStream {
    /// Its size in bytes.
    pub size: u64,
    /// The bytes.
    pub reader: Box<dyn Read + Send>,
}

impl std::fmt::Debug for NarStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NarStream").field("size", &self.size).finish_non_exhaustive()
    }
}

/// One client request, parsed.
pub enum Action<'a> {
    /// Worker `SetOptions`.
    SetOptions(ClientOptions),
    /// Which of these paths are valid here (worker 31, serve 1).
    QueryValidPaths {
        /// The paths asked about.
        paths: BTreeSet<StorePath>,
        /// Whether the client allows substitution (we never substitute).
        substitute: bool,
    },
    /// Info about one path (worker 26; serve 2 asks per path).
    QueryPathInfo(StorePath),
    /// Upload paths (worker 39/44, serve 9).
    AddToStore {
        /// Whether the client asked for repair.
        repair: bool,
        /// The paths and their NARs.
        uploads: &'a mut dyn UploadSource,
    },
    /// A path's NAR (worker 38, serve 3).
    NarFromPath(StorePath),
    /// The closure of valid paths (serve 7): `Reply::ValidPaths` with every path of it.
    QueryClosure(BTreeSet<StorePath>),
    /// Build one basic derivation (worker 36, serve 8).
    BuildDerivation(Box<BuildDerivation>),
    /// Make derived paths valid, building derivations from their `.drv` closure in the content
    /// store (worker 9 and 46): [`Reply::BuiltPaths`] with one result per path, in order.
    BuildPaths {
        /// The paths.
        wanted: Vec<DerivedPath>,
        /// The build mode.
        mode: BuildMode,
        /// What the handshake established about the client.
        client: ClientProfile,
    },
}

impl std::fmt::Debug for Action<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::SetOptions(o) => f.debug_tuple("SetOptions").field(o).finish(),
            Action::QueryValidPaths { paths, substitute } => f
                .debug_struct("QueryValidPaths")
                .field("paths", paths)
                .field("substitute", substitute)
                .finish(),
            Action::QueryPathInfo(p) => f.debug_tuple("QueryPathInfo").field(p).finish(),
            Action::AddToStore { repair, .. } => {
                f.debug_struct("AddToStore").field("repair", repair).finish_non_exhaustive()
            }
            Action::NarFromPath(p) => f.debug_tuple("NarFromPath").field(p).finish(),
            Action::QueryClosure(p) => f.debug_tuple("QueryClosure").field(p).finish(),
            Action::BuildDerivation(r) => f.debug_tuple("BuildDerivation").field(r).finish(),
            Action::BuildPaths { wanted, mode, .. } => {
                f.debug_struct("BuildPaths").field("wanted", wanted).field("mode", mode).finish()
            }
        }
    }
}

/// The session's answer to an [`Action`].
#[derive(Debug)]
pub enum Reply {
    /// Done, nothing to return (`SetOptions`, uploads).
    Done,
    /// The valid subset of the paths asked about.
    ValidPaths(BTreeSet<StorePath>),
    /// Path info, or `None` if the path is not valid here.
    PathInfo(Option<Box<ValidPathInfo>>),
    /// A NAR.
    Nar(NarStream),
    /// A build result (failures included: they are answers, not errors), encoded by the
    /// front-end for the client's version.
    Built(Box<core::BuildResult>),
    /// One result per path of [`Action::BuildPaths`], in order.
    BuiltPaths(Vec<BuildResult>),
}

/// An error the session reports to the client (the front-end sends the whole chain).
pub type ActionError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A session: executes actions.
pub trait Handler {
    /// Whether the operator trusts this session's client (the worker handshake tells the client;
    /// Nix ≥ 2.16 then sends input-addressed builds as `BuildPaths` of the `.drv` closure).
    fn trusted(&self) -> bool;
    /// Execute one action. Build failures are `Ok(Reply::Built(..))` with a failure status;
    /// `Err` is for requests that cannot be answered (a bad upload, an unknown path).
    fn handle(&mut self, action: Action<'_>, log: &mut dyn BuildLog) -> Result<Reply, ActionError>;
}

/// `error: cause: cause …` on one line, as the front-ends send errors.
pub(super) use build_trace::error_chain;
