//! The build queue of the CI service: accepted [`Build`]s (the queue's unit, not to be confused
//! with a VM's job, `build_trace::Job`) wait in a FIFO queue; `--jobs N` worker threads each
//! take one, open their own content store (their own pins) and hand the core's request to the
//! engine, as every front-end does ([`crate::core::Engine::build`]: a fresh VM, the statement
//! and evidence checked, the step published before anything is answered). A build's state is
//! made from the engine's result: the outputs with the records the publish step signed, and
//! the attester kind of the checked evidence.
//!
//! Every build is also written to the service's record ([`super::records`]): ids, outcomes and
//! logs survive a restart, and older finished builds are read back from it. Logs are kept up to
//! [`MAX_LOG_KEPT`] bytes per build; at most [`MAX_QUEUED`] builds wait (more are refused with
//! 503), and the newest [`MAX_FINISHED_KEPT`] finished builds stay in memory, so memory stays
//! bounded.
//!
//! What is not here: checking a submission before it is queued ([`super::submission`]), the
//! build itself (`crate::core`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix_formats::StorePath;

use build_trace::error_chain;

use super::records::{BuildState, Records};
use crate::core::log::{BuildLog, LineSplitter, Progress};
use crate::core::{BuildRequest, BuildResult, Built, Engine, Inputs};
use crate::store::{ContentStore, StoreConfig};

/// Most log bytes kept per build (later lines are dropped, with a note).
pub const MAX_LOG_KEPT: usize = 8 << 20;
/// Most builds waiting for a worker.
pub const MAX_QUEUED: usize = 1024;
/// Most finished builds kept in memory (with their logs); older ones are read from the record.
pub const MAX_FINISHED_KEPT: usize = 256;

/// One accepted build.
#[derive(Debug)]
pub struct Build {
    /// Its id.
    pub id: u64,
    /// The derivation.
    pub drv: StorePath,
    request: Mutex<Option<BuildRequest>>,
    state: Mutex<BuildState>,
    log: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Build {
    /// Its state now.
    pub fn state(&self) -> BuildState {
        lock(&self.state).clone()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        lock(&self.log).clone()
    }

    fn set(&self, s: BuildState) {
        *lock(&self.state) = s;
    }

    fn new(id: u64, drv: StorePath, request: Option<BuildRequest>, state: BuildState) -> Build {
        Build {
            id,
            drv,
            request: Mutex::new(request),
            state: Mutex::new(state),
            log: Mutex::new(String::new()),
        }
    }
}

/// A build's log, kept line by line.
struct LogOf<'a> {
    build: &'a Build,
    lines: LineSplitter,
}

impl LogOf<'_> {
    fn line(&mut self, line: &str) {
        let mut log = lock(&self.build.log);
        if log.len() + line.len() < MAX_LOG_KEPT {
            log.push_str(line);
            log.push('\n');
        } else if !log.ends_with("[vouch: log truncated]\n") {
            log.push_str("[vouch: log truncated]\n");
        }
    }

    fn flush(&mut self) {
        if let Some(rest) = self.lines.flush() {
            self.line(&rest);
        }
    }
}

impl BuildLog for LogOf<'_> {
    fn started(&mut self, drv_path: &StorePath) {
        self.line(&format!("vouch: building {drv_path}"));
    }

    fn output(&mut self, data: &[u8]) {
        for line in self.lines.push(data) {
            self.line(&line);
        }
    }

    fn progress(&mut self, event: &Progress) {
        self.flush();
        self.line(&format!("vouch: {}", event.text()));
    }

    fn finished(&mut self) {
        self.flush();
    }
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    builds: BTreeMap<u64, Arc<Build>>,
    queue: VecDeque<Arc<Build>>,
    /// Finished builds, oldest first.
    finished: VecDeque<u64>,
    stopping: bool,
}

/// The queue and its workers.
#[derive(Debug)]
pub struct Builds {
    inner: Mutex<Inner>,
    wake: Condvar,
    engine: Engine,
    store_dir: std::path::PathBuf,
    store_cfg: StoreConfig,
    records: Records,
}

impl Builds {
    /// A queue whose builds `engine` runs over the content store in `store_dir`, recorded in
    /// `records` (ids continue after the highest recorded one).
    pub fn new(
        engine: Engine,
        store_dir: &std::path::Path,
        store_cfg: StoreConfig,
        records: Records,
    ) -> Self {
        Builds {
            inner: Mutex::new(Inner { next: records.next_id(), ..Inner::default() }),
            wake: Condvar::new(),
            engine,
            store_dir: store_dir.to_owned(),
            store_cfg,
            records,
        }
    }

