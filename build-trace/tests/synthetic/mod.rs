//! A synthetic closure for the closure bench and the parallel-verification tests: `n`
//! floating-CA steps, step i depending on steps i−1, i/2 and i−7 (when they exist) and on one
//! content-addressed source, its output referencing the output of i−1 except every tenth step
//! (input closures stay tens of paths deep, as in real build graphs); every step with a real
//! statement, simulated SNP evidence from one shared root and a laut JWS. Also the check that
//! the closure verifier gives one outcome on any number of threads.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use build_trace::evidence::Verifier;
use build_trace::evidence::{EvidencePolicy, Hex, SimulatedLaunch, SimulatedRoot};
use build_trace::job::{BasicDerivation, CaRule, Job, Limits, NarHash, PathInfo};
use build_trace::statement::{Measurement, OutputInfo, Statement};
use build_trace::store::TraceSource;
use build_trace::store::{MemoryTraces, TraceEntry};
use build_trace::trust::{BuilderRule, TrustModel, TrustPolicy};
use build_trace::verify::{ClosureVerifier, DrvSet, Outcome, Request};
use nix_formats::content_address::ContentAddress;
use nix_formats::derivation::{hash_placeholder, CaMethod, Derivation, DerivationOutput};
use nix_formats::resolve::resolve_with;
use nix_formats::signing::SecretKey;
use nix_formats::store_path::FileIngestionMethod;
use nix_formats::{Hash, HashAlgo, StorePath};

pub const MEASUREMENT: [u8; 48] = [0x5a; 48];

/// The closure: derivations, target, traces (also as a list, in step order).
pub struct Built {
    pub drvs: DrvSet,
    pub target: StorePath,
    pub traces: MemoryTraces,
    pub entries: Vec<TraceEntry>,
}

pub fn ca_path(name: &str, seed: &[u8], refs: &BTreeSet<StorePath>) -> (StorePath, String) {
    let ca = ContentAddress::Fixed {
        method: FileIngestionMethod::Recursive,
        hash: Hash::sha256(nix_formats::hash::sha256(seed)),
    };
    let path = ca.store_path(name, refs, false).unwrap();
    (path, ca.to_string())
}

/// Build an `n`-step closure signed by `root` and `key`.
pub fn build(n: usize, root: &SimulatedRoot, key: &SecretKey) -> Built {
    let (src, src_ca) = ca_path("busybox", b"busybox", &BTreeSet::new());
    let src_info = PathInfo {
        nar_hash: NarHash::of(b"busybox nar"),
        nar_size: 1_200_000,
        references: BTreeSet::new(),
        ca: Some(src_ca.clone()),
    };
    let mut drvs = DrvSet::new();
    let mut traces = MemoryTraces::default();
    let mut entries = Vec::with_capacity(n);
    let mut drv_paths: Vec<StorePath> = Vec::with_capacity(n);
    let mut outs: Vec<(StorePath, PathInfo)> = Vec::with_capacity(n);
    let mut chosen = BTreeMap::new();
    for i in 0..n {
        let name = format!("step-{i}");
        let deps: BTreeSet<usize> = [i.checked_sub(1), (i > 1).then_some(i / 2), i.checked_sub(7)]
            .into_iter()
            .flatten()
            .collect();
        let mut d = Derivation {
            platform: "x86_64-linux".into(),
            builder: format!("{src}/sh"),
            args: vec!["-c".into(), format!("build {i}")],
            ..Default::default()
        };
        d.outputs.insert(
            "out".into(),
            DerivationOutput::Floating { method: CaMethod::Recursive, algo: HashAlgo::Sha256 },
        );
        d.env.insert("out".into(), hash_placeholder("out"));
        d.env.insert("name".into(), name.clone());
        d.input_srcs.insert(src.clone());
        for &j in &deps {
            d.input_drvs.insert(drv_paths[j].clone(), BTreeSet::from(["out".to_string()]));
        }
        let drv_path = d.drv_path(&name).unwrap();
        let r = resolve_with(&d, &name, &chosen).unwrap();
        let basic = BasicDerivation::from_derivation(&name, &r.drv).unwrap();
        // Input closure: the direct inputs and what they reference.
        let mut closure = BTreeMap::new();
        let mut todo: Vec<StorePath> = basic.input_srcs.iter().cloned().collect();
        while let Some(p) = todo.pop() {
            if closure.contains_key(&p) {
                continue;
            }
            let info = if p == src {
                src_info.clone()
            } else {
                outs.iter().find(|(q, _)| *q == p).map(|(_, i)| i.clone()).unwrap()
            };
            todo.extend(info.references.iter().cloned());
            closure.insert(p, info);
        }
        let job = job(format!("bench-{i}"), r.drv_path, basic, closure);
        let refs: BTreeSet<StorePath> = if i > 0 && i % 10 != 0 {
            BTreeSet::from([outs[i - 1].0.clone()])
        } else {
            BTreeSet::new()
        };
        let (out, out_ca) = ca_path(&name, name.as_bytes(), &refs);
        let out_info = PathInfo {
            nar_hash: NarHash::of(format!("nar of {i}").as_bytes()),
            nar_size: 4096,
            references: refs,
            ca: Some(out_ca.clone()),
        };
        let st = statement(job, &out, &out_info);
        let entry = signed_entry(&st, root, key, format!("bench:{i}"));
        traces.insert(entry.clone());
        entries.push(entry);
        chosen.insert((drv_path.clone(), "out".to_string()), out.clone());
        drvs.insert(drv_path.clone(), d);
        drv_paths.push(drv_path);
        outs.push((out, out_info));
    }
    Built { drvs, target: drv_paths.last().unwrap().clone(), traces, entries }
}

