//! Which output paths a request may have vouch sign: the engine's rule, applied before any VM
//! starts, and what front-ends need to follow it.
//!
//! The rule ([`check`]), for a [`BuildRequest`]:
//! 1. **With the unresolved derivation graph** ([`BuildRequest::derivations`]): the step is
//!    established from it (`build_trace::ownership::establish`): input-addressed output paths
//!    are computed from the hash modulo, as Nix's `checkDerivationOutputs` computes them; a
//!    deferred derivation (an input is floating CA) is resolved against the outputs this host
//!    accepted ([`accepted_outputs`]: its trace store's published build-trace entries), and its
//!    paths are `makeOutputPath` of the resolution, as Nix's `rewriteDerivation` makes them. The
//!    request must name that step (its drv path: the resolved one where Nix resolves) and ask
//!    for exactly its basic derivation; otherwise it is refused **whoever asks**. A trusted
//!    caller is trusted for what vouch cannot check, not against what it disproves: the graph
//!    shows the paths belong to another derivation, so a narinfo signed for them would be false
//!    for every client of the cache (and Nix refuses such a `.drv` from anyone: "has incorrect
//!    output").
//! 2. **Without a graph**: a content-addressed step needs none (its output paths follow from
//!    its bytes, which the guest and the launcher check); an input-addressed step is built as
//!    given only for a trusted caller, as Nix accepts input-addressed `BuildDerivation`s only
//!    from `trusted-users`, and refused for anyone else with the rule named.
//!
//! Front-ends load a graph with [`Derivations::from_store`] (the `.drv` closure a client
//! uploaded to the content store) or [`Derivations::load`], and make the request from
//! [`Derivations::step`]: what the derivation builds as.
//!
//! What is not here: the computation itself (`build_trace::ownership`), what a divergent build
//! of an owned path publishes (`super::publish`).

use std::collections::BTreeSet;
use std::path::Path;

use build_trace::job::StepKind;
use build_trace::ownership::{self, Accepted, OwnershipError, Step};
use build_trace::store::TraceStore;
use nix_formats::derivation::{Derivation, DerivationKind, DrvGraph};
use nix_formats::StorePath;

use super::request::BuildRequest;
use crate::store::{drv_contents, StoreView};

/// An unresolved derivation and every input derivation it needs, each checked to hash to its
/// path.
#[derive(Debug, Clone)]
pub struct Derivations {
    drv_path: StorePath,
    graph: DrvGraph,
}

impl PartialEq for Derivations {
    fn eq(&self, other: &Self) -> bool {
        self.drv_path == other.drv_path && self.graph.iter().eq(other.graph.iter())
    }
}

impl Eq for Derivations {}

impl Derivations {
    /// `drv_path` and its input derivations, transitively, as `drvs` gives them.
    pub fn load(
        drv_path: &StorePath,
        drvs: &mut dyn FnMut(&StorePath) -> Option<Derivation>,
    ) -> Result<Derivations, Refusal> {
        let graph = ownership::load_graph(drv_path, drvs).map_err(|e| refusal(drv_path, e))?;
        Ok(Derivations { drv_path: drv_path.clone(), graph })
    }

    /// `drv_path` and its input derivations from a view of the content store (where clients
    /// upload them with `nix copy --derivation`).
    pub fn from_store(store: StoreView<'_>, drv_path: &StorePath) -> Result<Derivations, Refusal> {
        Self::load(drv_path, &mut |p| {
            let (_, file) = store.open_nar(p).ok()??;
            Derivation::from_aterm(&drv_contents(file).ok()?).ok()
        })
    }

    /// The unresolved derivation's path.
    pub fn drv_path(&self) -> &StorePath {
        &self.drv_path
    }

