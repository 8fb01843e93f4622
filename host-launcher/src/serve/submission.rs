//! A build submission (`POST /v1/builds`), checked and parsed into the core's
//! [`BuildRequest`] before anything is queued:
//!
//! 1. the derivation is a store path of a `.drv` in the content store, uploaded with its
//!    content address (so its contents are tied to its path), with its input derivations
//!    (`nix copy --derivation` uploads the `.drv` closure);
//! 2. the core establishes what it builds as ([`Derivations::step`]): input-addressed output
//!    paths computed from the derivation graph, a derivation Nix resolves (floating CA, or
//!    deferred input-addressed) resolved against the outputs this service accepted. One that
//!    declares other input-addressed paths is refused (403, naming the computed path) whoever
//!    the caller: the core's rule (`crate::core::ownership`), answered here with a status;
//! 3. fixed-output derivations (network access) only for callers with a token;
//! 4. its input closure is in the content store;
//! 5. the CA self-reference rule is that of the Nix release the submission names
//!    (`nix_version`), else the service's `--client-nix-version`, else a guess said in the
//!    build log;
//! 6. its limits override the service's defaults where non-zero; the graph and the caller's
//!    trust go with it, and the engine checks the request again before any VM.
//!
//! A derivation **with input derivations** builds its whole closure ([`super::closure`]):
//! every derivation of its graph is checked without building anything (input-addressed ones
//! declare the paths their hash modulo gives, deferred ones none: 403 otherwise; fixed-output
//! ones only for a caller with a token; impure ones are refused), every input source's closure
//! must be in the content store, and Nix then schedules the steps.
//!
//! What is not here: the HTTP request (`super::api`), the queue (`super::builds`).

use std::collections::BTreeSet;

use build_trace::error_chain;
use build_trace::job::{BasicDerivation, CaRule, Limits, StepKind};
use build_trace::ownership::OwnershipError;
use nix_formats::derivation::DerivationKind;
use nix_formats::StorePath;

use super::api::BuildSubmission;
use super::builds::Job;
use super::closure::ClosureJob;
use super::{auth, store_error, ApiError, Service};
use crate::core::ownership::accepted_outputs;
use crate::core::request::ca_rule_for;
use crate::core::{BuildRequest, CaRuleChoice, Derivations, NixVersion, Refusal};
use crate::store::StoreError;

/// The rule of the Nix release `declared` (the submission's `nix_version`, else the service's
/// `--client-nix-version`), else a guess.
pub fn ca_rule(declared: Option<NixVersion>) -> CaRuleChoice {
    match declared {
        Some(v) => CaRuleChoice::Known(ca_rule_for(v)),
        None => CaRuleChoice::guessed(
            "the submission names no \"nix_version\" and the service has no --client-nix-version",
            "send \"nix_version\" to choose",
        ),
    }
}

impl Service {
    /// Check a submission and make its build request; nothing is queued on error.
    ///
    /// Who may build what: anyone may build a derivation whose output paths the core computes
    /// (content-addressed ones from their bytes, input-addressed ones from the derivation
    /// graph); a derivation that declares other input-addressed paths is refused, even for a
    /// trusted caller; a fixed-output derivation builds with network access, so it needs a
    /// caller who presented a token, and none can while the service has none.
    pub(super) fn check_submission(
        &self,
        s: &BuildSubmission,
        caller: auth::Caller,
    ) -> Result<Job, ApiError> {
        let bad = |status, msg: String| ApiError::new(status, msg);
        let drv_path = StorePath::parse(&s.drv)
            .map_err(|e| bad(400, format!("\"drv\": {:?} is not a store path: {e}", s.drv)))?;
        if !drv_path.is_derivation() {
            return Err(bad(400, format!("\"drv\": {drv_path} is not a derivation (.drv)")));
        }
        let how = format!(
            "upload it and its inputs first: nix copy --to http://HOST:PORT --derivation {drv_path}"
        );
        let view = self.view_of(caller);
        let info = view.path_info(&drv_path).map_err(store_error)?.ok_or_else(|| {
            bad(422, format!("{drv_path} is not in vouch's content store: {how}"))
        })?;
        if !info.info.ca.as_deref().is_some_and(|c| c.starts_with("text:")) {
            return Err(bad(
                422,
                format!(
                    "{drv_path} was uploaded without its content address (text:sha256:…), so \
                     nothing ties its contents to its path; upload it with nix copy"
                ),
            ));
        }
        let derivations = Derivations::from_store(view, &drv_path)
            .map_err(|e| ownership_error(&drv_path, &e, &how))?;
        if derivations.derivations().count() > 1 {
            return self.check_closure(s, derivations, caller, &how).map(Job::Closure);
        }
        let mut accepted = accepted_outputs(&self.cfg.engine.publish.trace_store);
        let step =
            derivations.step(&mut accepted).map_err(|e| ownership_error(&drv_path, &e, &how))?;
        let name = drv_path.drv_name().map_err(|e| bad(400, e.to_string()))?.to_owned();
        let basic = BasicDerivation::from_derivation(&name, &step.drv)
            .map_err(|e| bad(422, format!("{drv_path}: {}", error_chain(&e))))?;
        let kind = build_trace::job::step_kind(&basic)
            .map_err(|e| bad(422, format!("vouch cannot build {drv_path}: {}", error_chain(&e))))?;
        if kind == StepKind::FixedOutput && !caller.authenticated {
            return Err(bad(
                403,
                format!(
                    "{drv_path} is a fixed-output derivation, which builds with network \
                     access; this service refuses those from callers without a token, and \
                     it has none configured (--token-file)"
                ),
            ));
        }
        let step_path = step.drv_path;
        view.closure(&basic.input_srcs).map_err(|e| match e {
            StoreError::Missing { path } => bad(
                422,
                format!("input {path} of {step_path} is not in vouch's content store: {how}"),
            ),
            other => store_error(other),
        })?;
        let declared = match &s.nix_version {
            Some(v) => Some(
                v.parse::<NixVersion>()
                    .map_err(|e| bad(400, format!("\"nix_version\": {v:?}: {e}")))?,
            ),
            None => self.cfg.declared_nix,
        };
        Ok(Job::Step(Box::new(BuildRequest {
            drv_path: step_path,
            drv: basic,
            outputs: BTreeSet::new(),
            limits: Limits {
                timeout_s: s.timeout,
                max_silent_s: s.max_silent_time,
                max_log_bytes: s.max_log_size,
                ..Limits::default()
            },
            ca_rule: ca_rule(declared),
            derivations: Some(derivations),
            trusted: caller.trusted,
        })))
    }

