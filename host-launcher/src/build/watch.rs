//! The host's channel watchdog: no read or write on a guest channel waits forever.
//!
//! The guest sends a heartbeat every couple of seconds (`channel::liveness`), so a healthy channel
//! never goes quiet, whatever the builder does. [`ChannelWatch`] turns silence into an error:
//! - **boot**: no frame at all (not even `Hello`) by QEMU start + the boot timeout, and, for
//!   a boot's watch ([`ChannelWatch::for_boot`]), no `Ready` by then either (whatever else
//!   the guest sends);
//! - **read stall**: after the first frame, no complete frame (heartbeat or data) for the stall
//!   window;
//! - **write stall**: a write to the guest that makes no progress for the stall window (the
//!   guest stopped taking input while still heartbeating, e.g. a stalled host→guest direction).
//!
//! The channel's socket gets short `SO_RCVTIMEO`/`SO_SNDTIMEO` ticks; [`GuardedReader`] and
//! [`GuardedWriter`] retry on each tick until the watch trips, then fail with the trip's message.
//! The first trip is recorded ([`ChannelWatch::tripped`]), so the caller can report it precisely
//! whatever error chain it travelled through, kill the VM and register nothing.
//!
//! What is not here: the frames (`channel::proto`), killing QEMU (`super::host`).

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use channel::proto::Liveness;

use crate::vm::vsock::Stream;

/// Default stall window: no frame from the guest for this long fails the step.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A duration in seconds for messages (`60`, or `0.3` below a second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secs(pub Duration);

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.subsec_millis() == 0 {
            write!(f, "{}", self.0.as_secs())
        } else {
            write!(f, "{:.1}", self.0.as_secs_f64())
        }
    }
}

/// Why the watch gave up on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Trip {
    /// The agent did not say hello in time.
    #[error("the guest agent did not say hello within {} s of QEMU's start (boot watchdog)", Secs(*.0))]
    NoHello(Duration),
    /// The agent said hello but was not ready (launch accepted) in time.
    #[error("the guest agent was not ready within {} s of QEMU's start (boot watchdog)", Secs(*.0))]
    NotReady(Duration),
    /// No frame for the stall window.
    #[error("channel stalled: no frame from the guest for {} s", Secs(*.0))]
    Silent(Duration),
    /// The guest took no bytes for the stall window.
    #[error("channel stalled: the guest accepted no data for {} s", Secs(*.0))]
    NotReading(Duration),
}

/// Deadlines of one channel (see the module docs).
#[derive(Debug)]
pub struct ChannelWatch {
    liveness: Arc<Liveness>,
    window: Duration,
    hello_by: Instant,
    boot_timeout: Duration,
    /// A boot's hard deadline: QEMU start + the boot timeout.
    ready_by: Option<Instant>,
    tripped: Mutex<Option<Trip>>,
}

impl ChannelWatch {
    /// A watch for a channel of a VM started at `started`: the first frame is due by
    /// `started + boot_timeout`, then one at least every `window`.
    pub fn new(started: Instant, boot_timeout: Duration, window: Duration) -> Arc<ChannelWatch> {
        Arc::new(ChannelWatch {
            liveness: Liveness::new(),
            window,
            hello_by: started + boot_timeout,
            boot_timeout,
            ready_by: None,
            tripped: Mutex::new(None),
        })
    }

    /// A watch for a boot: as [`ChannelWatch::new`], and everything read must be read by
    /// `started + boot_timeout` (the caller reads up to the agent's `Ready`).
    pub fn for_boot(
        started: Instant,
        boot_timeout: Duration,
        window: Duration,
    ) -> Arc<ChannelWatch> {
        Arc::new(ChannelWatch {
            liveness: Liveness::new(),
            window,
            hello_by: started + boot_timeout,
            boot_timeout,
            ready_by: Some(started + boot_timeout),
            tripped: Mutex::new(None),
        })
    }

    /// A watch for the job of a VM whose agent is already ready (it booted earlier, e.g. in a
    /// warm pool): a frame at least every `window` from now.
    pub fn for_job(window: Duration) -> Arc<ChannelWatch> {
        let watch = ChannelWatch::new(Instant::now(), window, window);
        watch.liveness.beat();
        watch
    }

    /// What the frame reader stamps.
    pub fn liveness(&self) -> Arc<Liveness> {
        self.liveness.clone()
    }

