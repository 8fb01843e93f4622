//! Confining the builder inside the VM.
//!
//! The VM is trusted because its code is measured; the builder is not — it is whatever the
//! derivation says. If it could reach the host, the attestation interfaces or the outputs after
//! they are hashed, the evidence would lie. So the agent runs it (see `docs/threat-model.md`):
//! - as uid 1000 / gid 100 with no supplementary groups and no capabilities, with
//!   `no_new_privs` (setuid/setgid bits and file capabilities do nothing; every mount it sees is
//!   `nosuid` anyway);
//! - under a seccomp filter that refuses `AF_VSOCK` sockets (the host channel), io_uring and
//!   foreign system-call ABIs ([`seccomp`]); the builder keeps loopback networking, as in Nix;
//! - in its own PID, mount, IPC, UTS and cgroup namespaces, and (unless it is a networked
//!   fixed-output build) its own network namespace with only `lo` up;
//! - chrooted into a tree with only the store, `/build`, `/tmp`, a minimal `/etc` and a minimal
//!   `/dev` ([`root`]): no `/sys` (configfs-tsm), no `/dev/sev-guest`, no console, serial port,
//!   hvc or kmsg, none of the agent's files; the kernel log is root's (`dmesg_restrict`), user
//!   namespaces are off;
//! - in cgroup `vouch-build` with `memory.max` (no swap in the guest), `pids.max`, and the
//!   tmpfs it writes to capped ([`cgroup`], [`root::limit_tmpfs`]).
//!
//! Before outputs are hashed, [`Confinement::kill_all`] kills the whole tree (`cgroup.kill`, then
//! waits until `cgroup.procs` is empty; the builder is PID 1 of its namespace, so its exit has
//! already taken every other process of the namespace down). [`Confinement::limit_hit`] turns
//! the cgroup's events and a full tmpfs into a [`LimitHit`], which fails the build with a clear
//! message.
//!
//! A non-networked job must not see a network interface at all: [`Confinement::prepare`] refuses
//! to run one in a VM that has a NIC, so a statement with `network: false` means the guest had
//! none. A networked job (a fixed-output derivation) gets the NIC configured with QEMU user-mode
//! networking's fixed addresses and DNS.
//!
//! What is not here: the build logic (`crate::builder`, which calls [`Confinement::apply`] before
//! spawning, [`Confinement::limit_hit`] while it runs and [`Confinement::kill_all`] after) and
//! the host side (which gives a NIC only to fixed-output steps).

pub mod cgroup;
pub mod root;
pub mod seccomp;
#[allow(unsafe_code)]
mod sys;

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use cgroup::{Cgroup, CgroupLimits};

/// Where the build directory is inside the builder's root.
pub const SANDBOX_BUILD_DIR: &str = "/build";

/// A resource limit the build hit. Each is a build failure with its own message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitHit {
    /// `memory.max` was reached and the OOM killer ran (0 = no limit: the guest ran out).
    #[error("memory limit exceeded: the build reached its memory limit ({}) and the kernel's OOM killer stopped it ({oom_kills} process(es) killed)", bytes_or_guest(*limit_bytes))]
    Memory {
        /// `memory.max` in bytes (0 = none).
        limit_bytes: u64,
        /// `oom_kill` from `memory.events`.
        oom_kills: u64,
    },
    /// `pids.max` refused a fork.
    #[error("process limit exceeded: the build tried to run more than {limit} processes/threads at once ({refused} fork(s) refused)")]
    Processes {
        /// The builder's limit.
        limit: u64,
        /// `max` from `pids.events`.
        refused: u64,
    },
    /// A tmpfs the builder writes to is full.
    #[error("disk space limit exceeded: {mount} is full ({size_bytes} bytes of guest tmpfs)")]
    Tmpfs {
        /// The mount, as the builder sees it.
        mount: String,
        /// Its size.
        size_bytes: u64,
    },
}

fn bytes_or_guest(b: u64) -> String {
    if b == 0 {
        "the guest's memory".to_owned()
    } else {
        format!("memory.max = {b} bytes, {} MiB", b >> 20)
    }
}

/// Errors preparing the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The cgroup.
    #[error("setting up the build cgroup")]
    Cgroup(#[from] cgroup::CgroupError),
    /// The root, sysctls or network.
    #[error("preparing the builder's root")]
    Root(#[from] root::RootError),
    /// A NIC in a VM whose job has no network.
    #[error("this VM has a network interface ({0}) but its job is not a networked fixed-output build: refusing to run the builder")]
    UnexpectedNic(String),
    /// A networked job in a VM without a NIC.
    #[error("the job is a networked fixed-output build but this VM has no network interface")]
    NoNic,
}

/// What the sandbox of one build is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The guest store (a tmpfs).
    pub store: PathBuf,
    /// The build directory (a tmpfs).
    pub build: PathBuf,
    /// Networked fixed-output build: the guest's NIC is configured and the builder shares it.
    pub network: bool,
    /// `memory.max` in bytes (0 = no limit).
    pub memory_bytes: u64,
    /// `pids.max` (0 = no limit).
    pub max_processes: u64,
    /// Size limit of each tmpfs the builder writes to (0 = the kernel's default, half the RAM).
    pub tmpfs_bytes: u64,
}

