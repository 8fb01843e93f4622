//! One core result, every front-end's answer: the Nix protocols' wire `BuildResult` (in both
//! realisation formats, through the real encoder and decoder) and the CI service's build state
//! and outputs JSON are all made from the same `core::BuildResult`, with the records the publish
//! step signed and the attester kind of the checked evidence — nothing re-signed, re-read or
//! inferred on the way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use build_trace::NarHash;
use channel::messages::AttesterKind;
use host_launcher::build::Timings;
use host_launcher::core::result::Published;
use host_launcher::core::{
    BuildResult, Built, Diverged, FailureStatus, LegacyRealisation, PublishedOutput,
};
use host_launcher::nixproto::version::FEATURE_REALISATION_WITH_PATH;
use host_launcher::nixproto::{self, types, BuildStatus, ClientProfile, Protocol};
use host_launcher::serve::builds::state_of;
use host_launcher::serve::records::BuildState;
use host_launcher::vm::Mode;
use nix_formats::StorePath;

const OUT: &str = "/nix/store/fib9f3qwvznq3m047cv9kmy5lffsrny7-x";
const ID: &str = "sha256:6f869f9ea2823bda165e06076fd0de4366dead2c0e8d2dbbad277d4f15c373f5!out";

fn built() -> BuildResult {
    let path = StorePath::parse(OUT).unwrap();
    let json = format!(
        r#"{{"dependentRealisations":{{}},"id":"{ID}","outPath":"{}","signatures":["h-simulated-1:bGVnYWN5"]}}"#,
        path.base_name()
    );
    let out = PublishedOutput {
        path: path.clone(),
        info: build_trace::PathInfo {
            nar_hash: NarHash::of(b"nar"),
            nar_size: 3,
            references: BTreeSet::from([path]),
            ca: Some("fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".into()),
        },
        narinfo_sigs: BTreeSet::from(["h-simulated-1:bmFyaW5mbw==".to_string()]),
        signatures: BTreeSet::from(["h-simulated-1:dHJhY2U=".to_string()]),
        legacy: Some(LegacyRealisation { id: ID.into(), json }),
        diverged: None,
    };
    BuildResult::Built(Box::new(Built {
        start_time: 100,
        stop_time: 160,
        attester: AttesterKind::Simulated,
        evidence_root: "SIMULATED root".into(),
        measurement: "00".into(),
        mode: Mode::Tcg,
        timings: Timings::default(),
        published: Published {
            key_name: "h-simulated-1".into(),
            step_dir: PathBuf::from("/traces/vouch/v1/steps/x/1"),
            outputs: BTreeMap::from([("out".to_string(), out)]),
        },
    }))
}

/// Encode `res` for `client` with the real encoder and decode it as a client would.
fn over_the_wire(res: &nixproto::BuildResult, client: &ClientProfile) -> nixproto::BuildResult {
    let mut bytes = Vec::new();
    types::write_build_result(&mut bytes, res, client).unwrap();
    types::read_build_result(&mut bytes.as_slice(), client).unwrap()
}

