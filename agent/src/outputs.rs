//! Hashing the outputs after the builder (and everything it started) is gone.
//!
//! Per step kind:
//! - **floating CA**: `nix_formats::ca::compute_ca_outputs` over the scratch outputs (references
//!   scanned against the input closure and the sibling scratch paths, reference order, hash
//!   modulo the own scratch hash under the job's self-reference rule, final path, final NAR
//!   hash/size). The final NAR is streamed later by rewriting the scratch NAR again.
//! - **input-addressed**: each output sits at its final path; one pass computes NAR hash, size
//!   and references (candidates: the closure and the step's own outputs).
//! - **fixed output**: the declared hash is recomputed from the contents (flat or recursive)
//!   and must match; such outputs may not refer to anything.
//!
//! What is not here: sending (the session streams [`HashedOutput::nar`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use build_trace::job::{Job, NarHash, StepKind};
use build_trace::statement::OutputInfo;
use nix_formats::ca::{compute_ca_outputs, CaOutputSpec, RewriteReader};
use nix_formats::content_address::{content_hash, ContentAddress, ContentAddressMethod};
use nix_formats::derivation::CaMethod;
use nix_formats::nar::{NarDigest, NarDump, NarHasher, NarLimits};
use nix_formats::refs::RefScanner;
use nix_formats::store_path::FileIngestionMethod;
use nix_formats::{Hash, StorePath};

