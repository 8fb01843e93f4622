//! The transparency log's host side (`docs/transparency-log.md`): the launcher's log key and
//! origin (and this host's name, which names them), reading a log over HTTP, the witness's HTTP
//! endpoint, and asking witnesses to cosign.
//!
//! What is here: plain HTTP/1.1 over TCP (`http://` only: put TLS in front, as for `vouch
//! serve`). What is not: the log's format and rules (`build_trace::tlog`).

pub mod client;
pub mod witness;

use std::path::Path;

use build_trace::tlog::{LogKey, TlogError};

/// The state directory's origin setting: one line, the log's origin (used when its key is
/// made; default `<hostname>/vouch`).
pub const LOG_ORIGIN_FILE: &str = "log-origin";

/// The origin a new log key gets: `<state dir>/log-origin`, else `<hostname>/vouch`.
pub fn default_origin(state_dir: &Path) -> String {
    std::fs::read_to_string(state_dir.join(LOG_ORIGIN_FILE))
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}/vouch", host_name()))
}

/// This host's name (`/proc/sys/kernel/hostname`, else `vouch`): the default of log origins,
/// witness names and signing-key names.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "vouch".into())
}

/// The launcher's log key in `<state dir>/keys/log.note-key`, made on first use for `origin`
/// (else the default origin).
pub fn log_key(state_dir: &Path, origin: Option<&str>) -> Result<LogKey, TlogError> {
    let have = state_dir.join("keys").join(build_trace::tlog::note::LOG_KEY_FILE).exists();
    let origin = match origin {
        Some(o) => Some(o.to_owned()),
        None if have => None,
        None => Some(default_origin(state_dir)),
    };
    LogKey::load_or_generate(state_dir, origin.as_deref())
}
