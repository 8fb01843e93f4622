//! Benchmark: verify a synthetic closure of 10 000 floating-CA steps (set `VOUCH_BENCH_STEPS` to
//! change it), every step with simulated SNP evidence from one shared chain, on one thread and
//! on two.
//!
//! `cargo bench -p build-trace --bench closure`. Reported, all in the same run: the whole
//! closure verification under an attested-builder policy and under a key policy on one thread,
//! against two baselines that any verifier must pay at least — (A) parsing every statement
//! from canonical bytes and hashing it into REPORT_DATA and HOST_DATA, and (B) verifying every
//! evidence bundle alone (same cached chain) — and the attested-builder verification with
//! `threads = 2` against the one-thread run. The one- and two-thread runs alternate for three
//! rounds (`VOUCH_BENCH_ROUNDS`) and the fastest of each is kept. Goals: one thread ≤ 4.5 s of
//! CPU time for 10 000 steps; two threads ≤ 0.6× the one-thread wall time.
//!
//! Shape: `tests/synthetic/mod.rs`.

mod support;
#[path = "../tests/synthetic/mod.rs"]
mod synthetic;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use build_trace::evidence::{Expected, SimulatedRoot, Verifier};
use build_trace::trust::TrustPolicy;
use build_trace::verify::{ClosureVerifier, Outcome, Request};
use nix_formats::signing::SecretKey;
use support::{process_cpu, schedstat, timed};
use synthetic::{build, policy, Built};

/// Verify the closure with `threads`: (wall, CPU) — CPU of this thread for one thread, of the
/// process for more — and how long the calling thread waited for a CPU (machine load).
fn verify(b: &Built, policy: &TrustPolicy, threads: usize) -> ((Duration, Duration), Duration) {
    let prepared = policy.prepare().unwrap();
    let ev = Verifier::new();
    let v = ClosureVerifier {
        policy: &prepared,
        sources: vec![&b.traces],
        evidence: &ev,
        now: SystemTime::now(),
        threads,
    };
    let req = Request { target: b.target.clone(), expect: BTreeSet::new() };
    let (process, waited) = (process_cpu(), schedstat(1));
    let mut outcome = None;
    let (wall, thread_cpu) = timed(|| outcome = Some(v.verify(&b.drvs, &req).unwrap()));
    match outcome.unwrap() {
        Outcome::Verified(c) => assert_eq!(c.steps.len(), b.entries.len()),
        Outcome::NotVerified(broken) => panic!("{broken}"),
    }
    let waited = schedstat(1) - waited;
    ((wall, if threads > 1 { process_cpu() - process } else { thread_cpu }), waited)
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

    // One thread and two, alternating; the faster run of each is kept.
    let attested = policy(&root, &key, "builder:sim");
    let rounds: usize = std::env::var("VOUCH_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if bench { 3 } else { 1 })
        .max(1);
    let fastest = |runs: Vec<((Duration, Duration), Duration)>| runs.into_iter().min().unwrap();
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        one.push(verify(&b, &attested, 1));
        two.push(verify(&b, &attested, 2));
    }
    let ((one, one_waited), (two, two_waited)) = (fastest(one), fastest(two));
    let (full_key, _) = verify(&b, &policy(&root, &key, &format!("key:{}", key.name())), 1);

    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!("closure verification, {n} steps, {closure_paths} input-closure entries in all");
    println!("| what | CPU time | per step (CPU) | wall | CPU ratio to A | CPU ratio to B | wall ratio to 1 thread |");
    println!("|---|---|---|---|---|---|---|");
    for (what, (wall, c)) in [
        ("A: parse every statement + REPORT_DATA + HOST_DATA", base_a),
        ("B: every evidence bundle alone (expected values given)", base_b),
        ("full verify, attested-builder policy, 1 thread", one),
        ("full verify, attested-builder policy, 2 threads (CPU: all threads)", two),
        ("full verify, key policy (evidence still checked), 1 thread", full_key),
    ] {
        println!(
            "| {what} | {:.2} s | {:.0} µs | {:.2} s | {:.2}× | {:.2}× | {:.2}× |",
            c.as_secs_f64(),
            per(c),
            wall.as_secs_f64(),
            c.as_secs_f64() / base_a.1.as_secs_f64(),
            c.as_secs_f64() / base_b.1.as_secs_f64(),
            wall.as_secs_f64() / one.0.as_secs_f64(),
        );
    }
    println!(
        "calling thread runnable but waiting for a CPU (other load): {:.2} s of the 1-thread run, \
         {:.2} s of the 2-thread run",
        one_waited.as_secs_f64(),
        two_waited.as_secs_f64()
    );
    if n >= 10_000 && one.1 > Duration::from_secs_f64(4.5) {
        eprintln!("GOAL MISSED: {n} steps took {:.2?} of CPU on one thread (> 4.5 s)", one.1);
    }
    if n >= 10_000 && two.0.as_secs_f64() > 0.6 * one.0.as_secs_f64() {
        eprintln!(
            "GOAL MISSED: 2 threads took {:.2}× the one-thread wall time (> 0.6×)",
            two.0.as_secs_f64() / one.0.as_secs_f64()
        );
    }
}
