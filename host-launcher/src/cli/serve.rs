//! `vouch serve`: the hosted CI service, an HTTP API and Nix binary cache (`docs/ci-service.md`).
//!
//! Serves on `--listen ADDR:PORT` (port 0 picks a free one; stderr says which:
//! `vouch serve: listening on http://ADDR:PORT`, after the `trusted-public-keys` line of the
//! key that signs its cache, created if there is none yet): the trace store read-only as a
//! binary cache, uploads of inputs from `nix copy --to http://…` (xz, zstd or no compression)
//! into the content store, the build API (`/v1/builds`) and its web page (`/`), with `--jobs`
//! builds at once. Builds use the same limits, VM and key flags as `vouch nix-builder`; builds
//! are recorded under `<state dir>/serve/` and outlive a restart (queued ones resume). A warm
//! pool of VMs (`--pool`) takes the boot out of a build's latency. SIGINT or SIGTERM stop it:
//! queued builds fail, running ones are cancelled (their VMs killed), and the pool's VMs are
//! killed. At start it removes what a crashed predecessor left (`host_launcher::recovery`).
//!
//! Access is by scoped tokens (`--tokens FILE`, or the older `--token-file` and
//! `--trusted-token-file`; `host_launcher::serve::auth`). Without any, anyone who reaches the
//! port can upload inputs and start builds, and the service says so when it listens on more
//! than loopback. With `--tls-cert` and `--tls-key` it serves HTTPS.
//!
//! What is not here: the service itself (`host_launcher::serve`).

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::Arc;

use build_trace::source::{Location, TlsRoots};
use host_launcher::recovery;
use host_launcher::serve::auth::Access;
use host_launcher::serve::closure::{BuilderTraces, ClosureConfig};
use host_launcher::serve::server::{self, ConnLimits};
use host_launcher::serve::{tls, Service, ServiceConfig};
use host_launcher::signals::Signals;
use nix_formats::signing::PublicKey;

use super::common::BuilderArgs;
use super::{CmdResult, Global};

/// Arguments of `vouch serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Address and port to listen on (port 0: any free port, printed on stderr). Without
    /// `--token-file`, keep it on localhost or behind an authenticating proxy.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR:PORT")]
    pub listen: String,
    /// Tokens with scopes, one per line: `NAME SCOPES SECRET` (scopes: cache, upload, build,
    /// trusted; the secret is the token or `sha256:<hex>` of it; a line `anonymous SCOPES -`
    /// sets what callers without a token may do, by default `cache`). Tokens travel as
    /// `Authorization: Bearer TOKEN` or HTTP Basic with TOKEN as password (Nix's `netrc-file`).
    #[arg(long, value_name = "FILE")]
    pub tokens: Option<std::path::PathBuf>,
    /// Reading the binary cache needs a token with the `cache` scope too.
    #[arg(long)]
    pub private_cache: bool,
    /// File whose first line is a token with the cache, upload and build scopes; with it,
    /// uploads and the build API need a token. The binary cache stays public (unless
    /// `--private-cache`). At least 16 characters.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// File whose first line is the token of a client you trust as Nix trusts its
    /// `trusted-users` (repeatable: one file per client): only they may upload paths that have
    /// neither a content address nor a signature by a `--trusted-public-key`, each into an
    /// overlay of its own that only its builds read. Holding one also gives access. Without
    /// any, nobody may.
    #[arg(long = "trusted-token-file", value_name = "FILE")]
    pub trusted_token_files: Vec<std::path::PathBuf>,
    /// A Nix public key (`name:base64`) whose signature on an uploaded path's narinfo makes the
    /// upload acceptable without a content address (repeatable).
    #[arg(long = "trusted-public-key", value_name = "NAME:KEY")]
    pub trusted_public_keys: Vec<String>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs `--tls-key`.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Connections at once (a quarter of them reserved for token holders).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(4..=65536))]
    pub max_connections: u64,
    /// Connections at once from one IP address.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_connections_per_peer: u64,
    /// Seconds a client has to send a whole request head (and finish a TLS handshake).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub head_timeout: u64,
    /// Builds at once (each in its own VM); more wait in a queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub jobs: u64,
    /// Other vouch builders for closure builds, in Nix's machines format (one per line: `URI
    /// SYSTEMS SSH-KEY SLOTS SPEED SUPPORTED-FEATURES MANDATORY-FEATURES`, e.g.
    /// `ssh-ng://host?remote-program=vouch-builder x86_64-linux - 2 1 ca-derivations`). The
    /// service's own builder (`--jobs` slots) is always there.
    #[arg(long, value_name = "FILE")]
    pub builders: Option<std::path::PathBuf>,
    /// Where a builder of `--builders` serves its trace store: `MACHINE=LOCATION`, the machine
    /// as its line names it, LOCATION an absolute directory, `file://DIR`, or
    /// `http(s)://HOST[:PORT][/prefix]` (that host's `vouch serve`, or any server of its trace
    /// store directory) (repeatable). A step that builder built is verified from there before
    /// the service publishes it; fetched files are kept in `<state dir>/serve/trace-cache`.
    #[arg(long = "builder-traces", value_name = "MACHINE=LOCATION")]
    pub builder_traces: Vec<String>,
    /// Trust only the certificate authorities in FILE (PEM; repeatable) for `--builder-traces`
    /// locations `https://…`, instead of Mozilla's built-in roots; without it, `SSL_CERT_FILE`
    /// when set (as `vouch verify --tls-ca`).
    #[arg(long, value_name = "FILE")]
    pub builder_tls_ca: Vec<std::path::PathBuf>,
    /// The trust policy other builders' traces must satisfy before the service publishes them
    /// (`docs/trust-policy.md`). Default: the default policy, pinning the guest image's
    /// manifest (simulated evidence is refused by it).
    #[arg(long, value_name = "FILE")]
    pub policy: Option<std::path::PathBuf>,
    /// Content store, trace store (served read-only as the binary cache), client release,
    /// limits (the defaults where a request sets none), VM and key.
    #[command(flatten)]
    pub builder: BuilderArgs,
}

