//! Which output paths a step owns: the paths its derivation gives, not the ones a client wrote.
//!
//! # Algorithm ([`check_outputs`])
//!
//! A statement claims output paths. It *owns* them when:
//! 1. **content-addressed outputs** (floating CA and fixed): the path follows from the output's
//!    `ca`, name and references (as Nix's `makeFixedOutputPathFromCA` makes it);
//! 2. **input-addressed outputs**: the path is `makeOutputPath(output, hashDerivationModulo(drv,
//!    maskOutputs), name)`, as Nix's `checkDerivationOutputs` requires before it registers a
//!    `.drv`:
//!    - when the job's drv path is the basic derivation's own path (a leaf derivation, or a
//!      deferred one that Nix resolved against its inputs' outputs, as `rewriteDerivation`
//!      does), the hash modulo is the basic derivation's own and needs nothing else;
//!    - otherwise the job's drv path names an unresolved derivation with input derivations:
//!      its graph comes from `drvs`, its `.drv` must hash to its path, must be the job's basic
//!      derivation with input derivations replaced by their outputs (outputs, builder,
//!      arguments, environment, system), and must not be deferred.
//!
//! What is not here: whether the statement's evidence or signatures are trusted (the
//! verifier's trust policy), reading `.drv` files (the caller's `drvs`).

use std::collections::{BTreeMap, BTreeSet};

use nix_formats::content_address::ContentAddress;
use nix_formats::derivation::{Derivation, DerivationError, DrvGraph};
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
}

fn malformed(output: &str, problem: impl ToString) -> OwnershipError {
    OwnershipError::Malformed { output: output.into(), problem: problem.to_string() }
}

/// Check every output path of `st` (see the module docs). `drvs` returns an unresolved
/// derivation by path, where one is needed and available.
pub fn check_outputs(
    st: &Statement,
    drvs: &mut dyn FnMut(&StorePath) -> Option<Derivation>,
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
    let want = input_addressed_paths(st, drvs)?;
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

/// The input-addressed output paths of the step's derivation.
fn input_addressed_paths(
    st: &Statement,
    drvs: &mut dyn FnMut(&StorePath) -> Option<Derivation>,
) -> Result<BTreeMap<String, StorePath>, OwnershipError> {
    let job = &st.job;
    let name = job.drv.name.as_str();
    let drv_err = |drv: &StorePath| {
        let drv = drv.to_string();
        move |source| OwnershipError::Derivation { drv, source }
    };
    let basic = job.drv.to_derivation().map_err(|e| malformed("*", e))?;
    let drv_path = &job.drv_path;
    let mut graph = DrvGraph::new();
    let own = basic.drv_path(name).map_err(drv_err(&job.drv_path))?;
    let (drv, deferred_msg) = if own == *drv_path {
        (basic, "")
    } else {
        let unresolved = load_graph(drv_path, drvs, &mut graph)?;
        let hashed = unresolved.drv_path(name).map_err(drv_err(&job.drv_path))?;
        if hashed != *drv_path {
            return Err(OwnershipError::Mismatch {
                drv: job.drv_path.clone(),
                problem: format!("its contents hash to {hashed}"),
            });
        }
        same_step(&unresolved, &basic).map_err(|problem| OwnershipError::Mismatch {
            drv: job.drv_path.clone(),
            problem: format!("it is not the derivation the step built: {problem} differ"),
        })?;
        (unresolved, "it is deferred (an input is content-addressed), so it must be built resolved")
    };
    graph.input_addressed_paths(&drv, name).map_err(drv_err(&job.drv_path))?.ok_or_else(|| {
        OwnershipError::Mismatch { drv: job.drv_path.clone(), problem: deferred_msg.into() }
    })
}

/// Load `target` and every input derivation into `graph`.
fn load_graph(
    target: &StorePath,
    drvs: &mut dyn FnMut(&StorePath) -> Option<Derivation>,
    graph: &mut DrvGraph,
) -> Result<Derivation, OwnershipError> {
    let mut todo = vec![target.clone()];
    let mut seen = BTreeSet::new();
    while let Some(p) = todo.pop() {
        if !seen.insert(p.clone()) {
            continue;
        }
        let d = drvs(&p).ok_or_else(|| OwnershipError::NeedsDerivation(p.clone()))?;
        todo.extend(d.input_drvs.keys().cloned());
        graph.insert(p, d);
    }
    Ok(graph.get(target).cloned().expect("loaded first"))
}

/// Whether the unresolved derivation and the basic one the step built are one step: the same
/// outputs, builder, arguments, environment and system (input sources differ by resolution).
fn same_step(unresolved: &Derivation, basic: &Derivation) -> Result<(), &'static str> {
    if unresolved.outputs != basic.outputs {
        return Err("the outputs");
    }
    if unresolved.builder != basic.builder || unresolved.args != basic.args {
        return Err("the builder and arguments");
    }
    if unresolved.env != basic.env {
        return Err("the environments");
    }
    if unresolved.platform != basic.platform {
        return Err("the systems");
    }
    if !unresolved.input_srcs.iter().all(|s| basic.input_srcs.contains(s)) {
        return Err("the input sources");
    }
    Ok(())
}
