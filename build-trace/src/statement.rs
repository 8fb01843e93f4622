//! The statement: one per step, the launch and the job plus what the guest established; its
//! REPORT_DATA.
//!
//! # API (for the agent, the launcher and the verifier)
//! ```text
//! Statement { v, launch: Option<Launch>, job: Job, input_cas: BTreeMap<StorePath, ca>,
//!             outputs: BTreeMap<name, OutputInfo>, measurement: Measurement, agent_version }
//! Statement::new(launch, job, input_cas, outputs, measurement, agent_version) -> Statement // v = 2
//! OutputInfo { path: StorePath, nar_hash: NarHash, nar_size, references: BTreeSet<StorePath>,
//!              ca: Option<String> }
//! Measurement([u8; 48])  — 96 lowercase hex digits on the wire
//! st.validate() -> Result<(), StatementError>      // self-consistency (see below)
//! st.verify_against(&launch, &job) -> Result<(), StatementError>   // = validate + same both
//! st.canonical_bytes() / Statement::from_canonical_bytes(&[u8])
//! st.report_data() -> Result<[u8; 64], StatementError>  // SHA-512(tag of v ‖ canonical)
//! st.host_data() -> Result<[u8; 32], StatementError>    // v2: the launch's; v1: the job digest
//! st.launch_nonce() -> Option<Hex32>                    // v2: the launch's nonce
//! report_data_of(&canonical_bytes) / host_data_of(&canonical_bytes)  // from stored bytes
//! ```
//! **Versions.** This code writes version 2: the statement carries the **launch**
//! ([`crate::launch`]), whose hash is HOST_DATA, next to the job; REPORT_DATA's tag is
//! [`REPORT_DATA_TAG`]. It still reads version 1 (no launch; HOST_DATA was the job's digest, tag
//! [`REPORT_DATA_TAG_V1`]), so traces made before warm pools keep verifying: a version-1 VM was
//! launched for its one job by construction. The launch of a version-2 statement must admit its
//! job (same `network`, the job's digest if the launch names one, memory).
//!
//! `input_cas` holds, for each input path whose content address the guest recomputed from its
//! bytes, that content address (Nix's `ca` string). Every closure path the job claims a `ca`
//! for must be there with the same value (the agent refuses the job otherwise). `outputs` has
//! exactly the wanted outputs. `measurement` is the guest's launch measurement as its first
//! report showed it. Store paths are parsed while deserialising (see [`crate::job`]), so a
//! statement from anyone with a malformed path is refused there, the member named.
//!
//! What is not here: evidence (`crate::evidence`), content-address path computation
//! (`nix-formats`; the verifier checks it), or trust decisions (`crate::verify`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use nix_formats::StorePath;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha512};

use crate::canonical::{self, CanonicalError};
use crate::job::{Job, JobError, NarHash, StepKind};
use crate::launch::{Hex32, Launch, LaunchError};

/// The statement format version this code writes.
pub const STATEMENT_VERSION: u64 = 2;

/// The oldest statement format version this code still reads (and verifies).
pub const STATEMENT_VERSION_V1: u64 = 1;

/// Domain-separation tag of REPORT_DATA:
/// `REPORT_DATA = SHA-512(REPORT_DATA_TAG ‖ canonical(statement))`.
pub const REPORT_DATA_TAG: &[u8] = b"vouch.statement.v2\0";

/// The REPORT_DATA tag of version-1 statements.
pub const REPORT_DATA_TAG_V1: &[u8] = b"vouch.statement.v1\0";

