//! Build traces for vouch and everything needed to check them.
//!
//! What is here: the job and statement with their canonical encodings (HOST_DATA and
//! REPORT_DATA), SNP evidence (parsing and verifying real AMD reports and certificate chains,
//! and the clearly labelled simulated stand-in), the trust policy, the closure verifier, laut
//! JWS and in-toto/SLSA export.
//!
//! What is not here: QEMU, network access, or anything that launches a VM. A verifier links
//! this crate and nothing else of vouch's host side.
#![forbid(unsafe_code)]

pub mod canonical;
pub mod evidence;
pub mod job;
pub mod jws;
pub mod ownership;
pub mod provenance;
mod serde_str;
pub mod sign;
pub mod statement;
pub mod store;
pub mod tlog;
pub mod trust;
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
    HOST_DATA_TAG, JOB_VERSION,
};
pub use statement::{
    Measurement, OutputInfo, Statement, StatementError, REPORT_DATA_TAG, STATEMENT_VERSION,
};