    /// The first trip, if the watch gave up.
    pub fn tripped(&self) -> Option<Trip> {
        *self.tripped.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn trip(&self, t: Trip) -> io::Error {
        let first = *self.tripped.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(t);
        tracing::info!("{first}");
        io::Error::new(io::ErrorKind::TimedOut, first.to_string())
    }

    /// Whether reading has waited too long now.
    fn read_overdue(&self) -> Option<Trip> {
        if self.liveness.frames() == 0 {
            (Instant::now() >= self.hello_by).then_some(Trip::NoHello(self.boot_timeout))
        } else if self.ready_by.is_some_and(|t| Instant::now() >= t) {
            Some(Trip::NotReady(self.boot_timeout))
        } else {
            (self.liveness.silent_for() >= self.window).then_some(Trip::Silent(self.window))
        }
    }

    /// How often a blocked read or write wakes up to check its deadline.
    pub fn tick(&self) -> Duration {
        (self.window / 8).clamp(Duration::from_millis(10), Duration::from_millis(500))
    }

    /// Set the socket's timeouts to [`Self::tick`] and wrap its two ends.
    pub fn guard(
        self: &Arc<Self>,
        reader: Stream,
        writer: Stream,
    ) -> io::Result<(GuardedReader, GuardedWriter)> {
        // The clones share one socket: both options are set once, for both ends.
        reader.set_timeouts(Some(self.tick()))?;
        Ok((
            GuardedReader { stream: reader, watch: self.clone() },
            GuardedWriter { stream: writer, watch: self.clone() },
        ))
    }
}

fn is_tick(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// The read end, failing once the watch trips.
#[derive(Debug)]
pub struct GuardedReader {
    stream: Stream,
    watch: Arc<ChannelWatch>,
}

impl Read for GuardedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(t) = self.watch.tripped() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, t.to_string()));
            }
            // A boot's deadline holds even while frames keep coming.
            if self.watch.ready_by.is_some_and(|t| Instant::now() >= t) {
                if let Some(t) = self.watch.read_overdue() {
                    return Err(self.watch.trip(t));
                }
            }
            match self.stream.read(buf) {
                Err(e) if is_tick(&e) || e.kind() == io::ErrorKind::Interrupted => {
                    if let Some(t) = self.watch.read_overdue() {
                        return Err(self.watch.trip(t));
                    }
                }
                other => return other,
            }
        }
    }
}

/// The write end, failing when a write makes no progress for the window.
#[derive(Debug)]
pub struct GuardedWriter {
    stream: Stream,
    watch: Arc<ChannelWatch>,
}

