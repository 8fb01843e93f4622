//! Derivations: the data type, its output kinds, `.drv` paths and placeholders.
//!
//! A [`Derivation`] holds exactly what a `.drv` file holds (Nix 2.8's ATerm): outputs, input
//! derivations, input sources, platform, builder, args and environment. The derivation's *name*
//! is not in the ATerm; functions that need it (drv path, output paths, hash modulo) take it as an
//! argument, usually from [`StorePath::drv_name`].
//!
//! **Strings.** Nix strings are bytes. We represent every derivation string as UTF-8 [`String`]:
//! parsing a `.drv` whose strings are not valid UTF-8 fails with [`DerivationError::NotUtf8`]
//! naming the byte offset. (Nix's own JSON output cannot carry such strings either.)
//!
//! Submodules: [`aterm`] (parse/print, byte-exact), [`json`] (`nix show-derivation`, Nix 2.8
//! shape), [`modulo`] (`hashDerivationModulo`, input-addressed output paths). Resolution of CA
//! derivations is in [`crate::resolve`]; floating-CA output paths from built contents are not here.

pub mod aterm;
pub mod json;
pub mod modulo;
#[cfg(test)]
mod proptests;

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::base32;
use crate::hash::{sha256, Hash, HashAlgo, HashError};
use crate::store_path::{
    make_fixed_output_path, make_text_path, output_path_name, FileIngestionMethod, StorePath,
    StorePathError,
};

pub use modulo::{DrvGraph, DrvHashModulo};

/// Why a derivation could not be parsed, printed or hashed.
#[derive(Debug, Error)]
pub enum DerivationError {
    /// ATerm syntax error.
    #[error("invalid derivation ATerm at byte {pos}: {msg}")]
    Syntax {
        /// Byte offset in the input.
        pos: usize,
        /// What was expected or found.
        msg: String,
    },
    /// A string is not UTF-8.
    #[error(
        "derivation string at byte {pos} is not valid UTF-8 (only UTF-8 strings are supported)"
    )]
    NotUtf8 {
        /// Byte offset of the string's opening quote.
        pos: usize,
    },
    /// Entries out of Nix's sorted order (or duplicated), so the ATerm is not canonical.
    #[error("derivation {what} at byte {pos} are not sorted and unique as Nix writes them")]
    NotCanonical {
        /// Which list.
        what: &'static str,
        /// Byte offset.
        pos: usize,
    },
    /// A store path inside the derivation is invalid.
    #[error("invalid store path in derivation {what}")]
    StorePath {
        /// Where it was.
        what: String,
        /// The path error.
        #[source]
        source: StorePathError,
    },
    /// An output's (path, hashAlgo, hash) triple is inconsistent.
    #[error("invalid derivation output {name:?}: {reason}")]
    BadOutput {
        /// The output name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A hash inside the derivation is invalid.
    #[error("invalid hash in derivation output {name:?}")]
    Hash {
        /// The output name.
        name: String,
        /// The hash error.
        #[source]
        source: HashError,
    },
    /// JSON (`nix show-derivation` shape) is malformed.
    #[error("invalid derivation JSON: {0}")]
    Json(String),
    /// An input derivation needed for hashing is unknown.
    #[error("input derivation {0} is not known (needed for its hash modulo)")]
    MissingInputDrv(StorePath),
    /// An input derivation does not have the output that is depended on.
    #[error("input derivation {drv} has no output {output:?}")]
    MissingInputOutput {
        /// The input derivation.
        drv: StorePath,
        /// The output name.
        output: String,
    },
    /// The input derivation graph has a cycle (impossible for real `.drv` files).
    #[error("derivation graph has a cycle through {0}")]
    Cycle(StorePath),
    /// Output paths cannot be computed for this kind of derivation.
    #[error("derivation {name:?}: {reason}")]
    NotApplicable {
        /// Derivation name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// How a content-addressed output is hashed (Nix's `ContentAddressMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CaMethod {
    /// Hash of a single file's bytes (`sha256`).
    Flat,
    /// Hash of the NAR (`r:sha256`).
    Recursive,
    /// `text:` hashing, like `.drv` files (newer Nix; Nix 2.8 cannot instantiate these).
    Text,
}

impl CaMethod {
    /// The prefix before the algorithm: `""`, `"r:"` or `"text:"`.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Flat => "",
            Self::Recursive => "r:",
            Self::Text => "text:",
        }
    }

    /// `<prefix><algo>`, e.g. `r:sha256`.
    pub fn method_algo(self, algo: HashAlgo) -> String {
        format!("{}{algo}", self.prefix())
    }

    /// Parses `<prefix><algo>`.
    pub fn parse_method_algo(s: &str) -> Result<(CaMethod, HashAlgo), HashError> {
        let (m, rest) = if let Some(r) = s.strip_prefix("r:") {
            (Self::Recursive, r)
        } else if let Some(r) = s.strip_prefix("text:") {
            (Self::Text, r)
        } else {
            (Self::Flat, s)
        };
        Ok((m, rest.parse()?))
    }
}

