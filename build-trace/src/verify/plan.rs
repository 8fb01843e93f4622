//! Trust migration: the smallest set of steps to rebuild so that a closure verifies under a
//! (stricter) policy (`vouch verify --plan-rebuild`, `vouch rebuild`).
//!
//! # Algorithm
//!
//! Input: the closure verifier (its policy and trace sources) and the unresolved derivation
//! graph of a target. **Assumption: builds are reproducible**: rebuilding a step gives the
//! outputs that its existing traces describe, even those the policy does not accept. Those
//! outputs are only **predicted**: they never make anything accepted, they only say which
//! resolved derivations the dependents would get, so which of the dependents' traces would
//! then count.
//!
//! The derivations are visited dependencies first, as the verifier visits them; each gets an
//! [`Action`]:
//!
//! 1. An input is `blocked`: the step is `blocked` too. An input is to be rebuilt and nothing
//!    predicts its outputs (no trace of it describes them): the step's resolution is unknown
//!    until that input is built, so it is `rebuild`.
//! 2. Otherwise the step is judged exactly as the verifier judges it (`accept_step`: the
//!    resolution, the trace lookup, every entry check, the trust model), against the accepted
//!    outputs of its inputs; for inputs to be rebuilt, their predicted outputs, and for
//!    inputs that are `conditional`, the outputs their traces give:
//!    - accepted, every input reused: **`reuse`** (**`fixed`** for a fixed-output derivation);
//!    - accepted, some input to be rebuilt or conditional: **`conditional`**. Its traces satisfy
//!      the policy if the rebuilt inputs turn out bit-identical (a content-addressed output
//!      then has the same path, so the step resolves to the same derivation; an
//!      input-addressed one the same NAR hash, so the links hold). It is re-resolved after
//!      they are rebuilt, and rebuilt if they are not;
//!    - refused for the derivation itself (malformed, not the one its path names, impure,
//!      output paths it does not own, a refused hash algorithm, a resolution that fails):
//!      **`blocked`**, since no rebuild changes that;
//!    - refused otherwise (no trace, no trusted signer, too few signers, a link that fails,
//!      a launch used twice): **`rebuild`**. Its resolved derivation is known, and the step
//!      can be built now ([`PlannedStep::build`]), when every input is reused; its predicted
//!      outputs are those of its existing entries that carry the derivation computed for it,
//!      whose output addresses hold and whose inputs link (`step::described_outputs`).
//!
//! The plan is minimal under the assumption: a step is rebuilt only when no trace that the
//! policy accepts exists for the derivation it resolves to (a new trace is the only thing that
//! could make it accepted), and every step the policy accepts is reused. A plan with neither
//! `rebuild` nor `blocked` steps has no `conditional` ones either: the closure verifies.
//!
//! Because a rebuilt output that turns out bit-identical keeps its dependents' traces valid and
//! one that does not changes their resolution, the plan is recomputed after every rebuild
//! (`vouch rebuild` builds one ready step at a time, dependencies first, and replans).
//!
//! What is not here: building (the CLI's `vouch rebuild` through the launcher's engine),
//! printing (`Display` and the JSON form are the CLI's output), the one-launch check on
//! `conditional` steps (a replan after the rebuilds checks it).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use nix_formats::derivation::DerivationKind;
use nix_formats::StorePath;
use serde::Serialize;

use super::outcome::{AcceptedStep, BrokenLink, LinkCheck};
use super::step::{self, Checker, Expectation};
use super::{combinations, Accepted, ClosureVerifier, DrvSet, VerifyError, Walk};
use crate::job::{BasicDerivation, CaRule};

/// What the plan does with one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Its traces satisfy the policy and every input is reused: kept as it is.
    Reuse,
    /// A fixed-output derivation: accepted by its declared hash, nothing to rebuild.
    Fixed,
    /// To rebuild: no trace the policy accepts exists for what it resolves to.
    Rebuild,
    /// Reused if the rebuilt inputs turn out bit-identical (its traces then satisfy the
    /// policy), rebuilt otherwise: re-resolved after they are rebuilt.
    Conditional,
    /// Rebuilding cannot make it verify (the derivation itself is refused, or an input is).
    Blocked,
}

impl Action {
    /// The word the text form prints.
    pub fn name(self) -> &'static str {
        match self {
            Action::Reuse => "reuse",
            Action::Fixed => "fixed",
            Action::Rebuild => "rebuild",
            Action::Conditional => "conditional",
            Action::Blocked => "blocked",
        }
    }
}

