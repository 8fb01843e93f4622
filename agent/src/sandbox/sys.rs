//! Every `unsafe` block of the builder sandbox, each with its SAFETY argument (with `crate::sys`,
//! the only module of the agent allowed `unsafe`).
//!
//! What is here:
//! - [`attach`]: the `pre_exec` hook that turns the spawned child into the sandbox. It runs
//!   between `fork` and `exec` in a copy of a multi-threaded process, so it only makes raw system
//!   calls on data prepared beforehand (no allocation, no locks). In order:
//!   1. join the build cgroup (`write(cgroup.procs, "0")`);
//!   2. `unshare` PID, mount, IPC, UTS, cgroup (and, without network, net) namespaces;
//!   3. `fork`: the parent stays outside the new PID namespace, closes every descriptor above 2
//!      and only relays the child's exit status ([`relay`]); the child is PID 1 of the
//!      namespace — when it exits, the kernel kills everything else in it;
//!   4. the child: new session, dies with its parent, makes all mounts private, mounts `/proc`
//!      for the new PID namespace, detaches the guest's `/proc`, `/sys`, `/dev` and `/tmp`, moves
//!      the prepared root onto `/` and chroots into it, brings up `lo` (own network namespace),
//!      sets the host name, drops to the builder's uid/gid with no groups (no capabilities
//!      remain), sets `no_new_privs`, marks every inherited descriptor above 2 close-on-exec, and
//!      installs the seccomp filter. Then `std` execs the builder.
//!
//!   A failing step writes `vouch-agent sandbox: <step> failed` to the builder's stderr
//!   (the build log) and fails the spawn with its errno.
//! - [`install_filter`], [`set_ipv4`], [`set_up`], [`add_default_route`] (SIOCSIFADDR,
//!   SIOCSIFNETMASK, SIOCSIFFLAGS, SIOCADDRT).
//! - for tests: [`probe_filter_in_child`].

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;

use libc::{c_int, sock_filter};

/// Everything the `pre_exec` hook needs, prepared before `fork`.
#[derive(Debug)]
pub struct ChildPlan {
    /// `cgroup.procs` of the build cgroup, open for writing.
    pub cgroup_procs: OwnedFd,
    /// `unshare` flags.
    pub unshare: c_int,
    /// The prepared root (moved onto `/`).
    pub root: CString,
    /// `<root>/proc`.
    pub proc_dir: CString,
    /// The guest's mounts to detach in the builder's namespace.
    pub detach: Vec<CString>,
    /// The working directory inside the root.
    pub workdir: CString,
    /// Builder uid and gid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Bring `lo` up (a private network namespace starts with it down).
    pub loopback: bool,
    /// The seccomp program.
    pub filter: Vec<sock_filter>,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

/// Write a fixed message to the builder's stderr and return the current errno as an error.
fn fail(step: &'static [u8]) -> io::Error {
    let e = last_err();
    for part in [&b"vouch-agent sandbox: "[..], step, &b" failed\n"[..]] {
        // SAFETY: writing a valid byte slice to fd 2; the result is irrelevant on this path.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    e
}

fn check(r: c_int, step: &'static [u8]) -> io::Result<()> {
    if r < 0 {
        Err(fail(step))
    } else {
        Ok(())
    }
}

/// Install the `pre_exec` hook described in the module documentation on `cmd`.
pub fn attach(cmd: &mut Command, plan: Arc<ChildPlan>) {
    let hook = move || enter(&plan);
    // SAFETY: `enter` only makes raw system calls on `plan`'s prepared data: it neither
    // allocates nor takes locks, so it is sound in the forked child of a multi-threaded process.
    unsafe {
        cmd.pre_exec(hook);
    }
}

fn enter(p: &ChildPlan) -> io::Result<()> {
    // SAFETY: each call below is a plain system call on valid, NUL-terminated strings and
    // buffers owned by `p` (alive for the whole hook) or on constants; results are checked.
    // `relay` never returns, so only the child continues past the fork.
    unsafe {
        let zero = b"0";
        if libc::write(p.cgroup_procs.as_raw_fd(), zero.as_ptr().cast(), 1) != 1 {
            return Err(fail(b"joining the build cgroup"));
        }
        check(libc::unshare(p.unshare), b"unshare")?;
        let pid = libc::fork();
        if pid < 0 {
            return Err(fail(b"fork"));
        }
        if pid > 0 {
            relay(pid);
        }
        // PID 1 of the builder's namespace from here on.
        check(libc::setsid(), b"setsid")?;
        check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0), b"PR_SET_PDEATHSIG")?;
        let null = std::ptr::null::<libc::c_char>();
        let flags = libc::MS_REC | libc::MS_PRIVATE;
        check(
            libc::mount(null, c"/".as_ptr(), null, flags, std::ptr::null()),
            b"making mounts private",
        )?;
        let pflags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        check(
            libc::mount(
                c"proc".as_ptr(),
                p.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                pflags,
                std::ptr::null(),
            ),
            b"mounting /proc",
        )?;
        for d in &p.detach {
            if libc::umount2(d.as_ptr(), libc::MNT_DETACH) < 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(fail(b"detaching a guest mount"));
            }
        }
        check(libc::chdir(p.root.as_ptr()), b"chdir to the sandbox root")?;
        check(
            libc::mount(p.root.as_ptr(), c"/".as_ptr(), null, libc::MS_MOVE, std::ptr::null()),
            b"moving the root",
        )?;
        check(libc::chroot(c".".as_ptr()), b"chroot")?;
        check(libc::chdir(p.workdir.as_ptr()), b"chdir to the build directory")?;
        if p.loopback {
            set_up_raw(b"lo\0").map_err(|_| fail(b"bringing up lo"))?;
        }
        let host = b"localhost";
        check(libc::sethostname(host.as_ptr().cast(), host.len()), b"sethostname")?;
        check(libc::setgroups(0, std::ptr::null()), b"setgroups")?;
        check(libc::setresgid(p.gid, p.gid, p.gid), b"setresgid")?;
        check(libc::setresuid(p.uid, p.uid, p.uid), b"setresuid")?;
        libc::umask(0o022);
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), b"PR_SET_NO_NEW_PRIVS")?;
        check(libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as c_int), b"close_range")?;
    }
    install_filter(&p.filter).map_err(|_| fail(b"installing the seccomp filter"))
}

