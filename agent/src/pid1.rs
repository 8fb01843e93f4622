//! Being PID 1: console lines, mounts, the guest's `/etc`, and powering off whatever happens.
//!
//! What is here: [`say`] (one prefixed, time-stamped console line), [`setup_mounts`] (proc, sys,
//! devtmpfs, devpts, configfs, and fresh tmpfs for `/nix/store`, `/build` and `/tmp`: outputs live
//! only in guest memory, never on a host-provided disk), [`write_etc`] (the same minimal
//! `passwd`/`group`/`hosts` Nix's sandbox gives builders), [`install_panic_hook`] and
//! [`power_off`] (sync, then `reboot(POWER_OFF)`; QEMU runs with `-no-reboot`, and the kernel
//! command line has `panic=-1`, so even PID 1 dying ends the VM).
//!
//! What is not here: the job protocol or the builder.

use std::fs;
use std::io::Write;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

/// uid the builder runs as (Nix's sandbox uses 1000 as well).
pub const BUILDER_UID: u32 = 1000;
/// gid of the builder (`nixbld`).
pub const BUILDER_GID: u32 = 100;

/// Seconds since boot (`CLOCK_BOOTTIME`, nanosecond resolution), or 0 if it cannot be read.
pub fn uptime() -> f64 {
    crate::sys::boot_time().map_or(0.0, |d| d.as_secs_f64())
}

/// Print one console line: `[  1.234] vouch-agent: msg`.
pub fn say(msg: &str) {
    let line = format!("[{:8.3}] vouch-agent: {msg}\n", uptime());
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Errors while preparing the guest.
#[derive(Debug, thiserror::Error)]
pub enum Pid1Error {
    /// A mount failed.
    #[error("mounting {fstype} on {target}")]
    Mount {
        /// File system type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// Creating a directory or file failed.
    #[error("preparing {0}")]
    Io(&'static str, #[source] std::io::Error),
    /// Writing a file of `/etc`.
    #[error("writing /etc/{0}")]
    Etc(&'static str, #[source] std::io::Error),
}

fn mnt(
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Pid1Error> {
    fs::create_dir_all(target).map_err(|e| Pid1Error::Io(target, e))?;
    mount(Some(fstype), target, Some(fstype), flags, data).map_err(|source| Pid1Error::Mount {
        fstype,
        target,
        source,
    })
}

/// Mount what the agent and the builder need. Errors name the mount.
pub fn setup_mounts() -> Result<(), Pid1Error> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let noexec = nosuid | MsFlags::MS_NOEXEC;
    mnt("proc", "/proc", noexec, None)?;
    mnt("sysfs", "/sys", noexec, None)?;
    mnt("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mnt(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    mnt("tmpfs", "/dev/shm", nosuid, Some("mode=1777"))?;
    // configfs carries configfs-tsm (SNP reports); without SNP it is simply empty.
    if Path::new("/sys/kernel/config").is_dir() {
        mnt("configfs", "/sys/kernel/config", noexec, None)?;
    }
    // The store is group-writable by the builder's group with the sticky bit, as in a Nix
    // installation with build users: the builder may create its output paths, nothing else.
    mnt("tmpfs", "/nix/store", MsFlags::MS_NODEV, Some(&format!("mode=1775,gid={BUILDER_GID}")))?;
    mnt(
        "tmpfs",
        "/build",
        nosuid,
        Some(&format!("mode=0700,uid={BUILDER_UID},gid={BUILDER_GID}")),
    )?;
    mnt("tmpfs", "/tmp", nosuid, Some("mode=1777"))?;
    let _ = fs::remove_file("/dev/ptmx");
    std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx")
        .map_err(|e| Pid1Error::Io("/dev/ptmx", e))?;
    Ok(())
}

/// `/etc/passwd`, `/etc/group` and `/etc/hosts` as Nix's sandbox writes them (the same files
/// as the builder's root: [`crate::sandbox::root::etc_files`]).
pub fn write_etc() -> Result<(), Pid1Error> {
    fs::create_dir_all("/etc").map_err(|e| Pid1Error::Io("/etc", e))?;
    for (name, text) in crate::sandbox::root::etc_files(BUILDER_UID, BUILDER_GID, false) {
        fs::write(Path::new("/etc").join(name), text).map_err(|e| Pid1Error::Etc(name, e))?;
    }
    let _ = nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    Ok(())
}

/// Sync file systems and power the VM off. Never returns; if power-off fails, PID 1 exits,
/// which panics the kernel, which (`panic=-1`, `-no-reboot`) ends the VM too.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    std::process::exit(1)
}

/// On panic (the agent profile aborts on panic): print it and power off.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        say(&format!("PANIC: {info}; powering off"));
        power_off();
    }));
}