    /// Record how a build ended; whether that worked. A failure is logged (the build's
    /// published outputs stand either way) and the caller keeps the build in memory, so its
    /// outcome is still answered while this process runs.
    fn record_finished(&self, build: &Build, state: &BuildState) -> bool {
        match self.records.finished(build.id, state, &build.log()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(id = build.id, "{}", error_chain(&e));
                false
            }
        }
    }

    /// Start `n` worker threads.
    pub fn start_workers(self: &Arc<Self>, n: usize) -> Vec<JoinHandle<()>> {
        (0..n.max(1))
            .map(|i| {
                let me = self.clone();
                std::thread::Builder::new()
                    .name(format!("build-worker-{i}"))
                    .spawn(move || me.work())
                    .expect("spawning a build worker")
            })
            .collect()
    }

    /// Queue a checked request; its id.
    pub fn submit(&self, req: BuildRequest) -> Result<u64, String> {
        let mut inner = lock(&self.inner);
        if inner.stopping {
            return Err("the service is shutting down".into());
        }
        if inner.queue.len() >= MAX_QUEUED {
            return Err(format!("the build queue is full ({MAX_QUEUED} builds waiting)"));
        }
        let id = inner.next;
        self.records
            .queued(id, &req.drv_path)
            .map_err(|e| format!("recording the build: {}", error_chain(&e)))?;
        inner.next += 1;
        let build = Arc::new(Build::new(id, req.drv_path.clone(), Some(req), BuildState::Queued));
        inner.builds.insert(id, build.clone());
        inner.queue.push_back(build);
        drop(inner);
        self.wake.notify_one();
        Ok(id)
    }

    /// A build by id: in memory, else as recorded.
    pub fn get(&self, id: u64) -> Result<Option<Arc<Build>>, super::records::RecordError> {
        if let Some(build) = lock(&self.inner).builds.get(&id).cloned() {
            return Ok(Some(build));
        }
        Ok(self.records.load(id)?.map(|r| {
            let build = Build::new(id, r.drv, None, r.state);
            *lock(&build.log) = r.log;
            Arc::new(build)
        }))
    }

    /// Stop: queued builds fail without starting, workers end after their current build (the
    /// caller cancels those through the launcher's `Cancel`).
    pub fn stop(&self) {
        let waiting: Vec<Arc<Build>> = {
            let mut inner = lock(&self.inner);
            inner.stopping = true;
            inner.queue.drain(..).collect()
        };
        self.wake.notify_all();
        let state = BuildState::Failed {
            status: "MiscFailure".into(),
            error: "the service stopped before this build started".into(),
        };
        for build in &waiting {
            build.set(state.clone());
        }
        // One transaction for all of them (no logs: they never ran), so stopping stays quick.
        let ids: Vec<u64> = waiting.iter().map(|j| j.id).collect();
        if let Err(e) = self.records.never_started(&ids, &state) {
            tracing::warn!("{}", error_chain(&e));
        }
    }

    fn work(&self) {
        loop {
            let build = {
                let mut inner = lock(&self.inner);
                loop {
                    if let Some(j) = inner.queue.pop_front() {
                        break j;
                    }
                    if inner.stopping {
                        return;
                    }
                    inner = self.wake.wait(inner).unwrap_or_else(|e| e.into_inner());
                }
            };
            let Some(req) = lock(&build.request).take() else { continue };
            build.set(BuildState::Running);
            if let Err(e) = self.records.running(build.id) {
                tracing::warn!(id = build.id, "{}", error_chain(&e));
            }
            tracing::info!(id = build.id, drv = %build.drv, "build started");
            let state = self.run(&build, req);
            if let BuildState::Failed { error, .. } = &state {
                tracing::warn!(id = build.id, drv = %build.drv, "build failed: {error}");
            } else {
                tracing::info!(id = build.id, drv = %build.drv, "build succeeded");
            }
            let recorded = self.record_finished(&build, &state);
            build.set(state);
            let mut inner = lock(&self.inner);
            if recorded {
                inner.finished.push_back(build.id);
            }
            while inner.finished.len() > MAX_FINISHED_KEPT {
                if let Some(old) = inner.finished.pop_front() {
                    inner.builds.remove(&old);
                }
            }
        }
    }

    fn run(&self, build: &Build, req: BuildRequest) -> BuildState {
        let store = match ContentStore::open(&self.store_dir, self.store_cfg) {
            Ok(s) => s,
            Err(e) => {
                return BuildState::Failed {
                    status: "MiscFailure".into(),
                    error: format!("opening the content store: {}", error_chain(&e)),
                }
            }
        };
        let mut log = LogOf { build, lines: LineSplitter::default() };
        state_of(&self.engine.build(req, Inputs::ContentStore(&store), &mut log))
    }
}

/// A finished build's state: made from the engine's result alone.
pub fn state_of(result: &BuildResult) -> BuildState {
    match result {
        BuildResult::Built(b) => {
            BuildState::Succeeded { outputs: outputs_json(b), attester: b.attester }
        }
        BuildResult::Failed(f) => {
            BuildState::Failed { status: f.status.name().into(), error: f.message.clone() }
        }
    }
}

