//! One build step: one resolved derivation, one VM that runs it alone, checked results.
//!
//! The engine (`crate::core::Engine`) calls [`run_step`] for every front-end's build; nothing
//! here sees a front-end, QEMU argv or the channel's framing.
//!
//! ```text
//! run_step(req: StepRequest, inputs: &dyn InputSource, log: &mut dyn BuildLog, cfg: &LauncherConfig)
//!     -> Result<StepOutcome, StepError>
//! ```
//! - [`StepRequest`]: the drv path as Nix names it (the *resolved* path for a CA step), the basic
//!   derivation (`build_trace::BasicDerivation`, no `inputDrvs`), the wanted outputs (empty = all),
//!   limits, the client's CA self-reference rule, whether it is the networked fixed-output variant.
//! - [`InputSource`]: path info (NAR hash/size, references, `ca`) and a NAR reader for every path
//!   of the input closure; `run_step` walks the closure from `drv.input_srcs` through the
//!   references. [`nix_store::LocalNixStore`] implements it over the local Nix store; the engine
//!   implements it over the content store.
//! - `BuildLog` (`crate::core::log`): receives the builder's log bytes as they arrive and
//!   `Progress` events.
//! - [`StepOutcome`]: the verified statement, the evidence bundle and what verified it (hence
//!   who attested, [`StepOutcome::attester`]), each output's info and its NAR file (in
//!   `cfg.state_dir/tmp/`, removed when the outcome is dropped unless [`StepOutcome::keep`] moved
//!   it), the phase timings, and the mode.
//!
//! The VM is a warm one from the launcher's pool (`crate::pool`, booted before the job existed)
//! when the job fits it, else one booted for this job ([`launch`]); either way its agent takes
//! exactly this one job and powers off.
//!
//! What `run_step` guarantees: nothing is returned as a success unless the statement is for
//! exactly the launch and job we gave the VM (HOST_DATA recomputed from our launch), the
//! evidence verifies under the host's own expectations (its root — AMD or this host's simulated
//! root —, the image's measurement for the VM's size, HOST_DATA, REPORT_DATA recomputed from the
//! statement), and every output NAR that arrived has
//! the hash, size and (for content-addressed outputs) the content address and path the
//! statement claims. On any failure (builder error, VM killed, timeout, bad evidence) the
//! staging directory is removed and nothing is registered anywhere.
//!
//! What is not here: publishing a checked step (the one publish step, `crate::core::publish`,
//! which only a [`StepOutcome`] can go through), front-ends, QEMU argv (`crate::vm`).

pub mod check;
pub mod conversation;
pub mod host;
pub mod launch;
pub mod nix_db;
pub mod nix_store;
pub mod policy;
pub mod slots;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use build_trace::evidence::{EvidenceBundle, VerifiedEvidence};
use build_trace::job::{BasicDerivation, CaRule, Limits, PathInfo};
use build_trace::statement::{OutputInfo, Statement};
use channel::messages::{AttesterKind, FailureKind};
use nix_formats::StorePath;

use crate::vm::Mode;

pub use host::run_step;

/// What the name of a step's staging directory in `<state dir>/tmp/` starts with.
pub const STAGING_PREFIX: &str = "step-";

/// What to build.
#[derive(Debug, Clone)]
pub struct StepRequest {
    /// The derivation's store path as Nix names it (resolved for a CA step).
    pub drv_path: StorePath,
    /// The basic derivation (no `inputDrvs`).
    pub drv: BasicDerivation,
    /// Outputs wanted; empty means all.
    pub outputs: BTreeSet<String>,
    /// Limits (0 = none / default).
    pub limits: Limits,
    /// The client's self-reference rule for CA output paths.
    pub ca_rule: CaRule,
    /// The networked fixed-output variant (issue 4); refused for anything else.
    pub network: bool,
    /// An id for logs and the job (default: random).
    pub job_id: Option<String>,
}

/// Errors of an [`InputSource`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputSourceError(
    pub String,
    #[source] pub Option<Box<dyn std::error::Error + Send + Sync>>,
);