/// Run `vouch serve`.
pub fn run(args: Args, global: &Global) -> CmdResult {
    // Before any thread starts: they inherit the mask that routes SIGINT/SIGTERM to a descriptor.
    let mut signals = Signals::new()?;
    let state_dir = global.state_dir();
    let access = Access::configure(
        args.tokens.as_deref(),
        args.token_file.as_deref(),
        &args.trusted_token_files,
        args.private_cache,
    )?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls::server_config(c, k)?),
        _ => None,
    };
    let trusted_keys = args
        .trusted_public_keys
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|e| format!("--trusted-public-key {k:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder_traces = BuilderTraces::default();
    for a in &args.builder_traces {
        builder_traces.add(a)?;
    }
    builder_traces.fetch.tls_roots =
        TlsRoots::choose(args.builder_tls_ca.clone(), "--builder-tls-ca");
    if builder_traces
        .machines
        .values()
        .any(|l| matches!(l, Location::Http(u) if u.starts_with("https://")))
    {
        // Unusable CA files stop the start, not every step later.
        builder_traces.fetch.tls_roots.load()?;
    }
    let closures = ClosureConfig {
        builders_file: args.builders.clone(),
        builder_traces,
        policy: args.policy.clone(),
    };
    let (mut engine, store_cfg) = args.builder.config(&state_dir)?;
    let traces = &engine.publish.trace_store;
    std::fs::create_dir_all(traces)
        .map_err(|e| format!("creating the trace store directory {}: {e}", traces.display()))?;
    let pool = args.builder.start_pool(&mut engine);
    let cancel = engine.launcher.cancel.clone();
    let cfg = ServiceConfig {
        engine,
        store_dir: state_dir.join("store"),
        store_cfg,
        jobs: args.jobs as usize,
        declared_nix: args.builder.client_nix_version,
        access,
        trusted_keys,
        closures,
    };
    let listener = TcpListener::bind(&args.listen)
        .map_err(|e| format!("listening on {}: {e}", args.listen))?;
    // Clean up after a crashed predecessor (`recovery`), then open (and lock) the service.
    let store = host_launcher::store::ContentStore::open(&cfg.store_dir, cfg.store_cfg)?;
    let scope = recovery::Scope::new(&state_dir, Some(&cfg.engine.publish.trace_store), true);
    recovery::recover(&scope, store.cleaned()).log();
    drop(store);
    let service = Arc::new(Service::open(cfg)?);
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!("vouch serve: trusted-public-keys = {}", service.public_key());
    eprintln!("vouch serve: listening on {scheme}://{addr}");
    if !service.access().has_tokens() && !addr.ip().is_loopback() {
        tracing::warn!(
            "no tokens (--tokens, --token-file): anyone who reaches {addr} can upload inputs and \
             start builds"
        );
    }
    tracing::info!(
        traces = %service.trace_store().display(),
        jobs = args.jobs,
        "binary cache, uploads (nix copy --to {scheme}://{addr}), build API and page ({scheme}://{addr}/)"
    );
    let limits = ConnLimits {
        max: args.max_connections as usize,
        per_peer: args.max_connections_per_peer as usize,
        head_timeout: std::time::Duration::from_secs(args.head_timeout),
    };
    let served = server::serve_http(
        listener,
        &mut signals,
        service,
        args.jobs as usize,
        tls,
        limits,
        &|| cancel.cancel(),
    );
    // SIGINT/SIGTERM cancelled the launcher: the pool's VMs are killed; wait for that.
    drop(pool);
    served?;
    Ok(ExitCode::SUCCESS)
}
