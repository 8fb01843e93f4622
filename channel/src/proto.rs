//! The host↔guest channel framing (shared with the host launcher). Specified in `docs/channel.md`.
//!
//! Every message is one frame: an 8-byte header — kind (`u8`), three zero bytes, payload length
//! (`u32` little-endian) — then the payload. Nothing is ever delimited by EOF: the userspace vsock
//! backend turns a half-close into a full reset, so each side knows from the frames alone when
//! the other is done. Byte streams (NARs) are split into [`Kind::NarChunk`] frames between a
//! [`Kind::NarBegin`] and an explicit [`Kind::NarEnd`]. Control payloads are JSON (see
//! `messages`); the launch and the job travel as their canonical bytes, because HOST_DATA and
//! the job digest are their hashes.
//!
//! [`Kind::Heartbeat`] frames are link-level: the guest sends one every few seconds from its own
//! thread, they may come between any two frames (also inside a NAR stream), and a
//! [`FrameReader`] consumes them itself, recording the arrival of every frame in a shared
//! [`Liveness`] that a watchdog reads (`crate::liveness`).
//!
//! What is here: [`Kind`], [`Frame`], [`FrameReader`]/[`FrameWriter`] with limits (including the
//! guest's per-write size limit, [`GUEST_MAX_WRITE`]), and adapters that send a `Read` as a NAR
//! stream and expose a received NAR stream as a `Read`.
//! What is not here: what the messages mean (see `messages`), the heartbeat thread and the
//! shared writer (`crate::liveness`), or any socket setup.

use std::io::{self, Read, Write};
use std::sync::Arc;

pub use crate::liveness::Liveness;

/// Wire protocol version, sent in the guest's hello. 2: the guest heartbeats (a host of version
/// 2 fails a channel that stays silent, so it must not run an agent that never heartbeats).
/// 3: the launch comes before the job (`Launch`, `Ready`), for VMs booted before their job.
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest payload of any frame (control messages and chunks alike).
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Payload size the senders use for NAR chunks.
pub const CHUNK_SIZE: usize = 256 << 10;
/// Size of a frame header.
pub const HEADER_LEN: usize = 8;
/// Largest payload of a [`Kind::Heartbeat`].
pub const MAX_HEARTBEAT_PAYLOAD: u32 = 4096;
/// Most bytes the guest hands to one `write(2)` on the channel.
///
/// The guest kernel (6.12.117, which has the backport of Linux commit 6693731487a8 "vsock/virtio:
/// Allocate nonlinear SKBs for handling large transmit buffers") puts a vsock packet whose payload
/// exceeds about 32 KiB into page fragments, i.e. several data descriptors. `vhost-device-vsock`
/// 0.3.0 (virtio-vsock 0.10) expects a packet's data in one descriptor: it drops such a packet
/// (`DescriptorLengthTooSmall`, logged at debug level only) without returning its descriptor or
/// its credit, and the guest→host direction stalls for good. A packet is never larger than the
/// `write` that produced it, so capping every write at 16 KiB keeps every packet linear (one data
/// descriptor) whatever the backend's credit window. Measured in `docs/channel.md`.
pub const GUEST_MAX_WRITE: usize = 16 << 10;

/// Frame kinds. Direction: g→h guest to host, h→g host to guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// g→h, JSON `Hello`: first frame on the channel.
    Hello = 0x01,
    /// h→g, JSON `Setup`: what the agent needs besides the job (attestation mode material).
    Setup = 0x02,
    /// h→g, canonical job bytes (the job digest = SHA-256(tag ‖ these bytes)); after `Ready`.
    Job = 0x03,
    /// both, JSON `NarBegin`: a NAR stream for one store path follows.
    NarBegin = 0x04,
    /// both, raw NAR bytes (1..=MAX_PAYLOAD).
    NarChunk = 0x05,
    /// both, empty: the NAR stream is complete.
    NarEnd = 0x06,
    /// h→g, empty: every input has been sent.
    InputsDone = 0x07,
    /// g→h, raw builder log bytes.
    Log = 0x08,
    /// g→h, JSON `Phase`: progress with guest timestamps.
    Phase = 0x09,
    /// g→h, JSON `Outcome`: statement and evidence (after the output NARs).
    Outcome = 0x0a,
    /// g→h, JSON `Failure`: the step failed; nothing else follows but `Bye`.
    Failure = 0x0b,
    /// g→h, empty: the agent is done and powers off.
    Bye = 0x0c,
    /// g→h, JSON `Heartbeat`: the guest is alive. Link-level: allowed between any two frames and
    /// consumed by [`FrameReader`] itself.
    Heartbeat = 0x0d,
    /// h→g, canonical launch bytes (HOST_DATA = SHA-256(tag ‖ these bytes)); after `Setup`.
    Launch = 0x0e,
    /// g→h, JSON `Ready`: the launch is accepted and the attester ready; send the job.
    Ready = 0x0f,
}

