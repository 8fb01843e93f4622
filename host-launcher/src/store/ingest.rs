//! Receiving one NAR into a temporary file and checking it before anything becomes valid.
//!
//! Checks, in order, all before the path can be registered (whatever the client's
//! `dontCheckSigs` says; signatures are never what we go by):
//! 1. the declared size fits the store;
//! 2. exactly `narSize` bytes arrive and they are one canonical NAR (strict parser: tokens,
//!    padding, entry order, names, no trailing data);
//! 3. their SHA-256 is the declared NAR hash;
//! 4. if the path claims a content address, the contents reproduce it and it reproduces the
//!    path with the declared references (`nix_formats::content_address::verify`), under the
//!    self-reference rule given (the client's first, then the other: both are Nix's rules, for
//!    paths made by different Nix releases).
//!
//! The file is fsynced before it is offered for commit. References are checked at commit time
//! (`super::ContentStore::commit`), against the index and the rest of the batch.
//!
//! What is not here: the index, renames, eviction (`super`).

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;

use build_trace::NarHash;
use nix_formats::ca::SelfRefRule;
use nix_formats::content_address::{self, ContentAddress};
use nix_formats::nar::{NarLimits, NarReader};
use sha2::{Digest, Sha256};

use super::{StoreError, UploadProblem};
use crate::core::ValidPathInfo;

/// A received, checked NAR in a temporary file (removed on drop unless committed).
#[derive(Debug)]
pub struct Staged {
    /// What it is.
    pub info: ValidPathInfo,
    /// The temporary file.
    pub tmp: PathBuf,
    /// Set once the file was renamed into the store.
    pub committed: bool,
}

impl Staged {
    /// Move the checked NAR to `dest`, its place in a store; from then on it is kept.
    pub fn commit_to(&mut self, dest: &std::path::Path) -> Result<(), StoreError> {
        fs::rename(&self.tmp, dest).map_err(|source| StoreError::Io {
            op: "rename",
            path: dest.to_path_buf(),
            source,
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

struct Tee<'a, R: Read + ?Sized> {
    inner: &'a mut R,
    out: BufWriter<&'a File>,
    hasher: Sha256,
    n: u64,
    write_err: Option<io::Error>,
}

impl<R: Read + ?Sized> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        if let Err(e) = self.out.write_all(&buf[..n]) {
            self.write_err = Some(io::Error::new(e.kind(), e.to_string()));
            return Err(e);
        }
        self.n += n as u64;
        Ok(n)
    }
}

fn problem(info: &ValidPathInfo, problem: UploadProblem) -> StoreError {
    StoreError::Upload { path: info.path.clone(), problem: Box::new(problem) }
}

/// Receive `info`'s NAR from `nar` (at most `info.info.nar_size` bytes are read) into `tmp` and check
/// it (see the module docs).
pub fn receive(
    info: ValidPathInfo,
    nar: &mut dyn Read,
    tmp: PathBuf,
    max_bytes: u64,
    rules: &[SelfRefRule],
) -> Result<Staged, StoreError> {
    if info.info.nar_size > max_bytes {
        return Err(problem(
            &info,
            UploadProblem::TooLarge { size: info.info.nar_size, max: max_bytes },
        ));
    }
    let file = File::options()
        .write(true)
        .read(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|source| StoreError::Io { op: "create", path: tmp.clone(), source })?;
    let staged = Staged { info, tmp, committed: false };
    let info = &staged.info;

    let mut limited = nar.take(info.info.nar_size);
    let mut tee = Tee {
        inner: &mut limited,
        out: BufWriter::with_capacity(1 << 16, &file),
        hasher: Sha256::new(),
        n: 0,
        write_err: None,
    };
    let limits = NarLimits { max_total_size: info.info.nar_size, ..NarLimits::default() };
    let parsed = NarReader::new(&mut tee, limits).validate_to_end();
    if let Some(e) = tee.write_err.take() {
        return Err(StoreError::Io { op: "write", path: staged.tmp.clone(), source: e });
    }
    let received = tee.n;
    let actual = NarHash(tee.hasher.clone().finalize().into());
    tee.out.flush().map_err(|source| StoreError::Io {
        op: "write",
        path: staged.tmp.clone(),
        source,
    })?;
    drop(tee);
    if let Err(e) = parsed {
        return Err(problem(
            info,
            UploadProblem::BadNar { declared_size: info.info.nar_size, received, source: e },
        ));
    }
    if received != info.info.nar_size {
        return Err(problem(
            info,
            UploadProblem::SizeMismatch { declared: info.info.nar_size, actual: received },
        ));
    }
    if actual != info.info.nar_hash {
        return Err(problem(
            info,
            UploadProblem::HashMismatch { declared: info.info.nar_hash, actual },
        ));
    }
    file.sync_all().map_err(|source| StoreError::Io {
        op: "fsync",
        path: staged.tmp.clone(),
        source,
    })?;

    if let Some(ca) = &info.info.ca {
        check_ca(info, ca, &staged.tmp, rules)?;
    }
    Ok(staged)
}

/// Check a claimed content address against the NAR in `file`.
fn check_ca(
    info: &ValidPathInfo,
    ca: &str,
    file: &std::path::Path,
    rules: &[SelfRefRule],
) -> Result<(), StoreError> {
    let parsed = ContentAddress::parse(ca)
        .map_err(|e| problem(info, UploadProblem::BadContentAddress(e)))?;
    let mut first_err = None;
    for rule in rules {
        let f = File::open(file).map_err(|source| StoreError::Io {
            op: "open",
            path: file.to_path_buf(),
            source,
        })?;
        match content_address::verify(
            &info.path,
            &parsed,
            &info.info.references,
            io::BufReader::with_capacity(1 << 16, f),
            *rule,
            &NarLimits::default(),
        ) {
            Ok(()) => return Ok(()),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    Err(problem(
        info,
        UploadProblem::ContentAddress {
            ca: ca.to_owned(),
            source: first_err.expect("at least one rule is tried"),
        },
    ))
}
