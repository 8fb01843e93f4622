//! The CI service's connections: a tokio runtime, a TCP listener, TLS (rustls) when configured,
//! and hyper's HTTP/1.1 on each connection, serving the axum router of [`super::http`].
//!
//! - **Strict parsing** is hyper's: no bare CR or NUL in a head, header names are tokens, one
//!   `Content-Length`, heads of at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] lines.
//! - **A deadline for the whole request head** ([`ConnLimits::head_timeout`], hyper's header
//!   read timeout): it runs from when a connection waits for a request (the first, or the next
//!   on a kept-alive connection) until the head is complete, however the bytes trickle in; the
//!   TLS handshake has the same deadline. A client that sends one byte a second is closed.
//! - **Connection limits**: at most [`ConnLimits::per_peer`] connections from one IP address;
//!   at most [`ConnLimits::max`] in all, of which a quarter is **reserved for token holders**:
//!   only an address that presented a configured token in the last [`HOLDER_MEMORY`] may open a
//!   connection in the reserved part ([`Holders`]), and such a connection may only carry
//!   requests that present a token (others are answered 503 and the connection closed). So
//!   anonymous clients, however many addresses they use, cannot lock a token holder out, and
//!   one address cannot lock out the others. Over the limits, a connection is answered 503 and
//!   closed.
//! - The service's synchronous core (the engine, content store, SQLite) never runs on the
//!   executor: requests run it through `spawn_blocking` ([`super::http`]; only a trace-store
//!   narinfo, a small file, is read on the executor), builds on their own worker threads
//!   ([`super::builds`]).
//! - **Shutdown** ([`serve_http`]): when the stop source fires (SIGINT/SIGTERM), the listener
//!   closes, queued builds fail without starting, running builds are cancelled (their VMs
//!   killed), `on_stop` runs, the build workers are joined, and open connections are dropped.
//!
//! What is not here: routes and handlers ([`super::http`]), TLS configuration ([`super::tls`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::http::ConnInfo;
use super::Service;
use crate::signals::StopSource;

/// Most bytes hyper buffers for a request (its head, a piece of its body).
pub const MAX_HEAD_BUF: usize = 64 << 10;
/// Most bytes of a request head.
pub const MAX_HEAD: usize = 16 << 10;
/// Most header lines.
pub const MAX_HEADERS: usize = 100;
/// How long an address that presented a token counts as a token holder's.
pub const HOLDER_MEMORY: Duration = Duration::from_secs(3600);
/// Most addresses remembered as token holders' (the oldest are forgotten first).
pub const MAX_HOLDERS: usize = 4096;

/// The addresses that recently presented a configured token: the only ones admitted into the
/// reserved capacity.
#[derive(Debug, Default)]
pub struct Holders(Mutex<HashMap<IpAddr, Instant>>);

impl Holders {
    /// `ip` presented a configured token now.
    pub fn saw(&self, ip: IpAddr) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if m.len() >= MAX_HOLDERS && !m.contains_key(&ip) {
            m.retain(|_, t| now.duration_since(*t) < HOLDER_MEMORY);
            if m.len() >= MAX_HOLDERS {
                if let Some(oldest) = m.iter().min_by_key(|(_, t)| **t).map(|(ip, _)| *ip) {
                    m.remove(&oldest);
                }
            }
        }
        m.insert(ip, now);
    }

    fn holds(&self, ip: IpAddr) -> bool {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&ip).is_some_and(|t| t.elapsed() < HOLDER_MEMORY)
    }
}

/// Limits on connections (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections at once, in all (a quarter reserved for token holders).
    pub max: usize,
    /// Connections at once from one IP address.
    pub per_peer: usize,
    /// Deadline for a request head (and the TLS handshake).
    pub head_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits { max: 1024, per_peer: 64, head_timeout: Duration::from_secs(20) }
    }
}

/// Open connections per address; an entry leaves with its last connection.
#[derive(Debug, Default)]
struct Peers(Mutex<HashMap<IpAddr, usize>>);

/// One connection's place in [`Peers`].
struct PeerSlot(Arc<Peers>, IpAddr);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl Peers {
    fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot(self.clone(), ip))
    }
}

/// What accepts connections.
struct Acceptor {
    service: Arc<Service>,
    router: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnLimits,
    peers: Arc<Peers>,
    open: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
    holders: Arc<Holders>,
}

