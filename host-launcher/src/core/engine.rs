//! The engine: every front-end's build, from a checked [`BuildRequest`] to a [`BuildResult`].
//!
//! [`Engine::build`]:
//! 1. Refuse what cannot be built honestly before any VM: outputs of mixed kinds, no outputs,
//!    and output paths the request may not have signed ([`ownership::check`]: input-addressed
//!    paths that its derivation graph does not give, or that an untrusted caller sends without
//!    a graph).
//! 2. Where the inputs come from ([`Inputs`]): the content store (the long-running builders:
//!    the client uploaded the input closure first; it is pinned for the session), or the local
//!    Nix store (`vouch build`). A session's view may include its private overlay
//!    (`crate::store::session`): a build that reads any path of it, or whose view says its
//!    outputs are private, registers its outputs there, never in the shared store; one that
//!    reads any path of it is published without cache entries
//!    ([`super::publish::Publication::StepOnly`]).
//! 3. Limits: the engine's defaults, with the request's non-zero values in their place.
//! 4. [`crate::build::run_step`] builds in a fresh VM and returns only a checked outcome.
//!    Fixed-output derivations go to the networked variant, accepted only by their declared
//!    hash. A guessed CA rule is said in the build log of a floating CA step.
//! 5. [`super::publish::publish`], the one publish step: the trace store, the content store
//!    (when the inputs came from one), the signed records.
//!
//! Any failure is a [`BuildResult::Failed`] with Nix's status and a message naming the cause;
//! nothing of a failed step is registered or published.
//!
//! What is not here: front-ends (they parse into a [`BuildRequest`] and answer from the
//! [`BuildResult`]), the VM conversation and its checks (`crate::build`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read};
use std::time::{SystemTime, UNIX_EPOCH};

use build_trace::error_chain;
use build_trace::job::{step_kind, Limits, PathInfo, StepKind};
use channel::messages::FailureKind;
use nix_formats::StorePath;

use super::log::{BuildLog, Progress};
use super::ownership::{self, accepted_outputs};
use super::publish::{publish, Publication, PublishConfig};
use super::request::{with_overrides, BuildRequest, CaRuleChoice};
use super::result::{BuildResult, Built, FailureStatus};
use crate::build::nix_store::LocalNixStore;
use crate::build::{
    run_step, InputSource, InputSourceError, LauncherConfig, StepError, StepRequest,
};
use crate::store::StoreView;

/// How builds run and where they are published: one per server (cloned into its sessions) or
/// per `vouch build`.
#[derive(Debug, Clone)]
pub struct Engine {
    /// How VMs are launched.
    pub launcher: LauncherConfig,
    /// Limits where a request sets none ([`super::request::builder_limits`] for the
    /// long-running builders; `vouch build`'s flags, 0 = none).
    pub limits: Limits,
    /// Where steps are published and who signs them.
    pub publish: PublishConfig,
}

