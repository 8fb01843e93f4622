//! The rebuild planner (`build_trace::verify::plan`) on a synthetic 3-step floating-CA chain
//! (no VM): two simulated builders A and B, each with its own root and key, and a strict
//! policy that accepts only A. The middle step built by B is the one to rebuild; its dependent
//! is conditional; a bit-identical rebuild by A empties the plan, a divergent one makes the
//! dependent a rebuild of a new resolution; a step without traces leaves its dependent's
//! resolution unknown; a derivation that is not what its path names blocks the plan.

mod synthetic;

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use build_trace::evidence::{SimulatedRoot, Verifier};
use build_trace::job::{NarHash, PathInfo};
use build_trace::store::{MemoryTraces, TraceEntry};
use build_trace::trust::TrustPolicy;
use build_trace::verify::{
    Action, ClosureVerifier, DrvSet, LinkCheck, Outcome, PlanResult, RebuildPlan, Request,
};
use nix_formats::signing::SecretKey;
use nix_formats::StorePath;
use synthetic::{build, ca_path, job, policy, signed_entry, statement, Built};

struct Builder {
    root: SimulatedRoot,
    key: SecretKey,
}

struct Setup {
    a: Builder,
    b: Builder,
    built: Built,
    /// The unresolved derivations, dependencies first.
    order: Vec<StorePath>,
    /// Accepts builder A only (its simulated root; its key is named too).
    strict: TrustPolicy,
}

fn setup() -> Setup {
    let a = Builder {
        root: SimulatedRoot::generate().unwrap(),
        key: SecretKey::from_seed("builder-a-1", [1; 32]),
    };
    let b = Builder {
        root: SimulatedRoot::generate().unwrap(),
        key: SecretKey::from_seed("builder-b-1", [2; 32]),
    };
    // step-0 → step-1 → step-2 (step i depends on i−1 and i/2).
    let built = build(3, &a.root, &a.key);
    let order = built.drvs.post_order(&built.target).unwrap();
    assert_eq!(order.len(), 3);
    let strict = policy(&a.root, &a.key, "builder:sim");
    Setup { a, b, built, order, strict }
}

/// The same statement as `e`, signed by `by`.
fn resigned(e: &TraceEntry, by: &Builder) -> TraceEntry {
    let st = e.parse_statement().unwrap();
    signed_entry(&st, &by.root, &by.key, format!("{}+resigned", e.location))
}

/// Step `i`'s entries: A's, except those `change` gives.
fn traces(
    s: &Setup,
    mut change: impl FnMut(usize, &TraceEntry) -> Vec<TraceEntry>,
) -> MemoryTraces {
    let mut t = MemoryTraces::default();
    for (i, e) in s.built.entries.iter().enumerate() {
        change(i, e).into_iter().for_each(|e| t.insert(e));
    }
    t
}

fn run(s: &Setup, drvs: &DrvSet, traces: &MemoryTraces) -> (RebuildPlan, Outcome) {
    let prepared = s.strict.prepare().unwrap();
    let ev = Verifier::new();
    let v = ClosureVerifier {
        policy: &prepared,
        sources: vec![traces],
        evidence: &ev,
        now: SystemTime::now(),
        threads: 1,
    };
    let plan = v.plan_rebuild(drvs, &s.built.target).unwrap();
    let req = Request { target: s.built.target.clone(), expect: BTreeSet::new() };
    (plan, v.verify(drvs, &req).unwrap())
}

fn actions(plan: &RebuildPlan) -> Vec<Action> {
    plan.steps.iter().map(|s| s.action).collect()
}

/// The middle step, built by B: exactly it is rebuilt, its dependent is conditional; a
/// bit-identical rebuild by A empties the plan and the closure verifies.
#[test]
fn a_policy_change_in_the_middle_of_a_chain_rebuilds_that_step_only() {
    let s = setup();
    let drvs = &s.built.drvs;
    // Everything by A: nothing to rebuild.
    let (plan, outcome) = run(&s, drvs, &traces(&s, |_, e| vec![e.clone()]));
    assert_eq!(plan.result, PlanResult::Verified, "{plan}");
    assert_eq!(actions(&plan), [Action::Reuse; 3]);
    assert!(matches!(outcome, Outcome::Verified(_)));
    assert!(plan.to_string().starts_with("NOTHING TO REBUILD"), "{plan}");

    // The middle step by B only.
    let by_b = traces(&s, |i, e| vec![if i == 1 { resigned(e, &s.b) } else { e.clone() }]);
    let (plan, outcome) = run(&s, drvs, &by_b);
    assert!(matches!(outcome, Outcome::NotVerified(_)), "the strict policy refuses it");
    assert_eq!(plan.result, PlanResult::Rebuild, "{plan}");
    assert_eq!(actions(&plan), [Action::Reuse, Action::Rebuild, Action::Conditional]);
    assert_eq!(plan.rebuild, [s.order[1].to_string()]);
    assert_eq!(plan.conditional, [s.order[2].to_string()]);
    assert_eq!(plan.reused, 1);
    let middle = &plan.steps[1];
    let old = s.built.entries[1].parse_statement().unwrap();
    // Ready now: its input is reused, so its resolution is the one B built.
    let ready = plan.next_ready().expect("a step to build now");
    assert_eq!(ready.drv, s.order[1].to_string());
    let build = middle.build.as_ref().unwrap();
    assert_eq!((&build.drv_path, &build.drv), (&old.job.drv_path, &old.job.drv));
    assert_eq!(build.ca_rule, Some(old.job.ca_rule));
    assert_eq!(middle.outputs["out"], old.outputs["out"].path.to_string(), "predicted");
    assert_eq!(middle.reason.as_ref().unwrap().check, LinkCheck::Evidence);
    let last = &plan.steps[2];
    assert_eq!(last.waits_for, [s.order[1].to_string()]);
    assert_eq!(last.resolved.as_deref(), Some(s.built.entries[2].drv_path.to_string().as_str()));
    assert!(last.build.is_none());
    // The JSON form: structured values.
    let v = serde_json::to_value(&plan).unwrap();
    assert_eq!(v["result"], "rebuild");
    assert_eq!(v["rebuild"][0], s.order[1].to_string());
    assert_eq!(v["steps"][1]["action"], "rebuild");
    assert_eq!(v["steps"][1]["reason"]["check"], "evidence");
    assert_eq!(v["steps"][2]["action"], "conditional");
    assert_eq!(v["steps"][2]["waits_for"][0], s.order[1].to_string());
    let text = plan.to_string();
    assert!(text.starts_with("REBUILD 1 of 3 steps"), "{text}");
    assert!(text.contains("ready to build now") && text.contains("bit-identical"), "{text}");

    // A rebuilds it bit-identically (the same statement, now by A too): nothing left.
    let rebuilt =
        traces(
            &s,
            |i, e| {
                if i == 1 {
                    vec![resigned(e, &s.b), e.clone()]
                } else {
                    vec![e.clone()]
                }
            },
        );
    let (plan, outcome) = run(&s, drvs, &rebuilt);
    assert_eq!(plan.result, PlanResult::Verified, "{plan}");
    assert!(matches!(outcome, Outcome::Verified(_)));
}

