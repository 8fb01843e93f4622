//! THE publish step: the one place where a checked step becomes visible. Every front-end's
//! build goes through it (`vouch build`, `vouch nix-builder`, `vouch serve`, by way of
//! [`super::Engine::build`]); nothing else in the host writes the trace store or signs a step's
//! records (a test in `tests/one_publish_step.rs` holds every other module to that).
//!
//! [`publish`], for a [`StepOutcome`] (only `crate::build::run_step` makes one, after checking
//! the statement, the evidence and the output NARs):
//! 1. the signing key is named after the attester kind of the checked evidence
//!    ([`super::keys::KeyNaming`]) and loaded (made on first use) — once;
//! 2. the step goes into the trace store (`build_trace::store`, `docs/trace-store.md`): NARs,
//!    statement, evidence, a laut JWS, realisations and narinfos, signed with that key, once;
//!    and into the store's transparency log, whose checkpoints the log key signs
//!    ([`super::keys::log_key`]). A build that read a session's private inputs
//!    ([`Publication::StepOnly`]) gets its step and its signed records, but no narinfo or
//!    realisation in the cache: those tell every client of the cache (and the resolution of
//!    later derivations) that these bytes belong under these paths, and only one client's
//!    unsigned uploads said so (issue 12, item 2);
//! 3. where the build had a content store (the long-running builders), the outputs are
//!    registered there (re-verified, with the narinfo signatures of step 2): in the shared
//!    store, or in the session's overlay when the engine's view says so;
//!
//!    a **divergent** build (an output whose path already has a published entry with other
//!    bytes: input-addressed builds are not always reproducible) changes neither the trace
//!    store's narinfo and realisations nor the content store's bytes: the first stay; this
//!    build's step entry is added and records the divergence (`divergent.json`), and the output
//!    is reported [`Diverged`] with this build's own NAR hash — never the kept entry's;
//! 4. it returns what it published, with the records it signed: the front-ends answer with
//!    those.
//!
//! What is not here: the checks (`crate::build`), the keys' names and files
//! ([`super::keys`]), the trace store's layout (`build_trace::store`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use build_trace::store::Publication;
use build_trace::store::{StepRecord, TraceStore};
use channel::messages::AttesterKind;
use nix_formats::signing::Signature;

use super::keys::{log_key, KeyNameError, KeyNaming};
use super::path_info::ValidPathInfo;
use super::result::{Diverged, LegacyRealisation, Published, PublishedOutput};
use crate::build::StepOutcome;
use crate::store::{FileUploads, StoreView};

/// Where steps are published and who signs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishConfig {
    /// The state directory (keys).
    pub state_dir: PathBuf,
    /// The trace store directory.
    pub trace_store: PathBuf,
    /// How the signing key is named.
    pub key_naming: KeyNaming,
}

