//! `vouch bench vm`: where the time of one build step goes, against baselines run in the same
//! command (results go to `docs/benchmarks.md`).
//!
//! Measured, each as the median of `runs`:
//! 1. **bare VM**: the same image and QEMU argv, with `vouch.bench=poweroff` appended to the
//!    command line: the agent powers off right after mounting. Boot-to-init = the guest's uptime
//!    then (compared with the guest's uptime at the agent's hello in a real step, so the serial
//!    console's latency does not count); also QEMU start → first console line and → exit.
//! 2. **step**: `run_step` on a trivial floating-CA derivation (new nonce each run), split into
//!    boot (→ agent hello), job setup (→ job accepted), input transfer (→ inputs unpacked and
//!    checked), build, hashing, attestation, output transfer, host checks, total.
//! 3. **nix-build** of an equivalent derivation with `--option sandbox true` (falls back to
//!    `sandbox = false`, and says so, where the Debian Nix sandbox cannot run).
//! 4. **raw channel**: a VM with `vouch.bench=sink` receives `mib` MiB through the same vsock
//!    backend and discards them (raw throughput), then the same bytes again hashed with the
//!    agent's SHA-256 code (in-guest hashing rate).
//! 5. **host hashing**: the same SHA-256 code over the same bytes on the host.
//! 6. **warm step** and **batch** ([`pool`]): a step given to a pre-booted pool VM, and
//!    `batch_steps` independent steps at `jobs` at once against `nix-build --max-jobs jobs`.
//!
//! The modes of `vouch.bench=` exist only in the bench image's agent (built with its `bench`
//! feature, `scripts/build-image.sh --bench`); [`run`] refuses any other image.
//!
//! What is not here: pass/fail thresholds (benchmarks are not tests).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use channel::messages::NarBegin;
use channel::proto::{FrameReader, FrameWriter, Kind};
use vm_image::image::{files, Manifest};

mod pool;

use crate::build::nix_store::{load_basic_derivation, LocalNixStore};
use crate::build::{run_step, LauncherConfig, StepRequest, Timings};
use crate::core::log::NullLog;
use crate::vm::runner::Vm;
use crate::vm::vsock::{detect_backend, Channel};
use crate::vm::{choose_mode, qemu_argv, HostCaps, Mode, QemuSpec};

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
#[error("benchmark: {0}")]
pub struct BenchError(pub String);

fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> BenchError + '_ {
    move |err| BenchError(format!("{what}: {err}"))
}

