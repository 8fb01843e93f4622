//! What a step is allowed: its resource limits, whether it gets network, and how a fixed output
//! is accepted.
//!
//! - [`effective_limits`]: the request's limits, with this launcher's defaults where a value is 0
//!   for the sandbox limits (`memory_bytes` → the builder's `memory.max`, `max_processes` →
//!   `pids.max`, `tmpfs_bytes` → the size of each tmpfs the builder writes to). The job carries
//!   the filled-in values, so HOST_DATA and the statement record the limits that applied.
//!   [`guest_memory_mib`]: the VM gets at least the builder's memory limit plus a reserve for the
//!   kernel, the agent and the unpacked inputs.
//! - [`check_fixed_output_request`]: a fixed-output derivation declaring an md5 or sha1 hash is
//!   refused unless the launcher is configured to allow weak hashes (the verifier has the same
//!   rule in its trust policy).
//! - [`check_fixed_output_result`]: a fixed output is accepted only by its declared hash — the
//!   statement's content address must be exactly `fixed:[r:]<algo>:<declared hash>` (its bytes
//!   are then checked against that address and the path by `super::check`).
//!
//! Network itself is granted by `crate::vm::network::NetworkGrant`, only to fixed-output jobs.

use build_trace::job::{step_kind, BasicDerivation, Job, Limits, StepKind};
use build_trace::statement::OutputInfo;
use nix_formats::content_address::ContentAddress;
use nix_formats::derivation::CaMethod;
use nix_formats::store_path::FileIngestionMethod;
use nix_formats::{Hash, HashAlgo};

const MIB: u64 = 1 << 20;
/// Guest memory kept outside the builder's limit (kernel, agent, unpacked inputs), in MiB.
pub const GUEST_RESERVE_MIB: u64 = 256;
/// Default `pids.max` of a build.
pub const DEFAULT_MAX_PROCESSES: u64 = 4096;
/// The smallest default memory limit, in MiB.
const MIN_DEFAULT_MEMORY_MIB: u64 = 64;

/// Fill the sandbox limits left at 0 in `req` from `defaults`, and those still 0 from the guest
/// size: memory = guest RAM − [`GUEST_RESERVE_MIB`], processes = [`DEFAULT_MAX_PROCESSES`],
/// tmpfs = half the guest RAM. Other limits are left as they are (0 = none).
pub fn effective_limits(req: Limits, defaults: &Limits, guest_mib: u32) -> Limits {
    let guest = u64::from(guest_mib);
    let pick = |asked: u64, default: u64, fallback: u64| match (asked, default) {
        (0, 0) => fallback,
        (0, d) => d,
        (a, _) => a,
    };
    Limits {
        memory_bytes: pick(
            req.memory_bytes,
            defaults.memory_bytes,
            guest.saturating_sub(GUEST_RESERVE_MIB).max(MIN_DEFAULT_MEMORY_MIB) * MIB,
        ),
        max_processes: pick(req.max_processes, defaults.max_processes, DEFAULT_MAX_PROCESSES),
        tmpfs_bytes: pick(req.tmpfs_bytes, defaults.tmpfs_bytes, guest / 2 * MIB),
        ..req
    }
}

/// Guest RAM for a job with `limits`: `base_mib`, or more if the builder's memory limit needs it.
pub fn guest_memory_mib(base_mib: u32, limits: &Limits) -> u32 {
    let needed = limits.memory_bytes.div_ceil(MIB) + GUEST_RESERVE_MIB;
    u32::try_from(needed).unwrap_or(u32::MAX).max(base_mib)
}

