//! Clients newer than the installable Nix 2.8, played by a scripted peer against the real
//! `vouch nix-builder --stdio` and a real VM: a Nix ≥ 2.35 client (worker 1.38 with
//! `realisation-with-path-not-hash`) and a Nix 2.20–2.23 client (1.37). Each runs the build
//! hook's flow (QueryValidPaths, AddMultipleToStore, BuildDerivation, QueryPathInfo,
//! NarFromPath) for a floating-CA derivation with a self-reference, then checks what that
//! client would check: the realisation format and its signature, and the output's content
//! address under the client's self-reference rule (and not under the other rule). The client is
//! not trusted: content-addressed inputs and builds need no trust.
//!
//! Needs the guest image (scripts/build-image.sh; `VOUCH_IMAGE_DIR`) and QEMU; fails clearly
//! without them.

#[path = "nix_builder/peer.rs"]
mod peer;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use build_trace::{BasicDerivation, DrvOutput};
use host_launcher::core::ValidPathInfo;
use host_launcher::nixproto::version::{ClientProfile, Protocol, FEATURE_REALISATION_WITH_PATH};
use host_launcher::nixproto::wire::{FramedWriter, WireRead, WireWrite};
use host_launcher::nixproto::{types, BuildStatus};
use nix_formats::ca::SelfRefRule;
use nix_formats::content_address::{verify, ContentAddress};
use nix_formats::nar::NarLimits;
use nix_formats::realisation::{BuildTraceEntry, DrvOutputKey, LegacyRealisation};
use nix_formats::signing::PublicKey;
use nix_formats::StorePath;
use peer::*;
use sha2::{Digest, Sha256};

/// The busybox directory as a content-addressed store path: (info, NAR).
fn busybox(dir: &Path) -> (ValidPathInfo, Vec<u8>) {
    let bb = busybox_dir(&dir.join("busybox"));
    let mut nar = Vec::new();
    nix_formats::nar::dump_path(&bb, &mut nar).unwrap();
    (recursive_ca_info("busybox", &nar, &nar), nar)
}

