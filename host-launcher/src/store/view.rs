//! One session's view of the content store: its private [`Overlay`] (if it has one) over the
//! shared store, read as one store, and the one upload path both layers are written through.
//!
//! Reads ([`StoreView`]): a path is looked up in the overlay first, then in the shared store (so
//! a session keeps seeing what it uploaded itself); closures follow references from the overlay
//! into the shared store (never the other way: a shared path's references are shared). Pins go
//! to the shared store (the overlay lives exactly as long as the session).
//!
//! Writes ([`add_to_layers`]): every path of a batch is received and checked by `super::ingest`
//! into the layer a `route` chooses for it; then the shared part commits (one transaction,
//! `super::ContentStore::commit`), then the private part (its references checked first against
//! the view and the batch, the shared ones pinned). A path already valid in the view is
//! skipped. Build outputs go to the shared store unless the view says its outputs are private
//! ([`StoreView::with_private_outputs`]).
//!
//! What is not here: which layer an upload belongs in (`super::session`), the checks themselves
//! (`super::ingest`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;

use nix_formats::ca::SelfRefRule;
use nix_formats::StorePath;

use super::ingest::{self, Staged};
use super::overlay::Overlay;
use super::{ContentStore, Origin, StoreError, UploadProblem};
use crate::core::{UploadSource, ValidPathInfo};

/// Which layer a path goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The content store every session shares.
    Shared,
    /// The session's private overlay.
    Private,
}

/// A session's view: its overlay over the shared store (see the module docs). Cheap to copy.
#[derive(Debug, Clone, Copy)]
pub struct StoreView<'a> {
    shared: &'a ContentStore,
    overlay: Option<&'a Overlay>,
    private_outputs: bool,
}

impl<'a> From<&'a ContentStore> for StoreView<'a> {
    fn from(shared: &'a ContentStore) -> Self {
        StoreView { shared, overlay: None, private_outputs: false }
    }
}

impl<'a> StoreView<'a> {
    /// The overlay `overlay` (if any) over `shared`.
    pub fn new(shared: &'a ContentStore, overlay: Option<&'a Overlay>) -> Self {
        StoreView { shared, overlay, private_outputs: false }
    }

    /// The shared store.
    pub fn shared(&self) -> &'a ContentStore {
        self.shared
    }

    /// Whether `path` is in this session's overlay.
    pub fn is_private(&self, path: &StorePath) -> bool {
        self.overlay.is_some_and(|o| o.contains(path))
    }

    /// This view, with build outputs registered in the overlay (`true`) or the shared store.
    pub fn with_private_outputs(mut self, private: bool) -> Self {
        self.private_outputs = private;
        self
    }

    /// Whether build outputs go to the overlay.
    pub fn private_outputs(&self) -> bool {
        self.private_outputs
    }

    /// Which of `paths` are valid; with `pin`, the shared ones are pinned for this session.
    pub fn query_valid(
        &self,
        paths: &BTreeSet<StorePath>,
        pin: bool,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        let (private, rest): (BTreeSet<StorePath>, BTreeSet<StorePath>) =
            paths.iter().cloned().partition(|p| self.is_private(p));
        let mut valid = self.shared.query_valid(&rest, pin)?;
        valid.extend(private);
        Ok(valid)
    }

    /// The info of a valid path.
    pub fn path_info(&self, path: &StorePath) -> Result<Option<ValidPathInfo>, StoreError> {
        match self.overlay.and_then(|o| o.get(path)) {
            Some(info) => Ok(Some(info)),
            None => self.shared.path_info(path),
        }
    }

    /// A valid path's info and its NAR file, opened.
    pub fn open_nar(&self, path: &StorePath) -> Result<Option<(ValidPathInfo, File)>, StoreError> {
        if let Some(o) = self.overlay.filter(|o| o.contains(path)) {
            return o.open_nar(path);
        }
        self.shared.open_nar(path)
    }

    /// Pin the shared ones of `paths` for this session.
    pub fn pin(&self, paths: &BTreeSet<StorePath>) -> Result<(), StoreError> {
        self.shared.pin(&paths.iter().filter(|p| !self.is_private(p)).cloned().collect())
    }

    /// The closure of `roots` (every path must be valid), with infos.
    pub fn closure(
        &self,
        roots: &BTreeSet<StorePath>,
    ) -> Result<BTreeMap<StorePath, ValidPathInfo>, StoreError> {
        let mut out = BTreeMap::new();
        let mut todo: Vec<StorePath> = roots.iter().cloned().collect();
        while let Some(p) = todo.pop() {
            if out.contains_key(&p) {
                continue;
            }
            let info = self.path_info(&p)?.ok_or(StoreError::Missing { path: p.clone() })?;
            todo.extend(info.info.references.iter().filter(|r| !out.contains_key(*r)).cloned());
            out.insert(p, info);
        }
        Ok(out)
    }

    /// Register a build's outputs: in the overlay if this view's outputs are private, else in
    /// the shared store. Private outputs without an overlay are refused.
    pub fn register_outputs(
        &self,
        outputs: &mut dyn UploadSource,
        rules: &[SelfRefRule],
    ) -> Result<Vec<StorePath>, StoreError> {
        let layer = if self.private_outputs { Layer::Private } else { Layer::Shared };
        add_to_layers(self.shared, self.overlay, outputs, rules, Origin::Build, &mut |_, _| {
            Ok(layer)
        })
    }
}

