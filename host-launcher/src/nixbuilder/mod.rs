//! The remote builder's core: executes the [`Action`]s the Nix protocol front-ends parse, against
//! the content store ([`crate::store`]) and the build core ([`crate::build::run_step`]).
//!
//! - `SetOptions` is remembered for the session: its limits ([`step::SESSION_SETTINGS`]) apply
//!   to the session's later builds; everything else in it is ignored.
//! - `QueryValidPaths` answers from the content store and **pins** the valid ones for the
//!   session, so they survive until this session's build uses them.
//! - Uploads go through the content store's checks; what a session uploaded stays pinned until
//!   it ends.
//! - `QueryPathInfo`/`NarFromPath` serve valid paths only (a path asked about is pinned, and for
//!   a `unix://` client unpacked where it reads it: [`real_store`]).
//! - `BuildDerivation` runs one step in a fresh VM ([`step`]): it answers with a `BuildResult`
//!   whose realisations are signed only after `run_step` checked the statement and evidence.
//!
//! What is not here: wire formats (`crate::nixproto`), VMs (`crate::build`, `crate::vm`).

pub mod adapters;
pub mod real_store;
pub mod step;

use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;

use build_trace::job::Limits;
use nix_formats::ca::SelfRefRule;

use crate::build::LauncherConfig;
use crate::nixproto::{Action, ActionError, ClientOptions, Handler, LogSink, NarStream, Reply};
use crate::store::{ContentStore, Origin};

/// Default wall-clock limit of a build when the client sets none: 3 hours.
pub const DEFAULT_TIMEOUT_S: u64 = 3 * 3600;
/// Default limit on silence when the client sets none: 1 hour.
pub const DEFAULT_MAX_SILENT_S: u64 = 3600;
/// Default log limit when the client sets none: 64 MiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 20;

/// vouch's default build limits (used where the client sends none: always over `ssh-ng://`).
pub fn default_limits() -> Limits {
    Limits {
        timeout_s: DEFAULT_TIMEOUT_S,
        max_silent_s: DEFAULT_MAX_SILENT_S,
        max_log_bytes: DEFAULT_MAX_LOG_BYTES,
        ..Limits::default()
    }
}

/// How the remote builder runs.
#[derive(Debug, Clone)]
pub struct BuilderConfig {
    /// State directory (keys, simulated root, staging).
    pub state_dir: PathBuf,
    /// The trace store / binary cache the steps are published to.
    pub cache_dir: PathBuf,
    /// Limits applied where the client sets none (a client's non-zero values win).
    pub limits: Limits,
    /// How VMs are launched.
    pub launcher: LauncherConfig,
    /// How the signing key is named.
    pub key_naming: crate::build::publish::KeyNaming,
}

/// The core of one builder session (one client connection).
#[derive(Debug)]
pub struct BuilderCore {
    cfg: BuilderConfig,
    store: ContentStore,
    options: Option<ClientOptions>,
    real: Option<real_store::RealStoreSession>,
}

/// Both self-reference rules, the one of current Nix releases first: an uploaded path may come
/// from any Nix release; each rule is Nix's own for some releases.
pub const UPLOAD_RULES: &[SelfRefRule] = &[SelfRefRule::ZeroOnly, SelfRefRule::ZeroAndPositions];

impl BuilderCore {
    /// A session over an open content store.
    pub fn new(cfg: BuilderConfig, store: ContentStore) -> Self {
        BuilderCore { cfg, store, options: None, real: None }
    }

    /// A session whose client reads paths from its file system (`unix://`): every path it asks
    /// about is unpacked into `real` until the session ends ([`real_store`]).
    pub fn with_real_store(mut self, real: Arc<real_store::RealStore>) -> Self {
        self.real = Some(real_store::RealStoreSession::new(real));
        self
    }

    /// The content store.
    pub fn store(&self) -> &ContentStore {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &BuilderConfig {
        &self.cfg
    }

    /// The session's `SetOptions`, if the client sent any.
    pub fn client_options(&self) -> Option<&ClientOptions> {
        self.options.as_ref()
    }
}

impl Handler for BuilderCore {
    fn handle(&mut self, action: Action<'_>, log: &mut dyn LogSink) -> Result<Reply, ActionError> {
        match action {
            Action::SetOptions(o) => {
                tracing::debug!(?o, "client options");
                let l = step::merge_limits(
                    self.cfg.limits,
                    None,
                    Some(&o),
                    self.cfg.launcher.vcpus.into(),
                );
                tracing::info!(
                    timeout_s = l.timeout_s,
                    max_silent_s = l.max_silent_s,
                    max_log_bytes = l.max_log_bytes,
                    cores = l.cores,
                    "SetOptions: the limits of this session's builds"
                );
                self.options = Some(o);
                Ok(Reply::Done)
            }
            Action::QueryValidPaths { paths, .. } => {
                Ok(Reply::ValidPaths(self.store.query_valid(&paths, true)?))
            }
            Action::QueryPathInfo(p) => {
                let info = self.store.path_info(&p)?;
                if info.is_some() {
                    // Pinned: the NAR the client asks for next must not be evicted meanwhile.
                    self.store.pin(&std::iter::once(p.clone()).collect())?;
                    if let Some(real) = &mut self.real {
                        // A `unix://` client reads the path from its file system next.
                        real.provide(&self.store, &p)?;
                    }
                }
                Ok(Reply::PathInfo(info.map(Box::new)))
            }
            Action::AddToStore { uploads, .. } => {
                let added = self.store.add(uploads, UPLOAD_RULES, Origin::Upload)?;
                tracing::info!(count = added.len(), "upload registered");
                Ok(Reply::Done)
            }
            Action::NarFromPath(p) => match self.store.open_nar(&p)? {
                Some((info, f)) => Ok(Reply::Nar(NarStream {
                    size: info.info.nar_size,
                    reader: Box::new(BufReader::with_capacity(1 << 16, f)),
                })),
                None => Err(format!("{p} is not in vouch's content store").into()),
            },
            Action::QueryClosure(roots) => {
                let closure = self.store.closure(&roots)?;
                let all = closure.into_keys().collect();
                self.store.pin(&all)?;
                Ok(Reply::ValidPaths(all))
            }
            Action::BuildDerivation(req) => {
                Ok(Reply::Built(Box::new(step::build(self, *req, log))))
            }
        }
    }
}