impl Acceptor {
    /// Admit a connection from `peer`, or say why not.
    fn admit(&self, peer: IpAddr) -> Result<(PeerSlot, OwnedSemaphorePermit, bool), String> {
        let slot = self.peers.enter(peer, self.limits.per_peer).ok_or_else(|| {
            format!("more than {} connections from {peer}; try again", self.limits.per_peer)
        })?;
        if let Ok(p) = self.open.clone().try_acquire_owned() {
            return Ok((slot, p, false));
        }
        let full = || format!("more than {} connections; try again", self.limits.max);
        if !self.holders.holds(peer) {
            return Err(full());
        }
        match self.reserved.clone().try_acquire_owned() {
            Ok(p) => Ok((slot, p, true)),
            Err(_) => Err(full()),
        }
    }

    fn accept(self: &Arc<Self>, tcp: tokio::net::TcpStream, peer: SocketAddr) {
        let admitted = self.admit(peer.ip());
        let me = self.clone();
        tokio::spawn(async move {
            let (slot, permit, reserved) = match admitted {
                Ok(a) => a,
                Err(msg) => {
                    tracing::info!(%peer, "connection refused: {msg}");
                    me.service.metrics().response(503);
                    return refuse(tcp, &msg).await;
                }
            };
            let _ = tcp.set_nodelay(true);
            match &me.tls {
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(me.limits.head_timeout, acceptor.accept(tcp)).await;
                    match handshake {
                        Ok(Ok(s)) => me.serve(s, me.info(peer, reserved, true)).await,
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake: past the head deadline"),
                    }
                }
                None => me.serve(tcp, me.info(peer, reserved, false)).await,
            }
            drop((slot, permit));
        });
    }

    fn info(&self, peer: SocketAddr, reserved: bool, tls: bool) -> ConnInfo {
        ConnInfo { peer, reserved, tls, holders: self.holders.clone() }
    }

    async fn serve<I>(&self, io: I, info: ConnInfo)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let router = self.router.clone();
        let service = self.service.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                use futures_util::future::{ready, Either};
                if let Some(r) = super::http::hot_narinfo(&service, &req, &info) {
                    return Either::Left(ready(Ok(r)));
                }
                req.extensions_mut().insert(info.clone());
                Either::Right(tower::ServiceExt::oneshot(
                    router.clone(),
                    req.map(axum::body::Body::new),
                ))
            });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(self.limits.head_timeout)
            .max_buf_size(MAX_HEAD_BUF)
            .max_header_size(MAX_HEAD)
            .max_headers(MAX_HEADERS);
        if let Err(e) = b.serve_connection(TokioIo::new(io), svc).await {
            tracing::debug!("connection: {e}");
        }
    }
}

/// Answer 503 on a connection that is not admitted, and close it.
async fn refuse(mut tcp: tokio::net::TcpStream, msg: &str) {
    let text = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\nRetry-After: 1\r\n\r\n{msg}\n",
        msg.len() + 1
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.write_all(text.as_bytes())).await;
    let _ = tcp.shutdown().await;
}

/// A future that resolves when `fd` (the stop source's) becomes readable, watched by a thread
/// that ends with the future.
fn stop_waiter(fd: std::os::fd::OwnedFd) -> tokio::sync::oneshot::Receiver<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("stop-waiter".into()).spawn(move || loop {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(n) if n > 0 => {
                let _ = tx.send(());
                return;
            }
            _ if tx.is_closed() => return,
            _ => {}
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot watch for SIGINT/SIGTERM: {e}");
    }
    rx
}

/// Serve on `listener` until `stop` fires, then shut down as the module docs say.
pub fn serve_http(
    listener: std::net::TcpListener,
    stop: &mut dyn StopSource,
    service: Arc<Service>,
    jobs: usize,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnLimits,
    on_stop: &dyn Fn(),
) -> Result<(), std::io::Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("http")
        .max_blocking_threads(64)
        .enable_all()
        .build()?;
    let workers = service.builds().start_workers(jobs);
    let reserved = (limits.max / 4).max(1);
    let acceptor = Arc::new(Acceptor {
        router: super::http::router(service.clone()),
        service: service.clone(),
        tls: tls.map(tokio_rustls::TlsAcceptor::from),
        limits,
        peers: Arc::default(),
        open: Arc::new(Semaphore::new(limits.max.saturating_sub(reserved).max(1))),
        reserved: Arc::new(Semaphore::new(reserved)),
        holders: Arc::default(),
    });
    let reason = rt.block_on(async {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut stopped = stop_waiter(stop.fd().try_clone_to_owned()?);
        loop {
            tokio::select! {
                _ = &mut stopped => break Ok::<String, std::io::Error>(stop.take()),
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => acceptor.accept(tcp, peer),
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    })?;
    tracing::info!(
        "stopping on {reason}: no new connections; queued builds fail, running ones are cancelled"
    );
    service.builds().stop();
    on_stop();
    for w in workers {
        let _ = w.join();
    }
    service.builds().stop_builder();
    rt.shutdown_timeout(Duration::from_secs(1));
    tracing::info!("stopped");
    Ok(())
}
