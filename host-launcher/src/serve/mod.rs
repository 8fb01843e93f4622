//! The hosted CI service (`vouch serve`): an HTTP API and binary cache over the same content
//! store, engine and trace store as `vouch nix-builder`, a peer front-end of the host's core.
//!
//! Layout (Firecracker style): the front-end ([`server`] on top of [`http`]) parses each request
//! into an [`api::ApiAction`] ([`api::route`] decides which from the request line); the
//! [`Service`] executes it; it never sees HTTP. Uploads are checked by the content store exactly
//! as the Nix protocol's uploads are (`ContentStore::add` with the store's upload rules); a
//! build submission is parsed into the core's request ([`submission`]) and queued
//! ([`builds`]), and the engine builds and publishes it (`crate::core::Engine`).
//!
//! - **Binary cache, read-only** ([`Service::cache_file`]): `nix-cache-info`, `<hash>.narinfo`,
//!   `nar/…`, `realisations/…`, `build-trace-v2/…`, `traces/…`, `vouch/v1/…` from the trace store
//!   directory, which is a Nix binary cache whose narinfos the launcher key signed; and its
//!   transparency log, `log/checkpoint`, `log/tile/…`, `log/index/…` (C2SP tlog-tiles).
//! - **Uploads** ([`upload`]): the requests of `nix copy --to 'http://…?compression=none'`;
//!   uploaded paths go into the content store, checked, never into the trace store.
//! - **narinfo of uploaded paths**: `nix copy --to` asks for `<hash>.narinfo` (GET) to decide
//!   what to upload, and HEAD again before each upload. So that a second copy skips what is
//!   already here, a path that is in the content store but not in the trace store is answered
//!   with an **unsigned** narinfo (no `Sig`; its NAR is not served). No Nix that requires
//!   signatures (the default) substitutes it; the signed entries of the trace store always win.
//!   With an access token configured, only clients presenting it get these narinfos: which
//!   inputs were uploaded is not public.
//! - **Builds** ([`submission`], [`builds`]): `POST /v1/builds` checks the submission first (the
//!   derivation and its input closure in the content store, resolved, buildable, allowed to
//!   this caller) and only then queues it; its state and log answer from the queue and record.
//! - **Access** ([`auth`]): with an access token configured, uploads and the build API need it
//!   (the front-end checks it before it reads a body); the signed binary cache stays public.
//!
//! What is not here: TLS (a TLS-terminating proxy's job, `docs/ci-service.md`), builds and
//! publishing (`crate::core`).

pub mod api;
pub mod auth;
pub mod builds;
pub mod http;
pub mod records;
pub mod server;
pub mod submission;
pub mod upload;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use build_trace::error_chain;
use nix_formats::narinfo::NarInfo;
use nix_formats::signing::PublicKey;
use nix_formats::StorePath;

use crate::core::{Engine, NixVersion};
use crate::store::{ContentStore, FileUploads, Origin, StoreConfig, StoreError, UPLOAD_RULES};
use api::ApiAction;
use records::BuildState;

/// What `nix-cache-info` says when the trace store has none yet.
pub const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";
/// A request the service refuses or cannot answer: an HTTP status and a message naming what
/// was wrong.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct ApiError {
    /// The status.
    pub status: u16,
    /// The message.
    pub msg: String,
}

impl ApiError {
    /// An error with a status.
    pub fn new(status: u16, msg: impl Into<String>) -> Self {
        ApiError { status, msg: msg.into() }
    }
}

/// The service's answer to an action.
#[derive(Debug)]
pub enum ApiReply {
    /// Text or bytes with a content type.
    Bytes(&'static str, Vec<u8>),
    /// A file of `len` bytes with a content type.
    File(&'static str, std::fs::File, u64),
    /// JSON with a status (200, 202).
    Json(u16, serde_json::Value),
}

/// How the service runs.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// How builds run and are published (launcher, default limits, state dir, trace store,
    /// key).
    pub engine: Engine,
    /// The content store directory.
    pub store_dir: PathBuf,
    /// Its settings.
    pub store_cfg: StoreConfig,
    /// Builds at once.
    pub jobs: usize,
    /// The Nix release clients run, where a submission does not say.
    pub declared_nix: Option<NixVersion>,
    /// The token uploads and the build API require; `None`: anyone who reaches the port.
    pub access: Option<auth::AccessToken>,
    /// The token of the callers the operator trusts ([`auth::Caller::trusted`]).
    pub trusted: Option<auth::AccessToken>,
    /// Keys whose signature makes an upload without a content address acceptable.
    pub trusted_keys: Vec<PublicKey>,
}

/// The service core.
#[derive(Debug)]
pub struct Service {
    cfg: ServiceConfig,
    store: ContentStore,
    index: Mutex<rusqlite::Connection>,
    staging: upload::Staging,
    builds: Arc<builds::Builds>,
}

fn store_error(e: StoreError) -> ApiError {
    let status = match &e {
        StoreError::Upload { .. } | StoreError::Missing { .. } | StoreError::Source(_) => 400,
        StoreError::Full { .. } => 507,
        _ => 500,
    };
    ApiError::new(status, error_chain(&e))
}

fn content_type(rel: &str) -> &'static str {
    if rel.starts_with("traces/") {
        return "application/json";
    }
    if rel == "log/checkpoint" || rel.starts_with("log/index/") {
        return "text/plain; charset=utf-8";
    }
    match rel.rsplit('.').next() {
        Some("narinfo") => "text/x-nix-narinfo",
        Some("nar") => "application/x-nix-nar",
        Some("doi" | "json") => "application/json",
        Some("jws") => "application/jose",
        _ => "application/octet-stream",
    }
}

