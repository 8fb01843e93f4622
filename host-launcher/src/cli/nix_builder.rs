//! `vouch nix-builder`: serve Nix as a remote builder on stdin/stdout.
//!
//! `--stdio` speaks the worker protocol (what `ssh-ng://HOST?remote-program=…` runs), `--serve
//! --write` the serve protocol (what `ssh://…` runs). `--store X` (which Nix appends for
//! `remote-store=X`) is accepted and ignored: vouch keeps its own content store in the state
//! directory. stdout carries the protocol only; logs go to stderr and, for builds, to the client.
//! See `docs/nix-remote-builder.md` for the Nix side.

use std::io::{BufReader, BufWriter};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;

use host_launcher::build::publish::default_cache_dir;
use host_launcher::nixbuilder::{self, BuilderConfig, BuilderCore};
use host_launcher::nixproto::{serve, worker, NixVersion, ServerError};
use host_launcher::store::{ContentStore, StoreConfig, DEFAULT_MAX_BYTES};

use super::common::{KeyArgs, LimitArgs, VmArgs};
use super::{CmdResult, Global};

/// Arguments of `vouch nix-builder`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("protocol").required(true).args(["stdio", "serve"])))]
pub struct Args {
    /// Speak Nix's worker protocol on stdin/stdout (`ssh-ng://` builders).
    #[arg(long)]
    pub stdio: bool,
    /// Speak Nix's serve protocol on stdin/stdout (`ssh://` builders).
    #[arg(long)]
    pub serve: bool,
    /// With --serve: allow uploads and builds (Nix always passes it for builders).
    #[arg(long, requires = "serve")]
    pub write: bool,
    /// Accepted for compatibility (Nix appends `--store X` for `remote-store=X`); vouch keeps
    /// its own content store in the state directory.
    #[arg(long, value_name = "URI")]
    pub store: Option<String>,
    /// Most NAR bytes the content store keeps (suffixes K, M, G, T); least recently used paths
    /// that no running session pins are evicted beyond it.
    #[arg(long, default_value_t = DEFAULT_MAX_BYTES.to_string(), value_parser = parse_size, value_name = "BYTES")]
    pub store_max_size: String,
    /// Build limits: vouch's defaults where the client sends none (always over `ssh-ng://`).
    #[command(flatten)]
    pub limits: LimitArgs,
    /// VM settings.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Signing key.
    #[command(flatten)]
    pub key: KeyArgs,
    /// Trace store / binary cache directory (default: <state-dir>/cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The Nix release the clients run (e.g. 2.8), where the protocol version leaves it open
    /// (serve protocol 2.7 = Nix 2.8–2.34, worker 1.35 = 2.15–2.18): it decides the
    /// self-reference rule of content-addressed output paths.
    #[arg(long, value_name = "X.Y")]
    pub client_nix_version: Option<NixVersion>,
}

/// `123`, `10K`, `512M`, `20G`, `1T` (powers of 1024).
fn parse_size(s: &str) -> Result<String, String> {
    size_bytes(s).map(|n| n.to_string())
}

fn size_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown size suffix (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size like 20G"))
}

/// Run `vouch nix-builder`.
pub fn run(args: Args, global: &Global) -> CmdResult {
    let state_dir = global.state_dir();
    if let Some(s) = &args.store {
        tracing::debug!(store = %s, "ignoring --store: vouch keeps its own content store");
    }
    let max_bytes = size_bytes(&args.store_max_size)?;
    let launcher = args.vm.launcher(&state_dir, &args.limits);
    // A key name that cannot sign this host's evidence is refused before serving anything.
    let key_naming = args.key.naming(&state_dir)?;
    key_naming.check_for(&launcher)?;
    let store = ContentStore::open(&state_dir.join("store"), StoreConfig { max_bytes })?;
    let cfg = BuilderConfig {
        cache_dir: args.cache.clone().unwrap_or_else(|| default_cache_dir(&state_dir)),
        state_dir,
        limits: args.limits.limits(&nixbuilder::default_limits()),
        launcher,
        key_naming,
    };
    let mut core = BuilderCore::new(cfg, store);

    // The protocol owns stdin/stdout; buffered copies of the descriptors avoid stdout's line
    // buffering on binary data.
    let input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let output = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let r = BufReader::with_capacity(1 << 16, input);
    let w = BufWriter::with_capacity(1 << 16, output);
    let result = if args.stdio {
        let cfg = worker::WorkerConfig {
            version_string: format!("vouch {}", env!("CARGO_PKG_VERSION")),
            declared_nix: args.client_nix_version,
        };
        worker::serve(r, w, &cfg, &mut core)
    } else {
        let cfg = serve::ServeConfig { write: args.write, declared_nix: args.client_nix_version };
        serve::serve(r, w, &mut std::io::stderr(), &cfg, &mut core)
    };
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(ServerError::PeerGone(kind)) => {
            tracing::warn!(?kind, "the client went away mid-upload; nothing of it was registered");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(Box::new(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::size_bytes;

    #[test]
    fn sizes() {
        assert_eq!(size_bytes("123").unwrap(), 123);
        assert_eq!(size_bytes("10K").unwrap(), 10 << 10);
        assert_eq!(size_bytes("20g").unwrap(), 20 << 30);
        assert!(size_bytes("12X").is_err());
        assert!(size_bytes("G").is_err());
    }
}
