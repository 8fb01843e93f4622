//! Nix's data formats, computed exactly as Nix computes them.
//!
//! What is here: nixbase32, hashes in every Nix notation, store paths and `makeStorePath`,
//! derivations (ATerm, `nix show-derivation` JSON, hash modulo, output paths, placeholders,
//! resolution), NAR (streaming writer, reader and a hostile-input-safe unpacker), reference
//! scanning, content-addressed output paths (with each Nix version's self-reference rule),
//! realisation and narinfo records with their fingerprints, and Nix ed25519 keys.
//!
//! What is not here: any I/O policy (where files live, what is trusted), processes, network.
//! Functions that read or write a directory tree take the path they are given.
#![forbid(unsafe_code)]

pub mod base32;
pub mod ca;
pub mod content_address;
pub mod derivation;
pub mod fuzzing;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod realisation;
pub mod refs;
pub mod resolve;
pub mod signing;
pub mod store_path;

pub use derivation::{Derivation, DerivationOutput};
pub use hash::{Hash, HashAlgo};
pub use store_path::{make_store_path, StorePath, STORE_DIR};