    /// Every derivation of the graph, each after the input derivations it uses (a depth-first
    /// post-order from the root; iterative, so a deep graph cannot overflow the stack).
    pub fn post_order(&self) -> Vec<StorePath> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![(self.drv_path.clone(), false)];
        while let Some((p, inputs_done)) = stack.pop() {
            if inputs_done {
                order.push(p);
                continue;
            }
            if !seen.insert(p.clone()) {
                continue;
            }
            stack.push((p.clone(), true));
            if let Some(d) = self.graph.get(&p) {
                let inputs = d.input_drvs.keys().filter(|i| !seen.contains(*i));
                stack.extend(inputs.map(|i| (i.clone(), false)));
            }
        }
        order
    }

    /// The same graph, rooted at `drv_path` (one of its derivations, else `None`): what that
    /// input derivation builds as, computed from the same graph.
    pub fn rooted_at(&self, drv_path: &StorePath) -> Option<Derivations> {
        self.graph.get(drv_path)?;
        Some(Derivations { drv_path: drv_path.clone(), graph: self.graph.clone() })
    }

    /// Every derivation of the graph (unordered).
    pub fn derivations(&self) -> impl Iterator<Item = (&StorePath, &Derivation)> {
        self.graph.iter()
    }

    /// The kind of every derivation of the graph, in [`Derivations::post_order`], after the
    /// checks that need no build: an input-addressed derivation must declare the output paths
    /// its hash modulo gives (as Nix's `checkDerivationOutputs`), and a deferred one none (Nix
    /// computes them after resolution). Refused otherwise, whoever asks.
    pub fn kinds(&self) -> Result<Vec<(StorePath, DerivationKind)>, Refusal> {
        let mut graph = self.graph.clone();
        let mut out = Vec::new();
        for p in self.post_order() {
            let d = self.graph.get(&p).cloned().ok_or_else(|| {
                refusal(&self.drv_path, OwnershipError::NeedsDerivation(p.clone()))
            })?;
            let name = p.drv_name().map_err(|e| {
                refusal(&p, OwnershipError::Mismatch { drv: p.clone(), problem: e.to_string() })
            })?;
            let kind = d.kind(name).map_err(|source| {
                refusal(&p, OwnershipError::Derivation { drv: p.to_string(), source })
            })?;
            match kind {
                DerivationKind::InputAddressed => {
                    ownership::owned_paths(&p, &d, name, &mut graph).map_err(|e| refusal(&p, e))?;
                }
                DerivationKind::Deferred => {
                    if let Some((output, o)) = d.outputs.iter().find(|(_, o)| o.path().is_some()) {
                        let claimed = o.path().cloned().unwrap_or_else(|| p.clone());
                        let e = OwnershipError::Deferred {
                            drv: p.clone(),
                            output: output.clone(),
                            claimed,
                        };
                        return Err(refusal(&p, e));
                    }
                }
                _ => {}
            }
            out.push((p, kind));
        }
        Ok(out)
    }

    /// What it builds as, with floating content-addressed inputs resolved to `accepted`.
    pub fn step(&self, accepted: &mut Accepted<'_>) -> Result<Step, Refusal> {
        ownership::establish(&self.drv_path, &mut self.graph.clone(), accepted)
            .map_err(|e| refusal(&self.drv_path, e))
    }
}

/// Why a request may not have its outputs signed (nothing is built or registered).
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The derivation graph does not give the request's step (it is incomplete, or shows other
    /// output paths or another step).
    #[error("vouch refuses to build {drv}")]
    Graph {
        /// The unresolved derivation.
        drv: StorePath,
        /// What the graph shows.
        #[source]
        source: Box<OwnershipError>,
    },
    /// An input-addressed step without a graph, from a caller the operator does not trust.
    #[error(
        "{drv} is input-addressed and the request carries no derivation graph to compute its \
         output paths from; only callers the operator trusts (Nix's trusted-users, the CI \
         service's --trusted-token-file) may build input-addressed derivations as given"
    )]
    Untrusted {
        /// The derivation.
        drv: StorePath,
    },
}

fn refusal(drv: &StorePath, e: OwnershipError) -> Refusal {
    Refusal::Graph { drv: drv.clone(), source: Box::new(e) }
}

/// The outputs this host accepted for floating content-addressed derivations: the published
/// build-trace entries of the trace store at `dir` (none while it does not exist).
pub fn accepted_outputs(dir: &Path) -> impl FnMut(&StorePath, &str) -> Option<StorePath> {
    let store = TraceStore::open(dir).ok();
    move |drv, output| store.as_ref()?.published_output(drv, output)
}