/// The job of a step with one output `out`, default limits, not networked.
pub fn job(
    id: String,
    drv_path: StorePath,
    drv: BasicDerivation,
    closure: BTreeMap<StorePath, PathInfo>,
) -> Job {
    let outputs = BTreeSet::from(["out".into()]);
    Job::new(
        id,
        drv_path,
        drv,
        closure,
        Limits::default(),
        CaRule::SelfRefPositions,
        false,
        outputs,
    )
}

/// The statement of `job` with its one output `out` (`path`, with these facts and `ca`), the
/// closure's content addresses as the guest recomputed them, in the synthetic guest.
pub fn statement(job: Job, path: &StorePath, out: &PathInfo) -> Statement {
    let input_cas =
        job.closure.iter().filter_map(|(p, i)| Some((p.clone(), i.ca.clone()?))).collect();
    let output = OutputInfo {
        path: path.clone(),
        nar_hash: out.nar_hash,
        nar_size: out.nar_size,
        references: out.references.clone(),
        ca: out.ca.clone(),
    };
    let launch = build_trace::Launch::new(job.digest().unwrap(), 1, 2048, false);
    Statement::new(
        launch,
        job,
        input_cas,
        BTreeMap::from([("out".into(), output)]),
        Measurement(MEASUREMENT),
        "bench",
    )
}

/// A policy naming the simulated root (rule `sim`) and the key, requiring `require`.
pub fn policy(root: &SimulatedRoot, key: &SecretKey, require: &str) -> TrustPolicy {
    let evidence = EvidencePolicy {
        simulated_roots: vec![root.key_id()],
        measurements: Some(vec![Hex(MEASUREMENT)].into()),
        ..EvidencePolicy::default()
    };
    TrustPolicy {
        keys: BTreeMap::from([(key.name().to_string(), key.public_key().to_string())]),
        builders: BTreeMap::from([(
            "sim".to_string(),
            BuilderRule { evidence, image_manifests: Vec::new() },
        )]),
        require: TrustModel::Leaf(require.into()),
        fixed_output: Default::default(),
        log: None,
    }
}

/// A trace entry for `st`: simulated evidence from `root` and a JWS by `key`.
pub fn signed_entry(
    st: &Statement,
    root: &SimulatedRoot,
    key: &SecretKey,
    location: String,
) -> TraceEntry {
    let report = root
        .attester(SimulatedLaunch::new(MEASUREMENT, st.host_data().unwrap()))
        .report(&st.report_data().unwrap());
    let evidence = root.bundle(report).to_json();
    let jws = build_trace::jws::sign(st, Some(evidence.as_bytes()), "simulated", key).unwrap();
    TraceEntry {
        location,
        drv_path: st.job.drv_path.clone(),
        statement: st.canonical_bytes().unwrap(),
        evidence: Some(evidence.into_bytes()),
        jws: vec![jws],
    }
}

/// Verify `req` over `drvs` with one trace source on each of `threads` (a fresh evidence
/// verifier each time: no run profits from another's chain cache). Every outcome, the first
/// broken link included, must equal the first; it is returned.
pub fn verify_on_threads(
    drvs: &DrvSet,
    req: &Request,
    policy: &TrustPolicy,
    source: &dyn TraceSource,
    threads: &[usize],
) -> Outcome {
    let prepared = policy.prepare().unwrap();
    let now = SystemTime::now();
    let run = |threads: usize| {
        let ev = Verifier::new();
        let v = ClosureVerifier {
            policy: &prepared,
            sources: vec![source],
            evidence: &ev,
            now,
            threads,
        };
        v.verify(drvs, req).unwrap()
    };
    let first = run(threads[0]);
    for &t in &threads[1..] {
        assert_eq!(run(t), first, "{t} threads vs {}", threads[0]);
    }
    first
}