/// Where input paths come from.
pub trait InputSource: Sync {
    /// Path info of `path`.
    fn path_info(&self, path: &StorePath) -> Result<PathInfo, InputSourceError>;
    /// The NAR of `path`.
    fn nar(&self, path: &StorePath) -> Result<Box<dyn Read + Send + '_>, InputSourceError>;
    /// Path infos of the closure of `roots`, in one go if the source can (default: one
    /// `path_info` per path).
    fn closure(
        &self,
        roots: &BTreeSet<StorePath>,
    ) -> Result<BTreeMap<StorePath, PathInfo>, InputSourceError> {
        let mut out = BTreeMap::new();
        let mut todo: Vec<StorePath> = roots.iter().cloned().collect();
        while let Some(p) = todo.pop() {
            if out.contains_key(&p) {
                continue;
            }
            let info = self.path_info(&p)?;
            todo.extend(info.references.iter().filter(|r| !out.contains_key(*r)).cloned());
            out.insert(p, info);
        }
        Ok(out)
    }
}

/// How the launcher runs VMs.
#[derive(Debug, Clone)]
pub struct LauncherConfig {
    /// The image directory (`manifest.json`, kernels, initrd).
    pub image_dir: PathBuf,
    /// Requested mode (None = automatic).
    pub mode: Option<Mode>,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs (snp: the image must list a measurement for this count).
    pub vcpus: u32,
    /// State directory (simulated root, staging).
    pub state_dir: PathBuf,
    /// Copy the guest console to stderr.
    pub echo_console: bool,
    /// How long the agent may take from QEMU's start to its `Hello` (boot watchdog).
    pub boot_timeout: Duration,
    /// How long the guest may send no frame (it heartbeats every 2 s) or take no input before
    /// the step fails as a stalled channel ([`watch`]).
    pub stall_timeout: Duration,
    /// Automatic retries in a fresh VM after an infrastructure failure (`host::retryable`).
    pub infra_retries: u32,
    /// Extra wall-clock allowance beyond the builder timeout for transfers and hashing.
    pub slack: Duration,
    /// The VCEK (DER) of this host's chip, for SNP evidence.
    pub snp_vcek: Option<PathBuf>,
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Sandbox limits for requests that leave them at 0 (`memory_bytes`, `max_processes`,
    /// `tmpfs_bytes`; zeros here fall back to [`policy::effective_limits`]'s guest-size rules).
    pub default_limits: Limits,
    /// Build fixed-output derivations that declare md5 or sha1 hashes (refused by default).
    pub allow_weak_fixed_hashes: bool,
    /// Where networked (fixed-output) VMs may connect ([`crate::vm::egress`]).
    pub egress: crate::vm::egress::EgressPolicy,
    /// Stops the steps of this launcher (a server shutting down); clones share it.
    pub cancel: Cancel,
    /// Warm VMs for the steps that fit them (`crate::pool`); `None`: every step boots its own.
    pub pool: Option<std::sync::Arc<crate::pool::Pool>>,
    /// Steps at once across every clone ([`slots`]: `vouch serve --jobs`); `None`: no bound
    /// here (one step per process or per connection).
    pub slots: Option<std::sync::Arc<slots::Slots>>,
}

/// A shared stop switch for running steps: once [`Cancel::cancel`] is called, every step whose
/// [`LauncherConfig`] holds a clone of it has its VM killed within a tenth of a second, is not
/// retried, and fails with [`StepError::Cancelled`]; no new step starts. Nothing of a cancelled
/// step is kept. [`Cancel::joined`] makes a switch that also follows others (a session's steps
/// stop when the server shuts down or when their client hangs up).
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The flags of the switches this one follows.
    follows: std::sync::Arc<[std::sync::Arc<std::sync::atomic::AtomicBool>]>,
}

