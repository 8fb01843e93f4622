//! A real `vouch nix-builder --listen` server process for tests: start it on a Unix socket, wait
//! until the socket is there, give Nix its store URI and machine line, stop it with a signal.
//!
//! Uses `std` only; signals are sent with the `kill` program. What is not here: Nix or VM set-up
//! ([`crate::nix`], [`crate::vm`]).

use std::ffi::OsStr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A running `vouch --state-dir STATE -v nix-builder --listen SOCKET …`, ended on drop
/// (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct SocketServer {
    child: Child,
    /// The socket.
    pub socket: PathBuf,
    /// Where it unpacks paths for its clients (`SOCKET.store`, vouch's default).
    pub real: PathBuf,
    /// Its stderr (vouch's log at `-v`).
    pub log: PathBuf,
}

impl SocketServer {
    /// Start `vouch` (the binary at `vouch`) on `socket` with `extra` arguments and `env`, and
    /// wait (up to 60 s) until it listens (its log says so); panics with its log if it exits
    /// instead.
    pub fn start(
        vouch: &Path,
        state: &Path,
        socket: &Path,
        extra: &[&str],
        env: &[(&str, &OsStr)],
    ) -> SocketServer {
        let log = socket.with_extension("log");
        let err = std::fs::File::create(&log).expect("creating the server log");
        let mut cmd = Command::new(vouch);
        cmd.arg("--state-dir")
            .arg(state)
            .args(["-v", "nix-builder", "--listen"])
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", vouch.display()));
        let mut real = socket.as_os_str().to_owned();
        real.push(".store");
        let mut s = SocketServer { child, socket: socket.to_owned(), real: real.into(), log };
        let t0 = Instant::now();
        // Ready: it says so once bound, its directories made, accepting (a stale socket or
        // directory of an earlier server may be there before).
        while !s.log_text().contains("listening for Nix clients") {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("the server exited ({st}) instead of listening:\n{}", s.log_text());
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no socket:\n{}", s.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// The store URI a Nix client uses: `unix://SOCKET?real=SOCKET.store`.
    pub fn store_uri(&self) -> String {
        format!("unix://{}?real={}", self.socket.display(), self.real.display())
    }

    /// A `builders` line for this server with `features` (e.g. `ca-derivations`).
    pub fn machine(&self, features: &str) -> String {
        format!("{} x86_64-linux - 1 1 {features}", self.store_uri())
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send `signal` (`TERM`, `INT`, `KILL`) and wait up to 60 s for the exit; returns the exit
    /// status and the log.
    pub fn stop(mut self, signal: &str) -> (ExitStatus, String) {
        stop_child(&mut self.child, signal, "the server", &self.log)
    }
}

/// Send `signal` (`TERM`, `INT`, `KILL`) to `child` (named `what` in failures) and wait up to
/// 60 s for its exit; returns the exit status and its log (the file `log`).
pub fn stop_child(child: &mut Child, signal: &str, what: &str, log: &Path) -> (ExitStatus, String) {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{signal} failed");
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap_or_else(|e| panic!("waiting for {what}: {e}")) {
            return (st, log_text());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{what} did not stop after SIG{signal}:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// End a server that a test did not stop: SIGTERM, so it stops its VMs (the warm pool's too),
/// then SIGKILL if it has not exited within 20 s. Never panics (it runs in `Drop`).
pub(crate) fn end_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        end_child(&mut self.child);
    }
}

/// Whether `p` is a Unix socket.
pub fn is_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}
