//! `vouch serve`: the hosted CI service, an HTTP API and Nix binary cache (`docs/ci-service.md`).
//!
//! Serves on `--listen ADDR:PORT` (port 0 picks a free one; the first line on stderr says which:
//! `vouch serve: listening on http://ADDR:PORT`): the trace store read-only as a binary cache,
//! uploads of inputs from `nix copy --to 'http://…?compression=none'` into the content store,
//! and the build API (`POST /v1/builds`), with `--jobs` builds at once. Builds use the same
//! limits, VM and key flags as `vouch nix-builder`; builds are recorded under
//! `<state dir>/serve/` and outlive a restart. SIGINT or SIGTERM stop it: queued builds fail,
//! running ones are cancelled (their VMs killed). At start it removes what a crashed
//! predecessor left (`host_launcher::recovery`).
//!
//! With `--token-file`, uploads and the build API need that token (`Authorization: Bearer`, or
//! HTTP Basic with the token as password, as Nix sends it from a netrc entry); the binary cache
//! stays public. Without it anyone who reaches the port can upload inputs and start builds, and
//! the service says so when it listens on more than loopback. There is no TLS: put a
//! TLS-terminating proxy in front when the token crosses a network.
//!
//! What is not here: the service itself (`host_launcher::serve`).

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::Arc;

use host_launcher::recovery;
use host_launcher::serve::auth::AccessToken;
use host_launcher::serve::{server, Service, ServiceConfig};
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
    /// File whose first line is the access token that uploads and the build API require
    /// (`Authorization: Bearer TOKEN`, or HTTP Basic with TOKEN as password, e.g. from Nix's
    /// `netrc-file`); at least 16 characters. The binary cache stays public.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// File whose first line is the token of the callers you trust as Nix trusts its
    /// `trusted-users`: only they may build input-addressed derivations and upload paths that
    /// have neither a content address nor a signature by a `--trusted-public-key`. Holding it
    /// also gives access. Without it, nobody may.
    #[arg(long, value_name = "FILE")]
    pub trusted_token_file: Option<std::path::PathBuf>,
    /// A Nix public key (`name:base64`) whose signature on an uploaded path's narinfo makes the
    /// upload acceptable without a content address (repeatable).
    #[arg(long = "trusted-public-key", value_name = "NAME:KEY")]
    pub trusted_public_keys: Vec<String>,
    /// Builds at once (each in its own VM); more wait in a queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub jobs: u64,
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
    let access = args.token_file.as_deref().map(AccessToken::from_file).transpose()?;
    let trusted = args.trusted_token_file.as_deref().map(AccessToken::from_file).transpose()?;
    let trusted_keys = args
        .trusted_public_keys
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|e| format!("--trusted-public-key {k:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let (engine, store_cfg) = args.builder.config(&state_dir)?;
    let traces = &engine.publish.trace_store;
    std::fs::create_dir_all(traces)
        .map_err(|e| format!("creating the trace store directory {}: {e}", traces.display()))?;
    let cancel = engine.launcher.cancel.clone();
    let cfg = ServiceConfig {
        engine,
        store_dir: state_dir.join("store"),
        store_cfg,
        jobs: args.jobs as usize,
        declared_nix: args.builder.client_nix_version,
        access,
        trusted,
        trusted_keys,
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
    eprintln!("vouch serve: listening on http://{addr}");
    if args.token_file.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            "no --token-file: anyone who reaches {addr} can upload inputs and start builds"
        );
    }
    tracing::info!(
        traces = %service.trace_store().display(),
        jobs = args.jobs,
        "binary cache, uploads (nix copy --to 'http://{addr}?compression=none') and build API"
    );
    server::serve_http(listener, &mut signals, service, args.jobs as usize, &|| cancel.cancel())?;
    Ok(ExitCode::SUCCESS)
}
