//! The worker protocol on a Unix socket (`vouch nix-builder --listen PATH`): what a Nix client
//! reaches with the store URI or builder `unix://PATH`.
//!
//! One thread per connection, each its own session: a fresh [`Handler`] made for it (so its own
//! `SetOptions` and its own pins in the content store), driven by the same worker front-end as
//! `--stdio` ([`super::worker::serve`]). Nix opens one connection per build, as it starts one
//! process per build over `ssh-ng://`.
//!
//! - **Binding** ([`SocketListener::bind`]): a path that does not exist is bound; a socket that
//!   answers a connection is live and refused (another server owns it); a socket that refuses
//!   connections is stale (its server died) and replaced; anything else is refused. The socket
//!   is removed when the listener is dropped, if it is still the one we bound.
//! - **Shutdown** ([`serve_socket`]): when the stop source fires (the CLI's `Signals`: SIGINT or
//!   SIGTERM), the socket is closed and removed at once, `on_stop` runs (the CLI cancels running
//!   builds, killing their VMs: each client gets a failed build with the reason), the reading
//!   side of every open connection is shut down (a session waiting for its client's next
//!   operation ends; one that is answering finishes its answer first), and the sessions get
//!   `grace` to end. A second signal stops the wait.
//! - **Hang-up** ([`watch_hangup`]): a client that goes away while its build runs stops that build
//!   (its VM is killed; nothing is registered): the session's switch trips.
//!
//! Who may connect is decided by the socket's file permissions (and its directory's). Who is
//! trusted is decided per connection from the peer's credentials (`SO_PEERCRED`: the user id
//! of the connecting process, which the kernel vouches for): the [`SessionFactory`] gets them
//! in a [`Peer`] and makes a trusted or an untrusted session.
//!
//! What is not here: the protocol ([`super::worker`]), what sessions do (the [`Handler`],
//! `crate::nixbuilder`), signal handling (`crate::signals`).

use std::io::{BufReader, BufWriter};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::action::{error_chain, ActionError, Handler};
use super::worker::{self, WorkerConfig};
use super::{ServerError, WireError};
use crate::build::Cancel;
use crate::signals::StopSource;

/// How long sessions get to end after a shutdown began, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// Why the socket server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A server is already listening there.
    #[error("{0} is a live socket (another server answers on it); not starting a second one")]
    InUse(PathBuf),
    /// The path is taken by something that is not a socket.
    #[error("{0} exists and is not a socket; not replacing it")]
    NotASocket(PathBuf),
    /// Looking at, probing, removing or binding the path failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for connections or signals failed.
    #[error("waiting for connections")]
    Poll(#[source] nix::Error),
}

fn io_err<'p>(
    what: &'static str,
    path: &'p Path,
) -> impl FnOnce(std::io::Error) -> ListenError + 'p {
    move |source| ListenError::Io { what, path: path.to_owned(), source }
}

/// A bound, listening Unix socket; the socket file is removed on drop if it is still ours.
#[derive(Debug)]
pub struct SocketListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file we created.
    file: (u64, u64),
    /// Whether a stale socket was replaced.
    replaced_stale: bool,
}

impl SocketListener {
    /// Bind `path` (see the module docs for live, stale and foreign files).
    pub fn bind(path: &Path) -> Result<SocketListener, ListenError> {
        let mut replaced_stale = false;
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("looking at", path)(e)),
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ListenError::NotASocket(path.to_owned()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(ListenError::InUse(path.to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale socket (its server is gone)");
                    std::fs::remove_file(path)
                        .map_err(io_err("removing the stale socket", path))?;
                    replaced_stale = true;
                }
                Err(e) => return Err(io_err("probing the existing socket", path)(e)),
            },
        }
        let listener = UnixListener::bind(path).map_err(io_err("binding", path))?;
        listener.set_nonblocking(true).map_err(io_err("setting up", path))?;
        let m = std::fs::symlink_metadata(path).map_err(io_err("looking at", path))?;
        Ok(SocketListener {
            listener,
            path: path.to_owned(),
            file: (m.dev(), m.ino()),
            replaced_stale,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether binding replaced a stale socket (its server had died).
    pub fn replaced_stale(&self) -> bool {
        self.replaced_stale
    }
}

impl Drop for SocketListener {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .map(|m| (m.dev(), m.ino()) == self.file)
            .unwrap_or(false);
        if ours {
            match std::fs::remove_file(&self.path) {
                Ok(()) => tracing::info!(path = %self.path.display(), "socket removed"),
                Err(e) => tracing::warn!(path = %self.path.display(), "removing the socket: {e}"),
            }
        }
    }
}

/// Who connected: the connection's number (from 1) and the peer process's credentials as the
/// kernel gives them (`SO_PEERCRED`; `None` if they could not be read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The connection's number.
    pub n: u64,
    /// The peer's user id.
    pub uid: Option<u32>,
    /// The peer's process id.
    pub pid: Option<i32>,
}