impl Kind {
    /// Decode a kind byte.
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            0x01 => Hello,
            0x02 => Setup,
            0x03 => Job,
            0x04 => NarBegin,
            0x05 => NarChunk,
            0x06 => NarEnd,
            0x07 => InputsDone,
            0x08 => Log,
            0x09 => Phase,
            0x0a => Outcome,
            0x0b => Failure,
            0x0c => Bye,
            0x0d => Heartbeat,
            0x0e => Launch,
            0x0f => Ready,
            _ => return None,
        })
    }

    fn must_be_empty(self) -> bool {
        matches!(self, Kind::NarEnd | Kind::InputsDone | Kind::Bye)
    }

    /// Largest payload a frame of this kind may have.
    pub fn max_len(self) -> u32 {
        match self {
            Kind::Heartbeat => MAX_HEARTBEAT_PAYLOAD,
            _ => MAX_PAYLOAD,
        }
    }
}

/// Framing errors.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The transport failed or closed mid-frame.
    #[error("channel I/O")]
    Io(#[from] io::Error),
    /// The peer closed the channel where a frame was expected.
    #[error("channel closed by the peer (expected {0})")]
    Closed(&'static str),
    /// Unknown kind byte.
    #[error("malformed frame: unknown kind 0x{0:02x}")]
    UnknownKind(u8),
    /// Reserved header bytes not zero.
    #[error("malformed frame: reserved header bytes are not zero")]
    Reserved,
    /// Payload longer than allowed.
    #[error("malformed frame: {kind:?} payload of {len} bytes exceeds {max}")]
    TooLong {
        /// Frame kind.
        kind: Kind,
        /// Announced length.
        len: u32,
        /// Limit.
        max: u32,
    },
    /// A frame that must be empty is not, or a chunk is empty.
    #[error("malformed frame: {0:?} with a payload of {1} bytes")]
    BadLength(Kind, u32),
    /// A frame of another kind arrived than the protocol allows here.
    #[error("protocol violation: expected {expected}, got {got:?}")]
    Unexpected {
        /// What was allowed.
        expected: &'static str,
        /// What came.
        got: Kind,
    },
    /// A JSON payload does not parse.
    #[error("malformed {0:?} payload")]
    Json(Kind, #[source] serde_json::Error),
    /// A NAR stream is longer than announced.
    #[error("NAR stream for {path} exceeds its announced size of {size} bytes")]
    NarTooLong {
        /// Store path.
        path: String,
        /// Announced size.
        size: u64,
    },
    /// A NAR stream ended before its announced size.
    #[error("NAR stream for {path} ended at {got} of {size} bytes")]
    NarTooShort {
        /// Store path.
        path: String,
        /// Announced size.
        size: u64,
        /// Bytes received.
        got: u64,
    },
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its kind.
    pub kind: Kind,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Frame {
    /// Decode the JSON payload.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.payload).map_err(|e| ProtoError::Json(self.kind, e))
    }
}

/// Writes frames.
#[derive(Debug)]
pub struct FrameWriter<W: Write> {
    inner: W,
    max_write: usize,
}

impl<W: Write> FrameWriter<W> {
    /// Wrap a transport.
    pub fn new(inner: W) -> Self {
        FrameWriter { inner, max_write: usize::MAX }
    }

    /// Wrap a transport, handing it at most `max_write` bytes per `write` call (the guest uses
    /// [`GUEST_MAX_WRITE`]).
    pub fn with_max_write(inner: W, max_write: usize) -> Self {
        FrameWriter { inner, max_write: max_write.max(1) }
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Write one frame (header and payload together, in pieces of at most the write limit).
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), ProtoError> {
        let max = kind.max_len();
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= max)
            .ok_or(ProtoError::TooLong { kind, len: u32::MAX, max })?;
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.push(kind as u8);
        buf.extend_from_slice(&[0, 0, 0]);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(payload);
        for piece in buf.chunks(self.max_write) {
            self.inner.write_all(piece)?;
        }
        Ok(())
    }

    /// Write a JSON frame.
    pub fn send_json<T: serde::Serialize>(
        &mut self,
        kind: Kind,
        value: &T,
    ) -> Result<(), ProtoError> {
        let bytes = serde_json::to_vec(value).map_err(|e| ProtoError::Json(kind, e))?;
        self.send(kind, &bytes)
    }

    /// Send `nar` as `NarBegin`, chunks, `NarEnd`. `begin` is the JSON of the `NarBegin`.
    /// Returns the number of NAR bytes sent.
    pub fn send_nar<T: serde::Serialize>(
        &mut self,
        begin: &T,
        nar: &mut dyn Read,
    ) -> Result<u64, ProtoError> {
        send_nar_frames(&mut |k, p| self.send(k, p), begin, nar)
    }

    /// Flush the transport.
    pub fn flush(&mut self) -> Result<(), ProtoError> {
        self.inner.flush()?;
        Ok(())
    }
}

/// Sends one frame.
pub(crate) type SendFrame<'a> = dyn FnMut(Kind, &[u8]) -> Result<(), ProtoError> + 'a;

/// Send `nar` as `NarBegin`, chunks, `NarEnd` through `send` (one call per frame); returns the
/// number of NAR bytes sent.
pub(crate) fn send_nar_frames<T: serde::Serialize>(
    send: &mut SendFrame<'_>,
    begin: &T,
    nar: &mut dyn Read,
) -> Result<u64, ProtoError> {
    let begin = serde_json::to_vec(begin).map_err(|e| ProtoError::Json(Kind::NarBegin, e))?;
    send(Kind::NarBegin, &begin)?;
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut total = 0u64;
    loop {
        let n = match nar.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        send(Kind::NarChunk, &buf[..n])?;
        total += n as u64;
    }
    send(Kind::NarEnd, &[])?;
    Ok(total)
}

/// Reads frames, checking the header of each. Heartbeats are consumed here: they are counted,
/// stamped into the [`Liveness`] (as every frame is), and never returned.
#[derive(Debug)]
pub struct FrameReader<R: Read> {
    inner: R,
    liveness: Option<Arc<Liveness>>,
    heartbeats: u64,
}

impl<R: Read> FrameReader<R> {
    /// Wrap a transport.
    pub fn new(inner: R) -> Self {
        FrameReader { inner, liveness: None, heartbeats: 0 }
    }

    /// Wrap a transport, recording the arrival of every complete frame in `liveness`.
    pub fn with_liveness(inner: R, liveness: Arc<Liveness>) -> Self {
        FrameReader { inner, liveness: Some(liveness), heartbeats: 0 }
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Heartbeat frames consumed so far.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats
    }

    /// Read the next frame other than a heartbeat; `Ok(None)` on a clean EOF before any header
    /// byte.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        loop {
            let Some(frame) = self.next_any_frame()? else { return Ok(None) };
            if let Some(l) = &self.liveness {
                l.beat();
            }
            if frame.kind != Kind::Heartbeat {
                return Ok(Some(frame));
            }
            self.heartbeats += 1;
        }
    }

    fn next_any_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        let mut hdr = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.inner.read(&mut hdr[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let kind = Kind::from_u8(hdr[0]).ok_or(ProtoError::UnknownKind(hdr[0]))?;
        if hdr[1..4] != [0, 0, 0] {
            return Err(ProtoError::Reserved);
        }
        let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        if len > kind.max_len() {
            return Err(ProtoError::TooLong { kind, len, max: kind.max_len() });
        }
        if (kind.must_be_empty() && len != 0) || (kind == Kind::NarChunk && len == 0) {
            return Err(ProtoError::BadLength(kind, len));
        }
        // Grown as the payload arrives: a header alone must not cost its announced length.
        let mut payload = Vec::with_capacity((len as usize).min(CHUNK_SIZE));
        (&mut self.inner).take(u64::from(len)).read_to_end(&mut payload)?;
        if payload.len() != len as usize {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        Ok(Some(Frame { kind, payload }))
    }

    /// Read the next frame; EOF is an error naming what was expected.
    pub fn expect_frame(&mut self, expected: &'static str) -> Result<Frame, ProtoError> {
        self.next_frame()?.ok_or(ProtoError::Closed(expected))
    }

    /// Read the next frame, which must be of kind `kind`.
    pub fn expect(&mut self, kind: Kind, expected: &'static str) -> Result<Frame, ProtoError> {
        let f = self.expect_frame(expected)?;
        if f.kind != kind {
            return Err(ProtoError::Unexpected { expected, got: f.kind });
        }
        Ok(f)
    }

    /// After a `NarBegin` announcing `size` bytes for `path`: a `Read` over the chunks that
    /// returns EOF exactly at `NarEnd`, and fails if the stream is longer or shorter than `size`
    /// or another frame kind interrupts it.
    pub fn nar_stream(&mut self, path: &str, size: u64) -> NarStream<'_, R> {
        NarStream {
            reader: self,
            path: path.to_owned(),
            size,
            got: 0,
            buf: Vec::new(),
            pos: 0,
            done: false,
            first_error: None,
        }
    }
}

