//! What an HTTP client asks of the CI service, independent of HTTP: the [`Route`] a request
//! line names (a pure function of method and path, [`route`]) and the [`ApiAction`] the
//! front-end makes of it once it has read the body and query. The service core
//! ([`super::Service`]) executes actions; it never sees HTTP. The JSON API is described in
//! `docs/openapi.yaml`.
//!
//! Routes (scope: what the caller needs, [`Route::needs`]):
//!
//! | method | path | action | scope |
//! |---|---|---|---|
//! | GET | `/health`, `/healthz` | [`ApiAction::Health`] | none |
//! | GET | `/metrics` | [`ApiAction::Metrics`] (Prometheus) | build |
//! | GET, HEAD | `/nix-cache-info` | [`ApiAction::CacheInfo`] | cache |
//! | GET, HEAD | `/<hash>.narinfo` | [`ApiAction::NarInfo`] | cache |
//! | GET, HEAD | `/nar/…`, `/realisations/…`, `/build-trace-v2/…`, `/traces/…`, `/vouch/v1/…` | [`ApiAction::CacheFile`] (Range on NARs) | cache |
//! | GET, HEAD | `/log/checkpoint`, `/log/tile/…`, `/log/index/…` (the transparency log) | [`ApiAction::CacheFile`] | cache |
//! | GET, HEAD | `/log/<drv base name>` (what `nix log` fetches) | [`ApiAction::NixLog`] | cache |
//! | GET, HEAD | `/drv/<hash>.nar` (the `.drv` of a built step) | [`ApiAction::DrvNar`] | cache |
//! | PUT | `/nar/<nix32 file hash>.nar[.xz\|.zst]` | [`ApiAction::PutNar`] | upload |
//! | PUT | `/<hash>.narinfo` | [`ApiAction::PutNarInfo`] | upload |
//! | GET | `/v1/builds?state=&before=&limit=` | [`ApiAction::ListBuilds`] | build |
//! | POST | `/v1/builds` | [`ApiAction::SubmitBuild`] | build |
//! | GET, DELETE | `/v1/builds/<id>` | [`ApiAction::BuildStatus`], [`ApiAction::CancelBuild`] | build |
//! | GET | `/v1/builds/<id>/log` | [`ApiAction::BuildLog`] (all steps) | build |
//! | GET | `/v1/builds/<id>/steps` | [`ApiAction::BuildSteps`] | build |
//! | GET | `/v1/builds/<id>/steps/<n>/log?offset=` | [`ApiAction::StepLog`] | build |
//! | GET | `/v1/builds/<id>/steps/<n>/events?offset=` | server-sent events (the front-end's) | build |
//! | GET | `/`, `/builds/<id>` | the web page (the front-end's) | build |
//!
//! Paths are percent-decoded, then every segment must be a plain name (no `..`, `.`, empty
//! segments, leading dots, NUL or backslash).

use std::io::Read;

use nix_formats::narinfo::NarInfo;
use nix_formats::StorePath;

use super::auth::{Caller, Scope};
use super::upload::Uploader;
use super::ApiError as HttpError;

/// A request line, understood (the body not read yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`.
    Health,
    /// `nix-cache-info`.
    CacheInfo,
    /// `<hash part>.narinfo` (GET/HEAD).
    NarInfo(String),
    /// A read-only file of the binary cache, relative to its directory.
    CacheFile(String),
    /// `PUT nar/<name>`: the file name (with its extension).
    PutNar(String),
    /// `PUT <hash part>.narinfo`.
    PutNarInfo(String),
    /// `POST /v1/builds`.
    SubmitBuild,
    /// `GET /v1/builds/<id>`.
    BuildStatus(u64),
    /// `GET /v1/builds/<id>/log`.
    BuildLog(u64),
    /// `GET /metrics`.
    Metrics,
    /// `GET /log/<drv base name>`.
    NixLog(String),
    /// `GET /drv/<hash>.nar`.
    DrvNar(String),
    /// `GET /v1/builds`.
    ListBuilds,
    /// `DELETE /v1/builds/<id>`.
    CancelBuild(u64),
    /// `GET /v1/builds/<id>/steps`.
    BuildSteps(u64),
    /// `GET /v1/builds/<id>/steps/<n>/log`.
    StepLog(u64, u32),
    /// `GET /v1/builds/<id>/steps/<n>/events`.
    StepEvents(u64, u32),
    /// `GET /`.
    IndexPage,
    /// `GET /builds/<id>`.
    BuildPage(u64),
}

