//! A closure build's run (the algorithm is in `super::super::closure`): Nix's events change the
//! steps' states and logs as they come; after Nix ends, each step is settled: failed (Nix said
//! so), failed waiting for an input step that failed, or succeeded with the trace this
//! service's cache holds for it (built by its own builder, verified from another builder, or
//! reused).

use std::collections::BTreeMap;
use std::path::Path;

use build_trace::Statement;

use super::super::closure::events::{Change, Tracker};
use super::super::closure::nix::Realised;
use super::super::closure::traces::{location_text, published_statement, Importer};
use super::*;
use crate::core::ownership::accepted_outputs;

/// What a build runs: one step, or a whole closure through Nix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// One derivation without input derivations, built here.
    Step(Box<BuildRequest>),
    /// A derivation and its input derivations, scheduled by Nix.
    Closure(ClosureJob),
}

impl Job {
    /// The build and its steps, queued at `submitted`.
    pub(super) fn view(&self, id: u64, submitted: i64) -> View {
        match self {
            Job::Step(req) => Builds::one_step(id, req, submitted),
            Job::Closure(c) => View {
                info: BuildInfo {
                    id,
                    drv: c.derivations.drv_path().clone(),
                    state: BuildState::Queued,
                    submitted,
                    started: None,
                    finished: None,
                },
                steps: c
                    .order
                    .iter()
                    .enumerate()
                    .map(|(i, drv)| StepInfo {
                        index: i as u32,
                        drv: drv.clone(),
                        resolved: None,
                        state: BuildState::Queued,
                        started: None,
                        finished: None,
                        detail: None,
                    })
                    .collect(),
            },
        }
    }
}

/// One closure build while it runs.
struct Run<'a> {
    builds: &'a Builds,
    build: &'a Arc<Build>,
    job: &'a ClosureJob,
    closures: &'a Closures,
    /// Its Nix and private store.
    driver: &'a super::super::closure::nix::NixDriver,
    /// Derivation (as submitted, or resolved) → step index.
    index: BTreeMap<String, usize>,
    /// Step index → the indices of its input derivations' steps.
    inputs: Vec<Vec<usize>>,
}

impl Builds {
    /// Run closure `job` of `build` through Nix, then settle and record every step.
    pub(super) fn run_closure(&self, build: &Arc<Build>, job: ClosureJob) {
        let id = build.id;
        let Some(closures) = self.closures.clone() else {
            let error = "this service has no Nix driver for closures".to_owned();
            let state = BuildState::Failed { status: "MiscFailure".into(), error };
            let t = self.records.never_started(&[id], &state).unwrap_or_else(|_| now());
            return self.finish(build, state, t);
        };
        let index: BTreeMap<String, usize> =
            job.order.iter().enumerate().map(|(i, d)| (d.to_string(), i)).collect();
        let graph: BTreeMap<&StorePath, Vec<usize>> = job
            .derivations
            .derivations()
            .map(|(p, d)| {
                (
                    p,
                    d.input_drvs
                        .keys()
                        .filter_map(|i| index.get(&i.to_string()).copied())
                        .collect(),
                )
            })
            .collect();
        let inputs = job.order.iter().map(|p| graph.get(p).cloned().unwrap_or_default()).collect();
        let held = closures.enter(build.client);
        let mut run = Run {
            builds: self,
            build,
            job: &job,
            closures: &closures,
            driver: &held.driver,
            index,
            inputs,
        };
        build.update(|v| {
            v.info.state = BuildState::Running;
            v.info.started = Some(now());
        });
        tracing::info!(id, drv = %job.derivations.drv_path(), steps = job.order.len(), "closure build started (Nix schedules it)");
        let realised = run.drive();
        let state = run.settle(realised);
        let state = self.cancelled_as(build, state);
        drop(held);
        let t = self.records.finished(id, &state).unwrap_or_else(|e| {
            tracing::warn!(id, "{}", error_chain(&e));
            now()
        });
        match &state {
            BuildState::Failed { error, .. } => tracing::warn!(id, "closure build failed: {error}"),
            other => tracing::info!(id, state = other.name(), "closure build finished"),
        }
        self.finish(build, state, t);
    }

    /// A failed state of a cancelled build: cancelled, or failed because the service stopped.
    fn cancelled_as(&self, build: &Build, state: BuildState) -> BuildState {
        if !build.cancel.is_cancelled() || !matches!(state, BuildState::Failed { .. }) {
            return state;
        }
        if lock(&self.inner).stopping {
            let error = STOPPED_WHILE_RUNNING.to_owned();
            BuildState::Failed { status: "MiscFailure".into(), error }
        } else {
            BuildState::Cancelled
        }
    }
}

