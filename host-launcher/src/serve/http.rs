//! The HTTP front-end's handlers: an axum [`Router`] whose one handler ([`dispatch`]) parses
//! each request into an [`ApiAction`] ([`api::route`] for the request line, then the query and
//! body), checks the caller's scope before it reads a body, runs the action on a blocking
//! thread (the service, its SQLite and files are synchronous) and makes the reply a response.
//!
//! - **Layers** (tower-http): tracing; a request deadline ([`REQUEST_TIMEOUT`], until the
//!   response head) and a body limit ([`MAX_BODY`]) on everything but NAR uploads, whose bodies
//!   are bounded by the content store's size and must not stall longer than [`BODY_IDLE`];
//!   response compression (gzip, zstd) for what the client accepts, never for NARs.
//! - The trace store's **narinfos** are read on the async thread that answers them (a small
//!   file in the page cache, as nginx reads it); everything else that touches files or SQLite
//!   runs on a blocking thread.
//! - **Range** on binary-cache files (NARs): one `bytes=` range is answered 206; several, 200
//!   with the whole file; an unsatisfiable one 416.
//! - Errors are answered with their status and a message naming what was wrong: plain text on
//!   the binary cache routes (Nix prints it), `{"error": …}` on `/v1/…`; a 401 says how to
//!   authenticate (`WWW-Authenticate: Basic`, which is what Nix's netrc and browsers answer).
//!
//! What is not here: connections, limits on them and TLS ([`super::server`]), the page and its
//! live logs ([`super::web`]), what the service does ([`Service`]).

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::Router;
use futures_util::StreamExt;
use tower_http::compression::predicate::{DefaultPredicate, NotForContentType, Predicate};
use tower_http::compression::CompressionLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use super::api::{self, ApiAction, Route};
use super::{ApiError, ApiReply, Service};

/// Most bytes of a request body other than a NAR (a narinfo, a build submission).
pub const MAX_BODY: usize = 1 << 20;
/// Most bytes of a build submission.
pub const MAX_SUBMISSION: usize = 64 << 10;
/// How long a request other than a NAR upload may take until its response head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a NAR upload's body may stall.
pub const BODY_IDLE: Duration = Duration::from_secs(60);
/// Files up to this size are read whole on the blocking thread; larger ones are streamed.
const SMALL_FILE: u64 = 64 << 10;
/// Most bytes of a refused request's body read and dropped, so the client reads why.
const MAX_DRAIN: usize = 1 << 20;

/// What a connection tells its requests ([`super::server`] sets it).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client.
    pub peer: SocketAddr,
    /// Accepted into the capacity reserved for token holders: anonymous requests are refused.
    pub reserved: bool,
    /// Over TLS.
    pub tls: bool,
    /// Where to say that the peer presented a token.
    pub holders: Arc<super::server::Holders>,
}

/// The router: every request goes to [`dispatch`], NAR uploads without the body limit and
/// request deadline.
pub fn router(service: Arc<Service>) -> Router {
    let compress = DefaultPredicate::new()
        .and(NotForContentType::const_new("application/x-nix-nar"))
        .and(NotForContentType::const_new("text/event-stream"));
    let rest = Router::new()
        .fallback(dispatch)
        .layer(CompressionLayer::new().compress_when(compress))
        .layer(RequestBodyLimitLayer::new(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT));
    Router::new()
        .route("/nar/{name}", put(dispatch).fallback(dispatch))
        .merge(rest)
        .layer(TraceLayer::new_for_http())
        .with_state(service)
}

fn json_route(path: &str) -> bool {
    path.starts_with("/v1/") || path == "/healthz" || path == "/health"
}

/// An error response (see the module docs).
pub fn error_response(path: &str, e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = if json_route(path) {
        (status, axum::Json(serde_json::json!({ "error": e.msg }))).into_response()
    } else {
        let mut r = (status, format!("{}\n", e.msg)).into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        r
    };
    if e.status == 401 {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"vouch\""));
    }
    r
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Every request (see the module docs).
pub async fn dispatch(State(service): State<Arc<Service>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let conn = req.extensions().get::<ConnInfo>().cloned();
    let response = match handle(&service, req, conn).await {
        Ok(r) => r,
        Err((e, body)) => {
            if let Some(body) = body {
                // Read a small refused body that is on its way, so the client reads why.
                let _ = axum::body::to_bytes(body, MAX_DRAIN).await;
            }
            if e.status >= 400 && e.status != 404 {
                tracing::info!(%method, %path, status = e.status, "refused: {}", e.msg);
            }
            error_response(&path, &e)
        }
    };
    service.metrics().response(response.status().as_u16());
    response
}

