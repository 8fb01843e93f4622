//! The Nix session: one client connection's state, executing the [`Action`]s the Nix protocol
//! front-ends parse against the content store ([`crate::store`]) and the engine
//! ([`crate::core::Engine`]). A thin adapter: the decisions are the core's.
//!
//! - `SetOptions` is remembered for the session: its limits ([`request::SESSION_SETTINGS`])
//!   apply to the session's later builds; everything else in it is ignored.
//! - `QueryValidPaths` answers from the content store and **pins** the valid ones for the
//!   session, so they survive until this session's build uses them.
//! - Uploads go through the content store's checks; what a session uploaded stays pinned until
//!   it ends.
//! - `QueryPathInfo`/`NarFromPath` serve valid paths only (a path asked about is pinned, and for
//!   a `unix://` client unpacked where it reads it: [`real_store`]).
//! - `BuildDerivation` becomes the core's request ([`request`]: normal mode only, the CA rule
//!   from the client profile, the limits the client sent) and the engine builds and publishes
//!   it; the reply carries the core's result, which the front-end encodes for the client.
//!
//! What is not here: wire formats (`crate::nixproto`), builds and publishing (`crate::core`).

pub mod real_store;
pub mod request;

use std::io::BufReader;
use std::sync::Arc;

use crate::core::log::BuildLog;
use crate::core::request::with_overrides;
use crate::core::{Engine, Inputs};
use crate::nixproto::{Action, ActionError, ClientOptions, Handler, NarStream, Reply};
use crate::store::{ContentStore, Origin, UPLOAD_RULES};

/// One session (one client connection).
#[derive(Debug)]
pub struct Session {
    engine: Engine,
    store: ContentStore,
    options: Option<ClientOptions>,
    real: Option<real_store::RealStoreSession>,
}

impl Session {
    /// A session over an open content store (its own: its pins are the session's).
    pub fn new(engine: Engine, store: ContentStore) -> Self {
        Session { engine, store, options: None, real: None }
    }

    /// A session whose client reads paths from its file system (`unix://`): every path it asks
    /// about is unpacked into `real` until the session ends ([`real_store`]).
    pub fn with_real_store(mut self, real: Arc<real_store::RealStore>) -> Self {
        self.real = Some(real_store::RealStoreSession::new(real));
        self
    }

    fn vcpus(&self) -> u64 {
        self.engine.launcher.vcpus.into()
    }
}

impl Handler for Session {
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
            Action::BuildDerivation(d) => {
                let result = match request::core_request(*d, self.options.as_ref(), self.vcpus()) {
                    Ok(req) => self.engine.build(req, Inputs::ContentStore(&self.store), log),
                    Err(refused) => refused,
                };
                Ok(Reply::Built(Box::new(result)))
            }
        }
    }
}
