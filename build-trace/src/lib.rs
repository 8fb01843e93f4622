//! Build traces for vouch and everything needed to check them.
//!
//! What is here, by cargo feature (`docs/architecture.md`):
//! - always (the model): the launch, the job and the statement with their canonical encodings
//!   (HOST_DATA, the job digest and REPORT_DATA) and the SNP report layout
//!   ([`evidence::report`]);
//! - `verifier`: SNP evidence verification (real AMD reports and certificate chains, and the
//!   clearly labelled simulated stand-in), the trust policy, the closure verifier, the trace
//!   store's reader, laut JWS verification, output ownership, in-toto/SLSA export;
//! - `simulated-attester`: signing simulated reports with a key the guest is given
//!   (`evidence::SimulatedAttester`);
//! - `remote` (default): trace stores read over HTTP(S) ([`source`]: `vouch serve`, or any
//!   server of a trace store directory), with a bounded fetching pool and a local cache;
//! - `producer` (default; includes both): the launcher's key on disk (`sign`), the trace store's
//!   writer and audit, JWS and Nix record signing, generating simulated roots.
//!
//! `fuzzing` (hidden) holds the bodies of build-trace's fuzz targets, gated like what they fuzz.
//!
//! A verifier-only build (`--no-default-features --features verifier`) has no key generation;
//! the guest agent builds with `simulated-attester` alone, so it links no verifier
//! (`scripts/check-features.sh` checks both).
//!
//! What is not here: QEMU, network access beyond reading remote trace stores (`remote`), or
//! anything that launches a VM. A verifier links
//! this crate and nothing else of vouch's host side.
#![forbid(unsafe_code)]

pub mod canonical;
pub mod evidence;
#[doc(hidden)]
pub mod fuzzing;
pub mod job;
#[cfg(feature = "verifier")]
pub mod jws;
pub mod launch;
#[cfg(feature = "verifier")]
pub mod ownership;
#[cfg(feature = "verifier")]
pub mod provenance;
mod serde_str;
#[cfg(feature = "producer")]
pub mod sign;
#[cfg(feature = "remote")]
pub mod source;
pub mod statement;
#[cfg(feature = "verifier")]
pub mod store;
#[cfg(feature = "verifier")]
pub mod tlog;
#[cfg(feature = "verifier")]
pub mod trust;
#[cfg(feature = "verifier")]
pub mod verify;

/// `error: cause: cause …` on one line: how vouch's components report an error with its
/// `source()` chain where one line is all there is room for (broken links, protocol errors).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut s = err.to_string();
    let mut src = err.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

pub use job::{
    BasicDerivation, CaRule, DrvOutput, Job, JobError, Limits, NarHash, PathInfo, StepKind,
    JOB_DIGEST_TAG, JOB_VERSION,
};
pub use launch::{Hex32, Launch, LaunchError, LAUNCH_TAG, LAUNCH_VERSION};
pub use statement::{
    Measurement, OutputInfo, Statement, StatementError, REPORT_DATA_TAG, STATEMENT_VERSION,
};
