//! One build step, guest side: the agent's whole job between connecting and powering off.
//!
//! Order (see `channel::messages` for the frames): send `Hello`; read `Setup` and the **launch**;
//! check the launch ([`accept_launch`]): it must describe this VM ([`VmShape`]: vCPU count,
//! memory) and, on SNP hardware, hash to the HOST_DATA of the first report (the simulated signer
//! the host sent takes its hash as HOST_DATA, said loudly); lay the sandbox's job-independent
//! groundwork (`crate::sandbox::Groundwork`); if the launch names no job (a pool VM), rehearse a
//! step over synthetic data (`crate::rehearsal`); send `Ready`. A pool VM waits here, silent,
//! until its job comes. Then read **one** job, which the launch must admit
//! (`Launch::admits`); receive and check the inputs; recompute claimed content addresses; run
//! the builder (log streamed); hash the outputs; build the statement (launch and job); attest
//! its REPORT_DATA; stream the outputs; send `Outcome`. Any error becomes one `Failure` frame
//! with its kind and message. `Bye` always ends the session, and nothing after it is acted on:
//! the caller waits for the host to close the channel, discarding what comes, and powers off,
//! so a VM never runs a second job (a second `Job` frame where inputs belong is a protocol
//! failure). From the job until just before `Bye` a heartbeat thread
//! ([`channel::liveness::Heartbeat`], spawned at `Hello` and parked until the job) shares the writer, so the host can tell a silent builder
//! from a stalled channel; every write is at most [`GUEST_MAX_WRITE`] bytes.
//!
//! What is not here: mounting, connecting and powering off (`crate::pid1`, `main`).

use std::collections::BTreeMap;
use std::io::{Read, Write};

use base64::Engine as _;
use build_trace::evidence::{SimulatedPlatform, TcbVersion};
use build_trace::job::{Job, StepKind};
use build_trace::launch::{Launch, LaunchError};
use build_trace::statement::{Measurement, Statement};

use crate::attest::{self, Attester, AttesterKind};
use crate::builder::{self, RunLimits};
use crate::inputs::{self, InputError};
use crate::outputs::{self, OutputError};
use crate::pid1::{say, uptime};
use crate::sandbox::{Confinement, Groundwork, SandboxSpec};
use channel::liveness::{Heartbeat, SharedFrameWriter, HEARTBEAT_INTERVAL};
use channel::messages::{
    Failure, FailureKind, Hello, NarBegin, Outcome, Phase, PhaseName, Ready, Setup,
};
use channel::proto::{
    FrameReader, FrameWriter, Kind, ProtoError, GUEST_MAX_WRITE, PROTOCOL_VERSION,
};

/// The agent's version string (goes into the statement and the image manifest); the bench
/// image's agent says so ([`channel::config::BENCH_VERSION_SUFFIX`]).
pub fn agent_version() -> String {
    let bench = if cfg!(feature = "bench") { channel::config::BENCH_VERSION_SUFFIX } else { "" };
    format!("vouch-agent {}{bench}", env!("CARGO_PKG_VERSION"))
}

