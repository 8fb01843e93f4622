//! The closure verifier.
//!
//! # Algorithm
//!
//! Input: the unresolved derivation graph of a target (`.drv` files or `nix show-derivation -r`
//! JSON), trace sources, a trust policy, optionally the output paths expected of the target.
//! The derivations are visited bottom-up (dependencies first); each gets a set of **accepted
//! output maps** (output name → path and, where a trace gave them, NAR hash, size, references).
//! Each derivation's ATerm must hash to its own `.drv` path (the graph may come from elsewhere).
//!
//! 1. **Fixed-output** derivation: accepted by its declared hash alone — the path must be the
//!    one the hash gives, and md5/sha1 are refused unless the policy allows them. It grounds
//!    the closure without contributing evidence; dependents check its content address.
//! 2. **Other** derivations: for every combination of its inputs' accepted output maps (at most
//!    [`MAX_COMBINATIONS`]), compute the step and its key:
//!    - floating CA (and deferred input-addressed): resolve it (`nix-formats` resolution); the
//!      key is the resolved drv path; the statement must carry exactly the resolved derivation;
//!    - input-addressed: its output paths must be the ones its hash modulo gives, and a deferred
//!      one may not declare any (`ownership::owned_paths`, the host's rule too); the key is its
//!      own drv path; the statement must carry it without input derivations, with input sources
//!      = sources ∪ input outputs (or, as Nix's build hook sends it, the whole input closure).
//! 3. Look the key up in every trace source. Each entry is checked in order, the first failure
//!    ending that entry: the statement parses (canonical bytes only) and is self-consistent; it
//!    carries the computed derivation; content-addressed outputs' paths follow from their `ca`;
//!    **signers**: its evidence verifies under a builder rule (AMD or named simulated root,
//!    measurement, TCB, policy bits, HOST_DATA = hash of the statement's launch — of its job for
//!    version-1 statements —, REPORT_DATA = hash of the statement) with the statement's
//!    measurement, and/or a JWS by a policy key
//!    describes it; **links**: every path of its input closure is reachable from the direct
//!    inputs, and is either an accepted output of one of the step's own (transitive) input
//!    derivations (facts are kept by producing derivation) with the same NAR hash,
//!    size and references, or content-addressed with a guest-recomputed `ca` that produces
//!    exactly its path (sources, fixed outputs).
//! 4. Entries that pass are grouped by output map; the signers of a map are the union over its
//!    entries (each signer counts once per unresolved derivation). A map is accepted when its
//!    signers satisfy the policy's trust model.
//! 5. A derivation with no accepted map is the **first broken link**: the verifier stops and
//!    names it, the check that failed and what it expected versus found.
//!
//! 6. **One launch per step** (`launches`): no two different statements that count towards
//!    accepted steps may carry the same launch nonce; a repeat is a broken link at the later step.
//!
//! At the target, with expected paths, some accepted map must contain every expected path;
//! otherwise the target's accepted outputs are reported. Work is linear in the closure size
//! times the number of combinations; evidence chains are verified once per chain (cached).
//!
//! With [`ClosureVerifier::threads`] > 1, the checks of step 3 that depend only on the entry
//! (statement, output addresses, signers) run on worker threads ahead of this walk, which
//! takes their results (`verify/ahead.rs`); the outcome is the same for every thread count.
//!
//! What is not here: reading the local Nix store or running Nix (the CLI does that), and the
//! evidence checks themselves ([`crate::evidence`]).

mod ahead;
mod derivation;
mod graph;
mod launches;
mod links;
mod outcome;
mod plan;
mod step;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use nix_formats::derivation::DrvGraph;
use nix_formats::StorePath;

#[cfg(feature = "remote")]
pub(crate) use graph::read_drv_file;
pub use graph::DrvSet;
pub use outcome::{AcceptedStep, BrokenLink, LinkCheck, Outcome, VerifiedClosure};
pub use plan::{Action, Buildable, PlanResult, PlannedStep, RebuildPlan};
pub use step::{check_entry_alone, EntryVerdict};

pub(crate) use derivation::combinations;
use derivation::Checked;
use launches::{LaunchSeen, Launches};
use links::{Admitted, Known};
use step::{Checker, EntryOk, Expectation, OutputClaim, Prechecked};

use crate::evidence::Verifier as EvidenceVerifier;
use crate::job::{BasicDerivation, StepKind};
use crate::store::{StoreError, TraceEntry, TraceSource};
use crate::trust::{PreparedPolicy, Signers};

/// The most input combinations tried for one derivation.
pub const MAX_COMBINATIONS: usize = 256;

