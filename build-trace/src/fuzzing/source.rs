//! The remote trace source's fuzz body ([`trace_source`]): everything `crate::source` reads from
//! a remote trace store's answers, each reader given the same bytes. Invariants:
//! - laut's index (`traces/<hash>`): an accepted index lists entries whose ids are 32 lowercase
//!   hex digits, each the first half of the statement digest of every JWS listed under it, with
//!   no JWS twice; the entries rendered as an index again parse to the same entries;
//! - every URL built from what a server said (an entry's directory, the step a narinfo's
//!   `Deriver` names, a `.drv`'s NAR that a narinfo's `URL` names) stays in the store: parsed by
//!   a WHATWG URL parser (the `url` crate: what browsers, proxies and many servers do), it has
//!   the base's origin, no query or fragment, and exactly the path asked for under the base's
//!   path (nothing resolved away); percent-decoded, as a server does, no segment of it is empty,
//!   `.` or `..`, or holds a `/`, `\` or NUL; and an entry's directory decodes to the step's
//!   base name;
//! - a narinfo: the deriver read is the narinfo's own, and only for the path it describes; the
//!   `.drv` NAR's URL is its `URL`, only for that path, uncompressed;
//! - a `.drv`'s NAR: an accepted NAR is exactly the NAR of the file it gives; its derivation is
//!   accepted under the path its bytes hash to (when they are canonical) and refused as
//!   tampered under that path otherwise, and under any other path;
//! - the local cache's URL index: a link names a blob directly under `sha256/`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix_formats::derivation::Derivation;
use nix_formats::nar::NarWriter;
use nix_formats::narinfo::NarInfo;
use nix_formats::StorePath;

use crate::source::parse;
use crate::source::SourceError;

/// The base URL of the fuzzed store: a prefix below the host, as a shared server would have.
pub const BASE: &str = "https://cache.fuzz:8443/stores/one";
/// A step whose index is read (its name holds `?` and `=`, legal in store path names).
pub const STEP: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a?b=c.drv";

/// Fuzz body: a remote trace store's answers (see the module docs).
pub fn trace_source(data: &[u8]) {
    index(data);
    narinfo(data);
    drv_nar(data);
    cache_link(data);
}

fn step() -> StorePath {
    StorePath::parse(STEP).expect("the fuzz step")
}

fn index(data: &[u8]) {
    let url = format!("{BASE}/traces/x");
    let Ok(entries) = parse::entries_in_index(&url, data) else { return };
    let mut seen = BTreeSet::new();
    for (id, list) in &entries {
        let hex = id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        assert!(id.len() == 32 && hex, "entry id {id:?}");
        assert!(!list.is_empty(), "entry {id} lists no JWS");
        for jws in list {
            let d = crate::jws::statement_digest_of(jws).expect("a listed JWS names a statement");
            assert_eq!(hex::encode(&d[..16]), *id, "a JWS under another entry's id");
            assert!(seen.insert(jws), "a JWS listed twice");
        }
        entry_urls(&step(), id);
    }
    let all: Vec<&String> = entries.values().flatten().collect();
    let again = serde_json::json!({ "signatures": all }).to_string();
    let reread = parse::entries_in_index(&url, again.as_bytes()).expect("a rendered index parses");
    assert_eq!(reread, entries, "index → entries → index → entries");
}

/// The URLs of an entry of `step` stay in the store, and its directory names the step.
fn entry_urls(step: &StorePath, id: &str) {
    in_store(&format!("traces/{}", step.hash_part()));
    let segments = in_store(&format!("{}/statement.json", parse::entry_dir(step, id)));
    assert_eq!(segments[3], step.base_name().as_bytes(), "the step's directory, decoded");
    assert_eq!(segments[4], id.as_bytes(), "the entry's directory");
}

