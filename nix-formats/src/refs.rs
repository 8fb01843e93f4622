//! Reference scanning: which candidate store paths a byte stream (a NAR) mentions.
//!
//! A store object refers to another when the other's 32-character hash part occurs anywhere in
//! its NAR; this is how Nix (`RefScanSink`) finds references, and [`RefScanner`] finds the same
//! set. It is streaming: feed chunks of any size, a hash part split across chunks is still found
//! (the last 31 bytes carry over). It is fast the way Nix's is: a window is only examined if
//! all of its 32 bytes are in the nix32 alphabet, checked from the window's end so that one
//! non-nix32 byte skips the window past it; inside a long run of nix32 characters each new
//! position costs one byte check, a 15-bit prefilter and, rarely, a binary search. Scanning
//! stops once every candidate is found. [`hash_and_scan`] hashes and scans a NAR in one pass.
//!
//! This module also holds the crate's streaming hash-part search primitive ([`for_each_window`]),
//! used by the rewriting in [`crate::ca`]. What is not here: deciding the candidate set (the
//! input closure and the outputs; the caller's policy).

use std::collections::BTreeSet;
use std::io::{self, Read, Write};

use crate::base32::DIGITS as NIX32_DIGIT;
use crate::nar::{NarDigest, NarHasher};
use crate::store_path::{StorePath, HASH_PART_LEN};

const N: usize = HASH_PART_LEN;

#[inline(always)]
fn is_nix32(b: u8) -> bool {
    NIX32_DIGIT[b as usize] != 0xff
}

/// Calls `f(i)` for every `i` such that `s[i..i + 32]` consists of nix32 characters, in
/// ascending order, skipping ahead as soon as a non-nix32 byte rules windows out. `f` returns
/// how many positions to advance (at least 1); it may rewrite `s[i..i + 32]` with other nix32
/// characters or with non-nix32 bytes (the scan goes on over the rewritten bytes).
pub fn for_each_window(s: &mut [u8], mut f: impl FnMut(&mut [u8], usize) -> usize) {
    scan_windows(s, |s, i| Some(f(s, i)));
}

/// The window search of [`for_each_window`] over a buffer held as `B` (`[u8]` to let `f`
/// rewrite it, `&[u8]` to only read it); `f` returning `None` stops the scan.
#[inline(always)]
fn scan_windows<B: AsRef<[u8]> + ?Sized>(
    s: &mut B,
    mut f: impl FnMut(&mut B, usize) -> Option<usize>,
) {
    let len = s.as_ref().len();
    let mut i = 0;
    // s[i..verified] is known to be nix32.
    let mut verified = 0;
    'outer: while i + N <= len {
        let mut j = i + N;
        while j > verified.max(i) {
            j -= 1;
            if !is_nix32(s.as_ref()[j]) {
                i = j + 1;
                verified = i;
                continue 'outer;
            }
        }
        let Some(step) = f(s, i) else { return };
        let step = step.max(1);
        // A callback may have replaced the window with non-nix32 bytes (zeroing).
        verified = if is_nix32(s.as_ref()[i + N - 1]) && step < N { i + N } else { i + step };
        i += step;
    }
}

/// The candidate hash parts, sorted, with a prefilter on their first three characters.
#[derive(Clone, Debug)]
struct HashPartSet {
    parts: Vec<[u8; N]>,
    bloom: Box<[u64; 512]>,
}

impl HashPartSet {
    fn new(mut parts: Vec<[u8; N]>) -> Self {
        parts.sort_unstable();
        parts.dedup();
        let mut bloom = Box::new([0u64; 512]);
        for p in &parts {
            let k = key(p);
            bloom[k >> 6] |= 1 << (k & 63);
        }
        Self { parts, bloom }
    }

    #[inline(always)]
    fn find(&self, w: &[u8]) -> Option<usize> {
        let k = key(w);
        if self.bloom[k >> 6] & (1 << (k & 63)) == 0 {
            return None;
        }
        self.parts.binary_search_by(|p| p[..].cmp(&w[..N])).ok()
    }
}

#[inline(always)]
fn key(w: &[u8]) -> usize {
    let d = |b: u8| (NIX32_DIGIT[b as usize] & 31) as usize;
    d(w[0]) << 10 | d(w[1]) << 5 | d(w[2])
}

/// Streaming scanner for the hash parts of candidate store paths; see the module docs.
#[derive(Clone, Debug)]
pub struct RefScanner {
    set: HashPartSet,
    found: Vec<bool>,
    remaining: usize,
    candidates: Vec<StorePath>,
    /// The last `N - 1` bytes seen (fewer at the start), plus room for `N - 1` new ones.
    carry: Vec<u8>,
}

impl RefScanner {
    /// A scanner for these candidates (two paths sharing a hash part are both reported).
    pub fn new(candidates: impl IntoIterator<Item = StorePath>) -> Self {
        let candidates: Vec<StorePath> = candidates.into_iter().collect();
        let parts = candidates.iter().map(hash_part_bytes).collect();
        let set = HashPartSet::new(parts);
        let n = set.parts.len();
        Self {
            set,
            found: vec![false; n],
            remaining: n,
            candidates,
            carry: Vec::with_capacity(2 * N),
        }
    }