/// Where a build's input closure comes from.
#[derive(Debug, Clone, Copy)]
pub enum Inputs<'a> {
    /// vouch's content store as a session sees it (`vouch nix-builder`, `vouch serve`): the
    /// closure must be there (clients upload it first); it is pinned for the session that holds
    /// the store, and the outputs are registered there (privately, see the module docs).
    ContentStore(StoreView<'a>),
    /// The local Nix store (`vouch build`); the outputs go to the trace store only.
    NixStore,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn fail(status: FailureStatus, msg: impl Into<String>) -> BuildResult {
    let msg = msg.into();
    tracing::warn!(status = status.name(), "build failed: {msg}");
    BuildResult::failed(status, msg)
}

/// A failed step's status and message.
fn step_failure(e: &StepError) -> BuildResult {
    use FailureStatus as S;
    let status = match e {
        StepError::Guest { kind, .. } => match kind {
            FailureKind::BuilderFailed => S::PermanentFailure,
            FailureKind::Timeout | FailureKind::MaxSilent => S::TimedOut,
            FailureKind::LogLimit => S::LogLimitExceeded,
            FailureKind::InputHash | FailureKind::InputCa => S::InputRejected,
            FailureKind::Output => S::OutputRejected,
            _ => S::MiscFailure,
        },
        StepError::Watchdog(_) => S::TimedOut,
        StepError::Rejected(_) => S::OutputRejected,
        StepError::Cancelled => S::TransientFailure,
        _ => S::MiscFailure,
    };
    fail(status, format!("vouch: {}", error_chain(e)))
}

impl Engine {
    /// Build one request (see the module docs).
    pub fn build(
        &self,
        req: BuildRequest,
        inputs: Inputs<'_>,
        log: &mut dyn BuildLog,
    ) -> BuildResult {
        let start = now();
        let drv_path = req.drv_path.clone();
        let kind = match step_kind(&req.drv) {
            Ok(k) => k,
            Err(e) => {
                return fail(
                    FailureStatus::MiscFailure,
                    format!("vouch cannot build {drv_path}: {}", error_chain(&e)),
                )
            }
        };
        let mut accepted = accepted_outputs(&self.publish.trace_store);
        if let Err(refusal) = ownership::check(&req, kind, &mut accepted) {
            return fail(FailureStatus::MiscFailure, format!("vouch: {}", error_chain(&refusal)));
        }
        if let (CaRuleChoice::Guessed { note, .. }, StepKind::FloatingCa) = (&req.ca_rule, kind) {
            log.progress(&Progress::Note(note.clone()));
        }
        let (content_store, read_private) = match inputs {
            Inputs::ContentStore(store) => match pin_closure(store, &req) {
                Ok(private) => {
                    (Some(store.with_private_outputs(store.private_outputs() || private)), private)
                }
                Err(failure) => return failure,
            },
            Inputs::NixStore => (None, false),
        };
        // What one client's private inputs made is published to nobody else (`publish`).
        let publication = if read_private { Publication::StepOnly } else { Publication::Cache };
        let limits = with_overrides(self.limits, &req.limits);
        let ca_rule = req.ca_rule.rule();
        let trusted = req.trusted;
        tracing::info!(drv = %drv_path, ?kind, ?ca_rule, ?limits, trusted, "building in a fresh VM");
        let step = StepRequest {
            drv_path: drv_path.clone(),
            drv: req.drv,
            outputs: req.outputs,
            limits,
            ca_rule,
            network: kind == StepKind::FixedOutput,
            job_id: None,
        };
        log.started(&drv_path);
        let result = match content_store {
            Some(store) => {
                if store.private_outputs() {
                    tracing::info!(drv = %drv_path, "outputs stay in this session's overlay");
                }
                run_step(step, &StoreInputs(store), log, &self.launcher)
            }
            None => run_step(step, &LocalNixStore, log, &self.launcher),
        };
        log.finished();
        let outcome = match result {
            Ok(o) => o,
            Err(e) => return step_failure(&e),
        };
        match publish(&outcome, &self.publish, content_store, publication) {
            Ok(published) => BuildResult::Built(Box::new(Built {
                start_time: start,
                stop_time: now(),
                attester: outcome.attester(),
                evidence_root: outcome.verified.root.to_string(),
                measurement: outcome.verified.measurement.to_string(),
                mode: outcome.mode,
                timings: outcome.timings.clone(),
                published,
            })),
            Err(e) => fail(FailureStatus::MiscFailure, format!("vouch: {}", error_chain(&e))),
        }
    }
}

/// The request's input closure must be in the content store; pin it for the session. Whether
/// any of it is in the session's private overlay.
fn pin_closure(store: StoreView<'_>, req: &BuildRequest) -> Result<bool, BuildResult> {
    let drv_path = &req.drv_path;
    let closure = store.closure(&req.drv.input_srcs).map_err(|e| {
        fail(
            FailureStatus::MiscFailure,
            format!(
                "vouch cannot build {drv_path}: {} (the client uploads inputs before building)",
                error_chain(&e)
            ),
        )
    })?;
    store.pin(&closure.keys().cloned().collect()).map_err(|e| {
        fail(
            FailureStatus::MiscFailure,
            format!("pinning the inputs of {drv_path}: {}", error_chain(&e)),
        )
    })?;
    Ok(closure.keys().any(|p| store.is_private(p)))
}

/// The content store as the step's input source.
#[derive(Debug)]
struct StoreInputs<'a>(StoreView<'a>);

fn store_err(e: crate::store::StoreError) -> InputSourceError {
    InputSourceError("vouch's content store".into(), Some(Box::new(e)))
}

fn not_there(path: &StorePath) -> InputSourceError {
    InputSourceError(format!("{path} is not in vouch's content store"), None)
}

