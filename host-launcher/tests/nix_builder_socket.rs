//! `vouch nix-builder --listen` without VMs: the real binary on a Unix socket behind the real
//! Nix 2.8 (`nix store ping`, whose `SetOptions` sets the session's limits; `nix copy` both ways,
//! reading back through the unpacked tree a `unix://` client reads from), one session per
//! connection with its own pins in the content store, and the socket's life: a live socket is
//! refused, a stale one replaced, a foreign file left alone, SIGINT and SIGTERM remove it.
//! The real-VM build over `unix://` is in `tests/tests/nix_builder_vm.rs`.

#[path = "nix_builder/peer.rs"]
mod peer;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use host_launcher::nixproto::types;
use host_launcher::nixproto::wire::{WireRead, WireWrite};
use nix_formats::StorePath;
use peer::*;
use test_support::server::{is_socket, SocketServer};

const LIMIT: Duration = Duration::from_secs(120);

fn start(dir: &Path, name: &str) -> SocketServer {
    SocketServer::start(
        Path::new(vouch()),
        &dir.join(format!("state-{name}")),
        &dir.join(format!("{name}.sock")),
        &[&key_arg()],
        &[],
    )
}

/// `vouch nix-builder --listen SOCKET`, expected to refuse to start (exit status 2).
fn refused(state: &Path, socket: &Path) -> std::process::Output {
    let out = std::process::Command::new(vouch())
        .arg("--state-dir")
        .arg(state)
        .args(["nix-builder", "--listen"])
        .arg(socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    out
}

/// Wait up to 20 s for `cond`.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Distinct pin owners holding `path` in the content store of `state`.
fn pin_owners(state: &Path, path: &str) -> i64 {
    let db = rusqlite::Connection::open(state.join("store/index.sqlite")).unwrap();
    db.query_row("SELECT count(DISTINCT owner) FROM pins WHERE path = ?1", [path], |r| r.get(0))
        .unwrap()
}

#[test]
fn nix_uses_the_socket_and_each_connection_is_a_session() {
    require_nix();
    let d = tempfile::tempdir().unwrap();
    let server = start(d.path(), "b");
    let uri = server.store_uri();

    // A real Nix 2.8 client sends SetOptions first, with its settings: the session takes the
    // limits from it (max-silent-time is a fixed field, timeout an override).
    let out = nix(&[
        "nix",
        "store",
        "ping",
        "--store",
        &uri,
        "--option",
        "max-silent-time",
        "77",
        "--option",
        "timeout",
        "88",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("Version: vouch"), "{}", text(&out));
    eventually("the session's limits in the log", || {
        server.log_text().contains("timeout_s=88 max_silent_s=77 max_log_bytes=67108864")
    });

    // Uploads over the socket; reading back goes through the unpacked tree (a `unix://` client
    // reads NARs from its file system, `real=`), which Nix re-hashes on import.
    // (Signed by a key the server trusts: certified, so they go to the shared store.)
    let (top, all) = local_closure(d.path(), "a");
    sign_locally(d.path(), &all);
    copy_round_trip(&uri, &top, &all, &d.path().join("back"));
    eventually("the unpacked trees removed when their sessions ended", || {
        std::fs::read_dir(&server.real).unwrap().count() == 0
    });

    // Two connections at once: two sessions, each with its own pins; a session's pins go when
    // its connection does.
    let state = d.path().join("state-b");
    let sp = StorePath::parse(&top).unwrap();
    let mut peers: Vec<Peer> = (0..2).map(|_| Peer::connect(&server.socket, LIMIT)).collect();
    for p in &mut peers {
        p.worker_handshake(0x122, &[]);
        p.w().write_u64(31).unwrap(); // QueryValidPaths pins what is valid
        types::write_store_path_set(p.w(), &BTreeSet::from([sp.clone()])).unwrap();
        p.w().write_u64(0).unwrap();
        p.w().flush().unwrap();
        p.expect_last();
        assert_eq!(p.from.read_string_set("valid").unwrap().len(), 1);
    }
    assert_eq!(pin_owners(&state, &top), 2);
    peers[0].hang_up();
    assert!(peers[0].at_eof(), "the server closes a session its client left");
    eventually("the first session's pins released", || pin_owners(&state, &top) == 1);

    // SIGTERM: the open session is closed, the socket removed, exit status 0.
    let socket = server.socket.clone();
    let (st, log) = server.stop("TERM");
    assert!(st.success(), "{st}: {log}");
    assert!(!socket.exists(), "{log}");
    assert!(peers[1].at_eof());
    assert_eq!(pin_owners(&state, &top), 0);
    assert!(log.contains("shutting down") && log.contains("signal=SIGTERM"), "{log}");
}

#[test]
fn the_socket_is_refused_when_live_replaced_when_stale_and_removed_on_sigint() {
    let d = tempfile::tempdir().unwrap();
    let server = start(d.path(), "s");
    let socket = server.socket.clone();

    // A second server on a live socket refuses to start and leaves it alone.
    let out = refused(&d.path().join("state-other"), &socket);
    assert!(text(&out).contains("is a live socket"), "{}", text(&out));
    assert!(is_socket(&socket));

    // A killed server leaves a stale socket: the next one replaces it.
    let (st, _) = server.stop("KILL");
    assert!(!st.success());
    assert!(is_socket(&socket), "SIGKILL leaves the socket behind");
    let server = start(d.path(), "s");
    assert!(server.log_text().contains("replacing a stale socket"), "{}", server.log_text());
    let out = nix(&["nix", "store", "ping", "--store", &server.store_uri()]);
    assert!(out.status.success(), "{}", text(&out));

    // SIGINT: exit status 0, socket removed.
    let (st, log) = server.stop("INT");
    assert!(st.success(), "{st}: {log}");
    assert!(!socket.exists() && log.contains("signal=SIGINT"), "{log}");

    // Anything else at the path is not ours to replace.
    std::fs::write(&socket, "a file").unwrap();
    let out = refused(&d.path().join("state-s"), &socket);
    assert!(text(&out).contains("is not a socket"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "a file");
}
