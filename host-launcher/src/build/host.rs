//! [`run_step`]: launch the VM, talk to the agent, hand the result to [`super::check`] — and
//! never hang doing it.
//!
//! Every wait has a deadline: the vsock daemon's socket (10 s), the agent's connection and its
//! `Hello` (the boot timeout from QEMU's start), every frame after that (the stall window; the
//! guest heartbeats every 2 s, see [`super::watch`]), every write to the guest (the same window),
//! the whole step when it has a builder timeout (builder timeout + allowance), QEMU's power-off
//! after `Bye` (30 s, then SIGKILL) and QEMU's exit after SIGKILL (10 s). Whatever ends an
//! attempt, QEMU and the vsock daemon are killed and the staging directory is removed.
//!
//! **One automatic retry, for infrastructure failures only** ([`retryable`]): a stalled channel,
//! a VM that died or a channel that broke before the agent accepted the job, an agent that never
//! connected or said hello, a vsock daemon that did not start. The retry is a fresh VM with a
//! fresh job id (so a fresh HOST_DATA and statement; nothing of the failed attempt is kept or
//! returned), announced loudly ([`Progress::Retrying`] and a warning). Builder failures,
//! limits, timeouts, a VM that died after accepting the job (the builder may have caused it)
//! and rejected results are never retried.
//!
//! Threads of an attempt: the conversation ([`super::conversation`]), QEMU's exit watcher (it
//! shuts the channel down when QEMU ends), and the watchdog, which kills QEMU past the
//! wall-clock limit or as soon as the launcher is cancelled ([`super::Cancel`]: a server
//! shutting down); a cancelled step is never retried and fails with
//! [`StepError::Cancelled`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use build_trace::evidence::SimulatedRoot;
use build_trace::job::{Job, Limits, PathInfo};
use channel::messages::{Setup, SimulatedSetup};
use channel::proto::ProtoError;
use nix_formats::StorePath;
use vm_image::image::{files, Manifest};

use super::conversation::{converse, phase_key, timings, Conversation};
use super::watch::ChannelWatch;
use super::{check, staging_dir, InputSource, LauncherConfig, StepError, StepOutcome, StepRequest};
use crate::core::log::{BuildLog, Progress};
use crate::vm::egress::{self, Egress};
use crate::vm::network::NetworkGrant;
use crate::vm::runner::{describe_exit, Vm};
use crate::vm::vsock::{detect_backend, Backend, Channel, VsockError};
use crate::vm::{
    choose_mode, host_cbitpos, qemu_argv, HostCaps, Mode, QemuSpec, SnpLaunch, SNP_POLICY,
};

pub use super::conversation::ReceivedNar;

fn random_id() -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 8];
    rand_core::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn simulated_setup(root: &SimulatedRoot, manifest: &Manifest) -> Result<Setup, StepError> {
    let key = root.vcek_key_pkcs8().map_err(|e| {
        StepError::Io("simulated VCEK key".into(), std::io::Error::other(e.to_string()))
    })?;
    let p = root.platform();
    Ok(Setup {
        simulated: Some(SimulatedSetup {
            vcek_key_pkcs8: base64::engine::general_purpose::STANDARD.encode(key),
            chip_id: hex::encode(p.chip_id),
            tcb: [p.tcb.bootloader, p.tcb.tee, p.tcb.snp, p.tcb.microcode],
            measurement: manifest.simulated_measurement.clone(),
        }),
    })
}

/// What every attempt of one step shares.
struct Prepared {
    manifest: Manifest,
    mode: Mode,
    limits: Limits,
    closure: BTreeMap<StorePath, PathInfo>,
    outputs: BTreeSet<String>,
    setup: Setup,
    sim_root: Option<SimulatedRoot>,
    backend: Backend,
    /// For a networked step: the tools of its filtered namespace (`None`: unfiltered, unsafe).
    egress: Option<egress::Tools>,
}

