//! The HTTP front-end of the CI service: a TCP listener, one thread per connection (HTTP/1.1
//! keep-alive), each request parsed into an [`ApiAction`] and answered from the [`Service`].
//!
//! - At most [`MAX_CONNECTIONS`] connections at once (each its thread); more are answered 503.
//! - Errors are answered with their status and a message naming what was wrong: plain text on
//!   the binary cache routes (Nix prints it), `{"error": …}` on `/v1/…`. A refused request whose
//!   body was not read closes the connection.
//! - **Shutdown** ([`serve_http`]): when the stop source fires (SIGINT/SIGTERM), the listener
//!   closes, queued builds fail without starting, `on_stop` runs (the CLI cancels running builds
//!   through the launcher's `Cancel`, killing their VMs), and the build workers are joined.
//!   Connections still open are dropped with the process.
//!
//! What is not here: the byte-level protocol ([`super::http`]), routes ([`super::api`]).

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::api::{self, ApiAction, Route};
use super::http::{self, HttpError, Request, Response};
use super::{ApiError, ApiReply, Service};
use crate::signals::StopSource;

/// Most bytes of a narinfo upload.
pub const MAX_NARINFO: u64 = 1 << 20;
/// Most bytes of a build submission.
pub const MAX_SUBMISSION: u64 = 64 << 10;
/// Most connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 256;
/// Most bytes of a refused request's body read and dropped to keep the connection.
pub const MAX_DRAIN: u64 = 1 << 20;
/// How long a connection may be idle (or a body stall) before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

fn api_route(path: &str) -> bool {
    path.starts_with("/v1/") || path == "/healthz"
}

fn error_response(path: &str, status: u16, msg: &str) -> Response {
    if api_route(path) {
        Response::json(status, &serde_json::json!({ "error": msg }))
    } else {
        Response::error(status, msg)
    }
}

fn reply_response(r: ApiReply) -> Response {
    match r {
        ApiReply::Bytes(ct, b) => Response::bytes(200, ct, b),
        ApiReply::File(ct, f, len) => Response {
            status: 200,
            content_type: ct,
            body: http::Body::Stream(Box::new(BufReader::with_capacity(1 << 16, f)), len),
        },
        ApiReply::Json(status, v) => Response::json(status, &v),
    }
}

fn from_http(e: HttpError) -> ApiError {
    ApiError::new(e.status, e.msg)
}

/// One exchange: the response, and how many bytes of the request's body were left unread.
fn exchange(
    req: &Request,
    conn: &mut BufReader<TcpStream>,
    out: &mut BufWriter<TcpStream>,
    service: &Service,
    peer: std::net::IpAddr,
) -> (Response, u64) {
    let route = match api::route(&req.method, &req.path) {
        Ok(r) => r,
        Err(e) => return (error_response(&req.path, e.status, &e.msg), req.content_length),
    };
    let caller = service.caller(req.header("authorization"));
    if route.needs_access() && !caller.access {
        let msg = format!(
            "{} {} needs the service's access token (Authorization: Bearer TOKEN, or HTTP Basic \
             with the token as password, e.g. from a netrc entry)",
            req.method, req.path
        );
        return (error_response(&req.path, 401, &msg), req.content_length);
    }
    let uploader = super::upload::Uploader::new(&caller, peer);
    let mut remaining = req.content_length;
    let result = (|| {
        let action = match route {
            Route::Health => ApiAction::Health,
            Route::CacheInfo => ApiAction::CacheInfo,
            Route::NarInfo(hash) => ApiAction::NarInfo { hash, uploads_visible: caller.access },
            Route::CacheFile(p) => ApiAction::CacheFile(p),
            Route::BuildStatus(id) => ApiAction::BuildStatus(id),
            Route::BuildLog(id) => ApiAction::BuildLog(id),
            Route::PutNar(name) => {
                let max = u64::MAX;
                let mut body = req.body(conn, out, max).map_err(from_http)?;
                let r = service.handle(ApiAction::PutNar {
                    name,
                    uploader,
                    body: &mut body,
                    len: req.content_length,
                });
                remaining = body.limit();
                return r;
            }
            Route::PutNarInfo(hash) => {
                let text = small_body(req, conn, out, MAX_NARINFO, &mut remaining)?;
                let text = String::from_utf8(text)
                    .map_err(|_| ApiError::new(400, format!("{hash}.narinfo is not UTF-8")))?;
                let info = nix_formats::narinfo::NarInfo::parse(&text).map_err(|e| {
                    ApiError::new(400, format!("{hash}.narinfo: {}", build_trace::error_chain(&e)))
                })?;
                ApiAction::PutNarInfo { hash, info: Box::new(info), caller, uploader }
            }
            Route::SubmitBuild => {
                let body = small_body(req, conn, out, MAX_SUBMISSION, &mut remaining)?;
                let s = serde_json::from_slice(&body).map_err(|e| {
                    ApiError::new(400, format!("the build request is not valid JSON of the form {{\"drv\": \"/nix/store/…drv\"}}: {e}"))
                })?;
                ApiAction::SubmitBuild { submission: s, caller }
            }
        };
        service.handle(action)
    })();
    match result {
        Ok(r) => (reply_response(r), remaining),
        Err(e) => (error_response(&req.path, e.status, &e.msg), remaining),
    }
}

