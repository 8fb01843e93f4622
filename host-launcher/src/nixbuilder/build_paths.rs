//! `BuildPaths` and `BuildPathsWithResults`: derived paths made valid from the `.drv` closure in
//! the content store, with every output path computed by vouch. This is how a client vouch does
//! not trust builds input-addressed derivations (Nix ≥ 2.16 sends them this way to a builder
//! that says it does not trust it), and it is safe for any client.
//!
//! For an opaque path: valid in the session's view, or a failure (vouch substitutes nothing).
//!
//! For `DRV!OUTPUTS`, the algorithm:
//! 1. **Load** the `.drv` closure from the session's view into the core's
//!    [`Derivations`]: every `.drv` must be there (the client uploads it first; a `.drv` is a
//!    `text:` content-addressed path, so any client may) and its contents must hash to its path.
//! 2. **Check** it before anything is built: every derivation's step is established as the core
//!    establishes it (`crate::core::ownership`, item 1 of issue 12: input-addressed paths from
//!    the hash modulo over the graph, fixed ones from their hash, deferred ones after resolution
//!    against the outputs this host accepted); a `.drv` that declares other paths is refused,
//!    naming both. Only a missing accepted output of a floating content-addressed input is
//!    left for later (it is built below, first).
//! 3. In dependency order (inputs first), each derivation's **step** is established again (its
//!    floating inputs now built and accepted): a step whose needed outputs are valid in the
//!    view is **skipped** (input-addressed, fixed and deferred steps by their computed paths,
//!    floating ones by the output this host accepted); any other is **built** through the engine
//!    (`crate::core::Engine::build`) as the step, with the graph in the request, so the engine
//!    checks it again exactly as for every other front-end. A failed dependency fails the request
//!    (`DependencyFailed`), naming it.
//! 4. The answer is the root's result in Nix's `BuildResult` (built now, or already valid).
//!
//! One client's request, its own closure, in order: this is not a scheduler. Every failure is
//! also said in the client's log (Nix's build hook does not report `BuildPathsWithResults`
//! failures itself).
//!
//! What is not here: the wire (`crate::nixproto::worker`), the build and the path computation
//! (`crate::core`).

use std::collections::{BTreeMap, BTreeSet};

use build_trace::error_chain;
use build_trace::job::{BasicDerivation, Limits};
use build_trace::ownership::OwnershipError;
use nix_formats::StorePath;

use crate::core::ownership::{accepted_outputs, Derivations, Refusal};
use crate::core::{BuildLog, BuildRequest, CaRuleChoice, Engine, Inputs, Progress};
use crate::nixproto::{BuildResult, BuildStatus, BuiltOutput, DerivedPath};
use crate::store::StoreView;

/// What every build of one request shares.
#[derive(Debug)]
pub struct Request<'a> {
    /// The engine.
    pub engine: &'a Engine,
    /// The session's view of the content store.
    pub view: StoreView<'a>,
    /// The client's CA self-reference rule.
    pub ca_rule: CaRuleChoice,
    /// The client's limits.
    pub limits: Limits,
    /// Whether the client is trusted (carried in the core's request).
    pub trusted: bool,
}

/// The result of each derived path, in order (see the module docs).
pub fn build_paths(
    req: &Request<'_>,
    wanted: &[DerivedPath],
    log: &mut dyn BuildLog,
) -> Vec<BuildResult> {
    wanted
        .iter()
        .map(|w| {
            let result = match w {
                DerivedPath::Opaque(p) => opaque(req.view, p),
                DerivedPath::Built { drv, outputs } => realise(req, drv, outputs.as_ref(), log),
            };
            if !result.status.is_success() {
                tracing::warn!(status = ?result.status, "{}", result.error_msg);
                log.progress(&Progress::Note(result.error_msg.clone()));
            }
            result
        })
        .collect()
}

fn failure(status: BuildStatus, msg: impl Into<String>) -> BuildResult {
    BuildResult::failure(status, msg)
}

fn opaque(view: StoreView<'_>, p: &StorePath) -> BuildResult {
    match view.query_valid(&BTreeSet::from([p.clone()]), true) {
        Ok(v) if v.contains(p) => failure(BuildStatus::AlreadyValid, ""),
        Ok(_) => failure(
            BuildStatus::MiscFailure,
            format!(
                "{p} is not in vouch's content store; vouch substitutes nothing and builds \
                 derivations from their .drv closure (`DRV!OUTPUTS`)"
            ),
        ),
        Err(e) => failure(BuildStatus::MiscFailure, error_chain(&e)),
    }
}

