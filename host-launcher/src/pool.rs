//! A warm pool of pre-booted VMs, so a step does not wait for a boot.
//!
//! ```text
//! Pool::start(&LauncherConfig, PoolConfig) -> Result<Arc<Pool>, StepError>
//! pool.take(memory_mib) -> Option<BootedVm>   // a ready VM the job fits, or None: boot one
//! pool.shutdown()                             // every pool VM killed; also on the launcher's Cancel
//! ShutdownOnDrop(pool)                         // shuts the pool down when dropped (CLI errors)
//! pool.stats() -> PoolStats;  default_size(vm_memory_mib) -> usize
//! ```
//! Algorithm. The pool keeps up to `size` VMs that are ready or booting, all of one shape (the
//! launcher's vCPUs and guest memory, no NIC). Each is booted with a launch of its own — a fresh
//! random nonce and that shape, no job (`crate::build::launch`) — up to its agent's `Ready`, at
//! low CPU priority so a refill never slows the steps that run meanwhile, then waits, silent,
//! for one job. [`Pool::take`] hands out the oldest ready VM (and the
//! manager boots a replacement); the step owns it from then on, and its agent runs that one job
//! and powers off: **no VM is ever given back or reused**. A manager thread, every
//! [`TICK`], drops ready VMs whose QEMU has ended (a crashed VM, replaced) and stops those ready
//! for longer than `idle` (recycled: replaced by a fresh boot, so no launch outlives the idle
//! timeout, nor an image or firmware update for long). `boot_parallel` booter threads, which
//! live as long as the pool, each boot one VM whenever ready + booting < `size`. A failed boot
//! is logged and retried after a backoff (1 s, doubling to 60 s); meanwhile `take` returns
//! `None` at once rather than wait, so steps boot on demand and report their own errors. A step waits in
//! `take` for a booting VM (never longer than the boot timeout) rather than boot one more.
//!
//! Stopping: [`Pool::shutdown`], or the launcher's `Cancel` (SIGINT/SIGTERM of a server),
//! kills every ready and booting pool VM (a booting one through its boot watchdog) and waits
//! for the boot threads. VMs already taken belong to their steps, which the same `Cancel` stops.
//!
//! Which jobs go to the pool is the step's decision (`crate::build::host`): non-networked jobs
//! whose guest memory fits the pool's; networked (fixed-output) jobs and larger ones boot on
//! demand, with a launch bound to their job.
//!
//! What is not here: the boot itself (`crate::build::launch`), the job (`crate::build::host`).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::build::launch::{boot, new_launch, BootContext, BootedVm, LaunchRequest};
use crate::build::{Cancel, LauncherConfig, StepError};

/// How often the manager looks at the pool.
pub const TICK: Duration = Duration::from_millis(200);
/// Default idle timeout: a ready VM older than this is replaced.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(600);
/// The most VMs [`default_size`] picks.
pub const MAX_DEFAULT_SIZE: usize = 4;
/// Longest backoff after failed boots.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The pool's bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most VMs ready or booting (0: no pool).
    pub size: usize,
    /// A ready VM idle this long is replaced by a fresh one.
    pub idle: Duration,
    /// Most boots at once.
    pub boot_parallel: usize,
}

/// The default pool size for VMs of `vm_memory_mib`: what a quarter of the host's available
/// memory holds (ready VMs plus as many running steps), at most [`MAX_DEFAULT_SIZE`].
pub fn default_size(vm_memory_mib: u32) -> usize {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    size_for(available_kib, vm_memory_mib)
}

fn size_for(available_kib: u64, vm_memory_mib: u32) -> usize {
    let per_vm = u64::from(vm_memory_mib.max(1)) * 1024;
    usize::try_from(available_kib / 4 / per_vm).unwrap_or(usize::MAX).min(MAX_DEFAULT_SIZE)
}

/// What the pool has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// VMs that became ready.
    pub booted: u64,
    /// VMs handed to steps.
    pub taken: u64,
    /// Ready VMs stopped after the idle timeout.
    pub recycled: u64,
    /// Ready VMs found dead (crashed) and replaced.
    pub crashed: u64,
    /// Boots that failed.
    pub failed: u64,
    /// Ready now.
    pub ready: usize,
    /// Booting now.
    pub booting: usize,
}

