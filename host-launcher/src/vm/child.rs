//! The launcher's helper processes (QEMU, `vhost-device-vsock`) die with the launcher.
//!
//! [`die_with_launcher`] makes a [`Command`] set `PR_SET_PDEATHSIG(SIGKILL)` in the child,
//! between `fork` and `exec`: when the launcher dies — even by `kill -9`, which runs no cleanup
//! code — the kernel SIGKILLs the child. SIGKILL, not SIGTERM: `vhost-device-vsock` ignores
//! SIGTERM. If the launcher died *before* `prctl` ran, the signal would never come; so the child
//! then compares `getppid()` with the launcher's pid recorded before the fork and exits if it
//! was reparented.
//!
//! The death signal fires when the **thread** that forked the child exits, not only the
//! process. That is safe here because every VM lives inside one call on one thread: the build
//! core ([`crate::build::host`]) creates the vsock backend ([`super::vsock::Channel::prepare`])
//! and QEMU ([`super::runner::Vm::spawn`]) in `attempt_step` and kills both (and reaps them)
//! before `attempt_step` returns, on every path including unwinding (their `Drop`s). The thread
//! is blocked in that call for the VM's whole life, so it cannot end while its VM should live.
//! (`vouch bench` does the same within one benchmark function.) The one hand-over is the warm
//! pool's ([`crate::pool`]): its booter threads start VMs that steps on other threads take, and
//! those threads live as long as the pool, which is shut down only when its launcher stops
//! (its steps cancelled, their VMs killed). Do not hand a spawned QEMU or backend to another
//! thread that may outlive the spawning one otherwise.
//!
//! With a launcher killed by `kill -9`, its VM's run directory (`$TMPDIR/vouch-vm-<owner>-…`)
//! cannot be removed by anyone but the next launcher: [`crate::recovery`] does that, recognising
//! the dead owner by the [`run_dir_prefix`] in the name.
//!
//! What is not here: what the children run (`super::qemu_argv`, `super::vsock`).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nix::sys::signal::Signal;
use nix::unistd::{getpid, getppid};

/// The name prefix of a VM's run directory under `$TMPDIR`: `vouch-vm-<pid>-<start ticks>-`,
/// naming the launcher process that owns it (`crate::store::owner::ProcessId::tag`), so that
/// start-up recovery can tell a dead launcher's directory from a live one's.
pub fn run_dir_prefix() -> String {
    format!("{RUN_DIR_PREFIX}{}-", crate::store::owner::ProcessId::current().tag())
}

/// What every VM run directory's name starts with (see [`run_dir_prefix`]).
pub const RUN_DIR_PREFIX: &str = "vouch-vm-";

/// Make `cmd`'s child die (SIGKILL) when the calling thread or the launcher ends; see the
/// module docs for why the thread is fine.
pub fn die_with_launcher(cmd: &mut Command) -> &mut Command {
    let launcher = getpid();
    // SAFETY: the closure runs in the forked child before `exec`, where only async-signal-safe
    // calls are allowed. It makes exactly two system calls, `prctl(PR_SET_PDEATHSIG)` and
    // `getppid`, and builds its errors with `io::Error::from_raw_os_error` (no allocation, no
    // locks); it touches no memory shared with other threads of the parent.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            if getppid() != launcher {
                // The launcher died before prctl: nobody will ever kill us. Fail the exec (the
                // child exits at once; there is no parent left to report to).
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn alive(pid: i32) -> bool {
        // A zombie is dead for our purposes (its parent has not reaped it yet).
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit(") ").next().is_some_and(|r| !r.starts_with('Z')))
    }

    /// A child of a thread that ends dies with it; `sleep` ignores nothing, so a `sh` that traps
    /// SIGTERM stands in for `vhost-device-vsock` (SIGKILL cannot be trapped).
    #[test]
    fn the_child_dies_with_the_spawning_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "trap '' TERM; exec sleep 60"]);
            let child = die_with_launcher(&mut cmd).spawn().unwrap();
            tx.send(child.id() as i32).unwrap();
            // Leak the Child: nothing kills or waits for it but the death signal.
            std::mem::forget(child);
        });
        let pid = rx.recv().unwrap();
        t.join().unwrap();
        let t0 = Instant::now();
        while alive(pid) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(pid), "the child {pid} outlived the thread that spawned it");
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }

    #[test]
    fn a_child_of_a_live_thread_runs() {
        let mut cmd = Command::new("true");
        let st = die_with_launcher(&mut cmd).status().unwrap();
        assert!(st.success());
    }
}
