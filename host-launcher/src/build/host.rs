//! [`run_step`]: get a VM for the step — a warm one from the pool ([`crate::pool`]) when the
//! job fits it, else one booted for this job alone ([`super::launch`]) —, talk to the agent,
//! hand the result to [`super::check`], and never hang doing it.
//!
//! Every wait has a deadline: the boot's (see [`super::launch`]), every frame after the job is
//! sent (the stall window; the guest heartbeats every 2 s during a job, see [`super::watch`]),
//! every write to the guest (the same window), the whole job when it has a builder timeout
//! (builder timeout + allowance, from the job's dispatch), QEMU's power-off after `Bye` (30 s,
//! then SIGKILL) and QEMU's exit after SIGKILL (10 s). Whatever ends an attempt, QEMU and the
//! vsock daemon are killed and the staging directory is removed; a VM never gets a second job.
//!
//! **Which VM.** A pool VM runs non-networked jobs whose memory fits it; a networked
//! (fixed-output) job or one whose limits need a larger VM boots on demand, with a launch that
//! names the job's digest (so its HOST_DATA binds that job alone, as before warm pools).
//!
//! **One automatic retry, for infrastructure failures only** ([`retryable`]): a stalled channel,
//! a VM that died or a channel that broke before the agent accepted the job, an agent that never
//! connected or said hello, a vsock daemon that did not start. The retry is another VM (a fresh
//! launch: its own nonce, so its own HOST_DATA) with a fresh job id (so a fresh statement;
//! nothing of the failed attempt is kept or returned), announced loudly ([`Progress::Retrying`]
//! and a warning). Builder failures, limits, timeouts, a VM that died after accepting the job
//! (the builder may have caused it) and rejected results are never retried.
//!
//! Threads of an attempt: the conversation ([`super::conversation`]), QEMU's exit watcher (it
//! shuts the channel down when QEMU ends), and the watchdog, which kills QEMU past the
//! wall-clock limit or as soon as the launcher is cancelled ([`super::Cancel`]: a server
//! shutting down); a cancelled step is never retried and fails with
//! [`StepError::Cancelled`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use build_trace::job::{Job, Limits, PathInfo};
use channel::proto::ProtoError;
use nix_formats::StorePath;

use super::conversation::{converse, phase_key, timings, Conversation};
use super::launch::{boot, new_launch, BootContext, BootedVm, LaunchRequest, Watchdog};
use super::watch::{ChannelWatch, Trip};
use super::{check, staging_dir, InputSource, LauncherConfig, StepError, StepOutcome, StepRequest};
use crate::core::log::{BuildLog, Progress};
use crate::vm::egress;
use crate::vm::network::NetworkGrant;
use crate::vm::runner::{describe_exit, Vm};
use crate::vm::vsock::VsockError;

pub use super::conversation::ReceivedNar;

fn random_id() -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 8];
    rand_core::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// What every attempt of one step shares.
struct Prepared {
    ctx: BootContext,
    limits: Limits,
    closure: BTreeMap<StorePath, PathInfo>,
    outputs: BTreeSet<String>,
    /// For a networked step: the tools of its filtered namespace (`None`: unfiltered, unsafe).
    egress: Option<egress::Tools>,
}

