//! What an HTTP client asks of the CI service, independent of HTTP: the [`Route`] a request
//! line names (a pure function of method and path, [`route`]) and the [`ApiAction`] the
//! front-end makes of it once it has read the body. The service core ([`super::Service`])
//! executes actions; it never sees HTTP.
//!
//! Routes:
//!
//! | method | path | action |
//! |---|---|---|
//! | GET | `/healthz` | [`ApiAction::Health`] |
//! | GET, HEAD | `/nix-cache-info` | [`ApiAction::CacheInfo`] |
//! | GET, HEAD | `/<hash>.narinfo` | [`ApiAction::NarInfo`] |
//! | GET, HEAD | `/nar/…`, `/realisations/…`, `/build-trace-v2/…`, `/traces/…`, `/vouch/v1/…` | [`ApiAction::CacheFile`] |
//! | GET, HEAD | `/log/checkpoint`, `/log/tile/…`, `/log/index/…` (the transparency log) | [`ApiAction::CacheFile`] |
//! | PUT | `/nar/<nix32 file hash>.nar[.<ext>]` | [`ApiAction::PutNar`] |
//! | PUT | `/<hash>.narinfo` | [`ApiAction::PutNarInfo`] |
//! | POST | `/v1/builds` | [`ApiAction::SubmitBuild`] |
//! | GET | `/v1/builds/<id>`, `/v1/builds/<id>/log` | [`ApiAction::BuildStatus`], [`ApiAction::BuildLog`] |
//!
//! Paths are percent-decoded, then every segment must be a plain name (no `..`, `.`, empty
//! segments, leading dots, NUL or backslash).

use std::io::Read;

use nix_formats::narinfo::NarInfo;

use super::auth::Caller;
use super::http::HttpError;
use super::upload::Uploader;

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
}

impl Route {
    /// Whether the route changes what the service holds or shows what clients submitted
    /// (uploads, the build API): those need the access token when one is configured. The
    /// binary cache and `/healthz` are public (a narinfo request without the token is answered
    /// from the signed cache only, see [`ApiAction::NarInfo`]).
    pub fn needs_access(&self) -> bool {
        match self {
            Route::Health | Route::CacheInfo | Route::NarInfo(_) | Route::CacheFile(_) => false,
            Route::PutNar(_)
            | Route::PutNarInfo(_)
            | Route::SubmitBuild
            | Route::BuildStatus(_)
            | Route::BuildLog(_) => true,
        }
    }
}

/// What a client sends to start a build (`POST /v1/builds`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
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
        body: &'a mut dyn Read,
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
    /// A build's log so far.
    BuildLog(u64),
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
    let rel = clean_path(raw_path)?;
    let not_allowed = |allowed: &str| {
        HttpError::new(405, format!("{method} is not allowed on /{rel} (allowed: {allowed})"))
    };
    let read = method == "GET" || method == "HEAD";
    if rel == "healthz" {
        return if method == "GET" { Ok(Route::Health) } else { Err(not_allowed("GET")) };
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
        return if method == "POST" { Ok(Route::SubmitBuild) } else { Err(not_allowed("POST")) };
    }
    if let Some(rest) = rel.strip_prefix("v1/builds/") {
        let (id, log) = match rest.strip_suffix("/log") {
            Some(id) => (id, true),
            None => (rest, false),
        };
        let id: u64 = id
            .parse()
            .map_err(|_| HttpError::new(404, format!("/{rel}: {id:?} is not a build id")))?;
        if method != "GET" {
            return Err(not_allowed("GET"));
        }
        return Ok(if log { Route::BuildLog(id) } else { Route::BuildStatus(id) });
    }
    Err(HttpError::new(404, format!("/{rel}: no such endpoint or cache file")))
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
        // Reading the cache is public; uploads and the build API need the token.
        for (method, path, needs) in [
            ("GET", "/healthz", false),
            ("GET", "/nix-cache-info", false),
            ("GET", &format!("/{H}.narinfo"), false),
            ("GET", "/nar/abc.nar", false),
            ("PUT", "/nar/abc.nar", true),
            ("PUT", &format!("/{H}.narinfo"), true),
            ("POST", "/v1/builds", true),
            ("GET", "/v1/builds/7", true),
            ("GET", "/v1/builds/7/log", true),
        ] {
            assert_eq!(route(method, path).unwrap().needs_access(), needs, "{method} {path}");
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