/// Errors that stop verification before a verdict (exit code 2 in the CLI).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A `.drv` file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A derivation does not parse.
    #[error("derivation {drv}")]
    Derivation {
        /// Which.
        drv: String,
        /// The cause.
        #[source]
        source: nix_formats::derivation::DerivationError,
    },
    /// A derivation the graph needs is not there.
    #[error("derivation {drv} is not in the derivation set{}", needed_by.as_ref().map(|n| format!(" (needed by {n})")).unwrap_or_default())]
    MissingDrv {
        /// Which.
        drv: String,
        /// Who needs it.
        needed_by: Option<String>,
    },
    /// The graph has a cycle.
    #[error("the derivation graph has a cycle through {0}")]
    Cycle(String),
    /// A trace source failed.
    #[error("trace source")]
    Source(#[source] StoreError),
    /// The target has no such output.
    #[error("{drv} has no output `{output}`")]
    NoOutput {
        /// The target.
        drv: String,
        /// The output.
        output: String,
    },
}

/// A closure verification request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The target derivation (unresolved drv path).
    pub target: StorePath,
    /// Output paths that must be what the policy accepts (empty: any accepted outputs).
    pub expect: BTreeSet<StorePath>,
}

/// The verifier: a policy, trace sources, an evidence verifier (with its chain cache) and the
/// time certificates are checked at.
#[derive(Debug)]
pub struct ClosureVerifier<'a> {
    /// The prepared trust policy.
    pub policy: &'a PreparedPolicy,
    /// Where traces come from.
    pub sources: Vec<&'a dyn TraceSource>,
    /// The evidence verifier (use [`EvidenceVerifier::global`] to share its cache).
    pub evidence: &'a EvidenceVerifier,
    /// Certificate validity is checked at this time (unless the policy fixes one).
    pub now: SystemTime,
    /// Threads that check trace entries (statement, output addresses, evidence, signatures)
    /// ahead of the ordered pass; 0 or 1: everything on the calling thread. The outcome is the
    /// same for every value.
    pub threads: usize,
}

/// One accepted output map of a derivation.
#[derive(Debug, Clone)]
struct Accepted {
    /// Output name → path, with facts when a trace gave them (not for fixed outputs).
    outputs: BTreeMap<String, (StorePath, Option<links::Facts>)>,
    step: AcceptedStep,
    /// The launches of the statements that made it (none for fixed outputs, version 1).
    launches: Vec<LaunchSeen>,
}

/// What the ordered pass has accepted so far.
#[derive(Debug, Default)]
struct Walk {
    /// Hash modulo of input-addressed derivations needs the graph; built on first use.
    graph: Option<DrvGraph>,
    accepted: HashMap<StorePath, Vec<Accepted>>,
    known: Known,
    /// The launch nonces of the accepted steps (one launch, one step).
    launches: Launches,
    steps: Vec<AcceptedStep>,
}

impl Walk {
    /// The accepted output maps of `input` (output name → path).
    fn output_maps(&self, input: &StorePath) -> Vec<BTreeMap<String, StorePath>> {
        self.accepted[input]
            .iter()
            .map(|m| m.outputs.iter().map(|(o, (p, _))| (o.clone(), p.clone())).collect())
            .collect()
    }
}

/// One input combination of a derivation: (input drv, output name) → the accepted path.
pub(crate) type Combo = BTreeMap<(StorePath, String), StorePath>;

/// A step computed for one input combination.
#[derive(Debug)]
pub(crate) struct ComputedStep {
    /// The lookup key (resolved drv path, or the drv path of an input-addressed step).
    key: StorePath,
    drv: BasicDerivation,
    /// The direct inputs (roots of the input closure).
    direct: BTreeSet<StorePath>,
    kind: StepKind,
}

