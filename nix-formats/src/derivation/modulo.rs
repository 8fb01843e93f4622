//! `hashDerivationModulo` and input-addressed output paths.
//!
//! Nix identifies a derivation "modulo" its fixed-output inputs: a fixed-output derivation
//! hashes to `sha256("fixed:out:<method><algo>:<hex>:<output path>")`; any other derivation
//! hashes to the SHA-256 of its ATerm with each input derivation path replaced by the base16 hash
//! modulo of that input (outputs merged per hash). With `mask_outputs`, output paths and the
//! output-named environment variables are blanked; that is how Nix computes input-addressed
//! output paths (`makeOutputPath("output:<id>", hash, name)`) and the realisation ids of Nix
//! ≤ 2.34 (`sha256:<hex>!<output>`, its `staticOutputHashes`). Input derivations are always
//! hashed unmasked (Nix's `pathDerivationModulo`).
//!
//! [`DrvGraph`] holds a set of parsed derivations and memoises their hashes (iteratively, with
//! cycle detection, so hostile graphs cannot overflow the stack). Not here: reading `.drv` files.

use std::collections::{BTreeMap, BTreeSet};

use super::aterm::PrintMode;
use super::{fixed_output_path, Derivation, DerivationError, DerivationKind, DerivationOutput};
use crate::hash::{sha256, Hash};
use crate::store_path::{make_output_path, output_path_name, StorePath};

/// The result of `hashDerivationModulo`: one SHA-256 per output, and whether any output is
/// deferred (its paths cannot be known yet because an input is floating or impure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvHashModulo {
    /// Hash per output name.
    pub hashes: BTreeMap<String, [u8; 32]>,
    /// Nix's `DrvHash::Kind::Deferred`.
    pub deferred: bool,
}

impl DrvHashModulo {
    /// The hash of one output.
    pub fn get(&self, output: &str) -> Option<&[u8; 32]> {
        self.hashes.get(output)
    }

    /// Nix ≤ 2.34 realisation id of `output`: `sha256:<hex>!<output>` (meaningful for masked
    /// hashes, i.e. Nix's `staticOutputHashes`).
    pub fn realisation_id(&self, output: &str) -> Option<String> {
        self.get(output).map(|h| format!("sha256:{}!{output}", hex::encode(h)))
    }
}

impl Derivation {
    /// Nix's `hashDerivationModulo(drv, maskOutputs)`. `input` gives the (unmasked) hash modulo of
    /// each input derivation; [`DrvGraph`] provides a memoising one.
    pub fn hash_modulo(
        &self,
        name: &str,
        mask_outputs: bool,
        input: &mut dyn FnMut(&StorePath) -> Result<DrvHashModulo, DerivationError>,
    ) -> Result<DrvHashModulo, DerivationError> {
        let kind = self.kind(name)?;
        if kind == DerivationKind::Fixed {
            let mut hashes = BTreeMap::new();
            for (out, o) in &self.outputs {
                if let DerivationOutput::Fixed { method, hash, .. } = o {
                    let path = fixed_output_path(&output_path_name(name, out), *method, hash)?;
                    let s = format!(
                        "fixed:out:{}:{}:{path}",
                        method.method_algo(hash.algo()),
                        hash.to_base16()
                    );
                    hashes.insert(out.clone(), sha256(s));
                }
            }
            return Ok(DrvHashModulo { hashes, deferred: false });
        }
        if kind == DerivationKind::Impure {
            let h = sha256("impure");
            let hashes = self.outputs.keys().map(|o| (o.clone(), h)).collect();
            return Ok(DrvHashModulo { hashes, deferred: true });
        }
        let mut deferred = matches!(kind, DerivationKind::Deferred | DerivationKind::Floating);
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (drv_path, outs) in &self.input_drvs {
            let res = input(drv_path)?;
            deferred |= res.deferred;
            for out in outs {
                let h = res.get(out).ok_or_else(|| DerivationError::MissingInputOutput {
                    drv: drv_path.clone(),
                    output: out.clone(),
                })?;
                inputs.entry(hex::encode(h)).or_default().insert(out.clone());
            }
        }
        let aterm = self.to_aterm_with(PrintMode { mask_outputs, actual_inputs: Some(&inputs) });
        let h = sha256(&aterm);
        Ok(DrvHashModulo {
            hashes: self.outputs.keys().map(|o| (o.clone(), h)).collect(),
            deferred,
        })
    }

