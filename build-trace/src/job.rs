//! The job: what the host asks one VM to build, and its digest.
//!
//! # API (for the launcher and the agent)
//! ```text
//! Job { v, job_id, drv_path: StorePath, drv: BasicDerivation,
//!       closure: BTreeMap<StorePath, PathInfo>, limits: Limits, ca_rule: CaRule, network,
//!       outputs: BTreeSet<String> }
//! Job::new(job_id, drv_path, drv, closure, limits, ca_rule, network, outputs) -> Job   // v = 1
//! job.validate() -> Result<(), JobError>          // structure: names, closure closed, outputs
//! job.kind() -> Result<StepKind, JobError>        // floating CA, fixed output, input addressed
//! job.direct_inputs() -> &BTreeSet<StorePath>     // = drv.input_srcs
//! job.canonical_bytes() -> Result<Vec<u8>, JobError>
//! Job::from_canonical_bytes(&[u8]) -> Result<Job, JobError>   // refuses non-canonical bytes
//! job.digest() -> Result<[u8; 32], JobError>      // SHA-256(JOB_DIGEST_TAG ‖ canonical(job))
//! digest_of(&canonical_job_bytes) -> [u8; 32]     // same, from bytes already canonical
//! BasicDerivation { name, outputs: BTreeMap<String, DrvOutput>, input_srcs: BTreeSet<StorePath>,
//!                   system, builder, args, env }
//! BasicDerivation::from_derivation(name, &nix_formats Derivation) / .to_derivation() / .drv_path()
//! DrvOutput { path: Option<StorePath>, hash_algo, hash }  // the ATerm triple; None is ""
//! PathInfo { nar_hash: NarHash, nar_size, references: BTreeSet<StorePath>, ca: Option<String> }
//! CaRule <-> nix_formats::ca::SelfRefRule (From both ways; the only conversion)
//! NarHash([u8; 32])  — "sha256:<nix32>" on the wire;  NarHash::of(bytes)
//! ```
//! The job is serde-(de)serialisable; its canonical bytes (see [`crate::canonical`]) are what
//! gets hashed and what goes over the wire. Store paths are [`StorePath`]s, on the wire their
//! absolute path as a string; they are parsed once, while deserialising, and a malformed one is
//! refused there with the member named. `docs/job-and-statement.md` defines every field.
//!
//! The derivation is the **basic** derivation the step builds (no `inputDrvs`): for a
//! content-addressed step the resolved derivation, and `drv_path` its (resolved) store path;
//! for an input-addressed step the basic derivation Nix sent (its `input_srcs` are the whole
//! input closure, as Nix's build hook sends them) and `drv_path` the unresolved path Nix gave.
//!
//! The job's **digest** names it: a launch made for one known job carries it
//! ([`crate::launch`]), and in version-1 statements it was HOST_DATA itself.
//!
//! What is not here: the VM it runs in (the launch, [`crate::launch`]), what the guest found
//! (that is the statement, [`crate::statement`]), ATerm and drv-path computation
//! (`nix-formats`), or any trust decision.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use nix_formats::base32;
use nix_formats::derivation::{Derivation, DerivationOutput};
use nix_formats::StorePath;

use crate::canonical::{self, CanonicalError};

/// The job format version this code writes and accepts.
pub const JOB_VERSION: u64 = 1;

/// Domain-separation tag of the job digest: `digest = SHA-256(JOB_DIGEST_TAG ‖ canonical(job))`
/// (HOST_DATA of version-1 statements).
pub const JOB_DIGEST_TAG: &[u8] = b"vouch.job.v1\0";

/// Why a job is malformed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The canonical encoding failed or the bytes were not canonical.
    #[error("job encoding")]
    Encoding(#[source] CanonicalError),
    /// A version this code does not know.
    #[error("job format version {0} is not supported (this build knows {JOB_VERSION})")]
    Version(u64),
    /// A field has a bad value.
    #[error("job field `{field}`: {problem}")]
    Field {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

fn field_err(field: &'static str, problem: impl Into<String>) -> JobError {
    JobError::Field { field, problem: problem.into() }
}

/// A SHA-256 NAR hash. On the wire: `sha256:` followed by the 52-character nix32 form, as in a
/// narinfo's `NarHash` and `nix-store --query --hash`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NarHash(pub [u8; 32]);

impl NarHash {
    /// The SHA-256 of `bytes` (a whole NAR).
    pub fn of(bytes: &[u8]) -> NarHash {
        NarHash(Sha256::digest(bytes).into())
    }
}

impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", base32::encode(&self.0))
    }
}