/// What to build for a step that can be rebuilt now (every input reused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buildable {
    /// The resolved derivation's path (an input-addressed step: its own drv path).
    pub drv_path: StorePath,
    /// The basic derivation to build.
    pub drv: BasicDerivation,
    /// The CA self-reference rule of the earlier build, where a trace says it (a rebuild under
    /// another rule cannot be bit-identical).
    pub ca_rule: Option<CaRule>,
}

/// One step of the closure in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedStep {
    /// The unresolved derivation.
    pub drv: String,
    /// What happens to it.
    pub action: Action,
    /// The derivation it resolves to (an input-addressed step: itself) where that is known:
    /// the accepted one (`reuse`, `conditional`), the one to build (`rebuild` with every input
    /// reused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
    /// Its inputs that are to be rebuilt or are conditional: what it waits for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waits_for: Vec<String>,
    /// Output name → path: accepted (`reuse`, `fixed`, `conditional`) or predicted
    /// (`rebuild`, from its earlier traces; empty where none describes them).
    pub outputs: BTreeMap<String, String>,
    /// Output name → NAR hash (`sha256:<nix32>`) of [`Self::outputs`], where a trace gave it
    /// (not for fixed outputs): what a bit-identical rebuild gives.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub nar_hashes: BTreeMap<String, String>,
    /// Who vouched (`reuse`, `fixed`, `conditional`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub accepted_by: Vec<String>,
    /// Why it is rebuilt or blocked: the check that refuses it under the policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<BrokenLink>,
    /// What to build, for a `rebuild` step whose inputs are all reused.
    #[serde(skip)]
    pub build: Option<Buildable>,
}

impl PlannedStep {
    fn new(udrv: &StorePath, action: Action, waits_for: Vec<String>) -> PlannedStep {
        PlannedStep {
            drv: udrv.to_string(),
            action,
            resolved: None,
            waits_for,
            outputs: BTreeMap::new(),
            nar_hashes: BTreeMap::new(),
            accepted_by: Vec::new(),
            reason: None,
            build: None,
        }
    }

    /// Whether it can be rebuilt now (a `rebuild` step whose resolution is known).
    pub fn ready(&self) -> bool {
        self.action == Action::Rebuild && self.build.is_some()
    }
}

/// The plan's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanResult {
    /// Nothing to rebuild: the closure verifies under the policy.
    Verified,
    /// Rebuilding the `rebuild` steps (and the `conditional` ones whose rebuilt inputs do not
    /// turn out bit-identical) makes it verify, if the builds are accepted by the policy.
    Rebuild,
    /// Some step cannot be made to verify by rebuilding.
    Blocked,
}

/// A rebuild plan for a closure under a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebuildPlan {
    /// The target derivation.
    pub target: String,
    /// The verdict.
    pub result: PlanResult,
    /// The steps to rebuild, dependencies first.
    pub rebuild: Vec<String>,
    /// The steps reused only if their rebuilt inputs turn out bit-identical.
    pub conditional: Vec<String>,
    /// The steps that rebuilding cannot make verify.
    pub blocked: Vec<String>,
    /// How many steps are reused (fixed-output derivations included).
    pub reused: usize,
    /// Every step of the closure, dependencies first.
    pub steps: Vec<PlannedStep>,
}

impl RebuildPlan {
    fn new(target: &StorePath, steps: Vec<PlannedStep>) -> RebuildPlan {
        let with = |a: Action| -> Vec<String> {
            steps.iter().filter(|s| s.action == a).map(|s| s.drv.clone()).collect()
        };
        let (rebuild, conditional, blocked) =
            (with(Action::Rebuild), with(Action::Conditional), with(Action::Blocked));
        let result = if !blocked.is_empty() {
            PlanResult::Blocked
        } else if rebuild.is_empty() {
            PlanResult::Verified
        } else {
            PlanResult::Rebuild
        };
        let reused =
            steps.iter().filter(|s| matches!(s.action, Action::Reuse | Action::Fixed)).count();
        RebuildPlan {
            target: target.to_string(),
            result,
            rebuild,
            conditional,
            blocked,
            reused,
            steps,
        }
    }

    /// The first step that can be rebuilt now (dependencies first).
    pub fn next_ready(&self) -> Option<&PlannedStep> {
        self.steps.iter().find(|s| s.ready())
    }
}

