//! `vouch nix-builder`: serve Nix as a remote builder on stdin/stdout or on a Unix socket.
//!
//! `--stdio` speaks the worker protocol (what `ssh-ng://HOST?remote-program=…` runs), `--serve
//! --write` the serve protocol (what `ssh://…` runs), `--listen PATH` the worker protocol on a
//! Unix socket (what `unix://PATH` reaches), one session per connection until SIGINT or SIGTERM.
//! `--store X` (which Nix appends for `remote-store=X`) is accepted and ignored: vouch keeps its
//! own content store in the state directory. On stdin/stdout, stdout carries the protocol only;
//! logs go to stderr and, for builds, to the client. See `docs/nix-remote-builder.md` for the
//! Nix side.
//!
//! Trust (as Nix's `trusted-users`): no client is trusted unless the operator says so — with
//! `--trusted-user` for the users (by `SO_PEERCRED`) whose `--listen` connections are trusted,
//! with `--trusted` for the one client of a `--stdio`/`--serve` process (in the forced command
//! of the ssh key the operator trusts). `--trusted-public-key` names the keys whose signature
//! certifies an upload that has no content address (`host_launcher::store::session`).

use std::io::{BufReader, BufWriter};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use host_launcher::nixbuilder::real_store::RealStore;
use host_launcher::nixbuilder::Session;
use host_launcher::nixproto::listen::{self, ListenConfig, Peer, SessionFactory, SocketListener};
use host_launcher::nixproto::{serve, worker, ServerError};
use host_launcher::recovery;
use host_launcher::signals::Signals;
use host_launcher::store::{ClientTrust, ContentStore, SessionStore};
use nix_formats::signing::PublicKey;

use super::common::BuilderArgs;
use super::{CmdResult, Global};

/// Arguments of `vouch nix-builder`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("protocol").required(true).args(["stdio", "serve", "listen"])))]
pub struct Args {
    /// Speak Nix's worker protocol on stdin/stdout (`ssh-ng://` builders).
    #[arg(long)]
    pub stdio: bool,
    /// Speak Nix's worker protocol on a Unix socket at PATH (`unix://PATH` builders): one
    /// session per connection, with the limits its client sends in `SetOptions`. SIGINT or
    /// SIGTERM stop running builds and remove the socket. A live socket at PATH is refused, a
    /// stale one replaced.
    #[arg(long, value_name = "PATH")]
    pub listen: Option<PathBuf>,
    /// With --listen: the directory where the paths clients copy from this server are unpacked
    /// for them to read (clients name it: `unix://PATH?real=DIR`); emptied at start, so one
    /// server's own [default: PATH.store].
    #[arg(long, value_name = "DIR", requires = "listen")]
    pub real_store: Option<PathBuf>,
    /// Speak Nix's serve protocol on stdin/stdout (`ssh://` builders).
    #[arg(long)]
    pub serve: bool,
    /// With --serve: allow uploads and builds (Nix always passes it for builders).
    #[arg(long, requires = "serve")]
    pub write: bool,
    /// With --listen: a user (name or uid) whose connections are trusted, as Nix trusts its
    /// `trusted-users` (repeatable). The peer's uid comes from the kernel (SO_PEERCRED). Other
    /// clients are not trusted: they may upload only content-addressed paths or paths signed by
    /// a --trusted-public-key, and build input-addressed derivations only from their .drv
    /// closure. Default: nobody.
    #[arg(long = "trusted-user", value_name = "NAME|UID", requires = "listen")]
    pub trusted_users: Vec<String>,
    /// With --stdio or --serve: trust this process's client, as Nix trusts its
    /// `trusted-users`. Put it in the forced command of the ssh keys you trust
    /// (`command="vouch nix-builder --trusted --stdio"` in authorized_keys); the client must not
    /// be able to choose its own command line. Default: not trusted.
    #[arg(long, conflicts_with = "listen")]
    pub trusted: bool,
    /// A Nix public key (`name:base64`) whose signature on an uploaded path certifies it
    /// without a content address, for any client (repeatable), e.g. `cache.nixos.org-1:…`.
    #[arg(long = "trusted-public-key", value_name = "NAME:KEY")]
    pub trusted_public_keys: Vec<String>,
    /// Accepted for compatibility (Nix appends `--store X` for `remote-store=X`); vouch keeps
    /// its own content store in the state directory.
    #[arg(long, value_name = "URI")]
    pub store: Option<String>,
    /// Content store, client release, trace store, limits, VM and key.
    #[command(flatten)]
    pub builder: BuilderArgs,
}

