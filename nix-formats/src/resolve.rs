//! Resolution of a derivation against the chosen outputs of its input derivations.
//!
//! Nix 2.8's `Derivation::tryResolve` + `rewriteDerivation`, step by step:
//! 1. for every `(inputDrv, output)`: take the chosen output path, add it to `inputSrcs`, and
//!    map the downstream placeholder of `(inputDrv, output)` to the path's text;
//! 2. drop `inputDrvs`; rewrite every placeholder (in sorted placeholder order, each replacing
//!    all occurrences) in the builder, every argument, and env keys and values (if two keys
//!    collide after rewriting, the first in the old sorted order wins);
//! 3. deferred (input-addressed) outputs get their paths now: `makeOutputPath` from the masked
//!    hash modulo of the rewritten derivation, also written into the output's env var.
//!
//! The result is a basic derivation with its own `.drv` path (what Nix prints as
//! "resolved derivation: 'A' -> 'B'") and its masked hash modulo, from which both build-trace
//! keys follow: Nix ≤ 2.34 `sha256:<hex>!<output>` and Nix ≥ 2.35 `(drvPath, output)`.
//! A derivation without input derivations resolves to itself. Nix resolves floating CA, deferred
//! and impure derivations ([`needs_resolution`]); it does not resolve other input-addressed ones.
//! Not here: finding the chosen outputs (that needs a store, a trace or a verifier's choice).

use std::collections::BTreeMap;

use thiserror::Error;

use crate::derivation::{
    downstream_placeholder, Derivation, DerivationError, DerivationKind, DerivationOutput,
    DrvHashModulo,
};
use crate::hash::Hash;
use crate::realisation::{DrvOutputId, DrvOutputKey};
use crate::store_path::{make_output_path, StorePath};

/// Why resolution failed.
#[derive(Debug, Error)]
pub enum ResolveError {
    /// No output path was chosen for an input.
    #[error("no output path given for output {output:?} of input derivation {drv}")]
    MissingInput {
        /// The input derivation.
        drv: StorePath,
        /// Its output.
        output: String,
    },
    /// The derivation itself is invalid.
    #[error(transparent)]
    Derivation(#[from] DerivationError),
}

/// A resolved derivation with its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The derivation name (as in the unresolved drv path).
    pub name: String,
    /// The resolved (basic) derivation.
    pub drv: Derivation,
    /// Its `.drv` path.
    pub drv_path: StorePath,
    /// Its masked hash modulo (Nix's `staticOutputHashes`).
    pub hash_modulo: DrvHashModulo,
}

impl Resolution {
    /// Nix ≤ 2.34 build-trace key of `output`.
    pub fn legacy_id(&self, output: &str) -> Option<DrvOutputId> {
        self.hash_modulo
            .get(output)
            .map(|h| DrvOutputId { drv_hash: *h, output: output.to_owned() })
    }

    /// Nix ≥ 2.35 build-trace key of `output`.
    pub fn key(&self, output: &str) -> Option<DrvOutputKey> {
        self.drv
            .outputs
            .contains_key(output)
            .then(|| DrvOutputKey { drv_path: self.drv_path.clone(), output: output.to_owned() })
    }
}

/// Whether Nix resolves this derivation before building it (it has input derivations and is
/// floating CA, deferred or impure).
pub fn needs_resolution(drv: &Derivation, name: &str) -> Result<bool, DerivationError> {
    Ok(!drv.input_drvs.is_empty()
        && matches!(
            drv.kind(name)?,
            DerivationKind::Floating | DerivationKind::Deferred | DerivationKind::Impure
        ))
}

fn rewrite(s: &str, rewrites: &BTreeMap<String, String>) -> String {
    let mut s = s.to_owned();
    for (from, to) in rewrites {
        if s.contains(from.as_str()) {
            s = s.replace(from.as_str(), to);
        }
    }
    s
}