impl InputSource for StoreInputs<'_> {
    fn path_info(&self, path: &StorePath) -> Result<PathInfo, InputSourceError> {
        match self.0.path_info(path).map_err(store_err)? {
            Some(valid) => Ok(valid.info),
            None => Err(not_there(path)),
        }
    }

    fn nar(&self, path: &StorePath) -> Result<Box<dyn Read + Send + '_>, InputSourceError> {
        match self.0.open_nar(path).map_err(store_err)? {
            Some((_, f)) => Ok(Box::new(BufReader::with_capacity(1 << 16, f))),
            None => Err(not_there(path)),
        }
    }

    fn closure(
        &self,
        roots: &BTreeSet<StorePath>,
    ) -> Result<BTreeMap<StorePath, PathInfo>, InputSourceError> {
        Ok(self
            .0
            .closure(roots)
            .map_err(store_err)?
            .into_iter()
            .map(|(p, v)| (p, v.info))
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::keys::KeyNaming;
    use crate::core::request::{test_derivation, CaRuleChoice};
    use crate::store::StoreConfig;
    use build_trace::job::DrvOutput;

    /// What a build told its log, in order.
    #[derive(Default)]
    struct Recorded(Vec<String>);

    impl BuildLog for Recorded {
        fn started(&mut self, drv: &StorePath) {
            self.0.push(format!("started {drv}"));
        }
        fn output(&mut self, data: &[u8]) {
            self.0.push(String::from_utf8_lossy(data).into_owned());
        }
        fn progress(&mut self, event: &Progress) {
            self.0.push(event.text());
        }
        fn finished(&mut self) {
            self.0.push("finished".into());
        }
    }

    /// An engine whose state and trace store are under `dir`, without a guest image (every
    /// build fails at the VM, after the checks before it).
    pub(crate) fn engine(dir: &std::path::Path) -> Engine {
        Engine {
            launcher: LauncherConfig::new(dir.join("no-image"), dir.join("state")),
            limits: Limits::default(),
            publish: PublishConfig {
                state_dir: dir.join("state"),
                trace_store: dir.join("traces"),
                key_naming: KeyNaming::host_default(),
            },
        }
    }

    fn request(hash_algo: &str, inputs: &[&StorePath]) -> BuildRequest {
        let out = DrvOutput { path: None, hash_algo: hash_algo.into(), hash: String::new() };
        let mut drv = test_derivation("x");
        drv.outputs.insert("out".into(), out);
        drv.input_srcs = inputs.iter().map(|p| (*p).clone()).collect();
        BuildRequest {
            drv_path: StorePath::from_parts([7; 20], "x.drv").unwrap(),
            drv,
            outputs: Default::default(),
            limits: Limits::default(),
            ca_rule: CaRuleChoice::guessed("nothing says", "say it"),
            derivations: None,
            trusted: false,
        }
    }

    fn failure(r: BuildResult) -> super::super::Failure {
        match r {
            BuildResult::Failed(f) => f,
            BuildResult::Built(_) => panic!("built without a VM"),
        }
    }

    #[test]
    fn what_cannot_be_built_fails_before_any_vm_and_publishes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let e = engine(t.path());
        let store =
            crate::store::ContentStore::open(&t.path().join("store"), StoreConfig::default())
                .unwrap();
        // Not a derivation vouch can build (no outputs): refused before the log sees a build.
        let mut log = Recorded::default();
        let mut nothing = request("r:sha256", &[]);
        nothing.drv.outputs.clear();
        let f = failure(e.build(nothing, Inputs::NixStore, &mut log));
        assert_eq!(f.status, FailureStatus::MiscFailure);
        assert!(f.message.starts_with("vouch cannot build"), "{}", f.message);
        assert!(log.0.is_empty(), "{:?}", log.0);
        // An input the client did not upload.
        let missing = StorePath::from_parts([8; 20], "input").unwrap();
        let req = request("r:sha256", &[&missing]);
        let f = failure(e.build(req, Inputs::ContentStore((&store).into()), &mut log));
        assert!(f.message.contains("the client uploads inputs before building"), "{}", f.message);
        assert!(f.message.contains(&missing.to_string()), "{}", f.message);
        // An input-addressed derivation from an untrusted caller without its graph: refused
        // with the rule named, before the log sees a build.
        let mut ia = request("", &[]);
        let out = StorePath::from_parts([9; 20], "x").unwrap();
        ia.drv.outputs.get_mut("out").unwrap().path = Some(out);
        let mut log = Recorded::default();
        let f = failure(e.build(ia, Inputs::NixStore, &mut log));
        assert!(f.message.contains("only callers the operator trusts"), "{}", f.message);
        assert!(log.0.is_empty(), "{:?}", log.0);
        assert!(!t.path().join("traces").exists(), "nothing published");
    }

    #[test]
    fn a_failed_step_is_logged_whole_and_publishes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let e = engine(t.path());
        let mut log = Recorded::default();
        // A floating CA step under a guessed rule: the note, then the build, which fails (no
        // guest image here) and still finishes its log.
        let f = failure(e.build(request("r:sha256", &[]), Inputs::NixStore, &mut log));
        assert_eq!(f.status, FailureStatus::MiscFailure);
        assert!(f.message.starts_with("vouch: "), "{}", f.message);
        assert!(log.0[0].starts_with("nothing says; using"), "{:?}", log.0);
        assert!(log.0[1].starts_with("started /nix/store/"), "{:?}", log.0);
        assert_eq!(log.0.last().unwrap(), "finished");
        assert!(!t.path().join("traces").exists(), "nothing published");
    }
}
