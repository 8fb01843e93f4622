//! Store paths: parsing, Nix's name rules, and `makeStorePath` with its helpers.
//!
//! A [`StorePath`] is `/nix/store/<32 nix32 chars>-<name>`: a 20-byte hash plus a name of at most
//! 211 characters from `[A-Za-z0-9+\-._?=]`, not starting with `.`. Store paths order as Nix
//! orders them: by their base name as bytes (not by the decoded hash). With serde a store path
//! is its absolute path as a string; deserialising parses it (a malformed path is an error).
//!
//! Only the default store directory [`STORE_DIR`] (`/nix/store`) is supported: every path
//! computed here hashes that directory into the path, so a store elsewhere would yield other paths.
//!
//! The path constructors follow Nix's `makeStorePath` family: [`make_store_path`],
//! [`make_text_path`] (`text:` with references, e.g. `.drv` files), [`make_fixed_output_path`]
//! (`source` paths with references and `self`, and `output:out` for other fixed outputs) and
//! [`make_output_path`] (input-addressed `output:<id>`). Content-address *recomputation from
//! bytes* and floating-CA output paths live in other modules.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::base32;
use crate::hash::{sha256, Hash, HashAlgo};

/// The only store directory supported.
pub const STORE_DIR: &str = "/nix/store";
/// Length of the nix32 hash part of a store path.
pub const HASH_PART_LEN: usize = 32;
/// Longest allowed name (Nix's `StorePath::MaxPathLen`).
pub const MAX_NAME_LEN: usize = 211;

/// Why a store path or name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorePathError {
    /// Not under `/nix/store/`.
    #[error("path {0:?} is not in the Nix store {STORE_DIR}")]
    NotInStore(String),
    /// Shorter than 32 hash characters + `-` + a name.
    #[error("store path {0:?} is too short to be a valid store path")]
    TooShort(String),
    /// A hash character outside the nix32 alphabet.
    #[error("store path {path:?} contains illegal base-32 character {found:?}")]
    BadHashChar {
        /// The path.
        path: String,
        /// The character.
        found: char,
    },
    /// No `-` after the hash.
    #[error("store path {0:?} has no '-' after its hash part")]
    MissingDash(String),
    /// Empty name.
    #[error("store path {0:?} has an empty name")]
    EmptyName(String),
    /// Name over [`MAX_NAME_LEN`].
    #[error("store path {path:?} has a name longer than {MAX_NAME_LEN} characters ({len})")]
    NameTooLong {
        /// The path.
        path: String,
        /// The name's length.
        len: usize,
    },
    /// Name starting with `.`.
    #[error("store path {0:?} has a name starting with illegal character '.'")]
    LeadingDot(String),
    /// A name character outside `[A-Za-z0-9+\-._?=]`.
    #[error("store path {path:?} contains illegal character {found:?} in its name")]
    BadNameChar {
        /// The path.
        path: String,
        /// The character.
        found: char,
    },
    /// A `.drv` path was expected.
    #[error("store path {0:?} is not a derivation (name does not end in .drv)")]
    NotDrv(String),
    /// References were given where Nix forbids them (non-`source` fixed outputs).
    #[error("fixed-output path {0:?} of this kind cannot have references")]
    RefsNotAllowed(String),
    /// A text path needs a SHA-256 hash.
    #[error("{what} requires a sha256 hash, got {got}")]
    NeedsSha256 {
        /// What was being computed.
        what: &'static str,
        /// The algorithm given.
        got: HashAlgo,
    },
}

/// A store path: hash and name. Displays as the absolute path.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StorePath {
    /// `<hash>-<name>`; ordering and equality go by this string, as in Nix.
    base: String,
    digest: [u8; 20],
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({STORE_DIR}/{})", self.base)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

/// Checks a store path name against Nix's rules; `path` is only used in the error.
pub fn check_name(path: &str, name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName(path.to_owned()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong { path: path.to_owned(), len: name.len() });
    }
    if name.starts_with('.') {
        return Err(StorePathError::LeadingDot(path.to_owned()));
    }
    if let Some(c) = name.chars().find(|&c| !is_name_char(c)) {
        return Err(StorePathError::BadNameChar { path: path.to_owned(), found: c });
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.' | '_' | '?' | '=')
}

