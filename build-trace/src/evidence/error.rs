//! Errors of evidence verification: one variant per check, each naming what was wrong, and
//! [`Check`], the list of checks in the order the verifier runs them (the CLI prints it).
//! Not here: the checks themselves (`verify.rs`) or how a caller reports the error chain.

use std::fmt;

use super::report::{Product, ProductHint, ReportFormatError, SigningKey, TcbVersion};

/// The checks of [`super::Verifier::verify`], in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Check {
    /// Length, version and signature algorithm of the report.
    ReportFormat,
    /// The certificates parse.
    Certificates,
    /// The ARK is a pinned AMD root of an allowed product, or a simulated root the policy names.
    Root,
    /// The ARK signs itself.
    ArkSignature,
    /// The ARK signs the ASK/ASVK.
    AskSignature,
    /// The ASK/ASVK (simulated: the ARK) signs the VCEK/VLEK.
    VekSignature,
    /// The report, the certificate and the root agree on the product.
    Product,
    /// Every certificate is valid at the check time.
    Validity,
    /// VCEK vs VLEK: allowed by the policy and equal to KEY_INFO's signing key.
    SignerKind,
    /// The VCEK's TCB extensions equal REPORTED_TCB.
    TcbBinding,
    /// The VCEK's hwID equals CHIP_ID.
    ChipIdBinding,
    /// ECDSA P-384 over the raw report bytes 0x000..0x2A0.
    ReportSignature,
    /// Guest policy bits.
    GuestPolicy,
    /// VMPL.
    Vmpl,
    /// REPORTED_TCB at least the product's minimum.
    MinimumTcb,
    /// MEASUREMENT in the allowed set.
    Measurement,
    /// HOST_DATA equals the expected value.
    HostData,
    /// REPORT_DATA equals the expected value.
    ReportData,
    /// Reserved bytes (signed and unsigned) are zero.
    ReservedBytes,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::ReportFormat => "report format",
            Check::Certificates => "certificates",
            Check::Root => "root of trust",
            Check::Product => "product",
            Check::ArkSignature => "ARK self-signature",
            Check::AskSignature => "ARK signs ASK/ASVK",
            Check::VekSignature => "ASK signs VCEK/VLEK",
            Check::Validity => "certificate validity",
            Check::SignerKind => "signing key kind",
            Check::TcbBinding => "VCEK TCB = REPORTED_TCB",
            Check::ChipIdBinding => "VCEK hwID = CHIP_ID",
            Check::ReportSignature => "report signature",
            Check::GuestPolicy => "guest policy",
            Check::Vmpl => "VMPL",
            Check::MinimumTcb => "minimum TCB",
            Check::Measurement => "MEASUREMENT",
            Check::HostData => "HOST_DATA",
            Check::ReportData => "REPORT_DATA",
            Check::ReservedBytes => "reserved bytes",
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which certificate of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    Ark,
    /// ASK (VCEK chain) or ASVK (VLEK chain).
    Ask,
    /// VCEK or VLEK.
    Vek,
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertRole::Ark => "ARK",
            CertRole::Ask => "ASK/ASVK",
            CertRole::Vek => "VCEK/VLEK",
        })
    }
}

/// Why a signature over a certificate did not verify.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SignatureError(pub String);