impl fmt::Display for RebuildPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.steps.len();
        match self.result {
            PlanResult::Verified => {
                return writeln!(
                    f,
                    "NOTHING TO REBUILD: {} verifies under the policy ({n} steps reused)",
                    self.target
                )
            }
            PlanResult::Rebuild => writeln!(
                f,
                "REBUILD {} of {n} steps for {} ({} conditional, {} reused)",
                self.rebuild.len(),
                self.target,
                self.conditional.len(),
                self.reused
            )?,
            PlanResult::Blocked => writeln!(
                f,
                "BLOCKED: rebuilding cannot make {} verify under the policy ({} steps blocked)",
                self.target,
                self.blocked.len()
            )?,
        }
        for s in self.steps.iter().filter(|s| !matches!(s.action, Action::Reuse | Action::Fixed)) {
            writeln!(f, "  {:<12}{}", s.action.name(), s.drv)?;
            if let Some(r) = s.resolved.as_ref().filter(|r| **r != s.drv) {
                writeln!(f, "    resolved:   {r}")?;
            }
            for w in &s.waits_for {
                writeln!(f, "    after:      {w}")?;
            }
            match s.action {
                Action::Conditional => writeln!(
                    f,
                    "    reused if the rebuilt inputs turn out bit-identical, rebuilt otherwise"
                )?,
                Action::Rebuild if s.build.is_some() => writeln!(f, "    ready to build now")?,
                _ => {}
            }
            if let Some(b) = &s.reason {
                writeln!(f, "    because:    {}: {}", b.check.name(), b.explanation)?;
            }
        }
        Ok(())
    }
}

/// Refusals that no rebuild can lift: they are about the derivation, not its traces.
fn refuses_the_derivation(check: LinkCheck) -> bool {
    matches!(check, LinkCheck::Derivation | LinkCheck::WeakHash | LinkCheck::Resolution)
}

/// Record `maps` as `udrv`'s (accepted or predicted) output maps, their facts for the links.
fn record(walk: &mut Walk, udrv: &StorePath, maps: Vec<Accepted>) {
    if maps.is_empty() {
        return;
    }
    for m in &maps {
        for (path, facts) in m.outputs.values() {
            if let Some(f) = facts {
                walk.known.insert(path, udrv, f);
            }
        }
    }
    walk.accepted.insert(udrv.clone(), maps);
}

