//! Confining the builder process: the seam where the builder-confinement issue adds its
//! measures.
//!
//! What is here today: the builder runs as an unprivileged uid/gid with no supplementary groups,
//! in its own process group, and [`Confinement::kill_all`] kills that group before outputs are
//! hashed. What belongs here next (issue 4): `no_new_privs`, a seccomp filter denying AF_VSOCK,
//! PID namespace, a cgroup with memory/pids limits and `cgroup.kill`, hiding the attestation
//! interfaces and the console. Callers only use [`Confinement::apply`] and
//! [`Confinement::kill_all`], so those measures slot in without touching the build logic.

use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How the builder is confined.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// uid the builder runs as (never 0 in the VM).
    pub uid: u32,
    /// gid the builder runs as.
    pub gid: u32,
}

impl Confinement {
    /// The builder's confinement inside the VM.
    pub fn builder() -> Confinement {
        Confinement { uid: crate::pid1::BUILDER_UID, gid: crate::pid1::BUILDER_GID }
    }

    /// Prepare `cmd` (before spawning): unprivileged ids and a fresh process group. Running as
    /// the current user (e.g. in host-side unit tests) skips the id change.
    pub fn apply(&self, cmd: &mut Command) {
        if nix::unistd::geteuid().as_raw() != self.uid {
            cmd.uid(self.uid).gid(self.gid);
        }
        cmd.process_group(0);
    }

    /// Kill every process of the builder's tree (its process group), the builder included.
    pub fn kill_all(&self, builder_pid: u32) {
        let _ = killpg(Pid::from_raw(builder_pid as i32), Signal::SIGKILL);
    }
}
