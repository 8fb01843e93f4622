//! The conversation with one guest over its channel, in two parts:
//! - [`hello_and_launch`], at boot: the agent's `Hello` (protocol version, attester kind), then
//!   `Setup` and the launch, until the agent's `Ready` (or its `Failure`). A pool VM then waits,
//!   silent, for its job.
//! - [`converse`], for the job: the job and inputs from a sender thread while the main thread
//!   reads the guest's frames (phases, log, output NARs, outcome or failure, `Bye`), so an early
//!   failure report is read while inputs are still being sent.
//!
//! Both go through the channel watchdog ([`super::watch`]): heartbeats keep a healthy channel
//! alive during a job, and silence fails the conversation instead of hanging it.
//!
//! What is not here: launching and stopping the VM, retries, checks (`super::launch`,
//! `super::host`, `super::check`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use build_trace::job::{Job, PathInfo};
use channel::messages::{
    AttesterKind, Failure, Hello, NarBegin, Outcome, Phase, PhaseName, Ready, Setup,
};
use channel::proto::{FrameReader, FrameWriter, Kind, ProtoError, PROTOCOL_VERSION};
use nix_formats::StorePath;
use sha2::{Digest, Sha256};

use super::watch::ChannelWatch;
use super::{InputSource, StepError, Timings};
use crate::core::log::{BuildLog, Progress};
use crate::vm::vsock::Stream;
use crate::vm::Mode;

/// One received NAR.
#[derive(Debug, Clone)]
pub struct ReceivedNar {
    /// The NAR file.
    pub file: PathBuf,
    /// Its SHA-256.
    pub sha256: [u8; 32],
    /// Its size.
    pub size: u64,
}

/// What the conversation produced.
#[derive(Debug, Default)]
pub(crate) struct Conversation {
    pub(crate) outcome: Option<Outcome>,
    pub(crate) failure: Option<Failure>,
    pub(crate) nars: BTreeMap<StorePath, ReceivedNar>,
    pub(crate) bye: bool,
    pub(crate) last_phase: Option<PhaseName>,
    pub(crate) marks: BTreeMap<&'static str, Instant>,
    pub(crate) output_bytes: u64,
}

impl Conversation {
    /// The agent accepted the job (its first phase). Before that, nothing the builder does can
    /// have happened.
    pub(crate) fn job_accepted(&self) -> bool {
        self.last_phase.is_some()
    }
}

/// The phase timings from the host's arrival marks: `hello` and `ready` from the boot,
/// `job-sent` and the guest's phases from the job's conversation.
pub(crate) fn timings(
    started: Instant,
    marks: &BTreeMap<&'static str, Instant>,
    exited: Instant,
) -> Timings {
    let d = |a: &str, b: &str| match (marks.get(a), marks.get(b)) {
        (Some(x), Some(y)) if y >= x => *y - *x,
        _ => Duration::ZERO,
    };
    Timings {
        boot: marks.get("hello").map_or(Duration::ZERO, |h| h.saturating_duration_since(started)),
        launch: d("hello", "ready"),
        job_setup: d("job-sent", "job-accepted"),
        input_transfer: d("job-accepted", "inputs-ready"),
        build: d("building", "built"),
        hashing: d("hashing", "attesting"),
        attestation: d("attesting", "sending"),
        output_transfer: d("sending", "outcome"),
        total: exited.saturating_duration_since(started),
        ..Timings::default()
    }
}

pub(crate) fn phase_key(p: PhaseName) -> &'static str {
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

/// What the agent said when it booted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Greeting {
    /// Its attester.
    pub(crate) attester: AttesterKind,
    /// Its uptime at `Hello`.
    pub(crate) hello_uptime_ms: u64,
    /// When `Hello` arrived.
    pub(crate) hello_at: Instant,
    /// When `Ready` arrived.
    pub(crate) ready_at: Instant,
}