/// The `.drv` closure of `root` from the view, as the core's graph.
fn load(view: StoreView<'_>, root: &StorePath) -> Result<Derivations, String> {
    Derivations::from_store(view, root).map_err(|e| match &e {
        Refusal::Graph { source, .. } => match &**source {
            OwnershipError::NeedsDerivation(p) => format!(
                "derivation {p} is not in vouch's content store (or is not a derivation): \
                 upload the .drv closure first (Nix's build hook does)"
            ),
            _ => error_chain(&e),
        },
        _ => error_chain(&e),
    })
}

/// Whether the core refused only because a floating content-addressed input is not built yet.
fn not_built_yet(r: &Refusal) -> bool {
    matches!(r, Refusal::Graph { source, .. } if matches!(**source, OwnershipError::NotAccepted { .. }))
}

fn realise(
    req: &Request<'_>,
    root: &StorePath,
    wanted: Option<&BTreeSet<String>>,
    log: &mut dyn BuildLog,
) -> BuildResult {
    let all = match load(req.view, root) {
        Ok(c) => c,
        Err(e) => return failure(BuildStatus::MiscFailure, e),
    };
    let status_of = |p: &StorePath| {
        if p == root {
            BuildStatus::MiscFailure
        } else {
            BuildStatus::DependencyFailed
        }
    };
    let order = all.post_order();
    let mut accepted = accepted_outputs(&req.engine.publish.trace_store);
    // Every path that follows from the graph is checked before anything is built.
    for p in &order {
        let Some(d) = all.rooted_at(p) else { continue };
        match d.step(&mut accepted) {
            Err(e) if !not_built_yet(&e) => return failure(status_of(p), error_chain(&e)),
            _ => {}
        }
    }
    for p in &order {
        let Some(d) = all.rooted_at(p) else { continue };
        // Opened again for each step: the steps built before it are accepted now.
        let mut accepted = accepted_outputs(&req.engine.publish.trace_store);
        let step = match d.step(&mut accepted) {
            Ok(s) => s,
            Err(e) => return failure(status_of(p), error_chain(&e)),
        };
        let outputs: BTreeSet<String> = match wanted {
            Some(w) if p == root => w.clone(),
            _ => step.drv.outputs.keys().cloned().collect(),
        };
        // The step's output paths where they are known before the build: computed, fixed, or
        // (floating content-addressed) accepted here before.
        let known: BTreeMap<String, StorePath> = step
            .drv
            .outputs
            .iter()
            .filter_map(|(o, x)| {
                Some((o.clone(), x.path().cloned().or_else(|| accepted(&step.drv_path, o))?))
            })
            .collect();
        let paths: BTreeSet<StorePath> =
            outputs.iter().filter_map(|o| known.get(o)).cloned().collect();
        let valid = req.view.query_valid(&paths, true).unwrap_or_default();
        if paths.len() == outputs.len() && valid == paths {
            tracing::info!(drv = %p, "already valid");
            if p == root {
                return already_valid(&known, &outputs);
            }
            continue;
        }
        let name = p.drv_name().map(str::to_owned).unwrap_or_default();
        let basic = match BasicDerivation::from_derivation(&name, &step.drv) {
            Ok(b) => b,
            Err(e) => return failure(status_of(p), format!("derivation {p}: {e}")),
        };
        let request = BuildRequest {
            drv_path: step.drv_path,
            drv: basic,
            outputs: if p == root { outputs } else { BTreeSet::new() },
            limits: req.limits,
            ca_rule: req.ca_rule.clone(),
            derivations: Some(d),
            trusted: req.trusted,
        };
        let result = req.engine.build(request, Inputs::ContentStore(req.view), log);
        match &result {
            crate::core::BuildResult::Built(_) if p == root => return (&result).into(),
            crate::core::BuildResult::Built(_) => {}
            crate::core::BuildResult::Failed(_) if p == root => return (&result).into(),
            crate::core::BuildResult::Failed(f) => {
                return failure(
                    BuildStatus::DependencyFailed,
                    format!("dependency {p} of {root} failed: {}", f.message),
                )
            }
        }
    }
    failure(BuildStatus::MiscFailure, format!("{root} was not built (empty closure)"))
}