/// Why a statement is malformed or does not belong to a job.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    /// The canonical encoding failed or the bytes were not canonical.
    #[error("statement encoding")]
    Encoding(#[source] CanonicalError),
    /// A version this code does not know.
    #[error(
        "statement format version {0} is not supported (this build reads versions {STATEMENT_VERSION_V1} and {STATEMENT_VERSION})"
    )]
    Version(u64),
    /// The embedded job is malformed.
    #[error("the statement's job")]
    Job(#[source] JobError),
    /// The embedded launch is malformed, missing, present in version 1, or does not admit the
    /// job.
    #[error("the statement's launch")]
    Launch(#[source] LaunchError),
    /// The statement is about another job.
    #[error("the statement is for job {found} (digest), not {expected}")]
    OtherJob {
        /// Digest (hex) of the expected job.
        expected: String,
        /// Digest (hex) of the statement's job.
        found: String,
    },
    /// The statement names another launch (another VM).
    #[error("the statement is from launch {found} (HOST_DATA), not {expected}")]
    OtherLaunch {
        /// HOST_DATA (hex) of the expected launch.
        expected: String,
        /// HOST_DATA (hex) of the statement's launch, or `none`.
        found: String,
    },
    /// A field has a bad value.
    #[error("statement field `{field}`: {problem}")]
    Field {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

fn field_err(field: &'static str, problem: impl Into<String>) -> StatementError {
    StatementError::Field { field, problem: problem.into() }
}

/// Whether canonical statement bytes are of version 1 (their `v` member is `1`).
fn is_v1(canonical_statement: &[u8]) -> bool {
    canonical::member(canonical_statement, "v") == Some(b"1")
}

/// REPORT_DATA of a statement given as canonical bytes (the caller has checked they are
/// canonical, e.g. with [`Statement::from_canonical_bytes`]); the tag follows its version.
pub fn report_data_of(canonical_statement: &[u8]) -> [u8; 64] {
    let mut h = Sha512::new();
    h.update(if is_v1(canonical_statement) { REPORT_DATA_TAG_V1 } else { REPORT_DATA_TAG });
    h.update(canonical_statement);
    h.finalize().into()
}

/// HOST_DATA of a statement given as canonical bytes, without re-encoding anything (the
/// launch's, or for version 1 the job's, canonical bytes are a slice of the statement's): the
/// launch's hash, or for version 1 the job's digest. `None` without that member.
pub fn host_data_of(canonical_statement: &[u8]) -> Option<[u8; 32]> {
    if is_v1(canonical_statement) {
        canonical::member(canonical_statement, "job").map(crate::job::digest_of)
    } else {
        canonical::member(canonical_statement, "launch").map(crate::launch::host_data_of)
    }
}

/// The output paths, by output name, that a statement's bytes claim, read without checking
/// anything else (`None` when they are not there or one is not a store path). A hint only: the
/// closure verifier's look-ahead guesses the next steps with it, and every claim is checked
/// later.
pub fn peek_output_paths(statement: &[u8]) -> Option<BTreeMap<String, StorePath>> {
    #[derive(Deserialize)]
    struct Claim {
        path: StorePath,
    }
    let outputs = canonical::member(statement, "outputs")?;
    let claims: BTreeMap<String, Claim> = serde_json::from_slice(outputs).ok()?;
    Some(claims.into_iter().map(|(name, c)| (name, c.path)).collect())
}

/// An SEV-SNP launch measurement (48 bytes). On the wire: 96 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Measurement(pub [u8; 48]);

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Measurement({self})")
    }
}

impl FromStr for Measurement {
    type Err = String;
    fn from_str(s: &str) -> Result<Measurement, String> {
        if s.len() != 96 || s.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(format!("`{s}` is not 96 lowercase hex digits"));
        }
        let mut m = [0u8; 48];
        hex::decode_to_slice(s, &mut m).map_err(|e| format!("`{s}`: {e}"))?;
        Ok(Measurement(m))
    }
}

crate::serde_str::string_form!(Measurement);

/// What the guest established about one output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputInfo {
    /// The output's store path (for floating CA: the content-addressed path).
    pub path: StorePath,
    /// SHA-256 of the output's NAR (the final one, with the final path in it).
    pub nar_hash: NarHash,
    /// NAR size in bytes.
    pub nar_size: u64,
    /// Store paths the output references (itself included when self-referencing).
    pub references: BTreeSet<StorePath>,
    /// The content address (`fixed:r:sha256:…` etc.) for content-addressed outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

/// The statement of one step. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// Format version ([`STATEMENT_VERSION`], or [`STATEMENT_VERSION_V1`] when read).
    pub v: u64,
    /// The launch of the VM (its hash is HOST_DATA); absent exactly in version 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<Launch>,
    /// The job, exactly as received.
    pub job: Job,
    /// Content addresses the guest recomputed for input paths, by store path.
    pub input_cas: BTreeMap<StorePath, String>,
    /// The wanted outputs, by output name.
    pub outputs: BTreeMap<String, OutputInfo>,
    /// The guest's launch measurement, from its first report.
    pub measurement: Measurement,
    /// The agent's version string.
    pub agent_version: String,
}

impl Statement {
    /// A version-2 statement.
    pub fn new(
        launch: Launch,
        job: Job,
        input_cas: BTreeMap<StorePath, String>,
        outputs: BTreeMap<String, OutputInfo>,
        measurement: Measurement,
        agent_version: impl Into<String>,
    ) -> Statement {
        Statement {
            v: STATEMENT_VERSION,
            launch: Some(launch),
            job,
            input_cas,
            outputs,
            measurement,
            agent_version: agent_version.into(),
        }
    }

