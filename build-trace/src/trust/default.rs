//! The default trust policy of `vouch verify` (no `--policy`) and what it pins: the launch
//! measurements of image manifests, and AMD's minimum TCB per product from
//! `build-trace/data/min-tcb.toml`. `docs/trust-policy.md` ("The default policy") states it.
//! Not here: the policy format and the trust model (the parent module).

use std::collections::BTreeMap;
use std::path::Path;

use super::{BuilderRule, FixedOutputRule, PolicyError, TrustModel, TrustPolicy};
use crate::evidence::{EvidencePolicy, Measurement};

/// The name of the builder rule of the default policy ([`TrustPolicy::default_for`]).
pub const DEFAULT_BUILDER: &str = "amd";

/// The minimum TCB per product of the default policy, each value citing the AMD security
/// bulletin it comes from (`build-trace/data/min-tcb.toml`).
pub const DEFAULT_MIN_TCB: &str = include_str!("../../data/min-tcb.toml");

/// What to do when the default policy has no measurement to pin.
pub const NO_MANIFEST_FIX: &str = "pass --image-manifest FILE (the manifest.json of the guest \
     image you trust, built by `vouch image build` with an AmdSev OVMF), put it in the default \
     image directory, or write a policy (--policy) that pins `measurements` — or says \
     `measurements = \"any\"` to accept any SEV-SNP guest";

impl TrustPolicy {
    /// The default policy (`vouch verify` without `--policy`): genuine AMD SEV-SNP evidence of
    /// Genoa or Turin (Milan is off: see `docs/evidence.md`), each at least at the minimum TCB
    /// of [`DEFAULT_MIN_TCB`], no VLEK, VMPL 0, no debug or migration agent, no simulated root,
    /// one chip per step, and the launch measurements of `manifests` (image manifests). Without
    /// a manifest there is nothing to pin, and it is refused, naming the fix.
    pub fn default_for(manifests: &[String]) -> Result<TrustPolicy, PolicyError> {
        if manifests.is_empty() {
            return Err(PolicyError::Invalid(format!(
                "the default policy pins the launch measurement of a guest image, and none was \
                 given: {NO_MANIFEST_FIX}"
            )));
        }
        let min_tcb = toml::from_str(DEFAULT_MIN_TCB).map_err(PolicyError::Toml)?;
        let evidence = EvidencePolicy {
            products: vec![crate::evidence::Product::Genoa, crate::evidence::Product::Turin],
            min_tcb,
            ..EvidencePolicy::default()
        };
        Ok(TrustPolicy {
            keys: BTreeMap::new(),
            builders: BTreeMap::from([(
                DEFAULT_BUILDER.to_string(),
                BuilderRule { evidence, image_manifests: manifests.to_vec() },
            )]),
            require: TrustModel::Leaf(format!("builder:{DEFAULT_BUILDER}")),
            fixed_output: FixedOutputRule::default(),
            log: None,
        })
    }
}

/// The measurements an image manifest (`vouch image build`'s `manifest.json`) allows: its
/// expected SEV-SNP launch measurement, and its simulated measurement when `simulated`.
pub fn manifest_measurements(
    path: &Path,
    simulated: bool,
) -> Result<Vec<Measurement>, PolicyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| PolicyError::Read { path: path.display().to_string(), source })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| PolicyError::Invalid(format!("image manifest {}: {e}", path.display())))?;
    let mut out = Vec::new();
    let mut hexes: Vec<(String, &str)> = Vec::new();
    if let Some(h) = v.pointer("/snp/expected_measurement").and_then(serde_json::Value::as_str) {
        hexes.push(("snp.expected_measurement".into(), h));
    }
    // One per vCPU count and CPU model the image was measured for (each vCPU's VMSA is
    // measured): `snp.measurements[i].measurement`.
    let shapes = v.pointer("/snp/measurements").and_then(serde_json::Value::as_array);
    for (i, l) in shapes.into_iter().flatten().enumerate() {
        if let Some(h) = l.get("measurement").and_then(serde_json::Value::as_str) {
            hexes.push((format!("snp.measurements[{i}].measurement"), h));
        }
    }
    if simulated {
        if let Some(h) = v.pointer("/simulated_measurement").and_then(serde_json::Value::as_str) {
            hexes.push(("simulated_measurement".into(), h));
        }
    }
    for (f, hex) in hexes {
        let m = hex.parse().map_err(|e| {
            PolicyError::Invalid(format!("image manifest {} {f}: {e}", path.display()))
        })?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        return Err(PolicyError::Invalid(format!(
            "image manifest {} names no {}measurement (an image built without an AmdSev OVMF \
             has none): {NO_MANIFEST_FIX}",
            path.display(),
            if simulated { "" } else { "SEV-SNP launch " }
        )));
    }
    Ok(out)
}
