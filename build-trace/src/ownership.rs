//! Which output paths a step owns: the paths its derivation gives, not the ones a client wrote.
//!
//! # Algorithm
//!
//! **A derivation's step** ([`establish`]), from the unresolved derivation graph (every `.drv`
//! must hash to its path: [`load_graph`]) and the outputs this host *accepted* for
//! content-addressed derivations (`accepted(resolved drv path, output)`, e.g. the trace store's
//! published build-trace entries). First each input derivation's outputs, in post-order:
//! - input-addressed: `makeOutputPath(output, hashDerivationModulo(drv, maskOutputs), name)`,
//!   as Nix's `checkDerivationOutputs` computes them; a `.drv` that declares other paths is
//!   refused;
//! - fixed-output: the path its hash gives;
//! - deferred input-addressed (an input is floating CA): resolved against its inputs' outputs
//!   (`nix_formats::resolve`), whose `makeOutputPath` of the resolved derivation's hash modulo
//!   gives the paths, as Nix's `rewriteDerivation` does;
//! - floating CA: resolved likewise; its outputs are the ones `accepted` gives for the
//!   resolved derivation (none: the consumer cannot be built yet);
//! - impure: not built by vouch.
//!
//! Then the step: a derivation that Nix resolves (floating CA or deferred, with input
//! derivations) builds as its resolution, under the resolved drv path; any other builds under
//! its own path, as the basic derivation with its input derivations' outputs among its input
//! sources. Input-addressed output paths it declares must be the computed ones
//! ([`OwnershipError::NotOwned`] names both).
//!
//! **A request to build** ([`check_step`]): the basic derivation asked for must be that step:
//! the same outputs (an input-addressed path that differs is [`OwnershipError::NotOwned`]),
//! builder, arguments, environment and system, and at least its input sources (Nix's build
//! hook sends the whole input closure).
//!
//! **A statement** ([`check_outputs`]) owns the output paths it claims when:
//! 1. **content-addressed outputs** (floating CA and fixed): the path follows from the output's
//!    `ca`, name and references (as Nix's `makeFixedOutputPathFromCA` makes it);
//! 2. **input-addressed outputs**:
//!    - when the job's drv path is the basic derivation's own path (a leaf derivation, or a
//!      deferred one resolved as Nix resolves it), the paths are `makeOutputPath` of the basic
//!      derivation's own hash modulo and need nothing else;
//!    - otherwise the job's drv path names an unresolved derivation: its step is established
//!      from `drvs` and `accepted` as above, and the job's basic derivation must be that step.
//!
//! What is not here: whether the statement's evidence or signatures are trusted (the
//! verifier's trust policy), reading `.drv` files (the caller's `drvs`), where accepted outputs
//! are kept (the caller's `accepted`).

use std::collections::{BTreeMap, BTreeSet};

use nix_formats::content_address::ContentAddress;
use nix_formats::derivation::{
    Derivation, DerivationError, DerivationKind, DerivationOutput, DrvGraph,
};
use nix_formats::resolve::{needs_resolution, resolve, ResolveError};
use nix_formats::StorePath;

use crate::job::StepKind;
use crate::statement::Statement;

/// Why a step does not own the output paths it claims.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// The path is not the one the derivation gives.
    #[error("output `{output}` is {claimed}, but its derivation gives {expected}")]
    NotOwned {
        /// The output.
        output: String,
        /// The path computed.
        expected: StorePath,
        /// The path claimed.
        claimed: StorePath,
    },
    /// A content address or path that does not parse.
    #[error("output `{output}`: {problem}")]
    Malformed {
        /// The output.
        output: String,
        /// What is wrong.
        problem: String,
    },
    /// The unresolved derivation (or one of its inputs) is not available.
    #[error(
        "derivation {0} is needed to compute the input-addressed output paths (give the \
         directory holding its .drv files)"
    )]
    NeedsDerivation(StorePath),
    /// The derivation is malformed or does not hash.
    #[error("derivation {drv}")]
    Derivation {
        /// Which.
        drv: String,
        /// The cause.
        #[source]
        source: DerivationError,
    },
    /// The unresolved derivation is not the one the step built.
    #[error("derivation {drv}: {problem}")]
    Mismatch {
        /// Which.
        drv: StorePath,
        /// What differs.
        problem: String,
    },
    /// Input-addressed output paths declared where Nix leaves them empty (an input is floating
    /// content-addressed: the paths are known only after resolution).
    #[error(
        "{drv} declares output `{output}` as {claimed}, but an input of it is content-addressed, \
         so its input-addressed paths are known only after resolution (Nix leaves them empty)"
    )]
    Deferred {
        /// The derivation.
        drv: StorePath,
        /// The output.
        output: String,
        /// The path it declares.
        claimed: StorePath,
    },
    /// A floating content-addressed input has no output this host accepted.
    #[error(
        "output `{output}` of {drv} is content-addressed and no build of it was accepted here \
         (build it first)"
    )]
    NotAccepted {
        /// The input derivation (unresolved).
        drv: StorePath,
        /// Its output.
        output: String,
    },
}

