//! The builder's cgroup (v2): memory and process limits, their events, and killing the whole
//! tree.
//!
//! One cgroup per build, `<root>/vouch-build`, with the `memory` and `pids` controllers:
//! `memory.max` (the guest kernel has no swap, so this is a hard limit on anonymous memory and
//! on tmpfs pages the builder writes), `memory.oom.group = 1` (an OOM kill takes the whole build
//! down instead of leaving a half-working tree), `pids.max`. The builder is born inside it (its
//! first process writes `0` to `cgroup.procs` before anything else), so nothing it starts can be
//! outside. [`Cgroup::kill_and_wait`] writes `cgroup.kill` and waits until `cgroup.procs` is
//! empty. [`Cgroup::limit_hit`] reads `memory.events` (`oom`, `oom_kill`) and `pids.events`
//! (`max`).
//!
//! What is not here: the namespaces and the mounts (`super::sys`, `super::root`).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use super::LimitHit;

/// Where the guest mounts the cgroup2 hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The build's cgroup under the root.
pub const BUILD_CGROUP: &str = "vouch-build";

/// Errors setting up the cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Mounting cgroup2 failed.
    #[error("mounting cgroup2 on {0}")]
    Mount(PathBuf, #[source] nix::Error),
    /// Writing or reading a control file failed.
    #[error("{op} {path}")]
    File {
        /// What we tried.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn file_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::File { op, path: path.to_owned(), source }
}

/// Limits of the build's cgroup (0 = none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// `memory.max` in bytes.
    pub memory_bytes: u64,
    /// `pids.max`: processes and threads of the builder at once.
    pub max_processes: u64,
}

/// The build's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
    limits: CgroupLimits,
}

/// Parse a flat-keyed cgroup file (`key value` per line), e.g. `memory.events`.
pub fn parse_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// What the limit events say, given the contents of `memory.events` and `pids.events`.
pub fn limit_from_events(
    memory_events: &str,
    pids_events: &str,
    l: CgroupLimits,
) -> Option<LimitHit> {
    let mem = parse_keyed(memory_events);
    let kills = mem.get("oom_kill").copied().unwrap_or(0);
    let ooms = mem.get("oom").copied().unwrap_or(0);
    if kills > 0 || ooms > 0 {
        return Some(LimitHit::Memory { limit_bytes: l.memory_bytes, oom_kills: kills });
    }
    let refused = parse_keyed(pids_events).get("max").copied().unwrap_or(0);
    if refused > 0 {
        return Some(LimitHit::Processes { limit: l.max_processes, refused });
    }
    None
}

impl Cgroup {
    /// Mount cgroup2 on `root` unless it is already there, enable the memory and pids
    /// controllers for children, and create the build's cgroup with `limits`.
    pub fn create(root: &Path, limits: CgroupLimits) -> Result<Cgroup, CgroupError> {
        if !root.join("cgroup.controllers").exists() {
            let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
            mount(Some("cgroup2"), root, Some("cgroup2"), flags, None::<&str>)
                .map_err(|e| CgroupError::Mount(root.to_owned(), e))?;
        }
        let control = root.join("cgroup.subtree_control");
        fs::write(&control, "+memory +pids")
            .map_err(file_err("enabling controllers in", &control))?;
        let dir = root.join(BUILD_CGROUP);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(file_err("creating", &dir)(e)),
        }
        let cg = Cgroup { dir, limits };
        let max = |n: u64| if n == 0 { "max".to_owned() } else { n.to_string() };
        cg.write("memory.max", &max(limits.memory_bytes))?;
        cg.write("memory.oom.group", "1")?;
        // No swap in our kernel; should one ever appear, it must not soften the limit.
        if cg.dir.join("memory.swap.max").exists() {
            cg.write("memory.swap.max", "0")?;
        }
        // pids.max also counts the agent's small relay process that stays outside the
        // builder's PID namespace (see `super::sys`).
        cg.write(
            "pids.max",
            &max(limits.max_processes.saturating_add(u64::from(limits.max_processes > 0))),
        )?;
        Ok(cg)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let p = self.dir.join(file);
        fs::write(&p, value).map_err(file_err("writing", &p))
    }

    fn read(&self, file: &str) -> Result<String, CgroupError> {
        let p = self.dir.join(file);
        fs::read_to_string(&p).map_err(file_err("reading", &p))
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `cgroup.procs`, open for writing (close-on-exec): the builder's first process writes `0`
    /// into it to join.
    pub fn procs_for_joining(&self) -> Result<OwnedFd, CgroupError> {
        let p = self.dir.join("cgroup.procs");
        let f = fs::OpenOptions::new().write(true).open(&p).map_err(file_err("opening", &p))?;
        Ok(f.into())
    }

    /// The processes in the cgroup now.
    pub fn procs(&self) -> Result<Vec<u32>, CgroupError> {
        Ok(self.read("cgroup.procs")?.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// A memory or process limit that was hit, if any.
    pub fn limit_hit(&self) -> Option<LimitHit> {
        let mem = self.read("memory.events").unwrap_or_default();
        let pids = self.read("pids.events").unwrap_or_default();
        limit_from_events(&mem, &pids, self.limits)
    }

    /// SIGKILL everything in the cgroup (`cgroup.kill`) and wait until it is empty. Returns how
    /// many processes were still there. It does not give up: outputs must never be hashed while
    /// any builder process lives (a stuck VM ends at the host's watchdog instead).
    pub fn kill_and_wait(&self) -> usize {
        let before = self.procs().map(|p| p.len()).unwrap_or(0);
        let started = Instant::now();
        let mut warned = false;
        loop {
            if let Err(e) = self.write("cgroup.kill", "1") {
                crate::pid1::say(&format!("warning: {}", build_trace::error_chain(&e)));
            }
            match self.procs() {
                Ok(p) if p.is_empty() => return before,
                Ok(_) | Err(_) => {}
            }
            if !warned && started.elapsed() > Duration::from_secs(5) {
                crate::pid1::say("builder processes survive cgroup.kill after 5 s; still waiting");
                warned = true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_parse() {
        let m = parse_keyed("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n");
        assert_eq!(m["max"], 12);
        assert_eq!(m["oom_kill"], 1);
        assert_eq!(parse_keyed("garbage\n\nmax x\n").len(), 0);
    }

    #[test]
    fn events_name_the_limit() {
        let l = CgroupLimits { memory_bytes: 64 << 20, max_processes: 32 };
        let quiet_mem = "low 0\nhigh 0\nmax 3\noom 0\noom_kill 0\n";
        // `max` in memory.events only means reclaim ran at the limit: not a failure.
        assert_eq!(limit_from_events(quiet_mem, "max 0\n", l), None);
        assert_eq!(
            limit_from_events("max 9\noom 1\noom_kill 2\n", "max 0\n", l),
            Some(LimitHit::Memory { limit_bytes: 64 << 20, oom_kills: 2 })
        );
        assert_eq!(
            limit_from_events(quiet_mem, "max 7\n", l),
            Some(LimitHit::Processes { limit: 32, refused: 7 })
        );
        // Memory first: an OOM kill explains the rest.
        assert!(matches!(
            limit_from_events("oom_kill 1\n", "max 1\n", l),
            Some(LimitHit::Memory { .. })
        ));
    }
}
