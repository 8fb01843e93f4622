//! A step's derivation on the verifying side: the checks that need no trace (it is the one its
//! path names, its kind is verifiable, an input-addressed one owns the paths it declares), a
//! fixed-output step accepted by its declared hash, and the step computed for one combination
//! of its inputs' accepted outputs (the input-addressed basic derivation, or the resolved one).

use std::collections::BTreeMap;

use nix_formats::derivation::{Derivation, DerivationKind, DerivationOutput, DrvGraph};
use nix_formats::resolve::resolve_with;
use nix_formats::{HashAlgo, StorePath};

use super::{
    Accepted, AcceptedStep, BrokenLink, ClosureVerifier, Combo, ComputedStep, DrvSet, LinkCheck,
    VerifyError, Walk, MAX_COMBINATIONS,
};
use crate::error_chain;
use crate::job::{BasicDerivation, StepKind};

/// A derivation that passed [`ClosureVerifier::check_derivation`], with its name.
pub(super) enum Checked {
    /// Fixed-output: accepted by its declared hash.
    Fixed(String),
    /// Needs a trace: its kind.
    Step(String, DerivationKind),
}

impl ClosureVerifier<'_> {
    /// The checks of derivation `udrv` that need no trace.
    pub(super) fn check_derivation(
        &self,
        drvs: &DrvSet,
        walk: &mut Walk,
        udrv: &StorePath,
        drv: &Derivation,
    ) -> Result<Result<Checked, Box<BrokenLink>>, VerifyError> {
        let name = match udrv.drv_name() {
            Ok(n) => n.to_string(),
            Err(e) => return Ok(Err(BrokenLink::new(LinkCheck::Derivation, e.to_string()))),
        };
        // The derivation must be the one its path names: a `.drv` path is the hash of its
        // ATerm, and the graph may come from elsewhere (`--show-derivation`, a copied store).
        match drv.drv_path(&name) {
            Ok(p) if p == *udrv => {}
            Ok(p) => {
                return Ok(Err(BrokenLink::new(
                    LinkCheck::Derivation,
                    "the derivation's contents are not the ones its path names",
                )
                .expected(udrv, p)))
            }
            Err(e) => return Ok(Err(BrokenLink::new(LinkCheck::Derivation, error_chain(&e)))),
        }
        let kind = match drv.kind(&name) {
            Ok(k) => k,
            Err(e) => return Ok(Err(BrokenLink::new(LinkCheck::Derivation, error_chain(&e)))),
        };
        match kind {
            DerivationKind::Fixed => return Ok(Ok(Checked::Fixed(name))),
            DerivationKind::Impure => {
                return Ok(Err(BrokenLink::new(
                    LinkCheck::Derivation,
                    "impure derivations cannot be verified",
                )))
            }
            DerivationKind::InputAddressed => {
                let graph = walk.graph.get_or_insert_with(|| {
                    let mut g = DrvGraph::new();
                    for (p, d) in drvs.iter() {
                        g.insert(p.clone(), d.clone());
                    }
                    g
                });
                // Its paths must be the ones its hash modulo gives; a deferred one (an input
                // is floating CA) must leave them empty and is resolved below.
                match crate::ownership::owned_paths(udrv, drv, &name, graph) {
                    Ok(_) => {}
                    Err(crate::ownership::OwnershipError::Derivation { source, .. }) => {
                        return Err(VerifyError::Derivation { drv: udrv.to_string(), source })
                    }
                    Err(e) => {
                        return Ok(Err(BrokenLink::new(
                            LinkCheck::Derivation,
                            format!(
                                "the output paths written in the derivation are not the ones it \
                                 owns: {e}"
                            ),
                        )))
                    }
                }
            }
            DerivationKind::Floating | DerivationKind::Deferred => {}
        }
        Ok(Ok(Checked::Step(name, kind)))
    }

    /// A fixed-output derivation, by its declared hash.
    pub(super) fn accept_fixed(
        &self,
        udrv: &StorePath,
        drv: &Derivation,
        name: &str,
    ) -> Result<Vec<Accepted>, Box<BrokenLink>> {
        if let Err(e) = drv.check_output_paths(name) {
            return Err(BrokenLink::new(LinkCheck::Derivation, error_chain(&e)));
        }
        let mut outputs = BTreeMap::new();
        let mut by = Vec::new();
        for (o, out) in &drv.outputs {
            if let DerivationOutput::Fixed { method, hash, path } = out {
                if matches!(hash.algo(), HashAlgo::Md5 | HashAlgo::Sha1)
                    && !self.policy.policy.fixed_output.allow_weak_hashes
                {
                    return Err(BrokenLink::new(
                        LinkCheck::WeakHash,
                        format!(
                            "fixed output `{o}` declares a {} hash, which the policy refuses",
                            hash.algo()
                        ),
                    )
                    .expected("sha256 or sha512", hash.algo()));
                }
                by.push(format!("fixed-output {}{}", method.prefix(), hash));
                outputs.insert(o.clone(), (path.clone(), None));
            }
        }
        let step = AcceptedStep {
            drv: udrv.to_string(),
            key: udrv.to_string(),
            outputs: outputs.iter().map(|(n, (p, _))| (n.clone(), p.to_string())).collect(),
            accepted_by: by,
            simulated: false,
        };
        Ok(vec![Accepted { outputs, step, launches: Vec::new() }])
    }

    /// The key, basic derivation, direct inputs and kind of a step for one input combination.
    pub(super) fn compute_step(
        &self,
        drv: &Derivation,
        name: &str,
        udrv: &StorePath,
        kind: DerivationKind,
        combo: &Combo,
    ) -> Result<ComputedStep, Box<BrokenLink>> {
        let res_err =
            |e: &dyn std::error::Error| BrokenLink::new(LinkCheck::Resolution, e.to_string());
        let (key, basic_drv, step_kind) = if kind == DerivationKind::InputAddressed {
            let mut basic = drv.clone();
            basic.input_drvs.clear();
            basic.input_srcs.extend(combo.values().cloned());
            (udrv.clone(), basic, StepKind::InputAddressed)
        } else {
            let r = resolve_with(drv, name, combo).map_err(|e| res_err(&e))?;
            let k = if kind == DerivationKind::Deferred {
                StepKind::InputAddressed
            } else {
                StepKind::FloatingCa
            };
            (r.drv_path, r.drv, k)
        };
        let basic = BasicDerivation::from_derivation(name, &basic_drv).map_err(|e| res_err(&e))?;
        let direct = basic.input_srcs.clone();
        Ok(ComputedStep { key, drv: basic, direct, kind: step_kind })
    }
}

