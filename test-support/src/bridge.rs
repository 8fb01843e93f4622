//! What sshd does for a Nix remote builder, on a Unix socket: for each connection, read the
//! command line the client's `remote-program` sent (one line: `--stdio`, `--serve --write`, …),
//! and run the builder program with those words as arguments and its stdin and stdout on the
//! connection, as a forced command would. Its stderr goes to a log file (over real ssh it would
//! reach the client: for `ssh://`, Nix's build log).
//!
//! This lets a Nix that cannot run vouch itself (the Nix 2.26 in [`crate::chroot`], whose root
//! has no QEMU) reach a vouch on the host over `ssh-ng://` and `ssh://` without an sshd: the
//! client side is [`ChrootNix::remote_program`](crate::chroot::ChrootNix::remote_program).
//!
//! `std` only: an accept thread, one child process per connection, all killed and reaped on
//! drop. What is not here: `vouch nix-builder --listen` ([`crate::server`]), which serves the
//! worker protocol on a socket itself.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A socket whose connections each run `program` with the command line they send.
#[derive(Debug)]
pub struct StdioBridge {
    /// The socket.
    pub socket: PathBuf,
    /// The programs' stderr, appended.
    pub log: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    state: Arc<Mutex<Bridged>>,
}

#[derive(Debug, Default)]
struct Bridged {
    children: Vec<Child>,
    lines: Vec<String>,
}

impl StdioBridge {
    /// Listen on `socket` (replacing a stale one); each connection runs `program` (an
    /// executable, e.g. a wrapper around `vouch nix-builder`) with stderr appended to `log`.
    pub fn start(socket: &Path, program: &Path, log: &Path) -> StdioBridge {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)
            .unwrap_or_else(|e| panic!("binding {}: {e}", socket.display()));
        listener.set_nonblocking(true).expect("a non-blocking listener");
        std::fs::File::create(log).expect("creating the bridge log");
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(Bridged::default()));
        let (program, log_path) = (program.to_owned(), log.to_owned());
        let (stop2, state2) = (stop.clone(), state.clone());
        let accept = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        if let Some((line, child)) = run_one(conn, &program, &log_path) {
                            let mut s = state2.lock().unwrap_or_else(|e| e.into_inner());
                            s.lines.push(line);
                            s.children.push(child);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let mut s = state2.lock().unwrap_or_else(|e| e.into_inner());
                        s.children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
                        drop(s);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("accepting on the bridge: {e}"),
                }
            }
        });
        StdioBridge {
            socket: socket.to_owned(),
            log: log.to_owned(),
            stop,
            accept: Some(accept),
            state,
        }
    }

    /// The command lines the connections sent, in order.
    pub fn command_lines(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).lines.clone()
    }

    /// The programs' stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Read one connection's command line and start `program` on it; `None` if the peer left
/// before sending one.
fn run_one(mut conn: UnixStream, program: &Path, log: &Path) -> Option<(String, Child)> {
    conn.set_nonblocking(false).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    // Byte by byte: what follows the line belongs to the program.
    let mut line = Vec::new();
    let mut b = [0u8];
    while line.len() < 4096 {
        match conn.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => return None,
        }
    }
    conn.set_read_timeout(None).ok()?;
    let line = String::from_utf8_lossy(&line).into_owned();
    let err = std::fs::OpenOptions::new().append(true).open(log).expect("the bridge log");
    let input = OwnedFd::from(conn.try_clone().expect("cloning the connection"));
    let child = Command::new(program)
        .args(line.split_whitespace())
        .stdin(Stdio::from(input))
        .stdout(Stdio::from(OwnedFd::from(conn)))
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    Some((line, child))
}

impl Drop for StdioBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for c in &mut s.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
