//! The host side of the guest's vsock channel.
//!
//! The guest always connects out (AF_VSOCK, CID 2, the port on its command line), and the host
//! listens before QEMU starts, so nobody polls. Two backends:
//! - **kernel** (`/dev/vhost-vsock`, EPYC hosts): QEMU's `vhost-vsock-pci` with a unique guest
//!   CID; the host listens with AF_VSOCK on the port and accepts only that CID. A vsock port can
//!   be bound by one process at a time, so concurrent vouch processes on such a host take turns
//!   (a lock file); see `docs/vm.md`.
//! - **user** (no `/dev/vhost-vsock`, e.g. CI): QEMU's `vhost-user-vsock-pci` backed by one
//!   `vhost-device-vsock` daemon per VM (needs shared memfd guest RAM). A guest connection to port
//!   P arrives on the Unix socket `<uds>_P` (Firecracker's hybrid vsock), where we listen.
//!
//! Exactly one channel connection per VM is accepted: [`Channel::accept`] returns the first, and a
//! background thread refuses (closes and logs) any further one until the VM is gone.
//!
//! What is not here: framing (`channel::proto`) or the job protocol (`crate::build`).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::VsockDevice;

/// Errors setting up or accepting the channel.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Neither backend is available.
    #[error("no vsock backend: /dev/vhost-vsock is missing and vhost-device-vsock was not found in $VOUCH_CACHE/bin or $PATH (run scripts/setup-host.sh)")]
    NoBackend,
    /// The daemon did not start.
    #[error("starting vhost-device-vsock ({0})")]
    Daemon(String, #[source] io::Error),
    /// The daemon's control socket did not appear.
    #[error("vhost-device-vsock did not create {0} within 10 s")]
    DaemonSocket(PathBuf),
    /// Listening failed.
    #[error("listening for the guest channel on {0}")]
    Listen(String, #[source] io::Error),
    /// The VM ended before its agent connected.
    #[error("the VM ended before its agent connected")]
    VmGone,
    /// Nobody connected in time.
    #[error("the guest agent did not connect within {0:?}")]
    Timeout(Duration),
    /// Accepting failed.
    #[error("accepting the guest channel")]
    Accept(#[source] io::Error),
}

/// Which backend serves vsock on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Kernel vhost-vsock.
    Kernel,
    /// vhost-device-vsock at this path.
    User(PathBuf),
}

/// Find `vhost-device-vsock`: `$VOUCH_CACHE/bin`, then `$PATH`.
pub fn find_daemon() -> Option<PathBuf> {
    let cached = vm_image::cache_dir().join("bin/vhost-device-vsock");
    if cached.is_file() {
        return Some(cached);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|d| d.join("vhost-device-vsock")).find(|p| p.is_file())
    })
}

/// The backend to use: kernel vhost-vsock where `/dev/vhost-vsock` is writable, else the daemon.
pub fn detect_backend(vhost_vsock: bool) -> Result<Backend, VsockError> {
    if vhost_vsock {
        return Ok(Backend::Kernel);
    }
    find_daemon().map(Backend::User).ok_or(VsockError::NoBackend)
}

/// The accepted channel: a Unix stream (user backend) or a vsock stream (kernel backend).
#[derive(Debug)]
pub enum Stream {
    /// From vhost-device-vsock.
    Unix(UnixStream),
    /// Kernel AF_VSOCK.
    Vsock(vsock::VsockStream),
}

