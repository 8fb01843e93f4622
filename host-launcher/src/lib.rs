//! The host side of vouch, as a library the `vouch` binary (and benchmarks) use.
//!
//! What is here: running VMs (QEMU in `snp`, `kvm` or `tcg` mode) and the host end of the vsock
//! channel, the host content store and trace store, the Nix worker and serve protocols, the
//! build core those front-ends drive, and the host side of SEV-SNP (platform status, AMD
//! certificates, preflight checks), and the start-up recovery after a crash (`recovery`).
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
pub mod nixbuilder;
pub mod nixproto;
pub mod recovery;
pub mod serve;
pub mod snp;
pub mod store;
pub mod transparency;
pub mod vm;
