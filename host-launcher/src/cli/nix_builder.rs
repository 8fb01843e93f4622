//! `vouch nix-builder`: serve Nix as a remote builder on stdin/stdout or on a Unix socket.
//!
//! `--stdio` speaks the worker protocol (what `ssh-ng://HOST?remote-program=…` runs), `--serve
//! --write` the serve protocol (what `ssh://…` runs), `--listen PATH` the worker protocol on a
//! Unix socket (what `unix://PATH` reaches), one session per connection until SIGINT or SIGTERM.
//! `--store X` (which Nix appends for `remote-store=X`) is accepted and ignored: vouch keeps its
//! own content store in the state directory. On stdin/stdout, stdout carries the protocol only;
//! logs go to stderr and, for builds, to the client. See `docs/nix-remote-builder.md` for the
//! Nix side.

use std::io::{BufReader, BufWriter};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use host_launcher::nixbuilder::real_store::RealStore;
use host_launcher::nixbuilder::Session;
use host_launcher::nixproto::listen::{self, ListenConfig, SessionFactory, SocketListener};
use host_launcher::nixproto::{serve, worker, Handler, ServerError};
use host_launcher::recovery;
use host_launcher::signals::Signals;
use host_launcher::store::ContentStore;

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
    // Before any thread starts: they inherit the mask that routes SIGINT/SIGTERM to a descriptor.
    let signals = args.listen.as_ref().map(|_| Signals::new()).transpose()?;
    // Refuse a live socket before touching anything; on any later error the socket goes again.
    let listener = args.listen.as_deref().map(SocketListener::bind).transpose()?;
    let state_dir = global.state_dir();
    if let Some(s) = &args.store {
        tracing::debug!(store = %s, "ignoring --store: vouch keeps its own content store");
    }
    let (engine, store_cfg) = args.builder.config(&state_dir)?;
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
        let cancel = engine.launcher.cancel.clone();
        let new_session: Arc<SessionFactory> = Arc::new(move |_n, hangup| {
            let store = ContentStore::open(&store_dir, store_cfg)?;
            // The session's builds stop at shutdown and when its client hangs up.
            let mut engine = engine.clone();
            engine.launcher.cancel = engine.launcher.cancel.joined(hangup);
            let session = Session::new(engine, store).with_real_store(real.clone());
            Ok(Box::new(session) as Box<dyn Handler + Send>)
        });
        let lcfg = ListenConfig { worker: worker_cfg, grace: listen::DEFAULT_GRACE };
        let summary =
            listen::serve_socket(listener, &mut signals, &lcfg, new_session, &|| cancel.cancel())?;
        tracing::info!(?summary, "stopped");
        return Ok(ExitCode::SUCCESS);
    }
    // Nix gone (its ssh connection closed) while a build runs: stop the build.
    let hangup = host_launcher::build::Cancel::default();
    let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stdin = std::io::stdin().as_fd().try_clone_to_owned()?;
    listen::watch_hangup(stdin, hangup.clone(), over.clone(), 0)?;
    let mut engine = engine;
    engine.launcher.cancel = engine.launcher.cancel.joined(&hangup);
    let mut session = Session::new(engine, store);

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
