//! vouch's end-to-end tests: real Nix, real QEMU VMs, real AMD vectors, across vouch's crates.
//!
//! The tests are in `tests/tests/`: the VM tests (the `vouch` binary booting the real guest
//! image), and the real-Nix closure tests (`closure.rs`: the closure verifier; `verify_cli.rs`:
//! `vouch verify`, `vouch trace`, `vouch provenance`; `rebuild_cli.rs`: rebuild plans). The
//! programs in `src/bin/` are test doubles run *by* those tests: a fake QEMU for the channel
//! watchdog and a probe that runs inside the guest.
//!
//! What is here, in the library: [`fixture`], the real-Nix closure fixture (Nix builds a small
//! closure; each step gets a statement, simulated evidence and signed records as vouch would
//! store them). It needs build-trace and nix-formats, so it cannot live in `test-support` (which
//! every vouch crate dev-depends on and which therefore depends on none of them); the tests that
//! use it live here for the same reason. Also [`netlab`]: network namespaces standing in for the
//! host's networks and the internet, for the networked-VM tests; [`policy`]: trust policies naming a builder's
//! simulated root and Nix key, for the remote-builder VM tests; [`sim_builder`]: simulated builders
//! whose traces are made without VMs (trust migration); [`service`]: JSON and waiting
//! for builds of a `vouch serve`; [`webdriver`]: a headless Chromium for its web page;
//! [`faults`]: injecting faults and finding what they leave behind (`tests/tests/faults.rs`).
//!
//! What is not here: the helpers every crate's tests share (running Nix, the AMD vectors, the
//! guest image, `vouch` processes: the `test-support` crate), or mocks of Nix, QEMU or AMD.
#![forbid(unsafe_code)]

pub mod faults;
pub mod fixture;
pub mod netlab;
pub mod policy;
pub mod service;
pub mod sim_builder;
pub mod webdriver;
