//! The one argument of `vouch verify`, `vouch trace show` and `vouch provenance`: a `.drv`
//! (unresolved or resolved), an output path, or `./result` / any symlink into the store.
//!
//! # Algorithm ([`resolve`])
//!
//! 1. The argument names a store path: itself, or where its chain of symlinks first points
//!    into the store (a path inside a store object names that object). A chroot store's
//!    `result` points at the logical `/nix/store/…` path, which need not exist here.
//! 2. A `.drv` is the derivation, unless it is a step the trace stores hold whose derivation
//!    has no input derivations (a resolved one, or an unresolved one without input
//!    derivations): then the unresolved derivation that resolves to it is looked for (step 4).
//! 3. An output: the derivation that produced it comes from the local Nix database where the
//!    output is registered there (`nix-store --query --deriver`, for content-addressed outputs
//!    the resolved derivation, so step 4 follows), otherwise from the trace stores' by-output
//!    index. Either is a **hint**: `verify` then verifies that derivation's closure and
//!    expects the output among its accepted outputs, so a wrong hint is "not verified", never
//!    a false "verified". A narinfo's `Deriver` is never read.
//! 4. The unresolved derivation of a content-addressed step with outputs `O`: the `.drv` file
//!    of the same name (with input derivations) in the drv directory whose realisation of one
//!    of `O` the local Nix database registered (`nix realisation info`). Where none did (the
//!    trace store's realisations are the resolved step's, so they cannot name it), every such
//!    same-named file is a candidate, and `verify` verifies each until one accepts the output;
//!    with none, the resolved derivation itself (a closure of one step whose inputs count by
//!    their content addresses).
//!
//! What is not here: verifying anything (the commands do), reading remote caches.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use build_trace::source::Traces;
use build_trace::store::TraceSource;
use nix_formats::derivation::{Derivation, DerivationKind};
use nix_formats::{StorePath, STORE_DIR};

/// Where the derivation of a [`Target`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FoundBy {
    /// The argument was the (unresolved) derivation.
    Given,
    /// The local Nix database (a hint: verified, not trusted).
    NixDatabase,
    /// A trace store's index (a hint: verified, not trusted).
    TraceIndex,
}

impl std::fmt::Display for FoundBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FoundBy::Given => "as given",
            FoundBy::NixDatabase => "found in the local Nix database",
            FoundBy::TraceIndex => "found in the trace store's index",
        })
    }
}

/// What one argument names.
#[derive(Debug, Clone)]
pub struct Target {
    /// The argument as given.
    pub given: String,
    /// The store path it names.
    pub path: StorePath,
    /// The unresolved derivation, where one was found: the first of [`Target::candidates`].
    pub drv: Option<StorePath>,
    /// The unresolved derivations that may have produced it, best first: one where the
    /// argument was a derivation or a realisation names it; where only a trace store's index
    /// knows the output, every same-named derivation with input derivations (the verifier
    /// tells which one it is), else the resolved one itself.
    pub candidates: Vec<StorePath>,
    /// How [`Target::drv`] was found.
    pub found_by: FoundBy,
    /// The output paths: the one given, or the derivation's where known (input-addressed ones
    /// from the `.drv`, others from the Nix database's realisations or the trace stores).
    pub outputs: BTreeSet<StorePath>,
}

impl Target {
    /// Whether the argument named an output (not a derivation).
    pub fn is_output(&self) -> bool {
        !self.path.is_derivation()
    }
}

/// Where [`resolve`] looks.
#[derive(Debug)]
pub struct Lookup<'a> {
    /// The directory holding `.drv` files (`/nix/store`, or a chroot store's).
    pub drv_dir: &'a Path,
    /// The Nix store to ask (`--store` of Nix's commands; `None`: Nix's default).
    pub nix_store: Option<&'a str>,
    /// The trace stores.
    pub traces: &'a [Traces],
}

