//! The vouch guest image, built reproducibly.
//!
//! What is here: the guest kernel build from Debian's `linux-source-6.12` with our committed
//! config fragment (cached outside the checkout), the initramfs writer (sorted newc cpio with
//! fixed metadata, `/init` = the static `vouch-agent`), the fixed kernel command line, the
//! manifest, and the expected SEV-SNP launch measurement.
//!
//! What is not here: launching VMs, or anything job-specific (that would change the measurement).
