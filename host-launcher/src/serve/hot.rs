//! Hot narinfos: the HTTP front-end's short memory of the trace store's signed narinfos, the
//! binary cache's hot path (a Nix client asks for a narinfo for every store path it considers,
//! most of them many times).
//!
//! - **What is kept**: the bytes of trace-store narinfos, keyed by hash part. Every answer with
//!   a whole trace-store narinfo reads through here ([`Service::trace_narinfo`]): the path before
//!   the router and the router's own. Never an uploaded path's unsigned narinfo (its visibility depends on
//!   the caller), never a miss: a path published a moment ago is served at once.
//! - **Freshness**: an entry is used for at most [`FRESH`] after it was read, then read again.
//!   The publish step writes a narinfo once and never rewrites it, but `vouch store audit
//!   --fix` withdraws narinfos from another process: a withdrawn narinfo may be served for up
//!   to [`FRESH`] after it left the store. (nginx's `open_file_cache_valid` makes the same
//!   trade, with 60 s by default.)
//! - **Bounded**: at most [`MAX_BYTES`] of narinfo text; a narinfo that would pass the bound
//!   first drops every entry that is no longer fresh, then, if that is not enough, all of them.
//!   Narinfos larger than [`MAX_ENTRY`] are not kept.
//!
//! What is not here: which requests are answered before the router, and the caller's checks
//! ([`super::http::hot_narinfo`]); reading the file ([`Service::trace_narinfo`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;

#[cfg(doc)]
use super::Service;

/// How long a narinfo read from the trace store is served from memory.
pub const FRESH: Duration = Duration::from_secs(1);
/// Most bytes of narinfo text kept.
pub const MAX_BYTES: usize = 16 << 20;
/// Largest narinfo kept.
pub const MAX_ENTRY: usize = 64 << 10;

struct Entry {
    text: Bytes,
    read_at: Instant,
}

#[derive(Default)]
struct Map {
    entries: HashMap<[u8; 32], Entry>,
    bytes: usize,
}

/// The kept narinfos (see the module docs).
#[derive(Default)]
pub struct HotNarinfos(Mutex<Map>);

impl std::fmt::Debug for HotNarinfos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        write!(f, "HotNarinfos({} entries, {} bytes)", m.entries.len(), m.bytes)
    }
}

impl HotNarinfos {
    /// The narinfo with hash part `hash`: from memory while fresh, else from `read` (kept when
    /// it answers). `None` when `hash` is not a hash part or `read` has nothing.
    pub fn get(&self, hash: &str, read: impl FnOnce() -> Option<Bytes>) -> Option<Bytes> {
        let key: [u8; 32] = hash.as_bytes().try_into().ok()?;
        let now = Instant::now();
        {
            let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = m.entries.get(&key).filter(|e| now.duration_since(e.read_at) < FRESH) {
                return Some(e.text.clone());
            }
        }
        let text = read()?;
        if text.len() <= MAX_ENTRY {
            self.keep(key, text.clone(), now);
        }
        Some(text)
    }

    fn keep(&self, key: [u8; 32], text: Bytes, now: Instant) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = m.entries.remove(&key) {
            m.bytes -= old.text.len();
        }
        if m.bytes + text.len() > MAX_BYTES {
            m.entries.retain(|_, e| now.duration_since(e.read_at) < FRESH);
            m.bytes = m.entries.values().map(|e| e.text.len()).sum();
            if m.bytes + text.len() > MAX_BYTES {
                m.entries.clear();
                m.bytes = 0;
            }
        }
        m.bytes += text.len();
        m.entries.insert(key, Entry { text, read_at: now });
    }

    /// Entries and bytes kept.
    pub fn size(&self) -> (usize, usize) {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (m.entries.len(), m.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const H: &str = "zcb6z8gqrjqcd9cr2v2rxfil79ps7vp9";

    #[test]
    fn fresh_entries_are_served_from_memory_then_read_again() {
        let hot = HotNarinfos::default();
        let reads = Cell::new(0);
        let read = || {
            reads.set(reads.get() + 1);
            Some(Bytes::from_static(b"StorePath: x\n"))
        };
        assert_eq!(hot.get(H, read).unwrap(), &b"StorePath: x\n"[..]);
        assert_eq!(hot.get(H, read).unwrap(), &b"StorePath: x\n"[..]);
        assert_eq!(reads.get(), 1, "the second answer came from memory");
        std::thread::sleep(FRESH + Duration::from_millis(50));
        // Withdrawn meanwhile: no longer served once the entry is stale.
        assert_eq!(hot.get(H, || None), None);
    }

    #[test]
    fn misses_and_odd_keys_are_not_kept() {
        let hot = HotNarinfos::default();
        assert_eq!(hot.get(H, || None), None);
        assert_eq!(hot.size(), (0, 0));
        assert_eq!(hot.get("short", || Some(Bytes::from_static(b"x"))), None);
        // A narinfo published after a miss is served at once.
        assert!(hot.get(H, || Some(Bytes::from_static(b"new"))).is_some());
        assert_eq!(hot.size(), (1, 3));
    }

    #[test]
    fn memory_is_bounded() {
        let hot = HotNarinfos::default();
        let big = Bytes::from(vec![b'x'; MAX_ENTRY]);
        for i in 0..(MAX_BYTES / MAX_ENTRY) * 3 {
            let key = format!("{i:0>32}");
            assert_eq!(hot.get(&key, || Some(big.clone())).unwrap().len(), MAX_ENTRY);
            assert!(hot.size().1 <= MAX_BYTES, "{:?} after {i}", hot.size());
        }
        let huge = Bytes::from(vec![b'x'; MAX_ENTRY + 1]);
        hot.get(&format!("{:0>32}", "huge"), || Some(huge.clone())).unwrap();
        assert!(hot.size().1 <= MAX_BYTES);
        assert!(hot.get(&format!("{:0>32}", "huge"), || None).is_none(), "not kept");
    }
}
