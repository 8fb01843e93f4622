//! Publishing a checked step into the trace store / binary cache (`build_trace::store`), signed
//! with the launcher's Nix key (`<host>-1`, or `<host>-simulated-1` when the evidence is
//! simulated, so a plain Nix user sees the difference).
//!
//! What is not here: the checks (they happened in [`super::run_step`]; only a [`StepOutcome`]
//! can be published) and the layout (`build_trace::store`, `docs/trace-store.md`).

use std::path::{Path, PathBuf};

use build_trace::evidence::nix_key_name;
use build_trace::store::{PutResult, StepRecord, TraceStore};

use super::StepOutcome;

/// Why publishing failed (nothing half-written: the store writes atomically).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The signing key.
    #[error("the launcher's signing key")]
    Key(#[source] build_trace::sign::SignError),
    /// The store.
    #[error("writing the trace store")]
    Store(#[source] build_trace::store::StoreError),
}

/// The default binary cache / trace store directory: `<state_dir>/cache`.
pub fn default_cache_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cache")
}

/// This host's name for key names.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "vouch".into())
}

/// The key name this host signs with for `outcome`.
pub fn key_name(outcome: &StepOutcome) -> String {
    nix_key_name(&host_name(), outcome.verified.is_simulated())
}

/// Write `outcome` into the trace store at `cache_dir`.
pub fn publish(
    outcome: &StepOutcome,
    cache_dir: &Path,
    state_dir: &Path,
) -> Result<PutResult, PublishError> {
    let key = build_trace::sign::load_or_generate_key(state_dir, &key_name(outcome))
        .map_err(PublishError::Key)?;
    let store = TraceStore::create(cache_dir).map_err(PublishError::Store)?;
    let kind = outcome.attester.to_string();
    let record = StepRecord {
        statement: &outcome.statement,
        evidence: Some(&outcome.evidence),
        evidence_kind: &kind,
        nars: outcome.outputs.iter().map(|(n, o)| (n.clone(), o.nar_file.clone())).collect(),
    };
    store.put_step(&record, &key).map_err(PublishError::Store)
}
