//! One build step, guest side: the agent's whole job between connecting and powering off.
//!
//! Order (see `channel::messages` for the frames): send `Hello`; read `Setup` and the job;
//! choose the attester (SNP hardware if present — its first report gives the HOST_DATA the VM was
//! launched with, and a job that does not hash to it is refused — else the simulated signer the
//! host sent, said loudly); receive and check the inputs; recompute claimed content addresses;
//! run the builder (log streamed); hash the outputs; build the statement; attest its
//! REPORT_DATA; stream the outputs; send `Outcome`. Any error becomes one `Failure` frame with
//! its kind and message. `Bye` always ends the session. From `Hello` until just before `Bye` a
//! heartbeat thread ([`channel::liveness::Heartbeat`]) shares the writer, so the host can tell a
//! silent builder from a stalled channel; every write is at most [`GUEST_MAX_WRITE`] bytes.
//!
//! What is not here: mounting, connecting and powering off (`crate::pid1`, `main`).

use std::collections::BTreeMap;
use std::io::{Read, Write};

use base64::Engine as _;
use build_trace::evidence::{SimulatedPlatform, TcbVersion};
use build_trace::job::{Job, StepKind};
use build_trace::statement::{Measurement, Statement};

use crate::attest::{self, Attester, AttesterKind};
use crate::builder::{self, RunLimits};
use crate::inputs::{self, InputError};
use crate::outputs::{self, OutputError};
use crate::pid1::{say, uptime};
use crate::sandbox::{Confinement, SandboxSpec};
use channel::liveness::{Heartbeat, SharedFrameWriter, HEARTBEAT_INTERVAL};
use channel::messages::{Failure, FailureKind, Hello, NarBegin, Outcome, Phase, PhaseName, Setup};
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
    /// The job does not hash to the launch's HOST_DATA.
    #[error("refusing the job: it hashes to HOST_DATA {job}, but this VM was launched with HOST_DATA {launched}")]
    HostData {
        /// SHA-256 of the job received.
        job: String,
        /// From the first attestation report.
        launched: String,
    },
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

/// Where the guest keeps things (fixed in the VM; tests may point elsewhere).
#[derive(Debug, Clone)]
pub struct GuestPaths {
    /// The store (`/nix/store`).
    pub store: std::path::PathBuf,
    /// The build directory (`/build`).
    pub build: std::path::PathBuf,
}

impl Default for GuestPaths {
    fn default() -> Self {
        GuestPaths { store: "/nix/store".into(), build: "/build".into() }
    }
}

fn phase<W: Write>(w: &SharedFrameWriter<W>, p: PhaseName) -> Result<(), ProtoError> {
    w.send_json(Kind::Phase, &Phase { phase: p, uptime_ms: uptime_ms() })
}

fn uptime_ms() -> u64 {
    (uptime() * 1000.0) as u64
}

/// Run the session on a connected channel. Errors of the step are reported to the host;
/// only channel failures that prevent even that are returned.
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
    let heartbeat = Heartbeat::start(w.clone(), HEARTBEAT_INTERVAL, uptime_ms);
    let result = match step(&mut r, &w, hw.take(), paths) {
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
    // Nothing follows `Bye`, not even a heartbeat.
    let beats = heartbeat.stop();
    say(&format!("{beats} heartbeats sent"));
    result?;
    w.send(Kind::Bye, &[])?;
    w.flush()
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
    hw: Option<attest::SevSnp>,
    paths: &GuestPaths,
) -> Result<(), StepError> {
    let setup: Setup = r.expect(Kind::Setup, "Setup")?.json()?;
    let job_bytes = r.expect(Kind::Job, "the job")?.payload;
    let job = Job::from_canonical_bytes(&job_bytes).map_err(StepError::Job)?;
    let host_data = job.host_data().map_err(StepError::Job)?;

    // The attester, and the launch measurement from its first report.
    let (mut attester, measurement): (Box<dyn Attester>, [u8; 48]) = match hw {
        Some(mut snp) => {
            if setup.simulated.is_some() {
                say("ignoring the host's simulated key: this VM has SEV-SNP hardware");
            }
            let first = snp.report(&[0u8; 64])?;
            let launched = attest::report_host_data(&first);
            if launched != host_data {
                return Err(StepError::HostData {
                    job: hex::encode(host_data),
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
    say(&format!(
        "job {} for {} accepted (HOST_DATA {})",
        job.job_id,
        job.drv_path,
        hex::encode(host_data)
    ));
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
    let confine = Confinement::prepare(&SandboxSpec::for_job(&job, &paths.store, &paths.build))?;
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
