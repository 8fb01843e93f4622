//! What verified evidence establishes: the root that verified it, the signer a verifier counts,
//! and the report fields a trust policy or closure verifier looks at. Every `Display` of
//! simulated evidence says "SIMULATED".
//! Not here: how evidence is verified (`verify.rs`) or which signers a trust policy accepts
//! ([`crate::trust`]).

use std::fmt;
use std::time::SystemTime;

use super::policy::{Hex, KeyId};
use super::report::{describe_policy, Product, TcbVersion};

/// Which pinned root verified the evidence. This, and nothing the evidence says about itself,
/// decides what the evidence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Root {
    /// One of AMD's ARKs (pinned by SPKI SHA-256 in [`AMD_ROOT_PINS`](super::certs::AMD_ROOT_PINS)).
    Amd { product: Product },
    /// A simulated root named by the policy: proves nothing about hardware.
    Simulated { key_id: KeyId },
}

impl fmt::Display for Root {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Root::Amd { product } => write!(f, "AMD ARK-{product} (pinned)"),
            Root::Simulated { key_id } => {
                write!(
                    f,
                    "SIMULATED root {key_id} (no SEV-SNP hardware; proves nothing about hardware)"
                )
            }
        }
    }
}

/// VCEK or VLEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VekKind {
    /// Versioned Chip Endorsement Key: unique to one chip and TCB.
    Vcek,
    /// Versioned Loaded Endorsement Key: a cloud provider's key, loaded into its chips.
    Vlek,
}

impl VekKind {
    pub fn name(self) -> &'static str {
        match self {
            VekKind::Vcek => "VCEK",
            VekKind::Vlek => "VLEK",
        }
    }
}

/// Who signed: the unit a verifier counts once (laut-style thresholds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signer {
    /// A real AMD chip, by CHIP_ID (Turin: 8 significant bytes, the rest zero).
    Chip(Hex<64>),
    /// A VLEK, by SHA-256 of its SubjectPublicKeyInfo: for reports with a masked CHIP_ID.
    Vlek(KeyId),
    /// A simulated chip under a simulated root.
    SimulatedChip(Hex<64>),
}

impl fmt::Display for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chip = |c: &Hex<64>| {
            if c.0[8..].iter().all(|&b| b == 0) {
                hex::encode(&c.0[..8])
            } else {
                c.to_string()
            }
        };
        match self {
            Signer::Chip(c) => write!(f, "chip {}", chip(c)),
            Signer::Vlek(k) => write!(f, "VLEK {k}"),
            Signer::SimulatedChip(c) => write!(f, "SIMULATED chip {}", chip(c)),
        }
    }
}

/// What verified evidence establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedEvidence {
    pub root: Root,
    pub signer: Signer,
    pub vek_kind: VekKind,
    /// The VLEK's CSP ID extension (e.g. "CN=cc-us-east-2.amazonaws.com").
    pub csp_id: Option<String>,
    pub version: u32,
    pub measurement: Hex<48>,
    pub host_data: Hex<32>,
    pub report_data: Hex<64>,
    pub reported_tcb: TcbVersion,
    /// The guest POLICY field.
    pub policy: u64,
    pub vmpl: u32,
    pub platform_info: u64,
    /// The time certificate validity was checked at.
    pub checked_at: SystemTime,
}

impl VerifiedEvidence {
    /// True when a simulated root verified it: it then proves nothing about hardware.
    pub fn is_simulated(&self) -> bool {
        matches!(self.root, Root::Simulated { .. })
    }
    pub fn product(&self) -> Option<Product> {
        match self.root {
            Root::Amd { product } => Some(product),
            Root::Simulated { .. } => None,
        }
    }
}

impl fmt::Display for VerifiedEvidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_simulated() {
            writeln!(f, "SIMULATED evidence (no SEV-SNP hardware involved)")?;
        } else {
            writeln!(f, "AMD SEV-SNP evidence")?;
        }
        writeln!(f, "root:         {}", self.root)?;
        writeln!(f, "signer:       {} ({})", self.signer, self.vek_kind.name())?;
        if let Some(csp) = &self.csp_id {
            writeln!(f, "csp id:       {csp}")?;
        }
        writeln!(f, "version:      {}", self.version)?;
        writeln!(f, "MEASUREMENT:  {}", self.measurement)?;
        writeln!(f, "HOST_DATA:    {}", self.host_data)?;
        writeln!(f, "REPORT_DATA:  {}", self.report_data)?;
        writeln!(f, "REPORTED_TCB: {}", self.reported_tcb)?;
        writeln!(f, "POLICY:       {}", describe_policy(self.policy))?;
        write!(f, "VMPL:         {}", self.vmpl)
    }
}
