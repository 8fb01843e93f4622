//! Golden vectors: Nix's own protocol test data (`src/libstore-tests/data/{worker,serve}-protocol`
//! in NixOS/nix), checked against our decoders and encoders.
//!
//! The `.bin` files are binary and could not be fetched as such here. Their contents are
//! reproduced field for field from two public sources: the values in Nix's
//! `libstore-tests/{worker,serve}-protocol.cc` characterization tests, and the decoded dumps of
//! the upstream `.bin` files in `tweag/nix-remote-rust`'s round-trip tests (which decode each
//! file and re-encode it byte-exactly). Each vector below is written as the sequence of wire
//! primitives (u64 words and padded strings) those sources show; the primitives themselves are
//! tested in `wire`. Nix 2.8's actual bytes are additionally exercised end to end by the real-Nix
//! tests in `tests/tests/nix_builder_*.rs`.

use std::collections::BTreeSet;

use super::action::{BuildMode, BuildOptions, BuildResult, BuildStatus, BuiltOutput};
use super::types;
use super::version::{ClientProfile, Protocol, FEATURE_REALISATION_WITH_PATH};
use super::wire::{WireRead, WireWrite};
use nix_formats::store_path::{make_fixed_output_path, FileIngestionMethod};
use nix_formats::{Hash, StorePath};

/// A byte vector built from wire primitives.
#[derive(Default)]
struct B(Vec<u8>);

impl B {
    fn n(mut self, v: u64) -> Self {
        self.0.write_u64(v).unwrap();
        self
    }
    fn s(mut self, v: &str) -> Self {
        self.0.write_str(v).unwrap();
        self
    }
    fn ss(mut self, v: &[&str]) -> Self {
        self = self.n(v.len() as u64);
        for x in v {
            self = self.s(x);
        }
        self
    }
}

const FOO: &str = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo";
const BAR: &str = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar";
const BAR_DRV: &str = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-bar.drv";
const FOO2: &str = "/nix/store/g1w7hyyyy1w7hy3qg1w7hy3qgqqqqy3q-foo";
const CA_FOO: &str = "/nix/store/n5wkd9frr45pa74if5gpz9j7mifg27fh-foo";
/// `sha256-FePFYIlMuycIXPZbWi7LGEiMmZSX9FMbaQenWBzm1Sc=` in base16.
const NAR_HEX: &str = "15e3c560894cbb27085cf65b5a2ecb18488c999497f4531b6907a7581ce6d527";
const DRV_HASH: &str = "sha256:6f869f9ea2823bda165e06076fd0de4366dead2c0e8d2dbbad277d4f15c373f5";

fn worker(minor: u64, features: &[&str]) -> ClientProfile {
    ClientProfile::new(
        Protocol::Worker,
        0x100 | minor,
        features.iter().map(|s| s.to_string()).collect(),
    )
}

fn serve(minor: u64) -> ClientProfile {
    ClientProfile::new(Protocol::Serve, 0x200 | minor, BTreeSet::new())
}

#[test]
fn worker_string_set_vector() {
    // string.bin
    let bin = B::default().s("").s("hi").s("white rabbit").s("大白兔").s("oh no ");
    let mut r = &bin.0[..];
    for want in ["", "hi", "white rabbit", "大白兔", "oh no "] {
        assert_eq!(r.read_string("s").unwrap(), want);
    }
    assert!(r.is_empty());
    // set.bin: {} {""} {"", "bar", "foo"} (sorted on the wire)
    let bin = B::default().ss(&[]).ss(&[""]).ss(&["", "bar", "foo"]);
    let mut r = &bin.0[..];
    assert!(r.read_string_set("s").unwrap().is_empty());
    assert_eq!(r.read_string_set("s").unwrap(), BTreeSet::from([String::new()]));
    let set = r.read_string_set("s").unwrap();
    let mut out = Vec::new();
    out.write_strings(&set).unwrap();
    assert_eq!(out, B::default().ss(&["", "bar", "foo"]).0);
}

