//! The closure verifier on real Nix derivations (Debian Nix 2.8 in a chroot store), simulated
//! SNP evidence, real signatures; and every tamper case of the build-trace issue.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

use build_trace::evidence::Verifier as EvidenceVerifier;
use build_trace::jws;
use build_trace::statement::{Measurement, Statement};
use build_trace::store::{MemoryTraces, TraceEntry, TraceSource, TraceStore};
use build_trace::trust::{TrustModel, TrustPolicy};
use build_trace::verify::{ClosureVerifier, DrvSet, LinkCheck, Outcome, Request};
use build_trace::{Launch, NarHash, PathInfo};
use nix_formats::signing::SecretKey;
use nix_formats::StorePath;
use test_support::nix;
use tests::fixture::{run, Fixture, Step};

fn fixture() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| Fixture::new(&["c", "ia3"]))
}

fn sim() -> TrustModel {
    TrustModel::Leaf("builder:sim".into())
}

/// Verify `target` (expecting `expect`) over the derivation graph `drvs`, with one trace source,
/// on one thread and on two and three (a fresh evidence verifier each time: no run profits from
/// another's chain cache): the outcomes, the first broken link included, must be identical.
fn verify_graph(
    drvs: &DrvSet,
    target: &StorePath,
    expect: &[&StorePath],
    policy: &TrustPolicy,
    source: &dyn TraceSource,
) -> Outcome {
    let prepared = policy.prepare().unwrap();
    let now = SystemTime::now();
    let req =
        Request { target: target.clone(), expect: expect.iter().map(|s| (*s).clone()).collect() };
    let run = |threads: usize| {
        let ev = EvidenceVerifier::new();
        let v = ClosureVerifier {
            policy: &prepared,
            sources: vec![source],
            evidence: &ev,
            now,
            threads,
        };
        v.verify(drvs, &req).unwrap()
    };
    let first = run(1);
    for threads in [2, 3] {
        assert_eq!(run(threads), first, "{threads} threads vs 1");
    }
    first
}

/// Verify the fixture's `attr` with its `.drv` files.
fn verify_with(
    fx: &Fixture,
    attr: &str,
    policy: &TrustPolicy,
    source: &dyn TraceSource,
    expect: &[&StorePath],
) -> Outcome {
    let target = &fx.drvs[attr];
    let drvs = DrvSet::from_store_dir(&fx.store_dir, target).unwrap();
    verify_graph(&drvs, target, expect, policy, source)
}

fn store(fx: &Fixture) -> TraceStore {
    TraceStore::open(&fx.traces).unwrap()
}

fn entry(
    step: &Step,
    st: &Statement,
    evidence: &build_trace::evidence::EvidenceBundle,
    keys: &[(&SecretKey, &str)],
) -> TraceEntry {
    let ev = evidence.to_json();
    TraceEntry {
        location: format!("memory:{}", step.udrv),
        drv_path: st.job.drv_path.clone(),
        statement: st.canonical_bytes().unwrap(),
        jws: keys
            .iter()
            .map(|(k, label)| jws::sign(st, Some(ev.as_bytes()), label, k).unwrap())
            .collect(),
        evidence: Some(ev.into_bytes()),
    }
}

/// The fixture's entries, with `attr`'s replaced by `replacement`.
fn traces_with(fx: &Fixture, attr: &str, replacement: TraceEntry) -> MemoryTraces {
    let mut m = MemoryTraces::default();
    for s in &fx.steps {
        if s.udrv == fx.drvs[attr] {
            m.insert(replacement.clone());
        } else {
            m.insert(entry(s, &s.statement, &s.evidence, &[(&fx.key, "simulated")]));
        }
    }
    m
}

fn broken(outcome: Outcome) -> build_trace::verify::BrokenLink {
    match outcome {
        Outcome::NotVerified(b) => b,
        Outcome::Verified(v) => panic!("unexpectedly verified:\n{v}"),
    }
}

