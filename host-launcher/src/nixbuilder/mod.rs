//! The Nix session: one client connection's state, executing the [`Action`]s the Nix protocol
//! front-ends parse against the content store ([`crate::store`]) and the engine
//! ([`crate::core::Engine`]). A thin adapter: the decisions are the core's.
//!
//! - `SetOptions` is remembered for the session: its limits ([`request::SESSION_SETTINGS`])
//!   apply to the session's later builds; everything else in it is ignored.
//! - `QueryValidPaths` answers from the content store and **pins** the valid ones for the
//!   session, so they survive until this session's build uses them.
//! - The session reads and writes the content store through its [`SessionStore`]: the shared
//!   store, plus a private overlay if the operator trusts the client. Uploads go through the
//!   content store's checks and its trust rule (`crate::store::session`: certified paths are
//!   shared, a trusted client's other paths stay in its overlay, an untrusted client's are
//!   refused); what a session uploaded stays pinned until it ends.
//! - `QueryPathInfo`/`NarFromPath` serve valid paths only (a path asked about is pinned, and for
//!   a `unix://` client unpacked where it reads it: [`real_store`]).
//! - `BuildDerivation` becomes the core's request ([`request`]: normal mode only, the CA rule
//!   from the client profile, the limits the client sent, the trust rule for input-addressed
//!   derivations) and the engine builds and publishes it; the reply carries the core's result,
//!   which the front-end encodes for the client.
//! - `BuildPaths` of `DRV!OUTPUTS` builds the `.drv` closure in the content store, computing
//!   every output path ([`build_paths`]); for any client.
//!
//! What is not here: wire formats (`crate::nixproto`), builds and publishing (`crate::core`).

pub mod build_paths;
pub mod real_store;
pub mod request;

use std::io::BufReader;
use std::sync::Arc;

use crate::core::log::BuildLog;
use crate::core::request::with_overrides;
use crate::core::{Engine, Inputs};
use crate::nixproto::{Action, ActionError, BuildMode, ClientOptions, Handler, NarStream, Reply};
use crate::store::{SessionStore, UPLOAD_RULES};

/// One session (one client connection).
#[derive(Debug)]
pub struct Session {
    engine: Engine,
    store: SessionStore,
    options: Option<ClientOptions>,
    real: Option<real_store::RealStoreSession>,
}

impl Session {
    /// A session over its own content store (its pins, its overlay).
    pub fn new(engine: Engine, store: SessionStore) -> Self {
        Session { engine, store, options: None, real: None }
    }

    /// A session whose client reads paths from its file system (`unix://`): every path it asks
    /// about is unpacked into `real` until the session ends ([`real_store`]).
    pub fn with_real_store(mut self, real: Arc<real_store::RealStore>) -> Self {
        self.real = Some(real_store::RealStoreSession::new(real));
        self
    }

    /// The session of one `unix://` connection of a socket server (`vouch nix-builder
    /// --listen`, and the CI service's own builder): its own content store over `store_dir`
    /// (its pins, its overlay when `trust` says so), builds that stop when its client hangs up
    /// (`hangup`), paths unpacked into `real` for its client.
    pub fn for_socket(
        engine: &Engine,
        store: (&std::path::Path, crate::store::StoreConfig),
        trust: crate::store::ClientTrust,
        real: &Arc<real_store::RealStore>,
        hangup: &crate::build::Cancel,
    ) -> Result<Box<dyn Handler + Send>, ActionError> {
        let store = SessionStore::new(crate::store::ContentStore::open(store.0, store.1)?, trust)?;
        let mut engine = engine.clone();
        engine.launcher.cancel = engine.launcher.cancel.joined(hangup);
        Ok(Box::new(Session::new(engine, store).with_real_store(real.clone())))
    }

    fn vcpus(&self) -> u64 {
        self.engine.launcher.vcpus.into()
    }
}

impl Handler for Session {
    fn trusted(&self) -> bool {
        self.store.trusted()
    }

    fn handle(&mut self, action: Action<'_>, log: &mut dyn BuildLog) -> Result<Reply, ActionError> {
        match action {
            Action::SetOptions(o) => {
                tracing::debug!(?o, "client options");
                let client = request::client_limits(None, Some(&o), self.vcpus());
                let l = with_overrides(self.engine.limits, &client);
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
                Ok(Reply::ValidPaths(self.store.view().query_valid(&paths, true)?))
            }
            Action::QueryPathInfo(p) => {
                let view = self.store.view();
                let info = view.path_info(&p)?;
                if info.is_some() {
                    // Pinned: the NAR the client asks for next must not be evicted meanwhile.
                    view.pin(&std::iter::once(p.clone()).collect())?;
                    if let Some(real) = &mut self.real {
                        // A `unix://` client reads the path from its file system next.
                        real.provide(view, &p)?;
                    }
                }
                Ok(Reply::PathInfo(info.map(Box::new)))
            }
            Action::AddToStore { uploads, .. } => {
                let added = self.store.add(uploads, UPLOAD_RULES)?;
                tracing::info!(count = added.len(), "upload registered");
                Ok(Reply::Done)
            }
            Action::NarFromPath(p) => match self.store.view().open_nar(&p)? {
                Some((info, f)) => Ok(Reply::Nar(NarStream {
                    size: info.info.nar_size,
                    reader: Box::new(BufReader::with_capacity(1 << 16, f)),
                })),
                None => Err(format!("{p} is not in vouch's content store").into()),
            },
            Action::QueryClosure(roots) => {
                let view = self.store.view();
                let all = view.closure(&roots)?.into_keys().collect();
                view.pin(&all)?;
                Ok(Reply::ValidPaths(all))
            }
            Action::BuildDerivation(d) => {
                let trusted = self.store.trusted();
                let admitted =
                    request::core_request(*d, self.options.as_ref(), self.vcpus(), trusted);
                let result = match admitted {
                    Ok(a) => {
                        let a = request::with_stored_graph(a, self.store.view());
                        let view = self.store.view().with_private_outputs(a.private_outputs);
                        self.engine.build(a.request, Inputs::ContentStore(view), log)
                    }
                    Err(refused) => refused,
                };
                Ok(Reply::Built(Box::new(result)))
            }
            Action::BuildPaths { wanted, mode, client } => {
                if mode != BuildMode::Normal {
                    let msg = format!("vouch builds in normal mode only; {mode:?} was asked");
                    let r = crate::nixproto::BuildResult::failure(
                        crate::nixproto::BuildStatus::MiscFailure,
                        msg,
                    );
                    return Ok(Reply::BuiltPaths(vec![r; wanted.len()]));
                }
                let ca_rule = client.ca_rule().map_err(|e| e.to_string())?;
                let client = request::client_limits(None, self.options.as_ref(), self.vcpus());
                let req = build_paths::Request {
                    engine: &self.engine,
                    view: self.store.view(),
                    ca_rule,
                    limits: client,
                    trusted: self.store.trusted(),
                };
                Ok(Reply::BuiltPaths(build_paths::build_paths(&req, &wanted, log)))
            }
        }
    }
}
