//! Start-up recovery: remove what a crashed (`kill -9`ed, OOM-killed, powered-off) predecessor
//! left behind, and say what was removed. `vouch nix-builder --listen` and `vouch serve` call
//! [`recover`] once before they serve.
//!
//! Rule: **an entry is removed only if the process named in it is gone.** Every temporary thing
//! a vouch process makes is named after its maker, so no lock is needed and any number of vouch
//! processes (`vouch build`, per-build `nix-builder --stdio`, listeners, a service) may share a
//! state directory and `$TMPDIR` while one of them recovers:
//!
//! | kind | where | owner in the name |
//! |---|---|---|
//! | VM run directories (QEMU console, vsock sockets) | `$TMPDIR/vouch-vm-<pid>-<ticks>-*` | pid + start time |
//! | step staging (received output NARs) | `<state>/tmp/step-<pid>-<ticks>-<job>` | pid + start time |
//! | content store: pins, half-received uploads, orphaned NARs | `<state>/store/` | owners table, `tmp/<pid>-<ticks>-*` |
//! | trace store: half-written files and step directories | `<cache>/**/.tmp-<pid>-*`, `<cache>/vouch/v1/tmp/step-<pid>-*` | pid |
//! | the service's staged uploads | `<state>/serve/staging/*` | the service's lock |
//! | the listener's stale socket | `--listen PATH` | nobody answers on it |
//!
//! "Gone" for pid + start time: this boot's `/proc/<pid>/stat` shows another start time or no
//! process (`crate::store::owner`); for a bare pid (the trace store's writer may be a
//! verifier-side crate without that helper): no `/proc/<pid>`. A recycled bare pid keeps its
//! predecessor's leftovers until a later start-up: conservative, never wrong. The service's
//! staging directory has no owner in its names; only the holder of `<state>/serve/lock` touches
//! it, so it is emptied only while that lock can be taken (a second `vouch serve` on the same
//! state directory then fails to start anyway). Processes sharing a state directory must share
//! a pid namespace.
//!
//! Not removed: transparency-log tiles beyond the checkpoint (a crashed append's; harmless and
//! rewritten by the next append, C2SP allows them), and anything not named as above.
//!
//! What is not here: making the names (`crate::vm::child::run_dir_prefix`,
//! `crate::build::staging_dir`, `build_trace::store::tmp_prefix`, `crate::store`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::store::owner::ProcessId;
use crate::store::Cleanup;

/// Where to look.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The state directory.
    pub state_dir: PathBuf,
    /// The trace store, if this process writes one.
    pub cache_dir: Option<PathBuf>,
    /// Where VM run directories are made (`std::env::temp_dir()`).
    pub tmp_dir: PathBuf,
    /// Whether this process is the service (`<state>/serve/`).
    pub serve: bool,
}

impl Scope {
    /// The scope of a process with `state_dir` and trace store `cache_dir`.
    pub fn new(state_dir: &Path, cache_dir: Option<&Path>, serve: bool) -> Scope {
        Scope {
            state_dir: state_dir.to_owned(),
            cache_dir: cache_dir.map(Path::to_owned),
            tmp_dir: std::env::temp_dir(),
            serve,
        }
    }
}

/// What [`recover`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// VM run directories of dead launchers.
    pub vm_dirs: usize,
    /// Step staging directories of dead launchers.
    pub staging_dirs: usize,
    /// What opening the content store removed.
    pub store: Cleanup,
    /// Trace-store temporary files and step directories of dead writers.
    pub trace_tmp: usize,
    /// The service's staged uploads that never got their narinfo.
    pub serve_staged: usize,
    /// Whether the listener replaced a stale socket (set by the caller).
    pub stale_socket: bool,
    /// The service's staging was left alone because another service holds its lock.
    pub serve_locked: bool,
}