/// A received NAR stream (see [`FrameReader::nar_stream`]).
#[derive(Debug)]
pub struct NarStream<'a, R: Read> {
    reader: &'a mut FrameReader<R>,
    path: String,
    size: u64,
    got: u64,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
    first_error: Option<ProtoError>,
}

impl ProtoError {
    /// A copy for the stream's record (I/O errors keep their kind and message).
    fn duplicate(&self) -> ProtoError {
        match self {
            ProtoError::Io(e) => ProtoError::Io(io::Error::new(e.kind(), e.to_string())),
            ProtoError::Closed(w) => ProtoError::Closed(w),
            ProtoError::UnknownKind(k) => ProtoError::UnknownKind(*k),
            ProtoError::Reserved => ProtoError::Reserved,
            ProtoError::TooLong { kind, len, max } => {
                ProtoError::TooLong { kind: *kind, len: *len, max: *max }
            }
            ProtoError::BadLength(k, l) => ProtoError::BadLength(*k, *l),
            ProtoError::Unexpected { expected, got } => {
                ProtoError::Unexpected { expected, got: *got }
            }
            ProtoError::Json(k, e) => {
                ProtoError::Io(io::Error::other(format!("malformed {k:?} payload: {e}")))
            }
            ProtoError::NarTooLong { path, size } => {
                ProtoError::NarTooLong { path: path.clone(), size: *size }
            }
            ProtoError::NarTooShort { path, size, got } => {
                ProtoError::NarTooShort { path: path.clone(), size: *size, got: *got }
            }
        }
    }
}

