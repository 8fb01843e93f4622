//! The trace store: a binary-cache directory Nix reads (`nix copy --from file://DIR`) plus
//! vouch's own per-step files, with an atomic writer and the reader the verifier uses.
//!
//! Layout (`docs/trace-store.md` is the reference):
//! ```text
//! nix-cache-info                                  StoreDir, WantMassQuery, Priority
//! <hash>.narinfo                                  one per output path, signed, written last
//! nar/<filehash>.nar                              uncompressed NAR (file hash = NAR hash)
//! realisations/sha256:<hex>!<out>.doi             Nix ≤ 2.34 realisation (CA steps)
//! build-trace-v2/<drv base>/<out>.doi             Nix ≥ 2.35 build-trace value (CA steps)
//! vouch/v1/steps/<drv base>/<entry>/statement.json   canonical statement
//!                                   evidence.json    evidence bundle (if any)
//!                                   jws/<thumb>.jws  laut JWS by key (SPKI thumbprint prefix)
//!                                   times.json       when the launcher ran it (its clock; written
//!                                                    by the launcher after the step, unsigned)
//! vouch/v1/by-output/<out hash part>/<drv base>/<entry>   empty marker: output → step
//! traces/<drv hash part>                          laut's index: {"signatures":[every JWS of the step]}
//! log/checkpoint, log/tile/…, log/index/<entry>   the transparency log (`crate::tlog`), if attached
//! ```
//! `<drv base>` is the step's drv path base name: the resolved drv for content-addressed steps,
//! the unresolved (input-addressed) drv otherwise. `<entry>` is the first 32 hex digits of the
//! SHA-256 of the statement's canonical bytes, so writing the same step twice is idempotent and
//! different builds of one derivation sit side by side.
//!
//! Atomicity: every file is written to a temporary name, fsynced and renamed into place; a step
//! directory is assembled under `vouch/v1/tmp/` and renamed whole. Order: NARs, the step
//! directory, index markers and laut's index, realisations, then narinfos — a reader never sees a narinfo whose
//! NAR, or a step whose files, are missing. With a log attached ([`TraceStore::with_log`]) the
//! step's entry is appended to it last, once per entry id (re-publishing appends nothing).
//! Temporary names carry the writer's pid ([`tmp_prefix`], [`tmp_owner`]): a writer that dies
//! mid-step leaves only such names (never a narinfo), which the launcher's start-up recovery
//! removes once that pid is gone (`host_launcher::recovery`).
//!
//! By feature: opening a store and reading it ([`TraceSource`]) with `verifier`; creating one,
//! writing steps, laut's index and the audit with `producer`.
//!
//! What is not here: checking evidence (the launcher checks before it writes; the verifier
//! after it reads), or the signing formats themselves (`crate::sign`, [`crate::jws`]).

#[cfg(feature = "producer")]
use std::collections::BTreeMap;
use std::fs;
use std::io;
#[cfg(feature = "producer")]
use std::io::Read;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix_formats::StorePath;
use sha2::{Digest, Sha256};

#[cfg(feature = "producer")]
use crate::evidence::EvidenceBundle;
#[cfg(feature = "producer")]
use nix_formats::signing::SecretKey;

#[cfg(feature = "producer")]
use crate::job::NarHash;
#[cfg(feature = "producer")]
use crate::sign;
#[cfg(feature = "producer")]
use crate::statement::Statement;
use crate::statement::StatementError;

#[cfg(feature = "producer")]
mod audit;
#[cfg(feature = "producer")]
mod entries;
#[cfg(feature = "producer")]
mod laut_index;
#[cfg(feature = "producer")]
mod log_sync;
mod reader;
#[cfg(feature = "producer")]
pub use audit::{AuditOptions, AuditReport, Finding, Problem};
pub use reader::{MemoryTraces, TraceEntry, TraceSource};

/// The `nix-cache-info` this store writes.
pub const NIX_CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";
pub(crate) const VOUCH_DIR: &str = "vouch/v1";