impl fmt::Debug for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for NarHash {
    type Err = String;
    fn from_str(s: &str) -> Result<NarHash, String> {
        let rest = s
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("`{s}` does not start with `sha256:`"))?;
        let digest = base32::decode_fixed::<32>(rest)
            .map_err(|e| format!("`{s}` is not sha256:<nix32>: {e}"))?;
        Ok(NarHash(digest))
    }
}

crate::serde_str::string_form!(NarHash);

/// One output of a basic derivation: the three strings of its ATerm form, the path parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrvOutput {
    /// The output path: set for input-addressed and fixed outputs, `None` (`""` on the wire, as
    /// in the ATerm) for floating CA.
    #[serde(with = "empty_is_none")]
    pub path: Option<StorePath>,
    /// `""` (input-addressed), or `[r:|text:]<algo>` (content-addressed).
    pub hash_algo: String,
    /// The fixed output hash in hex, `""` unless fixed-output.
    pub hash: String,
}

/// A basic derivation (no `inputDrvs`), field for field as in its ATerm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicDerivation {
    /// The derivation name (the drv path's name without `.drv`).
    pub name: String,
    /// Outputs by name.
    pub outputs: BTreeMap<String, DrvOutput>,
    /// Input store paths.
    pub input_srcs: BTreeSet<StorePath>,
    /// `system`, e.g. `x86_64-linux`.
    pub system: String,
    /// The builder program.
    pub builder: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// The environment (structured attributes travel in `__json`, as in the ATerm).
    pub env: BTreeMap<String, String>,
}

impl BasicDerivation {
    /// The job's form of a basic derivation named `name` (Nix keeps the name outside the ATerm).
    /// Refuses a derivation that still has input derivations.
    pub fn from_derivation(name: &str, drv: &Derivation) -> Result<BasicDerivation, JobError> {
        if !drv.input_drvs.is_empty() {
            return Err(field_err(
                "drv",
                format!("`{name}` still has input derivations (resolve it first)"),
            ));
        }
        let outputs = drv
            .outputs
            .iter()
            .map(|(n, o)| {
                let (hash_algo, hash) = o.algo_and_hash();
                (n.clone(), DrvOutput { path: o.path().cloned(), hash_algo, hash })
            })
            .collect();
        Ok(BasicDerivation {
            name: name.to_string(),
            outputs,
            input_srcs: drv.input_srcs.clone(),
            system: drv.platform.clone(),
            builder: drv.builder.clone(),
            args: drv.args.clone(),
            env: drv.env.clone(),
        })
    }