#[test]
fn worker_valid_path_info_1_16() {
    // valid-path-info-1.16.bin: three ValidPathInfos.
    let bin = B::default()
        .s(BAR)
        .s("")
        .s(NAR_HEX)
        .ss(&[])
        .n(23423)
        .n(34878)
        .n(1)
        .ss(&[])
        .s("")
        .s(BAR)
        .s(BAR_DRV)
        .s(NAR_HEX)
        .ss(&[BAR, FOO2])
        .n(23423)
        .n(34878)
        .n(0)
        .ss(&["fake-sig-1", "fake-sig-2"])
        .s("")
        .s(CA_FOO)
        .s("")
        .s(NAR_HEX)
        .ss(&[BAR, CA_FOO])
        .n(23423)
        .n(34878)
        .n(0)
        .ss(&[])
        .s("fixed:r:sha256:1lr187v6dck1rjh2j6svpikcfz53wyl3qrlcbb405zlh13x0khhh");
    let mut r = &bin.0[..];
    let infos: Vec<_> = (0..3).map(|_| types::read_upload_info(&mut r).unwrap()).collect();
    assert!(r.is_empty());
    assert_eq!(hex::encode(infos[0].info.nar_hash.0), NAR_HEX);
    assert!(infos[0].ultimate && infos[0].deriver.is_none());
    assert_eq!(infos[1].deriver.as_ref().unwrap().to_string(), BAR_DRV);
    assert_eq!(infos[1].sigs.len(), 2);
    assert_eq!(infos[2].info.references.len(), 2);
    let mut out = Vec::new();
    for i in &infos {
        types::write_upload_info(&mut out, i).unwrap();
    }
    assert_eq!(out, bin.0);

    // The third is `makeFromCA("foo", NixArchive sha256("(...)"), refs {bar}, self)`: its
    // content address must reproduce its path.
    let ca_hash = Hash::sha256(nix_formats::hash::sha256("(...)"));
    assert_eq!(infos[2].info.ca.as_deref().unwrap(), format!("fixed:r:{ca_hash}"));
    let refs = BTreeSet::from([StorePath::parse(BAR).unwrap()]);
    let p = make_fixed_output_path("foo", FileIngestionMethod::Recursive, &ca_hash, &refs, true);
    assert_eq!(p.unwrap().to_string(), CA_FOO);
}

fn legacy_json(out: &str, name: &str) -> String {
    format!(
        "{{\"dependentRealisations\":{{}},\"id\":\"{DRV_HASH}!{name}\",\"outPath\":\"g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-{out}\",\"signatures\":[]}}"
    )
}

/// The three build results of `build-result-*`: OutputRejected, NotDeterministic, Built.
fn three_results(head: impl Fn(B, usize) -> B, outputs: impl Fn(B) -> B) -> Vec<u8> {
    let b = B::default().n(5).s("no idea why");
    let b = head(b, 0);
    let b = outputs_empty(b);
    let b = b.n(12).s("no idea why");
    let b = head(b, 1);
    let b = outputs_empty(b);
    let b = b.n(0).s("");
    let b = head(b, 2);
    outputs(b).0
}

fn outputs_empty(b: B) -> B {
    b.n(0)
}

fn times(b: B, i: usize) -> B {
    match i {
        0 => b.n(0).n(0).n(0).n(0),
        1 => b.n(3).n(1).n(30).n(50),
        _ => b.n(1).n(0).n(30).n(50),
    }
}

/// Times plus the CPU times of protocol 1.37 (user 0.5 s, system 0.604 s on the third result).
fn times_with_cpu(b: B, i: usize) -> B {
    let b = times(b, i);
    if i == 2 {
        b.n(1).n(500_000_000).n(1).n(604_000_000)
    } else {
        b.n(0).n(0)
    }
}

/// builtOutputs keyed by `<drv hash>!<output>` with realisation JSON (before the
/// realisation-with-path-not-hash feature).
fn legacy_outputs(b: B) -> B {
    b.n(2)
        .s(&format!("{DRV_HASH}!bar"))
        .s(&legacy_json("bar", "bar"))
        .s(&format!("{DRV_HASH}!foo"))
        .s(&legacy_json("foo", "foo"))
}