fn narinfo(data: &[u8]) {
    let url = format!("{BASE}/x.narinfo");
    let step = step();
    let Some(info) = std::str::from_utf8(data).ok().and_then(|t| NarInfo::parse(t).ok()) else {
        assert!(parse::deriver_hint(&url, data, &step).is_err(), "not a narinfo, yet read");
        assert!(parse::nar_in_narinfo(&url, data, &step).is_err(), "not a narinfo, yet read");
        return;
    };
    let p = &info.store_path;
    let deriver = parse::deriver_hint(&url, data, p).expect("a narinfo has its deriver read");
    assert_eq!(deriver, info.deriver, "the narinfo's own deriver");
    if let Some(d) = &deriver {
        entry_urls(d, "0123456789abcdef0123456789abcdef");
    }
    let other = if *p == step { StorePath::parse(BASE_OTHER).expect("a path") } else { step };
    assert_eq!(parse::deriver_hint(&url, data, &other).ok().flatten(), None, "another path's");
    assert!(parse::nar_in_narinfo(&url, data, &other).is_err(), "another path's NAR");
    if let Ok(rel) = parse::nar_in_narinfo(&url, data, p) {
        assert_eq!(rel, info.url);
        assert!(matches!(info.compression.as_deref(), None | Some("none")));
        in_store(&rel);
    }
}

const BASE_OTHER: &str = "/nix/store/00000000000000000000000000000000-other.drv";

/// `rel` joined to [`BASE`] stays in the store (see the module docs); its segments, decoded.
fn in_store(rel: &str) -> Vec<Vec<u8>> {
    let joined = format!("{BASE}/{rel}");
    let base = url::Url::parse(BASE).expect("the base URL");
    let u = url::Url::parse(&joined).unwrap_or_else(|e| panic!("{joined:?} is no URL: {e}"));
    assert_eq!(u.origin(), base.origin(), "{joined:?} leaves the origin");
    assert_eq!((u.query(), u.fragment()), (None, None), "{joined:?} has a query or fragment");
    assert_eq!(u.path(), format!("{}/{rel}", base.path()), "{joined:?}: a path resolved");
    let segments: Vec<Vec<u8>> = rel.split('/').map(percent_decode).collect();
    for s in &segments {
        let plain = !matches!(&s[..], b"" | b"." | b"..") && !s.contains(&b'/');
        assert!(plain && !s.contains(&b'\\') && !s.contains(&0), "{joined:?}: segment {s:?}");
    }
    segments
}

/// What a server makes of a path segment: `%XX` decoded (other `%` kept).
fn percent_decode(seg: &str) -> Vec<u8> {
    let b = seg.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match hex.filter(|_| b[i] == b'%').and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

fn drv_nar(data: &[u8]) {
    let url = format!("{BASE}/drv/x.nar");
    let Ok(bytes) = parse::single_file(data) else { return };
    assert!(bytes.len() as u64 <= parse::MAX_DRV, "{} bytes", bytes.len());
    let nar = |executable: bool| {
        let mut w = NarWriter::new(Vec::new()).expect("a NAR in memory");
        w.regular(executable, &bytes).expect("a NAR in memory");
        w.into_inner()
    };
    assert!(nar(false) == data || nar(true) == data, "an accepted NAR is exactly its file's");
    let Ok(drv) = Derivation::from_aterm(&bytes) else { return };
    let Ok(own) = drv.drv_path("fuzz") else { return };
    let answer = parse::checked(&url, &own, data);
    if drv.to_aterm() == bytes {
        let (p, d) = answer.expect("a .drv is accepted under its own path");
        assert_eq!((p, d), (own.clone(), drv));
    } else {
        assert!(matches!(answer, Err(SourceError::Tampered { .. })), "non-canonical bytes");
    }
    let mut digest = *own.digest();
    digest[0] ^= 1;
    let other = StorePath::from_parts(digest, own.name()).expect("the same name");
    let answer = parse::checked(&url, &other, data);
    assert!(matches!(answer, Err(SourceError::Tampered { .. })), "accepted under another path");
}

fn cache_link(data: &[u8]) {
    let Some(digest) = parse::digest_of_link(Path::new(OsStr::from_bytes(data))) else { return };
    let dir = Path::new("/cache/sha256");
    let blob = dir.join(digest);
    assert_eq!(blob.parent(), Some(dir), "a blob outside sha256/: {digest:?}");
    assert_eq!(blob.file_name(), Some(OsStr::new(digest)));
}
