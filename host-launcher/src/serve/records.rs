//! The CI service's record of its builds and their steps, so that ids, outcomes, timestamps and
//! logs outlive the process: `<state>/serve/builds.sqlite` (a row per build and per step) and
//! `<state>/serve/logs/<id>.log` (step 0's log; step `n`'s is `<id>.<n>.log`), each written and
//! synced before its row says the step finished.
//!
//! - A build is recorded when it is accepted (`queued`, with its submission and who sent it, so
//!   that a restart can resume it), when it starts (`running`) and when it ends, with its
//!   outcome (Nix status and error, the outputs JSON and attester kind, or `cancelled`). Each of
//!   its steps (one per derivation of a closure build; the submitted one otherwise) has its own
//!   state, evidence kind, start and end, resolved derivation, and log. Timestamps are Unix seconds.
//! - On open ([`Records::open`]), builds recorded as running were cut off (a crash, or a stop
//!   that could not record them): they are marked failed ([`CUT_OFF`]). Queued builds are
//!   handed back ([`Records::pending`]) for the service to check and queue again. Ids continue
//!   after the highest recorded one, so an id never names two builds.
//! - The newest [`MAX_RECORDS`] finished builds are kept; older rows and logs are pruned.
//! - One service per state directory: the record holds an exclusive lock on `serve/lock`, so a
//!   second `vouch serve` on the same state directory stops with an error instead of marking
//!   the first one's builds as cut off.
//! - A record of the first layout (one row per build, no steps) is migrated on open.
//!
//! What is not here: the queue and the builds themselves ([`super::builds`]).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix_formats::StorePath;
use rusqlite::{params, Connection, OptionalExtension};

use channel::messages::AttesterKind;

use crate::store::db::now;

/// Where a build or a step is.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildState {
    /// Waiting for a worker (a step: for its turn).
    Queued,
    /// Building.
    Running,
    /// Built, checked and published.
    Succeeded {
        /// The outputs as JSON (path, NAR hash and size, signatures, realisation).
        outputs: serde_json::Value,
        /// Who attested, as the engine's result says (the checked evidence).
        attester: AttesterKind,
    },
    /// Failed: Nix's status name and the reason.
    Failed {
        /// `PermanentFailure`, `TimedOut` …
        status: String,
        /// Why.
        error: String,
    },
    /// Cancelled by a caller (`DELETE /v1/builds/<id>`) before it finished.
    Cancelled,
}

impl BuildState {
    /// Its name in the API and the record.
    pub fn name(&self) -> &'static str {
        match self {
            BuildState::Queued => "queued",
            BuildState::Running => "running",
            BuildState::Succeeded { .. } => "succeeded",
            BuildState::Failed { .. } => "failed",
            BuildState::Cancelled => "cancelled",
        }
    }

    /// Whether it is an outcome.
    pub fn is_finished(&self) -> bool {
        !matches!(self, BuildState::Queued | BuildState::Running)
    }

    /// The state names, for filters.
    pub const NAMES: [&'static str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];
}

/// Most finished builds kept on disk (with their logs, each at most
/// [`super::builds::MAX_LOG_KEPT`] bytes per step).
pub const MAX_RECORDS: u64 = 2_000;

/// What the service says of a build cut off by a stop or a crash.
pub const CUT_OFF: &str = "the service stopped before this build finished";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS builds (
    id         INTEGER PRIMARY KEY,
    drv        TEXT NOT NULL,
    state      TEXT NOT NULL
               CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    status     TEXT,
    error      TEXT,
    outputs    TEXT,
    evidence   TEXT,
    submitted  INTEGER NOT NULL,
    started    INTEGER,
    finished   INTEGER,
    submission TEXT,
    caller     TEXT
);
CREATE INDEX IF NOT EXISTS builds_by_state ON builds (state, id);
CREATE TABLE IF NOT EXISTS steps (
    build    INTEGER NOT NULL REFERENCES builds (id) ON DELETE CASCADE,
    idx      INTEGER NOT NULL,
    drv      TEXT NOT NULL,
    resolved TEXT,
    state    TEXT NOT NULL,
    status   TEXT,
    error    TEXT,
    evidence TEXT,
    outputs  TEXT,
    started  INTEGER,
    finished INTEGER,
    detail   TEXT,
    PRIMARY KEY (build, idx)
);
CREATE INDEX IF NOT EXISTS steps_by_drv ON steps (drv);
CREATE INDEX IF NOT EXISTS steps_by_resolved ON steps (resolved);
PRAGMA user_version = 2;
";

