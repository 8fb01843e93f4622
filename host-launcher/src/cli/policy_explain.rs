//! What `vouch policy check` says about a trust policy: where a misplaced key belongs (read from
//! the TOML before the schema refuses it), and, for a valid policy, its requirement in words and
//! the sets of signers that could satisfy it.
//!
//! The diagnosis walks the TOML tree with the schema of `docs/trust-policy.md` in mind: the
//! top level holds `require`, `[keys]`, `[builders.NAME]` (`image_manifests`, and the evidence
//! policy of `docs/evidence.md` under `[builders.NAME.evidence]`), `[fixed_output]`, `[log]`.
//! The classic trap is an evidence policy given where a trust policy is expected.

use build_trace::evidence::EvidencePolicy;
use build_trace::trust::{BuilderRule, TrustModel, TrustPolicy};
use serde::Serialize;

/// The keys of an evidence policy (`docs/evidence.md`).
const EVIDENCE_KEYS: [&str; 8] = [
    "products",
    "simulated_roots",
    "allow_vlek",
    "vmpl",
    "guest_policy",
    "min_tcb",
    "measurements",
    "check_time",
];

/// The top-level keys of a trust policy.
const TOP_KEYS: [&str; 5] = ["require", "keys", "builders", "fixed_output", "log"];

/// A misplaced or unknown key, and where it belongs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Where in the file (`top level`, `[keys]`, `[builders.prod]`, …).
    pub at: String,
    /// What is wrong and where it belongs.
    pub message: String,
}

fn problem(at: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem { at: at.into(), message: message.into() }
}

/// Whether `s` looks like a Nix public key string (`name:base64`).
fn looks_like_nix_key(s: &str) -> bool {
    s.split_once(':').is_some_and(|(n, k)| !n.is_empty() && k.len() == 44 && k.ends_with('='))
}

/// Misplaced keys in a parsed TOML document meant as a trust policy.
pub fn diagnose(doc: &toml::Table) -> Vec<Problem> {
    let mut out = Vec::new();
    let evidence_keys: Vec<&str> =
        doc.keys().map(String::as_str).filter(|k| EVIDENCE_KEYS.contains(k)).collect();
    if !doc.contains_key("require") && !doc.contains_key("builders") && !evidence_keys.is_empty() {
        out.push(problem(
            "top level",
            format!(
                "this is an evidence policy (docs/evidence.md: {}), not a trust policy \
                 (docs/trust-policy.md). A trust policy names who may vouch: put these keys \
                 under [builders.NAME.evidence] and add `require = \"builder:NAME\"` at the top \
                 (`vouch policy init` writes one)",
                evidence_keys.join(", ")
            ),
        ));
        return out;
    }
    for (key, value) in doc {
        let msg = match key.as_str() {
            k if TOP_KEYS.contains(&k) => continue,
            k if EVIDENCE_KEYS.contains(&k) => format!(
                "`{k}` is an evidence-policy key: it belongs under [builders.NAME.evidence]"
            ),
            "image_manifests" => "`image_manifests` belongs under [builders.NAME]".into(),
            "allow_weak_hashes" => "`allow_weak_hashes` belongs under [fixed_output]".into(),
            k if value.as_str().is_some_and(looks_like_nix_key) => {
                format!("`{k}` looks like a Nix public key: it belongs under [keys]")
            }
            k => format!("unknown key `{k}` (a trust policy has {})", TOP_KEYS.join(", ")),
        };
        out.push(problem("top level", msg));
    }
    let table = |k: &str| doc.get(k).and_then(toml::Value::as_table);
    let mut tables: Vec<(String, &toml::Table)> = Vec::new();
    for k in ["keys", "fixed_output", "log"] {
        if let Some(t) = table(k) {
            tables.push((format!("[{k}]"), t));
        }
    }
    if let Some(builders) = table("builders") {
        for (name, rule) in builders {
            let Some(rule) = rule.as_table() else {
                out.push(problem(
                    "[builders]",
                    format!("`{name}` must be a table: [builders.{name}]"),
                ));
                continue;
            };
            let at = format!("[builders.{name}]");
            for k in rule.keys() {
                if EVIDENCE_KEYS.contains(&k.as_str()) {
                    out.push(problem(
                        &at,
                        format!("`{k}` belongs under [builders.{name}.evidence]"),
                    ));
                } else if !["evidence", "image_manifests", "require"].contains(&k.as_str()) {
                    out.push(problem(&at, format!("unknown key `{k}` (a builder rule has image_manifests and [builders.{name}.evidence])")));
                }
            }
            if let Some(ev) = rule.get("evidence").and_then(toml::Value::as_table) {
                if ev.contains_key("image_manifests") {
                    out.push(problem(
                        format!("[builders.{name}.evidence]"),
                        format!(
                            "`image_manifests` belongs under [builders.{name}], beside `evidence`"
                        ),
                    ));
                }
                tables.push((format!("[builders.{name}.evidence]"), ev));
            }
            tables.push((at, rule));
        }
    }
    for (at, t) in tables {
        if t.contains_key("require") {
            out.push(problem(
                &at,
                format!(
                    "`require` belongs at the top level: TOML puts a key written after a \
                     [table] header into that table ({at} here), so write `require` before \
                     the first [table]"
                ),
            ));
        }
    }
    out
}

