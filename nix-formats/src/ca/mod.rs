//! Content-addressed output paths of floating CA derivations, as Nix computes them after a build.
//!
//! The algorithm (Nix's `registerOutputs`, checked against Nix 2.8.0's source and binary):
//!
//! 1. Each output `o` was built at its **scratch path** ([`scratch_path`]):
//!    `makeStorePath("rewrite:<drvPath base name>:name:<o>", sha256 of zeros, outputPathName)`.
//! 2. **References**: each output's NAR is scanned for the hash parts of the candidates (the
//!    caller's input closure) and of every output's scratch path.
//! 3. Outputs are processed **in reference order**: a depth-first post-order over the outputs
//!    sorted by name, following references to sibling outputs; a cycle is an error.
//! 4. For each output: the NAR, with the scratch hash parts of the outputs already processed
//!    rewritten to their final ones (a chain of rewrites sorted by scratch hash part), is hashed
//!    with the output's own scratch hash part zeroed ([`HashModuloSink`]) — the NAR for
//!    `r:` outputs, the file contents for flat ones — under a [`SelfRefRule`]. That is the
//!    **CA hash**.
//! 5. Final path: recursive SHA-256 → `makeStorePath("source" + ":<ref>"… + [":self"], caHash,
//!    name)`; anything else → `makeStorePath("output:out", sha256("fixed:out:[r:]<algo>:<hex>:"),
//!    name)`, which may not have references.
//! 6. The **final NAR** is the NAR with sibling rewrites and then scratch → final applied; its
//!    SHA-256 and size are the NAR hash and size; `ca = fixed:[r:]<algo>:<nix32>`; references
//!    are the scanned ones mapped to final paths, plus the path itself if it refers to itself.
//!
//! Every pass streams: the caller gives a way to re-read each output's scratch NAR (e.g.
//! `|o| Ok(NarDump::new(dir_of(o)))`), and [`CaOutput::final_nar`] streams the rewritten NAR.
//! What is not here: where outputs live, building, registering.

mod rewrite;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};

pub use rewrite::{HashModuloSink, RewriteChain, RewriteReader, Rewriter};

use crate::content_address::ContentAddress;
use crate::hash::{Hash, HashAlgo};
use crate::nar::{NarDigest, NarError, NarEvent, NarHasher, NarLimits, NarReader};
use crate::refs::{hash_part_bytes, RefScanner};
use crate::store_path::{
    make_fixed_output_path, make_store_path, output_path_name, FileIngestionMethod, StorePath,
    StorePathError,
};

/// How the self-references of an output enter its content hash; the rule changed twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SelfRefRule {
    /// Nix ≤ 2.16 and ≥ 2.35: the self hash part is zeroed and `|<offset>` is appended to the
    /// hashed stream for every occurrence (so a NAR with some self-references already zeroed
    /// hashes differently).
    ZeroAndPositions,
    /// Nix 2.17 – 2.34: the self hash part is zeroed; the positions were lost (NixOS/nix#15837,
    /// fixed by #15931 in 2.35).
    ZeroOnly,
}

impl SelfRefRule {
    /// The rule of a Nix release `major.minor`.
    pub fn for_nix_version(major: u32, minor: u32) -> Self {
        match (major, minor) {
            (2, 17..=34) => Self::ZeroOnly,
            _ => Self::ZeroAndPositions,
        }
    }
}

/// One floating CA output of a derivation, as declared (`outputHashMode`, `outputHashAlgo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaOutputSpec {
    /// Output name (`out`, `dev`, ...).
    pub name: String,
    /// Recursive (`r:`) or flat.
    pub method: FileIngestionMethod,
    /// Hash algorithm of the content address.
    pub algo: HashAlgo,
}

/// The result for one output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaOutput {
    /// Output name.
    pub name: String,
    /// Where it was built.
    pub scratch_path: StorePath,
    /// Its content-addressed path.
    pub path: StorePath,
    /// SHA-256 of the final NAR.
    pub nar_hash: Hash,
    /// Size of the final NAR.
    pub nar_size: u64,
    /// References of the final path (itself included when self-referencing).
    pub references: BTreeSet<StorePath>,
    /// Its content address (`fixed:r:sha256:…`).
    pub ca: ContentAddress,
    /// The rewrites that turn the scratch NAR into the final one, in order.
    pub rewrites: Vec<([u8; 32], [u8; 32])>,
}

impl CaOutput {
    /// Streams the final NAR, given the scratch NAR of this output.
    pub fn final_nar<R: Read>(&self, scratch_nar: R) -> RewriteReader<R> {
        RewriteReader::new(scratch_nar, &self.rewrites)
    }
}

