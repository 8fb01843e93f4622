//! THE publish step: the one place where a checked step becomes visible. Every front-end's
//! build goes through it (`vouch build`, `vouch nix-builder`, `vouch serve`, by way of
//! [`super::Engine::build`]); nothing else in the host writes the trace store or signs a step's
//! records (a test in `tests/one_publish_step.rs` holds every other module to that).
//!
//! [`publish`], for a [`StepOutcome`] (only `crate::build::run_step` makes one, after checking
//! the statement, the evidence and the output NARs):
//! 1. the signing key is named after the attester kind of the checked evidence ([`KeyNaming`])
//!    and loaded (made on first use) — once;
//! 2. the step goes into the trace store (`build_trace::store`, `docs/trace-store.md`): NARs,
//!    statement, evidence, a laut JWS, realisations and narinfos, signed with that key, once;
//!    and into the store's transparency log, whose checkpoints the log key in
//!    `<state dir>/keys/log.note-key` signs (made on first publish, for the origin in
//!    `<state dir>/log-origin`, else `<hostname>/vouch`);
//! 3. where the build had a content store (the long-running builders), the outputs are
//!    registered there (re-verified, with the narinfo signatures of step 2);
//! 4. it returns what it published, with the records it signed: the front-ends answer with
//!    those.
//!
//! Key names: `<host>-1`, or `<host>-simulated-1` when the evidence is simulated, so a plain Nix
//! user sees the difference. Several vouch hosts on one machine (separate state directories)
//! need different key names, or a trust policy — which maps key names to keys — cannot name
//! both: [`KeyNaming`] takes a name from `--key-name` or the state directory's `key-name` file.
//! A name that signs simulated evidence must say `simulated` (as a word of the name, e.g.
//! `ci-a-simulated-1`); any other is refused.
//!
//! What is not here: the checks (`crate::build`), the trace store's layout (`build_trace::store`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use build_trace::evidence::nix_key_name;
use build_trace::store::{StepRecord, TraceStore};
use channel::messages::AttesterKind;
use nix_formats::signing::Signature;
use vm_image::image::Manifest;

use super::path_info::ValidPathInfo;
use super::result::{LegacyRealisation, Published, PublishedOutput};
use crate::build::{LauncherConfig, StepOutcome};
use crate::store::{ContentStore, FileUploads, Origin};
use crate::transparency::host_name;
use crate::vm::{choose_mode, HostCaps, Mode};

/// The state directory's key-name setting: one line, the name.
pub const KEY_NAME_FILE: &str = "key-name";

/// Why a key name is refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyNameError {
    /// Not a name Nix accepts.
    #[error("invalid key name {0:?}: it must be non-empty, without `:`, `/` or whitespace")]
    Invalid(String),
    /// A name without the simulated marker for simulated evidence.
    #[error("key name {name:?} does not say `simulated`, but this host's evidence is simulated (no SEV-SNP): a name like {suggestion:?} keeps the difference visible to Nix users and trust policies")]
    NotMarkedSimulated {
        /// The configured name.
        name: String,
        /// A name that would do.
        suggestion: String,
    },
    /// The state directory's setting could not be read.
    #[error("reading the key name from {0}")]
    Io(PathBuf, #[source] std::io::Error),
}

/// Whether `name` says `simulated` as one of its words (split at anything not alphanumeric).
pub fn says_simulated(name: &str) -> bool {
    name.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| w.eq_ignore_ascii_case("simulated"))
}

/// How this host names its Nix signing key (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyNaming {
    configured: Option<String>,
}

impl KeyNaming {
    /// The default: `<hostname>-1`, or `<hostname>-simulated-1` for simulated evidence.
    pub fn host_default() -> Self {
        KeyNaming { configured: None }
    }

    /// Always `name` (checked against the evidence kind by [`Self::name`]).
    pub fn named(name: &str) -> Result<Self, KeyNameError> {
        let name = name.trim();
        if name.is_empty() || name.contains([':', '/']) || name.chars().any(char::is_whitespace) {
            return Err(KeyNameError::Invalid(name.to_owned()));
        }
        Ok(KeyNaming { configured: Some(name.to_owned()) })
    }

