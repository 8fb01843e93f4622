//! PID 1's main line: mount, read the command line, connect to the host, serve one step, power
//! off — whatever happens (errors are reported to the host when the channel is up and always
//! printed on the console; panics power off through the hook in `crate::pid1`).
//!
//! Also the benchmark/test modes selected by `vouch.bench=` (never in a real image's command
//! line): `poweroff` (the bare-VM baseline), `sink` (raw channel throughput, then the same
//! bytes hashed in the guest) and `panic` (the agent panics: the VM must still power off).

use std::io::Read;
use std::time::{Duration, Instant};

use crate::pid1::{power_off, say, setup_mounts, uptime, write_etc};
use crate::session::{agent_version, serve, GuestPaths};
use build_trace::error_chain;
use channel::config::{parse_cmdline, Bench};
use channel::messages::{AttesterKind, Hello, NarBegin, Phase, PhaseName};
use channel::proto::{
    FrameReader, FrameWriter, Kind, ProtoError, GUEST_MAX_WRITE, PROTOCOL_VERSION,
};

/// The host's CID.
pub const HOST_CID: u32 = 2;

fn connect(port: u32) -> std::io::Result<vsock::VsockStream> {
    let mut last = None;
    for _ in 0..100 {
        match vsock::VsockStream::connect_with_cid_port(HOST_CID, port) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no attempt")))
}

/// Everything PID 1 does. Never returns.
pub fn pid1_main() -> ! {
    say(&format!("{} starting", agent_version()));
    if let Err(e) = setup_mounts() {
        say(&format!("FATAL: {}", error_chain(&e)));
        power_off();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cfg = match parse_cmdline(&cmdline) {
        Ok(c) => c,
        Err(e) => {
            say(&format!("FATAL: kernel command line: {e}"));
            power_off();
        }
    };
    if cfg.bench == Some(Bench::Panic) {
        panic!("vouch.bench=panic: a deliberate panic to test that the VM still powers off");
    }
    if cfg.bench == Some(Bench::Poweroff) {
        say("bench: bare boot, powering off");
        power_off();
    }
    if let Err(e) = write_etc() {
        say(&format!("FATAL: {}", error_chain(&e)));
        power_off();
    }
    if let Err(e) = crate::sys::loopback_up() {
        say(&format!("warning: loopback interface not up: {e}"));
    }
    let stream = match connect(cfg.port) {
        Ok(s) => s,
        Err(e) => {
            say(&format!("FATAL: cannot connect to the host on vsock port {}: {e}", cfg.port));
            power_off();
        }
    };
    say(&format!("connected to the host on vsock port {}", cfg.port));
    let result = match stream.try_clone() {
        Ok(wr) => match cfg.bench {
            Some(Bench::Sink) => bench_sink(stream, wr),
            _ => serve(stream, wr, &GuestPaths::default()),
        },
        Err(e) => Err(ProtoError::Io(e)),
    };
    if let Err(e) = result {
        say(&format!("channel failed: {}", error_chain(&e)));
    }
    say("powering off");
    power_off();
}

/// Benchmark: receive NAR streams and (for the second and later ones) hash them; report the
/// guest-side time of each as a `Phase` (uptime at the end), until `InputsDone`.
fn bench_sink<R: Read, W: std::io::Write>(rd: R, wr: W) -> Result<(), ProtoError> {
    let mut r = FrameReader::new(rd);
    let mut w = FrameWriter::with_max_write(wr, GUEST_MAX_WRITE);
    w.send_json(
        Kind::Hello,
        &Hello {
            protocol: PROTOCOL_VERSION,
            agent_version: agent_version(),
            attester: AttesterKind::Simulated,
            uptime_ms: (uptime() * 1000.0) as u64,
        },
    )?;
    let mut n = 0;
    loop {
        let f = r.expect_frame("NarBegin or InputsDone")?;
        if f.kind == Kind::InputsDone {
            break;
        }
        let begin: NarBegin = f.json()?;
        let t = Instant::now();
        let mut stream = r.nar_stream(&begin.path, begin.nar_size);
        let mut buf = vec![0u8; 256 << 10];
        let mut hasher = nix_formats::nar::NarHasher::new();
        loop {
            let k = stream.read(&mut buf).map_err(channel::proto::into_proto)?;
            if k == 0 {
                break;
            }
            if n > 0 {
                hasher.update(&buf[..k]);
            }
        }
        let _ = hasher.finish();
        say(&format!("bench: stream {n} of {} bytes in {:?}", begin.nar_size, t.elapsed()));
        w.send_json(
            Kind::Phase,
            &Phase { phase: PhaseName::InputsReady, uptime_ms: (uptime() * 1000.0) as u64 },
        )?;
        n += 1;
    }
    w.send(Kind::Bye, &[])?;
    Ok(())
}
