//! The session's launch and one-job rules over a socket pair, without a VM (the agent as a
//! library; nothing is built: every case ends before the builder would run).

use std::os::unix::net::UnixStream;

use base64::Engine as _;
use build_trace::evidence::SimulatedRoot;
use build_trace::job::{BasicDerivation, CaRule, DrvOutput, Job, Limits};
use build_trace::launch::Launch;
use channel::messages::{Failure, FailureKind, Setup, SimulatedSetup};
use channel::proto::{Frame, FrameReader, FrameWriter, Kind};
use nix_formats::StorePath;

use super::{serve, GuestPaths, VmShape};

const SHAPE: VmShape = VmShape { cpus: 1, mem_total_kib: 1_000_000 };

fn job(id: &str) -> Job {
    let out = StorePath::parse("/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-x").unwrap();
    let drv = BasicDerivation {
        name: "x".into(),
        outputs: [(
            "out".to_string(),
            DrvOutput { path: Some(out), hash_algo: String::new(), hash: String::new() },
        )]
        .into(),
        input_srcs: Default::default(),
        system: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec![],
        env: Default::default(),
    };
    let drv_path = StorePath::parse("/nix/store/1d3qy068lml7n8ykzm7rjj86a15146cq-x.drv").unwrap();
    Job::new(
        id,
        drv_path,
        drv,
        Default::default(),
        Limits::default(),
        CaRule::SelfRefPositions,
        false,
        ["out".to_string()].into(),
    )
}

/// A host end: the agent serving on the other end of a socket pair, in a thread.
struct Host {
    r: FrameReader<UnixStream>,
    w: FrameWriter<UnixStream>,
    agent: std::thread::JoinHandle<Result<(), channel::proto::ProtoError>>,
    _dir: tempfile::TempDir,
}

impl Host {
    fn start() -> Host {
        let (host, guest) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = GuestPaths {
            store: dir.path().join("store"),
            build: dir.path().join("build"),
            shape: SHAPE,
            rehearsal: dir.path().join("rehearsal"),
            sandbox_ahead: false,
        };
        let g2 = guest.try_clone().unwrap();
        let agent = std::thread::spawn(move || serve(guest, g2, &paths));
        let mut r = FrameReader::new(host.try_clone().unwrap());
        r.expect(Kind::Hello, "hello").unwrap();
        let root = SimulatedRoot::generate().unwrap();
        let p = root.platform();
        let setup = Setup {
            simulated: Some(SimulatedSetup {
                vcek_key_pkcs8: base64::engine::general_purpose::STANDARD
                    .encode(root.vcek_key_pkcs8().unwrap()),
                chip_id: hex::encode(p.chip_id),
                tcb: [p.tcb.bootloader, p.tcb.tee, p.tcb.snp, p.tcb.microcode],
                measurement: hex::encode([0x42; 48]),
            }),
        };
        let mut w = FrameWriter::new(host);
        w.send_json(Kind::Setup, &setup).unwrap();
        Host { r, w, agent, _dir: dir }
    }

    fn launch(&mut self, launch: &Launch) {
        self.w.send(Kind::Launch, &launch.canonical_bytes().unwrap()).unwrap();
    }

    fn send_job(&mut self, job: &Job) {
        self.w.send(Kind::Job, &job.canonical_bytes().unwrap()).unwrap();
    }

    /// The frames up to and including `Bye`, then the agent's end: EOF, and `serve` returned.
    fn rest(mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        loop {
            let f = self.r.expect_frame("a frame up to Bye").unwrap();
            let bye = f.kind == Kind::Bye;
            frames.push(f);
            if bye {
                break;
            }
        }
        self.agent.join().unwrap().unwrap();
        drop(self.w);
        frames
    }
}

fn failure(frames: &[Frame]) -> Failure {
    let f = frames.iter().find(|f| f.kind == Kind::Failure).expect("a Failure frame");
    f.json().unwrap()
}

/// One launch, one job: a second `Job` frame is a protocol failure, the session ends with
/// `Bye` and reads nothing more (PID 1 then powers off).
#[test]
fn a_second_job_on_the_same_connection_is_refused() {
    let mut h = Host::start();
    h.launch(&Launch::new([1; 32], 1, 1024, false));
    h.r.expect(Kind::Ready, "ready").unwrap();
    h.send_job(&job("first"));
    h.send_job(&job("second"));
    let frames = h.rest();
    let kinds: Vec<Kind> = frames.iter().map(|f| f.kind).collect();
    assert_eq!(kinds, [Kind::Phase, Kind::Failure, Kind::Bye], "{frames:?}");
    let f = failure(&frames);
    assert_eq!(f.kind, FailureKind::Protocol, "{f:?}");
    assert!(f.message.contains("got Job"), "{}", f.message);
}

/// A launch that does not describe the VM is refused before `Ready`; a job the launch does not
/// admit is refused after it.
#[test]
fn a_launch_that_is_not_this_vm_or_does_not_admit_the_job_is_refused() {
    for (launch, why) in [
        (Launch::new([2; 32], 2, 1024, false), "vcpus"),
        (Launch::new([2; 32], 1, 4096, false), "memory_mib"),
    ] {
        let mut h = Host::start();
        h.launch(&launch);
        let frames = h.rest();
        assert_eq!(frames.iter().map(|f| f.kind).collect::<Vec<_>>(), [Kind::Failure, Kind::Bye]);
        let f = failure(&frames);
        assert_eq!(f.kind, FailureKind::Launch, "{f:?}");
        assert!(f.message.contains(why), "{}", f.message);
    }
    let mut h = Host::start();
    let for_other = Launch::new([3; 32], 1, 1024, false).for_job(&job("other")).unwrap();
    h.launch(&for_other);
    h.r.expect(Kind::Ready, "ready").unwrap();
    h.send_job(&job("this"));
    let f = failure(&h.rest());
    assert_eq!(f.kind, FailureKind::Launch, "{f:?}");
    assert!(f.message.contains("launched for job"), "{}", f.message);
}