/// The first layout (one row per build), migrated on open.
const MIGRATE_V1: &str = "
ALTER TABLE builds RENAME TO builds_v1;
{SCHEMA}
INSERT INTO builds (id, drv, state, status, error, outputs, evidence, submitted, finished)
    SELECT id, drv, state, status, error, outputs, evidence, submitted, finished FROM builds_v1;
INSERT INTO steps (build, idx, drv, state, status, error, evidence, outputs, started, finished)
    SELECT id, 0, drv, state, status, error, evidence, outputs, submitted, finished FROM builds_v1;
DROP TABLE builds_v1;
";

/// Why the build record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The database.
    #[error("build record database {0}")]
    Db(PathBuf, #[source] rusqlite::Error),
    /// A log file.
    #[error("build log {0}")]
    Log(PathBuf, #[source] std::io::Error),
    /// Another service holds the state directory.
    #[error("another vouch serve is using this state directory (it holds {0})")]
    InUse(PathBuf),
    /// The lock file could not be opened or locked.
    #[error("locking {0}")]
    Lock(PathBuf, #[source] std::io::Error),
    /// A row that does not make sense (edited by hand, or another version).
    #[error("build {0} in the record: {1}")]
    Corrupt(u64, String),
}

/// A build, as the API lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildInfo {
    /// Its id.
    pub id: u64,
    /// The submitted derivation.
    pub drv: StorePath,
    /// Where it is.
    pub state: BuildState,
    /// When it was accepted.
    pub submitted: i64,
    /// When its first step started.
    pub started: Option<i64>,
    /// When it finished.
    pub finished: Option<i64>,
}

/// One step of a build: one derivation built in its own VM.
#[derive(Debug, Clone, PartialEq)]
pub struct StepInfo {
    /// Its index in the build (0: the first).
    pub index: u32,
    /// The derivation as submitted.
    pub drv: StorePath,
    /// The derivation built, where it differs (a content-addressed step, resolved).
    pub resolved: Option<StorePath>,
    /// Where it is (its evidence kind once it succeeded).
    pub state: BuildState,
    /// When it started.
    pub started: Option<i64>,
    /// When it finished.
    pub finished: Option<i64>,
    /// How its evidence was checked (JSON: `evidence_root`, `measurement`, `mode`), once it
    /// succeeded.
    pub detail: Option<serde_json::Value>,
}

/// A queued build found on open, for the service to check and queue again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Its id.
    pub id: u64,
    /// The submission, as JSON.
    pub submission: String,
    /// Who sent it, as JSON.
    pub caller: String,
}

/// The record (thread-safe).
#[derive(Debug)]
pub struct Records {
    _lock: nix::fcntl::Flock<std::fs::File>,
    db: Mutex<Connection>,
    db_path: PathBuf,
    logs: PathBuf,
    next: u64,
    pending: Vec<Pending>,
}

fn lock_dir(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, RecordError> {
    let lock_path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| RecordError::Lock(lock_path.clone(), e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => RecordError::InUse(lock_path.clone()),
            e => RecordError::Lock(lock_path.clone(), e.into()),
        },
    )
}

fn open_db(db_path: &Path) -> rusqlite::Result<Connection> {
    let db = crate::store::db::open_with(db_path, "")?;
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let v1: bool = db
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'builds'",
            [],
            |_| Ok(true),
        )
        .optional()?
        .is_some();
    if version < 2 && v1 {
        let sql = MIGRATE_V1.replace("{SCHEMA}", SCHEMA);
        db.execute_batch(&format!("BEGIN IMMEDIATE; {sql} COMMIT;"))?;
        tracing::info!("build record migrated to the layout with steps");
    } else {
        db.execute_batch(&format!("BEGIN IMMEDIATE; {SCHEMA} COMMIT;"))?;
    }
    Ok(db)
}

/// The columns of a state: (name, status, error, outputs, evidence).
fn columns(
    state: &BuildState,
) -> (&'static str, Option<&str>, Option<&str>, Option<String>, Option<String>) {
    match state {
        BuildState::Succeeded { outputs, attester } => {
            ("succeeded", None, None, Some(outputs.to_string()), Some(attester.to_string()))
        }
        BuildState::Failed { status, error } => {
            ("failed", Some(status.as_str()), Some(error.as_str()), None, None)
        }
        other => (other.name(), None, None, None, None),
    }
}