type Refusal = (ApiError, Option<Body>);

async fn handle(
    service: &Arc<Service>,
    req: Request,
    conn: Option<ConnInfo>,
) -> Result<Response, Refusal> {
    let (parts, body) = req.into_parts();
    // A body that is small and not waiting for `100 Continue` is drained on refusal.
    let drain = parts.headers.get(header::EXPECT).is_none()
        && header_str(&parts.headers, header::CONTENT_LENGTH)
            .and_then(|l| l.parse::<usize>().ok())
            .is_some_and(|l| l <= MAX_DRAIN);
    let mut body = Some(body);
    let refuse = |e: ApiError, body: &mut Option<Body>| (e, if drain { body.take() } else { None });
    let (route, caller) =
        admit(service, &parts.method, parts.uri.path(), &parts.headers, conn.as_ref())
            .map_err(|e| refuse(e, &mut body))?;
    let body = body.take().unwrap_or_default();
    let query = parts.uri.query().unwrap_or_default();
    let peer = conn.as_ref().map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.peer);
    let head = parts.method == Method::HEAD;
    let uploader = super::upload::Uploader::new(&caller, peer.ip());
    if let (Route::NarInfo(hash), None) = (&route, parts.headers.get(header::RANGE)) {
        // The trace store's narinfos, the cache's hot path, are read here (see the module docs).
        if let Some(r) = signed_narinfo(service, hash) {
            return Ok(r);
        }
    }
    let action: Blocking = match route {
        Route::StepEvents(id, step) => {
            return super::web::events(service.clone(), id, step, query, &parts.headers)
                .await
                .map_err(|e| (e, None))
        }
        Route::IndexPage | Route::BuildPage(_) => {
            let tls = conn.as_ref().is_some_and(|c| c.tls);
            return super::web::page(service.clone(), route, query, &parts.headers, caller, tls)
                .await
                .map_err(|e| (e, None));
        }
        Route::PutNar(name) => {
            let len = header_str(&parts.headers, header::CONTENT_LENGTH)
                .and_then(|l| l.parse::<u64>().ok())
                .ok_or_else(|| {
                    (ApiError::new(411, format!("PUT nar/{name} needs a Content-Length")), None)
                })?;
            let reader = body_reader(body);
            Box::new(move |s: &Service| {
                let mut reader = reader;
                s.handle(ApiAction::PutNar { name, uploader, body: &mut reader, len })
            })
        }
        Route::PutNarInfo(hash) => {
            let text = read_body(body, MAX_BODY).await?;
            let text = String::from_utf8(text.to_vec())
                .map_err(|_| (ApiError::new(400, format!("{hash}.narinfo is not UTF-8")), None))?;
            let info = nix_formats::narinfo::NarInfo::parse(&text).map_err(|e| {
                let msg = format!("{hash}.narinfo: {}", build_trace::error_chain(&e));
                (ApiError::new(400, msg), None)
            })?;
            let info = Box::new(info);
            Box::new(move |s: &Service| {
                s.handle(ApiAction::PutNarInfo { hash, info, caller, uploader })
            })
        }
        Route::SubmitBuild => {
            let body = read_body(body, MAX_SUBMISSION).await?;
            let submission = serde_json::from_slice(&body).map_err(|e| {
                (ApiError::new(400, format!("the build request is not valid JSON of the form {{\"drv\": \"/nix/store/…drv\"}}: {e}")), None)
            })?;
            Box::new(move |s: &Service| s.handle(ApiAction::SubmitBuild { submission, caller }))
        }
        other => {
            let action = simple_action(other, query, &caller).map_err(|e| (e, None))?;
            Box::new(move |s: &Service| s.handle(action))
        }
    };
    let range = header_str(&parts.headers, header::RANGE).map(str::to_owned);
    let svc = service.clone();
    let ranged = range.is_some();
    let reply = tokio::task::spawn_blocking(move || {
        let reply = action(&svc)?;
        small_file_in_memory(reply, ranged)
    })
    .await
    .map_err(|e| (ApiError::new(500, format!("the request's task: {e}")), None))?
    .map_err(|e| (e, None))?;
    reply_response(service, reply, range.as_deref(), head).map_err(|e| (e, None))
}