    /// Scans the next chunk of the stream.
    pub fn feed(&mut self, data: &[u8]) {
        if self.remaining == 0 || data.is_empty() {
            return;
        }
        // Windows that straddle the previous chunk and this one.
        let head = data.len().min(N - 1);
        self.carry.extend_from_slice(&data[..head]);
        let mut carry = std::mem::take(&mut self.carry);
        self.scan(&carry);
        // Windows inside this chunk.
        self.scan(data);
        // Keep the last N - 1 bytes of the stream.
        if data.len() >= N - 1 {
            carry.clear();
            carry.extend_from_slice(&data[data.len() - (N - 1)..]);
        } else {
            let keep = carry.len().min(N - 1);
            carry.drain(..carry.len() - keep);
        }
        self.carry = carry;
    }

    /// Mark the candidates whose hash part occurs in `data`; stop once all are found.
    fn scan(&mut self, mut data: &[u8]) {
        let (set, found, remaining) = (&self.set, &mut self.found, &mut self.remaining);
        scan_windows(&mut data, |data, i| {
            if let Some(k) = set.find(&data[i..]) {
                if !found[k] {
                    found[k] = true;
                    *remaining -= 1;
                    if *remaining == 0 {
                        return None;
                    }
                }
            }
            Some(1)
        });
    }

    /// Whether every candidate has been found (further input is not examined).
    pub fn all_found(&self) -> bool {
        self.remaining == 0
    }

    /// The candidates found so far.
    pub fn references(&self) -> BTreeSet<StorePath> {
        self.candidates
            .iter()
            .filter(|p| self.set.find(p.hash_part().as_bytes()).is_some_and(|k| self.found[k]))
            .cloned()
            .collect()
    }
}

impl Write for RefScanner {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The hash part of a store path as a byte array.
pub fn hash_part_bytes(p: &StorePath) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(p.hash_part().as_bytes());
    a
}

/// Scans a whole stream (e.g. a NAR) for references to `candidates`.
pub fn scan_references(
    mut r: impl Read,
    candidates: impl IntoIterator<Item = StorePath>,
) -> io::Result<BTreeSet<StorePath>> {
    let mut s = RefScanner::new(candidates);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        s.feed(&buf[..n]);
    }
    Ok(s.references())
}

/// One pass over a NAR stream: its SHA-256 and size, and the candidates it refers to (what an
/// input-addressed or fixed output needs: `nar_hash`, `nar_size`, `references`).
///
/// With more than one CPU the scanning runs on a second thread, fed the same buffers (at most
/// four of 256 KiB in flight), so that it costs next to nothing beside the hashing.
pub fn hash_and_scan(
    r: impl Read,
    candidates: impl IntoIterator<Item = StorePath>,
) -> io::Result<(NarDigest, BTreeSet<StorePath>)> {
    let scanner = RefScanner::new(candidates);
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        hash_and_scan_threaded(r, scanner)
    } else {
        hash_and_scan_sequential(r, scanner)
    }
}

const CHUNK: usize = 256 * 1024;

fn read_some(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn hash_and_scan_sequential(
    mut r: impl Read,
    mut s: RefScanner,
) -> io::Result<(NarDigest, BTreeSet<StorePath>)> {
    let mut h = NarHasher::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = read_some(&mut r, &mut buf)?;
        if n == 0 {
            return Ok((h.finish(), s.references()));
        }
        h.update(&buf[..n]);
        s.feed(&buf[..n]);
    }
}

fn hash_and_scan_threaded(
    mut r: impl Read,
    mut s: RefScanner,
) -> io::Result<(NarDigest, BTreeSet<StorePath>)> {
    use std::sync::mpsc::{channel, sync_channel};
    const IN_FLIGHT: usize = 4;
    let (to_scan, scan_rx) = sync_channel::<(Vec<u8>, usize)>(IN_FLIGHT);
    let (back_tx, back) = channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let scan = scope.spawn(move || {
            for (buf, n) in scan_rx {
                s.feed(&buf[..n]);
                // The reader may have stopped early (error); then nobody takes buffers back.
                let _ = back_tx.send(buf);
            }
            s.references()
        });
        let mut h = NarHasher::new();
        let mut allocated = 0;
        let result = loop {
            let mut buf = match back.try_recv() {
                Ok(b) => b,
                Err(_) if allocated < IN_FLIGHT => {
                    allocated += 1;
                    vec![0u8; CHUNK]
                }
                Err(_) => back.recv().expect("the scanner thread returns every buffer"),
            };
            let n = match read_some(&mut r, &mut buf) {
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            if n == 0 {
                break Ok(h.finish());
            }
            h.update(&buf[..n]);
            to_scan.send((buf, n)).expect("the scanner thread runs until the channel closes");
        };
        drop(to_scan);
        let refs = scan.join().expect("the scanner thread does not panic");
        result.map(|d| (d, refs))
    })
}

#[cfg(test)]
#[path = "refs_tests.rs"]
mod tests;
