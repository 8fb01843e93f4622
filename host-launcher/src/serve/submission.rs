//! A build submission (`POST /v1/builds`), checked and parsed into the core's
//! [`BuildRequest`] before anything is queued:
//!
//! 1. the derivation is a store path of a `.drv` in the content store, uploaded with its
//!    content address (so its contents are tied to its path), and resolved (no input
//!    derivations);
//! 2. who may build what: input-addressed derivations only for trusted callers, fixed-output
//!    ones (network access) only for callers with a token;
//! 3. its input closure is in the content store;
//! 4. the CA self-reference rule is that of the Nix release the submission names
//!    (`nix_version`), else the service's `--client-nix-version`, else a guess said in the
//!    build log;
//! 5. its limits override the service's defaults where non-zero; the caller's trust goes with
//!    it.
//!
//! What is not here: the HTTP request (`super::api`), the queue (`super::builds`).

use std::collections::BTreeSet;

use build_trace::error_chain;
use build_trace::job::{BasicDerivation, Limits, StepKind};
use nix_formats::derivation::Derivation;
use nix_formats::StorePath;

use super::api::BuildSubmission;
use super::{auth, store_error, ApiError, Service};
use crate::core::request::ca_rule_for;
use crate::core::{BuildRequest, CaRuleChoice, NixVersion};
use crate::store::{drv_contents, StoreError};

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
    /// Who may build what: an input-addressed derivation names its output paths itself, and
    /// the service would sign whatever it built under them, so only trusted callers may submit
    /// one; a fixed-output derivation builds with network access, so it needs a caller who
    /// presented a token, and none can while the service has none.
    pub(super) fn check_submission(
        &self,
        s: &BuildSubmission,
        caller: auth::Caller,
    ) -> Result<BuildRequest, ApiError> {
        let bad = |status, msg: String| ApiError::new(status, msg);
        let drv_path = StorePath::parse(&s.drv)
            .map_err(|e| bad(400, format!("\"drv\": {:?} is not a store path: {e}", s.drv)))?;
        if !drv_path.is_derivation() {
            return Err(bad(400, format!("\"drv\": {drv_path} is not a derivation (.drv)")));
        }
        let how = format!(
            "upload it and its inputs first: nix copy --to 'http://HOST:PORT?compression=none' --derivation {drv_path}"
        );
        let (info, file) =
            self.store.open_nar(&drv_path).map_err(store_error)?.ok_or_else(|| {
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
        let bytes = drv_contents(file)
            .map_err(|e| bad(422, format!("{drv_path}: its NAR is not one .drv file: {e}")))?;
        let drv = Derivation::from_aterm(&bytes)
            .map_err(|e| bad(422, format!("parsing {drv_path}: {}", error_chain(&e))))?;
        if let Some(first) = drv.input_drvs.keys().next() {
            return Err(bad(
                422,
                format!(
                    "{drv_path} is not resolved: it depends on the outputs of {} other \
                     derivation(s) (e.g. {first}). The build API builds one step whose inputs \
                     are store paths: send the resolved derivation (input derivations replaced by \
                     their outputs, as Nix does for content-addressed derivations) or the \
                     dependencies' builds first, or use vouch nix-builder as Nix's remote builder \
                     for whole graphs (docs/nix-remote-builder.md)",
                    drv.input_drvs.len()
                ),
            ));
        }
        let name = drv_path.drv_name().map_err(|e| bad(400, e.to_string()))?.to_owned();
        let basic = BasicDerivation::from_derivation(&name, &drv)
            .map_err(|e| bad(422, format!("{drv_path}: {}", error_chain(&e))))?;
        let kind = build_trace::job::step_kind(&basic)
            .map_err(|e| bad(422, format!("vouch cannot build {drv_path}: {}", error_chain(&e))))?;
        match kind {
            StepKind::InputAddressed if !caller.trusted => {
                return Err(bad(
                    403,
                    format!(
                        "{drv_path} is input-addressed: its output paths are written in it, and \
                         this service would sign what it builds under them; only callers with \
                         the trusted token (--trusted-token-file) may build input-addressed \
                         derivations"
                    ),
                ))
            }
            StepKind::FixedOutput if !caller.authenticated => {
                return Err(bad(
                    403,
                    format!(
                        "{drv_path} is a fixed-output derivation, which builds with network \
                         access; this service refuses those from callers without a token, and \
                         it has none configured (--token-file)"
                    ),
                ))
            }
            _ => {}
        }
        self.store.closure(&basic.input_srcs).map_err(|e| match e {
            StoreError::Missing { path } => bad(
                422,
                format!("input {path} of {drv_path} is not in vouch's content store: {how}"),
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
        Ok(BuildRequest {
            drv_path,
            drv: basic,
            outputs: BTreeSet::new(),
            limits: Limits {
                timeout_s: s.timeout,
                max_silent_s: s.max_silent_time,
                max_log_bytes: s.max_log_size,
                ..Limits::default()
            },
            ca_rule: ca_rule(declared),
            trusted: caller.trusted,
        })
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
}