impl StorePath {
    /// Parses an absolute path `/nix/store/<hash>-<name>`.
    pub fn parse(path: &str) -> Result<Self, StorePathError> {
        let base = path
            .strip_prefix(STORE_DIR)
            .and_then(|p| p.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(path.to_owned()))?;
        Self::from_base_name(base).map_err(|e| e.with_path(path))
    }

    /// Parses a base name `<hash>-<name>` (no directory).
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        let b = base.as_bytes();
        if b.len() < HASH_PART_LEN + 1 {
            return Err(StorePathError::TooShort(base.to_owned()));
        }
        if let Some(&c) = b[..HASH_PART_LEN].iter().find(|&&c| !base32::is_nix32_char(c)) {
            return Err(StorePathError::BadHashChar {
                path: base.to_owned(),
                found: char::from(c),
            });
        }
        if b[HASH_PART_LEN] != b'-' {
            return Err(StorePathError::MissingDash(base.to_owned()));
        }
        check_name(base, &base[HASH_PART_LEN + 1..])?;
        let digest = base32::decode_fixed::<20>(&base[..HASH_PART_LEN])
            .expect("32 valid nix32 characters always decode to 20 bytes");
        Ok(Self { base: base.to_owned(), digest })
    }

    /// A store path from its 20-byte hash and a name (checked).
    pub fn from_parts(digest: [u8; 20], name: &str) -> Result<Self, StorePathError> {
        let base = format!("{}-{}", base32::encode(&digest), name);
        check_name(&base, name)?;
        Ok(Self { base, digest })
    }

    /// The 32-character nix32 hash part.
    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_PART_LEN]
    }

    /// The 20 hash bytes.
    pub fn digest(&self) -> &[u8; 20] {
        &self.digest
    }

    /// The name after the hash part.
    pub fn name(&self) -> &str {
        &self.base[HASH_PART_LEN + 1..]
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base
    }

    /// Whether the name ends in `.drv`.
    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }

    /// For a `.drv` path, the derivation's name (without `.drv`).
    pub fn drv_name(&self) -> Result<&str, StorePathError> {
        self.name().strip_suffix(".drv").ok_or_else(|| StorePathError::NotDrv(self.to_string()))
    }
}

impl StorePathError {
    fn with_path(self, path: &str) -> Self {
        let p = path.to_owned();
        match self {
            Self::TooShort(_) => Self::TooShort(p),
            Self::BadHashChar { found, .. } => Self::BadHashChar { path: p, found },
            Self::MissingDash(_) => Self::MissingDash(p),
            Self::EmptyName(_) => Self::EmptyName(p),
            Self::NameTooLong { len, .. } => Self::NameTooLong { path: p, len },
            Self::LeadingDot(_) => Self::LeadingDot(p),
            Self::BadNameChar { found, .. } => Self::BadNameChar { path: p, found },
            other => other,
        }
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, StorePathError> {
        Self::parse(s)
    }
}

/// serde: the absolute path as a string (`/nix/store/<hash>-<name>`), read in place and parsed,
/// so malformed paths are refused while deserialising.
impl serde::Serialize for StorePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StorePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Parse;
        impl serde::de::Visitor<'_> for Parse {
            type Value = StorePath;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a store path /nix/store/<hash>-<name>")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<StorePath, E> {
                StorePath::parse(s).map_err(E::custom)
            }
        }
        d.deserialize_str(Parse)
    }
}

/// XOR-folds `hash` into `N` bytes (Nix's `compressHash`).
pub fn compress_hash<const N: usize>(hash: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, b) in hash.iter().enumerate() {
        out[i % N] ^= b;
    }
    out
}