/// Why the trace store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("trace store: {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The statement is malformed.
    #[error("statement")]
    Statement(#[source] StatementError),
    /// A NAR does not match the statement.
    #[error("NAR for output `{output}`: {problem}")]
    Nar {
        /// The output.
        output: String,
        /// What differs.
        problem: String,
    },
    /// A file in the store is malformed.
    #[error("trace store file {path}: {problem}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The Nix records could not be signed.
    #[cfg(feature = "producer")]
    #[error("signing the step's Nix records")]
    Sign(#[source] sign::SignError),
    /// The JWS could not be made.
    #[error("signing the step's JWS")]
    Jws(#[source] crate::jws::JwsError),
    /// The step could not be appended to the transparency log.
    #[error("appending the step to the transparency log")]
    Log(#[source] crate::tlog::TlogError),
    /// A remote trace store gave no usable answer.
    #[cfg(feature = "remote")]
    #[error("remote trace store")]
    Remote(#[source] crate::source::FetchError),
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_path_buf(), source }
}

/// The name prefix of every temporary file the writers of a trace store (and of its log) make:
/// `.tmp-<pid>-`, so that a process cleaning up after a crash can tell a dead writer's leftovers
/// ([`tmp_owner`]) from a live writer's work.
pub fn tmp_prefix() -> String {
    format!(".tmp-{}-", std::process::id())
}

/// The pid of the writer that made the temporary file or step directory named `name`
/// (`.tmp-<pid>-…`, or `step-<pid>-…` under `vouch/v1/tmp/`); `None` if `name` is not one.
pub fn tmp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(".tmp-").or_else(|| name.strip_prefix("step-"))?;
    rest.split('-').next()?.parse().ok()
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory (created
/// exclusively, named after this process and a counter: [`tmp_prefix`]), fsync, rename, fsync of
/// the directory. (`std` only, so verifier-only builds, which persist their accepted log
/// checkpoints, have it.)
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("{}{n}", tmp_prefix()));
    let written = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(feature = "producer")]
/// What the launcher hands the writer for one step (after it has checked statement and
/// evidence).
#[derive(Debug)]
pub struct StepRecord<'a> {
    /// The statement.
    pub statement: &'a Statement,
    /// The evidence bundle (absent only for key-signed steps).
    pub evidence: Option<&'a EvidenceBundle>,
    /// `sev-snp` or `simulated`: a label for humans in the JWS; verifiers use the root.
    pub evidence_kind: &'a str,
    /// For each output name, a file holding its NAR (copied and re-hashed).
    pub nars: BTreeMap<String, PathBuf>,
}

#[cfg(feature = "producer")]
/// What [`TraceStore::put_step_as`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publication {
    /// The step and its cache entries: the narinfos and realisations every client of the
    /// binary cache reads (and that resolve later derivations).
    Cache,
    /// The step (statement, evidence, JWS, index markers, log entry) only: its outputs are
    /// not vouched for to the cache's clients (a build that read a client's private inputs).
    StepOnly,
}

#[cfg(feature = "producer")]
/// Where a step went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutResult {
    /// The step directory.
    pub step_dir: PathBuf,
    /// The entry id.
    pub entry: String,
    /// By output name: the outputs whose published records an earlier, different build of the
    /// step wrote and which were kept (a divergent build; its entry records this in
    /// `divergent.json`).
    pub diverged: BTreeMap<String, Divergence>,
    /// Where the step's entry is in the transparency log, if one is attached.
    pub log: Option<crate::tlog::AppendResult>,
    /// The Nix records signed for this step (one signing per step: the writer's, whose
    /// narinfos, realisations and build-trace entries are the ones written here; a narinfo's
    /// URL and file fields are the store's).
    pub records: sign::StepRecords,
}

#[cfg(feature = "producer")]
/// One output of a divergent build: what the store kept instead of this build's records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Divergence {
    /// This build's NAR hash (its own: never the kept one).
    pub nar_hash: NarHash,
    /// The records kept (narinfo, realisation, build-trace entry), relative to the store root.
    pub kept: Vec<String>,
    /// The NAR hash the kept narinfo names, when the narinfo was kept.
    pub published_nar_hash: Option<NarHash>,
    /// The output path the kept realisation or build-trace entry names, when one was kept.
    pub published_path: Option<StorePath>,
}

