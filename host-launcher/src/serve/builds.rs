//! The build queue of the CI service: accepted builds wait in a FIFO queue; `--jobs N` worker
//! threads each take one, open their own builder core (their own pins in the content store)
//! and run it as the Nix front-ends do: `Action::BuildDerivation` on
//! [`crate::nixbuilder::BuilderCore`], which builds in a fresh VM, checks the statement and
//! evidence, and publishes the step into the trace store before anything is answered.
//!
//! Every build is also written to the service's record ([`super::records`]): ids, outcomes and
//! logs survive a restart, and older finished builds are read back from it. Logs are kept up to
//! [`MAX_LOG_KEPT`] bytes per build; at most [`MAX_QUEUED`] builds wait (more are refused with
//! 503), and the newest [`MAX_FINISHED_KEPT`] finished builds stay in memory, so memory stays
//! bounded.
//!
//! What is not here: checking a submission before it is queued ([`super::Service`]), the build
//! itself (`crate::nixbuilder::step`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use nix_formats::StorePath;

use super::records::Records;
use crate::nixbuilder::{BuilderConfig, BuilderCore};
use crate::nixproto::{Action, BuildRequest, BuildResult, Handler, LogSink, Reply};
use crate::store::{ContentStore, StoreConfig};

/// Most log bytes kept per build (later lines are dropped, with a note).
pub const MAX_LOG_KEPT: usize = 8 << 20;
/// Most builds waiting for a worker.
pub const MAX_QUEUED: usize = 1024;
/// Most finished builds kept in memory (with their logs); older ones are read from the record.
pub const MAX_FINISHED_KEPT: usize = 256;

/// Where a build is.
#[derive(Debug, Clone)]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Building.
    Running,
    /// Built, checked and published.
    Succeeded {
        /// The outputs as JSON (path, NAR hash and size, signatures, realisation).
        outputs: serde_json::Value,
        /// `simulated` or `sev-snp` (see [`evidence_label`]).
        evidence: &'static str,
    },
    /// Failed: Nix's status name and the reason.
    Failed {
        /// `PermanentFailure`, `TimedOut` …
        status: String,
        /// Why.
        error: String,
    },
}

/// One accepted build.
#[derive(Debug)]
pub struct Job {
    /// Its id.
    pub id: u64,
    /// The derivation.
    pub drv: StorePath,
    request: Mutex<Option<BuildRequest>>,
    state: Mutex<JobState>,
    log: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Job {
    /// Its state now.
    pub fn state(&self) -> JobState {
        lock(&self.state).clone()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        lock(&self.log).clone()
    }

    fn set(&self, s: JobState) {
        *lock(&self.state) = s;
    }

    fn new(id: u64, drv: StorePath, request: Option<BuildRequest>, state: JobState) -> Job {
        Job {
            id,
            drv,
            request: Mutex::new(request),
            state: Mutex::new(state),
            log: Mutex::new(String::new()),
        }
    }
}

struct JobLog<'a>(&'a Job);

impl LogSink for JobLog<'_> {
    fn build_started(&mut self, drv_path: &StorePath) {
        self.line(&format!("vouch: building {drv_path}"));
    }
    fn line(&mut self, line: &str) {
        let mut log = lock(&self.0.log);
        if log.len() + line.len() < MAX_LOG_KEPT {
            log.push_str(line);
            log.push('\n');
        } else if !log.ends_with("[vouch: log truncated]\n") {
            log.push_str("[vouch: log truncated]\n");
        }
    }
    fn build_finished(&mut self) {}
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    jobs: BTreeMap<u64, Arc<Job>>,
    queue: VecDeque<Arc<Job>>,
    /// Finished builds, oldest first.
    finished: VecDeque<u64>,
    stopping: bool,
}

/// The queue and its workers.
#[derive(Debug)]
pub struct Builds {
    inner: Mutex<Inner>,
    wake: Condvar,
    builder: BuilderConfig,
    store_dir: std::path::PathBuf,
    store_cfg: StoreConfig,
    records: Records,
}

impl Builds {
    /// A queue whose builds run with `builder` over the content store in `store_dir`, recorded
    /// in `records` (ids continue after the highest recorded one).
    pub fn new(
        builder: BuilderConfig,
        store_dir: &std::path::Path,
        store_cfg: StoreConfig,
        records: Records,
    ) -> Self {
        Builds {
            inner: Mutex::new(Inner { next: records.next_id(), ..Inner::default() }),
            wake: Condvar::new(),
            builder,
            store_dir: store_dir.to_owned(),
            store_cfg,
            records,
        }
    }