fn prepare(
    req: &StepRequest,
    inputs: &dyn InputSource,
    cfg: &LauncherConfig,
) -> Result<Prepared, StepError> {
    // The pool's context when there is a pool (its VMs were booted with it), else a fresh one.
    let ctx = match &cfg.pool {
        Some(pool) => pool.context().clone(),
        None => BootContext::prepare(cfg)?,
    };
    super::policy::check_fixed_output_request(&req.drv, cfg.allow_weak_fixed_hashes)
        .map_err(|e| StepError::Request(e.to_string()))?;
    let limits = super::policy::effective_limits(req.limits, &cfg.default_limits, cfg.memory_mib);
    let closure = inputs.closure(&req.drv.input_srcs).map_err(StepError::Inputs)?;
    let outputs = if req.outputs.is_empty() {
        req.drv.outputs.keys().cloned().collect()
    } else {
        req.outputs.clone()
    };
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
    Ok(Prepared { ctx, limits, closure, outputs, egress })
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

/// Build one step in a VM of its own (see the module docs of [`super`] and of this module).
pub fn run_step(
    req: StepRequest,
    inputs: &dyn InputSource,
    sink: &mut dyn BuildLog,
    cfg: &LauncherConfig,
) -> Result<StepOutcome, StepError> {
    if cfg.cancel.is_cancelled() {
        return Err(StepError::Cancelled);
    }
    let called = Instant::now();
    // One of the launcher's slots before anything else (inputs staged, a VM booted or taken).
    let _slot = match &cfg.slots {
        Some(slots) => Some(
            slots
                .acquire(&cfg.cancel, |n| {
                    sink.progress(&Progress::Note(format!(
                        "waiting for a VM slot: all {n} of this host's slots (--jobs) are busy"
                    )))
                })
                .map_err(|_| StepError::Cancelled)?,
        ),
        None => None,
    };
    let p = prepare(&req, inputs, cfg)?;
    let mut job_id = req.job_id.clone().unwrap_or_else(random_id);
    let mut attempt = 1u32;
    loop {
        match attempt_step(&req, &p, &job_id, inputs, sink, cfg, called) {
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

/// The VM for `job`: a warm pool VM it fits, else one booted for it alone.
fn vm_for(
    job: &Job,
    p: &Prepared,
    sink: &mut dyn BuildLog,
    cfg: &LauncherConfig,
) -> Result<BootedVm, StepError> {
    let network = NetworkGrant::for_job(job).map_err(|e| StepError::Request(e.to_string()))?;
    let memory_mib = super::policy::guest_memory_mib(cfg.memory_mib, &p.limits);
    if let (Some(pool), None) = (&cfg.pool, &network) {
        if let Some(vm) = pool.take(memory_mib) {
            sink.progress(&Progress::WarmVm {
                mode: vm.mode,
                pid: vm.vm.pid(),
                ready_for: vm.ready_at().elapsed(),
            });
            return Ok(vm);
        }
    }
    let launch = new_launch(cfg.vcpus, memory_mib, network.is_some())
        .for_job(job)
        .map_err(|e| StepError::Request(e.to_string()))?;
    let req = LaunchRequest { launch, network, egress: p.egress.clone(), background: false };
    let mode = p.ctx.mode;
    boot(&p.ctx, req, cfg, &mut |pid| sink.progress(&Progress::Booting { mode, pid }))
}

/// One attempt: one job id, one VM, one channel.
fn attempt_step(
    req: &StepRequest,
    p: &Prepared,
    job_id: &str,
    inputs: &dyn InputSource,
    sink: &mut dyn BuildLog,
    cfg: &LauncherConfig,
    called: Instant,
) -> Result<StepOutcome, AttemptError> {
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
    let job_bytes = job.canonical_bytes().map_err(|e| StepError::Request(e.to_string()))?;
    let booted = vm_for(&job, p, sink, cfg)?;
    sink.progress(&Progress::AgentReady { attester: booted.attester() });
    run_job(booted, &job, &job_bytes, p, inputs, sink, cfg, called)
}

/// Give `booted` its one job and check what comes back; the VM is gone when this returns.
#[allow(clippy::too_many_arguments)]
fn run_job(
    booted: BootedVm,
    job: &Job,
    job_bytes: &[u8],
    p: &Prepared,
    inputs: &dyn InputSource,
    sink: &mut dyn BuildLog,
    cfg: &LauncherConfig,
    called: Instant,
) -> Result<StepOutcome, AttemptError> {
    let dispatched = Instant::now();
    let vm = &booted.vm;
    // From here on the VM is killed past the wall-clock limit or when the launcher is cancelled.
    let limit =
        (job.limits.timeout_s > 0).then(|| Duration::from_secs(job.limits.timeout_s) + cfg.slack);
    let watchdog = Watchdog::start(vm.pid(), limit.map(|l| dispatched + l), cfg.cancel.clone());
    let watch = ChannelWatch::for_job(cfg.stall_timeout);
    let staging = staging_dir(&cfg.state_dir, &job.job_id)?;
    let mut conv = Conversation::default();
    conv.marks.insert("hello", booted.greeting.hello_at);
    conv.marks.insert("ready", booted.greeting.ready_at);
    let stream =
        booted.stream.try_clone().map_err(|e| StepError::Io("cloning the channel".into(), e))?;
    let result = converse(stream, &watch, job_bytes, job, inputs, &staging, sink, &mut conv);
    watchdog.stop();
    let tripped = watch.tripped();
    let job_accepted = conv.job_accepted();
    let phase = conv.last_phase.map_or("ready".into(), |p| phase_key(p).to_owned());
    let fail = |error: StepError| {
        let _ = std::fs::remove_dir_all(&staging);
        Err(AttemptError { error: Box::new(error), job_accepted })
    };
    let input_bytes = match result {
        Ok(b) if conv.bye => b,
        other => return fail(unfinished(vm, other, tripped, &watchdog, limit, phase)),
    };
    // After `Bye` nothing the guest does matters any more (nothing after it is read, and the
    // VM never gets another job): the host ends QEMU instead of waiting for the guest kernel's
    // power-off (tens of milliseconds under TCG), and returns once QEMU has exited (no VM
    // outlives its step). The agent would power off by itself once the channel closes.
    let finish = |vm: &crate::vm::runner::Vm| {
        vm.kill();
        vm.exited_at().unwrap_or_else(Instant::now)
    };
    if let Some(f) = conv.failure.take() {
        finish(vm);
        return fail(StepError::Guest { kind: f.kind, message: f.message });
    }
    let Some(outcome) = conv.outcome.take() else {
        vm.kill();
        return fail(StepError::Channel(ProtoError::Closed("an outcome before Bye")));
    };
    let t_check = Instant::now();
    let checked = check::check_outcome(&booted.launch, job, &outcome, &conv.nars, &p.ctx, cfg);
    let verification = t_check.elapsed();
    let exited_at = finish(vm);
    let latency = called.elapsed();
    let checked = match checked {
        Ok(c) => c,
        Err(e) => return fail(e.into()),
    };
    let mut timings = timings(vm.started(), &conv.marks, exited_at);
    timings.verification = verification;
    timings.input_bytes = input_bytes;
    timings.output_bytes = conv.output_bytes;
    timings.guest_ready_uptime = Duration::from_millis(booted.greeting.hello_uptime_ms);
    timings.vm_wait = dispatched.saturating_duration_since(called);
    timings.warm = booted.launch.job.is_none();
    timings.latency = latency;
    timings.power_off = exited_at.saturating_duration_since(t_check + verification);
    let mode = booted.mode;
    drop(booted);
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

/// Why a conversation that did not end with the agent's `Bye` (`result`) failed, once QEMU is
/// stopped: the wall-clock limit, a stall the watch saw, a VM that ended by itself, else the
/// conversation's own error.
fn unfinished(
    vm: &Vm,
    result: Result<u64, StepError>,
    tripped: Option<Trip>,
    watchdog: &Watchdog,
    limit: Option<Duration>,
    phase: String,
) -> StepError {
    // Did the VM end on its own (killed, crashed)? A broken channel usually means it did: give
    // QEMU a moment to be reaped before deciding.
    let ended_by_itself = match &result {
        Err(StepError::Channel(ProtoError::Io(_) | ProtoError::Closed(_))) if tripped.is_none() => {
            vm.wait_timeout(Duration::from_secs(3))
        }
        _ => vm.exited(),
    };
    vm.kill();
    let e = match result {
        Err(e) => e,
        Ok(_) => StepError::Channel(ProtoError::Closed("the agent's Bye")),
    };
    if watchdog.timed_out() {
        return StepError::Watchdog(limit.unwrap_or_default());
    }
    if let Some(trip) = tripped {
        return StepError::Stalled { trip, phase, console: vm.console_tail() };
    }
    if let Some(st) = ended_by_itself {
        return StepError::VmDied { status: describe_exit(&st), phase, console: vm.console_tail() };
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use channel::messages::FailureKind;

    /// The notes of a build's log.
    #[derive(Default)]
    struct Notes(Vec<String>);

    impl BuildLog for Notes {
        fn output(&mut self, _: &[u8]) {}
        fn progress(&mut self, e: &Progress) {
            self.0.push(e.text());
        }
    }

    #[test]
    fn a_step_takes_a_slot_before_it_prepares_anything_and_gives_it_back() {
        use crate::build::slots::Slots;
        use crate::build::Cancel;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = LauncherConfig::new(dir.path().join("no-image"), dir.path().join("state"));
        let slots = Slots::new(1);
        cfg.slots = Some(slots.clone());
        let req = || StepRequest {
            drv_path: StorePath::parse("/nix/store/00000000000000000000000000000000-x.drv")
                .unwrap(),
            drv: crate::core::request::test_derivation("x"),
            outputs: BTreeSet::new(),
            limits: Limits::default(),
            ca_rule: build_trace::CaRule::SelfRefZeroed,
            network: false,
            job_id: None,
        };
        let run = |cfg: &LauncherConfig| {
            let mut log = Notes::default();
            let r = run_step(req(), &crate::build::nix_store::LocalNixStore, &mut log, cfg);
            (r.map(drop), log.0)
        };
        let held = slots.acquire(&Cancel::default(), |_| panic!("a free slot")).unwrap();
        std::thread::scope(|t| {
            // All slots busy: the step waits (without an image it would fail at once), says so,
            // and goes on when the slot is given back, to fail where it prepares.
            let waiting = t.spawn(|| run(&cfg));
            while slots.waiting() == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(200));
            assert!(!waiting.is_finished(), "it did not wait for the slot");
            drop(held);
            let (r, notes) = waiting.join().unwrap();
            assert!(matches!(&r, Err(e) if !matches!(e, StepError::Cancelled)), "{r:?}");
            assert!(notes.iter().any(|n| n.contains("waiting for a VM slot: all 1")), "{notes:?}");
        });
        assert_eq!((slots.busy(), slots.peak()), (0, 1), "given back after the failure");
        // A step waiting when its launcher is cancelled: cancelled, no slot taken.
        let held = slots.acquire(&Cancel::default(), |_| panic!("a free slot")).unwrap();
        std::thread::scope(|t| {
            let waiting = t.spawn(|| run(&cfg));
            while slots.waiting() == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            cfg.cancel.cancel();
            assert!(matches!(waiting.join().unwrap().0, Err(StepError::Cancelled)));
        });
        drop(held);
        assert_eq!((slots.busy(), slots.waiting()), (0, 0));
    }

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
