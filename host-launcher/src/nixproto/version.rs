//! Protocol versions and what they say about the client's Nix.
//!
//! A protocol version is `(major << 8) | minor`. Both sides use the smaller of the two versions
//! (the worker protocol ≥ 1.38 also intersects feature sets). From the negotiated version (and
//! features) we infer the range of Nix releases the client can be ([`NixRange`]), and from that
//! two things a remote builder must get right because the client re-checks them:
//!
//! * the **realisation format** of `BuildResult.builtOutputs` ([`RealisationFormat`]): the old
//!   JSON records keyed `sha256:<hash modulo>!<out>` (Nix ≤ 2.34), or `(outPath, signatures)` per
//!   output name with the key `drvPath + output` built by the client (Nix ≥ 2.35, worker feature
//!   `realisation-with-path-not-hash`, serve 2.8);
//! * the **self-reference rule** for floating content-addressed output paths
//!   ([`build_trace::CaRule`]): positions of self-references are hashed by Nix ≤ 2.16 and ≥ 2.35,
//!   not by 2.17–2.34.
//!
//! Versions by Nix release (read in NixOS/nix at each tag): worker 1.34 = 2.8–2.14, 1.35 =
//! 2.15–2.18, 1.36 = 2.19, 1.37 = 2.20–2.23, 1.38 = 2.24–2.34, 1.38 + feature = 2.35+; serve
//! 2.7 = 2.8–2.34, 2.8 = 2.35+. Within serve 2.7 the build options of `BuildDerivation` narrow
//! it further ([`serve_build_options_range`]): Nix 2.8–2.12 send their `repeat` and
//! `enforce-determinism` settings (by default 0 and true), Nix 2.13–2.34 always 0 and false. Where
//! the range still straddles a rule change (worker 1.35; serve 2.7 with 0 and false), the builder
//! cannot tell from the wire: `--client-nix-version` says it, else the core's default rule
//! applies, said in the build log (documented in `docs/nix-remote-builder.md`).
//!
//! What is not here: the handshakes themselves (`worker`, `serve`).

use std::collections::BTreeSet;
use std::fmt;

use build_trace::CaRule;

use crate::core::request::{ca_rule_for, CaRuleChoice, NixVersion};

/// `(major << 8) | minor`.
pub type ProtoVersion = u64;

/// The major part of a protocol version.
pub fn major(v: ProtoVersion) -> u64 {
    v >> 8
}

/// The minor part of a protocol version.
pub fn minor(v: ProtoVersion) -> u64 {
    v & 0xff
}

/// `major.minor` for messages.
pub fn show(v: ProtoVersion) -> String {
    format!("{}.{}", major(v), minor(v))
}

/// The worker-protocol feature of Nix ≥ 2.35: realisations keyed by drv path + output name.
pub const FEATURE_REALISATION_WITH_PATH: &str = "realisation-with-path-not-hash";

/// An inclusive range of Nix releases; `max = None` means "and later".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NixRange {
    /// Oldest release.
    pub min: NixVersion,
    /// Newest release, if bounded.
    pub max: Option<NixVersion>,
}

impl NixRange {
    const fn new(min: NixVersion, max: Option<NixVersion>) -> Self {
        NixRange { min, max }
    }

    /// Whether `v` is in the range.
    pub fn contains(&self, v: NixVersion) -> bool {
        v >= self.min && self.max.is_none_or(|m| v <= m)
    }

    /// The one rule for the whole range, if there is one.
    pub fn ca_rule(&self) -> Option<CaRule> {
        let rule_of = ca_rule_for;
        let lo = rule_of(self.min);
        let hi = rule_of(self.max.unwrap_or(NixVersion(u32::MAX, 0)));
        let straddles = self.contains(NixVersion(2, 16)) && self.contains(NixVersion(2, 17))
            || self.contains(NixVersion(2, 34)) && self.contains(NixVersion(2, 35));
        (lo == hi && !straddles).then_some(lo)
    }
}

impl fmt::Display for NixRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.max {
            Some(m) if m == self.min => write!(f, "Nix {m}"),
            Some(m) => write!(f, "Nix {}–{m}", self.min),
            None => write!(f, "Nix {} or later", self.min),
        }
    }
}

/// How `BuildResult.builtOutputs` carries realisations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealisationFormat {
    /// The protocol has no `builtOutputs` (worker < 1.28, serve < 2.6).
    None,
    /// `map<"sha256:<hex>!<out>", realisation JSON>` (Nix ≤ 2.34).
    LegacyJson,
    /// `map<outputName, (outPath, signatures)>`, keyed by drv path on the client (Nix ≥ 2.35).
    DrvPathKeyed,
}

/// Which protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The worker protocol (`ssh-ng://`, `unix://`, `nix-daemon --stdio`).
    Worker,
    /// The serve protocol (`ssh://`, `nix-store --serve`).
    Serve,
}

