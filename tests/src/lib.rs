//! Shared support for vouch's tests: this crate's end-to-end tests (real Nix, real VMs) and the
//! real-Nix and real-vector tests of the other crates.
//!
//! What is here: [`nix`] (running the real Nix with the test configuration, the busybox
//! directory test derivations build with, unique names), [`snp`] (the real AMD SEV-SNP test
//! vectors), [`vm`] (the `vouch` binary, the guest image, scratch areas for VM tests),
//! [`server`] (a `vouch nix-builder --listen` process on a Unix socket), [`http_service`] (a
//! `vouch serve` process and a tiny HTTP client).
//!
//! The modules use only `std` and `tempfile`, and refer to each other as `super::…`: the
//! other crates' tests include them by path (`#[path = "../../tests/src/nix.rs"] mod nix;`), so
//! every crate shares this one copy without depending on this crate, which depends on vouch's
//! own crates.
//!
//! What is not here: mocks of Nix, QEMU or AMD (there are none), or the tests themselves.
#![forbid(unsafe_code)]
pub mod http_service;
pub mod nix;
pub mod server;
pub mod snp;
pub mod vm;