/// Why publishing failed (nothing half-written: the trace store and the content store write
/// atomically; a step whose outputs could not be registered stays in the trace store, where it
/// is true).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The signing key's name.
    #[error("the signing key")]
    KeyName(#[source] KeyNameError),
    /// The signing key.
    #[error("the signing key")]
    Key(#[source] build_trace::sign::SignError),
    /// The transparency log's key.
    #[error("the transparency log's key")]
    LogKey(#[source] build_trace::tlog::TlogError),
    /// The trace store.
    #[error("publishing the step to the trace store")]
    TraceStore(#[source] build_trace::store::StoreError),
    /// The content store.
    #[error("registering the outputs")]
    ContentStore(#[source] crate::store::StoreError),
}

/// The default trace store directory: `<state_dir>/cache`.
pub fn default_trace_store(state_dir: &Path) -> PathBuf {
    state_dir.join("cache")
}

fn strings<'a>(sigs: impl IntoIterator<Item = &'a Signature>) -> BTreeSet<String> {
    sigs.into_iter().map(ToString::to_string).collect()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Write when this host ran the step (its clock: QEMU start to now) beside the entry's
/// statement, once (the first build of an entry keeps its times); the provenance's
/// `startedOn`/`finishedOn` (`build_trace::provenance::TIMES_FILE`). Not evidence, so a failure
/// is only logged.
fn record_times(entry_dir: &Path, total: std::time::Duration) {
    let file = entry_dir.join(build_trace::provenance::TIMES_FILE);
    if file.exists() {
        return;
    }
    let finished = now();
    let started = finished.saturating_sub(total.as_secs());
    let body = serde_json::json!({ "started_unix": started, "finished_unix": finished });
    if let Err(e) = build_trace::store::write_atomic(&file, body.to_string().as_bytes()) {
        tracing::warn!(file = %file.display(), "cannot record the step's times: {e}");
    }
}

/// The `trusted-public-keys` entry of the key the publish step signs with under `key_name`,
/// creating the key now if there is none yet (as the first publication would): what a service
/// prints at start so that its users can trust its cache before its first build.
pub fn public_key_line(state_dir: &Path, key_name: &str) -> Result<String, PublishError> {
    let key =
        build_trace::sign::load_or_generate_key(state_dir, key_name).map_err(PublishError::Key)?;
    Ok(key.public_key().to_string())
}

/// Publish a checked step (see the module docs): into the trace store, and into
/// `content_store` when there is one.
pub fn publish(
    outcome: &StepOutcome,
    cfg: &PublishConfig,
    content_store: Option<StoreView<'_>>,
    publication: Publication,
) -> Result<Published, PublishError> {
    let nars = outcome.outputs.iter().map(|(n, o)| (n.clone(), o.nar_file.clone())).collect();
    let step = Checked {
        statement: &outcome.statement,
        evidence: Some(&outcome.evidence),
        attester: outcome.attester(),
        nars,
    };
    let (key_name, step_dir, mut outputs) = put(&step, cfg, publication)?;
    record_times(&step_dir, outcome.timings.total);
    let st = &outcome.statement;
    if let Some(content) = content_store {
        let items = outputs
            .iter()
            .map(|(name, o)| {
                let info = ValidPathInfo {
                    path: o.path.clone(),
                    info: o.info.clone(),
                    deriver: Some(st.job.drv_path.clone()),
                    registration_time: now(),
                    ultimate: true,
                    sigs: o.narinfo_sigs.clone(),
                };
                (info, outcome.outputs[name].nar_file.clone())
            })
            .collect();
        content
            .register_outputs(&mut FileUploads::new(items), &[st.job.ca_rule.into()])
            .map_err(PublishError::ContentStore)?;
        for o in outputs.values_mut() {
            held_elsewhere(content, o)?;
        }
    }
    Ok(Published { key_name, step_dir, outputs })
}

/// A step whose statement and evidence were checked: by `crate::build::run_step` for a step
/// built here, or under the service's trust policy for a trace another vouch host built
/// ([`VerifiedTrace`]).
struct Checked<'a> {
    statement: &'a build_trace::Statement,
    evidence: Option<&'a build_trace::evidence::EvidenceBundle>,
    attester: AttesterKind,
    nars: BTreeMap<String, PathBuf>,
}

/// A trace that another vouch host built and published, fetched from its trace store and
/// accepted by the closure verifier under this host's trust policy
/// (`crate::serve::closure::traces` makes one only then): its statement, its evidence, the
/// attester kind the policy's check found, and its outputs' NAR files.
#[derive(Debug)]
pub struct VerifiedTrace<'a> {
    /// The statement.
    pub statement: &'a build_trace::Statement,
    /// Its evidence.
    pub evidence: &'a build_trace::evidence::EvidenceBundle,
    /// Who attested, as the policy's evidence check found.
    pub attester: AttesterKind,
    /// Each output's NAR file (copied and re-hashed against the statement).
    pub nars: BTreeMap<String, PathBuf>,
}

/// Publish a verified trace of another host (see [`VerifiedTrace`]) into this host's trace
/// store, signed with this host's key: its NARs, statement, evidence, narinfos and
/// realisations, as for a step built here.
pub fn publish_verified_trace(
    t: &VerifiedTrace<'_>,
    cfg: &PublishConfig,
) -> Result<Published, PublishError> {
    let step = Checked {
        statement: t.statement,
        evidence: Some(t.evidence),
        attester: t.attester,
        nars: t.nars.clone(),
    };
    let (key_name, step_dir, outputs) = put(&step, cfg, Publication::Cache)?;
    Ok(Published { key_name, step_dir, outputs })
}

/// Step 2 of the module docs: the step into the trace store, signed; what was written.
fn put(
    step: &Checked<'_>,
    cfg: &PublishConfig,
    publication: Publication,
) -> Result<(String, PathBuf, BTreeMap<String, PublishedOutput>), PublishError> {
    let key_name = cfg
        .key_naming
        .name(step.attester == AttesterKind::Simulated)
        .map_err(PublishError::KeyName)?;
    let key = build_trace::sign::load_or_generate_key(&cfg.state_dir, &key_name)
        .map_err(PublishError::Key)?;
    let log_key = log_key(&cfg.state_dir, None).map_err(PublishError::LogKey)?;
    let store = TraceStore::create(&cfg.trace_store)
        .and_then(|s| s.with_log(log_key))
        .map_err(PublishError::TraceStore)?;
    let st = step.statement;
    let kind = step.attester.to_string();
    let record = StepRecord {
        statement: st,
        evidence: step.evidence,
        evidence_kind: &kind,
        nars: step.nars.clone(),
    };
    let put = store.put_step_as(&record, &key, publication).map_err(PublishError::TraceStore)?;
    tracing::info!(step = %put.step_dir.display(), key = %key_name, "step published");
    for (name, d) in &put.diverged {
        tracing::warn!(
            output = %name,
            nar_hash = %d.nar_hash,
            kept = ?d.kept,
            "this build differs from the entry already published; that entry stays (divergent \
             build, recorded in the step's divergent.json)"
        );
    }
    let mut outputs = BTreeMap::new();
    for (name, out) in &st.outputs {
        let rec = put.records.get(name);
        outputs.insert(
            name.clone(),
            PublishedOutput {
                path: out.path.clone(),
                info: build_trace::PathInfo {
                    nar_hash: out.nar_hash,
                    nar_size: out.nar_size,
                    references: out.references.clone(),
                    ca: out.ca.clone(),
                },
                narinfo_sigs: rec.map(|r| strings(&r.narinfo.sigs)).unwrap_or_default(),
                signatures: rec
                    .and_then(|r| r.build_trace.as_ref())
                    .map(|b| strings(&b.signatures))
                    .unwrap_or_default(),
                legacy: rec
                    .and_then(|r| r.legacy.as_ref())
                    .map(|l| LegacyRealisation { id: l.id.to_string(), json: l.to_json() }),
                diverged: put.diverged.get(name).map(|d| Diverged {
                    published_nar_hash: d.published_nar_hash,
                    published_path: d.published_path.clone(),
                }),
            },
        );
    }

    Ok((key_name, put.step_dir, outputs))
}

/// The content store never swaps the bytes it registered: where it already held the output's
/// path with other bytes, they stay, and the output is reported diverged with their hash.
fn held_elsewhere(content: StoreView<'_>, o: &mut PublishedOutput) -> Result<(), PublishError> {
    let held = content.path_info(&o.path).map_err(PublishError::ContentStore)?;
    let Some(held) = held.filter(|h| h.info.nar_hash != o.info.nar_hash) else {
        return Ok(());
    };
    tracing::warn!(
        path = %o.path,
        nar_hash = %o.info.nar_hash,
        held = %held.info.nar_hash,
        "the content store already holds other bytes for this path; they stay (divergent build)"
    );
    let d = o.diverged.get_or_insert(Diverged { published_nar_hash: None, published_path: None });
    d.published_nar_hash.get_or_insert(held.info.nar_hash);
    Ok(())
}
