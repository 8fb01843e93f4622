//! A Nix client's `BuildDerivation` as the core's [`BuildRequest`]:
//!
//! 1. Refuse what vouch cannot build honestly: check or repair mode; a client whose declared
//!    Nix version contradicts its protocol.
//! 2. The CA self-reference rule: the one of the client's Nix release, from its profile
//!    (protocol version, features, the serve protocol's build options, `--client-nix-version`);
//!    where the profile straddles a rule change, a guess the engine says in the build log.
//! 3. Limits: the client's non-zero values (serve build options, or the session's
//!    `SetOptions` over a socket: [`SESSION_SETTINGS`]) override the engine's defaults.
//! 4. Trust ([`Admitted`]): an input-addressed derivation's output paths cannot be checked from
//!    a `BuildDerivation` (it has no input derivations) unless it has none, so:
//!    - a client the operator does not trust is refused ([`UNTRUSTED_INPUT_ADDRESSED`]); its
//!      input-addressed builds come through `BuildPaths` of the `.drv` closure
//!      (`super::build_paths`), where vouch computes the paths;
//!    - a trusted client's is built, and its outputs stay in the session's overlay unless
//!      vouch computed its paths (a derivation without input derivations, whose basic
//!      derivation is the whole `.drv`: [`leaf_graph`], checked by `crate::core::ownership`
//!      like any graph, so a leaf declaring other paths is refused from anyone);
//!    - content-addressed and fixed-output derivations are built for anyone: their output
//!      paths follow from their contents.
//!
//! What is not here: the build itself (`crate::core::engine`).

use build_trace::job::{step_kind, BasicDerivation, Limits, StepKind};
use nix_formats::StorePath;

use crate::core::ownership::Derivations;
use crate::core::{BuildRequest, BuildResult, FailureStatus};
use crate::nixproto::{BuildDerivation, BuildMode, BuildOptions, ClientOptions};
use crate::store::StoreView;

/// What an untrusted client's input-addressed `BuildDerivation` is answered with (the rule).
pub const UNTRUSTED_INPUT_ADDRESSED: &str = "vouch builds an input-addressed derivation for a \
    client it does not trust only from its .drv closure (BuildPaths), where it computes the \
    output paths itself; BuildDerivation carries output paths that vouch cannot check. Nix ≥ \
    2.16 does this by itself for a builder that does not trust it; otherwise the operator must \
    trust this client (vouch nix-builder --trusted-user, or --trusted in an ssh forced command)";

/// A `BuildDerivation` the session may build: the core's request, and whether its outputs must
/// stay in the session's overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The core's request.
    pub request: BuildRequest,
    /// The outputs' paths were not computed by vouch: they stay private to the session.
    pub private_outputs: bool,
}

/// The core's request for a client's `BuildDerivation` (the client trusted as `trusted` says),
/// or the failure it is answered with.
pub fn core_request(
    d: BuildDerivation,
    session: Option<&ClientOptions>,
    vcpus: u64,
    trusted: bool,
) -> Result<Admitted, BuildResult> {
    let refuse = |msg: String| {
        tracing::warn!("build refused: {msg}");
        BuildResult::failed(FailureStatus::MiscFailure, msg)
    };
    if d.mode != BuildMode::Normal {
        return Err(refuse(format!(
            "vouch builds in normal mode only; {} was asked in {:?} mode",
            d.drv_path, d.mode
        )));
    }
    let ca_rule = d.client.ca_rule().map_err(|e| refuse(e.to_string()))?;
    let input_addressed = step_kind(&d.drv).is_ok_and(|k| k == StepKind::InputAddressed);
    if input_addressed && !trusted {
        return Err(refuse(format!("{}: {UNTRUSTED_INPUT_ADDRESSED}", d.drv_path)));
    }
    // A leaf derivation's graph is its basic derivation: its paths are computed and checked
    // by the core like any graph's. Any other input-addressed one is a trusted client's, built
    // as given, with its outputs kept in the session's overlay.
    let derivations = leaf_graph(&d.drv_path, &d.drv).filter(|_| input_addressed);
    let private_outputs = input_addressed && derivations.is_none();
    let request = BuildRequest {
        limits: client_limits(d.options.as_ref(), session, vcpus),
        drv_path: d.drv_path,
        drv: d.drv,
        outputs: Default::default(),
        ca_rule,
        derivations,
        trusted,
    };
    Ok(Admitted { request, private_outputs })
}

