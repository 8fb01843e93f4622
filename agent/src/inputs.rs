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

use build_trace::job::{Job, NarHash, PathInfo};
use nix_formats::content_address::ContentAddress;
use nix_formats::nar::{NarDump, NarHasher, NarLimits, UnpackOptions};
use nix_formats::refs::RefScanner;
use nix_formats::store_path::FileIngestionMethod;
use nix_formats::{HashAlgo, StorePath};

use channel::messages::NarBegin;
use channel::proto::{FrameReader, Kind, ProtoError};

/// Why inputs were refused.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Channel trouble.
    #[error("receiving inputs")]
    Proto(#[from] ProtoError),
    /// A path that is not in the job's closure.
    #[error("the host sent {0}, which is not in the job's input closure")]
    NotInClosure(StorePath),
    /// The same path twice.
    #[error("the host sent {0} twice")]
    Twice(StorePath),
    /// A closure path never arrived.
    #[error("input {0} of the job's closure was not sent")]
    Missing(StorePath),
    /// Unpacking failed (invalid NAR, or file system).
    #[error("unpacking input {0}")]
    Unpack(StorePath, #[source] nix_formats::nar::UnpackError),
    /// The NAR hash differs from the job.
    #[error(
        "input {path}: NAR hash mismatch: the job says {expected}, the received NAR has {actual}"
    )]
    HashMismatch {
        /// Path.
        path: StorePath,
        /// From the job.
        expected: String,
        /// Received.
        actual: String,
    },
    /// The NAR size differs from the job.
    #[error("input {path}: NAR size mismatch: the job says {expected} bytes, received {actual}")]
    SizeMismatch {
        /// Path.
        path: StorePath,
        /// From the job.
        expected: u64,
        /// Received.
        actual: String,
    },
    /// Bytes after the end of the NAR.
    #[error("input {0}: data after the end of the NAR")]
    Trailing(StorePath),
    /// A claimed content address does not hold.
    #[error("input {0}: its content address does not match its contents")]
    Ca(String, #[source] nix_formats::content_address::VerifyError),
    /// A claimed content address does not parse.
    #[error("input {0}: {1}")]
    Bad(StorePath, String),
}

impl InputError {
    /// Whether this is a content-address failure (vs. a NAR hash/size/protocol one).
    pub fn is_ca(&self) -> bool {
        matches!(self, InputError::Ca(..) | InputError::Bad(..))
    }
}

struct Tee<'a, R: Read> {
    inner: R,
    hasher: &'a mut NarHasher,
    own: &'a mut RefScanner,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.own.feed(&buf[..n]);
        Ok(n)
    }
}

/// What [`receive`] established.
#[derive(Debug, Default)]
pub struct Received {
    /// Paths in arrival order.
    pub order: Vec<StorePath>,
    /// Paths whose NAR contains their own hash part (self-references).
    pub self_referencing: BTreeSet<StorePath>,
}

/// Receive `NarBegin`/chunks/`NarEnd` per path until `InputsDone`, unpacking under `store_dir`
/// (the guest's `/nix/store`; a different directory in tests) and checking each against `job`.
/// `progress` gets each path as it completes. Returns the paths in arrival order.
pub fn receive<R: Read>(
    rd: &mut FrameReader<R>,
    job: &Job,
    store_dir: &Path,
    progress: &mut dyn FnMut(&StorePath),
) -> Result<Received, InputError> {
    let mut got = BTreeSet::new();
    let mut out = Received::default();
    let opts = UnpackOptions { limits: NarLimits::default(), canonical: true };
    loop {
        let f = rd.expect_frame("an input NAR or InputsDone")?;
        match f.kind {
            Kind::InputsDone => break,
            Kind::NarBegin => {}
            other => {
                return Err(ProtoError::Unexpected {
                    expected: "an input NAR or InputsDone",
                    got: other,
                }
                .into())
            }
        }
        let begin: NarBegin = f.json()?;
        let info = job
            .closure
            .get(&begin.path)
            .ok_or_else(|| InputError::NotInClosure(begin.path.clone()))?;
        if !got.insert(begin.path.clone()) {
            return Err(InputError::Twice(begin.path));
        }
        let dest = store_dir.join(begin.path.base_name());
        let self_referencing = receive_nar(rd, &begin, info, &dest, &opts)?;
        progress(&begin.path);
        if self_referencing {
            out.self_referencing.insert(begin.path.clone());
        }
        out.order.push(begin.path);
    }
    if let Some(missing) = job.closure.keys().find(|p| !got.contains(*p)) {
        return Err(InputError::Missing(missing.clone()));
    }
    Ok(out)
}

