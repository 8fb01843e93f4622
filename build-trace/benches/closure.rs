//! Benchmark: verify a synthetic closure of 10 000 floating-CA steps (set `VOUCH_BENCH_STEPS` to
//! change it), every step with simulated SNP evidence from one shared chain, on one core.
//!
//! `cargo bench -p build-trace --bench closure`. Reported, all in the same run: the whole closure verification under an attested-builder
//! policy and under a key policy, against two baselines that any verifier must pay at least —
//! (A) parsing every statement from canonical bytes and hashing it into REPORT_DATA and
//! HOST_DATA, and (B) verifying every evidence bundle alone (same cached chain). Goal: the full
//! verification of 10 000 steps in ≤ 10 s.
//!
//! Shape: step i depends on steps i−1, i/2 and i−7 (when they exist) and on one source; its
//! output references the output of i−1 except every tenth step, so input closures stay tens of
//! paths deep, as in real build graphs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use build_trace::evidence::{
    EvidencePolicy, Expected, Hex, SimulatedLaunch, SimulatedRoot, Verifier,
};
use build_trace::job::{BasicDerivation, CaRule, Job, Limits, NarHash, PathInfo};
use build_trace::statement::{Measurement, OutputInfo, Statement};
use build_trace::store::{MemoryTraces, TraceEntry};
use build_trace::trust::{BuilderRule, TrustModel, TrustPolicy};
use build_trace::verify::{ClosureVerifier, DrvSet, Outcome, Request};
use nix_formats::content_address::ContentAddress;
use nix_formats::derivation::{hash_placeholder, CaMethod, Derivation, DerivationOutput};
use nix_formats::resolve::resolve_with;
use nix_formats::signing::SecretKey;
use nix_formats::store_path::FileIngestionMethod;
use nix_formats::{Hash, HashAlgo, StorePath};

mod support;

use support::timed;

const MEASUREMENT: [u8; 48] = [0x5a; 48];

struct Built {
    drvs: DrvSet,
    target: StorePath,
    traces: MemoryTraces,
    entries: Vec<TraceEntry>,
}

fn ca_path(name: &str, seed: &[u8], refs: &BTreeSet<StorePath>) -> (StorePath, String) {
    let ca = ContentAddress::Fixed {
        method: FileIngestionMethod::Recursive,
        hash: Hash::sha256(nix_formats::hash::sha256(seed)),
    };
    let path = ca.store_path(name, refs, false).unwrap();
    (path, ca.to_string())
}

fn build(n: usize, root: &SimulatedRoot, key: &SecretKey) -> Built {
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
        let job = Job::new(
            format!("bench-{i}"),
            r.drv_path,
            basic,
            closure,
            Limits::default(),
            CaRule::SelfRefPositions,
            false,
            BTreeSet::from(["out".into()]),
        );
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
        let input_cas =
            job.closure.iter().filter_map(|(p, i)| Some((p.clone(), i.ca.clone()?))).collect();
        let output = OutputInfo {
            path: out.clone(),
            nar_hash: out_info.nar_hash,
            nar_size: out_info.nar_size,
            references: out_info.references.clone(),
            ca: Some(out_ca),
        };
        let launch = build_trace::Launch::new(job.digest().unwrap(), 1, 2048, false);
        let st = Statement::new(
            launch,
            job,
            input_cas,
            BTreeMap::from([("out".into(), output)]),
            Measurement(MEASUREMENT),
            "bench",
        );
        let report = root
            .attester(SimulatedLaunch::new(MEASUREMENT, st.host_data().unwrap()))
            .report(&st.report_data().unwrap());
        let evidence = root.bundle(report).to_json();
        let jws = build_trace::jws::sign(&st, Some(evidence.as_bytes()), "simulated", key).unwrap();
        let entry = TraceEntry {
            location: format!("bench:{i}"),
            drv_path: st.job.drv_path.clone(),
            statement: st.canonical_bytes().unwrap(),
            evidence: Some(evidence.into_bytes()),
            jws: vec![jws],
        };
        traces.insert(entry.clone());
        entries.push(entry);
        chosen.insert((drv_path.clone(), "out".to_string()), out.clone());
        drvs.insert(drv_path.clone(), d);
        drv_paths.push(drv_path);
        outs.push((out, out_info));
    }
    Built { drvs, target: drv_paths.last().unwrap().clone(), traces, entries }
}

