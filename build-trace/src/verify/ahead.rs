//! Verifying on several threads: a look-ahead planner feeds trace entries to worker threads,
//! which run each entry's context-free checks (statement parsing, output addresses, evidence,
//! JWS: most of the work), while the calling thread runs the ordered pass exactly as the
//! sequential verifier does, taking those results instead of recomputing them.
//!
//! # Algorithm
//!
//! 1. The **planner** (on the calling thread, in batches) walks the same post-order a window
//!    of derivations ahead of the ordered pass. It guesses each derivation's accepted output
//!    maps: fixed outputs by their declared paths, every other step by the output paths its
//!    trace entries claim ([`crate::statement::peek_output_paths`], nothing checked). From the
//!    guesses of its inputs it computes each input combination's step (resolution), looks the
//!    key up in the trace sources and queues every entry found as a **job**.
//! 2. **Workers** (`threads − 1` scoped threads) take queued jobs in order and run
//!    [`Checker::precheck`] on them.
//! 3. The **ordered pass** is the sequential algorithm of [`super`]. Where the planner computed
//!    the same step (same derivation, same input combination) it takes that result, and where
//!    the planner looked up the same key it takes those entries with their prechecks: done, or
//!    computed on the spot when still queued; while a worker is on one, the calling thread
//!    runs other queued jobs instead of waiting idle.
//!
//! Every substituted value is what the sequential verifier computes from the same input (the
//! step and the prechecks are pure functions of the derivation, the combination, the entry,
//! the policy and the time), so the outcome, including the first broken link, is identical. A
//! wrong guess costs only wasted work: the ordered pass then computes what it needs itself.
//! Memory stays bounded by the window: the ordered pass takes each result out of the queue,
//! and hands what a worker made back to the workers to free (the allocating thread frees).
//!
//! Not here: the checks themselves ([`super::step`]) or the trust decisions ([`super`]).

use std::collections::{BTreeMap, HashMap};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use nix_formats::derivation::DerivationKind;
use nix_formats::StorePath;

use super::step::{Checker, Prechecked};
use super::{combinations, ClosureVerifier, Combo, ComputedStep, DrvSet, VerifyError, Walk};
use crate::statement::peek_output_paths;
use crate::store::TraceEntry;
use crate::verify::outcome::BrokenLink;

/// Derivations the planner runs ahead of the ordered pass, per thread.
const WINDOW_PER_THREAD: usize = 64;
/// More threads than this are not started.
const MAX_THREADS: usize = 256;

/// A step computed for one input combination, or why it could not be.
type Computed = Result<ComputedStep, Box<BrokenLink>>;

/// A derivation's guessed output maps (output name → path).
type Guesses = Vec<BTreeMap<String, StorePath>>;

/// Verify the closure in `order` with `v.threads` threads (at most [`MAX_THREADS`]); the
/// same result as the sequential walk in [`ClosureVerifier::verify`].
pub(super) fn walk(
    v: &ClosureVerifier<'_>,
    drvs: &DrvSet,
    order: &[StorePath],
    checker: &Checker<'_>,
) -> Result<Result<Walk, Box<BrokenLink>>, VerifyError> {
    let queue = Queue::default();
    let threads = v.threads.min(MAX_THREADS);
    let window = WINDOW_PER_THREAD * threads;
    std::thread::scope(|scope| {
        // Stops the workers however this closure ends (the scope joins them before returning
        // or unwinding).
        let _stop = StopOnDrop(&queue);
        for _ in 1..threads {
            scope.spawn(|| queue.work(checker));
        }
        let mut planner = Planner {
            v,
            drvs,
            order,
            next: 0,
            guesses: HashMap::new(),
            steps: HashMap::new(),
            lookups: HashMap::new(),
            made_by_workers: Vec::new(),
        };
        let walked = (|| {
            let mut walk = Walk::default();
            for (i, udrv) in order.iter().enumerate() {
                if planner.next < i + window / 2 {
                    planner.plan_until(i + window, &queue);
                }
                let mut ahead = Ahead { planner: &mut planner, queue: &queue, checker };
                let broken = v.walk_step(&mut walk, drvs, udrv, checker, Some(&mut ahead))?;
                queue.discard(std::mem::take(&mut planner.made_by_workers));
                if let Some(broken) = broken {
                    return Ok(Err(broken));
                }
            }
            Ok(Ok(walk))
        })();
        walked
    })
}

/// What the ordered pass asks of the look-ahead.
#[derive(Debug)]
pub(super) struct Ahead<'p, 'a> {
    planner: &'p mut Planner<'a>,
    queue: &'p Queue,
    checker: &'p Checker<'a>,
}