/// The relay between the agent and the builder's PID namespace: wait for its init, then end
/// the same way. Never returns.
fn relay(pid: libc::pid_t) -> ! {
    // SAFETY: plain system calls on constants and a local status word; `_exit` never returns.
    unsafe {
        // Close everything above 2 (the cgroup file, std's exec-status pipe): the agent then
        // learns the builder's exec result from the builder alone.
        libc::close_range(3, u32::MAX, 0);
        let mut status: c_int = 0;
        loop {
            let r = libc::waitpid(pid, &mut status, 0);
            if r == pid {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        let sig = libc::WTERMSIG(status);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::kill(libc::getpid(), sig);
        libc::_exit(128 + sig)
    }
}

/// Install a seccomp filter on the calling thread (needs `no_new_privs` or CAP_SYS_ADMIN).
pub fn install_filter(filter: &[sock_filter]) -> io::Result<()> {
    let len =
        u16::try_from(filter.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let prog = libc::sock_fprog { len, filter: filter.as_ptr().cast_mut() };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel copies the program.
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const libc::sock_fprog,
            0,
            0,
        )
    };
    if r < 0 {
        Err(last_err())
    } else {
        Ok(())
    }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(last_err());
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// An `ifreq` naming `name` (NUL-terminated, at most IFNAMSIZ bytes with the NUL).
fn ifreq(name: &[u8]) -> io::Result<libc::ifreq> {
    // SAFETY: `ifreq` is a plain C struct for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() > req.ifr_name.len() || name.last() != Some(&0) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn nul_name(name: &str) -> io::Result<Vec<u8>> {
    let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(c.into_bytes_with_nul())
}

/// `IFF_UP` on a NUL-terminated interface name (allocation-free: usable in the hook).
fn set_up_raw(name: &[u8]) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags inside `req`, which lives for the
    // whole call; the descriptor is valid.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(last_err());
    }
    // SAFETY: the kernel just initialised `ifru_flags`, the union member of these ioctls.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// Bring interface `name` up.
pub fn set_up(name: &str) -> io::Result<()> {
    set_up_raw(&nul_name(name)?)
}

/// A `sockaddr` holding an IPv4 address (port 0), built field by field.
fn sockaddr_v4(ip: [u8; 4]) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    for (d, b) in data[2..6].iter_mut().zip(ip) {
        *d = b as libc::c_char;
    }
    libc::sockaddr { sa_family: libc::AF_INET as libc::sa_family_t, sa_data: data }
}

/// Set the IPv4 address and netmask of `name`.
pub fn set_ipv4(name: &str, addr: [u8; 4], netmask: [u8; 4]) -> io::Result<()> {
    let sock = inet_socket()?;
    let name = nul_name(name)?;
    for (request, ip) in [(libc::SIOCSIFADDR, addr), (libc::SIOCSIFNETMASK, netmask)] {
        let mut req = ifreq(&name)?;
        req.ifr_ifru.ifru_addr = sockaddr_v4(ip);
        // SAFETY: the ioctl reads the name and the address from `req`, alive for the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), request, &req) } < 0 {
            return Err(last_err());
        }
    }
    Ok(())
}