impl ClosureVerifier<'_> {
    /// Plan the rebuilds that make `target`'s closure verify under this verifier's policy (see
    /// the module docs). `Err` only for malformed input or a failing trace source.
    pub fn plan_rebuild(
        &self,
        drvs: &DrvSet,
        target: &StorePath,
    ) -> Result<RebuildPlan, VerifyError> {
        let order = drvs.post_order(target)?;
        let checker = Checker { policy: self.policy, evidence: self.evidence, now: self.now };
        let mut walk = Walk::default();
        let mut actions: HashMap<StorePath, Action> = HashMap::new();
        let mut steps = Vec::with_capacity(order.len());
        for udrv in &order {
            let step = self.plan_step(drvs, &mut walk, udrv, &checker, &actions)?;
            actions.insert(udrv.clone(), step.action);
            steps.push(step);
        }
        Ok(RebuildPlan::new(target, steps))
    }

    /// Plan one step, its inputs planned (step 1 and 2 of the module docs).
    fn plan_step(
        &self,
        drvs: &DrvSet,
        walk: &mut Walk,
        udrv: &StorePath,
        checker: &Checker<'_>,
        actions: &HashMap<StorePath, Action>,
    ) -> Result<PlannedStep, VerifyError> {
        let drv = drvs.get(udrv).expect("post_order only yields known derivations");
        let (mut waits_for, mut blocked_by, mut unknown) = (Vec::new(), None, None);
        for input in drv.input_drvs.keys() {
            match actions[input] {
                Action::Reuse | Action::Fixed => {}
                Action::Blocked => {
                    blocked_by.get_or_insert(input);
                }
                Action::Rebuild | Action::Conditional => {
                    waits_for.push(input.to_string());
                    if !walk.accepted.contains_key(input) {
                        unknown.get_or_insert(input);
                    }
                }
            }
        }
        let waiting = !waits_for.is_empty();
        let because = |check: LinkCheck, why: String| {
            let mut b = BrokenLink::new(check, why);
            b.step = udrv.to_string();
            Some(*b)
        };
        if let Some(b) = blocked_by {
            let mut s = PlannedStep::new(udrv, Action::Blocked, waits_for);
            s.reason = because(LinkCheck::Resolution, format!("its input {b} is blocked"));
            return Ok(s);
        }
        if let Some(u) = unknown {
            let mut s = PlannedStep::new(udrv, Action::Rebuild, waits_for);
            let why = format!("no trace predicts the outputs of its input {u}: its resolution is known only once that input is built");
            s.reason = because(LinkCheck::NoTrace, why);
            return Ok(s);
        }
        let judged = if waiting {
            match self.accept_step(drvs, walk, udrv, checker, None)? {
                Ok(maps) => {
                    record(walk, udrv, maps);
                    None
                }
                Err(mut b) => {
                    b.step = udrv.to_string();
                    Some(b)
                }
            }
        } else {
            self.walk_step(walk, drvs, udrv, checker, None)?
        };
        let Some(broken) = judged else {
            let fixed = udrv.drv_name().ok().and_then(|n| drv.kind(n).ok());
            let action = match (waiting, fixed) {
                (true, _) => Action::Conditional,
                (false, Some(DerivationKind::Fixed)) => Action::Fixed,
                (false, _) => Action::Reuse,
            };
            let mut s = PlannedStep::new(udrv, action, waits_for);
            describe(&mut s, &walk.accepted[udrv][0]);
            s.accepted_by = walk.accepted[udrv][0].step.accepted_by.clone();
            return Ok(s);
        };
        if refuses_the_derivation(broken.check) {
            let mut s = PlannedStep::new(udrv, Action::Blocked, waits_for);
            s.reason = Some(*broken);
            return Ok(s);
        }
        let mut s = PlannedStep::new(udrv, Action::Rebuild, waits_for);
        s.reason = Some(*broken);
        let (maps, build) = self.predict(drvs, walk, udrv)?;
        if let Some(m) = maps.first() {
            describe(&mut s, m);
            s.resolved = None;
        }
        if !waiting {
            s.resolved = build.as_ref().map(|b| b.drv_path.to_string());
            s.build = build;
        }
        record(walk, udrv, maps);
        Ok(s)
    }

    /// The output maps that `udrv`'s existing entries describe (a rebuild's prediction), and
    /// the step to build for its first input combination.
    fn predict(
        &self,
        drvs: &DrvSet,
        walk: &Walk,
        udrv: &StorePath,
    ) -> Result<(Vec<Accepted>, Option<Buildable>), VerifyError> {
        let drv = drvs.get(udrv).expect("post_order only yields known derivations");
        let Some((name, kind)) = udrv.drv_name().ok().and_then(|n| Some((n, drv.kind(n).ok()?)))
        else {
            return Ok((Vec::new(), None));
        };
        let Ok(combos) = combinations(drv, |input| walk.output_maps(input)) else {
            return Ok((Vec::new(), None));
        };
        let known = walk.known.admitted(drvs.dependencies(udrv));
        let allow_weak = self.policy.policy.fixed_output.allow_weak_hashes;
        let mut predicted: BTreeMap<BTreeMap<String, step::OutputClaim>, StorePath> =
            BTreeMap::new();
        let mut build = None;
        for combo in &combos {
            let Ok(computed) = self.compute_step(drv, name, udrv, kind, combo) else { continue };
            let want = Expectation {
                key: &computed.key,
                drv: &computed.drv,
                kind: computed.kind,
                direct: &computed.direct,
            };
            let mut ca_rule = None;
            for source in &self.sources {
                for e in source.entries(&computed.key).map_err(VerifyError::Source)? {
                    if let Some((outs, rule)) =
                        step::described_outputs(&want, &e, &known, allow_weak)
                    {
                        ca_rule.get_or_insert(rule);
                        predicted.entry(outs).or_insert_with(|| computed.key.clone());
                    }
                }
            }
            build.get_or_insert_with(|| Buildable {
                drv_path: computed.key.clone(),
                drv: computed.drv.clone(),
                ca_rule,
            });
        }
        let maps = predicted
            .into_iter()
            .map(|(outputs, key)| Accepted {
                step: AcceptedStep {
                    drv: udrv.to_string(),
                    key: key.to_string(),
                    outputs: outputs.iter().map(|(n, c)| (n.clone(), c.path.to_string())).collect(),
                    accepted_by: Vec::new(),
                    simulated: false,
                },
                outputs: outputs.into_iter().map(|(n, c)| (n, (c.path, Some(c.facts)))).collect(),
                launches: Vec::new(),
            })
            .collect();
        Ok((maps, build))
    }
}

/// Fill in what an accepted (or predicted) output map says: the resolution, outputs and NAR
/// hashes.
fn describe(s: &mut PlannedStep, map: &Accepted) {
    s.resolved = Some(map.step.key.clone());
    s.outputs = map.step.outputs.clone();
    s.nar_hashes = map
        .outputs
        .iter()
        .filter_map(|(n, (_, f))| Some((n.clone(), f.as_ref()?.nar_hash.to_string())))
        .collect();
}