fn prepare(
    req: &StepRequest,
    inputs: &dyn InputSource,
    cfg: &LauncherConfig,
) -> Result<Prepared, StepError> {
    let manifest =
        Manifest::load(&cfg.image_dir).map_err(|e| StepError::Image(cfg.image_dir.clone(), e))?;
    manifest
        .verify_files(&cfg.image_dir)
        .map_err(|e| StepError::Image(cfg.image_dir.clone(), e))?;
    let caps = HostCaps::probe();
    let mode = choose_mode(cfg.mode, &caps, manifest.snp.is_some())?;
    if mode == Mode::Snp {
        // Fail within a second, naming the fix, rather than after a whole build in the VM.
        let vcek =
            cfg.snp_vcek.clone().or_else(|| std::env::var_os("VOUCH_SNP_VCEK").map(Into::into));
        crate::snp::checks::preflight(&crate::snp::checks::ProbeConfig {
            qemu: &cfg.qemu,
            image_dir: &cfg.image_dir,
            state_dir: &cfg.state_dir,
            vcek: vcek.as_deref(),
            manifest: Some(&manifest),
        })?;
    }
    super::policy::check_fixed_output_request(&req.drv, cfg.allow_weak_fixed_hashes)
        .map_err(|e| StepError::Request(e.to_string()))?;
    let limits = super::policy::effective_limits(req.limits, &cfg.default_limits, cfg.memory_mib);
    let closure = inputs.closure(&req.drv.input_srcs).map_err(StepError::Inputs)?;
    let outputs = if req.outputs.is_empty() {
        req.drv.outputs.keys().cloned().collect()
    } else {
        req.outputs.clone()
    };
    let (setup, sim_root) = if mode == Mode::Snp {
        (Setup::default(), None)
    } else {
        let root = SimulatedRoot::load_or_generate(&cfg.simulated_root_dir()).map_err(|e| {
            StepError::Io(
                "simulated SNP root".into(),
                std::io::Error::other(build_trace::error_chain(&e)),
            )
        })?;
        (simulated_setup(&root, &manifest)?, Some(root))
    };
    let backend = detect_backend(caps.vhost_vsock)?;
    let egress = match (req.network, cfg.egress.unfiltered()) {
        (false, _) => None,
        (true, false) => Some(egress::check_host()?),
        (true, true) => {
            tracing::warn!(
                drv = %req.drv_path,
                "UNSAFE: --unfiltered-network: this fixed-output builder gets QEMU's user networking \
                 in the host's namespace and reaches the host's loopback and private networks"
            );
            None
        }
    };
    Ok(Prepared { manifest, mode, limits, closure, outputs, setup, sim_root, backend, egress })
}

/// The wall-clock watchdog of one attempt: a thread that SIGKILLs QEMU once `deadline` passes or
/// the launcher is cancelled, until [`Watchdog::stop`] (or drop) ends it.
struct Watchdog {
    done: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(pid: u32, deadline: Option<Instant>, cancel: super::Cancel) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let timed_out = Arc::new(AtomicBool::new(false));
        let (d, t) = (done.clone(), timed_out.clone());
        std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                let late = deadline.is_some_and(|end| Instant::now() >= end);
                if late || cancel.is_cancelled() {
                    t.store(late, Ordering::SeqCst);
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watchdog { done, timed_out }
    }

    /// The conversation is over: the VM is no longer the watchdog's to kill.
    fn stop(&self) {
        self.done.store(true, Ordering::SeqCst);
    }