/// Run `vouch nix-builder`.
pub fn run(args: Args, global: &Global) -> CmdResult {
    let keys = args
        .trusted_public_keys
        .iter()
        .map(|k| PublicKey::parse(k).map_err(|e| format!("--trusted-public-key {k:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let trusted_uids =
        args.trusted_users.iter().map(|u| uid_of(u)).collect::<Result<Vec<_>, _>>()?;
    // Before any thread starts: they inherit the mask that routes SIGINT/SIGTERM to a descriptor.
    let signals = args.listen.as_ref().map(|_| Signals::new()).transpose()?;
    // Refuse a live socket before touching anything; on any later error the socket goes again.
    let listener = args.listen.as_deref().map(SocketListener::bind).transpose()?;
    let state_dir = global.state_dir();
    if let Some(s) = &args.store {
        tracing::debug!(store = %s, "ignoring --store: vouch keeps its own content store");
    }
    let (mut engine, store_cfg) = args.builder.config(&state_dir)?;
    let store_dir = state_dir.join("store");
    let store = ContentStore::open(&store_dir, store_cfg)?;
    if let Some(listener) = &listener {
        // A long-running server: clean up after a crashed predecessor (`recovery`).
        let scope = recovery::Scope::new(&state_dir, Some(&engine.publish.trace_store), false);
        let report = recovery::recover(&scope, store.cleaned());
        recovery::Report { stale_socket: listener.replaced_stale(), ..report }.log();
    }
    let worker_cfg = worker::WorkerConfig {
        version_string: format!("vouch {}", env!("CARGO_PKG_VERSION")),
        declared_nix: args.builder.client_nix_version,
    };
    if let (Some(listener), Some(mut signals)) = (listener, signals) {
        drop(store); // each session opens its own (its own pins)
        let real_dir = args.real_store.clone().unwrap_or_else(|| {
            let mut p = listener.path().as_os_str().to_owned();
            p.push(".store");
            p.into()
        });
        let real = Arc::new(RealStore::open(&real_dir)?);
        tracing::info!(
            "clients: unix://{}?real={}",
            listener.path().display(),
            real.dir().display()
        );
        let pool = args.builder.start_pool(&mut engine);
        let cancel = engine.launcher.cancel.clone();
        tracing::info!(uids = ?trusted_uids, "trusted users (--trusted-user)");
        let new_session: Arc<SessionFactory> = Arc::new(move |peer: &Peer, hangup| {
            let trusted = peer.uid.is_some_and(|u| trusted_uids.contains(&u));
            tracing::info!(uid = ?peer.uid, trusted, "connected");
            let trust = ClientTrust { trusted, keys: keys.clone() };
            // The session's builds stop at shutdown and when its client hangs up.
            Session::for_socket(&engine, (&store_dir, store_cfg), trust, &real, hangup)
        });
        let lcfg = ListenConfig { worker: worker_cfg, grace: listen::DEFAULT_GRACE };
        let summary =
            listen::serve_socket(listener, &mut signals, &lcfg, new_session, &|| cancel.cancel());
        drop(pool);
        tracing::info!(?summary, "stopped");
        summary?;
        return Ok(ExitCode::SUCCESS);
    }
    tracing::info!(trusted = args.trusted, "client trust (--trusted)");
    let trust = ClientTrust { trusted: args.trusted, keys };
    // Nix gone (its ssh connection closed) while a build runs: stop the build.
    let hangup = host_launcher::build::Cancel::default();
    let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
    listen::watch_hangup(stdin, hangup.clone(), over.clone(), 0)?;
    let mut engine = engine;
    engine.launcher.cancel = engine.launcher.cancel.joined(&hangup);
    let mut session = Session::new(engine, SessionStore::new(store, trust)?);

    // The protocol owns stdin/stdout; buffered copies of the descriptors avoid stdout's line
    // buffering on binary data.
    let input = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let output = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let r = BufReader::with_capacity(1 << 16, input);
    let w = BufWriter::with_capacity(1 << 16, output);
    let result = if args.stdio {
        worker::serve(r, w, &worker_cfg, &mut session)
    } else {
        let cfg =
            serve::ServeConfig { write: args.write, declared_nix: args.builder.client_nix_version };
        serve::serve(r, w, &mut std::io::stderr(), &cfg, &mut session)
    };
    over.store(true, std::sync::atomic::Ordering::SeqCst);
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(ServerError::PeerGone(kind)) => {
            tracing::warn!(?kind, "the client went away mid-upload; nothing of it was registered");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(Box::new(e)),
    }
}

/// The uid of `--trusted-user NAME|UID`.
fn uid_of(user: &str) -> Result<u32, String> {
    if let Ok(uid) = user.parse::<u32>() {
        return Ok(uid);
    }
    match nix::unistd::User::from_name(user) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!("--trusted-user {user:?}: no such user (give a name or a uid)")),
        Err(e) => Err(format!("--trusted-user {user:?}: looking up the user: {e}")),
    }
}