/// A's rebuild of the middle step gives other bytes: the dependent's traces were made against
/// the old output, so it is rebuilt against the new one (ready now).
#[test]
fn a_divergent_rebuild_makes_the_dependent_a_rebuild() {
    let s = setup();
    let old = s.built.entries[1].parse_statement().unwrap();
    let first = s.built.entries[0].parse_statement().unwrap();
    let refs = BTreeSet::from([first.outputs["out"].path.clone()]);
    let (path, ca) = ca_path("step-1", b"another build", &refs);
    let info = PathInfo {
        nar_hash: NarHash::of(b"another nar"),
        nar_size: 4100,
        references: refs,
        ca: Some(ca),
    };
    let j = job("rebuild-1".into(), old.job.drv_path.clone(), old.job.drv.clone(), old.job.closure);
    let new = signed_entry(&statement(j, &path, &info), &s.a.root, &s.a.key, "rebuilt".into());
    let t = traces(
        &s,
        |i, e| {
            if i == 1 {
                vec![resigned(e, &s.b), new.clone()]
            } else {
                vec![e.clone()]
            }
        },
    );
    let (plan, _) = run(&s, &s.built.drvs, &t);
    assert_eq!(actions(&plan), [Action::Reuse, Action::Reuse, Action::Rebuild], "{plan}");
    assert_eq!(plan.steps[1].outputs["out"], path.to_string());
    let last = &plan.steps[2];
    assert!(last.ready(), "{plan}");
    assert_eq!(last.reason.as_ref().unwrap().check, LinkCheck::NoTrace);
    let resolved = last.resolved.clone().unwrap();
    assert_ne!(resolved, s.built.entries[2].drv_path.to_string(), "a new resolution");
    assert!(last.build.as_ref().unwrap().drv.input_srcs.contains(&path));
}

/// No trace of the middle step at all: it is rebuilt, and its dependent's resolution is
/// unknown until then (a rebuild, not ready).
#[test]
fn an_unbuilt_step_leaves_its_dependents_resolution_unknown() {
    let s = setup();
    let t = traces(&s, |i, e| if i == 1 { Vec::new() } else { vec![e.clone()] });
    let (plan, _) = run(&s, &s.built.drvs, &t);
    assert_eq!(actions(&plan), [Action::Reuse, Action::Rebuild, Action::Rebuild], "{plan}");
    assert!(plan.steps[1].ready() && plan.steps[1].outputs.is_empty());
    assert!(!plan.steps[2].ready() && plan.steps[2].resolved.is_none());
    assert_eq!(plan.rebuild.len(), 2);
    assert_eq!(plan.next_ready().unwrap().drv, s.order[1].to_string());
}

/// A derivation that is not the one its path names cannot be fixed by rebuilding: blocked,
/// and so is everything that depends on it.
#[test]
fn a_refused_derivation_blocks_the_plan() {
    let s = setup();
    let mut drvs = s.built.drvs.clone();
    let mut d = drvs.get(&s.order[0]).unwrap().clone();
    d.args.push("tampered".into());
    drvs.insert(s.order[0].clone(), d);
    let (plan, _) = run(&s, &drvs, &traces(&s, |_, e| vec![e.clone()]));
    assert_eq!(plan.result, PlanResult::Blocked, "{plan}");
    assert_eq!(actions(&plan), [Action::Blocked; 3]);
    assert_eq!(plan.steps[0].reason.as_ref().unwrap().check, LinkCheck::Derivation);
    assert!(plan.next_ready().is_none());
    let v = serde_json::to_value(&plan).unwrap();
    assert_eq!(v["result"], "blocked");
    let _: BTreeMap<String, serde_json::Value> = serde_json::from_value(v).unwrap();
}