    /// Record how a build ended; whether that worked. A failure is logged (the build's
    /// published outputs stand either way) and the caller keeps the build in memory, so its
    /// outcome is still answered while this process runs.
    fn record_finished(&self, job: &Job, state: &JobState) -> bool {
        match self.records.finished(job.id, state, &job.log()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(id = job.id, "{}", crate::nixproto::action::error_chain(&e));
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
        self.records.queued(id, &req.drv_path).map_err(|e| {
            format!("recording the build: {}", crate::nixproto::action::error_chain(&e))
        })?;
        inner.next += 1;
        let job = Arc::new(Job::new(id, req.drv_path.clone(), Some(req), JobState::Queued));
        inner.jobs.insert(id, job.clone());
        inner.queue.push_back(job);
        drop(inner);
        self.wake.notify_one();
        Ok(id)
    }

    /// A build by id: in memory, else as recorded.
    pub fn get(&self, id: u64) -> Result<Option<Arc<Job>>, super::records::RecordError> {
        if let Some(job) = lock(&self.inner).jobs.get(&id).cloned() {
            return Ok(Some(job));
        }
        Ok(self.records.load(id)?.map(|r| {
            let job = Job::new(id, r.drv, None, r.state);
            *lock(&job.log) = r.log;
            Arc::new(job)
        }))
    }

    /// Stop: queued builds fail without starting, workers end after their current build (the
    /// caller cancels those through the launcher's `Cancel`).
    pub fn stop(&self) {
        let waiting: Vec<Arc<Job>> = {
            let mut inner = lock(&self.inner);
            inner.stopping = true;
            inner.queue.drain(..).collect()
        };
        self.wake.notify_all();
        let state = JobState::Failed {
            status: "MiscFailure".into(),
            error: "the service stopped before this build started".into(),
        };
        for job in &waiting {
            job.set(state.clone());
        }
        // One transaction for all of them (no logs: they never ran), so stopping stays quick.
        let ids: Vec<u64> = waiting.iter().map(|j| j.id).collect();
        if let Err(e) = self.records.never_started(&ids, &state) {
            tracing::warn!("{}", crate::nixproto::action::error_chain(&e));
        }
    }

    fn work(&self) {
        loop {
            let job = {
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
            let Some(req) = lock(&job.request).take() else { continue };
            job.set(JobState::Running);
            if let Err(e) = self.records.running(job.id) {
                tracing::warn!(id = job.id, "{}", crate::nixproto::action::error_chain(&e));
            }
            tracing::info!(id = job.id, drv = %job.drv, "build started");
            let state = self.run(&job, req);
            if let JobState::Failed { error, .. } = &state {
                tracing::warn!(id = job.id, drv = %job.drv, "build failed: {error}");
            } else {
                tracing::info!(id = job.id, drv = %job.drv, "build succeeded");
            }
            let recorded = self.record_finished(&job, &state);
            job.set(state);
            let mut inner = lock(&self.inner);
            if recorded {
                inner.finished.push_back(job.id);
            }
            while inner.finished.len() > MAX_FINISHED_KEPT {
                if let Some(old) = inner.finished.pop_front() {
                    inner.jobs.remove(&old);
                }
            }
        }
    }

    fn run(&self, job: &Job, req: BuildRequest) -> JobState {
        let failed = |error: String| JobState::Failed { status: "MiscFailure".into(), error };
        let store = match ContentStore::open(&self.store_dir, self.store_cfg) {
            Ok(s) => s,
            Err(e) => {
                return failed(format!(
                    "opening the content store: {}",
                    crate::nixproto::action::error_chain(&e)
                ))
            }
        };
        let mut core = BuilderCore::new(self.builder.clone(), store);
        let reply = core.handle(Action::BuildDerivation(Box::new(req)), &mut JobLog(job));
        match reply {
            Ok(Reply::Built(res)) if res.status.is_success() => {
                let (outputs, evidence) = outputs_json(&core, &res);
                JobState::Succeeded { outputs, evidence }
            }
            Ok(Reply::Built(res)) => {
                JobState::Failed { status: format!("{:?}", res.status), error: res.error_msg }
            }
            Ok(other) => failed(format!("unexpected reply {other:?}")),
            Err(e) => failed(crate::nixproto::action::error_chain(&*e)),
        }
    }
}

/// The evidence label of a step from the names of the keys that signed its outputs' narinfos:
/// `simulated` if any says so — a key that signs simulated evidence must
/// ([`crate::build::publish::says_simulated`]), so simulated evidence is never labelled
/// `sev-snp` — else `sev-snp`.
pub fn evidence_label<'a>(key_names: impl IntoIterator<Item = &'a str>) -> &'static str {
    let mut any = false;
    for n in key_names {
        any = true;
        if crate::build::publish::says_simulated(n) {
            return "simulated";
        }
    }
    if any {
        "sev-snp"
    } else {
        "simulated"
    }
}