/// A trace store directory.
#[derive(Debug, Clone)]
pub struct TraceStore {
    root: PathBuf,
    #[cfg(feature = "producer")]
    log: Option<crate::tlog::LogWriter>,
}

/// The entry id of a statement: 32 hex digits of SHA-256 of its canonical bytes.
pub fn entry_id(statement_bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(statement_bytes)[..16])
}

impl TraceStore {
    /// Open an existing store (for reading).
    pub fn open(root: &Path) -> Result<TraceStore, StoreError> {
        let info = root.join("nix-cache-info");
        fs::metadata(&info).map_err(io_err("open", &info))?;
        Ok(TraceStore {
            root: root.to_path_buf(),
            #[cfg(feature = "producer")]
            log: None,
        })
    }

    /// Open or create a store (for writing).
    #[cfg(feature = "producer")]
    pub fn create(root: &Path) -> Result<TraceStore, StoreError> {
        for sub in [
            "nar",
            "realisations",
            "build-trace-v2",
            laut_index::DIR,
            "vouch/v1/steps",
            "vouch/v1/by-output",
            "vouch/v1/tmp",
        ] {
            let d = root.join(sub);
            fs::create_dir_all(&d).map_err(io_err("create", &d))?;
        }
        let info = root.join("nix-cache-info");
        if !info.exists() {
            write_atomic(&info, NIX_CACHE_INFO.as_bytes()).map_err(io_err("write", &info))?;
        }
        Ok(TraceStore { root: root.to_path_buf(), log: None })
    }

    /// Append every step this store writes to the transparency log in `<root>/log`, signed by
    /// `key` (`docs/transparency-log.md`).
    #[cfg(feature = "producer")]
    pub fn with_log(mut self, key: crate::tlog::LogKey) -> Result<TraceStore, StoreError> {
        let dir = self.root.join(crate::tlog::LOG_DIR);
        self.log = Some(crate::tlog::LogWriter::open(&dir, key).map_err(StoreError::Log)?);
        Ok(self)
    }

