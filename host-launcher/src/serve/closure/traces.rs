//! The traces of steps other vouch hosts built, brought into this service's cache.
//!
//! Nix's build hook brings back a step's outputs (NARs, path infos, realisations), never its
//! statement, evidence or JWS. Every vouch host serves its trace store read-only, so for a
//! step built on machine M the service:
//! 1. opens M's trace store at the location `serve --builder-traces MACHINE=LOCATION` names
//!    ([`BuilderTraces`]): a directory (`DIR`, `file://DIR`: builders on this machine, or a
//!    mounted copy) or `http(s)://HOST[/prefix]` (M's own `vouch serve`, or any server of its
//!    trace store directory), through `build_trace::source` as `vouch verify --traces` reads
//!    it: fetched files kept by content hash in the service's fetch cache, `https://` checked
//!    against Mozilla's roots or `--builder-tls-ca` / `SSL_CERT_FILE`;
//! 2. verifies the step's unresolved derivation with the closure verifier
//!    (`build_trace::verify`) under the service's trust policy, its sources this service's own
//!    cache and M's traces: the statement carries exactly the derivation the graph gives, the
//!    evidence verifies under a builder rule, every input links to an accepted output;
//! 3. takes the entry of M's that gives the accepted outputs and passes the policy alone
//!    (`check_entry_alone`); from a remote store, downloads its output NARs
//!    (`nar/<nix32 NAR hash>.nar`, each stopped past the statement's size and checked against
//!    its hash, into a directory of the service's that is emptied at start); and only then
//!    publishes it through the one publish step
//!    (`crate::core::publish::publish_verified_trace`): NARs copied and re-hashed, narinfos and
//!    realisations signed with this service's key.
//!
//! Every failure is a [`TraceError`] naming the URL or directory and the cause (no answer, an
//! HTTP status, a forged or missing trace, a NAR with other bytes); the step fails with it and
//! nothing of it is published.
//!
//! What is not here: the policy's semantics (`docs/trust-policy.md`), the trace store's layout
//! (`build_trace::store`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use build_trace::evidence::Verifier as EvidenceVerifier;
use build_trace::source::{FetchError, FetchOptions, Fetcher, SourceError, Traces};
use build_trace::statement::OutputInfo;
use build_trace::store::{TraceEntry, TraceSource, TraceStore};
use build_trace::trust::PreparedPolicy;
use build_trace::verify::{check_entry_alone, ClosureVerifier, DrvSet, Outcome, Request};
use build_trace::{error_chain, Statement};
use channel::messages::AttesterKind;
use nix_formats::StorePath;
use sha2::Digest;

use crate::core::publish::{publish_verified_trace, PublishConfig, VerifiedTrace};
use crate::core::Derivations;

pub use build_trace::source::Location as TraceLocation;

