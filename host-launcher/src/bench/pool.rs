//! `vouch bench vm`, warm-pool part: the latency of a step given to a pre-booted VM, and the
//! wall time of a batch of independent steps at `jobs` at once against Nix's sandbox building
//! the same number of equivalent derivations with `--max-jobs jobs`.
//!
//! - **warm step**: a pool of one VM (`crate::pool`); before each run the pool is full and the
//!   machine has had a moment to settle, so the step's latency (`run_step` called → outcome
//!   checked) has no boot in it. Its phases are the guest's, as for the cold step.
//! - **batch**: `steps` derivations instantiated first (as Nix does before it builds), then
//!   `jobs` threads take them one by one through `run_step` with a pool of `jobs` VMs that is
//!   full at the start (a server that has been up); against `nix-build --max-jobs jobs` of
//!   `steps` other fresh derivations of the same shape (also instantiated first).
//!
//! What is not here: the cold step, the bare VM and channel baselines (the parent module).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{e, instantiate_all, nix_env, request, write_bench_nix, BenchError};
use crate::build::nix_store::LocalNixStore;
use crate::build::{run_step, LauncherConfig, Timings};
use crate::core::log::NullLog;
use crate::pool::{Pool, PoolConfig};

/// Start a pool of `size` and wait until it is full.
fn full_pool(cfg: &LauncherConfig, size: usize) -> Result<Arc<Pool>, BenchError> {
    let pool =
        Pool::start(cfg, PoolConfig { size, idle: Duration::from_secs(3600), boot_parallel: size })
            .map_err(|err| BenchError(build_trace::error_chain(&err)))?;
    wait_full(&pool, size)?;
    Ok(pool)
}

fn wait_full(pool: &Pool, size: usize) -> Result<(), BenchError> {
    let t = Instant::now();
    while pool.stats().ready < size {
        if t.elapsed() > Duration::from_secs(300) || pool.stats().failed > 0 {
            return Err(BenchError(format!("the pool did not fill: {:?}", pool.stats())));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `runs` steps, each given to a ready pool VM: their timings (latency included).
pub(super) fn warm_steps(
    cfg: &LauncherConfig,
    runs: usize,
    work: &Path,
) -> Result<Vec<Timings>, BenchError> {
    let pool = full_pool(cfg, 1)?;
    let mut step_cfg = cfg.clone();
    step_cfg.pool = Some(pool.clone());
    let mut out = Vec::new();
    for i in 0..runs {
        wait_full(&pool, 1)?;
        // Let the refill boot's last work (its QEMU threads) end before the step starts.
        std::thread::sleep(Duration::from_millis(500));
        let nonce = format!("warm-{}-{i}-{:?}", std::process::id(), Instant::now());
        let file = write_bench_nix(work, &[nonce])?;
        let drv = instantiate_all(&file)?.remove(0);
        let outcome = run_step(request(&drv)?, &LocalNixStore, &mut NullLog, &step_cfg)
            .map_err(|err| BenchError(build_trace::error_chain(&err)))?;
        if !outcome.timings.warm {
            return Err(BenchError("a warm-pool step booted its own VM".into()));
        }
        out.push(outcome.timings.clone());
    }
    pool.shutdown();
    Ok(out)
}

/// Wall time of `steps` independent steps at `jobs` at once, vouch (warm pool of `jobs`) and
/// Nix's sandbox (`nix-build --max-jobs jobs`), in seconds.
pub(super) fn batch(
    cfg: &LauncherConfig,
    steps: usize,
    jobs: usize,
    sandbox: bool,
    work: &Path,
) -> Result<(f64, f64), BenchError> {
    let tag = format!("{}-{:?}", std::process::id(), Instant::now());
    let names = |side: &str| (0..steps).map(|i| format!("{side}-{tag}-{i}")).collect::<Vec<_>>();
    let ours = instantiate_all(&write_bench_nix(work, &names("vouch"))?)?;
    let theirs = instantiate_all(&write_bench_nix(work, &names("nix"))?)?;

    let pool = full_pool(cfg, jobs)?;
    let mut step_cfg = cfg.clone();
    step_cfg.pool = Some(pool.clone());
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    let results: Vec<Result<(), BenchError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(drv) = ours.get(i) else { return Ok(()) };
                    run_step(request(drv)?, &LocalNixStore, &mut NullLog, &step_cfg)
                        .map_err(|err| BenchError(build_trace::error_chain(&err)))?;
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err(BenchError("panic".into()))))
            .collect()
    });
    let vouch_s = t.elapsed().as_secs_f64();
    pool.shutdown();
    results.into_iter().collect::<Result<Vec<()>, _>>()?;

    let t = Instant::now();
    let out = Command::new("nix-build")
        .envs(nix_env())
        .args(["--no-out-link", "--max-jobs", &jobs.to_string(), "--option", "sandbox"])
        .arg(if sandbox { "true" } else { "false" })
        .args(&theirs)
        .output()
        .map_err(e("nix-build"))?;
    let nix_s = t.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(BenchError(format!("nix-build: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok((vouch_s, nix_s))
}