    /// The attached log.
    #[cfg(feature = "producer")]
    pub fn log(&self) -> Option<&crate::tlog::LogWriter> {
        self.log.as_ref()
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of all entries of a step (by drv path).
    pub fn step_dir(&self, drv_path: &StorePath) -> PathBuf {
        self.root.join(VOUCH_DIR).join("steps").join(drv_path.base_name())
    }

    #[cfg(feature = "producer")]
    /// Write one step: NARs, statement, evidence, a JWS signed by `key`, index markers, Nix
    /// realisations (both formats, for content-addressed steps), then the narinfos. Idempotent.
    pub fn put_step(
        &self,
        step: &StepRecord<'_>,
        key: &SecretKey,
    ) -> Result<PutResult, StoreError> {
        self.put_step_as(step, key, Publication::Cache)
    }

    #[cfg(feature = "producer")]
    /// [`Self::put_step`], or with [`Publication::StepOnly`] everything but the cache entries
    /// (realisations and narinfos): the records are signed and returned all the same.
    pub fn put_step_as(
        &self,
        step: &StepRecord<'_>,
        key: &SecretKey,
        publication: Publication,
    ) -> Result<PutResult, StoreError> {
        let st = step.statement;
        st.validate().map_err(StoreError::Statement)?;
        let statement_bytes = st.canonical_bytes().map_err(StoreError::Statement)?;
        let entry = entry_id(&statement_bytes);

        // 1. NARs, each re-hashed while copied.
        let mut nar_files = BTreeMap::new();
        for (name, out) in &st.outputs {
            let src = step.nars.get(name).ok_or_else(|| StoreError::Nar {
                output: name.clone(),
                problem: "no NAR file given".into(),
            })?;
            nar_files.insert(name.clone(), self.put_nar(name, src, &out.nar_hash, out.nar_size)?);
        }

        // 2. The step directory, assembled in tmp/ and renamed whole.
        let records = sign::step_records(st, key).map_err(StoreError::Sign)?;
        let step_dir = self.step_dir(&st.job.drv_path);
        let final_dir = step_dir.join(&entry);
        let evidence_bytes = step.evidence.map(EvidenceBundle::to_json);
        let jws = crate::jws::sign(
            st,
            evidence_bytes.as_deref().map(str::as_bytes),
            step.evidence_kind,
            key,
        )
        .map_err(StoreError::Jws)?;
        let thumb = &hex::encode(crate::jws::spki_thumbprint(&crate::jws::verifying_key(
            &key.public_key(),
        )))[..16];
        if final_dir.exists() {
            let p = final_dir.join("jws").join(format!("{thumb}.jws"));
            if !p.exists() {
                write_atomic(&p, jws.as_bytes()).map_err(io_err("write", &p))?;
            }
        } else {
            self.put_step_dir(
                &step_dir,
                &final_dir,
                &statement_bytes,
                evidence_bytes.as_deref(),
                thumb,
                &jws,
            )?;
        }

        // 3. Index markers (output → step entry) and laut's signature index of the step.
        self.put_markers(st, &step_dir, &entry)?;

        // 4. Realisations (content-addressed steps), keeping divergent existing ones; 5. the
        // narinfos, last.
        let mut diverged: BTreeMap<String, Divergence> = BTreeMap::new();
        if publication == Publication::Cache {
            self.put_realisations(st, &records, &mut diverged)?;
            self.put_narinfos(st, &records, &nar_files, &mut diverged)?;
        }
        if !diverged.is_empty() {
            let p = final_dir.join("divergent.json");
            let body = serde_json::to_string_pretty(&serde_json::json!({ "outputs": &diverged }))
                .expect("divergences serialise");
            write_atomic(&p, body.as_bytes()).map_err(io_err("write", &p))?;
        }
        // 6. The transparency log, once the step is readable.
        let log = match &self.log {
            Some(w) => {
                // The evidence as stored: an earlier writer's, if the entry existed.
                let stored = fs::read(final_dir.join("evidence.json")).ok();
                let e = crate::tlog::LogEntry::for_step(
                    st,
                    &statement_bytes,
                    stored.as_deref(),
                    Some(&jws),
                );
                w.append(&[e]).map_err(StoreError::Log)?.pop()
            }
            None => None,
        };
        Ok(PutResult { step_dir: final_dir, entry, diverged, log, records })
    }

    #[cfg(feature = "producer")]
    fn put_step_dir(
        &self,
        step_dir: &Path,
        final_dir: &Path,
        statement_bytes: &[u8],
        evidence: Option<&str>,
        thumb: &str,
        jws: &str,
    ) -> Result<(), StoreError> {
        let tmp_root = self.root.join(VOUCH_DIR).join("tmp");
        let tmp = tempfile::Builder::new()
            .prefix(&format!("step-{}-", std::process::id()))
            .tempdir_in(&tmp_root)
            .map_err(io_err("create", &tmp_root))?;
        let t = tmp.path();
        let jws_dir = t.join("jws");
        fs::create_dir(&jws_dir).map_err(io_err("create", &jws_dir))?;
        write_synced(&t.join("statement.json"), statement_bytes)?;
        if let Some(ev) = evidence {
            write_synced(&t.join("evidence.json"), ev.as_bytes())?;
        }
        write_synced(&jws_dir.join(format!("{thumb}.jws")), jws.as_bytes())?;
        sync_dir(&jws_dir)?;
        sync_dir(t)?;
        fs::create_dir_all(step_dir).map_err(io_err("create", step_dir))?;
        let t = tmp.keep();
        match fs::rename(&t, final_dir) {
            Ok(()) => {}
            // Another writer won the race with the same (content-addressed) entry: add this
            // key's JWS to it if that writer signed with another key.
            Err(_) if final_dir.join("statement.json").exists() => {
                let _ = fs::remove_dir_all(&t);
                let p = final_dir.join("jws").join(format!("{thumb}.jws"));
                if !p.exists() {
                    write_atomic(&p, jws.as_bytes()).map_err(io_err("write", &p))?;
                }
            }
            Err(e) => return Err(io_err("rename", final_dir)(e)),
        }
        sync_dir(step_dir)
    }

    #[cfg(feature = "producer")]
    /// Copy a NAR into `nar/`, checking its hash and size; returns (file hash, file size).
    fn put_nar(
        &self,
        output: &str,
        src: &Path,
        want: &NarHash,
        size: u64,
    ) -> Result<(NarHash, u64), StoreError> {
        let nar_dir = self.root.join("nar");
        let dest = nar_dir.join(format!("{}.nar", nix_formats::base32::encode(&want.0)));
        let mut input = fs::File::open(src).map_err(io_err("open", src))?;
        if dest.exists() {
            return Ok((*want, size));
        }
        let mut tmp = tempfile::Builder::new()
            .prefix(&tmp_prefix())
            .tempfile_in(&nar_dir)
            .map_err(io_err("create", &nar_dir))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(io_err("read", src))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(io_err("write", &nar_dir))?;
            total += n as u64;
        }
        let got = NarHash(hasher.finalize().into());
        if got != *want || total != size {
            return Err(StoreError::Nar {
                output: output.into(),
                problem: format!(
                    "{} has {got} ({total} bytes), the statement says {want} ({size} bytes)",
                    src.display()
                ),
            });
        }
        tmp.as_file().sync_all().map_err(io_err("sync", &dest))?;
        tmp.persist(&dest).map_err(|e| io_err("rename", &dest)(e.error))?;
        sync_dir(&nar_dir)?;
        Ok((got, total))
    }

