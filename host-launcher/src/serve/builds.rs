//! The build queue of the CI service: accepted [`Build`]s (the queue's unit, not to be confused
//! with a VM's job, `build_trace::Job`) wait in a FIFO queue; `--jobs N` worker threads each
//! take one, open their own content store (their own pins) and hand the core's request to the
//! engine, as every front-end does ([`crate::core::Engine::build`]: a fresh VM, the statement
//! and evidence checked, the step published before anything is answered).
//!
//! A build has **steps** ([`StepInfo`]): each one derivation built in its own VM, with its own
//! state, log, evidence kind and times. A derivation without input derivations builds as one
//! step, here; a derivation with input derivations builds its whole closure, one step per
//! derivation in dependency order, scheduled by a real Nix on the service's builders
//! ([`super::closure`], run by `builds_closure.rs`).
//!
//! - A build's state is made from its steps' results: the outputs with the records the publish
//!   step signed, and the attester kind of the checked evidence.
//! - **Cancel** ([`Builds::cancel`]): a queued build leaves the queue; a running one has its
//!   VM killed through its own launcher switch (`crate::build::Cancel`, one per build); either
//!   way it ends `cancelled`. Stopping the service kills every running build's VM the same way
//!   (they fail, saying so) and leaves queued builds queued for the next start.
//! - **Logs** are kept per step, up to [`MAX_LOG_KEPT`] bytes; readers follow them by byte
//!   offset and are woken on every change ([`Build::subscribe`]), so a page can stream them.
//! - Every build is also written to the service's record ([`super::records`]): ids, outcomes,
//!   times and logs survive a restart, and older finished builds are read back from it. At most
//!   [`MAX_QUEUED`] builds wait (more are refused with 503), and the newest
//!   [`MAX_FINISHED_KEPT`] finished builds stay in memory, so memory stays bounded.
//!
//! What is not here: checking a submission before it is queued ([`super::submission`]), the
//! build itself (`crate::core`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use build_trace::error_chain;
use tokio::sync::watch;

use super::closure::{ClosureJob, Closures};
use super::metrics::Metrics;
use super::records::{BuildInfo, BuildState, RecordError, Records, StepInfo};
use crate::build::Cancel;
use crate::core::log::{BuildLog, LineSplitter, Progress};
use crate::core::{BuildRequest, BuildResult, Built, Engine, Inputs};
use crate::store::db::now;
use crate::store::{ContentStore, SessionStore, StoreConfig, StoreView};
use nix_formats::StorePath;

/// Most log bytes kept per step (later lines are dropped, with a note).
pub const MAX_LOG_KEPT: usize = 8 << 20;
/// Most builds waiting for a worker.
pub const MAX_QUEUED: usize = 1024;
/// Most finished builds kept in memory (with their logs); older ones are read from the record.
pub const MAX_FINISHED_KEPT: usize = 256;

/// What a build that the service's stop cut off says.
pub const STOPPED_WHILE_RUNNING: &str =
    "the service stopped while this build ran; its VM was killed";

/// A build and its steps, as the API shows them.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// The build.
    pub info: BuildInfo,
    /// Its steps, in the order they run.
    pub steps: Vec<StepInfo>,
}

/// One accepted build.
#[derive(Debug)]
pub struct Build {
    /// Its id.
    pub id: u64,
    view: Mutex<View>,
    logs: Vec<Mutex<String>>,
    request: Mutex<Option<Job>>,
    cancel: Cancel,
    changed: watch::Sender<u64>,
    /// The trusted client whose overlay it reads (`Builds::with_trusted_uploads`).
    client: Option<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Build {
    fn new(view: View, request: Option<Job>, logs: Vec<String>) -> Build {
        Build {
            id: view.info.id,
            logs: logs.into_iter().map(Mutex::new).collect(),
            view: Mutex::new(view),
            request: Mutex::new(request),
            cancel: Cancel::default(),
            changed: watch::Sender::new(0),
            client: None,
        }
    }

    /// The build and its steps now.
    pub fn view(&self) -> View {
        lock(&self.view).clone()
    }

    /// Its state now.
    pub fn state(&self) -> BuildState {
        lock(&self.view).info.state.clone()
    }

    /// Step `step`'s log from byte `offset` (clamped), and the log's length; `None` if there is
    /// no such step.
    pub fn log_from(&self, step: u32, offset: u64) -> Option<(Vec<u8>, u64)> {
        let log = lock(self.logs.get(step as usize)?);
        let len = log.len() as u64;
        let from = offset.min(len) as usize;
        Some((log.as_bytes()[from..].to_vec(), len))
    }

    /// All steps' logs, one after the other.
    pub fn log(&self) -> String {
        self.logs.iter().map(|l| lock(l).clone()).collect()
    }

    /// A receiver woken whenever a log or the state changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn update(&self, f: impl FnOnce(&mut View)) {
        f(&mut lock(&self.view));
        self.bump();
    }
}

