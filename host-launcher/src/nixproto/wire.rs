//! Wire primitives shared by Nix's worker and serve protocols.
//!
//! What is here: little-endian u64 integers (every integer, bool and enum tag on the wire is one),
//! strings (u64 length, bytes, zero padding to a multiple of 8), string lists/sets and maps,
//! with limits on lengths and counts so a hostile peer cannot make us allocate without bound;
//! the **message budget** ([`MessageBudget`]): what one message may cost in all, so that many
//! strings each under its own limit cannot add up (a 25 MB map of tiny environment variables
//! used to take 147 MB). Every string decoded while a budget is active is charged its length
//! plus [`ITEM_COST`] (its `String`, the allocator's and the collection's overhead) before its
//! bytes are allocated; past [`MAX_MESSAGE`] decoding stops with [`WireError::MessageTooLarge`].
//! The budget is per thread (a connection is decoded on one thread), opened by the front-ends
//! around each message (`worker`, `serve`); a list or map read with none open gets one of its
//! own;
//! framed streams (repeated `u64 len` + `len` raw bytes, terminated by `u64 0`, no padding)
//! as the worker protocol uses for `AddMultipleToStore` and `AddToStoreNar` (≥ 1.23); and the
//! bounded reader both protocols read a NAR upload through.
//!
//! What is not here: any message layout (see `worker`, `serve`, `types`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};

/// Longest string we accept (environment values and `__json` can be large, NARs never travel as
/// strings on the paths we serve).
pub const MAX_STRING: u64 = 64 << 20;
/// Most elements in a list, set or map.
pub const MAX_ITEMS: u64 = 1 << 20;
/// Largest frame of a framed stream (Nix writes at most 32 KiB; we allow more).
pub const MAX_FRAME: u64 = 16 << 20;
/// Most one message may cost (see [`MessageBudget`]); NAR bytes, which stream to disk, are not
/// counted. Large enough for any derivation Nix sends in practice (environments of a few MB).
pub const MAX_MESSAGE: u64 = 64 << 20;
/// What each decoded string costs beyond its bytes, and each map entry beyond its strings.
pub const ITEM_COST: u64 = 128;

thread_local! {
    /// The message budget of this thread: (what is left, the limit).
    static BUDGET: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// The budget of the message being decoded on this thread, from [`MessageBudget::start`] until
/// drop (which restores the enclosing one, if any).
#[derive(Debug)]
#[must_use = "the budget ends when this is dropped"]
pub struct MessageBudget {
    previous: Option<(u64, u64)>,
}

impl MessageBudget {
    /// A budget of [`MAX_MESSAGE`].
    pub fn start() -> MessageBudget {
        MessageBudget::with_limit(MAX_MESSAGE)
    }

    /// A budget of `limit`.
    pub fn with_limit(limit: u64) -> MessageBudget {
        MessageBudget { previous: BUDGET.replace(Some((limit, limit))) }
    }

    /// [`MessageBudget::start`] unless a budget is already open (then this changes nothing).
    fn unless_open() -> Option<MessageBudget> {
        BUDGET.get().is_none().then(MessageBudget::start)
    }
}

impl Drop for MessageBudget {
    fn drop(&mut self) {
        BUDGET.set(self.previous);
    }
}

/// Charge `n` to the open budget, if any.
fn charge(what: &'static str, n: u64) -> WireResult<()> {
    match BUDGET.get() {
        Some((left, max)) if n > left => Err(WireError::MessageTooLarge { what, max }),
        Some((left, max)) => {
            BUDGET.set(Some((left - n, max)));
            Ok(())
        }
        None => Ok(()),
    }
}

/// Why reading or writing the protocol stream failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the stream where more data was due.
    #[error("the peer closed the connection")]
    Eof,
    /// An I/O error on the stream.
    #[error("i/o error on the protocol stream")]
    Io(#[source] io::Error),
    /// A length or count over our limit.
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLarge {
        /// What was being read.
        what: &'static str,
        /// The length or count the peer sent.
        len: u64,
        /// Our limit.
        max: u64,
    },
    /// One message costs more than its budget.
    #[error(
        "message too large: reading {what} took it past {max} bytes, the limit on one message \
         (strings counted with {ITEM_COST} bytes of overhead each)"
    )]
    MessageTooLarge {
        /// What was being read.
        what: &'static str,
        /// The limit.
        max: u64,
    },
    /// A string that must be text is not UTF-8.
    #[error("{what} is not valid UTF-8")]
    NotUtf8 {
        /// What was being read.
        what: &'static str,
    },
    /// Padding after a string is not zero.
    #[error("nonzero padding after a string")]
    BadPadding,
    /// A value outside its domain (a bool that is not 0/1, an unknown enum tag, a bad magic).
    #[error("invalid {what}: {value:#x}")]
    BadValue {
        /// What was being read.
        what: &'static str,
        /// The value.
        value: u64,
    },
}