/// Resolves `drv` (named `name`) with `chosen(inputDrv, output)` giving each input's output path.
pub fn resolve(
    drv: &Derivation,
    name: &str,
    chosen: &mut dyn FnMut(&StorePath, &str) -> Option<StorePath>,
) -> Result<Resolution, ResolveError> {
    drv.kind(name)?;
    let mut resolved = drv.clone();
    resolved.input_drvs.clear();
    let mut rewrites = BTreeMap::new();
    for (input, outs) in &drv.input_drvs {
        for out in outs {
            let path = chosen(input, out).ok_or_else(|| ResolveError::MissingInput {
                drv: input.clone(),
                output: out.clone(),
            })?;
            rewrites.insert(downstream_placeholder(input, out)?, path.to_string());
            resolved.input_srcs.insert(path);
        }
    }
    if !rewrites.is_empty() {
        resolved.builder = rewrite(&resolved.builder, &rewrites);
        for a in &mut resolved.args {
            *a = rewrite(a, &rewrites);
        }
        let mut env = BTreeMap::new();
        for (k, v) in &drv.env {
            env.entry(rewrite(k, &rewrites)).or_insert_with(|| rewrite(v, &rewrites));
        }
        resolved.env = env;
    }
    let no_inputs = &mut |p: &StorePath| Err(DerivationError::MissingInputDrv(p.clone()));
    if resolved.outputs.values().any(|o| matches!(o, DerivationOutput::Deferred)) {
        let h = resolved.hash_modulo(name, true, no_inputs)?;
        for (out, o) in resolved.outputs.iter_mut() {
            if matches!(o, DerivationOutput::Deferred) {
                let hash = h.get(out).expect("hash_modulo covers every output");
                let p = make_output_path(out, &Hash::sha256(*hash), name).map_err(|source| {
                    DerivationError::StorePath { what: format!("output {out:?}"), source }
                })?;
                resolved.env.insert(out.clone(), p.to_string());
                *o = DerivationOutput::InputAddressed(p);
            }
        }
    }
    let hash_modulo = resolved.hash_modulo(name, true, no_inputs)?;
    let drv_path = resolved.drv_path(name)?;
    Ok(Resolution { name: name.to_owned(), drv: resolved, drv_path, hash_modulo })
}

/// [`resolve`] with the chosen outputs in a map keyed by `(inputDrv, output)`.
pub fn resolve_with(
    drv: &Derivation,
    name: &str,
    chosen: &BTreeMap<(StorePath, String), StorePath>,
) -> Result<Resolution, ResolveError> {
    resolve(drv, name, &mut |d, o| chosen.get(&(d.clone(), o.to_owned())).cloned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::{hash_placeholder, CaMethod};
    use crate::hash::HashAlgo;

    fn sp(s: &str) -> StorePath {
        StorePath::from_base_name(s).unwrap()
    }

    #[test]
    fn rewrites_placeholders_and_moves_inputs() {
        let dep = sp("3xm0vgv7smlx4jlpmc85a7dh9055avas-ca-dep.drv");
        let dep_out = sp("8q64y4pw7wlbmc996wvxxygcq08asrsx-ca-dep");
        let ph = downstream_placeholder(&dep, "out").unwrap();
        let mut d = Derivation {
            platform: "x86_64-linux".into(),
            builder: format!("{ph}/bin/sh"),
            args: vec![format!("echo {ph} {ph}")],
            ..Default::default()
        };
        d.outputs.insert(
            "out".into(),
            DerivationOutput::Floating { method: CaMethod::Recursive, algo: HashAlgo::Sha256 },
        );
        d.env.insert("out".into(), hash_placeholder("out"));
        d.env.insert(format!("k{ph}"), ph.clone());
        d.input_drvs.insert(dep.clone(), ["out".to_string()].into());
        assert!(needs_resolution(&d, "t").unwrap());
        let r = resolve_with(&d, "t", &[((dep.clone(), "out".into()), dep_out.clone())].into())
            .unwrap();
        assert!(r.drv.input_drvs.is_empty());
        assert!(r.drv.input_srcs.contains(&dep_out));
        assert_eq!(r.drv.builder, format!("{dep_out}/bin/sh"));
        assert_eq!(r.drv.args[0], format!("echo {dep_out} {dep_out}"));
        assert_eq!(r.drv.env[&format!("k{dep_out}")], dep_out.to_string());
        assert_eq!(r.drv_path, r.drv.drv_path("t").unwrap());
        assert_eq!(r.key("out").unwrap().drv_path, r.drv_path);
        assert!(r.key("dev").is_none());
        let e = resolve_with(&d, "t", &BTreeMap::new()).unwrap_err();
        assert!(matches!(e, ResolveError::MissingInput { .. }), "{e}");
    }
}
