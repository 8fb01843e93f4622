//! [`run_step`]: launch the VM, talk to the agent, hand the result to [`super::check`].
//!
//! Threads: the main thread reads the guest's frames (hello, phases, log, output NARs, outcome
//! or failure, bye); a scoped sender thread writes setup, job and input NARs, so an early
//! failure report from the guest is read while inputs are still being sent. When QEMU exits the
//! channel is shut down (unblocking both), and a watchdog kills QEMU at the step's deadline.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::messages::{
    AttesterKind, Failure, Hello, NarBegin, Outcome, Phase, PhaseName, Setup, SimulatedSetup,
};
use agent::proto::{FrameReader, FrameWriter, Kind, ProtoError, PROTOCOL_VERSION};
use base64::Engine as _;
use build_trace::evidence::SimulatedRoot;
use build_trace::job::{Job, PathInfo};
use sha2::{Digest, Sha256};
use vm_image::image::{files, Manifest};

use super::{
    check, staging_dir, InputSource, LauncherConfig, LogSink, Progress, StepError, StepOutcome,
    StepRequest, Timings,
};
use crate::vm::network::NetworkGrant;
use crate::vm::runner::{describe_exit, Vm};
use crate::vm::vsock::{detect_backend, Channel, Stream};
use crate::vm::{
    choose_mode, host_cbitpos, qemu_argv, HostCaps, Mode, QemuSpec, SnpLaunch, SNP_POLICY,
};

/// One received NAR.
#[derive(Debug, Clone)]
pub struct ReceivedNar {
    /// The NAR file.
    pub file: PathBuf,
    pub sha256: [u8; 32],
    pub size: u64,
}

/// What the conversation produced.
#[derive(Debug, Default)]
pub(crate) struct Conversation {
    outcome: Option<Outcome>,
    failure: Option<Failure>,
    nars: BTreeMap<String, ReceivedNar>,
    bye: bool,
    hello_uptime_ms: u64,
    last_phase: Option<PhaseName>,
    marks: BTreeMap<&'static str, Instant>,
    output_bytes: u64,
}

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