/// What the handshake established about a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientProfile {
    /// Which protocol.
    pub protocol: Protocol,
    /// The negotiated version.
    pub version: ProtoVersion,
    /// The negotiated features (worker ≥ 1.38).
    pub features: BTreeSet<String>,
    /// `--client-nix-version`, if the operator said which Nix the clients run.
    pub declared_nix: Option<NixVersion>,
    /// What the client's requests (not the handshake) showed about its release: the serve
    /// protocol's build options ([`serve_build_options_range`]).
    pub observed: Option<NixRange>,
}

/// The Nix releases that send these serve-protocol build options (`BuildDerivation`, serve
/// ≥ 2.3), if they say more than the protocol version: a non-zero `repeat` or a true
/// `enforce-determinism` comes only from Nix ≤ 2.12, which sent its own settings (by default 0
/// and true); Nix 2.13 and later send 0 and false whatever their settings. 0 and false says
/// nothing: Nix 2.13–2.34, or an older Nix with `enforce-determinism = false`.
pub fn serve_build_options_range(nr_repeats: u64, enforce_determinism: bool) -> Option<NixRange> {
    (nr_repeats != 0 || enforce_determinism)
        .then_some(NixRange::new(NixVersion(2, 0), Some(NixVersion(2, 12))))
}

/// The client's declared Nix version contradicts its protocol version.
#[derive(Debug, thiserror::Error)]
#[error("vouch was told the client runs Nix {declared} (--client-nix-version), but it speaks {protocol} {version}, which is {range}")]
pub struct VersionMismatch {
    /// The declared version.
    pub declared: NixVersion,
    /// `worker protocol` or `serve protocol`.
    pub protocol: &'static str,
    /// The negotiated version.
    pub version: String,
    /// The range it implies.
    pub range: NixRange,
}

impl ClientProfile {
    /// A profile without a declared Nix version.
    pub fn new(protocol: Protocol, version: ProtoVersion, features: BTreeSet<String>) -> Self {
        ClientProfile { protocol, version, features, declared_nix: None, observed: None }
    }

    /// Whether a feature was negotiated.
    pub fn has_feature(&self, f: &str) -> bool {
        self.features.contains(f)
    }

