//! The launch: what the host fixes when it starts a VM, before any job exists; its HOST_DATA.
//!
//! # API (for the launcher, the agent and the verifier)
//! ```text
//! Launch { v, nonce: Hex32, vcpus, memory_mib, network, job: Option<Hex32> }
//! Launch::new(nonce, vcpus, memory_mib, network) -> Launch          // v = 1, any job
//! launch.for_job(&job) -> Result<Launch, JobError>                  // bound to one job digest
//! launch.validate() / launch.admits(&job) -> Result<(), LaunchError>
//! launch.canonical_bytes() / Launch::from_canonical_bytes(&[u8])
//! launch.host_data() -> Result<[u8; 32], LaunchError>   // SHA-256(LAUNCH_TAG ‖ canonical)
//! host_data_of(&canonical_launch_bytes) -> [u8; 32]
//! Hex32([u8; 32])   — 64 lowercase hex digits on the wire (nonce, job digest)
//! ```
//! Algorithm. A VM is launched before the job it will run is known (a warm pool), so HOST_DATA
//! cannot be the job's hash. It is the hash of this document instead: a fresh 32-byte random
//! **nonce** chosen by the host for this launch alone, and the VM's configuration that the
//! measurement does not cover (vCPU count — the simulated measurement has none —, memory, whether
//! a NIC is attached). A VM launched for one known job (on demand) also names that job's digest,
//! which keeps today's binding for it. The measured agent checks, before it takes any job, that
//! the launch document hashes to the HOST_DATA of its own first report and describes the VM it
//! runs in; then it takes exactly **one** job that the launch admits ([`Launch::admits`]), and
//! powers off. The statement carries the launch next to the job, so a verifier recomputes
//! HOST_DATA from the statement alone, and rejects two different statements that carry the same
//! nonce (one VM that ran two jobs): `docs/threat-model.md`, `crate::verify`.
//!
//! What is not here: the job ([`crate::job`]), the statement ([`crate::statement`]), or choosing
//! nonces (the launcher takes them from the OS's random generator).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::canonical::{self, CanonicalError};
use crate::job::{Job, JobError};

/// The launch format version this code writes and accepts.
pub const LAUNCH_VERSION: u64 = 1;

/// Domain-separation tag of HOST_DATA (statement version 2 on):
/// `HOST_DATA = SHA-256(LAUNCH_TAG ‖ canonical(launch))`.
pub const LAUNCH_TAG: &[u8] = b"vouch.launch.v1\0";

const MIB: u64 = 1 << 20;

/// Why a launch document is malformed, or does not admit a job.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The canonical encoding failed or the bytes were not canonical.
    #[error("launch encoding")]
    Encoding(#[source] CanonicalError),
    /// A version this code does not know.
    #[error("launch format version {0} is not supported (this build knows {LAUNCH_VERSION})")]
    Version(u64),
    /// A field has a bad value.
    #[error("launch field `{field}`: {problem}")]
    Field {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The job's digest could not be computed.
    #[error("the job")]
    Job(#[source] JobError),
    /// The job does not fit this launch.
    #[error("the job does not fit this VM's launch: {0}")]
    NotAdmitted(String),
}

/// 32 bytes, written as 64 lowercase hex digits: a launch nonce or a job digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hex32(pub [u8; 32]);

impl fmt::Display for Hex32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Hex32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Hex32 {
    type Err = String;
    fn from_str(s: &str) -> Result<Hex32, String> {
        if s.len() != 64 || s.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(format!("`{s}` is not 64 lowercase hex digits"));
        }
        let mut b = [0u8; 32];
        hex::decode_to_slice(s, &mut b).map_err(|e| format!("`{s}`: {e}"))?;
        Ok(Hex32(b))
    }
}

crate::serde_str::string_form!(Hex32);

/// What the host fixed when it launched one VM. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Launch {
    /// The job digest, for a VM launched for one known job (on demand); absent for a pool VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Hex32>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Whether the VM has a NIC (only for a networked fixed-output job).
    pub network: bool,
    /// 32 random bytes the host chose for this launch alone.
    pub nonce: Hex32,
    /// Format version ([`LAUNCH_VERSION`]).
    pub v: u64,
    /// The VM's vCPU count.
    pub vcpus: u64,
}

impl Launch {
    /// A version-1 launch for any job that fits it.
    pub fn new(nonce: [u8; 32], vcpus: u64, memory_mib: u64, network: bool) -> Launch {
        Launch { job: None, memory_mib, network, nonce: Hex32(nonce), v: LAUNCH_VERSION, vcpus }
    }

    /// The same launch, admitting only `job` (a VM booted on demand for it).
    pub fn for_job(mut self, job: &Job) -> Result<Launch, JobError> {
        self.job = Some(Hex32(job.digest()?));
        Ok(self)
    }

    /// The canonical bytes of this launch.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, LaunchError> {
        canonical::to_vec(self).map_err(LaunchError::Encoding)
    }

    /// Parse canonical bytes (anything else is refused) and check the fields.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Launch, LaunchError> {
        let launch: Launch = canonical::from_slice(bytes).map_err(LaunchError::Encoding)?;
        launch.validate()?;
        Ok(launch)
    }

    /// `SHA-256(LAUNCH_TAG ‖ canonical(launch))`: the 32 bytes fixed at VM launch.
    pub fn host_data(&self) -> Result<[u8; 32], LaunchError> {
        Ok(host_data_of(&self.canonical_bytes()?))
    }

    /// Version, at least one vCPU and one MiB.
    pub fn validate(&self) -> Result<(), LaunchError> {
        if self.v != LAUNCH_VERSION {
            return Err(LaunchError::Version(self.v));
        }
        let field = |field, problem: &str| LaunchError::Field { field, problem: problem.into() };
        if self.vcpus == 0 {
            return Err(field("vcpus", "is 0"));
        }
        if self.memory_mib == 0 {
            return Err(field("memory_mib", "is 0"));
        }
        Ok(())
    }

    /// Whether this launch admits `job`: the same `network`, the job's digest if the launch
    /// names one, and a builder memory limit within the VM's memory.
    pub fn admits(&self, job: &Job) -> Result<(), LaunchError> {
        let no = |s: String| Err(LaunchError::NotAdmitted(s));
        if job.network != self.network {
            return no(format!(
                "the job's `network` is {}, the VM was launched with `network` {}",
                job.network, self.network
            ));
        }
        if let Some(want) = self.job {
            let got = Hex32(job.digest().map_err(LaunchError::Job)?);
            if got != want {
                return no(format!("the VM was launched for job {want}, this job is {got}"));
            }
        }
        if job.limits.memory_bytes > self.memory_mib.saturating_mul(MIB) {
            return no(format!(
                "its memory limit of {} MiB exceeds the VM's {} MiB",
                job.limits.memory_bytes.div_ceil(MIB),
                self.memory_mib
            ));
        }
        Ok(())
    }
}

/// HOST_DATA of a launch given as canonical bytes (the caller has checked they are canonical).
pub fn host_data_of(canonical_launch: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LAUNCH_TAG);
    h.update(canonical_launch);
    h.finalize().into()
}
