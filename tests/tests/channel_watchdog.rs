//! The host never hangs on a guest: the real `vouch build` (real vsock daemon, real Unix
//! sockets, real Nix inputs) with `--qemu` pointing at `fake_qemu` (`tests/src/bin/fake_qemu.rs`),
//! which plays a guest that stalls, dies or stays silent at the vsock-backend seam.
//!
//! Each case checks the error the user sees, how many VMs were launched (one automatic retry for
//! infrastructure failures only, each attempt with a fresh job id and HOST_DATA), that every
//! "VM" and vsock daemon is gone afterwards, and that nothing was registered. No VM boots here:
//! the real-VM side (the agent's heartbeat keeping a silent build alive, a retry that succeeds)
//! is in `vm_build.rs` and `confine_vm.rs`.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use test_support::vm::{ca_nix, image_dir, nonce, vouch_bin, Scratch};

struct Run {
    out: Output,
    launches: Vec<serde_json::Value>,
    elapsed: Duration,
}

impl Run {
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }

    fn job_ids(&self) -> Vec<String> {
        self.launches.iter().map(|l| l["job_id"].as_str().unwrap_or("").to_owned()).collect()
    }
}

/// `vouch build <reads> --qemu fake_qemu --stall-timeout 2 EXTRA…` with the fake guest `script`.
fn run(s: &Scratch, script: &str, extra: &[&str]) -> Run {
    let drv = s.instantiate(&s.write("ca.nix", &ca_nix(&nonce())), "reads");
    let rec = s.dir.path().join(format!("launches-{}", nonce()));
    std::fs::create_dir(&rec).unwrap();
    let t = Instant::now();
    let mut child = Command::new(vouch_bin())
        .arg("--state-dir")
        .arg(s.state())
        .args(["build", &drv, "--cache"])
        .arg(s.cache())
        .args(["--qemu", env!("CARGO_BIN_EXE_fake_qemu"), "--stall-timeout", "2"])
        .args(extra)
        .env("VOUCH_IMAGE_DIR", image_dir())
        .env("VOUCH_FAKE_GUEST", script)
        .env("VOUCH_FAKE_GUEST_DIR", &rec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running vouch");
    // A hang is a failure of this test, not a hang of the test suite.
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(180) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("vouch hung:\n{}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let elapsed = t.elapsed();
    let mut launches = Vec::new();
    for n in 1.. {
        let Ok(text) = std::fs::read_to_string(rec.join(format!("launch-{n}.json"))) else {
            break;
        };
        launches.push(serde_json::from_str(&text).unwrap());
    }
    Run { out, launches, elapsed }
}

/// Whether process `pid` is alive (not gone, not a zombie).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Every fake VM is dead, its run directory is gone, no vsock daemon for it is left, and
/// nothing was registered.
fn assert_cleaned_up(s: &Scratch, r: &Run) {
    assert!(!r.launches.is_empty(), "no VM was launched: {}", r.stderr());
    for l in &r.launches {
        let pid = l["pid"].as_u64().unwrap();
        assert!(!alive(pid), "the fake QEMU {pid} is still running");
        let control = l["control"].as_str().unwrap();
        let run_dir = Path::new(control).parent().unwrap();
        assert!(!run_dir.exists(), "{} left behind", run_dir.display());
        for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&cmd).contains(control),
                "a process still uses {control}: {}",
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            );
        }
    }
    s.assert_nothing_registered();
}

fn assert_fails_with(r: &Run, needle: &str) {
    let err = r.stderr();
    assert!(!r.out.status.success(), "vouch build should fail:\n{err}");
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    assert!(r.elapsed < Duration::from_secs(90), "took {:?}:\n{err}", r.elapsed);
}

/// A guest that goes silent mid-build: the watchdog fails the attempt after the stall window
/// (not after the builder's timeout: there is none), kills the VM and its daemon, retries once
/// in a fresh VM with a fresh job, and gives up when that one stalls too.
#[test]
fn a_stalled_channel_fails_fast_is_retried_once_and_registers_nothing() {
    let s = Scratch::new();
    let r = run(&s, "stall", &[]);
    assert_fails_with(
        &r,
        "channel stalled: no frame from the guest for 2 s (phase: building); killed the VM; nothing was registered",
    );
    let err = r.stderr();
    assert_eq!(r.launches.len(), 2, "one retry:\n{err}");
    assert_eq!(err.matches("retrying step in a fresh VM after: ").count(), 1, "{err}");
    let ids = r.job_ids();
    assert!(!ids[0].is_empty() && !ids[1].is_empty(), "both got a job: {:?}", r.launches);
    assert_ne!(ids[0], ids[1], "a fresh job id for the retry");
    assert_ne!(r.launches[0]["host_data"], r.launches[1]["host_data"], "so a fresh HOST_DATA");
    assert!(err.contains(&format!("job {} abandoned", ids[0])), "{err}");
    assert!(err.contains(&format!("new job {}", ids[1])), "{err}");
    assert!(err.contains("fake builder running (guest #1)"), "the log was streamed: {err}");
    assert_cleaned_up(&s, &r);
}

/// The retry's own result is what counts; a builder failure is never retried.
#[test]
fn the_retry_reports_its_own_result_and_builder_failures_are_not_retried() {
    let s = Scratch::new();
    let r = run(&s, "stall,fail", &[]);
    assert_fails_with(&r, "build failed in the VM (BuilderFailed): builder for");
    assert_eq!(r.launches.len(), 2, "{}", r.stderr());
    assert!(r.stderr().contains("channel stalled"), "{}", r.stderr());
    assert_cleaned_up(&s, &r);

    let r = run(&s, "fail", &[]);
    assert_fails_with(&r, "build failed in the VM (BuilderFailed)");
    assert_eq!(r.launches.len(), 1, "no retry for a builder failure: {}", r.stderr());
    assert!(!r.stderr().contains("retrying"), "{}", r.stderr());
    assert_cleaned_up(&s, &r);
}

/// A VM that dies before its agent accepted the job is retried; one that dies while building
/// (the builder may have brought it down) is not.
#[test]
fn a_vm_dying_before_the_job_is_retried_but_not_after() {
    let s = Scratch::new();
    let r = run(&s, "exit,fail", &[]);
    assert_fails_with(&r, "build failed in the VM (BuilderFailed)");
    assert_eq!(r.launches.len(), 2, "{}", r.stderr());
    assert!(
        r.stderr().contains("retrying step in a fresh VM after: the VM exited with status 1 before its agent connected"),
        "{}",
        r.stderr()
    );
    assert_cleaned_up(&s, &r);

    let r = run(&s, "die-building", &[]);
    assert_fails_with(&r, "the VM exited with status 1 during the step (phase: building)");
    assert_eq!(r.launches.len(), 1, "{}", r.stderr());
    assert_cleaned_up(&s, &r);
}

/// An agent that connects but never says hello meets the boot watchdog; a guest that heartbeats
/// but stops taking input meets the write watchdog. Both are retried once.
#[test]
fn boot_and_write_watchdogs() {
    let s = Scratch::new();
    let r = run(&s, "no-hello", &["--boot-timeout", "2"]);
    assert_fails_with(&r, "the guest agent did not say hello within 2 s of QEMU's start");
    assert_eq!(r.launches.len(), 2, "{}", r.stderr());
    assert_cleaned_up(&s, &r);

    let r = run(&s, "no-read", &[]);
    assert_fails_with(&r, "channel stalled: the guest accepted no data for 2 s");
    assert_eq!(r.launches.len(), 2, "{}", r.stderr());
    assert_cleaned_up(&s, &r);
}
