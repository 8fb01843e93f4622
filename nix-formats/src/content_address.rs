//! Content addresses (Nix's `ca` field) and checking them against contents.
//!
//! [`ContentAddress`] parses and prints `text:sha256:<hash>`, `fixed:<algo>:<hash>` (flat) and
//! `fixed:r:<algo>:<hash>` (recursive, NAR); the digest may be base16, nix32 or base64 when
//! parsed (the length decides, as in Nix) and is printed in nix32. From contents (a NAR stream)
//! it recomputes the hash the way Nix's `hashCAPath` does — the NAR for `r:`, the single file's
//! bytes for flat and `text`, with the store path's own hash part zeroed for `fixed` (that is how a
//! self-referencing path is checked, under a [`SelfRefRule`]) — and the store path
//! (`makeFixedOutputPath` / `makeTextPath`), so [`verify`] can check a claimed `ca`, path and
//! references like `addToStore`/`isContentAddressed`. What is not here: Git hashing (Nix ≥ 2.20
//! `fixed:git:`), which is refused with a clear error.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use crate::ca::{HashModuloSink, SelfRefRule};
use crate::hash::{Hash, HashAlgo, HashError, Hasher};
use crate::nar::{NarError, NarEvent, NarLimits, NarReader};
use crate::refs::hash_part_bytes;
use crate::store_path::{
    make_fixed_output_path, make_text_path, FileIngestionMethod, StorePath, StorePathError,
};

/// A content address: how a store object's contents determine its path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ContentAddress {
    /// `text:sha256:…` — a single file (`.drv`, `builtins.toFile`), SHA-256 of its bytes.
    Text {
        /// SHA-256 of the contents.
        hash: Hash,
    },
    /// `fixed:[r:]<algo>:…` — fixed-output and floating CA outputs, `builtins.path`, sources.
    Fixed {
        /// Flat (one file's bytes) or recursive (NAR).
        method: FileIngestionMethod,
        /// The hash.
        hash: Hash,
    },
}

/// How contents are hashed, without the hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentAddressMethod {
    /// `text:`.
    Text,
    /// `fixed:` flat or recursive.
    Fixed(FileIngestionMethod),
}

/// Why a `ca` string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentAddressParseError {
    /// Not `<prefix>:<rest>` with a known prefix.
    #[error("content address {0:?} does not start with 'text:' or 'fixed:'")]
    UnknownPrefix(String),
    /// `fixed:git:` (Nix ≥ 2.20) is not supported.
    #[error("content address {0:?} uses Git hashing, which is not supported")]
    GitUnsupported(String),
    /// No `<algo>:<digest>`.
    #[error("content address {0:?} has no '<algo>:<digest>' part")]
    MissingAlgo(String),
    /// A text address not using SHA-256.
    #[error("text content address {0:?} must use sha256")]
    TextNotSha256(String),
    /// The hash did not parse.
    #[error("content address {ca:?} has an invalid hash")]
    Hash {
        /// The string.
        ca: String,
        /// The cause.
        #[source]
        source: HashError,
    },
}

impl ContentAddress {
    /// Parses Nix's `ca` string.
    pub fn parse(s: &str) -> Result<Self, ContentAddressParseError> {
        let (prefix, rest) =
            s.split_once(':').ok_or_else(|| ContentAddressParseError::UnknownPrefix(s.into()))?;
        let (method, rest) = match prefix {
            "text" => (ContentAddressMethod::Text, rest),
            "fixed" => match rest.strip_prefix("r:") {
                Some(r) => (ContentAddressMethod::Fixed(FileIngestionMethod::Recursive), r),
                None if rest.starts_with("git:") => {
                    return Err(ContentAddressParseError::GitUnsupported(s.into()))
                }
                None => (ContentAddressMethod::Fixed(FileIngestionMethod::Flat), rest),
            },
            _ => return Err(ContentAddressParseError::UnknownPrefix(s.into())),
        };
        let (algo, digest) =
            rest.split_once(':').ok_or_else(|| ContentAddressParseError::MissingAlgo(s.into()))?;
        let hash_err = |source| ContentAddressParseError::Hash { ca: s.into(), source };
        let algo: HashAlgo = algo.parse().map_err(hash_err)?;
        if method == ContentAddressMethod::Text && algo != HashAlgo::Sha256 {
            return Err(ContentAddressParseError::TextNotSha256(s.into()));
        }
        let hash = Hash::parse_digest(algo, digest).map_err(hash_err)?;
        Ok(Self::from_parts(method, hash))
    }

    /// Builds an address from a method and a hash.
    pub fn from_parts(method: ContentAddressMethod, hash: Hash) -> Self {
        match method {
            ContentAddressMethod::Text => Self::Text { hash },
            ContentAddressMethod::Fixed(method) => Self::Fixed { method, hash },
        }
    }

    /// The method.
    pub fn method(&self) -> ContentAddressMethod {
        match self {
            Self::Text { .. } => ContentAddressMethod::Text,
            Self::Fixed { method, .. } => ContentAddressMethod::Fixed(*method),
        }
    }

    /// The hash.
    pub fn hash(&self) -> &Hash {
        match self {
            Self::Text { hash } | Self::Fixed { hash, .. } => hash,
        }
    }

