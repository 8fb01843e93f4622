//! Evaluating a trust model over the signers of one unresolved derivation: each leaf needs its
//! own distinct signers ([`TrustModel::satisfied_by`]), found by trying the subsets of the
//! competing leaves and matching leaves to signers with augmenting paths; and the model's own
//! consistency check against the policy that holds it.

use std::collections::{BTreeMap, BTreeSet};

use super::{PolicyError, TrustModel, TrustPolicy};

/// The signers of one output map of one unresolved derivation, after the verifier checked
/// their signatures and evidence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signers {
    /// Names of policy keys with a valid signature.
    pub keys: BTreeSet<String>,
    /// For each builder rule, the distinct chips (their display names) whose evidence passed it.
    pub chips: BTreeMap<String, BTreeSet<String>>,
    /// The names in `chips` that stand for VLEK-signed reports. A VLEK identifies no chip (the
    /// host chooses MASK_CHIP_ID, and one VLEK serves many chips, one chip many VLEKs), so such
    /// a signer lights at most one builder leaf that needs a single chip, and nothing else
    /// counting chips may be lit with it.
    pub vleks: BTreeSet<String>,
}

impl Signers {
    /// Add the signers of another entry (set union: each signer counts once).
    pub fn merge(&mut self, other: &Signers) {
        self.keys.extend(other.keys.iter().cloned());
        for (rule, chips) in &other.chips {
            self.chips.entry(rule.clone()).or_default().extend(chips.iter().cloned());
        }
        self.vleks.extend(other.vleks.iter().cloned());
    }

    /// Count evidence `v` that passed builder rule `rule`: a chip by CHIP_ID, or, signed by a
    /// VLEK, a signer that identifies no chip (see [`Signers::vleks`]).
    pub fn add_evidence(&mut self, rule: &str, v: &crate::evidence::VerifiedEvidence) {
        let mut name = v.signer.to_string();
        if v.vek_kind == crate::evidence::VekKind::Vlek {
            if !matches!(v.signer, crate::evidence::Signer::Vlek(_)) {
                name = format!("{name} (VLEK-signed)");
            }
            self.vleks.insert(name.clone());
        }
        self.chips.entry(rule.to_owned()).or_default().insert(name);
    }

    /// Whether there are no signers at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.chips.values().all(BTreeSet::is_empty)
    }
}

/// The most leaves that can compete for one signer (builder leaves, and key leaves naming a key
/// named by another leaf too): [`TrustModel::satisfied_by`] tries their subsets.
pub const MAX_COMPETING_LEAVES: usize = 16;