impl Report {
    /// One log line per kind, with its count.
    pub fn log(&self) {
        let s = &self.store;
        tracing::info!(
            count = self.vm_dirs,
            "recovery: VM run directories of dead launchers removed"
        );
        tracing::info!(
            count = self.staging_dirs,
            "recovery: step staging directories of dead launchers removed"
        );
        tracing::info!(
            dead_owners = s.dead_owners,
            tmp_files = s.tmp_files,
            session_overlays = s.session_overlays,
            orphaned_nars = s.orphaned_nars,
            "recovery: content store cleaned of dead processes"
        );
        tracing::info!(
            count = self.trace_tmp,
            "recovery: half-written trace-store entries of dead writers removed"
        );
        if self.serve_locked {
            tracing::warn!("recovery: staged uploads left alone: another `vouch serve` holds the state directory's lock");
        } else {
            tracing::info!(
                count = self.serve_staged,
                "recovery: staged uploads without a narinfo removed"
            );
        }
        tracing::info!(count = usize::from(self.stale_socket), "recovery: stale sockets replaced");
    }
}

/// Remove the leftovers of dead processes in `scope` (see the module docs); `store` is what
/// opening the content store removed. Failures to remove are logged, never fatal.
pub fn recover(scope: &Scope, store: Cleanup) -> Report {
    let mut r = Report { store, ..Report::default() };
    r.vm_dirs = remove_dead(&scope.tmp_dir, crate::vm::child::RUN_DIR_PREFIX, owner_tag_dead);
    r.staging_dirs =
        remove_dead(&scope.state_dir.join("tmp"), crate::build::STAGING_PREFIX, owner_tag_dead);
    if let Some(cache) = &scope.cache_dir {
        r.trace_tmp = trace_tmp(cache, 0);
    }
    if scope.serve {
        match serve_staging(&scope.state_dir.join("serve")) {
            Some(n) => r.serve_staged = n,
            None => r.serve_locked = true,
        }
    }
    r
}

/// Whether the entry named `<prefix><pid>-<ticks>-…` belongs to a dead process.
fn owner_tag_dead(rest: &str) -> bool {
    let mut parts = rest.splitn(3, '-');
    let (Some(pid), Some(ticks)) = (parts.next(), parts.next()) else { return false };
    ProcessId::from_tag(&format!("{pid}-{ticks}")).is_some_and(|p| !p.is_alive())
}

/// Remove the entries of `dir` named `<prefix><rest>` where `dead(rest)`; how many.
fn remove_dead(dir: &Path, prefix: &str, dead: fn(&str) -> bool) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.strip_prefix(prefix).is_some_and(dead) && remove(&e.path()) {
            n += 1;
        }
    }
    n
}

fn remove(path: &Path) -> bool {
    let is_dir = fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    let result = if is_dir { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    match result {
        Ok(()) => {
            tracing::debug!(path = %path.display(), "recovery: removed");
            true
        }
        // Its owner's successor (or another recovering process) was faster.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!(path = %path.display(), "recovery: could not remove: {e}");
            false
        }
    }
}

/// Whether a bare pid names no running process (see the module docs).
fn pid_dead(pid: u32) -> bool {
    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// Depth of the deepest directory a trace-store writer makes a temporary file in
/// (`log/tile/<L>/x…/x…/<n>.p/`), with room to spare.
const TRACE_DEPTH: usize = 10;

/// Remove dead writers' temporary files and step directories anywhere in the trace store `dir`.
fn trace_tmp(dir: &Path, depth: usize) -> usize {
    let Ok(entries) = fs::read_dir(dir) else { return 0 };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(kind) = e.file_type() else { continue };
        let tmp_entry = name.starts_with(".tmp-")
            || (name.starts_with("step-") && dir.ends_with("vouch/v1/tmp"));
        if tmp_entry {
            if build_trace::store::tmp_owner(&name).is_some_and(pid_dead) && remove(&e.path()) {
                n += 1;
            }
        } else if kind.is_dir() && depth < TRACE_DEPTH {
            n += trace_tmp(&e.path(), depth + 1);
        }
    }
    n
}

/// Empty the service's staging directory if no service holds `<serve>/lock`; `None` if one
/// does.
fn serve_staging(serve: &Path) -> Option<usize> {
    let staging = serve.join("staging");
    if !staging.is_dir() {
        return Some(0);
    }
    let lock_path = serve.join("lock");
    let file =
        match fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %lock_path.display(), "recovery: cannot open the lock: {e}");
                return Some(0);
            }
        };
    // Held until the end of this function; the service takes it again when it opens.
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()?;
    let entries = fs::read_dir(&staging).map(|d| d.flatten().collect::<Vec<_>>());
    Some(entries.unwrap_or_default().iter().filter(|e| remove(&e.path())).count())
}

#[cfg(test)]
mod tests;
