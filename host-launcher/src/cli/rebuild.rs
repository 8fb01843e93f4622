//! Trust migration at the command line: `vouch verify --plan-rebuild` prints the plan of
//! `build_trace::verify::plan` (the smallest set of steps to rebuild so that a closure verifies
//! under a stricter policy), and `vouch rebuild` follows it.
//!
//! `vouch rebuild` loop:
//! 1. plan the target's closure under the policy, reading the trace store it publishes to
//!    (`--traces`, default `<state dir>/cache`) and those of `--read-traces`;
//! 2. nothing to rebuild: done (exit 0). Blocked: exit 1 with the plan;
//! 3. otherwise build the plan's first ready step (dependencies first; its resolution known)
//!    through the engine `vouch build` uses: a fresh VM, the one publish step into the trace
//!    store; the CA rule is the earlier build's where its trace says it. Its outputs are then
//!    registered in the local Nix store (substituted from the trace store; a no-op when a
//!    bit-identical path is already there), where the next steps' inputs come from;
//! 4. plan again (a bit-identical CA output keeps its dependents' traces valid; another one
//!    re-resolves them). A step planned again after its rebuild means this host's trace does
//!    not satisfy the policy either: exit 1, as for a failed build.
//!
//! Exit codes (docs/cli.md): `--plan-rebuild`: 0 a plan was made (also "nothing to rebuild"),
//! 1 rebuilding cannot make the closure verify (a blocked step), 2 usage or bad input.
//! `vouch rebuild`: 0 the closure verifies at the end, 1 blocked, a build failed, or a rebuilt
//! step is still refused, 2 usage or bad input.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use build_trace::evidence::Verifier as EvidenceVerifier;
use build_trace::job::{CaRule, Limits};
use build_trace::source::Traces;
use build_trace::store::{TraceSource, TraceStore};
use build_trace::verify::{
    Buildable, ClosureVerifier, DrvSet, PlanResult, PlannedStep, RebuildPlan,
};
use host_launcher::core::log::TextLog;
use host_launcher::core::{BuildRequest, BuildResult, Built, CaRuleChoice, Engine, Inputs};
use nix_formats::StorePath;
use serde::Serialize;

use super::common::EngineArgs;
use super::exit::{OK, REJECTED};
use super::target::{Lookup, Target};
use super::{CmdResult, Global};

/// Arguments of `vouch rebuild`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The target: a derivation, an output path or `./result`, as for `vouch verify`.
    pub drv: String,
    /// The trust policy the closure must verify under (TOML, docs/trust-policy.md).
    #[arg(long)]
    pub policy: PathBuf,
    /// Another trace store to read traces from (repeatable); rebuilt steps are published to
    /// `--traces`, which is read too.
    #[arg(long = "read-traces", value_name = "DIR")]
    pub read_traces: Vec<PathBuf>,
    /// Directory holding the `.drv` files of the closure.
    #[arg(long, value_name = "DIR", default_value = "/nix/store")]
    pub drv_dir: PathBuf,
    /// The Nix store to ask for derivers and realisations (Nix's `--store`; default: Nix's).
    #[arg(long, value_name = "STORE")]
    pub nix_store: Option<String>,
    /// Self-reference rule of a floating CA step whose earlier trace does not say it
    /// (`self-ref-positions`: Nix ≤2.16 and ≥2.35; `self-ref-zeroed`: 2.17–2.34).
    #[arg(long, default_value = "self-ref-positions", value_parser = super::build::parse_rule)]
    pub ca_rule: CaRule,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Copy the guest console to stderr.
    #[arg(long)]
    pub console: bool,
    /// Trace store (where rebuilt steps are published), limits, VM and key.
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Why a plan could not be made or followed (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// No derivation could be found for the argument.
    #[error("no derivation known for {0}: it is registered in neither the local Nix database nor the trace stores' index (give its .drv)")]
    NoDerivation(String),
    /// `vouch rebuild` does not read transparency logs.
    #[error("the policy has a [log] table, which `vouch rebuild` does not read (it reads trace stores directly): plan with `vouch verify --plan-rebuild`")]
    LogPolicy,
}