fn malformed(output: &str, problem: impl ToString) -> OwnershipError {
    OwnershipError::Malformed { output: output.into(), problem: problem.to_string() }
}

fn drv_err(drv: &StorePath) -> impl FnOnce(DerivationError) -> OwnershipError + '_ {
    move |source| OwnershipError::Derivation { drv: drv.to_string(), source }
}

fn mismatch(drv: &StorePath, problem: impl Into<String>) -> OwnershipError {
    OwnershipError::Mismatch { drv: drv.clone(), problem: problem.into() }
}

/// The output vouch accepted for `(resolved drv path, output)` of a floating content-addressed
/// derivation, if any.
pub type Accepted<'a> = dyn FnMut(&StorePath, &str) -> Option<StorePath> + 'a;

/// What a derivation builds as ([`establish`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The step's drv path: the resolved derivation's where Nix resolves, else its own.
    pub drv_path: StorePath,
    /// The basic derivation (no input derivations); input-addressed outputs carry the computed
    /// paths.
    pub drv: Derivation,
}

impl Step {
    /// The input-addressed output paths of the step (empty for content-addressed ones).
    pub fn input_addressed_paths(&self) -> BTreeMap<String, StorePath> {
        self.drv
            .outputs
            .iter()
            .filter_map(|(n, o)| match o {
                DerivationOutput::InputAddressed(p) => Some((n.clone(), p.clone())),
                _ => None,
            })
            .collect()
    }
}

/// Check every output path of `st` (see the module docs). `drvs` returns an unresolved
/// derivation by path, where one is needed and available; `accepted` the accepted outputs of
/// floating content-addressed inputs, where a deferred derivation needs them.
pub fn check_outputs(
    st: &Statement,
    drvs: &mut dyn FnMut(&StorePath) -> Option<Derivation>,
    accepted: &mut Accepted<'_>,
) -> Result<(), OwnershipError> {
    for (name, out) in &st.outputs {
        if let Some(ca) = &out.ca {
            check_content_address(name, &out.path, ca, &out.references)?;
        }
    }
    let job = &st.job;
    if job.kind().map_err(|e| malformed("*", e))? != StepKind::InputAddressed {
        return Ok(());
    }
    let name = job.drv.name.as_str();
    let basic = job.drv.to_derivation().map_err(|e| malformed("*", e))?;
    let own = basic.drv_path(name).map_err(drv_err(&job.drv_path))?;
    let want = if own == job.drv_path {
        let mut graph = DrvGraph::new();
        graph.input_addressed_paths(&basic, name).map_err(drv_err(&job.drv_path))?.ok_or_else(
            || mismatch(&job.drv_path, "its input-addressed outputs are deferred in it"),
        )?
    } else {
        let mut graph = load_graph(&job.drv_path, drvs)?;
        let step = establish(&job.drv_path, &mut graph, accepted)?;
        check_step(&basic, &step).map_err(|e| match e {
            OwnershipError::Mismatch { problem, .. } => mismatch(
                &job.drv_path,
                format!("it is not the derivation the step built: {problem}"),
            ),
            other => other,
        })?;
        step.input_addressed_paths()
    };
    for (name, out) in &st.outputs {
        let expected = want.get(name).ok_or_else(|| malformed(name, "not in the derivation"))?;
        if *expected != out.path {
            return Err(OwnershipError::NotOwned {
                output: name.clone(),
                expected: expected.clone(),
                claimed: out.path.clone(),
            });
        }
    }
    Ok(())
}

/// The path content address `ca` gives an object named as `path` is, with `references` (`path`
/// among them for a self-reference); the error says what is malformed.
pub fn content_addressed_path(
    path: &StorePath,
    ca: &str,
    references: &BTreeSet<StorePath>,
) -> Result<StorePath, String> {
    let addr = ContentAddress::parse(ca).map_err(|e| e.to_string())?;
    let self_ref = references.contains(path);
    let refs = if self_ref {
        references.iter().filter(|r| *r != path).cloned().collect()
    } else {
        references.clone()
    };
    addr.store_path(path.name(), &refs, self_ref).map_err(|e| format!("{ca}: {e}"))
}

