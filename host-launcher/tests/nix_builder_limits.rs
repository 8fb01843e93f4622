//! Issue 12, item 9: one worker-protocol message is bounded in all, not only string by string.
//! A client on the real `vouch nix-builder --listen` socket sends a `BuildDerivation` whose
//! environment is a million tiny variables (24 MB on the wire; each string far under its own
//! limit). Before the cap the server decoded all of it, about 150 MB of memory, and went on to
//! build; now it stops once the message's budget (`wire::MAX_MESSAGE`) is spent, answers a
//! protocol error naming the limit, and its peak memory grows by less than that budget.

#[path = "nix_builder/peer.rs"]
mod peer;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use host_launcher::nixproto::wire::{WireWrite, MAX_MESSAGE};
use peer::*;
use test_support::server::SocketServer;

/// Peak resident memory of process `pid` (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb << 10
}

#[test]
fn an_oversized_message_is_refused_naming_the_limit_with_memory_bounded() {
    let t = tempfile::tempdir().unwrap();
    let server = SocketServer::start(
        Path::new(vouch()),
        &t.path().join("state"),
        &t.path().join("builder.sock"),
        &[],
        &[],
    );
    let mut p = Peer::connect(&server.socket, Duration::from_secs(120));
    p.worker_handshake(0x126, &[]);
    let before = peak_rss(server.pid());

    // BuildDerivation: the path, one output, no inputs, then the environment's count; the
    // entries are streamed by a writer thread (the server stops reading part way).
    const ENTRIES: u64 = 1_000_000;
    let mut head = Vec::new();
    head.write_u64(36).unwrap();
    head.write_str(&fake_path("big-env.drv", 3).to_string()).unwrap();
    head.write_u64(1).unwrap();
    for s in ["out", &fake_path("big-env", 4).to_string(), "", ""] {
        head.write_str(s).unwrap();
    }
    head.write_u64(0).unwrap(); // inputSrcs
    for s in ["x86_64-linux", "/bin/sh"] {
        head.write_str(s).unwrap();
    }
    head.write_u64(0).unwrap(); // args
    head.write_u64(ENTRIES).unwrap();
    let mut to = p.to.take().unwrap();
    let writer = std::thread::spawn(move || {
        to.write_all(&head)?;
        let mut chunk = Vec::with_capacity(1 << 20);
        for i in 0..ENTRIES {
            chunk.write_str(&format!("k{i:07}")).unwrap();
            chunk.write_str("").unwrap();
            if chunk.len() >= 1 << 20 {
                to.write_all(&chunk)?;
                chunk.clear();
            }
        }
        to.write_all(&chunk)?;
        to.write_u64(0).map_err(std::io::Error::other)?; // build mode
        to.flush()
    });

    let err = p.stderr_loop().expect_err("a protocol error, not a build");
    let grew = peak_rss(server.pid()).saturating_sub(before);
    assert!(err.contains("bad BuildDerivation request"), "{err}");
    assert!(err.contains(&format!("past {MAX_MESSAGE} bytes, the limit on one message")), "{err}");
    assert!(err.contains("env"), "names what was being read: {err}");
    assert!(p.at_eof(), "the connection is closed after the error");
    // The writer is cut off when the server closes (or finishes first): either is fine.
    let _ = writer.join();
    assert!(
        grew < MAX_MESSAGE,
        "the server's peak memory grew by {grew} bytes for one refused message"
    );
    eprintln!("peak memory grew by {} MiB (budget {} MiB)", grew >> 20, MAX_MESSAGE >> 20);
    // The server lives on and serves the next client.
    let mut q = Peer::connect(&server.socket, Duration::from_secs(60));
    q.worker_handshake(0x126, &[]);
}