/// One output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivationOutput {
    /// Input-addressed: the path is known from the derivation (`(path, "", "")`).
    InputAddressed(StorePath),
    /// Fixed-output: the content hash is known (`(path, "r:sha256", "<hex>")`). `path` is the one
    /// written in the `.drv`; [`Derivation::check_output_paths`] checks it against the hash.
    Fixed {
        /// Hashing method.
        method: CaMethod,
        /// Expected hash.
        hash: Hash,
        /// The path written in the `.drv`.
        path: StorePath,
    },
    /// Floating content-addressed: the path is known only after the build (`("", "r:sha256", "")`).
    Floating {
        /// Hashing method.
        method: CaMethod,
        /// Hash algorithm.
        algo: HashAlgo,
    },
    /// Input-addressed but not yet known because an input is floating (`("", "", "")`).
    Deferred,
    /// Impure (`("", "r:sha256", "impure")`).
    Impure {
        /// Hashing method.
        method: CaMethod,
        /// Hash algorithm.
        algo: HashAlgo,
    },
}

impl DerivationOutput {
    /// The `(path, hashAlgo, hash)` triple of the ATerm and of the wire `BasicDerivation`.
    pub fn to_triple(&self) -> (String, String, String) {
        let (algo, hash) = self.algo_and_hash();
        (self.path().map_or_else(String::new, ToString::to_string), algo, hash)
    }

    /// The `(hashAlgo, hash)` of the triple: `("", "")` for input-addressed and deferred
    /// outputs, `hash` `""` for floating and `"impure"` for impure ones.
    pub fn algo_and_hash(&self) -> (String, String) {
        match self {
            Self::InputAddressed(_) | Self::Deferred => Default::default(),
            Self::Fixed { method, hash, .. } => (method.method_algo(hash.algo()), hash.to_base16()),
            Self::Floating { method, algo } => (method.method_algo(*algo), String::new()),
            Self::Impure { method, algo } => (method.method_algo(*algo), "impure".into()),
        }
    }

    /// Parses a `(path, hashAlgo, hash)` triple (strictly: a fixed hash must be lowercase hex).
    pub fn from_triple(
        name: &str,
        path: &str,
        algo: &str,
        hash: &str,
    ) -> Result<Self, DerivationError> {
        let path = match path {
            "" => None,
            p => Some(StorePath::parse(p).map_err(|source| DerivationError::StorePath {
                what: format!("output {name:?}"),
                source,
            })?),
        };
        Self::from_parts(name, path, algo, hash)
    }