/// Why a builder's trace was not published here.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// No trace location for the machine.
    #[error(
        "no trace location for builder {0} (name it with --builder-traces MACHINE=LOCATION), so \
         its step cannot be verified"
    )]
    NoLocation(String),
    /// The builder's trace store cannot be opened (a directory that is not one; a server that
    /// does not answer, or not as a binary cache).
    #[error("opening the traces of builder {0}")]
    Open(String, #[source] Box<SourceError>),
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
    /// An output's NAR could not be downloaded.
    #[error("downloading the NAR of output {0}")]
    NarFetch(String, #[source] FetchError),
    /// An output's NAR is not at the builder (404).
    #[error("the NAR of output {output} is not at the builder: {url} answered HTTP 404")]
    NarMissing {
        /// The output's name.
        output: String,
        /// Where it was asked for.
        url: String,
    },
    /// An output's NAR has other bytes than its statement says.
    #[error("{url} is not the NAR of output {output} its statement names: {problem}")]
    NarMismatch {
        /// The output's name.
        output: String,
        /// Where it came from.
        url: String,
        /// Size or hash.
        problem: String,
    },
    /// A file for a downloaded NAR.
    #[error("a file for a downloaded NAR in {0}")]
    NarFile(PathBuf, #[source] std::io::Error),
    /// Publishing.
    #[error("publishing")]
    Publish(#[source] crate::core::publish::PublishError),
}

/// Each builder's trace location, by its name in the machines file, and how remote ones are
/// read.
#[derive(Debug, Clone)]
pub struct BuilderTraces {
    /// Machine name → where its trace store is.
    pub machines: BTreeMap<String, TraceLocation>,
    /// How `http(s)://` locations are read: the CA roots (`--builder-tls-ca`, else
    /// `SSL_CERT_FILE`); the fetch cache is set by `super::Closures::start`.
    pub fetch: FetchOptions,
}

impl Default for BuilderTraces {
    fn default() -> Self {
        let fetch = FetchOptions { ca_option: "--builder-tls-ca", ..FetchOptions::default() };
        BuilderTraces { machines: BTreeMap::new(), fetch }
    }
}

impl BuilderTraces {
    /// Parse `MACHINE=LOCATION` (the machine as its machines file line names it, which may
    /// itself hold `=`): the location starts at the last `=` followed by `/`, `file://`,
    /// `http://` or `https://`, and is an absolute directory, `file://` of one, or
    /// `http(s)://HOST[:PORT][/prefix]`.
    pub fn parse_one(arg: &str) -> Result<(String, TraceLocation), String> {
        let bad = |why: &str| format!("--builder-traces {arg:?}: {why}");
        let starts = ["/", "file://", "http://", "https://"];
        let at = arg
            .match_indices('=')
            .map(|(i, _)| i)
            .rfind(|&i| starts.iter().any(|s| arg[i + 1..].starts_with(s)))
            .ok_or_else(|| {
                bad("expected MACHINE=LOCATION, LOCATION an absolute DIR, file://DIR or \
                     http(s)://HOST[:PORT][/prefix]")
            })?;
        let (machine, location) = (&arg[..at], &arg[at + 1..]);
        if machine.is_empty() {
            return Err(bad("no machine before `=`"));
        }
        let loc = TraceLocation::parse(location).map_err(|e| bad(&e.to_string()))?;
        if let TraceLocation::Dir(d) = &loc {
            if !d.is_absolute() {
                return Err(bad("the directory must be absolute"));
            }
        }
        Ok((machine.to_owned(), loc))
    }

    /// Add `MACHINE=LOCATION` ([`Self::parse_one`]); a machine named twice is refused.
    pub fn add(&mut self, arg: &str) -> Result<(), String> {
        let (machine, loc) = Self::parse_one(arg)?;
        if self.machines.contains_key(&machine) {
            return Err(format!("--builder-traces: machine {machine:?} is named twice"));
        }
        self.machines.insert(machine, loc);
        Ok(())
    }

    /// The location of `machine`'s traces.
    pub fn of(&self, machine: &str) -> Option<&TraceLocation> {
        self.machines.get(machine)
    }
}

/// Where `loc` is, for logs: the directory, or the base URL.
pub fn location_text(loc: &TraceLocation) -> String {
    match loc {
        TraceLocation::Dir(d) => d.display().to_string(),
        TraceLocation::Http(u) => u.clone(),
    }
}

/// A writer that hashes what it writes.
struct Hashing<W> {
    inner: W,
    sha: sha2::Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Download the NAR of output `name` (`o`) from `f` into `dir`: stopped one byte past its size,
/// checked against its size and hash. Its file.
fn download_nar(
    f: &Fetcher,
    name: &str,
    o: &OutputInfo,
    dir: &Path,
) -> Result<PathBuf, TraceError> {
    let base = format!("{}.nar", nix_formats::base32::encode(&o.nar_hash.0));
    let rel = format!("nar/{base}");
    // Named by its hash, never by the output's name.
    let (url, file) = (f.url(&rel), dir.join(&base));
    let out = std::fs::File::create(&file).map_err(|e| TraceError::NarFile(file.clone(), e))?;
    let mut w = Hashing { inner: std::io::BufWriter::new(out), sha: sha2::Sha256::new() };
    let got =
        f.download(&rel, &mut w, o.nar_size).map_err(|e| TraceError::NarFetch(name.into(), e))?;
    let n = got.ok_or_else(|| TraceError::NarMissing { output: name.into(), url: url.clone() })?;
    w.flush().map_err(|e| TraceError::NarFile(file.clone(), e))?;
    let mismatch = |problem: String| TraceError::NarMismatch {
        output: name.into(),
        url: url.clone(),
        problem,
    };
    if n != o.nar_size {
        return Err(mismatch(format!("{n} bytes, the statement says {}", o.nar_size)));
    }
    let digest: [u8; 32] = w.sha.finalize().into();
    if digest != o.nar_hash.0 {
        return Err(mismatch(format!(
            "its SHA-256 is {}, the statement says {}",
            nix_formats::base32::encode(&digest),
            nix_formats::base32::encode(&o.nar_hash.0)
        )));
    }
    Ok(file)
}

/// The NAR files of `st`'s outputs at `theirs`: a directory's own, or downloaded into a new
/// directory under `work` (removed when the returned guard is dropped).
fn nar_files(
    theirs: &Traces,
    st: &Statement,
    work: &Path,
) -> Result<(BTreeMap<String, PathBuf>, Option<tempfile::TempDir>), TraceError> {
    let nar = |o: &OutputInfo| format!("{}.nar", nix_formats::base32::encode(&o.nar_hash.0));
    match theirs {
        Traces::Dir(s) => {
            let dir = s.root().join("nar");
            Ok((st.outputs.iter().map(|(n, o)| (n.clone(), dir.join(nar(o)))).collect(), None))
        }
        Traces::Http(h) => {
            std::fs::create_dir_all(work).map_err(|e| TraceError::NarFile(work.into(), e))?;
            let tmp = tempfile::Builder::new()
                .prefix("nars-")
                .tempdir_in(work)
                .map_err(|e| TraceError::NarFile(work.into(), e))?;
            let mut files = BTreeMap::new();
            for (n, o) in &st.outputs {
                files.insert(n.clone(), download_nar(h.fetcher(), n, o, tmp.path())?);
            }
            Ok((files, Some(tmp)))
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
    /// Where NARs downloaded from remote builders wait for the publish step.
    pub downloads: &'a Path,
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
        let theirs = Traces::open_at(loc, &self.builders.fetch)
            .map_err(|e| TraceError::Open(machine.into(), Box::new(e)))?;
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
        let entries = theirs.entries(key).map_err(|e| TraceError::Read(theirs.describe(), e))?;
        for entry in entries {
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
            return self.publish_entry(&theirs, key, &entry, &verdict.statement, verdict.kind);
        }
        Err(TraceError::NoEntry(key.clone()))
    }

    fn publish_entry(
        &self,
        theirs: &Traces,
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
        let (nars, downloaded) = nar_files(theirs, st, self.downloads)?;
        let t = VerifiedTrace { statement: st, evidence: &evidence, attester, nars };
        let published = publish_verified_trace(&t, self.publish).map_err(TraceError::Publish)?;
        drop(downloaded);
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
        let http = |s: &str| TraceLocation::Http(s.into());
        let file = "ssh-ng://b?remote-program=/opt/vouch-b=file:///srv/b/cache";
        let cases = [
            (
                file,
                "ssh-ng://b?remote-program=/opt/vouch-b",
                TraceLocation::Dir("/srv/b/cache".into()),
            ),
            (
                "ssh-ng://b?remote-program=/x=http://b:8080/",
                "ssh-ng://b?remote-program=/x",
                http("http://b:8080"),
            ),
            (
                "ssh-ng://b=https://b.example/traces/v1",
                "ssh-ng://b",
                http("https://b.example/traces/v1"),
            ),
            // An `=` inside the URL is the URL's: the last `=` that starts a location splits.
            ("ssh://b=http://b/p=q", "ssh://b", http("http://b/p=q")),
        ];
        for (arg, machine, loc) in cases {
            assert_eq!(BuilderTraces::parse_one(arg), Ok((machine.to_owned(), loc)), "{arg}");
        }
    }

    #[test]
    fn bad_builder_traces_are_refused_naming_why() {
        let cases = [
            ("ssh-ng://b", "expected MACHINE=LOCATION"),
            ("=/x", "no machine"),
            ("=http://h", "no machine"),
            ("ssh-ng://b=relative/dir", "expected MACHINE=LOCATION"),
            ("ssh-ng://b=file://relative", "must be absolute"),
            ("ssh-ng://b=file://", "names no trace store"),
            ("ssh-ng://b=http://", "names no trace store"),
            ("ssh-ng://b=http://h/x?y", "names no trace store"),
            ("ssh-ng://b=s3://bucket", "expected MACHINE=LOCATION"),
        ];
        for (arg, why) in cases {
            let e = BuilderTraces::parse_one(arg).expect_err(arg);
            assert!(e.contains(why) && e.contains(arg), "{arg}: {e}");
        }
        let mut t = BuilderTraces::default();
        t.add("ssh://b=/x").unwrap();
        assert!(t.add("ssh://b=http://b").unwrap_err().contains("named twice"));
        assert_eq!(t.of("ssh://b"), Some(&TraceLocation::Dir("/x".into())));
    }
}