/// Why a fixed-output request or result is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FixedOutputError {
    /// md5/sha1 without `allow_weak_fixed_hashes`.
    #[error("fixed-output derivation declares a {algo} hash for output `{output}`; {algo} is refused unless weak hashes are allowed (--allow-weak-hashes)")]
    WeakHash {
        /// Output.
        output: String,
        /// The algorithm.
        algo: HashAlgo,
    },
    /// The declaration does not parse.
    #[error("fixed output `{output}`: {why}")]
    Declaration {
        /// Output.
        output: String,
        /// What is wrong.
        why: String,
    },
    /// The statement's content address is not the declared one.
    #[error("fixed output `{output}` is accepted only by its declared hash `{declared}`, but the statement says `{got}`")]
    NotDeclared {
        /// Output.
        output: String,
        /// The declared content address.
        declared: String,
        /// What the statement says.
        got: String,
    },
}

/// The declared content address of each output of a fixed-output derivation (none for other
/// kinds).
pub fn declared_content_addresses(
    drv: &BasicDerivation,
) -> Result<Vec<(String, ContentAddress)>, FixedOutputError> {
    if !matches!(step_kind(drv), Ok(StepKind::FixedOutput)) {
        return Ok(Vec::new());
    }
    drv.outputs
        .iter()
        .map(|(name, o)| {
            let bad = |why: String| FixedOutputError::Declaration { output: name.clone(), why };
            let (method, algo) =
                CaMethod::parse_method_algo(&o.hash_algo).map_err(|e| bad(e.to_string()))?;
            let method = match method {
                CaMethod::Flat => FileIngestionMethod::Flat,
                CaMethod::Recursive => FileIngestionMethod::Recursive,
                CaMethod::Text => return Err(bad("text hashing is not a fixed output".into())),
            };
            let hash = Hash::parse_digest(algo, &o.hash).map_err(|e| bad(e.to_string()))?;
            Ok((name.clone(), ContentAddress::Fixed { method, hash }))
        })
        .collect()
}

/// Refuse a fixed-output derivation that declares md5 or sha1, unless `allow_weak`.
pub fn check_fixed_output_request(
    drv: &BasicDerivation,
    allow_weak: bool,
) -> Result<(), FixedOutputError> {
    for (output, ca) in declared_content_addresses(drv)? {
        if let ContentAddress::Fixed { hash, .. } = &ca {
            let algo = hash.algo();
            if matches!(algo, HashAlgo::Md5 | HashAlgo::Sha1) && !allow_weak {
                return Err(FixedOutputError::WeakHash { output, algo });
            }
        }
    }
    Ok(())
}

