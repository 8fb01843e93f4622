//! A client session's content store: the shared store, a private overlay if the operator trusts
//! the client, and the rule that decides where each upload goes.
//!
//! The rule ([`SessionStore::add`]), for each uploaded path (after `super::ingest` checked its
//! NAR and any content address it claims):
//! 1. it is **certified** when vouch can tell that these bytes belong under this path name by
//!    itself: it has a content address (recomputed from the bytes), or a signature over its
//!    fingerprint (path, NAR hash, NAR size, references) by a key the operator configured
//!    ([`ClientTrust::keys`]);
//! 2. a certified path whose references are all in the shared store (or certified in the same
//!    batch) goes to the **shared** store, which every session reads;
//! 3. anything else from a **trusted** client goes to the session's **overlay**
//!    (`super::overlay`): it is visible to that session only and removed when it ends;
//! 4. anything else from any other client is **refused** ([`UploadProblem::NotTrusted`]), and
//!    nothing of its batch is registered.
//!
//! So nothing one client uploads changes what another client's build reads: the shared store
//! holds only paths whose bytes follow from their name (content addresses), were vouched for by
//! a key the operator trusts, or were built by vouch (`crate::core::Engine`, which registers
//! outputs in the overlay when their build read the overlay or their paths were not computed by
//! vouch).
//!
//! What is not here: reading across the layers ([`super::view`]), the overlay's files
//! ([`super::overlay`]), who is trusted (the front-ends decide: `vouch nix-builder`'s
//! `--trusted-user` and `--trusted`).

use nix_formats::ca::SelfRefRule;
use nix_formats::signing::{count_valid, PublicKey, Signature};
use nix_formats::{Hash, StorePath};

use super::overlay::Overlay;
use super::view::{add_to_layers, Layer, StoreView};
use super::{ContentStore, Origin, StoreError, UploadProblem};
use crate::core::{UploadSource, ValidPathInfo};

/// What the operator trusts about one client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTrust {
    /// The client is trusted as Nix trusts its `trusted-users`: its uploads that vouch cannot
    /// certify go to its session's overlay (instead of being refused), and it may build
    /// input-addressed derivations whose paths vouch cannot compute.
    pub trusted: bool,
    /// Keys whose signature certifies an upload that has no content address.
    pub keys: Vec<PublicKey>,
}

/// One session's content store (see the module docs).
#[derive(Debug)]
pub struct SessionStore {
    shared: ContentStore,
    overlay: Option<Overlay>,
    trust: ClientTrust,
}

impl SessionStore {
    /// A session over `shared` (its own open store: its pins are the session's) for a client
    /// trusted as `trust` says; a trusted client gets an overlay.
    pub fn new(shared: ContentStore, trust: ClientTrust) -> Result<SessionStore, StoreError> {
        let overlay = if trust.trusted { Some(shared.new_overlay()?) } else { None };
        Ok(SessionStore { shared, overlay, trust })
    }

    /// The session's view of the store.
    pub fn view(&self) -> StoreView<'_> {
        StoreView::new(&self.shared, self.overlay.as_ref())
    }

    /// The session's overlay (a trusted client's).
    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }

    /// Whether the operator trusts this session's client.
    pub fn trusted(&self) -> bool {
        self.trust.trusted
    }

    /// Receive, check and register an upload batch where the rule (module docs) puts each
    /// path; returns the paths of the batch (already valid ones included).
    pub fn add(
        &self,
        uploads: &mut dyn UploadSource,
        rules: &[SelfRefRule],
    ) -> Result<Vec<StorePath>, StoreError> {
        add_to_layers(
            &self.shared,
            self.overlay.as_ref(),
            uploads,
            rules,
            Origin::Upload,
            &mut |info, refs_shared| self.route(info, refs_shared),
        )
    }

    fn route(&self, info: &ValidPathInfo, refs_shared: bool) -> Result<Layer, StoreError> {
        let certified = info.info.ca.is_some() || signed_by(info, &self.trust.keys);
        match (certified, self.trust.trusted) {
            (true, false) => Ok(Layer::Shared),
            (true, true) if refs_shared => Ok(Layer::Shared),
            (_, true) => Ok(Layer::Private),
            (false, false) => Err(StoreError::Upload {
                path: info.path.clone(),
                problem: Box::new(UploadProblem::NotTrusted),
            }),
        }
    }
}

/// Whether one of `info`'s signatures is by one of `keys`, over its fingerprint.
pub fn signed_by(info: &ValidPathInfo, keys: &[PublicKey]) -> bool {
    if keys.is_empty() {
        return false;
    }
    let sigs: Vec<Signature> = info.sigs.iter().filter_map(|s| Signature::parse(s).ok()).collect();
    let fp = nix_formats::narinfo::fingerprint(
        &info.path,
        &Hash::sha256(info.info.nar_hash.0),
        info.info.nar_size,
        &info.info.references,
    );
    count_valid(fp.as_bytes(), &sigs, keys) > 0
}
