//! The guest side of vouch: the `vouch-agent` PID 1.
//!
//! What is here: mounts, input unpacking, running the builder the way Nix does, hashing outputs,
//! and the attesters (SEV-SNP and simulated). The channel it speaks (framing, messages,
//! heartbeat, its kernel-command-line config) is the `channel` crate, shared with the host.
//! With the `bench` feature (the bench image only): the benchmark/test modes of `vouch.bench=`
//! (`bench`).
//!
//! What is not here: anything that decides trust, or any host-side code.
//!
//! `unsafe`: only raw system calls no safe wrapper covers, in three modules: [`sys`] (the loopback
//! interface), [`sev_guest`] (the SNP guest device's ioctls) and `sandbox::sys` (the builder
//! sandbox: namespaces, mounts, seccomp, credentials). The crate denies `unsafe_code` everywhere else, so the compiler keeps this true;
//! each block has its SAFETY argument.
#![deny(unsafe_code)]

pub mod attest;
#[cfg(feature = "bench")]
pub mod bench;
pub mod builder;
pub mod inputs;
pub mod outputs;
pub mod pid1;
pub mod rehearsal;
pub mod run;
pub mod sandbox;
pub mod session;
#[allow(unsafe_code)]
pub mod sev_guest;
#[allow(unsafe_code)]
pub mod sys;