#[derive(Debug, Default)]
struct State {
    ready: VecDeque<BootedVm>,
    booting: usize,
    stopped: bool,
    failures: u32,
    retry_at: Option<Instant>,
    stats: PoolStats,
}

/// The warm pool. See the module documentation.
#[derive(Debug)]
pub struct Pool {
    ctx: BootContext,
    /// The launcher's configuration, with the pool's own `Cancel` (for its boots).
    cfg: LauncherConfig,
    /// The launcher's `Cancel` (a server stopping).
    outer: Cancel,
    vcpus: u32,
    memory_mib: u32,
    pcfg: PoolConfig,
    state: Mutex<State>,
    changed: Condvar,
    /// The manager and the booters.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// Prepare the boots (image, mode, attester setup: errors here are the launcher's, at
    /// start) and start the manager, which fills the pool in the background.
    pub fn start(cfg: &LauncherConfig, pcfg: PoolConfig) -> Result<Arc<Pool>, StepError> {
        let ctx = BootContext::prepare(cfg)?;
        let mut own = cfg.clone();
        own.pool = None;
        own.cancel = Cancel::default();
        let pool = Arc::new(Pool {
            ctx,
            outer: cfg.cancel.clone(),
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            cfg: own,
            pcfg,
            state: Mutex::default(),
            changed: Condvar::new(),
            threads: Mutex::default(),
        });
        let spawn = |name: &str, f: fn(Arc<Pool>)| {
            let p = pool.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(p))
                .map_err(|e| StepError::Io("starting the VM pool".into(), e))
        };
        let mut threads = vec![spawn("vouch-pool", Pool::manage)?];
        for _ in 0..pool.pcfg.boot_parallel.max(1) {
            threads.push(spawn("vouch-pool-boot", Pool::boot_loop)?);
        }
        *pool.threads.lock().unwrap_or_else(|e| e.into_inner()) = threads;
        tracing::info!(
            size = pool.pcfg.size,
            vcpus = pool.vcpus,
            memory_mib = pool.memory_mib,
            idle_s = pool.pcfg.idle.as_secs(),
            "warm VM pool: each VM runs one job, then powers off"
        );
        Ok(pool)
    }

    /// What its VMs were booted with (the steps check their outcomes against it).
    pub fn context(&self) -> &BootContext {
        &self.ctx
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ready VM for a job that needs `memory_mib` of guest memory, or `None` (boot one on
    /// demand): the job does not fit, the pool is stopped, or its boots are backing off after
    /// failures. Otherwise waits for the next VM to be ready, at most the boot timeout.
    pub fn take(&self, memory_mib: u32) -> Option<BootedVm> {
        if memory_mib > self.memory_mib || self.pcfg.size == 0 {
            return None;
        }
        let deadline = Instant::now() + self.cfg.boot_timeout;
        let mut s = self.lock();
        loop {
            while let Some(vm) = s.ready.pop_front() {
                if vm.alive() {
                    s.stats.taken += 1;
                    drop(s);
                    self.changed.notify_all();
                    return Some(vm);
                }
                s.stats.crashed += 1;
                tracing::warn!(pid = vm.vm.pid(), "a pool VM had ended while ready; replacing it");
            }
            let now = Instant::now();
            // A VM is on its way unless boots are backing off after failures.
            let coming = s.booting > 0 || s.retry_at.is_none_or(|t| now >= t);
            if s.stopped || !coming || now >= deadline {
                return None;
            }
            s = self.changed.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Counters and the current fill.
    pub fn stats(&self) -> PoolStats {
        let s = self.lock();
        PoolStats { ready: s.ready.len(), booting: s.booting, ..s.stats }
    }

    /// The QEMU pids of the ready VMs (tests, `vouch` status output).
    pub fn ready_pids(&self) -> Vec<u32> {
        self.lock().ready.iter().map(|v| v.vm.pid()).collect()
    }

    /// Stop: kill every ready and booting pool VM, wait for the booters and the manager.
    pub fn shutdown(&self) {
        self.cfg.cancel.cancel();
        self.lock().stopped = true;
        self.changed.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    /// The manager thread: stops the pool on a cancel, drops crashed and idle ready VMs.
    fn manage(self: Arc<Self>) {
        loop {
            let mut s = self.lock();
            if s.stopped || self.outer.is_cancelled() {
                s.stopped = true;
                // Boots under way are killed by their watchdogs; the booters then end.
                self.cfg.cancel.cancel();
                let ready: Vec<BootedVm> = s.ready.drain(..).collect();
                drop(s);
                self.changed.notify_all();
                drop(ready); // each killed, its daemon and directory removed
                tracing::info!(stats = ?self.stats(), "warm VM pool stopped");
                return;
            }
            let mut gone = Vec::new();
            let idle = self.pcfg.idle;
            let mut i = 0;
            while i < s.ready.len() {
                let (alive, old) = (s.ready[i].alive(), s.ready[i].ready_at().elapsed() > idle);
                if alive && !old {
                    i += 1;
                    continue;
                }
                if alive {
                    s.stats.recycled += 1;
                } else {
                    s.stats.crashed += 1;
                    tracing::warn!("a pool VM ended while ready; replacing it");
                }
                gone.extend(s.ready.remove(i));
            }
            if !gone.is_empty() {
                self.changed.notify_all();
            }
            let s = self.changed.wait_timeout(s, TICK).unwrap_or_else(|e| e.into_inner()).0;
            drop(s);
            drop(gone);
        }
    }

    /// A booter thread: boots one VM whenever the pool has room, until the pool stops. The
    /// booters live as long as the pool, so the VMs they start never outlive the thread that
    /// started them while the pool runs (a parent-death signal would act on thread exit).
    fn boot_loop(self: Arc<Self>) {
        loop {
            let mut s = self.lock();
            loop {
                if s.stopped || self.outer.is_cancelled() {
                    return;
                }
                let due = s.retry_at.is_none_or(|t| Instant::now() >= t);
                if due && s.ready.len() + s.booting < self.pcfg.size {
                    s.booting += 1;
                    break;
                }
                s = self.changed.wait_timeout(s, TICK).unwrap_or_else(|e| e.into_inner()).0;
            }
            drop(s);
            let req = LaunchRequest {
                launch: new_launch(self.vcpus, self.memory_mib, false),
                network: None,
                egress: None,
                background: true,
            };
            let result = boot(&self.ctx, req, &self.cfg, &mut |_| {});
            let mut s = self.lock();
            s.booting -= 1;
            match result {
                Ok(vm) if !s.stopped => {
                    s.stats.booted += 1;
                    s.failures = 0;
                    s.retry_at = None;
                    s.ready.push_back(vm);
                }
                Ok(vm) => drop(vm),
                Err(e) if !s.stopped => {
                    s.stats.failed += 1;
                    s.failures += 1;
                    let backoff = Duration::from_secs(1u64 << s.failures.min(6)).min(MAX_BACKOFF);
                    s.retry_at = Some(Instant::now() + backoff);
                    tracing::warn!(
                        retry_in_s = backoff.as_secs(),
                        "a pool VM did not boot: {}",
                        build_trace::error_chain(&e)
                    );
                }
                Err(_) => {}
            }
            drop(s);
            self.changed.notify_all();
        }
    }
}

/// Shuts its pool down when dropped, so an early return cannot leave pool VMs behind.
#[derive(Debug)]
pub struct ShutdownOnDrop(pub Arc<Pool>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_size_is_what_a_quarter_of_the_memory_holds_at_most_four() {
        let gib = 1024 * 1024;
        assert_eq!(size_for(22 * gib, 2048), 2);
        assert_eq!(size_for(64 * gib, 2048), 4);
        assert_eq!(size_for(256 * gib, 2048), MAX_DEFAULT_SIZE);
        assert_eq!(size_for(4 * gib, 2048), 0, "a small host keeps no pool");
        assert_eq!(size_for(0, 2048), 0);
    }
}
