//! A real-Nix fixture for the closure verifier: the Debian Nix 2.8 builds a small closure
//! (a 3-level floating-CA chain with a self-reference, cross references and a fixed-output
//! input; an input-addressed pair) in a chroot store; then, for every step, this harness does
//! what the launcher and an honest agent do — job from the basic (resolved) derivation and
//! the input closure, statement from what Nix built, simulated SNP evidence bound to both, a
//! JWS and signed Nix records in a trace store — from Nix's real `.drv` files, path infos and
//! NARs.
//!
//! It lives in this crate's library, not in `test-support`, because it uses build-trace and
//! nix-formats (which dev-depend on `test-support`); the tests that use it are this crate's
//! (`tests/tests/closure.rs`, `tests/tests/verify_cli.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use build_trace::evidence::{EvidenceBundle, EvidencePolicy, SimulatedLaunch, SimulatedRoot};
use build_trace::job::{BasicDerivation, CaRule, Job, Limits, NarHash, PathInfo};
use build_trace::statement::{Measurement, OutputInfo, Statement};
use build_trace::store::{StepRecord, TraceStore};
use build_trace::trust::{BuilderRule, TrustModel, TrustPolicy};
use build_trace::verify::DrvSet;
use nix_formats::derivation::DerivationKind;
use nix_formats::resolve::resolve_with;
use nix_formats::signing::SecretKey;
use nix_formats::{Hash, StorePath};
use test_support::nix;

pub const NIX_EXPR: &str = r#"
{ tag ? "1" }:
let
  bb = builtins.path { path = ./bb; name = "busybox"; };
  sys = builtins.currentSystem;
  ca = name: script: derivation {
    inherit name; system = sys; builder = "${bb}/sh"; args = [ "-c" script ];
    __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";
  };
  ia = name: script: derivation { inherit name; system = sys; builder = "${bb}/sh"; args = [ "-c" script ]; };
in rec {
  fod = derivation {
    name = "fod"; system = sys; builder = "${bb}/sh"; args = [ "-c" "echo -n hello > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
  };
  fodmd5 = derivation {
    name = "fodmd5"; system = sys; builder = "${bb}/sh"; args = [ "-c" "echo -n hello > $out" ];
    outputHashMode = "flat"; outputHashAlgo = "md5"; outputHash = "5d41402abc4b2a76b9719d911017c592";
  };
  a = ca "ca-a" "mkdir $out; echo a-${tag} > $out/data; echo $out > $out/self";
  b = ca "ca-b" "mkdir $out; cat ${a}/data ${fod} > $out/data; echo ${a} > $out/ref";
  c = ca "ca-c" "mkdir $out; cat ${b}/data > $out/data; echo ${b} > $out/ref";
  weak = ca "ca-weak" "cat ${fodmd5} > $out";
  ia1 = ia "ia-1" "mkdir $out; echo ia1 > $out/data";
  ia2 = ia "ia-2" "mkdir $out; cat ${ia1}/data > $out/data; echo ${ia1} > $out/ref";
  ia3 = ia "ia-3" "mkdir $out; echo ${ia2} > $out/ref";
}
"#;

/// One step as the launcher would have stored it.
#[derive(Debug, Clone)]
pub struct Step {
    pub udrv: StorePath,
    pub statement: Statement,
    pub evidence: EvidenceBundle,
    pub nars: BTreeMap<String, PathBuf>,
}

#[derive(Debug)]
pub struct Fixture {
    pub dir: tempfile::TempDir,
    /// `<chroot>/nix/store`: the `.drv` files.
    pub store_dir: PathBuf,
    pub chroot: PathBuf,
    /// attribute → drv path
    pub drvs: BTreeMap<String, StorePath>,
    /// attribute → output path (as Nix built it)
    pub outs: BTreeMap<String, StorePath>,
    pub steps: Vec<Step>,
    pub root: SimulatedRoot,
    pub key: SecretKey,
    pub measurement: [u8; 48],
    pub traces: PathBuf,
}

/// Run a Nix command with the test configuration; its stdout (panics unless it succeeds).
pub fn run(cmd: &mut Command) -> String {
    nix::stdout(cmd)
}

/// `nix ARGS` on the chroot store `store` (`None`: the local Nix store).
fn nix_in(store: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new("nix");
    cmd.args(args);
    if let Some(s) = store {
        cmd.arg("--store").arg(s);
    }
    cmd
}

/// Path infos from `nix path-info --json` (optionally `-r`) in the chroot store `store`
/// (`None`: the local Nix store).
pub fn path_infos(
    store: Option<&Path>,
    paths: &[StorePath],
    recursive: bool,
) -> BTreeMap<StorePath, PathInfo> {
    if paths.is_empty() {
        return BTreeMap::new();
    }
    let mut cmd = nix_in(store, &["path-info", "--json"]);
    if recursive {
        cmd.arg("-r");
    }
    cmd.args(paths.iter().map(ToString::to_string));
    let v: serde_json::Value = serde_json::from_str(&run(&mut cmd)).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let h = Hash::parse_any(e["narHash"].as_str().unwrap(), None).unwrap();
            let info = PathInfo {
                nar_hash: NarHash(h.sha256_bytes().unwrap()),
                nar_size: e["narSize"].as_u64().unwrap(),
                references: serde_json::from_value(e["references"].clone()).unwrap(),
                ca: e.get("ca").and_then(|c| c.as_str()).map(str::to_string),
            };
            (serde_json::from_value(e["path"].clone()).unwrap(), info)
        })
        .collect()
}