/// The outputs of a successful build: path, NAR hash and size (from the content store, where
/// the checked outputs were registered), the narinfo signatures, the signatures over the Nix
/// ≥ 2.35 fingerprint and the Nix ≤ 2.34 realisation; and the evidence label.
fn outputs_json(core: &BuilderCore, res: &BuildResult) -> (serde_json::Value, &'static str) {
    let mut outs = serde_json::Map::new();
    let mut keys = Vec::new();
    for (name, o) in &res.built_outputs {
        let info = core.store().path_info(&o.out_path).ok().flatten();
        let sigs: Vec<String> =
            info.as_ref().map(|i| i.sigs.iter().cloned().collect()).unwrap_or_default();
        keys.extend(sigs.iter().map(|s| s.split(':').next().unwrap_or_default().to_owned()));
        let realisation = o.legacy.as_ref().map(|l| {
            serde_json::from_str(&l.json).unwrap_or(serde_json::Value::String(l.json.clone()))
        });
        outs.insert(
            name.clone(),
            serde_json::json!({
                "path": o.out_path.to_string(),
                "nar_hash": info.as_ref().map(|i| i.info.nar_hash.to_string()),
                "nar_size": info.as_ref().map(|i| i.info.nar_size),
                "narinfo_signatures": sigs,
                "signatures": o.signatures,
                "realisation": realisation,
            }),
        );
    }
    let label = evidence_label(keys.iter().map(String::as_str));
    (serde_json::Value::Object(outs), label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nixproto::{BuildMode, ClientProfile, Protocol};

    fn request(n: usize) -> BuildRequest {
        let name = format!("b{n}");
        BuildRequest {
            drv_path: StorePath::from_parts([7; 20], &format!("{name}.drv")).unwrap(),
            drv: build_trace::BasicDerivation {
                name,
                outputs: Default::default(),
                input_srcs: Default::default(),
                system: "x86_64-linux".into(),
                builder: "/bin/sh".into(),
                args: vec![],
                env: Default::default(),
            },
            mode: BuildMode::Normal,
            options: None,
            client: ClientProfile::new(Protocol::Serve, 0x207, Default::default()),
        }
    }

    fn builds(dir: &std::path::Path) -> Builds {
        let launcher = crate::build::LauncherConfig::new(dir.join("image"), dir.join("state"));
        let builder = BuilderConfig {
            state_dir: dir.join("state"),
            cache_dir: dir.join("cache"),
            limits: Default::default(),
            launcher,
            key_naming: crate::build::publish::KeyNaming::host_default(),
        };
        let records = Records::open(&dir.join("state/serve")).unwrap();
        Builds::new(builder, &dir.join("store"), StoreConfig { max_bytes: 1 << 30 }, records)
    }

    fn state(b: &Builds, id: u64) -> JobState {
        b.get(id).unwrap().expect("a known build").state()
    }

    #[test]
    fn the_queue_is_bounded_and_a_stopped_queue_fails_what_waits() {
        let t = tempfile::tempdir().unwrap();
        let b = builds(t.path()); // no workers: everything waits
        let ids: Vec<u64> = (0..MAX_QUEUED).map(|n| b.submit(request(n)).unwrap()).collect();
        let e = b.submit(request(MAX_QUEUED)).unwrap_err();
        assert!(e.contains("queue is full"), "{e}");
        assert!(matches!(state(&b, ids[0]), JobState::Queued));
        b.stop();
        let JobState::Failed { error, .. } = state(&b, ids[0]) else { panic!() };
        assert!(error.contains("stopped before this build started"), "{error}");
        assert!(b.submit(request(0)).unwrap_err().contains("shutting down"));
        // A restarted service knows them (failed) and gives new builds new ids.
        drop(b);
        let b = builds(t.path());
        let JobState::Failed { error, .. } = state(&b, ids[0]) else { panic!() };
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
        while !matches!(state(&b, last), JobState::Failed { .. }) {
            assert!(t0.elapsed() < std::time::Duration::from_secs(60), "builds did not finish");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        b.stop();
        workers.into_iter().for_each(|w| w.join().unwrap());
        assert!(!lock(&b.inner).jobs.contains_key(&ids[0]), "the oldest left memory");
        assert!(lock(&b.inner).jobs.contains_key(&ids[3]));
        let old = b.get(ids[0]).unwrap().expect("recorded");
        let JobState::Failed { error, .. } = old.state() else { panic!() };
        assert!(error.contains("no outputs"), "the recorded outcome: {error}");
        assert!(b.get(last + 1).unwrap().is_none());
    }

    #[test]
    fn evidence_is_labelled_simulated_unless_every_key_says_otherwise() {
        use super::evidence_label as l;
        assert_eq!(l(["ci-simulated-1"]), "simulated");
        assert_eq!(l(["host-1", "ci-simulated-1"]), "simulated");
        assert_eq!(l(["host-1"]), "sev-snp");
        assert_eq!(l([]), "simulated", "unsigned: nothing vouches for hardware");
    }
}
