//! The host↔guest channel framing (shared with the host launcher). Specified in `docs/channel.md`.
//!
//! Every message is one frame: an 8-byte header — kind (`u8`), three zero bytes, payload length
//! (`u32` little-endian) — then the payload. Nothing is ever delimited by EOF: the userspace vsock
//! backend turns a half-close into a full reset, so each side knows from the frames alone when
//! the other is done. Byte streams (NARs) are split into [`Kind::NarChunk`] frames between a
//! [`Kind::NarBegin`] and an explicit [`Kind::NarEnd`]. Control payloads are JSON (see
//! `messages`); the job travels as its canonical bytes, because HOST_DATA is their hash.
//!
//! What is here: [`Kind`], [`Frame`], [`FrameReader`]/[`FrameWriter`] with limits, and adapters
//! that send a `Read` as a NAR stream and expose a received NAR stream as a `Read`.
//! What is not here: what the messages mean (see `messages`) or any socket setup.

use std::io::{self, Read, Write};

/// Wire protocol version, sent in the guest's hello.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest payload of any frame (control messages and chunks alike).
pub const MAX_PAYLOAD: u32 = 16 << 20;
/// Payload size the senders use for NAR chunks.
pub const CHUNK_SIZE: usize = 256 << 10;
/// Size of a frame header.
pub const HEADER_LEN: usize = 8;

/// Frame kinds. Direction: g→h guest to host, h→g host to guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// g→h, JSON `Hello`: first frame on the channel.
    Hello = 0x01,
    /// h→g, JSON `Setup`: what the agent needs besides the job (attestation mode material).
    Setup = 0x02,
    /// h→g, canonical job bytes (HOST_DATA = SHA-256(tag ‖ these bytes)).
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
            _ => return None,
        })
    }

    fn must_be_empty(self) -> bool {
        matches!(self, Kind::NarEnd | Kind::InputsDone | Kind::Bye)
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
}

impl<W: Write> FrameWriter<W> {
    /// Wrap a transport.
    pub fn new(inner: W) -> Self {
        FrameWriter { inner }
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Write one frame (header and payload in one write).
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), ProtoError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_PAYLOAD)
            .ok_or(ProtoError::TooLong { kind, len: u32::MAX, max: MAX_PAYLOAD })?;
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.push(kind as u8);
        buf.extend_from_slice(&[0, 0, 0]);
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(payload);
        self.inner.write_all(&buf)?;
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
        self.send_json(Kind::NarBegin, begin)?;
        let mut buf = vec![0u8; CHUNK_SIZE];
        let mut total = 0u64;
        loop {
            let n = match nar.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.send(Kind::NarChunk, &buf[..n])?;
            total += n as u64;
        }
        self.send(Kind::NarEnd, &[])?;
        Ok(total)
    }

    /// Flush the transport.
    pub fn flush(&mut self) -> Result<(), ProtoError> {
        self.inner.flush()?;
        Ok(())
    }
}

