//! SEV-SNP evidence: the raw attestation report plus the certificate chain that vouches for
//! it, its verification under an [`EvidencePolicy`], and the clearly labelled simulated stand-in
//! for hosts without SEV-SNP.
//!
//! # Verification algorithm ([`Verifier::inspect`])
//!
//! Each step is one [`Check`]; the first that fails ends verification with its own
//! [`EvidenceError`] variant. Steps 2–5 depend only on the certificates and are cached per
//! chain (with the VCEK's parsed key), so the steady state per report is one ECDSA P-384
//! verification plus field checks. All signatures are checked with aws-lc-rs (AWS-LC).
//!
//! 1. **Report format**: exactly 1184 bytes, version 2, 3 or 5, SIGNATURE_ALGO 1.
//! 2. **Certificates** parse (DER). **Root**: the ARK's SubjectPublicKeyInfo SHA-256 is one of
//!    AMD's pinned ARKs (Milan, Genoa, Turin) and that product is in `policy.products`, or it
//!    is listed in `policy.simulated_roots`. Nothing else is trusted, and the root alone
//!    decides whether evidence is AMD or simulated (a label in the bundle never does).
//! 3. **Chain signatures**: ARK self-signature, ARK → ASK/ASVK, ASK/ASVK → VCEK/VLEK
//!    (RSA-PSS/SHA-384, salt 48; ECDSA P-384 for a simulated root, whose ARK signs the VCEK
//!    directly). An AMD intermediate named `SEV-VLEK-*` makes the leaf a VLEK.
//! 4. **Product**: the report's CPUID (v3+) or CHIP_ID shape (v2) and the VCEK/VLEK
//!    `productName` extension name the root's product. The TCB encoding follows the product.
//! 5. **Validity** of every certificate at the check time: `policy.check_time` if set
//!    (archival), else the caller's clock.
//! 6. **Signer kind**: a VLEK needs `policy.allow_vlek`; KEY_INFO's signing key must equal the
//!    certificate kind and MASK_CHIP_KEY must be clear.
//! 7. **Binding**: the VCEK/VLEK TCB extensions (blSPL, teeSPL, snpSPL, ucodeSPL, Turin fmcSPL)
//!    equal REPORTED_TCB; a VCEK's hwID equals CHIP_ID (Turin: 8 bytes, the rest zero).
//! 8. **Report signature**: ECDSA P-384 over SHA-384 of the raw bytes 0x000..0x2A0 (never a
//!    re-encoding), r and s little-endian with their top 24 bytes zero, each in `1..n`.
//! 9. **Guest policy** bits, **VMPL**, **minimum TCB** of the product, **MEASUREMENT** in the
//!    allowed set, **HOST_DATA** and **REPORT_DATA** equal the expected values.
//! 10. **Reserved bytes** are zero, including the 368 unsigned bytes after the signature.
//!
//! What is not here: fetching certificates (no network: the builder ships the VCEK), CRLs, the
//! ID block, or which builders a closure trusts (the trust policy embeds [`EvidencePolicy`]).
//!
//! By feature: [`report`] and [`cert_table`] (layouts) always; verification (`bundle`, `certs`,
//! `error`, `policy`, `verified`, `verify`; signatures by aws-lc-rs) with `verifier`; `simulated` with
//! `simulated-attester` (the attester) and `producer` (generating and keeping roots).

#[cfg(feature = "verifier")]
pub mod bundle;
pub mod cert_table;
#[cfg(feature = "verifier")]
pub mod certs;
#[cfg(feature = "verifier")]
pub mod error;
#[cfg(feature = "verifier")]
pub mod policy;
pub mod report;
#[cfg(feature = "simulated-attester")]
pub mod simulated;
#[cfg(feature = "verifier")]
pub mod verified;
#[cfg(feature = "verifier")]
pub mod verify;

#[cfg(feature = "verifier")]
pub use bundle::{BuiltinChainError, EvidenceBundle};
#[cfg(feature = "verifier")]
pub use error::{CertRole, Check, EvidenceError};
#[cfg(feature = "verifier")]
pub use policy::{
    CheckTime, EvidencePolicy, Expected, GuestPolicyRule, Hex, KeyId, Measurement, Measurements,
    MinTcb,
};
pub use report::{Product, Report, TcbVersion};
#[cfg(feature = "producer")]
pub use simulated::{nix_key_name, SimulatedRoot, SIMULATED_ROOT_DIR};
#[cfg(feature = "simulated-attester")]
pub use simulated::{SimulatedAttester, SimulatedError, SimulatedLaunch, SimulatedPlatform};
#[cfg(feature = "verifier")]
pub use verified::{Root, Signer, VekKind, VerifiedEvidence};
#[cfg(feature = "verifier")]
pub use verify::{Observer, Verifier};
