//! The host side of vouch, as a library the `vouch` binary (and benchmarks) use.
//!
//! What is here: running VMs (QEMU in `snp`, `kvm` or `tcg` mode) and the host end of the vsock
//! channel, the host content store and trace store, the Nix worker and serve protocols, the
//! build core those front-ends drive, and the host side of SEV-SNP (platform status, AMD
//! certificates, preflight checks).
//!
//! What is not here: trust decisions about evidence (that is `build-trace`), or anything that
//! runs inside the guest (that is `agent`).

pub mod bench;
pub mod build;
pub mod nixbuilder;
pub mod nixproto;
pub mod serve;
pub mod snp;
pub mod store;
pub mod vm;
