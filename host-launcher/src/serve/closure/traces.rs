//! The traces of steps other vouch hosts built, brought into this service's cache.
//!
//! Nix's build hook brings back a step's outputs (NARs, path infos, realisations), never its
//! statement, evidence or JWS. Every vouch host serves its trace store read-only, so for a
//! step built on machine M the service:
//! 1. finds M's trace location ([`BuilderTraces`], `serve --builder-traces MACHINE=LOCATION`);
//!    today a directory (builders on this machine), behind [`fetch_entries`] so that an
//!    `http(s)://` location can be added without touching the rest;
//! 2. verifies the step's unresolved derivation with the closure verifier
//!    (`build_trace::verify`) under the service's trust policy, its sources this service's own
//!    cache and M's traces: the statement carries exactly the derivation the graph gives, the
//!    evidence verifies under a builder rule, every input links to an accepted output;
//! 3. takes the entry of M's that gives the accepted outputs and passes the policy alone
//!    (`check_entry_alone`), and only then publishes it through the one publish step
//!    (`crate::core::publish::publish_verified_trace`): NARs copied and re-hashed, narinfos and
//!    realisations signed with this service's key.
//!
//! What is not here: the policy's semantics (`docs/trust-policy.md`), the trace store's layout
//! (`build_trace::store`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use build_trace::evidence::Verifier as EvidenceVerifier;
use build_trace::store::{TraceEntry, TraceSource, TraceStore};
use build_trace::trust::PreparedPolicy;
use build_trace::verify::{check_entry_alone, ClosureVerifier, DrvSet, Outcome, Request};
use build_trace::{error_chain, Statement};
use channel::messages::AttesterKind;
use nix_formats::StorePath;

use crate::core::publish::{publish_verified_trace, PublishConfig, VerifiedTrace};
use crate::core::Derivations;

/// Why a builder's trace was not published here.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// No trace location for the machine.
    #[error(
        "no trace location for builder {0} (name it with --builder-traces MACHINE=DIR), so its \
         step cannot be verified"
    )]
    NoLocation(String),
    /// Reading a trace store.
    #[error("reading the traces of {0}")]
    Read(String, #[source] build_trace::store::StoreError),
    /// The closure verifier stopped.
    #[error("verifying")]
    Verify(#[source] build_trace::verify::VerifyError),
    /// The step does not verify.
    #[error("its trace does not verify under the service's policy: {0}")]
    NotVerified(String),
    /// No entry of the builder gives the accepted outputs.
    #[error("no trace of {0} at the builder gives the outputs the verifier accepted")]
    NoEntry(StorePath),
    /// The entry has no evidence (a key-only trace): the service signs attested steps only.
    #[error("the trace of {0} carries no attestation evidence")]
    Unattested(StorePath),
    /// Publishing.
    #[error("publishing")]
    Publish(#[source] crate::core::publish::PublishError),
}

/// Where a builder's traces are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceLocation {
    /// A trace store directory on this machine.
    Dir(PathBuf),
}

/// Each builder's trace location, by its name in the machines file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuilderTraces(pub BTreeMap<String, TraceLocation>);

impl BuilderTraces {
    /// Parse `MACHINE=DIR` (the machine as its machines file line names it, which may itself
    /// hold `=`; the location is what follows the last `=` that starts an absolute path).
    pub fn parse_one(arg: &str) -> Result<(String, TraceLocation), String> {
        let at = arg.rfind("=/").ok_or_else(|| {
            format!("--builder-traces {arg:?}: expected MACHINE=DIR with an absolute DIR")
        })?;
        let (machine, dir) = (&arg[..at], &arg[at + 1..]);
        if machine.is_empty() {
            return Err(format!("--builder-traces {arg:?}: no machine before `=`"));
        }
        Ok((machine.to_owned(), TraceLocation::Dir(dir.into())))
    }

    /// The location of `machine`'s traces.
    pub fn of(&self, machine: &str) -> Option<&TraceLocation> {
        self.0.get(machine)
    }
}

/// The trace store at `loc`, read-only.
fn open(loc: &TraceLocation) -> Result<TraceStore, TraceError> {
    match loc {
        TraceLocation::Dir(d) => {
            TraceStore::open(d).map_err(|e| TraceError::Read(d.display().to_string(), e))
        }
    }
}

/// Every trace of step `key` (resolved drv path, or the drv of an input-addressed step) at
/// `loc`.
pub fn fetch_entries(loc: &TraceLocation, key: &StorePath) -> Result<Vec<TraceEntry>, TraceError> {
    let store = open(loc)?;
    store.entries(key).map_err(|e| TraceError::Read(store.describe(), e))
}

/// The file of the NAR with hash `nar_hash` at `loc`.
fn nar_file(loc: &TraceLocation, nar_hash: &build_trace::job::NarHash) -> PathBuf {
    match loc {
        TraceLocation::Dir(d) => {
            d.join("nar").join(format!("{}.nar", nix_formats::base32::encode(&nar_hash.0)))
        }
    }
}

/// What the import needs besides the step.
#[derive(Debug)]
pub struct Importer<'a> {
    /// The service's trust policy.
    pub policy: &'a PreparedPolicy,
    /// Where and how the service publishes.
    pub publish: &'a PublishConfig,
    /// The builders' trace locations.
    pub builders: &'a BuilderTraces,
}