impl<R: Read> NarStream<'_, R> {
    /// The first error this stream returned, if any (the stream is unusable after it).
    pub fn take_error(&mut self) -> Option<ProtoError> {
        self.first_error.take()
    }

    /// Bytes of the stream received so far (the chunks it accepted; a chunk that would exceed
    /// the announced size is refused and not counted).
    pub fn received(&self) -> u64 {
        self.got
    }

    /// Whether `NarEnd` has been read.
    pub fn finished(&self) -> bool {
        self.done
    }

    /// Read and discard the rest of the stream up to `NarEnd` (still checking its framing).
    pub fn drain(&mut self) -> Result<(), ProtoError> {
        let mut sink = [0u8; 8192];
        loop {
            match self.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(into_proto(e)),
            }
        }
    }
}

/// Recover a [`ProtoError`] that a [`NarStream`] wrapped into an `io::Error`.
pub fn into_proto(e: io::Error) -> ProtoError {
    if e.get_ref().is_some_and(|inner| inner.is::<ProtoError>()) {
        if let Ok(inner) = e.into_inner().expect("checked").downcast::<ProtoError>() {
            return *inner;
        }
        unreachable!("checked the type above");
    }
    ProtoError::Io(e)
}

fn wrap(e: ProtoError) -> io::Error {
    io::Error::other(e)
}

impl<R: Read> NarStream<'_, R> {
    fn fill(&mut self) -> Result<(), ProtoError> {
        while self.pos == self.buf.len() && !self.done {
            let f = self.reader.expect_frame("NAR chunk or end")?;
            match f.kind {
                Kind::NarChunk => {
                    let got = self.got + f.payload.len() as u64;
                    if got > self.size {
                        return Err(ProtoError::NarTooLong {
                            path: self.path.clone(),
                            size: self.size,
                        });
                    }
                    self.got = got;
                    self.buf = f.payload;
                    self.pos = 0;
                }
                Kind::NarEnd => {
                    if self.got != self.size {
                        return Err(ProtoError::NarTooShort {
                            path: self.path.clone(),
                            size: self.size,
                            got: self.got,
                        });
                    }
                    self.done = true;
                }
                other => {
                    return Err(ProtoError::Unexpected { expected: "NAR chunk or end", got: other })
                }
            }
        }
        Ok(())
    }
}

impl<R: Read> Read for NarStream<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if let Some(e) = &self.first_error {
            return Err(wrap(e.duplicate()));
        }
        if let Err(e) = self.fill() {
            self.first_error = Some(e.duplicate());
            return Err(wrap(e));
        }
        if self.done && self.pos == self.buf.len() {
            return Ok(0);
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
