//! What a front-end asks the engine to build ([`BuildRequest`]), with what only a front-end
//! can know: the CA self-reference rule of the Nix that will use the outputs
//! ([`CaRuleChoice`], from what the front-end knows of its client), the unresolved derivation
//! graph where it has one, and whether the caller is trusted. Also the Nix releases' rules ([`NixVersion`], [`ca_rule_for`]) and the limits a
//! request may override ([`with_overrides`]).
//!
//! What is not here: how a front-end learns these (the Nix protocols' client profile in
//! `crate::nixproto::version`, the HTTP submission in `crate::serve`, `vouch build`'s flags).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use build_trace::job::{BasicDerivation, CaRule, Limits};
use nix_formats::StorePath;

use super::ownership::Derivations;

/// One build, as every front-end parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    /// The derivation's store path as Nix names it (the resolved path for a CA step).
    pub drv_path: StorePath,
    /// The basic derivation (no `inputDrvs`).
    pub drv: BasicDerivation,
    /// Outputs wanted; empty means all.
    pub outputs: BTreeSet<String>,
    /// The caller's limits: each non-zero field replaces the engine's default
    /// ([`with_overrides`]); zero leaves it.
    pub limits: Limits,
    /// The self-reference rule of content-addressed output paths.
    pub ca_rule: CaRuleChoice,
    /// The unresolved derivation graph the request came from, where the front-end has it (the
    /// CI service's uploaded `.drv` closure; a Nix `BuildPaths` of a `.drv`): the engine
    /// computes the step's input-addressed output paths from it and refuses a request whose
    /// derivation declares others, whoever the caller ([`super::ownership`]).
    pub derivations: Option<Derivations>,
    /// Whether the caller is trusted as Nix trusts its `trusted-users` (the operator's Nix, the
    /// operator's CLI, a CI caller with the trusted token): only such a caller may build an
    /// input-addressed derivation without [`Self::derivations`], as given.
    pub trusted: bool,
}

/// The self-reference rule a request's floating content-addressed outputs are made under, and
/// whether the front-end knew it or had to guess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaRuleChoice {
    /// The client's Nix release says it (or the caller chose it).
    Known(CaRule),
    /// The front-end could not tell: [`DEFAULT_CA_RULE`], and a note for the build log.
    Guessed {
        /// The rule used.
        rule: CaRule,
        /// Why it is a guess and how to choose, said in the build log of a floating CA step.
        note: String,
    },
}

impl CaRuleChoice {
    /// [`DEFAULT_CA_RULE`] because of `why` (what the front-end knew); `how` says how to choose.
    pub fn guessed(why: &str, how: &str) -> Self {
        CaRuleChoice::Guessed {
            rule: DEFAULT_CA_RULE,
            note: format!("{why}; using {} ({how})", describe(DEFAULT_CA_RULE)),
        }
    }

    /// The rule.
    pub fn rule(&self) -> CaRule {
        match self {
            CaRuleChoice::Known(rule) | CaRuleChoice::Guessed { rule, .. } => *rule,
        }
    }
}

/// The rule used when nothing says which Nix the client runs: that of Nix 2.17–2.34, the
/// releases in wide use.
pub const DEFAULT_CA_RULE: CaRule = CaRule::SelfRefZeroed;

/// A rule, named by the Nix releases that use it.
pub fn describe(rule: CaRule) -> &'static str {
    match rule {
        CaRule::SelfRefPositions => {
            "the rule of Nix ≤ 2.16 and ≥ 2.35 (self-reference positions hashed)"
        }
        CaRule::SelfRefZeroed => "the rule of Nix 2.17–2.34 (self-reference positions not hashed)",
    }
}

/// A Nix release `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NixVersion(pub u32, pub u32);

impl fmt::Display for NixVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

impl FromStr for NixVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut it = s.split('.');
        let (Some(a), Some(b)) = (it.next(), it.next()) else {
            return Err(format!("`{s}` is not a Nix version like 2.8 or 2.24.3"));
        };
        let parse = |x: &str| x.parse::<u32>().map_err(|_| format!("`{s}` is not a Nix version"));
        let v = NixVersion(parse(a)?, parse(b)?);
        if let Some(patch) = it.next() {
            parse(patch)?;
        }
        if it.next().is_some() {
            return Err(format!("`{s}` is not a Nix version like 2.8 or 2.24.3"));
        }
        Ok(v)
    }
}