impl Write for GuardedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let since = Instant::now();
        loop {
            if let Some(t) = self.watch.tripped() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, t.to_string()));
            }
            match self.stream.write(buf) {
                Err(e) if is_tick(&e) || e.kind() == io::ErrorKind::Interrupted => {
                    if since.elapsed() >= self.watch.window {
                        return Err(self.watch.trip(Trip::NotReading(self.watch.window)));
                    }
                }
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use channel::proto::{FrameReader, FrameWriter, Kind};
    use std::os::unix::net::UnixStream;

    fn pair(watch: &Arc<ChannelWatch>) -> (GuardedReader, GuardedWriter, UnixStream) {
        let (host, guest) = UnixStream::pair().unwrap();
        let r = Stream::Unix(host.try_clone().unwrap());
        let (r, w) = watch.guard(r, Stream::Unix(host)).unwrap();
        (r, w, guest)
    }

    #[test]
    fn a_silent_guest_trips_the_read_watch() {
        let watch =
            ChannelWatch::new(Instant::now(), Duration::from_secs(60), Duration::from_secs(1));
        let (r, _w, guest) = pair(&watch);
        let mut fw = FrameWriter::new(guest.try_clone().unwrap());
        fw.send(Kind::Hello, b"{}").unwrap();
        let mut fr = FrameReader::with_liveness(r, watch.liveness());
        fr.expect(Kind::Hello, "hello").unwrap();
        // Heartbeats (10 per window) keep it alive past the window...
        let t = Instant::now();
        let beats = std::thread::spawn(move || {
            for _ in 0..15 {
                std::thread::sleep(Duration::from_millis(100));
                fw.send(Kind::Heartbeat, b"{}").unwrap();
            }
            fw.send(Kind::Log, b"still here").unwrap();
            fw // then silence, with the socket still open
        });
        assert_eq!(fr.expect(Kind::Log, "log").unwrap().payload, b"still here");
        assert!(t.elapsed() >= Duration::from_millis(1500));
        let _fw = beats.join().unwrap();
        // ... silence does not.
        let t = Instant::now();
        let e = fr.next_frame().unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(900), "{:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(10));
        assert_eq!(watch.tripped(), Some(Trip::Silent(Duration::from_secs(1))));
        let chain = build_trace::error_chain(&e);
        assert!(chain.contains("channel stalled: no frame from the guest for 1 s"), "{chain}");
        assert_eq!(fr.heartbeats(), 15);
        drop(guest);
    }

    #[test]
    fn no_hello_trips_the_boot_watch_and_a_stall_mid_frame_too() {
        let watch =
            ChannelWatch::new(Instant::now(), Duration::from_millis(200), Duration::from_secs(60));
        let (r, _w, guest) = pair(&watch);
        let mut fr = FrameReader::with_liveness(r, watch.liveness());
        let e = fr.next_frame().unwrap_err();
        assert_eq!(watch.tripped(), Some(Trip::NoHello(Duration::from_millis(200))));
        assert!(
            e.to_string().contains("channel")
                || build_trace::error_chain(&e).contains("boot watchdog")
        );

        // Half a frame, then nothing: a stall inside a frame is a stall.
        let watch =
            ChannelWatch::new(Instant::now(), Duration::from_secs(60), Duration::from_millis(200));
        let (r, _w, mut guest2) = pair(&watch);
        let mut fr = FrameReader::with_liveness(r, watch.liveness());
        FrameWriter::new(&mut guest2).send(Kind::Hello, b"{}").unwrap();
        fr.expect(Kind::Hello, "hello").unwrap();
        guest2.write_all(b"\x08\0\0\0\x10\0\0\0abc").unwrap();
        assert!(fr.next_frame().is_err());
        assert_eq!(watch.tripped(), Some(Trip::Silent(Duration::from_millis(200))));
        drop(guest);
    }

    /// A boot's watch: a guest that says hello and keeps heartbeating but never gets ready
    /// meets the boot deadline all the same.
    #[test]
    fn a_boot_that_never_gets_ready_trips_while_frames_keep_coming() {
        let boot = Duration::from_millis(500);
        let watch = ChannelWatch::for_boot(Instant::now(), boot, Duration::from_secs(60));
        let (r, _w, guest) = pair(&watch);
        let mut fw = FrameWriter::new(guest.try_clone().unwrap());
        fw.send(Kind::Hello, b"{}").unwrap();
        let mut fr = FrameReader::with_liveness(r, watch.liveness());
        fr.expect(Kind::Hello, "hello").unwrap();
        let t = Instant::now();
        let beats = std::thread::spawn(move || {
            for _ in 0..40 {
                std::thread::sleep(Duration::from_millis(50));
                if fw.send(Kind::Heartbeat, b"{}").is_err() {
                    break;
                }
            }
        });
        let e = fr.next_frame().unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        assert_eq!(watch.tripped(), Some(Trip::NotReady(boot)));
        assert!(build_trace::error_chain(&e).contains("was not ready within 0.5 s"), "{e}");
        assert!(fr.heartbeats() >= 3, "heartbeats kept coming: {}", fr.heartbeats());
        beats.join().unwrap();
        drop(guest);
    }

    #[test]
    fn a_guest_that_stops_reading_trips_the_write_watch() {
        let watch =
            ChannelWatch::new(Instant::now(), Duration::from_secs(60), Duration::from_millis(300));
        let (_r, w, guest) = pair(&watch);
        let mut fw = FrameWriter::new(w);
        let chunk = vec![0u8; 64 << 10];
        let t = Instant::now();
        let mut sent = 0;
        let err = loop {
            match fw.send(Kind::NarChunk, &chunk) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(t.elapsed() < Duration::from_secs(10), "never blocked");
        };
        assert!(sent >= 1, "the socket buffer took something first");
        assert_eq!(watch.tripped(), Some(Trip::NotReading(Duration::from_millis(300))));
        assert!(build_trace::error_chain(&err).contains("the guest accepted no data"), "{err}");
        drop(guest);
    }
}