/// A trusted client's input-addressed `BuildDerivation` with input derivations, whose `.drv`
/// closure this builder's store holds (uploaded text-addressed, so each `.drv`'s contents are
/// tied to its path; the CI service's closures): that closure is its graph, so vouch computes
/// its output paths (`crate::core::ownership` checks the request against it, as for
/// `BuildPaths`) and its outputs are shared like any whose paths vouch computed. Otherwise as
/// admitted.
pub fn with_stored_graph(mut a: Admitted, view: StoreView<'_>) -> Admitted {
    if !a.private_outputs {
        return a;
    }
    let drv = &a.request.drv_path;
    let text_addressed = view
        .path_info(drv)
        .ok()
        .flatten()
        .is_some_and(|i| i.info.ca.as_deref().is_some_and(|c| c.starts_with("text:")));
    if !text_addressed {
        return a;
    }
    if let Ok(d) = Derivations::from_store(view, drv) {
        tracing::info!(drv = %drv, "its .drv closure is here: vouch computes its output paths");
        a.request.derivations = Some(d);
        a.private_outputs = false;
    }
    a
}

/// The derivation graph of a `BuildDerivation` whose basic derivation is the whole `.drv` at
/// `drv_path` (it had no input derivations, and its input sources are the `.drv`'s): then
/// vouch computes its output paths (`crate::core::ownership`), as for any graph. `None` for
/// any other basic derivation: its input derivations are gone.
pub fn leaf_graph(drv_path: &StorePath, basic: &BasicDerivation) -> Option<Derivations> {
    let drv = basic.to_derivation().ok()?;
    Derivations::load(drv_path, &mut |p| (p == drv_path).then(|| drv.clone())).ok()
}

/// The settings of a worker-protocol `SetOptions` (what a `unix://` client sends first) that
/// vouch applies to the session's builds, by their `nix.conf` names: `max-silent-time` and
/// `cores` (also fixed fields of the message), `timeout` and `max-build-log-size` (overrides).
/// Every other field and setting is ignored (`docs/nix-remote-builder.md` lists them).
pub const SESSION_SETTINGS: &[&str] =
    &["max-silent-time", "timeout", "max-build-log-size", "cores"];