impl ClosureVerifier<'_> {
    /// Verify `req.target`'s closure in `drvs`. `Err` only for malformed input or a failing
    /// trace source; a closure that does not verify is `Ok(Outcome::NotVerified(..))`.
    pub fn verify(&self, drvs: &DrvSet, req: &Request) -> Result<Outcome, VerifyError> {
        let order = drvs.post_order(&req.target)?;
        let checker = Checker { policy: self.policy, evidence: self.evidence, now: self.now };
        let walked = if self.threads > 1 {
            ahead::walk(self, drvs, &order, &checker)?
        } else {
            let mut walk = Walk::default();
            let mut broken = None;
            for udrv in &order {
                broken = self.walk_step(&mut walk, drvs, udrv, &checker, None)?;
                if broken.is_some() {
                    break;
                }
            }
            broken.map_or(Ok(walk), Err)
        };
        let walk = match walked {
            Ok(walk) => walk,
            Err(broken) => return Ok(Outcome::NotVerified(*broken)),
        };
        let target_maps = &walk.accepted[&req.target];
        let chosen = if req.expect.is_empty() {
            target_maps.first()
        } else {
            target_maps.iter().find(|m| {
                let paths: BTreeSet<&StorePath> = m.outputs.values().map(|(p, _)| p).collect();
                req.expect.iter().all(|e| paths.contains(e))
            })
        };
        let Some(chosen) = chosen else {
            let accepted_paths: Vec<Vec<&StorePath>> =
                target_maps.iter().map(|m| m.outputs.values().map(|(p, _)| p).collect()).collect();
            let mut b = BrokenLink::new(
                LinkCheck::Expected,
                "the expected output paths are not what the policy accepts for this derivation",
            )
            .expected(format!("{:?}", req.expect), format!("accepted: {accepted_paths:?}"));
            b.step = req.target.to_string();
            return Ok(Outcome::NotVerified(*b));
        };
        let mut nar_hashes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (path, _) in chosen.outputs.values() {
            for m in target_maps {
                for (p, facts) in m.outputs.values() {
                    if let (true, Some(f)) = (p == path, facts) {
                        let list = nar_hashes.entry(p.to_string()).or_default();
                        if !list.contains(&f.nar_hash.to_string()) {
                            list.push(f.nar_hash.to_string());
                        }
                    }
                }
            }
        }
        Ok(Outcome::Verified(VerifiedClosure {
            target: req.target.to_string(),
            outputs: chosen.outputs.iter().map(|(n, (p, _))| (n.clone(), p.to_string())).collect(),
            steps: walk.steps,
            nar_hashes,
        }))
    }

    /// Accept `udrv` (its dependencies already accepted) into `walk`, or name the broken link
    /// that ends verification.
    fn walk_step(
        &self,
        walk: &mut Walk,
        drvs: &DrvSet,
        udrv: &StorePath,
        checker: &Checker<'_>,
        ahead: Option<&mut ahead::Ahead<'_, '_>>,
    ) -> Result<Option<Box<BrokenLink>>, VerifyError> {
        let result = self.accept_step(drvs, walk, udrv, checker, ahead)?;
        let maps = match result {
            Ok(maps) => maps,
            Err(mut broken) => {
                broken.step = udrv.to_string();
                return Ok(Some(broken));
            }
        };
        for m in &maps {
            for seen in &m.launches {
                if let Err(mut broken) = walk.launches.record(seen, &m.step.drv) {
                    broken.step = udrv.to_string();
                    broken.key = Some(m.step.key.clone());
                    return Ok(Some(broken));
                }
            }
            for (path, facts) in m.outputs.values() {
                if let Some(f) = facts {
                    walk.known.insert(path, udrv, f);
                }
            }
            walk.steps.push(m.step.clone());
        }
        walk.accepted.insert(udrv.clone(), maps);
        Ok(None)
    }

    /// Accept one unresolved derivation (all its dependencies already accepted).
    fn accept_step(
        &self,
        drvs: &DrvSet,
        walk: &mut Walk,
        udrv: &StorePath,
        checker: &Checker<'_>,
        mut ahead: Option<&mut ahead::Ahead<'_, '_>>,
    ) -> Result<Result<Vec<Accepted>, Box<BrokenLink>>, VerifyError> {
        let drv = drvs.get(udrv).expect("post_order only yields known derivations");
        let (name, kind) = match self.check_derivation(drvs, walk, udrv, drv)? {
            Ok(Checked::Step(name, kind)) => (name, kind),
            Ok(Checked::Fixed(name)) => return Ok(self.accept_fixed(udrv, drv, &name)),
            Err(b) => return Ok(Err(b)),
        };
        let combos = match combinations(drv, |input| walk.output_maps(input)) {
            Ok(c) => c,
            Err(b) => return Ok(Err(b)),
        };
        let mut first_failure: Option<Box<BrokenLink>> = None;
        // Output map → (key, signers, simulated, launches)
        let mut groups: Groups = BTreeMap::new();
        for combo in &combos {
            let computed = ahead.as_deref_mut().and_then(|a| a.computed(udrv, combo));
            let step = match computed
                .unwrap_or_else(|| self.compute_step(drv, &name, udrv, kind, combo))
            {
                Ok(x) => x,
                Err(b) => {
                    first_failure.get_or_insert(b);
                    continue;
                }
            };
            let entries = match ahead.as_deref_mut().and_then(|a| a.entries(&step.key)) {
                Some(prechecked) => prechecked,
                None => {
                    let mut entries = Vec::new();
                    for s in &self.sources {
                        let found = s.entries(&step.key).map_err(VerifyError::Source)?;
                        entries.extend(found.into_iter().map(|e| (Arc::new(e), None)));
                    }
                    entries
                }
            };
            self.check_entries(
                &step,
                &entries,
                &walk.known.admitted(drvs.dependencies(udrv)),
                checker,
                &mut groups,
                &mut first_failure,
            );
        }
        Ok(self.accepted_maps(udrv, groups, first_failure))
    }

    /// Check the trace entries of one computed step, pooling the signers of those that pass by
    /// output map; the first failure is kept (a missing trace only until something else fails).
    fn check_entries(
        &self,
        step: &ComputedStep,
        entries: &[(Arc<TraceEntry>, Option<Arc<Prechecked>>)],
        known: &Admitted<'_>,
        checker: &Checker<'_>,
        groups: &mut Groups,
        first_failure: &mut Option<Box<BrokenLink>>,
    ) {
        let key = &step.key;
        let want = Expectation { key, drv: &step.drv, kind: step.kind, direct: &step.direct };
        if entries.is_empty() {
            let mut b =
                BrokenLink::new(LinkCheck::NoTrace, "no trace of this step in any trace source")
                    .expected(format!("a trace for {key}"), self.describe_sources());
            b.key = Some(key.to_string());
            if first_failure.as_ref().is_none_or(|f| f.check == LinkCheck::NoTrace) {
                *first_failure = Some(b);
            }
            return;
        }
        for (e, pre) in entries {
            match checker.check_entry(&want, e, known, pre.as_deref()) {
                Ok(EntryOk { outputs, signers, simulated, launch }) => {
                    let g = groups
                        .entry(outputs)
                        .or_insert_with(|| (key.clone(), Signers::default(), false, Vec::new()));
                    g.1.merge(&signers);
                    g.2 |= simulated;
                    g.3.extend(launch);
                }
                Err(mut b) => {
                    b.key = Some(key.to_string());
                    if first_failure.as_ref().is_none_or(|f| f.check == LinkCheck::NoTrace) {
                        *first_failure = Some(b);
                    }
                }
            }
        }
    }

    /// The output maps whose pooled signers satisfy the policy, else the broken link.
    fn accepted_maps(
        &self,
        udrv: &StorePath,
        groups: Groups,
        first_failure: Option<Box<BrokenLink>>,
    ) -> Result<Vec<Accepted>, Box<BrokenLink>> {
        let mut maps = Vec::new();
        let mut unsatisfied = None;
        for (outputs, (key, signers, simulated, launches)) in groups {
            if !self.policy.accepts(&signers) {
                unsatisfied.get_or_insert((key, signers));
                continue;
            }
            let mut accepted_by: Vec<String> =
                signers.keys.iter().map(|k| format!("key {k}")).collect();
            for (rule, chips) in &signers.chips {
                accepted_by.extend(chips.iter().map(|c| format!("{c} (rule {rule})")));
            }
            maps.push(Accepted {
                outputs: outputs
                    .iter()
                    .map(|(n, c)| (n.clone(), (c.path.clone(), Some(c.facts.clone()))))
                    .collect(),
                step: AcceptedStep {
                    drv: udrv.to_string(),
                    key: key.to_string(),
                    outputs: outputs.iter().map(|(n, c)| (n.clone(), c.path.to_string())).collect(),
                    accepted_by,
                    simulated,
                },
                launches,
            });
        }
        if !maps.is_empty() {
            return Ok(maps);
        }
        if let Some((key, signers)) = unsatisfied {
            let mut found: Vec<String> = signers.keys.iter().map(|k| format!("key {k}")).collect();
            for (rule, chips) in &signers.chips {
                found.extend(chips.iter().map(|c| format!("{c} (rule {rule})")));
            }
            let mut b = BrokenLink::new(
                LinkCheck::Policy,
                "the valid signers of this step do not satisfy the trust policy",
            )
            .expected(format!("{:?}", self.policy.policy.require), format!("{found:?}"));
            b.key = Some(key.to_string());
            return Err(b);
        }
        Err(first_failure.unwrap_or_else(|| BrokenLink::new(LinkCheck::NoTrace, "no trace found")))
    }

    fn describe_sources(&self) -> String {
        let names: Vec<String> = self.sources.iter().map(|s| s.describe()).collect();
        if names.is_empty() {
            "no trace sources".into()
        } else {
            format!("searched {}", names.join(", "))
        }
    }
}

/// Output maps by output name, keyed by the map's own (name, path) pairs.
type Groups = BTreeMap<BTreeMap<String, OutputClaim>, Group>;

/// The step key, pooled signers, whether any evidence was simulated, and the launches of the
/// entries that agree on one output map.
type Group = (StorePath, Signers, bool, Vec<LaunchSeen>);
