//! The service's own builder: `vouch nix-builder --listen` in-process, on a Unix socket under
//! the state directory (`<state dir>/serve/builder.sock`), which the service's Nix reaches as
//! `unix://SOCK?real=DIR`. Its sessions are those of `vouch nix-builder` (the same engine,
//! content store and trace store as the service), and:
//! - only connections from this process's own user are trusted (the service's Nix runs as
//!   it); others are served as untrusted clients;
//! - uploads signed by the service's own key, or a `--trusted-public-key`, are certified (an
//!   input-addressed output another builder built reaches it with that builder's signature if
//!   the operator names its key);
//! - it stops when the service stops ([`LocalBuilder::stop`]), its running builds cancelled.
//!
//! What is not here: the worker protocol and its sessions (`crate::nixproto::listen`,
//! `crate::nixbuilder`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix_formats::signing::PublicKey;

use crate::core::Engine;
use crate::nixbuilder::real_store::RealStore;
use crate::nixbuilder::Session;
use crate::nixproto::listen::{self, ListenConfig, Peer, SessionFactory, SocketListener};
use crate::nixproto::worker;
use crate::signals::StopSource;
use crate::store::{ClientTrust, StoreConfig};

/// Why the builder could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The socket.
    #[error("the service's builder socket")]
    Listen(#[source] listen::ListenError),
    /// The directory Nix reads copied paths from.
    #[error("the service's builder's real store")]
    Real(#[source] crate::nixbuilder::real_store::RealStoreError),
    /// The stop pipe or the thread.
    #[error("starting the service's builder")]
    Start(#[source] std::io::Error),
}

/// A pipe whose read end becomes readable when the service stops.
struct PipeStop(OwnedFd);

impl StopSource for PipeStop {
    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    fn take(&mut self) -> String {
        "the service stopped".into()
    }
}

/// The running builder.
#[derive(Debug)]
pub struct LocalBuilder {
    socket: PathBuf,
    real: PathBuf,
    stop: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl LocalBuilder {
    /// Start it on `socket` (a stale one replaced), unpacking paths for Nix into `real`, its
    /// sessions building with `engine` over the content store in `store_dir`, certifying
    /// uploads signed by `keys`.
    pub fn start(
        socket: &Path,
        real: &Path,
        engine: Engine,
        store_dir: &Path,
        store_cfg: StoreConfig,
        keys: Vec<PublicKey>,
    ) -> Result<LocalBuilder, LocalError> {
        let listener = SocketListener::bind(socket).map_err(LocalError::Listen)?;
        let real_store = Arc::new(RealStore::open(real).map_err(LocalError::Real)?);
        let (read, write) = nix::unistd::pipe().map_err(|e| LocalError::Start(e.into()))?;
        let me = nix::unistd::getuid().as_raw();
        let store_dir = store_dir.to_owned();
        let cancel = engine.launcher.cancel.clone();
        let new_session: Arc<SessionFactory> = Arc::new(move |peer: &Peer, hangup| {
            let trust = ClientTrust { trusted: peer.uid == Some(me), keys: keys.clone() };
            Session::for_socket(&engine, (&store_dir, store_cfg), trust, &real_store, hangup)
        });
        let cfg = ListenConfig {
            worker: worker::WorkerConfig {
                version_string: format!("vouch {} (serve)", env!("CARGO_PKG_VERSION")),
                declared_nix: None,
            },
            grace: std::time::Duration::from_secs(10),
        };
        let thread = std::thread::Builder::new()
            .name("serve-builder".into())
            .spawn(move || {
                let mut stop = PipeStop(read);
                match listen::serve_socket(listener, &mut stop, &cfg, new_session, &|| {
                    cancel.cancel()
                }) {
                    Ok(s) => tracing::info!(?s, "the service's builder stopped"),
                    Err(e) => {
                        tracing::warn!("the service's builder: {}", build_trace::error_chain(&e))
                    }
                }
            })
            .map_err(LocalError::Start)?;
        Ok(LocalBuilder {
            socket: socket.to_owned(),
            real: real.to_owned(),
            stop: Some(write),
            thread: Some(thread),
        })
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The directory Nix reads copied paths from (`real=`).
    pub fn real(&self) -> &Path {
        &self.real
    }

    /// Stop it (running builds cancelled) and wait for it.
    pub fn stop(&mut self) {
        if let Some(w) = self.stop.take() {
            let _ = nix::unistd::write(&w, b"x");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LocalBuilder {
    fn drop(&mut self) {
        self.stop();
    }
}