    /// The checks of a closure submission (see the module docs).
    fn check_closure(
        &self,
        s: &BuildSubmission,
        derivations: Derivations,
        caller: auth::Caller,
        how: &str,
    ) -> Result<ClosureJob, ApiError> {
        let root = derivations.drv_path().clone();
        let kinds = derivations.kinds().map_err(|e| ownership_error(&root, &e, how))?;
        for (p, kind) in &kinds {
            match kind {
                DerivationKind::Fixed if !caller.authenticated => {
                    return Err(ApiError::new(
                        403,
                        format!(
                            "{p} (in the closure of {root}) is a fixed-output derivation, which \
                             builds with network access; this service refuses those from callers \
                             without a token"
                        ),
                    ))
                }
                DerivationKind::Impure => {
                    return Err(ApiError::new(422, format!("vouch cannot build {p}: impure")))
                }
                _ => {}
            }
        }
        let floating = kinds.iter().find(|(_, k)| *k == DerivationKind::Floating).map(|(p, _)| p);
        let service_nix = match self.builds.closures() {
            Some(c) => c.nix_version.clone(),
            None => Err("this service builds no closures".into()),
        };
        closure_nix_version(s.nix_version.as_deref(), &root, floating, service_nix)
            .map_err(|(status, msg)| ApiError::new(status, msg))?;
        let srcs: BTreeSet<StorePath> =
            derivations.derivations().flat_map(|(_, d)| d.input_srcs.iter().cloned()).collect();
        self.view_of(caller).closure(&srcs).map_err(|e| match e {
            StoreError::Missing { path } => ApiError::new(
                422,
                format!(
                    "input {path} of the closure of {root} is not in vouch's content store: {how}"
                ),
            ),
            other => store_error(other),
        })?;
        Ok(ClosureJob {
            order: derivations.post_order(),
            derivations,
            timeout: s.timeout,
            max_silent_time: s.max_silent_time,
        })
    }
}