    fn protocol_name(&self) -> &'static str {
        match self.protocol {
            Protocol::Worker => "worker protocol",
            Protocol::Serve => "serve protocol",
        }
    }

    /// The Nix releases that speak this version (with these features) and sent what was
    /// [`observed`](Self::observed).
    pub fn nix_range(&self) -> NixRange {
        let wire = self.protocol_range();
        let Some(seen) = self.observed else {
            return wire;
        };
        let min = wire.min.max(seen.min);
        let max = match (wire.max, seen.max) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // An observation that contradicts the protocol version is not believed.
        if max.is_some_and(|m| m < min) {
            return wire;
        }
        NixRange::new(min, max)
    }

    /// The Nix releases that speak this protocol version (with these features).
    fn protocol_range(&self) -> NixRange {
        let v = |a, b| NixVersion(a, b);
        match self.protocol {
            Protocol::Worker => match minor(self.version) {
                0..=33 => NixRange::new(v(2, 0), Some(v(2, 7))),
                34 => NixRange::new(v(2, 8), Some(v(2, 14))),
                35 => NixRange::new(v(2, 15), Some(v(2, 18))),
                36 => NixRange::new(v(2, 19), Some(v(2, 19))),
                37 => NixRange::new(v(2, 20), Some(v(2, 23))),
                _ if self.has_feature(FEATURE_REALISATION_WITH_PATH) => {
                    NixRange::new(v(2, 35), None)
                }
                _ => NixRange::new(v(2, 24), Some(v(2, 34))),
            },
            Protocol::Serve => match minor(self.version) {
                0..=6 => NixRange::new(v(2, 0), Some(v(2, 7))),
                7 => NixRange::new(v(2, 8), Some(v(2, 34))),
                _ => NixRange::new(v(2, 35), None),
            },
        }
    }

    /// The realisation format this client reads.
    pub fn realisation_format(&self) -> RealisationFormat {
        match self.protocol {
            Protocol::Worker if self.has_feature(FEATURE_REALISATION_WITH_PATH) => {
                RealisationFormat::DrvPathKeyed
            }
            Protocol::Worker if minor(self.version) >= 28 => RealisationFormat::LegacyJson,
            Protocol::Serve if minor(self.version) >= 8 => RealisationFormat::DrvPathKeyed,
            Protocol::Serve if minor(self.version) >= 6 => RealisationFormat::LegacyJson,
            _ => RealisationFormat::None,
        }
    }

    /// The self-reference rule the client will re-check our CA output paths with: known from
    /// `--client-nix-version` or the Nix releases that speak this protocol, else guessed.
    pub fn ca_rule(&self) -> Result<CaRuleChoice, VersionMismatch> {
        let range = self.nix_range();
        if let Some(declared) = self.declared_nix {
            if !range.contains(declared) {
                return Err(VersionMismatch {
                    declared,
                    protocol: self.protocol_name(),
                    version: show(self.version),
                    range,
                });
            }
            return Ok(CaRuleChoice::Known(ca_rule_for(declared)));
        }
        Ok(match range.ca_rule() {
            Some(rule) => CaRuleChoice::Known(rule),
            None => CaRuleChoice::guessed(
                &format!(
                    "{} {} is spoken by {range}, which straddles a change of the CA \
                     self-reference rule",
                    self.protocol_name(),
                    show(self.version)
                ),
                "set --client-nix-version on the builder to choose",
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::request::DEFAULT_CA_RULE;

    fn known(rule: CaRule) -> CaRuleChoice {
        CaRuleChoice::Known(rule)
    }

    fn guessed(p: &ClientProfile) -> bool {
        matches!(p.ca_rule().unwrap(), CaRuleChoice::Guessed { rule: DEFAULT_CA_RULE, .. })
    }

    fn worker(minor: u64, features: &[&str]) -> ClientProfile {
        ClientProfile::new(
            Protocol::Worker,
            0x100 | minor,
            features.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn nix_2_8_is_unambiguous() {
        let p = worker(34, &[]);
        assert_eq!(p.nix_range().to_string(), "Nix 2.8–2.14");
        assert_eq!(p.ca_rule().unwrap(), known(CaRule::SelfRefPositions));
        assert_eq!(p.realisation_format(), RealisationFormat::LegacyJson);
    }

    #[test]
    fn rules_by_version() {
        assert_eq!(worker(37, &[]).ca_rule().unwrap(), known(CaRule::SelfRefZeroed));
        assert_eq!(worker(38, &[]).ca_rule().unwrap(), known(CaRule::SelfRefZeroed));
        let new = worker(38, &[FEATURE_REALISATION_WITH_PATH]);
        assert_eq!(new.ca_rule().unwrap(), known(CaRule::SelfRefPositions));
        assert_eq!(new.realisation_format(), RealisationFormat::DrvPathKeyed);
        // 1.35 is Nix 2.15–2.18: straddles the 2.17 change.
        assert!(guessed(&worker(35, &[])));
    }

    #[test]
    fn serve_versions() {
        let s27 = ClientProfile::new(Protocol::Serve, 0x207, BTreeSet::new());
        assert_eq!(s27.realisation_format(), RealisationFormat::LegacyJson);
        assert!(guessed(&s27));
        let CaRuleChoice::Guessed { note, .. } = s27.ca_rule().unwrap() else { panic!() };
        assert!(note.starts_with("serve protocol 2.7 is spoken by Nix 2.8–2.34"), "{note}");
        let declared = ClientProfile { declared_nix: Some(NixVersion(2, 8)), ..s27.clone() };
        assert_eq!(declared.ca_rule().unwrap(), known(CaRule::SelfRefPositions));
        let wrong = ClientProfile { declared_nix: Some(NixVersion(2, 36)), ..s27.clone() };
        let err = wrong.ca_rule().unwrap_err().to_string();
        assert!(err.contains("Nix 2.36") && err.contains("serve protocol 2.7"), "{err}");
        // Nix 2.8–2.12's build options (enforce-determinism true by default) tell it apart.
        let mut old = s27.clone();
        old.observed = serve_build_options_range(0, true);
        assert_eq!(old.nix_range().to_string(), "Nix 2.8–2.12");
        assert_eq!(old.ca_rule().unwrap(), known(CaRule::SelfRefPositions));
        old.observed = serve_build_options_range(2, false);
        assert_eq!(old.ca_rule().unwrap(), known(CaRule::SelfRefPositions));
        // Nix 2.13–2.34 send 0 and false: still ambiguous.
        assert_eq!(serve_build_options_range(0, false), None);
        // A declared 2.26 contradicts options only Nix ≤ 2.12 sends.
        let declared = ClientProfile {
            declared_nix: Some(NixVersion(2, 26)),
            observed: serve_build_options_range(0, true),
            ..s27.clone()
        };
        assert!(declared.ca_rule().unwrap_err().to_string().contains("Nix 2.8–2.12"));
        let s28 = ClientProfile::new(Protocol::Serve, 0x208, BTreeSet::new());
        // An observation that contradicts the protocol version is ignored.
        let odd = ClientProfile { observed: serve_build_options_range(0, true), ..s28.clone() };
        assert_eq!(odd.nix_range().to_string(), "Nix 2.35 or later");
        assert_eq!(s28.realisation_format(), RealisationFormat::DrvPathKeyed);
        assert_eq!(s28.ca_rule().unwrap(), known(CaRule::SelfRefPositions));
    }
}
