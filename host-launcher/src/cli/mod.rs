//! Command-line front-end: one module per subcommand. Each `run` turns its arguments into calls
//! on the library modules and returns an exit code; errors bubble up to `main`, which prints
//! the chain once.

use std::path::PathBuf;
use std::process::ExitCode;

#[cfg(feature = "bench")]
pub mod bench;
pub mod build;
pub mod cache;
pub mod common;
pub mod doctor;
pub mod evidence;
mod evidence_report;
pub mod exit;
pub mod image;
pub mod key;
pub mod log;
pub mod nix_builder;
pub mod policy;
mod policy_explain;
pub mod provenance;
mod provenance_verify;
pub mod rebuild;
pub mod selftest;
pub mod serve;
pub mod snp;
mod sources;
pub mod target;
pub mod trace;
pub mod verify;
pub mod verify_bytes;
mod verify_graph;

/// What every subcommand returns: an exit code, or an error whose chain `main` prints.
pub type CmdResult = Result<ExitCode, CmdError>;

/// A command's error, printed once with its chain by `main`.
pub type CmdError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Options shared by all subcommands.
#[derive(Debug, clap::Args)]
pub struct Global {
    /// State directory (content store, trace store, keys, simulated SNP root).
    #[arg(long, global = true, env = "VOUCH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Global {
    /// The state directory: `--state-dir`, `$VOUCH_STATE_DIR`, else `$XDG_DATA_HOME/vouch`
    /// (`~/.local/share/vouch`), else `/var/lib/vouch`.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(default_state_dir)
    }
}

/// The state directory without `--state-dir` or `$VOUCH_STATE_DIR`: `$XDG_DATA_HOME/vouch`,
/// else `~/.local/share/vouch`, else `/var/lib/vouch`.
pub fn default_state_dir() -> PathBuf {
    if let Some(data) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(data).join("vouch");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".local/share/vouch");
    }
    PathBuf::from("/var/lib/vouch")
}

/// Logs go to stderr (stdout carries results, and for `nix-builder` the protocol itself).
pub fn init_logging(global: &Global) {
    let default = match global.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: a builder's stderr usually ends up in a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// Print `error: top` followed by each cause once.
pub fn print_error_chain(err: &(dyn std::error::Error + 'static)) {
    eprintln!("error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
}