/// Why evidence was rejected. Each variant is one check; [`EvidenceError::check`] says which.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    #[error("malformed report")]
    ReportFormat(#[from] ReportFormatError),
    #[error("report SIGNATURE_ALGO is {0}, only 1 (ECDSA P-384 with SHA-384) is accepted")]
    SignatureAlgorithm(u32),

    #[error("{role} certificate does not parse")]
    CertificateParse {
        role: CertRole,
        #[source]
        source: der::Error,
    },
    #[error("the chain has no {0} certificate")]
    MissingCertificate(CertRole),
    #[error("{role} certificate extension {oid} is {problem}")]
    CertificateExtension { role: CertRole, oid: &'static str, problem: String },

    #[error(
        "root certificate {subject:?} (SPKI SHA-256 {spki_sha256}) is neither a pinned AMD root \
         nor a simulated root named by the policy"
    )]
    UntrustedRoot { subject: String, spki_sha256: String },
    #[error("AMD {0} evidence is not allowed by the policy (allowed products: {1})")]
    ProductNotAllowed(Product, String),
    #[error("product mismatch: the root is AMD {root}, but the {source_name} says {found}")]
    ProductMismatch { root: Product, source_name: &'static str, found: String },
    #[error(
        "the ASK/ASVK {0:?} is neither an ASK (SEV-<product>) nor an ASVK (SEV-VLEK-<product>)"
    )]
    UnknownIntermediate(String),

    #[error("the ARK does not sign itself")]
    ArkSignature(#[source] SignatureError),
    #[error("the ARK does not sign the ASK/ASVK")]
    AskSignature(#[source] SignatureError),
    #[error("the {issuer} does not sign the VCEK/VLEK")]
    VekSignature {
        issuer: &'static str,
        #[source]
        source: SignatureError,
    },
    #[error("{role} certificate is not valid at {at} (valid {not_before} .. {not_after})")]
    CertificateValidity { role: CertRole, at: String, not_before: String, not_after: String },

    #[error(
        "the report is signed by a VLEK, which the policy does not allow (allow_vlek = false)"
    )]
    VlekNotAllowed,
    #[error("KEY_INFO says the report was signed by {report}, but the certificate is a {cert}")]
    SigningKeyMismatch { report: SigningKey, cert: &'static str },
    #[error("KEY_INFO has MASK_CHIP_KEY set: the firmware did not sign this report")]
    MaskChipKey,

    #[error("VCEK {component} SPL is {cert}, but REPORTED_TCB has {report}")]
    TcbBinding { component: &'static str, cert: u8, report: u8 },
    #[error("VCEK hwID {cert} does not match CHIP_ID {report}")]
    ChipIdBinding { cert: String, report: String },

    #[error("report signature is malformed: {0}")]
    SignatureEncoding(&'static str),
    #[error("report signature does not verify under the {0} public key")]
    ReportSignature(&'static str),

    #[error("guest policy {policy:#x} allows debugging (DEBUG, bit 19)")]
    PolicyDebug { policy: u64 },
    #[error("guest policy {policy:#x} allows a migration agent (MIGRATE_MA, bit 18)")]
    PolicyMigrationAgent { policy: u64 },
    #[error("guest policy {policy:#x} has reserved bit 17 clear (it must be one)")]
    PolicyBit17 { policy: u64 },
    #[error("guest policy {policy:#x} has reserved bits 26..63 set")]
    PolicyReservedBits { policy: u64 },
    #[error("guest policy {policy:#x} allows SMT, the evidence policy requires SMT off")]
    PolicySmt { policy: u64 },
    #[error("guest policy {policy:#x} does not require a single socket, the evidence policy does")]
    PolicySingleSocket { policy: u64 },
    #[error("guest policy ABI {major}.{minor} is below the minimum {min_major}.{min_minor}")]
    PolicyAbi { major: u8, minor: u8, min_major: u8, min_minor: u8 },

    #[error("VMPL is {got}, the policy requires {want}")]
    Vmpl { got: u32, want: u32 },
    #[error("REPORTED_TCB {got} is below the {product} minimum {min} ({component})")]
    TcbTooLow { product: String, component: &'static str, got: TcbVersion, min: TcbVersion },
    #[error("MEASUREMENT {0} is not in the policy's allowed set")]
    Measurement(String),
    #[error("HOST_DATA {got} is not the expected {want}")]
    HostData { got: String, want: String },
    #[error("REPORT_DATA {got} is not the expected {want}")]
    ReportData { got: String, want: String },
    #[error("reserved byte at offset {offset:#x} is {value:#04x}, reserved bytes must be zero")]
    ReservedBytes { offset: usize, value: u8 },
}

impl EvidenceError {
    /// The check that failed.
    pub fn check(&self) -> Check {
        use EvidenceError as E;
        match self {
            E::ReportFormat(_) | E::SignatureAlgorithm(_) => Check::ReportFormat,
            E::CertificateParse { .. }
            | E::MissingCertificate(_)
            | E::CertificateExtension { .. }
            | E::UnknownIntermediate(_) => Check::Certificates,
            E::UntrustedRoot { .. } | E::ProductNotAllowed(..) => Check::Root,
            E::ProductMismatch { .. } => Check::Product,
            E::ArkSignature(_) => Check::ArkSignature,
            E::AskSignature(_) => Check::AskSignature,
            E::VekSignature { .. } => Check::VekSignature,
            E::CertificateValidity { .. } => Check::Validity,
            E::VlekNotAllowed | E::SigningKeyMismatch { .. } | E::MaskChipKey => Check::SignerKind,
            E::TcbBinding { .. } => Check::TcbBinding,
            E::ChipIdBinding { .. } => Check::ChipIdBinding,
            E::SignatureEncoding(_) | E::ReportSignature(_) => Check::ReportSignature,
            E::PolicyDebug { .. }
            | E::PolicyMigrationAgent { .. }
            | E::PolicyBit17 { .. }
            | E::PolicyReservedBits { .. }
            | E::PolicySmt { .. }
            | E::PolicySingleSocket { .. }
            | E::PolicyAbi { .. } => Check::GuestPolicy,
            E::Vmpl { .. } => Check::Vmpl,
            E::TcbTooLow { .. } => Check::MinimumTcb,
            E::Measurement(_) => Check::Measurement,
            E::HostData { .. } => Check::HostData,
            E::ReportData { .. } => Check::ReportData,
            E::ReservedBytes { .. } => Check::ReservedBytes,
        }
    }

    pub(crate) fn product_mismatch(
        root: Product,
        source_name: &'static str,
        found: ProductHint,
    ) -> Self {
        EvidenceError::ProductMismatch { root, source_name, found: found.to_string() }
    }
}