/// The broken link of verifying `target` when `attr`'s trace is `replacement`.
fn broken_replacing(
    fx: &Fixture,
    target: &str,
    policy: &TrustPolicy,
    attr: &str,
    replacement: TraceEntry,
) -> build_trace::verify::BrokenLink {
    broken(verify_with(fx, target, policy, &traces_with(fx, attr, replacement), &[]))
}

#[test]
fn real_closure_verifies_with_the_outputs_nix_built() {
    let fx = fixture();
    let st = store(fx);
    let out = verify_with(fx, "c", &fx.policy(sim()), &st, &[]);
    let Outcome::Verified(v) = out else { panic!("{out:?}") };
    assert_eq!(v.outputs["out"], fx.outs["c"].to_string());
    // fod, a, b, c
    assert_eq!(v.steps.len(), 4, "{v}");
    assert!(v.simulated());
    // The resolved drv the verifier found equals the one Nix recorded as the output's deriver.
    let info = run(Command::new("nix")
        .args(["path-info", "--json", "--store"])
        .arg(&fx.chroot)
        .arg(fx.outs["c"].to_string()));
    let deriver = serde_json::from_str::<serde_json::Value>(&info).unwrap()[0]["deriver"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v.steps.last().unwrap().key, deriver);
    assert!(v.steps.iter().any(|s| s.accepted_by.iter().any(|b| b.starts_with("fixed-output"))));
    // Expected paths: Nix's own outputs are what the policy accepts; another path is not.
    assert!(matches!(
        verify_with(fx, "c", &fx.policy(sim()), &st, &[&fx.outs["c"]]),
        Outcome::Verified(_)
    ));
    let b = broken(verify_with(fx, "c", &fx.policy(sim()), &st, &[&fx.outs["b"]]));
    assert_eq!(b.check, LinkCheck::Expected);
    // Input-addressed steps: keyed by their own drv path, with the derivation Nix's hook sends
    // (input sources = the whole input closure, here larger than the direct inputs).
    let ia3 = &fx.step("ia3").statement;
    assert!(ia3.job.drv.input_srcs.contains(&fx.outs["ia1"]));
    let ia = verify_with(fx, "ia3", &fx.policy(sim()), &st, &[&fx.outs["ia3"]]);
    let Outcome::Verified(ia) = ia else { panic!("{ia:?}") };
    assert_eq!(
        ia.steps.iter().map(|s| s.key.clone()).collect::<Vec<_>>(),
        ["ia1", "ia2", "ia3"].map(|a| fx.drvs[a].to_string())
    );
}

