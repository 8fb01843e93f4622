//! Shared helpers for vouch's end-to-end tests (real Nix, real VMs). No mocks of Nix or QEMU.
pub mod vm;