/// The kernel's `struct rtentry` (x86-64 layout; `libc` does not define it for glibc).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

const RTF_UP: libc::c_ushort = 0x1;
const RTF_GATEWAY: libc::c_ushort = 0x2;

/// Add the IPv4 default route via `gateway`.
pub fn add_default_route(gateway: [u8; 4]) -> io::Result<()> {
    let sock = inet_socket()?;
    let rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_v4([0; 4]),
        rt_gateway: sockaddr_v4(gateway),
        rt_genmask: sockaddr_v4([0; 4]),
        rt_flags: RTF_UP | RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: std::ptr::null_mut(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: SIOCADDRT reads a `struct rtentry`, which `rt` is laid out as; it lives for the
    // call and its pointers are null (no device name).
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt) } < 0 {
        return Err(last_err());
    }
    Ok(())
}

/// What a filtered child could do (see [`probe_filter_in_child`]).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterProbe {
    /// `socket(AF_VSOCK, SOCK_STREAM)`.
    pub vsock_socket: Result<(), i32>,
    /// `socketpair(AF_VSOCK, SOCK_STREAM)`.
    pub vsock_socketpair: Result<(), i32>,
    /// `socket(AF_INET, SOCK_STREAM)`.
    pub inet_socket: Result<(), i32>,
    /// `socketpair(AF_UNIX, SOCK_STREAM)`.
    pub unix_socketpair: Result<(), i32>,
    /// `io_uring_setup(1, NULL)`.
    pub io_uring_setup: Result<(), i32>,
    /// `PR_GET_NO_NEW_PRIVS`.
    pub no_new_privs: i32,
}

/// Fork a child that sets `no_new_privs`, installs `filter`, tries a few system calls and
/// reports through a pipe (only async-signal-safe calls in the child).
#[cfg(test)]
pub fn probe_filter_in_child(filter: &[sock_filter]) -> io::Result<FilterProbe> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(last_err());
    }
    let errno = || -> i32 {
        // SAFETY: reading the thread's errno.
        unsafe { *libc::__errno_location() }
    };
    let res = |r: c_int| if r < 0 { errno() } else { 0 };
    // SAFETY: the child only makes raw system calls and `_exit`s; the parent reaps it.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_err());
    }
    if pid == 0 {
        // SAFETY: child side: raw system calls on local buffers, then `_exit`.
        unsafe {
            let mut out = [0i32; 6];
            let mut pair = [0 as c_int; 2];
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            let prog =
                libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
            if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const _, 0, 0)
                < 0
            {
                libc::_exit(2);
            }
            out[0] = res(libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0));
            out[1] = res(libc::socketpair(libc::AF_VSOCK, libc::SOCK_STREAM, 0, pair.as_mut_ptr()));
            out[2] = res(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0));
            out[3] = res(libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()));
            out[4] = res(libc::syscall(libc::SYS_io_uring_setup, 1, 0) as c_int);
            out[5] = libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0);
            libc::write(fds[1], out.as_ptr().cast(), std::mem::size_of_val(&out));
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end, a descriptor we own.
    unsafe { libc::close(fds[1]) };
    // SAFETY: `fds[0]` is the read end, owned by us from here on.
    let rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    let mut buf = [0u8; 24];
    let mut f = std::fs::File::from(rd);
    std::io::Read::read_exact(&mut f, &mut buf)?;
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let v: Vec<i32> =
        buf.chunks(4).map(|c| i32::from_ne_bytes(c.try_into().unwrap_or_default())).collect();
    let r = |x: i32| if x == 0 { Ok(()) } else { Err(x) };
    Ok(FilterProbe {
        vsock_socket: r(v[0]),
        vsock_socketpair: r(v[1]),
        inet_socket: r(v[2]),
        unix_socketpair: r(v[3]),
        io_uring_setup: r(v[4]),
        no_new_privs: v[5],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtentry_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_flags), 56);
        assert_eq!(std::mem::offset_of!(RtEntry, rt_dev), 88);
    }

    #[test]
    fn sockaddr_v4_is_sockaddr_in() {
        let sa = sockaddr_v4([10, 0, 2, 15]);
        // SAFETY: `sockaddr` and `sockaddr_in` have the same size; reading it back as the
        // latter is what the kernel does.
        let sin: libc::sockaddr_in = unsafe { std::mem::transmute(sa) };
        assert_eq!(sin.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(sin.sin_port, 0);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [10, 0, 2, 15]);
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq(b"lo\0").is_ok());
        assert!(ifreq(b"lo").is_err());
        assert!(ifreq(b"a-very-long-interface-name\0").is_err());
        assert!(nul_name("e\0th").is_err());
    }
}
