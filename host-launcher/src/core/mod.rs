//! The host's vocabulary and its one pipeline: what every front-end (the Nix protocols, HTTP,
//! the CLI) parses its requests into and answers from. Nothing here sees a wire, HTTP or argv.
//!
//! The algorithm, for every build:
//! 1. a front-end parses what it was asked into a [`BuildRequest`], deciding what only it can
//!    know: the CA self-reference rule of its client's Nix ([`CaRuleChoice`]: the Nix protocols
//!    from the client profile, HTTP from the submission's `nix_version` or
//!    `--client-nix-version`, `vouch build` from `--ca-rule`), the unresolved derivation graph
//!    where it has one ([`Derivations`]) and whether the caller is trusted;
//! 2. [`Engine::build`] checks it — which output paths it may have signed, [`ownership`]:
//!    input-addressed ones computed from the graph, or a trusted caller's as given — pins its
//!    inputs, and runs one step in a fresh VM (`crate::build::run_step`), which returns only a
//!    checked outcome;
//! 3. [`publish::publish`], the one publish step, loads the signing key once, writes the trace
//!    store with records signed once, and registers the outputs in the content store when the
//!    build has one; an output that differs from the entry already published for its path
//!    keeps that entry and is reported [`Diverged`], with the build's own NAR hash;
//! 4. the engine answers with a [`BuildResult`] carrying the attester kind of the checked
//!    evidence and those signed records; the front-end encodes it for its client.
//!
//! Besides the build: [`ValidPathInfo`] and [`UploadSource`] (what the content store keeps and
//! receives) and the one log trait of a build, [`BuildLog`].

pub mod engine;
pub mod keys;
pub mod log;
pub mod ownership;
pub mod path_info;
pub mod publish;
pub mod request;
pub mod result;

pub use engine::{Engine, Inputs};
pub use keys::KeyNaming;
pub use log::{BuildLog, NullLog, Progress};
pub use ownership::{Derivations, Refusal};
pub use path_info::{UploadError, UploadSource, ValidPathInfo};
pub use publish::PublishConfig;
pub use request::{BuildRequest, CaRuleChoice, NixVersion};
pub use result::{
    BuildResult, Built, Diverged, Failure, FailureStatus, LegacyRealisation, PublishedOutput,
};
