//! `vouch provenance <output path>`: export the in-toto Statement v1 / SLSA Provenance v1 of
//! an output from the trace store (`build_trace::provenance`).

use std::path::PathBuf;
use std::process::ExitCode;

use build_trace::provenance::{classify_evidence, in_toto};
use build_trace::store::TraceStore;
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
}

pub fn run(args: Args, global: &Global) -> CmdResult {
    let path = StorePath::parse(&args.output)
        .ok()
        .filter(|p| !p.is_derivation())
        .ok_or_else(|| ProvenanceError::NotAnOutput(args.output.clone()))?;
    let dir = args.traces.clone().unwrap_or_else(|| default_trace_store(&global.state_dir()));
    let store = TraceStore::open(&dir)?;
    let entries = super::trace::lookup(&store, &path)?;
    let mut statements = Vec::new();
    for e in &entries {
        let st = e.parse_statement()?;
        let Some((name, _)) = st.outputs.iter().find(|(_, o)| o.path == path) else {
            continue;
        };
        let kind = e.evidence.as_deref().map(classify_evidence).unwrap_or("unattested");
        statements.push(in_toto(&st, name, &e.statement, e.evidence.as_deref(), kind)?);
    }
    if statements.is_empty() {
        return Err(Box::new(ProvenanceError::NoTrace {
            dir: dir.display().to_string(),
            path: path.to_string(),
        }));
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
