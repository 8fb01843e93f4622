//! The trust policy: which signers a closure verifier accepts for a step, and how many.
//!
//! What is here: the TOML format (`docs/trust-policy.md` defines it with examples), the trust
//! model (laut's `Key` / `Threshold(k, [..])`, plus attested-builder leaves whose predicate is an
//! SNP evidence policy), and its evaluation over the signers of one unresolved derivation.
//!
//! Semantics (laut's, with attested builders):
//! - a **signer** is a Nix key (by name, checked against the public key the policy lists), or a
//!   **chip** that produced SNP evidence passing a builder rule (CHIP_ID; for VLEK-signed reports
//!   whose CHIP_ID is masked, the VLEK). A simulated chip is a signer only under a rule whose
//!   evidence policy names the simulated root;
//! - an entry covers a resolved derivation's whole output map; the signers of one output map of
//!   an unresolved derivation are the union over all entries claiming that exact map, so each
//!   signer counts once per unresolved derivation however many entries it signed;
//! - `key:<name>` holds when that key is among the signers; `builder:<rule>` when at least one
//!   chip passed the rule (`{ builder = "<rule>", at_least = n }`: n distinct chips);
//!   `{ threshold = k, of = [..] }` when at least k of its members hold. The model is monotone;
//! - within one model, too, a signer counts once: the leaves that make it hold must be lit by
//!   distinct signers, so a key named in two leaves, or a chip that passes two builder rules,
//!   lights only one of them ([`TrustModel::satisfied_by`]).
//!
//! What is not here: checking signatures or evidence (the verifier does that and hands the
//! resulting [`Signers`] to [`TrustPolicy::accepts`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::evidence::{EvidencePolicy, Measurements};

mod default;
mod satisfy;

pub use default::{manifest_measurements, DEFAULT_BUILDER, DEFAULT_MIN_TCB, NO_MANIFEST_FIX};
pub use satisfy::{Signers, MAX_COMPETING_LEAVES};

/// The largest policy file [`TrustPolicy::load`] reads. Policies are a few KiB; the TOML
/// parser keeps up to about 530 bytes of heap per input byte on malformed input (measured by
/// the `trust_policy` fuzz target), so this bounds what a policy file can cost.
pub const MAX_POLICY_BYTES: u64 = 256 << 10;

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read trust policy {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed.
    #[error("trust policy is not valid TOML for the schema")]
    Toml(#[source] toml::de::Error),
    /// The policy is inconsistent.
    #[error("trust policy: {0}")]
    Invalid(String),
}

/// A trust model term.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TrustModel {
    /// `"key:<name>"` or `"builder:<rule>"`.
    Leaf(String),
    /// `{ builder = "<rule>", at_least = n }`: n distinct chips passing the rule.
    Builder {
        /// Rule name.
        builder: String,
        /// Distinct chips needed.
        at_least: usize,
    },
    /// `{ threshold = k, of = [..] }`.
    Threshold {
        /// How many members must hold.
        threshold: usize,
        /// The members.
        of: Vec<TrustModel>,
    },
}

/// An attested-builder rule: evidence that passes `evidence` comes from a trusted builder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderRule {
    /// The SNP evidence policy (products, simulated roots, VLEK, policy bits, minimum TCB,
    /// allowed measurements); see `docs/evidence.md`.
    #[serde(default)]
    pub evidence: EvidencePolicy,
    /// Image manifests (`vouch image build` output) whose expected launch measurement is
    /// allowed, in addition to `evidence.measurements`. Resolved relative to the policy file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_manifests: Vec<String>,
}

/// Rules for fixed-output derivations (accepted by their declared hash alone).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FixedOutputRule {
    /// Accept md5- and sha1-declared fixed outputs (default: no).
    pub allow_weak_hashes: bool,
}

/// A trust policy (TOML). See the module documentation and `docs/trust-policy.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustPolicy {
    /// Nix public keys by name: `name = "name:<base64 ed25519 public key>"`.
    #[serde(default)]
    pub keys: BTreeMap<String, String>,
    /// Attested-builder rules by name.
    #[serde(default)]
    pub builders: BTreeMap<String, BuilderRule>,
    /// What every step must satisfy.
    pub require: TrustModel,
    /// Fixed-output derivations.
    #[serde(default)]
    pub fixed_output: FixedOutputRule,
    /// The transparency logs every accepted step must be in, and their witnesses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogPolicy>,
}

