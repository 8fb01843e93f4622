//! The event reader on lines captured from the real Debian Nix 2.8 (`nix-store --realise
//! --log-format internal-json -v`, a `ssh-ng://` builder): a chain a (CA) → b (deferred
//! input-addressed) → c (CA), and a failing step f with a dependent g.

use super::*;

const CHAIN: &str = include_str!("testdata/nix-2.8-chain.jsonl");
const FAILURE: &str = include_str!("testdata/nix-2.8-failure.jsonl");
const NO_MACHINE: &str = include_str!("testdata/nix-2.8-no-machine.jsonl");
const A: &str = "/nix/store/rl1694k7d7d1yp59yl3y2rbf654716n7-x-a.drv";
const B: &str = "/nix/store/rni3ng2rjgfbq4y6fc1k85z7d3z78qak-x-b.drv";
const B_RESOLVED: &str = "/nix/store/gp07bjf3432849im7cm0q0nflp8lypfp-x-b.drv";
const C_RESOLVED: &str = "/nix/store/bhsk9fpa5dzy346rsh2z4ilag1b32f36-x-c.drv";
const MACHINE: &str = "ssh-ng://localhost?remote-store=local%3Froot%3D/tmp/cx/rem";

fn track(text: &str) -> (Tracker, Vec<Change>) {
    let mut t = Tracker::default();
    let changes = text
        .lines()
        .filter_map(parse_line)
        .map(|e| t.apply(e))
        .filter(|c| *c != Change::None)
        .collect();
    (t, changes)
}

#[test]
fn a_chain_names_each_step_its_machine_resolution_and_log() {
    let (t, changes) = track(CHAIN);
    assert_eq!(t.machines.get(A).map(String::as_str), Some(MACHINE));
    assert_eq!(t.machines.get(B_RESOLVED).map(String::as_str), Some(MACHINE));
    assert_eq!(t.machines.get(C_RESOLVED).map(String::as_str), Some(MACHINE));
    assert_eq!(t.machines.len(), 3, "{:?}", t.machines);
    assert_eq!(t.resolved.get(B).map(String::as_str), Some(B_RESOLVED));
    assert!(t.failed.is_empty() && t.dependents_failed.is_empty());
    let lines: Vec<(&str, &str)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Line { drv, line } => Some((drv.as_str(), line.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(
        lines,
        [(A, "hello a"), (B_RESOLVED, "hello b"), (C_RESOLVED, "hello c")],
        "each line belongs to its step"
    );
    let started: Vec<&Change> =
        changes.iter().filter(|c| matches!(c, Change::Started { .. })).collect();
    assert_eq!(started.len(), 3);
}

#[test]
fn a_failure_names_the_failed_step_and_the_dependent() {
    let (t, changes) = track(FAILURE);
    let f = "/nix/store/vanbhiswp3ip1p3lavy6439kk6k3ns6h-x-f.drv";
    let g = "/nix/store/smcqqg1gblc96y4v5kgm6gy5razfsmrb-x-g.drv";
    assert_eq!(t.failed.keys().collect::<Vec<_>>(), [f]);
    assert!(t.failed[f].contains("failed with exit code 1"), "{}", t.failed[f]);
    assert!(!t.failed[f].contains('\u{1b}'), "colours stripped: {}", t.failed[f]);
    assert_eq!(t.dependents_failed.iter().collect::<Vec<_>>(), [g]);
    assert!(changes.contains(&Change::Failed { drv: f.into() }));
    assert!(changes.contains(&Change::Line { drv: f.into(), line: "failing".into() }));
}

#[test]
fn why_nothing_could_start_is_kept() {
    let (t, changes) = track(NO_MACHINE);
    assert!(changes.is_empty() && t.machines.is_empty() && t.failed.is_empty(), "{changes:?}");
    let general = t.general_errors();
    assert_eq!(general.len(), 2, "{general:?}");
    assert!(
        general[0].contains("Failed to find a machine") && general[0].contains("ca-derivations")
    );
    assert!(general[1].contains("unable to start any build"), "{}", general[1]);
    assert!(t.general_errors().iter().all(|e| !e.contains('\u{1b}')));
    let (t, _) = track(FAILURE);
    assert!(t.general_errors().is_empty(), "{:?}", t.general_errors());
}

#[test]
fn other_lines_and_garbage_are_not_events() {
    assert_eq!(parse_line("warning: plain text"), None);
    assert_eq!(parse_line("@nix {not json"), None);
    assert_eq!(parse_line(r#"@nix {"action":"start","id":1,"type":105}"#), None);
    assert_eq!(strip_ansi("\u{1b}[31;1merror:\u{1b}[0m x"), "error: x");
}