/// One way to satisfy a policy: the signers it takes.
pub type SignerSet = Vec<String>;

/// Most signer sets listed; a larger policy says how many more there are.
const MAX_SETS: usize = 16;

/// The minimal sets of leaves that satisfy `term` (each set: leaf descriptions), at most
/// [`MAX_SETS`] + 1 of them.
pub fn satisfying_sets(term: &TrustModel) -> Vec<SignerSet> {
    match term {
        TrustModel::Leaf(l) => vec![vec![leaf_words(l, 1)]],
        TrustModel::Builder { builder, at_least } => {
            vec![vec![leaf_words(&format!("builder:{builder}"), *at_least)]]
        }
        TrustModel::Threshold { threshold, of } => {
            let alts: Vec<Vec<SignerSet>> = of.iter().map(satisfying_sets).collect();
            let mut out = Vec::new();
            for combo in combinations(of.len(), *threshold) {
                let mut partial: Vec<SignerSet> = vec![Vec::new()];
                for i in combo {
                    partial = partial
                        .iter()
                        .flat_map(|p| alts[i].iter().map(move |a| [p.clone(), a.clone()].concat()))
                        .take(MAX_SETS + 1)
                        .collect();
                }
                out.extend(partial);
                if out.len() > MAX_SETS {
                    break;
                }
            }
            out.truncate(MAX_SETS + 1);
            out
        }
    }
}

/// Every `k`-subset of `0..n`, in order.
fn combinations(n: usize, k: usize) -> Vec<Vec<usize>> {
    if k == 0 {
        return vec![Vec::new()];
    }
    if k > n {
        return Vec::new();
    }
    let mut out = Vec::new();
    for first in 0..=(n - k) {
        for rest in combinations(n - first - 1, k - 1) {
            let mut c = vec![first];
            c.extend(rest.into_iter().map(|r| r + first + 1));
            out.push(c);
        }
    }
    out
}

fn leaf_words(leaf: &str, n: usize) -> String {
    match leaf.split_once(':') {
        Some(("key", name)) => format!("Nix key `{name}`"),
        Some(("builder", rule)) if n == 1 => format!("one chip passing builder rule `{rule}`"),
        Some(("builder", rule)) => format!("{n} distinct chips passing builder rule `{rule}`"),
        _ => leaf.to_owned(),
    }
}

/// The requirement in words.
pub fn requirement_words(term: &TrustModel) -> String {
    match term {
        TrustModel::Leaf(l) => leaf_words(l, 1),
        TrustModel::Builder { builder, at_least } => {
            leaf_words(&format!("builder:{builder}"), *at_least)
        }
        TrustModel::Threshold { threshold, of } => format!(
            "{threshold} of ({})",
            of.iter().map(requirement_words).collect::<Vec<_>>().join("; ")
        ),
    }
}

/// How many launch measurements an evidence policy allows: a count, or `"any"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Pinned {
    /// This many (0: none pinned).
    Count(usize),
    /// `measurements = "any"`.
    Any(&'static str),
}

impl std::fmt::Display for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pinned::Count(n) => write!(f, "{n} launch measurement(s) allowed"),
            Pinned::Any(_) => f.write_str("ANY launch measurement allowed"),
        }
    }
}

/// The measurements `ev` pins, read through their TOML/JSON form (a list, or `"any"`).
pub fn pinned(ev: &EvidencePolicy) -> Pinned {
    match serde_json::to_value(&ev.measurements) {
        Ok(serde_json::Value::Array(list)) => Pinned::Count(list.len()),
        Ok(serde_json::Value::String(w)) if w == "any" => Pinned::Any("any"),
        _ => Pinned::Count(0),
    }
}

/// What a builder rule accepts, and warnings about it.
#[derive(Debug, Clone, Serialize)]
pub struct RuleSummary {
    /// Roots that may vouch: AMD products and simulated roots.
    pub roots: Vec<String>,
    /// Whether any root is simulated.
    pub simulated: bool,
    /// Whether VLEK-signed reports count.
    pub allow_vlek: bool,
    /// The VMPL reports must come from.
    pub vmpl: u32,
    /// Launch measurements allowed (the policy's and its image manifests').
    pub measurements: Pinned,
    /// Image manifests whose measurements are allowed.
    pub image_manifests: Vec<String>,
    /// Things a reviewer should know.
    pub warnings: Vec<String>,
}

