//! Framing tests: layout, limits, malformed input, NAR streams, heartbeats, the write limit.

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
    // Fifteen kinds; the heartbeat is consumed by the reader.
    assert_eq!(got.len(), 14);
    assert!(got.iter().all(|f| f.as_ref().is_ok_and(|f| f.kind != Kind::Heartbeat)));
}

#[test]
fn heartbeats_are_consumed_anywhere_and_stamp_liveness() {
    let data = vec![7u8; CHUNK_SIZE + 10];
    let mut w = FrameWriter::new(Vec::new());
    w.send(Kind::Heartbeat, b"{}").unwrap();
    w.send(Kind::Log, b"a").unwrap();
    w.send_json(Kind::NarBegin, &serde_json::json!({"path": "p"})).unwrap();
    w.send(Kind::NarChunk, &data[..CHUNK_SIZE]).unwrap();
    w.send(Kind::Heartbeat, b"{}").unwrap();
    w.send(Kind::NarChunk, &data[CHUNK_SIZE..]).unwrap();
    w.send(Kind::Heartbeat, b"{}").unwrap();
    w.send(Kind::NarEnd, &[]).unwrap();
    w.send(Kind::Heartbeat, b"{}").unwrap();
    let live = Liveness::new();
    let mut r = FrameReader::with_liveness(&w.get_mut()[..], live.clone());
    assert_eq!(r.expect(Kind::Log, "log").unwrap().payload, b"a");
    r.expect(Kind::NarBegin, "begin").unwrap();
    let mut got = Vec::new();
    r.nar_stream("p", data.len() as u64).read_to_end(&mut got).unwrap();
    assert_eq!(got, data);
    assert!(r.next_frame().unwrap().is_none(), "a trailing heartbeat is not a frame");
    assert_eq!(r.heartbeats(), 4);
    assert_eq!(live.frames(), 9);
}

#[test]
fn heartbeat_payload_is_small() {
    let mut w = FrameWriter::new(Vec::new());
    assert!(w.send(Kind::Heartbeat, &[b' '; MAX_HEARTBEAT_PAYLOAD as usize + 1]).is_err());
    let got = frames(b"\x0d\0\0\0\x01\x10\0\0");
    let e = got.last().unwrap().as_ref().unwrap_err();
    assert!(e.contains("Heartbeat payload of 4097 bytes exceeds 4096"), "{e}");
}

#[test]
fn write_limit_splits_every_write() {
    struct Calls(Vec<usize>, Vec<u8>);
    impl Write for Calls {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.push(b.len());
            self.1.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut w = FrameWriter::with_max_write(Calls(Vec::new(), Vec::new()), GUEST_MAX_WRITE);
    let data = vec![1u8; 100_000];
    w.send(Kind::Log, &data).unwrap();
    w.send_nar(&serde_json::json!({"path": "p"}), &mut &data[..]).unwrap();
    let calls = w.get_mut();
    assert!(calls.0.iter().all(|n| *n <= GUEST_MAX_WRITE), "{:?}", calls.0);
    assert_eq!(calls.0[..7], [16384, 16384, 16384, 16384, 16384, 16384, 1704]);
    let mut r = FrameReader::new(&calls.1[..]);
    assert_eq!(r.expect(Kind::Log, "log").unwrap().payload, data);
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
    let sent = w.send_nar(&serde_json::json!({"path": "/nix/store/x"}), &mut &data[..]).unwrap();
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

/// Found by the `channel` fuzz target: the reader allocated a frame's announced payload (up to
/// 16 MiB) before any of it arrived, so an 8-byte header cost 16 MiB. It now grows the payload
/// as the bytes come, and a short payload is still an I/O error.
#[test]
fn a_header_alone_does_not_allocate_its_announced_payload() {
    let mut hdr = vec![Kind::Log as u8, 0, 0, 0];
    hdr.extend_from_slice(&MAX_PAYLOAD.to_le_bytes());
    hdr.extend_from_slice(b"only this");
    let mut r = FrameReader::new(&hdr[..]);
    let e = r.next_frame().unwrap_err();
    assert!(matches!(&e, ProtoError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof), "{e}");
    let mut w = FrameWriter::new(Vec::new());
    let big = vec![7u8; CHUNK_SIZE * 3 + 5];
    w.send(Kind::Log, &big).unwrap();
    assert_eq!(FrameReader::new(&w.get_mut()[..]).next_frame().unwrap().unwrap().payload, big);
}

/// Found by the `channel` fuzz target: a NAR stream counted the chunk it refused as too long in
/// `received()`, which then exceeded both what was delivered and the announced size.
#[test]
fn a_refused_chunk_is_not_counted_as_received() {
    let bytes = nar_frames(&[1u8; 100], 100);
    let mut r = FrameReader::new(&bytes[..]);
    r.next_frame().unwrap();
    let mut s = r.nar_stream("/nix/store/x", 99);
    let mut got = Vec::new();
    assert!(s.read_to_end(&mut got).is_err());
    assert_eq!(s.received(), got.len() as u64);
    assert!(s.received() <= 99);
}
