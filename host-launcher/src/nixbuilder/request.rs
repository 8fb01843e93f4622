//! `BuildDerivation`: one step in a fresh VM, answered with a `BuildResult`.
//!
//! 1. Refuse what cannot be built honestly (check/repair mode, outputs of mixed kinds, a client
//!    whose declared Nix version contradicts its protocol).
//! 2. The input closure must be in the content store (the client uploads what
//!    `QueryValidPaths` said was missing); it is pinned for the session.
//! 3. Limits: vouch's defaults, overridden by the client's non-zero values (serve build options,
//!    or the session's `SetOptions` over a socket: [`SESSION_SETTINGS`]).
//! 4. [`crate::build::run_step`] builds in a fresh VM and returns only a checked outcome (statement
//!    for exactly this job, evidence verified, output NARs matching the statement). Fixed-output
//!    derivations go to the networked variant (`network: true`), accepted only by their declared
//!    hash; where that variant does not exist yet the build fails saying so.
//! 5. Only then: the step is published to the trace store (statement, evidence, signed records)
//!    so `vouch verify` finds it; the outputs are registered in the content store (re-verified);
//!    the realisations signed for the step are returned in the client's format (Nix ≤ 2.34:
//!    `sha256:<hash modulo>!<out>` + JSON; ≥ 2.35: output path + signatures over the
//!    drv-path-keyed fingerprint), with CA paths made under the client's self-reference rule.
//!
//! Any failure is a `BuildResult` with a failure status and a message naming the cause; nothing
//! of a failed step is registered or served.
//!
//! What is not here: the VM conversation and its checks (`crate::build`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use build_trace::job::{step_kind, CaRule, Limits, PathInfo, StepKind};
use channel::messages::FailureKind;

use super::adapters::{LinesToClient, StoreInputs};
use super::BuilderCore;
use crate::build::publish::{key_name, publish};
use crate::build::{run_step, StepError, StepOutcome, StepRequest};
use crate::nixproto::action::error_chain;
use crate::nixproto::version::show;
use crate::nixproto::{
    BuildMode, BuildOptions, BuildRequest, BuildResult, BuildStatus, BuiltOutput,
    LegacyRealisation, LogSink, ValidPathInfo,
};
use crate::store::{FileUploads, Origin};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn fail(status: BuildStatus, msg: impl Into<String>) -> BuildResult {
    let msg = msg.into();
    tracing::warn!(?status, "build failed: {msg}");
    BuildResult::failure(status, msg)
}

/// The settings of a worker-protocol `SetOptions` (what a `unix://` client sends first) that
/// vouch applies to the session's builds, by their `nix.conf` names: `max-silent-time` and
/// `cores` (also fixed fields of the message), `timeout` and `max-build-log-size` (overrides).
/// Every other field and setting is ignored (`docs/nix-remote-builder.md` lists them).
pub const SESSION_SETTINGS: &[&str] =
    &["max-silent-time", "timeout", "max-build-log-size", "cores"];

