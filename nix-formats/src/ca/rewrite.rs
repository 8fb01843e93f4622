//! Streaming hash-part rewriting and Nix's `HashModuloSink`.
//!
//! [`Rewriter`] replaces one 32-character hash part by another (or by 32 NUL bytes) in a stream,
//! with exactly the semantics of Nix's `RewritingSink`: leftmost occurrences, the search resuming
//! right after the start of each replaced occurrence over the already rewritten bytes, 31 bytes
//! held back between chunks, and (optionally) the stream offsets of the occurrences recorded.
//! Several rewrites are applied as a chain of single rewrites in the order given, which is what
//! Nix's `rewriteStrings` over a `std::map` does (sorted by the replaced hash part).
//!
//! [`HashModuloSink`] hashes a stream with one hash part zeroed and, under
//! [`SelfRefRule::ZeroAndPositions`], `|<offset>` appended for each occurrence.
//! [`RewriteReader`] applies a chain to an `impl Read`.
//!
//! What is not here: finding references (see [`crate::refs`]) or deciding what to rewrite.

use std::io::{self, Read};

use super::SelfRefRule;
use crate::hash::{Hash, HashAlgo, Hasher};
use crate::refs::for_each_window;

const N: usize = 32;

/// One streaming rewrite `from` → `to` (both 32 bytes); see the module docs.
#[derive(Clone, Debug)]
pub struct Rewriter {
    from: [u8; N],
    to: [u8; N],
    /// Bytes not yet handed on (at most 31 between calls).
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    pos: u64,
    matches: Option<Vec<u64>>,
}

impl Rewriter {
    /// Rewrites `from` to `to`.
    pub fn new(from: [u8; N], to: [u8; N]) -> Self {
        Self { from, to, buf: Vec::new(), pos: 0, matches: None }
    }

    /// Like [`Self::new`], also recording the offsets of the occurrences.
    pub fn recording(from: [u8; N], to: [u8; N]) -> Self {
        Self { matches: Some(Vec::new()), ..Self::new(from, to) }
    }

    /// Rewrites `data` (the next bytes of the stream), appending the finished bytes to `out`.
    pub fn process(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.from == self.to && self.matches.is_none() {
            out.extend_from_slice(data);
            self.pos += data.len() as u64;
            return;
        }
        self.buf.extend_from_slice(data);
        let (from, to, pos, matches) = (&self.from, &self.to, self.pos, &mut self.matches);
        for_each_window(&mut self.buf, |s, i| {
            if s[i..i + N] == from[..] {
                s[i..i + N].copy_from_slice(to);
                if let Some(m) = matches {
                    m.push(pos + i as u64);
                }
            }
            1
        });
        let keep = self.buf.len().min(N - 1);
        let done = self.buf.len() - keep;
        out.extend_from_slice(&self.buf[..done]);
        self.buf.drain(..done);
        self.pos += done as u64;
    }

    /// Hands on the held-back bytes at the end of the stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.buf);
        self.pos += self.buf.len() as u64;
        self.buf.clear();
    }

    /// Offsets of the occurrences found so far (when recording).
    pub fn matches(&self) -> &[u64] {
        self.matches.as_deref().unwrap_or(&[])
    }

    /// Bytes handed on so far.
    pub fn position(&self) -> u64 {
        self.pos
    }
}

/// A chain of rewrites applied one after the other.
#[derive(Clone, Debug, Default)]
pub struct RewriteChain {
    stages: Vec<Rewriter>,
    tmp: [Vec<u8>; 2],
}

impl RewriteChain {
    /// The chain `rewrites[0]`, then `rewrites[1]`, ...
    pub fn new(rewrites: &[([u8; N], [u8; N])]) -> Self {
        let stages = rewrites.iter().map(|(f, t)| Rewriter::new(*f, *t)).collect();
        Self { stages, tmp: Default::default() }
    }

    /// Rewrites the next bytes; finished bytes are appended to `out`.
    pub fn process(&mut self, data: &[u8], out: &mut Vec<u8>) {
        self.run(Some(data), out)
    }

    /// Ends the stream.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.run(None, out)
    }

    fn run(&mut self, data: Option<&[u8]>, out: &mut Vec<u8>) {
        let n = self.stages.len();
        if n == 0 {
            out.extend_from_slice(data.unwrap_or_default());
            return;
        }
        let [a, b] = &mut self.tmp;
        a.clear();
        if let Some(d) = data {
            a.extend_from_slice(d);
        }
        for (k, stage) in self.stages.iter_mut().enumerate() {
            let dst: &mut Vec<u8> = if k + 1 == n { out } else { b };
            stage.process(a, dst);
            if data.is_none() {
                stage.finish(dst);
            }
            if k + 1 < n {
                std::mem::swap(a, b);
                b.clear();
            }
        }
    }
}

/// An `impl Read` that applies a [`RewriteChain`] to another reader.
#[derive(Debug)]
pub struct RewriteReader<R: Read> {
    inner: R,
    chain: RewriteChain,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    eof: bool,
}

impl<R: Read> RewriteReader<R> {
    /// Rewrites what `inner` yields with `rewrites`, in order.
    pub fn new(inner: R, rewrites: &[([u8; N], [u8; N])]) -> Self {
        Self {
            inner,
            chain: RewriteChain::new(rewrites),
            inbuf: vec![0u8; 256 * 1024],
            out: Vec::new(),
            out_pos: 0,
            eof: false,
        }
    }
}

impl<R: Read> Read for RewriteReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.out_pos == self.out.len() {
            if self.eof {
                return Ok(0);
            }
            self.out.clear();
            self.out_pos = 0;
            let n = match self.inner.read(&mut self.inbuf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.eof = true;
                self.chain.finish(&mut self.out);
            } else {
                self.chain.process(&self.inbuf[..n], &mut self.out);
            }
        }
        let k = buf.len().min(self.out.len() - self.out_pos);
        buf[..k].copy_from_slice(&self.out[self.out_pos..self.out_pos + k]);
        self.out_pos += k;
        Ok(k)
    }
}

/// Nix's `HashModuloSink`: the hash of a stream with `modulus` replaced by NUL bytes and, under
/// [`SelfRefRule::ZeroAndPositions`], `|<offset>` (decimal) appended per occurrence. The offsets
/// are kept until the end (8 bytes per occurrence of the self hash part).
#[derive(Debug)]
pub struct HashModuloSink {
    rw: Rewriter,
    hasher: Hasher,
    rule: SelfRefRule,
    tmp: Vec<u8>,
}

impl HashModuloSink {
    /// Hashes with `algo`, zeroing `modulus` (a hash part).
    pub fn new(algo: HashAlgo, modulus: [u8; N], rule: SelfRefRule) -> Self {
        Self {
            rw: Rewriter::recording(modulus, [0; N]),
            hasher: Hasher::new(algo),
            rule,
            tmp: Vec::new(),
        }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.tmp.clear();
        self.rw.process(data, &mut self.tmp);
        self.hasher.update(&self.tmp);
    }

    /// The hash, the number of bytes hashed (without the position suffixes) and the offsets of
    /// the occurrences.
    pub fn finish(mut self) -> (Hash, u64, Vec<u64>) {
        self.tmp.clear();
        self.rw.finish(&mut self.tmp);
        self.hasher.update(&self.tmp);
        let matches = self.rw.matches().to_vec();
        if self.rule == SelfRefRule::ZeroAndPositions {
            for p in &matches {
                self.hasher.update(format!("|{p}").as_bytes());
            }
        }
        (self.hasher.finish(), self.rw.position(), matches)
    }
}

impl io::Write for HashModuloSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
