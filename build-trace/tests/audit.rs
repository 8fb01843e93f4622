//! The trace-store audit, attacked as a store written before vouch checked output ownership:
//! a client's forged input-addressed derivation claims another derivation's output path, its
//! build is published first, and the genuine build that follows keeps the forged narinfo. The
//! audit finds the entry and the narinfo, `fix` withdraws them (moved, not deleted) and leaves
//! the genuine step; an input-addressed step whose unresolved derivation is not available is
//! unverifiable (withdrawn only when strict); a realisation pointing elsewhere is unproduced; a
//! deferred input-addressed step named by its unresolved derivation is resolved against the
//! store's accepted outputs and checked (it used to be refused outright).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use build_trace::job::{BasicDerivation, CaRule, Job, Limits, NarHash, PathInfo};
use build_trace::statement::{Measurement, OutputInfo, Statement};
use build_trace::store::{AuditOptions, Problem, StepRecord, TraceStore};
use nix_formats::derivation::{Derivation, DerivationOutput, DrvGraph};
use nix_formats::signing::SecretKey;
use nix_formats::StorePath;

const SRC: &str = "/nix/store/3mj0m6kd4p0w2yzkx1yvq5fgylrbshzc-busybox";

/// An input-addressed derivation named `victim` running `script`, with `input_drvs`; its output
/// path is the one its hash modulo gives in `graph`, unless `claim` forges one.
fn ia_drv(
    script: &str,
    input_drvs: &[(StorePath, Derivation)],
    graph: &mut DrvGraph,
    claim: Option<&StorePath>,
) -> (StorePath, Derivation) {
    let mut d = Derivation {
        outputs: BTreeMap::from([(
            "out".to_string(),
            DerivationOutput::InputAddressed(StorePath::from_parts([0; 20], "victim").unwrap()),
        )]),
        input_drvs: input_drvs
            .iter()
            .map(|(p, _)| (p.clone(), BTreeSet::from(["out".into()])))
            .collect(),
        input_srcs: BTreeSet::from([StorePath::parse(SRC).unwrap()]),
        platform: "x86_64-linux".into(),
        builder: format!("{SRC}/sh"),
        args: vec!["-c".into(), script.into()],
        // Nix sets `out` in the environment; hashing modulo blanks it.
        env: BTreeMap::from([("out".to_string(), String::new())]),
    };
    for (p, i) in input_drvs {
        graph.insert(p.clone(), i.clone());
    }
    let out = match claim {
        Some(p) => p.clone(),
        None => graph.input_addressed_paths(&d, "victim").unwrap().unwrap()["out"].clone(),
    };
    d.outputs.insert("out".into(), DerivationOutput::InputAddressed(out.clone()));
    d.env.insert("out".into(), out.to_string());
    let path = d.drv_path("victim").unwrap();
    (path, d)
}

/// The statement of building `drv` (at `drv_path`) with inputs `extra` resolved in, whose
/// output NAR is `nar`.
fn statement(drv_path: &StorePath, drv: &Derivation, extra: &[&str], nar: &[u8]) -> Statement {
    let mut basic = drv.clone();
    basic.input_drvs.clear();
    basic.input_srcs.extend(extra.iter().map(|p| StorePath::parse(p).unwrap()));
    let basic = BasicDerivation::from_derivation("victim", &basic).unwrap();
    let out_path = drv.outputs["out"].path().unwrap().clone();
    let job = job(drv_path, basic, extra);
    let out = OutputInfo {
        path: out_path,
        nar_hash: NarHash::of(nar),
        nar_size: nar.len() as u64,
        references: BTreeSet::new(),
        ca: None,
    };
    let outputs = BTreeMap::from([("out".to_string(), out)]);
    let launch = build_trace::Launch::new(job.digest().unwrap(), 1, 2048, job.network);
    Statement::new(launch, job, BTreeMap::new(), outputs, Measurement([7; 48]), "test")
}

/// The job of building `basic` (at `drv_path`), its closure the busybox source and `extra`.
fn job(drv_path: &StorePath, basic: BasicDerivation, extra: &[&str]) -> Job {
    let info =
        PathInfo { nar_hash: NarHash([1; 32]), nar_size: 1, references: BTreeSet::new(), ca: None };
    let closure = std::iter::once(SRC)
        .chain(extra.iter().copied())
        .map(|p| (StorePath::parse(p).unwrap(), info.clone()))
        .collect();
    Job::new(
        "job",
        drv_path.clone(),
        basic,
        closure,
        Limits::default(),
        CaRule::SelfRefPositions,
        false,
        BTreeSet::from(["out".to_string()]),
    )
}