/// Output paths Nix registered for a derivation (realisations for CA, the drv for others).
fn nix_outputs(
    store: Option<&Path>,
    drv: &StorePath,
    d: &nix_formats::derivation::Derivation,
) -> BTreeMap<String, StorePath> {
    if let Some(paths) =
        d.outputs.iter().map(|(o, x)| x.path().map(|p| (o.clone(), p.clone()))).collect()
    {
        return paths;
    }
    let text = run(nix_in(store, &["realisation", "info", "--json"]).arg(drv.to_string()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let id = r["id"].as_str().unwrap();
            let out = id.rsplit_once('!').unwrap().1.to_string();
            (out, StorePath::from_base_name(r["outPath"].as_str().unwrap()).unwrap())
        })
        .collect()
}

pub const MEASUREMENT: [u8; 48] = [0x42; 48];

impl Fixture {
    /// Build the closure of `attrs` with real Nix and store a trace for every step.
    pub fn new(attrs: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        nix::busybox_dir(&t.join("bb"));
        std::fs::write(t.join("fixture.nix"), NIX_EXPR).unwrap();
        let chroot = t.join("store");
        let mut drvs = BTreeMap::new();
        for a in ["fod", "fodmd5", "a", "b", "c", "weak", "ia1", "ia2", "ia3"] {
            let p = run(Command::new("nix-instantiate")
                .arg("--store")
                .arg(&chroot)
                .arg(t.join("fixture.nix"))
                .args(["-A", a]));
            drvs.insert(a.to_string(), StorePath::parse(p.trim()).unwrap());
        }
        let key = SecretKey::from_seed("fixture-host-simulated-1", [9; 32]);
        std::fs::write(t.join("sk"), key.to_file_string()).unwrap();
        let mut build = Command::new("nix-build");
        build.arg("--store").arg(&chroot).arg(t.join("fixture.nix")).arg("--no-out-link");
        // Nix signs what it builds with the same key: its signatures are test oracles for ours.
        build.arg("--option").arg("secret-key-files").arg(t.join("sk"));
        for a in attrs {
            build.args(["-A", a]);
        }
        run(&mut build);
        let store_dir = chroot.join("nix/store");
        let root = SimulatedRoot::generate().unwrap();
        let traces = t.join("traces");
        let mut fx = Fixture {
            store_dir,
            chroot,
            drvs,
            outs: BTreeMap::new(),
            steps: Vec::new(),
            root,
            key,
            measurement: MEASUREMENT,
            traces,
            dir,
        };
        let mut chosen: BTreeMap<(StorePath, String), StorePath> = BTreeMap::new();
        let mut done = BTreeSet::new();
        for a in attrs {
            let target = fx.drvs[*a].clone();
            let store = Some(fx.chroot.as_path());
            for s in built_steps(store, &fx.store_dir, &target, &mut chosen, &mut done) {
                let step = fx.launch(&s.udrv, s.key, s.drv, &s.outputs);
                fx.steps.push(step);
            }
        }
        for (attr, d) in &fx.drvs {
            if let Some(p) = chosen.get(&(d.clone(), "out".to_string())) {
                fx.outs.insert(attr.clone(), p.clone());
            }
        }
        let store = TraceStore::create(&fx.traces).unwrap();
        for s in &fx.steps {
            let rec = StepRecord {
                statement: &s.statement,
                evidence: Some(&s.evidence),
                evidence_kind: "simulated",
                nars: s.nars.clone(),
            };
            store.put_step(&rec, &fx.key).unwrap();
        }
        fx
    }