/// Results (seconds unless named otherwise).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BenchReport {
    /// The mode the VMs ran in.
    pub mode: String,
    /// Runs per measurement.
    pub runs: usize,
    /// Bare VM: guest uptime when /init runs (right after mounting /proc).
    pub bare_init_uptime_s: f64,
    /// Bare VM: QEMU start → first agent console line (host clock; serial console latency
    /// included).
    pub bare_boot_to_init_s: f64,
    /// Bare VM: QEMU start → QEMU exit.
    pub bare_total_s: f64,
    /// Step: guest uptime at the agent's hello (boot to ready, the guest's clock).
    pub step_ready_uptime_s: f64,
    /// Step: QEMU start → agent hello (host clock).
    pub step_boot_s: f64,
    /// Step phases: hello → job accepted.
    pub step_job_setup_s: f64,
    /// Job accepted → inputs unpacked and checked.
    pub step_input_transfer_s: f64,
    /// Builder run.
    pub step_build_s: f64,
    /// Output hashing in the guest.
    pub step_hashing_s: f64,
    /// Attestation.
    pub step_attestation_s: f64,
    /// Output transfer.
    pub step_output_transfer_s: f64,
    /// Host checks.
    pub step_verification_s: f64,
    /// Whole step (QEMU start → exit).
    pub step_total_s: f64,
    /// `vouch build`-equivalent wall time including input closure query and publish.
    pub step_input_bytes: u64,
    /// nix-build wall time.
    pub nix_build_s: f64,
    /// Which sandbox setting nix-build ran with.
    pub nix_sandbox: String,
    /// Raw channel throughput, MiB/s.
    pub raw_channel_mib_s: f64,
    /// In-guest SHA-256 over the channel, MiB/s.
    pub guest_hash_mib_s: f64,
    /// Host SHA-256 over the same bytes, MiB/s.
    pub host_hash_mib_s: f64,
    /// Bytes used for the channel and hashing measurements, MiB.
    pub mib: u64,
    /// Cold step: `run_step` called → outcome checked (boot included).
    pub step_latency_s: f64,
    /// Warm step: `run_step` called → outcome checked, the VM taken from a full pool.
    pub warm_latency_s: f64,
    /// Warm step: the launch check (hello → ready), done before the job existed.
    pub warm_launch_s: f64,
    /// Warm step: `run_step` called → job sent (the input closure queried, the VM taken).
    pub warm_prepare_s: f64,
    /// Warm step: job sent → job accepted.
    pub warm_job_setup_s: f64,
    /// Warm step: job accepted → inputs unpacked and checked.
    pub warm_input_transfer_s: f64,
    /// Warm step: builder run.
    pub warm_build_s: f64,
    /// Warm step: output hashing, attestation and output transfer.
    pub warm_outputs_s: f64,
    /// Warm step: host checks.
    pub warm_verification_s: f64,
    /// Warm step: host checks done → QEMU exited.
    pub warm_power_off_s: f64,
    /// Batch: steps, and how many at once.
    pub batch_steps: usize,
    /// Batch: steps at once (vouch's pool size and threads; Nix's `--max-jobs`).
    pub batch_jobs: usize,
    /// Batch: vouch's wall time (warm pool).
    pub batch_vouch_s: f64,
    /// Batch: `nix-build --max-jobs` wall time.
    pub batch_nix_s: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// A VM of the image with `extra` appended to its command line (benchmarks only).
fn launch(
    cfg: &LauncherConfig,
    mode: Mode,
    extra: &str,
    run_dir: &Path,
) -> Result<(Vm, Channel), BenchError> {
    let manifest = Manifest::load(&cfg.image_dir).map_err(e("image"))?;
    let caps = HostCaps::probe();
    let backend = detect_backend(caps.vhost_vsock).map_err(e("vsock"))?;
    let chan =
        Channel::prepare(&backend, run_dir, channel::config::DEFAULT_PORT).map_err(e("vsock"))?;
    let spec = QemuSpec {
        mode,
        kernel: cfg.image_dir.join(files::VMLINUX),
        initrd: cfg.image_dir.join(files::INITRD),
        cmdline: format!("{} {extra}", manifest.cmdline),
        memory_mib: cfg.memory_mib,
        vcpus: cfg.vcpus,
        vsock: chan.device().clone(),
        snp: None,
        network: None,
    };
    let argv = qemu_argv(&spec).map_err(e("argv"))?;
    let vm = Vm::spawn(&cfg.qemu, &argv, &run_dir.join("console.log"), false).map_err(e("qemu"))?;
    Ok((vm, chan))
}

/// Guest uptime printed in an agent console line (`[   1.234] vouch-agent: …`).
fn line_uptime(line: &str) -> Option<f64> {
    line.trim_start().strip_prefix('[')?.split(']').next()?.trim().parse().ok()
}