/// `[log]`: every step the verifier accepts must be included in one of these transparency logs
/// (`docs/transparency-log.md`), through a checkpoint cosigned by `quorum` of the witnesses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogPolicy {
    /// Log verifier keys, `<origin>+<key id>+<base64 key>` (the log's `log.note-vkey`).
    pub keys: Vec<String>,
    /// Witness cosigning keys (`cosignature/v1` vkeys, `vouch log witness` prints its own).
    #[serde(default)]
    pub witnesses: Vec<String>,
    /// How many distinct witnesses must have cosigned the checkpoint used.
    #[serde(default)]
    pub quorum: usize,
}

impl LogPolicy {
    /// The parsed keys.
    pub fn trust(&self) -> Result<crate::tlog::proof::LogTrust, PolicyError> {
        let parse = |k: &String, cosigner: bool| {
            let key = crate::tlog::NoteVerifierKey::parse(k)
                .map_err(|e| PolicyError::Invalid(format!("[log]: {e}")))?;
            if key.cosigner != cosigner {
                let want =
                    if cosigner { "a witness (cosignature/v1)" } else { "a log (Ed25519 note)" };
                return Err(PolicyError::Invalid(format!("[log]: {k} is not {want} key")));
            }
            Ok(key)
        };
        let logs = self.keys.iter().map(|k| parse(k, false)).collect::<Result<Vec<_>, _>>()?;
        let witnesses =
            self.witnesses.iter().map(|k| parse(k, true)).collect::<Result<Vec<_>, _>>()?;
        if logs.is_empty() {
            return Err(PolicyError::Invalid("[log] names no log key".into()));
        }
        let distinct: BTreeSet<&str> = witnesses.iter().map(|w| w.name.as_str()).collect();
        if self.quorum > distinct.len() {
            return Err(PolicyError::Invalid(format!(
                "[log] quorum {} of {} distinct witnesses can never be met",
                self.quorum,
                distinct.len()
            )));
        }
        Ok(crate::tlog::proof::LogTrust { logs, witnesses, quorum: self.quorum })
    }
}

/// A policy ready for the verifier: parsed keys, and each builder rule's evidence policy with
/// the measurements of its image manifests added.
#[derive(Debug, Clone)]
pub struct PreparedPolicy {
    /// The policy as written.
    pub policy: TrustPolicy,
    /// Its Nix public keys.
    pub keys: Vec<nix_formats::signing::PublicKey>,
    /// The same keys, ready to verify JWS.
    pub jws_keys: crate::jws::JwsKeys,
    /// Builder rules by name, with their effective evidence policy.
    pub rules: Vec<(String, EvidencePolicy)>,
}

impl PreparedPolicy {
    /// The builder rules that accept any launch measurement (`measurements = "any"`): every
    /// result under such a policy must say ANY GUEST first.
    pub fn any_guest_rules(&self) -> Vec<&str> {
        self.rules
            .iter()
            .filter(|(_, ev)| ev.measurements == Some(Measurements::Any))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// The line every result starts with when [`Self::any_guest_rules`] is not empty.
    pub fn any_guest_banner(&self) -> Option<String> {
        let rules = self.any_guest_rules();
        (!rules.is_empty()).then(|| {
            format!(
                "ANY GUEST: builder rule(s) {} accept any launch measurement (measurements = \
                 \"any\"): a statement they vouch for may come from any SEV-SNP guest, \
                 including one its host wrote",
                rules.join(", ")
            )
        })
    }

    /// Whether `signers` satisfy the policy's requirement.
    pub fn accepts(&self, signers: &Signers) -> bool {
        self.policy.accepts(signers)
    }
}

impl TrustPolicy {
    /// Parse and check a policy; relative `image_manifests` are left as written.
    pub fn from_toml(text: &str) -> Result<TrustPolicy, PolicyError> {
        let policy: TrustPolicy = toml::from_str(text).map_err(PolicyError::Toml)?;
        policy.check()?;
        Ok(policy)
    }

