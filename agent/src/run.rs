//! PID 1's main line: mount, read the command line, connect to the host, serve one launch and
//! one job, power off — whatever happens (errors are reported to the host when the channel is up
//! and always printed on the console; panics power off through the hook in `crate::pid1`).
//! Between `Bye` and the power-off the agent waits, at most [`LINGER`], for the host to close the
//! channel, so that everything it sent has left the VM: a userspace vsock backend drops the
//! packets it has not yet forwarded when QEMU exits. Whatever arrives meanwhile is discarded.
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

/// Longest wait after `Bye` for the host to close the channel.
pub const LINGER: Duration = Duration::from_secs(5);

/// After the session: wait until the host closes the channel (or [`LINGER`] passes), reading
/// and discarding — never acting on — anything it still sends.
fn linger(stream: &vsock::VsockStream) {
    use std::io::Read;
    let deadline = std::time::Instant::now() + LINGER;
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    let mut r = stream;
    while std::time::Instant::now() < deadline {
        match r.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

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
    match result {
        Err(e) => say(&format!("channel failed: {}", error_chain(&e))),
        Ok(()) => {
            if let Ok(s) = &lingering {
                linger(s);
            }
        }
    }
    say("powering off");
    power_off();
}
