//! The host side of vouch, as a library the `vouch` binary (and benchmarks) use.
//!
//! What is here, top down: the front-ends, peers that parse what they are asked into the core's
//! request and answer from its result — the Nix worker and serve protocols (`nixproto`, with
//! the Nix session in `nixbuilder`), the CI service's HTTP API (`serve`) and the `vouch` CLI
//! (the binary); the host's vocabulary and its one pipeline (`core`: request, result, path
//! info, build log, the engine and the one publish step); one build step in a fresh VM
//! (`build`, on `vm`: QEMU and the host end of the vsock channel); the content store (`store`);
//! the host side of SEV-SNP (`snp`: platform status, AMD certificates, preflight checks) and of
//! the transparency log (`transparency`); the start-up recovery after a crash (`recovery`). `docs/architecture.md` draws the map.
//!
//! With the `bench` feature (never in the shipped `vouch`): `vouch bench`, which needs the bench
//! image (`scripts/build-image.sh --bench`).
//!
//! What is not here: trust decisions about evidence (that is `build-trace`), the host↔guest
//! channel's protocol (that is `channel`), or anything that runs inside the guest (that is
//! `agent`, which this crate does not link).
//!
//! `unsafe`: only the `/dev/sev` ioctl in `snp::sys` (the crate denies it everywhere else).
#![deny(unsafe_code)]

#[cfg(feature = "bench")]
pub mod bench;
pub mod build;
pub mod core;
pub mod nixbuilder;
pub mod nixproto;
pub mod pool;
pub mod recovery;
pub mod serve;
pub mod signals;
pub mod snp;
pub mod store;
pub mod transparency;
pub mod vm;
