//! The hosted CI service (`vouch serve`): an HTTP API, binary cache and web page over the same
//! content store, engine and trace store as `vouch nix-builder`, a peer front-end of the host's
//! core.
//!
//! Layout (Firecracker style): the front-end ([`server`]: tokio, hyper and TLS; [`http`]: axum
//! handlers and tower-http layers; [`web`]: the HTML page and its live logs) parses each
//! request into an [`api::ApiAction`] ([`api::route`] decides which from the request line);
//! the [`Service`] executes it on a blocking thread; it never sees HTTP. Uploads are checked
//! by the content store exactly as the Nix protocol's uploads are (`ContentStore::add` with the
//! store's upload rules); a build submission is parsed into the core's request ([`submission`])
//! and queued ([`builds`]), and the engine builds and publishes it (`crate::core::Engine`).
//!
//! - **Binary cache, read-only** ([`cache`]): `nix-cache-info`, `<hash>.narinfo`,
//!   `nar/…`, `realisations/…`, `build-trace-v2/…`, `traces/…`, `vouch/v1/…` from the trace store
//!   directory, which is a Nix binary cache whose narinfos the launcher key signed; and its
//!   transparency log, `log/checkpoint`, `log/tile/…`, `log/index/…` (C2SP tlog-tiles).
//! - **What `nix log` reads**: `log/<drv base name>`, the log of the newest step that built
//!   that derivation (under the submitted and the resolved name), and the `.drv` files of the
//!   steps built here, which Nix reads first: an unsigned narinfo with their text content
//!   address (which certifies them) and their NAR at `drv/<hash>.nar`.
//! - **Uploads** ([`upload`]): the requests of `nix copy --to http://…` (xz, zstd or no
//!   compression); uploaded paths go into the content store, checked, never into the trace
//!   store. Into the shared store only what vouch can certify (a content address it recomputes,
//!   a signature by a `--trusted-public-key`); a trusted client's other uploads go to its
//!   overlay (`crate::store::session`; one per token with the `trusted` scope), which only its
//!   builds read, for the service's life; anyone else's are refused (403).
//! - **narinfo of uploaded paths**: `nix copy --to` asks for `<hash>.narinfo` (GET) to decide
//!   what to upload, and HEAD again before each upload. So that a second copy skips what is
//!   already here, a path that is in the content store but not in the trace store is answered
//!   with an **unsigned** narinfo (no `Sig`; its NAR is not served). No Nix that requires
//!   signatures (the default) substitutes it; the signed entries of the trace store always win.
//!   Only callers with the `cache` scope *and* a token, or any caller of a service without
//!   tokens, get these narinfos: which inputs were uploaded is not public.
//! - **Builds** ([`submission`], [`builds`]): `POST /v1/builds` checks the submission first (the
//!   derivation and its input closure in the content store, resolved, buildable, allowed to
//!   this caller) and only then queues it; its state, steps and logs answer from the queue and
//!   record; `DELETE` cancels it. A restart resumes queued builds (checked again).
//! - **Closures** ([`closure`]): a derivation with input derivations builds its whole closure,
//!   each step in its own VM, scheduled by a real Nix on the service's own builder and the
//!   builders of `--builders FILE`; other builders' traces are verified before they are
//!   published here.
//! - **Access** ([`auth`]): scoped tokens; the front-end checks the route's scope before it
//!   reads a body.
//! - **Metrics** ([`metrics`]): Prometheus text at `/metrics`.
//!
//! What is not here: builds and publishing (`crate::core`).

pub mod api;
pub mod auth;
pub mod builds;
pub mod cache;
pub mod closure;
pub mod file_stream;
pub mod hot;
pub mod http;
pub mod json;
pub mod metrics;
pub mod records;
pub mod server;
pub mod submission;
pub mod tls;
pub mod upload;
pub mod web;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use build_trace::error_chain;
use nix_formats::narinfo::NarInfo;
use nix_formats::signing::PublicKey;

use crate::core::{Engine, NixVersion};
use crate::store::{
    ClientTrust, ContentStore, FileUploads, Origin, SessionStore, StoreConfig, StoreError,
    StoreView, UPLOAD_RULES,
};
use api::ApiAction;
use builds::View;
pub use json::{build_json, rfc3339, step_json};
use records::BuildState;