/// Entries with their prechecks (`None`: the ordered pass runs the checks itself).
pub(super) type Entries = Vec<(Arc<TraceEntry>, Option<Arc<Prechecked>>)>;

impl Ahead<'_, '_> {
    /// The step the planner computed for `udrv` with `combo`, if it did (taken out).
    pub(super) fn computed(&mut self, udrv: &StorePath, combo: &Combo) -> Option<Computed> {
        let list = self.planner.steps.get_mut(udrv)?;
        let i = list.iter().position(|(c, _)| c == combo)?;
        let (_, step) = list.swap_remove(i);
        if list.is_empty() {
            self.planner.steps.remove(udrv);
        }
        Some(step)
    }

    /// The entries the planner found for `key`, prechecked (taken out: a second lookup of the
    /// same key goes to the trace sources again).
    pub(super) fn entries(&mut self, key: &StorePath) -> Option<Entries> {
        let (jobs, _) = self.planner.lookups.remove(key)?;
        Some(
            jobs.into_iter()
                .map(|job| {
                    let (entry, pre, by_worker) = self.queue.take(job, self.checker);
                    if by_worker {
                        self.planner.made_by_workers.push(pre.clone());
                    }
                    (entry, Some(pre))
                })
                .collect(),
        )
    }
}

/// The look-ahead planner's state.
#[derive(Debug)]
struct Planner<'a> {
    v: &'a ClosureVerifier<'a>,
    drvs: &'a DrvSet,
    order: &'a [StorePath],
    /// The next derivation (index in `order`) to plan.
    next: usize,
    guesses: HashMap<StorePath, Guesses>,
    /// Steps computed per derivation and input combination, until the ordered pass takes them.
    steps: HashMap<StorePath, Vec<(Combo, Computed)>>,
    /// Queued jobs per lookup key, with the output maps their entries claim, until the ordered
    /// pass takes them.
    lookups: HashMap<StorePath, (Vec<usize>, Guesses)>,
    /// Worker-made prechecks the ordered pass took during the current step.
    made_by_workers: Vec<Arc<Prechecked>>,
}

impl Planner<'_> {
    fn plan_until(&mut self, end: usize, queue: &Queue) {
        while self.next < end.min(self.order.len()) {
            let udrv = &self.order[self.next];
            self.next += 1;
            if let Some(g) = self.plan(udrv, queue) {
                self.guesses.insert(udrv.clone(), g);
            }
        }
    }

    /// Queue the entries of `udrv`'s steps and guess its output maps (`None`: no guess, and
    /// the derivations that need it are not planned either).
    fn plan(&mut self, udrv: &StorePath, queue: &Queue) -> Option<Guesses> {
        let drv = self.drvs.get(udrv)?;
        let name = udrv.drv_name().ok()?;
        let kind = drv.kind(name).ok()?;
        match kind {
            DerivationKind::Fixed => {
                let declared =
                    drv.outputs.iter().map(|(o, d)| Some((o.clone(), d.path()?.clone())));
                Some(vec![declared.collect::<Option<_>>()?])
            }
            DerivationKind::Impure => None,
            DerivationKind::InputAddressed
            | DerivationKind::Floating
            | DerivationKind::Deferred => {
                if drv.input_drvs.keys().any(|i| !self.guesses.contains_key(i)) {
                    return None;
                }
                let combos = combinations(drv, |input| self.guesses[input].clone()).ok()?;
                let mut guesses = Guesses::new();
                let mut steps = Vec::with_capacity(combos.len());
                for combo in combos {
                    let step = self.v.compute_step(drv, name, udrv, kind, &combo);
                    if let Ok(s) = &step {
                        for g in self.lookup(&s.key, queue) {
                            if !guesses.contains(&g) {
                                guesses.push(g);
                            }
                        }
                    }
                    steps.push((combo, step));
                }
                self.steps.insert(udrv.clone(), steps);
                Some(guesses)
            }
        }
    }

    /// Look `key` up in the trace sources, queue its entries and return the output maps they
    /// claim (those whose paths are all store paths); a key still queued is not queued twice. A
    /// failing source queues nothing: the ordered pass meets the failure itself.
    fn lookup(&mut self, key: &StorePath, queue: &Queue) -> Guesses {
        if let Some((_, guesses)) = self.lookups.get(key) {
            return guesses.clone();
        }
        let mut entries = Vec::new();
        for s in &self.v.sources {
            match s.entries(key) {
                Ok(found) => entries.extend(found),
                Err(_) => return Guesses::new(),
            }
        }
        let mut guesses = Guesses::new();
        let mut jobs = Vec::with_capacity(entries.len());
        for e in entries {
            if let Some(g) = peek_output_paths(&e.statement) {
                if !guesses.contains(&g) {
                    guesses.push(g);
                }
            }
            jobs.push(queue.push(e));
        }
        self.lookups.insert(key.clone(), (jobs, guesses.clone()));
        guesses
    }
}