/// The limits a Nix client set for one build (zero where it set none, for the engine's
/// defaults): its non-zero values from the serve protocol's per-build options, then from the
/// session's `SetOptions` ([`SESSION_SETTINGS`]). A client's `cores` is capped at the VM's
/// `vcpus`.
pub fn client_limits(
    serve: Option<&BuildOptions>,
    session: Option<&ClientOptions>,
    vcpus: u64,
) -> Limits {
    let mut l = Limits::default();
    let set = |slot: &mut u64, v: u64| {
        if v > 0 {
            *slot = v;
        }
    };
    if let Some(o) = serve {
        set(&mut l.timeout_s, o.build_timeout);
        set(&mut l.max_silent_s, o.max_silent_time);
        set(&mut l.max_log_bytes, o.max_log_size);
    }
    if let Some(o) = session {
        let num = |k: &str| {
            let v = o.overrides.get(k)?;
            let n = v.trim().parse::<u64>().ok();
            if n.is_none() {
                tracing::warn!(setting = k, value = %v, "ignoring a client setting that is not a number");
            }
            n
        };
        set(&mut l.max_silent_s, num("max-silent-time").unwrap_or(o.max_silent_time));
        set(&mut l.timeout_s, num("timeout").unwrap_or(0));
        set(&mut l.max_log_bytes, num("max-build-log-size").unwrap_or(0));
        let cores = num("cores").unwrap_or(o.build_cores);
        set(&mut l.cores, cores.min(vcpus.max(1)));
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::request::{builder_limits, with_overrides};

    fn merge_limits(
        base: Limits,
        serve: Option<&BuildOptions>,
        session: Option<&ClientOptions>,
        vcpus: u64,
    ) -> Limits {
        with_overrides(base, &client_limits(serve, session, vcpus))
    }

    #[test]
    fn client_limits_override_defaults_only_when_set() {
        let base = builder_limits();
        assert_eq!(merge_limits(base, None, None, 1), base);
        let serve = BuildOptions {
            build_timeout: 60,
            max_silent_time: 0,
            max_log_size: 10,
            ..Default::default()
        };
        let l = merge_limits(base, Some(&serve), None, 1);
        assert_eq!((l.timeout_s, l.max_silent_s, l.max_log_bytes), (60, base.max_silent_s, 10));
        // What Nix 2.8 sends over `unix://`: the fixed fields, and every setting as an override
        // (`max-silent-time` and `cores` only as fields); 0 means "no limit" to Nix, vouch's
        // default here.
        let mut o = ClientOptions { max_silent_time: 5, build_cores: 2, ..Default::default() };
        for (k, v) in [("timeout", "7"), ("max-build-log-size", "0"), ("sandbox", "true")] {
            o.overrides.insert(k.into(), v.into());
        }
        let l = merge_limits(base, None, Some(&o), 4);
        assert_eq!(
            (l.timeout_s, l.max_silent_s, l.max_log_bytes, l.cores),
            (7, 5, base.max_log_bytes, 2)
        );
        assert_eq!((l.memory_bytes, l.max_processes, l.tmpfs_bytes), (0, 0, 0), "not the client's");
        // Cores never exceed the VM's vCPUs; an override by name wins over the field; a value
        // that is not a number is ignored.
        assert_eq!(merge_limits(base, None, Some(&o), 1).cores, 1);
        o.overrides.insert("max-silent-time".into(), "9".into());
        o.overrides.insert("max-build-log-size".into(), "junk".into());
        let l = merge_limits(base, None, Some(&o), 4);
        assert_eq!((l.max_silent_s, l.max_log_bytes), (9, base.max_log_bytes));
    }

    fn derivation(mode: BuildMode, client: crate::nixproto::ClientProfile) -> BuildDerivation {
        BuildDerivation {
            drv_path: nix_formats::StorePath::from_parts([7; 20], "b.drv").unwrap(),
            drv: crate::core::request::test_derivation("b"),
            mode,
            options: Some(BuildOptions { build_timeout: 60, ..Default::default() }),
            client,
        }
    }

    #[test]
    fn a_build_derivation_becomes_the_core_request() {
        use crate::core::CaRuleChoice;
        use crate::nixproto::{ClientProfile, Protocol};
        use build_trace::CaRule;
        // Serve 2.7 with Nix 2.8–2.12's build options: the rule of Nix ≤ 2.16, known.
        let mut old = ClientProfile::new(Protocol::Serve, 0x207, Default::default());
        old.observed = crate::nixproto::version::serve_build_options_range(0, true);
        let req = core_request(derivation(BuildMode::Normal, old), None, 1, true).unwrap().request;
        assert_eq!(req.ca_rule, CaRuleChoice::Known(CaRule::SelfRefPositions));
        assert_eq!(req.limits, Limits { timeout_s: 60, ..Limits::default() });
        assert!(req.trusted && req.outputs.is_empty());
        // Plain serve 2.7 straddles the 2.17 change: a guess, with a note that says how to choose.
        let plain = ClientProfile::new(Protocol::Serve, 0x207, Default::default());
        let req = core_request(derivation(BuildMode::Normal, plain.clone()), None, 1, true)
            .unwrap()
            .request;
        let CaRuleChoice::Guessed { note, .. } = req.ca_rule else { panic!("{:?}", req.ca_rule) };
        assert!(note.contains("--client-nix-version"), "{note}");
        // Check mode and a declared release the protocol contradicts are refused, as failures.
        let refused = |d| match core_request(d, None, 1, true) {
            Err(BuildResult::Failed(f)) => f,
            other => panic!("{other:?}"),
        };
        let f = refused(derivation(BuildMode::Check, plain.clone()));
        assert!(f.message.contains("normal mode only"), "{}", f.message);
        let lying = ClientProfile { declared_nix: Some(crate::core::NixVersion(2, 36)), ..plain };
        let f = refused(derivation(BuildMode::Normal, lying));
        assert_eq!(f.status, FailureStatus::MiscFailure);
        assert!(f.message.contains("--client-nix-version"), "{}", f.message);
    }
}

#[cfg(test)]
mod trust_tests {
    use super::*;
    use crate::nixproto::{ClientProfile, Protocol};
    use build_trace::job::DrvOutput;
    use nix_formats::store_path::make_output_path;
    use nix_formats::Hash;

    /// A leaf input-addressed derivation `leaf` declaring the output path its hash modulo gives,
    /// and its `.drv` path.
    fn leaf() -> (StorePath, BasicDerivation) {
        let mut basic = crate::core::request::test_derivation("leaf");
        let empty = DrvOutput { path: None, hash_algo: String::new(), hash: String::new() };
        basic.outputs.insert("out".into(), empty);
        basic.env.insert("out".into(), String::new());
        // Nix's way: the paths follow from the derivation with its outputs masked (as empty as
        // they are here).
        let unfilled = basic.to_derivation().unwrap();
        let h = unfilled.hash_modulo("leaf", true, &mut |_| unreachable!()).unwrap();
        let out = make_output_path("out", &Hash::sha256(*h.get("out").unwrap()), "leaf").unwrap();
        basic.outputs.get_mut("out").unwrap().path = Some(out.clone());
        basic.env.insert("out".into(), out.to_string());
        let drv_path = basic.drv_path().unwrap();
        (drv_path, basic)
    }

    fn build(
        drv_path: StorePath,
        drv: BasicDerivation,
        trusted: bool,
    ) -> Result<Admitted, BuildResult> {
        let client = ClientProfile::new(Protocol::Worker, 0x125, Default::default());
        let d = BuildDerivation { drv_path, drv, mode: BuildMode::Normal, options: None, client };
        core_request(d, None, 1, trusted)
    }

    #[test]
    fn input_addressed_builds_follow_the_trust_rule() {
        let (drv_path, basic) = leaf();
        assert!(leaf_graph(&drv_path, &basic).is_some());
        // Untrusted: refused, naming the rule, whatever the paths.
        let Err(BuildResult::Failed(f)) = build(drv_path.clone(), basic.clone(), false) else {
            panic!("an untrusted input-addressed BuildDerivation was admitted")
        };
        assert!(f.message.contains("only from its .drv closure (BuildPaths)"), "{}", f.message);
        assert!(f.message.contains(&drv_path.to_string()), "{}", f.message);
        // Trusted: a leaf whose paths vouch computes may share its outputs, and the core
        // checks them from its graph…
        let a = build(drv_path.clone(), basic.clone(), true).unwrap();
        assert!(!a.private_outputs && a.request.trusted);
        let kind = StepKind::InputAddressed;
        assert!(a.request.derivations.is_some());
        crate::core::ownership::check(&a.request, kind, &mut |_, _| None).unwrap();
        // …one named by another drv path (a non-leaf, as the build hook sends it) keeps them
        // private, built as given…
        let other = StorePath::from_parts([9; 20], "leaf.drv").unwrap();
        let a = build(other, basic.clone(), true).unwrap();
        assert!(a.private_outputs && a.request.derivations.is_none());
        // …and a leaf declaring another output path than its derivation gives is refused by
        // the core, even from a trusted client (item 1: it names both paths).
        let mut lying = basic.clone();
        let wrong = StorePath::from_parts([3; 20], "leaf").unwrap();
        lying.outputs.get_mut("out").unwrap().path = Some(wrong.clone());
        let lying_path = lying.drv_path().unwrap();
        let a = build(lying_path, lying, true).unwrap();
        let refusal = crate::core::ownership::check(&a.request, kind, &mut |_, _| None);
        let msg = build_trace::error_chain(&refusal.unwrap_err());
        assert!(msg.contains(&wrong.to_string()), "{msg}");
    }

    #[test]
    fn content_addressed_builds_are_for_anyone() {
        let mut basic = crate::core::request::test_derivation("ca");
        let out = DrvOutput { path: None, hash_algo: "r:sha256".into(), hash: String::new() };
        basic.outputs.insert("out".into(), out);
        let drv_path = basic.drv_path().unwrap();
        let a = build(drv_path, basic, false).unwrap();
        assert!(!a.private_outputs && !a.request.trusted);
    }
}
