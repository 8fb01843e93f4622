//! Trust migration end to end (`vouch verify --plan-rebuild`, `vouch rebuild`): a 3-step
//! floating-CA chain that the local Nix 2.8 builds, with the traces of two simulated builders —
//! A for the first and last step, B for the middle one — made without VMs
//! ([`tests::sim_builder`]). A policy that accepts both verifies the closure; a strict one that
//! accepts only A's root and key does not. The plan names exactly the middle step (its
//! dependent conditional, the first reused); `vouch rebuild` rebuilds it as builder A in one
//! real VM (KVM where usable, else TCG), the rebuilt CA output is bit-identical, so the replan
//! is empty and `vouch verify` passes under the strict policy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

use nix_formats::StorePath;
use test_support::nix::{text, CA_PRELUDE};
use test_support::vm::{image_dir, nix, vouch_bin, VmTest};
use tests::fixture::{built_steps, StoreAt};
use tests::sim_builder::SimBuilder;

static VMS: Mutex<()> = Mutex::new(());

/// `r1` → `r2` → `r3`, floating CA, with self-references and references across levels.
fn chain_nix(n: &str) -> String {
    format!(
        r#"let
{CA_PRELUDE}in rec {{
  r1 = ca "tm-r1" {{}} "set -e; mkdir $out; echo {n} > $out/n; echo $out > $out/self";
  r2 = ca "tm-r2" {{}} "set -e; mkdir $out; cat ${{r1}}/n > $out/n; echo ${{r1}} > $out/up; echo $out > $out/self";
  r3 = ca "tm-r3" {{}} "set -e; mkdir $out; echo ${{r2}} > $out/up";
}}
"#
    )
}

/// The image's simulated launch measurement (what its simulated guests report).
fn simulated_measurement(manifest: &Path) -> [u8; 48] {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    let bytes = hex::decode(m["simulated_measurement"].as_str().unwrap()).unwrap();
    bytes.try_into().unwrap()
}

fn vouch(args: &[&str]) -> Output {
    Command::new(vouch_bin()).env("VOUCH_IMAGE_DIR", image_dir()).args(args).output().unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

#[test]
fn a_policy_change_in_the_middle_of_a_chain_is_fixed_by_one_rebuild() {
    let e = VmTest::new(&VMS, "chain.nix", chain_nix);
    let file = e.file.to_str().unwrap();
    // The local Nix builds the chain: `vouch build` (and so `vouch rebuild`) reads inputs there.
    let built = nix(&["nix-build", file, "-A", "r3", "--no-out-link"]);
    assert!(built.status.success(), "{}", text(&built));
    let target = StorePath::parse(&e.s.instantiate(&e.file, "r3")).unwrap();
    let manifest = image_dir().join("manifest.json");
    let m = simulated_measurement(&manifest);
    let dir = e.s.dir.path();
    let a = SimBuilder::new(&dir.join("state-a"), "builder-a-simulated-1", m);
    let b = SimBuilder::new(&dir.join("state-b"), "builder-b-simulated-1", m);
    let (mut chosen, mut done) = (BTreeMap::new(), BTreeSet::new());
    let steps = built_steps(None, Path::new("/nix/store"), &target, &mut chosen, &mut done);
    assert_eq!(steps.len(), 3, "{steps:?}");
    let at = StoreAt { store: None, work: dir };
    for (i, s) in steps.iter().enumerate() {
        if i == 1 {
            b.publish(&at, s)
        } else {
            a.publish(&at, s)
        };
    }
    let drv = |i: usize| steps[i].udrv.to_string();

    let both =
        tests::policy::simulated(dir, &[&a.state, &b.state], &[&a.state, &b.state], &manifest);
    let strict = tests::policy::simulated(dir, &[&a.state], &[&a.state], &manifest);
    let (ca, cb) = (a.cache().display().to_string(), b.cache().display().to_string());
    let t = target.to_string();
    let verify = |policy: &Path, extra: &[&str]| {
        let p = policy.to_str().unwrap();
        let args = [&["verify", "--policy", p, "--traces", &ca, "--traces", &cb][..], extra, &[&t]];
        vouch(&args.concat())
    };
    let v = verify(&both, &[]);
    assert_eq!(v.status.code(), Some(0), "both builders: {}", text(&v));
    let v = verify(&strict, &[]);
    assert_eq!(v.status.code(), Some(1), "builder A only: {}", text(&v));
    assert!(text(&v).contains("tm-r2"), "the middle step is the broken link: {}", text(&v));

    // The plan: exactly the middle step, its dependent conditional.
    let p = verify(&strict, &["--plan-rebuild"]);
    assert_eq!(p.status.code(), Some(0), "{}", text(&p));
    assert!(text(&p).contains("REBUILD 1 of 3 steps"), "{}", text(&p));
    let p = json(&verify(&strict, &["--plan-rebuild", "--json"]));
    assert_eq!(p["result"], "rebuild", "{p:#}");
    assert_eq!(p["rebuild"], serde_json::json!([drv(1)]));
    assert_eq!(p["conditional"], serde_json::json!([drv(2)]));
    assert_eq!(p["steps"][0]["action"], "reuse");
    assert_eq!(p["steps"][1]["resolved"], steps[1].key.to_string());
    assert_eq!(p["steps"][2]["waits_for"], serde_json::json!([drv(1)]));
    assert_eq!(p["derivation"], t);

    // `vouch rebuild` as builder A: one VM, bit-identical, nothing left.
    let st = a.state.display().to_string();
    let s = strict.to_str().unwrap();
    let args = ["--state-dir", &st, "rebuild", "--policy", s, "--read-traces", &cb, "--json", &t];
    let r = vouch(&args);
    assert_eq!(r.status.code(), Some(0), "{}", text(&r));
    let r = json(&r);
    assert_eq!(r["result"], "verified", "{r:#}");
    assert_eq!(r["rebuilt"].as_array().unwrap().len(), 1, "{r:#}");
    assert_eq!(r["rebuilt"][0]["drv"], drv(1));
    assert_eq!(r["rebuilt"][0]["bit_identical"], true, "{r:#}");
    assert_eq!(r["plan"]["result"], "verified");

    let v = verify(&strict, &[]);
    assert_eq!(v.status.code(), Some(0), "after the rebuild: {}", text(&v));
    let p = verify(&strict, &["--plan-rebuild"]);
    assert_eq!(p.status.code(), Some(0), "{}", text(&p));
    assert!(text(&p).contains("NOTHING TO REBUILD"), "{}", text(&p));
}