impl Cancel {
    /// Stop every step that shares this switch (or a switch joined with it).
    pub fn cancel(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether [`Cancel::cancel`] was called on this switch or one it follows.
    pub fn is_cancelled(&self) -> bool {
        std::iter::once(&self.flag)
            .chain(self.follows.iter())
            .any(|f| f.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// A new switch, cancelled when it is cancelled itself or when `self` or `other` is.
    /// Cancelling it stops neither `self` nor `other`.
    pub fn joined(&self, other: &Cancel) -> Cancel {
        let mut follows = vec![self.flag.clone(), other.flag.clone()];
        follows.extend(self.follows.iter().chain(other.follows.iter()).cloned());
        Cancel { flag: Default::default(), follows: follows.into() }
    }
}

impl LauncherConfig {
    /// Defaults for `image_dir` and `state_dir`.
    pub fn new(image_dir: PathBuf, state_dir: PathBuf) -> Self {
        LauncherConfig {
            image_dir,
            mode: None,
            memory_mib: 2048,
            vcpus: 1,
            state_dir,
            echo_console: false,
            boot_timeout: Duration::from_secs(120),
            stall_timeout: watch::DEFAULT_STALL_TIMEOUT,
            infra_retries: 1,
            slack: Duration::from_secs(600),
            snp_vcek: None,
            qemu: "qemu-system-x86_64".into(),
            default_limits: Limits::default(),
            allow_weak_fixed_hashes: false,
            egress: Default::default(),
            cancel: Cancel::default(),
            pool: None,
            slots: None,
        }
    }

    /// The simulated root's directory in the state directory.
    pub fn simulated_root_dir(&self) -> PathBuf {
        self.state_dir.join("simulated-snp")
    }
}

/// Per-phase wall-clock times, measured on the host when the guest's frames arrived.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// QEMU start → agent hello.
    pub boot: Duration,
    /// Hello → ready: the setup and launch received, the launch checked against the VM and
    /// HOST_DATA, the attester ready (for simulated evidence, its key loaded). For a warm VM,
    /// before the job existed.
    pub launch: Duration,
    /// Job sent → job accepted: the job received, parsed, validated and admitted by the launch.
    pub job_setup: Duration,
    /// Job accepted → inputs received, unpacked and checked in the guest.
    pub input_transfer: Duration,
    /// Builder start → builder exit.
    pub build: Duration,
    /// Hashing outputs (guest).
    pub hashing: Duration,
    /// Getting the report.
    pub attestation: Duration,
    /// Output NARs and outcome received.
    pub output_transfer: Duration,
    /// Host-side checks.
    pub verification: Duration,
    /// QEMU start → QEMU exit.
    pub total: Duration,
    /// NAR bytes of the inputs sent.
    pub input_bytes: u64,
    /// NAR bytes of the outputs received.
    pub output_bytes: u64,
    /// Guest uptime when the agent said hello (the guest's own clock: boot to ready).
    pub guest_ready_uptime: Duration,
    /// The VM was a warm pool VM (booted before the job).
    pub warm: bool,
    /// `run_step` called → the job sent to a ready VM (a cold boot, or nearly nothing warm).
    pub vm_wait: Duration,
    /// `run_step` called → outcome checked and QEMU gone: the step's latency.
    pub latency: Duration,
    /// Host checks done → QEMU exited (the guest's sync and power-off after `Bye`, what of it
    /// the checks did not hide).
    pub power_off: Duration,
}

/// One output as received and checked.
#[derive(Debug, Clone)]
pub struct ReceivedOutput {
    /// What the statement says about it.
    pub info: OutputInfo,
    /// Its NAR, as received.
    pub nar_file: PathBuf,
}

/// A checked step.
#[derive(Debug)]
pub struct StepOutcome {
    /// The statement (its job is exactly the one launched).
    pub statement: Statement,
    /// The canonical statement bytes as received.
    pub statement_bytes: Vec<u8>,
    /// The evidence.
    pub evidence: EvidenceBundle,
    /// What the evidence was verified as.
    pub verified: VerifiedEvidence,
    /// Outputs by name.
    pub outputs: BTreeMap<String, ReceivedOutput>,
    /// Where the NAR files are (removed on drop unless kept).
    pub staging: Option<PathBuf>,
    /// The mode the VM ran in.
    pub mode: Mode,
    /// Timings.
    pub timings: Timings,
}

impl StepOutcome {
    /// Who attested, as the checked evidence says: simulated when this host's simulated root
    /// verified it, SEV-SNP when AMD's did.
    pub fn attester(&self) -> AttesterKind {
        if self.verified.is_simulated() {
            AttesterKind::Simulated
        } else {
            AttesterKind::SevSnp
        }
    }

    /// Keep the staging directory (the caller moved or consumed the NAR files).
    pub fn keep(&mut self) -> Option<PathBuf> {
        self.staging.take()
    }
}

impl Drop for StepOutcome {
    fn drop(&mut self) {
        if let Some(dir) = self.staging.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The request is unusable.
    #[error("invalid build request: {0}")]
    Request(String),
    /// The input closure could not be read.
    #[error("reading the input closure")]
    Inputs(#[source] InputSourceError),
    /// The image is missing or damaged.
    #[error("guest image in {0}")]
    Image(PathBuf, #[source] vm_image::image::ImageError),
    /// No suitable mode.
    #[error(transparent)]
    Mode(#[from] crate::vm::ModeError),
    /// SNP mode, but a host check fails (`crate::snp::checks::preflight`): no VM was started.
    #[error(transparent)]
    Preflight(#[from] crate::snp::checks::PreflightError),
    /// The vsock backend.
    #[error("setting up the guest channel")]
    Vsock(#[from] crate::vm::vsock::VsockError),
    /// The networked VM's namespace could not be set up (or this host cannot).
    #[error(transparent)]
    Egress(#[from] crate::vm::egress::EgressError),
    /// QEMU could not be started.
    #[error("starting QEMU ({0})")]
    Qemu(String, #[source] std::io::Error),
    /// QEMU exited before the agent connected.
    #[error("the VM {status} before its agent connected; nothing was registered; QEMU said: {qemu}; console:\n{console}")]
    NoAgent {
        /// How QEMU ended.
        status: String,
        /// QEMU's stderr.
        qemu: String,
        /// Last console lines.
        console: String,
    },
    /// The VM died mid-step (killed, crashed).
    #[error("the VM {status} during the step (phase: {phase}); nothing was registered; console:\n{console}")]
    VmDied {
        /// How QEMU ended.
        status: String,
        /// Last phase reached.
        phase: String,
        /// Last console lines.
        console: String,
    },
    /// The channel went silent (or the guest stopped taking input, or never said hello): the
    /// VM was killed.
    #[error("{trip} (phase: {phase}); killed the VM; nothing was registered; console:\n{console}")]
    Stalled {
        /// What the channel watch saw.
        trip: watch::Trip,
        /// Last phase reached.
        phase: String,
        /// Last console lines.
        console: String,
    },
    /// The host watchdog killed the VM.
    #[error("the VM did not finish within {0:?} (builder timeout plus allowance); killed it; nothing was registered")]
    Watchdog(Duration),
    /// The channel broke or the guest violated the protocol.
    #[error("guest channel")]
    Channel(#[from] channel::proto::ProtoError),
    /// The agent reported a failure.
    #[error("build failed in the VM ({kind:?}): {message}")]
    Guest {
        /// Category.
        kind: FailureKind,
        /// The agent's message.
        message: String,
    },
    /// The result did not pass the host's checks.
    #[error("the VM's result was rejected")]
    Rejected(#[from] check::CheckError),
    /// Local file trouble.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// The launcher was stopped ([`Cancel`]: a server shutting down, a client that hung up)
    /// while the step ran or before it started.
    #[error("the builder is shutting down (or the client went away): the step was stopped and its VM killed; nothing was registered")]
    Cancelled,
}

impl StepError {
    /// The guest's failure kind, if the agent reported one.
    pub fn guest_kind(&self) -> Option<FailureKind> {
        match self {
            StepError::Guest { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// Make a staging directory for one step under `state_dir/tmp`: `step-<pid>-<start ticks>-<job
/// id>`, named after this process so that start-up recovery removes it once the process is gone
/// (`crate::recovery`).
pub(crate) fn staging_dir(state_dir: &Path, job_id: &str) -> Result<PathBuf, StepError> {
    let owner = crate::store::owner::ProcessId::current().tag();
    let dir = state_dir.join("tmp").join(format!("{STAGING_PREFIX}{owner}-{job_id}"));
    std::fs::create_dir_all(&dir)
        .map_err(|e| StepError::Io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}
