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