fn policy(root: &SimulatedRoot, key: &SecretKey, require: &str) -> TrustPolicy {
    let evidence = EvidencePolicy {
        simulated_roots: vec![root.key_id()],
        measurements: Some(vec![Hex(MEASUREMENT)]),
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

fn verify(b: &Built, policy: &TrustPolicy) -> (Duration, Duration) {
    let prepared = policy.prepare().unwrap();
    let ev = Verifier::new();
    let v = ClosureVerifier {
        policy: &prepared,
        sources: vec![&b.traces],
        evidence: &ev,
        now: SystemTime::now(),
    };
    let mut outcome = None;
    let d = timed(|| {
        outcome = Some(
            v.verify(&b.drvs, &Request { target: b.target.clone(), expect: BTreeSet::new() })
                .unwrap(),
        )
    });
    match outcome.unwrap() {
        Outcome::Verified(c) => assert_eq!(c.steps.len(), b.entries.len()),
        Outcome::NotVerified(broken) => panic!("{broken}"),
    }
    d
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test --all-targets` this runs as a quick
    // smoke test of a small closure (same code path, same assertions).
    let bench = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("VOUCH_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench { 10_000 } else { 40 });
    let root = SimulatedRoot::generate().unwrap();
    let key = SecretKey::from_seed("bench-1", [1; 32]);
    let t = Instant::now();
    let b = build(n, &root, &key);
    eprintln!("setup: {n} steps with evidence in {:.1?}", t.elapsed());
    let closure_paths: usize =
        b.entries.iter().map(|e| e.parse_statement().unwrap().job.closure.len()).sum();

    // Baseline A: parse every statement (canonical check) and compute REPORT_DATA, HOST_DATA.
    let base_a = timed(|| {
        for e in &b.entries {
            let st = e.parse_statement().unwrap();
            std::hint::black_box((st.report_data().unwrap(), st.host_data().unwrap()));
        }
    });

    // Baseline B: verify every evidence bundle alone (one shared chain, cached).
    let ev_policy = policy(&root, &key, "builder:sim").prepare().unwrap().rules[0].1.clone();
    let ev = Verifier::new();
    let expected: Vec<Expected> = b
        .entries
        .iter()
        .map(|e| {
            let st = e.parse_statement().unwrap();
            Expected {
                host_data: Some(st.host_data().unwrap()),
                report_data: Some(st.report_data().unwrap()),
            }
        })
        .collect();
    let base_b = timed(|| {
        for (e, x) in b.entries.iter().zip(&expected) {
            let bundle = serde_json::from_slice(e.evidence.as_ref().unwrap()).unwrap();
            ev.verify(&bundle, &ev_policy, x).unwrap();
        }
    });

    let full_evidence = verify(&b, &policy(&root, &key, "builder:sim"));
    let full_key = verify(&b, &policy(&root, &key, &format!("key:{}", key.name())));

    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "closure verification, {n} steps, {closure_paths} input-closure entries in all, one thread"
    );
    println!("| what | CPU time | per step (CPU) | wall | CPU ratio to A | CPU ratio to B |");
    println!("|---|---|---|---|---|---|");
    for (what, (wall, c)) in [
        ("A: parse every statement + REPORT_DATA + HOST_DATA", base_a),
        ("B: every evidence bundle alone (expected values given)", base_b),
        ("full verify, attested-builder policy", full_evidence),
        ("full verify, key policy (evidence still checked)", full_key),
    ] {
        println!(
            "| {what} | {:.2} s | {:.0} µs | {:.2} s | {:.2}× | {:.2}× |",
            c.as_secs_f64(),
            per(c),
            wall.as_secs_f64(),
            c.as_secs_f64() / base_a.1.as_secs_f64(),
            c.as_secs_f64() / base_b.1.as_secs_f64()
        );
    }
    if n >= 10_000 && full_evidence.1 > Duration::from_secs(10) {
        eprintln!("GOAL MISSED: {n} steps took {:.1?} of CPU (> 10 s)", full_evidence.1);
    }
}