/// Every combination of the input derivations' output maps (`maps_of(input)`: each map as
/// output name → path), at most [`MAX_COMBINATIONS`].
pub(crate) fn combinations(
    drv: &Derivation,
    maps_of: impl Fn(&StorePath) -> Vec<BTreeMap<String, StorePath>>,
) -> Result<Vec<Combo>, Box<BrokenLink>> {
    let mut combos: Vec<Combo> = vec![BTreeMap::new()];
    for (input, outs) in &drv.input_drvs {
        let mut options: Vec<BTreeMap<&String, StorePath>> = Vec::new();
        for m in maps_of(input) {
            let mut choice = BTreeMap::new();
            for o in outs {
                match m.get(o) {
                    Some(p) => {
                        choice.insert(o, p.clone());
                    }
                    None => {
                        return Err(BrokenLink::new(
                            LinkCheck::Resolution,
                            format!("input {input} has no accepted output `{o}`"),
                        ))
                    }
                }
            }
            if !options.contains(&choice) {
                options.push(choice);
            }
        }
        if combos.len() * options.len() > MAX_COMBINATIONS {
            return Err(BrokenLink::new(
                LinkCheck::Resolution,
                format!("more than {MAX_COMBINATIONS} combinations of divergent input outputs"),
            ));
        }
        combos = combos
            .into_iter()
            .flat_map(|c| {
                options.iter().map(move |opt| {
                    let mut c = c.clone();
                    for (o, p) in opt {
                        c.insert((input.clone(), (*o).clone()), p.clone());
                    }
                    c
                })
            })
            .collect();
    }
    Ok(combos)
}