/// A step's log, kept line by line.
struct LogOf<'a> {
    build: &'a Build,
    step: usize,
    lines: LineSplitter,
}

impl LogOf<'_> {
    fn line(&mut self, line: &str) {
        {
            let mut log = lock(&self.build.logs[self.step]);
            if log.len() + line.len() < MAX_LOG_KEPT {
                log.push_str(line);
                log.push('\n');
            } else if !log.ends_with("[vouch: log truncated]\n") {
                log.push_str("[vouch: log truncated]\n");
            }
        }
        self.build.bump();
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
    running: usize,
    stopping: bool,
}

/// Why a build could not be cancelled.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    /// No such build.
    #[error("no build with id {0}")]
    Unknown(u64),
    /// It already finished.
    #[error("build {0} already finished ({1})")]
    Finished(u64, &'static str),
    /// The record.
    #[error(transparent)]
    Record(#[from] RecordError),
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
    metrics: Arc<Metrics>,
    trusted_uploads: Vec<Arc<SessionStore>>,
    closures: Option<Arc<Closures>>,
}

impl Builds {
    /// A queue whose builds `engine` runs over the content store in `store_dir`, recorded in
    /// `records` (ids continue after the highest recorded one).
    pub fn new(
        engine: Engine,
        store_dir: &std::path::Path,
        store_cfg: StoreConfig,
        records: Records,
        metrics: Arc<Metrics>,
    ) -> Self {
        Builds {
            inner: Mutex::new(Inner { next: records.next_id(), ..Inner::default() }),
            wake: Condvar::new(),
            engine,
            store_dir: store_dir.to_owned(),
            store_cfg,
            records,
            metrics,
            trusted_uploads: Vec::new(),
            closures: None,
        }
    }

    /// This queue, building closures with `closures` (without: closure builds fail, saying so).
    pub fn with_closures(mut self, closures: Arc<Closures>) -> Self {
        self.closures = Some(closures);
        self
    }

    /// The closure machinery, if closures are built.
    pub fn closures(&self) -> Option<&Arc<Closures>> {
        self.closures.as_ref()
    }

    /// Stop the service's own builder (after the workers ended).
    pub fn stop_builder(&self) {
        if let Some(c) = &self.closures {
            c.stop();
        }
    }

    /// This queue, with each trusted client's private uploads (`super::Service`), by client:
    /// that client's builds read them, and register outputs built from them there too; nobody
    /// else's build sees them.
    pub fn with_trusted_uploads(mut self, uploads: Vec<Arc<SessionStore>>) -> Self {
        self.trusted_uploads = uploads;
        self
    }

    /// The record (for what only it knows: listings, counts, older builds).
    pub fn records(&self) -> &Records {
        &self.records
    }

    /// Builds waiting, and builds running.
    pub fn load(&self) -> (usize, usize) {
        let inner = lock(&self.inner);
        (inner.queue.len(), inner.running)
    }

    /// Whether [`Builds::stop`] was called: no build starts or is accepted any more.
    pub fn stopping(&self) -> bool {
        lock(&self.inner).stopping
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

    /// A one-step build of `req`: the build names the derivation it builds (the resolved one,
    /// as Nix names the deriver); its step, the derivation submitted, and the resolved one where
    /// they differ (so `nix log` finds the step under either name).
    fn one_step(id: u64, req: &BuildRequest, submitted: i64) -> View {
        let built = &req.drv_path;
        let asked = req.derivations.as_ref().map_or(built, |d| d.drv_path());
        View {
            info: BuildInfo {
                id,
                drv: built.clone(),
                state: BuildState::Queued,
                submitted,
                started: None,
                finished: None,
            },
            steps: vec![StepInfo {
                index: 0,
                drv: asked.clone(),
                resolved: (asked != built).then(|| built.clone()),
                state: BuildState::Queued,
                started: None,
                finished: None,
                detail: None,
            }],
        }
    }

    /// Queue a checked request, recorded with its submission and caller (JSON, for a
    /// restart), of trusted client `client` (its builds read its overlay) if any; its id.
    pub fn submit(
        &self,
        req: Job,
        submission: &str,
        caller: &str,
        client: Option<usize>,
    ) -> Result<u64, String> {
        let mut inner = lock(&self.inner);
        if inner.stopping {
            return Err("the service is shutting down".into());
        }
        if inner.queue.len() >= MAX_QUEUED {
            return Err(format!("the build queue is full ({MAX_QUEUED} builds waiting)"));
        }
        let id = inner.next;
        let view = req.view(id, 0);
        let t = self
            .records
            .queued(id, &view.info.drv, submission, caller, &view.steps)
            .map_err(|e| format!("recording the build: {}", error_chain(&e)))?;
        inner.next += 1;
        self.enqueue(&mut inner, id, req, t, client);
        drop(inner);
        self.wake.notify_one();
        Ok(id)
    }

    fn enqueue(&self, inner: &mut Inner, id: u64, req: Job, submitted: i64, client: Option<usize>) {
        let view = req.view(id, submitted);
        let logs = vec![String::new(); view.steps.len()];
        let mut build = Build::new(view, Some(req), logs);
        build.client = client;
        let build = Arc::new(build);
        inner.builds.insert(id, build.clone());
        inner.queue.push_back(build);
    }

    /// Queue again a build recorded as queued before a restart (its submission checked again).
    pub fn resume(&self, id: u64, req: Job, client: Option<usize>) -> Result<(), RecordError> {
        let submitted = self.records.load(id)?.map_or_else(now, |(b, _)| b.submitted);
        let mut inner = lock(&self.inner);
        self.enqueue(&mut inner, id, req, submitted, client);
        drop(inner);
        self.wake.notify_one();
        Ok(())
    }

    /// A build by id: in memory, else as recorded.
    pub fn get(&self, id: u64) -> Result<Option<Arc<Build>>, RecordError> {
        if let Some(build) = lock(&self.inner).builds.get(&id).cloned() {
            return Ok(Some(build));
        }
        let Some((info, steps)) = self.records.load(id)? else { return Ok(None) };
        let logs = steps.iter().map(|s| self.records.log(id, s.index)).collect::<Result<_, _>>()?;
        Ok(Some(Arc::new(Build::new(View { info, steps }, None, logs))))
    }

    /// Cancel build `id` (see the module docs); its state then.
    pub fn cancel(&self, id: u64) -> Result<BuildState, CancelError> {
        let build = self.get(id)?.ok_or(CancelError::Unknown(id))?;
        let mut inner = lock(&self.inner);
        let state = build.state();
        if state.is_finished() {
            return Err(CancelError::Finished(id, state.name()));
        }
        build.cancel.cancel();
        if let Some(pos) = inner.queue.iter().position(|b| b.id == id) {
            inner.queue.remove(pos);
            drop(inner);
            lock(&build.request).take();
            let t = self.records.never_started(&[id], &BuildState::Cancelled)?;
            self.finish(&build, BuildState::Cancelled, t);
            tracing::info!(id, "queued build cancelled");
            return Ok(BuildState::Cancelled);
        }
        tracing::info!(id, "running build cancelled: its VM is being killed");
        Ok(state)
    }

    fn finish(&self, build: &Arc<Build>, state: BuildState, t: i64) {
        build.update(|v| {
            v.info.state = state.clone();
            v.info.finished = Some(t);
            for s in &mut v.steps {
                if !s.state.is_finished() {
                    s.state = state.clone();
                    s.finished = Some(t);
                }
            }
        });
        let mut inner = lock(&self.inner);
        inner.finished.push_back(build.id);
        while inner.finished.len() > MAX_FINISHED_KEPT {
            if let Some(old) = inner.finished.pop_front() {
                inner.builds.remove(&old);
            }
        }
    }

    /// Stop: no build starts any more; queued builds stay queued in the record, to resume on
    /// the next start; running ones are cancelled (their VMs killed) and fail, saying so;
    /// workers end after their current build.
    pub fn stop(&self) {
        let mut inner = lock(&self.inner);
        inner.stopping = true;
        // Every build a worker holds: running, or taken from the queue and about to start.
        let queued: std::collections::HashSet<u64> = inner.queue.iter().map(|b| b.id).collect();
        for b in inner.builds.values() {
            if !queued.contains(&b.id) && !b.state().is_finished() {
                b.cancel.cancel();
            }
        }
        let waiting = inner.queue.len();
        drop(inner);
        self.wake.notify_all();
        if waiting > 0 {
            tracing::info!(builds = waiting, "queued builds stay queued for the next start");
        }
    }

    fn work(&self) {
        loop {
            let build = {
                let mut inner = lock(&self.inner);
                loop {
                    if inner.stopping {
                        return;
                    }
                    if let Some(j) = inner.queue.pop_front() {
                        inner.running += 1;
                        break j;
                    }
                    inner = self.wake.wait(inner).unwrap_or_else(|e| e.into_inner());
                }
            };
            match lock(&build.request).take() {
                Some(Job::Step(req)) => self.run_build(&build, *req),
                Some(Job::Closure(job)) => self.run_closure(&build, job),
                None => {}
            }
            lock(&self.inner).running -= 1;
        }
    }

    fn run_build(&self, build: &Arc<Build>, req: BuildRequest) {
        let id = build.id;
        let started = self.records.step_started(id, 0).unwrap_or_else(|e| {
            tracing::warn!(id, "{}", error_chain(&e));
            now()
        });
        build.update(|v| {
            v.info.state = BuildState::Running;
            v.info.started = Some(started);
            v.steps[0].state = BuildState::Running;
            v.steps[0].started = Some(started);
        });
        tracing::info!(id, drv = %req.drv_path, "build started");
        self.metrics.vm_boots.inc();
        let t0 = std::time::Instant::now();
        let (mut state, detail) = self.run(build, req);
        self.metrics.step_seconds.observe(t0.elapsed().as_secs_f64());
        if build.cancel.is_cancelled() && matches!(state, BuildState::Failed { .. }) {
            state = if lock(&self.inner).stopping {
                BuildState::Failed {
                    status: "MiscFailure".into(),
                    error: STOPPED_WHILE_RUNNING.into(),
                }
            } else {
                BuildState::Cancelled
            };
        }
        match &state {
            BuildState::Failed { error, .. } => tracing::warn!(id, "build failed: {error}"),
            other => tracing::info!(id, state = other.name(), "build finished"),
        }
        let log = build.logs[0].lock().unwrap_or_else(|e| e.into_inner()).clone();
        let recorded = self
            .records
            .step_finished(id, 0, &state, detail.as_ref(), &log)
            .and_then(|_| self.records.finished(id, &state));
        let t = recorded.unwrap_or_else(|e| {
            // The build's published outputs stand either way; it stays in memory.
            tracing::warn!(id, "{}", error_chain(&e));
            now()
        });
        build.update(|v| v.steps[0].detail = detail);
        self.finish(build, state, t);
    }

    fn run(&self, build: &Build, req: BuildRequest) -> (BuildState, Option<serde_json::Value>) {
        let store = match ContentStore::open(&self.store_dir, self.store_cfg) {
            Ok(s) => s,
            Err(e) => {
                let error = format!("opening the content store: {}", error_chain(&e));
                return (BuildState::Failed { status: "MiscFailure".into(), error }, None);
            }
        };
        let mut engine = self.engine.clone();
        engine.launcher.cancel = build.cancel.clone();
        let mut log = LogOf { build, step: 0, lines: LineSplitter::default() };
        let overlay = build.client.and_then(|i| self.trusted_uploads.get(i));
        let view = StoreView::new(&store, overlay.and_then(|s| s.overlay()));
        let result = engine.build(req, Inputs::ContentStore(view), &mut log);
        let detail = match &result {
            BuildResult::Built(b) => Some(serde_json::json!({
                "evidence_root": b.evidence_root,
                "measurement": b.measurement,
                "mode": format!("{:?}", b.mode),
            })),
            BuildResult::Failed(_) => None,
        };
        (state_of(&result), detail)
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

#[path = "builds_closure.rs"]
mod closure_run;
pub use closure_run::Job;

#[cfg(test)]
#[path = "builds_tests.rs"]
mod tests;
