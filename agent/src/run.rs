//! PID 1's main line: mount, read the command line, connect to the host, serve one launch and
//! its one job, wait for the host to close the channel, power off — whatever happens (errors are reported to the
//! host when the channel is up and always printed on the console; panics power off through the
//! hook in `crate::pid1`).
//!
//! With the `bench` feature (the bench image only) the modes of `vouch.bench=` branch off here
//! (`crate::bench`); without it the key is unknown and the agent refuses to start.

use std::time::Duration;

use crate::pid1::{power_off, say, setup_mounts, write_etc};
use crate::session::{agent_version, serve, GuestPaths};
use build_trace::error_chain;
use channel::config::parse_cmdline;
use channel::proto::ProtoError;

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

/// How long the agent waits for the host to close the channel before it powers off anyway.
const LINGER: Duration = Duration::from_secs(30);

/// Wait (at most [`LINGER`]) until the host closes the channel, discarding whatever it still
/// sends. The host closes only after it has read the agent's last frame (`Bye`); powering off
/// earlier could end the VM while those frames are still on their way (in the guest kernel, in
/// the vsock backend, or in the host's socket buffer behind a slow reader) and the host would see
/// a VM that exited in the middle of sending its outputs.
fn linger(mut stream: vsock::VsockStream) {
    use std::io::Read;
    let deadline = std::time::Instant::now() + LINGER;
    let _ = stream.set_read_timeout(Some(LINGER));
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    say("the host did not close the channel; powering off anyway");
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
    #[cfg(feature = "bench")]
    crate::bench::after_mounts(cfg.bench);
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
    let lingering = stream.try_clone();
    let result = match stream.try_clone() {
        #[cfg(feature = "bench")]
        Ok(wr) if cfg.bench == Some(channel::config::Bench::Sink) => crate::bench::sink(stream, wr),
        Ok(wr) => serve(stream, wr, &GuestPaths::default()),
        Err(e) => Err(ProtoError::Io(e)),
    };
    if let Err(e) = result {
        say(&format!("channel failed: {}", error_chain(&e)));
    }
    if let Ok(s) = lingering {
        linger(s);
    }
    say("powering off");
    power_off();
}
