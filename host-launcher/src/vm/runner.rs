//! The QEMU process: start it, capture its serial console and its own error output, notice
//! when it exits, kill it.
//!
//! What is here: [`Vm`]. The console (QEMU's stdout: `-serial chardev:con` on stdio) goes to a
//! log file, to a ring buffer whose tail ends up in error messages, and optionally to our stderr
//! (`--verbose`). A watcher thread notices the exit within a few milliseconds and runs the
//! registered callbacks (the channel uses one to unblock its reader).
//! What is not here: the command line (see [`super::qemu_argv`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Console lines kept for error messages.
const TAIL_LINES: usize = 40;

type ExitCallback = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct ExitState {
    status: Option<ExitStatus>,
    at: Option<Instant>,
    callbacks: Vec<ExitCallback>,
}

/// A running (or finished) QEMU.
pub struct Vm {
    child: Arc<Mutex<Child>>,
    exit: Arc<(Mutex<ExitState>, Condvar)>,
    console: Arc<Mutex<VecDeque<String>>>,
    marks: Arc<Mutex<Vec<(String, Instant)>>>,
    qemu_err: Arc<Mutex<Vec<u8>>>,
    threads: Vec<JoinHandle<()>>,
    pid: u32,
    started: Instant,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("pid", &self.pid).finish_non_exhaustive()
    }
}

/// Describe how a process ended, for messages.
pub fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => {
            let name = nix::sys::signal::Signal::try_from(s).map(|s| s.as_str()).unwrap_or("?");
            format!("was killed by signal {s} ({name})")
        }
        _ => "ended".to_owned(),
    }
}

impl Vm {
    /// Start `qemu` with `argv`. Console lines are appended to `console_log` and, with `echo`,
    /// copied to stderr.
    pub fn spawn(
        qemu: &Path,
        argv: &[String],
        console_log: &Path,
        echo: bool,
    ) -> std::io::Result<Vm> {
        let mut cmd = Command::new(qemu);
        // QEMU dies with the launcher, even a `kill -9`ed one (see `super::child`).
        let mut child = super::child::die_with_launcher(&mut cmd)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let started = Instant::now();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let console = Arc::new(Mutex::new(VecDeque::new()));
        let marks: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let qemu_err = Arc::new(Mutex::new(Vec::new()));
        let mut log = File::create(console_log)?;
        let mut threads = Vec::new();
        {
            let console = console.clone();
            let marks = marks.clone();
            threads.push(std::thread::spawn(move || {
                let mut r = BufReader::new(stdout);
                let mut line = Vec::new();
                while let Ok(n) = r.read_until(b'\n', &mut line) {
                    if n == 0 {
                        break;
                    }
                    let _ = log.write_all(&line);
                    if echo {
                        let _ = std::io::stderr().write_all(&line);
                    }
                    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                    if text.contains("vouch-agent: ") {
                        marks
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((text.clone(), Instant::now()));
                    }
                    let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
                    if c.len() == TAIL_LINES {
                        c.pop_front();
                    }
                    c.push_back(text);
                    line.clear();
                }
            }));
        }
        {
            let qemu_err = qemu_err.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = BufReader::new(stderr).read_to_end(&mut buf);
                qemu_err.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&buf);
            }));
        }
        let child = Arc::new(Mutex::new(child));
        let exit: Arc<(Mutex<ExitState>, Condvar)> = Arc::default();
        {
            let child = child.clone();
            let exit = exit.clone();
            threads.push(std::thread::spawn(move || loop {
                let status = child.lock().unwrap_or_else(|e| e.into_inner()).try_wait();
                match status {
                    Ok(Some(st)) => {
                        let callbacks = {
                            let mut s = exit.0.lock().unwrap_or_else(|e| e.into_inner());
                            s.status = Some(st);
                            s.at = Some(Instant::now());
                            std::mem::take(&mut s.callbacks)
                        };
                        exit.1.notify_all();
                        for cb in callbacks {
                            cb();
                        }
                        return;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => return,
                }
            }));
        }
        Ok(Vm { child, exit, console, marks, qemu_err, threads, pid, started })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When QEMU was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Run `cb` once QEMU has exited (immediately if it already has).
    pub fn on_exit(&self, cb: impl FnOnce() + Send + 'static) {
        let mut s = self.exit.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.status.is_some() {
            drop(s);
            cb();
        } else {
            s.callbacks.push(Box::new(cb));
        }
    }

    /// The exit status, if QEMU has exited.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.exit.0.lock().unwrap_or_else(|e| e.into_inner()).status
    }

    /// When QEMU exited, if it has.
    pub fn exited_at(&self) -> Option<Instant> {
        self.exit.0.lock().unwrap_or_else(|e| e.into_inner()).at
    }

    /// Wait up to `d` for QEMU to exit.
    pub fn wait_timeout(&self, d: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + d;
        let mut s = self.exit.0.lock().unwrap_or_else(|e| e.into_inner());
        while s.status.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            s = self.exit.1.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        s.status
    }

    /// SIGKILL QEMU (no-op if it has exited) and wait for it.
    pub fn kill(&self) -> Option<ExitStatus> {
        let _ = self.child.lock().unwrap_or_else(|e| e.into_inner()).kill();
        self.wait_timeout(Duration::from_secs(10))
    }

    /// The last console lines.
    pub fn console_tail(&self) -> String {
        let c = self.console.lock().unwrap_or_else(|e| e.into_inner());
        c.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The first agent console line containing `needle`, and when it arrived (benchmarks).
    pub fn agent_line(&self, needle: &str) -> Option<(String, Instant)> {
        let m = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().find(|(l, _)| l.contains(needle)).cloned()
    }

    /// What QEMU itself printed on stderr (complete only after it exited).
    pub fn qemu_stderr(&self) -> String {
        String::from_utf8_lossy(&self.qemu_err.lock().unwrap_or_else(|e| e.into_inner()))
            .trim()
            .to_owned()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        // The reader threads end when QEMU's pipes close, the watcher when it is reaped; a QEMU
        // stuck in the kernel must not hang us too: wait a bounded time, then leave them.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!(pid = self.pid, "QEMU's threads did not finish; leaving them");
            }
        }
    }
}