fn already_valid(outs: &BTreeMap<String, StorePath>, wanted: &BTreeSet<String>) -> BuildResult {
    let mut r = failure(BuildStatus::AlreadyValid, "");
    r.built_outputs = outs
        .iter()
        .filter(|(o, _)| wanted.contains(*o))
        .map(|(o, p)| {
            let out =
                BuiltOutput { out_path: p.clone(), signatures: BTreeSet::new(), legacy: None };
            (o.clone(), out)
        })
        .collect();
    r
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use build_trace::job::Limits;
    use nix_formats::derivation::{Derivation, DerivationOutput, DrvGraph};
    use nix_formats::nar::NarWriter;
    use nix_formats::store_path::make_output_path;
    use nix_formats::Hash;

    use super::*;
    use crate::core::ValidPathInfo;
    use crate::nixbuilder::request;
    use crate::nixproto::BuildMode;
    use crate::store::{ClientTrust, ContentStore, SessionStore, StoreConfig, UPLOAD_RULES};

    fn nar_of(contents: &[u8]) -> Vec<u8> {
        let mut w = NarWriter::new(Vec::new()).unwrap();
        w.regular(false, contents).unwrap();
        w.into_inner()
    }

    /// An input-addressed derivation `name` with `inputs` (drv → outputs), its output path
    /// computed as Nix computes it, and its `.drv` path.
    fn ia(name: &str, graph: &mut DrvGraph, inputs: &[&StorePath]) -> (StorePath, Derivation) {
        let mut d = Derivation {
            outputs: BTreeMap::from([("out".to_string(), DerivationOutput::Deferred)]),
            input_drvs: inputs
                .iter()
                .map(|i| ((*i).clone(), BTreeSet::from(["out".into()])))
                .collect(),
            platform: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            args: vec!["-c".into(), format!("echo {name} > $out")],
            env: BTreeMap::from([("out".to_string(), String::new())]),
            ..Derivation::default()
        };
        let h = graph.hash_modulo(&d, name, true).unwrap();
        let out = make_output_path("out", &Hash::sha256(*h.get("out").unwrap()), name).unwrap();
        d.outputs.insert("out".into(), DerivationOutput::InputAddressed(out.clone()));
        d.env.insert("out".into(), out.to_string());
        let p = d.drv_path(name).unwrap();
        graph.insert(p.clone(), d.clone());
        (p, d)
    }

    /// A `.drv` as a client uploads it: a text content-addressed path.
    fn drv_upload(p: &StorePath, d: &Derivation) -> (ValidPathInfo, Vec<u8>) {
        let aterm = d.to_aterm();
        let nar = nar_of(&aterm);
        let ca = nix_formats::content_address::ContentAddress::from_parts(
            nix_formats::content_address::ContentAddressMethod::Text,
            Hash::sha256(nix_formats::hash::sha256(&aterm)),
        );
        let info = ValidPathInfo {
            path: p.clone(),
            info: build_trace::PathInfo {
                nar_hash: build_trace::NarHash::of(&nar),
                nar_size: nar.len() as u64,
                references: d.references(),
                ca: Some(ca.to_string()),
            },
            deriver: None,
            registration_time: 0,
            ultimate: false,
            sigs: BTreeSet::new(),
        };
        (info, nar)
    }

    /// Uploads from memory.
    struct Mem(Vec<(ValidPathInfo, Vec<u8>)>, std::io::Cursor<Vec<u8>>);

    impl crate::core::UploadSource for Mem {
        fn next_path(&mut self) -> Result<Option<ValidPathInfo>, crate::core::UploadError> {
            if self.0.is_empty() {
                return Ok(None);
            }
            let (i, nar) = self.0.remove(0);
            self.1 = std::io::Cursor::new(nar);
            Ok(Some(i))
        }
        fn nar(&mut self) -> &mut dyn std::io::Read {
            &mut self.1
        }
    }

    /// The derivations the engine was asked to build, in order.
    #[derive(Default)]
    struct Started(Vec<StorePath>, Vec<String>);

    impl BuildLog for Started {
        fn started(&mut self, drv: &StorePath) {
            self.0.push(drv.clone());
        }
        fn output(&mut self, _: &[u8]) {}
        fn progress(&mut self, p: &Progress) {
            self.1.push(p.text());
        }
    }

    fn run(dir: &std::path::Path, store: &SessionStore, w: DerivedPath) -> (BuildResult, Started) {
        let engine = crate::core::engine::tests::engine(dir);
        let req = Request {
            engine: &engine,
            view: store.view(),
            ca_rule: CaRuleChoice::guessed("test", "none"),
            limits: Limits::default(),
            trusted: false,
        };
        let mut log = Started::default();
        let mut r = build_paths(&req, &[w], &mut log);
        (r.remove(0), log)
    }

    #[test]
    fn an_input_addressed_closure_is_built_in_order_at_the_paths_vouch_computes() {
        let d = tempfile::tempdir().unwrap();
        let untrusted = || {
            let shared = ContentStore::open(&d.path().join("store"), StoreConfig::default());
            SessionStore::new(shared.unwrap(), ClientTrust::default()).unwrap()
        };
        let mut graph = DrvGraph::new();
        let (dep, dep_drv) = ia("dep", &mut graph, &[]);
        let (top, top_drv) = ia("top", &mut graph, &[&dep]);
        let built = |p: &StorePath| DerivedPath::Built { drv: p.clone(), outputs: None };

        // Without the .drv closure: refused, naming the missing derivation.
        let s = untrusted();
        let (r, _) = run(d.path(), &s, built(&top));
        assert!(r.error_msg.contains("upload the .drv closure first"), "{}", r.error_msg);
        // An untrusted client may upload .drv files (text content addresses); then the
        // dependency is built first, the top never (the engine has no VM image here).
        let uploads = vec![drv_upload(&dep, &dep_drv), drv_upload(&top, &top_drv)];
        s.add(&mut Mem(uploads, Default::default()), UPLOAD_RULES).unwrap();
        let (r, log) = run(d.path(), &s, built(&top));
        assert_eq!(r.status, BuildStatus::DependencyFailed, "{}", r.error_msg);
        assert!(r.error_msg.contains(&format!("dependency {dep}")), "{}", r.error_msg);
        assert_eq!(log.0, vec![dep.clone()]);
        assert!(log.1.iter().any(|l| l.contains("DependencyFailed") || l.contains("failed")));

        // A .drv that declares another output path than its derivation gives is refused before
        // any build, naming both paths.
        let mut lying = top_drv.clone();
        let wrong = StorePath::from_parts([3; 20], "top").unwrap();
        lying.outputs.insert("out".into(), DerivationOutput::InputAddressed(wrong.clone()));
        let lying_path = lying.drv_path("top").unwrap();
        s.add(&mut Mem(vec![drv_upload(&lying_path, &lying)], Default::default()), UPLOAD_RULES)
            .unwrap();
        let (r, log) = run(d.path(), &s, built(&lying_path));
        assert_eq!(r.status, BuildStatus::MiscFailure);
        let want = graph.input_addressed_paths(&top_drv, "top").unwrap().unwrap()["out"].clone();
        assert!(
            r.error_msg.contains(&wrong.to_string()) && r.error_msg.contains(&want.to_string())
        );
        assert!(log.0.is_empty(), "{:?}", log.0);

        // With dep's output valid (built by vouch before: registered in the shared store), top
        // is built next, under its own .drv path, at the path vouch computed.
        let dep_out = graph.input_addressed_paths(&dep_drv, "dep").unwrap().unwrap()["out"].clone();
        let nar = nar_of(b"dep");
        let mut info = drv_upload(&dep, &dep_drv).0;
        info.path = dep_out.clone();
        info.info = build_trace::PathInfo {
            nar_hash: build_trace::NarHash::of(&nar),
            nar_size: nar.len() as u64,
            references: BTreeSet::new(),
            ca: None,
        };
        let shared = ContentStore::open(&d.path().join("store"), StoreConfig::default()).unwrap();
        let built_before = Mem(vec![(info, nar)], Default::default());
        shared.add(&mut { built_before }, UPLOAD_RULES, crate::store::Origin::Build).unwrap();
        let s = untrusted();
        let (r, log) = run(d.path(), &s, built(&top));
        assert_eq!(log.0, vec![top.clone()], "{}", r.error_msg);
        assert!(r.error_msg.starts_with("vouch: "), "the engine's failure: {}", r.error_msg);
        // An opaque path is valid or not; dep's .drv output spec `dep!out` is already valid.
        let (r, log) = run(d.path(), &s, DerivedPath::Opaque(dep_out.clone()));
        assert_eq!(r.status, BuildStatus::AlreadyValid);
        let only_out = Some(BTreeSet::from(["out".to_string()]));
        let (r, _) = run(d.path(), &s, DerivedPath::Built { drv: dep.clone(), outputs: only_out });
        assert_eq!(r.status, BuildStatus::AlreadyValid);
        assert_eq!(r.built_outputs["out"].out_path, dep_out);
        assert!(log.0.is_empty());
    }

    #[test]
    fn derived_paths_parse_as_every_nix_writes_them() {
        let drv = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-top.drv";
        let p = StorePath::parse(drv).unwrap();
        let all = DerivedPath::Built { drv: p.clone(), outputs: None };
        assert_eq!(DerivedPath::parse(&format!("{drv}!*")).unwrap(), all);
        assert_eq!(DerivedPath::parse(&format!("{drv}^*")).unwrap(), all);
        let two = Some(BTreeSet::from(["dev".to_string(), "out".to_string()]));
        assert_eq!(
            DerivedPath::parse(&format!("{drv}^out,dev")).unwrap(),
            DerivedPath::Built { drv: p.clone(), outputs: two }
        );
        assert_eq!(DerivedPath::parse(drv).unwrap(), DerivedPath::Opaque(p));
        let not_drv = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-top!out";
        assert!(DerivedPath::parse(not_drv).unwrap_err().contains("not a derivation"));
        assert!(DerivedPath::parse(&format!("{drv}!")).is_err());
    }

    /// What Nix 2.8's build hook sends a trusted builder for `drv` (`BuildDerivation`: the
    /// basic derivation, input derivations' outputs as input sources), as admitted.
    fn hook_request(p: &StorePath, d: &Derivation, outputs: &[StorePath]) -> request::Admitted {
        let mut flat = d.clone();
        flat.input_drvs.clear();
        flat.input_srcs.extend(outputs.iter().cloned());
        let basic =
            build_trace::job::BasicDerivation::from_derivation(p.drv_name().unwrap(), &flat);
        let client = crate::nixproto::ClientProfile::new(
            crate::nixproto::Protocol::Worker,
            0x122,
            Default::default(),
        );
        let d = crate::nixproto::BuildDerivation {
            drv_path: p.clone(),
            drv: basic.unwrap(),
            mode: BuildMode::Normal,
            options: None,
            client,
        };
        request::core_request(d, None, 1, true).unwrap()
    }

    #[test]
    fn a_trusted_build_derivation_whose_drv_closure_is_here_is_checked_against_it() {
        let d = tempfile::tempdir().unwrap();
        let shared = ContentStore::open(&d.path().join("store"), StoreConfig::default()).unwrap();
        let s = SessionStore::new(shared, ClientTrust { trusted: true, keys: Vec::new() }).unwrap();
        let mut graph = DrvGraph::new();
        let (dep, dep_drv) = ia("dep", &mut graph, &[]);
        let (top, top_drv) = ia("top", &mut graph, &[&dep]);
        let dep_out = graph.input_addressed_paths(&dep_drv, "dep").unwrap().unwrap()["out"].clone();
        // Without its .drv closure here: built as given, its outputs private to the session.
        let a = request::with_stored_graph(
            hook_request(&top, &top_drv, std::slice::from_ref(&dep_out)),
            s.view(),
        );
        assert!(a.private_outputs && a.request.derivations.is_none());
        // With it (uploaded text-addressed, as the CI service's clients do): its graph, its paths
        // computed by vouch, its outputs shared.
        let uploads = vec![drv_upload(&dep, &dep_drv), drv_upload(&top, &top_drv)];
        s.add(&mut Mem(uploads, Default::default()), UPLOAD_RULES).unwrap();
        let a = request::with_stored_graph(
            hook_request(&top, &top_drv, std::slice::from_ref(&dep_out)),
            s.view(),
        );
        assert!(!a.private_outputs && a.request.derivations.is_some());
        let kind = build_trace::job::StepKind::InputAddressed;
        crate::core::ownership::check(&a.request, kind, &mut |_, _| None).unwrap();
        // A stored .drv that declares another path than its graph gives: refused by the core.
        let mut lying = top_drv.clone();
        let wrong = StorePath::from_parts([3; 20], "top").unwrap();
        lying.outputs.insert("out".into(), DerivationOutput::InputAddressed(wrong.clone()));
        lying.env.insert("out".into(), wrong.to_string());
        let lying_path = lying.drv_path("top").unwrap();
        s.add(&mut Mem(vec![drv_upload(&lying_path, &lying)], Default::default()), UPLOAD_RULES)
            .unwrap();
        let a = request::with_stored_graph(hook_request(&lying_path, &lying, &[dep_out]), s.view());
        let refused = crate::core::ownership::check(&a.request, kind, &mut |_, _| None);
        let msg = build_trace::error_chain(&refused.unwrap_err());
        assert!(msg.contains(&wrong.to_string()), "{msg}");
    }
}
