//! `vouch verify --graph dot|svg` (the built binary) on a closure built by the real Debian Nix
//! ([`tests::fixture`]): every step with its resolved derivation and evidence kind, the edges
//! of the derivation graph, and the broken link in red — at the first step, and in the middle
//! of a chain whose trace went missing.

use std::process::{Command, Output};

use build_trace::store::TraceStore;
use test_support::nix::text;
use test_support::vm::vouch_bin;
use tests::fixture::Fixture;

fn vouch(args: &[&str]) -> Output {
    Command::new(vouch_bin()).args(args).output().unwrap()
}

const RED: &str = "#d0021b";

#[test]
fn graphs_of_a_verified_and_a_broken_closure() {
    let fx = Fixture::new(&["c"]);
    let dir = tempfile::tempdir().unwrap();
    let policy = fx.write_sim_policy(dir.path());
    let traces = fx.traces.display().to_string();
    let drv_dir = fx.store_dir.display().to_string();
    let drv = fx.drvs["c"].to_string();
    let p = policy.display().to_string();
    let verify = |extra: &[&str]| {
        let mut all = vec!["verify", "--traces", &traces, "--drv-dir", &drv_dir];
        all.extend(extra);
        all.push(&drv);
        vouch(&all)
    };
    let q = |a: &str| format!("\"{}\"", fx.drvs[a]);

    // Verified: one node per step, the derivation graph's edges, the target's output.
    let ok = verify(&["--policy", &p, "--graph", "dot"]);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let dot = String::from_utf8(ok.stdout).unwrap();
    assert!(dot.starts_with("digraph vouch_closure {"), "{dot}");
    assert!(dot.contains("VERIFIED ca-c.drv (SIMULATED evidence)"), "{dot}");
    for a in ["fod", "a", "b", "c"] {
        assert!(dot.contains(&format!("  {} [label=", q(a))), "{a}: {dot}");
    }
    for (from, to) in [("a", "b"), ("fod", "b"), ("b", "c")] {
        assert!(dot.contains(&format!("  {} -> {};", q(from), q(to))), "{from}->{to}: {dot}");
    }
    let b_resolved = fx.step("b").statement.job.drv_path.base_name().to_owned();
    assert!(dot.contains(&format!("resolved: {b_resolved}")), "{dot}");
    assert!(
        dot.contains("SIMULATED SEV-SNP: key fixture-host-simulated-1, SIMULATED chip"),
        "{dot}"
    );
    assert!(dot.contains("fixed output: fixed-output"), "{dot}");
    assert!(dot.contains(&format!("out: {}", fx.outs["c"].base_name())), "{dot}");
    assert!(!dot.contains(RED), "{dot}");

    // SVG through Graphviz, to a file: the text verdict still goes to stdout.
    let svg = dir.path().join("closure.svg");
    let s = svg.to_str().unwrap();
    let out = verify(&["--policy", &p, "--graph", "svg", "--graph-out", s]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("VERIFIED"), "{}", text(&out));
    let body = std::fs::read_to_string(&svg).unwrap();
    assert!(body.contains("<svg") && body.contains("ca&#45;b.drv"), "{body}");

    // A policy for genuine Genoa evidence of another image refuses the simulated evidence: the
    // first step with a trace breaks.
    let genuine = dir.path().join("genuine.toml");
    std::fs::write(
        &genuine,
        format!(
            "require = \"builder:prod\"\n[builders.prod.evidence]\nproducts = [\"Genoa\"]\n\
             measurements = [\"{}\"]\n",
            "ab".repeat(48)
        ),
    )
    .unwrap();
    let out = verify(&["--policy", genuine.to_str().unwrap(), "--graph", "dot"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let dot = String::from_utf8(out.stdout).unwrap();
    assert!(dot.contains("NOT VERIFIED ca-c.drv"), "{dot}");
    let a_line = dot.lines().find(|l| l.starts_with(&format!("  {} [", q("a")))).unwrap();
    assert!(a_line.contains("BROKEN") && a_line.contains(RED), "{a_line}");
    let edge = dot.lines().find(|l| l.starts_with(&format!("  {} -> {}", q("a"), q("b")))).unwrap();
    assert!(edge.contains(RED), "{edge}");
    assert!(dot.contains("(not reported)"), "{dot}");

    // A trace missing in the middle of the chain: b is the broken link, its edge to c red.
    let b = &fx.step("b").statement.job.drv_path;
    std::fs::remove_dir_all(TraceStore::open(&fx.traces).unwrap().step_dir(b)).unwrap();
    let out = verify(&["--policy", &p, "--graph", "dot"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let dot = String::from_utf8(out.stdout).unwrap();
    let b_line = dot.lines().find(|l| l.starts_with(&format!("  {} [", q("b")))).unwrap();
    assert!(b_line.contains("BROKEN: trace lookup") && b_line.contains(RED), "{b_line}");
    assert!(b_line.contains(&format!("resolved: {b_resolved}")), "{b_line}");
    let edge = dot.lines().find(|l| l.starts_with(&format!("  {} -> {}", q("b"), q("c")))).unwrap();
    assert!(edge.contains(RED), "{edge}");
    let a_edge =
        dot.lines().find(|l| l.starts_with(&format!("  {} -> {}", q("a"), q("b")))).unwrap();
    assert!(!a_edge.contains(RED), "{a_edge}");

    let bad = verify(&["--graph", "png"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
}
