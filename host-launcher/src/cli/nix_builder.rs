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

use build_trace::job::Limits;
use host_launcher::build::publish::default_cache_dir;
use host_launcher::build::LauncherConfig;
use host_launcher::nixbuilder::{self, BuilderConfig, BuilderCore};
use host_launcher::nixproto::{serve, worker, NixVersion, ServerError};
use host_launcher::store::{ContentStore, StoreConfig, DEFAULT_MAX_BYTES};
use host_launcher::vm::Mode;

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
    /// Default wall-clock limit of a build in seconds, where the client sets none.
    #[arg(long, default_value_t = nixbuilder::DEFAULT_TIMEOUT_S)]
    pub timeout: u64,
    /// Default limit on seconds without log output, where the client sets none.
    #[arg(long, default_value_t = nixbuilder::DEFAULT_MAX_SILENT_S)]
    pub max_silent_time: u64,
    /// Default limit on build log bytes, where the client sets none.
    #[arg(long, default_value_t = nixbuilder::DEFAULT_MAX_LOG_BYTES)]
    pub max_log_size: u64,
    /// NIX_BUILD_CORES in the VM (0 = its vCPUs), where the client sets none.
    #[arg(long, default_value_t = 0)]
    pub cores: u64,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory: u32,
    /// Guest vCPUs (kvm/tcg).
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// VM mode (default: the best this host can: snp > kvm > tcg).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Image directory (default: $VOUCH_IMAGE_DIR, else $VOUCH_CACHE/image).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Trace store / binary cache directory (default: <state-dir>/cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The Nix release the clients run (e.g. 2.8), where the protocol version leaves it open
    /// (serve protocol 2.7 = Nix 2.8–2.34, worker 1.35 = 2.15–2.18): it decides the
    /// self-reference rule of content-addressed output paths.
    #[arg(long, value_name = "X.Y")]
    pub client_nix_version: Option<NixVersion>,
    /// This host's VCEK certificate (SNP mode).
    #[arg(long, env = "VOUCH_SNP_VCEK")]
    pub snp_vcek: Option<PathBuf>,
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
    let store = ContentStore::open(&state_dir.join("store"), StoreConfig { max_bytes })?;
    let mut launcher = LauncherConfig::new(
        args.image.clone().unwrap_or_else(vm_image::default_image_dir),
        state_dir.clone(),
    );
    launcher.mode = args.mode;
    launcher.memory_mib = args.memory;
    launcher.vcpus = args.cpus;
    launcher.snp_vcek = args.snp_vcek.clone();
    let cfg = BuilderConfig {
        cache_dir: args.cache.clone().unwrap_or_else(|| default_cache_dir(&state_dir)),
        state_dir,
        limits: Limits {
            timeout_s: args.timeout,
            max_silent_s: args.max_silent_time,
            max_log_bytes: args.max_log_size,
            cores: args.cores,
            ..Limits::default()
        },
        launcher,
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
