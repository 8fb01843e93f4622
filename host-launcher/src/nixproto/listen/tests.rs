//! Tests of the socket front-end with real Unix sockets and real threads: binding (fresh, live,
//! stale, foreign files; removal only of our own socket), one handler per connection with its
//! own `SetOptions`, and the shutdown sequence (socket gone before `on_stop`, idle sessions
//! closed, a second stop cutting the grace period short).
//!
//! The handler here records what it is asked (a seam: the real one, `crate::nixbuilder`, is
//! tested behind this same front-end by `host-launcher/tests/nix_builder_socket.rs`).

use std::io::{BufReader, Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Mutex;

use super::*;
use crate::core::BuildLog;
use crate::nixproto::action::{Action, Reply};
use crate::nixproto::types::write_client_options;
use crate::nixproto::wire::{WireRead, WireWrite};
use crate::nixproto::worker::{STDERR_ERROR, STDERR_LAST, WORKER_MAGIC_1, WORKER_MAGIC_2};
use crate::nixproto::ClientOptions;

/// A pipe as the stop source: writing a byte stops the server.
struct PipeStop(OwnedFd, OwnedFd);

impl PipeStop {
    fn new() -> PipeStop {
        let (r, w) = nix::unistd::pipe().unwrap();
        PipeStop(r, w)
    }
    fn writer(&self) -> std::fs::File {
        std::fs::File::from(self.1.try_clone().unwrap())
    }
}

impl StopSource for PipeStop {
    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
    fn take(&mut self) -> String {
        let mut b = [0u8; 1];
        let _ = nix::unistd::read(&self.0, &mut b);
        format!("stop {}", b[0])
    }
}

type Seen = Arc<Mutex<Vec<(u64, u64)>>>;

/// What the sessions share with the test: the `SetOptions` they saw, and a gate that holds up
/// a session whose client set `max-silent-time` 999 (a long build), with a flag saying one is
/// held.
#[derive(Clone, Default)]
struct Shared {
    seen: Seen,
    gate: Arc<Mutex<()>>,
    held: Arc<std::sync::atomic::AtomicBool>,
    /// Each session's hang-up switch, by connection number.
    hangups: Arc<Mutex<Vec<(u64, Cancel)>>>,
}

/// Records `(connection, max_silent_time)` for every `SetOptions`; the session's own options are
/// what its later `QueryValidPaths` answers reflect (an empty set, or an error naming them).
struct Recorder {
    n: u64,
    shared: Shared,
    options: Option<ClientOptions>,
}

impl Handler for Recorder {
    fn trusted(&self) -> bool {
        false
    }

    fn handle(
        &mut self,
        action: Action<'_>,
        _log: &mut dyn BuildLog,
    ) -> Result<Reply, ActionError> {
        match action {
            Action::SetOptions(o) => {
                self.shared.seen.lock().unwrap().push((self.n, o.max_silent_time));
                self.options = Some(o);
                Ok(Reply::Done)
            }
            Action::QueryValidPaths { .. } => match &self.options {
                Some(o) if o.max_silent_time == 999 => {
                    self.shared.held.store(true, std::sync::atomic::Ordering::SeqCst);
                    drop(self.shared.gate.lock());
                    Ok(Reply::ValidPaths(Default::default()))
                }
                Some(o) => {
                    Err(format!("session {} has max-silent-time {}", self.n, o.max_silent_time)
                        .into())
                }
                None => Ok(Reply::ValidPaths(Default::default())),
            },
            other => Err(format!("unexpected {other:?}").into()),
        }
    }
}

fn cfg(grace: Duration) -> ListenConfig {
    ListenConfig {
        worker: WorkerConfig { version_string: "vouch test".into(), declared_nix: None },
        grace,
    }
}

fn factory(shared: &Shared) -> Arc<SessionFactory> {
    let shared = shared.clone();
    Arc::new(move |peer, hangup| {
        shared.hangups.lock().unwrap().push((peer.n, hangup.clone()));
        Ok(Box::new(Recorder { n: peer.n, shared: shared.clone(), options: None })
            as Box<dyn Handler + Send>)
    })
}

/// A Nix 2.8 client (worker 1.34) over the socket, after its handshake.
struct Client {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut c = Client { r: BufReader::new(s.try_clone().unwrap()), w: s };
        c.w.write_u64(WORKER_MAGIC_1).unwrap();
        c.w.write_u64(0x122).unwrap();
        c.w.write_u64(0).unwrap(); // cpu affinity
        c.w.write_u64(0).unwrap(); // reserve space
        assert_eq!(c.r.read_u64().unwrap(), WORKER_MAGIC_2);
        c.r.read_u64().unwrap();
        assert_eq!(c.r.read_string("version").unwrap(), "vouch test");
        assert_eq!(c.r.read_u64().unwrap(), STDERR_LAST);
        c
    }

    fn set_options(&mut self, max_silent_time: u64) {
        self.w.write_u64(19).unwrap();
        let o = ClientOptions { max_silent_time, ..Default::default() };
        write_client_options(&mut self.w, &o, 0x122).unwrap();
        assert_eq!(self.r.read_u64().unwrap(), STDERR_LAST);
    }

    /// `QueryValidPaths` of nothing: the session's answer (`Err`: its error message).
    fn query(&mut self) -> Result<(), String> {
        self.send_query();
        match self.r.read_u64().unwrap() {
            STDERR_LAST => {
                assert_eq!(self.r.read_u64().unwrap(), 0);
                Ok(())
            }
            STDERR_ERROR => {
                // type, level, name, message (then position and traces, none here)
                let _ = (self.r.read_string("type"), self.r.read_u64(), self.r.read_string("name"));
                let msg = self.r.read_string("message").unwrap();
                assert_eq!((self.r.read_u64().unwrap(), self.r.read_u64().unwrap()), (0, 0));
                Err(msg)
            }
            other => panic!("unexpected message {other:#x}"),
        }
    }

    fn send_query(&mut self) {
        self.w.write_u64(31).unwrap();
        self.w.write_u64(0).unwrap(); // no paths
        self.w.write_u64(0).unwrap(); // substitute
    }

    fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0))
    }
}