/// Why outputs could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The builder did not create an output.
    #[error("builder for '{drv}' failed to produce output path for output '{output}' at '{path}'")]
    Missing {
        /// Derivation.
        drv: StorePath,
        /// Output name.
        output: String,
        /// Expected scratch path.
        path: String,
    },
    /// The derivation's output declaration is unusable.
    #[error("output '{0}': {1}")]
    Declaration(String, String),
    /// CA computation failed (invalid NAR, cycle, flat output not a file, …).
    #[error("computing content-addressed output paths")]
    Ca(#[from] nix_formats::ca::CaError),
    /// Reading an output failed.
    #[error("reading output '{0}'")]
    Io(String, #[source] io::Error),
    /// A fixed output's contents do not have the declared hash.
    #[error("hash mismatch in fixed-output derivation '{drv}': specified {specified}, got {got}")]
    FixedMismatch {
        /// Derivation.
        drv: StorePath,
        /// Declared.
        specified: String,
        /// Found.
        got: String,
    },
    /// Outputs refer to each other in a cycle.
    #[error("cycle detected in the references of output '{output}' from output '{parent}'")]
    Cycle {
        /// The output reached again.
        output: String,
        /// The output referring to it.
        parent: String,
    },
    /// A fixed output refers to store paths.
    #[error("illegal path references in fixed-output derivation '{0}'")]
    FixedRefs(StorePath),
    /// Recomputing a fixed output's hash failed.
    #[error("checking the fixed output of '{0}'")]
    FixedCheck(String, #[source] nix_formats::content_address::VerifyError),
}

/// One hashed output, ready for the statement and for sending.
#[derive(Debug)]
pub struct HashedOutput {
    /// What goes into the statement.
    pub info: OutputInfo,
    /// Where the bytes are in the guest (the scratch path for CA outputs).
    pub on_disk: PathBuf,
    /// Scratch → final rewrites (empty unless floating CA).
    pub rewrites: Vec<([u8; 32], [u8; 32])>,
}

impl HashedOutput {
    /// The final NAR, as hashed.
    pub fn nar(&self) -> Box<dyn Read + Send> {
        let dump = NarDump::new(self.on_disk.clone());
        if self.rewrites.is_empty() {
            Box::new(dump)
        } else {
            Box::new(RewriteReader::new(dump, &self.rewrites))
        }
    }
}

fn parse_algo(
    output: &str,
    hash_algo: &str,
) -> Result<(FileIngestionMethod, nix_formats::HashAlgo), OutputError> {
    let (m, algo) = CaMethod::parse_method_algo(hash_algo)
        .map_err(|e| OutputError::Declaration(output.into(), e.to_string()))?;
    let method = match m {
        CaMethod::Flat => FileIngestionMethod::Flat,
        CaMethod::Recursive => FileIngestionMethod::Recursive,
        CaMethod::Text => {
            return Err(OutputError::Declaration(
                output.into(),
                "text hashing is not supported".into(),
            ))
        }
    };
    Ok((method, algo))
}

fn on_disk(store_dir: &Path, p: &StorePath) -> PathBuf {
    store_dir.join(p.base_name())
}

/// Hash every wanted output of `job`, built at `scratch` (output name → path) under `store_dir`.
pub fn hash_outputs(
    job: &Job,
    scratch: &BTreeMap<String, StorePath>,
    store_dir: &Path,
) -> Result<BTreeMap<String, HashedOutput>, OutputError> {
    for (name, p) in scratch {
        if std::fs::symlink_metadata(on_disk(store_dir, p)).is_err() {
            return Err(OutputError::Missing {
                drv: job.drv_path.clone(),
                output: name.clone(),
                path: p.to_string(),
            });
        }
    }
    let closure: BTreeSet<StorePath> = job.closure.keys().cloned().collect();
    let kind = job.kind().map_err(|e| OutputError::Declaration("(drv)".into(), e.to_string()))?;
    match kind {
        StepKind::FloatingCa => hash_floating_ca(job, scratch, store_dir, &closure),
        StepKind::InputAddressed | StepKind::FixedOutput => {
            hash_in_place(job, kind, scratch, store_dir, closure)
        }
    }
}

/// Floating CA: the final paths and NARs from the scratch outputs (see the module docs).
fn hash_floating_ca(
    job: &Job,
    scratch: &BTreeMap<String, StorePath>,
    store_dir: &Path,
    closure: &BTreeSet<StorePath>,
) -> Result<BTreeMap<String, HashedOutput>, OutputError> {
    let specs = job
        .drv
        .outputs
        .iter()
        .map(|(name, o)| {
            let (method, algo) = parse_algo(name, &o.hash_algo)?;
            Ok(CaOutputSpec { name: name.clone(), method, algo })
        })
        .collect::<Result<Vec<_>, OutputError>>()?;
    let results = compute_ca_outputs(
        &job.drv_path,
        &specs,
        closure,
        job.ca_rule.into(),
        &NarLimits::default(),
        |o| Ok(NarDump::new(on_disk(store_dir, &scratch[o]))),
    )?;
    let mut out = BTreeMap::new();
    for (name, r) in results {
        if !job.outputs.contains(&name) {
            continue;
        }
        let info = OutputInfo {
            path: r.path.clone(),
            nar_hash: NarHash(sha256_of(&r.nar_hash)),
            nar_size: r.nar_size,
            references: r.references.clone(),
            ca: Some(r.ca.to_string()),
        };
        out.insert(
            name,
            HashedOutput {
                info,
                on_disk: on_disk(store_dir, &r.scratch_path),
                rewrites: r.rewrites,
            },
        );
    }
    Ok(out)
}

/// Input-addressed and fixed outputs, each at its final path: one pass for NAR hash, size and
/// references (candidates: the closure and the step's own outputs); a fixed output's declared
/// hash is checked as well. Every output is hashed (Nix registers them all); only wanted ones
/// are returned.
fn hash_in_place(
    job: &Job,
    kind: StepKind,
    scratch: &BTreeMap<String, StorePath>,
    store_dir: &Path,
    mut candidates: BTreeSet<StorePath>,
) -> Result<BTreeMap<String, HashedOutput>, OutputError> {
    candidates.extend(scratch.values().cloned());
    let mut out = BTreeMap::new();
    let mut refs_by_output = BTreeMap::new();
    for name in job.drv.outputs.keys() {
        let p = &scratch[name];
        let disk = on_disk(store_dir, p);
        let (refs, digest) = scan_nar(name, &disk, &candidates)?;
        let ca = if kind == StepKind::FixedOutput {
            if !refs.is_empty() {
                return Err(OutputError::FixedRefs(job.drv_path.clone()));
            }
            Some(check_fixed(job, name, &disk)?)
        } else {
            None
        };
        let info = OutputInfo {
            path: p.clone(),
            nar_hash: NarHash(digest.sha256),
            nar_size: digest.size,
            references: refs.clone(),
            ca,
        };
        refs_by_output.insert(name.clone(), refs);
        if job.outputs.contains(name) {
            out.insert(name.clone(), HashedOutput { info, on_disk: disk, rewrites: Vec::new() });
        }
    }
    check_output_cycles(scratch, &refs_by_output)?;
    Ok(out)
}

/// The references among `candidates` and the NAR digest of output `name` at `disk`, in one pass.
fn scan_nar(
    name: &str,
    disk: &Path,
    candidates: &BTreeSet<StorePath>,
) -> Result<(BTreeSet<StorePath>, NarDigest), OutputError> {
    let mut scanner = RefScanner::new(candidates.iter().cloned());
    let mut hasher = NarHasher::new();
    let mut dump = NarDump::new(disk.to_path_buf());
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = dump.read(&mut buf).map_err(|e| OutputError::Io(name.to_owned(), e))?;
        if n == 0 {
            break;
        }
        scanner.feed(&buf[..n]);
        hasher.update(&buf[..n]);
    }
    Ok((scanner.references(), hasher.finish()))
}

/// The content address of fixed output `name` at `disk`, once its contents are found to have
/// the declared hash.
fn check_fixed(job: &Job, name: &str, disk: &Path) -> Result<String, OutputError> {
    let o = &job.drv.outputs[name];
    let (method, algo) = parse_algo(name, &o.hash_algo)?;
    let want = Hash::parse_digest(algo, &o.hash)
        .map_err(|e| OutputError::Declaration(name.to_owned(), e.to_string()))?;
    let got = content_hash(
        ContentAddressMethod::Fixed(method),
        algo,
        NarDump::new(disk.to_path_buf()),
        None,
        job.ca_rule.into(),
        &NarLimits::default(),
    )
    .map_err(|e| OutputError::FixedCheck(job.drv_path.to_string(), e))?;
    if got != want {
        return Err(OutputError::FixedMismatch {
            drv: job.drv_path.clone(),
            specified: want.to_sri(),
            got: got.to_sri(),
        });
    }
    Ok(ContentAddress::Fixed { method, hash: got }.to_string())
}

/// Nix refuses outputs that refer to each other in a cycle (`registerOutputs`' topological
/// sort): depth-first in name order, the first output reached again is named, with the output
/// that referred to it.
fn check_output_cycles(
    scratch: &BTreeMap<String, StorePath>,
    refs: &BTreeMap<String, BTreeSet<StorePath>>,
) -> Result<(), OutputError> {
    fn visit(
        name: &str,
        parent: &str,
        scratch: &BTreeMap<String, StorePath>,
        refs: &BTreeMap<String, BTreeSet<StorePath>>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
    ) -> Result<(), OutputError> {
        if stack.iter().any(|s| s == name) {
            return Err(OutputError::Cycle { output: name.into(), parent: parent.into() });
        }
        if !done.insert(name.to_owned()) {
            return Ok(());
        }
        stack.push(name.to_owned());
        for (child, path) in scratch {
            if child != name && refs.get(name).is_some_and(|r| r.contains(path)) {
                visit(child, name, scratch, refs, done, stack)?;
            }
        }
        stack.pop();
        Ok(())
    }
    let (mut done, mut stack) = (BTreeSet::new(), Vec::new());
    for name in scratch.keys() {
        visit(name, "", scratch, refs, &mut done, &mut stack)?;
    }
    Ok(())
}

fn sha256_of(h: &Hash) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(h.digest());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(n: &str) -> StorePath {
        StorePath::parse(&format!(
            "/nix/store/{}-{n}",
            n.repeat(32)[..32].replace(['o', 'u', 't', 'e', 'v'], "a")
        ))
        .unwrap()
    }

    #[test]
    fn output_cycles_are_named_like_nix() {
        let scratch: BTreeMap<String, StorePath> =
            [("dev".to_owned(), sp("dev")), ("out".to_owned(), sp("out"))].into();
        let both: BTreeMap<String, BTreeSet<StorePath>> = [
            ("dev".to_owned(), [sp("out"), sp("dev")].into()),
            ("out".to_owned(), [sp("dev")].into()),
        ]
        .into();
        let e = check_output_cycles(&scratch, &both).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cycle detected in the references of output 'dev' from output 'out'"
        );
        let one_way: BTreeMap<String, BTreeSet<StorePath>> =
            [("dev".to_owned(), [sp("out")].into()), ("out".to_owned(), [sp("out")].into())].into();
        check_output_cycles(&scratch, &one_way).unwrap();
    }
}
