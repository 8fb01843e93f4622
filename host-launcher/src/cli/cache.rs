//! `vouch cache audit`: check that every signed narinfo and realisation of a trace store was
//! produced by an accepted statement of that store, and withdraw the others with `--fix`
//! (`build_trace::store`'s audit states the algorithm; `docs/trace-store.md` the rules).
//!
//! Unresolved derivations, which input-addressed steps need for their output paths, come from
//! `--drv-dir` directories (default `/nix/store`) and from the state directory's content store
//! (where `vouch serve` keeps uploaded `.drv` files).
//!
//! Exit codes: 0 nothing found (or everything found was withdrawn), 1 findings remain, 2 error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use build_trace::store::{AuditOptions, AuditReport, TraceStore};
use host_launcher::core::publish::default_trace_store;
use host_launcher::store::{ContentStore, StoreConfig};
use nix_formats::derivation::Derivation;
use nix_formats::StorePath;

use super::{CmdResult, Global};

/// Subcommands of `vouch cache`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Check every signed narinfo, realisation and build-trace entry of a trace store against
    /// the store's own statements: each must be produced by a statement whose output paths its
    /// derivation really gives. Stores written before vouch checked that may be poisoned.
    Audit(AuditArgs),
}

/// Arguments of `vouch cache audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Trace store directory (default: `<state dir>/cache`).
    #[arg(long, value_name = "DIR")]
    pub traces: Option<PathBuf>,
    /// Directories holding `.drv` files (repeatable; default `/nix/store`). The state
    /// directory's content store is searched too.
    #[arg(long = "drv-dir", value_name = "DIR")]
    pub drv_dirs: Vec<PathBuf>,
    /// Withdraw what has a finding: move it to `vouch/v1/withdrawn/<time>/` in the store
    /// (nothing is deleted), so Nix no longer substitutes it.
    #[arg(long)]
    pub fix: bool,
    /// Count steps whose ownership cannot be checked (their derivation is not available) as not
    /// accepted, and withdraw them and their records with `--fix`.
    #[arg(long)]
    pub strict: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: Command, global: &Global) -> CmdResult {
    let Command::Audit(args) = cmd;
    let state = global.state_dir();
    let dir = args.traces.clone().unwrap_or_else(|| default_trace_store(&state));
    let store = TraceStore::open(&dir)?;
    let dirs =
        if args.drv_dirs.is_empty() { vec![PathBuf::from("/nix/store")] } else { args.drv_dirs };
    let content = open_content_store(&state.join("store"));
    let mut drvs = |p: &StorePath| load_drv(p, &dirs, content.as_ref());
    let opts = AuditOptions { fix: args.fix, strict: args.strict };
    let report = store.audit(opts, &mut drvs)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&dir, &report);
    }
    let remaining = report.findings.iter().any(|f| !f.withdrawn);
    Ok(if remaining { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn print_report(dir: &Path, r: &AuditReport) {
    println!(
        "audited {}: {} step entries ({} accepted), {} signed records",
        dir.display(),
        r.entries,
        r.accepted,
        r.records
    );
    for f in &r.findings {
        let mark = if f.withdrawn { " [withdrawn]" } else { "" };
        println!("  {:<12} {}{mark}\n               {}", f.problem.to_string(), f.path, f.detail);
    }
    match (&r.withdrawn_to, r.findings.is_empty()) {
        (_, true) => println!("every record was produced by an accepted statement"),
        (Some(to), _) => println!("withdrawn files are kept in {}", to.display()),
        (None, _) => println!("run again with --fix to withdraw them"),
    }
}

/// The content store, if this state directory has one (read only; nothing is created).
fn open_content_store(dir: &Path) -> Option<ContentStore> {
    if !dir.join("index.sqlite").is_file() {
        return None;
    }
    ContentStore::open(dir, StoreConfig::default())
        .map_err(|e| tracing::warn!("not searching the content store {}: {e}", dir.display()))
        .ok()
}

/// A `.drv` by path: from the first directory that has it, else from the content store.
fn load_drv(p: &StorePath, dirs: &[PathBuf], content: Option<&ContentStore>) -> Option<Derivation> {
    for d in dirs {
        if let Ok(bytes) = std::fs::read(d.join(p.base_name())) {
            return Derivation::from_aterm(&bytes).ok();
        }
    }
    let (_, file) = content?.open_nar(p).ok()??;
    let bytes = host_launcher::store::drv_contents(file).ok()?;
    Derivation::from_aterm(&bytes).ok()
}