impl Route {
    /// The scope a caller needs for the route (see the module docs); `None`: anyone.
    pub fn needs(&self) -> Option<Scope> {
        match self {
            Route::Health => None,
            Route::CacheInfo
            | Route::NarInfo(_)
            | Route::CacheFile(_)
            | Route::NixLog(_)
            | Route::DrvNar(_) => Some(Scope::Cache),
            Route::PutNar(_) | Route::PutNarInfo(_) => Some(Scope::Upload),
            _ => Some(Scope::Build),
        }
    }
}

/// What a client sends to start a build (`POST /v1/builds`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BuildSubmission {
    /// The derivation's store path (`/nix/store/…drv`), in the content store.
    pub drv: String,
    /// Wall-clock limit in seconds (0 or absent: the service's default).
    #[serde(default)]
    pub timeout: u64,
    /// Limit on silence in seconds (0 or absent: the service's default).
    #[serde(default)]
    pub max_silent_time: u64,
    /// Log limit in bytes (0 or absent: the service's default).
    #[serde(default)]
    pub max_log_size: u64,
    /// The Nix release that will use the outputs (`2.8`): decides the self-reference rule of
    /// content-addressed outputs (absent: the service's `--client-nix-version`).
    #[serde(default)]
    pub nix_version: Option<String>,
}

/// One request, parsed with its body.
pub enum ApiAction<'a> {
    /// Liveness.
    Health,
    /// The cache's `nix-cache-info`.
    CacheInfo,
    /// A narinfo by hash part.
    NarInfo {
        /// The hash part.
        hash: String,
        /// Whether the client may learn which paths were uploaded (it presented the access
        /// token, or none is configured): only then is an uploaded path's unsigned narinfo
        /// answered.
        uploads_visible: bool,
    },
    /// A read-only cache file.
    CacheFile(String),
    /// An uploaded NAR: its file name under `nar/` and its body of `len` bytes.
    PutNar {
        /// File name (`<nix32>.nar`, or with a compression extension, which is refused).
        name: String,
        /// Who sends it (its staged NAR is bound to it).
        uploader: Uploader,
        /// The body.
        body: &'a mut (dyn Read + Send),
        /// Its length.
        len: u64,
    },
    /// An uploaded narinfo: the hash part of its URL and its parsed text.
    PutNarInfo {
        /// Hash part from the URL.
        hash: String,
        /// The narinfo.
        info: Box<NarInfo>,
        /// Who uploads it.
        caller: Caller,
        /// Whose staged NARs it may name.
        uploader: Uploader,
    },
    /// Start a build.
    SubmitBuild {
        /// What to build.
        submission: BuildSubmission,
        /// Who asks.
        caller: Caller,
    },
    /// A build's state.
    BuildStatus(u64),
    /// A build's log so far (all steps).
    BuildLog(u64),
    /// Builds, newest first.
    ListBuilds {
        /// Only in this state.
        state: Option<String>,
        /// Only with ids below this one (the next page).
        before: Option<u64>,
        /// At most this many.
        limit: u32,
    },
    /// Cancel a build.
    CancelBuild(u64),
    /// A build's steps.
    BuildSteps(u64),
    /// A step's log from a byte offset.
    StepLog {
        /// The build.
        id: u64,
        /// The step.
        step: u32,
        /// From this byte.
        offset: u64,
    },
    /// The log of the newest step that built a derivation (`nix log`), by its base name.
    NixLog(String),
    /// The NAR of the `.drv` of a built step, by its hash part.
    DrvNar(String),
    /// The Prometheus metrics.
    Metrics,
}

