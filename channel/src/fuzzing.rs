//! Body of the `channel` fuzz target (the repository's `fuzz/` workspace), a plain function so
//! that `tests/fuzz_seeds.rs` replays its seed corpus with the stable toolchain. Not part of the
//! channel's API.
//!
//! [`frames`] reads arbitrary bytes as the other side would send them (in the SNP model the host
//! is the attacker, so the agent's reader is the one that matters; the host reads the guest's
//! frames with the same reader) and panics only if an invariant is broken:
//! - every frame read has a known kind, a payload within its kind's limit, and no payload where
//!   its kind allows none;
//! - a stream read to a clean end without heartbeats re-encodes ([`FrameWriter`]) to exactly the
//!   input (one encoding per frame sequence);
//! - each JSON payload decodes as its kind's message or is an error, and a decoded message
//!   re-encodes to JSON that decodes to the same message;
//! - a NAR stream after a `NarBegin` either delivers exactly the announced size, ending at its
//!   `NarEnd`, or fails; after a failure it keeps failing (the reader never resynchronises on
//!   its own).
//!
//! Heap use is held to [`BOUND`] by the harness: a frame header alone must not make the reader
//! allocate its announced payload.

use std::io::Read;

use nix_formats::fuzzing::AllocBound;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::messages::{Failure, Heartbeat, Hello, NarBegin, Outcome, Phase, Setup};
use crate::proto::{Frame, FrameReader, FrameWriter, Kind};

/// The heap bound of [`frames`]: decoded JSON is a few times its text, and a reader may keep
/// one [`crate::proto::CHUNK_SIZE`] buffer ahead of the data.
pub const BOUND: AllocBound = AllocBound { per_byte: 16, base: 512 << 10 };

/// Fuzz body: a frame stream, as the module docs say.
pub fn frames(data: &[u8]) {
    round_trip(data);
    messages(data);
}

fn round_trip(data: &[u8]) {
    let mut r = FrameReader::new(data);
    let mut seen = Vec::new();
    let clean = loop {
        match r.next_frame() {
            Ok(Some(f)) => {
                check_frame(&f);
                seen.push(f);
            }
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    if clean && r.heartbeats() == 0 {
        let mut w = FrameWriter::new(Vec::new());
        for f in &seen {
            w.send(f.kind, &f.payload).expect("a frame that was read can be written");
        }
        assert_eq!(w.get_mut().as_slice(), data, "frames re-encode to the bytes they came from");
    }
}

fn check_frame(f: &Frame) {
    assert_ne!(f.kind, Kind::Heartbeat, "heartbeats are consumed by the reader");
    assert!(f.payload.len() <= f.kind.max_len() as usize, "{:?} over its limit", f.kind);
    if matches!(f.kind, Kind::NarEnd | Kind::InputsDone | Kind::Bye) {
        assert!(f.payload.is_empty(), "{:?} with a payload", f.kind);
    }
    if f.kind == Kind::NarChunk {
        assert!(!f.payload.is_empty(), "empty NAR chunk");
    }
}

/// Decode `f` as a `T`; if it decodes, its JSON must decode to the same value.
fn json<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(f: &Frame) -> Option<T> {
    let v: T = f.json().ok()?;
    let again = serde_json::to_vec(&v).expect("a decoded message encodes");
    let back: T = serde_json::from_slice(&again).expect("our own JSON decodes");
    assert_eq!(back, v, "{:?} message JSON round trip", f.kind);
    Some(v)
}

fn messages(data: &[u8]) {
    let mut r = FrameReader::new(data);
    loop {
        let f = match r.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return,
        };
        match f.kind {
            Kind::Hello => drop(json::<Hello>(&f)),
            Kind::Setup => drop(json::<Setup>(&f)),
            Kind::Phase => drop(json::<Phase>(&f)),
            Kind::Outcome => drop(json::<Outcome>(&f)),
            Kind::Failure => drop(json::<Failure>(&f)),
            Kind::Heartbeat => drop(json::<Heartbeat>(&f)),
            Kind::NarBegin => {
                let Some(begin) = json::<NarBegin>(&f) else { continue };
                if !nar(&mut r, &begin) {
                    return;
                }
            }
            _ => {}
        }
    }
}

/// Reads the NAR stream `begin` announces; returns whether it ended well.
fn nar(r: &mut FrameReader<&[u8]>, begin: &NarBegin) -> bool {
    let path = begin.path.to_string();
    let mut s = r.nar_stream(&path, begin.nar_size);
    let mut got = 0u64;
    let mut buf = [0u8; 4096];
    let ok = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got += n as u64,
            Err(_) => break false,
        }
    };
    assert_eq!(s.received(), got, "bytes delivered and counted agree");
    if ok {
        assert!(s.finished(), "a NAR stream ends only at NarEnd");
        assert_eq!(got, begin.nar_size, "a complete NAR stream has its announced size");
        return true;
    }
    assert!(got <= begin.nar_size, "never more than the announced size");
    assert!(s.read(&mut buf).is_err(), "a failed NAR stream stays failed");
    assert!(s.take_error().is_some(), "a failed NAR stream keeps its error");
    false
}