/// (guest uptime at /init after mounting /proc, QEMU start → first agent line, start → exit).
fn bare(cfg: &LauncherConfig, mode: Mode) -> Result<(f64, f64, f64), BenchError> {
    let dir = tempfile::Builder::new().prefix("vouch-bench-").tempdir().map_err(e("tempdir"))?;
    let (vm, _chan) = launch(cfg, mode, "vouch.bench=poweroff", dir.path())?;
    vm.wait_timeout(Duration::from_secs(120))
        .ok_or_else(|| BenchError("bare VM did not power off".into()))?;
    let start = vm.started();
    let no_line = || BenchError(format!("no agent line; console:\n{}", vm.console_tail()));
    let (_, first) = vm.agent_line("starting").ok_or_else(no_line)?;
    let (line, _) = vm.agent_line("bare boot").ok_or_else(no_line)?;
    let uptime = line_uptime(&line).ok_or_else(no_line)?;
    let exit = vm.exited_at().unwrap_or_else(Instant::now);
    Ok((uptime, (first - start).as_secs_f64(), (exit - start).as_secs_f64()))
}

fn sink(cfg: &LauncherConfig, mode: Mode, bytes: &[u8]) -> Result<(f64, f64), BenchError> {
    let dir = tempfile::Builder::new().prefix("vouch-bench-").tempdir().map_err(e("tempdir"))?;
    let (vm, mut chan) = launch(cfg, mode, "vouch.bench=sink", dir.path())?;
    let stream =
        chan.accept(Duration::from_secs(120), &|| vm.exited().is_none()).map_err(e("accept"))?;
    // No wait without a deadline here either (the sink agent reports each stream in seconds).
    let watch = crate::build::watch::ChannelWatch::new(
        vm.started(),
        Duration::from_secs(120),
        crate::build::watch::DEFAULT_STALL_TIMEOUT,
    );
    let (rd, wr) = watch
        .guard(stream.try_clone().map_err(e("clone"))?, stream.try_clone().map_err(e("clone"))?)
        .map_err(e("timeouts"))?;
    let mut w = FrameWriter::new(wr);
    let mut r = FrameReader::with_liveness(rd, watch.liveness());
    r.expect(Kind::Hello, "hello").map_err(e("hello"))?;
    let mut rates = Vec::new();
    for i in 0..2 {
        let t = Instant::now();
        let begin = NarBegin {
            path: nix_formats::StorePath::from_parts([0; 20], &format!("bench{i}"))
                .expect("a valid name"),
            nar_size: bytes.len() as u64,
        };
        w.send_nar(&begin, &mut &bytes[..]).map_err(e("send"))?;
        r.expect(Kind::Phase, "the guest's receipt").map_err(e("receipt"))?;
        rates.push(bytes.len() as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64());
    }
    w.send(Kind::InputsDone, &[]).map_err(e("send"))?;
    let _ = r.expect(Kind::Bye, "bye");
    // The agent powers off once the host closes the channel (it waits for that).
    stream.shutdown();
    let _ = vm.wait_timeout(Duration::from_secs(30));
    Ok((rates[0], rates[1]))
}

fn nix_env() -> Vec<(&'static str, String)> {
    // Root without Debian's nixbld group: no build users (the sandbox uses a user namespace).
    vec![("NIX_CONFIG", format!("{}build-users-group =\n", crate::build::nix_store::NIX_CONFIG))]
}

/// A Nix file with one trivial floating-CA derivation per nonce (attributes `s0`, `s1`, …),
/// each writing its nonce: the busybox source path is the only input.
fn write_bench_nix(dir: &Path, nonces: &[String]) -> Result<PathBuf, BenchError> {
    let bb = dir.join("bb");
    if !bb.exists() {
        std::fs::create_dir(&bb).map_err(e("mkdir"))?;
        std::fs::copy("/bin/busybox", bb.join("busybox"))
            .map_err(e("busybox-static is required (/bin/busybox)"))?;
        std::os::unix::fs::symlink("busybox", bb.join("sh")).map_err(e("symlink"))?;
    }
    let attrs: String = nonces
        .iter()
        .enumerate()
        .map(|(i, nonce)| {
            format!(
                r#"  s{i} = derivation {{ name = "bench-trivial"; system = builtins.currentSystem; builder = "${{bb}}/sh";
    args = [ "-c" "mkdir $out; echo {nonce} > $out/x" ];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256"; }};
"#
            )
        })
        .collect();
    let file = dir.join(format!("bench-{}.nix", nonces.first().map_or("none", String::as_str)));
    let text = format!(
        "let bb = builtins.path {{ path = ./bb; name = \"busybox\"; }}; in {{\n{attrs}}}\n"
    );
    std::fs::write(&file, text).map_err(e("write"))?;
    Ok(file)
}