impl std::fmt::Debug for ApiAction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiAction::Health => f.write_str("Health"),
            ApiAction::CacheInfo => f.write_str("CacheInfo"),
            ApiAction::NarInfo { hash, uploads_visible } => f
                .debug_struct("NarInfo")
                .field("hash", hash)
                .field("uploads_visible", uploads_visible)
                .finish(),
            ApiAction::CacheFile(p) => f.debug_tuple("CacheFile").field(p).finish(),
            ApiAction::PutNar { name, len, .. } => {
                f.debug_struct("PutNar").field("name", name).field("len", len).finish()
            }
            ApiAction::PutNarInfo { hash, caller, .. } => {
                f.debug_struct("PutNarInfo").field("hash", hash).field("caller", caller).finish()
            }
            ApiAction::SubmitBuild { submission, caller } => f
                .debug_struct("SubmitBuild")
                .field("submission", submission)
                .field("caller", caller)
                .finish(),
            ApiAction::BuildStatus(i) => f.debug_tuple("BuildStatus").field(i).finish(),
            ApiAction::BuildLog(i) => f.debug_tuple("BuildLog").field(i).finish(),
            ApiAction::ListBuilds { state, before, limit } => f
                .debug_struct("ListBuilds")
                .field("state", state)
                .field("before", before)
                .field("limit", limit)
                .finish(),
            ApiAction::CancelBuild(i) => f.debug_tuple("CancelBuild").field(i).finish(),
            ApiAction::BuildSteps(i) => f.debug_tuple("BuildSteps").field(i).finish(),
            ApiAction::StepLog { id, step, offset } => f
                .debug_struct("StepLog")
                .field("id", id)
                .field("step", step)
                .field("offset", offset)
                .finish(),
            ApiAction::NixLog(n) => f.debug_tuple("NixLog").field(n).finish(),
            ApiAction::DrvNar(h) => f.debug_tuple("DrvNar").field(h).finish(),
            ApiAction::Metrics => f.write_str("Metrics"),
        }
    }
}

fn percent_decode(path: &str) -> Result<String, HttpError> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| {
                HttpError::new(400, format!("malformed percent-encoding in {path:?}"))
            })?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| HttpError::new(400, format!("{path:?} is not UTF-8")))
}

/// The cache-relative path of a request path, with every segment checked.
fn clean_path(raw: &str) -> Result<String, HttpError> {
    let decoded = percent_decode(raw)?;
    let rel = decoded.strip_prefix('/').unwrap_or(&decoded);
    for seg in rel.split('/') {
        let bad = seg.is_empty()
            || seg.starts_with('.')
            || seg.bytes().any(|b| b == 0 || b == b'\\' || b.is_ascii_control());
        if bad {
            return Err(HttpError::new(
                400,
                format!("refusing the path {decoded:?}: segment {seg:?} is empty, hidden or not a plain name"),
            ));
        }
    }
    Ok(rel.to_owned())
}

/// Which cache directories are served read-only (`vouch/v1/tmp/` is the writer's work area,
/// `vouch/v1/withdrawn/` what an audit took out of the cache; of the transparency log, its
/// C2SP resources and entry index, not the writers' lock).
fn is_cache_file(rel: &str) -> bool {
    if is_log_file(rel) {
        return true;
    }
    ["nar/", "realisations/", "build-trace-v2/", "traces/", "vouch/v1/"]
        .iter()
        .any(|p| rel.starts_with(p))
        && !rel.starts_with("vouch/v1/tmp/")
        && !rel.starts_with("vouch/v1/withdrawn/")
}

/// The transparency log's static files (`build_trace::tlog`, `docs/transparency-log.md`).
fn is_log_file(rel: &str) -> bool {
    rel == "log/checkpoint" || rel.starts_with("log/tile/") || rel.starts_with("log/index/")
}