#[test]
fn default_policy_rejects_simulated_evidence() {
    let fx = fixture();
    // The default policy with a manifest pinning the fixture's own measurement (its SNP one):
    // simulated evidence is still refused.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.json");
    let m = hex::encode(fx.measurement);
    std::fs::write(&manifest, format!(r#"{{"snp": {{"expected_measurement": "{m}"}}}}"#)).unwrap();
    let default = TrustPolicy::default_for(&[manifest.display().to_string()]).unwrap();
    let b = broken(verify_with(fx, "c", &default, &store(fx), &[]));
    assert_eq!(b.check, LinkCheck::Evidence, "{b}");
    assert_eq!(b.step, fx.drvs["a"].to_string(), "the first step bottom-up is named");
}

#[test]
fn keys_alone_can_satisfy_a_policy() {
    let fx = fixture();
    let policy = fx.policy(TrustModel::Leaf(format!("key:{}", fx.key.name())));
    let Outcome::Verified(v) = verify_with(fx, "c", &policy, &store(fx), &[]) else { panic!() };
    assert!(v
        .steps
        .iter()
        .all(|s| s.accepted_by.iter().any(|b| b.contains("key ") || b.contains("fixed-output"))));
}

#[test]
fn changed_output_hash_is_caught_by_report_data() {
    let fx = fixture();
    let s = fx.step("c");
    let mut st = s.statement.clone();
    st.outputs.get_mut("out").unwrap().nar_hash.0[0] ^= 1;
    let b = broken_replacing(fx, "c", &fx.policy(sim()), "c", entry(s, &st, &s.evidence, &[]));
    assert_eq!(
        (b.check, b.step.as_str()),
        (LinkCheck::Evidence, fx.drvs["c"].to_string().as_str()),
        "{b}"
    );
    assert!(
        b.explanation.contains("REPORT_DATA")
            || b.explanation.to_lowercase().contains("report data"),
        "{b}"
    );
}

#[test]
fn swapped_report_from_another_step_is_refused() {
    let fx = fixture();
    let s = fx.step("c");
    let other = &fx.step("b").evidence;
    let b = broken_replacing(fx, "c", &fx.policy(sim()), "c", entry(s, &s.statement, other, &[]));
    assert_eq!(b.check, LinkCheck::Evidence, "{b}");
    assert_eq!(b.step, fx.drvs["c"].to_string());
}

#[test]
fn replayed_report_with_other_host_data_is_refused() {
    let fx = fixture();
    let s = fx.step("c");
    // The VM was launched for another job (another launch, so another HOST_DATA); the guest
    // claims this one.
    let mut other_job = s.statement.job.clone();
    other_job.job_id.push_str("-other");
    let other = Launch::new(other_job.digest().unwrap(), 1, 2048, false).for_job(&other_job);
    let ev = fx.attest(&s.statement, other.unwrap().host_data().unwrap(), fx.measurement);
    let b = broken_replacing(fx, "c", &fx.policy(sim()), "c", entry(s, &s.statement, &ev, &[]));
    assert_eq!(b.check, LinkCheck::Evidence, "{b}");
    assert!(
        b.explanation.contains("HOST_DATA") || b.explanation.to_lowercase().contains("host data"),
        "{b}"
    );
}

/// A VM launched for job b (its launch names b's digest) cannot present job c: the statement
/// that carries b's launch with c's job is refused before any evidence is looked at, and one
/// that carries c's own launch has the wrong HOST_DATA for b's VM.
#[test]
fn one_jobs_launch_presented_for_another_job_is_refused() {
    let fx = fixture();
    let (b, c) = (fx.step("b"), fx.step("c"));
    let b_launch = Launch::new([0xb0; 32], 1, 2048, false).for_job(&b.statement.job).unwrap();
    let b_host_data = b_launch.host_data().unwrap();
    let mut st = c.statement.clone();
    st.launch = Some(b_launch);
    let ev = fx.attest(&st, b_host_data, fx.measurement);
    let broken = broken_replacing(fx, "c", &fx.policy(sim()), "c", entry(c, &st, &ev, &[]));
    assert_eq!(broken.check, LinkCheck::Statement, "{broken}");
    assert!(broken.explanation.contains("launched for job"), "{broken}");
    let ev = fx.attest(&c.statement, b_host_data, fx.measurement);
    let broken =
        broken_replacing(fx, "c", &fx.policy(sim()), "c", entry(c, &c.statement, &ev, &[]));
    assert_eq!(broken.check, LinkCheck::Evidence, "{broken}");
}

/// Every step re-made with `launch_of` (an honest guest in that launch), as trace entries.
fn relaunched(fx: &Fixture, launch_of: &dyn Fn(&Statement) -> Option<Launch>) -> MemoryTraces {
    let mut m = MemoryTraces::default();
    for s in &fx.steps {
        let mut st = s.statement.clone();
        st.launch = launch_of(&st);
        if st.launch.is_none() {
            st.v = 1;
        }
        let ev = fx.attest_honestly(&st);
        m.insert(entry(s, &st, &ev, &[]));
    }
    m
}

/// Pool VMs: launches that name no job. Distinct nonces verify; two steps with the same nonce
/// (one VM that ran two jobs) are refused, naming the other step.
#[test]
fn a_launch_nonce_carried_by_two_steps_is_refused() {
    let fx = fixture();
    let pool = |nonce: [u8; 32]| Launch::new(nonce, 1, 2048, false);
    let fresh = relaunched(fx, &|st| Some(pool(st.job.digest().unwrap())));
    assert!(matches!(verify_with(fx, "c", &fx.policy(sim()), &fresh, &[]), Outcome::Verified(_)));
    let reused = relaunched(fx, &|_| Some(pool([0x77; 32])));
    let b = broken(verify_with(fx, "c", &fx.policy(sim()), &reused, &[]));
    assert_eq!(b.check, LinkCheck::LaunchReused, "{b}");
    assert!(b.explanation.contains(&"77".repeat(32)), "{b}");
    assert!(b.explanation.contains(&fx.drvs["a"].to_string()), "names the first step: {b}");
    assert_eq!(b.step, fx.drvs["b"].to_string(), "{b}");
    // The same statement found twice (here: in two trace sources) is one step, not a reuse.
    let source_twice: [&dyn TraceSource; 2] = [&fresh, &fresh];
    let prepared = fx.policy(sim()).prepare().unwrap();
    let ev = EvidenceVerifier::new();
    let v = ClosureVerifier {
        policy: &prepared,
        sources: source_twice.to_vec(),
        evidence: &ev,
        now: SystemTime::now(),
        threads: 2,
    };
    let req = Request { target: fx.drvs["c"].clone(), expect: BTreeSet::new() };
    let drvs = DrvSet::from_store_dir(&fx.store_dir, &fx.drvs["c"]).unwrap();
    assert!(matches!(v.verify(&drvs, &req).unwrap(), Outcome::Verified(_)));
}

/// Traces made before warm pools (statement version 1: no launch, HOST_DATA = the job's
/// digest) still verify; their REPORT_DATA and HOST_DATA are checked the version-1 way.
#[test]
fn version_1_statements_still_verify() {
    let fx = fixture();
    let v1 = relaunched(fx, &|_| None);
    let out = verify_with(fx, "c", &fx.policy(sim()), &v1, &[]);
    assert!(matches!(out, Outcome::Verified(_)), "{out:?}");
    // A version-1 report whose HOST_DATA is not its job's digest is refused.
    let s = fx.step("c");
    let mut st = s.statement.clone();
    (st.v, st.launch) = (1, None);
    let ev = fx.attest(&st, [9; 32], fx.measurement);
    let b = broken_replacing(fx, "c", &fx.policy(sim()), "c", entry(s, &st, &ev, &[]));
    assert_eq!(b.check, LinkCheck::Evidence, "{b}");
    assert!(b.explanation.contains("HOST_DATA"), "{b}");
}

#[test]
fn wrong_measurement_is_refused() {
    let fx = fixture();
    let s = fx.step("b");
    // A guest image the policy does not allow, honest about it.
    let mut st = s.statement.clone();
    st.measurement = Measurement([0x43; 48]);
    let ev = fx.attest(&st, st.host_data().unwrap(), [0x43; 48]);
    let b = broken_replacing(fx, "c", &fx.policy(sim()), "b", entry(s, &st, &ev, &[]));
    assert_eq!((b.check, b.step.clone()), (LinkCheck::Evidence, fx.drvs["b"].to_string()), "{b}");
    // A statement that claims another measurement than its report shows.
    let mut policy = fx.policy(sim());
    policy.builders.get_mut("sim").unwrap().evidence.measurements = Some(
        vec![build_trace::evidence::Hex(fx.measurement), build_trace::evidence::Hex([0x43; 48])]
            .into(),
    );
    let ev = fx.attest(&s.statement, s.statement.host_data().unwrap(), [0x43; 48]);
    let b = broken_replacing(fx, "c", &policy, "b", entry(s, &s.statement, &ev, &[]));
    assert_eq!(b.check, LinkCheck::Measurement, "{b}");
}

#[test]
fn tampered_input_with_matching_claimed_hash_breaks_the_link() {
    let fx = fixture();
    let s = fx.step("c");
    let mut st = s.statement.clone();
    // The host sent a different b output and claimed its (matching) NAR hash; the guest
    // honestly attests what it got.
    let b_out = &fx.outs["b"];
    st.job.closure.get_mut(b_out).unwrap().nar_hash = NarHash::of(b"tampered bytes");
    let ev = fx.attest_honestly(&st);
    let b = broken_replacing(fx, "c", &fx.policy(sim()), "c", entry(s, &st, &ev, &[]));
    assert_eq!(b.check, LinkCheck::InputNarHash, "{b}");
    assert_eq!(b.step, fx.drvs["c"].to_string());
    assert_eq!(b.found, NarHash::of(b"tampered bytes").to_string());
}

#[test]
fn extra_unreferenced_input_path_is_refused() {
    let fx = fixture();
    let s = fx.step("c");
    let mut st = s.statement.clone();
    let extra = &fx.outs["ia1"];
    let info = fx.step("ia1").statement.outputs["out"].clone();
    st.job.closure.insert(
        extra.clone(),
        PathInfo {
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references,
            ca: None,
        },
    );
    let ev = fx.attest_honestly(&st);
    let b = broken_replacing(fx, "c", &fx.policy(sim()), "c", entry(s, &st, &ev, &[]));
    assert_eq!(b.check, LinkCheck::ExtraInput, "{b}");
    assert_eq!(b.found, extra.to_string());
}

#[test]
fn a_signer_counts_once_per_derivation() {
    let fx = fixture();
    let other = SecretKey::from_seed("other-host-1", [3; 32]);
    let mut policy = fx.policy(TrustModel::Threshold {
        threshold: 2,
        of: vec![
            TrustModel::Leaf(format!("key:{}", fx.key.name())),
            TrustModel::Leaf("key:other-host-1".into()),
        ],
    });
    policy.keys.insert("other-host-1".into(), other.public_key().to_string());
    let twice = |signers: &[(&SecretKey, &str)]| {
        let mut m = MemoryTraces::default();
        for s in &fx.steps {
            // Two entries and two signatures per step, all by the same signer(s).
            m.insert(entry(s, &s.statement, &s.evidence, signers));
            let mut again = entry(s, &s.statement, &s.evidence, signers);
            again.location.push_str("#again");
            m.insert(again);
        }
        m
    };
    let same = twice(&[(&fx.key, "simulated"), (&fx.key, "sev-snp (relabelled)")]);
    let b = broken(verify_with(fx, "c", &policy, &same, &[]));
    assert_eq!(b.check, LinkCheck::Policy, "{b}");
    let both = twice(&[(&fx.key, "simulated"), (&other, "simulated")]);
    assert!(matches!(verify_with(fx, "c", &policy, &both, &[]), Outcome::Verified(_)));
}

#[test]
fn tampered_step_deep_in_the_closure_is_named() {
    let fx = fixture();
    // Copy the real trace store and tamper with a's statement file on disk.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("traces");
    run(Command::new("cp").arg("-a").arg(&fx.traces).arg(&copy));
    let tampered_store = TraceStore::open(&copy).unwrap();
    let a = fx.step("a");
    let entries = tampered_store.entries(&a.statement.job.drv_path).unwrap();
    assert_eq!(entries.len(), 1);
    let mut st = a.statement.clone();
    st.outputs.get_mut("out").unwrap().nar_size += 1;
    let file = std::path::Path::new(&entries[0].location).join("statement.json");
    std::fs::write(&file, st.canonical_bytes().unwrap()).unwrap();
    let b = broken(verify_with(fx, "c", &fx.policy(sim()), &tampered_store, &[]));
    assert_eq!(b.step, fx.drvs["a"].to_string(), "{b}");
    assert_eq!(b.check, LinkCheck::Evidence, "{b}");
    assert!(b.to_string().contains(&fx.drvs["a"].to_string()));
}

#[test]
fn missing_trace_is_a_broken_link() {
    let fx = fixture();
    let mut m = MemoryTraces::default();
    for s in fx.steps.iter().filter(|s| s.udrv != fx.drvs["b"]) {
        m.insert(entry(s, &s.statement, &s.evidence, &[]));
    }
    let b = broken(verify_with(fx, "c", &fx.policy(sim()), &m, &[]));
    assert_eq!((b.check, b.step.clone()), (LinkCheck::NoTrace, fx.drvs["b"].to_string()));
    assert_eq!(b.key.as_deref(), Some(fx.step("b").statement.job.drv_path.to_string().as_str()));
}

#[test]
fn weak_fixed_output_hashes_are_refused_by_default() {
    let fx = fixture();
    let b = broken(verify_with(fx, "weak", &fx.policy(sim()), &store(fx), &[]));
    assert_eq!(
        (b.check, b.step.clone()),
        (LinkCheck::WeakHash, fx.drvs["fodmd5"].to_string()),
        "{b}"
    );
    let mut policy = fx.policy(sim());
    policy.fixed_output.allow_weak_hashes = true;
    // Allowed, the md5 input is fine; `weak` itself was never built, so its trace is missing.
    let b = broken(verify_with(fx, "weak", &policy, &store(fx), &[]));
    assert_eq!((b.check, b.step.clone()), (LinkCheck::NoTrace, fx.drvs["weak"].to_string()), "{b}");
}

#[test]
fn records_and_signatures_equal_what_nix_makes() {
    let fx = fixture();
    let s = fx.step("c");
    let records = build_trace::sign::step_records(&s.statement, &fx.key).unwrap();
    let rec = &records["out"];
    // Nix 2.8 registered a realisation for the resolved derivation, signed with the same key.
    let text = run(Command::new("nix")
        .args(["realisation", "info", "--json", "--store"])
        .arg(&fx.chroot)
        .arg(s.statement.job.drv_path.to_string()));
    let nix: serde_json::Value = serde_json::from_str(&text).unwrap();
    let legacy = rec.legacy.as_ref().unwrap();
    assert_eq!(nix[0]["id"].as_str().unwrap(), legacy.id.to_string());
    assert_eq!(nix[0]["outPath"].as_str().unwrap(), legacy.out_path.base_name());
    let nix_sigs: BTreeSet<&str> =
        nix[0]["signatures"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    let ours: BTreeSet<String> = legacy.signatures.iter().map(ToString::to_string).collect();
    assert!(ours.iter().all(|o| nix_sigs.contains(o.as_str())), "nix {nix_sigs:?} ours {ours:?}");
    // And the path signature (narinfo fingerprint).
    let info = run(Command::new("nix")
        .args(["path-info", "--json", "--sigs", "--store"])
        .arg(&fx.chroot)
        .arg(fx.outs["c"].to_string()));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let nix_path_sigs: BTreeSet<&str> =
        info[0]["signatures"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    assert!(
        rec.narinfo.sigs.iter().all(|g| nix_path_sigs.contains(g.to_string().as_str())),
        "{nix_path_sigs:?}"
    );
}

#[test]
fn nix_substitutes_from_the_trace_store() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let fresh = dir.path().join("store");
    let url = format!("file://{}", fx.traces.display());
    let out = nix::output(
        Command::new("nix-build")
            .arg("--store")
            .arg(&fresh)
            .arg(fx.dir.path().join("fixture.nix"))
            .args(["-A", "c", "--no-out-link", "-j", "1"])
            .args(["--option", "substituters", &url])
            .args(["--option", "trusted-public-keys", &fx.key.public_key().to_string()]),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), fx.outs["c"].to_string());
    // a, b and c came from our binary cache, with our signatures; only the fixed output was built.
    for attr in ["a", "b", "c"] {
        let p = &fx.outs[attr];
        assert!(
            log.contains(&format!("copying path '{p}' from '{url}'")),
            "{attr} not substituted:\n{log}"
        );
    }
    assert!(
        !log.contains("building '/nix/store/") || log.matches("building '").count() == 1,
        "{log}"
    );
}

#[test]
fn a_statement_for_another_derivation_is_refused() {
    let fx = fixture();
    // An input-addressed step whose statement carries a different derivation (an env var the
    // .drv does not have), honestly attested: the verifier computes the step itself.
    let s = fx.step("ia2");
    let mut st = s.statement.clone();
    st.job.drv.env.insert("EXTRA".into(), "1".into());
    let ev = fx.attest_honestly(&st);
    let b = broken_replacing(fx, "ia3", &fx.policy(sim()), "ia2", entry(s, &st, &ev, &[]));
    assert_eq!(
        (b.check, b.step.clone()),
        (LinkCheck::DerivationMismatch, fx.drvs["ia2"].to_string()),
        "{b}"
    );
    assert!(b.explanation.contains("EXTRA"), "{b}");
    // A CA step's statement for another resolution (its inputs) is looked up under another key.
    let s = fx.step("c");
    let mut st = s.statement.clone();
    st.job.drv.args.push("x".into());
    st.job.drv_path = st.job.drv.drv_path().unwrap();
    let ev = fx.attest_honestly(&st);
    let mut e = entry(s, &st, &ev, &[]);
    e.drv_path = s.statement.job.drv_path.clone();
    let b = broken_replacing(fx, "c", &fx.policy(sim()), "c", e);
    assert_eq!(b.check, LinkCheck::DerivationMismatch, "{b}");
}

#[test]
fn show_derivation_json_gives_the_same_verdict() {
    let fx = fixture();
    let json = run(Command::new("nix")
        .args(["show-derivation", "-r", "--store"])
        .arg(&fx.chroot)
        .arg(fx.drvs["c"].to_string()));
    let drvs = DrvSet::from_show_derivation(&json).unwrap();
    let from_files = DrvSet::from_store_dir(&fx.store_dir, &fx.drvs["c"]).unwrap();
    assert_eq!(drvs.len(), from_files.len());
    let out = verify_graph(&drvs, &fx.drvs["c"], &[&fx.outs["c"]], &fx.policy(sim()), &store(fx));
    assert!(matches!(out, Outcome::Verified(_)), "{out:?}");
}

#[test]
fn a_derivation_graph_whose_contents_do_not_match_its_paths_is_refused() {
    let fx = fixture();
    // Someone built (honestly attested) a variant of `c` with an extra environment variable,
    // and hands the verifier a graph that has the variant's contents under `c`'s real path.
    // Without checking that each ATerm hashes to its path, this "verifies" c as the variant.
    let real = DrvSet::from_store_dir(&fx.store_dir, &fx.drvs["c"]).unwrap();
    let mut evil = real.get(&fx.drvs["c"]).unwrap().clone();
    evil.env.insert("EXTRA".into(), "1".into());
    let mut swapped = DrvSet::new();
    for (p, d) in real.iter() {
        swapped.insert(p.clone(), if *p == fx.drvs["c"] { evil.clone() } else { d.clone() });
    }
    let s = fx.step("c");
    let mut st = s.statement.clone();
    st.job.drv.env.insert("EXTRA".into(), "1".into());
    st.job.drv_path = st.job.drv.drv_path().unwrap();
    let ev = fx.attest_honestly(&st);
    let mut traces = traces_with(fx, "c", entry(s, &s.statement, &s.evidence, &[]));
    traces.insert(entry(s, &st, &ev, &[]));
    let policy = fx.policy(sim());
    let b = broken(verify_graph(&swapped, &fx.drvs["c"], &[], &policy, &traces));
    assert_eq!((b.check, b.step.clone()), (LinkCheck::Derivation, fx.drvs["c"].to_string()), "{b}");
    assert_eq!(b.expected, fx.drvs["c"].to_string(), "{b}");
    assert!(matches!(
        verify_graph(&real, &fx.drvs["c"], &[], &policy, &traces),
        Outcome::Verified(_)
    ));
}