impl Run<'_> {
    fn line(&self, step: usize, text: &str) {
        LogOf { build: self.build, step, lines: LineSplitter::default() }.line(text);
    }

    fn step_of(&self, drv: &str) -> Option<usize> {
        self.index.get(drv).copied()
    }

    /// Import the `.drv` closure and run Nix; the steps follow its events.
    fn drive(&mut self) -> Result<Realised, String> {
        let b = self.builds;
        let store = ContentStore::open(&b.store_dir, b.store_cfg)
            .map_err(|e| format!("opening the content store: {}", error_chain(&e)))?;
        let overlay = self.build.client.and_then(|i| b.trusted_uploads.get(i));
        let view = StoreView::new(&store, overlay.and_then(|s| s.overlay()));
        let root = self.job.derivations.drv_path().clone();
        let driver = self.driver;
        driver.import(view, &root).map_err(|e| error_chain(&e))?;
        let cancel = self.build.cancel.clone();
        driver
            .realise(
                &root,
                (self.job.timeout, self.job.max_silent_time),
                &cancel,
                &mut |tracker, change| self.on_change(tracker, change),
            )
            .map_err(|e| error_chain(&e))
    }

    fn on_change(&mut self, tracker: &Tracker, change: Change) {
        match change {
            Change::Started { drv, machine } => {
                let Some(i) = self.step_of(&drv) else { return };
                let id = self.build.id;
                let t = self.builds.records.step_started(id, i as u32).unwrap_or_else(|_| now());
                self.builds.metrics.vm_boots.inc();
                self.build.update(|v| {
                    v.steps[i].state = BuildState::Running;
                    v.steps[i].started = Some(t);
                    v.info.started.get_or_insert(t);
                });
                self.line(i, &format!("vouch: building {drv} on {machine}, where Nix sent it"));
            }
            Change::Line { drv, line } => {
                if let Some(i) = self.step_of(&drv) {
                    self.line(i, &line);
                }
            }
            Change::Resolved { drv, resolved } => {
                let Some(i) = self.step_of(&drv) else { return };
                self.index.insert(resolved.clone(), i);
                if let Ok(r) = StorePath::parse(&resolved) {
                    let _ = self.builds.records.step_resolved(self.build.id, i as u32, &r);
                    self.build.update(|v| v.steps[i].resolved = Some(r));
                }
                self.line(i, &format!("vouch: Nix resolved it to {resolved}"));
            }
            Change::Failed { drv } => {
                if let (Some(i), Some(msg)) = (self.step_of(&drv), tracker.failed.get(&drv)) {
                    self.line(i, &format!("vouch: {msg}"));
                }
            }
            Change::None => {}
        }
    }

    /// Settle every step after Nix ended (see the module docs); the root step's state.
    fn settle(&mut self, realised: Result<Realised, String>) -> BuildState {
        let (tracker, nix_failed) = match realised {
            Ok(r) => {
                let general = r.tracker.general_errors().join("; ");
                let why = match general.is_empty() {
                    true => "Nix could not build it".to_owned(),
                    false => format!("Nix could not build it: {general}"),
                };
                (r.tracker, (!r.success).then_some(why))
            }
            Err(e) => (Tracker::default(), Some(e)),
        };
        if let (Some(why), Some(root)) = (&nix_failed, self.job.order.len().checked_sub(1)) {
            self.line(root, &format!("vouch: {why}"));
        }
        let mut states: Vec<BuildState> = Vec::new();
        for (i, udrv) in self.job.order.iter().enumerate() {
            let (state, detail) =
                self.settle_step(i, udrv, &tracker, &states, nix_failed.as_deref());
            let state = self.builds.cancelled_as(self.build, state);
            let log = lock(&self.build.logs[i]).clone();
            let recorded = self.builds.records.step_finished(
                self.build.id,
                i as u32,
                &state,
                detail.as_ref(),
                &log,
            );
            let t = recorded.unwrap_or_else(|e| {
                tracing::warn!(id = self.build.id, "{}", error_chain(&e));
                now()
            });
            if let Some(started) = self.build.view().steps[i].started {
                self.builds.metrics.step_seconds.observe((t - started).max(0) as f64);
            }
            self.build.update(|v| {
                v.steps[i].state = state.clone();
                v.steps[i].finished = Some(t);
                v.steps[i].detail = detail.clone();
            });
            states.push(state);
        }
        states.pop().unwrap_or(BuildState::Failed {
            status: "MiscFailure".into(),
            error: "the closure has no steps".into(),
        })
    }

    fn settle_step(
        &self,
        i: usize,
        udrv: &StorePath,
        tracker: &Tracker,
        states: &[BuildState],
        nix_failed: Option<&str>,
    ) -> (BuildState, Option<serde_json::Value>) {
        let u = udrv.to_string();
        let resolved = tracker.resolved.get(&u);
        let built_as = resolved.unwrap_or(&u);
        let machine = tracker.machines.get(built_as).or_else(|| tracker.machines.get(&u));
        let failed =
            |status: &str, error: String| BuildState::Failed { status: status.into(), error };
        let detail = |trace: &str| Some(serde_json::json!({"machine": machine, "trace": trace}));
        let with_statement = |d: Option<serde_json::Value>, st: &Statement| {
            d.map(|mut d| {
                d["measurement"] = serde_json::to_value(st.measurement).unwrap_or_default();
                d["evidence_root"] = match trace_root(&d) {
                    Some(r) => r.into(),
                    None => serde_json::Value::Null,
                };
                d
            })
        };
        if let Some(msg) = tracker.failed.get(built_as).or_else(|| tracker.failed.get(&u)) {
            return (failed("PermanentFailure", msg.clone()), detail("none: the build failed"));
        }
        if let Some(&j) = self.inputs[i].iter().find(|&&j| {
            matches!(states.get(j), Some(BuildState::Failed { .. } | BuildState::Cancelled))
        }) {
            let mut error = format!("waited for step {j} ({}), which failed", self.job.order[j]);
            if machine.is_some() {
                // Nix built it anyway, from what that step's builder returned: its trace (if its
                // builder published one) speaks of those inputs only, which nothing here vouches for.
                error.push_str("; Nix built it from that step's unverified outputs anyway");
            }
            self.line(i, &format!("vouch: not built: {error}"));
            return (failed("DependencyFailed", error), None);
        }
        let key = self.key_of(udrv, resolved);
        let trace = match machine {
            Some(m) if *m != self.closures.local_machine => {
                if let Err(error) = self.import_trace(i, udrv, &key, m) {
                    return (failed("MiscFailure", error), detail("refused"));
                }
                format!("verified from {m}")
            }
            Some(_) => "built by the service's builder".to_owned(),
            None => "reused: already in the service's cache".to_owned(),
        };
        let cache = &self.builds.engine.publish.trace_store;
        match published_statement(cache, &key) {
            Some((st, attester)) => {
                if machine.is_none() {
                    self.line(i, &format!("vouch: reused: the service's cache has {key}"));
                }
                let outputs = statement_outputs(&st, cache);
                (BuildState::Succeeded { outputs, attester }, with_statement(detail(&trace), &st))
            }
            None => {
                let error = nix_failed.map_or_else(
                    || format!("Nix realised it, but the service's cache has no trace of {key}"),
                    |why| format!("not built: {why}"),
                );
                (failed("MiscFailure", error), None)
            }
        }
    }

    /// Verify step `i` (`udrv`, built as `key` on machine `m`) from `m`'s traces and publish
    /// it here; why not, as the step's error.
    fn import_trace(
        &self,
        i: usize,
        udrv: &StorePath,
        key: &StorePath,
        m: &str,
    ) -> Result<(), String> {
        let at = self.closures.traces.of(m).map(|l| format!(" at {}", location_text(l)));
        self.line(
            i,
            &format!(
                "vouch: fetching its trace from {m}{}, verifying it under the service's policy",
                at.unwrap_or_default()
            ),
        );
        let error = |e: String| {
            self.line(i, &format!("vouch: {e}"));
            e
        };
        let policy = self.closures.policy.as_ref().map_err(|why| {
            error(format!("built on {m}, but the service has no trust policy for other builders' traces: {why}"))
        })?;
        let importer = Importer {
            policy,
            publish: &self.builds.engine.publish,
            builders: &self.closures.traces,
            downloads: &self.closures.downloads,
        };
        importer.import(&self.job.derivations, udrv, key, m).map_err(|e| {
            error(format!("built on {m}, but its trace was not accepted: {}", error_chain(&e)))
        })?;
        self.line(i, "vouch: its trace verified and was published in the service's cache");
        Ok(())
    }

    /// The step's key in the trace store: the derivation Nix resolved it to, else what the
    /// graph gives with the outputs this service accepted (a reused step), else itself.
    fn key_of(&self, udrv: &StorePath, resolved: Option<&String>) -> StorePath {
        if let Some(r) = resolved.and_then(|r| StorePath::parse(r).ok()) {
            return r;
        }
        let cache = &self.builds.engine.publish.trace_store;
        let mut accepted = accepted_outputs(cache);
        self.job
            .derivations
            .rooted_at(udrv)
            .and_then(|d| d.step(&mut accepted).ok())
            .map_or_else(|| udrv.clone(), |s| s.drv_path)
    }
}

/// Which root checked a closure step's evidence, as its trace's origin says.
fn trace_root(d: &serde_json::Value) -> Option<&'static str> {
    let trace = d["trace"].as_str()?;
    Some(if trace.starts_with("verified from") {
        "the root the service's policy names for that builder"
    } else {
        "this service's launcher, when it was built here"
    })
}

/// A step's outputs as the API shows them, from its statement and the cache's narinfos.
fn statement_outputs(st: &Statement, cache: &Path) -> serde_json::Value {
    let outputs = st.outputs.iter().map(|(name, o)| {
        let narinfo = cache.join(format!("{}.narinfo", o.path.hash_part()));
        let sigs: Vec<String> = std::fs::read_to_string(narinfo)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("Sig: ").map(str::to_owned))
            .collect();
        let v = serde_json::json!({
            "path": o.path.to_string(),
            "nar_hash": o.nar_hash.to_string(),
            "nar_size": o.nar_size,
            "narinfo_signatures": sigs,
            "signatures": [],
            "realisation": null,
            "diverged": false,
        });
        (name.clone(), v)
    });
    serde_json::Value::Object(outputs.collect())
}