/// One input's NAR after its `NarBegin` (`begin`): unpacked at `dest` while hashed, then checked
/// against the closure's `info` (size and hash). Whether it refers to itself.
fn receive_nar<R: Read>(
    rd: &mut FrameReader<R>,
    begin: &NarBegin,
    info: &PathInfo,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<bool, InputError> {
    let mut hasher = NarHasher::new();
    let mut own = RefScanner::new([begin.path.clone()]);
    {
        let mut stream = rd.nar_stream(&begin.path.to_string(), begin.nar_size);
        let unpacked = nix_formats::nar::unpack(
            Tee { inner: &mut stream, hasher: &mut hasher, own: &mut own },
            dest,
            opts,
        );
        if let Err(e) = unpacked {
            // A channel-level problem (e.g. fewer or more bytes than announced) explains
            // the failure better than "invalid NAR".
            return Err(match stream.take_error() {
                Some(ProtoError::NarTooShort { got, .. }) => InputError::SizeMismatch {
                    path: begin.path.clone(),
                    expected: info.nar_size,
                    actual: got.to_string(),
                },
                Some(ProtoError::NarTooLong { .. }) => InputError::SizeMismatch {
                    path: begin.path.clone(),
                    expected: info.nar_size,
                    actual: format!("more than {}", begin.nar_size),
                },
                Some(pe) => InputError::Proto(pe),
                None => InputError::Unpack(begin.path.clone(), e),
            });
        }
        let before = hasher.size();
        let mut rest = Vec::new();
        let trailing =
            Tee { inner: &mut stream, hasher: &mut hasher, own: &mut own }.read_to_end(&mut rest);
        if trailing.is_err() || hasher.size() != before {
            return Err(match stream.take_error() {
                Some(ProtoError::NarTooShort { got, .. }) => InputError::SizeMismatch {
                    path: begin.path.clone(),
                    expected: info.nar_size,
                    actual: got.to_string(),
                },
                Some(pe) => InputError::Proto(pe),
                None => InputError::Trailing(begin.path.clone()),
            });
        }
    }
    let digest = hasher.finish();
    let actual = NarHash(digest.sha256);
    if digest.size != info.nar_size {
        return Err(InputError::SizeMismatch {
            path: begin.path.clone(),
            expected: info.nar_size,
            actual: digest.size.to_string(),
        });
    }
    if actual != info.nar_hash {
        return Err(InputError::HashMismatch {
            path: begin.path.clone(),
            expected: info.nar_hash.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(!own.references().is_empty())
}

/// Recompute the content address of every closure path that claims one; returns
/// path → `ca` for the statement's `input_cas`.
///
/// A recursive SHA-256 address of a path whose NAR does not contain its own hash part is the
/// NAR hash itself (nothing to zero, no positions to append, under either self-reference
/// rule), and the NAR hash was just checked against the bytes: such paths are not re-read.
/// Every other claim is recomputed from the unpacked tree.
pub fn verify_content_addresses(
    job: &Job,
    store_dir: &Path,
    received: &Received,
) -> Result<BTreeMap<StorePath, String>, InputError> {
    let rule = job.ca_rule.into();
    let mut out = BTreeMap::new();
    for (path, info) in &job.closure {
        let Some(ca_str) = &info.ca else { continue };
        let ca = ContentAddress::parse(ca_str).map_err(|e| {
            InputError::Bad(path.clone(), format!("content address {ca_str:?}: {e}"))
        })?;
        let fast = matches!(&ca, ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash }
            if hash.algo() == HashAlgo::Sha256 && hash.digest() == info.nar_hash.0)
            && !received.self_referencing.contains(path)
            && !info.references.contains(path);
        if fast {
            let computed = ca
                .store_path(path.name(), &info.references, false)
                .map_err(|e| InputError::Ca(path.to_string(), e.into()))?;
            if computed != *path {
                return Err(InputError::Ca(
                    path.to_string(),
                    nix_formats::content_address::VerifyError::PathMismatch {
                        claimed: path.clone(),
                        computed,
                    },
                ));
            }
        } else {
            let on_disk: PathBuf = store_dir.join(path.base_name());
            nix_formats::content_address::verify(
                path,
                &ca,
                &info.references,
                NarDump::new(on_disk),
                rule,
                &NarLimits::default(),
            )
            .map_err(|e| InputError::Ca(path.to_string(), e))?;
        }
        out.insert(path.clone(), ca_str.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use build_trace::job::{BasicDerivation, CaRule, DrvOutput, Limits, PathInfo};
    use channel::messages::NarBegin;
    use channel::proto::FrameWriter;

    const P: &str = "/nix/store/00000000000000000000000000000000-input";

    fn sp(p: &str) -> StorePath {
        StorePath::parse(p).unwrap()
    }

    fn nar_of(contents: &[u8]) -> Vec<u8> {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("f");
        std::fs::write(&f, contents).unwrap();
        let mut nar = Vec::new();
        nix_formats::nar::dump_path(&f, &mut nar).unwrap();
        nar
    }

    fn job(nar: &[u8]) -> Job {
        job_at(P, nar, None)
    }

    fn job_at(p: &str, nar: &[u8], ca: Option<String>) -> Job {
        let drv = BasicDerivation {
            name: "t".into(),
            outputs: [(
                "out".to_owned(),
                DrvOutput { path: None, hash_algo: "r:sha256".into(), hash: String::new() },
            )]
            .into(),
            input_srcs: [sp(p)].into(),
            system: "x86_64-linux".into(),
            builder: format!("{p}/sh"),
            args: vec![],
            env: Default::default(),
        };
        let info = PathInfo {
            nar_hash: NarHash::of(nar),
            nar_size: nar.len() as u64,
            references: Default::default(),
            ca,
        };
        Job::new(
            "j",
            sp("/nix/store/11111111111111111111111111111111-t.drv"),
            drv,
            [(sp(p), info)].into(),
            Limits::default(),
            CaRule::SelfRefPositions,
            false,
            ["out".to_owned()].into(),
        )
    }

    fn frames(path: &str, announced: u64, nar: &[u8], done: bool) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        w.send_nar(&NarBegin { path: sp(path), nar_size: announced }, &mut &nar[..]).unwrap();
        if done {
            w.send(Kind::InputsDone, &[]).unwrap();
        }
        std::mem::take(w.get_mut())
    }

    fn run(job: &Job, wire: &[u8]) -> (Result<Received, InputError>, tempfile::TempDir) {
        let store = tempfile::tempdir().unwrap();
        let mut r = FrameReader::new(wire);
        (receive(&mut r, job, store.path(), &mut |_| {}), store)
    }

    #[test]
    fn good_input_is_unpacked_read_only() {
        let nar = nar_of(b"hello\n");
        let (r, store) = run(&job(&nar), &frames(P, nar.len() as u64, &nar, true));
        assert_eq!(r.unwrap().order, [sp(P)]);
        let f = store.path().join("00000000000000000000000000000000-input");
        assert_eq!(std::fs::read(&f).unwrap(), b"hello\n");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o444);
    }

    #[test]
    fn same_size_other_bytes_is_a_hash_mismatch() {
        let nar = nar_of(b"hello\n");
        let evil = nar_of(b"jello\n");
        let (r, _s) = run(&job(&nar), &frames(P, nar.len() as u64, &evil, true));
        let e = r.unwrap_err();
        assert!(matches!(e, InputError::HashMismatch { .. }), "{e}");
        assert!(e.to_string().contains("NAR hash mismatch"), "{e}");
    }

    #[test]
    fn fewer_bytes_than_the_job_says_is_a_size_mismatch() {
        let nar = nar_of(b"hello, world\n");
        let short = nar_of(b"hi\n");
        let (r, _s) = run(&job(&nar), &frames(P, nar.len() as u64, &short, true));
        let e = r.unwrap_err();
        assert!(matches!(e, InputError::SizeMismatch { .. }), "{e}");
    }

    #[test]
    fn unknown_missing_and_invalid_inputs() {
        let nar = nar_of(b"x");
        let other = "/nix/store/22222222222222222222222222222222-other";
        let (r, _s) = run(&job(&nar), &frames(other, nar.len() as u64, &nar, true));
        assert!(matches!(r, Err(InputError::NotInClosure(_))));
        let mut w = FrameWriter::new(Vec::new());
        w.send(Kind::InputsDone, &[]).unwrap();
        let (r, _s) = run(&job(&nar), w.get_mut());
        assert!(matches!(r, Err(InputError::Missing(_))));
        let garbage = b"this is not a NAR at all".to_vec();
        let (r, _s) = run(&job(&garbage), &frames(P, garbage.len() as u64, &garbage, true));
        assert!(matches!(r, Err(InputError::Unpack(..))), "{r:?}");
    }

    #[test]
    fn content_addressed_inputs_are_recomputed() {
        use nix_formats::content_address::ContentAddress;
        let nar = nar_of(b"source file\n");
        let hash = nix_formats::Hash::sha256(NarHash::of(&nar).0);
        let path = nix_formats::store_path::make_fixed_output_path(
            "src",
            FileIngestionMethod::Recursive,
            &hash,
            &BTreeSet::new(),
            false,
        )
        .unwrap()
        .to_string();
        let ca = ContentAddress::Fixed { method: FileIngestionMethod::Recursive, hash }.to_string();
        let good = job_at(&path, &nar, Some(ca.clone()));
        let (r, store) = run(&good, &frames(&path, nar.len() as u64, &nar, true));
        let received = r.unwrap();
        let cas = verify_content_addresses(&good, store.path(), &received).unwrap();
        assert_eq!(cas[&sp(&path)], ca);

        // The same contents claimed under another path name: the address does not give it.
        let other = path.replace("-src", "-not-src");
        let bad = job_at(&other, &nar, Some(ca));
        let (r, store) = run(&bad, &frames(&other, nar.len() as u64, &nar, true));
        let e = verify_content_addresses(&bad, store.path(), &r.unwrap()).unwrap_err();
        assert!(e.is_ca(), "{e}");

        // A flat claim is recomputed from the file (slow path) and must match too.
        let flat = ContentAddress::Fixed {
            method: FileIngestionMethod::Flat,
            hash: nix_formats::HashAlgo::Sha256.digest(b"other bytes"),
        };
        let wrong = job_at(&path, &nar, Some(flat.to_string()));
        let (r, store) = run(&wrong, &frames(&path, nar.len() as u64, &nar, true));
        assert!(verify_content_addresses(&wrong, store.path(), &r.unwrap()).unwrap_err().is_ca());
    }
}
