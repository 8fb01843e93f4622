//! The agent's benchmark/test modes, selected by `vouch.bench=` on the kernel command line
//! (`channel::config::Bench`). Compiled only with the `bench` feature, i.e. into the bench
//! image's agent (`scripts/build-image.sh --bench`), never into the real image's.
//!
//! - `poweroff`: power off right after mounting (the bare-VM baseline of `vouch bench vm`);
//! - `panic`: panic right after mounting (the VM must still power off);
//! - `sink`: receive NAR streams, hash all but the first, report each as a `Phase`: raw channel
//!   throughput and in-guest hashing speed.
//!
//! What is not here: the host side of the benchmark (`host_launcher::bench`).

use std::io::Read;
use std::time::Instant;

use channel::config::Bench;
use channel::messages::{AttesterKind, Hello, NarBegin, Phase, PhaseName};
use channel::proto::{
    FrameReader, FrameWriter, Kind, ProtoError, GUEST_MAX_WRITE, PROTOCOL_VERSION,
};

use crate::pid1::{power_off, say, uptime};
use crate::session::agent_version;

/// The modes that end the boot right after mounting; any other mode returns.
pub fn after_mounts(bench: Option<Bench>) {
    if bench == Some(Bench::Panic) {
        panic!("vouch.bench=panic: a deliberate panic to test that the VM still powers off");
    }
    if bench == Some(Bench::Poweroff) {
        say("bench: bare boot, powering off");
        power_off();
    }
}

/// Benchmark: receive NAR streams and (for the second and later ones) hash them; report the
/// guest-side time of each as a `Phase` (uptime at the end), until `InputsDone`.
pub fn sink<R: Read, W: std::io::Write>(rd: R, wr: W) -> Result<(), ProtoError> {
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
        let mut stream = r.nar_stream(&begin.path.to_string(), begin.nar_size);
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
