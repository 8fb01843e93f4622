//! The closure verifier on several threads gives exactly the sequential outcome — the verified
//! steps, or the first broken link with its check, entry and expectation — on a synthetic
//! closure with tampered, missing, divergent and misleading trace entries.

mod synthetic;

use std::collections::BTreeSet;

use build_trace::evidence::SimulatedRoot;
use build_trace::statement::Statement;
use build_trace::store::{MemoryTraces, TraceEntry};
use build_trace::trust::TrustPolicy;
use build_trace::verify::{BrokenLink, LinkCheck, Outcome, Request};
use nix_formats::signing::SecretKey;
use synthetic::{build, policy, signed_entry, verify_on_threads, Built};

const STEPS: usize = 120;

struct Setup {
    root: SimulatedRoot,
    key: SecretKey,
    built: Built,
}

fn setup() -> Setup {
    let root = SimulatedRoot::generate().unwrap();
    let key = SecretKey::from_seed("parallel-1", [7; 32]);
    let built = build(STEPS, &root, &key);
    Setup { root, key, built }
}

/// Verify with 1, 2, 3 and 8 threads; all outcomes must be equal. Returns it.
fn verify(s: &Setup, traces: &MemoryTraces, policy: &TrustPolicy) -> Outcome {
    let req = Request { target: s.built.target.clone(), expect: BTreeSet::new() };
    verify_on_threads(&s.built.drvs, &req, policy, traces, &[1, 2, 3, 8])
}

/// The entries of every step, with `change` applied to the list of step `i`'s entries.
fn traces(s: &Setup, mut change: impl FnMut(usize, &mut Vec<TraceEntry>)) -> MemoryTraces {
    let mut t = MemoryTraces::default();
    for (i, e) in s.built.entries.iter().enumerate() {
        let mut list = vec![e.clone()];
        change(i, &mut list);
        list.into_iter().for_each(|e| t.insert(e));
    }
    t
}

fn broken(o: Outcome) -> BrokenLink {
    match o {
        Outcome::NotVerified(b) => b,
        Outcome::Verified(v) => panic!("verified {} steps", v.steps.len()),
    }
}

fn statement(e: &TraceEntry) -> Statement {
    e.parse_statement().unwrap()
}

#[test]
fn honest_closure_verifies_identically_on_any_thread_count() {
    let s = setup();
    let all = traces(&s, |_, _| {});
    for require in ["builder:sim".to_string(), format!("key:{}", s.key.name())] {
        match verify(&s, &all, &policy(&s.root, &s.key, &require)) {
            Outcome::Verified(v) => assert_eq!(v.steps.len(), STEPS),
            Outcome::NotVerified(b) => panic!("{b}"),
        }
    }
}

#[test]
fn the_first_broken_link_is_the_sequential_one() {
    let s = setup();
    let attested = policy(&s.root, &s.key, "builder:sim");
    let keyed = policy(&s.root, &s.key, &format!("key:{}", s.key.name()));
    let step_key = |i: usize| s.built.entries[i].drv_path.clone();

    // Several broken steps: the earliest in the walk is named, whatever the workers reached.
    let t = traces(&s, |i, list| match i {
        40 => list[0].statement.insert(0, b' '), // not canonical
        70 => list.clear(),                      // no trace
        100 => list[0].evidence = s.built.entries[99].evidence.clone(), // another step's report
        _ => {}
    });
    let b = broken(verify(&s, &t, &attested));
    assert_eq!(
        (b.check, b.key.clone()),
        (LinkCheck::Statement, Some(step_key(40).to_string())),
        "{b}"
    );

    // Without step 40's damage the missing trace of step 70 is next.
    let t = traces(&s, |i, list| match i {
        70 => list.clear(),
        100 => list[0].evidence = s.built.entries[99].evidence.clone(),
        _ => {}
    });
    let b = broken(verify(&s, &t, &attested));
    assert_eq!(
        (b.check, b.key.clone()),
        (LinkCheck::NoTrace, Some(step_key(70).to_string())),
        "{b}"
    );

    // A report from another step fails the builder rule; the JWS still counts, for a policy
    // that asks for the key.
    let t = traces(&s, |i, list| {
        if i == 100 {
            list[0].evidence = s.built.entries[99].evidence.clone()
        }
    });
    let b = broken(verify(&s, &t, &attested));
    assert_eq!(
        (b.check, b.key.clone()),
        (LinkCheck::Policy, Some(step_key(100).to_string())),
        "{b}"
    );
    assert!(matches!(verify(&s, &t, &keyed), Outcome::Verified(_)));

    // An entry failing two ways reports the ordered pass's check first: step 31's statement
    // under step 32's key, with a broken JWS, is a derivation mismatch.
    let t = traces(&s, |i, list| {
        if i == 32 {
            let mut e = s.built.entries[31].clone();
            e.drv_path = step_key(32);
            e.jws = vec!["not.a.jws".into()];
            *list = vec![e];
        }
    });
    let b = broken(verify(&s, &t, &keyed));
    assert_eq!(b.check, LinkCheck::DerivationMismatch, "{b}");
}

#[test]
fn divergent_and_misleading_entries_give_the_sequential_outcome() {
    let s = setup();
    let attested = policy(&s.root, &s.key, "builder:sim");
    // Step 50 has a second, validly signed build with another NAR hash for the same path: both
    // are accepted, and step 51's link check takes either.
    let mut other = statement(&s.built.entries[50]);
    other.outputs.get_mut("out").unwrap().nar_size += 1;
    // A second build is a second VM: its own launch (one nonce for both is one VM that ran two
    // jobs, which the verifier refuses: `LinkCheck::LaunchReused`).
    other.launch = Some(build_trace::Launch::new([0xd1; 32], 1, 2048, false));
    let divergent = signed_entry(&other, &s.root, &s.key, "divergent:50".into());
    // Step 60 has an entry claiming another output path, with no valid signer: the look-ahead
    // guesses a second map for it and plans steps that the ordered pass never reaches.
    let mut liar = statement(&s.built.entries[60]);
    let fake = s.built.entries[61].parse_statement().unwrap().outputs["out"].path.clone();
    liar.outputs.get_mut("out").unwrap().path = fake;
    let mut misleading = signed_entry(&liar, &s.root, &s.key, "misleading:60".into());
    misleading.evidence = s.built.entries[59].evidence.clone();
    misleading.jws.clear();
    let t = traces(&s, |i, list| match i {
        50 => list.push(divergent.clone()),
        60 => list.push(misleading.clone()),
        _ => {}
    });
    match verify(&s, &t, &attested) {
        Outcome::Verified(v) => assert_eq!(v.steps.len(), STEPS + 1, "step 50 twice"),
        Outcome::NotVerified(b) => panic!("{b}"),
    }
    // The divergent build alone under step 51: its input's facts were never accepted.
    let t = traces(&s, |i, list| {
        if i == 50 {
            *list = vec![divergent.clone()];
        }
    });
    let b = broken(verify(&s, &t, &attested));
    assert_eq!(b.check, LinkCheck::InputNarHash, "{b}");
}
