//! SEV-SNP on the host: what the AMD secure processor says about this machine, the AMD
//! certificates its reports need, and the checks that make an SNP run fail early.
//!
//! - [`sys`]: the `/dev/sev` ioctl structs and the two read-only commands vouch issues.
//! - [`platform`]: `SNP_PLATFORM_STATUS` decoded, the chip ID and the product, and from them
//!   the [`platform::HostIdentity`] that names this host's VCEK (chip and *reported* TCB).
//! - [`kds`]: AMD's Key Distribution Service: URLs per product and fetching with retries.
//! - [`certs`]: checking VCEKs and chains against AMD's pinned roots, and the cache under the
//!   state directory, keyed by chip and TCB.
//! - [`checks`]: `vouch doctor`'s checks and the preflight that refuses to start an SNP VM
//!   while one fails.
//! - [`selftest`]: one tiny build end to end, verified as a third party would.
//!
//! What is not here: verifying evidence (`build_trace::evidence`), QEMU's command line
//! (`crate::vm`). Nothing here has run on SEV-SNP hardware yet (docs/snp-host.md says what was
//! checked without it).

pub mod certs;
pub mod checks;
pub mod kds;
pub mod platform;
pub mod selftest;
#[allow(unsafe_code)]
pub mod sys;
