//! `vouch build <drv>`: the CLI front-end of the engine. The derivation (resolved; its inputs
//! in the local Nix store) becomes the core's request, with the CA rule `--ca-rule` names; the
//! engine builds it in a fresh VM, checks it and publishes it to the trace store, as for every
//! front-end; this command prints the result, and with `--import` registers the outputs and
//! realisations in the local Nix store by substituting them from the trace store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use build_trace::job::{CaRule, Limits};
use host_launcher::build::nix_store::{load_basic_derivation, NIX_CONFIG};
use host_launcher::core::log::TextLog;
use host_launcher::core::{BuildRequest, BuildResult, Built, CaRuleChoice, Inputs};

use super::common::EngineArgs;
use super::{CmdResult, Global};

/// Arguments of `vouch build`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The derivation (`/nix/store/…drv`), resolved (no input derivations).
    pub drv: String,
    /// Also register the outputs (and, for content-addressed steps, the realisations) in the
    /// local Nix store, by substituting them from vouch's binary cache.
    #[arg(long)]
    pub import: bool,
    /// With --import: create a GC root symlink to the output (`-<output>` suffixes for others).
    #[arg(long, requires = "import")]
    pub out_link: Option<PathBuf>,
    /// Outputs to build (default: all).
    #[arg(long = "output")]
    pub outputs: Vec<String>,
    /// Trace store, limits (0 = none), VM and key.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Self-reference rule of the Nix that will use the outputs (`self-ref-positions`: Nix ≤2.16
    /// and ≥2.35, e.g. Debian's 2.8; `self-ref-zeroed`: 2.17–2.34).
    #[arg(long, default_value = "self-ref-positions", value_parser = parse_rule)]
    pub ca_rule: CaRule,
    /// Print a JSON summary on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Copy the guest console to stderr.
    #[arg(long)]
    pub console: bool,
}

pub(super) fn parse_rule(s: &str) -> Result<CaRule, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?}: expected self-ref-positions or self-ref-zeroed"))
}

/// Run `vouch build`.
pub fn run(args: Args, global: &Global) -> CmdResult {
    let (drv_path, drv) = load_basic_derivation(&args.drv)?;
    let state_dir = global.state_dir();
    // `vouch build` has no default limits: 0 = none.
    let mut engine = args.engine.engine(&state_dir, &Limits::default())?;
    engine.launcher.echo_console = args.console;
    let req = BuildRequest {
        drv_path,
        drv,
        outputs: args.outputs.iter().cloned().collect(),
        limits: Limits::default(),
        ca_rule: CaRuleChoice::Known(args.ca_rule),
        derivations: None,
        // The operator at this host's command line.
        trusted: true,
    };
    let built = match engine.build(req, Inputs::NixStore, &mut TextLog(std::io::stderr())) {
        BuildResult::Built(b) => b,
        BuildResult::Failed(f) => return Err(Box::new(f)),
    };
    let traces = &engine.publish.trace_store;
    if args.import {
        substitute(&[args.drv.as_str()], args.out_link.as_deref(), &built, traces, &state_dir)?;
        eprintln!("vouch: imported into the local Nix store");
    }
    summary(&args, &built, traces);
    Ok(ExitCode::SUCCESS)
}

/// Register `what` (a `.drv`: its outputs; or output paths) in the local Nix store by
/// substituting them from the trace store `traces` that `built` was published to.
pub(super) fn substitute(
    what: &[&str],
    out_link: Option<&Path>,
    built: &Built,
    traces: &Path,
    state_dir: &Path,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let key = &built.published.key_name;
    let public = std::fs::read_to_string(state_dir.join("keys").join(format!("{key}.public")))?;
    // Substituting from the trace store (a binary cache) makes Nix register the paths, their
    // signatures and (for CA steps) the realisations exactly as if it had fetched them from any
    // binary cache.
    let mut cmd = std::process::Command::new("nix-store");
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .arg("--realise")
        .args(what)
        .args(["--max-jobs", "0"])
        .args(["--option", "substituters", &format!("file://{}", traces.display())])
        .args(["--option", "trusted-public-keys", public.trim()]);
    if let Some(link) = out_link {
        cmd.arg("--add-root").arg(link).arg("--indirect");
    }
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!(
            "importing into the local Nix store failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.starts_with("warning:"))
                .collect::<Vec<_>>()
                .join("; ")
        )
        .into());
    }
    Ok(())
}

fn summary(args: &Args, b: &Built, traces: &Path) {
    let t = &b.timings;
    let trace = &b.published.step_dir;
    let secs = |d: Duration| d.as_secs_f64();
    let simulated = b.attester == channel::messages::AttesterKind::Simulated;
    if args.json {
        let v = serde_json::json!({
            "drv": args.drv,
            "mode": b.mode.to_string(),
            "evidence": b.attester.to_string(),
            "simulated": simulated,
            "measurement": b.measurement,
            "outputs": b.published.outputs.iter().map(|(n, o)| (n.clone(), serde_json::json!({
                "path": o.path, "nar_hash": o.info.nar_hash.to_string(), "nar_size": o.info.nar_size,
                "references": o.info.references, "ca": o.info.ca,
            }))).collect::<serde_json::Map<_, _>>(),
            "trace": trace,
            "traces": traces,
            "timings": {
                "boot_s": secs(t.boot), "job_setup_s": secs(t.job_setup), "input_transfer_s": secs(t.input_transfer), "build_s": secs(t.build),
                "hashing_s": secs(t.hashing), "attestation_s": secs(t.attestation),
                "output_transfer_s": secs(t.output_transfer), "verification_s": secs(t.verification),
                "total_s": secs(t.total), "input_bytes": t.input_bytes, "output_bytes": t.output_bytes,
            },
        });
        println!("{v}");
        return;
    }
    for (name, o) in &b.published.outputs {
        println!("{name} {}", o.path);
    }
    if simulated {
        println!("evidence: simulated (this host's simulated SNP root; it proves nothing about hardware)");
    } else {
        println!("evidence: sev-snp ({})", b.evidence_root);
    }
    println!("trace: {}", trace.display());
}