    /// The canonical bytes of this statement.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, StatementError> {
        canonical::to_vec(self).map_err(StatementError::Encoding)
    }

    /// Parse canonical bytes (anything else is refused) and check self-consistency.
    pub fn from_canonical_bytes(bytes: &[u8]) -> Result<Statement, StatementError> {
        let st: Statement = canonical::from_slice(bytes).map_err(StatementError::Encoding)?;
        st.validate()?;
        Ok(st)
    }

    /// `SHA-512(tag ‖ canonical(statement))`, the tag of its version ([`REPORT_DATA_TAG`]):
    /// the 64 bytes the guest puts in its attestation report.
    pub fn report_data(&self) -> Result<[u8; 64], StatementError> {
        Ok(report_data_of(&self.canonical_bytes()?))
    }

    /// HOST_DATA of the VM this statement is from: its launch's hash (version 1: the job's
    /// digest).
    pub fn host_data(&self) -> Result<[u8; 32], StatementError> {
        match &self.launch {
            Some(l) => l.host_data().map_err(StatementError::Launch),
            None if self.v == STATEMENT_VERSION_V1 => {
                self.job.digest().map_err(StatementError::Job)
            }
            None => Err(StatementError::Launch(LaunchError::Field {
                field: "launch",
                problem: format!("is missing (statement version {})", self.v),
            })),
        }
    }

    /// The nonce of the launch this statement is from (none in version 1).
    pub fn launch_nonce(&self) -> Option<Hex32> {
        self.launch.as_ref().map(|l| l.nonce)
    }

    /// Check that this statement is from `launch`, about `job`, and self-consistent.
    pub fn verify_against(&self, launch: &Launch, job: &Job) -> Result<(), StatementError> {
        if self.launch.as_ref() != Some(launch) {
            let hd =
                |l: &Launch| l.host_data().map(hex::encode).unwrap_or_else(|e| format!("<{e}>"));
            return Err(StatementError::OtherLaunch {
                expected: hd(launch),
                found: self.launch.as_ref().map_or_else(|| "none".into(), hd),
            });
        }
        if self.job != *job {
            let d = |j: &Job| j.digest().map(hex::encode).unwrap_or_else(|e| format!("<{e}>"));
            return Err(StatementError::OtherJob { expected: d(job), found: d(&self.job) });
        }
        self.validate()
    }

    /// Self-consistency: version; a valid launch (version 2) that admits a valid job; exactly
    /// the wanted outputs, each at a store
    /// path with the right name (and, for input-addressed and fixed outputs, the path the
    /// derivation fixes; content-addressed outputs carry a `ca`); output references only to the
    /// input closure or the step's own outputs; every content address the job claims for an
    /// input confirmed with the same value, and no content address for a path outside the
    /// closure.
    pub fn validate(&self) -> Result<(), StatementError> {
        let job = &self.job;
        match (self.v, &self.launch) {
            (STATEMENT_VERSION, Some(launch)) => {
                launch.validate().map_err(StatementError::Launch)?;
                job.validate().map_err(StatementError::Job)?;
                launch.admits(job).map_err(StatementError::Launch)?;
            }
            (STATEMENT_VERSION_V1, None) => job.validate().map_err(StatementError::Job)?,
            (STATEMENT_VERSION | STATEMENT_VERSION_V1, l) => {
                return Err(StatementError::Launch(LaunchError::Field {
                    field: "launch",
                    problem: format!(
                        "is {} in a version-{} statement",
                        if l.is_some() { "present" } else { "missing" },
                        self.v
                    ),
                }))
            }
            (v, _) => return Err(StatementError::Version(v)),
        }
        let kind = job.kind().map_err(StatementError::Job)?;
        let wanted: Vec<&String> = job.outputs.iter().collect();
        let have: Vec<&String> = self.outputs.keys().collect();
        if wanted != have {
            return Err(field_err("outputs", format!("has {have:?}, the job wants {wanted:?}")));
        }
        let own_paths: BTreeSet<&StorePath> = self.outputs.values().map(|o| &o.path).collect();
        for (name, out) in &self.outputs {
            let expected_name = if name == "out" {
                job.drv.name.clone()
            } else {
                format!("{}-{name}", job.drv.name)
            };
            if out.path.name() != expected_name {
                return Err(field_err(
                    "outputs",
                    format!("output `{name}`: `{}` is not named `{expected_name}`", out.path),
                ));
            }
            let declared = &job.drv.outputs[name];
            match (kind, &declared.path) {
                (StepKind::InputAddressed | StepKind::FixedOutput, Some(fixed))
                    if out.path != *fixed =>
                {
                    return Err(field_err(
                        "outputs",
                        format!(
                            "output `{name}` is `{}`, the derivation fixes `{fixed}`",
                            out.path
                        ),
                    ));
                }
                (StepKind::FloatingCa | StepKind::FixedOutput, _) if out.ca.is_none() => {
                    return Err(field_err(
                        "outputs",
                        format!("content-addressed output `{name}` has no `ca`"),
                    ));
                }
                _ => {}
            }
            if let Some(r) = out
                .references
                .iter()
                .find(|r| !job.closure.contains_key(*r) && !own_paths.contains(r))
            {
                return Err(field_err(
                    "outputs",
                    format!(
                        "output `{name}` references `{r}`, which is neither an input nor an output"
                    ),
                ));
            }
        }
        for (p, info) in &job.closure {
            if let Some(claimed) = &info.ca {
                match self.input_cas.get(p) {
                    Some(found) if found == claimed => {}
                    Some(found) => {
                        return Err(field_err(
                            "input_cas",
                            format!("`{p}`: the job claims `{claimed}`, the guest found `{found}`"),
                        ));
                    }
                    None => {
                        return Err(field_err(
                            "input_cas",
                            format!("`{p}`: the job's claim `{claimed}` is not confirmed"),
                        ));
                    }
                }
            }
        }
        if let Some(p) = self.input_cas.keys().find(|p| !job.closure.contains_key(*p)) {
            return Err(field_err("input_cas", format!("`{p}` is not in the input closure")));
        }
        Ok(())
    }
}
