//! Benchmark: the closure of `closure.rs` (10 000 floating-CA steps; `VOUCH_BENCH_STEPS` changes
//! it), verified from a trace store directory and over loopback HTTP: the same directory served
//! by a real HTTP server in this process (axum on tokio, the stack `vouch serve` is built on,
//! `tests/dirserver`), read through `build_trace::source` (`vouch verify --traces http://…`).
//!
//! `cargo bench -p build-trace --bench closure_http`. Both verify on two threads (`--jobs 2`)
//! with the `.drv` graph in memory; the directory and the HTTP run with a cold local cache (every
//! file fetched, `--fetch-jobs 16`) alternate for three rounds (`VOUCH_BENCH_ROUNDS`) and the
//! fastest wall time of each is kept (the HTTP time includes waiting, at the end, for the local
//! cache's writes, which run on a thread of their own); then one run with the cache warm (only laut's index asked
//! again), and the `.drv` graph fetched over HTTP alone. Goal: cold HTTP ≤ 2× the directory's
//! wall time. Under `cargo test --all-targets` it runs 40 steps (same assertions).

#[path = "../tests/dirserver/mod.rs"]
mod dirserver;
mod support;
#[path = "../tests/synthetic/mod.rs"]
mod synthetic;

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use build_trace::evidence::{SimulatedRoot, Verifier};
use build_trace::source::{drv_set, FetchOptions, Traces};
use build_trace::store::TraceSource;
use build_trace::trust::PreparedPolicy;
use build_trace::verify::{ClosureVerifier, Outcome, Request};
use dirserver::{write_store, DirServer};
use nix_formats::signing::SecretKey;
use support::schedstat;
use synthetic::{build, policy, Built};

const THREADS: usize = 2;

/// Verify `b`'s closure from `source` on [`THREADS`]: wall time, and how long the calling thread
/// waited for a CPU (the machine's other load).
fn verify(b: &Built, policy: &PreparedPolicy, source: &dyn TraceSource) -> (Duration, Duration) {
    let ev = Verifier::new();
    let v = ClosureVerifier {
        policy,
        sources: vec![source],
        evidence: &ev,
        now: SystemTime::now(),
        threads: THREADS,
    };
    let req = Request { target: b.target.clone(), expect: BTreeSet::new() };
    let (t, waited) = (Instant::now(), schedstat(1));
    let outcome = v.verify(&b.drvs, &req).unwrap();
    let (wall, waited) = (t.elapsed(), schedstat(1) - waited);
    match outcome {
        Outcome::Verified(c) => assert_eq!(c.steps.len(), b.entries.len()),
        Outcome::NotVerified(broken) => panic!("{broken}"),
    }
    (wall, waited)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|s| s.parse().ok()).unwrap_or(d);
    let n = env("VOUCH_BENCH_STEPS", if bench { 10_000 } else { 40 });
    let rounds = env("VOUCH_BENCH_ROUNDS", if bench { 3 } else { 1 }).max(1);
    let root = SimulatedRoot::generate().unwrap();
    let key = SecretKey::from_seed("bench-1", [1; 32]);
    let t = Instant::now();
    let b = build(n, &root, &key);
    let dir = tempfile::tempdir().unwrap();
    write_store(dir.path(), &b.entries, Some(&b.drvs));
    eprintln!("setup: {n} steps written to a trace store in {:.1?}", t.elapsed());
    let server = DirServer::start(dir.path());
    let prepared = policy(&root, &key, "builder:sim").prepare().unwrap();
    let load_before = loadavg();

    let local = Traces::open(&dir.path().display().to_string(), &FetchOptions::default()).unwrap();
    let caches = tempfile::tempdir().unwrap();
    let (mut dir_runs, mut http_runs) = (Vec::new(), Vec::new());
    let mut last_cache = None;
    for r in 0..rounds {
        dir_runs.push(verify(&b, &prepared, &local));
        let cache = caches.path().join(format!("round-{r}"));
        let opts = FetchOptions { cache_dir: Some(cache.clone()), ..FetchOptions::default() };
        let http = Traces::open(&server.url, &opts).unwrap();
        let (wall, waited) = verify(&b, &prepared, &http);
        // Dropping the source waits for the local cache's writes: a `vouch verify` pays it.
        let t = Instant::now();
        drop(http);
        http_runs.push((wall + t.elapsed(), waited));
        last_cache = Some(opts);
    }
    let (dir_best, http_best) = (dir_runs.iter().min().unwrap(), http_runs.iter().min().unwrap());
    server.reset();
    let warm = Traces::open(&server.url, last_cache.as_ref().unwrap()).unwrap();
    let warm_run = verify(&b, &prepared, &warm);
    let warm_requests = server.count("");
    let fresh = Traces::open(&server.url, &FetchOptions::default()).unwrap();
    let t = Instant::now();
    let drvs = drv_set(&b.target, None, &[fresh]).unwrap();
    let drv_time = t.elapsed();
    assert_eq!(drvs.len(), n);
    let load_after = loadavg();

    let ratio = |d: Duration| d.as_secs_f64() / dir_best.0.as_secs_f64();
    println!("closure verification over loopback HTTP, {n} steps, {THREADS} threads, fastest of {rounds}");
    println!("| what | wall | ratio to the directory | calling thread waiting for a CPU |");
    println!("|---|---|---|---|");
    for (what, (wall, waited)) in [
        ("directory (`--traces DIR`)", *dir_best),
        ("HTTP, cold cache (`--traces http://…`, 16 fetches at once)", *http_best),
        ("HTTP, warm cache (laut's index asked again)", warm_run),
    ] {
        println!(
            "| {what} | {:.2} s | {:.2}× | {:.2} s |",
            wall.as_secs_f64(),
            ratio(wall),
            waited.as_secs_f64()
        );
    }
    println!(
        "the `.drv` graph alone over HTTP ({n} files, each checked against its path): {:.2} s; \
         warm run: {warm_requests} requests; load average {load_before} → {load_after}",
        drv_time.as_secs_f64()
    );
    if n >= 10_000 && ratio(http_best.0) > 2.0 {
        eprintln!(
            "GOAL MISSED: HTTP took {:.2}× the directory's wall time (> 2×)",
            ratio(http_best.0)
        );
    }
}