/// One queued entry.
#[derive(Debug)]
enum Job {
    Queued(Arc<TraceEntry>),
    Running,
    /// With whether a worker (not the calling thread) ran it.
    Done(Arc<TraceEntry>, Arc<Prechecked>, bool),
    Taken,
}

#[derive(Debug, Default)]
struct QueueState {
    jobs: Vec<Job>,
    /// Every job before this one has left `Queued`.
    first_queued: usize,
    /// Worker-made prechecks the ordered pass is done with, for a worker to drop: memory is
    /// freed by the thread that allocated it (glibc frees into another thread's arena slowly).
    garbage: Vec<Arc<Prechecked>>,
    stop: bool,
}

/// The jobs, shared by the calling thread and the workers.
#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when a job is queued or done, and on stop.
    changed: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A worker that panicked has left the state consistent (jobs change under the lock).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, entry: TraceEntry) -> usize {
        let mut s = self.lock();
        s.jobs.push(Job::Queued(Arc::new(entry)));
        self.changed.notify_one();
        s.jobs.len() - 1
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }

    /// Claim the first queued job at or after `from`.
    fn claim(s: &mut QueueState, from: usize) -> Option<(usize, Arc<TraceEntry>)> {
        while s.first_queued < s.jobs.len() && !matches!(s.jobs[s.first_queued], Job::Queued(_)) {
            s.first_queued += 1;
        }
        let i = (from.max(s.first_queued)..s.jobs.len())
            .find(|&i| matches!(s.jobs[i], Job::Queued(_)))?;
        match std::mem::replace(&mut s.jobs[i], Job::Running) {
            Job::Queued(e) => Some((i, e)),
            _ => unreachable!("found queued"),
        }
    }

    /// Run a claimed job. If the checks panic, the job is queued again and the panic returned
    /// (a worker then stops; the calling thread resumes it).
    fn run(
        &self,
        job: usize,
        entry: Arc<TraceEntry>,
        checker: &Checker<'_>,
        by_worker: bool,
    ) -> Result<(), Box<dyn std::any::Any + Send>> {
        let pre = panic::catch_unwind(AssertUnwindSafe(|| checker.precheck(&entry)));
        let (slot, result) = match pre {
            Ok(pre) => (Job::Done(entry, Arc::new(pre), by_worker), Ok(())),
            Err(panicked) => (Job::Queued(entry), Err(panicked)),
        };
        self.lock().jobs[job] = slot;
        self.changed.notify_all();
        result
    }

    /// A worker: run queued jobs until stopped.
    fn work(&self, checker: &Checker<'_>) {
        loop {
            let mut s = self.lock();
            let claimed = loop {
                if s.stop {
                    return;
                }
                match Queue::claim(&mut s, 0) {
                    Some(c) => break c,
                    None => s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                }
            };
            let garbage = std::mem::take(&mut s.garbage);
            drop(s);
            drop(garbage);
            if self.run(claimed.0, claimed.1, checker, true).is_err() {
                return;
            }
        }
    }

    /// Hand worker-made prechecks back for a worker to drop.
    fn discard(&self, done: Vec<Arc<Prechecked>>) {
        if !done.is_empty() {
            self.lock().garbage.extend(done);
        }
    }

    /// Job `job`'s entry and prechecks, taken out of the queue, and whether a worker made them:
    /// run here if still queued; while a worker runs it, run later queued jobs instead of
    /// waiting.
    fn take(&self, job: usize, checker: &Checker<'_>) -> (Arc<TraceEntry>, Arc<Prechecked>, bool) {
        let mut s = self.lock();
        loop {
            match std::mem::replace(&mut s.jobs[job], Job::Taken) {
                Job::Done(e, pre, by_worker) => return (e, pre, by_worker),
                Job::Queued(e) => {
                    drop(s);
                    let pre = Arc::new(checker.precheck(&e));
                    return (e, pre, false);
                }
                Job::Running => {
                    s.jobs[job] = Job::Running;
                    match Queue::claim(&mut s, job + 1) {
                        Some((other, e)) => {
                            drop(s);
                            if let Err(panicked) = self.run(other, e, checker, false) {
                                panic::resume_unwind(panicked);
                            }
                            s = self.lock();
                        }
                        None => s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner()),
                    }
                }
                Job::Taken => unreachable!("each job is taken once: its key's lookup is removed"),
            }
        }
    }
}

/// Stops the queue's workers when dropped.
#[derive(Debug)]
struct StopOnDrop<'q>(&'q Queue);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}