/// Why an argument names nothing.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Neither a store path nor a symlink into the store.
    #[error("`{0}` is neither a store path nor a symlink into {STORE_DIR}")]
    NotInStore(String),
    /// A symlink could not be read.
    #[error("cannot read the symlink {0}")]
    Link(String, #[source] std::io::Error),
    /// A trace store could not be read.
    #[error("cannot read the trace store")]
    Traces(#[source] build_trace::store::StoreError),
}

/// The store path `arg` names: itself, or the store object its symlinks first lead into.
pub fn store_path_of(arg: &str) -> Result<StorePath, TargetError> {
    let not = || TargetError::NotInStore(arg.to_owned());
    let mut p = PathBuf::from(arg);
    for _ in 0..40 {
        if let Some(sp) = in_store(&p) {
            return Ok(sp);
        }
        let target = match std::fs::read_link(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return Err(not()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(not()),
            Err(e) => return Err(TargetError::Link(p.display().to_string(), e)),
        };
        p = match p.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    Err(not())
}

/// The store object a path lies in (`/nix/store/<base>[/…]`), if it does.
fn in_store(p: &Path) -> Option<StorePath> {
    let rest = p.strip_prefix(STORE_DIR).ok()?;
    let base = rest.components().next()?.as_os_str().to_str()?;
    StorePath::from_base_name(base).ok()
}

/// What `arg` names, and its derivation where one can be found (see the module's algorithm).
pub fn resolve(arg: &str, at: &Lookup<'_>) -> Result<Target, TargetError> {
    let path = store_path_of(arg)?;
    let mut target = Target {
        given: arg.to_owned(),
        path: path.clone(),
        drv: None,
        candidates: Vec::new(),
        found_by: FoundBy::Given,
        outputs: BTreeSet::new(),
    };
    if path.is_derivation() {
        let drv = read_drv(at.drv_dir, &path);
        target.outputs = step_outputs(&path, at)?;
        if let Some(d) = &drv {
            target.outputs.extend(d.outputs.values().filter_map(|o| o.path().cloned()));
            if target.outputs.is_empty() {
                target.outputs = local_realisations(&path, at.nix_store);
            }
        }
        let floating_leaf =
            drv.as_ref().is_some_and(|d| d.input_drvs.is_empty() && is_floating(d, &path));
        let mut found = (vec![path.clone()], FoundBy::Given);
        if floating_leaf && !target.outputs.is_empty() {
            let (c, by) = unresolved_of(&path, &target.outputs, at, FoundBy::TraceIndex);
            if c.first().is_some_and(|u| *u != path) {
                found = (c, by);
            }
        }
        return Ok(target.with(found));
    }
    target.outputs.insert(path.clone());
    if let Some(d) = nix_deriver(&path, at.nix_store) {
        let found = unresolved_for_step(&d, &target.outputs, at, FoundBy::NixDatabase);
        if !found.0.is_empty() {
            return Ok(target.with(found));
        }
    }
    for store in at.traces {
        let entries = store.entries_for_output(&path).map_err(TargetError::Traces)?;
        for e in entries {
            let found = unresolved_for_step(&e.drv_path, &target.outputs, at, FoundBy::TraceIndex);
            if !found.0.is_empty() {
                return Ok(target.with(found));
            }
        }
    }
    Ok(target)
}

impl Target {
    fn with(mut self, (candidates, by): (Vec<StorePath>, FoundBy)) -> Target {
        self.drv = candidates.first().cloned();
        self.candidates = candidates;
        self.found_by = by;
        self
    }
}

/// The unresolved derivations behind step `step` (an input-addressed drv is its own; for a
/// floating one see [`unresolved_of`]), with where they were found.
fn unresolved_for_step(
    step: &StorePath,
    outputs: &BTreeSet<StorePath>,
    at: &Lookup<'_>,
    by: FoundBy,
) -> (Vec<StorePath>, FoundBy) {
    match read_drv(at.drv_dir, step) {
        None => (Vec::new(), by),
        Some(d) if !is_floating(&d, step) => (vec![step.clone()], by),
        Some(_) => unresolved_of(step, outputs, at, by),
    }
}

fn is_floating(d: &Derivation, p: &StorePath) -> bool {
    p.drv_name().ok().and_then(|n| d.kind(n).ok()) == Some(DerivationKind::Floating)
}

fn read_drv(dir: &Path, p: &StorePath) -> Option<Derivation> {
    let bytes = std::fs::read(dir.join(p.base_name())).ok()?;
    Derivation::from_aterm(&bytes).ok()
}

/// The outputs the trace stores' statements of step `drv` name.
fn step_outputs(drv: &StorePath, at: &Lookup<'_>) -> Result<BTreeSet<StorePath>, TargetError> {
    let mut out = BTreeSet::new();
    for store in at.traces {
        for e in store.entries(drv).map_err(TargetError::Traces)? {
            if let Ok(st) = e.parse_statement() {
                out.extend(st.outputs.values().map(|o| o.path.clone()));
            }
        }
    }
    Ok(out)
}

/// Most same-named derivations offered to the verifier for an output only a trace store knows.
const MAX_CANDIDATES: usize = 16;

/// Step 4: the unresolved derivations named like `step` that may have produced `outputs`: the
/// one whose realisation the local Nix database registered, else (the trace store's
/// realisations are the resolved step's, which cannot name it) every same-named derivation
/// with input derivations (found by the trace store's index), else `step` itself (found `by`).
fn unresolved_of(
    step: &StorePath,
    outputs: &BTreeSet<StorePath>,
    at: &Lookup<'_>,
    by: FoundBy,
) -> (Vec<StorePath>, FoundBy) {
    let mut candidates: Vec<StorePath> = step
        .drv_name()
        .ok()
        .and_then(|name| {
            let suffix = format!("-{name}.drv");
            let dir = std::fs::read_dir(at.drv_dir).ok()?;
            Some(
                dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.ends_with(&suffix))
                    .filter_map(|n| StorePath::from_base_name(&n).ok())
                    .filter(|c| read_drv(at.drv_dir, c).is_some_and(|d| !d.input_drvs.is_empty()))
                    .collect(),
            )
        })
        .unwrap_or_default();
    candidates.sort();
    for c in &candidates {
        if !local_realisations(c, at.nix_store).is_disjoint(outputs) {
            return (vec![c.clone()], FoundBy::NixDatabase);
        }
    }
    if candidates.is_empty() {
        return (vec![step.clone()], by);
    }
    candidates.truncate(MAX_CANDIDATES);
    (candidates, FoundBy::TraceIndex)
}

/// `nix-store --query --deriver OUT`: the deriver the local Nix database registered, if any.
fn nix_deriver(out: &StorePath, store: Option<&str>) -> Option<StorePath> {
    let mut cmd = Command::new("nix-store");
    if let Some(s) = store {
        cmd.args(["--store", s]);
    }
    let res = cmd.args(["--query", "--deriver"]).arg(out.to_string()).output().ok()?;
    if !res.status.success() {
        return None;
    }
    StorePath::parse(String::from_utf8_lossy(&res.stdout).trim())
        .ok()
        .filter(StorePath::is_derivation)
}

/// The outputs the local Nix database has realisations of for `drv` (empty when it has none,
/// or Nix cannot say).
pub fn local_realisations(drv: &StorePath, store: Option<&str>) -> BTreeSet<StorePath> {
    let mut out = BTreeSet::new();
    let Ok(mut v) = realisation_info(&drv.to_string(), store) else { return out };
    if v.iter().all(|r| r.get("outPath").is_none()) {
        v = realisation_info(&format!("{drv}^*"), store).unwrap_or_default();
    }
    for r in v {
        if let Some(p) = r.get("outPath").and_then(|p| p.as_str()) {
            let base = p.strip_prefix(&format!("{STORE_DIR}/")).unwrap_or(p);
            if let Ok(p) = StorePath::from_base_name(base) {
                out.insert(p);
            }
        }
    }
    out
}

/// `nix realisation info --json INSTALLABLE`: its records.
pub fn realisation_info(
    installable: &str,
    store: Option<&str>,
) -> Result<Vec<serde_json::Value>, String> {
    let mut cmd = Command::new("nix");
    cmd.args(["--extra-experimental-features", "nix-command ca-derivations"]);
    if let Some(s) = store {
        cmd.args(["--store", s]);
    }
    let res = cmd
        .args(["realisation", "info", "--json", installable])
        .output()
        .map_err(|e| format!("cannot run nix: {e}"))?;
    if !res.status.success() {
        return Err(String::from_utf8_lossy(&res.stderr).trim().to_string());
    }
    match serde_json::from_slice(&res.stdout) {
        Ok(serde_json::Value::Array(v)) => Ok(v),
        Ok(other) => Err(format!("nix printed {other}, not a list of realisations")),
        Err(e) => Err(format!("nix printed no JSON: {e}")),
    }
}
