//! Raw system calls of PID 1 that no safe wrapper covers, each `unsafe` block with its SAFETY
//! argument. With `sandbox::sys` (the builder sandbox's) and `sev_guest` (the SNP guest device's
//! ioctls), the only modules of the agent allowed `unsafe` (the crate root denies it elsewhere).
//!
//! What is here: bringing the loopback interface up (`SIOCGIFFLAGS`/`SIOCSIFFLAGS`), as Nix's
//! sandbox does for builders (many test suites need `127.0.0.1`), and the guest's uptime at
//! nanosecond resolution ([`boot_time`]; `/proc/uptime` has only 10 ms, too coarse for the
//! phases of a step).
//! What is not here: the SEV guest ioctls (`crate::sev_guest`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Set `IFF_UP` on `lo`.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call with constant arguments; the result is checked below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `ifreq` is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes `ifru_flags` inside `req`, which lives
    // for the whole call; the descriptor is valid.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just initialised `ifru_flags` (the union member for these ioctls).
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Time since boot (`CLOCK_BOOTTIME`), or `None` if the clock cannot be read.
pub fn boot_time() -> Option<std::time::Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes one `timespec` into `ts`, which lives for the whole call;
    // the clock id is a constant the kernel knows.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    Some(std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}
