//! Support shared by every vouch crate's tests: a dev-dependency of nix-formats, build-trace,
//! host-launcher and vm-image, and a dependency of the end-to-end `tests` crate.
//!
//! What is here: [`nix`] (running the real Nix with the test configuration, the busybox
//! directory test derivations build with, unique names, local reference builds), [`chroot`]
//! (a second real Nix, Debian trixie's 2.26, in a cached chroot with a store per test),
//! [`bridge`] (what sshd does for a remote builder, on a Unix socket), [`snp`] (the real AMD SEV-SNP test
//! vectors, kept in this crate's `data/snp/` with their provenance and licences), [`vm`] (the
//! `vouch` binary, the guest image, scratch areas for VM tests), [`server`] (a
//! `vouch nix-builder --listen` process on a Unix socket), [`http_service`] (a `vouch serve`
//! process and a tiny HTTP client), [`fuzz`] (the fuzz targets' allocator and seed replay).
//!
//! It depends on `std` and `tempfile` only, never on vouch's own crates, so that any of them can
//! dev-depend on it without a cycle. Test support that needs vouch's crates lives next to the
//! tests that use it: the real-Nix closure fixture (it builds traces with build-trace) is the
//! `tests` crate's library, and the tests that use it are that crate's tests.
//!
//! Nothing here reads outside the repository: the test vectors are part of it, and this crate's
//! `self_contained` test fails if any file of the repository refers to a directory beside it.
//!
//! What is not here: mocks of Nix, QEMU or AMD (there are none), or the tests themselves.
#![deny(unsafe_code)] // `fuzz::alloc` alone implements `GlobalAlloc`

pub mod bridge;
pub mod chroot;
pub mod fuzz;
pub mod http_service;
pub mod nix;
pub mod server;
pub mod snp;
pub mod vm;