/// Reads frames, checking the header of each.
#[derive(Debug)]
pub struct FrameReader<R: Read> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    /// Wrap a transport.
    pub fn new(inner: R) -> Self {
        FrameReader { inner }
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Read the next frame; `Ok(None)` on a clean EOF before any header byte.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
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
        if len > MAX_PAYLOAD {
            return Err(ProtoError::TooLong { kind, len, max: MAX_PAYLOAD });
        }
        if (kind.must_be_empty() && len != 0) || (kind == Kind::NarChunk && len == 0) {
            return Err(ProtoError::BadLength(kind, len));
        }
        let mut payload = vec![0u8; len as usize];
        self.inner.read_exact(&mut payload)?;
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

    /// Bytes delivered so far.
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
                    self.got += f.payload.len() as u64;
                    if self.got > self.size {
                        return Err(ProtoError::NarTooLong {
                            path: self.path.clone(),
                            size: self.size,
                        });
                    }
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
mod tests {
    use super::*;

    fn frames(bytes: &[u8]) -> Vec<Result<Frame, String>> {
        let mut r = FrameReader::new(bytes);
        let mut out = Vec::new();
        loop {
            match r.next_frame() {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[test]
    fn round_trip_of_every_kind() {
        let mut w = FrameWriter::new(Vec::new());
        for b in 0u8..=255 {
            if let Some(k) = Kind::from_u8(b) {
                assert_eq!(k as u8, b);
                let payload: &[u8] = if k.must_be_empty() { b"" } else { b"xy" };
                w.send(k, payload).unwrap();
            }
        }
        let got = frames(w.get_mut());
        assert_eq!(got.len(), 12);
        assert!(got.iter().all(|f| f.is_ok()));
    }

    #[test]
    fn header_layout() {
        let mut w = FrameWriter::new(Vec::new());
        w.send(Kind::Log, b"abc").unwrap();
        assert_eq!(w.get_mut().as_slice(), b"\x08\0\0\0\x03\0\0\0abc");
    }

    #[test]
    fn malformed_frames_are_rejected() {
        let cases: &[(&[u8], &str)] = &[
            (b"\x7f\0\0\0\0\0\0\0", "unknown kind 0x7f"),
            (b"\x08\x01\0\0\0\0\0\0", "reserved"),
            (b"\x08\0\0\0\xff\xff\xff\xff", "exceeds"),
            (b"\x06\0\0\0\x01\0\0\0x", "NarEnd with a payload"),
            (b"\x05\0\0\0\0\0\0\0", "NarChunk with a payload of 0"),
            (b"\x08\0\0\0\x05\0\0\0ab", "channel I/O"),
            (b"\x08\0\0", "channel I/O"),
        ];
        for (bytes, want) in cases {
            let got = frames(bytes);
            let last = got.last().unwrap().as_ref().unwrap_err();
            assert!(last.contains(want), "{bytes:?}: {last}");
        }
        assert!(frames(b"").is_empty(), "clean EOF");
    }

    #[test]
    fn json_payload_errors_name_the_kind() {
        let f = Frame { kind: Kind::Hello, payload: b"{".to_vec() };
        let e = f.json::<serde_json::Value>().unwrap_err();
        assert!(e.to_string().contains("Hello"), "{e}");
    }

    fn nar_frames(data: &[u8], announced: u64) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        let sent =
            w.send_nar(&serde_json::json!({"path": "/nix/store/x"}), &mut &data[..]).unwrap();
        assert_eq!(sent, data.len() as u64);
        let _ = announced;
        w.send(Kind::Bye, &[]).unwrap();
        std::mem::take(w.get_mut())
    }

    #[test]
    fn nar_stream_round_trip_and_stops_at_end() {
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 17)).map(|i| (i % 251) as u8).collect();
        let bytes = nar_frames(&data, data.len() as u64);
        let mut r = FrameReader::new(&bytes[..]);
        assert_eq!(r.expect(Kind::NarBegin, "begin").unwrap().kind, Kind::NarBegin);
        let mut got = Vec::new();
        let mut s = r.nar_stream("/nix/store/x", data.len() as u64);
        s.read_to_end(&mut got).unwrap();
        assert!(s.finished());
        assert_eq!(got, data);
        assert_eq!(r.expect(Kind::Bye, "bye").unwrap().kind, Kind::Bye);
    }

    #[test]
    fn nar_stream_size_mismatch_and_interruption() {
        let data = vec![1u8; 100];
        let bytes = nar_frames(&data, 100);
        for (size, want) in [(99u64, "exceeds its announced size"), (101, "ended at 100 of 101")] {
            let mut r = FrameReader::new(&bytes[..]);
            r.next_frame().unwrap();
            let mut s = r.nar_stream("/nix/store/x", size);
            let e = into_proto(s.read_to_end(&mut Vec::new()).unwrap_err());
            assert!(e.to_string().contains(want), "{e}");
        }
        let mut w = FrameWriter::new(Vec::new());
        w.send(Kind::NarChunk, b"ab").unwrap();
        w.send(Kind::Log, b"zz").unwrap();
        let mut r = FrameReader::new(&w.get_mut()[..]);
        let e = into_proto(r.nar_stream("p", 10).read_to_end(&mut Vec::new()).unwrap_err());
        assert!(matches!(e, ProtoError::Unexpected { got: Kind::Log, .. }), "{e}");
        let mut r = FrameReader::new(&b"\x05\0\0\0\x02\0\0\0ab"[..]);
        let e = into_proto(r.nar_stream("p", 2).read_to_end(&mut Vec::new()).unwrap_err());
        assert!(matches!(e, ProtoError::Closed(_)), "{e}");
    }
}