impl SandboxSpec {
    /// The sandbox of `job`, with the guest's store and build directory.
    pub fn for_job(job: &build_trace::job::Job, store: &Path, build: &Path) -> SandboxSpec {
        SandboxSpec {
            store: store.to_owned(),
            build: build.to_owned(),
            network: job.network,
            memory_bytes: job.limits.memory_bytes,
            max_processes: job.limits.max_processes,
            tmpfs_bytes: job.limits.tmpfs_bytes,
        }
    }
}

struct Sandbox {
    plan: Arc<sys::ChildPlan>,
    cgroup: Cgroup,
    /// Writable tmpfs of the builder: (its path as the builder sees it, path in the agent).
    tmpfs: Vec<(&'static str, PathBuf)>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("cgroup", &self.cgroup).finish_non_exhaustive()
    }
}

/// The job-independent part of the sandbox ([`Confinement::groundwork`]): the guest-wide
/// sysctls, the builder's root (the store and build directory bound in, `/dev`, `/etc`), and the
/// build cgroup (no limits yet). A VM makes it after it accepted its launch, before its job
/// exists: assembling the root is mostly mounts, slow under TCG. Nothing in it depends on the
/// job; [`Confinement::prepare`] adds what does.
#[derive(Debug)]
pub struct Groundwork {
    store: PathBuf,
    build: PathBuf,
}

/// How the builder is confined.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// uid the builder runs as (never 0 in the VM).
    pub uid: u32,
    /// gid the builder runs as.
    pub gid: u32,
    sandbox: Option<Arc<Sandbox>>,
}

