//! Attacks on the closure verifier's links (issue 12, item 3): a step's inputs may be linked only
//! to facts that its own dependencies' accepted traces give, and every input-addressed
//! derivation's output paths are checked, deferred ones included. Every trace here carries valid
//! (simulated) evidence the policy accepts: the host ran each step in a genuine guest, so only
//! the verifier's links can stop it.

mod synthetic;

use std::collections::{BTreeMap, BTreeSet};

use build_trace::evidence::SimulatedRoot;
use build_trace::job::{BasicDerivation, NarHash, PathInfo};
use build_trace::store::MemoryTraces;
use build_trace::verify::{DrvSet, LinkCheck, Outcome, Request};
use nix_formats::content_address::ContentAddress;
use nix_formats::derivation::{hash_placeholder, CaMethod, Derivation, DerivationOutput, DrvGraph};
use nix_formats::resolve::resolve_with;
use nix_formats::signing::SecretKey;
use nix_formats::store_path::FileIngestionMethod;
use nix_formats::{Hash, HashAlgo, StorePath};
use synthetic::{job, policy, signed_entry, statement, verify_on_threads};

struct Lab {
    root: SimulatedRoot,
    key: SecretKey,
    drvs: DrvSet,
    graph: DrvGraph,
    traces: MemoryTraces,
    /// Every path's facts as the traces so far state them.
    infos: BTreeMap<StorePath, PathInfo>,
    src: StorePath,
}

fn ca(seed: &str) -> String {
    ContentAddress::Fixed {
        method: FileIngestionMethod::Recursive,
        hash: Hash::sha256(nix_formats::hash::sha256(seed.as_bytes())),
    }
    .to_string()
}

fn ca_path(name: &str, ca: &str) -> StorePath {
    ContentAddress::parse(ca).unwrap().store_path(name, &BTreeSet::new(), false).unwrap()
}

fn info(nar: &str, ca: Option<String>) -> PathInfo {
    PathInfo {
        nar_hash: NarHash::of(nar.as_bytes()),
        nar_size: nar.len() as u64,
        references: BTreeSet::new(),
        ca,
    }
}

impl Lab {
    fn new() -> Lab {
        Lab::with_source(&ca("busybox"))
    }

    /// A lab whose one source (every derivation's builder) has content address `src_ca`.
    fn with_source(src_ca: &str) -> Lab {
        let src_ca = src_ca.to_owned();
        let src = ca_path("busybox", &src_ca);
        let infos = BTreeMap::from([(src.clone(), info("busybox nar", Some(src_ca)))]);
        Lab {
            root: SimulatedRoot::generate().unwrap(),
            key: SecretKey::from_seed("links-1", [3; 32]),
            drvs: DrvSet::new(),
            graph: DrvGraph::new(),
            traces: MemoryTraces::default(),
            infos,
            src,
        }
    }

    /// A derivation running `script`, on `inputs` (each one's `out`), with `out` as given.
    fn drv(
        &self,
        name: &str,
        script: &str,
        inputs: &[&StorePath],
        out: DerivationOutput,
    ) -> Derivation {
        let mut d = Derivation {
            platform: "x86_64-linux".into(),
            builder: format!("{}/sh", self.src),
            args: vec!["-c".into(), script.into()],
            ..Default::default()
        };
        d.input_srcs.insert(self.src.clone());
        for i in inputs {
            d.input_drvs.insert((*i).clone(), BTreeSet::from(["out".to_string()]));
        }
        let env_out = match &out {
            DerivationOutput::InputAddressed(p) => p.to_string(),
            DerivationOutput::Deferred => String::new(),
            _ => hash_placeholder("out"),
        };
        d.env.insert("out".into(), env_out);
        d.env.insert("name".into(), name.into());
        d.outputs.insert("out".into(), out);
        d
    }

    /// An input-addressed derivation with the path its hash modulo gives.
    fn honest_ia(&mut self, name: &str, script: &str, inputs: &[&StorePath]) -> Derivation {
        let dummy = ca_path(name, &ca("dummy"));
        let d = self.drv(name, script, inputs, DerivationOutput::InputAddressed(dummy));
        let p = self.graph.input_addressed_paths(&d, name).unwrap().expect("not deferred");
        self.drv(name, script, inputs, DerivationOutput::InputAddressed(p["out"].clone()))
    }