    /// The store path with this address, `name` and `references` (`self_ref`: whether it also
    /// refers to itself; only recursive SHA-256 addresses may have references or `self`).
    pub fn store_path(
        &self,
        name: &str,
        references: &BTreeSet<StorePath>,
        self_ref: bool,
    ) -> Result<StorePath, StorePathError> {
        match self {
            Self::Text { hash } => {
                if self_ref {
                    return Err(StorePathError::RefsNotAllowed(name.to_owned()));
                }
                make_text_path(name, hash, references)
            }
            Self::Fixed { method, hash } => {
                make_fixed_output_path(name, *method, hash, references, self_ref)
            }
        }
    }
}

impl fmt::Display for ContentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text { hash } => write!(f, "text:{}:{}", hash.algo(), hash.to_nix32()),
            Self::Fixed { method, hash } => {
                write!(f, "fixed:{}{}:{}", method.prefix(), hash.algo(), hash.to_nix32())
            }
        }
    }
}

impl FromStr for ContentAddress {
    type Err = ContentAddressParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Why contents do not match a content address.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The NAR is invalid.
    #[error("invalid NAR")]
    Nar(#[from] NarError),
    /// Reading failed.
    #[error("reading the NAR")]
    Io(#[source] io::Error),
    /// A flat or text address needs a single non-executable regular file.
    #[error("a {0} content address needs a single non-executable regular file")]
    NotARegularFile(&'static str),
    /// The recomputed hash differs.
    #[error("content hash mismatch: claimed {claimed}, contents have {actual}")]
    HashMismatch {
        /// Claimed hash.
        claimed: String,
        /// Recomputed hash.
        actual: String,
    },
    /// The recomputed path differs.
    #[error("path '{claimed}' claims to be content-addressed but its contents and references give '{computed}'")]
    PathMismatch {
        /// The path.
        claimed: StorePath,
        /// What the address gives.
        computed: StorePath,
    },
    /// The path could not be computed (e.g. references where none are allowed).
    #[error("computing the content-addressed path")]
    Path(#[from] StorePathError),
}

/// Recomputes the hash of `method` with `algo` over the contents in `nar`; for `fixed`,
/// `modulus` (the store path's own hash part, if known) is zeroed first under `rule`.
pub fn content_hash(
    method: ContentAddressMethod,
    algo: HashAlgo,
    nar: impl Read,
    modulus: Option<&StorePath>,
    rule: SelfRefRule,
    limits: &NarLimits,
) -> Result<Hash, VerifyError> {
    enum Sink {
        Plain(Hasher),
        Modulo(HashModuloSink),
    }
    impl Feed for Sink {
        fn feed(&mut self, d: &[u8]) {
            match self {
                Sink::Plain(h) => h.update(d),
                Sink::Modulo(m) => m.update(d),
            }
        }
    }
    let mut sink = match (method, modulus) {
        (ContentAddressMethod::Fixed(_), Some(p)) => {
            Sink::Modulo(HashModuloSink::new(algo, hash_part_bytes(p), rule))
        }
        _ => Sink::Plain(Hasher::new(algo)),
    };
    match method {
        ContentAddressMethod::Fixed(FileIngestionMethod::Recursive) => {
            let mut reader =
                NarReader::new(TeeInto { inner: nar, sink: &mut sink }, limits.clone());
            reader.validate_to_end()?;
        }
        _ => {
            let what = if method == ContentAddressMethod::Text { "text" } else { "flat" };
            let mut reader = NarReader::new(nar, limits.clone());
            match reader.next_event()? {
                Some(NarEvent::Regular { executable: false, .. }) => {}
                _ => return Err(VerifyError::NotARegularFile(what)),
            }
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = reader.read_contents(&mut buf)?;
                if n == 0 {
                    break;
                }
                sink.feed(&buf[..n]);
            }
            reader.validate_to_end()?;
        }
    }
    Ok(match sink {
        Sink::Plain(h) => h.finish(),
        Sink::Modulo(m) => m.finish().0,
    })
}

/// Hashes what is read into the sink too.
struct TeeInto<'a, R: Read, S: Feed> {
    inner: R,
    sink: &'a mut S,
}

trait Feed {
    fn feed(&mut self, d: &[u8]);
}

impl<R: Read, S: Feed> Read for TeeInto<'_, R, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.feed(&buf[..n]);
        Ok(n)
    }
}

/// Checks that `path` with `references` (itself included if self-referencing) is what `ca` and
/// the contents in `nar` give: the content hash (Nix's import check) and the path
/// (`isContentAddressed`).
pub fn verify(
    path: &StorePath,
    ca: &ContentAddress,
    references: &BTreeSet<StorePath>,
    nar: impl Read,
    rule: SelfRefRule,
    limits: &NarLimits,
) -> Result<(), VerifyError> {
    let actual = content_hash(ca.method(), ca.hash().algo(), nar, Some(path), rule, limits)?;
    if &actual != ca.hash() {
        return Err(VerifyError::HashMismatch {
            claimed: ca.to_string(),
            actual: ContentAddress::from_parts(ca.method(), actual).to_string(),
        });
    }
    let mut refs = references.clone();
    let self_ref = refs.remove(path);
    let computed = ca.store_path(path.name(), &refs, self_ref)?;
    if &computed != path {
        return Err(VerifyError::PathMismatch { claimed: path.clone(), computed });
    }
    Ok(())
}

#[cfg(test)]
#[path = "content_address_tests.rs"]
mod tests;
