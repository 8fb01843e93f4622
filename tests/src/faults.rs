//! What the fault-injection tests (`tests/tests/faults.rs`) and the soak (`tests/benches/soak.rs`)
//! use to inject faults and to look for what a fault may leave behind: a launcher's VM processes
//! and run directories (found by the owner tag in their names, `vouch-vm-<pid>-<ticks>-`), its
//! staging directories, an image whose kernel command line says more, a background `nix-build`
//! whose log is read line by line, and a held SQLite write lock.
//!
//! What is not here: starting servers (`test_support::server`) or the expectations themselves.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The owner tag of process `pid` (`<pid>-<start ticks>`), as vouch names what it owns.
pub fn owner_tag(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
    let ticks = after.split_whitespace().nth(19).unwrap_or("?");
    format!("{pid}-{ticks}")
}

/// Processes (pid, command line) whose command line names a VM run directory of the launcher
/// with process id `launcher` (QEMU and `vhost-device-vsock` do): a launcher's VM processes,
/// found even after it died and they were reparented.
pub fn vm_processes(launcher: u32) -> Vec<(u32, String)> {
    let needle = format!("vouch-vm-{launcher}-");
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// The pid of the launcher's VM process whose program name contains `program`.
pub fn vm_process(launcher: u32, program: &str) -> u32 {
    let procs = vm_processes(launcher);
    procs
        .iter()
        .find(|(_, c)| c.split(' ').next().is_some_and(|p| p.contains(program)))
        .unwrap_or_else(|| panic!("no {program} of launcher {launcher}: {procs:?}"))
        .0
}

/// The VM run directories of launcher `launcher` under `$TMPDIR`.
pub fn vm_dirs(launcher: u32) -> Vec<PathBuf> {
    entries_with_prefix(&std::env::temp_dir(), &format!("vouch-vm-{launcher}-"))
}

/// The step staging directories of launcher `launcher` in the state directory `state`.
pub fn staging_dirs(state: &Path, launcher: u32) -> Vec<PathBuf> {
    entries_with_prefix(&state.join("tmp"), &format!("step-{launcher}-"))
}

fn entries_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect()
}

/// Wait up to `limit` for `cond`; panics naming `what` (and `detail()`) if it never holds.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < limit, "timed out after {limit:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Assert that nothing of launcher `launcher`'s VMs is running (waiting up to 10 s for the
/// kernel to deliver the death signals) and, unless `dirs_may_stay`, that no run directory is
/// left (waiting up to 10 s more for the launcher to remove them).
pub fn assert_no_vm_left(launcher: u32, dirs_may_stay: bool) {
    wait_until("no VM process is left", Duration::from_secs(10), || {
        vm_processes(launcher).is_empty()
    });
    if !dirs_may_stay {
        // The launcher removes a run directory after it has reaped the VM's processes: give it
        // the moment between the two before calling the directory left.
        let t0 = Instant::now();
        while !vm_dirs(launcher).is_empty() && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let dirs = vm_dirs(launcher);
        assert!(dirs.is_empty(), "VM run directories left after 10 s: {dirs:?}");
    }
}

/// A copy of the image `image` in `dir` (its files linked, not copied) whose kernel command line
/// has `append` added: a guest that panics (`rdinit=` naming no program), or an agent that
/// crashes (`vouch.bench=panic`, bench image only).
pub fn image_variant(image: &Path, dir: &Path, append: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(image).unwrap().flatten() {
        if e.file_name() != "manifest.json" {
            std::os::unix::fs::symlink(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let text = std::fs::read_to_string(image.join("manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cmdline = format!("{} {append}", m["cmdline"].as_str().unwrap());
    m["cmdline"] = cmdline.into();
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    dir.to_owned()
}

/// A program run in the background whose stderr is collected line by line.
#[derive(Debug)]
pub struct Background {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<String>>,
}

impl Background {
    /// Start `cmd` (stdout discarded, stderr read).
    pub fn start(cmd: &mut Command) -> Background {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting a background program");
        let err = BufReader::new(child.stderr.take().unwrap());
        let (tx, lines) = channel();
        let log: Arc<Mutex<String>> = Arc::default();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                l.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        Background { child, lines, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait (up to 5 minutes) for a line containing `marker`; returns it.
    pub fn wait_for(&self, marker: &str) -> String {
        let t0 = Instant::now();
        loop {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l.contains(marker) => return l,
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("`{marker}` never appeared; log:\n{}", self.log())
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "no `{marker}`:\n{}", self.log());
        }
    }

    /// The stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait (up to 5 minutes) for the exit; the status and the whole stderr.
    pub fn finish(mut self) -> (ExitStatus, String) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // The reader thread ends with the pipe.
                while self.lines.recv_timeout(Duration::from_secs(5)).is_ok() {}
                return (st, self.log());
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "did not end:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send `signal` (`KILL`, `STOP`, `CONT`, …) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{signal} {pid} failed");
}

/// A SQLite write lock on a database, held by a `sqlite3` process until released or dropped.
#[derive(Debug)]
pub struct HeldLock {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl HeldLock {
    /// Take the write lock of `db` (`BEGIN IMMEDIATE`) and hold it.
    pub fn take(db: &Path) -> HeldLock {
        let mut child = Command::new("sqlite3")
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sqlite3 (scripts/setup-host.sh installs it)");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b".timeout 20000\nBEGIN IMMEDIATE;\nSELECT 'locked';\n").unwrap();
        stdin.flush().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "locked", "sqlite3 did not take the lock");
        HeldLock { child, stdin: Some(stdin) }
    }

    /// Commit (nothing) and let go.
    pub fn release(mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"COMMIT;\n.quit\n");
        }
        let _ = self.child.wait();
    }
}

impl Drop for HeldLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a process holds at one moment (the soak samples the launcher with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcSample {
    /// Resident set size (`VmRSS`), KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
    /// Threads.
    pub threads: u64,
}

impl ProcSample {
    /// Sample process `pid`.
    pub fn of(pid: u32) -> ProcSample {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
        ProcSample { rss_kib: field("VmRSS:"), fds, threads: field("Threads:") }
    }
}

/// Bytes and entries (files and directories, recursively) under `paths`.
pub fn usage(paths: &[PathBuf]) -> (u64, usize) {
    let (mut bytes, mut entries) = (0, 0);
    for p in paths {
        let Ok(m) = std::fs::symlink_metadata(p) else { continue };
        entries += 1;
        if m.is_dir() {
            let children: Vec<PathBuf> =
                std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| e.path()).collect();
            let (b, n) = usage(&children);
            bytes += b;
            entries += n;
        } else {
            bytes += m.len();
        }
    }
    (bytes, entries)
}