fn start(
    path: &Path,
    grace: Duration,
    shared: &Shared,
) -> (std::fs::File, Arc<Mutex<Option<bool>>>, JoinHandle<ServeSummary>) {
    let listener = SocketListener::bind(path).unwrap();
    let mut stop = PipeStop::new();
    let poke = stop.writer();
    // Whether the socket was already gone when `on_stop` ran.
    let stopped: Arc<Mutex<Option<bool>>> = Arc::default();
    let (flag, p, f) = (stopped.clone(), path.to_owned(), factory(shared));
    let server = std::thread::spawn(move || {
        let on_stop = || *flag.lock().unwrap() = Some(!p.exists());
        serve_socket(listener, &mut stop, &cfg(grace), f, &on_stop).unwrap()
    });
    (poke, stopped, server)
}

#[test]
fn binding_refuses_live_sockets_and_foreign_files_and_replaces_stale_ones() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("s.sock");
    let first = SocketListener::bind(&path).unwrap();
    let e = SocketListener::bind(&path).unwrap_err();
    assert!(matches!(e, ListenError::InUse(_)), "{e}");
    assert!(e.to_string().contains("live socket"), "{e}");
    drop(first);
    assert!(!path.exists(), "dropping the listener removes its socket");

    // A socket whose server died (bound, never removed): replaced.
    let stale = UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    let l = SocketListener::bind(&path).unwrap();
    UnixStream::connect(&path).expect("the replacement listens");
    drop(l);

    let file = d.path().join("file");
    std::fs::write(&file, "not a socket").unwrap();
    let e = SocketListener::bind(&file).unwrap_err();
    assert!(matches!(e, ListenError::NotASocket(_)), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a socket");

    // A socket replaced under us (by hand) is not ours to remove.
    let l = SocketListener::bind(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let other = UnixListener::bind(&path).unwrap();
    drop(l);
    assert!(path.exists(), "someone else's socket stays");
    drop(other);
}

#[test]
fn each_connection_is_its_own_session_and_stop_closes_them() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("s.sock");
    let shared = Shared::default();
    let (mut poke, stopped, server) = start(&path, Duration::from_secs(20), &shared);

    let mut a = Client::connect(&path);
    let mut b = Client::connect(&path);
    let mut fresh = Client::connect(&path);
    a.set_options(111);
    b.set_options(222);
    let ea = a.query().unwrap_err();
    let eb = b.query().unwrap_err();
    assert!(ea.contains("max-silent-time 111"), "{ea}");
    assert!(eb.contains("max-silent-time 222"), "{eb}");
    assert_eq!(fresh.query(), Ok(()), "a third session has no options");
    let mut s = shared.seen.lock().unwrap().clone();
    s.sort();
    assert_eq!(s.len(), 2);
    assert_ne!(s[0].0, s[1].0, "two handlers, one per connection: {s:?}");
    // A session that ends (its client hangs up) leaves the others running.
    drop(fresh);
    assert!(a.query().is_err());

    poke.write_all(&[1]).unwrap();
    let summary = server.join().unwrap();
    assert_eq!(summary.sessions, 3);
    assert_eq!(summary.stopped_by, "stop 1");
    assert_eq!(summary.abandoned, 0);
    assert_eq!(*stopped.lock().unwrap(), Some(true), "socket removed before on_stop");
    assert!(!path.exists());
    assert!(a.at_eof() && b.at_eof(), "idle sessions were closed");
    assert!(UnixStream::connect(&path).is_err());
}

