//! Receiving the input closure into the guest's `/nix/store`.
//!
//! Each path arrives as one NAR stream. It is unpacked (hostile-input safe, canonical
//! permissions, never outside its destination) while its SHA-256 and size are computed from the
//! same bytes; both must equal the job's path info, or the step fails naming the path. Paths
//! the job claims a content address for are then re-read and their content address recomputed
//! from their bytes (`nix_formats::content_address::verify`), which also checks that the path
//! name follows from it. Every closure path must arrive exactly once.
//!
//! What is not here: deciding which inputs a job may have (that is the job's validation).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use build_trace::job::{CaRule, Job, NarHash};
use nix_formats::ca::SelfRefRule;
use nix_formats::content_address::ContentAddress;
use nix_formats::nar::{NarDump, NarHasher, NarLimits, UnpackOptions};
use nix_formats::StorePath;

use crate::messages::NarBegin;
use crate::proto::{into_proto, FrameReader, Kind, ProtoError};

/// Why inputs were refused.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Channel trouble.
    #[error("receiving inputs")]
    Proto(#[from] ProtoError),
    /// A path that is not in the job's closure.
    #[error("the host sent {0}, which is not in the job's input closure")]
    NotInClosure(String),
    /// The same path twice.
    #[error("the host sent {0} twice")]
    Twice(String),
    /// A closure path never arrived.
    #[error("input {0} of the job's closure was not sent")]
    Missing(String),
    /// Unpacking failed (invalid NAR, or file system).
    #[error("unpacking input {0}")]
    Unpack(String, #[source] nix_formats::nar::UnpackError),
    /// The NAR hash differs from the job.
    #[error("input {path}: NAR hash mismatch: the job says {expected}, the received NAR has {actual}")]
    HashMismatch {
        /// Path.
        path: String,
        /// From the job.
        expected: String,
        /// Received.
        actual: String,
    },
    /// The NAR size differs from the job.
    #[error("input {path}: NAR size mismatch: the job says {expected} bytes, received {actual}")]
    SizeMismatch {
        /// Path.
        path: String,
        /// From the job.
        expected: u64,
        /// Received.
        actual: u64,
    },
    /// Bytes after the end of the NAR.
    #[error("input {0}: data after the end of the NAR")]
    Trailing(String),
    /// A claimed content address does not hold.
    #[error("input {0}: its content address does not match its contents")]
    Ca(String, #[source] nix_formats::content_address::VerifyError),
    /// A claimed content address does not parse, or the path does not.
    #[error("input {0}: {1}")]
    Bad(String, String),
}

impl InputError {
    /// Whether this is a content-address failure (vs. a NAR hash/size/protocol one).
    pub fn is_ca(&self) -> bool {
        matches!(self, InputError::Ca(..) | InputError::Bad(..))
    }
}

/// The job's self-reference rule as `nix-formats` names it.
pub fn self_ref_rule(rule: CaRule) -> SelfRefRule {
    match rule {
        CaRule::SelfRefPositions => SelfRefRule::ZeroAndPositions,
        CaRule::SelfRefZeroed => SelfRefRule::ZeroOnly,
    }
}

struct Tee<'a, R: Read> {
    inner: R,
    hasher: &'a mut NarHasher,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Receive `NarBegin`/chunks/`NarEnd` per path until `InputsDone`, unpacking under `store_dir`
/// (the guest's `/nix/store`; a different directory in tests) and checking each against `job`.
/// `progress` gets each path as it completes. Returns the paths in arrival order.
pub fn receive<R: Read>(
    rd: &mut FrameReader<R>,
    job: &Job,
    store_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<String>, InputError> {
    let mut got = BTreeSet::new();
    let mut order = Vec::new();
    let opts = UnpackOptions { limits: NarLimits::default(), canonical: true };
    loop {
        let f = rd.expect_frame("an input NAR or InputsDone")?;
        match f.kind {
            Kind::InputsDone => break,
            Kind::NarBegin => {}
            other => return Err(ProtoError::Unexpected { expected: "an input NAR or InputsDone", got: other }.into()),
        }
        let begin: NarBegin = f.json()?;
        let info = job.closure.get(&begin.path).ok_or_else(|| InputError::NotInClosure(begin.path.clone()))?;
        if !got.insert(begin.path.clone()) {
            return Err(InputError::Twice(begin.path));
        }
        let sp = StorePath::parse(&begin.path).map_err(|e| InputError::Bad(begin.path.clone(), e.to_string()))?;
        let dest = store_dir.join(sp.base_name());
        let mut hasher = NarHasher::new();
        {
            let mut stream = rd.nar_stream(&begin.path, begin.nar_size);
            let unpacked = nix_formats::nar::unpack(Tee { inner: &mut stream, hasher: &mut hasher }, &dest, &opts);
            if let Err(e) = unpacked {
                // Prefer the channel's own error (e.g. a truncated stream) over "invalid NAR".
                if !stream.finished() {
                    if let Err(pe) = stream.drain() {
                        return Err(pe.into());
                    }
                }
                return Err(InputError::Unpack(begin.path, e));
            }
            let before = hasher.size();
            let mut rest = Vec::new();
            Tee { inner: &mut stream, hasher: &mut hasher }.read_to_end(&mut rest).map_err(into_proto)?;
            if hasher.size() != before {
                return Err(InputError::Trailing(begin.path));
            }
        }
        let digest = hasher.finish();
        let actual = NarHash(digest.sha256);
        if digest.size != info.nar_size {
            return Err(InputError::SizeMismatch { path: begin.path, expected: info.nar_size, actual: digest.size });
        }
        if actual != info.nar_hash {
            return Err(InputError::HashMismatch {
                path: begin.path,
                expected: info.nar_hash.to_string(),
                actual: actual.to_string(),
            });
        }
        progress(&begin.path);
        order.push(begin.path);
    }
    if let Some(missing) = job.closure.keys().find(|p| !got.contains(*p)) {
        return Err(InputError::Missing(missing.clone()));
    }
    Ok(order)
}

/// Recompute the content address of every closure path that claims one; returns
/// path → `ca` for the statement's `input_cas`.
pub fn verify_content_addresses(job: &Job, store_dir: &Path) -> Result<BTreeMap<String, String>, InputError> {
    let rule = self_ref_rule(job.ca_rule);
    let mut out = BTreeMap::new();
    for (path, info) in &job.closure {
        let Some(ca_str) = &info.ca else { continue };
        let bad = |e: String| InputError::Bad(path.clone(), e);
        let sp = StorePath::parse(path).map_err(|e| bad(e.to_string()))?;
        let ca = ContentAddress::parse(ca_str).map_err(|e| bad(format!("content address {ca_str:?}: {e}")))?;
        let refs: BTreeSet<StorePath> = info
            .references
            .iter()
            .map(|r| StorePath::parse(r).map_err(|e| bad(e.to_string())))
            .collect::<Result<_, _>>()?;
        let on_disk: PathBuf = store_dir.join(sp.base_name());
        nix_formats::content_address::verify(&sp, &ca, &refs, NarDump::new(on_disk), rule, &NarLimits::default())
            .map_err(|e| InputError::Ca(path.clone(), e))?;
        out.insert(path.clone(), ca_str.clone());
    }
    Ok(out)
}