/// Why a step failed inside the guest.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Channel trouble or a protocol violation.
    #[error("channel")]
    Proto(#[from] ProtoError),
    /// The job bytes are not a valid canonical job.
    #[error("the job is invalid")]
    Job(#[source] build_trace::job::JobError),
    /// The launch does not hash to the VM's HOST_DATA.
    #[error("refusing the launch: it hashes to HOST_DATA {launch}, but this VM was launched with HOST_DATA {launched}")]
    HostData {
        /// SHA-256 of the launch received.
        launch: String,
        /// From the first attestation report.
        launched: String,
    },
    /// The launch is malformed, does not describe this VM, or does not admit the job.
    #[error("refusing the launch or the job")]
    Launch(#[source] LaunchError),
    /// Inputs.
    #[error(transparent)]
    Inputs(#[from] InputError),
    /// Preparing the build.
    #[error("preparing the build")]
    Prepare(#[from] builder::PrepareError),
    /// The builder.
    #[error(transparent)]
    Build(#[from] builder::BuildFailure),
    /// Outputs.
    #[error(transparent)]
    Outputs(#[from] OutputError),
    /// The statement did not validate.
    #[error("the statement is inconsistent")]
    Statement(#[source] build_trace::statement::StatementError),
    /// Attestation.
    #[error("attestation")]
    Attest(#[from] attest::AttestError),
    /// Confining the builder (cgroup, root, network) failed.
    #[error("confining the builder")]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// Bad setup from the host.
    #[error("setup from the host: {0}")]
    Setup(String),
}

impl StepError {
    /// The failure category sent to the host.
    pub fn kind(&self) -> FailureKind {
        use builder::BuildFailure as B;
        match self {
            StepError::Proto(_) | StepError::Job(_) | StepError::Setup(_) => FailureKind::Protocol,
            StepError::HostData { .. } => FailureKind::HostDataMismatch,
            StepError::Launch(_) => FailureKind::Launch,
            StepError::Inputs(e) if e.is_ca() => FailureKind::InputCa,
            StepError::Inputs(InputError::Proto(_)) => FailureKind::Protocol,
            StepError::Inputs(_) => FailureKind::InputHash,
            StepError::Build(B::Timeout { .. }) => FailureKind::Timeout,
            StepError::Build(B::MaxSilent { .. }) => FailureKind::MaxSilent,
            StepError::Build(B::LogLimit { .. }) => FailureKind::LogLimit,
            StepError::Build(B::Limit { .. }) => FailureKind::ResourceLimit,
            StepError::Sandbox(_) => FailureKind::Internal,
            StepError::Build(_) | StepError::Prepare(_) => FailureKind::BuilderFailed,
            StepError::Outputs(_) | StepError::Statement(_) => FailureKind::Output,
            StepError::Attest(_) => FailureKind::Attestation,
        }
    }
}

/// Where the guest keeps things, and what it is (fixed in the VM; tests may point elsewhere).
#[derive(Debug, Clone)]
pub struct GuestPaths {
    /// The store (`/nix/store`).
    pub store: std::path::PathBuf,
    /// The build directory (`/build`).
    pub build: std::path::PathBuf,
    /// The VM's shape, which a launch must describe.
    pub shape: VmShape,
    /// Scratch directory of a pool VM's rehearsal (`crate::rehearsal`), outside the store and
    /// the build directory (`/tmp/vouch-rehearsal`).
    pub rehearsal: std::path::PathBuf,
    /// Whether to lay the sandbox's groundwork ([`crate::sandbox::Groundwork`]) once the launch
    /// is accepted (in the VM; host-side tests of the session never reach the builder and must
    /// not touch the host's sysctls and mounts).
    pub sandbox_ahead: bool,
}

impl Default for GuestPaths {
    fn default() -> Self {
        GuestPaths {
            store: "/nix/store".into(),
            build: "/build".into(),
            shape: VmShape::probe(),
            rehearsal: "/tmp/vouch-rehearsal".into(),
            sandbox_ahead: true,
        }
    }
}

fn phase<W: Write>(w: &SharedFrameWriter<W>, p: PhaseName) -> Result<(), ProtoError> {
    w.send_json(Kind::Phase, &Phase { phase: p, uptime_ms: uptime_ms() })
}

fn uptime_ms() -> u64 {
    (uptime() * 1000.0) as u64
}

/// What this VM is, as the guest sees it (what a launch document must say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmShape {
    /// Online vCPUs.
    pub cpus: u64,
    /// `MemTotal` of `/proc/meminfo`, KiB.
    pub mem_total_kib: u64,
}

impl VmShape {
    /// This VM's (or, in tests, this machine's) shape.
    pub fn probe() -> VmShape {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        VmShape { cpus, mem_total_kib }
    }

    /// Whether `launch` describes this VM: the same vCPU count, and the kernel's `MemTotal`
    /// (RAM less what firmware and kernel keep) between half the launch's memory and all of it.
    pub fn check(&self, launch: &Launch) -> Result<(), LaunchError> {
        let bad = |field, problem: String| LaunchError::Field { field, problem };
        if launch.vcpus != self.cpus {
            return Err(bad("vcpus", format!("is {}, this VM has {}", launch.vcpus, self.cpus)));
        }
        let kib = launch.memory_mib.saturating_mul(1024);
        if self.mem_total_kib > kib || self.mem_total_kib < kib / 2 {
            return Err(bad(
                "memory_mib",
                format!(
                    "is {}, this VM's MemTotal is {} KiB",
                    launch.memory_mib, self.mem_total_kib
                ),
            ));
        }
        Ok(())
    }
}

/// Run the session on a connected channel: one launch, one job. Errors of the step are
/// reported to the host; only channel failures that prevent even that are returned. The caller
/// powers off afterwards, whatever happened.
pub fn serve<R: Read, W: Write + Send + 'static>(
    rd: R,
    wr: W,
    paths: &GuestPaths,
) -> Result<(), ProtoError> {
    let mut r = FrameReader::new(rd);
    let w = SharedFrameWriter::new(FrameWriter::with_max_write(wr, GUEST_MAX_WRITE));
    let mut hw = attest::detect();
    if hw.is_some() {
        say("attester: sev-snp (AMD secure processor)");
    } else {
        say("WARNING: no SEV-SNP hardware in this VM: evidence will be SIMULATED and proves nothing about hardware");
    }
    let kind = if hw.is_some() { AttesterKind::SevSnp } else { AttesterKind::Simulated };
    w.send_json(
        Kind::Hello,
        &Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: agent_version(),
            attester: kind,
            uptime_ms: uptime_ms(),
        },
    )?;
    // Spawned now, parked until the job: creating a thread is slow under TCG.
    let heartbeat = Heartbeat::parked(w.clone(), HEARTBEAT_INTERVAL, uptime_ms);
    let result = accept_launch(&mut r, &w, hw.take(), paths)
        .and_then(|launched| one_job(&mut r, &w, heartbeat, launched, paths));
    let result = match result {
        Ok(()) => {
            say("step done");
            Ok(())
        }
        Err(e) => {
            let message = build_trace::error_chain(&e);
            say(&format!("step failed: {message}"));
            w.send_json(Kind::Failure, &Failure { kind: e.kind(), message })
        }
    };
    result?;
    w.send(Kind::Bye, &[])?;
    w.flush()
}

/// A launch the agent accepted: the attester for it, the measurement of its first report, and
/// the sandbox's groundwork (or why it failed: the job fails with it).
struct Launched {
    launch: Launch,
    attester: Box<dyn Attester>,
    measurement: [u8; 48],
    groundwork: Option<Result<Groundwork, crate::sandbox::SandboxError>>,
}

/// Read `Setup` and the launch, check the launch against this VM and its HOST_DATA, get the
/// attester ready, rehearse a step if the launch names no job (a pool VM: `crate::rehearsal`),
/// send `Ready`.
fn accept_launch<R: Read, W: Write>(
    r: &mut FrameReader<R>,
    w: &SharedFrameWriter<W>,
    hw: Option<attest::SevSnp>,
    paths: &GuestPaths,
) -> Result<Launched, StepError> {
    let shape = &paths.shape;
    let setup: Setup = r.expect(Kind::Setup, "Setup")?.json()?;
    let bytes = r.expect(Kind::Launch, "the launch")?.payload;
    let launch = Launch::from_canonical_bytes(&bytes).map_err(StepError::Launch)?;
    let host_data = build_trace::launch::host_data_of(&bytes);
    shape.check(&launch).map_err(StepError::Launch)?;
    let (attester, measurement): (Box<dyn Attester>, [u8; 48]) = match hw {
        Some(mut snp) => {
            if setup.simulated.is_some() {
                say("ignoring the host's simulated key: this VM has SEV-SNP hardware");
            }
            let first = snp.report(&[0u8; 64])?;
            let launched = attest::report_host_data(&first);
            if launched != host_data {
                return Err(StepError::HostData {
                    launch: hex::encode(host_data),
                    launched: hex::encode(launched),
                });
            }
            (Box::new(snp), attest::report_measurement(&first))
        }
        None => {
            let (sim, m) = simulated_attester(&setup, host_data)?;
            (Box::new(sim), m)
        }
    };
    say(&format!("launch {} accepted (HOST_DATA {})", launch.nonce, hex::encode(host_data)));
    // Job-independent work, done before the job exists (a pool VM does it while it waits).
    let groundwork =
        paths.sandbox_ahead.then(|| Confinement::groundwork(&paths.store, &paths.build));
    if launch.job.is_none() {
        rehearse(&launch, groundwork.as_ref(), paths);
    }
    w.send_json(Kind::Ready, &Ready { uptime_ms: uptime_ms() })?;
    Ok(Launched { launch, attester, measurement, groundwork })
}

/// A pool VM's rehearsal (`crate::rehearsal`): a step over synthetic data, then a confined
/// process in the sandbox's groundwork. A failure is only said: it warms caches, nothing more.
fn rehearse(
    launch: &Launch,
    groundwork: Option<&Result<Groundwork, crate::sandbox::SandboxError>>,
    paths: &GuestPaths,
) {
    use crate::rehearsal::{rehearse, rehearse_builder};
    let t = std::time::Instant::now();
    let result = rehearse(&paths.rehearsal, launch).and_then(|()| match groundwork {
        Some(Ok(g)) => rehearse_builder(g, &paths.store, &paths.build),
        _ => Ok(()),
    });
    match result {
        Ok(()) => say(&format!(
            "pool VM: rehearsed a step over synthetic data in {:.3} s (nothing of it is kept)",
            t.elapsed().as_secs_f64()
        )),
        Err(e) => say(&format!("warning: rehearsal failed: {}", build_trace::error_chain(&e))),
    }
}

/// Wait (silent: a pool VM may wait long) for the one job, then run it with heartbeats (the
/// parked `heartbeat` starts when the job arrives).
fn one_job<R: Read, W: Write + Send + 'static>(
    r: &mut FrameReader<R>,
    w: &SharedFrameWriter<W>,
    heartbeat: Heartbeat,
    launched: Launched,
    paths: &GuestPaths,
) -> Result<(), StepError> {
    let job_bytes = r.expect(Kind::Job, "the job")?.payload;
    heartbeat.go();
    let result = step(r, w, launched, &job_bytes, paths);
    // Nothing follows `Bye`, not even a heartbeat.
    let beats = heartbeat.stop();
    say(&format!("{beats} heartbeats sent"));
    result
}

fn simulated_attester(
    setup: &Setup,
    host_data: [u8; 32],
) -> Result<(attest::Simulated, [u8; 48]), StepError> {
    let sim = setup.simulated.as_ref().ok_or(attest::AttestError::NoSimulatedKey)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(&sim.vcek_key_pkcs8)
        .map_err(|e| StepError::Setup(format!("simulated key: {e}")))?;
    let chip: [u8; 64] = hex::decode(&sim.chip_id)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| StepError::Setup("simulated chip id is not 64 bytes of hex".into()))?;
    let m: [u8; 48] = hex::decode(&sim.measurement)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| StepError::Setup("simulated measurement is not 48 bytes of hex".into()))?;
    let [bootloader, tee, snp, microcode] = sim.tcb;
    let platform = SimulatedPlatform {
        chip_id: chip,
        tcb: TcbVersion { fmc: None, bootloader, tee, snp, microcode },
    };
    Ok((attest::Simulated::new(&key, platform, m, host_data)?, m))
}

fn step<R: Read, W: Write>(
    r: &mut FrameReader<R>,
    w: &SharedFrameWriter<W>,
    launched: Launched,
    job_bytes: &[u8],
    paths: &GuestPaths,
) -> Result<(), StepError> {
    let Launched { launch, mut attester, measurement, groundwork } = launched;
    let job = Job::from_canonical_bytes(job_bytes).map_err(StepError::Job)?;
    launch.admits(&job).map_err(StepError::Launch)?;
    say(&format!("job {} for {} accepted", job.job_id, job.drv_path));
    phase(w, PhaseName::JobAccepted)?;

    let t = std::time::Instant::now();
    let received = inputs::receive(r, &job, &paths.store, &mut |_| {})?;
    let t_recv = t.elapsed();
    let input_cas = inputs::verify_content_addresses(&job, &paths.store, &received)?;
    say(&format!(
        "{} inputs unpacked and checked (received and hashed in {:.3} s, content addresses in {:.3} s)",
        received.order.len(),
        t_recv.as_secs_f64(),
        (t.elapsed() - t_recv).as_secs_f64()
    ));
    phase(w, PhaseName::InputsReady)?;

    let (scratch, rewrites) = builder::scratch_paths(&job.drv, &job.drv_path)?;
    let fixed = job.kind().map_err(StepError::Job)? == StepKind::FixedOutput;
    let cores = match job.limits.cores {
        0 => std::thread::available_parallelism().map(|n| n.get() as u64).unwrap_or(1),
        n => n,
    };
    let build_dir = paths.build.to_string_lossy().into_owned();
    let prepared = builder::prepare(&job.drv, &rewrites, &job.closure, fixed, cores, &build_dir)?;
    let groundwork = groundwork.transpose()?;
    let spec = SandboxSpec::for_job(&job, &paths.store, &paths.build);
    let confine = Confinement::prepare(&spec, groundwork.as_ref())?;
    builder::write_files(&paths.build, &prepared.files, &confine)?;
    let limits = RunLimits {
        timeout_s: job.limits.timeout_s,
        max_silent_s: job.limits.max_silent_s,
        max_log_bytes: job.limits.max_log_bytes,
    };
    phase(w, PhaseName::Building)?;
    say(&format!("building {}", job.drv_path));
    let mut log_err = None;
    builder::run(&prepared, &job.drv_path.to_string(), &paths.build, limits, &confine, &mut |d| {
        if log_err.is_none() {
            if let Err(e) = w.send(Kind::Log, d) {
                log_err = Some(e);
            }
        }
    })?;
    if let Some(e) = log_err {
        return Err(e.into());
    }
    phase(w, PhaseName::Built)?;

    phase(w, PhaseName::Hashing)?;
    let hashed = outputs::hash_outputs(&job, &scratch, &paths.store)?;
    let statement = Statement::new(
        launch,
        job,
        input_cas,
        hashed.iter().map(|(n, h)| (n.clone(), h.info.clone())).collect::<BTreeMap<_, _>>(),
        Measurement(measurement),
        agent_version(),
    );
    statement.validate().map_err(StepError::Statement)?;
    let canonical = statement.canonical_bytes().map_err(StepError::Statement)?;
    let report_data = statement.report_data().map_err(StepError::Statement)?;

    phase(w, PhaseName::Attesting)?;
    let (report, certs) = attester.report_with_certs(&report_data)?;
    say(&format!(
        "attested by {} (REPORT_DATA {}…)",
        attester.kind(),
        &hex::encode(report_data)[..16]
    ));

    phase(w, PhaseName::Sending)?;
    for h in hashed.values() {
        let begin = NarBegin { path: h.info.path.clone(), nar_size: h.info.nar_size };
        let sent = w.send_nar(&begin, &mut h.nar())?;
        if sent != h.info.nar_size {
            return Err(StepError::Setup(format!(
                "output {} changed while it was sent",
                h.info.path
            )));
        }
    }
    let outcome = Outcome {
        statement: String::from_utf8(canonical).map_err(|e| StepError::Setup(e.to_string()))?,
        report: base64::engine::general_purpose::STANDARD.encode(report),
        attester: attester.kind(),
        certs: (!certs.iter().all(|b| *b == 0))
            .then(|| base64::engine::general_purpose::STANDARD.encode(&certs)),
    };
    w.send_json(Kind::Outcome, &outcome)?;
    Ok(())
}

#[cfg(test)]
mod tests;