    /// The name in `<state_dir>/key-name` if that file exists, else the default.
    pub fn from_state_dir(state_dir: &Path) -> Result<Self, KeyNameError> {
        let file = state_dir.join(KEY_NAME_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) => Self::named(text.trim()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::host_default()),
            Err(e) => Err(KeyNameError::Io(file, e)),
        }
    }

    /// The name to sign evidence of this kind with.
    pub fn name(&self, simulated: bool) -> Result<String, KeyNameError> {
        match &self.configured {
            None => Ok(nix_key_name(&host_name(), simulated)),
            Some(n) if simulated && !says_simulated(n) => Err(KeyNameError::NotMarkedSimulated {
                name: n.clone(),
                suggestion: format!("{}-simulated-1", n.trim_end_matches("-1")),
            }),
            Some(n) => Ok(n.clone()),
        }
    }

    /// Check the name against the evidence kind the launcher `cfg` will produce (the mode it
    /// would choose), before any VM runs.
    pub fn check_for(&self, cfg: &LauncherConfig) -> Result<String, KeyNameError> {
        let image_snp = Manifest::load(&cfg.image_dir).map(|m| m.snp.is_some()).unwrap_or(false);
        let simulated = choose_mode(cfg.mode, &HostCaps::probe(), image_snp)
            .map(|m| m != Mode::Snp)
            .unwrap_or(true);
        self.name(simulated)
    }
}

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

/// Publish a checked step (see the module docs): into the trace store, and into
/// `content_store` when there is one.
pub fn publish(
    outcome: &StepOutcome,
    cfg: &PublishConfig,
    content_store: Option<&ContentStore>,
) -> Result<Published, PublishError> {
    let key_name = cfg
        .key_naming
        .name(outcome.attester() == AttesterKind::Simulated)
        .map_err(PublishError::KeyName)?;
    let key = build_trace::sign::load_or_generate_key(&cfg.state_dir, &key_name)
        .map_err(PublishError::Key)?;
    let log_key =
        crate::transparency::log_key(&cfg.state_dir, None).map_err(PublishError::LogKey)?;
    let store = TraceStore::create(&cfg.trace_store)
        .and_then(|s| s.with_log(log_key))
        .map_err(PublishError::TraceStore)?;
    let st = &outcome.statement;
    let kind = outcome.attester().to_string();
    let record = StepRecord {
        statement: st,
        evidence: Some(&outcome.evidence),
        evidence_kind: &kind,
        nars: outcome.outputs.iter().map(|(n, o)| (n.clone(), o.nar_file.clone())).collect(),
    };
    let put = store.put_step(&record, &key).map_err(PublishError::TraceStore)?;
    tracing::info!(step = %put.step_dir.display(), key = %key_name, "step published");
    if !put.kept_existing.is_empty() {
        tracing::warn!(
            kept = ?put.kept_existing,
            "records of an earlier, different build of this step were kept (divergent builds)"
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
            },
        );
    }

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
            .add(&mut FileUploads::new(items), &[st.job.ca_rule.into()], Origin::Build)
            .map_err(PublishError::ContentStore)?;
    }
    Ok(Published { key_name, step_dir: put.step_dir, kept_existing: put.kept_existing, outputs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_names_keep_the_simulated_marker() {
        let d = KeyNaming::host_default();
        assert_eq!(d.name(true).unwrap(), nix_key_name(&host_name(), true));
        assert_eq!(d.name(false).unwrap(), nix_key_name(&host_name(), false));

        let a = KeyNaming::named("ci-a-simulated-1").unwrap();
        assert_eq!(a.name(true).unwrap(), "ci-a-simulated-1");
        assert_eq!(a.name(false).unwrap(), "ci-a-simulated-1", "conservative on SNP: allowed");
        let plain = KeyNaming::named("ci-a-1").unwrap();
        assert_eq!(plain.name(false).unwrap(), "ci-a-1");
        let e = plain.name(true).unwrap_err().to_string();
        assert!(e.contains("does not say `simulated`") && e.contains("ci-a-simulated-1"), "{e}");
        for sneaky in ["unsimulated-1", "ci-simulatedx-1", "sim-1"] {
            assert!(KeyNaming::named(sneaky).unwrap().name(true).is_err(), "{sneaky}");
        }
        for ok in ["simulated", "a.simulated.b", "SIMULATED-builder"] {
            assert!(KeyNaming::named(ok).unwrap().name(true).is_ok(), "{ok}");
        }
        for bad in ["", "a:b", "a/b", "a b"] {
            assert!(matches!(KeyNaming::named(bad), Err(KeyNameError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn the_state_directory_can_name_the_key() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(KeyNaming::from_state_dir(t.path()).unwrap(), KeyNaming::host_default());
        std::fs::write(t.path().join(KEY_NAME_FILE), "b-simulated-1\n").unwrap();
        assert_eq!(
            KeyNaming::from_state_dir(t.path()).unwrap().name(true).unwrap(),
            "b-simulated-1"
        );
        std::fs::write(t.path().join(KEY_NAME_FILE), "two words\n").unwrap();
        assert!(KeyNaming::from_state_dir(t.path()).is_err());
    }
}