impl WireError {
    /// Whether this is a length, count or message-size limit (the stream itself is fine: the
    /// peer can still be told why).
    pub fn is_limit(&self) -> bool {
        matches!(self, WireError::TooLarge { .. } | WireError::MessageTooLarge { .. })
    }
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            WireError::Eof
        } else {
            WireError::Io(e)
        }
    }
}

/// Result of wire operations.
pub type WireResult<T> = Result<T, WireError>;

/// Number of zero bytes after `len` bytes of string data.
pub fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

/// Reading wire values from any byte stream.
pub trait WireRead: Read {
    /// A u64, little-endian.
    fn read_u64(&mut self) -> WireResult<u64> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A u64 that starts a message: a clean end of stream here is `Ok(None)`.
    fn read_u64_or_eof(&mut self) -> WireResult<Option<u64>> {
        let mut b = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            match self.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(WireError::Eof),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(u64::from_le_bytes(b)))
    }

    /// A bool (any nonzero value is true, as Nix reads it).
    fn read_bool(&mut self) -> WireResult<bool> {
        Ok(self.read_u64()? != 0)
    }

    /// A count bounded by [`MAX_ITEMS`].
    fn read_count(&mut self, what: &'static str) -> WireResult<usize> {
        let n = self.read_u64()?;
        if n > MAX_ITEMS {
            return Err(WireError::TooLarge { what, len: n, max: MAX_ITEMS });
        }
        Ok(n as usize)
    }

    /// A byte string of at most `max` bytes, padding checked.
    fn read_bytes_max(&mut self, what: &'static str, max: u64) -> WireResult<Vec<u8>> {
        let len = self.read_u64()?;
        if len > max {
            return Err(WireError::TooLarge { what, len, max });
        }
        charge(what, len + ITEM_COST)?;
        let mut buf = Vec::new();
        self.take(len).read_to_end(&mut buf)?;
        if buf.len() as u64 != len {
            return Err(WireError::Eof);
        }
        let mut pad = [0u8; 8];
        let p = padding(len);
        self.read_exact(&mut pad[..p])?;
        if pad[..p].iter().any(|&b| b != 0) {
            return Err(WireError::BadPadding);
        }
        Ok(buf)
    }

    /// A byte string of at most [`MAX_STRING`] bytes.
    fn read_bytes(&mut self, what: &'static str) -> WireResult<Vec<u8>> {
        self.read_bytes_max(what, MAX_STRING)
    }

    /// A UTF-8 string.
    fn read_string(&mut self, what: &'static str) -> WireResult<String> {
        String::from_utf8(self.read_bytes(what)?).map_err(|_| WireError::NotUtf8 { what })
    }

    /// A list of strings, in wire order.
    fn read_string_list(&mut self, what: &'static str) -> WireResult<Vec<String>> {
        let _budget = MessageBudget::unless_open();
        let n = self.read_count(what)?;
        let mut v = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            v.push(self.read_string(what)?);
        }
        Ok(v)
    }

    /// A set of strings (duplicates collapse, as in Nix's `std::set`).
    fn read_string_set(&mut self, what: &'static str) -> WireResult<BTreeSet<String>> {
        Ok(self.read_string_list(what)?.into_iter().collect())
    }

    /// A map of strings to strings.
    fn read_string_map(&mut self, what: &'static str) -> WireResult<BTreeMap<String, String>> {
        let _budget = MessageBudget::unless_open();
        let n = self.read_count(what)?;
        let mut m = BTreeMap::new();
        for _ in 0..n {
            charge(what, ITEM_COST)?;
            let k = self.read_string(what)?;
            let v = self.read_string(what)?;
            m.insert(k, v);
        }
        Ok(m)
    }
}

impl<R: Read + ?Sized> WireRead for R {}

/// Writing wire values to any byte sink.
pub trait WireWrite: Write {
    /// A u64, little-endian.
    fn write_u64(&mut self, v: u64) -> WireResult<()> {
        self.write_all(&v.to_le_bytes())?;
        Ok(())
    }

    /// A bool as 0 or 1.
    fn write_bool(&mut self, v: bool) -> WireResult<()> {
        self.write_u64(v as u64)
    }

    /// A byte string with its length and padding.
    fn write_bytes(&mut self, b: &[u8]) -> WireResult<()> {
        self.write_u64(b.len() as u64)?;
        self.write_all(b)?;
        self.write_all(&[0u8; 8][..padding(b.len() as u64)])?;
        Ok(())
    }

