//! `fake_qemu`: stands in for `qemu-system-x86_64` in the channel-watchdog tests
//! (`tests/tests/channel_watchdog.rs`, run through `vouch build --qemu`), so that a guest that
//! stalls, dies or never speaks can be simulated without a VM.
//!
//! It plays the guest at the vsock-backend seam: from QEMU's argv it takes the vhost-user socket
//! path (`-chardev socket,id=vsock,path=DIR/vhost-user.sock`) and the port (`vouch.port=` in
//! `-append`) and connects to `DIR/vsock_<port>` — the real Unix socket on which the host
//! listens, where `vhost-device-vsock` would deliver the agent's connection. Then it speaks the
//! real framing (`channel::proto`) as the script says.
//!
//! `$VOUCH_FAKE_GUEST` is a comma-separated script, one behaviour per launch (the last repeats):
//! - `exit`: exit with status 1 before connecting (a VM that dies at boot);
//! - `no-hello`: connect, then say nothing;
//! - `stall`: hello, take setup and the launch, say ready, take the job and inputs, report
//!   `job-accepted`/`inputs-ready`/`building` and a log line, heartbeat twice, then go silent
//!   with the connection open;
//! - `no-read`: hello, take setup and the launch, say ready, then heartbeat every 200 ms and
//!   never read again (the host's writes of the job and inputs stall);
//! - `fail`: like `stall` up to the log line, then a `builder-failed` failure and `Bye`;
//! - `die-building`: like `stall` up to the log line, then exit with status 1.
//!
//! Each launch writes `$VOUCH_FAKE_GUEST_DIR/launch-<n>.json`: its pid, the vhost-user socket
//! path, and, once received, the launch's HOST_DATA and nonce and the job id. Test-only: never
//! part of an image.
#![forbid(unsafe_code)]

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use channel::messages::{
    AttesterKind, Failure, FailureKind, Heartbeat, Hello, Phase, PhaseName, Ready,
};
use channel::proto::{FrameReader, FrameWriter, Kind, PROTOCOL_VERSION};

fn arg_after(argv: &[String], flag: &str, prefix: &str) -> Option<String> {
    argv.windows(2)
        .filter(|w| w[0] == flag)
        .find_map(|w| w[1].strip_prefix(prefix).map(str::to_owned))
}

fn record(dir: &Path, n: usize, value: &serde_json::Value) {
    let p = dir.join(format!("launch-{n}.json"));
    let tmp = dir.join(format!(".launch-{n}.tmp"));
    std::fs::write(&tmp, value.to_string()).expect("writing the launch record");
    std::fs::rename(tmp, p).expect("publishing the launch record");
}

fn forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// This launch's number: one more than the launches recorded in `dir`.
fn launch_number(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("launch-"))
                .count()
        })
        .unwrap_or(0)
        + 1
}

/// Read the input NARs up to `InputsDone`, discarding them.
fn take_inputs(r: &mut FrameReader<UnixStream>) {
    loop {
        let f = r.expect_frame("inputs").unwrap();
        match f.kind {
            Kind::InputsDone => break,
            Kind::NarBegin => {
                let begin: channel::messages::NarBegin = f.json().unwrap();
                let mut s = r.nar_stream(&begin.path.to_string(), begin.nar_size);
                std::io::copy(&mut s, &mut std::io::sink()).unwrap();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let script = std::env::var("VOUCH_FAKE_GUEST").unwrap_or_else(|_| "stall".into());
    let dir =
        PathBuf::from(std::env::var_os("VOUCH_FAKE_GUEST_DIR").expect("VOUCH_FAKE_GUEST_DIR"));
    let n = launch_number(&dir);
    let steps: Vec<&str> = script.split(',').collect();
    let behaviour = steps[(n - 1).min(steps.len() - 1)].to_owned();
    let control =
        arg_after(&argv, "-chardev", "socket,id=vsock,path=").expect("a vhost-user vsock chardev");
    let cmdline = arg_after(&argv, "-append", "").expect("-append");
    let port = channel::config::parse_cmdline(&cmdline).expect("the image's command line").port;
    let mut rec = serde_json::json!({
        "pid": std::process::id(), "control": control, "behaviour": behaviour,
    });
    record(&dir, n, &rec);
    println!("[    0.000] vouch-agent: fake guest #{n}: {behaviour}");
    if behaviour == "exit" {
        std::process::exit(1);
    }
    let listen = Path::new(&control).parent().expect("run dir").join(format!("vsock_{port}"));
    let stream = UnixStream::connect(&listen).expect("connecting to the host channel");
    if behaviour == "no-hello" {
        forever();
    }
    let mut w = FrameWriter::new(stream.try_clone().unwrap());
    let mut r = FrameReader::new(stream);
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        agent_version: agent::session::agent_version(),
        attester: AttesterKind::Simulated,
        uptime_ms: 1,
    };
    w.send_json(Kind::Hello, &hello).unwrap();
    let beat = |w: &mut FrameWriter<UnixStream>, seq| {
        w.send_json(Kind::Heartbeat, &Heartbeat { seq, uptime_ms: seq }).is_ok()
    };
    r.expect(Kind::Setup, "setup").unwrap();
    let launch = r.expect(Kind::Launch, "launch").unwrap().payload;
    let parsed = build_trace::Launch::from_canonical_bytes(&launch).expect("a canonical launch");
    rec["host_data"] = hex(&build_trace::launch::host_data_of(&launch)).into();
    rec["nonce"] = parsed.nonce.to_string().into();
    record(&dir, n, &rec);
    w.send_json(Kind::Ready, &Ready { uptime_ms: 1 }).unwrap();
    if behaviour == "no-read" {
        for seq in 1.. {
            std::thread::sleep(Duration::from_millis(200));
            if !beat(&mut w, seq) {
                std::process::exit(0);
            }
        }
    }
    let job = r.expect(Kind::Job, "job").unwrap().payload;
    let job = build_trace::job::Job::from_canonical_bytes(&job).expect("a canonical job");
    rec["job_id"] = job.job_id.clone().into();
    record(&dir, n, &rec);
    take_inputs(&mut r);
    for phase in [PhaseName::JobAccepted, PhaseName::InputsReady, PhaseName::Building] {
        w.send_json(Kind::Phase, &Phase { phase, uptime_ms: 2 }).unwrap();
    }
    w.send(Kind::Log, format!("fake builder running (guest #{n})\n").as_bytes()).unwrap();
    match behaviour.as_str() {
        "fail" => {
            let f = Failure {
                kind: FailureKind::BuilderFailed,
                message: format!("builder for '{}' failed with exit code 3", job.drv_path),
            };
            w.send_json(Kind::Failure, &f).unwrap();
            w.send(Kind::Bye, &[]).unwrap();
            std::io::stdout().flush().unwrap();
            // A real guest powers off after Bye.
            std::process::exit(0);
        }
        "die-building" => std::process::exit(1),
        _ => {
            for seq in 1..=2 {
                std::thread::sleep(Duration::from_millis(100));
                beat(&mut w, seq);
            }
            forever()
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