/// The self-reference rule of one Nix release.
pub fn ca_rule_for(v: NixVersion) -> CaRule {
    if v <= NixVersion(2, 16) || v >= NixVersion(2, 35) {
        CaRule::SelfRefPositions
    } else {
        CaRule::SelfRefZeroed
    }
}

/// Default wall-clock limit of a long-running builder's build when the client sets none: 3 hours.
pub const DEFAULT_TIMEOUT_S: u64 = 3 * 3600;
/// Default limit on silence when the client sets none: 1 hour.
pub const DEFAULT_MAX_SILENT_S: u64 = 3600;
/// Default log limit when the client sets none: 64 MiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 20;

/// The default limits of the long-running builders (`vouch nix-builder`, `vouch serve`), used
/// where the client sets none (always over `ssh-ng://`). `vouch build` has none: 0 = no limit.
pub fn builder_limits() -> Limits {
    Limits {
        timeout_s: DEFAULT_TIMEOUT_S,
        max_silent_s: DEFAULT_MAX_SILENT_S,
        max_log_bytes: DEFAULT_MAX_LOG_BYTES,
        ..Limits::default()
    }
}

/// `base` with every non-zero field of `overrides` in its place.
pub fn with_overrides(base: Limits, overrides: &Limits) -> Limits {
    let pick = |b: u64, o: u64| if o > 0 { o } else { b };
    Limits {
        timeout_s: pick(base.timeout_s, overrides.timeout_s),
        max_silent_s: pick(base.max_silent_s, overrides.max_silent_s),
        max_log_bytes: pick(base.max_log_bytes, overrides.max_log_bytes),
        cores: pick(base.cores, overrides.cores),
        memory_bytes: pick(base.memory_bytes, overrides.memory_bytes),
        max_processes: pick(base.max_processes, overrides.max_processes),
        tmpfs_bytes: pick(base.tmpfs_bytes, overrides.tmpfs_bytes),
    }
}

/// A basic derivation `name` without outputs or inputs, for tests to fill in.
#[cfg(test)]
pub(crate) fn test_derivation(name: &str) -> BasicDerivation {
    BasicDerivation {
        name: name.into(),
        outputs: Default::default(),
        input_srcs: Default::default(),
        system: "x86_64-linux".into(),
        builder: "/bin/sh".into(),
        args: vec![],
        env: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_versions() {
        assert_eq!("2.8".parse::<NixVersion>().unwrap(), NixVersion(2, 8));
        assert_eq!("2.24.3".parse::<NixVersion>().unwrap(), NixVersion(2, 24));
        assert!("2".parse::<NixVersion>().is_err());
        assert!("2.x".parse::<NixVersion>().is_err());
    }

    #[test]
    fn rules_by_release() {
        for (v, rule) in [
            ((2, 3), CaRule::SelfRefPositions),
            ((2, 16), CaRule::SelfRefPositions),
            ((2, 17), CaRule::SelfRefZeroed),
            ((2, 34), CaRule::SelfRefZeroed),
            ((2, 35), CaRule::SelfRefPositions),
        ] {
            assert_eq!(ca_rule_for(NixVersion(v.0, v.1)), rule, "{v:?}");
        }
        let g = CaRuleChoice::guessed("nobody said", "say it");
        assert_eq!(g.rule(), DEFAULT_CA_RULE);
        let CaRuleChoice::Guessed { note, .. } = g else { panic!() };
        assert_eq!(note, format!("nobody said; using {} (say it)", describe(DEFAULT_CA_RULE)));
    }

    #[test]
    fn overrides_replace_only_what_they_set() {
        let base = builder_limits();
        assert_eq!(with_overrides(base, &Limits::default()), base);
        let o = Limits { timeout_s: 7, cores: 2, ..Limits::default() };
        let l = with_overrides(base, &o);
        assert_eq!((l.timeout_s, l.cores, l.max_silent_s), (7, 2, DEFAULT_MAX_SILENT_S));
    }
}
