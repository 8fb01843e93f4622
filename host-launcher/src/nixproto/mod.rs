//! Nix's worker and serve protocols, server side: how Nix reaches vouch as a remote builder.
//!
//! Layout (Firecracker style): the front-ends [`worker`] (`ssh-ng://`, `--stdio`; on a Unix
//! socket for `unix://` through [`listen`], `--listen`) and [`serve`] (`ssh://`, `--serve
//! --write`) parse each request into one [`Action`]; the session (a [`Handler`],
//! `crate::nixbuilder`) executes it on the host's core and returns a [`Reply`], which the
//! front-end encodes for the client's version (a core build result becomes the wire
//! [`BuildResult`]). The session never sees the wire. Shared pieces: [`wire`] (integers,
//! strings, framed streams), [`types`] (records per protocol version), [`version`] (protocol
//! version → Nix release range → realisation format and CA self-reference rule).
//!
//! `fuzzing` (hidden) holds the bodies of the protocol fuzz targets.
//!
//! What is not here: the host's records, the content store, builds, publishing
//! (`crate::core`, `crate::store`, `crate::nixbuilder`). The wire layouts are written down in
//! `docs/nix-remote-builder.md` and in each module.

pub mod action;
#[doc(hidden)]
pub mod fuzzing;
pub mod listen;
pub mod serve;
pub mod types;
pub mod version;
pub mod wire;
pub mod worker;

#[cfg(test)]
mod golden;

pub use action::{
    Action, ActionError, BuildDerivation, BuildMode, BuildOptions, BuildResult, BuildStatus,
    BuiltOutput, ClientOptions, DerivedPath, Handler, NarStream, Reply,
};
pub use version::{ClientProfile, Protocol, RealisationFormat};
pub use wire::WireError;

/// Why a protocol session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The stream failed or the peer hung up mid-message.
    #[error("protocol stream")]
    Wire(#[from] WireError),
    /// The first word was not the protocol's magic.
    #[error("this is not a Nix {protocol} protocol client (first word {got:#x})")]
    BadMagic {
        /// `worker` or `serve`.
        protocol: &'static str,
        /// What arrived.
        got: u64,
    },
    /// A protocol version we do not serve.
    #[error("Nix {protocol} protocol version {version} is not supported")]
    Version {
        /// `worker` or `serve`.
        protocol: &'static str,
        /// The version.
        version: String,
    },
    /// The peer hung up in the middle of an upload (nothing of it was registered).
    #[error(
        "the client went away in the middle of an upload ({0:?}); nothing of it was registered"
    )]
    PeerGone(std::io::ErrorKind),
    /// A request we refuse and, in the serve protocol, cannot answer with an error message.
    #[error("{0}")]
    Refused(String),
    /// The session's reply could not be encoded after `STDERR_LAST` was sent.
    #[error("could not send the reply: {0}")]
    Reply(String),
}