fn small_body(
    req: &Request,
    conn: &mut BufReader<TcpStream>,
    out: &mut BufWriter<TcpStream>,
    max: u64,
    remaining: &mut u64,
) -> Result<Vec<u8>, ApiError> {
    let mut body = req.body(conn, out, max).map_err(from_http)?;
    let v = super::read_small(&mut body, max)
        .map_err(|e| ApiError::new(400, format!("reading the request body: {e}")))?;
    *remaining = body.limit();
    if *remaining > 0 {
        return Err(ApiError::new(400, "the request body ended early"));
    }
    Ok(v)
}

/// Serve one connection until the client closes it or an exchange cannot continue.
pub fn connection(stream: TcpStream, service: &Service) {
    let peer_addr = stream.peer_addr().ok();
    let peer_ip = peer_addr.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.ip());
    let peer = peer_addr.map_or_else(|| "?".into(), |a| a.to_string());
    let _ = stream.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IDLE_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else { return };
    let mut conn = BufReader::with_capacity(1 << 16, read_half);
    let mut out = BufWriter::with_capacity(1 << 16, stream);
    loop {
        let req = match http::read_request(&mut conn) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%peer, "bad request: {e}");
                let _ =
                    http::write_response(&mut out, Response::error(e.status, &e.msg), false, false);
                return;
            }
        };
        let (resp, mut remaining) = exchange(&req, &mut conn, &mut out, service, peer_ip);
        // A refused request's unread body is read and dropped when it is small and on its way
        // (closing on unread data would reset the connection before the client reads why).
        let waiting = req.expect_continue && remaining == req.content_length;
        if remaining > 0 && remaining <= MAX_DRAIN && !waiting {
            remaining -=
                std::io::copy(&mut (&mut conn).take(remaining), &mut std::io::sink()).unwrap_or(0);
        }
        let keep = req.keep_alive && remaining == 0;
        let head = req.method == "HEAD";
        tracing::debug!(%peer, method = %req.method, path = %req.path, status = resp.status, "request");
        if resp.status >= 400 && resp.status != 404 {
            tracing::info!(%peer, method = %req.method, path = %req.path, status = resp.status, "refused");
        }
        if let Err(e) = http::write_response(&mut out, resp, head, keep) {
            tracing::debug!(%peer, "writing the response: {e}");
            return;
        }
        if !keep {
            let _ = out.flush();
            return;
        }
    }
}

/// Accept connections on `listener` until `stop` fires, then shut down as the module docs say.
pub fn serve_http(
    listener: TcpListener,
    stop: &mut dyn StopSource,
    service: Arc<Service>,
    jobs: usize,
    on_stop: &dyn Fn(),
) -> Result<(), std::io::Error> {
    listener.set_nonblocking(true)?;
    let workers = service.builds().start_workers(jobs);
    let open = Arc::new(AtomicUsize::new(0));
    let reason = loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let stop_ready = fds[1].revents().is_some_and(|r| !r.is_empty());
        if stop_ready {
            break stop.take();
        }
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                        open.fetch_sub(1, Ordering::SeqCst);
                        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                        let msg = format!("more than {MAX_CONNECTIONS} connections; try again");
                        let _ = http::write_response(
                            &mut stream,
                            Response::error(503, &msg),
                            false,
                            false,
                        );
                        continue;
                    }
                    let svc = service.clone();
                    let open = open.clone();
                    let spawned = std::thread::Builder::new().name("http-connection".into()).spawn(
                        move || {
                            connection(stream, &svc);
                            open.fetch_sub(1, Ordering::SeqCst);
                        },
                    );
                    if let Err(e) = spawned {
                        tracing::error!("cannot start a connection thread: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    break;
                }
            }
        }
    };
    tracing::info!(
        "stopping on {reason}: no new connections; queued builds fail, running ones are cancelled"
    );
    drop(listener);
    service.builds().stop();
    on_stop();
    for w in workers {
        let _ = w.join();
    }
    tracing::info!("stopped");
    Ok(())
}