    /// The `nix-formats` derivation (no input derivations).
    pub fn to_derivation(&self) -> Result<Derivation, JobError> {
        let outputs = self
            .outputs
            .iter()
            .map(|(n, o)| {
                DerivationOutput::from_parts(n, o.path.clone(), &o.hash_algo, &o.hash)
                    .map(|d| (n.clone(), d))
                    .map_err(|e| field_err("drv.outputs", e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Derivation {
            outputs,
            input_drvs: BTreeMap::new(),
            input_srcs: self.input_srcs.clone(),
            platform: self.system.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        })
    }

    /// The store path this basic derivation has as a `.drv` file (`<name>.drv`, a text path of
    /// its ATerm). For a content-addressed step this must equal the job's `drv_path`.
    pub fn drv_path(&self) -> Result<StorePath, JobError> {
        let drv = self.to_derivation()?;
        drv.drv_path(&self.name).map_err(|e| field_err("drv", e.to_string()))
    }
}

/// serde for [`DrvOutput::path`]: `""` is `None`, anything else must be a store path.
mod empty_is_none {
    use nix_formats::StorePath;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(p: &Option<StorePath>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.collect_str(p),
            None => s.serialize_str(""),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<StorePath>, D::Error> {
        crate::serde_str::with_str(d, |s| match s {
            "" => Ok(None),
            p => StorePath::parse(p).map(Some).map_err(|e| e.to_string()),
        })
    }
}

/// What is known about one store path's contents, as in its narinfo: a job's closure entry, and
/// the part of the launcher's `ValidPathInfo` (which adds the path, deriver, signatures …) that
/// describes the contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathInfo {
    /// SHA-256 of the path's NAR.
    pub nar_hash: NarHash,
    /// Size of the NAR in bytes.
    pub nar_size: u64,
    /// Store paths it references (itself included when self-referencing).
    pub references: BTreeSet<StorePath>,
    /// Its content address (Nix's `ca` string, e.g. `fixed:r:sha256:<nix32>`), if it claims one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

/// Build limits. Zero means "no limit" for the first three, "host default" for the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock limit of the build in seconds (Nix `timeout`).
    pub timeout_s: u64,
    /// Limit on seconds without log output (Nix `max-silent-time`).
    pub max_silent_s: u64,
    /// Limit on log bytes (Nix `max-build-log-size`).
    pub max_log_bytes: u64,
    /// `NIX_BUILD_CORES` and the VM's vCPU count.
    pub cores: u64,
    /// The builder's memory limit in bytes (cgroup `memory.max` in the guest, which has no
    /// swap; the VM gets this plus a reserve).
    pub memory_bytes: u64,
    /// Most processes and threads the builder may have at once (cgroup `pids.max`).
    pub max_processes: u64,
    /// Size limit of each guest tmpfs the builder writes to (`/build`, the new store paths,
    /// `/tmp` with `/dev/shm`), in bytes.
    pub tmpfs_bytes: u64,
}

/// Which self-reference rule makes floating-CA output paths (Nix changed it twice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CaRule {
    /// Positions of self-references are hashed (`|<offset>` appended): Nix ≤ 2.16 and ≥ 2.35.
    #[serde(rename = "self-ref-positions")]
    SelfRefPositions,
    /// Positions are not hashed: Nix 2.17 up to 2.34.
    #[serde(rename = "self-ref-zeroed")]
    SelfRefZeroed,
}

impl From<CaRule> for nix_formats::ca::SelfRefRule {
    fn from(rule: CaRule) -> Self {
        match rule {
            CaRule::SelfRefPositions => nix_formats::ca::SelfRefRule::ZeroAndPositions,
            CaRule::SelfRefZeroed => nix_formats::ca::SelfRefRule::ZeroOnly,
        }
    }
}

impl From<nix_formats::ca::SelfRefRule> for CaRule {
    fn from(rule: nix_formats::ca::SelfRefRule) -> Self {
        match rule {
            nix_formats::ca::SelfRefRule::ZeroAndPositions => CaRule::SelfRefPositions,
            nix_formats::ca::SelfRefRule::ZeroOnly => CaRule::SelfRefZeroed,
        }
    }
}

/// What kind of step a basic derivation is, by its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Every output is floating content-addressed (paths known only after the build).
    FloatingCa,
    /// A fixed-output derivation (one output `out` with a declared hash).
    FixedOutput,
    /// Every output path is fixed by the derivation (input-addressed).
    InputAddressed,
}

/// The job the host sends for one step. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Format version ([`JOB_VERSION`]).
    pub v: u64,
    /// The host's id for this job (opaque; unique per job).
    pub job_id: String,
    /// The store path of the derivation (see the module documentation).
    pub drv_path: StorePath,
    /// The basic derivation to build.
    pub drv: BasicDerivation,
    /// The whole input closure, by store path.
    pub closure: BTreeMap<StorePath, PathInfo>,
    /// Build limits.
    pub limits: Limits,
    /// The self-reference rule for floating-CA output paths.
    pub ca_rule: CaRule,
    /// Whether the VM has (user-mode) network: only for fixed-output derivations.
    pub network: bool,
    /// The outputs wanted (names; a subset of the derivation's outputs).
    pub outputs: BTreeSet<String>,
}