    /// Whether the deadline (not a cancellation) killed the VM.
    fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A failed attempt, and whether the agent had accepted its job.
struct AttemptError {
    error: Box<StepError>,
    job_accepted: bool,
}

impl From<StepError> for AttemptError {
    fn from(error: StepError) -> Self {
        AttemptError { error: Box::new(error), job_accepted: false }
    }
}

impl From<VsockError> for AttemptError {
    fn from(e: VsockError) -> Self {
        StepError::Vsock(e).into()
    }
}

/// Whether a failed attempt is an infrastructure failure worth one retry in a fresh VM (see the
/// module docs). `job_accepted`: the agent had reported accepting the job.
pub fn retryable(e: &StepError, job_accepted: bool) -> bool {
    match e {
        StepError::Stalled { .. } | StepError::NoAgent { .. } => true,
        StepError::Vsock(v) => matches!(
            v,
            VsockError::Daemon(..)
                | VsockError::DaemonSocket(_)
                | VsockError::Timeout(_)
                | VsockError::VmGone
                | VsockError::Accept(_)
        ),
        StepError::VmDied { .. } => !job_accepted,
        StepError::Channel(ProtoError::Io(_) | ProtoError::Closed(_)) => !job_accepted,
        _ => false,
    }
}

/// Build one step in a fresh VM (see the module docs of [`super`] and of this module).
pub fn run_step(
    req: StepRequest,
    inputs: &dyn InputSource,
    sink: &mut dyn BuildLog,
    cfg: &LauncherConfig,
) -> Result<StepOutcome, StepError> {
    if cfg.cancel.is_cancelled() {
        return Err(StepError::Cancelled);
    }
    let p = prepare(&req, inputs, cfg)?;
    let mut job_id = req.job_id.clone().unwrap_or_else(random_id);
    let mut attempt = 1u32;
    loop {
        match attempt_step(&req, &p, &job_id, inputs, sink, cfg) {
            Ok(outcome) => return Ok(outcome),
            // Whatever the attempt died of, a cancelled launcher killed it (or would have).
            Err(_) if cfg.cancel.is_cancelled() => return Err(StepError::Cancelled),
            Err(f) if attempt <= cfg.infra_retries && retryable(&f.error, f.job_accepted) => {
                attempt += 1;
                let next = match &req.job_id {
                    Some(id) => format!("{id}-attempt-{attempt}"),
                    None => random_id(),
                };
                // The first line: the console tail that some errors carry is for the final error.
                let chain = build_trace::error_chain(&f.error);
                let reason =
                    chain.lines().next().unwrap_or_default().trim_end_matches("; console:");
                let reason = reason.to_owned();
                // The front-end says it loudly (`Progress::Retrying`); this is for server logs.
                tracing::info!(
                    drv = %req.drv_path, abandoned_job = %job_id, job = %next,
                    "retrying step in a fresh VM after: {reason}"
                );
                sink.progress(&Progress::Retrying {
                    reason,
                    abandoned_job: job_id,
                    job: next.clone(),
                });
                job_id = next;
            }
            Err(f) => return Err(*f.error),
        }
    }
}

/// One attempt: one job id, one VM, one channel.
fn attempt_step(
    req: &StepRequest,
    p: &Prepared,
    job_id: &str,
    inputs: &dyn InputSource,
    sink: &mut dyn BuildLog,
    cfg: &LauncherConfig,
) -> Result<StepOutcome, AttemptError> {
    let (mode, manifest) = (p.mode, &p.manifest);
    let job = Job::new(
        job_id.to_owned(),
        req.drv_path.clone(),
        req.drv.clone(),
        p.closure.clone(),
        p.limits,
        req.ca_rule,
        req.network,
        p.outputs.clone(),
    );
    job.validate().map_err(|e| StepError::Request(build_trace::error_chain(&e)))?;
    // The only way to a NIC: a grant, which only a fixed-output job gets.
    let network = NetworkGrant::for_job(&job).map_err(|e| StepError::Request(e.to_string()))?;
    let job_bytes = job.canonical_bytes().map_err(|e| StepError::Request(e.to_string()))?;
    let host_data = job.host_data().map_err(|e| StepError::Request(e.to_string()))?;

    // Unix socket paths must stay short: a private directory under $TMPDIR, named after this
    // process so that the next launcher removes it if this one is killed (`crate::recovery`).
    let run_dir = tempfile::Builder::new()
        .prefix(&crate::vm::child::run_dir_prefix())
        .tempdir()
        .map_err(|e| StepError::Io("creating the VM run directory".into(), e))?;
    let port = channel::config::parse_cmdline(&manifest.cmdline)
        .map(|c| c.port)
        .unwrap_or(channel::config::DEFAULT_PORT);
    let mut chan = Channel::prepare(&p.backend, run_dir.path(), port)?;
    let img = |f: &str| cfg.image_dir.join(f);
    let spec = QemuSpec {
        mode,
        kernel: if mode == Mode::Snp { img(files::BZIMAGE) } else { img(files::VMLINUX) },
        initrd: img(files::INITRD),
        cmdline: manifest.cmdline.clone(),
        memory_mib: super::policy::guest_memory_mib(cfg.memory_mib, &p.limits),
        vcpus: manifest
            .snp
            .as_ref()
            .filter(|_| mode == Mode::Snp)
            .map_or(cfg.vcpus, |s| s.params.vcpus),
        vsock: chan.device().clone(),
        snp: (mode == Mode::Snp).then(|| SnpLaunch {
            ovmf: img(files::OVMF),
            host_data,
            policy: SNP_POLICY,
            cbitpos: host_cbitpos(),
            reduced_phys_bits: 1,
            cpu_model: manifest
                .snp
                .as_ref()
                .map_or("EPYC-v4".into(), |s| s.params.vcpu_type.clone()),
        }),
        network,
    };
    let argv = qemu_argv(&spec).map_err(|e| StepError::Request(e.to_string()))?;
    // A networked VM's QEMU runs in its own filtered namespace, removed after QEMU is killed
    // (declared before `vm`, so dropped after it on every path).
    let egress = match (&spec.network, &p.egress) {
        (Some(_), Some(tools)) => {
            Some(Egress::create(tools, &cfg.egress).map_err(StepError::from)?)
        }
        _ => None,
    };
    let (program, argv) = match &egress {
        Some(e) => e.command(&cfg.qemu, &argv),
        None => (cfg.qemu.clone(), argv),
    };
    tracing::debug!(?program, ?argv, job = %job_id, "starting QEMU");
    let console_log = run_dir.path().join("console.log");
    let vm = Vm::spawn(&program, &argv, &console_log, cfg.echo_console)
        .map_err(|e| StepError::Qemu(cfg.qemu.display().to_string(), e))?;
    let started = vm.started();
    // From here on the VM is killed past the wall-clock limit or when the launcher is cancelled.
    let limit = (req.limits.timeout_s > 0)
        .then(|| Duration::from_secs(req.limits.timeout_s) + cfg.slack + cfg.boot_timeout);
    let watchdog = Watchdog::start(vm.pid(), limit.map(|l| started + l), cfg.cancel.clone());
    sink.progress(&Progress::Booting { mode, pid: vm.pid() });

    // Boot watchdog, part one: the connection (part two, the hello, is the channel watch's).
    let connect_within = cfg.boot_timeout.saturating_sub(started.elapsed());
    let stream = match chan.accept(connect_within, &|| vm.exited().is_none()) {
        Ok(s) => s,
        Err(e) => {
            let status = vm.exited().or_else(|| vm.kill());
            // Give the stderr reader a moment to collect QEMU's last words.
            std::thread::sleep(Duration::from_millis(50));
            return Err(match e {
                VsockError::VmGone => StepError::NoAgent {
                    status: status.as_ref().map_or("ended".into(), describe_exit),
                    qemu: vm.qemu_stderr(),
                    console: vm.console_tail(),
                },
                VsockError::Timeout(_) => StepError::Vsock(VsockError::Timeout(cfg.boot_timeout)),
                other => StepError::Vsock(other),
            }
            .into());
        }
    };
    // QEMU's exit ends the conversation at once. The agent powers off only after we closed the
    // channel (having read its `Bye`; `agent::run`'s linger), so an exit before that is a VM that
    // did not finish: frames of a guest that powered off before our reader caught up were lost
    // with QEMU (the vsock backend drops what it holds; reproduced with a delayed reader).
    if let Ok(s2) = stream.try_clone() {
        vm.on_exit(move || s2.shutdown());
    }

    let watch = ChannelWatch::new(started, cfg.boot_timeout, cfg.stall_timeout);
    let staging = staging_dir(&cfg.state_dir, job_id)?;
    let mut conv = Conversation::default();
    let result = converse(
        stream, &watch, mode, &p.setup, &job_bytes, &job, inputs, &staging, sink, &mut conv,
    );
    watchdog.stop();
    let tripped = watch.tripped();
    // Did the VM end on its own (killed, crashed)? A broken channel usually means it did: give
    // QEMU a moment to be reaped before deciding.
    let ended_by_itself = match &result {
        Err(StepError::Channel(ProtoError::Io(_) | ProtoError::Closed(_))) if tripped.is_none() => {
            vm.wait_timeout(Duration::from_secs(3))
        }
        _ => vm.exited(),
    };
    // After `Bye` the agent powers off by itself; otherwise the VM is stopped now.
    if conv.bye {
        if vm.wait_timeout(Duration::from_secs(30)).is_none() {
            vm.kill();
        }
    } else {
        vm.kill();
    }
    let exited_at = vm.exited_at().unwrap_or_else(Instant::now);
    // The vsock daemon goes with the VM.
    drop(chan);

    let job_accepted = conv.job_accepted();
    let phase = conv.last_phase.map_or("booted".into(), |p| phase_key(p).to_owned());
    let fail = |error: StepError| {
        let _ = std::fs::remove_dir_all(&staging);
        Err(AttemptError { error: Box::new(error), job_accepted })
    };
    let input_bytes = match result {
        Ok(b) => b,
        Err(e) => {
            if watchdog.timed_out() {
                return fail(StepError::Watchdog(limit.unwrap_or_default()));
            }
            if let Some(trip) = tripped {
                return fail(StepError::Stalled { trip, phase, console: vm.console_tail() });
            }
            if let Some(st) = ended_by_itself {
                return fail(StepError::VmDied {
                    status: describe_exit(&st),
                    phase,
                    console: vm.console_tail(),
                });
            }
            return fail(e);
        }
    };
    if let Some(f) = conv.failure {
        return fail(StepError::Guest { kind: f.kind, message: f.message });
    }
    let Some(outcome) = conv.outcome else {
        return fail(StepError::Channel(ProtoError::Closed("an outcome before Bye")));
    };
    let t_check = Instant::now();
    let checked = match check::check_outcome(
        &job,
        &outcome,
        &conv.nars,
        mode,
        manifest,
        p.sim_root.as_ref(),
        cfg,
    ) {
        Ok(c) => c,
        Err(e) => return fail(e.into()),
    };
    let mut timings = timings(started, &conv.marks, exited_at);
    timings.verification = t_check.elapsed();
    timings.input_bytes = input_bytes;
    timings.output_bytes = conv.output_bytes;
    timings.guest_ready_uptime = Duration::from_millis(conv.hello_uptime_ms);
    sink.progress(&Progress::Verified);
    Ok(StepOutcome {
        statement: checked.statement,
        statement_bytes: outcome.statement.into_bytes(),
        evidence: checked.evidence,
        verified: checked.verified,
        outputs: checked.outputs,
        staging: Some(staging),
        mode,
        timings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::watch::Trip;
    use channel::messages::FailureKind;

    #[test]
    fn only_infrastructure_failures_are_retried() {
        let s =
            |t| StepError::Stalled { trip: t, phase: "building".into(), console: String::new() };
        let died = || StepError::VmDied {
            status: "was killed by signal 9 (SIGKILL)".into(),
            phase: "building".into(),
            console: String::new(),
        };
        let d = Duration::from_secs(60);
        for (e, accepted, want) in [
            (s(Trip::Silent(d)), true, true),
            (s(Trip::NotReading(d)), false, true),
            (s(Trip::NoHello(d)), false, true),
            (
                StepError::NoAgent {
                    status: "ended".into(),
                    qemu: String::new(),
                    console: String::new(),
                },
                false,
                true,
            ),
            (
                StepError::Vsock(VsockError::Daemon("x".into(), std::io::Error::other("y"))),
                false,
                true,
            ),
            (StepError::Vsock(VsockError::Timeout(d)), false, true),
            (StepError::Vsock(VsockError::NoBackend), false, false),
            (died(), false, true),
            (died(), true, false),
            (StepError::Channel(ProtoError::Closed("a frame")), false, true),
            (StepError::Channel(ProtoError::Closed("a frame")), true, false),
            (StepError::Channel(ProtoError::Reserved), false, false),
            (
                StepError::Guest { kind: FailureKind::BuilderFailed, message: "x".into() },
                true,
                false,
            ),
            (StepError::Guest { kind: FailureKind::Protocol, message: "x".into() }, false, false),
            (StepError::Watchdog(d), true, false),
            (StepError::Request("bad".into()), false, false),
        ] {
            assert_eq!(retryable(&e, accepted), want, "{e:?} (accepted: {accepted})");
        }
    }
}