    /// Add `d`, with one trace of its step: resolved against `chosen`, its `out` produced with
    /// `nar` (content-addressed for a floating output) or, if given, the output `claim` (path
    /// and facts), its input closure's facts from `infos` with `swap` applied. Returns (drv
    /// path, output path).
    fn add(
        &mut self,
        name: &str,
        d: Derivation,
        chosen: &BTreeMap<(StorePath, String), StorePath>,
        nar: &str,
        swap: &BTreeMap<StorePath, PathInfo>,
        claim: Option<(StorePath, PathInfo)>,
    ) -> (StorePath, StorePath) {
        let drv_path = d.drv_path(name).unwrap();
        self.graph.insert(drv_path.clone(), d.clone());
        self.drvs.insert(drv_path.clone(), d.clone());
        let (key, basic) = match &d.outputs["out"] {
            DerivationOutput::InputAddressed(_) => {
                let mut b = d.clone();
                b.input_drvs.clear();
                b.input_srcs.extend(chosen.values().cloned());
                (drv_path.clone(), b)
            }
            _ => {
                let r = resolve_with(&d, name, chosen).unwrap();
                (r.drv_path, r.drv)
            }
        };
        let basic = BasicDerivation::from_derivation(name, &basic).unwrap();
        let closure: BTreeMap<StorePath, PathInfo> = basic
            .input_srcs
            .iter()
            .map(|p| (p.clone(), swap.get(p).unwrap_or(&self.infos[p]).clone()))
            .collect();
        let (out_path, out_ca) = match &basic.outputs["out"].path {
            Some(p) => (p.clone(), None),
            None => {
                let c = ca(nar);
                (ca_path(name, &c), Some(c))
            }
        };
        let job = job(format!("links-{name}"), key, basic, closure);
        let (out_path, out_info) = claim.unwrap_or((out_path, info(nar, out_ca)));
        let st = statement(job, &out_path, &out_info);
        self.traces.insert(signed_entry(&st, &self.root, &self.key, format!("lab:{name}")));
        self.infos.entry(out_path.clone()).or_insert(out_info);
        (drv_path, out_path)
    }

    fn verify(&self, target: &StorePath) -> Outcome {
        self.verify_weak(target, false)
    }

    fn verify_weak(&self, target: &StorePath, allow_weak_hashes: bool) -> Outcome {
        let req = Request { target: target.clone(), expect: BTreeSet::new() };
        let mut p = policy(&self.root, &self.key, "builder:sim");
        p.fixed_output.allow_weak_hashes = allow_weak_hashes;
        verify_on_threads(&self.drvs, &req, &p, &self.traces, &[1, 3])
    }
}

fn floating() -> DerivationOutput {
    DerivationOutput::Floating { method: CaMethod::Recursive, algo: HashAlgo::Sha256 }
}

fn none() -> BTreeMap<StorePath, PathInfo> {
    BTreeMap::new()
}

/// The first of `make(script)` (scripts `link 0`, `link 1`, …) whose drv path sorts after
/// `after`, so that the verifier's post-order visits `after` first (it walks input derivations
/// in path order).
fn after(after: &StorePath, mut make: impl FnMut(String) -> Derivation) -> Derivation {
    (0..)
        .map(|seed| make(format!("link {seed}")))
        .find(|d| d.drv_path(d.env["name"].as_str()).unwrap() > *after)
        .unwrap()
}

/// The chosen `out` of each input derivation.
fn outs(pairs: &[(&StorePath, &StorePath)]) -> BTreeMap<(StorePath, String), StorePath> {
    pairs.iter().map(|(d, p)| (((*d).clone(), "out".to_string()), (*p).clone())).collect()
}