fn publish(store: &TraceStore, dir: &Path, st: &Statement, nar: &[u8]) {
    let file = dir.join(format!("{}.nar", st.outputs["out"].nar_hash));
    std::fs::write(&file, nar).unwrap();
    let rec = StepRecord {
        statement: st,
        evidence: None,
        evidence_kind: "none",
        nars: BTreeMap::from([("out".to_string(), file)]),
    };
    store.put_step(&rec, &SecretKey::from_seed("audit-test-1", [3; 32])).unwrap();
}

fn narinfo_nar_hash(store: &TraceStore, out: &StorePath) -> Option<String> {
    let text = std::fs::read_to_string(store.narinfo_path(out)).ok()?;
    text.lines().find_map(|l| l.strip_prefix("NarHash: ")).map(str::to_owned)
}

#[test]
fn a_forged_output_path_is_found_and_withdrawn_and_the_genuine_step_stays() {
    let t = tempfile::tempdir().unwrap();
    let store = TraceStore::create(&t.path().join("cache")).unwrap();
    let mut graph = DrvGraph::new();
    let (genuine_path, genuine) = ia_drv("echo genuine > $out", &[], &mut graph, None);
    let victim = genuine.outputs["out"].path().unwrap().clone();
    let (forged_path, forged) = ia_drv("echo evil > $out", &[], &mut graph, Some(&victim));
    assert_ne!(forged_path, genuine_path);

    // The attacker's build lands first; the genuine one is kept beside it, but the narinfo for
    // the victim's path stays the attacker's (first writer wins).
    let evil = statement(&forged_path, &forged, &[], b"evil bytes");
    publish(&store, t.path(), &evil, b"evil bytes");
    let good = statement(&genuine_path, &genuine, &[], b"genuine bytes");
    publish(&store, t.path(), &good, b"genuine bytes");
    let poisoned = narinfo_nar_hash(&store, &victim).unwrap();
    assert_eq!(poisoned, NarHash::of(b"evil bytes").to_string(), "the store is poisoned");

    let mut none = |_: &StorePath| None;
    let report = store.audit(AuditOptions::default(), &mut none).unwrap();
    assert_eq!((report.entries, report.accepted), (2, 1), "{report:#?}");
    let problems: Vec<(Problem, &str)> =
        report.findings.iter().map(|f| (f.problem, f.path.as_str())).collect();
    let narinfo = format!("{}.narinfo", victim.hash_part());
    assert!(
        problems.contains(&(Problem::Unproduced, narinfo.as_str())),
        "the poisoned narinfo: {report:#?}"
    );
    let forged_entry = report
        .findings
        .iter()
        .find(|f| f.problem == Problem::NotOwned)
        .expect("the forged entry is not owned");
    assert!(forged_entry.path.contains(forged_path.base_name()), "{forged_entry:?}");
    assert!(forged_entry.detail.contains(&victim.to_string()), "{}", forged_entry.detail);
    assert!(report.withdrawn_to.is_none(), "nothing moved without fix");
    assert!(store.narinfo_path(&victim).exists());

    // Fix: withdrawn (kept in the withdrawn area), and a second audit is clean.
    let fix = AuditOptions { fix: true, strict: false };
    let report = store.audit(fix, &mut none).unwrap();
    assert!(report.findings.iter().all(|f| f.withdrawn), "{report:#?}");
    let area = report.withdrawn_to.clone().unwrap();
    assert!(area.join(&narinfo).is_file(), "moved, not deleted");
    assert!(!store.narinfo_path(&victim).exists());
    let again = store.audit(AuditOptions::default(), &mut none).unwrap();
    assert!(again.findings.is_empty(), "{again:#?}");
    assert_eq!((again.entries, again.accepted), (1, 1));
    // The genuine step is still found by its output; the forged one is not.
    let by_output = build_trace::store::TraceSource::entries_for_output(&store, &victim).unwrap();
    assert_eq!(by_output.len(), 1);
    assert_eq!(by_output[0].drv_path, genuine_path);
    // laut's index of the forged step no longer lists its signature.
    let index =
        std::fs::read_to_string(store.root().join("traces").join(forged_path.hash_part())).unwrap();
    assert_eq!(index, r#"{"signatures":[]}"#);
}

#[test]
fn steps_with_input_derivations_need_their_graph_and_are_unverifiable_without_it() {
    let t = tempfile::tempdir().unwrap();
    let store = TraceStore::create(&t.path().join("cache")).unwrap();
    let mut graph = DrvGraph::new();
    let (dep_path, dep) = ia_drv("echo dep > $out", &[], &mut graph, None);
    let dep_out = dep.outputs["out"].path().unwrap().to_string();
    let (top_path, top) =
        ia_drv("cat $dep > $out", &[(dep_path.clone(), dep.clone())], &mut graph, None);
    let st = statement(&top_path, &top, &[&dep_out], b"top");
    publish(&store, t.path(), &st, b"top");

    let mut none = |_: &StorePath| None;
    let r = store.audit(AuditOptions { fix: true, strict: false }, &mut none).unwrap();
    assert_eq!(r.accepted, 0);
    assert!(
        r.findings.iter().all(|f| f.problem == Problem::Unverifiable && !f.withdrawn),
        "{r:#?}"
    );
    assert!(r.findings.iter().any(|f| f.detail.contains(&top_path.to_string())), "{r:#?}");

    // With the graph, the step is accepted and its narinfo with it.
    let drvs = BTreeMap::from([(top_path.clone(), top.clone()), (dep_path.clone(), dep.clone())]);
    let mut some = |p: &StorePath| drvs.get(p).cloned();
    let r = store.audit(AuditOptions::default(), &mut some).unwrap();
    assert!(r.findings.is_empty() && r.accepted == 1, "{r:#?}");

    // A derivation file that is not the one its path names does not help.
    let mut tampered = top.clone();
    tampered.args.push("x".into());
    let lying = BTreeMap::from([(top_path.clone(), tampered), (dep_path, dep)]);
    let mut lie = |p: &StorePath| lying.get(p).cloned();
    let r = store.audit(AuditOptions::default(), &mut lie).unwrap();
    assert!(r.findings.iter().any(|f| f.problem == Problem::NotOwned), "{r:#?}");

    // Strict: unverifiable counts as not accepted and is withdrawn.
    let r = store.audit(AuditOptions { fix: true, strict: true }, &mut none).unwrap();
    assert!(!r.findings.is_empty() && r.findings.iter().all(|f| f.withdrawn), "{r:#?}");
    assert!(!store.narinfo_path(top.outputs["out"].path().unwrap()).exists());
}

#[test]
fn a_realisation_pointing_elsewhere_is_unproduced() {
    let t = tempfile::tempdir().unwrap();
    let store = TraceStore::create(&t.path().join("cache")).unwrap();
    let mut graph = DrvGraph::new();
    let (p, d) = ia_drv("echo x > $out", &[], &mut graph, None);
    publish(&store, t.path(), &statement(&p, &d, &[], b"x"), b"x");
    // Records no statement produced, as a hostile writer of an old store could have left them.
    let rel = "realisations/sha256:00000000000000000000000000000000000000000000000000000000000000aa!out.doi";
    std::fs::write(store.root().join(rel), r#"{"outPath":"x","signatures":[]}"#).unwrap();
    std::fs::write(store.root().join("realisations/garbage.doi"), "not json").unwrap();
    let mut none = |_: &StorePath| None;
    let r = store.audit(AuditOptions::default(), &mut none).unwrap();
    let got: BTreeSet<(Problem, String)> =
        r.findings.iter().map(|f| (f.problem, f.path.clone())).collect();
    assert_eq!(
        got,
        BTreeSet::from([
            (Problem::Unproduced, rel.to_string()),
            (Problem::Corrupt, "realisations/garbage.doi".to_string())
        ]),
        "{r:#?}"
    );
}

/// A floating-CA leaf derivation `ca` and the statement of building it to `nar` (its output
/// path from the NAR's content address, no references).
fn ca_step(nar: &[u8]) -> (StorePath, Derivation, Statement) {
    use nix_formats::derivation::CaMethod;
    let floating = DerivationOutput::Floating {
        method: CaMethod::Recursive,
        algo: nix_formats::hash::HashAlgo::Sha256,
    };
    let d = Derivation {
        outputs: BTreeMap::from([("out".to_string(), floating)]),
        input_srcs: BTreeSet::from([StorePath::parse(SRC).unwrap()]),
        platform: "x86_64-linux".into(),
        builder: format!("{SRC}/sh"),
        args: vec!["-c".into(), "echo ca > $out".into()],
        env: BTreeMap::from([(
            "out".to_string(),
            nix_formats::derivation::hash_placeholder("out"),
        )]),
        ..Default::default()
    };
    let path = d.drv_path("ca").unwrap();
    let job = job(&path, BasicDerivation::from_derivation("ca", &d).unwrap(), &[]);
    let ca = format!("fixed:r:sha256:{}", nix_formats::base32::encode(&NarHash::of(nar).0));
    let named = StorePath::from_parts([0; 20], "ca").unwrap();
    let out_path =
        build_trace::ownership::content_addressed_path(&named, &ca, &BTreeSet::new()).unwrap();
    let out = OutputInfo {
        path: out_path,
        nar_hash: NarHash::of(nar),
        nar_size: nar.len() as u64,
        references: BTreeSet::new(),
        ca: Some(ca),
    };
    let outputs = BTreeMap::from([("out".to_string(), out)]);
    let launch = build_trace::Launch::new(job.digest().unwrap(), 1, 2048, job.network);
    (path, d, Statement::new(launch, job, BTreeMap::new(), outputs, Measurement([7; 48]), "test"))
}

#[test]
fn a_deferred_step_is_resolved_against_the_stores_accepted_outputs() {
    let t = tempfile::tempdir().unwrap();
    let store = TraceStore::create(&t.path().join("cache")).unwrap();
    // The floating-CA input, built and accepted here first.
    let (ca_path, ca, ca_st) = ca_step(b"ca bytes");
    publish(&store, t.path(), &ca_st, b"ca bytes");
    let ca_out = ca_st.outputs["out"].path.clone();
    // The deferred derivation (its input by placeholder, its output empty, as Nix writes it).
    let ph = nix_formats::derivation::downstream_placeholder(&ca_path, "out").unwrap();
    let mut deferred = ca.clone();
    deferred.outputs = BTreeMap::from([("out".to_string(), DerivationOutput::Deferred)]);
    deferred.input_drvs = BTreeMap::from([(ca_path.clone(), BTreeSet::from(["out".into()]))]);
    deferred.args = vec!["-c".into(), format!("cat {ph} > $out")];
    deferred.env = BTreeMap::from([("out".to_string(), String::new())]);
    let d_path = deferred.drv_path("victim").unwrap();
    let resolved = nix_formats::resolve::resolve_with(
        &deferred,
        "victim",
        &[((ca_path.clone(), "out".to_string()), ca_out.clone())].into(),
    )
    .unwrap();
    // An honest step named by the unresolved derivation, and a forged one claiming another
    // path for the same derivation.
    let ca_str = ca_out.to_string();
    let honest = statement(&d_path, &resolved.drv, &[&ca_str], b"honest");
    publish(&store, t.path(), &honest, b"honest");
    let victim = StorePath::from_parts([4; 20], "victim").unwrap();
    let mut forged_drv = resolved.drv.clone();
    forged_drv.outputs.insert("out".into(), DerivationOutput::InputAddressed(victim.clone()));
    forged_drv.env.insert("out".into(), victim.to_string());
    publish(&store, t.path(), &statement(&d_path, &forged_drv, &[&ca_str], b"evil"), b"evil");

    let drvs = BTreeMap::from([(d_path.clone(), deferred), (ca_path.clone(), ca)]);
    let mut some = |p: &StorePath| drvs.get(p).cloned();
    let r = store.audit(AuditOptions::default(), &mut some).unwrap();
    // The CA step and the honest deferred step are accepted; the forged one is not owned,
    // with the path the resolution gives named; its narinfo is unproduced.
    assert_eq!((r.entries, r.accepted), (3, 2), "{r:#?}");
    let computed = resolved.drv.outputs["out"].path().unwrap().to_string();
    let not_owned: Vec<_> = r.findings.iter().filter(|f| f.problem == Problem::NotOwned).collect();
    assert_eq!(not_owned.len(), 1, "{r:#?}");
    assert!(not_owned[0].detail.contains(&computed), "{}", not_owned[0].detail);
    let narinfo = format!("{}.narinfo", victim.hash_part());
    assert!(r.findings.iter().any(|f| f.problem == Problem::Unproduced && f.path == narinfo));
    assert_eq!(r.findings.len(), 2, "nothing else: {r:#?}");

    // Without the accepted output of its input (the CA step withdrawn), the deferred steps are
    // unverifiable, not accepted.
    std::fs::remove_dir_all(store.root().join("build-trace-v2")).unwrap();
    let r = store.audit(AuditOptions::default(), &mut some).unwrap();
    let unverifiable = r
        .findings
        .iter()
        .filter(|f| f.problem == Problem::Unverifiable && f.detail.contains("build it first"))
        .count();
    assert_eq!(unverifiable, 2, "{r:#?}");
}