/// A content-addressed output's path must follow from its `ca`, name and references.
pub fn check_content_address(
    output: &str,
    path: &StorePath,
    ca: &str,
    references: &BTreeSet<StorePath>,
) -> Result<(), OwnershipError> {
    let want = content_addressed_path(path, ca, references).map_err(|e| malformed(output, e))?;
    if want != *path {
        return Err(OwnershipError::NotOwned {
            output: output.into(),
            expected: want,
            claimed: path.clone(),
        });
    }
    Ok(())
}

/// Load `target` and every input derivation, transitively, into a graph; each `.drv` must hash
/// to its path (so a file that is not the one its path names is refused).
pub fn load_graph(
    target: &StorePath,
    drvs: &mut dyn FnMut(&StorePath) -> Option<Derivation>,
) -> Result<DrvGraph, OwnershipError> {
    let mut graph = DrvGraph::new();
    let mut todo = vec![target.clone()];
    let mut seen = BTreeSet::new();
    while let Some(p) = todo.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        let d = drvs(&p).ok_or_else(|| OwnershipError::NeedsDerivation(p.clone()))?;
        let name = p.drv_name().map_err(|e| mismatch(&p, e.to_string()))?;
        let hashed = d.drv_path(name).map_err(drv_err(&p))?;
        if hashed != p {
            return Err(mismatch(&p, format!("its contents hash to {hashed}")));
        }
        todo.extend(d.input_drvs.keys().cloned());
        graph.insert(p, d);
    }
    Ok(graph)
}

/// Each known derivation's outputs (`None`: a floating CA output nobody accepted).
type Known = BTreeMap<StorePath, BTreeMap<String, Option<StorePath>>>;

/// The step `target` (in `graph`, with its inputs) builds as (see the module docs).
pub fn establish(
    target: &StorePath,
    graph: &mut DrvGraph,
    accepted: &mut Accepted<'_>,
) -> Result<Step, OwnershipError> {
    let drv = graph.get(target).cloned().ok_or_else(|| needs(target))?;
    let name = target.drv_name().map_err(|e| mismatch(target, e.to_string()))?;
    let known = input_outputs(&drv, graph, accepted)?;
    let kind = drv.kind(name).map_err(drv_err(target))?;
    if kind == DerivationKind::Deferred || needs_resolution(&drv, name).map_err(drv_err(target))? {
        let r = resolved(target, &drv, name, &known)?;
        return Ok(Step { drv_path: r.drv_path, drv: r.drv });
    }
    match kind {
        DerivationKind::InputAddressed => {
            owned_paths(target, &drv, name, graph)?;
        }
        DerivationKind::Fixed => drv.check_output_paths(name).map_err(drv_err(target))?,
        _ => {}
    }
    let mut basic = drv.clone();
    basic.input_drvs.clear();
    for (input, outs) in &drv.input_drvs {
        for out in outs {
            basic.input_srcs.insert(chosen(&known, input, out)?);
        }
    }
    Ok(Step { drv_path: target.clone(), drv: basic })
}

fn needs(p: &StorePath) -> OwnershipError {
    OwnershipError::NeedsDerivation(p.clone())
}

/// The outputs of every input derivation `drv` needs, in post-order (iteratively, so a deep
/// hostile graph cannot overflow the stack).
fn input_outputs(
    drv: &Derivation,
    graph: &mut DrvGraph,
    accepted: &mut Accepted<'_>,
) -> Result<Known, OwnershipError> {
    let mut known = Known::new();
    let mut stack: Vec<(StorePath, bool)> =
        drv.input_drvs.keys().map(|p| (p.clone(), false)).collect();
    let mut on_path = BTreeSet::new();
    while let Some((p, expanded)) = stack.pop() {
        if known.contains_key(&p) {
            continue;
        }
        let d = graph.get(&p).cloned().ok_or_else(|| needs(&p))?;
        let name = p.drv_name().map_err(|e| mismatch(&p, e.to_string()))?.to_owned();
        let kind = d.kind(&name).map_err(drv_err(&p))?;
        let resolves = matches!(
            kind,
            DerivationKind::Deferred | DerivationKind::Floating | DerivationKind::Impure
        );
        if resolves && !expanded {
            on_path.insert(p.clone());
            stack.push((p.clone(), true));
            for i in d.input_drvs.keys() {
                if on_path.contains(i) {
                    return Err(drv_err(&p)(DerivationError::Cycle(i.clone())));
                }
                if !known.contains_key(i) {
                    stack.push((i.clone(), false));
                }
            }
            continue;
        }
        let outs = match kind {
            DerivationKind::InputAddressed => owned_paths(&p, &d, &name, graph)
                .map_err(|e| mismatch(&p, e.to_string()))?
                .into_iter()
                .map(|(o, p)| (o, Some(p)))
                .collect(),
            DerivationKind::Fixed => {
                d.check_output_paths(&name).map_err(drv_err(&p))?;
                d.outputs.iter().map(|(o, x)| (o.clone(), x.path().cloned())).collect()
            }
            DerivationKind::Impure => {
                return Err(mismatch(&p, "vouch does not build impure derivations"))
            }
            DerivationKind::Deferred => {
                let r = resolved(&p, &d, &name, &known)?;
                r.drv.outputs.iter().map(|(o, x)| (o.clone(), x.path().cloned())).collect()
            }
            DerivationKind::Floating => {
                let r = resolved(&p, &d, &name, &known)?;
                r.drv.outputs.keys().map(|o| (o.clone(), accepted(&r.drv_path, o))).collect()
            }
        };
        on_path.remove(&p);
        known.insert(p, outs);
    }
    Ok(known)
}