/// Accept a fixed output only by its declared hash: the statement's `ca` for each output of a
/// fixed-output job must be exactly the declared content address.
pub fn check_fixed_output_result(
    job: &Job,
    outputs: &std::collections::BTreeMap<String, OutputInfo>,
) -> Result<(), FixedOutputError> {
    for (output, declared) in declared_content_addresses(&job.drv)? {
        let got = outputs.get(&output).and_then(|o| o.ca.clone()).unwrap_or_default();
        if ContentAddress::parse(&got).ok().as_ref() != Some(&declared) {
            return Err(FixedOutputError::NotDeclared {
                output,
                declared: declared.to_string(),
                got,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use build_trace::job::DrvOutput;
    use nix_formats::StorePath;

    const SRC: &str = "/nix/store/11111111111111111111111111111111-src";

    fn sp(p: &str) -> StorePath {
        StorePath::parse(p).unwrap()
    }

    fn fod(algo: &str, hash: &str) -> BasicDerivation {
        BasicDerivation {
            name: "src".into(),
            outputs: [(
                "out".to_owned(),
                DrvOutput { path: Some(sp(SRC)), hash_algo: algo.into(), hash: hash.into() },
            )]
            .into(),
            input_srcs: Default::default(),
            system: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec![],
            env: Default::default(),
        }
    }

    #[test]
    fn defaults_fill_only_zero_sandbox_limits() {
        let none = Limits::default();
        let l = effective_limits(none, &none, 2048);
        assert_eq!(l.memory_bytes, (2048 - GUEST_RESERVE_MIB) * MIB);
        assert_eq!(l.max_processes, DEFAULT_MAX_PROCESSES);
        assert_eq!(l.tmpfs_bytes, 1024 * MIB);
        assert_eq!((l.timeout_s, l.max_log_bytes, l.cores), (0, 0, 0));
        let defaults = Limits { max_processes: 100, ..none };
        let asked = Limits { memory_bytes: 64 * MIB, timeout_s: 5, ..none };
        let l = effective_limits(asked, &defaults, 2048);
        assert_eq!((l.memory_bytes, l.max_processes, l.timeout_s), (64 * MIB, 100, 5));
        // A tiny guest still gets a usable default.
        assert_eq!(effective_limits(none, &none, 128).memory_bytes, 64 * MIB);
    }

    #[test]
    fn the_guest_grows_with_the_memory_limit() {
        let l = Limits { memory_bytes: 4096 * MIB, ..Limits::default() };
        assert_eq!(guest_memory_mib(2048, &l), 4096 + GUEST_RESERVE_MIB as u32);
        let l = Limits { memory_bytes: 64 * MIB, ..Limits::default() };
        assert_eq!(guest_memory_mib(2048, &l), 2048);
    }

    #[test]
    fn weak_hashes_are_refused_unless_allowed() {
        let md5 = fod("md5", &"00".repeat(16));
        let sha1 = fod("r:sha1", &"00".repeat(20));
        let sha256 = fod("sha256", &"00".repeat(32));
        assert!(matches!(
            check_fixed_output_request(&md5, false),
            Err(FixedOutputError::WeakHash { algo: HashAlgo::Md5, .. })
        ));
        let e = check_fixed_output_request(&sha1, false).unwrap_err().to_string();
        assert!(e.contains("sha1") && e.contains("--allow-weak-hashes"), "{e}");
        assert_eq!(check_fixed_output_request(&md5, true), Ok(()));
        assert_eq!(check_fixed_output_request(&sha256, false), Ok(()));
        let mut ia = sha256.clone();
        ia.outputs.get_mut("out").unwrap().hash_algo.clear();
        ia.outputs.get_mut("out").unwrap().hash.clear();
        assert_eq!(check_fixed_output_request(&ia, false), Ok(()), "not a fixed output");
    }

    #[test]
    fn a_fixed_output_is_accepted_only_by_its_declared_hash() {
        let hex = "ab".repeat(32);
        let drv = fod("sha256", &hex);
        let job = Job::new(
            "j",
            sp("/nix/store/00000000000000000000000000000000-src.drv"),
            drv,
            Default::default(),
            Limits::default(),
            build_trace::job::CaRule::SelfRefPositions,
            true,
            ["out".to_owned()].into(),
        );
        let declared = ContentAddress::Fixed {
            method: FileIngestionMethod::Flat,
            hash: Hash::parse_digest(HashAlgo::Sha256, &hex).unwrap(),
        };
        let info = |ca: Option<String>| OutputInfo {
            path: sp(SRC),
            nar_hash: build_trace::job::NarHash([0; 32]),
            nar_size: 0,
            references: Default::default(),
            ca,
        };
        let ok = [("out".to_owned(), info(Some(declared.to_string())))].into();
        assert_eq!(check_fixed_output_result(&job, &ok), Ok(()));
        let other = ContentAddress::Fixed {
            method: FileIngestionMethod::Flat,
            hash: Hash::parse_digest(HashAlgo::Sha256, &"cd".repeat(32)).unwrap(),
        };
        let recursive = ContentAddress::Fixed {
            method: FileIngestionMethod::Recursive,
            hash: Hash::parse_digest(HashAlgo::Sha256, &hex).unwrap(),
        };
        for bad in [Some(other.to_string()), Some(recursive.to_string()), None] {
            let outs = [("out".to_owned(), info(bad))].into();
            assert!(matches!(
                check_fixed_output_result(&job, &outs),
                Err(FixedOutputError::NotDeclared { .. })
            ));
        }
    }
}