impl Records {
    /// Open (or create, or migrate) the record in `dir`: running builds are marked failed,
    /// queued ones kept for [`Records::pending`].
    pub fn open(dir: &Path) -> Result<Records, RecordError> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| RecordError::Log(logs.clone(), e))?;
        let lock = lock_dir(dir)?;
        let db_path = dir.join("builds.sqlite");
        let err = |e| RecordError::Db(db_path.clone(), e);
        let db = open_db(&db_path).map_err(err)?;
        let t = now();
        // A queued build without its submission (the first layout) cannot be resumed.
        let cut = db
            .execute(
                "UPDATE builds SET state = 'failed', status = 'MiscFailure', error = ?1,
                        finished = ?2
                 WHERE state = 'running' OR (state = 'queued' AND submission IS NULL)",
                params![CUT_OFF, t],
            )
            .map_err(err)?;
        db.execute(
            "UPDATE steps SET state = 'failed', status = 'MiscFailure', error = ?1, finished = ?2
             WHERE state IN ('queued', 'running')
               AND build IN (SELECT id FROM builds WHERE state = 'failed')",
            params![CUT_OFF, t],
        )
        .map_err(err)?;
        if cut > 0 {
            tracing::warn!(builds = cut, "builds cut off by the last stop are recorded as failed");
        }
        let pending = db
            .prepare("SELECT id, submission, caller FROM builds WHERE state = 'queued' ORDER BY id")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(Pending {
                        id: r.get::<_, i64>(0)? as u64,
                        submission: r.get(1)?,
                        caller: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                    })
                })?
                .collect()
            })
            .map_err(err)?;
        let max: Option<i64> =
            db.query_row("SELECT MAX(id) FROM builds", [], |r| r.get(0)).map_err(err)?;
        let next = max.map_or(1, |m| m as u64 + 1);
        Ok(Records { _lock: lock, db: Mutex::new(db), db_path, logs, next, pending })
    }

    /// The first id not yet recorded.
    pub fn next_id(&self) -> u64 {
        self.next
    }

    /// The builds still queued when the record was opened, oldest first.
    pub fn pending(&self) -> &[Pending] {
        &self.pending
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> RecordError + '_ {
        |e| RecordError::Db(self.db_path.clone(), e)
    }

    fn log_path(&self, id: u64, step: u32) -> PathBuf {
        match step {
            0 => self.logs.join(format!("{id}.log")),
            n => self.logs.join(format!("{id}.{n}.log")),
        }
    }

    /// Record an accepted build, its submission and caller (JSON) and its steps; when.
    pub fn queued(
        &self,
        id: u64,
        drv: &StorePath,
        submission: &str,
        caller: &str,
        steps: &[StepInfo],
    ) -> Result<i64, RecordError> {
        let t = now();
        let mut db = self.db();
        let tx = db.transaction().map_err(self.err())?;
        tx.execute(
            "INSERT INTO builds (id, drv, state, submitted, submission, caller)
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5)",
            params![id as i64, drv.to_string(), t, submission, caller],
        )
        .map_err(self.err())?;
        for s in steps {
            tx.execute(
                "INSERT INTO steps (build, idx, drv, resolved, state) VALUES (?1, ?2, ?3, ?4, 'queued')",
                params![id as i64, s.index, s.drv.to_string(), s.resolved.as_ref().map(|r| r.to_string())],
            )
            .map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        Ok(t)
    }

    /// Record that a build's step started (and the build, with its first step); when.
    pub fn step_started(&self, id: u64, step: u32) -> Result<i64, RecordError> {
        let t = now();
        let db = self.db();
        db.execute(
            "UPDATE builds SET state = 'running', started = COALESCE(started, ?2) WHERE id = ?1",
            params![id as i64, t],
        )
        .map_err(self.err())?;
        db.execute(
            "UPDATE steps SET state = 'running', started = ?3 WHERE build = ?1 AND idx = ?2",
            params![id as i64, step, t],
        )
        .map_err(self.err())?;
        Ok(t)
    }

    /// Record the derivation a step was resolved to (Nix resolved it while the build ran).
    pub fn step_resolved(
        &self,
        id: u64,
        step: u32,
        resolved: &StorePath,
    ) -> Result<(), RecordError> {
        self.db()
            .execute(
                "UPDATE steps SET resolved = ?3 WHERE build = ?1 AND idx = ?2",
                params![id as i64, step, resolved.to_string()],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Record how a step ended: its log first (synced), then its row; when.
    pub fn step_finished(
        &self,
        id: u64,
        step: u32,
        state: &BuildState,
        detail: Option<&serde_json::Value>,
        log: &str,
    ) -> Result<i64, RecordError> {
        let path = self.log_path(id, step);
        build_trace::store::write_atomic(&path, log.as_bytes())
            .map_err(|e| RecordError::Log(path.clone(), e))?;
        let (name, status, error, outputs, evidence) = columns(state);
        let t = now();
        self.db()
            .execute(
                "UPDATE steps SET state = ?3, status = ?4, error = ?5, evidence = ?6,
                        finished = ?7, detail = ?8, outputs = ?9 WHERE build = ?1 AND idx = ?2",
                params![
                    id as i64,
                    step,
                    name,
                    status,
                    error,
                    evidence,
                    t,
                    detail.map(|d| d.to_string()),
                    outputs
                ],
            )
            .map_err(self.err())?;
        Ok(t)
    }

    /// Record how a build ended (its steps recorded first), then prune; when.
    pub fn finished(&self, id: u64, state: &BuildState) -> Result<i64, RecordError> {
        if !state.is_finished() {
            return Err(RecordError::Corrupt(id, "finished without an outcome".into()));
        }
        let (name, status, error, outputs, evidence) = columns(state);
        let t = now();
        let db = self.db();
        db.execute(
            "UPDATE builds SET state = ?2, status = ?3, error = ?4, outputs = ?5, evidence = ?6,
                    finished = ?7 WHERE id = ?1",
            params![id as i64, name, status, error, outputs, evidence, t],
        )
        .map_err(self.err())?;
        db.execute(
            "UPDATE steps SET state = ?2, status = ?3, error = ?4, finished = ?5
             WHERE build = ?1 AND state IN ('queued', 'running')",
            params![id as i64, name, status, error, t],
        )
        .map_err(self.err())?;
        self.prune(&db, MAX_RECORDS)?;
        Ok(t)
    }

    /// Record builds that ended without running (the service stopped first, a resumed
    /// submission no longer checks, a cancel), in one transaction and without logs; when.
    pub fn never_started(&self, ids: &[u64], state: &BuildState) -> Result<i64, RecordError> {
        let (name, status, error, _, _) = columns(state);
        let t = now();
        let mut db = self.db();
        let tx = db.transaction().map_err(self.err())?;
        for &id in ids {
            for table in ["builds", "steps"] {
                let key = if table == "builds" { "id" } else { "build" };
                tx.execute(
                    &format!(
                        "UPDATE {table} SET state = ?2, status = ?3, error = ?4, finished = ?5
                         WHERE {key} = ?1"
                    ),
                    params![id as i64, name, status, error, t],
                )
                .map_err(self.err())?;
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(t)
    }

    /// Drop the rows and logs of finished builds older than the newest `keep`.
    fn prune(&self, db: &Connection, keep: u64) -> Result<(), RecordError> {
        let old: Vec<(i64, u32)> = db
            .prepare(
                "SELECT b.id, (SELECT COUNT(*) FROM steps s WHERE s.build = b.id) FROM builds b
                 WHERE b.state IN ('succeeded', 'failed', 'cancelled') ORDER BY b.id DESC
                 LIMIT -1 OFFSET ?1",
            )
            .and_then(|mut s| s.query_map([keep as i64], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(self.err())?;
        for (id, steps) in old {
            for step in 0..steps.max(1) {
                let path = self.log_path(id as u64, step);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(RecordError::Log(path, e))
                    }
                    _ => {}
                }
            }
            db.execute("DELETE FROM steps WHERE build = ?1", [id]).map_err(self.err())?;
            db.execute("DELETE FROM builds WHERE id = ?1", [id]).map_err(self.err())?;
        }
        Ok(())
    }
}

#[path = "records_read.rs"]
mod read;

#[cfg(test)]
#[path = "records_tests.rs"]
mod tests;
