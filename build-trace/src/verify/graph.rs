//! The unresolved derivation graph the verifier walks: loaded from `.drv` files in a store
//! directory, or from `nix show-derivation -r` JSON, and walked dependencies first.
//! Not here: whether a derivation matches its path or can be accepted (the verifier checks).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::Path;

use nix_formats::derivation::Derivation;
use nix_formats::StorePath;

use super::VerifyError;

/// Derivations by drv path.
#[derive(Debug, Clone, Default)]
pub struct DrvSet {
    drvs: BTreeMap<StorePath, Derivation>,
}

impl DrvSet {
    /// An empty set.
    pub fn new() -> DrvSet {
        DrvSet::default()
    }

    /// Read `target` and, transitively, every input derivation from `dir` (a directory holding
    /// `.drv` files by base name: `/nix/store`, or `<chroot>/nix/store`).
    pub fn from_store_dir(dir: &Path, target: &StorePath) -> Result<DrvSet, VerifyError> {
        let mut set = DrvSet::new();
        let mut todo = vec![target.clone()];
        while let Some(p) = todo.pop() {
            if set.drvs.contains_key(&p) {
                continue;
            }
            let drv = read_drv_file(dir, &p)?.ok_or_else(|| VerifyError::Read {
                path: dir.join(p.base_name()).display().to_string(),
                source: std::io::ErrorKind::NotFound.into(),
            })?;
            todo.extend(drv.input_drvs.keys().filter(|d| !set.drvs.contains_key(*d)).cloned());
            set.drvs.insert(p, drv);
        }
        Ok(set)
    }

    /// Parse `nix show-derivation -r` JSON (Nix 2.8's shape).
    pub fn from_show_derivation(json: &str) -> Result<DrvSet, VerifyError> {
        let drvs =
            nix_formats::derivation::json::parse_show_derivation(json).map_err(|source| {
                VerifyError::Derivation { drv: "show-derivation JSON".into(), source }
            })?;
        Ok(DrvSet { drvs })
    }

    /// Add a derivation.
    pub fn insert(&mut self, path: StorePath, drv: Derivation) {
        self.drvs.insert(path, drv);
    }

    /// A derivation by path.
    pub fn get(&self, path: &StorePath) -> Option<&Derivation> {
        self.drvs.get(path)
    }

    /// All derivations.
    pub fn iter(&self) -> impl Iterator<Item = (&StorePath, &Derivation)> {
        self.drvs.iter()
    }

    /// How many derivations.
    pub fn len(&self) -> usize {
        self.drvs.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.drvs.is_empty()
    }

    /// Every input derivation `udrv` depends on, transitively: whose accepted facts its input
    /// closure may link to. Found on demand (see [`Dependencies`]).
    pub(crate) fn dependencies(&self, udrv: &StorePath) -> Dependencies<'_> {
        let first: Vec<&StorePath> =
            self.drvs.get(udrv).map(|d| d.input_drvs.keys().collect()).unwrap_or_default();
        Dependencies {
            drvs: self,
            walk: RefCell::new((first.iter().copied().collect(), first.into())),
        }
    }

    /// The derivations `target` depends on, dependencies first, ending with `target`
    /// (iterative; a missing input or a cycle is an error).
    pub fn post_order(&self, target: &StorePath) -> Result<Vec<StorePath>, VerifyError> {
        let mut order = Vec::new();
        let mut done: BTreeSet<&StorePath> = BTreeSet::new();
        let mut on_stack: BTreeSet<&StorePath> = BTreeSet::new();
        let target =
            self.drvs.get_key_value(target).map(|(k, _)| k).ok_or_else(|| {
                VerifyError::MissingDrv { drv: target.to_string(), needed_by: None }
            })?;
        // (node, index of the next input to visit)
        let mut stack: Vec<(&StorePath, usize)> = vec![(target, 0)];
        on_stack.insert(target);
        while let Some((node, i)) = stack.pop() {
            let drv = &self.drvs[node];
            if let Some(input) = drv.input_drvs.keys().nth(i) {
                stack.push((node, i + 1));
                if done.contains(input) {
                    continue;
                }
                if on_stack.contains(input) {
                    return Err(VerifyError::Cycle(input.to_string()));
                }
                let input = self.drvs.get_key_value(input).map(|(k, _)| k).ok_or_else(|| {
                    VerifyError::MissingDrv {
                        drv: input.to_string(),
                        needed_by: Some(node.to_string()),
                    }
                })?;
                on_stack.insert(input);
                stack.push((input, 0));
            } else {
                on_stack.remove(node);
                done.insert(node);
                order.push(node.clone());
            }
        }
        Ok(order)
    }
}

/// The transitive input derivations of one derivation, found on demand: a breadth-first walk
/// through input derivations, taken only as far as the questions asked need. A step's input
/// closure names outputs of nearby dependencies, so most steps walk a few levels, not the whole
/// graph below them (which made a chain of n steps cost n² / 2); the answers are the same as
/// those of the whole set.
#[derive(Debug)]
pub(crate) struct Dependencies<'a> {
    drvs: &'a DrvSet,
    /// Derivations found so far (all dependencies), and those whose inputs are not yet listed.
    walk: RefCell<(HashSet<&'a StorePath>, VecDeque<&'a StorePath>)>,
}

impl Dependencies<'_> {
    /// Whether `p` is one of them.
    pub(crate) fn contains(&self, p: &StorePath) -> bool {
        let mut walk = self.walk.borrow_mut();
        let (found, todo) = &mut *walk;
        while !found.contains(p) {
            let Some(next) = todo.pop_front() else { return false };
            if let Some(d) = self.drvs.drvs.get(next) {
                for i in d.input_drvs.keys() {
                    if found.insert(i) {
                        todo.push_back(i);
                    }
                }
            }
        }
        true
    }
}

/// The `.drv` `p` in `dir` (a file by base name), `None` if there is no such file.
pub(crate) fn read_drv_file(dir: &Path, p: &StorePath) -> Result<Option<Derivation>, VerifyError> {
    let file = dir.join(p.base_name());
    let bytes = match std::fs::read(&file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(VerifyError::Read { path: file.display().to_string(), source }),
    };
    Derivation::from_aterm(&bytes)
        .map(Some)
        .map_err(|source| VerifyError::Derivation { drv: p.to_string(), source })
}