/// Decides the layer of one path of a batch, given whether all its references are in the
/// shared store (or in the shared part of the batch so far); `Err` refuses the batch.
pub type Route<'r> = dyn FnMut(&ValidPathInfo, bool) -> Result<Layer, StoreError> + 'r;

/// Receive, check and register a batch into the layers `route` chooses (see the module docs).
/// Returns the paths the batch contained (already valid ones included).
pub(super) fn add_to_layers(
    shared: &ContentStore,
    overlay: Option<&Overlay>,
    uploads: &mut dyn UploadSource,
    rules: &[SelfRefRule],
    origin: Origin,
    route: &mut Route<'_>,
) -> Result<Vec<StorePath>, StoreError> {
    let mut to_shared: Vec<Staged> = Vec::new();
    let mut to_overlay: Vec<Staged> = Vec::new();
    let mut already = Vec::new();
    while let Some(info) = uploads.next_path().map_err(StoreError::Source)? {
        let twice = in_batch(&info.path, &to_shared)
            || in_batch(&info.path, &to_overlay)
            || already.contains(&info.path);
        if twice
            || overlay.is_some_and(|o| o.contains(&info.path))
            || shared.pin_if_valid(&info.path)?
        {
            // Valid already (or twice in the batch): consume its NAR, register nothing new.
            tracing::debug!(path = %info.path, "already valid; skipping its NAR");
            std::io::copy(uploads.nar(), &mut std::io::sink())
                .map_err(|e| StoreError::Source(Box::new(e)))?;
            already.push(info.path);
            continue;
        }
        let mut refs_shared = true;
        for r in info.info.references.iter().filter(|r| **r != info.path) {
            if !in_batch(r, &to_shared) && !shared.is_valid(r)? {
                refs_shared = false;
                break;
            }
        }
        let (tmp, dest) = match (route(&info, refs_shared)?, overlay) {
            (Layer::Shared, _) => (shared.tmp_file(), &mut to_shared),
            (Layer::Private, Some(o)) => (o.tmp_file(), &mut to_overlay),
            (Layer::Private, None) => {
                return Err(StoreError::Upload {
                    path: info.path.clone(),
                    problem: Box::new(UploadProblem::NoPrivateLayer),
                })
            }
        };
        dest.push(ingest::receive(info, uploads.nar(), tmp, shared.cfg.max_bytes, rules)?);
    }
    // The private part's references: in the view or the batch; the shared ones stay pinned.
    let mut shared_refs = BTreeSet::new();
    for s in &to_overlay {
        for r in s.info.info.references.iter().filter(|r| **r != s.info.path) {
            let private = overlay.is_some_and(|o| o.contains(r)) || in_batch(r, &to_overlay);
            if private {
                continue;
            }
            if !in_batch(r, &to_shared) && !shared.pin_if_valid(r)? {
                return Err(StoreError::Upload {
                    path: s.info.path.clone(),
                    problem: Box::new(UploadProblem::MissingReference { reference: r.clone() }),
                });
            }
            shared_refs.insert(r.clone());
        }
    }
    let mut paths: Vec<StorePath> =
        to_shared.iter().chain(&to_overlay).map(|s| s.info.path.clone()).collect();
    shared.commit(to_shared, origin)?;
    shared.pin(&shared_refs)?;
    if let Some(o) = overlay {
        o.commit(to_overlay)?;
    }
    paths.extend(already);
    Ok(paths)
}

/// Whether `p` is among the staged paths `v`.
fn in_batch(p: &StorePath, v: &[Staged]) -> bool {
    v.iter().any(|s| s.info.path == *p)
}