/// What `nix-cache-info` says when the trace store has none yet.
pub const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";
/// Most builds a list answers at once.
pub const MAX_LIST: u32 = 200;

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
    /// Part of a step's log: its bytes from the offset asked, the offset after them, and whether
    /// the step finished (nothing more will come).
    Log {
        /// The bytes.
        bytes: Vec<u8>,
        /// The offset after them.
        next: u64,
        /// Whether the log is complete.
        complete: bool,
    },
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
    /// Who may do what ([`auth`]); each token with the `trusted` scope is one trusted client
    /// ([`auth::Caller::client`]).
    pub access: auth::Access,
    /// Keys whose signature makes an upload without a content address acceptable.
    pub trusted_keys: Vec<PublicKey>,
    /// How closures are built: other builders, their traces, the policy for those.
    pub closures: closure::ClosureConfig,
}

/// The service core.
#[derive(Debug)]
pub struct Service {
    cfg: ServiceConfig,
    store: ContentStore,
    /// Each trusted client's session store (its overlay), by client ([`auth::Caller::client`]).
    trusted_uploads: Vec<Arc<SessionStore>>,
    index: Mutex<rusqlite::Connection>,
    staging: upload::Staging,
    builds: Arc<builds::Builds>,
    metrics: Arc<metrics::Metrics>,
    public_key: String,
    /// The trace store's narinfos lately read ([`Service::trace_narinfo`]).
    hot: hot::HotNarinfos,
}

fn store_error(e: StoreError) -> ApiError {
    let status = match &e {
        StoreError::Upload { .. } | StoreError::Missing { .. } | StoreError::Source(_) => 400,
        StoreError::Full { .. } => 507,
        _ => 500,
    };
    ApiError::new(status, error_chain(&e))
}

fn internal(e: impl std::error::Error + 'static) -> ApiError {
    ApiError::new(500, error_chain(&e))
}

impl Service {
    /// Open the build record (locking the state directory), the content store, the staging
    /// area (emptied) and the signing key (created if there is none yet) under the state
    /// directory, and queue again the builds a restart found queued.
    pub fn open(cfg: ServiceConfig) -> Result<Service, Box<dyn std::error::Error + Send + Sync>> {
        let mut cfg = cfg;
        // `--jobs` VMs at once, whoever asks (`crate::build::slots`).
        cfg.engine.launcher.slots.get_or_insert_with(|| crate::build::slots::Slots::new(cfg.jobs));
        // First, so that a second service on this state directory stops before it touches
        // anything (the record holds the directory's lock).
        let state_dir = &cfg.engine.publish.state_dir;
        let records = records::Records::open(&state_dir.join("serve"))?;
        let store = ContentStore::open(&cfg.store_dir, cfg.store_cfg)?;
        let index = crate::store::db::open(&cfg.store_dir.join("index.sqlite"))?;
        let staging =
            upload::Staging::open(&state_dir.join("serve/staging"), cfg.store_cfg.max_bytes)?;
        let key_name = cfg.engine.publish.key_naming.check_for(&cfg.engine.launcher)?;
        let public_key = crate::core::publish::public_key_line(state_dir, &key_name)?;
        let metrics = Arc::new(metrics::Metrics::default());
        // Each trusted client's uploads that vouch cannot certify: its overlay, for this
        // process's life (the HTTP API has no sessions; one trusted token is one client).
        let trusted_uploads = (0..cfg.access.trusted_clients())
            .map(|_| {
                let trust = ClientTrust { trusted: true, keys: cfg.trusted_keys.clone() };
                let shared = ContentStore::open(&cfg.store_dir, cfg.store_cfg)?;
                Ok(Arc::new(SessionStore::new(shared, trust)?))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let builds = builds::Builds::new(
            cfg.engine.clone(),
            &cfg.store_dir,
            cfg.store_cfg,
            records,
            metrics.clone(),
        )
        .with_trusted_uploads(trusted_uploads.clone());
        let closures = closure::Closures::start(
            &cfg.closures,
            &cfg.engine,
            state_dir,
            &cfg.store_dir,
            cfg.store_cfg,
            cfg.jobs,
            &public_key,
            &cfg.trusted_keys,
            cfg.access.trusted_clients(),
        )?;
        let builds = builds.with_closures(Arc::new(closures));
        let builds = Arc::new(builds);
        let service = Service {
            cfg,
            store,
            trusted_uploads,
            index: Mutex::new(index),
            staging,
            builds,
            metrics,
            public_key,
            hot: hot::HotNarinfos::default(),
        };
        service.resume();
        Ok(service)
    }

    /// Queue again the builds recorded as queued, each checked again as when it was submitted;
    /// one that no longer passes fails, saying why.
    fn resume(&self) {
        let pending = self.builds.records().pending().to_vec();
        for p in pending {
            let checked = serde_json::from_str::<api::BuildSubmission>(&p.submission)
                .map_err(|e| ApiError::new(500, format!("the recorded submission: {e}")))
                .and_then(|s| self.check_submission(&s, stored_caller(&p.caller)));
            let outcome = match checked {
                // Without a trusted client's overlay: the overlays lived only as long as the
                // process that had them, and a client index may name another token now.
                Ok(req) => self.builds.resume(p.id, req, None).map_err(|e| error_chain(&e)),
                Err(e) => Err(e.msg),
            };
            match outcome {
                Ok(()) => tracing::info!(id = p.id, "queued build resumed after the restart"),
                Err(why) => {
                    let state = BuildState::Failed {
                        status: "MiscFailure".into(),
                        error: format!(
                            "after a restart, this queued build no longer checks: {why}"
                        ),
                    };
                    if let Err(e) = self.builds.records().never_started(&[p.id], &state) {
                        tracing::warn!(id = p.id, "{}", error_chain(&e));
                    }
                }
            }
        }
    }

    /// The content store as `caller`'s builds read it: the shared store, and for a trusted
    /// client its overlay over it.
    pub(super) fn view_of(&self, caller: auth::Caller) -> StoreView<'_> {
        match caller.client.and_then(|i| self.trusted_uploads.get(i)) {
            Some(t) => t.view(),
            None => (&self.store).into(),
        }
    }

    /// The build queue (the caller starts and stops its workers).
    pub fn builds(&self) -> &Arc<builds::Builds> {
        &self.builds
    }

    /// The metrics.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.metrics
    }

