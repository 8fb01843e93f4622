//! What the closure verifier returns: the verified closure, or the first broken link, and how
//! both print. Not here: how the verdict is reached (the parent module).

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// Which check a step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkCheck {
    /// The derivation itself is malformed or of an unsupported kind.
    Derivation,
    /// A fixed output or a content-addressed input uses md5 or sha1 and the policy refuses those.
    WeakHash,
    /// Bytes under an accepted output path have another NAR hash than the accepted build.
    OutputBytes,
    /// The inputs could not be combined into a resolved derivation.
    Resolution,
    /// No trace for the step's key in any source.
    NoTrace,
    /// The statement does not parse or is not self-consistent.
    Statement,
    /// The statement carries another derivation than the one the verifier computed.
    DerivationMismatch,
    /// A content-addressed output's path does not follow from its `ca`.
    OutputAddress,
    /// The evidence does not verify (chain, signature, policy, HOST_DATA, REPORT_DATA, ...).
    Evidence,
    /// The statement's measurement is not the one in the report.
    Measurement,
    /// A JWS signature does not verify or does not describe the statement.
    Signature,
    /// No evidence and no signature from anyone the policy names.
    NoTrustedSigner,
    /// Valid signers, but not enough of them for the policy.
    Policy,
    /// An input is not an accepted output of the step's dependencies (NAR hash differs).
    InputNarHash,
    /// An input is neither an accepted output nor a content-addressed path.
    InputUnaccounted,
    /// A content-addressed input's `ca` does not produce its path.
    SourceAddress,
    /// The input closure holds a path that no accepted input references.
    ExtraInput,
    /// An expected output path is not what the policy accepts.
    Expected,
    /// Two different steps carry the same launch nonce (one VM ran two jobs).
    LaunchReused,
}

impl LinkCheck {
    /// A short name for humans.
    pub fn name(self) -> &'static str {
        match self {
            LinkCheck::Derivation => "derivation",
            LinkCheck::WeakHash => "hash algorithm",
            LinkCheck::OutputBytes => "output bytes",
            LinkCheck::Resolution => "resolution",
            LinkCheck::NoTrace => "trace lookup",
            LinkCheck::Statement => "statement",
            LinkCheck::DerivationMismatch => "statement derivation",
            LinkCheck::OutputAddress => "output content address",
            LinkCheck::Evidence => "evidence",
            LinkCheck::Measurement => "measurement",
            LinkCheck::Signature => "signature",
            LinkCheck::NoTrustedSigner => "trusted signer",
            LinkCheck::Policy => "trust policy",
            LinkCheck::InputNarHash => "input NAR hash",
            LinkCheck::InputUnaccounted => "input origin",
            LinkCheck::SourceAddress => "source content address",
            LinkCheck::ExtraInput => "input closure",
            LinkCheck::Expected => "expected output",
            LinkCheck::LaunchReused => "one launch per step",
        }
    }
}

/// The first step that could not be accepted, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenLink {
    /// The (unresolved) derivation of the step.
    pub step: String,
    /// The key looked up (resolved drv path for CA steps), when it got that far.
    pub key: Option<String>,
    /// Which trace entry, when one was examined.
    pub entry: Option<String>,
    /// The check that failed.
    pub check: LinkCheck,
    /// What the verifier expected.
    pub expected: String,
    /// What it found.
    pub found: String,
    /// A plain explanation.
    pub explanation: String,
}

impl BrokenLink {
    /// The target verified, but bytes the user has under its output paths are not the accepted
    /// ones (`problem` says which).
    pub fn bytes(target: &impl fmt::Display, problem: String) -> BrokenLink {
        let mut b = *BrokenLink::new(LinkCheck::OutputBytes, problem);
        b.step = target.to_string();
        b
    }

    pub(crate) fn new(check: LinkCheck, explanation: impl Into<String>) -> Box<BrokenLink> {
        Box::new(BrokenLink {
            step: String::new(),
            key: None,
            entry: None,
            check,
            expected: String::new(),
            found: String::new(),
            explanation: explanation.into(),
        })
    }

    pub(crate) fn expected(
        mut self: Box<Self>,
        expected: impl fmt::Display,
        found: impl fmt::Display,
    ) -> Box<BrokenLink> {
        self.expected = expected.to_string();
        self.found = found.to_string();
        self
    }
}

impl fmt::Display for BrokenLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "NOT VERIFIED: broken link at {}", self.step)?;
        if let Some(k) = &self.key {
            if k != &self.step {
                writeln!(f, "  resolved as: {k}")?;
            }
        }
        if let Some(e) = &self.entry {
            writeln!(f, "  trace:       {e}")?;
        }
        writeln!(f, "  check:       {}", self.check.name())?;
        writeln!(f, "  problem:     {}", self.explanation)?;
        if !self.expected.is_empty() || !self.found.is_empty() {
            writeln!(f, "  expected:    {}", self.expected)?;
            writeln!(f, "  found:       {}", self.found)?;
        }
        Ok(())
    }
}

/// How one step was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AcceptedStep {
    /// The unresolved derivation.
    pub drv: String,
    /// The key its trace was found under (resolved drv, or the drv itself).
    pub key: String,
    /// Output name → path.
    pub outputs: BTreeMap<String, String>,
    /// Who vouched: `key <name>`, `chip <id> (rule <r>)`, or `fixed-output <hash>`.
    pub accepted_by: Vec<String>,
    /// Whether any accepting evidence is simulated (proves nothing about hardware).
    pub simulated: bool,
}

/// A verified closure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifiedClosure {
    /// The target derivation.
    pub target: String,
    /// The target's accepted outputs (name → path); with expected paths, those.
    pub outputs: BTreeMap<String, String>,
    /// Every accepted step, dependencies first.
    pub steps: Vec<AcceptedStep>,
    /// For each of `outputs` that a trace described (not fixed outputs: their declared hash
    /// stands for them), the NAR hashes (`sha256:<nix32>`) the policy accepted for it: what
    /// bytes under that path must hash to (several when accepted builds diverge).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub nar_hashes: BTreeMap<String, Vec<String>>,
}

impl VerifiedClosure {
    /// Whether any step was accepted on simulated evidence.
    pub fn simulated(&self) -> bool {
        self.steps.iter().any(|s| s.simulated)
    }
}

impl fmt::Display for VerifiedClosure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "VERIFIED {} ({} steps)", self.target, self.steps.len())?;
        for (name, path) in &self.outputs {
            writeln!(f, "  {name}: {path}")?;
        }
        for s in &self.steps {
            let sim = if s.simulated {
                " [SIMULATED evidence: proves nothing about hardware]"
            } else {
                ""
            };
            writeln!(f, "  step {}{sim}", s.drv)?;
            if s.key != s.drv {
                writeln!(f, "    resolved: {}", s.key)?;
            }
            writeln!(f, "    accepted by: {}", s.accepted_by.join(", "))?;
        }
        Ok(())
    }
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    /// Every step accepted and linked.
    Verified(VerifiedClosure),
    /// The first step that could not be accepted.
    NotVerified(BrokenLink),
}