fn cstring(p: &Path) -> CString {
    use std::os::unix::ffi::OsStrExt;
    // Our own constant paths: no NUL inside.
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

impl Confinement {
    /// No sandbox: the builder runs as `uid`/`gid` (if they differ from ours) in its own
    /// process group. For host-side tests of the build logic only; the VM uses [`Self::prepare`].
    pub fn unconfined(uid: u32, gid: u32) -> Confinement {
        Confinement { uid, gid, sandbox: None }
    }

    /// The job-independent part of the sandbox, made before the job exists (see
    /// [`Groundwork`]).
    pub fn groundwork(store: &Path, build: &Path) -> Result<Groundwork, SandboxError> {
        root::harden_sysctls()?;
        root::prepare_root(&root::RootSpec {
            root: PathBuf::from(root::SANDBOX_ROOT),
            store: store.to_owned(),
            build: build.to_owned(),
            tmpfs_bytes: 0,
            network: false,
            uid: crate::pid1::BUILDER_UID,
            gid: crate::pid1::BUILDER_GID,
        })?;
        Cgroup::create(Path::new(cgroup::CGROUP_ROOT), CgroupLimits::default())?;
        Ok(Groundwork { store: store.to_owned(), build: build.to_owned() })
    }

    /// Prepare the sandbox for one build in the VM (see the module documentation): sysctls,
    /// network (or the check that there is none), tmpfs limits, the root, the cgroup. With
    /// `groundwork` (made for the same store and build directory before the job), only what
    /// depends on the job is left: the network, the size limits, the root's networked `/etc`,
    /// the cgroup's limits.
    pub fn prepare(
        spec: &SandboxSpec,
        groundwork: Option<&Groundwork>,
    ) -> Result<Confinement, SandboxError> {
        let (uid, gid) = (crate::pid1::BUILDER_UID, crate::pid1::BUILDER_GID);
        let groundwork = groundwork.filter(|g| g.store == spec.store && g.build == spec.build);
        if groundwork.is_none() {
            root::harden_sysctls()?;
        }
        let nics = root::physical_interfaces(Path::new("/sys/class/net"));
        if spec.network {
            let nic = nics.first().ok_or(SandboxError::NoNic)?;
            root::configure_user_net(nic)?;
            crate::pid1::say(&format!(
                "network: {nic} is 10.0.2.15/24 via 10.0.2.2 (QEMU user-mode networking; fixed-output build)"
            ));
        } else if !nics.is_empty() {
            return Err(SandboxError::UnexpectedNic(nics.join(", ")));
        }
        let root_dir = PathBuf::from(root::SANDBOX_ROOT);
        if spec.tmpfs_bytes > 0 {
            root::limit_tmpfs(&spec.build, spec.tmpfs_bytes)?;
            root::limit_tmpfs(&spec.store, spec.tmpfs_bytes)?;
        }
        let root_spec = root::RootSpec {
            root: root_dir.clone(),
            store: spec.store.clone(),
            build: spec.build.clone(),
            tmpfs_bytes: spec.tmpfs_bytes,
            network: spec.network,
            uid,
            gid,
        };
        match groundwork {
            Some(_) => root::fit_root(&root_spec)?,
            None => root::prepare_root(&root_spec)?,
        }
        let limits =
            CgroupLimits { memory_bytes: spec.memory_bytes, max_processes: spec.max_processes };
        let cgroup = Cgroup::create(Path::new(cgroup::CGROUP_ROOT), limits)?;
        let mut unshare = libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWCGROUP;
        if !spec.network {
            unshare |= libc::CLONE_NEWNET;
        }
        let plan = sys::ChildPlan {
            cgroup_procs: cgroup.procs_for_joining()?,
            unshare,
            root: cstring(&root_dir),
            proc_dir: cstring(&root_dir.join("proc")),
            detach: ["/proc", "/sys", "/dev", "/tmp"].map(|p| cstring(Path::new(p))).into(),
            workdir: cstring(Path::new(SANDBOX_BUILD_DIR)),
            uid,
            gid,
            loopback: !spec.network,
            filter: seccomp::builder_filter(),
        };
        crate::pid1::say(&format!(
            "sandbox: uid {uid}, no_new_privs, seccomp (no AF_VSOCK), PID/mount/IPC/UTS/cgroup{} namespaces, chroot, memory.max {}, pids.max {}, tmpfs {}",
            if spec.network { "" } else { "/net" },
            limit_text(spec.memory_bytes),
            limit_text(spec.max_processes),
            limit_text(spec.tmpfs_bytes),
        ));
        let sandbox = Sandbox {
            plan: Arc::new(plan),
            cgroup,
            tmpfs: vec![
                (SANDBOX_BUILD_DIR, spec.build.clone()),
                ("/nix/store", spec.store.clone()),
                ("/tmp (and /dev/shm)", root_dir),
            ],
        };
        Ok(Confinement { uid, gid, sandbox: Some(Arc::new(sandbox)) })
    }

    /// Prepare `cmd` (before spawning). Sandboxed: the `pre_exec` hook of the private `sys`
    /// module (cgroup, namespaces, root, ids, `no_new_privs`, seccomp). Unconfined: the ids (when
    /// they differ from ours) and a fresh process group.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.process_group(0);
        match &self.sandbox {
            Some(sb) => sys::attach(cmd, sb.plan.clone()),
            None => {
                if nix::unistd::geteuid().as_raw() != self.uid {
                    cmd.uid(self.uid).gid(self.gid);
                }
            }
        }
    }

    /// Kill every process of the builder's tree and wait until none is left (sandboxed: the
    /// whole cgroup; unconfined: the process group of `builder_pid`). Returns how many processes
    /// were still alive (sandboxed only).
    pub fn kill_all(&self, builder_pid: u32) -> usize {
        match &self.sandbox {
            Some(sb) => {
                let n = sb.cgroup.kill_and_wait();
                if n > 0 {
                    crate::pid1::say(&format!(
                        "killed {n} builder process(es) left in the build cgroup"
                    ));
                }
                crate::pid1::say("build cgroup empty: no builder process is left");
                n
            }
            None => {
                let _ = killpg(Pid::from_raw(builder_pid as i32), Signal::SIGKILL);
                0
            }
        }
    }

    /// A resource limit the build hit: memory or processes (the cgroup's events) and, when the
    /// builder failed, a full tmpfs (its `ENOSPC` is the likely cause).
    pub fn limit_hit(&self, builder_failed: bool) -> Option<LimitHit> {
        let sb = self.sandbox.as_ref()?;
        if let Some(hit) = sb.cgroup.limit_hit() {
            return Some(hit);
        }
        if builder_failed {
            for (name, path) in &sb.tmpfs {
                if root::is_full(path) {
                    let size_bytes = nix::sys::statvfs::statvfs(path.as_path())
                        .map(|s| s.blocks() * s.fragment_size())
                        .unwrap_or(0);
                    return Some(LimitHit::Tmpfs { mount: (*name).to_owned(), size_bytes });
                }
            }
        }
        None
    }
}

fn limit_text(n: u64) -> String {
    if n == 0 {
        "none".into()
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_messages_are_clear() {
        let m = LimitHit::Memory { limit_bytes: 64 << 20, oom_kills: 2 }.to_string();
        assert!(m.starts_with("memory limit exceeded"), "{m}");
        assert!(m.contains("64 MiB") && m.contains("2 process(es) killed"), "{m}");
        let m = LimitHit::Memory { limit_bytes: 0, oom_kills: 1 }.to_string();
        assert!(m.contains("the guest's memory"), "{m}");
        let m = LimitHit::Processes { limit: 32, refused: 5 }.to_string();
        assert!(m.starts_with("process limit exceeded") && m.contains("more than 32"), "{m}");
        let m = LimitHit::Tmpfs { mount: "/build".into(), size_bytes: 4096 }.to_string();
        assert!(m.contains("/build is full"), "{m}");
    }

    #[test]
    fn unconfined_has_no_limits() {
        let c = Confinement::unconfined(1, 2);
        assert!(c.limit_hit(true).is_none());
    }
}
