//! Replays the `channel` fuzz target's seed corpus (`fuzz/seeds/channel/`) through its body
//! (`channel::fuzzing::frames`) under its heap bound, with single-byte mutations, on every
//! stable `cargo test`; and writes that corpus (`--ignored`).

#[path = "../../fuzz/src/alloc.rs"]
mod alloc;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

use channel::messages::{
    AttesterKind, Failure, FailureKind, Heartbeat, Hello, NarBegin, Outcome, Phase, PhaseName,
    Setup, SimulatedSetup,
};
use channel::proto::{FrameWriter, Kind};

#[global_allocator]
static HEAP: alloc::Counting = alloc::Counting;

#[test]
fn channel_seeds() {
    let n = replay::replay("channel", 3, channel::fuzzing::BOUND, channel::fuzzing::frames);
    assert!(n >= 4);
}

const PATH: &str = "/nix/store/r554scqj1axj9a9awy2gjc18cvysj746-nb-c1";

fn nar(w: &mut FrameWriter<Vec<u8>>, bytes: &[u8], size: u64) {
    let begin = NarBegin { path: PATH.parse().unwrap(), nar_size: size };
    w.send_json(Kind::NarBegin, &begin).unwrap();
    for c in bytes.chunks(40) {
        w.send(Kind::NarChunk, c).unwrap();
    }
    w.send(Kind::NarEnd, &[]).unwrap();
}

/// The seeds: what each side sends in one step (frames written by the channel's own writer,
/// with the messages the agent and the launcher send; the NAR is a seed of `nar_unpack`), plus
/// NAR streams longer and shorter than announced.
fn seed_streams() -> Vec<(&'static str, Vec<u8>)> {
    let (_, payload) = replay::seeds("nar_unpack")
        .into_iter()
        .find(|(p, _)| p.ends_with("valid-exec.nar"))
        .expect("the NAR seed valid-exec.nar");
    let mut host = FrameWriter::new(Vec::new());
    let setup = Setup {
        simulated: Some(SimulatedSetup {
            vcek_key_pkcs8: "MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDA=".into(),
            chip_id: "ab".repeat(64),
            tcb: [3, 0, 8, 115],
            measurement: "7a".repeat(48),
        }),
    };
    host.send_json(Kind::Setup, &setup).unwrap();
    host.send(Kind::Job, br#"{"job":{"v":1}}"#).unwrap();
    nar(&mut host, &payload, payload.len() as u64);
    host.send(Kind::InputsDone, &[]).unwrap();

    let mut guest = FrameWriter::new(Vec::new());
    let hello = Hello {
        protocol: channel::proto::PROTOCOL_VERSION,
        agent_version: "vouch-agent 0.1.0".into(),
        attester: AttesterKind::Simulated,
        uptime_ms: 812,
    };
    guest.send_json(Kind::Hello, &hello).unwrap();
    guest.send_json(Kind::Heartbeat, &Heartbeat { seq: 1, uptime_ms: 900 }).unwrap();
    guest.send_json(Kind::Phase, &Phase { phase: PhaseName::Building, uptime_ms: 950 }).unwrap();
    guest.send(Kind::Log, b"building\n").unwrap();
    nar(&mut guest, &payload, payload.len() as u64);
    let outcome = Outcome {
        statement: r#"{"v":1}"#.into(),
        report: "AAAA".into(),
        attester: AttesterKind::Simulated,
        certs: None,
    };
    guest.send_json(Kind::Outcome, &outcome).unwrap();
    guest.send(Kind::Bye, &[]).unwrap();

    let mut failed = FrameWriter::new(Vec::new());
    failed.send_json(Kind::Hello, &hello).unwrap();
    let failure = Failure { kind: FailureKind::InputHash, message: "input hash".into() };
    failed.send_json(Kind::Failure, &failure).unwrap();
    failed.send(Kind::Bye, &[]).unwrap();

    let mut long = FrameWriter::new(Vec::new());
    nar(&mut long, &payload, payload.len() as u64 - 3);
    let mut short = FrameWriter::new(Vec::new());
    nar(&mut short, &payload, payload.len() as u64 + 3);
    vec![
        ("host-to-guest", host.get_mut().clone()),
        ("guest-to-host", guest.get_mut().clone()),
        ("guest-failure", failed.get_mut().clone()),
        ("nar-too-long", long.get_mut().clone()),
        ("nar-too-short", short.get_mut().clone()),
    ]
}

/// Writes the seed corpus (run with `--ignored`).
#[test]
#[ignore = "regenerates fuzz/seeds/channel"]
fn write_channel_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/channel");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seed_streams() {
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    }
}