/// A client whose query is held in its handler (the test holds `shared.gate`): a long build.
fn held_session(path: &Path, shared: &Shared) -> Client {
    let mut busy = Client::connect(path);
    busy.set_options(999);
    busy.send_query();
    let t0 = Instant::now();
    while !shared.held.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(t0.elapsed() < Duration::from_secs(20), "the session never got the query");
        std::thread::sleep(Duration::from_millis(10));
    }
    busy
}

#[test]
fn a_second_stop_cuts_the_grace_period_short() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("s.sock");
    let shared = Shared::default();
    let (mut poke, _stopped, server) = start(&path, Duration::from_secs(600), &shared);
    let gate = shared.gate.lock().unwrap();
    let busy = held_session(&path, &shared);
    let t0 = Instant::now();
    // Two stops: the first starts the shutdown, the second ends the wait for the held session.
    poke.write_all(&[1, 2]).unwrap();
    let summary = server.join().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(60), "waited out the grace period");
    assert_eq!((summary.stopped_by.as_str(), summary.abandoned), ("stop 1", 1));
    assert!(!path.exists());
    // The held session still answers once released, then its connection closes.
    drop(gate);
    let mut busy = busy;
    assert_eq!(busy.r.read_u64().unwrap(), STDERR_LAST);
    assert_eq!(busy.r.read_u64().unwrap(), 0);
    assert!(busy.at_eof());
}

#[test]
fn a_client_that_hangs_up_mid_request_trips_its_sessions_switch_only() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("s.sock");
    let shared = Shared::default();
    let (mut poke, _stopped, server) = start(&path, Duration::from_secs(20), &shared);
    let gate = shared.gate.lock().unwrap();
    let mut idle = Client::connect(&path);
    idle.set_options(1);
    // The busy session is "building" (held in its handler) when its client goes away.
    let busy = held_session(&path, &shared);
    drop(busy);
    let tripped =
        |n: u64| shared.hangups.lock().unwrap().iter().any(|(k, c)| *k == n && c.is_cancelled());
    let t0 = Instant::now();
    while !tripped(2) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the hang-up was not noticed: {:?}",
            shared
                .hangups
                .lock()
                .unwrap()
                .iter()
                .map(|(k, c)| (*k, c.is_cancelled()))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!tripped(1), "the other client is still there");
    assert!(idle.query().is_err(), "and still served");
    drop(gate);
    poke.write_all(&[1]).unwrap();
    assert_eq!(server.join().unwrap().abandoned, 0);
}
