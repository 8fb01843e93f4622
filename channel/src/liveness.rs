//! Keeping the channel observably alive: the guest's heartbeat and the record a host watchdog
//! reads. Specified with the framing in `docs/channel.md`.
//!
//! - [`SharedFrameWriter`]: one channel writer shared by several threads. Each frame is written
//!   whole under a lock, so frames from different threads never interleave; a multi-frame
//!   sequence (a NAR stream) takes the lock per frame, which lets heartbeats slip in between —
//!   the protocol allows them anywhere.
//! - [`Heartbeat`]: the guest's heartbeat thread (spawned ahead, parked, by a VM that waits
//!   for its job). From the job's arrival until just before `Bye` it sends a [`crate::proto::Kind::Heartbeat`] every [`HEARTBEAT_INTERVAL`], in every
//!   phase and independent of builder output, so a host can tell a silent build from a stalled
//!   channel.
//! - [`Liveness`]: when the last complete frame (heartbeat or data) arrived; a
//!   [`crate::proto::FrameReader`] stamps it, a watchdog on the host reads it.
//!
//! What is not here: the host's watchdog itself (`host_launcher::build::watch`).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::messages::Heartbeat as HeartbeatMsg;
use crate::proto::{send_nar_frames, FrameWriter, Kind, ProtoError};

/// How often the guest sends a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// When the last complete frame arrived, shared between a reader and a watchdog.
#[derive(Debug)]
pub struct Liveness {
    origin: Instant,
    /// Milliseconds after `origin` of the last frame.
    last_ms: AtomicU64,
    frames: AtomicU64,
}

impl Liveness {
    /// A record whose clock starts now (as if a frame had just arrived; [`Self::frames`] is 0).
    pub fn new() -> Arc<Liveness> {
        Arc::new(Liveness {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            frames: AtomicU64::new(0),
        })
    }

    /// A frame arrived.
    pub fn beat(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
        self.frames.fetch_add(1, Ordering::Relaxed);
    }

    /// Time since the last frame (or since creation, before the first).
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Frames seen so far.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}

/// A [`FrameWriter`] several threads can use (see the module docs).
#[derive(Debug)]
pub struct SharedFrameWriter<W: Write> {
    inner: Arc<Mutex<FrameWriter<W>>>,
}

impl<W: Write> Clone for SharedFrameWriter<W> {
    fn clone(&self) -> Self {
        SharedFrameWriter { inner: self.inner.clone() }
    }
}

impl<W: Write> SharedFrameWriter<W> {
    /// Share `w`.
    pub fn new(w: FrameWriter<W>) -> Self {
        SharedFrameWriter { inner: Arc::new(Mutex::new(w)) }
    }

    fn lock(&self) -> MutexGuard<'_, FrameWriter<W>> {
        // A thread that panicked mid-frame leaves the stream unusable anyway; the next write
        // fails or the host rejects the frame.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write one frame, whole.
    pub fn send(&self, kind: Kind, payload: &[u8]) -> Result<(), ProtoError> {
        self.lock().send(kind, payload)
    }

    /// Write one JSON frame, whole.
    pub fn send_json<T: serde::Serialize>(&self, kind: Kind, value: &T) -> Result<(), ProtoError> {
        self.lock().send_json(kind, value)
    }

    /// Send `nar` as `NarBegin`, chunks, `NarEnd` (the lock is taken per frame). Returns the
    /// number of NAR bytes sent.
    pub fn send_nar<T: serde::Serialize>(
        &self,
        begin: &T,
        nar: &mut dyn std::io::Read,
    ) -> Result<u64, ProtoError> {
        send_nar_frames(&mut |k, p| self.send(k, p), begin, nar)
    }

    /// Flush the transport.
    pub fn flush(&self) -> Result<(), ProtoError> {
        self.lock().flush()
    }
}

/// The guest's heartbeat thread (see the module docs). Stopped by [`Heartbeat::stop`] or on drop;
/// after that no heartbeat is written.
#[derive(Debug)]
pub struct Heartbeat {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<u64>>,
}