fn narinfo_hash(rel: &str) -> Option<&str> {
    let h = rel.strip_suffix(".narinfo")?;
    let ok = h.len() == 32 && h.bytes().all(|b| nix_formats::base32::ALPHABET.contains(&b));
    ok.then_some(h)
}

/// Understand a request line (see the module docs for the table).
pub fn route(method: &str, raw_path: &str) -> Result<Route, HttpError> {
    let read = method == "GET" || method == "HEAD";
    if raw_path == "/" {
        return if read {
            Ok(Route::IndexPage)
        } else {
            Err(HttpError::new(405, format!("{method} is not allowed on / (allowed: GET, HEAD)")))
        };
    }
    let rel = clean_path(raw_path)?;
    let not_allowed = |allowed: &str| {
        HttpError::new(405, format!("{method} is not allowed on /{rel} (allowed: {allowed})"))
    };
    let get = |r: Route| if read { Ok(r) } else { Err(not_allowed("GET, HEAD")) };
    if rel == "healthz" || rel == "health" {
        return get(Route::Health);
    }
    if rel == "metrics" {
        return get(Route::Metrics);
    }
    if let Some(id) = rel.strip_prefix("builds/") {
        let id = id.parse().map_err(|_| not_found(&rel))?;
        return get(Route::BuildPage(id));
    }
    if let Some(name) = rel.strip_prefix("log/").filter(|n| n.ends_with(".drv")) {
        if name.contains('/')
            || StorePath::parse(&format!("{}/{name}", nix_formats::STORE_DIR)).is_err()
        {
            return Err(HttpError::new(400, format!("/{rel}: not log/<derivation base name>")));
        }
        return get(Route::NixLog(name.to_owned()));
    }
    if let Some(hash) = rel.strip_prefix("drv/").and_then(|n| n.strip_suffix(".nar")) {
        let h = narinfo_hash(&format!("{hash}.narinfo")).ok_or_else(|| not_found(&rel))?.to_owned();
        return get(Route::DrvNar(h));
    }
    if rel == "nix-cache-info" {
        return if read { Ok(Route::CacheInfo) } else { Err(not_allowed("GET, HEAD")) };
    }
    if rel.ends_with(".narinfo") && !rel.contains('/') {
        let hash = narinfo_hash(&rel).ok_or_else(|| {
            HttpError::new(
                400,
                format!("/{rel} does not name a narinfo (<32 nix32 chars>.narinfo)"),
            )
        })?;
        return match method {
            "GET" | "HEAD" => Ok(Route::NarInfo(hash.to_owned())),
            "PUT" => Ok(Route::PutNarInfo(hash.to_owned())),
            _ => Err(not_allowed("GET, HEAD, PUT")),
        };
    }
    if let Some(name) = rel.strip_prefix("nar/") {
        if method == "PUT" {
            if name.contains('/') {
                return Err(HttpError::new(
                    400,
                    format!("/{rel}: NARs are uploaded as nar/<name>"),
                ));
            }
            return Ok(Route::PutNar(name.to_owned()));
        }
    }
    if is_cache_file(&rel) {
        return if read {
            Ok(Route::CacheFile(rel))
        } else if ["realisations/", "build-trace-v2/", "traces/"].iter().any(|p| rel.starts_with(p))
        {
            Err(HttpError::new(
                403,
                format!(
                    "/{rel}: build traces and their signatures are not accepted from clients; vouch \
                     signs the ones of the steps it built itself"
                ),
            ))
        } else {
            Err(not_allowed("GET, HEAD"))
        };
    }
    if rel == "v1/builds" {
        return match method {
            "POST" => Ok(Route::SubmitBuild),
            "GET" | "HEAD" => Ok(Route::ListBuilds),
            _ => Err(not_allowed("GET, POST")),
        };
    }
    if let Some(rest) = rel.strip_prefix("v1/builds/") {
        return build_route(method, &rel, rest);
    }
    Err(not_found(&rel))
}