#[test]
fn the_wire_result_and_the_build_json_come_from_one_core_result() {
    let core = built();
    let BuildResult::Built(b) = &core else { unreachable!() };
    let published = &b.published.outputs["out"];

    // The Nix protocols.
    let wire = nixproto::BuildResult::from(&core);
    assert_eq!(
        (wire.status, wire.error_msg.as_str(), wire.times_built),
        (BuildStatus::Built, "", 1)
    );
    assert_eq!((wire.start_time, wire.stop_time), (100, 160));
    let out = &wire.built_outputs["out"];
    assert_eq!(out.out_path.to_string(), OUT);
    assert_eq!(out.signatures, published.signatures, "the publish step's signatures");
    assert_eq!(out.legacy, published.legacy);
    // Nix ≥ 2.35 reads the path and the signatures over its fingerprint ...
    let new = ClientProfile::new(
        Protocol::Worker,
        0x126,
        BTreeSet::from([FEATURE_REALISATION_WITH_PATH.to_string()]),
    );
    let read = over_the_wire(&wire, &new);
    assert_eq!(read.built_outputs["out"].signatures, published.signatures);
    assert_eq!(read.built_outputs["out"].out_path.to_string(), OUT);
    // ... Nix ≤ 2.34 the signed realisation, byte for byte.
    for old in [
        ClientProfile::new(Protocol::Worker, 0x122, BTreeSet::new()),
        ClientProfile::new(Protocol::Serve, 0x207, BTreeSet::new()),
    ] {
        let read = over_the_wire(&wire, &old);
        assert_eq!(read.built_outputs["out"].legacy, published.legacy, "{old:?}");
        assert_eq!(read.built_outputs["out"].out_path.to_string(), OUT);
        assert_eq!((read.start_time, read.stop_time), (100, 160));
    }

    // The CI service.
    let BuildState::Succeeded { outputs, attester } = state_of(&core) else {
        panic!("a built result is a succeeded build")
    };
    assert_eq!(attester, AttesterKind::Simulated, "from the result, not from key names");
    let o = &outputs["out"];
    assert_eq!(o["path"], OUT);
    assert_eq!(o["nar_hash"], NarHash::of(b"nar").to_string());
    assert_eq!(o["nar_size"], 3);
    assert_eq!(o["narinfo_signatures"], serde_json::json!(["h-simulated-1:bmFyaW5mbw=="]));
    assert_eq!(o["signatures"], serde_json::json!(["h-simulated-1:dHJhY2U="]));
    assert_eq!(o["realisation"]["id"], ID);
    assert_eq!(o["realisation"]["signatures"], serde_json::json!(["h-simulated-1:bGVnYWN5"]));
}

#[test]
fn a_failure_is_the_same_failure_everywhere() {
    for (status, wire_status) in [
        (FailureStatus::PermanentFailure, BuildStatus::PermanentFailure),
        (FailureStatus::InputRejected, BuildStatus::InputRejected),
        (FailureStatus::OutputRejected, BuildStatus::OutputRejected),
        (FailureStatus::TransientFailure, BuildStatus::TransientFailure),
        (FailureStatus::TimedOut, BuildStatus::TimedOut),
        (FailureStatus::MiscFailure, BuildStatus::MiscFailure),
        (FailureStatus::LogLimitExceeded, BuildStatus::LogLimitExceeded),
    ] {
        let core = BuildResult::failed(status, "vouch: too slow");
        let wire = nixproto::BuildResult::from(&core);
        assert_eq!((wire.status, wire.error_msg.as_str()), (wire_status, "vouch: too slow"));
        assert!(wire.built_outputs.is_empty() && wire.times_built == 0);
        assert_eq!(status.name(), format!("{wire_status:?}"), "Nix's own name");
        let BuildState::Failed { status: name, error } = state_of(&core) else { panic!() };
        assert_eq!((name.as_str(), error.as_str()), (status.name(), "vouch: too slow"));
    }
}

#[test]
fn a_divergent_build_reports_its_own_hash_and_what_the_cache_kept() {
    let mut core = built();
    let BuildResult::Built(b) = &mut core else { unreachable!() };
    let kept = NarHash::of(b"the first build");
    b.published.outputs.get_mut("out").unwrap().diverged =
        Some(Diverged { published_nar_hash: Some(kept), published_path: None });

    // The CI service: its own hash as `nar_hash`, the kept one only under `published`.
    let BuildState::Succeeded { outputs, .. } = state_of(&core) else { panic!() };
    let o = &outputs["out"];
    assert_eq!(o["diverged"], true);
    assert_eq!(o["nar_hash"], NarHash::of(b"nar").to_string(), "the build's own hash");
    assert_eq!(o["published"]["nar_hash"], kept.to_string());
    // Nix: built, flagged non-deterministic (the path's bytes are the ones registered first).
    let wire = nixproto::BuildResult::from(&core);
    assert_eq!(wire.status, BuildStatus::Built);
    assert!(wire.is_non_deterministic);
    assert_eq!(wire.built_outputs["out"].out_path.to_string(), OUT);
    // An output that did not diverge says so.
    let BuildState::Succeeded { outputs, .. } = state_of(&built()) else { panic!() };
    assert_eq!(outputs["out"]["diverged"], false);
    assert!(outputs["out"].get("published").is_none());
    assert!(!nixproto::BuildResult::from(&built()).is_non_deterministic);
}
