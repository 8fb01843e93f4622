//! The warm VM pool with real VMs (`host_launcher::pool`): a step goes to a ready VM, each VM
//! runs one job and is gone, a job that does not fit boots on demand with a launch bound to it,
//! a crashed pool VM is replaced and an idle one recycled, shutting down kills them all; and
//! the agent of a pool VM takes exactly one job on its connection and powers off.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use build_trace::job::{CaRule, Job, Limits};
use channel::messages::{Failure, FailureKind, NarBegin, Outcome};
use channel::proto::{FrameReader, FrameWriter, Kind};
use host_launcher::build::nix_store::{load_basic_derivation, LocalNixStore};
use host_launcher::build::{run_step, InputSource, LauncherConfig, StepOutcome, StepRequest};
use host_launcher::core::log::NullLog;
use host_launcher::pool::{Pool, PoolConfig};
use test_support::vm::{ca_nix, image_dir, nonce, Scratch};

fn launcher(s: &Scratch) -> LauncherConfig {
    let mut cfg = LauncherConfig::new(image_dir(), s.state());
    cfg.memory_mib = 512;
    cfg
}

fn pool(cfg: &LauncherConfig, idle: Duration) -> Arc<Pool> {
    Pool::start(cfg, PoolConfig { size: 1, idle, boot_parallel: 1 }).expect("the pool starts")
}