    /// Who may do what.
    pub fn access(&self) -> &auth::Access {
        &self.cfg.access
    }

    /// Who presents `authorization` ([`auth::Caller`]).
    pub fn caller(&self, authorization: Option<&str>) -> auth::Caller {
        self.cfg.access.caller(authorization)
    }

    /// The `trusted-public-keys` entry of the key that signs this service's cache.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The trace store directory, served as the binary cache.
    pub fn trace_store(&self) -> &Path {
        &self.cfg.engine.publish.trace_store
    }

    /// Execute one action.
    pub fn handle(&self, action: ApiAction<'_>) -> Result<ApiReply, ApiError> {
        match action {
            ApiAction::Health => {
                // 503 while stopping, so a load balancer sends no more builds here.
                let (queued, running) = self.builds.load();
                let (code, status) =
                    if self.builds.stopping() { (503, "stopping") } else { (200, "ok") };
                let v = serde_json::json!({"status": status, "queued": queued, "running": running});
                Ok(ApiReply::Json(code, v))
            }
            ApiAction::CacheInfo => self.cache_info(),
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
                let sub = serde_json::to_string(&s).map_err(internal)?;
                let who = serde_json::json!({"authenticated": caller.authenticated,
                                             "trusted": caller.trusted})
                .to_string();
                let id = self
                    .builds
                    .submit(req, &sub, &who, caller.client)
                    .map_err(|e| ApiError::new(503, e))?;
                tracing::info!(id, drv = %s.drv, "build queued");
                Ok(ApiReply::Json(
                    202,
                    serde_json::json!({"id": id, "status": format!("/v1/builds/{id}"),
                                       "log": format!("/v1/builds/{id}/log"),
                                       "page": format!("/builds/{id}")}),
                ))
            }
            ApiAction::BuildStatus(id) => {
                Ok(ApiReply::Json(200, build_json(&self.view(id)?, true)))
            }
            ApiAction::BuildSteps(id) => {
                let v = self.view(id)?;
                let steps: Vec<_> = v.steps.iter().map(|s| step_json(id, s)).collect();
                Ok(ApiReply::Json(200, serde_json::json!({"id": id, "steps": steps})))
            }
            ApiAction::BuildLog(id) => {
                Ok(ApiReply::Bytes("text/plain; charset=utf-8", self.build(id)?.log().into_bytes()))
            }
            ApiAction::StepLog { id, step, offset } => {
                let build = self.build(id)?;
                let (bytes, len) = build
                    .log_from(step, offset)
                    .ok_or_else(|| ApiError::new(404, format!("build {id} has no step {step}")))?;
                let complete = build.view().steps[step as usize].state.is_finished();
                Ok(ApiReply::Log { next: offset.min(len) + bytes.len() as u64, bytes, complete })
            }
            ApiAction::ListBuilds { state, before, limit } => self.list(state, before, limit),
            ApiAction::CancelBuild(id) => {
                use builds::CancelError;
                let state = self.builds.cancel(id).map_err(|e| match e {
                    CancelError::Unknown(_) => ApiError::new(404, e.to_string()),
                    CancelError::Finished(..) => ApiError::new(409, e.to_string()),
                    CancelError::Record(e) => internal(e),
                })?;
                Ok(ApiReply::Json(202, serde_json::json!({"id": id, "state": state.name()})))
            }
            ApiAction::NixLog(base) => self.nix_log(&base),
            ApiAction::DrvNar(hash) => self.drv_nar(&hash),
            ApiAction::Metrics => {
                let (queued, running) = self.builds.load();
                let counts = self.builds.records().counts().map_err(internal)?;
                self.metrics.slots(self.cfg.engine.launcher.slots.as_deref());
                let text = self.metrics.render(queued, running, &counts);
                Ok(ApiReply::Bytes("text/plain; version=0.0.4; charset=utf-8", text.into_bytes()))
            }
        }
    }

    fn list(
        &self,
        state: Option<String>,
        before: Option<u64>,
        limit: u32,
    ) -> Result<ApiReply, ApiError> {
        if let Some(s) = state.as_deref().filter(|s| !BuildState::NAMES.contains(s)) {
            return Err(ApiError::new(
                400,
                format!("state={s:?}: not one of {}", BuildState::NAMES.join(", ")),
            ));
        }
        let limit = limit.clamp(1, MAX_LIST);
        let rows = self.builds.records().list(state.as_deref(), before, limit).map_err(internal)?;
        let next = (rows.len() == limit as usize).then(|| rows.last().map(|b| b.id)).flatten();
        let builds: Vec<_> = rows
            .into_iter()
            .map(|info| build_json(&View { info, steps: Vec::new() }, false))
            .collect();
        Ok(ApiReply::Json(200, serde_json::json!({"builds": builds, "next_before": next})))
    }

    /// A build and its steps now.
    pub fn view(&self, id: u64) -> Result<View, ApiError> {
        Ok(self.build(id)?.view())
    }
    /// A build by id.
    pub fn build(&self, id: u64) -> Result<Arc<builds::Build>, ApiError> {
        self.builds
            .get(id)
            .map_err(|e| ApiError::new(500, error_chain(&e)))?
            .ok_or_else(|| ApiError::new(404, format!("no build with id {id}")))
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
        let taken = self.staging.take(uploader, hash, info, &self.trace_store().join("nar"))?;
        let pi = taken.path_info();
        let path = pi.path.clone();
        let mut uploads = FileUploads::new(vec![(pi, taken.file.clone())]);
        let result = match caller.client.and_then(|i| self.trusted_uploads.get(i)) {
            // A trusted caller's: shared if certified, else in its overlay, which only its
            // builds read (`crate::store::session`).
            Some(t) => t.add(&mut uploads, UPLOAD_RULES).map(|_| ()),
            None => self.store.add(&mut uploads, UPLOAD_RULES, Origin::Upload).map(|_| ()),
        };
        // `add` pins what it registered for this process; once registered an upload is not in
        // use (a build pins its closure in its own session), so it may be evicted again. (The
        // trusted callers' store keeps the pins of its overlay's shared references.)
        let _ = self.store.unpin_all();
        drop(taken);
        result.map_err(store_error)?;
        let private = self.view_of(caller).is_private(&path);
        tracing::info!(%path, private, "upload registered in the content store");
        Ok(ApiReply::Bytes("text/plain", b"registered\n".to_vec()))
    }
}

/// The caller recorded with a queued build (`{"authenticated": …, "trusted": …}`), for its
/// check after a restart.
fn stored_caller(json: &str) -> auth::Caller {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let flag = |k: &str| v[k].as_bool().unwrap_or(false);
    auth::Caller {
        scopes: auth::Scopes::NONE,
        authenticated: flag("authenticated"),
        trusted: flag("trusted"),
        token: None,
        // The overlay it read is gone with the process that had it.
        client: None,
    }
}