impl Heartbeat {
    /// Start sending a heartbeat through `w` every `interval` (the first one after `interval`).
    /// `uptime_ms` gives the guest's clock for the payload. The thread ends at the first write
    /// error (the channel is gone; the session notices on its own writes).
    pub fn start<W: Write + Send + 'static>(
        w: SharedFrameWriter<W>,
        interval: Duration,
        uptime_ms: fn() -> u64,
    ) -> Heartbeat {
        let h = Heartbeat::parked(w, interval, uptime_ms);
        h.go();
        h
    }

    /// Spawn the heartbeat thread now but send nothing until [`Heartbeat::go`] (a pool VM
    /// spawns it before its job exists and starts it when the job arrives: creating a thread is
    /// slow under TCG). Stopping or dropping a parked heartbeat ends the thread silently.
    pub fn parked<W: Write + Send + 'static>(
        w: SharedFrameWriter<W>,
        interval: Duration,
        uptime_ms: fn() -> u64,
    ) -> Heartbeat {
        let (stop, rx) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("heartbeat".into()).spawn(move || {
            // Parked until `go` (one message) or stopped (the sender dropped).
            if rx.recv().is_err() {
                return 0;
            }
            let mut seq = 0u64;
            loop {
                match rx.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    // Stopped (the sender was dropped).
                    _ => return seq,
                }
                seq += 1;
                let beat = HeartbeatMsg { seq, uptime_ms: uptime_ms() };
                if w.send_json(Kind::Heartbeat, &beat).is_err() {
                    return seq - 1;
                }
            }
        });
        match thread {
            Ok(t) => Heartbeat { stop: Some(stop), thread: Some(t) },
            // No thread: the host's watchdog will see a silent guest and say so.
            Err(_) => Heartbeat { stop: None, thread: None },
        }
    }

    /// Start a parked heartbeat (the first beat comes one interval later). Once only: a second
    /// call stops it.
    pub fn go(&self) {
        if let Some(s) = &self.stop {
            let _ = s.send(());
        }
    }

    /// Stop the thread and wait for it; returns the number of heartbeats sent.
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        drop(self.stop.take());
        self.thread.take().map(|t| t.join().unwrap_or(0)).unwrap_or(0)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FrameReader;

    /// A writer that records each `write` call separately.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            // Accept at most 5000 bytes per call, like a socket with little buffer space.
            let n = buf.len().min(5000);
            self.0.lock().unwrap().push(buf[..n].to_vec());
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Calls {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().concat()
        }
    }

    #[test]
    fn heartbeats_interleave_whole_frames_with_other_writers() {
        let calls = Calls::default();
        let w = SharedFrameWriter::new(FrameWriter::with_max_write(calls.clone(), 4096));
        let hb = Heartbeat::start(w.clone(), Duration::from_millis(1), || 7);
        // Another thread writes big frames and a NAR stream meanwhile.
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let w2 = w.clone();
        let d2 = data.clone();
        let other = std::thread::spawn(move || {
            for _ in 0..20 {
                w2.send(Kind::Log, &d2[..70_000]).unwrap();
            }
            w2.send_nar(
                &serde_json::json!({"path": "/nix/store/x", "nar_size": 300_000}),
                &mut &d2[..],
            )
            .unwrap();
        });
        other.join().unwrap();
        // Only the heartbeat writes now: wait until it has (however loaded the machine is).
        let after_other = calls.0.lock().unwrap().len();
        let t = Instant::now();
        while calls.0.lock().unwrap().len() == after_other {
            assert!(t.elapsed() < Duration::from_secs(30), "no heartbeat");
            std::thread::sleep(Duration::from_millis(1));
        }
        let sent = hb.stop();
        assert!(sent > 0, "heartbeats were sent");
        w.send(Kind::Bye, &[]).unwrap();
        // No write call exceeded the limit.
        assert!(calls.0.lock().unwrap().iter().all(|c| c.len() <= 4096));

        let bytes = calls.bytes();
        let live = Liveness::new();
        let mut r = FrameReader::with_liveness(&bytes[..], live.clone());
        for _ in 0..20 {
            let f = r.expect(Kind::Log, "log").unwrap();
            assert_eq!(f.payload, &data[..70_000]);
        }
        r.expect(Kind::NarBegin, "begin").unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut r.nar_stream("/nix/store/x", 300_000), &mut got).unwrap();
        assert_eq!(got, data);
        r.expect(Kind::Bye, "bye").unwrap();
        assert!(r.next_frame().unwrap().is_none(), "nothing after Bye: the heartbeat stopped");
        assert_eq!(r.heartbeats(), sent);
        // 20 logs, NarBegin, two chunks, NarEnd, Bye, and the heartbeats.
        assert_eq!(live.frames(), 20 + 1 + 2 + 1 + 1 + sent);
    }

    #[test]
    fn heartbeat_payload_and_stop_without_beats() {
        let calls = Calls::default();
        let w = SharedFrameWriter::new(FrameWriter::new(calls.clone()));
        let hb = Heartbeat::start(w.clone(), Duration::from_millis(1), || 1234);
        while calls.0.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        hb.stop();
        let bytes = calls.bytes();
        assert_eq!(bytes[0], Kind::Heartbeat as u8);
        let msg: HeartbeatMsg = serde_json::from_slice(&bytes[8..][..bytes[4] as usize]).unwrap();
        assert_eq!((msg.seq, msg.uptime_ms), (1, 1234));
        // A long interval: stopping does not wait for it.
        let t = Instant::now();
        Heartbeat::start(w, Duration::from_secs(3600), || 0).stop();
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_parked_heartbeat_is_silent_until_go() {
        let calls = Calls::default();
        let w = SharedFrameWriter::new(FrameWriter::new(calls.clone()));
        let hb = Heartbeat::parked(w.clone(), Duration::from_millis(1), || 7);
        std::thread::sleep(Duration::from_millis(50));
        assert!(calls.0.lock().unwrap().is_empty(), "parked: no beat");
        hb.go();
        while calls.0.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(hb.stop() >= 1);
        // Stopped while parked: the thread ends without a beat.
        let quiet = Calls::default();
        let hb = Heartbeat::parked(
            SharedFrameWriter::new(FrameWriter::new(quiet.clone())),
            Duration::from_millis(1),
            || 0,
        );
        assert_eq!(hb.stop(), 0);
        assert!(quiet.0.lock().unwrap().is_empty());
    }

    #[test]
    fn liveness_measures_silence() {
        let l = Liveness::new();
        std::thread::sleep(Duration::from_millis(300));
        let before = l.silent_for();
        assert!(before >= Duration::from_millis(300));
        l.beat();
        assert!(l.silent_for() < before, "a frame resets the silence");
        assert_eq!(l.frames(), 1);
    }
}