    /// A string.
    fn write_str(&mut self, s: &str) -> WireResult<()> {
        self.write_bytes(s.as_bytes())
    }

    /// A list or set of strings, in the iterator's order.
    fn write_strings<'a, I>(&mut self, items: I) -> WireResult<()>
    where
        I: IntoIterator<Item = &'a String>,
        I::IntoIter: ExactSizeIterator,
    {
        let it = items.into_iter();
        self.write_u64(it.len() as u64)?;
        for s in it {
            self.write_str(s)?;
        }
        Ok(())
    }

    /// A map of strings to strings, in key order.
    fn write_string_map(&mut self, m: &BTreeMap<String, String>) -> WireResult<()> {
        self.write_u64(m.len() as u64)?;
        for (k, v) in m {
            self.write_str(k)?;
            self.write_str(v)?;
        }
        Ok(())
    }
}

impl<W: Write + ?Sized> WireWrite for W {}

/// Reads a framed stream as one continuous byte stream; ends (returns 0) at the empty frame.
///
/// Dropping it does not drain: call [`FramedReader::drain`] to skip to the terminator when a
/// consumer stopped early, so the protocol stays in step.
#[derive(Debug)]
pub struct FramedReader<'a, R: Read + ?Sized> {
    inner: &'a mut R,
    left_in_frame: u64,
    done: bool,
}

impl<'a, R: Read + ?Sized> FramedReader<'a, R> {
    /// Start reading frames from `inner`.
    pub fn new(inner: &'a mut R) -> Self {
        FramedReader { inner, left_in_frame: 0, done: false }
    }

    /// Whether the terminating empty frame has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Skip everything up to and including the terminating frame. Returns the bytes skipped.
    pub fn drain(&mut self) -> WireResult<u64> {
        let mut skipped = 0u64;
        let mut buf = [0u8; 64 * 1024];
        loop {
            let n = self.read(&mut buf).map_err(WireError::from)?;
            if n == 0 {
                return Ok(skipped);
            }
            skipped += n as u64;
        }
    }
}

impl<R: Read + ?Sized> Read for FramedReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.left_in_frame == 0 {
            if self.done {
                return Ok(0);
            }
            let len = self.inner.read_u64().map_err(wire_to_io)?;
            if len == 0 {
                self.done = true;
                return Ok(0);
            }
            if len > MAX_FRAME {
                return Err(wire_to_io(WireError::TooLarge { what: "frame", len, max: MAX_FRAME }));
            }
            self.left_in_frame = len;
        }
        let want = buf.len().min(self.left_in_frame as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stream ended inside a frame",
            ));
        }
        self.left_in_frame -= n as u64;
        Ok(n)
    }
}

/// A NAR upload's bytes: a reader limited to `left` bytes (the declared NAR size) that
/// remembers whether the stream under it failed, so a front-end can tell a client that hung up
/// (nothing to answer) from a bad upload (an `InvalidData` error, answered). Both protocols read
/// uploads through it: the serve protocol from the raw stream, the worker's from frames.
#[derive(Debug)]
pub(crate) struct Taken<'r, R: Read + ?Sized> {
    pub(crate) inner: &'r mut R,
    pub(crate) left: u64,
    pub(crate) wire_failed: Option<io::ErrorKind>,
}

impl<'r, R: Read + ?Sized> Taken<'r, R> {
    pub(crate) fn new(inner: &'r mut R, left: u64) -> Self {
        Taken { inner, left, wire_failed: None }
    }

    /// Read and discard what is left.
    pub(crate) fn skip_rest(&mut self) -> io::Result<()> {
        io::copy(self, &mut io::sink())?;
        Ok(())
    }
}

impl<R: Read + ?Sized> Read for Taken<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        match self.inner.read(&mut buf[..want]) {
            Ok(0) => {
                self.wire_failed = Some(io::ErrorKind::UnexpectedEof);
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the client hung up with {} NAR bytes still due", self.left),
                ))
            }
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::InvalidData {
                    self.wire_failed = Some(e.kind());
                }
                Err(e)
            }
        }
    }
}

/// Writes a framed stream: each `write` becomes one frame; [`FramedWriter::finish`] writes the
/// terminator. (Used by tests and by a client side; the server only reads frames.)
#[derive(Debug)]
pub struct FramedWriter<'a, W: Write + ?Sized> {
    inner: &'a mut W,
}

impl<'a, W: Write + ?Sized> FramedWriter<'a, W> {
    /// Start writing frames to `inner`.
    pub fn new(inner: &'a mut W) -> Self {
        FramedWriter { inner }
    }

    /// Write the terminating empty frame.
    pub fn finish(self) -> WireResult<()> {
        self.inner.write_u64(0)
    }
}