/// A deferred input-addressed derivation (its input is floating CA) that declares the output
/// path of an unrelated derivation `lib`, built honestly in a genuine guest, gives the host
/// facts for `lib`'s path; with them it swaps `lib` under `app`, which links `lib` with those
/// facts. The verifier must refuse the foreign path, whatever else the traces say.
#[test]
fn a_deferred_derivation_declaring_a_foreign_path_cannot_feed_another_step() {
    let mut lab = Lab::new();
    let none_chosen = BTreeMap::new();
    let lib_drv = lab.honest_ia("lib", "make lib", &[]);
    let (lib, lib_out) = lab.add("lib", lib_drv, &none_chosen, "genuine lib nar", &none(), None);
    let float_drv = lab.drv("float", "make float", &[], floating());
    let (float, float_out) = lab.add("float", float_drv, &none_chosen, "float nar", &none(), None);
    // `evil` has a floating-CA input, so its hash modulo is deferred: Nix leaves its path
    // empty. It declares `lib`'s path instead and makes the attacker's bytes there.
    // (named `lib` too: an output path carries its derivation's name).
    let evil_drv =
        lab.drv("lib", "make evil", &[&float], DerivationOutput::InputAddressed(lib_out.clone()));
    let evil_chosen = BTreeMap::from([((float.clone(), "out".into()), float_out)]);
    let (evil, _) = lab.add("lib", evil_drv, &evil_chosen, "attacker nar", &none(), None);
    // `app` links `lib` — with the attacker's facts.
    let app_drv = after(&evil, |seed| lab.honest_ia("app", &seed, &[&lib]));
    let swap = BTreeMap::from([(lib_out.clone(), info("attacker nar", None))]);
    let (app, app_out) =
        lab.add("app", app_drv, &outs(&[(&lib, &lib_out)]), "app nar", &swap, None);
    // The target depends on `evil`, then `app` (as the attacker arranges it); it is deferred
    // too (an input is), so its outputs are empty as Nix writes them.
    let both = lab.drv("both", "both", &[&evil, &app], DerivationOutput::Deferred);
    let chosen = outs(&[(&evil, &lib_out), (&app, &app_out)]);
    let (both, _) = lab.add("both", both, &chosen, "both nar", &none(), None);
    let Outcome::NotVerified(b) = lab.verify(&both) else { panic!("the swapped input verified") };
    assert_eq!(b.step, evil.to_string(), "{b}");
    assert_eq!(b.check, LinkCheck::Derivation, "{b}");
    assert!(b.to_string().contains("only after resolution"), "{b}");
}

/// Two floating-CA derivations claim the same content-addressed path with different facts;
/// `app` depends on the first only. The second's facts (a derivation elsewhere in the graph)
/// must not satisfy `app`'s link.
#[test]
fn only_a_steps_own_dependencies_can_vouch_for_its_inputs() {
    let mut lab = Lab::new();
    let none_chosen = BTreeMap::new();
    let c = ca("shared lib");
    let genuine = lab.drv("lib", "make lib", &[], floating());
    let (lib, lib_out) = lab.add("lib", genuine, &none_chosen, "shared lib", &none(), None);
    // Another `lib` (another builder) whose trace says it made the same path with other bytes.
    let other = lab.drv("lib", "make other lib", &[], floating());
    let bad = info("other bytes", Some(c));
    let claim = Some((lib_out.clone(), bad.clone()));
    let (other_path, _) = lab.add("lib", other, &none_chosen, "", &none(), claim);
    // `app` consumes the genuine `lib`, its closure swapped to the other's facts.
    let app_drv = after(&other_path, |seed| lab.drv("app", &seed, &[&lib], floating()));
    let swap = BTreeMap::from([(lib_out.clone(), bad)]);
    let (app, app_out) =
        lab.add("app", app_drv, &outs(&[(&lib, &lib_out)]), "app nar", &swap, None);
    let top = lab.drv("top", "top", &[&other_path, &app], floating());
    let chosen = outs(&[(&other_path, &lib_out), (&app, &app_out)]);
    let (top, _) = lab.add("top", top, &chosen, "top nar", &none(), None);
    let Outcome::NotVerified(b) = lab.verify(&top) else { panic!("the swapped input verified") };
    assert_eq!(b.step, app.to_string(), "{b}");
    assert_eq!(b.check, LinkCheck::InputNarHash, "{b}");
}

/// A content-addressed input named by a SHA-1 (or MD5) address: a collision gives two contents
/// one path, so it is refused unless the policy allows weak hashes, as for fixed outputs
/// (issue 12, item 9).
#[test]
fn weak_content_addresses_of_inputs_are_refused_by_default() {
    for algo in ["sha1", "md5"] {
        let digest = match algo {
            "sha1" => Hash::new(HashAlgo::Sha1, &[0x5a; 20]).unwrap(),
            _ => Hash::new(HashAlgo::Md5, &[0x5a; 16]).unwrap(),
        };
        let weak = ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash: digest }
            .to_string();
        let mut lab = Lab::with_source(&weak);
        let d = lab.drv("app", "make app", &[], floating());
        let (app, _) = lab.add("app", d, &BTreeMap::new(), "app nar", &none(), None);
        let Outcome::NotVerified(b) = lab.verify(&app) else { panic!("a {algo} input verified") };
        assert_eq!(b.check, LinkCheck::WeakHash, "{b}");
        assert!(b.to_string().contains(algo), "{b}");
        assert!(matches!(lab.verify_weak(&app, true), Outcome::Verified(_)), "allowed: {algo}");
    }
}