/// The limits of one build: `base` (vouch's configured defaults), with the client's non-zero
/// values: the serve protocol's per-build options, then the session's `SetOptions`
/// ([`SESSION_SETTINGS`]). A client's `cores` is capped at the VM's `vcpus`.
pub fn merge_limits(
    base: Limits,
    serve: Option<&BuildOptions>,
    session: Option<&crate::nixproto::ClientOptions>,
    vcpus: u64,
) -> Limits {
    let mut l = base;
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

/// Map a failed step to a status and message.
fn step_failure(e: &StepError) -> BuildResult {
    let status = match e {
        StepError::Guest { kind, .. } => match kind {
            FailureKind::BuilderFailed => BuildStatus::PermanentFailure,
            FailureKind::Timeout | FailureKind::MaxSilent => BuildStatus::TimedOut,
            FailureKind::LogLimit => BuildStatus::LogLimitExceeded,
            FailureKind::InputHash | FailureKind::InputCa => BuildStatus::InputRejected,
            FailureKind::Output => BuildStatus::OutputRejected,
            _ => BuildStatus::MiscFailure,
        },
        StepError::Watchdog(_) => BuildStatus::TimedOut,
        StepError::Rejected(_) => BuildStatus::OutputRejected,
        StepError::Cancelled => BuildStatus::TransientFailure,
        _ => BuildStatus::MiscFailure,
    };
    fail(status, format!("vouch: {}", error_chain(e)))
}

/// Build one derivation (see the module docs).
pub fn build(core: &mut BuilderCore, req: BuildRequest, log: &mut dyn LogSink) -> BuildResult {
    let start = now();
    let drv_path = req.drv_path.clone();
    if req.mode != BuildMode::Normal {
        return fail(
            BuildStatus::MiscFailure,
            format!(
                "vouch builds in normal mode only; {drv_path} was asked in {:?} mode",
                req.mode
            ),
        );
    }
    let kind = match step_kind(&req.drv) {
        Ok(k) => k,
        Err(e) => {
            return fail(
                BuildStatus::MiscFailure,
                format!("vouch cannot build {drv_path}: {}", error_chain(&e)),
            )
        }
    };
    let (ca_rule, sure) = match req.client.ca_rule() {
        Ok(r) => r,
        Err(e) => return fail(BuildStatus::MiscFailure, e.to_string()),
    };
    if !sure && kind == StepKind::FloatingCa {
        log.line(&format!(
            "vouch: {} {} is spoken by {}, which straddles a change of the CA self-reference rule; \
             using {} (set --client-nix-version on the builder to choose)",
            if req.client.protocol == crate::nixproto::Protocol::Worker { "worker protocol" } else { "serve protocol" },
            show(req.client.version),
            req.client.nix_range(),
            match ca_rule {
                CaRule::SelfRefPositions => "the rule of Nix ≤ 2.16 and ≥ 2.35 (self-reference positions hashed)",
                CaRule::SelfRefZeroed => "the rule of Nix 2.17–2.34 (self-reference positions not hashed)",
            }
        ));
    }

    // The input closure, from the content store, pinned for this session.
    let closure = match core.store.closure(&req.drv.input_srcs) {
        Ok(c) => c,
        Err(e) => {
            return fail(
                BuildStatus::MiscFailure,
                format!(
                    "vouch cannot build {drv_path}: {} (the client uploads inputs before building)",
                    error_chain(&e)
                ),
            )
        }
    };
    if let Err(e) = core.store.pin(&closure.keys().cloned().collect()) {
        return fail(
            BuildStatus::MiscFailure,
            format!("pinning the inputs of {drv_path}: {}", error_chain(&e)),
        );
    }

    let limits = merge_limits(
        core.cfg.limits,
        req.options.as_ref(),
        core.options.as_ref(),
        core.cfg.launcher.vcpus.into(),
    );
    let step = StepRequest {
        drv_path: drv_path.clone(),
        drv: req.drv,
        outputs: BTreeSet::new(),
        limits,
        ca_rule,
        network: kind == StepKind::FixedOutput,
        job_id: None,
    };
    tracing::info!(drv = %drv_path, ?kind, ?ca_rule, ?limits, inputs = closure.len(), "building in a fresh VM");
    log.build_started(&drv_path);
    let result = {
        let mut sink = LinesToClient::new(&mut *log);
        let r = run_step(step, &StoreInputs(&core.store), &mut sink, &core.cfg.launcher);
        sink.finish();
        r
    };
    log.build_finished();
    let outcome = match result {
        Ok(o) => o,
        Err(e) => return step_failure(&e),
    };
    match finish(core, &outcome, ca_rule) {
        Ok(built_outputs) => {
            let mut res = BuildResult::failure(BuildStatus::Built, "");
            res.times_built = 1;
            res.start_time = start;
            res.stop_time = now();
            res.built_outputs = built_outputs;
            res
        }
        Err(msg) => fail(BuildStatus::MiscFailure, msg),
    }
}

/// Publish a checked step, register its outputs, and make the realisations.
fn finish(
    core: &BuilderCore,
    outcome: &StepOutcome,
    ca_rule: CaRule,
) -> Result<BTreeMap<String, BuiltOutput>, String> {
    let st = &outcome.statement;
    let cfg = &core.cfg;
    let name = key_name(outcome, &cfg.key_naming)
        .map_err(|e| format!("vouch: the signing key: {}", error_chain(&e)))?;
    let key = build_trace::sign::load_or_generate_key(&cfg.state_dir, &name)
        .map_err(|e| format!("vouch: the signing key: {}", error_chain(&e)))?;
    let put = publish(outcome, &cfg.cache_dir, &cfg.state_dir, &cfg.key_naming).map_err(|e| {
        format!("vouch: publishing the step to the trace store: {}", error_chain(&e))
    })?;
    tracing::info!(step = %put.step_dir.display(), "step published");
    let records = build_trace::sign::step_records(st, &key)
        .map_err(|e| format!("vouch: signing the step's records: {}", error_chain(&e)))?;

    let mut items = Vec::new();
    for (name, out) in &outcome.outputs {
        let i = &out.info;
        let info = ValidPathInfo {
            path: i.path.clone(),
            info: PathInfo {
                nar_hash: i.nar_hash,
                nar_size: i.nar_size,
                references: i.references.clone(),
                ca: i.ca.clone(),
            },
            deriver: Some(st.job.drv_path.clone()),
            registration_time: now(),
            ultimate: true,
            sigs: records
                .get(name)
                .map(|r| r.narinfo.sigs.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default(),
        };
        items.push((info, out.nar_file.clone()));
    }
    core.store
        .add(&mut FileUploads::new(items), &[ca_rule.into()], Origin::Build)
        .map_err(|e| format!("vouch: registering the outputs: {}", error_chain(&e)))?;

    let mut built = BTreeMap::new();
    for (name, out) in &st.outputs {
        let out_path = out.path.clone();
        let rec = records.get(name);
        built.insert(
            name.clone(),
            BuiltOutput {
                out_path,
                signatures: rec
                    .and_then(|r| r.build_trace.as_ref())
                    .map(|b| b.signatures.iter().map(|s| s.to_string()).collect())
                    .unwrap_or_default(),
                legacy: rec
                    .and_then(|r| r.legacy.as_ref())
                    .map(|l| LegacyRealisation { id: l.id.to_string(), json: l.to_json() }),
            },
        );
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nixproto::ClientOptions;

    #[test]
    fn client_limits_override_defaults_only_when_set() {
        let base = super::super::default_limits();
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
}