    /// Input-addressed output paths from a masked hash modulo: `None` when deferred.
    pub fn input_addressed_paths(
        &self,
        name: &str,
        masked: &DrvHashModulo,
    ) -> Result<Option<BTreeMap<String, StorePath>>, DerivationError> {
        if masked.deferred {
            return Ok(None);
        }
        let mut paths = BTreeMap::new();
        for out in self.outputs.keys() {
            let h = masked.get(out).ok_or_else(|| DerivationError::NotApplicable {
                name: name.to_owned(),
                reason: format!("no hash for output {out:?}"),
            })?;
            let p = make_output_path(out, &Hash::sha256(*h), name).map_err(|source| {
                DerivationError::StorePath { what: format!("output {out:?}"), source }
            })?;
            paths.insert(out.clone(), p);
        }
        Ok(Some(paths))
    }
}

/// A set of derivations by path, with memoised (unmasked) hashes modulo.
#[derive(Debug, Default, Clone)]
pub struct DrvGraph {
    drvs: BTreeMap<StorePath, Derivation>,
    memo: BTreeMap<StorePath, DrvHashModulo>,
}

impl DrvGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a derivation; `path` must be a `.drv` path.
    pub fn insert(&mut self, path: StorePath, drv: Derivation) {
        self.memo.clear();
        self.drvs.insert(path, drv);
    }

    /// A derivation by path.
    pub fn get(&self, path: &StorePath) -> Option<&Derivation> {
        self.drvs.get(path)
    }

    /// All derivations.
    pub fn iter(&self) -> impl Iterator<Item = (&StorePath, &Derivation)> {
        self.drvs.iter()
    }

    /// Nix's `pathDerivationModulo`: the unmasked hash modulo of a known derivation.
    pub fn path_hash_modulo(&mut self, path: &StorePath) -> Result<DrvHashModulo, DerivationError> {
        // Iterative depth-first post-order walk. `(p, true)` entries mark nodes whose inputs are
        // being hashed; those nodes (`gray`) form the current path, so meeting one is a cycle.
        let mut stack = vec![(path.clone(), false)];
        let mut gray = BTreeSet::new();
        while let Some((p, expanded)) = stack.pop() {
            if self.memo.contains_key(&p) {
                continue;
            }
            let drv =
                self.drvs.get(&p).ok_or_else(|| DerivationError::MissingInputDrv(p.clone()))?;
            if !expanded {
                gray.insert(p.clone());
                stack.push((p.clone(), true));
                for i in drv.input_drvs.keys() {
                    if gray.contains(i) {
                        return Err(DerivationError::Cycle(i.clone()));
                    }
                    if !self.memo.contains_key(i) {
                        stack.push((i.clone(), false));
                    }
                }
                continue;
            }
            let name = p.drv_name().map_err(|source| DerivationError::StorePath {
                what: "input derivation".into(),
                source,
            })?;
            let memo = &self.memo;
            let h = drv.hash_modulo(name, false, &mut |i| {
                memo.get(i).cloned().ok_or_else(|| DerivationError::MissingInputDrv(i.clone()))
            })?;
            self.memo.insert(p.clone(), h);
            gray.remove(&p);
        }
        self.memo.get(path).cloned().ok_or_else(|| DerivationError::MissingInputDrv(path.clone()))
    }

    /// `hashDerivationModulo(drv, mask)` for a derivation whose inputs are in this graph (the
    /// derivation itself need not be).
    pub fn hash_modulo(
        &mut self,
        drv: &Derivation,
        name: &str,
        mask_outputs: bool,
    ) -> Result<DrvHashModulo, DerivationError> {
        drv.hash_modulo(name, mask_outputs, &mut |p| self.path_hash_modulo(p))
    }

    /// Nix's `staticOutputHashes` as realisation ids (`sha256:<hex>!<output>`) for every output.
    pub fn realisation_ids(
        &mut self,
        drv: &Derivation,
        name: &str,
    ) -> Result<BTreeMap<String, String>, DerivationError> {
        let h = self.hash_modulo(drv, name, true)?;
        Ok(drv
            .outputs
            .keys()
            .filter_map(|o| h.realisation_id(o).map(|id| (o.clone(), id)))
            .collect())
    }

    /// The input-addressed output paths of `drv` (`None` if deferred).
    pub fn input_addressed_paths(
        &mut self,
        drv: &Derivation,
        name: &str,
    ) -> Result<Option<BTreeMap<String, StorePath>>, DerivationError> {
        let h = self.hash_modulo(drv, name, true)?;
        drv.input_addressed_paths(name, &h)
    }
}