/// Why CA output paths could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading an output's NAR failed.
    #[error("reading the NAR of output '{output}'")]
    Io {
        /// The output.
        output: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An output's NAR (before or after rewriting) is not a valid NAR.
    #[error("the NAR of output '{output}' is invalid")]
    Nar {
        /// The output.
        output: String,
        /// The cause.
        #[source]
        source: NarError,
    },
    /// A flat output is not a single non-executable regular file.
    #[error("output '{0}' should be a non-executable regular file since recursive hashing is not enabled")]
    FlatNotRegularFile(String),
    /// Outputs refer to each other in a cycle.
    #[error("cycle detected in the references of output '{output}' from output '{parent}'")]
    Cycle {
        /// The output reached again.
        output: String,
        /// The output referring to it.
        parent: String,
    },
    /// An output that cannot have references (flat or not SHA-256) has some.
    #[error("output '{output}' is content-addressed without recursive SHA-256 and so cannot have references, but refers to {references:?}")]
    ReferencesNotAllowed {
        /// The output.
        output: String,
        /// What it refers to.
        references: Vec<String>,
    },
    /// Two outputs with the same name, or none.
    #[error("invalid output list: {0}")]
    BadOutputs(String),
    /// A path could not be formed.
    #[error("computing a store path")]
    Path(#[from] StorePathError),
}

/// Nix's `makeFallbackPath(outputName)`: where a floating CA output is built.
pub fn scratch_path(drv_path: &StorePath, output: &str) -> Result<StorePath, StorePathError> {
    let name = output_path_name(drv_path.drv_name()?, output);
    let ty = format!("rewrite:{}:name:{output}", drv_path.base_name());
    make_store_path(&ty, &Hash::sha256([0; 32]), &name)
}

/// Computes the CA outputs of the (resolved) derivation `drv_path` from the outputs' scratch NARs.
///
/// `candidates` are the store paths the outputs may refer to (the input closure); the scratch
/// paths are added. `open(name)` must return a fresh reader of output `name`'s scratch NAR each
/// time (it is called three times per output; twice when there is only one output). Results are
/// keyed by output name.
pub fn compute_ca_outputs<R: Read>(
    drv_path: &StorePath,
    outputs: &[CaOutputSpec],
    candidates: &BTreeSet<StorePath>,
    rule: SelfRefRule,
    limits: &NarLimits,
    mut open: impl FnMut(&str) -> io::Result<R>,
) -> Result<BTreeMap<String, CaOutput>, CaError> {
    let drv_name = drv_path.drv_name()?;
    let mut specs = BTreeMap::new();
    for o in outputs {
        if specs.insert(o.name.clone(), o).is_some() {
            return Err(CaError::BadOutputs(format!("output '{}' appears twice", o.name)));
        }
    }
    if specs.is_empty() {
        return Err(CaError::BadOutputs("no outputs".into()));
    }
    let scratch: BTreeMap<String, StorePath> = specs
        .keys()
        .map(|n| Ok((n.clone(), scratch_path(drv_path, n)?)))
        .collect::<Result<_, StorePathError>>()?;
    let mut all_candidates = candidates.clone();
    all_candidates.extend(scratch.values().cloned());

    // Pass 1: references of every scratch output (and the NAR checked). With a single output
    // there is no sibling to rewrite first, so its CA hash is computed in the same pass.
    let (refs, mut ca_hashes) =
        scan_outputs(&specs, &scratch, &all_candidates, rule, limits, &mut open)?;

    let order = reference_order(&scratch, &refs)?;

    let mut rewrites: BTreeMap<[u8; 32], [u8; 32]> = BTreeMap::new();
    let mut finals: BTreeMap<String, StorePath> = BTreeMap::new();
    let mut results = BTreeMap::new();
    for name in order {
        let spec = specs[&name];
        let own = &scratch[&name];
        let own_hash = hash_part_bytes(own);
        let chain: Vec<_> = rewrites.iter().map(|(f, t)| (*f, *t)).collect();

        // Pass 2: the CA hash, over the sibling-rewritten NAR (or file contents).
        let ca_hash = match ca_hashes.remove(&name) {
            Some(h) => h,
            None => {
                let sink = HashModuloSink::new(spec.algo, own_hash, rule);
                let r =
                    open(&name).map_err(|source| CaError::Io { output: name.clone(), source })?;
                modulo_hash(&name, spec.method, RewriteReader::new(r, &chain), sink, limits)?
            }
        };

        let (mut final_refs, self_ref) =
            final_references(spec, own, &refs[&name], &scratch, &finals)?;
        let path_name = output_path_name(drv_name, &name);
        let path =
            make_fixed_output_path(&path_name, spec.method, &ca_hash, &final_refs, self_ref)?;

        // Pass 3: the final NAR's hash and size.
        let mut out_rewrites = chain;
        out_rewrites.push((own_hash, hash_part_bytes(&path)));
        let r = open(&name).map_err(|source| CaError::Io { output: name.clone(), source })?;
        let digest = nar_digest(&name, RewriteReader::new(r, &out_rewrites), limits)?;

        if self_ref {
            final_refs.insert(path.clone());
        }
        rewrites.insert(own_hash, hash_part_bytes(&path));
        finals.insert(name.clone(), path.clone());
        let ca = ContentAddress::Fixed { method: spec.method, hash: ca_hash };
        results.insert(
            name.clone(),
            CaOutput {
                name,
                scratch_path: own.clone(),
                path,
                nar_hash: Hash::sha256(digest.sha256),
                nar_size: digest.size,
                references: final_refs,
                ca,
                rewrites: out_rewrites,
            },
        );
    }
    Ok(results)
}

/// The references of output `spec` (at scratch path `own`) mapped to final paths: a sibling's
/// scratch path to the sibling's final path (`finals`, already computed in reference order), the
/// self-reference to a flag. Only recursive SHA-256 outputs may refer to anything.
fn final_references(
    spec: &CaOutputSpec,
    own: &StorePath,
    refs: &BTreeSet<StorePath>,
    scratch: &BTreeMap<String, StorePath>,
    finals: &BTreeMap<String, StorePath>,
) -> Result<(BTreeSet<StorePath>, bool), CaError> {
    let mut self_ref = false;
    let mut final_refs = BTreeSet::new();
    for r in refs {
        if r == own {
            self_ref = true;
        } else if let Some((sib, _)) = scratch.iter().find(|(_, p)| *p == r) {
            final_refs.insert(finals[sib].clone());
        } else {
            final_refs.insert(r.clone());
        }
    }
    let recursive_sha256 =
        spec.method == FileIngestionMethod::Recursive && spec.algo == HashAlgo::Sha256;
    if !recursive_sha256 && (self_ref || !final_refs.is_empty()) {
        let mut references: Vec<String> = final_refs.iter().map(|p| p.to_string()).collect();
        if self_ref {
            references.push("itself".into());
        }
        return Err(CaError::ReferencesNotAllowed { output: spec.name.clone(), references });
    }
    Ok((final_refs, self_ref))
}

/// Each output's references (scratch paths included), by output name.
type OutputRefs = BTreeMap<String, BTreeSet<StorePath>>;

/// References per scratch output, with the NAR checked; for a single output also its CA hash
/// (there is no sibling to rewrite first), keyed by output name.
fn scan_outputs<R: Read>(
    specs: &BTreeMap<String, &CaOutputSpec>,
    scratch: &BTreeMap<String, StorePath>,
    candidates: &BTreeSet<StorePath>,
    rule: SelfRefRule,
    limits: &NarLimits,
    open: &mut impl FnMut(&str) -> io::Result<R>,
) -> Result<(OutputRefs, BTreeMap<String, Hash>), CaError> {
    let single = specs.len() == 1;
    let mut refs = BTreeMap::new();
    let mut ca_hashes = BTreeMap::new();
    for (name, spec) in specs {
        let mut scanner = RefScanner::new(candidates.iter().cloned());
        let mut modulo =
            single.then(|| HashModuloSink::new(spec.algo, hash_part_bytes(&scratch[name]), rule));
        let r = open(name).map_err(|source| CaError::Io { output: name.clone(), source })?;
        let root = match (&mut modulo, spec.method) {
            (Some(m), FileIngestionMethod::Recursive) => {
                let mut both = Both(&mut scanner, m);
                walk_nar(name, Tee { inner: r, sink: &mut both }, limits, |_| {})?
            }
            (Some(m), FileIngestionMethod::Flat) => {
                walk_nar(name, Tee { inner: r, sink: &mut scanner }, limits, |d| m.update(d))?
            }
            (None, _) => walk_nar(name, Tee { inner: r, sink: &mut scanner }, limits, |_| {})?,
        };
        check_flat(name, spec, &root)?;
        refs.insert(name.clone(), scanner.references());
        if let Some(m) = modulo {
            ca_hashes.insert(name.clone(), m.finish().0);
        }
    }
    Ok((refs, ca_hashes))
}

/// The CA hash of output `name` read (already sibling-rewritten) from `nar`: over the NAR for
/// recursive ingestion, over the file's contents for flat.
fn modulo_hash(
    name: &str,
    method: FileIngestionMethod,
    nar: impl Read,
    mut sink: HashModuloSink,
    limits: &NarLimits,
) -> Result<Hash, CaError> {
    match method {
        FileIngestionMethod::Recursive => {
            walk_nar(name, Tee { inner: nar, sink: &mut sink }, limits, |_| {})?;
        }
        FileIngestionMethod::Flat => {
            walk_nar(name, nar, limits, |data| sink.update(data))?;
        }
    }
    Ok(sink.finish().0)
}

/// The SHA-256 and size of the final NAR of output `name`.
fn nar_digest(name: &str, nar: impl Read, limits: &NarLimits) -> Result<NarDigest, CaError> {
    let mut hasher = NarHasher::new();
    walk_nar(name, Tee { inner: nar, sink: &mut hasher }, limits, |_| {})?;
    Ok(hasher.finish())
}

/// Nix's `topoSort` of the outputs followed by its reversal: dependencies first.
fn reference_order(
    scratch: &BTreeMap<String, StorePath>,
    refs: &BTreeMap<String, BTreeSet<StorePath>>,
) -> Result<Vec<String>, CaError> {
    fn visit(
        name: &str,
        parent: Option<&str>,
        children: &BTreeMap<String, BTreeSet<String>>,
        visited: &mut BTreeSet<String>,
        parents: &mut BTreeSet<String>,
        out: &mut Vec<String>,
    ) -> Result<(), CaError> {
        if parents.contains(name) {
            return Err(CaError::Cycle {
                output: name.into(),
                parent: parent.unwrap_or_default().into(),
            });
        }
        if !visited.insert(name.to_owned()) {
            return Ok(());
        }
        parents.insert(name.to_owned());
        for c in &children[name] {
            if c != name {
                visit(c, Some(name), children, visited, parents, out)?;
            }
        }
        out.push(name.to_owned());
        parents.remove(name);
        Ok(())
    }
    let children: BTreeMap<String, BTreeSet<String>> = scratch
        .keys()
        .map(|n| {
            let cs = scratch
                .iter()
                .filter(|(_, p)| refs[n].contains(*p))
                .map(|(o, _)| o.clone())
                .collect();
            (n.clone(), cs)
        })
        .collect();
    let (mut visited, mut parents, mut out) = (BTreeSet::new(), BTreeSet::new(), Vec::new());
    for n in scratch.keys() {
        visit(n, None, &children, &mut visited, &mut parents, &mut out)?;
    }
    Ok(out)
}

/// What the root of a NAR is, for the flat-output check.
#[derive(Debug, PartialEq, Eq)]
enum Root {
    Regular { executable: bool },
    Other,
}

fn check_flat(name: &str, spec: &CaOutputSpec, root: &Root) -> Result<(), CaError> {
    if spec.method == FileIngestionMethod::Flat && *root != (Root::Regular { executable: false }) {
        return Err(CaError::FlatNotRegularFile(name.to_owned()));
    }
    Ok(())
}

/// Parses a whole NAR (checking it), passing the root file's contents to `contents` (when the
/// root is a regular file).
fn walk_nar(
    output: &str,
    r: impl Read,
    limits: &NarLimits,
    mut contents: impl FnMut(&[u8]),
) -> Result<Root, CaError> {
    let nar_err = |source| CaError::Nar { output: output.to_owned(), source };
    let mut reader = NarReader::new(r, limits.clone());
    let root = match reader.next_event().map_err(nar_err)? {
        Some(NarEvent::Regular { executable, .. }) => {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = reader.read_contents(&mut buf).map_err(nar_err)?;
                if n == 0 {
                    break;
                }
                contents(&buf[..n]);
            }
            Root::Regular { executable }
        }
        _ => Root::Other,
    };
    reader.validate_to_end().map_err(nar_err)?;
    Ok(root)
}

/// A sink feeding two sinks.
struct Both<'a>(&'a mut RefScanner, &'a mut HashModuloSink);

impl io::Write for Both<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.feed(buf);
        self.1.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that copies what it reads into a sink.
pub(crate) struct Tee<'a, R: Read, W: io::Write> {
    pub(crate) inner: R,
    pub(crate) sink: &'a mut W,
}

impl<R: Read, W: io::Write> Read for Tee<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