/// One step `vouch rebuild` built.
#[derive(Debug, Serialize)]
struct Rebuilt {
    /// The unresolved derivation.
    drv: String,
    /// What was built (resolved derivation, or the drv itself).
    resolved: String,
    /// Output name → path.
    outputs: BTreeMap<String, String>,
    /// Whether every output's NAR hash is the one the earlier traces described (absent where
    /// none did).
    #[serde(skip_serializing_if = "Option::is_none")]
    bit_identical: Option<bool>,
}

/// `vouch verify --plan-rebuild`: plan the first candidate derivation whose graph loads, print
/// the plan (text or JSON) and exit with its code.
pub(super) fn plan(
    args: &super::verify::Args,
    verifier: &ClosureVerifier<'_>,
    stores: &[Traces],
    shown: Option<&DrvSet>,
    named: &Target,
    banner: Option<&str>,
) -> CmdResult {
    let mut loaded = None;
    for cand in &named.candidates {
        let several = named.candidates.len() > 1;
        let drvs = super::verify::candidate_graph(&args.drv_dir, stores, shown, cand, several)?;
        if let Some(drvs) = drvs {
            loaded = Some((cand.clone(), drvs));
            break;
        }
    }
    let Some((target, drvs)) = loaded else {
        return Err(RebuildError::NoDerivation(named.path.to_string()).into());
    };
    let plan = verifier.plan_rebuild(&drvs, &target)?;
    if args.json {
        let mut v = serde_json::to_value(&plan)?;
        if let Some(map) = v.as_object_mut() {
            if let Some(b) = banner {
                map.insert("any_guest".into(), b.into());
            }
            map.insert("derivation".into(), target.to_string().into());
            map.insert("found_by".into(), serde_json::to_value(named.found_by)?);
            map.insert("argument".into(), named.given.clone().into());
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("derivation {target} ({})", named.found_by);
        print!("{plan}");
    }
    Ok(ExitCode::from(if plan.result == PlanResult::Blocked { REJECTED } else { OK }))
}

/// Run `vouch rebuild` (see the module docs).
pub fn run(args: Args, global: &Global) -> CmdResult {
    let policy = super::policy::load(&args.policy)?;
    if policy.log.is_some() {
        return Err(RebuildError::LogPolicy.into());
    }
    let prepared = policy.prepare()?;
    let state_dir = global.state_dir();
    // `vouch build`'s engine: no default limits.
    let mut engine = args.engine.engine(&state_dir, &Limits::default())?;
    engine.launcher.echo_console = args.console;
    let publish_to = engine.publish.trace_store.clone();
    let mut stores = vec![Traces::Dir(Box::new(TraceStore::create(&publish_to)?))];
    for d in args.read_traces.iter().filter(|d| **d != publish_to) {
        stores.push(Traces::Dir(Box::new(TraceStore::open(d)?)));
    }
    let lookup =
        Lookup { drv_dir: &args.drv_dir, nix_store: args.nix_store.as_deref(), traces: &stores };
    let named = super::target::resolve(&args.drv, &lookup)?;
    let target =
        named.drv.clone().ok_or_else(|| RebuildError::NoDerivation(named.path.to_string()))?;
    let drvs = DrvSet::from_store_dir(&args.drv_dir, &target)?;
    let verifier = ClosureVerifier {
        policy: &prepared,
        sources: stores.iter().map(|s| s as &dyn TraceSource).collect(),
        evidence: EvidenceVerifier::global(),
        now: SystemTime::now(),
        threads: 1,
    };
    let mut done: Vec<Rebuilt> = Vec::new();
    loop {
        let plan = verifier.plan_rebuild(&drvs, &target)?;
        if plan.result != PlanResult::Rebuild {
            return finish(&args, &target, &plan, &done, None);
        }
        let Some(step) = plan.next_ready() else {
            let problem = "the plan names steps to rebuild, but none whose resolution is known";
            return finish(&args, &target, &plan, &done, Some(problem.into()));
        };
        let build = step.build.as_ref().expect("a ready step has what to build");
        if let Some(before) = done.iter().find(|d| d.resolved == build.drv_path.to_string()) {
            let why = step.reason.as_ref().map(|r| r.explanation.as_str()).unwrap_or_default();
            let problem = format!(
                "{} was rebuilt here, but its new trace does not satisfy the policy either ({why}): this host's evidence or key is not one the policy accepts",
                before.drv
            );
            return finish(&args, &target, &plan, &done, Some(problem));
        }
        eprintln!("vouch: rebuilding {} (as {}) in a fresh VM", step.drv, build.drv_path);
        let built = match build_step(&engine, build, args.ca_rule) {
            Ok(b) => b,
            Err(e) => {
                let problem = format!("building {}: {}", step.drv, build_trace::error_chain(&*e));
                return finish(&args, &target, &plan, &done, Some(problem));
            }
        };
        let paths: Vec<String> =
            built.published.outputs.values().map(|o| o.path.to_string()).collect();
        let what: Vec<&str> = paths.iter().map(String::as_str).collect();
        super::build::substitute(&what, None, &built, &publish_to, &state_dir)?;
        let rebuilt = describe(step, build, &built);
        match rebuilt.bit_identical {
            Some(true) => eprintln!("vouch: bit-identical to the earlier build"),
            Some(false) => eprintln!(
                "vouch: NOT bit-identical to the earlier build: its dependents are re-resolved"
            ),
            None => {}
        }
        done.push(rebuilt);
    }
}

/// Build one step as `vouch build` does: a fresh VM, the one publish step.
fn build_step(
    engine: &Engine,
    b: &Buildable,
    default_rule: CaRule,
) -> Result<Built, Box<dyn std::error::Error + Send + Sync>> {
    let req = BuildRequest {
        drv_path: b.drv_path.clone(),
        drv: b.drv.clone(),
        outputs: BTreeSet::new(),
        limits: Limits::default(),
        ca_rule: CaRuleChoice::Known(b.ca_rule.unwrap_or(default_rule)),
        derivations: None,
        // The operator at this host's command line, as for `vouch build`.
        trusted: true,
    };
    match engine.build(req, Inputs::NixStore, &mut TextLog(std::io::stderr())) {
        BuildResult::Built(built) => Ok(*built),
        BuildResult::Failed(f) => Err(Box::new(f)),
    }
}

/// What was rebuilt, compared with what the plan predicted.
fn describe(step: &PlannedStep, b: &Buildable, built: &Built) -> Rebuilt {
    let outs = &built.published.outputs;
    let bit_identical = (!step.nar_hashes.is_empty()).then(|| {
        outs.len() == step.nar_hashes.len()
            && outs.iter().all(|(n, o)| {
                step.nar_hashes.get(n) == Some(&o.info.nar_hash.to_string())
                    && step.outputs.get(n) == Some(&o.path.to_string())
            })
    });
    Rebuilt {
        drv: step.drv.clone(),
        resolved: b.drv_path.to_string(),
        outputs: outs.iter().map(|(n, o)| (n.clone(), o.path.to_string())).collect(),
        bit_identical,
    }
}

/// Print the outcome (the last plan, what was rebuilt, what went wrong) and exit: 0 when the
/// closure verifies, else 1.
fn finish(
    args: &Args,
    target: &StorePath,
    plan: &RebuildPlan,
    done: &[Rebuilt],
    problem: Option<String>,
) -> CmdResult {
    let verified = problem.is_none() && plan.result == PlanResult::Verified;
    if args.json {
        let result = match (verified, plan.result) {
            (true, _) => "verified",
            (false, PlanResult::Blocked) => "blocked",
            (false, _) => "failed",
        };
        let v = serde_json::json!({
            "result": result,
            "derivation": target.to_string(),
            "rebuilt": done,
            "problem": problem,
            "plan": plan,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("derivation {target}");
        for d in done {
            let same = match d.bit_identical {
                Some(true) => " (bit-identical)",
                Some(false) => " (not bit-identical)",
                None => "",
            };
            println!("rebuilt {}{same}", d.drv);
            for (n, p) in &d.outputs {
                println!("  {n}: {p}");
            }
        }
        if let Some(p) = &problem {
            println!("NOT VERIFIED: {p}");
        }
        print!("{plan}");
    }
    Ok(ExitCode::from(if verified { OK } else { REJECTED }))
}