impl Service {
    /// Open the build record (locking the state directory), the content store and the staging
    /// area (emptied) under the state directory.
    pub fn open(cfg: ServiceConfig) -> Result<Service, Box<dyn std::error::Error + Send + Sync>> {
        // First, so that a second service on this state directory stops before it touches
        // anything (the record holds the directory's lock).
        let state_dir = &cfg.engine.publish.state_dir;
        let records = records::Records::open(&state_dir.join("serve"))?;
        let store = ContentStore::open(&cfg.store_dir, cfg.store_cfg)?;
        let index = crate::store::db::open(&cfg.store_dir.join("index.sqlite"))?;
        let staging = upload::Staging::open(&state_dir.join("serve/staging"))?;
        let builds = Arc::new(builds::Builds::new(
            cfg.engine.clone(),
            &cfg.store_dir,
            cfg.store_cfg,
            records,
        ));
        Ok(Service { cfg, store, index: Mutex::new(index), staging, builds })
    }

    /// The build queue (the caller starts and stops its workers).
    pub fn builds(&self) -> &Arc<builds::Builds> {
        &self.builds
    }

    /// Who presents `authorization` ([`auth::Caller`]); a request on a route that
    /// [`api::Route::needs_access`] proceeds only if the caller has access.
    pub fn caller(&self, authorization: Option<&str>) -> auth::Caller {
        auth::Caller::of(authorization, self.cfg.access.as_ref(), self.cfg.trusted.as_ref())
    }

    /// The trace store directory, served as the binary cache.
    pub fn trace_store(&self) -> &Path {
        &self.cfg.engine.publish.trace_store
    }

    /// Execute one action.
    pub fn handle(&self, action: ApiAction<'_>) -> Result<ApiReply, ApiError> {
        match action {
            ApiAction::Health => Ok(ApiReply::Json(200, serde_json::json!({"status": "ok"}))),
            ApiAction::CacheInfo => match self.cache_file("nix-cache-info") {
                Err(e) if e.status == 404 => {
                    Ok(ApiReply::Bytes("text/x-nix-cache-info", CACHE_INFO.into()))
                }
                other => other,
            },
            ApiAction::NarInfo { hash, uploads_visible } => self.narinfo(&hash, uploads_visible),
            ApiAction::CacheFile(rel) => self.cache_file(&rel),
            ApiAction::PutNar { name, uploader, body, len } => {
                self.staging.put_nar(&uploader, &name, body, len, self.cfg.store_cfg.max_bytes)?;
                tracing::info!(nar = %name, bytes = len, "NAR staged; waiting for its narinfo");
                Ok(ApiReply::Bytes("text/plain", b"staged\n".to_vec()))
            }
            ApiAction::PutNarInfo { hash, info, caller, uploader } => {
                self.register(&hash, &info, caller, &uploader)
            }
            ApiAction::SubmitBuild { submission: s, caller } => {
                let req = self.check_submission(&s, caller)?;
                let id = self.builds.submit(req).map_err(|e| ApiError::new(503, e))?;
                tracing::info!(id, drv = %s.drv, "build queued");
                Ok(ApiReply::Json(
                    202,
                    serde_json::json!({"id": id, "status": format!("/v1/builds/{id}"),
                                       "log": format!("/v1/builds/{id}/log")}),
                ))
            }
            ApiAction::BuildStatus(id) => {
                let build = self.build(id)?;
                let mut v = serde_json::json!({"id": id, "drv": build.drv.to_string()});
                let (state, extra) = match build.state() {
                    BuildState::Queued => ("queued", None),
                    BuildState::Running => ("running", None),
                    BuildState::Succeeded { outputs, attester } => {
                        v["evidence"] = attester.to_string().into();
                        ("succeeded", Some(("outputs", outputs)))
                    }
                    BuildState::Failed { status, error } => {
                        v["status"] = status.into();
                        ("failed", Some(("error", error.into())))
                    }
                };
                v["state"] = state.into();
                if let Some((k, val)) = extra {
                    v[k] = val;
                }
                Ok(ApiReply::Json(200, v))
            }
            ApiAction::BuildLog(id) => {
                Ok(ApiReply::Bytes("text/plain; charset=utf-8", self.build(id)?.log().into_bytes()))
            }
        }
    }

    fn build(&self, id: u64) -> Result<Arc<builds::Build>, ApiError> {
        self.builds
            .get(id)
            .map_err(|e| ApiError::new(500, error_chain(&e)))?
            .ok_or_else(|| ApiError::new(404, format!("no build with id {id}")))
    }