    /// What the launcher and an honest agent produce for one step.
    fn launch(
        &self,
        udrv: &StorePath,
        key: StorePath,
        drv: BasicDerivation,
        outs: &BTreeMap<String, StorePath>,
    ) -> Step {
        let at = StoreAt { store: Some(&self.chroot), work: self.dir.path() };
        record_step(&at, udrv, key, drv, outs, self.measurement, &|st| self.attest_honestly(st))
    }

    /// Simulated evidence for a statement, with the given HOST_DATA and measurement.
    pub fn attest(
        &self,
        st: &Statement,
        host_data: [u8; 32],
        measurement: [u8; 48],
    ) -> EvidenceBundle {
        let att = self.root.attester(SimulatedLaunch::new(measurement, host_data));
        self.root.bundle(att.report(&st.report_data().unwrap()))
    }

    /// The simulated evidence an honest guest gives for `st`: its launch's HOST_DATA, the
    /// fixture's measurement.
    pub fn attest_honestly(&self, st: &Statement) -> EvidenceBundle {
        self.attest(st, st.host_data().unwrap(), self.measurement)
    }

    /// A policy: the fixture's simulated root and measurement as builder rule `sim`, the
    /// fixture's key as `host`, requiring `require`.
    /// `dir/policy.toml`: the policy accepting the fixture's simulated builder (`builder:sim`).
    pub fn write_sim_policy(&self, dir: &Path) -> PathBuf {
        let p = dir.join("policy.toml");
        std::fs::write(&p, self.policy(TrustModel::Leaf("builder:sim".into())).to_toml()).unwrap();
        p
    }

    pub fn policy(&self, require: TrustModel) -> TrustPolicy {
        let evidence = EvidencePolicy {
            simulated_roots: vec![self.root.key_id()],
            measurements: Some(vec![build_trace::evidence::Hex(self.measurement)].into()),
            ..EvidencePolicy::default()
        };
        TrustPolicy {
            keys: BTreeMap::from([(
                self.key.name().to_string(),
                self.key.public_key().to_string(),
            )]),
            builders: BTreeMap::from([(
                "sim".to_string(),
                BuilderRule { evidence, image_manifests: Vec::new() },
            )]),
            require,
            fixed_output: Default::default(),
            log: None,
        }
    }

    pub fn step(&self, attr: &str) -> &Step {
        let d = &self.drvs[attr];
        self.steps.iter().find(|s| &s.udrv == d).unwrap_or_else(|| panic!("no step for {attr}"))
    }
}

/// Where [`record_step`] reads what Nix built: a chroot store (`None`: the local Nix store),
/// and a work directory for the NAR files.
#[derive(Debug, Clone, Copy)]
pub struct StoreAt<'a> {
    pub store: Option<&'a Path>,
    pub work: &'a Path,
}

/// A step as the launcher would build it: the unresolved derivation, its key (resolved drv
/// path, or itself if input-addressed), the basic derivation and the outputs Nix gave it.
#[derive(Debug, Clone)]
pub struct BuiltStep {
    pub udrv: StorePath,
    pub key: StorePath,
    pub drv: BasicDerivation,
    pub outputs: BTreeMap<String, StorePath>,
}