impl Job {
    /// A version-1 job.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        job_id: impl Into<String>,
        drv_path: StorePath,
        drv: BasicDerivation,
        closure: BTreeMap<StorePath, PathInfo>,
        limits: Limits,
        ca_rule: CaRule,
        network: bool,
        outputs: BTreeSet<String>,
    ) -> Job {
        Job {
            v: JOB_VERSION,
            job_id: job_id.into(),
            drv_path,
            drv,
            closure,
            limits,
            ca_rule,
            network,
            outputs,
        }
    }

    /// The roots of the input closure (the derivation's `input_srcs`).
    pub fn direct_inputs(&self) -> &BTreeSet<StorePath> {
        &self.drv.input_srcs
    }

    /// The canonical bytes of this job.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, JobError> {
        canonical::to_vec(self).map_err(JobError::Encoding)
    }

    /// Parse canonical bytes (anything else is refused) and check the structure.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Job, JobError> {
        let job: Job = canonical::from_slice(bytes).map_err(JobError::Encoding)?;
        job.validate()?;
        Ok(job)
    }

    /// `SHA-256(JOB_DIGEST_TAG ‖ canonical(job))`: the job's digest.
    pub fn digest(&self) -> Result<[u8; 32], JobError> {
        Ok(digest_of(&self.canonical_bytes()?))
    }

    /// The step kind, from the derivation's outputs.
    pub fn kind(&self) -> Result<StepKind, JobError> {
        step_kind(&self.drv)
    }

    /// Check the job's structure: version, the derivation's path and name, a closed input
    /// closure that contains the derivation's inputs, wanted outputs that exist, network only
    /// for fixed outputs. (Store paths were checked when they were parsed.)
    pub fn validate(&self) -> Result<(), JobError> {
        if self.v != JOB_VERSION {
            return Err(JobError::Version(self.v));
        }
        if self.job_id.is_empty() {
            return Err(field_err("job_id", "is empty"));
        }
        if self.drv_path.name().strip_suffix(".drv") != Some(self.drv.name.as_str()) {
            return Err(field_err(
                "drv_path",
                format!("`{}` does not name derivation `{}`", self.drv_path, self.drv.name),
            ));
        }
        let kind = self.kind()?;
        if kind == StepKind::FloatingCa {
            let computed = self.drv.drv_path()?;
            if computed != self.drv_path {
                return Err(field_err(
                    "drv_path",
                    format!(
                        "`{}` is not the derivation's path; it hashes to `{computed}`",
                        self.drv_path
                    ),
                ));
            }
        }
        if self.outputs.is_empty() {
            return Err(field_err("outputs", "no output wanted"));
        }
        if let Some(o) = self.outputs.iter().find(|o| !self.drv.outputs.contains_key(*o)) {
            return Err(field_err("outputs", format!("the derivation has no output `{o}`")));
        }
        if self.network && kind != StepKind::FixedOutput {
            return Err(field_err("network", "only a fixed-output derivation may have network"));
        }
        for p in &self.drv.input_srcs {
            if !self.closure.contains_key(p) {
                return Err(field_err(
                    "closure",
                    format!("input `{p}` is not in the input closure"),
                ));
            }
        }
        for (p, info) in &self.closure {
            if let Some(r) = info.references.iter().find(|r| !self.closure.contains_key(*r)) {
                return Err(field_err(
                    "closure",
                    format!("`{p}` references `{r}`, which is not in the closure"),
                ));
            }
        }
        Ok(())
    }
}

/// The digest of a job given as canonical bytes (the caller has checked they are canonical).
pub fn digest_of(canonical_job: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(JOB_DIGEST_TAG);
    h.update(canonical_job);
    h.finalize().into()
}

/// The step kind of a basic derivation.
pub fn step_kind(drv: &BasicDerivation) -> Result<StepKind, JobError> {
    let mut kinds = drv.outputs.iter().map(|(name, o)| {
        match (o.path.is_none(), o.hash_algo.is_empty(), o.hash.is_empty()) {
            (false, true, true) => Ok(StepKind::InputAddressed),
            (true, false, true) => Ok(StepKind::FloatingCa),
            (false, false, false) if name == "out" => Ok(StepKind::FixedOutput),
            _ => Err(field_err(
                "drv.outputs",
                format!("output `{name}` is neither input-addressed, floating CA nor fixed"),
            )),
        }
    });
    let first =
        kinds.next().ok_or_else(|| field_err("drv.outputs", "the derivation has no outputs"))??;
    for k in kinds {
        if k? != first {
            return Err(field_err("drv.outputs", "outputs of different kinds"));
        }
    }
    if first == StepKind::FixedOutput && drv.outputs.len() != 1 {
        return Err(field_err("drv.outputs", "a fixed-output derivation has exactly one output"));
    }
    Ok(first)
}
