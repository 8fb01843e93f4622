//! `vouch provenance <output path>`: export the in-toto Statement v1 / SLSA Provenance v1 of
//! an output from the trace store (`build_trace::provenance`). Each trace is first verified
//! under a trust policy (`build_trace::verify::check_entry_alone`: statement, output addresses,
//! evidence and signatures; not its closure, which is `vouch verify`'s work); only traces that
//! pass are exported, labelled by the root their evidence verified under.

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::SystemTime;

use build_trace::evidence::Verifier;
use build_trace::provenance::in_toto;
use build_trace::store::TraceStore;
use build_trace::verify::check_entry_alone;
use host_launcher::core::publish::default_trace_store;
use nix_formats::StorePath;

use super::{CmdResult, Global};

/// Arguments of `vouch provenance`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The output path.
    pub output: String,
    /// Trace store directory (default: `<state dir>/cache`).
    #[arg(long, value_name = "DIR")]
    pub traces: Option<PathBuf>,
    /// Write the statement here instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Trust policy each trace must pass before it is exported (default: `vouch verify`'s).
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// Image manifest whose launch measurements the default policy pins (repeatable).
    #[arg(long = "image-manifest", value_name = "FILE", conflicts_with = "policy")]
    pub image_manifests: Vec<PathBuf>,
}

/// Why `vouch provenance` failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    /// Not an output store path.
    #[error("`{0}` is not an output store path")]
    NotAnOutput(String),
    /// No trace produced it.
    #[error("no trace in {dir} produced {path}")]
    NoTrace {
        /// The store.
        dir: String,
        /// The output.
        path: String,
    },
    /// Traces produced it, but none passes the policy.
    #[error("no trace of {path} passes the trust policy: {reasons}")]
    NoneVerified {
        /// The output.
        path: String,
        /// Why each trace failed.
        reasons: String,
    },
}

pub fn run(args: Args, global: &Global) -> CmdResult {
    let path = StorePath::parse(&args.output)
        .ok()
        .filter(|p| !p.is_derivation())
        .ok_or_else(|| ProvenanceError::NotAnOutput(args.output.clone()))?;
    let dir = args.traces.clone().unwrap_or_else(|| default_trace_store(&global.state_dir()));
    let store = TraceStore::open(&dir)?;
    let policy = super::verify::load_policy(args.policy.as_deref(), &args.image_manifests)?;
    let prepared = policy.prepare()?;
    // The statements are JSON on stdout; a policy that accepts any guest says so first, on
    // stderr.
    if let Some(b) = prepared.any_guest_banner() {
        eprintln!("{b}");
    }
    let entries = super::trace::lookup(&store, &path)?;
    let mut statements = Vec::new();
    let mut refused = Vec::new();
    for e in &entries {
        let verdict = match check_entry_alone(&prepared, Verifier::global(), e, SystemTime::now()) {
            Ok(v) => v,
            Err(b) => {
                refused.push(format!("{}: {}", e.location, b.explanation));
                continue;
            }
        };
        let st = &verdict.statement;
        let Some((name, _)) = st.outputs.iter().find(|(_, o)| o.path == path) else {
            continue;
        };
        statements.push(in_toto(st, name, &e.statement, e.evidence.as_deref(), verdict.kind)?);
    }
    if statements.is_empty() && !refused.is_empty() {
        return Err(Box::new(ProvenanceError::NoneVerified {
            path: path.to_string(),
            reasons: refused.join("; "),
        }));
    }
    if statements.is_empty() {
        return Err(Box::new(ProvenanceError::NoTrace {
            dir: dir.display().to_string(),
            path: path.to_string(),
        }));
    }
    for r in &refused {
        tracing::warn!("not exported (fails the policy): {r}");
    }
    // One statement per trace (a path built twice has two); JSON Lines when several.
    let text = statements
        .iter()
        .map(|s| serde_json::to_string(s).expect("JSON value"))
        .collect::<Vec<_>>()
        .join("\n");
    match &args.out {
        Some(f) => std::fs::write(f, format!("{text}\n"))?,
        None => println!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