fn not_found(rel: &str) -> HttpError {
    HttpError::new(404, format!("/{rel}: no such endpoint or cache file"))
}

/// `/v1/builds/<rest>`.
fn build_route(method: &str, rel: &str, rest: &str) -> Result<Route, HttpError> {
    let parts: Vec<&str> = rest.split('/').collect();
    let id: u64 = parts[0]
        .parse()
        .map_err(|_| HttpError::new(404, format!("/{rel}: {:?} is not a build id", parts[0])))?;
    let step = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| HttpError::new(404, format!("/{rel}: {s:?} is not a step number")))
    };
    let route = match parts[1..] {
        [] if method == "DELETE" => return Ok(Route::CancelBuild(id)),
        [] => Route::BuildStatus(id),
        ["log"] => Route::BuildLog(id),
        ["steps"] => Route::BuildSteps(id),
        ["steps", n, "log"] => Route::StepLog(id, step(n)?),
        ["steps", n, "events"] => Route::StepEvents(id, step(n)?),
        _ => return Err(not_found(rel)),
    };
    if method != "GET" && method != "HEAD" {
        let allowed = if parts.len() == 1 { "GET, DELETE" } else { "GET" };
        return Err(HttpError::new(
            405,
            format!("{method} is not allowed on /{rel} (allowed: {allowed})"),
        ));
    }
    Ok(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/healthz").unwrap(), Route::Health);
        assert_eq!(route("HEAD", "/nix-cache-info").unwrap(), Route::CacheInfo);
        assert_eq!(route("GET", &format!("/{H}.narinfo")).unwrap(), Route::NarInfo(H.into()));
        assert_eq!(route("PUT", &format!("/{H}.narinfo")).unwrap(), Route::PutNarInfo(H.into()));
        assert_eq!(route("PUT", "/nar/abc.nar.xz").unwrap(), Route::PutNar("abc.nar.xz".into()));
        assert_eq!(route("GET", "/nar/abc.nar").unwrap(), Route::CacheFile("nar/abc.nar".into()));
        assert_eq!(
            route("GET", "/realisations/sha256:ab%21out.doi").unwrap(),
            Route::CacheFile("realisations/sha256:ab!out.doi".into())
        );
        assert_eq!(
            route("GET", &format!("/traces/{H}")).unwrap(),
            Route::CacheFile(format!("traces/{H}"))
        );
        assert_eq!(route("POST", "/v1/builds").unwrap(), Route::SubmitBuild);
        assert_eq!(route("GET", "/v1/builds/7").unwrap(), Route::BuildStatus(7));
        assert_eq!(route("GET", "/v1/builds/7/log").unwrap(), Route::BuildLog(7));
        assert_eq!(route("GET", "/v1/builds").unwrap(), Route::ListBuilds);
        assert_eq!(route("DELETE", "/v1/builds/7").unwrap(), Route::CancelBuild(7));
        assert_eq!(route("GET", "/v1/builds/7/steps").unwrap(), Route::BuildSteps(7));
        assert_eq!(route("GET", "/v1/builds/7/steps/0/log").unwrap(), Route::StepLog(7, 0));
        assert_eq!(route("GET", "/v1/builds/7/steps/2/events").unwrap(), Route::StepEvents(7, 2));
        assert_eq!(route("GET", "/").unwrap(), Route::IndexPage);
        assert_eq!(route("GET", "/builds/3").unwrap(), Route::BuildPage(3));
        assert_eq!(route("GET", "/health").unwrap(), Route::Health);
        assert_eq!(route("GET", "/metrics").unwrap(), Route::Metrics);
        let drv = format!("{H}-x.drv");
        assert_eq!(route("GET", &format!("/log/{drv}")).unwrap(), Route::NixLog(drv));
        assert_eq!(route("GET", &format!("/drv/{H}.nar")).unwrap(), Route::DrvNar(H.into()));
        // Who may: the cache needs `cache` (public unless private), uploads `upload`, the
        // build API and the page `build`; health anyone.
        let (c, u, b) = (Some(Scope::Cache), Some(Scope::Upload), Some(Scope::Build));
        for (method, path, needs) in [
            ("GET", "/healthz", None),
            ("GET", "/nix-cache-info", c),
            ("GET", &format!("/{H}.narinfo"), c),
            ("GET", "/nar/abc.nar", c),
            ("GET", &format!("/log/{H}-x.drv"), c),
            ("PUT", "/nar/abc.nar", u),
            ("PUT", &format!("/{H}.narinfo"), u),
            ("POST", "/v1/builds", b),
            ("GET", "/v1/builds/7", b),
            ("DELETE", "/v1/builds/7", b),
            ("GET", "/v1/builds/7/log", b),
            ("GET", "/", b),
            ("GET", "/metrics", b),
        ] {
            assert_eq!(route(method, path).unwrap().needs(), needs, "{method} {path}");
        }
    }

    #[test]
    fn refuses_traversal_and_odd_paths() {
        for p in [
            "/nar/../../etc/passwd",
            "/nar/%2e%2e/x",
            "/vouch/v1/../../x",
            "//etc/passwd",
            "/nar//x",
            "/nar/.hidden",
            "/nar/a%00b",
            "/nar/a\\b",
            "/nar/%zz",
        ] {
            assert_eq!(route("GET", p).unwrap_err().status, 400, "{p}");
        }
        assert_eq!(route("GET", "/etc/passwd").unwrap_err().status, 404);
        assert_eq!(route("GET", "/vouch/v1/tmp/x").unwrap_err().status, 404);
        assert_eq!(route("GET", "/vouch/v1/withdrawn/1-2/x.narinfo").unwrap_err().status, 404);
        assert_eq!(route("GET", "/short.narinfo").unwrap_err().status, 400);
        assert_eq!(route("DELETE", "/nix-cache-info").unwrap_err().status, 405);
        assert_eq!(route("PUT", "/realisations/x.doi").unwrap_err().status, 403);
        assert_eq!(route("PUT", &format!("/traces/{H}")).unwrap_err().status, 403);
        assert_eq!(route("POST", "/v1/builds/1").unwrap_err().status, 405);
        assert_eq!(route("DELETE", "/v1/builds/1/log").unwrap_err().status, 405);
        assert_eq!(route("GET", "/v1/builds/1/steps/x/log").unwrap_err().status, 404);
        assert_eq!(route("GET", "/log/x.drv").unwrap_err().status, 400);
        // The transparency log is read-only and only its resources are served.
        assert_eq!(
            route("GET", "/log/tile/0/x001/002.p/7").unwrap(),
            Route::CacheFile("log/tile/0/x001/002.p/7".into())
        );
        assert_eq!(
            route("GET", "/log/checkpoint").unwrap(),
            Route::CacheFile("log/checkpoint".into())
        );
        assert_eq!(route("PUT", "/log/checkpoint").unwrap_err().status, 405);
        assert_eq!(route("GET", "/log/.lock").unwrap_err().status, 400);
        assert_eq!(route("GET", "/log/other").unwrap_err().status, 404);
        assert_eq!(route("GET", "/v1/builds/x").unwrap_err().status, 404);
    }

    #[test]
    fn submissions_name_unknown_fields() {
        let s: BuildSubmission =
            serde_json::from_str(r#"{"drv":"/nix/store/x.drv","timeout":5}"#).unwrap();
        assert_eq!((s.drv.as_str(), s.timeout, s.max_log_size), ("/nix/store/x.drv", 5, 0));
        let e = serde_json::from_str::<BuildSubmission>(r#"{"drv":"x","tiemout":5}"#).unwrap_err();
        assert!(e.to_string().contains("tiemout"), "{e}");
    }
}