    #[cfg(feature = "producer")]
    /// Rebuild laut's signature index (`traces/`) of every step; how many steps it lists.
    pub fn reindex_laut(&self) -> Result<usize, StoreError> {
        laut_index::rebuild_all(&self.root, &self.root.join(VOUCH_DIR).join("steps"))
    }

    /// `path` (under the root) relative to the root.
    #[cfg(feature = "producer")]
    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root).unwrap_or(path).display().to_string()
    }

    /// `<root>/<hash part>.narinfo` of an output path.
    pub fn narinfo_path(&self, out_path: &StorePath) -> PathBuf {
        self.root.join(format!("{}.narinfo", out_path.hash_part()))
    }

    /// The output this store accepted for `output` of the resolved derivation `drv_path`: the
    /// `outPath` of its published build-trace entry (`build-trace-v2/<drv>/<output>.doi`, which
    /// only a checked floating content-addressed step writes, first build first), if any.
    pub fn published_output(&self, drv_path: &StorePath, output: &str) -> Option<StorePath> {
        if output.is_empty() || output.starts_with('.') || output.contains('/') {
            return None;
        }
        let p = self.root.join("build-trace-v2").join(drv_path.base_name());
        let bytes = fs::read(p.join(format!("{output}.doi"))).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        StorePath::from_base_name(v.get("outPath")?.as_str()?).ok()
    }
}

#[cfg(feature = "producer")]
/// Write `bytes` to `path` only if nothing is there, atomically (a temporary file, fsynced, then
/// hard-linked into place, which never replaces a file, so two writers racing for one name
/// cannot swap what a reader saw); whether this call wrote it.
fn write_new(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    let linked = fs::hard_link(tmp.path(), path);
    drop(tmp);
    match linked {
        Ok(()) => {
            fs::File::open(dir)?.sync_all()?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(feature = "producer")]
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut f = fs::File::create(path).map_err(io_err("create", path))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io_err("write", path))
}

#[cfg(feature = "producer")]
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io_err("sync", dir))
}

#[cfg(test)]
mod tmp_names {
    use super::*;

    #[test]
    fn temporary_names_carry_their_writers_pid() {
        let me = std::process::id();
        assert_eq!(tmp_owner(&format!("{}0", tmp_prefix())), Some(me));
        assert_eq!(tmp_owner(".tmp-123-Ab9x"), Some(123));
        assert_eq!(tmp_owner("step-55-q1w2"), Some(55));
        for other in ["abc.narinfo", ".tmp-key-xyz", "step-", ".tmp-", "nar"] {
            assert_eq!(tmp_owner(other), None, "{other}");
        }
    }
}
