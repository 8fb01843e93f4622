//! Trust migration end to end (`vouch verify --plan-rebuild`, `vouch rebuild`): a 3-step
//! floating-CA chain that the local Nix 2.8 builds, with the traces of two simulated builders —
//! A for the first and last step, B for the middle one — made without VMs
//! ([`tests::sim_builder`]). A policy that accepts both verifies the closure; a strict one that
//! accepts only A's root and key does not. The plan names exactly the middle step (its
//! dependent conditional, the first reused); `vouch rebuild` rebuilds it as builder A in one
//! real VM (KVM where usable, else TCG), the rebuilt CA output is bit-identical, so the replan
//! is empty and `vouch verify` passes under the strict policy. When the middle step is not
//! reproducible (it writes random bytes), its rebuild differs, so the replan re-resolves the
//! last step and `vouch rebuild` builds that one too (a second VM), on the new output it
//! registered in the local Nix store.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use nix_formats::StorePath;
use test_support::nix::{text, CA_PRELUDE};
use test_support::vm::{image_dir, nix, vouch_bin, VmTest};
use tests::fixture::{built_steps, StoreAt};
use tests::sim_builder::SimBuilder;

static VMS: Mutex<()> = Mutex::new(());

/// `r1` → `r2` → `r3`, floating CA, with self-references and references across levels; with
/// `random`, `r2` also writes random bytes (every build of it differs).
fn chain_nix(n: &str, random: bool) -> String {
    let noise = if random { "; head -c 16 /dev/urandom | od -x > $out/random" } else { "" };
    format!(
        r#"let
{CA_PRELUDE}in rec {{
  r1 = ca "tm-r1" {{}} "set -e; mkdir $out; echo {n} > $out/n; echo $out > $out/self";
  r2 = ca "tm-r2" {{}} "set -e; mkdir $out; cat ${{r1}}/n > $out/n; echo ${{r1}} > $out/up; echo $out > $out/self{noise}";
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

/// The chain built by the local Nix, traced by A (r1, r3) and B (r2); the policies.
struct Chain {
    /// The VM lock and the scratch area, held for the test.
    _vm: VmTest,
    a: SimBuilder,
    b: SimBuilder,
    /// The unresolved derivations r1, r2, r3.
    drvs: Vec<String>,
    /// r2's resolved derivation.
    r2_resolved: String,
    target: String,
    /// Accepts A and B; accepts only A (its root and key).
    both: PathBuf,
    strict: PathBuf,
}

impl Chain {
    fn new(random: bool) -> Chain {
        let e = VmTest::new(&VMS, "chain.nix", |n| chain_nix(n, random));
        let file = e.file.to_str().unwrap();
        // The local Nix builds the chain: `vouch build` (so `vouch rebuild`) reads inputs there.
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
        let both =
            tests::policy::simulated(dir, &[&a.state, &b.state], &[&a.state, &b.state], &manifest);
        let strict = tests::policy::simulated(dir, &[&a.state], &[&a.state], &manifest);
        Chain {
            drvs: steps.iter().map(|s| s.udrv.to_string()).collect(),
            r2_resolved: steps[1].key.to_string(),
            target: target.to_string(),
            _vm: e,
            a,
            b,
            both,
            strict,
        }
    }

    /// `vouch verify --policy POLICY --traces A --traces B EXTRA… r3.drv`.
    fn verify(&self, policy: &Path, extra: &[&str]) -> Output {
        let (ca, cb) = (self.a.cache(), self.b.cache());
        let (p, ca, cb) = (policy.to_str().unwrap(), ca.to_str().unwrap(), cb.to_str().unwrap());
        let args = [&["verify", "--policy", p, "--traces", ca, "--traces", cb][..], extra];
        vouch(&[&args.concat()[..], &[self.target.as_str()]].concat())
    }

    /// `vouch --state-dir A rebuild --policy STRICT --read-traces B --json r3.drv`, which must
    /// end verified; its JSON.
    fn rebuild_as_a(&self) -> serde_json::Value {
        let st = self.a.state.display().to_string();
        let cb = self.b.cache().display().to_string();
        let s = self.strict.to_str().unwrap();
        let args = ["--state-dir", &st, "rebuild", "--policy", s, "--read-traces", &cb, "--json"];
        let r = vouch(&[&args[..], &[self.target.as_str()]].concat());
        assert_eq!(r.status.code(), Some(0), "{}", text(&r));
        let v = json(&r);
        assert_eq!((&v["result"], &v["plan"]["result"]), (&"verified".into(), &"verified".into()));
        // Now the strict policy accepts the closure, and nothing is left to rebuild.
        let v2 = self.verify(&self.strict, &[]);
        assert_eq!(v2.status.code(), Some(0), "after the rebuild: {}", text(&v2));
        let p = self.verify(&self.strict, &["--plan-rebuild"]);
        assert_eq!(p.status.code(), Some(0), "{}", text(&p));
        assert!(text(&p).contains("NOTHING TO REBUILD"), "{}", text(&p));
        v
    }
}

#[test]
fn a_policy_change_in_the_middle_of_a_chain_is_fixed_by_one_rebuild() {
    let c = Chain::new(false);
    let v = c.verify(&c.both, &[]);
    assert_eq!(v.status.code(), Some(0), "both builders: {}", text(&v));
    let v = c.verify(&c.strict, &[]);
    assert_eq!(v.status.code(), Some(1), "builder A only: {}", text(&v));
    assert!(text(&v).contains("tm-r2"), "the middle step is the broken link: {}", text(&v));

    // The plan: exactly the middle step, its dependent conditional.
    let p = c.verify(&c.strict, &["--plan-rebuild"]);
    assert_eq!(p.status.code(), Some(0), "{}", text(&p));
    assert!(text(&p).contains("REBUILD 1 of 3 steps"), "{}", text(&p));
    let p = json(&c.verify(&c.strict, &["--plan-rebuild", "--json"]));
    assert_eq!(p["result"], "rebuild", "{p:#}");
    assert_eq!(p["rebuild"], serde_json::json!([c.drvs[1]]));
    assert_eq!(p["conditional"], serde_json::json!([c.drvs[2]]));
    assert_eq!(p["steps"][0]["action"], "reuse");
    assert_eq!(p["steps"][1]["resolved"], c.r2_resolved);
    assert_eq!(p["steps"][2]["waits_for"], serde_json::json!([c.drvs[1]]));
    assert_eq!(p["derivation"], c.target);

    // `vouch rebuild` as builder A: one VM, bit-identical, nothing left.
    let r = c.rebuild_as_a();
    assert_eq!(r["rebuilt"].as_array().unwrap().len(), 1, "{r:#}");
    assert_eq!(r["rebuilt"][0]["drv"], c.drvs[1]);
    assert_eq!(r["rebuilt"][0]["bit_identical"], true, "{r:#}");
}

#[test]
fn a_rebuild_that_differs_re_resolves_its_dependent() {
    let c = Chain::new(true);
    let p = json(&c.verify(&c.strict, &["--plan-rebuild", "--json"]));
    assert_eq!(
        (&p["rebuild"], &p["conditional"]),
        (&serde_json::json!([c.drvs[1]]), &serde_json::json!([c.drvs[2]]))
    );
    // r2 differs when A rebuilds it: r3 resolves anew and is built too (a second VM), on r2's
    // new output, which `vouch rebuild` registered in the local Nix store.
    let r = c.rebuild_as_a();
    let rebuilt = r["rebuilt"].as_array().unwrap();
    assert_eq!(rebuilt.len(), 2, "{r:#}");
    assert_eq!(
        (&rebuilt[0]["drv"], &rebuilt[0]["bit_identical"]),
        (&c.drvs[1].clone().into(), &false.into())
    );
    assert_eq!(rebuilt[1]["drv"], c.drvs[2]);
    assert!(
        rebuilt[1].get("bit_identical").is_none(),
        "nothing predicted r3's new resolution: {r:#}"
    );
}
