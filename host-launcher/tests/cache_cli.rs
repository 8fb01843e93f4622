//! `vouch cache audit` through the real binary, on a store poisoned the way stores written before
//! vouch checked output ownership could be: a forged input-addressed derivation that claims a
//! leaf derivation's output path, built and published first. The audit exits 1 naming the
//! forged step and the poisoned narinfo, `--fix` withdraws them (exit 0) so that the binary cache
//! no longer serves the attacker's bytes, and a second audit is clean. `--json` is structured.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use build_trace::job::{BasicDerivation, CaRule, Job, Limits, NarHash};
use build_trace::statement::{Measurement, OutputInfo, Statement};
use build_trace::store::{StepRecord, TraceStore};
use nix_formats::derivation::{Derivation, DerivationOutput, DrvGraph};
use nix_formats::signing::SecretKey;
use nix_formats::StorePath;

/// A leaf input-addressed derivation running `script`, at its own output path or at `claim`.
fn leaf(script: &str, claim: Option<&StorePath>) -> (StorePath, Derivation) {
    let placeholder = StorePath::from_parts([0; 20], "leaf").unwrap();
    let mut d = Derivation {
        outputs: BTreeMap::from([("out".into(), DerivationOutput::InputAddressed(placeholder))]),
        platform: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        env: BTreeMap::from([("out".into(), String::new())]),
        ..Derivation::default()
    };
    let own = DrvGraph::new().input_addressed_paths(&d, "leaf").unwrap().unwrap()["out"].clone();
    let out = claim.cloned().unwrap_or(own);
    d.outputs.insert("out".into(), DerivationOutput::InputAddressed(out.clone()));
    d.env.insert("out".into(), out.to_string());
    (d.drv_path("leaf").unwrap(), d)
}

/// Publish a build of `drv` whose output NAR is `nar`, as the launcher did.
fn publish(store: &TraceStore, tmp: &Path, (path, drv): &(StorePath, Derivation), nar: &[u8]) {
    let basic = BasicDerivation::from_derivation("leaf", drv).unwrap();
    let outs = BTreeSet::from(["out".to_string()]);
    let job = Job::new(
        "j",
        path.clone(),
        basic,
        BTreeMap::new(),
        Limits::default(),
        CaRule::SelfRefPositions,
        false,
        outs,
    );
    let out = OutputInfo {
        path: drv.outputs["out"].path().unwrap().clone(),
        nar_hash: NarHash::of(nar),
        nar_size: nar.len() as u64,
        references: BTreeSet::new(),
        ca: None,
    };
    let launch = build_trace::Launch::new(job.digest().unwrap(), 1, 2048, job.network);
    let st = Statement::new(
        launch,
        job,
        BTreeMap::new(),
        BTreeMap::from([("out".into(), out)]),
        Measurement([1; 48]),
        "test",
    );
    let file = tmp.join(path.hash_part());
    std::fs::write(&file, nar).unwrap();
    let rec = StepRecord {
        statement: &st,
        evidence: None,
        evidence_kind: "simulated",
        nars: BTreeMap::from([("out".to_string(), file)]),
    };
    store.put_step(&rec, &SecretKey::from_seed("host-simulated-1", [4; 32])).unwrap();
}

fn audit(state: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vouch"))
        .arg("--state-dir")
        .arg(state)
        .args(["cache", "audit"])
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn a_poisoned_store_is_found_and_fixed() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let store = TraceStore::create(&state.join("cache")).unwrap();
    let genuine = leaf("echo genuine > $out", None);
    let victim = genuine.1.outputs["out"].path().unwrap().clone();
    let forged = leaf("echo evil > $out", Some(&victim));
    publish(&store, t.path(), &forged, b"evil");
    publish(&store, t.path(), &genuine, b"genuine");
    let narinfo = state.join("cache").join(format!("{}.narinfo", victim.hash_part()));

    let (code, text) = audit(&state, &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("not-owned") && text.contains(forged.0.base_name()), "{text}");
    assert!(
        text.contains("unproduced") && text.contains(&format!("{}.narinfo", victim.hash_part()))
    );
    assert!(text.contains("--fix"), "says how to withdraw: {text}");
    let (code, json) = audit(&state, &["--json"]);
    assert_eq!(code, Some(1));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!((v["entries"].as_u64(), v["accepted"].as_u64()), (Some(2), Some(1)), "{v}");
    assert_eq!(v["findings"][0]["problem"], "not-owned", "{v}");
    assert!(narinfo.exists(), "nothing moved without --fix");

    let (code, text) = audit(&state, &["--fix"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("[withdrawn]") && text.contains("withdrawn files are kept in"), "{text}");
    assert!(!narinfo.exists(), "the cache no longer serves the attacker's bytes");
    let (code, text) = audit(&state, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("every record was produced by an accepted statement"), "{text}");
}