/// At boot: read the agent's `Hello`, send `Setup` and the launch, read its `Ready`. A
/// `Failure` instead of `Ready` (a launch the agent refuses) is [`StepError::Guest`].
pub(crate) fn hello_and_launch(
    stream: &Stream,
    watch: &Arc<ChannelWatch>,
    mode: Mode,
    setup: &Setup,
    launch_bytes: &[u8],
) -> Result<Greeting, StepError> {
    let clone = || stream.try_clone().map_err(|e| StepError::Io("cloning the channel".into(), e));
    let (reader, writer) = watch
        .guard(clone()?, clone()?)
        .map_err(|e| StepError::Io("setting the channel's timeouts".into(), e))?;
    let mut r = FrameReader::with_liveness(reader, watch.liveness());
    let hello: Hello = r.expect(Kind::Hello, "the agent's Hello")?.json()?;
    let hello_at = Instant::now();
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
    let mut w = FrameWriter::new(writer);
    w.send_json(Kind::Setup, setup)?;
    w.send(Kind::Launch, launch_bytes)?;
    w.flush()?;
    let f = r.expect_frame("the agent's Ready")?;
    match f.kind {
        Kind::Ready => {
            let _: Ready = f.json()?;
        }
        Kind::Failure => {
            let failure: Failure = f.json()?;
            return Err(StepError::Guest { kind: failure.kind, message: failure.message });
        }
        got => return Err(ProtoError::Unexpected { expected: "Ready or Failure", got }.into()),
    }
    Ok(Greeting {
        attester: hello.attester,
        hello_uptime_ms: hello.uptime_ms,
        hello_at,
        ready_at: Instant::now(),
    })
}

/// Send the job and inputs (sender thread).
fn send_all<W: Write>(
    mut w: FrameWriter<W>,
    job_bytes: &[u8],
    closure: &BTreeMap<StorePath, PathInfo>,
    inputs: &dyn InputSource,
) -> Result<u64, StepError> {
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

/// Give a ready agent its job, on `stream`, until its `Bye` (or an error); returns the input
/// bytes sent.
#[allow(clippy::too_many_arguments)]
pub(crate) fn converse(
    stream: Stream,
    watch: &Arc<ChannelWatch>,
    job_bytes: &[u8],
    job: &Job,
    inputs: &dyn InputSource,
    staging: &Path,
    sink: &mut dyn BuildLog,
    conv: &mut Conversation,
) -> Result<u64, StepError> {
    let clone = || stream.try_clone().map_err(|e| StepError::Io("cloning the channel".into(), e));
    let (reader, writer) = watch
        .guard(clone()?, clone()?)
        .map_err(|e| StepError::Io("setting the channel's timeouts".into(), e))?;
    let closer = stream;
    let mut r = FrameReader::with_liveness(reader, watch.liveness());
    let max_outputs = job.outputs.len();
    conv.marks.insert("job-sent", Instant::now());
    std::thread::scope(|scope| {
        let sender =
            scope.spawn(|| send_all(FrameWriter::new(writer), job_bytes, &job.closure, inputs));
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

fn receive_all<R: Read>(
    r: &mut FrameReader<R>,
    conv: &mut Conversation,
    staging: &Path,
    max_outputs: usize,
    sink: &mut dyn BuildLog,
) -> Result<(), StepError> {
    loop {
        let f = r.expect_frame("a frame before the agent's Bye")?;
        match f.kind {
            Kind::Log => sink.output(&f.payload),
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
                let file = staging.join(format!("{}.nar", begin.path.base_name()));
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

fn receive_nar<R: Read>(
    r: &mut FrameReader<R>,
    begin: &NarBegin,
    file: &Path,
) -> Result<ReceivedNar, StepError> {
    let mut out = std::fs::File::create(file)
        .map_err(|e| StepError::Io(format!("creating {}", file.display()), e))?;
    let mut sha = Sha256::new();
    let mut stream = r.nar_stream(&begin.path.to_string(), begin.nar_size);
    let mut buf = vec![0u8; 256 << 10];
    let mut size = 0u64;
    loop {
        let n = stream.read(&mut buf).map_err(channel::proto::into_proto)?;
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