/// Build one step in a fresh VM (see the module docs of [`super`]).
pub fn run_step(
    req: StepRequest,
    inputs: &dyn InputSource,
    sink: &mut dyn LogSink,
    cfg: &LauncherConfig,
) -> Result<StepOutcome, StepError> {
    let manifest =
        Manifest::load(&cfg.image_dir).map_err(|e| StepError::Image(cfg.image_dir.clone(), e))?;
    manifest
        .verify_files(&cfg.image_dir)
        .map_err(|e| StepError::Image(cfg.image_dir.clone(), e))?;
    let caps = HostCaps::probe();
    let mode = choose_mode(cfg.mode, &caps, manifest.snp.is_some())?;
    super::policy::check_fixed_output_request(&req.drv, cfg.allow_weak_fixed_hashes)
        .map_err(|e| StepError::Request(e.to_string()))?;
    let limits = super::policy::effective_limits(req.limits, &cfg.default_limits, cfg.memory_mib);

    let closure = inputs.closure(&req.drv.input_srcs).map_err(StepError::Inputs)?;
    let outputs = if req.outputs.is_empty() {
        req.drv.outputs.keys().cloned().collect()
    } else {
        req.outputs.clone()
    };
    let job_id = req.job_id.clone().unwrap_or_else(random_id);
    let job = Job::new(
        job_id.clone(),
        req.drv_path.clone(),
        req.drv.clone(),
        closure,
        limits,
        req.ca_rule,
        req.network,
        outputs,
    );
    job.validate().map_err(|e| StepError::Request(super::check::chain(&e)))?;
    // The only way to a NIC: a grant, which only a fixed-output job gets.
    let network = NetworkGrant::for_job(&job).map_err(|e| StepError::Request(e.to_string()))?;
    let job_bytes = job.canonical_bytes().map_err(|e| StepError::Request(e.to_string()))?;
    let host_data = job.host_data().map_err(|e| StepError::Request(e.to_string()))?;

    let (setup, sim_root) = if mode == Mode::Snp {
        (Setup::default(), None)
    } else {
        let root = SimulatedRoot::load_or_generate(&cfg.simulated_root_dir()).map_err(|e| {
            StepError::Io(
                "simulated SNP root".into(),
                std::io::Error::other(super::check::chain(&e)),
            )
        })?;
        (simulated_setup(&root, &manifest)?, Some(root))
    };

    // Unix socket paths must stay short: a private directory under $TMPDIR.
    let run_dir = tempfile::Builder::new()
        .prefix("vouch-vm-")
        .tempdir()
        .map_err(|e| StepError::Io("creating the VM run directory".into(), e))?;
    let port = agent::config::parse_cmdline(&manifest.cmdline)
        .map(|c| c.port)
        .unwrap_or(agent::config::DEFAULT_PORT);
    let backend = detect_backend(caps.vhost_vsock)?;
    let mut chan = Channel::prepare(&backend, run_dir.path(), port)?;
    let img = |f: &str| cfg.image_dir.join(f);
    let spec = QemuSpec {
        mode,
        kernel: if mode == Mode::Snp { img(files::BZIMAGE) } else { img(files::VMLINUX) },
        initrd: img(files::INITRD),
        cmdline: manifest.cmdline.clone(),
        memory_mib: super::policy::guest_memory_mib(cfg.memory_mib, &limits),
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
    tracing::debug!(?argv, "starting QEMU");
    let console_log = run_dir.path().join("console.log");
    let vm = Vm::spawn(&cfg.qemu, &argv, &console_log, cfg.echo_console)
        .map_err(|e| StepError::Qemu(cfg.qemu.display().to_string(), e))?;
    let started = vm.started();
    sink.progress(&Progress::Booting { mode, pid: vm.pid() });

    let stream = match chan.accept(cfg.boot_timeout, &|| vm.exited().is_none()) {
        Ok(s) => s,
        Err(e) => {
            let status = vm.exited().or_else(|| vm.kill());
            // Give the stderr reader a moment to collect QEMU's last words.
            std::thread::sleep(Duration::from_millis(50));
            return Err(match e {
                crate::vm::vsock::VsockError::VmGone => StepError::NoAgent {
                    status: status.as_ref().map_or("ended".into(), describe_exit),
                    qemu: vm.qemu_stderr(),
                    console: vm.console_tail(),
                },
                other => other.into(),
            });
        }
    };
    if let Ok(s2) = stream.try_clone() {
        vm.on_exit(move || s2.shutdown());
    }
    let watchdog_fired = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let limit = (req.limits.timeout_s > 0)
        .then(|| Duration::from_secs(req.limits.timeout_s) + cfg.slack + cfg.boot_timeout);
    if let Some(limit) = limit {
        let (fired, done) = (watchdog_fired.clone(), done.clone());
        let pid = vm.pid();
        std::thread::spawn(move || {
            let end = Instant::now() + limit;
            while Instant::now() < end {
                if done.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if !done.load(Ordering::Relaxed) {
                fired.store(true, Ordering::Relaxed);
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
    }

    let staging = staging_dir(&cfg.state_dir, &job_id)?;
    let mut conv = Conversation::default();
    let result = converse(stream, mode, setup, &job_bytes, &job, inputs, &staging, sink, &mut conv);
    done.store(true, Ordering::Relaxed);
    // Did the VM end on its own (killed, crashed)? A broken channel usually means it did: give
    // QEMU a moment to be reaped before deciding.
    let ended_by_itself = match &result {
        Err(StepError::Channel(ProtoError::Io(_) | ProtoError::Closed(_))) => {
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
    drop(chan);

    let fail = |e: StepError| {
        let _ = std::fs::remove_dir_all(&staging);
        Err(e)
    };
    let input_bytes = match result {
        Ok(b) => b,
        Err(e) => {
            if watchdog_fired.load(Ordering::Relaxed) {
                return fail(StepError::Watchdog(limit.unwrap_or_default()));
            }
            if let Some(st) = ended_by_itself {
                return fail(StepError::VmDied {
                    status: describe_exit(&st),
                    phase: conv.last_phase.map_or("booted".into(), |p| phase_key(p).to_owned()),
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
        &manifest,
        sim_root.as_ref(),
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
        attester: outcome.attester,
        outputs: checked.outputs,
        staging: Some(staging),
        mode,
        timings,
    })
}

fn timings(started: Instant, marks: &BTreeMap<&'static str, Instant>, exited: Instant) -> Timings {
    let d = |a: &str, b: &str| match (marks.get(a), marks.get(b)) {
        (Some(x), Some(y)) if y >= x => *y - *x,
        _ => Duration::ZERO,
    };
    Timings {
        boot: marks.get("hello").map_or(Duration::ZERO, |h| *h - started),
        input_transfer: d("hello", "inputs-ready"),
        build: d("building", "built"),
        hashing: d("hashing", "attesting"),
        attestation: d("attesting", "sending"),
        output_transfer: d("sending", "outcome"),
        total: exited.saturating_duration_since(started),
        ..Timings::default()
    }
}

fn phase_key(p: PhaseName) -> &'static str {
    match p {
        PhaseName::JobAccepted => "job-accepted",
        PhaseName::InputsReady => "inputs-ready",
        PhaseName::Building => "building",
        PhaseName::Built => "built",
        PhaseName::Hashing => "hashing",
        PhaseName::Attesting => "attesting",
        PhaseName::Sending => "sending",
    }
}

/// Send setup, job and inputs (sender thread).
fn send_all(
    mut w: FrameWriter<Stream>,
    setup: &Setup,
    job_bytes: &[u8],
    closure: &BTreeMap<String, PathInfo>,
    inputs: &dyn InputSource,
) -> Result<u64, StepError> {
    w.send_json(Kind::Setup, setup)?;
    w.send(Kind::Job, job_bytes)?;
    let mut total = 0;
    for (path, info) in closure {
        let mut nar = inputs.nar(path).map_err(StepError::Inputs)?;
        let sent =
            w.send_nar(&NarBegin { path: path.clone(), nar_size: info.nar_size }, &mut nar)?;
        // A source that changed underneath us: the guest sees a size mismatch and says so.
        total += sent;
    }
    w.send(Kind::InputsDone, &[])?;
    w.flush()?;
    Ok(total)
}

#[allow(clippy::too_many_arguments)]
fn converse(
    stream: Stream,
    mode: Mode,
    setup: Setup,
    job_bytes: &[u8],
    job: &Job,
    inputs: &dyn InputSource,
    staging: &Path,
    sink: &mut dyn LogSink,
    conv: &mut Conversation,
) -> Result<u64, StepError> {
    let writer = stream.try_clone().map_err(|e| StepError::Io("cloning the channel".into(), e))?;
    let closer = stream.try_clone().map_err(|e| StepError::Io("cloning the channel".into(), e))?;
    let mut r = FrameReader::new(stream);
    let hello: Hello = r.expect(Kind::Hello, "the agent's Hello")?.json()?;
    conv.marks.insert("hello", Instant::now());
    conv.hello_uptime_ms = hello.uptime_ms;
    if hello.protocol != PROTOCOL_VERSION {
        return Err(StepError::Request(format!(
            "the image's agent speaks channel protocol {}, this launcher {PROTOCOL_VERSION}: rebuild the image",
            hello.protocol
        )));
    }
    match (mode, hello.attester) {
        (Mode::Snp, AttesterKind::Simulated) => {
            return Err(StepError::Request(
                "an SNP VM whose agent found no SEV-SNP interface".into(),
            ))
        }
        (Mode::Kvm | Mode::Tcg, AttesterKind::SevSnp) => {
            return Err(StepError::Request(format!(
                "a {mode} VM whose agent claims SEV-SNP hardware"
            )))
        }
        _ => {}
    }
    sink.progress(&Progress::AgentReady { attester: hello.attester });
    let max_outputs = job.outputs.len();
    std::thread::scope(|scope| {
        let sender = scope
            .spawn(|| send_all(FrameWriter::new(writer), &setup, job_bytes, &job.closure, inputs));
        let received = receive_all(&mut r, conv, staging, max_outputs, sink);
        // Whatever happened, the channel is finished now: unblock the sender.
        closer.shutdown();
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(StepError::Request("input sender panicked".into())));
        match (received, sent) {
            (Ok(()), Ok(bytes)) => {
                sink.progress(&Progress::InputsSent { paths: job.closure.len(), bytes });
                Ok(bytes)
            }
            // The guest reported a failure; the sender's broken pipe is a consequence.
            (Ok(()), Err(_)) if conv.failure.is_some() => Ok(0),
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) => Err(e),
        }
    })
}

fn receive_all(
    r: &mut FrameReader<Stream>,
    conv: &mut Conversation,
    staging: &Path,
    max_outputs: usize,
    sink: &mut dyn LogSink,
) -> Result<(), StepError> {
    loop {
        let f = r.expect_frame("a frame before the agent's Bye")?;
        match f.kind {
            Kind::Log => sink.log(&f.payload),
            Kind::Phase => {
                let p: Phase = f.json()?;
                conv.marks.insert(phase_key(p.phase), Instant::now());
                conv.last_phase = Some(p.phase);
                sink.progress(&Progress::Guest(p.phase));
            }
            Kind::NarBegin if conv.outcome.is_none() && conv.failure.is_none() => {
                let begin: NarBegin = f.json()?;
                if conv.nars.len() >= max_outputs || conv.nars.contains_key(&begin.path) {
                    return Err(StepError::Request(format!(
                        "the guest sent an unexpected output NAR for {}",
                        begin.path
                    )));
                }
                let sp = nix_formats::StorePath::parse(&begin.path).map_err(|e| {
                    StepError::Request(format!(
                        "the guest sent an output NAR for an invalid path: {e}"
                    ))
                })?;
                let file = staging.join(format!("{}.nar", sp.base_name()));
                let nar = receive_nar(r, &begin, &file)?;
                conv.output_bytes += nar.size;
                sink.progress(&Progress::OutputReceived { path: begin.path.clone() });
                conv.nars.insert(begin.path, nar);
            }
            Kind::Outcome if conv.outcome.is_none() && conv.failure.is_none() => {
                conv.marks.insert("outcome", Instant::now());
                conv.outcome = Some(f.json()?);
            }
            Kind::Failure if conv.outcome.is_none() && conv.failure.is_none() => {
                conv.failure = Some(f.json()?);
            }
            Kind::Bye => {
                conv.bye = true;
                return Ok(());
            }
            other => {
                return Err(ProtoError::Unexpected {
                    expected: "log, phase, output, outcome or Bye",
                    got: other,
                }
                .into())
            }
        }
    }
}

fn receive_nar(
    r: &mut FrameReader<Stream>,
    begin: &NarBegin,
    file: &Path,
) -> Result<ReceivedNar, StepError> {
    use std::io::Read;
    let mut out = std::fs::File::create(file)
        .map_err(|e| StepError::Io(format!("creating {}", file.display()), e))?;
    let mut sha = Sha256::new();
    let mut stream = r.nar_stream(&begin.path, begin.nar_size);
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        let n = stream.read(&mut buf).map_err(agent::proto::into_proto)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| StepError::Io(format!("writing {}", file.display()), e))?;
        size += n as u64;
    }
    out.sync_all().map_err(|e| StepError::Io(format!("syncing {}", file.display()), e))?;
    Ok(ReceivedNar { file: file.to_owned(), sha256: sha.finalize().into(), size })
}