/// A resolved floating-CA derivation whose output refers to itself.
fn derivation(bb: &StorePath, n: &str) -> (StorePath, BasicDerivation) {
    let name = format!("client-{n}");
    let placeholder = nix_formats::derivation::hash_placeholder("out");
    let builder = format!("{bb}/sh");
    let env: BTreeMap<String, String> = [
        ("builder", builder.as_str()),
        ("name", name.as_str()),
        ("out", placeholder.as_str()),
        ("system", "x86_64-linux"),
        ("outputHashMode", "recursive"),
        ("outputHashAlgo", "sha256"),
        ("__contentAddressed", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let drv = BasicDerivation {
        name: name.clone(),
        outputs: [(
            "out".to_string(),
            DrvOutput { path: None, hash_algo: "r:sha256".into(), hash: String::new() },
        )]
        .into(),
        input_srcs: [bb.clone()].into(),
        system: "x86_64-linux".into(),
        builder,
        args: vec!["-c".into(), format!("mkdir $out; echo {n} > $out/n; echo $out > $out/self")],
        env,
    };
    let drv_path = drv.to_derivation().unwrap().drv_path(&name).unwrap();
    (drv_path, drv)
}

fn public_key(state: &Path) -> PublicKey {
    PublicKey::parse(&vm::public_key_of(state)).unwrap()
}

/// The build hook's flow as a client of `version`/`features`; returns the output path, its info
/// and NAR, and the build result.
fn hook_flow(
    state: &Path,
    version: u64,
    features: &[&str],
    bb: &(ValidPathInfo, Vec<u8>),
    drv_path: &StorePath,
    drv: &BasicDerivation,
) -> (host_launcher::nixproto::BuildResult, ValidPathInfo, Vec<u8>) {
    let img = image_dir();
    let mut p = Peer::spawn(
        state,
        &["--stdio", "--image", img.to_str().unwrap()],
        Duration::from_secs(600),
    );
    let (_, trusted, feats) = p.worker_handshake(version, features);
    // Not trusted (vouch's default): content-addressed uploads and builds are for anyone.
    assert_eq!(trusted, Some(2));
    let profile = ClientProfile::new(Protocol::Worker, version, feats.into_iter().collect());

    p.w().write_u64(31).unwrap();
    types::write_store_path_set(p.w(), &BTreeSet::from([bb.0.path.clone()])).unwrap();
    p.w().write_u64(0).unwrap();
    p.w().flush().unwrap();
    p.expect_last();
    assert!(p.from.read_string_set("valid").unwrap().is_empty());

    p.w().write_u64(44).unwrap();
    p.w().write_u64(0).unwrap();
    p.w().write_u64(1).unwrap();
    let mut payload = Vec::new();
    payload.write_u64(1).unwrap();
    types::write_upload_info(&mut payload, &bb.0).unwrap();
    payload.extend_from_slice(&bb.1);
    let mut fw = FramedWriter::new(p.w());
    fw.write_all(&payload).unwrap();
    fw.finish().unwrap();
    p.w().flush().unwrap();
    p.expect_last();

    p.w().write_u64(36).unwrap();
    p.w().write_str(&drv_path.to_string()).unwrap();
    types::write_basic_derivation(p.w(), drv).unwrap();
    p.w().write_u64(0).unwrap();
    p.w().flush().unwrap();
    p.expect_last();
    let res = types::read_build_result(&mut p.from, &profile).unwrap();
    assert_eq!(res.status, BuildStatus::Built, "{}", res.error_msg);
    let out = res.built_outputs["out"].out_path.clone();

    p.w().write_u64(26).unwrap();
    p.w().write_str(&out.to_string()).unwrap();
    p.w().flush().unwrap();
    p.expect_last();
    assert_eq!(p.from.read_u64().unwrap(), 1, "the output is valid on the builder");
    let info = types::read_unkeyed_path_info(&mut p.from, out.clone(), version).unwrap();

    p.w().write_u64(38).unwrap();
    p.w().write_str(&out.to_string()).unwrap();
    p.w().flush().unwrap();
    p.expect_last();
    let mut nar = vec![0u8; info.info.nar_size as usize];
    p.from.read_exact(&mut nar).unwrap();
    assert_eq!(<[u8; 32]>::from(Sha256::digest(&nar)), info.info.nar_hash.0);
    let (st, err) = p.finish();
    assert!(st.success(), "{err}");
    (res, info, nar)
}

/// The output's content address holds under `rule` and not under the other one.
fn check_rule(info: &ValidPathInfo, nar: &[u8], rule: SelfRefRule) {
    assert!(info.info.references.contains(&info.path), "the output refers to itself");
    let ca = ContentAddress::parse(info.info.ca.as_deref().unwrap()).unwrap();
    verify(&info.path, &ca, &info.info.references, nar, rule, &NarLimits::default()).unwrap();
    let other = match rule {
        SelfRefRule::ZeroAndPositions => SelfRefRule::ZeroOnly,
        SelfRefRule::ZeroOnly => SelfRefRule::ZeroAndPositions,
    };
    assert!(
        verify(&info.path, &ca, &info.info.references, nar, other, &NarLimits::default()).is_err(),
        "a self-referencing output differs between the rules"
    );
}

#[test]
fn nix_2_35_and_nix_2_20_clients_get_their_formats_and_rules() {
    let d = tempfile::tempdir().unwrap();
    let bb = busybox(d.path());
    let n = nonce();

    // Nix ≥ 2.35: realisation keyed by drv path on the client, (outPath, signatures) on the
    // wire, signed over the build-trace fingerprint; self-reference positions hashed.
    let state = d.path().join("state");
    let (drv_path, drv) = derivation(&bb.0.path, &format!("{n}-new"));
    let (res, info, nar) =
        hook_flow(&state, 0x126, &[FEATURE_REALISATION_WITH_PATH], &bb, &drv_path, &drv);
    let out = &res.built_outputs["out"];
    assert!(out.legacy.is_none());
    let mut entry = BuildTraceEntry::new(
        DrvOutputKey { drv_path: drv_path.clone(), output: "out".into() },
        out.out_path.clone(),
    );
    for s in &out.signatures {
        entry.signatures.insert(s.parse().unwrap());
    }
    assert_eq!(
        entry.count_valid_signatures(&[public_key(&state)]),
        1,
        "signed by the builder: {:?}",
        out.signatures
    );
    check_rule(&info, &nar, SelfRefRule::ZeroAndPositions);

    // Nix 2.20–2.23: the JSON realisation with id `sha256:<hash modulo>!out`; self-reference
    // positions not hashed.
    let state = d.path().join("state-old");
    let (drv_path, drv) = derivation(&bb.0.path, &format!("{n}-old"));
    let (res, info, nar) = hook_flow(&state, 0x125, &[], &bb, &drv_path, &drv);
    let legacy = res.built_outputs["out"].legacy.as_ref().expect("a Nix ≤ 2.34 realisation");
    let r = LegacyRealisation::from_json(&legacy.json).unwrap();
    let resolution =
        nix_formats::resolve::resolve(&drv.to_derivation().unwrap(), &drv.name, &mut |_, _| None)
            .unwrap();
    assert_eq!(r.id, resolution.legacy_id("out").unwrap(), "the id the client computes itself");
    assert_eq!(legacy.id, r.id.to_string());
    assert_eq!(r.out_path, info.path);
    assert_eq!(r.count_valid_signatures(&[public_key(&state)]), 1);
    check_rule(&info, &nar, SelfRefRule::ZeroOnly);
}