/// Wait until `cond` holds for the pool (every VM boot under TCG takes seconds).
fn wait_for(pool: &Pool, what: &str, cond: impl Fn(&Pool) -> bool) {
    let t = Instant::now();
    while !cond(pool) {
        assert!(t.elapsed() < Duration::from_secs(180), "{what}: {:?}", pool.stats());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` is alive (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// The step request of `attr` in a fresh copy of the CA test file.
fn request(s: &Scratch, attr: &str, limits: Limits) -> StepRequest {
    let drv = s.instantiate(&s.write(&format!("ca-{}.nix", nonce()), &ca_nix(&nonce())), attr);
    let (drv_path, drv) = load_basic_derivation(&drv).unwrap();
    StepRequest {
        drv_path,
        drv,
        outputs: BTreeSet::new(),
        limits,
        ca_rule: CaRule::SelfRefPositions,
        network: false,
        job_id: None,
    }
}

fn step(s: &Scratch, cfg: &LauncherConfig, limits: Limits) -> StepOutcome {
    let req = request(s, "reads", limits);
    run_step(req, &LocalNixStore, &mut NullLog, cfg)
        .unwrap_or_else(|e| panic!("{}", build_trace::error_chain(&e)))
}

/// Steps go to ready VMs, each VM runs its one job and is gone, and the pool boots a new one;
/// a job whose memory does not fit the pool's VMs boots on demand, bound to its job.
#[test]
fn warm_steps_get_a_vm_each_and_a_job_that_does_not_fit_boots_on_demand() {
    let s = Scratch::new();
    let mut cfg = launcher(&s);
    let p = pool(&cfg, Duration::from_secs(600));
    cfg.pool = Some(p.clone());
    let mut nonces = BTreeSet::new();
    for i in 0..2 {
        wait_for(&p, "a ready VM", |p| p.stats().ready == 1);
        let pid = p.ready_pids()[0];
        let out = step(&s, &cfg, Limits::default());
        assert!(out.timings.warm, "step {i} went to the pool: {:?}", out.timings);
        let launch = out.statement.launch.clone().expect("a version-2 statement");
        assert_eq!(launch.job, None, "a pool VM's launch names no job");
        assert_eq!((launch.vcpus, launch.memory_mib, launch.network), (1, 512, false));
        assert!(nonces.insert(launch.nonce), "a fresh nonce for every VM");
        assert!(!alive(pid), "the VM of step {i} (QEMU {pid}) is gone after its one job");
        assert!(!p.ready_pids().contains(&pid), "and never back in the pool");
    }
    // 1 GiB for the builder needs more than the pool's 512 MiB VMs: booted on demand.
    let big = Limits { memory_bytes: 1 << 30, ..Limits::default() };
    let out = step(&s, &cfg, big);
    assert!(!out.timings.warm, "{:?}", out.timings);
    let launch = out.statement.launch.clone().unwrap();
    assert_eq!(launch.job, Some(build_trace::Hex32(out.statement.job.digest().unwrap())));
    assert_eq!(launch.memory_mib, 1024 + 256);
    assert!(!nonces.contains(&launch.nonce));
    let stats = p.stats();
    assert_eq!((stats.taken, stats.failed), (2, 0), "{stats:?}");
    p.shutdown();
}

/// A pool VM whose QEMU dies is replaced; one idle past the timeout is recycled; shutting the
/// pool down (here: the launcher's Cancel, as SIGTERM does) kills every pool VM.
#[test]
fn crashed_vms_are_replaced_idle_ones_recycled_and_a_cancel_kills_them_all() {
    let s = Scratch::new();
    let cfg = launcher(&s);
    let p = pool(&cfg, Duration::from_secs(8));
    wait_for(&p, "a ready VM", |p| p.stats().ready == 1);
    let first = p.ready_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), nix::sys::signal::SIGKILL)
        .unwrap();
    wait_for(&p, "the crashed VM replaced", |p| {
        p.stats().crashed == 1 && p.ready_pids().iter().any(|&x| x != first)
    });
    let second = p.ready_pids()[0];
    wait_for(&p, "the idle VM recycled", |p| {
        p.stats().recycled >= 1 && p.ready_pids().iter().any(|&x| x != second)
    });
    assert!(!alive(second), "the recycled VM (QEMU {second}) is gone");
    let third = p.ready_pids()[0];
    cfg.cancel.cancel();
    let t = Instant::now();
    while alive(third) {
        assert!(t.elapsed() < Duration::from_secs(10), "the cancel did not stop QEMU {third}");
        std::thread::sleep(Duration::from_millis(50));
    }
    p.shutdown();
    let stats = p.stats();
    assert_eq!((stats.ready, stats.booting), (0, 0), "{stats:?}");
    assert!(p.take(512).is_none(), "a stopped pool hands out nothing");
}

/// Frames from the agent up to `Bye`, then the end of the connection.
fn frames_until_bye(r: &mut FrameReader<host_launcher::vm::vsock::Stream>) -> Vec<(Kind, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let f = r.expect_frame("a frame up to Bye").unwrap();
        if f.kind == Kind::NarBegin {
            let begin: NarBegin = f.json().unwrap();
            let mut nar = r.nar_stream(&begin.path.to_string(), begin.nar_size);
            std::io::copy(&mut nar, &mut std::io::sink()).unwrap();
        }
        let bye = f.kind == Kind::Bye;
        out.push((f.kind, f.payload));
        if bye {
            return out;
        }
    }
}

fn job_for(s: &Scratch, id: &str) -> Job {
    let req = request(s, "reads", Limits::default());
    let closure = LocalNixStore.closure(&req.drv.input_srcs).unwrap();
    let outputs = req.drv.outputs.keys().cloned().collect();
    Job::new(id, req.drv_path, req.drv, closure, req.limits, req.ca_rule, false, outputs)
}

fn send_inputs(w: &mut FrameWriter<host_launcher::vm::vsock::Stream>, job: &Job) {
    for (path, info) in &job.closure {
        let mut nar = LocalNixStore.nar(path).unwrap();
        w.send_nar(&NarBegin { path: path.clone(), nar_size: info.nar_size }, &mut nar).unwrap();
    }
    w.send(Kind::InputsDone, &[]).unwrap();
}

/// The measured agent's rule, on a pool VM's own connection: after one job (done, or refused)
/// it says `Bye` and powers off; a second job is never run.
#[test]
fn a_pool_vms_agent_runs_one_job_and_powers_off() {
    let s = Scratch::new();
    let cfg = launcher(&s);
    let p = pool(&cfg, Duration::from_secs(600));
    let wait_vm = |p: &Pool| {
        wait_for(p, "a ready VM", |p| p.stats().ready == 1);
        p.take(512).expect("a ready VM")
    };
    let gone = |vm: &host_launcher::build::launch::BootedVm| {
        let st = vm.vm.wait_timeout(Duration::from_secs(30));
        assert!(st.is_some_and(|s| s.success()), "QEMU did not power off by itself: {st:?}");
    };
    for second_job_at in ["after the inputs", "instead of the inputs"] {
        let vm = wait_vm(&p);
        let ch = vm.channel().unwrap();
        ch.set_timeouts(Some(Duration::from_secs(120))).unwrap();
        let mut w = FrameWriter::new(ch.try_clone().unwrap());
        let mut r = FrameReader::new(ch);
        let (a, b) = (job_for(&s, "first"), job_for(&s, "second"));
        w.send(Kind::Job, &a.canonical_bytes().unwrap()).unwrap();
        if second_job_at == "after the inputs" {
            send_inputs(&mut w, &a);
        }
        w.send(Kind::Job, &b.canonical_bytes().unwrap()).unwrap();
        let frames = frames_until_bye(&mut r);
        // As the launcher does after `Bye`: close the channel (the agent waits for that).
        w.get_mut().shutdown();
        let kinds: Vec<Kind> = frames.iter().map(|f| f.0).collect();
        let end = |k| frames.iter().find(|f| f.0 == k).map(|f| f.1.clone());
        if second_job_at == "after the inputs" {
            // The first job ran; the second frame was never read.
            let outcome: Outcome = serde_json::from_slice(&end(Kind::Outcome).unwrap()).unwrap();
            let st =
                build_trace::Statement::from_canonical_bytes(outcome.statement.as_bytes()).unwrap();
            assert_eq!((st.job.job_id.as_str(), st.launch.as_ref()), ("first", Some(&vm.launch)));
            assert!(!kinds.contains(&Kind::Failure), "{kinds:?}");
        } else {
            let f: Failure = serde_json::from_slice(&end(Kind::Failure).unwrap()).unwrap();
            assert_eq!(f.kind, FailureKind::Protocol, "{f:?}");
            assert!(f.message.contains("got Job"), "{}", f.message);
            assert!(!kinds.contains(&Kind::Outcome), "{kinds:?}");
        }
        gone(&vm);
        assert!(vm.vm.console_tail().contains("powering off"), "{}", vm.vm.console_tail());
    }
    p.shutdown();
}