/// A closure build's `nix_version` (`declared`): its floating-CA steps (`floating`: one of
/// them) are resolved and built by the service's own Nix (`service`), so their output paths
/// follow that release's self-reference rule whatever the submission says. A release with the
/// same rule, or a closure without floating-CA steps (the rule decides nothing), is accepted;
/// a release with another rule is refused (422) rather than built under a rule the client's
/// Nix does not use; a version that does not parse is 400.
fn closure_nix_version(
    declared: Option<&str>,
    root: &StorePath,
    floating: Option<&StorePath>,
    service: Result<NixVersion, String>,
) -> Result<(), (u16, String)> {
    let Some(v) = declared else { return Ok(()) };
    let declared: NixVersion =
        v.parse().map_err(|e| (400, format!("\"nix_version\": {v:?}: {e}")))?;
    let Some(step) = floating else { return Ok(()) };
    let rule = |n: NixVersion| match ca_rule_for(n) {
        CaRule::SelfRefPositions => "self-reference positions hashed",
        CaRule::SelfRefZeroed => "self-references zeroed, positions not hashed",
    };
    match service {
        Ok(n) if ca_rule_for(n) == ca_rule_for(declared) => Ok(()),
        Ok(n) => Err((
            422,
            format!(
                "\"nix_version\": \"{v}\": the closure of {root} has floating content-addressed \
                 steps (e.g. {step}), which the service's own Nix {n} resolves and builds, so \
                 their output paths follow Nix {n}'s self-reference rule ({}), not Nix \
                 {declared}'s ({}); a self-referencing output would get a path your Nix does not \
                 compute. Omit \"nix_version\" (or name a release with Nix {n}'s rule) to build \
                 it under Nix {n}'s rule",
                rule(n),
                rule(declared)
            ),
        )),
        Err(why) => Err((
            422,
            format!(
                "\"nix_version\": \"{v}\": the closure of {root} has floating content-addressed \
                 steps (e.g. {step}), whose rule is that of the service's own Nix, whose release \
                 is not known ({why}); omit \"nix_version\""
            ),
        )),
    }
}

/// A derivation graph that does not give a step: 403 for paths the derivation does not own,
/// 422 for what is missing or malformed.
fn ownership_error(drv: &StorePath, r: &Refusal, how: &str) -> ApiError {
    let Refusal::Graph { source: e, .. } = r else {
        return ApiError::new(403, error_chain(r));
    };
    match &**e {
        OwnershipError::NotOwned { .. } | OwnershipError::Deferred { .. } => ApiError::new(
            403,
            format!(
                "vouch refuses to build {drv}: {}. Input-addressed output paths are computed \
                 from the derivation graph (as Nix's checkDerivationOutputs does); a .drv that \
                 declares others is refused, whoever sends it",
                error_chain(&**e)
            ),
        ),
        OwnershipError::NeedsDerivation(p) => {
            ApiError::new(422, format!("{p} is not in vouch's content store as a .drv file: {how}"))
        }
        _ => ApiError::new(422, format!("vouch cannot build {drv}: {}", error_chain(&**e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use build_trace::CaRule;

    #[test]
    fn the_ca_rule_is_the_declared_releases_else_a_guess() {
        let known = |a, b| ca_rule(Some(NixVersion(a, b)));
        assert_eq!(known(2, 8), CaRuleChoice::Known(CaRule::SelfRefPositions));
        assert_eq!(known(2, 26), CaRuleChoice::Known(CaRule::SelfRefZeroed));
        let CaRuleChoice::Guessed { rule, note } = ca_rule(None) else { panic!() };
        assert_eq!(rule, crate::core::request::DEFAULT_CA_RULE);
        assert!(note.contains("nix_version"), "{note}");
    }

    #[test]
    fn a_closure_builds_under_its_services_nix_and_a_nix_version_with_another_rule_is_refused() {
        let root = StorePath::parse("/nix/store/00000000000000000000000000000000-top.drv").unwrap();
        let ca = StorePath::parse("/nix/store/11111111111111111111111111111111-mid.drv").unwrap();
        let nix = |a, b| Ok(NixVersion(a, b));
        let check =
            |declared, floating, service| closure_nix_version(declared, &root, floating, service);
        // No nix_version, or one with the service Nix's rule: built.
        assert_eq!(check(None, Some(&ca), nix(2, 8)), Ok(()));
        assert_eq!(check(Some("2.8"), Some(&ca), nix(2, 8)), Ok(()));
        assert_eq!(check(Some("2.16.1"), Some(&ca), nix(2, 8)), Ok(()));
        assert_eq!(check(Some("2.26"), Some(&ca), nix(2, 24)), Ok(()));
        // No floating-CA step: the rule decides nothing.
        assert_eq!(check(Some("2.26"), None, nix(2, 8)), Ok(()));
        assert_eq!(check(Some("2.26"), None, Err("gone".into())), Ok(()));
        // Another rule: refused, naming both releases, both rules and a floating-CA step.
        let (status, msg) = check(Some("2.26"), Some(&ca), nix(2, 8)).unwrap_err();
        assert_eq!(status, 422);
        for want in ["Nix 2.8", "Nix 2.26", "-mid.drv", "-top.drv", "positions hashed", "Omit"] {
            assert!(msg.contains(want), "{want} in {msg}");
        }
        let (status, msg) = check(Some("2.26"), Some(&ca), Err("no nix-store".into())).unwrap_err();
        assert_eq!(status, 422);
        assert!(msg.contains("no nix-store"), "{msg}");
        // Not a version: 400, whatever the closure.
        assert_eq!(check(Some("two"), None, nix(2, 8)).unwrap_err().0, 400);
    }
}