/// A signer as a trust model leaf sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum SignerId<'a> {
    Key(&'a str),
    Chip(&'a str),
    Vlek(&'a str),
}

/// What one leaf needs: `need` distinct signers out of `candidates`.
#[derive(Debug, Clone)]
struct Demand<'a> {
    candidates: Vec<SignerId<'a>>,
    need: usize,
    /// A builder leaf (its signers are chips).
    builder: bool,
}

impl TrustModel {
    /// Whether `signers` satisfy this term, **each signer counting once**: some set of leaves
    /// that makes the term hold must be lit by pairwise distinct signers (a key named by two
    /// leaves, or a chip that passed two builder rules, lights only one of them). Laut gets
    /// this by allowing each key in one leaf only; builder rules may overlap, so this is a
    /// small bipartite matching over the leaves that compete for a signer.
    ///
    /// A VLEK-signed report identifies no chip: it may light one builder leaf that needs one
    /// chip, and then no other builder leaf is lit (it could be the same machine); otherwise
    /// only chips count.
    pub fn satisfied_by(&self, signers: &Signers) -> bool {
        let mut leaves = Vec::new();
        self.demands(signers, &mut leaves);
        let is_vlek = |c: &SignerId<'_>| matches!(c, SignerId::Vlek(_));
        let chips_only: Vec<Demand<'_>> = leaves
            .iter()
            .map(|l| Demand {
                candidates: l.candidates.iter().copied().filter(|c| !is_vlek(c)).collect(),
                ..l.clone()
            })
            .collect();
        if self.satisfiable(&chips_only) {
            return true;
        }
        (0..leaves.len()).filter(|&i| leaves[i].need == 1).any(|i| {
            let vleks: Vec<SignerId<'_>> =
                leaves[i].candidates.iter().copied().filter(is_vlek).collect();
            if vleks.is_empty() {
                return false;
            }
            let alone: Vec<Demand<'_>> = leaves
                .iter()
                .enumerate()
                .map(|(j, l)| match (j == i, l.builder) {
                    (true, _) => Demand { candidates: vleks.clone(), ..l.clone() },
                    (false, true) => Demand { candidates: Vec::new(), ..l.clone() },
                    (false, false) => l.clone(),
                })
                .collect();
            self.satisfiable(&alone)
        })
    }

    /// Whether the term holds with some set of leaves lit by pairwise distinct signers.
    fn satisfiable(&self, leaves: &[Demand<'_>]) -> bool {
        let possible: Vec<bool> = leaves.iter().map(|l| l.candidates.len() >= l.need).collect();
        if !self.holds(&possible, &mut 0) {
            return false;
        }
        let competing: Vec<usize> = (0..leaves.len())
            .filter(|&i| {
                possible[i]
                    && (0..leaves.len()).any(|j| {
                        j != i
                            && possible[j]
                            && leaves[i].candidates.iter().any(|c| leaves[j].candidates.contains(c))
                    })
            })
            .collect();
        if competing.is_empty() {
            return true;
        }
        // Leaves that compete with none are always lit; try the competing ones' subsets.
        let n = competing.len().min(MAX_COMPETING_LEAVES);
        (0..1u32 << n).rev().any(|mask| {
            let chosen: Vec<usize> = competing
                .iter()
                .enumerate()
                .filter(|&(b, _)| b < n && mask & (1 << b) != 0)
                .map(|(_, &i)| i)
                .collect();
            let mut lit = possible.clone();
            for &i in &competing {
                lit[i] = chosen.contains(&i);
            }
            self.holds(&lit, &mut 0) && distinct_signers(leaves, &chosen)
        })
    }

    /// Each leaf's demand, in depth-first order.
    fn demands<'a>(&self, signers: &'a Signers, out: &mut Vec<Demand<'a>>) {
        let chips = |rule: &str| -> Vec<SignerId<'a>> {
            signers
                .chips
                .get(rule)
                .map(|c| {
                    c.iter()
                        .map(|c| match signers.vleks.contains(c) {
                            true => SignerId::Vlek(c.as_str()),
                            false => SignerId::Chip(c.as_str()),
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        match self {
            TrustModel::Leaf(leaf) => {
                let (candidates, builder) = match leaf.split_once(':') {
                    Some(("key", name)) => (
                        signers
                            .keys
                            .get(name)
                            .map(|k| vec![SignerId::Key(k.as_str())])
                            .unwrap_or_default(),
                        false,
                    ),
                    Some(("builder", rule)) => (chips(rule), true),
                    _ => (Vec::new(), false),
                };
                out.push(Demand { candidates, need: 1, builder });
            }
            TrustModel::Builder { builder, at_least } => {
                out.push(Demand { candidates: chips(builder), need: *at_least, builder: true });
            }
            TrustModel::Threshold { of, .. } => of.iter().for_each(|m| m.demands(signers, out)),
        }
    }

    /// Whether the term holds when exactly the leaves marked in `lit` (depth-first order, from
    /// index `*next`) hold.
    fn holds(&self, lit: &[bool], next: &mut usize) -> bool {
        match self {
            TrustModel::Leaf(_) | TrustModel::Builder { .. } => {
                *next += 1;
                lit[*next - 1]
            }
            TrustModel::Threshold { threshold, of } => {
                // Every member is visited, so that leaf indices stay in step.
                let held = of.iter().map(|m| m.holds(lit, next)).filter(|&h| h).count();
                held >= *threshold
            }
        }
    }

    /// The leaves whose signers may compete: builder leaves, and key leaves whose key another
    /// leaf names too.
    pub(super) fn competing_leaves(&self) -> usize {
        let mut keys: BTreeMap<&str, usize> = BTreeMap::new();
        let mut builders = 0;
        let mut stack = vec![self];
        while let Some(m) = stack.pop() {
            match m {
                TrustModel::Leaf(leaf) => match leaf.split_once(':') {
                    Some(("key", name)) => *keys.entry(name).or_default() += 1,
                    _ => builders += 1,
                },
                TrustModel::Builder { .. } => builders += 1,
                TrustModel::Threshold { of, .. } => stack.extend(of),
            }
        }
        builders + keys.values().filter(|&&n| n > 1).sum::<usize>()
    }

    pub(super) fn check(&self, policy: &TrustPolicy) -> Result<(), PolicyError> {
        match self {
            TrustModel::Leaf(leaf) => match leaf.split_once(':') {
                Some(("key", name)) if policy.keys.contains_key(name) => Ok(()),
                Some(("builder", rule)) if policy.builders.contains_key(rule) => Ok(()),
                Some(("key" | "builder", _)) => Err(PolicyError::Invalid(format!(
                    "`{leaf}` names no key or builder rule in the policy"
                ))),
                _ => Err(PolicyError::Invalid(format!(
                    "`{leaf}` is neither `key:<name>` nor `builder:<rule>`"
                ))),
            },
            TrustModel::Builder { builder, at_least } => {
                if !policy.builders.contains_key(builder) {
                    return Err(PolicyError::Invalid(format!("no builder rule `{builder}`")));
                }
                if *at_least == 0 {
                    return Err(PolicyError::Invalid(format!(
                        "builder `{builder}`: at_least = 0 accepts anything"
                    )));
                }
                Ok(())
            }
            TrustModel::Threshold { threshold, of } => {
                if *threshold == 0 || *threshold > of.len() {
                    return Err(PolicyError::Invalid(format!(
                        "threshold {threshold} of {} members can never be met or is always met",
                        of.len()
                    )));
                }
                of.iter().try_for_each(|m| m.check(policy))
            }
        }
    }
}

/// Whether every leaf in `chosen` can get its own distinct signers (Kuhn's augmenting paths,
/// one slot per needed signer).
fn distinct_signers(leaves: &[Demand<'_>], chosen: &[usize]) -> bool {
    fn augment<'a>(
        slot: usize,
        slots: &[usize],
        leaves: &[Demand<'a>],
        owner: &mut BTreeMap<SignerId<'a>, usize>,
        seen: &mut BTreeSet<SignerId<'a>>,
    ) -> bool {
        for &c in &leaves[slots[slot]].candidates {
            if !seen.insert(c) {
                continue;
            }
            let free = match owner.get(&c) {
                None => true,
                Some(&other) => augment(other, slots, leaves, owner, seen),
            };
            if free {
                owner.insert(c, slot);
                return true;
            }
        }
        false
    }
    let slots: Vec<usize> =
        chosen.iter().flat_map(|&i| std::iter::repeat_n(i, leaves[i].need)).collect();
    let mut owner = BTreeMap::new();
    (0..slots.len()).all(|s| augment(s, &slots, leaves, &mut owner, &mut BTreeSet::new()))
}