    /// A read-only file of the trace store directory (`rel` is already checked by the router).
    pub fn cache_file(&self, rel: &str) -> Result<ApiReply, ApiError> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.trace_store().join(rel);
        let missing = || ApiError::new(404, format!("{rel} is not in this binary cache"));
        // Open first, then ask the open file: a file renamed over this name meanwhile (the
        // `traces/` index is rewritten that way) is served whole, with its own length. No
        // symlinks: the cache holds none, so one is not ours to follow.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .map_err(|_| missing())?;
        match f.metadata() {
            Ok(m) if m.is_file() => Ok(ApiReply::File(content_type(rel), f, m.len())),
            _ => Err(missing()),
        }
    }

    /// The signed narinfo of the trace store, else (for a client that may see uploads) an
    /// unsigned one for a content-store path (see the module docs), else 404.
    fn narinfo(&self, hash: &str, uploads_visible: bool) -> Result<ApiReply, ApiError> {
        let rel = format!("{hash}.narinfo");
        match self.cache_file(&rel) {
            Err(e) if e.status == 404 && uploads_visible => {}
            other => return other,
        }
        let found: Option<String> = {
            let db = self.index.lock().unwrap_or_else(|e| e.into_inner());
            let lo = format!("{}/{hash}-", nix_formats::STORE_DIR);
            let hi = format!("{}/{hash}.", nix_formats::STORE_DIR);
            rusqlite::OptionalExtension::optional(db.query_row(
                "SELECT path FROM paths WHERE path > ?1 AND path < ?2 LIMIT 1",
                [&lo, &hi],
                |r| r.get(0),
            ))
            .map_err(|e| ApiError::new(500, format!("content store index: {e}")))?
        };
        let info = match found.as_deref().map(StorePath::parse) {
            Some(Ok(p)) => self.store.path_info(&p).map_err(store_error)?,
            _ => None,
        };
        let Some(i) = info else {
            return Err(ApiError::new(404, format!("{rel} is not in this binary cache")));
        };
        let h = nix_formats::hash::Hash::sha256(i.info.nar_hash.0);
        let text = NarInfo {
            store_path: i.path,
            url: format!("nar/{}.nar", h.to_nix32()),
            compression: Some("none".into()),
            file_hash: Some(h.clone()),
            file_size: Some(i.info.nar_size),
            nar_hash: h,
            nar_size: i.info.nar_size,
            references: i.info.references,
            deriver: i.deriver,
            system: None,
            sigs: Vec::new(),
            ca: i.info.ca,
        }
        .to_text();
        Ok(ApiReply::Bytes("text/x-nix-narinfo", text.into_bytes()))
    }

    /// A narinfo upload: its staged NAR goes into the service's content store, checked exactly
    /// as a Nix-protocol upload is (`ContentStore::add` with the store's [`UPLOAD_RULES`],
    /// whatever the client's signatures say). Uploads run in parallel; SQLite
    /// serialises only their commits.
    ///
    /// What the upload may be: content-addressed (the content store recomputes the address),
    /// signed by a key the operator trusts (`--trusted-public-key`), or from a trusted caller.
    /// Anything else could be any bytes under any path name, in the store every client's builds
    /// read, so it is refused (403) before its NAR is touched.
    fn register(
        &self,
        hash: &str,
        info: &NarInfo,
        caller: auth::Caller,
        uploader: &upload::Uploader,
    ) -> Result<ApiReply, ApiError> {
        if info.ca.is_none() && !caller.trusted {
            let signed = info.count_valid_signatures(&self.cfg.trusted_keys).unwrap_or(0) > 0;
            if !signed {
                return Err(ApiError::new(
                    403,
                    format!(
                        "{hash}.narinfo: {} has no content address and no signature by a key this \
                         service trusts (--trusted-public-key); uploads from callers without the \
                         trusted token (--trusted-token-file) must be content-addressed or signed, \
                         so that no client can place other bytes under a path another client's \
                         build uses",
                        info.store_path
                    ),
                ));
            }
        }
        let (pi, file, owned) =
            self.staging.take(uploader, hash, info, &self.trace_store().join("nar"))?;
        let path = pi.path.clone();
        let mut uploads = FileUploads::new(vec![(pi, file.clone())]);
        let result = self.store.add(&mut uploads, UPLOAD_RULES, Origin::Upload);
        // `add` pins what it registered for this process; once registered an upload is not in
        // use (a build pins its closure in its own session), so it may be evicted again.
        let _ = self.store.unpin_all();
        if owned {
            let _ = std::fs::remove_file(&file);
        }
        result.map_err(store_error)?;
        tracing::info!(%path, "upload registered in the content store");
        Ok(ApiReply::Bytes("text/plain", b"registered\n".to_vec()))
    }
}

/// Read at most `max` bytes of `r` (a request body already bounded by its length).
pub fn read_small(r: &mut dyn Read, max: u64) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.take(max).read_to_end(&mut v)?;
    Ok(v)
}