    /// [`from_triple`](Self::from_triple) with the path already parsed (`None` for `""`).
    pub fn from_parts(
        name: &str,
        path: Option<StorePath>,
        algo: &str,
        hash: &str,
    ) -> Result<Self, DerivationError> {
        let bad = |reason: &str| DerivationError::BadOutput {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        if algo.is_empty() {
            if !hash.is_empty() {
                return Err(bad("a hash without a hash algorithm"));
            }
            return Ok(path.map_or(Self::Deferred, Self::InputAddressed));
        }
        let hash_err = |source| DerivationError::Hash { name: name.to_owned(), source };
        let (method, algo) = CaMethod::parse_method_algo(algo).map_err(hash_err)?;
        match hash {
            "impure" | "" if path.is_some() => {
                Err(bad("an impure or floating output must not have a path"))
            }
            "impure" => Ok(Self::Impure { method, algo }),
            "" => Ok(Self::Floating { method, algo }),
            _ => {
                let h = Hash::parse_digest(algo, hash).map_err(hash_err)?;
                if h.to_base16() != hash {
                    return Err(bad("a fixed-output hash must be lowercase base16"));
                }
                let path = path.ok_or_else(|| bad("a fixed output must have a path"))?;
                Ok(Self::Fixed { method, hash: h, path })
            }
        }
    }

    /// The path if it is known statically (input-addressed or fixed).
    pub fn path(&self) -> Option<&StorePath> {
        match self {
            Self::InputAddressed(p) | Self::Fixed { path: p, .. } => Some(p),
            _ => None,
        }
    }
}

/// Nix's derivation type, from its outputs (all outputs must agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivationKind {
    /// Input-addressed, paths known.
    InputAddressed,
    /// Input-addressed, deferred.
    Deferred,
    /// Fixed-output.
    Fixed,
    /// Floating content-addressed.
    Floating,
    /// Impure.
    Impure,
}

/// A derivation as stored in a `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Derivation {
    /// Outputs by name.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivations and the outputs used from each.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    /// Input store paths (sources and already-resolved inputs).
    pub input_srcs: BTreeSet<StorePath>,
    /// `system`, e.g. `x86_64-linux`.
    pub platform: String,
    /// The builder program.
    pub builder: String,
    /// Builder arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
}

impl Derivation {
    /// The derivation's kind, as Nix 2.8's `Derivation::type()` decides it: every output must be
    /// of the same kind, floating outputs must share one hash algorithm, and a fixed-output
    /// derivation has exactly one output.
    pub fn kind(&self, name: &str) -> Result<DerivationKind, DerivationError> {
        let err = |reason: &str| DerivationError::NotApplicable {
            name: name.to_owned(),
            reason: reason.to_owned(),
        };
        let kind_of = |o: &DerivationOutput| match o {
            DerivationOutput::InputAddressed(_) => DerivationKind::InputAddressed,
            DerivationOutput::Deferred => DerivationKind::Deferred,
            DerivationOutput::Fixed { .. } => DerivationKind::Fixed,
            DerivationOutput::Floating { .. } => DerivationKind::Floating,
            DerivationOutput::Impure { .. } => DerivationKind::Impure,
        };
        let mut outs = self.outputs.values();
        let first = outs.next().ok_or_else(|| err("a derivation must have at least one output"))?;
        let kind = kind_of(first);
        if !outs.all(|o| kind_of(o) == kind) {
            return Err(err("can't mix derivation output types"));
        }
        if kind == DerivationKind::Fixed && self.outputs.len() != 1 {
            return Err(err("a fixed-output derivation must have exactly one output"));
        }
        let algos: BTreeSet<HashAlgo> = self
            .outputs
            .values()
            .filter_map(|o| match o {
                DerivationOutput::Floating { algo, .. } => Some(*algo),
                _ => None,
            })
            .collect();
        if algos.len() > 1 {
            return Err(err("all floating outputs must use the same hash algorithm"));
        }
        Ok(kind)
    }

    /// All store paths this `.drv` refers to: input sources and input derivation paths.
    pub fn references(&self) -> BTreeSet<StorePath> {
        let mut refs = self.input_srcs.clone();
        refs.extend(self.input_drvs.keys().cloned());
        refs
    }

    /// The `.drv` store path: a `text:` path of the ATerm with the references above, named
    /// `<name>.drv`.
    pub fn drv_path(&self, name: &str) -> Result<StorePath, DerivationError> {
        let aterm = self.to_aterm();
        make_text_path(&format!("{name}.drv"), &Hash::sha256(sha256(&aterm)), &self.references())
            .map_err(|source| DerivationError::StorePath { what: "name".into(), source })
    }