/// Nix's `makeStorePath(type, hash, name)`:
/// `nix32(compress20(sha256(type + ":" + algo + ":" + hex + ":/nix/store:" + name)))-name`.
pub fn make_store_path(ty: &str, inner: &Hash, name: &str) -> Result<StorePath, StorePathError> {
    let s = format!("{ty}:{}:{}:{STORE_DIR}:{name}", inner.algo(), inner.to_base16());
    StorePath::from_parts(compress_hash::<20>(&sha256(s)), name)
}

/// Nix's `makeType`: `ty` followed by `:<path>` for each reference (sorted) and `:self`.
pub fn make_type(ty: &str, refs: &BTreeSet<StorePath>, self_ref: bool) -> String {
    let mut s = ty.to_owned();
    for r in refs {
        s.push(':');
        s.push_str(&r.to_string());
    }
    if self_ref {
        s.push_str(":self");
    }
    s
}

/// A `text:` path (`.drv` files, `builtins.toFile`): SHA-256 of the contents, with references.
pub fn make_text_path(
    name: &str,
    content_sha256: &Hash,
    refs: &BTreeSet<StorePath>,
) -> Result<StorePath, StorePathError> {
    if content_sha256.algo() != HashAlgo::Sha256 {
        return Err(StorePathError::NeedsSha256 {
            what: "a text store path",
            got: content_sha256.algo(),
        });
    }
    make_store_path(&make_type("text", refs, false), content_sha256, name)
}

/// How a fixed-output (or CA) store object's contents are hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileIngestionMethod {
    /// The hash of a single regular file's bytes.
    Flat,
    /// The hash of the NAR serialisation (`r:`).
    Recursive,
}

impl FileIngestionMethod {
    /// `""` or `"r:"`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Flat => "",
            Self::Recursive => "r:",
        }
    }
}

/// A `source` path: recursive SHA-256 (NAR hash) with references and optional `self`.
pub fn make_source_path(
    name: &str,
    nar_sha256: &Hash,
    refs: &BTreeSet<StorePath>,
    self_ref: bool,
) -> Result<StorePath, StorePathError> {
    if nar_sha256.algo() != HashAlgo::Sha256 {
        return Err(StorePathError::NeedsSha256 {
            what: "a source store path",
            got: nar_sha256.algo(),
        });
    }
    make_store_path(&make_type("source", refs, self_ref), nar_sha256, name)
}

/// Nix's `makeFixedOutputPath`: recursive SHA-256 gives a `source` path (references and `self`
/// allowed); anything else gives `output:out` over
/// `sha256("fixed:out:" + [r:] + algo + ":" + hex + ":")` and may not have references.
pub fn make_fixed_output_path(
    name: &str,
    method: FileIngestionMethod,
    hash: &Hash,
    refs: &BTreeSet<StorePath>,
    self_ref: bool,
) -> Result<StorePath, StorePathError> {
    if method == FileIngestionMethod::Recursive && hash.algo() == HashAlgo::Sha256 {
        return make_source_path(name, hash, refs, self_ref);
    }
    if !refs.is_empty() || self_ref {
        return Err(StorePathError::RefsNotAllowed(name.to_owned()));
    }
    let inner = format!("fixed:out:{}{}:{}:", method.prefix(), hash.algo(), hash.to_base16());
    make_store_path("output:out", &Hash::sha256(sha256(inner)), name)
}

