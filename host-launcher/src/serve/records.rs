//! The CI service's record of its builds, so that ids, outcomes and logs outlive the process:
//! `<state>/serve/builds.sqlite` (one row per build) and `<state>/serve/logs/<id>.log` (the log
//! of a finished build, written and synced before its row says it finished).
//!
//! - A build is recorded when it is accepted (`queued`), when it starts (`running`) and when it
//!   ends, with its outcome (Nix status and error, or the outputs JSON and attester kind).
//! - On open, builds still recorded as queued or running were cut off (a crash, or a stop that
//!   could not record them): they are marked failed ("the service stopped before this build
//!   finished"). Ids continue after
//!   the highest recorded one, so an id never names two builds.
//! - The newest [`MAX_RECORDS`] finished builds are kept; older rows and logs are pruned.
//! - One service per state directory: the record holds an exclusive lock on `serve/lock`, so a
//!   second `vouch serve` on the same state directory stops with an error instead of marking
//!   the first one's builds as cut off.
//!
//! What is not here: the queue and the builds themselves ([`super::builds`]).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix_formats::StorePath;
use rusqlite::{params, Connection, OptionalExtension};

use channel::messages::AttesterKind;

use crate::store::db::now;

/// Where a build is.
#[derive(Debug, Clone)]
pub enum BuildState {
    /// Waiting for a worker.
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
}

/// Most finished builds kept on disk (with their logs, each at most
/// [`super::builds::MAX_LOG_KEPT`] bytes).
pub const MAX_RECORDS: u64 = 2_000;

/// What the service says of a build cut off by a stop or a crash.
pub const CUT_OFF: &str = "the service stopped before this build finished";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS builds (
    id        INTEGER PRIMARY KEY,
    drv       TEXT NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    status    TEXT,
    error     TEXT,
    outputs   TEXT,
    evidence  TEXT,
    submitted INTEGER NOT NULL,
    finished  INTEGER
);";

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

/// A finished build read back from the record.
#[derive(Debug)]
pub struct Recorded {
    /// The derivation.
    pub drv: StorePath,
    /// Its outcome (or `Queued`/`Running` while it is not finished).
    pub state: BuildState,
    /// Its log (empty until it finished).
    pub log: String,
}

/// The record (thread-safe).
#[derive(Debug)]
pub struct Records {
    _lock: nix::fcntl::Flock<std::fs::File>,
    db: Mutex<Connection>,
    db_path: PathBuf,
    logs: PathBuf,
    next: u64,
}

