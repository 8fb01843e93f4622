//! Simulated builders for the trust-migration tests: a vouch state directory with its own key
//! name, Nix key and simulated SNP root (made as the launcher makes them on first use), and the
//! traces that builder would publish for steps the local Nix built, made without a VM by the
//! fixture's honest agent ([`crate::fixture::record_step`]) with the guest image's simulated
//! measurement, so that the builder's later real VM builds are judged the same way.
//!
//! What is not here: building (Nix builds; a real vouch VM rebuilds in the tests).

use std::path::{Path, PathBuf};

use build_trace::evidence::{EvidenceBundle, SimulatedLaunch, SimulatedRoot};
use build_trace::statement::Statement;
use build_trace::store::{StepRecord, TraceStore};
use nix_formats::signing::SecretKey;

use crate::fixture::{record_step, BuiltStep, Step, StoreAt};

/// One simulated vouch builder.
#[derive(Debug)]
pub struct SimBuilder {
    /// Its state directory (`key-name`, `keys/`, `simulated-snp/`, `cache/`).
    pub state: PathBuf,
    pub root: SimulatedRoot,
    pub key: SecretKey,
    /// The launch measurement its guests report (the image's simulated measurement).
    pub measurement: [u8; 48],
}

impl SimBuilder {
    /// The builder of state directory `state`, signing as `key_name` (it must say
    /// `simulated`), its guests measuring `measurement`.
    pub fn new(state: &Path, key_name: &str, measurement: [u8; 48]) -> SimBuilder {
        std::fs::create_dir_all(state).unwrap();
        std::fs::write(state.join("key-name"), format!("{key_name}\n")).unwrap();
        let root = SimulatedRoot::load_or_generate(&state.join("simulated-snp")).unwrap();
        let key = build_trace::sign::load_or_generate_key(state, key_name).unwrap();
        SimBuilder { state: state.to_owned(), root, key, measurement }
    }

    /// Its trace store (`<state>/cache`, the launcher's default).
    pub fn cache(&self) -> PathBuf {
        self.state.join("cache")
    }

    /// The evidence an honest guest of this builder gives for `st`.
    pub fn attest(&self, st: &Statement) -> EvidenceBundle {
        let att =
            self.root.attester(SimulatedLaunch::new(self.measurement, st.host_data().unwrap()));
        self.root.bundle(att.report(&st.report_data().unwrap()))
    }

    /// Record `step` (built by Nix at `at`) as this builder and publish it to its trace store.
    pub fn publish(&self, at: &StoreAt<'_>, step: &BuiltStep) -> Step {
        let s = record_step(
            at,
            &step.udrv,
            step.key.clone(),
            step.drv.clone(),
            &step.outputs,
            self.measurement,
            &|st| self.attest(st),
        );
        let rec = StepRecord {
            statement: &s.statement,
            evidence: Some(&s.evidence),
            evidence_kind: "simulated",
            nars: s.nars.clone(),
        };
        TraceStore::create(&self.cache()).unwrap().put_step(&rec, &self.key).unwrap();
        s
    }
}
