//! `vouch build <drv>`: build one resolved derivation whose inputs are in the local Nix store
//! in a fresh VM, check the result, write it to the binary cache / trace store, and optionally
//! import the outputs and realisations into the local Nix store.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use build_trace::job::{CaRule, Limits};
use host_launcher::build::local_store::{load_basic_derivation, LocalNixStore, NIX_CONFIG};
use host_launcher::build::publish::{default_cache_dir, publish, KeyNaming};
use host_launcher::build::{run_step, LogSink, Progress, StepOutcome, StepRequest};

use super::common::{KeyArgs, LimitArgs, VmArgs};
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
    /// Binary cache / trace store directory (default: `<state-dir>/cache`).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Outputs to build (default: all).
    #[arg(long = "output")]
    pub outputs: Vec<String>,
    /// Build limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// VM settings.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Signing key.
    #[command(flatten)]
    pub key: KeyArgs,
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

fn parse_rule(s: &str) -> Result<CaRule, String> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .map_err(|_| format!("{s:?}: expected self-ref-positions or self-ref-zeroed"))
}

struct Printer {
    quiet_log: bool,
}

impl LogSink for Printer {
    fn log(&mut self, data: &[u8]) {
        if !self.quiet_log {
            let _ = std::io::stderr().write_all(data);
        }
    }
    fn progress(&mut self, event: &Progress) {
        use channel::messages::PhaseName as P;
        let line = match event {
            Progress::Booting { mode, pid } => format!("booting a {mode} VM (QEMU pid {pid})"),
            Progress::AgentReady { attester } => match attester {
                channel::messages::AttesterKind::SevSnp => "agent ready; evidence: sev-snp".into(),
                channel::messages::AttesterKind::Simulated => {
                    "agent ready; evidence: SIMULATED (no SEV-SNP hardware here)".into()
                }
            },
            // Reported when the conversation ends; the guest's phase below says it first.
            Progress::InputsSent { .. } => return,
            Progress::Guest(P::JobAccepted) => "job accepted by the agent".into(),
            Progress::Guest(P::InputsReady) => "inputs sent, unpacked and checked in the VM".into(),
            Progress::Guest(P::Building) => "building".into(),
            Progress::Guest(P::Built) => "builder finished".into(),
            Progress::Guest(P::Hashing) => "hashing outputs".into(),
            Progress::Guest(P::Attesting) => "attesting".into(),
            Progress::Guest(P::Sending) => "receiving outputs".into(),
            Progress::OutputReceived { path } => format!("received {path}"),
            Progress::Verified => "statement, evidence and outputs checked".into(),
            Progress::Retrying { reason, abandoned_job, job } => format!(
                "retrying step in a fresh VM after: {reason} (job {abandoned_job} abandoned, nothing of it kept; new job {job})"
            ),
        };
        eprintln!("vouch: {line}");
    }
}

/// Run `vouch build`.
pub fn run(args: Args, global: &Global) -> CmdResult {
    let (drv_path, drv) = load_basic_derivation(&args.drv)?;
    let network = build_trace::job::step_kind(&drv)? == build_trace::job::StepKind::FixedOutput;
    let state_dir = global.state_dir();
    let mut cfg = args.vm.launcher(&state_dir, &args.limits);
    cfg.echo_console = args.console;
    // A key name that cannot sign this host's evidence is refused before any VM runs.
    let naming = args.key.naming(&state_dir)?;
    naming.check_for(&cfg)?;
    let req = StepRequest {
        drv_path,
        drv,
        outputs: args.outputs.iter().cloned().collect::<BTreeSet<_>>(),
        // `vouch build` has no default limits: 0 = none.
        limits: args.limits.limits(&Limits::default()),
        ca_rule: args.ca_rule,
        // Fixed-output derivations (fetchers) run in the networked variant, as in Nix's sandbox;
        // nothing else ever gets a network device.
        network,
        job_id: None,
    };
    let mut printer = Printer { quiet_log: false };
    let outcome = run_step(req, &LocalNixStore, &mut printer, &cfg)?;
    let cache = args.cache.clone().unwrap_or_else(|| default_cache_dir(&state_dir));
    let put = publish(&outcome, &cache, &state_dir, &naming)?;
    if args.import {
        import(&args, &outcome, &cache, &state_dir, &naming)?;
    }
    summary(&args, &outcome, &put.step_dir, &cache);
    Ok(ExitCode::SUCCESS)
}

fn import(
    args: &Args,
    outcome: &StepOutcome,
    cache: &std::path::Path,
    state_dir: &std::path::Path,
    naming: &KeyNaming,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let key = host_launcher::build::publish::key_name(outcome, naming)?;
    let public = std::fs::read_to_string(state_dir.join("keys").join(format!("{key}.public")))?;
    // Substituting from our cache makes Nix register the paths, their signatures and (for CA
    // steps) the realisations exactly as if it had fetched them from any binary cache.
    let mut cmd = std::process::Command::new("nix-store");
    cmd.env("NIX_CONFIG", NIX_CONFIG)
        .args(["--realise", &args.drv, "--max-jobs", "0"])
        .args(["--option", "substituters", &format!("file://{}", cache.display())])
        .args(["--option", "trusted-public-keys", public.trim()]);
    if let Some(link) = &args.out_link {
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
    eprintln!("vouch: imported into the local Nix store");
    Ok(())
}

fn summary(args: &Args, o: &StepOutcome, trace: &std::path::Path, cache: &std::path::Path) {
    let t = &o.timings;
    let secs = |d: Duration| d.as_secs_f64();
    if args.json {
        let v = serde_json::json!({
            "drv": args.drv,
            "mode": o.mode.to_string(),
            "evidence": o.attester.to_string(),
            "simulated": o.verified.is_simulated(),
            "measurement": o.verified.measurement.to_string(),
            "outputs": o.outputs.iter().map(|(n, r)| (n.clone(), serde_json::json!({
                "path": r.info.path, "nar_hash": r.info.nar_hash.to_string(), "nar_size": r.info.nar_size,
                "references": r.info.references, "ca": r.info.ca,
            }))).collect::<serde_json::Map<_, _>>(),
            "trace": trace,
            "cache": cache,
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
    for (name, r) in &o.outputs {
        println!("{name} {}", r.info.path);
    }
    if o.verified.is_simulated() {
        println!("evidence: simulated (this host's simulated SNP root; it proves nothing about hardware)");
    } else {
        println!("evidence: sev-snp ({})", o.verified.root);
    }
    println!("trace: {}", trace.display());
}