    /// Read a policy file; relative image manifest paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<TrustPolicy, PolicyError> {
        let read = |source| PolicyError::Read { path: path.display().to_string(), source };
        let size = std::fs::metadata(path).map_err(read)?.len();
        if size > MAX_POLICY_BYTES {
            return Err(PolicyError::Invalid(format!(
                "{} is {size} bytes; a trust policy may be at most {MAX_POLICY_BYTES} bytes",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let mut policy = TrustPolicy::from_toml(&text)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for rule in policy.builders.values_mut() {
            for m in &mut rule.image_manifests {
                if Path::new(m).is_relative() {
                    *m = base.join(&*m).display().to_string();
                }
            }
        }
        Ok(policy)
    }

    /// The TOML form.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Check that every leaf names something defined and every key parses as a Nix public key
    /// with the name it is listed under.
    pub fn check(&self) -> Result<(), PolicyError> {
        let mut seen: BTreeMap<Vec<u8>, &str> = BTreeMap::new();
        for (name, key) in &self.keys {
            let parsed = nix_formats::signing::PublicKey::parse(key)
                .map_err(|e| PolicyError::Invalid(format!("key `{name}`: {e}")))?;
            let key_name = parsed.name();
            if key_name != name {
                return Err(PolicyError::Invalid(format!(
                    "key listed as `{name}` is named `{key_name}` in its key string"
                )));
            }
            // One signer under two names would count twice.
            if let Some(other) = seen.insert(parsed.to_bytes().to_vec(), name) {
                return Err(PolicyError::Invalid(format!(
                    "keys `{other}` and `{name}` are the same public key (one signer would count twice)"
                )));
            }
        }
        if let Some(log) = &self.log {
            log.trust()?;
        }
        let competing = self.require.competing_leaves();
        if competing > MAX_COMPETING_LEAVES {
            return Err(PolicyError::Invalid(format!(
                "{competing} builder leaves or repeated key leaves; at most {MAX_COMPETING_LEAVES}"
            )));
        }
        self.require.check(self)?;
        for (name, rule) in &self.builders {
            match (&rule.evidence.measurements, rule.image_manifests.is_empty()) {
                (None, true) => {
                    return Err(PolicyError::Invalid(format!(
                        "builder rule `{name}` pins no launch measurement, so any guest would \
                         pass: add `measurements` or `image_manifests`, or say \
                         `measurements = \"any\"` if that is what you want"
                    )))
                }
                (Some(Measurements::Any), false) => {
                    return Err(PolicyError::Invalid(format!(
                        "builder rule `{name}` says `measurements = \"any\"` and names image \
                         manifests: choose one"
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Resolve image manifests and parse keys, once per verification.
    pub fn prepare(&self) -> Result<PreparedPolicy, PolicyError> {
        self.check()?;
        let mut rules = Vec::new();
        for (name, rule) in &self.builders {
            let mut ev = rule.evidence.clone();
            let simulated = !ev.simulated_roots.is_empty();
            for m in &rule.image_manifests {
                let ms = manifest_measurements(Path::new(m), simulated)?;
                let list = match ev.measurements.take() {
                    Some(Measurements::Only(mut l)) => {
                        l.extend(ms);
                        l
                    }
                    _ => ms,
                };
                ev.measurements = Some(Measurements::Only(list));
            }
            rules.push((name.clone(), ev));
        }
        let keys = self.public_keys();
        let jws_keys = crate::jws::JwsKeys::new(&keys);
        Ok(PreparedPolicy { policy: self.clone(), keys, jws_keys, rules })
    }

    /// The policy's Nix public keys.
    pub fn public_keys(&self) -> Vec<nix_formats::signing::PublicKey> {
        self.keys.values().filter_map(|k| nix_formats::signing::PublicKey::parse(k).ok()).collect()
    }

    /// Whether `signers` satisfy the policy's requirement.
    pub fn accepts(&self, signers: &Signers) -> bool {
        self.require.satisfied_by(signers)
    }

    /// Whether any builder rule names a simulated root.
    pub fn trusts_simulated(&self) -> bool {
        self.builders.values().any(|r| !r.evidence.simulated_roots.is_empty())
    }
}
