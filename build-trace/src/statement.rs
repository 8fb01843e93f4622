//! The statement: one per step, the job plus what the guest established; its REPORT_DATA.
//!
//! # API (for the agent, the launcher and the verifier)
//! ```text
//! Statement { v, job: Job, input_cas: BTreeMap<StorePath, ca>,
//!             outputs: BTreeMap<name, OutputInfo>, measurement: Measurement, agent_version }
//! Statement::new(job, input_cas, outputs, measurement, agent_version) -> Statement   // v = 1
//! OutputInfo { path: StorePath, nar_hash: NarHash, nar_size, references: BTreeSet<StorePath>,
//!              ca: Option<String> }
//! Measurement([u8; 48])  — 96 lowercase hex digits on the wire
//! st.validate() -> Result<(), StatementError>      // self-consistency (see below)
//! st.verify_against(&job) -> Result<(), StatementError>   // = validate + same job
//! st.canonical_bytes() / Statement::from_canonical_bytes(&[u8])
//! st.report_data() -> Result<[u8; 64], StatementError>  // SHA-512(REPORT_DATA_TAG ‖ canonical)
//! st.host_data() -> Result<[u8; 32], StatementError>    // = st.job.host_data()
//! report_data_of(&canonical_bytes) / host_data_of(&canonical_bytes)  // from stored bytes
//! ```
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

/// The statement format version this code writes and accepts.
pub const STATEMENT_VERSION: u64 = 1;

/// Domain-separation tag of REPORT_DATA:
/// `REPORT_DATA = SHA-512(REPORT_DATA_TAG ‖ canonical(statement))`.
pub const REPORT_DATA_TAG: &[u8] = b"vouch.statement.v1\0";

/// Why a statement is malformed or does not belong to a job.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    /// The canonical encoding failed or the bytes were not canonical.
    #[error("statement encoding")]
    Encoding(#[source] CanonicalError),
    /// A version this code does not know.
    #[error(
        "statement format version {0} is not supported (this build knows {STATEMENT_VERSION})"
    )]
    Version(u64),
    /// The embedded job is malformed.
    #[error("the statement's job")]
    Job(#[source] JobError),
    /// The statement is about another job.
    #[error("the statement is for job {found} (HOST_DATA), not {expected}")]
    OtherJob {
        /// HOST_DATA (hex) of the expected job.
        expected: String,
        /// HOST_DATA (hex) of the statement's job.
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

/// REPORT_DATA of a statement given as canonical bytes (the caller has checked they are
/// canonical, e.g. with [`Statement::from_canonical_bytes`]).
pub fn report_data_of(canonical_statement: &[u8]) -> [u8; 64] {
    let mut h = Sha512::new();
    h.update(REPORT_DATA_TAG);
    h.update(canonical_statement);
    h.finalize().into()
}

/// HOST_DATA of the job inside a statement given as canonical bytes, without re-encoding it
/// (its canonical bytes are a slice of the statement's).
pub fn host_data_of(canonical_statement: &[u8]) -> Option<[u8; 32]> {
    canonical::member(canonical_statement, "job").map(crate::job::host_data_of)
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
    /// Format version ([`STATEMENT_VERSION`]).
    pub v: u64,
    /// The job, exactly as received (its hash is HOST_DATA).
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
    /// A version-1 statement.
    pub fn new(
        job: Job,
        input_cas: BTreeMap<StorePath, String>,
        outputs: BTreeMap<String, OutputInfo>,
        measurement: Measurement,
        agent_version: impl Into<String>,
    ) -> Statement {
        Statement {
            v: STATEMENT_VERSION,
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

    /// `SHA-512(REPORT_DATA_TAG ‖ canonical(statement))`: the 64 bytes the guest puts in its
    /// attestation report.
    pub fn report_data(&self) -> Result<[u8; 64], StatementError> {
        Ok(report_data_of(&self.canonical_bytes()?))
    }

    /// HOST_DATA of the statement's job.
    pub fn host_data(&self) -> Result<[u8; 32], StatementError> {
        self.job.host_data().map_err(StatementError::Job)
    }

    /// Check that this statement is about `job` and is self-consistent.
    pub fn verify_against(&self, job: &Job) -> Result<(), StatementError> {
        if self.job != *job {
            let hd = |j: &Job| j.host_data().map(hex::encode).unwrap_or_else(|e| format!("<{e}>"));
            return Err(StatementError::OtherJob { expected: hd(job), found: hd(&self.job) });
        }
        self.validate()
    }

    /// Self-consistency: version; a valid job; exactly the wanted outputs, each at a store
    /// path with the right name (and, for input-addressed and fixed outputs, the path the
    /// derivation fixes; content-addressed outputs carry a `ca`); output references only to the
    /// input closure or the step's own outputs; every content address the job claims for an
    /// input confirmed with the same value, and no content address for a path outside the
    /// closure.
    pub fn validate(&self) -> Result<(), StatementError> {
        if self.v != STATEMENT_VERSION {
            return Err(StatementError::Version(self.v));
        }
        let job = &self.job;
        job.validate().map_err(StatementError::Job)?;
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