impl Stream {
    /// A second handle to the same connection (one thread reads, one writes).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Vsock(s) => Stream::Vsock(s.try_clone()?),
        })
    }

    /// Set `SO_RCVTIMEO` and `SO_SNDTIMEO` (shared by every clone of this connection): a read
    /// or write that waits this long fails with `WouldBlock`, so its caller can check a deadline.
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Vsock(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Shut the connection down (unblocks a reader in another thread).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Vsock(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Vsock(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Vsock(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener),
    Vsock(vsock::VsockListener, u32, #[allow(dead_code)] nix::fcntl::Flock<std::fs::File>),
}

/// The host end of one VM's channel, set up before QEMU starts.
pub struct Channel {
    listener: Listener,
    device: VsockDevice,
    daemon: Option<Child>,
    port: u32,
    done: Arc<AtomicBool>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("device", &self.device).field("port", &self.port).finish()
    }
}

fn wait_for_socket(path: &Path, daemon: &mut Child) -> Result<(), VsockError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Ok(Some(st)) = daemon.try_wait() {
            return Err(VsockError::Daemon(
                format!("it {}", super::runner::describe_exit(&st)),
                io::Error::other("daemon exited"),
            ));
        }
        if Instant::now() > deadline {
            return Err(VsockError::DaemonSocket(path.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn fresh_cid() -> u32 {
    // Unique enough per host: pid and time; collisions make QEMU fail loudly, never silently.
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    3 + ((std::process::id().wrapping_mul(7919) ^ t.subsec_nanos()) % 0x3fff_0000)
}

impl Channel {
    /// Prepare the backend for one VM whose agent connects to `port`; `dir` is the VM's private
    /// run directory (Unix sockets live there).
    pub fn prepare(backend: &Backend, dir: &Path, port: u32) -> Result<Channel, VsockError> {
        let done = Arc::new(AtomicBool::new(false));
        match backend {
            Backend::User(daemon_path) => {
                let uds = dir.join("vsock");
                let listen_path = dir.join(format!("vsock_{port}"));
                let listener = UnixListener::bind(&listen_path)
                    .map_err(|e| VsockError::Listen(listen_path.display().to_string(), e))?;
                let control = dir.join("vhost-user.sock");
                let mut cmd = Command::new(daemon_path);
                // It ignores SIGTERM: SIGKILL when the launcher dies (see `super::child`).
                let mut daemon = super::child::die_with_launcher(&mut cmd)
                    .arg("--guest-cid")
                    .arg("3")
                    .arg("--socket")
                    .arg(&control)
                    .arg("--uds-path")
                    .arg(&uds)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| VsockError::Daemon(daemon_path.display().to_string(), e))?;
                if let Err(e) = wait_for_socket(&control, &mut daemon) {
                    let _ = daemon.kill();
                    let _ = daemon.wait();
                    return Err(e);
                }
                Ok(Channel {
                    listener: Listener::Unix(listener),
                    device: VsockDevice::User { socket: control },
                    daemon: Some(daemon),
                    port,
                    done,
                })
            }
            Backend::Kernel => {
                let lock_path = vm_image::cache_dir().join(format!("vsock-port-{port}.lock"));
                let _ = std::fs::create_dir_all(vm_image::cache_dir());
                let f = std::fs::File::create(&lock_path)
                    .map_err(|e| VsockError::Listen(lock_path.display().to_string(), e))?;
                let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, e)| {
                        VsockError::Listen(lock_path.display().to_string(), e.into())
                    })?;
                let listener =
                    vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)
                        .map_err(|e| VsockError::Listen(format!("vsock port {port}"), e))?;
                let cid = fresh_cid();
                Ok(Channel {
                    listener: Listener::Vsock(listener, cid, lock),
                    device: VsockDevice::Kernel { cid },
                    daemon: None,
                    port,
                    done,
                })
            }
        }
    }

    /// The QEMU device for this channel.
    pub fn device(&self) -> &VsockDevice {
        &self.device
    }

    fn poll_readable(&self, timeout_ms: u16) -> bool {
        use nix::poll::{poll, PollFd, PollFlags};
        use std::os::fd::AsFd;
        let fd = match &self.listener {
            Listener::Unix(l) => l.as_fd(),
            Listener::Vsock(l, _, _) => l.as_fd(),
        };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        matches!(poll(&mut fds, timeout_ms), Ok(n) if n > 0)
    }

    fn accept_raw(&self) -> io::Result<Option<Stream>> {
        match &self.listener {
            Listener::Unix(l) => Ok(Some(Stream::Unix(l.accept()?.0))),
            Listener::Vsock(l, cid, _) => {
                let (s, addr) = l.accept()?;
                if addr.cid() != *cid {
                    tracing::warn!(
                        peer_cid = addr.cid(),
                        "refused a vsock connection from another VM"
                    );
                    return Ok(None);
                }
                Ok(Some(Stream::Vsock(s)))
            }
        }
    }

    /// Wait for the agent's connection (until `timeout`, or until `vm_alive` turns false), then
    /// keep refusing any further connection in the background until this channel is dropped.
    pub fn accept(
        &mut self,
        timeout: Duration,
        vm_alive: &dyn Fn() -> bool,
    ) -> Result<Stream, VsockError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            if self.poll_readable(20) {
                if let Some(s) = self.accept_raw().map_err(VsockError::Accept)? {
                    break s;
                }
            } else if !vm_alive() {
                return Err(VsockError::VmGone);
            } else if Instant::now() > deadline {
                return Err(VsockError::Timeout(timeout));
            }
        };
        self.refuse_further();
        Ok(stream)
    }

    fn refuse_further(&mut self) {
        let done = self.done.clone();
        let listener = match &self.listener {
            Listener::Unix(l) => l.try_clone().map(Listener::Unix),
            Listener::Vsock(..) => return self.refuse_further_vsock(),
        };
        let Ok(Listener::Unix(l)) = listener else { return };
        let _ = l.set_nonblocking(true);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        tracing::warn!("refused a second channel connection from the guest (exactly one per VM)");
                        eprintln!("vouch: refused a second channel connection from the guest (exactly one per VM is allowed)");
                        drop(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
    }

    fn refuse_further_vsock(&mut self) {
        let done = self.done.clone();
        let Listener::Vsock(l, _, _) = &self.listener else { return };
        let Ok(l) = l.try_clone() else { return };
        let _ = l.set_nonblocking(true);
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, addr)) => {
                        tracing::warn!(
                            peer_cid = addr.cid(),
                            "refused a second channel connection"
                        );
                        eprintln!(
                            "vouch: refused a second channel connection (CID {})",
                            addr.cid()
                        );
                        drop(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            // Reap it, but never wait forever on a process stuck in the kernel.
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(d.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The user backend end to end without QEMU: the daemon starts and creates its control
    /// socket; we connect to `<uds>_<port>` as the daemon does for a guest connection; the first
    /// connection is the channel, a second one is closed at once.
    #[test]
    fn exactly_one_connection_is_accepted() {
        let daemon = find_daemon()
            .expect("vhost-device-vsock is required: scripts/setup-host.sh installs it into $VOUCH_CACHE/bin");
        let dir = tempfile::Builder::new().prefix("vouch-vsock-").tempdir().unwrap();
        let mut chan = Channel::prepare(&Backend::User(daemon), dir.path(), 1024).unwrap();
        assert!(matches!(chan.device(), VsockDevice::User { socket } if socket.exists()));
        let listen = dir.path().join("vsock_1024");
        let mut first = UnixStream::connect(&listen).unwrap();
        let mut stream = chan.accept(Duration::from_secs(5), &|| true).unwrap();
        first.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");

        let mut second = UnixStream::connect(&listen).unwrap();
        second.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        // EOF (accepted and closed by us), not a timeout (left pending in the backlog).
        assert!(matches!(second.read(&mut b), Ok(0)), "the second connection is closed");
        // The first one still works.
        stream.write_all(b"pong").unwrap();
        first.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[test]
    fn accept_gives_up_when_the_vm_is_gone() {
        let daemon = find_daemon().expect("vhost-device-vsock is required (scripts/setup-host.sh)");
        let dir = tempfile::Builder::new().prefix("vouch-vsock-").tempdir().unwrap();
        let mut chan = Channel::prepare(&Backend::User(daemon), dir.path(), 1024).unwrap();
        assert!(matches!(chan.accept(Duration::from_secs(5), &|| false), Err(VsockError::VmGone)));
        let t = Instant::now();
        assert!(matches!(
            chan.accept(Duration::from_millis(200), &|| true),
            Err(VsockError::Timeout(_))
        ));
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