/// Nix's `outputPathName`: `name` for `out`, otherwise `name-<output>`.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_owned()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// Nix's `makeOutputPath`: an input-addressed output path from the derivation's hash modulo.
pub fn make_output_path(
    output: &str,
    drv_hash_modulo: &Hash,
    drv_name: &str,
) -> Result<StorePath, StorePathError> {
    make_store_path(
        &format!("output:{output}"),
        drv_hash_modulo,
        &output_path_name(drv_name, output),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_and_print() {
        let s = "/nix/store/fib9f3qwvznq3m047cv9kmy5lffsrny7-ca-hello";
        let p: StorePath = s.parse().unwrap();
        assert_eq!(p.to_string(), s);
        assert_eq!(p.hash_part(), "fib9f3qwvznq3m047cv9kmy5lffsrny7");
        assert_eq!(p.name(), "ca-hello");
        assert_eq!(StorePath::from_parts(*p.digest(), "ca-hello").unwrap(), p);
    }

    #[test]
    fn rejects_with_named_errors() {
        let h = "fib9f3qwvznq3m047cv9kmy5lffsrny7";
        type Check = fn(&StorePathError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            ("/nix/stor/x".into(), |e| matches!(e, StorePathError::NotInStore(_))),
            ("/nix/store/abc".into(), |e| matches!(e, StorePathError::TooShort(_))),
            (format!("/nix/store/{}e-x", &h[..31]), |e| {
                matches!(e, StorePathError::BadHashChar { found: 'e', .. })
            }),
            (format!("/nix/store/{h}_x"), |e| matches!(e, StorePathError::MissingDash(_))),
            (format!("/nix/store/{h}-"), |e| matches!(e, StorePathError::EmptyName(_))),
            (format!("/nix/store/{h}-.x"), |e| matches!(e, StorePathError::LeadingDot(_))),
            (format!("/nix/store/{h}-a/b"), |e| {
                matches!(e, StorePathError::BadNameChar { found: '/', .. })
            }),
            (format!("/nix/store/{h}-{}", "a".repeat(212)), |e| {
                matches!(e, StorePathError::NameTooLong { len: 212, .. })
            }),
        ];
        for (s, ok) in cases {
            let e = StorePath::parse(&s).unwrap_err();
            assert!(ok(&e), "{s}: {e}");
        }
        assert!(StorePath::parse(&format!("/nix/store/{h}-{}", "a".repeat(211))).is_ok());
    }

    #[test]
    fn serde_is_the_string_form_and_refuses_bad_paths() {
        let s = "/nix/store/fib9f3qwvznq3m047cv9kmy5lffsrny7-ca-hello";
        let p = StorePath::parse(s).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<StorePath>(&format!("\"{s}\"")).unwrap(), p);
        let e = serde_json::from_str::<StorePath>("\"/nix/store/abc\"").unwrap_err();
        assert!(e.to_string().contains("too short"), "{e}");
        assert!(serde_json::from_str::<StorePath>("1").is_err());
    }

    #[test]
    fn ia_output_path_of_verified_example() {
        // nix-protocol.md §4.2: hashPlaceholder("out") = "/" + nix32(sha256("nix-output:out")).
        assert_eq!(
            base32::encode(&sha256("nix-output:out")),
            "1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
    }

    #[test]
    fn fixed_output_rules() {
        let h = HashAlgo::Sha256.digest(b"x");
        let r = BTreeSet::new();
        let src = make_fixed_output_path("a", FileIngestionMethod::Recursive, &h, &r, false);
        let flat = make_fixed_output_path("a", FileIngestionMethod::Flat, &h, &r, false);
        assert_ne!(src.unwrap(), flat.unwrap());
        assert!(matches!(
            make_fixed_output_path("a", FileIngestionMethod::Flat, &h, &r, true),
            Err(StorePathError::RefsNotAllowed(_))
        ));
    }

    proptest! {
        #[test]
        fn round_trip(digest in any::<[u8; 20]>(), name in "[A-Za-z0-9+_?=][A-Za-z0-9+\\-._?=]{0,210}") {
            let p = StorePath::from_parts(digest, &name).unwrap();
            let q = StorePath::parse(&p.to_string()).unwrap();
            prop_assert_eq!(&q, &p);
            prop_assert_eq!(q.name(), name.as_str());
            prop_assert_eq!(StorePath::from_base_name(p.base_name()).unwrap(), p);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = StorePath::parse(&s);
            let _ = StorePath::from_base_name(&s);
        }

        #[test]
        fn order_is_base_name_order(a in any::<[u8; 20]>(), b in any::<[u8; 20]>()) {
            let pa = StorePath::from_parts(a, "x").unwrap();
            let pb = StorePath::from_parts(b, "x").unwrap();
            prop_assert_eq!(pa.cmp(&pb), pa.to_string().cmp(&pb.to_string()));
        }
    }
}