    /// Checks fixed-output paths against their hashes and output names against the name rules.
    /// (Input-addressed paths need input derivations; see [`modulo`].)
    pub fn check_output_paths(&self, name: &str) -> Result<(), DerivationError> {
        for (out, o) in &self.outputs {
            let out_name = output_path_name(name, out);
            crate::store_path::check_name(&out_name, &out_name).map_err(|source| {
                DerivationError::StorePath { what: format!("output name {out:?}"), source }
            })?;
            if let DerivationOutput::Fixed { method, hash, path } = o {
                let want = fixed_output_path(&out_name, *method, hash)?;
                if &want != path {
                    return Err(DerivationError::BadOutput {
                        name: out.clone(),
                        reason: format!("fixed output path is {path}, but its hash gives {want}"),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The store path of a fixed output `(method, hash)` named `name` (no references).
pub fn fixed_output_path(
    name: &str,
    method: CaMethod,
    hash: &Hash,
) -> Result<StorePath, DerivationError> {
    let none = BTreeSet::new();
    let r = match method {
        CaMethod::Text => make_text_path(name, hash, &none),
        CaMethod::Flat => {
            make_fixed_output_path(name, FileIngestionMethod::Flat, hash, &none, false)
        }
        CaMethod::Recursive => {
            make_fixed_output_path(name, FileIngestionMethod::Recursive, hash, &none, false)
        }
    };
    r.map_err(|source| DerivationError::StorePath {
        what: format!("fixed output {name:?}"),
        source,
    })
}

/// Nix's `hashPlaceholder(output)`: `/` + nix32(sha256("nix-output:" + output)); stands for
/// the derivation's own output path in builder, args and env.
pub fn hash_placeholder(output: &str) -> String {
    format!("/{}", base32::encode(&sha256(format!("nix-output:{output}"))))
}

/// Nix's downstream ("upstream output") placeholder for output `output` of the floating input
/// derivation `drv_path`: `/` + nix32(sha256("nix-upstream-output:" + drvHashPart + ":" +
/// outputPathName(drvName, output))). Resolution replaces it with the real output path.
pub fn downstream_placeholder(
    drv_path: &StorePath,
    output: &str,
) -> Result<String, DerivationError> {
    let drv_name = drv_path
        .drv_name()
        .map_err(|source| DerivationError::StorePath { what: "input derivation".into(), source })?;
    let clear = format!(
        "nix-upstream-output:{}:{}",
        drv_path.hash_part(),
        output_path_name(drv_name, output)
    );
    Ok(format!("/{}", base32::encode(&sha256(clear))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_match_nix() {
        // Values from real Nix 2.8 .drv files (nix-protocol.md §4.1, §4.2).
        assert_eq!(
            hash_placeholder("out"),
            "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
        let dep: StorePath =
            "/nix/store/hqq31mv9cnzbjcr9n5adb5ksv4g2b2zm-ca-dep.drv".parse().unwrap();
        // Only the format is checked here; the real-Nix tests compare against .drv files.
        assert_eq!(downstream_placeholder(&dep, "out").unwrap().len(), 53);
        let not_drv: StorePath =
            "/nix/store/hqq31mv9cnzbjcr9n5adb5ksv4g2b2zm-ca-dep".parse().unwrap();
        assert!(downstream_placeholder(&not_drv, "out").is_err());
    }

    #[test]
    fn output_triples() {
        fn f(p: &str, a: &str, h: &str) -> Result<DerivationOutput, DerivationError> {
            DerivationOutput::from_triple("out", p, a, h)
        }
        assert_eq!(f("", "", "").unwrap(), DerivationOutput::Deferred);
        assert!(matches!(
            f("", "r:sha256", "").unwrap(),
            DerivationOutput::Floating { method: CaMethod::Recursive, algo: HashAlgo::Sha256 }
        ));
        assert!(matches!(
            f("", "text:sha256", "impure").unwrap(),
            DerivationOutput::Impure { method: CaMethod::Text, .. }
        ));
        assert!(f("", "", "abc").is_err());
        assert!(f("/nix/store/x", "", "").is_err());
        assert!(f("", "r:sha257", "").is_err());
        let p = "/nix/store/6dlq85ipg078m6vw6pc6w1pfylqpyp4s-fod-flat";
        let hex = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let o = f(p, "sha256", hex).unwrap();
        assert_eq!(o.to_triple(), (p.into(), "sha256".into(), hex.into()));
        assert!(f(p, "sha256", &hex.to_uppercase()).is_err());
        assert!(f("", "sha256", hex).is_err());
    }
}
