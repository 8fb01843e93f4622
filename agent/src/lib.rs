//! The guest side of vouch: the `vouch-agent` PID 1 and the host↔guest wire protocol.
//!
//! What is here: the framed channel protocol (shared with the host launcher, which depends on
//! this crate; never the reverse), kernel-command-line config, mounts, input unpacking, running
//! the builder the way Nix does, hashing outputs, and the attesters (SEV-SNP and simulated).
//!
//! What is not here: anything that decides trust, or any host-side code.

pub mod attest;
pub mod builder;
pub mod config;
pub mod inputs;
pub mod liveness;
pub mod messages;
pub mod outputs;
pub mod pid1;
pub mod proto;
pub mod run;
pub mod sandbox;
pub mod session;
pub mod sev_guest;
pub mod sys;