impl Records {
    /// Open (or create) the record in `dir`, marking cut-off builds failed.
    pub fn open(dir: &Path) -> Result<Records, RecordError> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| RecordError::Log(logs.clone(), e))?;
        let lock_path = dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| RecordError::Lock(lock_path.clone(), e))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| match errno {
                nix::errno::Errno::EWOULDBLOCK => RecordError::InUse(lock_path.clone()),
                e => RecordError::Lock(lock_path.clone(), e.into()),
            })?;
        let db_path = dir.join("builds.sqlite");
        let err = |e| RecordError::Db(db_path.clone(), e);
        let db = crate::store::db::open_with(&db_path, SCHEMA).map_err(err)?;
        let cut = db
            .execute(
                "UPDATE builds SET state = 'failed', status = 'MiscFailure', error = ?1,
                        finished = ?2 WHERE state IN ('queued', 'running')",
                params![CUT_OFF, now()],
            )
            .map_err(err)?;
        if cut > 0 {
            tracing::warn!(builds = cut, "builds cut off by the last stop are recorded as failed");
        }
        let max: Option<i64> =
            db.query_row("SELECT MAX(id) FROM builds", [], |r| r.get(0)).map_err(err)?;
        let next = max.map_or(1, |m| m as u64 + 1);
        Ok(Records { _lock: lock, db: Mutex::new(db), db_path, logs, next })
    }

    /// The first id not yet recorded.
    pub fn next_id(&self) -> u64 {
        self.next
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> RecordError + '_ {
        |e| RecordError::Db(self.db_path.clone(), e)
    }

    fn log_path(&self, id: u64) -> PathBuf {
        self.logs.join(format!("{id}.log"))
    }

    /// Record an accepted build.
    pub fn queued(&self, id: u64, drv: &StorePath) -> Result<(), RecordError> {
        self.db()
            .execute(
                "INSERT INTO builds (id, drv, state, submitted) VALUES (?1, ?2, 'queued', ?3)",
                params![id as i64, drv.to_string(), now()],
            )
            .map(drop)
            .map_err(self.err())
    }

    /// Record that a build started.
    pub fn running(&self, id: u64) -> Result<(), RecordError> {
        self.db()
            .execute("UPDATE builds SET state = 'running' WHERE id = ?1", [id as i64])
            .map(drop)
            .map_err(self.err())
    }

    /// Record how a build ended: its log first (synced), then its row; then prune.
    pub fn finished(&self, id: u64, state: &BuildState, log: &str) -> Result<(), RecordError> {
        let path = self.log_path(id);
        build_trace::store::write_atomic(&path, log.as_bytes())
            .map_err(|e| RecordError::Log(path.clone(), e))?;
        let (name, status, error, outputs, evidence) = match state {
            BuildState::Succeeded { outputs, attester } => {
                ("succeeded", None, None, Some(outputs.to_string()), Some(attester.to_string()))
            }
            BuildState::Failed { status, error } => {
                ("failed", Some(status.as_str()), Some(error.as_str()), None, None)
            }
            BuildState::Queued | BuildState::Running => {
                return Err(RecordError::Corrupt(id, "finished without an outcome".into()))
            }
        };
        let db = self.db();
        db.execute(
            "UPDATE builds SET state = ?2, status = ?3, error = ?4, outputs = ?5, evidence = ?6,
                    finished = ?7 WHERE id = ?1",
            params![id as i64, name, status, error, outputs, evidence, now()],
        )
        .map_err(self.err())?;
        self.prune(&db, MAX_RECORDS)
    }

    /// Record builds that failed without running (the service stopped first), in one
    /// transaction and without logs.
    pub fn never_started(&self, ids: &[u64], state: &BuildState) -> Result<(), RecordError> {
        let BuildState::Failed { status, error } = state else {
            return Err(RecordError::Corrupt(
                ids.first().copied().unwrap_or(0),
                "not a failure".into(),
            ));
        };
        let mut db = self.db();
        let tx = db.transaction().map_err(self.err())?;
        for &id in ids {
            tx.execute(
                "UPDATE builds SET state = 'failed', status = ?2, error = ?3, finished = ?4
                 WHERE id = ?1",
                params![id as i64, status, error, now()],
            )
            .map_err(self.err())?;
        }
        tx.commit().map_err(self.err())
    }

    /// Drop the rows and logs of finished builds older than the newest `keep`.
    fn prune(&self, db: &Connection, keep: u64) -> Result<(), RecordError> {
        let old: Vec<i64> = db
            .prepare(
                "SELECT id FROM builds WHERE state IN ('succeeded', 'failed') ORDER BY id DESC
                 LIMIT -1 OFFSET ?1",
            )
            .and_then(|mut s| s.query_map([keep as i64], |r| r.get(0))?.collect())
            .map_err(self.err())?;
        for id in old {
            let path = self.log_path(id as u64);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(RecordError::Log(path, e))
                }
                _ => {}
            }
            db.execute("DELETE FROM builds WHERE id = ?1", [id]).map_err(self.err())?;
        }
        Ok(())
    }

    /// A build as recorded, if it is.
    pub fn load(&self, id: u64) -> Result<Option<Recorded>, RecordError> {
        type Row = (String, String, Option<String>, Option<String>, Option<String>, Option<String>);
        let row: Option<Row> = self
            .db()
            .query_row(
                "SELECT drv, state, status, error, outputs, evidence FROM builds WHERE id = ?1",
                [id as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()
            .map_err(self.err())?;
        let Some((drv, state, status, error, outputs, evidence)) = row else {
            return Ok(None);
        };
        let corrupt = |what: String| RecordError::Corrupt(id, what);
        let drv = StorePath::parse(&drv).map_err(|e| corrupt(format!("drv {drv:?}: {e}")))?;
        let state = match state.as_str() {
            "queued" => BuildState::Queued,
            "running" => BuildState::Running,
            "succeeded" => BuildState::Succeeded {
                outputs: serde_json::from_str(outputs.as_deref().unwrap_or_default())
                    .map_err(|e| corrupt(format!("outputs: {e}")))?,
                // Anything but the hardware label reads as simulated: never upgrade a claim.
                attester: if evidence.as_deref() == Some("sev-snp") {
                    AttesterKind::SevSnp
                } else {
                    AttesterKind::Simulated
                },
            },
            _ => BuildState::Failed {
                status: status.unwrap_or_else(|| "MiscFailure".into()),
                error: error.unwrap_or_default(),
            },
        };
        let path = self.log_path(id);
        let log = match std::fs::read(&path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(RecordError::Log(path, e)),
        };
        Ok(Some(Recorded { drv, state, log }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv(n: u8) -> StorePath {
        StorePath::from_parts([n; 20], "x.drv").unwrap()
    }

    #[test]
    fn outcomes_and_logs_outlive_a_restart_and_cut_off_builds_fail() {
        let t = tempfile::tempdir().unwrap();
        let r = Records::open(t.path()).unwrap();
        assert_eq!(r.next_id(), 1);
        for id in 1..=4 {
            r.queued(id, &drv(id as u8)).unwrap();
        }
        let outputs = serde_json::json!({"out": {"path": "/nix/store/x"}});
        r.running(1).unwrap();
        r.finished(
            1,
            &BuildState::Succeeded { outputs: outputs.clone(), attester: AttesterKind::SevSnp },
            "a\n",
        )
        .unwrap();
        let failed = BuildState::Failed { status: "TimedOut".into(), error: "too slow".into() };
        r.finished(2, &failed, "b\n").unwrap();
        r.running(3).unwrap();
        drop(r);

        let r = Records::open(t.path()).unwrap();
        assert_eq!(r.next_id(), 5, "ids are never reused");
        let one = r.load(1).unwrap().unwrap();
        assert_eq!((one.drv, one.log.as_str()), (drv(1), "a\n"));
        assert!(
            matches!(one.state, BuildState::Succeeded { outputs: o, attester: AttesterKind::SevSnp } if o == outputs)
        );
        let two = r.load(2).unwrap().unwrap();
        assert!(
            matches!(two.state, BuildState::Failed { status, error } if status == "TimedOut" && error == "too slow")
        );
        for id in [3, 4] {
            let BuildState::Failed { error, .. } = r.load(id).unwrap().unwrap().state else {
                panic!("build {id} was cut off")
            };
            assert_eq!(error, CUT_OFF);
        }
        assert!(r.load(5).unwrap().is_none());
        assert!(r.finished(4, &BuildState::Running, "").is_err(), "an outcome is required");
    }

    #[test]
    fn one_service_per_state_directory() {
        let t = tempfile::tempdir().unwrap();
        let first = Records::open(t.path()).unwrap();
        first.queued(1, &drv(1)).unwrap();
        let e = Records::open(t.path()).unwrap_err();
        assert!(matches!(e, RecordError::InUse(_)), "{e}");
        assert!(matches!(first.load(1).unwrap().unwrap().state, BuildState::Queued), "untouched");
        drop(first);
        Records::open(t.path()).unwrap();
    }

    #[test]
    fn only_the_newest_finished_builds_are_kept() {
        let t = tempfile::tempdir().unwrap();
        let r = Records::open(t.path()).unwrap();
        let failed = BuildState::Failed { status: "MiscFailure".into(), error: "no".into() };
        for id in 1..=5 {
            r.queued(id, &drv(id as u8)).unwrap();
            r.finished(id, &failed, "log\n").unwrap();
        }
        r.queued(6, &drv(6)).unwrap();
        r.prune(&r.db(), 2).unwrap();
        for id in 1..=3 {
            assert!(r.load(id).unwrap().is_none(), "build {id} pruned");
            assert!(!r.log_path(id).exists(), "log {id} pruned");
        }
        assert!(r.load(4).unwrap().is_some() && r.load(5).unwrap().is_some());
        assert!(r.load(6).unwrap().is_some(), "an unfinished build is never pruned");
    }

    #[test]
    fn an_edited_row_is_reported_not_trusted() {
        let t = tempfile::tempdir().unwrap();
        let r = Records::open(t.path()).unwrap();
        r.queued(1, &drv(1)).unwrap();
        let ok = BuildState::Succeeded {
            outputs: serde_json::json!({}),
            attester: AttesterKind::Simulated,
        };
        r.finished(1, &ok, "").unwrap();
        r.db().execute("UPDATE builds SET evidence = 'SEV-SNP!' WHERE id = 1", []).unwrap();
        let loaded = r.load(1).unwrap().unwrap();
        assert!(matches!(
            loaded.state,
            BuildState::Succeeded { attester: AttesterKind::Simulated, .. }
        ));
        r.db().execute("UPDATE builds SET outputs = 'not json' WHERE id = 1", []).unwrap();
        let e = r.load(1).unwrap_err();
        assert!(e.to_string().contains("build 1"), "{e}");
    }
}