/// The steps of `target`'s closure that Nix built in `store` (`None`: the local Nix store),
/// dependencies first, with `.drv` files read from `drv_dir`; fixed-output derivations and
/// those in `done` are left out. `chosen` collects (drv, output) → path.
pub fn built_steps(
    store: Option<&Path>,
    drv_dir: &Path,
    target: &StorePath,
    chosen: &mut BTreeMap<(StorePath, String), StorePath>,
    done: &mut BTreeSet<StorePath>,
) -> Vec<BuiltStep> {
    let set = DrvSet::from_store_dir(drv_dir, target).unwrap();
    let mut steps = Vec::new();
    for udrv in set.post_order(target).unwrap() {
        if !done.insert(udrv.clone()) {
            continue;
        }
        let d = set.get(&udrv).unwrap().clone();
        let outputs = nix_outputs(store, &udrv, &d);
        for (o, p) in &outputs {
            chosen.insert((udrv.clone(), o.clone()), p.clone());
        }
        let name = udrv.drv_name().unwrap().to_string();
        let (key, drv) = match d.kind(&name).unwrap() {
            DerivationKind::Fixed => continue,
            DerivationKind::InputAddressed => {
                let mut basic = d.clone();
                basic.input_drvs.clear();
                basic.input_srcs.extend(d.input_drvs.iter().flat_map(|(i, os)| {
                    os.iter().map(|o| chosen[&(i.clone(), o.clone())].clone()).collect::<Vec<_>>()
                }));
                let mut basic = BasicDerivation::from_derivation(&name, &basic).unwrap();
                // As Nix's build hook sends it: input sources = the whole input closure.
                let direct: Vec<StorePath> = basic.input_srcs.iter().cloned().collect();
                basic.input_srcs = path_infos(store, &direct, true).into_keys().collect();
                (udrv.clone(), basic)
            }
            _ => {
                let r = resolve_with(&d, &name, chosen).unwrap();
                (r.drv_path, BasicDerivation::from_derivation(&name, &r.drv).unwrap())
            }
        };
        steps.push(BuiltStep { udrv, key, drv, outputs });
    }
    steps
}

/// What the launcher and an honest agent produce for one step that Nix built at `at`: the job
/// from the basic derivation and the input closure, the statement from what Nix built (its
/// launch measurement `measurement`), the evidence `attest` gives for it, the output NARs.
pub fn record_step(
    at: &StoreAt<'_>,
    udrv: &StorePath,
    key: StorePath,
    drv: BasicDerivation,
    outs: &BTreeMap<String, StorePath>,
    measurement: [u8; 48],
    attest: &dyn Fn(&Statement) -> EvidenceBundle,
) -> Step {
    let direct: Vec<StorePath> = drv.input_srcs.iter().cloned().collect();
    let closure = path_infos(at.store, &direct, true);
    let wanted: BTreeSet<String> = outs.keys().cloned().collect();
    let job = Job::new(
        format!("job-{}", udrv.hash_part()),
        key,
        drv,
        closure,
        Limits::default(),
        CaRule::SelfRefPositions,
        false,
        wanted,
    );
    job.validate().unwrap();
    let out_paths: Vec<StorePath> = outs.values().cloned().collect();
    let infos = path_infos(at.store, &out_paths, false);
    let mut outputs = BTreeMap::new();
    let mut nars = BTreeMap::new();
    for (o, p) in outs {
        let i = &infos[p];
        outputs.insert(
            o.clone(),
            OutputInfo {
                path: p.clone(),
                nar_hash: i.nar_hash,
                nar_size: i.nar_size,
                references: i.references.clone(),
                ca: i.ca.clone(),
            },
        );
        let file = at.work.join(format!("{}.nar", p.hash_part()));
        let out = nix::run(nix_in(at.store, &["store", "dump-path"]).arg(p.to_string()));
        std::fs::write(&file, out.stdout).unwrap();
        nars.insert(o.clone(), file);
    }
    let input_cas =
        job.closure.iter().filter_map(|(p, i)| Some((p.clone(), i.ca.clone()?))).collect();
    // A pool VM's launch (no job named), its nonce the job's digest (unique per step).
    let launch = build_trace::Launch::new(job.digest().unwrap(), 1, 2048, job.network);
    let statement = Statement::new(
        launch,
        job,
        input_cas,
        outputs,
        Measurement(measurement),
        "vouch-agent test",
    );
    statement.validate().unwrap();
    let evidence = attest(&statement);
    Step { udrv: udrv.clone(), statement, evidence, nars }
}