/// The route of a request and its caller, once the caller may ask for it: the capacity
/// reserved for token holders and the route's scope are checked here.
fn admit(
    service: &Service,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    conn: Option<&ConnInfo>,
) -> Result<(Route, super::auth::Caller), ApiError> {
    let route = api::route(method.as_str(), path)?;
    let caller = service.caller(header_str(headers, header::AUTHORIZATION));
    if let Some(c) = conn.filter(|_| caller.authenticated) {
        c.holders.saw(c.peer.ip());
    }
    if conn.is_some_and(|c| c.reserved) && !caller.authenticated {
        return Err(ApiError::new(
            503,
            "the service is at its connection limit; the capacity left is reserved for token holders",
        ));
    }
    if let Some(scope) = route.needs().filter(|s| !caller.can(*s)) {
        let msg = format!(
            "{method} {path} needs the service's access token with the `{}` scope (Authorization: \
             Bearer TOKEN, or HTTP Basic with the token as password, e.g. from a netrc entry)",
            scope.name()
        );
        return Err(ApiError::new(401, msg));
    }
    Ok((route, caller))
}

/// The answer to a request for a trace-store narinfo, before the router and its layers: a GET or HEAD of `/<hash>.narinfo` with no body, no `Range` and no
/// `Accept-Encoding` (what Nix sends), from a caller [`admit`] lets through; it is answered as
/// the router would answer it, without the layers' per-request work (trace span, deadline,
/// compression predicate) and without reading the file while it is fresh in memory. `None` for
/// anything else, which the router answers (errors included).
pub fn hot_narinfo<B>(
    service: &Service,
    req: &axum::http::Request<B>,
    conn: &ConnInfo,
) -> Option<Response> {
    let path = req.uri().path();
    let h = req.headers();
    if !(req.method() == Method::GET || req.method() == Method::HEAD)
        || path.len() != 1 + 32 + ".narinfo".len()
        || !path.ends_with(".narinfo")
        || h.contains_key(header::RANGE)
        || h.contains_key(header::ACCEPT_ENCODING)
        || h.get(header::CONTENT_LENGTH).is_some_and(|l| l != "0")
        || h.contains_key(header::TRANSFER_ENCODING)
    {
        return None;
    }
    let Ok((Route::NarInfo(hash), _)) = admit(service, req.method(), path, h, Some(conn)) else {
        return None;
    };
    let r = signed_narinfo(service, &hash)?;
    service.metrics().response(200);
    Some(r)
}

/// The trace store's narinfo with hash part `hash` ([`Service::trace_narinfo`]), answered on
/// this (async) thread: from memory, or a small file in the page cache, is faster than a hop to
/// a blocking thread. `None` for anything else (not there, large, an error): the blocking path
/// answers it. (A HEAD's body is dropped by hyper.)
fn signed_narinfo(service: &Service, hash: &str) -> Option<Response> {
    let text = service.trace_narinfo(hash)?;
    service.metrics().bytes_served.inc_by(text.len() as u64);
    Some(with_type(text.into_response(), "text/x-nix-narinfo"))
}

/// An action run on a blocking thread.
type Blocking = Box<dyn FnOnce(&Service) -> Result<ApiReply, ApiError> + Send>;

/// The action of a route whose request has no body.
fn simple_action(
    route: Route,
    query: &str,
    caller: &super::auth::Caller,
) -> Result<ApiAction<'static>, ApiError> {
    let q = |name: &str| {
        query.split('&').find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let num = |name: &str| -> Result<Option<u64>, ApiError> {
        q(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::new(400, format!("{name}={v:?}: not a non-negative integer"))
                })
            })
            .transpose()
    };
    Ok(match route {
        Route::Health => ApiAction::Health,
        Route::Metrics => ApiAction::Metrics,
        Route::CacheInfo => ApiAction::CacheInfo,
        // Uploaded paths are visible to token holders with `cache`, or on an open service.
        Route::NarInfo(hash) => ApiAction::NarInfo {
            hash,
            uploads_visible: caller.can(super::auth::Scope::Cache)
                && (caller.authenticated || caller.can(super::auth::Scope::Upload)),
        },
        Route::CacheFile(p) => ApiAction::CacheFile(p),
        Route::NixLog(base) => ApiAction::NixLog(base),
        Route::DrvNar(hash) => ApiAction::DrvNar(hash),
        Route::BuildStatus(id) => ApiAction::BuildStatus(id),
        Route::BuildLog(id) => ApiAction::BuildLog(id),
        Route::BuildSteps(id) => ApiAction::BuildSteps(id),
        Route::CancelBuild(id) => ApiAction::CancelBuild(id),
        Route::StepLog(id, step) => {
            ApiAction::StepLog { id, step, offset: num("offset")?.unwrap_or(0) }
        }
        Route::ListBuilds => ApiAction::ListBuilds {
            state: q("state").filter(|s| !s.is_empty()).map(str::to_owned),
            before: num("before")?,
            limit: num("limit")?.unwrap_or(50).min(u64::from(u32::MAX)) as u32,
        },
        other => return Err(ApiError::new(500, format!("{other:?} has a body or a page"))),
    })
}

