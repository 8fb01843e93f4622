//! The binary cache's read side ([`Service::cache_file`] and its neighbours): files of the trace
//! store directory with their content types; `nix-cache-info`; narinfos, signed from the trace
//! store or else unsigned for a content-store path (for `nix copy --to`'s checks, and public for
//! the `.drv` of a step built here); those `.drv`s' NARs; and the step logs `nix log` reads.
//!
//! What is not here: uploads ([`super::upload`] and `Service::register`), builds and their logs
//! through the API ([`super::builds`]), and which caller may see what ([`super::api::route`]
//! decides `uploads_visible`).

use std::io::Read;

use axum::body::Bytes;
use nix_formats::narinfo::NarInfo;
use nix_formats::StorePath;

use super::{internal, store_error, ApiError, ApiReply, Service, CACHE_INFO};

impl Service {
    /// `nix-cache-info`: the trace store's, else [`CACHE_INFO`].
    pub(super) fn cache_info(&self) -> Result<ApiReply, ApiError> {
        match self.cache_file("nix-cache-info") {
            Err(e) if e.status == 404 => {
                Ok(ApiReply::Bytes("text/x-nix-cache-info", CACHE_INFO.into()))
            }
            other => other,
        }
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

    /// The trace store's signed narinfo with hash part `hash`, through the narinfo memory
    /// ([`super::hot`]): `None` when there is none, or it is larger than [`super::hot::MAX_ENTRY`]
    /// or unreadable (the file path answers those).
    pub fn trace_narinfo(&self, hash: &str) -> Option<Bytes> {
        self.hot.get(hash, || {
            let ApiReply::File(_, f, len) = self.cache_file(&format!("{hash}.narinfo")).ok()?
            else {
                return None;
            };
            let max = super::hot::MAX_ENTRY as u64;
            let mut text = Vec::with_capacity(len.min(max) as usize);
            f.take(max + 1).read_to_end(&mut text).ok()?;
            (text.len() as u64 <= max).then(|| Bytes::from(text))
        })
    }

    /// The signed narinfo of the trace store, else (for a client that may see uploads) an
    /// unsigned one for a content-store path (see the module docs), else 404.
    pub(super) fn narinfo(&self, hash: &str, uploads_visible: bool) -> Result<ApiReply, ApiError> {
        let rel = format!("{hash}.narinfo");
        match self.cache_file(&rel) {
            Err(e) if e.status == 404 => {}
            other => return other,
        }
        let missing = || ApiError::new(404, format!("{rel} is not in this binary cache"));
        let i = self.uploaded(hash)?.ok_or_else(missing)?;
        let built_drv = self.built_drv(&i)?;
        if !uploads_visible && !built_drv {
            return Err(missing());
        }
        let h = nix_formats::hash::Hash::sha256(i.info.nar_hash.0);
        let url =
            if built_drv { format!("drv/{hash}.nar") } else { format!("nar/{}.nar", h.to_nix32()) };
        let text = NarInfo {
            store_path: i.path,
            url,
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

    /// The content store's path with hash part `hash`, if any.
    fn uploaded(&self, hash: &str) -> Result<Option<crate::core::ValidPathInfo>, ApiError> {
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
        match found.as_deref().map(StorePath::parse) {
            Some(Ok(p)) => self.store.path_info(&p).map_err(store_error),
            _ => Ok(None),
        }
    }

    /// Whether `i` is the `.drv` of a step built here, text-addressed (so it certifies itself):
    /// those are public, for `nix log`.
    fn built_drv(&self, i: &crate::core::ValidPathInfo) -> Result<bool, ApiError> {
        if !i.path.is_derivation() || !i.info.ca.as_deref().is_some_and(|c| c.starts_with("text:"))
        {
            return Ok(false);
        }
        Ok(self.builds.records().step_of(&i.path).map_err(internal)?.is_some())
    }

    /// The NAR of the `.drv` of a step built here ([`Self::built_drv`]).
    pub(super) fn drv_nar(&self, hash: &str) -> Result<ApiReply, ApiError> {
        let missing =
            || ApiError::new(404, format!("drv/{hash}.nar is not a derivation built here"));
        let i = self.uploaded(hash)?.ok_or_else(missing)?;
        if !self.built_drv(&i)? {
            return Err(missing());
        }
        let (info, file) =
            self.store.open_nar(&i.path).map_err(store_error)?.ok_or_else(missing)?;
        Ok(ApiReply::File("application/x-nix-nar", file, info.info.nar_size))
    }

    /// The log of the newest step that built `base` (`nix log`): the submitted or the
    /// resolved derivation.
    pub(super) fn nix_log(&self, base: &str) -> Result<ApiReply, ApiError> {
        let missing = || ApiError::new(404, format!("no step built {base} here"));
        let path = StorePath::parse(&format!("{}/{base}", nix_formats::STORE_DIR))
            .map_err(|e| ApiError::new(400, e.to_string()))?;
        let (id, step) =
            self.builds.records().step_of(&path).map_err(internal)?.ok_or_else(missing)?;
        let (bytes, _) = self.build(id)?.log_from(step, 0).ok_or_else(missing)?;
        Ok(ApiReply::Bytes("text/plain; charset=utf-8", bytes))
    }
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