/// The output paths of input-addressed derivation `d` (at `p`, its inputs in `graph`), checked:
/// each path it declares must be `makeOutputPath` of its masked hash modulo, as Nix's
/// `checkDerivationOutputs` requires; one whose hash modulo is deferred (an input is floating
/// content-addressed) must not declare paths at all (Nix leaves them empty and computes them
/// after resolution, which [`nix_formats::resolve`] does). The one rule for the host's engine
/// and the verifier.
pub fn owned_paths(
    p: &StorePath,
    d: &Derivation,
    name: &str,
    graph: &mut DrvGraph,
) -> Result<BTreeMap<String, StorePath>, OwnershipError> {
    let want = graph.input_addressed_paths(d, name).map_err(drv_err(p))?.ok_or_else(|| {
        let (output, o) = d.outputs.iter().next().expect("a derivation has outputs");
        OwnershipError::Deferred {
            drv: p.clone(),
            output: output.clone(),
            claimed: o.path().cloned().unwrap_or_else(|| p.clone()),
        }
    })?;
    for (out, o) in &d.outputs {
        let claimed = o.path().cloned().ok_or_else(|| malformed(out, "no path"))?;
        let expected = want.get(out).cloned().ok_or_else(|| malformed(out, "no path"))?;
        if expected != claimed {
            return Err(OwnershipError::NotOwned { output: out.clone(), expected, claimed });
        }
    }
    Ok(want)
}

/// The output `out` of input derivation `input`, as known.
fn chosen(known: &Known, input: &StorePath, out: &str) -> Result<StorePath, OwnershipError> {
    match known.get(input).and_then(|o| o.get(out)) {
        Some(Some(p)) => Ok(p.clone()),
        Some(None) => {
            Err(OwnershipError::NotAccepted { drv: input.clone(), output: out.to_owned() })
        }
        None => Err(drv_err(input)(DerivationError::MissingInputOutput {
            drv: input.clone(),
            output: out.to_owned(),
        })),
    }
}

/// `drv` resolved against its inputs' known outputs.
fn resolved(
    p: &StorePath,
    drv: &Derivation,
    name: &str,
    known: &Known,
) -> Result<nix_formats::resolve::Resolution, OwnershipError> {
    for (input, outs) in &drv.input_drvs {
        for out in outs {
            chosen(known, input, out)?;
        }
    }
    let mut pick = |i: &StorePath, o: &str| chosen(known, i, o).ok();
    resolve(drv, name, &mut pick).map_err(|e| match e {
        ResolveError::Derivation(source) => drv_err(p)(source),
        other => mismatch(p, other.to_string()),
    })
}

/// The basic derivation a request asks for must be `step` (see the module docs).
pub fn check_step(basic: &Derivation, step: &Step) -> Result<(), OwnershipError> {
    let drv = &step.drv_path;
    for (name, want) in &step.drv.outputs {
        let got = basic.outputs.get(name).ok_or_else(|| {
            mismatch(drv, format!("the request's derivation has no output `{name}`"))
        })?;
        if let (DerivationOutput::InputAddressed(expected), Some(claimed)) = (want, got.path()) {
            if expected != claimed {
                return Err(OwnershipError::NotOwned {
                    output: name.clone(),
                    expected: expected.clone(),
                    claimed: claimed.clone(),
                });
            }
        }
        if want != got {
            return Err(mismatch(drv, format!("the outputs `{name}` differ")));
        }
    }
    if basic.outputs.len() != step.drv.outputs.len() {
        return Err(mismatch(drv, "the outputs differ"));
    }
    let differs = if basic.builder != step.drv.builder || basic.args != step.drv.args {
        "the builder and arguments"
    } else if basic.env != step.drv.env {
        "the environments"
    } else if basic.platform != step.drv.platform {
        "the systems"
    } else if !step.drv.input_srcs.is_subset(&basic.input_srcs) {
        "the input sources"
    } else {
        return Ok(());
    };
    Err(mismatch(drv, format!("{differs} differ")))
}