/// The rule (see the module docs) for a request whose step is of `kind`.
pub fn check(
    req: &BuildRequest,
    kind: StepKind,
    accepted: &mut Accepted<'_>,
) -> Result<(), Refusal> {
    let Some(derivations) = &req.derivations else {
        if kind == StepKind::InputAddressed && !req.trusted {
            return Err(Refusal::Untrusted { drv: req.drv_path.clone() });
        }
        return Ok(());
    };
    let refuse = |e| refusal(&derivations.drv_path, e);
    let step = derivations.step(accepted)?;
    if step.drv_path != req.drv_path {
        return Err(refuse(OwnershipError::Mismatch {
            drv: derivations.drv_path.clone(),
            problem: format!(
                "it builds as {}, but the request names {}",
                step.drv_path, req.drv_path
            ),
        }));
    }
    let basic = req.drv.to_derivation().map_err(|e| {
        refuse(OwnershipError::Malformed { output: "*".into(), problem: e.to_string() })
    })?;
    ownership::check_step(&basic, &step).map_err(refuse)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use build_trace::job::{BasicDerivation, Limits};
    use nix_formats::derivation::{CaMethod, DerivationOutput};
    use nix_formats::hash::HashAlgo;

    use super::*;
    use crate::core::request::{test_derivation, CaRuleChoice};

    /// A derivation named `name` running `script` with `inputs` (each `out`); `out` is filled
    /// in by the caller.
    fn drv(script: &str, inputs: &[&StorePath], out: DerivationOutput) -> Derivation {
        let mut d = test_derivation("x").to_derivation().unwrap();
        d.outputs.insert("out".into(), out);
        d.input_drvs =
            inputs.iter().map(|p| ((*p).clone(), BTreeSet::from(["out".into()]))).collect();
        d.args = vec!["-c".into(), script.into()];
        d.env.insert("out".into(), String::new());
        d
    }

    /// `d` (named `name`) with its input-addressed output at its computed path in `graph`,
    /// or at `claim`; stored in `graph` under its drv path, which is returned.
    fn ia(
        name: &str,
        mut d: Derivation,
        graph: &mut DrvGraph,
        claim: Option<&StorePath>,
    ) -> StorePath {
        // Masked when hashing: any path does.
        let any = StorePath::from_parts([0; 20], name).unwrap();
        d.outputs.insert("out".into(), DerivationOutput::InputAddressed(any));
        let out = match claim {
            Some(p) => p.clone(),
            None => graph.input_addressed_paths(&d, name).unwrap().unwrap()["out"].clone(),
        };
        d.outputs.insert("out".into(), DerivationOutput::InputAddressed(out.clone()));
        d.env.insert("out".into(), out.to_string());
        let p = d.drv_path(name).unwrap();
        graph.insert(p.clone(), d);
        p
    }

    fn request(drv_path: &StorePath, d: &Derivation, name: &str) -> BuildRequest {
        BuildRequest {
            drv_path: drv_path.clone(),
            drv: BasicDerivation::from_derivation(name, d).unwrap(),
            outputs: Default::default(),
            limits: Limits::default(),
            ca_rule: CaRuleChoice::guessed("nothing says", "say it"),
            derivations: None,
            trusted: false,
        }
    }

    fn with_graph(mut req: BuildRequest, target: &StorePath, graph: &DrvGraph) -> BuildRequest {
        let mut get = |p: &StorePath| graph.get(p).cloned();
        req.derivations = Some(Derivations::load(target, &mut get).unwrap());
        req
    }

    fn none(_: &StorePath, _: &str) -> Option<StorePath> {
        None
    }

    #[test]
    fn input_addressed_paths_are_computed_and_a_forgery_is_refused_even_for_the_trusted() {
        let mut graph = DrvGraph::new();
        let genuine = ia(
            "victim",
            drv("echo genuine > $out", &[], DerivationOutput::Deferred),
            &mut graph,
            None,
        );
        let g = graph.get(&genuine).unwrap().clone();
        let victim_out = g.outputs["out"].path().unwrap().clone();
        let forged = ia(
            "victim",
            drv("echo evil > $out", &[], DerivationOutput::Deferred),
            &mut graph,
            Some(&victim_out),
        );
        let f = graph.get(&forged).unwrap().clone();
        let kind = StepKind::InputAddressed;

        // Without a graph: the trusted caller's request as given, nobody else's.
        let mut req = request(&forged, &f, "victim");
        let e = check(&req, kind, &mut none).unwrap_err();
        assert!(matches!(e, Refusal::Untrusted { .. }), "{e}");
        assert!(e.to_string().contains("only callers the operator trusts"), "{e}");
        req.trusted = true;
        check(&req, kind, &mut none).unwrap();
        // With its graph, the forgery is refused naming the computed path, trusted or not.
        let req = with_graph(req, &forged, &graph);
        let e = check(&req, kind, &mut none).unwrap_err();
        let chain = build_trace::error_chain(&e);
        let computed = DrvGraph::new().input_addressed_paths(&f, "victim").unwrap().unwrap();
        assert!(chain.contains(&computed["out"].to_string()), "{chain}");
        assert!(chain.contains(&victim_out.to_string()), "{chain}");
        // The genuine derivation, for an untrusted caller with its graph: built.
        let req = with_graph(request(&genuine, &g, "victim"), &genuine, &graph);
        check(&req, kind, &mut none).unwrap();
        // A request whose basic derivation is not its graph's (the graph is honest, the
        // derivation sent claims the victim's path for another script) is refused.
        let mut lying = request(&genuine, &f, "victim");
        lying.derivations = req.derivations.clone();
        let e = check(&lying, kind, &mut none).unwrap_err();
        assert!(build_trace::error_chain(&e).contains("differ"), "{e}");
    }

    #[test]
    fn a_deferred_derivation_is_resolved_against_accepted_outputs() {
        let mut graph = DrvGraph::new();
        let floating =
            DerivationOutput::Floating { method: CaMethod::Recursive, algo: HashAlgo::Sha256 };
        let ca = drv("echo ca > $out", &[], floating);
        let ca_path = ca.drv_path("ca").unwrap();
        graph.insert(ca_path.clone(), ca);
        let ca_out = StorePath::from_parts([5; 20], "ca").unwrap();
        // The deferred derivation refers to its input by placeholder, as Nix writes it.
        let ph = nix_formats::derivation::downstream_placeholder(&ca_path, "out").unwrap();
        let deferred = drv(&format!("cat {ph} > $out"), &[&ca_path], DerivationOutput::Deferred);
        let d_path = deferred.drv_path("top").unwrap();
        graph.insert(d_path.clone(), deferred.clone());
        let mut get = |p: &StorePath| graph.get(p).cloned();
        let ds = Derivations::load(&d_path, &mut get).unwrap();

        // Nothing accepted for the input yet: it must be built first.
        let e = ds.step(&mut none).unwrap_err();
        assert!(build_trace::error_chain(&e).contains("build it first"), "{e}");
        // Accepted: the step is the resolution, under its own path, with the path
        // `makeOutputPath` of its hash modulo gives.
        let mut accepted =
            |p: &StorePath, o: &str| (*p == ca_path && o == "out").then(|| ca_out.clone());
        let step = ds.step(&mut accepted).unwrap();
        let r = nix_formats::resolve::resolve_with(
            &deferred,
            "top",
            &[((ca_path.clone(), "out".to_string()), ca_out.clone())].into(),
        )
        .unwrap();
        assert_eq!((&step.drv_path, &step.drv), (&r.drv_path, &r.drv));
        assert_eq!(step.drv.args[1], format!("cat {ca_out} > $out"));
        let honest = request(&step.drv_path, &step.drv, "top");
        let req = BuildRequest { derivations: Some(ds.clone()), ..honest.clone() };
        check(&req, StepKind::InputAddressed, &mut accepted).unwrap();

        // A forged output path in the resolved derivation sent: refused, naming the path.
        let victim = StorePath::from_parts([9; 20], "top").unwrap();
        let mut forged = step.drv.clone();
        forged.outputs.insert("out".into(), DerivationOutput::InputAddressed(victim.clone()));
        forged.env.insert("out".into(), victim.to_string());
        let req =
            BuildRequest { drv: BasicDerivation::from_derivation("top", &forged).unwrap(), ..req };
        let e = check(&req, StepKind::InputAddressed, &mut accepted).unwrap_err();
        let chain = build_trace::error_chain(&e);
        let computed = step.input_addressed_paths()["out"].to_string();
        assert!(chain.contains(&computed) && chain.contains(&victim.to_string()), "{chain}");
        // Resolved against another output than the accepted one: another step, refused.
        let other = StorePath::from_parts([6; 20], "ca").unwrap();
        let mut elsewhere = |_: &StorePath, _: &str| Some(other.clone());
        let e = check(
            &BuildRequest { derivations: Some(ds), ..honest },
            StepKind::InputAddressed,
            &mut elsewhere,
        )
        .unwrap_err();
        assert!(build_trace::error_chain(&e).contains("builds as"), "{e}");
    }
}