async fn read_body(body: Body, max: usize) -> Result<Bytes, Refusal> {
    axum::body::to_bytes(body, max).await.map_err(|e| {
        // `http_body_util::LengthLimitError`, through axum's error.
        let too_big = format!("{e} {:?}", std::error::Error::source(&e)).contains("length limit");
        let status = if too_big { 413 } else { 400 };
        let msg = if too_big {
            format!("the request body is larger than this endpoint accepts ({max} bytes)")
        } else {
            format!("reading the request body: {e}")
        };
        (ApiError::new(status, msg), None)
    })
}

/// A NAR upload's body as a blocking reader; a stall longer than [`BODY_IDLE`] is an error.
fn body_reader(body: Body) -> impl Read + Send + 'static {
    let stream = futures_util::stream::unfold(body.into_data_stream(), |mut s| async move {
        match tokio::time::timeout(BODY_IDLE, s.next()).await {
            Ok(Some(Ok(b))) => Some((Ok(b), s)),
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), s)),
            Ok(None) => None,
            Err(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no body bytes for {} s", BODY_IDLE.as_secs()),
                )),
                s,
            )),
        }
    });
    tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(Box::pin(stream)))
}

/// A small file is read on the blocking thread (one hop for a narinfo), unless a range is
/// asked.
fn small_file_in_memory(reply: ApiReply, ranged: bool) -> Result<ApiReply, ApiError> {
    match reply {
        ApiReply::File(ct, mut f, len) if len <= SMALL_FILE && !ranged => {
            let mut v = Vec::with_capacity(len as usize);
            (&mut f).take(len).read_to_end(&mut v).map_err(super::internal)?;
            Ok(ApiReply::Bytes(ct, v))
        }
        other => Ok(other),
    }
}

fn with_type(mut r: Response, ct: &'static str) -> Response {
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    r
}

/// The response of a reply.
fn reply_response(
    service: &Arc<Service>,
    reply: ApiReply,
    range: Option<&str>,
    head: bool,
) -> Result<Response, ApiError> {
    Ok(match reply {
        ApiReply::Bytes(ct, b) => {
            service.metrics().bytes_served.inc_by(b.len() as u64);
            with_type(b.into_response(), ct)
        }
        ApiReply::Json(status, v) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            (status, axum::Json(v)).into_response()
        }
        ApiReply::Log { bytes, next, complete } => {
            let mut r = with_type(bytes.into_response(), "text/plain; charset=utf-8");
            let h = r.headers_mut();
            h.insert("vouch-log-offset", HeaderValue::from(next));
            h.insert(
                "vouch-log-complete",
                HeaderValue::from_static(if complete { "true" } else { "false" }),
            );
            r
        }
        ApiReply::File(ct, f, len) => file_response(service, ct, f, len, range, head)?,
    })
}

/// A file, whole or one range of it, streamed.
fn file_response(
    service: &Arc<Service>,
    ct: &'static str,
    f: std::fs::File,
    len: u64,
    range: Option<&str>,
    head: bool,
) -> Result<Response, ApiError> {
    let mut status = StatusCode::OK;
    let (mut start, mut count) = (0, len);
    let mut content_range = None;
    if let Some(r) = range {
        match http_range_header::parse_range_header(r).and_then(|p| p.validate(len)) {
            Ok(ranges) if ranges.len() == 1 => {
                let (a, b) = (*ranges[0].start(), *ranges[0].end());
                (start, count) = (a, b - a + 1);
                status = StatusCode::PARTIAL_CONTENT;
                content_range = Some(format!("bytes {a}-{b}/{len}"));
            }
            Ok(_) => {} // several ranges: the whole file
            Err(_) => {
                let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
                let v =
                    HeaderValue::from_str(&format!("bytes */{len}")).map_err(super::internal)?;
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
                return Ok(resp);
            }
        }
    }
    let body = if head || count == 0 {
        Body::empty()
    } else {
        let svc = service.clone();
        let stream = super::file_stream::chunks(f, start, count).map(move |c| {
            if let Ok(b) = &c {
                svc.metrics().bytes_served.inc_by(b.len() as u64);
            }
            c
        });
        Body::from_stream(stream)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(cr) = content_range {
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&cr).map_err(super::internal)?);
    }
    Ok(resp)
}