/// builtOutputs keyed by output name: `{outPath, signatures}`.
fn keyed_outputs(b: B) -> B {
    b.n(2).s("bar").s(BAR).ss(&[]).s("foo").s(FOO).ss(&[])
}

fn check_three(bin: &[u8], profile: &ClientProfile) -> Vec<BuildResult> {
    let mut r = bin;
    let res: Vec<_> = (0..3).map(|_| types::read_build_result(&mut r, profile).unwrap()).collect();
    assert!(r.is_empty(), "{} bytes left", r.len());
    assert_eq!(res[0].status, BuildStatus::OutputRejected);
    assert_eq!(res[1].status, BuildStatus::NotDeterministic);
    assert_eq!((res[1].times_built, res[1].start_time, res[1].stop_time), (3, 30, 50));
    assert!(res[1].is_non_deterministic);
    assert_eq!(res[2].status, BuildStatus::Built);
    assert_eq!(res[2].built_outputs["foo"].out_path.to_string(), FOO);
    assert_eq!(res[2].built_outputs["bar"].out_path.to_string(), BAR);
    let mut out = Vec::new();
    for x in &res {
        types::write_build_result(&mut out, x, profile).unwrap();
    }
    assert_eq!(out, bin, "re-encoding differs");
    res
}

#[test]
fn worker_build_result_1_29() {
    let bin = three_results(times, legacy_outputs);
    let res = check_three(&bin, &worker(29, &[]));
    assert_eq!(res[2].built_outputs["foo"].legacy.as_ref().unwrap().id, format!("{DRV_HASH}!foo"));
}

#[test]
fn worker_build_result_1_37_cpu_times() {
    let bin = three_results(times_with_cpu, legacy_outputs);
    let res = check_three(&bin, &worker(37, &[]));
    assert_eq!(res[2].cpu_user, Some(500_000_000));
    assert_eq!(res[2].cpu_system, Some(604_000_000));
}

#[test]
fn worker_build_result_realisation_with_path_not_hash() {
    // build-result-realisation-with-path-not-hash: 1.38 + the feature; builtOutputs is
    // map<outputName, UnkeyedRealisation{outPath, signatures}>.
    let bin = three_results(times_with_cpu, keyed_outputs);
    let res = check_three(&bin, &worker(38, &[FEATURE_REALISATION_WITH_PATH]));
    assert!(res[2].built_outputs["foo"].legacy.is_none());
}

#[test]
fn serve_build_result_2_6_and_2_8() {
    check_three(&three_results(times, legacy_outputs), &serve(6));
    // build-result-2.8.bin: status, "no idea why", …, then `foo` → `/nix/store/g1w…-foo`.
    check_three(&three_results(times, keyed_outputs), &serve(8));
}

#[test]
fn serve_build_options_2_7() {
    let bin = B::default().n(5).n(6).n(7).n(8).n(0).n(1).0;
    let o = types::read_build_options(&mut &bin[..], 0x207).unwrap();
    assert_eq!(
        o,
        BuildOptions {
            max_silent_time: 5,
            build_timeout: 6,
            max_log_size: 7,
            nr_repeats: 8,
            enforce_determinism: false,
            keep_failed: true
        }
    );
    let mut out = Vec::new();
    types::write_build_options(&mut out, &o, 0x207).unwrap();
    assert_eq!(out, bin);
    // build-options-2.1: only the two first fields.
    let o = types::read_build_options(&mut &B::default().n(5).n(6).0[..], 0x201).unwrap();
    assert_eq!((o.max_silent_time, o.build_timeout, o.max_log_size), (5, 6, 0));
}

#[test]
fn serve_unkeyed_valid_path_info_2_4() {
    // unkeyed-valid-path-info-2.4.bin (first entry): deriver, refs, downloadSize = narSize,
    // narSize, narHash `sha256:<nix32>`, ca, sigs.
    let nar = Hash::parse_any(NAR_HEX, Some(nix_formats::HashAlgo::Sha256)).unwrap();
    let bin = B::default()
        .s(BAR_DRV)
        .ss(&["/nix/store/g1w7hyyyy1w7hy3qg1w7hy3qgqqqqy3q-foo.drv"])
        .n(34878)
        .n(34878)
        .s(&nar.to_string())
        .s("")
        .ss(&[])
        .0;
    let path = StorePath::parse(BAR).unwrap();
    let info = types::read_serve_path_info(&mut &bin[..], path, 0x204).unwrap();
    assert_eq!(hex::encode(info.info.nar_hash.0), NAR_HEX);
    let mut out = Vec::new();
    types::write_serve_path_info(&mut out, &info, 0x204).unwrap();
    assert_eq!(out, bin);
}