impl Importer<'_> {
    /// Verify the step `udrv` of `graph` (built as `key` on `machine`) and publish its trace
    /// here; its statement.
    pub fn import(
        &self,
        graph: &Derivations,
        udrv: &StorePath,
        key: &StorePath,
        machine: &str,
    ) -> Result<Statement, TraceError> {
        let loc =
            self.builders.of(machine).ok_or_else(|| TraceError::NoLocation(machine.into()))?;
        let theirs = open(loc)?;
        let ours = TraceStore::open(&self.publish.trace_store)
            .map_err(|e| TraceError::Read("this service's cache".into(), e))?;
        let mut drvs = DrvSet::new();
        for (p, d) in graph.derivations() {
            drvs.insert(p.clone(), d.clone());
        }
        let verifier = ClosureVerifier {
            policy: self.policy,
            sources: vec![&ours as &dyn TraceSource, &theirs],
            evidence: EvidenceVerifier::global(),
            now: SystemTime::now(),
            threads: 1,
        };
        let req = Request { target: udrv.clone(), expect: BTreeSet::new() };
        let closure = match verifier.verify(&drvs, &req).map_err(TraceError::Verify)? {
            Outcome::Verified(c) => c,
            Outcome::NotVerified(b) => return Err(TraceError::NotVerified(b.to_string())),
        };
        let accepted = closure
            .steps
            .iter()
            .find(|s| s.drv == udrv.to_string())
            .map(|s| s.outputs.clone())
            .unwrap_or_else(|| closure.outputs.clone());
        for entry in fetch_entries(loc, key)? {
            let Ok(verdict) = check_entry_alone(
                self.policy,
                EvidenceVerifier::global(),
                &entry,
                SystemTime::now(),
            ) else {
                continue;
            };
            let st = &verdict.statement;
            let outputs: BTreeMap<String, String> =
                st.outputs.iter().map(|(n, o)| (n.clone(), o.path.to_string())).collect();
            if outputs != accepted {
                continue;
            }
            return self.publish_entry(loc, key, &entry, &verdict.statement, verdict.kind);
        }
        Err(TraceError::NoEntry(key.clone()))
    }

    fn publish_entry(
        &self,
        loc: &TraceLocation,
        key: &StorePath,
        entry: &TraceEntry,
        st: &Statement,
        kind: &str,
    ) -> Result<Statement, TraceError> {
        let evidence = match entry.parse_evidence() {
            Some(Ok(e)) => e,
            _ => return Err(TraceError::Unattested(key.clone())),
        };
        let attester = match kind {
            "simulated" => AttesterKind::Simulated,
            "sev-snp" => AttesterKind::SevSnp,
            _ => return Err(TraceError::Unattested(key.clone())),
        };
        let nars =
            st.outputs.iter().map(|(n, o)| (n.clone(), nar_file(loc, &o.nar_hash))).collect();
        let t = VerifiedTrace { statement: st, evidence: &evidence, attester, nars };
        let published = publish_verified_trace(&t, self.publish).map_err(TraceError::Publish)?;
        tracing::info!(step = %key, from = %entry.location, dir = %published.step_dir.display(),
                       "a builder's verified trace published");
        Ok(st.clone())
    }
}

/// The newest statement this service's cache holds for step `key`, if any, and whether its
/// evidence says it is simulated (its own entries: the publish step checked them).
pub fn published_statement(cache: &Path, key: &StorePath) -> Option<(Statement, AttesterKind)> {
    let store = TraceStore::open(cache).ok()?;
    let entry = store.entries(key).ok()?.into_iter().last()?;
    let st = entry.parse_statement().ok()?;
    let simulated = match entry.parse_evidence() {
        Some(Ok(e)) => e.provider.as_deref() == Some("simulated"),
        _ => false,
    };
    Some((st, if simulated { AttesterKind::Simulated } else { AttesterKind::SevSnp }))
}

/// `e`'s chain, for messages.
pub fn describe(e: &TraceError) -> String {
    error_chain(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_builder_is_named_as_its_machines_line_names_it() {
        let arg = "ssh-ng://b?remote-program=/opt/vouch-b=/var/lib/vouch-b/cache";
        let (m, loc) = BuilderTraces::parse_one(arg).unwrap();
        assert_eq!(m, "ssh-ng://b?remote-program=/opt/vouch-b");
        assert_eq!(loc, TraceLocation::Dir("/var/lib/vouch-b/cache".into()));
        for bad in ["ssh-ng://b", "=/x", "ssh-ng://b=relative/dir"] {
            assert!(BuilderTraces::parse_one(bad).is_err(), "{bad}");
        }
    }
}