/// Summarise builder rule `rule`.
pub fn summarise(rule: &BuilderRule) -> RuleSummary {
    let ev: &EvidencePolicy = &rule.evidence;
    let mut roots: Vec<String> = ev.products.iter().map(|p| format!("AMD {p}")).collect();
    roots.extend(ev.simulated_roots.iter().map(|r| format!("SIMULATED root {r}")));
    let measurements = pinned(ev);
    let mut warnings = Vec::new();
    if !ev.simulated_roots.is_empty() {
        warnings
            .push("names a simulated root: its evidence proves nothing about hardware".to_owned());
    }
    if ev.products.iter().any(|p| p.to_string() == "Milan") {
        warnings.push(
            "accepts Milan: see the Milan caveat in docs/evidence.md (high assurance: \
             products = [\"Genoa\", \"Turin\"])"
                .to_owned(),
        );
    }
    if measurements == Pinned::Any("any") {
        warnings
            .push("accepts any launch measurement (measurements = \"any\"): ANY GUEST".to_owned());
    }
    if measurements == Pinned::Count(0) && rule.image_manifests.is_empty() {
        warnings.push(
            "pins no launch measurement: any guest image counts (add image_manifests or \
             measurements)"
                .to_owned(),
        );
    }
    if ev.allow_vlek {
        warnings.push("accepts VLEK-signed reports (a cloud provider's key)".to_owned());
    }
    if ev.guest_policy.allow_debug {
        warnings.push("accepts DEBUG guests: the host can read and write their memory".into());
    }
    RuleSummary {
        roots,
        simulated: !ev.simulated_roots.is_empty(),
        allow_vlek: ev.allow_vlek,
        vmpl: ev.vmpl,
        measurements,
        image_manifests: rule.image_manifests.clone(),
        warnings,
    }
}

/// Keys and rules the policy defines but its requirement never names.
pub fn unused(policy: &TrustPolicy) -> Vec<String> {
    fn leaves(t: &TrustModel, out: &mut Vec<String>) {
        match t {
            TrustModel::Leaf(l) => out.push(l.clone()),
            TrustModel::Builder { builder, .. } => out.push(format!("builder:{builder}")),
            TrustModel::Threshold { of, .. } => of.iter().for_each(|m| leaves(m, out)),
        }
    }
    let mut named = Vec::new();
    leaves(&policy.require, &mut named);
    let keys = policy.keys.keys().map(|k| format!("key:{k}"));
    let rules = policy.builders.keys().map(|r| format!("builder:{r}"));
    keys.chain(rules).filter(|l| !named.contains(l)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn an_evidence_policy_is_recognised() {
        let p = diagnose(&doc("products = [\"Genoa\"]\nallow_vlek = false\n"));
        assert_eq!(p.len(), 1);
        assert!(p[0].message.contains("evidence policy"), "{p:?}");
        assert!(p[0].message.contains("[builders.NAME.evidence]"), "{p:?}");
    }

    #[test]
    fn misplaced_keys_say_where_they_belong() {
        let p = diagnose(&doc(
            "require = \"builder:b\"\nimage_manifests = []\n[builders.b]\nproducts = [\"Genoa\"]\n\
             [builders.b.evidence]\nimage_manifests = [\"m\"]\n[keys]\nrequire = \"key:x\"\n",
        ));
        let text = format!("{p:?}");
        assert!(text.contains("`image_manifests` belongs under [builders.NAME]"), "{text}");
        assert!(text.contains("`products` belongs under [builders.b.evidence]"), "{text}");
        assert!(text.contains("beside `evidence`"), "{text}");
        assert!(text.contains("`require` belongs at the top level"), "{text}");
        assert!(diagnose(&doc("require = \"key:a\"\n[keys]\na = \"a:x\"\n")).is_empty());
    }

    #[test]
    fn signer_sets_enumerate_thresholds() {
        let t: TrustModel = toml::from_str::<toml::Table>(
            "r = { threshold = 2, of = [\"key:a\", \"key:b\", { builder = \"p\", at_least = 2 }] }",
        )
        .unwrap()["r"]
            .clone()
            .try_into()
            .unwrap();
        let sets = satisfying_sets(&t);
        assert_eq!(sets.len(), 3, "{sets:?}");
        assert_eq!(sets[0], ["Nix key `a`", "Nix key `b`"]);
        assert_eq!(sets[2], ["Nix key `b`", "2 distinct chips passing builder rule `p`"]);
        assert_eq!(combinations(4, 2).len(), 6);
        assert!(combinations(1, 2).is_empty());
    }
}
