//! The vouch guest image, built reproducibly.
//!
//! What is here: the guest kernel build from Debian's `linux-source-6.12` with our committed
//! config fragment, cached outside the checkout ([`kernel`]); the initramfs writer (sorted newc
//! cpio with fixed metadata, `/init` = the static `vouch-agent`, [`cpio`]); the fixed kernel
//! command line, the image directory and its manifest ([`image`]); and the expected SEV-SNP
//! launch measurement plus the simulated measurement used without SNP hardware ([`measure`]).
//!
//! What is not here: launching VMs, or anything job-specific (that would change the measurement).
#![forbid(unsafe_code)]

pub mod cpio;
pub mod image;
pub mod kernel;
pub mod measure;

pub use image::{build_image, ImageSpec, Manifest, CMDLINE};
pub use kernel::{ensure_kernel, Kernel, KernelKey};
pub use measure::{simulated_measurement, snp_measurement, SnpInputs, SnpParams};

/// The cache root: `$VOUCH_CACHE`, else `$XDG_CACHE_HOME/vouch`, else `~/.cache/vouch`.
pub fn cache_dir() -> std::path::PathBuf {
    if let Some(c) = std::env::var_os("VOUCH_CACHE") {
        return c.into();
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return std::path::PathBuf::from(x).join("vouch");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    std::path::PathBuf::from(home).join(".cache/vouch")
}

/// The default bench image directory (the agent built with its `bench` feature, for `vouch
/// bench`): `$VOUCH_BENCH_IMAGE_DIR`, else `<cache>/bench-image`.
pub fn default_bench_image_dir() -> std::path::PathBuf {
    match std::env::var_os("VOUCH_BENCH_IMAGE_DIR") {
        Some(d) => d.into(),
        None => cache_dir().join("bench-image"),
    }
}

/// The default image directory: `$VOUCH_IMAGE_DIR`, else `<cache>/image`.
pub fn default_image_dir() -> std::path::PathBuf {
    match std::env::var_os("VOUCH_IMAGE_DIR") {
        Some(d) => d.into(),
        None => cache_dir().join("image"),
    }
}