/// `nix-instantiate file`: the drv path of every attribute.
fn instantiate_all(file: &Path) -> Result<Vec<String>, BenchError> {
    let out = Command::new("nix-instantiate")
        .envs(nix_env())
        .arg(file)
        .output()
        .map_err(e("nix-instantiate"))?;
    if !out.status.success() {
        return Err(BenchError(format!(
            "nix-instantiate: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_owned()).collect())
}

/// The step request of a bench derivation.
fn request(drv_path: &str) -> Result<StepRequest, BenchError> {
    let (drv_sp, drv) = load_basic_derivation(drv_path).map_err(e("drv"))?;
    Ok(StepRequest {
        drv_path: drv_sp,
        drv,
        outputs: BTreeSet::new(),
        limits: Default::default(),
        ca_rule: build_trace::job::CaRule::SelfRefPositions,
        network: false,
        job_id: None,
    })
}

fn nix_build(drv: &str, sandbox: bool) -> Option<f64> {
    let t = Instant::now();
    let out = Command::new("nix-build")
        .envs(nix_env())
        .args(["--no-out-link", drv, "--option", "sandbox", if sandbox { "true" } else { "false" }])
        .output()
        .ok()?;
    out.status.success().then(|| t.elapsed().as_secs_f64())
}

/// What `vouch bench vm` runs: `runs` per measurement, `mib` through the channel, a batch of
/// `batch_steps` steps at `jobs` at once.
#[derive(Debug, Clone, Copy)]
pub struct BenchParams {
    /// Runs per measurement (medians).
    pub runs: usize,
    /// MiB for the channel and hashing measurements.
    pub mib: u64,
    /// Steps in the batch (0: no batch).
    pub batch_steps: usize,
    /// Steps at once in the batch.
    pub jobs: usize,
}

/// Run the whole benchmark.
pub fn run(
    cfg: &LauncherConfig,
    params: BenchParams,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport, BenchError> {
    let BenchParams { runs, mib, batch_steps, jobs } = params;
    let manifest = Manifest::load(&cfg.image_dir).map_err(e("image"))?;
    if !manifest.agent_version.ends_with(channel::config::BENCH_VERSION_SUFFIX) {
        return Err(BenchError(format!(
            "{} is not a bench image: its agent ({}) has no benchmark modes; build one with \
             scripts/build-image.sh --bench and pass --image",
            cfg.image_dir.display(),
            manifest.agent_version
        )));
    }
    let mode = vm_mode(cfg, &manifest)?;
    let mut rep = BenchReport { mode: mode.to_string(), runs, mib, ..BenchReport::default() };

    progress("bare VM boots");
    bare_boots(cfg, mode, runs, &mut rep)?;

    progress("build steps (cold: a VM booted for each)");
    let work = tempfile::tempdir().map_err(e("tempdir"))?;
    let mut step_cfg = cfg.clone();
    step_cfg.mode = Some(mode);
    step_cfg.pool = None;
    cold_steps(&step_cfg, runs, work.path(), &mut rep)?;

    progress("build steps (warm: a pre-booted pool VM for each)");
    warm_steps(&step_cfg, runs, work.path(), &mut rep)?;

    if batch_steps > 0 {
        progress(&format!(
            "{batch_steps} independent steps, {jobs} at once: vouch, then nix-build"
        ));
        let sandboxed = rep.nix_sandbox == "true";
        let (v, n) = pool::batch(&step_cfg, batch_steps, jobs.max(1), sandboxed, work.path())?;
        (rep.batch_steps, rep.batch_jobs, rep.batch_vouch_s, rep.batch_nix_s) =
            (batch_steps, jobs.max(1), v, n);
    }

    progress("raw channel and hashing");
    channel_and_hashing(cfg, mode, runs, mib, &mut rep)?;
    Ok(rep)
}

/// The mode the bench's VMs run in: the launcher's choice, with KVM where that is SNP.
fn vm_mode(cfg: &LauncherConfig, manifest: &Manifest) -> Result<Mode, BenchError> {
    let mode =
        choose_mode(cfg.mode, &HostCaps::probe(), manifest.snp.is_some()).map_err(e("mode"))?;
    Ok(if mode == Mode::Snp { Mode::Kvm } else { mode })
}

/// `runs` bare boots: the medians of init's uptime, boot to init, and the total.
fn bare_boots(
    cfg: &LauncherConfig,
    mode: Mode,
    runs: usize,
    rep: &mut BenchReport,
) -> Result<(), BenchError> {
    let mut b_up = Vec::new();
    let mut b_init = Vec::new();
    let mut b_total = Vec::new();
    for _ in 0..runs {
        let (u, i, t) = bare(cfg, mode)?;
        b_up.push(u);
        b_init.push(i);
        b_total.push(t);
    }
    rep.bare_init_uptime_s = median(b_up);
    rep.bare_boot_to_init_s = median(b_init);
    rep.bare_total_s = median(b_total);
    Ok(())
}

/// `runs` steps, a VM booted for each, and Nix's own build of each (sandboxed where the host
/// allows): the medians of each phase.
fn cold_steps(
    step_cfg: &LauncherConfig,
    runs: usize,
    work: &Path,
    rep: &mut BenchReport,
) -> Result<(), BenchError> {
    let mut steps: Vec<Timings> = Vec::new();
    let mut nix_times = Vec::new();
    let mut sandbox = "true".to_owned();
    for i in 0..runs {
        let nonce = format!("{}-{i}-{:?}", std::process::id(), Instant::now());
        let drv_path = instantiate_all(&write_bench_nix(work, &[nonce])?)?.remove(0);
        let outcome = run_step(request(&drv_path)?, &LocalNixStore, &mut NullLog, step_cfg)
            .map_err(|err| BenchError(build_trace::error_chain(&err)))?;
        steps.push(outcome.timings.clone());
        // Nix's own build of the same derivation (it is not built yet in the local store).
        let t = match nix_build(&drv_path, sandbox == "true") {
            Some(t) => Some(t),
            None if sandbox == "true" => {
                sandbox = "false (the sandboxed nix-build failed on this host)".into();
                nix_build(&drv_path, false)
            }
            None => None,
        };
        if let Some(t) = t {
            nix_times.push(t);
        }
    }
    let pick =
        |f: fn(&Timings) -> Duration| median(steps.iter().map(|t| f(t).as_secs_f64()).collect());
    rep.step_boot_s = pick(|t| t.boot);
    rep.step_ready_uptime_s = pick(|t| t.guest_ready_uptime);
    rep.step_job_setup_s = pick(|t| t.launch + t.job_setup);
    rep.step_input_transfer_s = pick(|t| t.input_transfer);
    rep.step_build_s = pick(|t| t.build);
    rep.step_hashing_s = pick(|t| t.hashing);
    rep.step_attestation_s = pick(|t| t.attestation);
    rep.step_output_transfer_s = pick(|t| t.output_transfer);
    rep.step_verification_s = pick(|t| t.verification);
    rep.step_total_s = pick(|t| t.total);
    rep.step_latency_s = pick(|t| t.latency);
    rep.step_input_bytes = steps.first().map_or(0, |t| t.input_bytes);
    rep.nix_build_s = median(nix_times);
    rep.nix_sandbox = sandbox;
    Ok(())
}

/// `runs` steps, each on a pre-booted pool VM: the medians of each phase.
fn warm_steps(
    step_cfg: &LauncherConfig,
    runs: usize,
    work: &Path,
    rep: &mut BenchReport,
) -> Result<(), BenchError> {
    let warm = pool::warm_steps(step_cfg, runs, work)?;
    let pick =
        |f: fn(&Timings) -> Duration| median(warm.iter().map(|t| f(t).as_secs_f64()).collect());
    rep.warm_latency_s = pick(|t| t.latency);
    rep.warm_launch_s = pick(|t| t.launch);
    rep.warm_prepare_s = pick(|t| t.vm_wait);
    rep.warm_job_setup_s = pick(|t| t.job_setup);
    rep.warm_input_transfer_s = pick(|t| t.input_transfer);
    rep.warm_build_s = pick(|t| t.build);
    rep.warm_outputs_s = pick(|t| t.hashing + t.attestation + t.output_transfer);
    rep.warm_verification_s = pick(|t| t.verification);
    rep.warm_power_off_s = pick(|t| t.power_off);
    Ok(())
}

/// `mib` MiB through the raw channel into the guest, which hashes them, and the same hashing
/// on the host, `runs` times each: the medians in MiB/s.
fn channel_and_hashing(
    cfg: &LauncherConfig,
    mode: Mode,
    runs: usize,
    mib: u64,
    rep: &mut BenchReport,
) -> Result<(), BenchError> {
    let bytes: Vec<u8> = (0..(mib << 20)).map(|i| ((i * 2654435761u64) >> 13) as u8).collect();
    let mut raw = Vec::new();
    let mut guest = Vec::new();
    for _ in 0..runs {
        let (r, g) = sink(cfg, mode, &bytes)?;
        raw.push(r);
        guest.push(g);
    }
    rep.raw_channel_mib_s = median(raw);
    rep.guest_hash_mib_s = median(guest);
    let mut host = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let mut h = nix_formats::nar::NarHasher::new();
        for c in bytes.chunks(256 << 10) {
            h.update(c);
        }
        let _ = h.finish();
        host.push(mib as f64 / t.elapsed().as_secs_f64());
    }
    rep.host_hash_mib_s = median(host);
    Ok(())
}

/// What [`boot`] saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootReport {
    /// How QEMU ended.
    pub status: String,
    /// Whether it ended by itself (false: killed at the timeout).
    pub ended_by_itself: bool,
    /// QEMU start → exit, seconds.
    pub seconds: f64,
    /// The last console lines.
    pub console: String,
}

/// Boot the image with `append` added to its command line (e.g. `vouch.bench=panic`) and
/// report how the VM ended; it is killed after `timeout`. For tests of the agent's PID 1
/// behaviour and for boot measurements; never used by a build.
pub fn boot(
    cfg: &LauncherConfig,
    append: &str,
    timeout: Duration,
) -> Result<BootReport, BenchError> {
    let manifest = Manifest::load(&cfg.image_dir).map_err(e("image"))?;
    let mode = vm_mode(cfg, &manifest)?;
    let dir = tempfile::Builder::new().prefix("vouch-bench-").tempdir().map_err(e("tempdir"))?;
    let (vm, _chan) = launch(cfg, mode, append, dir.path())?;
    let ended = vm.wait_timeout(timeout);
    let status = ended.or_else(|| vm.kill());
    // Let the console reader catch up with the last lines.
    std::thread::sleep(Duration::from_millis(50));
    let seconds = (vm.exited_at().unwrap_or_else(Instant::now) - vm.started()).as_secs_f64();
    Ok(BootReport {
        status: status.as_ref().map_or("ended".into(), crate::vm::runner::describe_exit),
        ended_by_itself: ended.is_some(),
        seconds,
        console: vm.console_tail(),
    })
}