/// The outputs of a built step as the build API shows them: path, NAR hash and size, the
/// narinfo signatures, the signatures over the Nix ≥ 2.35 fingerprint and the Nix ≤ 2.34
/// realisation — the records the publish step signed — and whether the output `diverged` from
/// the entry already published for it (then `published` says what the cache kept; the other
/// fields stay this build's own).
pub fn outputs_json(built: &Built) -> serde_json::Value {
    let outputs = built.published.outputs.iter().map(|(name, o)| {
        let realisation = o.legacy.as_ref().map(|l| {
            serde_json::from_str(&l.json).unwrap_or(serde_json::Value::String(l.json.clone()))
        });
        let mut v = serde_json::json!({
            "path": o.path.to_string(),
            "nar_hash": o.info.nar_hash.to_string(),
            "nar_size": o.info.nar_size,
            "narinfo_signatures": o.narinfo_sigs,
            "signatures": o.signatures,
            "realisation": realisation,
            "diverged": o.diverged.is_some(),
        });
        if let Some(d) = &o.diverged {
            v["published"] = serde_json::json!({
                "nar_hash": d.published_nar_hash.map(|h| h.to_string()),
                "path": d.published_path.as_ref().map(ToString::to_string),
            });
        }
        (name.clone(), v)
    });
    serde_json::Value::Object(outputs.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: usize) -> BuildRequest {
        let name = format!("b{n}");
        BuildRequest {
            drv_path: StorePath::from_parts([7; 20], &format!("{name}.drv")).unwrap(),
            drv: crate::core::request::test_derivation(&name),
            outputs: Default::default(),
            limits: Default::default(),
            ca_rule: crate::core::CaRuleChoice::Known(build_trace::CaRule::SelfRefZeroed),
            derivations: None,
            trusted: false,
        }
    }

    fn builds(dir: &std::path::Path) -> Builds {
        let engine = Engine {
            launcher: crate::build::LauncherConfig::new(dir.join("image"), dir.join("state")),
            limits: Default::default(),
            publish: crate::core::PublishConfig {
                state_dir: dir.join("state"),
                trace_store: dir.join("cache"),
                key_naming: crate::core::KeyNaming::host_default(),
            },
        };
        let records = Records::open(&dir.join("state/serve")).unwrap();
        Builds::new(engine, &dir.join("store"), StoreConfig { max_bytes: 1 << 30 }, records)
    }

    fn state(b: &Builds, id: u64) -> BuildState {
        b.get(id).unwrap().expect("a known build").state()
    }

    #[test]
    fn the_queue_is_bounded_and_a_stopped_queue_fails_what_waits() {
        let t = tempfile::tempdir().unwrap();
        let b = builds(t.path()); // no workers: everything waits
        let ids: Vec<u64> = (0..MAX_QUEUED).map(|n| b.submit(request(n)).unwrap()).collect();
        let e = b.submit(request(MAX_QUEUED)).unwrap_err();
        assert!(e.contains("queue is full"), "{e}");
        assert!(matches!(state(&b, ids[0]), BuildState::Queued));
        b.stop();
        let BuildState::Failed { error, .. } = state(&b, ids[0]) else { panic!() };
        assert!(error.contains("stopped before this build started"), "{error}");
        assert!(b.submit(request(0)).unwrap_err().contains("shutting down"));
        // A restarted service knows them (failed) and gives new builds new ids.
        drop(b);
        let b = builds(t.path());
        let BuildState::Failed { error, .. } = state(&b, ids[0]) else { panic!() };
        assert!(error.contains("stopped before this build started"), "{error}");
        assert_eq!(b.submit(request(0)).unwrap(), ids.last().unwrap() + 1);
    }

    #[test]
    fn older_finished_builds_are_read_back_from_the_record() {
        let t = tempfile::tempdir().unwrap();
        let b = Arc::new(builds(t.path()));
        let n = MAX_FINISHED_KEPT + 3;
        // No VM image: each build fails fast, and is finished.
        let ids: Vec<u64> = (0..n).map(|i| b.submit(request(i)).unwrap()).collect();
        let workers = b.start_workers(1);
        let last = *ids.last().unwrap();
        let t0 = std::time::Instant::now();
        while !matches!(state(&b, last), BuildState::Failed { .. }) {
            assert!(t0.elapsed() < std::time::Duration::from_secs(60), "builds did not finish");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        b.stop();
        workers.into_iter().for_each(|w| w.join().unwrap());
        assert!(!lock(&b.inner).builds.contains_key(&ids[0]), "the oldest left memory");
        assert!(lock(&b.inner).builds.contains_key(&ids[3]));
        let old = b.get(ids[0]).unwrap().expect("recorded");
        let BuildState::Failed { error, .. } = old.state() else { panic!() };
        assert!(error.contains("no outputs"), "the recorded outcome: {error}");
        assert!(b.get(last + 1).unwrap().is_none());
    }
}