#[test]
fn worker_build_mode() {
    let bin = B::default().n(0).n(1).n(2).n(3).0;
    let mut r = &bin[..];
    assert_eq!(types::read_build_mode(&mut r).unwrap(), BuildMode::Normal);
    assert_eq!(types::read_build_mode(&mut r).unwrap(), BuildMode::Repair);
    assert_eq!(types::read_build_mode(&mut r).unwrap(), BuildMode::Check);
    assert!(types::read_build_mode(&mut r).is_err());
}

#[test]
fn outputs_without_legacy_record_are_left_out_for_old_clients() {
    let mut res = BuildResult::failure(BuildStatus::Built, "");
    res.built_outputs.insert(
        "out".into(),
        BuiltOutput {
            out_path: StorePath::parse(FOO).unwrap(),
            signatures: BTreeSet::new(),
            legacy: None,
        },
    );
    let mut out = Vec::new();
    types::write_build_result(&mut out, &res, &worker(34, &[])).unwrap();
    let want = B::default().n(0).s("").n(0).n(0).n(0).n(0).n(0).0;
    assert_eq!(out, want);
    // A Nix ≥ 2.35 client gets the output path (it keys it by drv path itself).
    let mut out = Vec::new();
    types::write_build_result(&mut out, &res, &worker(38, &[FEATURE_REALISATION_WITH_PATH]))
        .unwrap();
    assert_eq!(
        out,
        B::default().n(0).s("").n(0).n(0).n(0).n(0).n(0).n(0).n(1).s("out").s(FOO).ss(&[]).0
    );
}

/// The server side of the worker handshake, byte for byte, for Nix 2.8 (1.34) and for a
/// 1.38 client with features (the layout of `handshake-to-client.bin` extended by the
/// post-handshake `ClientHandshakeInfo` of `client-handshake-info_1_35`).
#[test]
fn worker_server_handshake_bytes() {
    use super::worker::{handshake, WorkerConfig, STDERR_LAST, WORKER_MAGIC_1, WORKER_MAGIC_2};
    let cfg = WorkerConfig { version_string: "vouch test".into(), declared_nix: None };
    let client = B::default().n(WORKER_MAGIC_1).n(0x122).n(0).n(0).0;
    let mut out = Vec::new();
    let p = handshake(&mut &client[..], &mut out, &cfg, true).unwrap();
    assert_eq!(out, B::default().n(WORKER_MAGIC_2).n(0x126).s("vouch test").n(STDERR_LAST).0);
    assert_eq!((p.version, p.features.len()), (0x122, 0));

    let client = B::default()
        .n(WORKER_MAGIC_1)
        .n(0x126)
        .ss(&["delete-dead-specific-referrers", FEATURE_REALISATION_WITH_PATH])
        .n(1)
        .n(7) // an obsolete CPU affinity value follows a nonzero flag
        .n(0)
        .0;
    // Nix's `TrustedFlag`: 1 trusted, 2 not trusted (0, "unknown", Nix ≥ 2.16 reads as
    // trusted, so it is never sent).
    for (trusted, flag) in [(true, 1), (false, 2)] {
        let mut out = Vec::new();
        let p = handshake(&mut &client[..], &mut out, &cfg, trusted).unwrap();
        let want = B::default()
            .n(WORKER_MAGIC_2)
            .n(0x126)
            .ss(&[FEATURE_REALISATION_WITH_PATH])
            .s("vouch test")
            .n(flag)
            .n(STDERR_LAST)
            .0;
        assert_eq!(out, want);
        assert!(p.has_feature(FEATURE_REALISATION_WITH_PATH));
        assert_eq!(p.features.len(), 1);
    }
}