/// Makes the handler of one session. Its arguments: the peer that connected, and a switch that
/// trips when the client hangs up ([`watch_hangup`]): the session's builds should follow it,
/// since nobody waits for their results any more.
pub type SessionFactory =
    dyn Fn(&Peer, &Cancel) -> Result<Box<dyn Handler + Send>, ActionError> + Send + Sync;

/// How [`serve_socket`] runs.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// The worker front-end's settings (shared by every session).
    pub worker: WorkerConfig,
    /// How long sessions get to end after a shutdown began.
    pub grace: Duration,
}

/// What a server run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeSummary {
    /// Connections accepted.
    pub sessions: u64,
    /// What stopped the server.
    pub stopped_by: String,
    /// Sessions still running when the grace period ended (or a second signal came).
    pub abandoned: usize,
}

struct Session {
    stream: UnixStream,
    thread: JoinHandle<()>,
}

/// Shuts a connection down (both directions, every handle) when dropped.
struct CloseOnDrop(UnixStream);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Accept connections on `listener` until `stop` fires, one session thread each (see the module
/// docs); then shut down as described there and return. The socket file is removed before
/// `on_stop` runs.
pub fn serve_socket(
    listener: SocketListener,
    stop: &mut dyn StopSource,
    cfg: &ListenConfig,
    new_session: Arc<SessionFactory>,
    on_stop: &dyn Fn(),
) -> Result<ServeSummary, ListenError> {
    tracing::info!(path = %listener.path().display(), "listening for Nix clients (worker protocol)");
    let mut sessions: Vec<Session> = Vec::new();
    let mut n = 0u64;
    let stopped_by = loop {
        let (conn, stopping) = {
            let mut fds = [
                PollFd::new(listener.listener.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(ListenError::Poll(e)),
                Ok(_) => {}
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if stopping {
            break stop.take();
        }
        if !conn {
            continue;
        }
        let stream = match listener.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // A failed accept (e.g. out of descriptors) ends that connection, not the server.
                tracing::warn!("accepting a connection: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        n += 1;
        sessions.retain(|s| !s.thread.is_finished());
        match spawn_session(n, stream, cfg.worker.clone(), new_session.clone()) {
            Ok(s) => sessions.push(s),
            Err(e) => tracing::warn!(session = n, "starting the session: {e}"),
        }
    };

    tracing::info!(signal = %stopped_by, open = sessions.len(), "shutting down");
    drop(listener);
    on_stop();
    for s in &sessions {
        let _ = s.stream.shutdown(std::net::Shutdown::Read);
    }
    let deadline = Instant::now() + cfg.grace;
    loop {
        sessions.retain(|s| !s.thread.is_finished());
        if sessions.is_empty() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!(open = sessions.len(), "sessions did not end within {:?}", cfg.grace);
            break;
        }
        let mut fds = [PollFd::new(stop.fd(), PollFlags::POLLIN)];
        let wait =
            PollTimeout::try_from(left.min(Duration::from_millis(50))).unwrap_or(PollTimeout::ZERO);
        if matches!(poll(&mut fds, wait), Ok(k) if k > 0) {
            let second = stop.take();
            tracing::warn!(signal = %second, open = sessions.len(), "not waiting for the sessions");
            break;
        }
    }
    Ok(ServeSummary { sessions: n, stopped_by, abandoned: sessions.len() })
}

fn spawn_session(
    n: u64,
    stream: UnixStream,
    cfg: WorkerConfig,
    new_session: Arc<SessionFactory>,
) -> std::io::Result<Session> {
    let creds = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials);
    let peer = Peer {
        n,
        uid: creds.as_ref().ok().map(|c| c.uid()),
        pid: creds.as_ref().ok().map(|c| c.pid()),
    };
    let who = match creds {
        Ok(c) => format!("pid {} uid {}", c.pid(), c.uid()),
        Err(_) => "unknown peer".into(),
    };
    let reader = stream.try_clone()?;
    let writer = stream.try_clone()?;
    let closer = CloseOnDrop(stream.try_clone()?);
    let hangup = Cancel::default();
    let session_over = Arc::new(AtomicBool::new(false));
    watch_hangup(stream.try_clone()?.into(), hangup.clone(), session_over.clone(), n)?;
    let thread = std::thread::Builder::new().name(format!("session-{n}")).spawn(move || {
        // However the session ends, the client sees the connection close (the server keeps a
        // handle of its own to shut it down).
        let _closer = closer;
        let over = SetOnDrop(session_over);
        let span = tracing::info_span!("session", n, peer = %who);
        let _entered = span.enter();
        let mut handler = match new_session(&peer, &hangup) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("cannot open a session: {}", error_chain(e.as_ref()));
                return;
            }
        };
        let r = BufReader::with_capacity(1 << 16, reader);
        let w = BufWriter::with_capacity(1 << 16, writer);
        let served = worker::serve(r, w, &cfg, handler.as_mut());
        drop(over);
        match served {
            Ok(()) => tracing::info!("session ended"),
            Err(ServerError::Wire(WireError::Eof)) => tracing::info!("the client went away"),
            Err(ServerError::PeerGone(kind)) => {
                tracing::warn!(
                    ?kind,
                    "the client went away mid-upload; nothing of it was registered"
                )
            }
            Err(e) => tracing::warn!("session failed: {}", error_chain(&e)),
        }
    })?;
    Ok(Session { stream, thread })
}

/// Sets its flag when dropped (however the session thread ends).
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// How long a session may take to end by itself after its client hung up.
const HANGUP_GRACE: Duration = Duration::from_millis(200);

/// Trip `hangup` when the peer of `conn` hangs up (closes its end, or is killed), until `over`
/// is set; a thread named after session `n` watches. A Nix client never half-closes a session
/// it still wants: it waits for every answer, a build's included. So a hang-up while its build
/// runs means nobody will read the result, and the build's VM is stopped (not left running to
/// its end for nobody). Works on sockets (`POLLRDHUP`) and pipes (`POLLHUP`), so it serves
/// `--stdio` (stdin) too.
pub fn watch_hangup(
    conn: std::os::fd::OwnedFd,
    hangup: Cancel,
    over: Arc<AtomicBool>,
    n: u64,
) -> std::io::Result<()> {
    std::thread::Builder::new().name(format!("hangup-{n}")).spawn(move || {
        // POLLRDHUP (the peer closed its end) is Linux's; `nix` has no name for it. Only it is
        // asked for, and POLLHUP/POLLERR/POLLNVAL come unasked: any event means the peer is gone.
        let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
        while !over.load(Ordering::SeqCst) {
            let mut fds = [PollFd::new(conn.as_fd(), rdhup)];
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(k) if k > 0 => {
                    // A session that was only waiting for its client ends by itself now; one
                    // that is still busy a moment later is working for nobody.
                    std::thread::sleep(HANGUP_GRACE);
                    if !over.load(Ordering::SeqCst) {
                        tracing::info!(session = n, "the client hung up: stopping its builds");
                        hangup.cancel();
                    }
                    return;
                }
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => {
                    tracing::warn!(session = n, "watching the client for a hang-up: {e}");
                    return;
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests;