impl<W: Write + ?Sized> Write for FramedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(32 * 1024);
        self.inner.write_all(&(n as u64).to_le_bytes())?;
        self.inner.write_all(&buf[..n])?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Wrap a wire error as an `io::Error` (for `Read` impls), keeping EOF recognisable.
pub fn wire_to_io(e: WireError) -> io::Error {
    match e {
        WireError::Eof => {
            io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed the connection")
        }
        WireError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_with_padding() {
        for s in ["", "a", "1234567", "12345678", "123456789", "大白兔"] {
            let mut buf = Vec::new();
            buf.write_str(s).unwrap();
            assert_eq!(buf.len() % 8, 0);
            assert_eq!(buf.len(), 8 + s.len() + padding(s.len() as u64));
            let got = (&buf[..]).read_string("s").unwrap();
            assert_eq!(got, s);
        }
    }

    #[test]
    fn bad_padding_and_limits_are_errors() {
        let mut buf = Vec::new();
        buf.write_str("abc").unwrap();
        buf[12] = 1;
        assert!(matches!((&buf[..]).read_string("s"), Err(WireError::BadPadding)));
        let mut big = Vec::new();
        big.write_u64(MAX_STRING + 1).unwrap();
        assert!(matches!((&big[..]).read_string("s"), Err(WireError::TooLarge { .. })));
        let short = 16u64.to_le_bytes().iter().chain(b"abc").copied().collect::<Vec<_>>();
        assert!(matches!((&short[..]).read_string("s"), Err(WireError::Eof)));
    }

    /// Many strings each under its own limit cannot add up past the message's: the budget
    /// stops a map of tiny entries, and a long string before its bytes are allocated.
    #[test]
    fn a_message_is_bounded_in_all() {
        let mut wire = Vec::new();
        wire.write_u64(1000).unwrap();
        for i in 0..1000u32 {
            wire.write_str(&i.to_string()).unwrap();
            wire.write_str("").unwrap();
        }
        // 1000 entries cost 1000 * (3 * 128) + the keys' bytes: under 400 KB, over 200 KB.
        let _b = MessageBudget::with_limit(200_000);
        let e = (&wire[..]).read_string_map("env").unwrap_err();
        assert!(matches!(e, WireError::MessageTooLarge { what: "env", max: 200_000 }), "{e}");
        assert!(e.to_string().contains("past 200000 bytes, the limit on one message"), "{e}");
        drop(_b);
        let _b = MessageBudget::with_limit(400_000);
        assert_eq!((&wire[..]).read_string_map("env").unwrap().len(), 1000);
        drop(_b);
        // A budget spans reads: two strings of 600 in a budget of 1400 fail on the second,
        // which claims 600 bytes that are not even on the wire.
        let mut two = Vec::new();
        two.write_bytes(&[1; 600]).unwrap();
        two.write_u64(600).unwrap();
        let mut r = &two[..];
        let _b = MessageBudget::with_limit(1400);
        r.read_bytes("a").unwrap();
        assert!(matches!(r.read_bytes("b"), Err(WireError::MessageTooLarge { what: "b", .. })));
        drop(_b);
        // Nested budgets restore the outer one.
        let outer = MessageBudget::with_limit(10);
        {
            let _inner = MessageBudget::start();
            assert!(charge("x", 1000).is_ok());
        }
        assert!(charge("x", 11).is_err());
        drop(outer);
        assert!(charge("x", u64::MAX).is_ok(), "no budget open");
    }

    #[test]
    fn eof_at_message_start_is_clean() {
        assert_eq!((&[][..]).read_u64_or_eof().unwrap(), None);
        assert!(matches!((&[1u8, 2][..]).read_u64_or_eof(), Err(WireError::Eof)));
    }

    #[test]
    fn framed_round_trip_and_drain() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        {
            let mut w = FramedWriter::new(&mut wire);
            w.write_all(&data).unwrap();
            w.finish().unwrap();
        }
        wire.write_u64(42).unwrap();
        let mut src = &wire[..];
        let mut r = FramedReader::new(&mut src);
        let mut first = vec![0u8; 10];
        r.read_exact(&mut first).unwrap();
        assert_eq!(first, data[..10]);
        assert_eq!(r.drain().unwrap(), data.len() as u64 - 10);
        assert!(r.is_done());
        assert_eq!(src.read_u64().unwrap(), 42);
    }

    #[test]
    fn framed_eof_inside_frame_is_an_error() {
        let mut wire = Vec::new();
        wire.write_u64(10).unwrap();
        wire.extend_from_slice(b"abc");
        let mut src = &wire[..];
        let mut r = FramedReader::new(&mut src);
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
