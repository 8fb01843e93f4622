//! The only way a build VM gets a network device.
//!
//! A [`NetworkGrant`] exists only for a job that is a fixed-output derivation and says
//! `network: true` (checked by [`NetworkGrant::for_job`], the type's only constructor), and
//! [`super::qemu_argv`] adds a NIC only when handed one. So nothing but a fixed-output derivation
//! can get a NIC, whatever a caller puts in its request; and the job (hence HOST_DATA and the
//! statement) records that the VM was networked. The NIC is QEMU user-mode networking pinned to
//! slirp's usual addresses, which the agent configures statically (guest 10.0.2.15/24, host
//! 10.0.2.2, DNS 10.0.2.3); where those packets may go is [`super::egress`]'s.
//!
//! What is not here: the acceptance of a fixed output by its declared hash
//! (`crate::build::policy`).

use build_trace::job::{Job, StepKind};
use nix_formats::StorePath;

/// QEMU's `-netdev` for the fixed-output variant: user-mode networking with slirp's default
/// addresses written out, so that a QEMU default change cannot silently break the guest's
/// static configuration.
pub const USER_NETDEV: &str = "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3";

/// Permission to give one VM a NIC. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkGrant {
    drv_path: StorePath,
}

/// Why a job cannot have network.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkError {
    /// The job asks for network but is not a fixed-output derivation.
    #[error(
        "refusing network for {0}: only fixed-output derivations are built with a network device"
    )]
    NotFixedOutput(StorePath),
    /// The job does not parse as a known kind.
    #[error("refusing network for {0}: {1}")]
    Job(StorePath, String),
}

impl NetworkGrant {
    /// The grant for `job`: `None` when it asks for no network, an error when it asks for
    /// network without being a fixed-output derivation.
    pub fn for_job(job: &Job) -> Result<Option<NetworkGrant>, NetworkError> {
        if !job.network {
            return Ok(None);
        }
        match job.kind() {
            Ok(StepKind::FixedOutput) => Ok(Some(NetworkGrant { drv_path: job.drv_path.clone() })),
            Ok(_) => Err(NetworkError::NotFixedOutput(job.drv_path.clone())),
            Err(e) => Err(NetworkError::Job(job.drv_path.clone(), e.to_string())),
        }
    }

    /// The fixed-output derivation this grant is for.
    pub fn drv_path(&self) -> &StorePath {
        &self.drv_path
    }
}

#[cfg(test)]
pub(crate) fn grant_for_tests() -> NetworkGrant {
    let drv_path = StorePath::parse("/nix/store/00000000000000000000000000000000-fod.drv");
    NetworkGrant { drv_path: drv_path.expect("a store path") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use build_trace::job::{BasicDerivation, CaRule, DrvOutput, Limits};

    fn job(output: DrvOutput, network: bool) -> Job {
        let drv = BasicDerivation {
            name: "x".into(),
            outputs: [("out".to_owned(), output)].into(),
            input_srcs: Default::default(),
            system: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec![],
            env: Default::default(),
        };
        Job::new(
            "j",
            sp("/nix/store/00000000000000000000000000000000-x.drv"),
            drv,
            Default::default(),
            Limits::default(),
            CaRule::SelfRefPositions,
            network,
            ["out".to_owned()].into(),
        )
    }

    const OUT: &str = "/nix/store/11111111111111111111111111111111-x";

    fn sp(p: &str) -> StorePath {
        StorePath::parse(p).unwrap()
    }

    fn fixed() -> DrvOutput {
        DrvOutput { path: Some(sp(OUT)), hash_algo: "sha256".into(), hash: "ab".repeat(32) }
    }

    #[test]
    fn only_a_fixed_output_job_asking_for_network_gets_a_grant() {
        assert!(NetworkGrant::for_job(&job(fixed(), true)).unwrap().is_some());
        assert_eq!(NetworkGrant::for_job(&job(fixed(), false)), Ok(None));
        let ia = DrvOutput { path: Some(sp(OUT)), hash_algo: String::new(), hash: String::new() };
        assert!(matches!(
            NetworkGrant::for_job(&job(ia.clone(), true)),
            Err(NetworkError::NotFixedOutput(_))
        ));
        assert_eq!(NetworkGrant::for_job(&job(ia, false)), Ok(None));
        let ca = DrvOutput { path: None, hash_algo: "r:sha256".into(), hash: String::new() };
        assert!(matches!(
            NetworkGrant::for_job(&job(ca, true)),
            Err(NetworkError::NotFixedOutput(_))
        ));
    }
}
